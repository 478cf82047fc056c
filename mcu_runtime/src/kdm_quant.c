/*
 * kdm_quant.c - requantization (the public face of kdm_requant_ in kdm_kernels.h, so the
 * exporter, the tests and the kernels share one copy), the DSP kernels' row requantization and
 * the blob's CRC-32.
 *
 * CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) four bits at a time from a 16-entry
 * table: 64 bytes of table and a few instructions, against 1 KiB for the byte-wise table; the
 * check runs once per kdm_load.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

int32_t kdm_requantize(int32_t acc, int32_t multiplier, int32_t shift, uint32_t flags)
{
    /* kdm_load keeps shifts in range; a direct caller's stray value is pinned there */
    shift = shift < -31 ? -31 : shift > 30 ? 30 : shift;
    if (multiplier == INT32_MIN && !(flags & KDM_FLAG_SINGLE_ROUNDING)) {
        /* outside what kdm_load admits: the doubling high multiply's one saturating case,
         * INT32_MIN * INT32_MIN, and products that reach INT32_MIN, done in full */
        int32_t left = shift > 0 ? shift : 0;
        int64_t a = (int32_t)((uint32_t)acc << left);
        int64_t h = (a * multiplier + (1 << 30)) >> 31;
        if (h > INT32_MAX)
            h = INT32_MAX;
        int32_t right = left - shift, v = (int32_t)h;
        int32_t mask = (int32_t)((1u << right) - 1u), threshold = (mask >> 1) + (v < 0);
        return (v >> right) + ((v & mask) > threshold);
    }
    return kdm_requant_(acc, multiplier, shift, flags);
}

/*
 * kdm_requant_ in double rounding for the multipliers kdm_load admits (0 or [2^30, 2^31)), in
 * fewer instructions. The doubling high multiply floor((a * m + 2^30) / 2^31) is one SMMLAR:
 * b = 2m read as int32 is 2m - 2^32, and (a * b + 2^31) / 2^32 rounded down is that value
 * minus a, so SMMLAR(a, b, a) = a + floor((a * b + 2^31) / 2^32) is it exactly (m = 0 gives
 * 0 apart). A right shift (shift < 0, right = -shift = ~shift + 1) rounds as kdm_round_shift_.
 */
KDM_ALWAYS_INLINE int32_t requant_loaded(int32_t x, int32_t m, int32_t shift)
{
    const int32_t b = (int32_t)((uint32_t)m << 1);
    if (shift >= 0) {
        const int32_t a = (int32_t)((uint32_t)x << shift);
        return b ? kdm_smmlar(a, b, a) : 0;
    }
    const int32_t h = b ? kdm_smmlar(x, b, x) : 0;
    return (((h + (h >> 31)) >> ~shift) + 1) >> 1;
}

/* One loop per rounding mode, so the mode is not tested per value; kdm_requant_ is inlined into
 * each with a constant mode. */
#define REQUANT_LOOP(rq)                                                                           \
    for (int32_t i = 0; i < n; i++) {                                                              \
        int32_t v = (rq);                                                                          \
        v = v < lo ? lo : v;                                                                       \
        v = v > hi ? hi : v;                                                                       \
        out[i] = (int8_t)(v + zp);                                                                 \
    }

void kdm_requant_row_(const kdm_requant_params *q, int32_t c0, const int32_t *acc, int8_t *out,
                      int32_t n)
{
    const int32_t *mult = q->mult + c0, *shift = q->shift + c0;
    const int32_t zp = q->out_zp, lo = q->act_min - zp, hi = q->act_max - zp;
    if (q->flags & KDM_FLAG_SINGLE_ROUNDING)
        REQUANT_LOOP(kdm_requant_(acc[i], mult[i], shift[i], KDM_FLAG_SINGLE_ROUNDING))
    else
        REQUANT_LOOP(requant_loaded(acc[i], mult[i], shift[i]))
}

/* Double rounding, two outputs per channel: the clamp bounds are biased by the zero-point and
 * compared once each. */
#define REQUANT2_LOOP(rq0, rq1)                                                                    \
    for (int32_t i = 0; i < n; i++) {                                                              \
        const int32_t m = mult[i], s = shift[i];                                                   \
        int32_t v0 = (rq0);                                                                        \
        int32_t v1 = (rq1);                                                                        \
        v0 = v0 < lo ? lo : v0;                                                                    \
        v0 = v0 > hi ? hi : v0;                                                                    \
        v1 = v1 < lo ? lo : v1;                                                                    \
        v1 = v1 > hi ? hi : v1;                                                                    \
        out0[i] = (int8_t)(v0 + zp);                                                               \
        out1[i] = (int8_t)(v1 + zp);                                                               \
    }

void kdm_requant_row2_(const kdm_requant_params *q, int32_t c0, const int32_t *acc0,
                       const int32_t *acc1, int8_t *out0, int8_t *out1, int32_t n)
{
    const int32_t *mult = q->mult + c0, *shift = q->shift + c0;
    const int32_t zp = q->out_zp, lo = q->act_min - zp, hi = q->act_max - zp;
    if (q->flags & KDM_FLAG_SINGLE_ROUNDING)
        REQUANT2_LOOP(kdm_requant_(acc0[i], m, s, KDM_FLAG_SINGLE_ROUNDING),
                      kdm_requant_(acc1[i], m, s, KDM_FLAG_SINGLE_ROUNDING))
    else
        REQUANT2_LOOP(requant_loaded(acc0[i], m, s), requant_loaded(acc1[i], m, s))
}

uint32_t kdm_crc32(const uint8_t *p, size_t n)
{
    static const uint32_t nib[16] = {0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu,
                                     0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
                                     0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
                                     0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        crc = (crc >> 4) ^ nib[crc & 15u];
        crc = (crc >> 4) ^ nib[crc & 15u];
    }
    return ~crc;
}
