/*
 * fully_connected_s4_ref.c - reference fully-connected layer, int4 weights and int8
 * activations (see kdm_kernels.h): out[o] = requant(bias[o] + sum over i < n_in of
 * nibble i of row o * in[i]).
 */
#include "kdm_kernels.h"

void kdm_fully_connected_s4_ref(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const uint8_t *w, int8_t *out, void *scratch)
{
    (void)scratch;
    for (int32_t o = 0; o < p->n_out; o++) {
        const uint8_t *row = w + o * p->row_stride;
        uint32_t acc = (uint32_t)q->bias[o];
        for (int32_t i = 0; i < p->n_in; i++)
            acc += (uint32_t)(kdm_nibble_(row, i) * in[i]);
        out[o] = kdm_requant_out_(q, o, (int32_t)acc);
    }
}
