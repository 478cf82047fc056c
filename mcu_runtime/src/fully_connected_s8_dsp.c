/*
 * fully_connected_s8_dsp.c - fully-connected layer, int8 weights, for the Cortex-M DSP
 * extension (bit-identical to fully_connected_s8_ref.c; see kdm_kernels.h).
 *
 * The input is staged once in scratch as int16, each group of four inputs k .. k+3 as the two
 * words (x[k], x[k+2]) and (x[k+1], x[k+3]): the lane pairs SXTB16 and SXTB16 ROR #8 make of a
 * word of four weights, so weights are used in the blob's order with no shuffling. Two rows
 * share each staged word; per 16 inputs and 2 rows (32 MACs) the loop issues 8 weight loads,
 * 16 SXTB16, 4 LDRD of staged pairs, 16 SMLAD and 5 of pointer and loop upkeep: 49
 * instructions, 1.53 per MAC (GCC 12 -O2, Cortex-M4).
 * Inputs past the last whole group (n_in mod 4) are summed in C from the raw input. An odd last
 * row runs as a pair with itself and keeps one result.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

/* One group of four inputs for both rows: the staged pair (x02, x13) at c, a weight word from
 * each row (w0, w1 advance by 4), 4 SXTB16, 4 SMLAD. */
#define GROUP(c)                                                                                   \
    do {                                                                                           \
        uint32_t x02 = kdm_ld32a(c), x13 = kdm_ld32a((c) + 4), v = kdm_ld32(w0);                   \
        a0 = kdm_smlad(kdm_sxtb16(v), x02, a0);                                                    \
        a0 = kdm_smlad(kdm_sxtb16_ror8(v), x13, a0);                                               \
        v = kdm_ld32(w1);                                                                          \
        a1 = kdm_smlad(kdm_sxtb16(v), x02, a1);                                                    \
        a1 = kdm_smlad(kdm_sxtb16_ror8(v), x13, a1);                                               \
        w0 += 4;                                                                                   \
        w1 += 4;                                                                                   \
    } while (0)

void kdm_fully_connected_s8_dsp(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const int8_t *w, int8_t *out, void *scratch)
{
    const kdm_requant_params rq = *q; /* a local copy: the int8 stores cannot alias it */
    const int32_t n = p->n_in, n4 = n & ~3, n_out = p->n_out;
    uint8_t *col = (uint8_t *)scratch;
    for (int32_t k = 0; k < n4; k += 4) {
        uint32_t v = kdm_ld32(in + k);
        kdm_st32a(col + 2 * k, kdm_sxtb16(v));
        kdm_st32a(col + 2 * k + 4, kdm_sxtb16_ror8(v));
    }
    int32_t acc[KDM_CHUNK + 1]; /* raw sums of up to KDM_CHUNK rows (+1: an odd last row) */
    for (int32_t o0 = 0; o0 < n_out; o0 += KDM_CHUNK) {
        const int32_t n_rows = n_out - o0 < KDM_CHUNK ? n_out - o0 : KDM_CHUNK;
        for (int32_t j = 0; j < n_rows; j += 2) {
            const int32_t o = o0 + j, o1 = j + 1 < n_rows ? o + 1 : o;
            const int8_t *w0 = w + o * p->row_stride, *w1 = w + o1 * p->row_stride;
            int32_t a0 = rq.bias[o], a1 = rq.bias[o1];
            const uint8_t *c = col;
            for (int32_t g = n4 >> 4; g > 0; g--, c += 32) {
                GROUP(c);
                GROUP(c + 8);
                GROUP(c + 16);
                GROUP(c + 24);
            }
            for (int32_t g = (n4 >> 2) & 3; g > 0; g--, c += 8)
                GROUP(c);
            uint32_t s0 = (uint32_t)a0, s1 = (uint32_t)a1;
            for (int32_t k = n4; k < n; k++) {
                s0 += (uint32_t)(w0[k - n4] * in[k]);
                s1 += (uint32_t)(w1[k - n4] * in[k]);
            }
            acc[j] = (int32_t)s0;
            acc[j + 1] = (int32_t)s1;
        }
        kdm_requant_row_(&rq, o0, acc, out + o0, n_rows);
    }
}
