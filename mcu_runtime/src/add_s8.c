/*
 * add_s8.c - element-wise quantized addition, TFLite's scheme (see kdm_kernels.h): both inputs
 * are offset by their zero-points, scaled up by 2^left_shift for headroom, each brought to a
 * common scale by its (multiplier, shift), summed, and the sum brought to the output scale.
 * All three rescales use the model's rounding (kdm_requant_). The operands are at most
 * 255 * 2^20 in magnitude; the sum wraps (uint32) rather than overflow on a malformed scale.
 */
#include "kdm_kernels.h"

void kdm_add_s8(const kdm_add_params *p, const int8_t *a, const int8_t *b, int8_t *out, int32_t n)
{
    int32_t lo = p->act_min - p->out_zp, hi = p->act_max - p->out_zp;
    for (int32_t i = 0; i < n; i++) {
        int32_t xa = (a[i] - p->zp1) * (1 << p->left_shift);
        int32_t xb = (b[i] - p->zp2) * (1 << p->left_shift);
        uint32_t sum = (uint32_t)kdm_requant_(xa, p->m1, p->s1, p->flags) +
                       (uint32_t)kdm_requant_(xb, p->m2, p->s2, p->flags);
        int32_t v = kdm_requant_((int32_t)sum, p->m_out, p->s_out, p->flags);
        v = v < lo ? lo : v > hi ? hi : v;
        out[i] = (int8_t)(v + p->out_zp);
    }
}
