/*
 * fully_connected_s8_dsp.c - fully-connected layer, int8 weights, for the Cortex-M DSP
 * extension (bit-identical to fully_connected_s8_ref.c; see kdm_kernels.h).
 *
 * The input is staged once in scratch as int16, each group of four inputs k .. k+3 as the two
 * words (x[k], x[k+2]) and (x[k+1], x[k+3]): the lane pairs SXTB16 and SXTB16 ROR #8 make of a
 * word of four weights, so weights are used in the blob's order with no shuffling. Rows go in
 * pairs (an odd last row is paired with itself). On the Cortex-M4 the loop is inline assembly:
 * per 8 inputs one LDRD brings 8 weights of each row and two LDRD the four staged words they
 * meet, so per 32 inputs and 2 rows (64 MACs) it issues 8 LDRD of staged pairs, 8 LDRD of
 * weights, 32 SXTB16, 32 SMLAD, CMP and BNE: 82 instructions, 1.28 per MAC. (GCC 12 -O2 makes
 * 49 instructions of the same work per 32 MACs from C: one LDR per weight word, no post-indexed
 * loads; a four-row loop, 86 per 64 MACs, is no better once written out.) Staging is assembly
 * too: 32 inputs in 8 LDR, 16 SXTB16, 8 STRD and the loop, 34 instructions.
 * Whole groups the loop does not reach (n_in mod 32 inputs; all of them elsewhere, where the
 * C code runs: the host's tests, -O0) are summed in C a row at a time from the staged words,
 * the last n_in mod 4 inputs in C from the raw input.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

/* Optimized GNU C builds for cores with the DSP extension (the loop needs 13 registers, more
 * than an -O0 build may leave free). */
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP && defined(__GNUC__) && defined(__OPTIMIZE__)
#define FC_ASM 1
#else
#define FC_ASM 0
#endif

#if FC_ASM
/* Weight word w (from an LDRD of 8 weights) times the staged pair (x02, x13), into a. */
#define ASM_WORD(w, x02, x13, a)                                                                   \
    "sxtb16 %[t], %[" w "]\n\t"                                                                    \
    "smlad %[" a "], %[t], %[" x02 "], %[" a "]\n\t"                                               \
    "sxtb16 %[" w "], %[" w "], ror #8\n\t"                                                        \
    "smlad %[" a "], %[" w "], %[" x13 "], %[" a "]\n\t"
/* 8 inputs, both rows: 2 LDRD of staged pairs, 2 of weights, 8 SXTB16, 8 SMLAD. */
#define ASM_STEP                                                                                   \
    "ldrd %[xa], %[xb], [%[c]], #8\n\t"                                                            \
    "ldrd %[xc], %[xd], [%[c]], #8\n\t"                                                            \
    "ldrd %[wa], %[wb], [%[w0]], #8\n\t" ASM_WORD("wa", "xa", "xb", "a0")                          \
        ASM_WORD("wb", "xc", "xd", "a0") "ldrd %[wa], %[wb], [%[w1]], #8\n\t" ASM_WORD(            \
            "wa", "xa", "xb", "a1") ASM_WORD("wb", "xc", "xd", "a1")
/* Stage 8 inputs at s as 4 words at d (both advance): 2 LDR (any alignment), 4 SXTB16,
 * 2 STRD. */
#define ASM_STAGE                                                                                  \
    "ldr %[v0], [%[s]], #4\n\t"                                                                    \
    "ldr %[v2], [%[s]], #4\n\t"                                                                    \
    "sxtb16 %[v1], %[v0], ror #8\n\t"                                                              \
    "sxtb16 %[v0], %[v0]\n\t"                                                                      \
    "sxtb16 %[v3], %[v2], ror #8\n\t"                                                              \
    "sxtb16 %[v2], %[v2]\n\t"                                                                      \
    "strd %[v0], %[v1], [%[d]], #8\n\t"                                                            \
    "strd %[v2], %[v3], [%[d]], #8\n\t"
#endif

/* Raw sums of the rows w0, w1 (w1 = w0 for an odd last row) over inputs [0, n32), n32 > 0 a
 * multiple of 32, plus b0, b1, to *acc0, *acc1; not called outside the assembly build. */
static KDM_NOINLINE void rows2(const uint8_t *col, const int8_t *w0, const int8_t *w1, int32_t n32,
                               int32_t b0, int32_t b1, int32_t *acc0, int32_t *acc1)
{
#if FC_ASM
    const uint8_t *c = col, *e = col + 2 * n32;
    uint32_t xa, xb, xc, xd, wa, wb, t;
    __asm__("1:\n\t" ASM_STEP ASM_STEP ASM_STEP ASM_STEP "cmp %[c], %[e]\n\t"
            "bne 1b"
            : [a0] "+r"(b0), [a1] "+r"(b1), [c] "+r"(c), [w0] "+r"(w0), [w1] "+r"(w1),
              [xa] "=&r"(xa), [xb] "=&r"(xb), [xc] "=&r"(xc), [xd] "=&r"(xd), [wa] "=&r"(wa),
              [wb] "=&r"(wb), [t] "=&r"(t)
            : [e] "r"(e)
            : "cc", "memory");
#else
    (void)col, (void)w0, (void)w1, (void)n32;
#endif
    *acc0 = b0;
    *acc1 = b1;
}

void kdm_fully_connected_s8_dsp(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const int8_t *w, int8_t *out, void *scratch)
{
    const int32_t n = p->n_in, n4 = n & ~3, n_out = p->n_out, rs = p->row_stride;
    const int32_t n32 = FC_ASM ? n & ~31 : 0; /* inputs the assembly loop takes */
    uint8_t *col = (uint8_t *)scratch, *d = col;
    const int8_t *s = in;
#if FC_ASM
    if (n32) {
        uint32_t v0, v1, v2, v3;
        __asm__("1:\n\t" ASM_STAGE ASM_STAGE ASM_STAGE ASM_STAGE "cmp %[s], %[se]\n\t"
                "bne 1b"
                : [s] "+r"(s), [d] "+r"(d), [v0] "=&r"(v0), [v1] "=&r"(v1), [v2] "=&r"(v2),
                  [v3] "=&r"(v3)
                : [se] "r"(in + n32)
                : "cc", "memory");
    }
#endif
    for (; s != in + n4; s += 4, d += 8) {
        const uint32_t v = kdm_ld32(s);
        kdm_st32a(d, kdm_sxtb16(v));
        kdm_st32a(d + 4, kdm_sxtb16_ror8(v));
    }
    int32_t acc[KDM_CHUNK]; /* raw sums of up to KDM_CHUNK rows */
    for (int32_t o0 = 0; o0 < n_out; o0 += KDM_CHUNK) {
        const int32_t n_rows = n_out - o0 < KDM_CHUNK ? n_out - o0 : KDM_CHUNK;
        const int8_t *wc = w + o0 * rs;
        const int32_t *bias = q->bias + o0;
        for (int32_t j = 0; j < n_rows; j += 2) {
            const int32_t j1 = j + 1 < n_rows ? j + 1 : j;
            if (n32)
                rows2(col, wc + j * rs, wc + j1 * rs, n32, bias[j], bias[j1], acc + j, acc + j1);
            else
                acc[j] = bias[j], acc[j1] = bias[j1];
        }
        for (int32_t j = 0; j < n_rows && n32 != n; j++) {
            const int8_t *r = wc + j * rs;
            int32_t a = acc[j];
            for (int32_t k = n32; k < n4; k += 4) {
                const uint32_t v = kdm_ld32(r + k);
                a = kdm_smlad(kdm_sxtb16(v), kdm_ld32a(col + 2 * k), a);
                a = kdm_smlad(kdm_sxtb16_ror8(v), kdm_ld32a(col + 2 * k + 4), a);
            }
            uint32_t u = (uint32_t)a;
            for (int32_t k = n4; k < n; k++)
                u += (uint32_t)(r[k] * in[k]);
            acc[j] = (int32_t)u;
        }
        kdm_requant_row_(q, o0, acc, out + o0, n_rows);
    }
}
