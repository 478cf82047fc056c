/*
 * run_samples.c - firmware A: run an exported model on every test sample of its samples.bin
 * and print the raw output bytes, so the host can compare them with the host runtime's byte for
 * byte (bench/mcu/run.sh `check`).
 *
 * Links the export's model.c (kdm_model_blob) and samples.bin embedded whole as fw_samples
 * (embed.cmake), format: "KDMS", u32 n, u32 in_size, u32 out_size, then n records of
 * { int8 input[in_size], int32 label, int8 host_output[out_size] } (little-endian, unaligned).
 *
 * Output, one line each:
 *   calib instr=<measured> expect=<FW_CALIB_INSTR>      the tick -> instruction check (fw.h)
 *   sample <i> label=<l> pred=<argmax> instr=<n> host_match=<0|1> out=<hex bytes>
 *   summary samples=<n> correct=<c> host_match=<k> instr_min=... instr_max=... instr_mean=...
 *           macs=<sum of kdm_op_macs> stack_used=<bytes> stack_size=<bytes> arena=<bytes>
 * instr counts the whole kdm_invoke (input copy, every op, output copy) and is only meaningful
 * under QEMU -icount shift=0. Exit status 0 when every sample ran (matching is judged on the
 * host), 2 when the model does not load, 3 when samples.bin does not fit the model, 4 when an
 * invoke fails.
 */
#include <stdint.h>

#include "fw.h"
#include "kdm.h"
#include "model.h"

extern const uint8_t fw_samples[];
extern const uint32_t fw_samples_len;

static uint8_t arena[KDM_MODEL_ARENA_SIZE] __attribute__((aligned(8)));
static int8_t output[FW_OUT_SIZE];

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int fail(const char *what, kdm_status st, int code)
{
    fw_puts("error ");
    fw_puts(what);
    fw_puts(": ");
    fw_puts(kdm_status_str(st));
    fw_putc('\n');
    return code;
}

int main(void)
{
    fw_put_calib();

    kdm_model m;
    kdm_status st = kdm_load(&m, kdm_model_blob, kdm_model_blob_len);
    if (st != KDM_OK)
        return fail("kdm_load", st, 2);
    if (fw_samples_len < 16 || rd32(fw_samples) != 0x534D444Bu) /* "KDMS" */
        return fail("samples.bin: bad header", KDM_ERR_MAGIC, 3);
    uint32_t n = rd32(fw_samples + 4), in_size = rd32(fw_samples + 8);
    uint32_t out_size = rd32(fw_samples + 12), rec = in_size + 4 + out_size;
    if (in_size != kdm_input_size(&m) || out_size != kdm_output_size(&m) ||
        out_size > sizeof output || n > (fw_samples_len - 16) / rec)
        return fail("samples.bin does not fit the model", KDM_ERR_SHAPE, 3);

    /* every MAC the model does; a Cortex-M4 retires at most two per instruction (SMLAD) */
    uint32_t macs = 0;
    const uint8_t *h = kdm_model_blob;
    uint32_t n_ops =
        (uint32_t)h[24] | (uint32_t)h[25] << 8 | (uint32_t)h[26] << 16 | (uint32_t)h[27] << 24;
    for (uint32_t i = 0; i < n_ops; i++)
        macs += kdm_op_macs(&m, i);

    uint32_t correct = 0, matches = 0;
    uint64_t total = 0, lo = UINT64_MAX, hi = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *r = fw_samples + 16 + (uint64_t)i * rec;
        uint32_t t0 = fw_ticks();
        st = kdm_invoke(&m, arena, sizeof arena, (const int8_t *)r, output);
        uint32_t t1 = fw_ticks();
        if (st != KDM_OK)
            return fail("kdm_invoke", st, 4);
        uint64_t instr = fw_ticks_to_instr(fw_tick_span(t0, t1));
        total += instr;
        lo = instr < lo ? instr : lo;
        hi = instr > hi ? instr : hi;
        uint32_t label = rd32(r + in_size), pred = kdm_argmax_s8(output, out_size);
        const uint8_t *host = r + in_size + 4;
        uint32_t same = 1;
        for (uint32_t j = 0; j < out_size; j++)
            same &= (uint8_t)output[j] == host[j];
        correct += pred == label;
        matches += same;

        fw_puts("sample ");
        fw_put_u32(i);
        fw_put_kv("label", label);
        fw_put_kv("pred", pred);
        fw_puts(" instr=");
        fw_put_u64(instr);
        fw_put_kv("host_match", same);
        fw_puts(" out=");
        for (uint32_t j = 0; j < out_size; j++)
            fw_put_hex8((uint8_t)output[j]);
        fw_putc('\n');
    }
    fw_puts("summary");
    fw_put_kv("samples", n);
    fw_put_kv("correct", correct);
    fw_put_kv("host_match", matches);
    fw_puts(" instr_min=");
    fw_put_u64(n ? lo : 0);
    fw_puts(" instr_max=");
    fw_put_u64(hi);
    fw_puts(" instr_mean=");
    fw_put_u64(n ? total / n : 0);
    fw_put_kv("macs", macs);
    fw_put_kv("stack_used", fw_stack_used());
    fw_put_kv("stack_size", fw_stack_size());
    fw_put_kv("arena", (uint32_t)sizeof arena);
    fw_putc('\n');
    return 0;
}
