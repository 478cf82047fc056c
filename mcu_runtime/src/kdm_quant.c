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
    if (multiplier < 0 && !(flags & KDM_FLAG_SINGLE_ROUNDING)) {
        /* outside what kdm_load admits: with a negative multiplier the doubling high multiply
         * saturates (INT32_MIN * INT32_MIN) or reaches INT32_MAX, which the rounding shift
         * of kdm_requant_ does not allow for: done in full */
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
 * kdm_requant_ in double rounding for the multipliers kdm_load admits (0 or [2^30, 2^31)), the
 * zero-point added and the result saturated to int8, in fewer instructions. The doubling high
 * multiply floor((a * m + 2^30) / 2^31) is one SMMLAR: b = 2m read as int32 is 2m - 2^32, and
 * (a * b + 2^31) / 2^32 rounded down is that value minus a, so SMMLAR(a, b, a) = a +
 * floor((a * b + 2^31) / 2^32) is it exactly (m = 0 gives 0 apart: the output is then zp).
 * A left shift (shift >= 0) gives SSAT8(QADD(h, zp)). A right shift (right = -shift) rounds as
 * kdm_round_shift_: with u = (h + (h >> 31)) >> ~shift the quotient is (u + 1) >> 1, and that
 * plus zp is (u + 2 zp + 1) >> 1 (2 zp is even): QADD of zp2 = 2 zp + 1, then SSAT #8 with
 * ASR #1. QADD saturates only sums whose output is -128 or 127 anyway, so every int32 input
 * gives kdm_requant_'s value clamped to [-128, 127] after the zero-point. A narrower
 * [act_min, act_max] is applied after (kdm_clamp_row_): clamping into it a value already clamped
 * into [-128, 127] changes nothing else.
 *
 * m = 0 (b = 0) must give zp: kdm_requant_row_ accumulates x & (b >> 31) (b < 0 for every
 * other admitted m), which makes h = 0 with no test; kdm_requant_pair_dbl_ (kdm_dsp.h, the
 * convolutions' two pixels of one channel) tests b once for both values. Per value with a right
 * shift: 3 loads, 2 of shift and mask, a branch, SMMLAR, ADD, ASR, QADD, SSAT, STRB and the
 * loop, 16 instructions in kdm_requant_row_ (GCC 12 -O2, Cortex-M4).
 */

#if KDM_M0_ASM
/*
 * kdm_dbl_high_m0_ (kdm_kernels.h): r0 = x, r1 = m in [0, 2^31). With s = x >> 31 and u = |x|
 * (2^31 for INT32_MIN, unsigned), the product P = u m = hi 2^32 + mid 2^16 + lo from four 16-bit
 * MULS: hi = uh mh, mid = uh ml + ul mh, lo = ul ml (u = uh 2^16 + ul, m = mh 2^16 + ml). Since
 * uh <= 2^15 and mh < 2^15, both terms of mid are below 2^31 and mid fits 32 bits. For x >= 0
 * the value is floor((P + 2^30) / 2^31); for x < 0, floor((2^30 - P) / 2^31) =
 * -floor((P + 2^30 - 1) / 2^31): the constant 2^30 + s, then the 64-bit sum shifted right 31
 * (below 2^31) and negated when s = -1 (XOR with s, minus s): 34 instructions with the return.
 * Sums of up to 15 bits (-2^15 <= x < 2^15, most of the small layers' outputs) take a shorter way
 * first, 15 instructions: x mh and x ml are then exact in 32 bits (|x| mh < 2^30,
 * |x| ml < 2^31) and the value is floor((x mh 2^16 + x ml + 2^30) / 2^31) =
 * (x mh + floor(x ml / 2^16) + 2^14) >> 15 (2^30 and 2^16 divide out), with no overflow.
 */
__asm__(".pushsection .text.kdm_dbl_high_m0_,\"ax\",%progbits\n\t"
        ".syntax unified\n\t"
        ".thumb\n\t"
        ".p2align 1\n\t"
        ".global kdm_dbl_high_m0_\n\t"
        ".type kdm_dbl_high_m0_, %function\n\t"
        ".thumb_func\n"
        "kdm_dbl_high_m0_:\n\t"
        "asrs r2, r0, #15\n\t"
        "adds r2, r2, #1\n\t"
        "cmp r2, #1\n\t"
        "bhi 1f\n\t"
        "uxth r3, r1\n\t"
        "lsrs r2, r1, #16\n\t"
        "muls r3, r0\n\t"
        "muls r2, r0\n\t"
        "asrs r3, r3, #16\n\t"
        "adds r2, r2, r3\n\t"
        "movs r3, #1\n\t"
        "lsls r3, r3, #14\n\t"
        "adds r2, r2, r3\n\t"
        "asrs r0, r2, #15\n\t"
        "bx lr\n"
        "1:\n\t"
        "push {r4, r5, lr}\n\t"
        "asrs r2, r0, #31\n\t"
        "eors r0, r2\n\t"
        "subs r0, r0, r2\n\t"
        "uxth r3, r0\n\t"
        "lsrs r0, r0, #16\n\t"
        "uxth r4, r1\n\t"
        "lsrs r1, r1, #16\n\t"
        "movs r5, r3\n\t"
        "muls r5, r4\n\t"
        "muls r3, r1\n\t"
        "muls r1, r0\n\t"
        "muls r0, r4\n\t"
        "adds r0, r0, r3\n\t"
        "lsls r3, r0, #16\n\t"
        "lsrs r0, r0, #16\n\t"
        "adds r5, r5, r3\n\t"
        "adcs r1, r0\n\t"
        "movs r3, #1\n\t"
        "lsls r3, r3, #30\n\t"
        "adds r3, r3, r2\n\t"
        "movs r4, #0\n\t"
        "adds r5, r5, r3\n\t"
        "adcs r1, r4\n\t"
        "lsrs r5, r5, #31\n\t"
        "lsls r1, r1, #1\n\t"
        "orrs r1, r5\n\t"
        "eors r1, r2\n\t"
        "subs r0, r1, r2\n\t"
        "pop {r4, r5, pc}\n\t"
        ".size kdm_dbl_high_m0_, . - kdm_dbl_high_m0_\n\t"
        ".popsection");
#endif

KDM_NOINLINE void kdm_clamp_row_(int8_t *out, int32_t n, int32_t lo, int32_t hi)
{
    for (int32_t i = 0; i < n; i++)
        out[i] = (int8_t)(out[i] < lo ? lo : out[i] > hi ? hi : out[i]);
}

int kdm_requant_simple_(const kdm_requant_params *q, int32_t n)
{
    /* single rounding only where the jobs are built for it (KDM_ASM_JOB_REQUANT) */
    const int single = KDM_SINGLE_ROUNDING_(q->flags);
    if (single && !(KDM_ASM_JOBS && KDM_ASM_SINGLE_ONLY))
        return 0;
    for (int32_t i = 0; i < n; i++)
        if (q->mult[i] == 0 || q->shift[i] >= (single ? -1 : 0))
            return 0;
    return 1;
}

/* Single rounding in full (64-bit product and shift, saturation), then the zero-point and the
 * saturation as above: out of line, for the rare shifts >= 0 (kdm_requant_single_fast_ does
 * the rest inline). */
KDM_NOINLINE int8_t kdm_requant_single_s8_(int32_t x, int32_t m, int32_t s, int32_t zp)
{
    return (int8_t)kdm_ssat8(kdm_qadd(kdm_requant_(x, m, s, KDM_FLAG_SINGLE_ROUNDING), zp));
}

/* The single-rounding loops, out of line so that the double-rounding loops (the exporter's
 * default) compile as if they were alone. */
static KDM_NOINLINE void row_single(const int32_t *mult, const int8_t *shift, int32_t zp,
                                    const int32_t *acc, int8_t *out, int32_t n)
{
    for (int32_t i = 0; i < n; i++)
        out[i] = (int8_t)kdm_requant_single_fast_(acc[i], mult[i], shift[i], zp);
}

KDM_NOINLINE void kdm_requant_quad_single_(const kdm_requant_params *q, int32_t o, int32_t o1,
                                           int32_t a00, int32_t a01, int32_t a10, int32_t a11,
                                           int8_t *out0, int8_t *out1)
{
    const int32_t a0[2] = {a00, a10}, a1[2] = {a01, a11}, zp = q->out_zp;
    for (int32_t j = 0; j < 2; j++) { /* two copies of the rounding, not four: code size */
        const int32_t c = j ? o1 : o, m = q->mult[c], s = q->shift[c];
        out0[c] = (int8_t)kdm_requant_single_fast_(a0[j], m, s, zp);
        out1[c] = (int8_t)kdm_requant_single_fast_(a1[j], m, s, zp);
    }
}

void kdm_requant_row_(const kdm_requant_params *q, int32_t c0, const int32_t *acc, int8_t *out,
                      int32_t n)
{
    const int32_t *mult = q->mult + c0;
    const int8_t *shift = q->shift + c0;
    const int32_t zp = q->out_zp;
    if (KDM_SINGLE_ROUNDING_(q->flags)) {
        row_single(mult, shift, zp, acc, out, n);
        goto clamp;
    }
    const int32_t zp2 = 2 * zp + 1;
    for (int32_t i = 0; i < n; i++) {
        /* b < 0 unless m = 0: then the accumulate x & (b >> 31) is 0, so is h, and the output
         * is zp with no test */
        const int32_t b = (int32_t)((uint32_t)mult[i] << 1), s = shift[i], x = acc[i];
        int32_t v;
        if (s < 0) {
            const int32_t h = kdm_smmlar(x, b, x & (b >> 31));
            v = kdm_rq_dbl_out_(h, ~s, zp2);
        } else {
            const int32_t l = (int32_t)((uint32_t)x << s);
            v = kdm_ssat8(kdm_qadd(kdm_smmlar(l, b, l & (b >> 31)), zp));
        }
        out[i] = (int8_t)v;
    }
clamp:
    if (q->act_min != -128 || q->act_max != 127)
        kdm_clamp_row_(out, n, q->act_min, q->act_max);
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
