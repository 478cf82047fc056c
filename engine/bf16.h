/*
 * bf16.h - bfloat16 rounding of float32 values (internal; header-only so host code and tests
 * share one rule, and kernels/elementwise.cu restates it for the device).
 *
 * bfloat16 is the top half of a float32: sign, the same 8-bit exponent, 7 mantissa bits.
 * Rounding to it is to nearest with ties to even on the 16 dropped bits; finite values past
 * bfloat16's largest (0x1.FEp127) round to infinity as a conversion does; infinities stay;
 * a NaN stays a (quiet) NaN even when its payload lies only in the dropped bits.
 */
#ifndef KD_BF16_H
#define KD_BF16_H

#include <stdint.h>
#include <string.h>

/* The bfloat16 nearest to the float32 bits u, as float32 bits (the low 16 bits zero). */
static inline uint32_t kd_bf16_round_bits(uint32_t u)
{
    /* infinities come through the rounding unchanged; a NaN keeps its sign and gets the
     * quiet bit, so it cannot round into an infinity. No branches: loops over it vectorize. */
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const uint32_t nan = (u | 0x00400000u) & 0xffff0000u;
    return (u & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

/* x rounded to the nearest bfloat16, as a float32. */
static inline float kd_round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = kd_bf16_round_bits(u);
    memcpy(&x, &u, sizeof x);
    return x;
}

#endif
