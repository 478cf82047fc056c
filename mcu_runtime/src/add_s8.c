/*
 * add_s8.c - element-wise quantized addition, TFLite's scheme (see kdm_kernels.h): both inputs
 * are offset by their zero-points, scaled up by 2^left_shift for headroom, each brought to a
 * common scale by its (multiplier, shift), summed, and the sum brought to the output scale.
 * All three rescales use the model's rounding (kdm_requant_). The operands are at most
 * 255 * 2^20 in magnitude; the sum wraps (uint32) rather than overflow on a malformed scale.
 *
 * kdm_add_s8_dsp computes the same values with SMMLAR in double rounding when no rescale has a
 * multiplier of 0 or a left shift (TFLite's input rescales are at most 1/2: shift 0 or right):
 * an input x = (a - zp) 2^ls is one MLA (a 2^ls - zp 2^ls), its doubling high multiply h one
 * SMMLAR (kdm_quant.c), and RoundingDivideByPOT(h, r) is (h - [h < 0] + 2^(r-1)) >> r, which
 * for r = 0 must leave h alone: the mask nz (all ones for r > 0, else 0) and half = 2^(r-1)
 * (0 for r = 0) make it one expression, |h| < 2^28 so nothing overflows. The output rescale is
 * the convolutions' (kdm_rq_dbl_out_). Anything else runs the portable loop.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

void kdm_add_s8_ref(const kdm_add_params *p, const int8_t *a, const int8_t *b, int8_t *out,
                    int32_t n)
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

/* One input's rescale as above (b = 2 m, nz / half / r from its shift). */
KDM_ALWAYS_INLINE int32_t add_in_(int32_t x, int32_t b, int32_t nz, int32_t half, int32_t r)
{
    const int32_t h = kdm_smmlar(x, b, x);
    return (h + ((h >> 31) & nz) + half) >> r;
}

void kdm_add_s8_dsp(const kdm_add_params *p, const int8_t *a, const int8_t *b, int8_t *out,
                    int32_t n)
{
    if (KDM_SINGLE_ROUNDING_(p->flags) || !p->m1 || !p->m2 || !p->m_out || p->s1 > 0 || p->s2 > 0 ||
        p->s_out >= 0) {
        kdm_add_s8_ref(p, a, b, out, n);
        return;
    }
    const int32_t sc = 1 << p->left_shift, za = -p->zp1 * sc, zb = -p->zp2 * sc;
    const int32_t ba = (int32_t)((uint32_t)p->m1 << 1), bb = (int32_t)((uint32_t)p->m2 << 1);
    const int32_t ra = -p->s1, rb = -p->s2, nza = ra ? -1 : 0, nzb = rb ? -1 : 0;
    const int32_t ha = ra ? 1 << (ra - 1) : 0, hb = rb ? 1 << (rb - 1) : 0;
    const int32_t bo = (int32_t)((uint32_t)p->m_out << 1), ko = ~p->s_out;
    const int32_t zp2 = 2 * p->out_zp + 1, lo = p->act_min, hi = p->act_max;
    for (int32_t i = 0; i < n; i++) {
        const int32_t s =
            add_in_(a[i] * sc + za, ba, nza, ha, ra) + add_in_(b[i] * sc + zb, bb, nzb, hb, rb);
        int32_t v = kdm_rq_dbl_out_(kdm_smmlar(s, bo, s), ko, zp2);
        v = v < lo ? lo : v > hi ? hi : v;
        out[i] = (int8_t)v;
    }
}
