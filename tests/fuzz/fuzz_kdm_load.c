/*
 * fuzz_kdm_load.c - libFuzzer target for the .kdm loader (mcu_runtime/src/kdm_load.c) and,
 * for blobs it accepts, the whole inference (kdm_invoke on a zero input).
 *
 * The input is copied into a 4-byte aligned buffer of exactly its size, so AddressSanitizer
 * reports any read past it. Before loading, the harness writes total_len = size and the CRC
 * of the mutated bytes into the header: otherwise almost every mutation would stop at the CRC
 * check and the checks behind it (tables, tensors, ops) would never be reached; the CRC and
 * truncation paths themselves are covered by tests/mcu_runtime/test_kdm_load.c. Models whose
 * arena or work is large (a valid blob can describe a huge convolution in a few bytes) are
 * loaded but not run, to keep the executions fast.
 *
 * Built and run by run_fuzz.sh with clang -fsanitize=fuzzer,address,undefined, once with the
 * reference kernels and once with -DKDM_FORCE_DSP=1 (the DSP kernels' portable emulation).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kdm.h"

#define FUZZ_MAX_ARENA (1u << 20)
#define FUZZ_MAX_WORK  (1u << 22) /* multiply-accumulates and window reads per inference */

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* An upper bound of the work of one inference of a loaded model (saturating). */
static uint64_t work(const kdm_model *m)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < m->n_ops; i++) {
        const uint8_t *r = m->ops + (size_t)i * KDM_OP_WORDS * 4;
        const uint8_t *t = m->tensors + (size_t)rd32(r + 12) * KDM_TENSOR_WORDS * 4;
        const uint8_t *x = m->tensors + (size_t)rd32(r + 4) * KDM_TENSOR_WORDS * 4;
        uint64_t out = (uint64_t)rd32(t + 4) * rd32(t + 8) * rd32(t + 12);
        uint64_t in = (uint64_t)rd32(x + 4) * rd32(x + 8) * rd32(x + 12);
        uint64_t window = (uint64_t)rd32(r + 16) * rd32(r + 20);
        total += kdm_op_macs(m, i) + out * (window ? window : 1) + in;
        if (total > FUZZ_MAX_WORK)
            break;
    }
    return total;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *blob = aligned_alloc(4, (size + 3) & ~(size_t)3);
    if (!blob)
        return 0;
    if (size)
        memcpy(blob, data, size);
    if (size >= KDM_HEADER_SIZE) {
        wr32(blob + 8, (uint32_t)size);
        wr32(blob + 12, kdm_crc32(blob + 16, size - 16));
    }
    /* an exactly-sized copy: the aligned_alloc above may round the size up */
    uint8_t *exact = malloc(size ? size : 1);
    if (!exact) {
        free(blob);
        return 0;
    }
    memcpy(exact, blob, size);
    free(blob);
    kdm_model m;
    /* malloc's alignment is at least 8 on the hosts this runs on */
    if (kdm_load(&m, exact, size) == KDM_OK && kdm_arena_size(&m) <= FUZZ_MAX_ARENA &&
        work(&m) <= FUZZ_MAX_WORK) {
        uint32_t n_in = kdm_input_size(&m), n_out = kdm_output_size(&m);
        uint8_t *arena = aligned_alloc(4, (kdm_arena_size(&m) + 3) & ~3u);
        int8_t *in = calloc(n_in, 1), *out = malloc(n_out);
        if (arena && in && out && kdm_invoke(&m, arena, kdm_arena_size(&m), in, out) != KDM_OK)
            abort(); /* a loaded model with a right-size arena must run */
        free(arena);
        free(in);
        free(out);
    }
    free(exact);
    return 0;
}
