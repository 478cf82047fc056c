/*
 * bench_layers.c - firmware B: instructions per op of an exported model, for the per-layer
 * table of bench/mcu/run.sh. Built twice from the same sources, with the Cortex-M DSP kernels
 * and with -DKDM_FORCE_REF=1 (the plain-C reference); FW_KERNELS names which.
 *
 * kdm_invoke runs once on a fixed pseudo-random input so that every tensor in the arena holds
 * a real activation; then each op i runs alone through kdm_invoke_op (an op's output never
 * overlaps its inputs, so repeating it is harmless). An op is first timed once, then `reps`
 * more times back to back so that the total spans at least FW_MIN_TICKS counter ticks (10^6
 * instructions), which keeps the tick resolution (40 or 62.5 instructions, fw.h) under 0.1 %
 * of the figure. The op's type,
 * weight bits and shapes come from the blob's op and tensor tables (format: kdm.h).
 *
 * Output, one line each (key=value, parsed by run.sh):
 *   calib instr=<measured> expect=<FW_CALIB_INSTR>
 *   model kernels=<dsp|ref|nodsp> ops=<n> invoke_instr=<whole kdm_invoke>
 *   layer op=<i> type=<name> wbits=<8|4|0> in=<c>x<h>x<w> out=<c>x<h>x<w> k=<kh>x<kw> s=<stride>
 *         macs=<kdm_op_macs> instr=<per run> reps=<runs timed> ipm_milli=<1000 * instr / macs>
 *   total layers_instr=<sum of the layer figures>
 * Only meaningful under QEMU -icount shift=0. Exit status 0, or 2 when the model does not load
 * or an op fails.
 */
#include <stdint.h>

#include "fw.h"
#include "kdm.h"
#include "model.h"
#include "fw_blob.h" /* after model.h */

#ifndef FW_KERNELS
#define FW_KERNELS "?"
#endif
#define FW_MIN_TICKS FW_TICKS_FOR(1000000u)
#define FW_MAX_REPS  64u

static uint8_t arena[KDM_MODEL_ARENA_SIZE] __attribute__((aligned(8)));
static int8_t input[FW_IN_SIZE], output[FW_OUT_SIZE];

static void put_shape(const char *key, uint32_t tensors_off, int32_t t)
{
    fw_putc(' ');
    fw_puts(key);
    fw_putc('=');
    for (uint32_t d = 1; d <= 3; d++) {
        fw_put_u32((uint32_t)blob_word(tensors_off, (uint32_t)t * KDM_TENSOR_WORDS + d));
        if (d < 3)
            fw_putc('x');
    }
}

static int fail(const char *what, kdm_status st)
{
    fw_puts("error ");
    fw_puts(what);
    fw_puts(": ");
    fw_puts(kdm_status_str(st));
    fw_putc('\n');
    return 2;
}

int main(void)
{
    fw_put_calib();

    kdm_model m;
    kdm_status st = kdm_load(&m, kdm_model_blob, kdm_model_blob_len);
    if (st != KDM_OK)
        return fail("kdm_load", st);
    uint32_t seed = 12345u;
    for (uint32_t i = 0; i < sizeof input; i++) {
        seed = seed * 1664525u + 1013904223u;
        input[i] = (int8_t)(seed >> 24);
    }
    uint32_t t0 = fw_ticks();
    st = kdm_invoke(&m, arena, sizeof arena, input, output);
    uint32_t t1 = fw_ticks();
    if (st != KDM_OK)
        return fail("kdm_invoke", st);

    const uint32_t n_ops = (uint32_t)blob_word(24, 0), tensors_off = (uint32_t)blob_word(48, 0);
    const uint32_t ops_off = (uint32_t)blob_word(52, 0);
    fw_puts("model kernels=" FW_KERNELS);
    fw_put_kv("ops", n_ops);
    fw_puts(" invoke_instr=");
    fw_put_u64(fw_ticks_to_instr(fw_tick_span(t0, t1)));
    fw_putc('\n');

    uint64_t sum = 0;
    for (uint32_t i = 0; i < n_ops; i++) {
        uint32_t a = i * KDM_OP_WORDS;
        int32_t type = blob_word(ops_off, a);
        t0 = fw_ticks();
        st = kdm_invoke_op(&m, arena, sizeof arena, i);
        t1 = fw_ticks();
        if (st != KDM_OK)
            return fail("kdm_invoke_op", st);
        uint32_t once = fw_tick_span(t0, t1), reps = 1;
        while (reps < FW_MAX_REPS && reps * once < FW_MIN_TICKS)
            reps *= 2;
        t0 = fw_ticks();
        for (uint32_t r = 0; r < reps; r++)
            kdm_invoke_op(&m, arena, sizeof arena, i);
        t1 = fw_ticks();
        uint64_t instr = fw_ticks_to_instr(fw_tick_span(t0, t1)) / reps;
        uint32_t macs = kdm_op_macs(&m, i);
        sum += instr;

        fw_puts("layer");
        fw_put_kv("op", i);
        fw_puts(" type=");
        fw_puts(op_name(type));
        fw_put_kv("wbits", (uint32_t)blob_word(ops_off, a + 8));
        put_shape("in", tensors_off, blob_word(ops_off, a + 1));
        put_shape("out", tensors_off, blob_word(ops_off, a + 3));
        fw_put_kv("k", (uint32_t)blob_word(ops_off, a + 4));
        fw_putc('x');
        fw_put_u32((uint32_t)blob_word(ops_off, a + 5));
        fw_put_kv("s", (uint32_t)blob_word(ops_off, a + 6));
        fw_put_kv("macs", macs);
        fw_puts(" instr=");
        fw_put_u64(instr);
        fw_put_kv("reps", reps);
        fw_puts(" ipm_milli=");
        fw_put_u64(macs ? (instr * 1000u + macs / 2u) / macs : 0);
        fw_putc('\n');
    }
    fw_puts("total layers_instr=");
    fw_put_u64(sum);
    fw_putc('\n');
    return 0;
}
