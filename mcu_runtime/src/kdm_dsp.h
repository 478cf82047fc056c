/*
 * kdm_dsp.h - the Cortex-M DSP-extension instructions the DSP kernels use, as inline functions:
 * the real instruction under __ARM_FEATURE_DSP, a portable C emulation with identical results
 * elsewhere, so the DSP kernels also build and run on the host where the tests compare them
 * with the reference kernels bit for bit.
 *
 * Lanes: a uint32_t holds two int16 lanes, "bottom" = bits 0..15 (the lower address on a
 * little-endian machine), "top" = bits 16..31. Multiply-accumulates wrap modulo 2^32 like the
 * instructions (which only set the sticky Q flag on overflow).
 *
 * Also the loads and stores the kernels use on int8 / int16 / staged data: through memcpy (any
 * alignment, no aliasing assumption; one LDR / STR on Cortex-M4) or, where the address is known
 * to be 4-byte aligned, through a may_alias type so the compiler keeps the alignment.
 */
#ifndef KDM_DSP_H
#define KDM_DSP_H

#include <stdint.h>
#include <string.h>

#include "kdm_kernels.h" /* the requantization helpers at the end call into kdm_quant.c */

/* A runtime built for single rounding only (KDM_ROUNDING_MASK): the convolutions' assembly
 * channel jobs requantize in single rounding (KDM_ASM_JOB_REQUANT). */
#define KDM_ASM_SINGLE_ONLY (KDM_ROUNDING_MASK == KDM_ROUNDING_BIT(1))

/* 32-bit load from any address. */
static inline uint32_t kdm_ld32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* 16-bit load from any address. */
static inline uint32_t kdm_ld16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

#if defined(__GNUC__)
typedef uint32_t kdm_u32a_ __attribute__((may_alias, aligned(4)));
typedef int16_t kdm_s16a_ __attribute__((may_alias));
/* 32-bit load / store at a 4-byte aligned address (staged scratch data). */
static inline uint32_t kdm_ld32a(const void *p) { return *(const kdm_u32a_ *)p; }
static inline void kdm_st32a(void *p, uint32_t v) { *(kdm_u32a_ *)p = v; }
static inline void kdm_st16(void *p, int32_t v) { *(kdm_s16a_ *)p = (int16_t)v; }
#else
static inline uint32_t kdm_ld32a(const void *p) { return kdm_ld32(p); }
static inline void kdm_st32a(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void kdm_st16(void *p, int32_t v)
{
    int16_t s = (int16_t)v;
    memcpy(p, &s, 2);
}
#endif

/*
 * v, with the compiler made to forget that it is a constant. For masks that must live in a
 * register: ARM's AND takes a shifted register operand, so (y >> 8) & m is one instruction
 * when m is in a register, but GCC prefers an immediate mask and then shifts separately.
 */
static inline uint32_t kdm_in_register(uint32_t v)
{
#if defined(__GNUC__)
    __asm__("" : "+r"(v));
#endif
    return v;
}

/* Two int16 lanes from their values (bottom, top). */
static inline uint32_t kdm_pack16(int32_t bottom, int32_t top)
{
    return ((uint32_t)bottom & 0xFFFFu) | ((uint32_t)top << 16);
}

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP

/* SXTB16: bytes 0 and 2 sign-extended into the bottom and top lanes. */
static inline uint32_t kdm_sxtb16(uint32_t x)
{
    uint32_t r;
    __asm__("sxtb16 %0, %1" : "=r"(r) : "r"(x));
    return r;
}

/* SXTB16 with ROR #8: bytes 1 and 3 sign-extended into the bottom and top lanes. */
static inline uint32_t kdm_sxtb16_ror8(uint32_t x)
{
    uint32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}

/* SMLAD: acc + a.bottom * b.bottom + a.top * b.top. */
static inline int32_t kdm_smlad(uint32_t a, uint32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smlad %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

/* SMLABB: acc + a.bottom * b.bottom. */
static inline int32_t kdm_smlabb(uint32_t a, uint32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smlabb %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

/* SMLABT: acc + a.bottom * b.top. */
static inline int32_t kdm_smlabt(uint32_t a, uint32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smlabt %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

/* SMLATT: acc + a.top * b.top. */
static inline int32_t kdm_smlatt(uint32_t a, uint32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smlatt %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

/* SXTAB16: bytes 0 and 2 of x sign-extended and added to acc's bottom and top lanes (each lane
 * wraps on its own). */
static inline uint32_t kdm_sxtab16(uint32_t acc, uint32_t x)
{
    uint32_t r;
    __asm__("sxtab16 %0, %1, %2" : "=r"(r) : "r"(acc), "r"(x));
    return r;
}

/* SXTAB16 with ROR #8: bytes 1 and 3 of x into the lanes. */
static inline uint32_t kdm_sxtab16_ror8(uint32_t acc, uint32_t x)
{
    uint32_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(acc), "r"(x));
    return r;
}

/* PKHBT with LSL #16: bottom lane of a, bottom lane of b as the top lane. */
static inline uint32_t kdm_pkhbt16(uint32_t a, uint32_t b)
{
    uint32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* PKHTB with ASR #16: top lane of a, top lane of b as the bottom lane. */
static inline uint32_t kdm_pkhtb16(uint32_t a, uint32_t b)
{
    uint32_t r;
    __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* SMMLAR: acc + (a * b + 2^31) / 2^32 rounded down, from the exact 64-bit sum. */
static inline int32_t kdm_smmlar(int32_t a, int32_t b, int32_t acc)
{
    int32_t r;
    __asm__("smmlar %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}

/* SMMUL: floor(a * b / 2^32), the high word of the 64-bit product. */
static inline int32_t kdm_smmul(int32_t a, int32_t b)
{
    int32_t r;
    __asm__("smmul %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* QADD: a + b saturated to int32. */
static inline int32_t kdm_qadd(int32_t a, int32_t b)
{
    int32_t r;
    __asm__("qadd %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* SSAT #8: x clamped to [-128, 127]. */
static inline int32_t kdm_ssat8(int32_t x)
{
    int32_t r;
    __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(x));
    return r;
}

/* SSAT #8 with ASR #1: floor(x / 2) clamped to [-128, 127]. */
static inline int32_t kdm_ssat8_asr1(int32_t x)
{
    int32_t r;
    __asm__("ssat %0, #8, %1, asr #1" : "=r"(r) : "r"(x));
    return r;
}

/*
 * For the assembly loops of the convolution and depthwise kernels: one value's requantization in
 * registers, in two steps. DBL (double rounding) takes r to v = (h + (h >> 31)) >> k with
 * h = SMMLAR(r, b, r), b = 2 m (m != 0) and k = ~shift (shift < 0), as kdm_requant_pair_dbl_;
 * SGL (single rounding, shift <= -2) to v = SMMUL(r, b) >> k with b = m and k = ~shift - 1, as
 * kdm_requant_single_fast_; OUT then makes the output SSAT8(QADD(v, zp2) >> 1), zp2 = 2 zp + 1.
 */
#define KDM_ASM_RQ_DBL(r, b, k)                                                                    \
    "smmlar " r ", " r ", " b ", " r "\n\t"                                                        \
    "add " r ", " r ", " r ", asr #31\n\t"                                                         \
    "asr " r ", " r ", " k "\n\t"
#define KDM_ASM_RQ_SGL(r, b, k)                                                                    \
    "smmul " r ", " r ", " b "\n\t"                                                                \
    "asr " r ", " r ", " k "\n\t"
#define KDM_ASM_RQ_OUT(r, zp2)                                                                     \
    "qadd " r ", " r ", " zp2 "\n\t"                                                               \
    "ssat " r ", #8, " r ", asr #1\n\t"
#define KDM_ASM_REQUANT(r, b, k, zp2) KDM_ASM_RQ_DBL(r, b, k) KDM_ASM_RQ_OUT(r, zp2)

/* The convolutions' assembly channel loops are Thumb-2 (the Cortex-M cores with the DSP
 * extension); an ARM-state build with the DSP extension runs their C paths. */
#if defined(__thumb2__)
#define KDM_ASM_JOBS 1
#else
#define KDM_ASM_JOBS 0
#endif

/*
 * What the convolutions' assembly channel loops (kdm_conv_pair_job_s8_ / _s4_) read and advance,
 * one pixel pair at a time; its offsets are the numbers in their assembly and are checked below.
 */
typedef struct {
    const int32_t *bias, *mult;   /* advanced two channels per block */
    const int8_t *shift;          /* likewise */
    int8_t *out0, *out1;          /* advanced likewise */
    const void *w;                /* the block's first weight row */
    int32_t skip;                 /* row_stride - row bytes of K: row o + 1's end to o + 2 */
    int32_t rs;                   /* row_stride */
    const uint8_t *col, *col_end; /* the staged columns, 4 K bytes */
    const int32_t *bias_end;      /* bias + out_c */
    int32_t zp2;                  /* 2 out_zp + 1 */
} kdm_pair_job_;

typedef char kdm_pair_job_layout_[(sizeof(void *) == 4 && sizeof(kdm_pair_job_) == 48 &&
                                   __builtin_offsetof(kdm_pair_job_, skip) == 24 &&
                                   __builtin_offsetof(kdm_pair_job_, zp2) == 44)
                                      ? 1
                                      : -1];

/* The job of one call: weights w (rows rs bytes apart, row_bytes of them holding K values), the
 * staged columns col (k_all values a pixel), out_c channels. */
static inline void kdm_pair_job_init_(kdm_pair_job_ *j, const kdm_requant_params *q, const void *w,
                                      int32_t rs, int32_t row_bytes, uint8_t *col, int32_t k_all,
                                      int32_t out_c)
{
    j->w = w;
    j->skip = rs - row_bytes;
    j->rs = rs;
    j->col = col;
    j->col_end = col + 4 * k_all;
    j->bias_end = q->bias + out_c;
    j->zp2 = 2 * q->out_zp + 1;
}

/* Rewind the job to channel 0 for the pixel pair stored at out0 / out1. */
static inline void kdm_pair_job_start_(kdm_pair_job_ *j, const kdm_requant_params *q, int8_t *out0,
                                       int8_t *out1)
{
    j->bias = q->bias;
    j->mult = q->mult;
    j->shift = q->shift;
    j->out0 = out0;
    j->out1 = out1;
}

/*
 * The channel jobs' requantization: double rounding (KDM_ASM_REQUANT), or, in a runtime built for
 * single rounding only (KDM_ROUNDING_MASK), single rounding (KDM_ASM_RQ_SGL; shift <= -2, as
 * kdm_requant_simple_ checks). PREP turns a multiplier and a shift loaded into b and k into the
 * operands they take.
 */
#if KDM_ASM_SINGLE_ONLY
#define KDM_ASM_JOB_PREP(b, k)                                                                     \
    "mvns " k ", " k "\n\t"                                                                        \
    "subs " k ", " k ", #1\n\t"
#define KDM_ASM_JOB_REQUANT(r, b, k, zp2) KDM_ASM_RQ_SGL(r, b, k) KDM_ASM_RQ_OUT(r, zp2)
#else
#define KDM_ASM_JOB_PREP(b, k)                                                                     \
    "lsls " b ", " b ", #1\n\t"                                                                    \
    "mvns " k ", " k "\n\t"
#define KDM_ASM_JOB_REQUANT KDM_ASM_REQUANT
#endif

/*
 * The end of a 2 x 2 block in the convolutions' assembly channel loops (kdm_conv_pair_job_s8_,
 * kdm_conv_pair_job_s4_), after the K loop: r5 holds the job, whose first twelve words both
 * jobs lay out alike (bias, mult, shift, out0, out1, w, skip, rs, col, col_end, bias_end, zp2),
 * r8 - r11 the sums a00, a01, a10, a11 (a<channel><pixel>), lr the end of row o + 1. Sets r12 to
 * the next block's row o, requantizes the four sums (multipliers two at a time into r1 / r2,
 * shifts (int8) into r4 / r6, zp2 into r7), stores them with post-incremented byte stores, advances
 * the job's pointers and branches back to label 1 while channels remain.
 */
#define KDM_ASM_PAIR_JOB_END                                                                       \
    "ldr r0, [r5, #24]\n\t"                                                                        \
    "add r12, lr, r0\n\t"                                                                          \
    "ldr r0, [r5, #4]\n\t"                                                                         \
    "ldrd r1, r2, [r0], #8\n\t"                                                                    \
    "str r0, [r5, #4]\n\t"                                                                         \
    "ldr r0, [r5, #8]\n\t"                                                                         \
    "ldrsb r4, [r0], #1\n\t"                                                                       \
    "ldrsb r6, [r0], #1\n\t"                                                                       \
    "str r0, [r5, #8]\n\t" KDM_ASM_JOB_PREP("r1", "r4") KDM_ASM_JOB_PREP(                          \
        "r2", "r6") "ldr r7, [r5, #44]\n\t" KDM_ASM_JOB_REQUANT("r8", "r1", "r4", "r7")            \
        KDM_ASM_JOB_REQUANT("r9", "r1", "r4", "r7") KDM_ASM_JOB_REQUANT("r10", "r2", "r6", "r7")   \
            KDM_ASM_JOB_REQUANT("r11", "r2", "r6", "r7") "ldr r0, [r5, #12]\n\t"                   \
                                                         "strb r8, [r0], #1\n\t"                   \
                                                         "strb r10, [r0], #1\n\t"                  \
                                                         "str r0, [r5, #12]\n\t"                   \
                                                         "ldr r0, [r5, #16]\n\t"                   \
                                                         "strb r9, [r0], #1\n\t"                   \
                                                         "strb r11, [r0], #1\n\t"                  \
                                                         "str r0, [r5, #16]\n\t"                   \
                                                         "ldr r0, [r5, #0]\n\t"                    \
                                                         "ldr r1, [r5, #40]\n\t"                   \
                                                         "cmp r0, r1\n\t"                          \
                                                         "bne 1b\n\t"

#else /* portable emulations */

#define KDM_ASM_JOBS 0

static inline int32_t kdm_lo16_(uint32_t x) { return (int32_t)(int16_t)(uint16_t)x; }
static inline int32_t kdm_hi16_(uint32_t x) { return (int32_t)(int16_t)(uint16_t)(x >> 16); }

static inline uint32_t kdm_sxtb16(uint32_t x)
{
    return kdm_pack16((int8_t)(uint8_t)x, (int8_t)(uint8_t)(x >> 16));
}

static inline uint32_t kdm_sxtb16_ror8(uint32_t x)
{
    return kdm_pack16((int8_t)(uint8_t)(x >> 8), (int8_t)(uint8_t)(x >> 24));
}

static inline uint32_t kdm_sxtab16(uint32_t acc, uint32_t x)
{
    const uint32_t e = kdm_sxtb16(x);
    return kdm_pack16(kdm_lo16_(acc) + kdm_lo16_(e), kdm_hi16_(acc) + kdm_hi16_(e));
}

static inline uint32_t kdm_sxtab16_ror8(uint32_t acc, uint32_t x)
{
    return kdm_sxtab16(acc, x >> 8);
}

/* Each 16 x 16 product fits int32 (the largest, (-2^15)^2 = 2^30); the sums wrap. */
static inline int32_t kdm_smlad(uint32_t a, uint32_t b, int32_t acc)
{
    uint32_t r = (uint32_t)acc + (uint32_t)(kdm_lo16_(a) * kdm_lo16_(b)) +
                 (uint32_t)(kdm_hi16_(a) * kdm_hi16_(b));
    return (int32_t)r;
}

static inline int32_t kdm_smlabb(uint32_t a, uint32_t b, int32_t acc)
{
    return (int32_t)((uint32_t)acc + (uint32_t)(kdm_lo16_(a) * kdm_lo16_(b)));
}

static inline int32_t kdm_smlabt(uint32_t a, uint32_t b, int32_t acc)
{
    return (int32_t)((uint32_t)acc + (uint32_t)(kdm_lo16_(a) * kdm_hi16_(b)));
}

static inline int32_t kdm_smlatt(uint32_t a, uint32_t b, int32_t acc)
{
    return (int32_t)((uint32_t)acc + (uint32_t)(kdm_hi16_(a) * kdm_hi16_(b)));
}

static inline int32_t kdm_smmlar(int32_t a, int32_t b, int32_t acc)
{
    /* modulo 2^64, as the instruction's bits 63:32 of the unbounded sum */
    uint64_t v = ((uint64_t)(uint32_t)acc << 32) + (uint64_t)((int64_t)a * b) + 0x80000000u;
    return (int32_t)(uint32_t)(v >> 32);
}
static inline uint32_t kdm_pkhbt16(uint32_t a, uint32_t b) { return (a & 0xFFFFu) | (b << 16); }

static inline int32_t kdm_smmul(int32_t a, int32_t b)
{
    return (int32_t)(((int64_t)a * b) >> 32); /* arithmetic shift: the high word */
}

static inline int32_t kdm_qadd(int32_t a, int32_t b)
{
    int64_t r = (int64_t)a + b;
    return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (int32_t)r;
}

static inline int32_t kdm_ssat8(int32_t x) { return x < -128 ? -128 : x > 127 ? 127 : x; }

static inline int32_t kdm_ssat8_asr1(int32_t x) { return kdm_ssat8(x >> 1); }

static inline uint32_t kdm_pkhtb16(uint32_t a, uint32_t b) { return (a & 0xFFFF0000u) | (b >> 16); }

#endif

/* The end of a double-rounding requantization with a right shift, in C (KDM_ASM_RQ_DBL after its
 * SMMLAR, then KDM_ASM_RQ_OUT): h = SMMLAR(x, 2 m, x), k = ~shift, zp2 = 2 zp + 1; the value
 * plus the zero-point, saturated to int8 (kdm_quant.c explains the steps). */
static inline int32_t kdm_rq_dbl_out_(int32_t h, int32_t k, int32_t zp2)
{
    return kdm_ssat8_asr1(kdm_qadd((h + (h >> 31)) >> k, zp2));
}

/*
 * Single rounding, clamp(zp + round_half_up(x * m / 2^(31 - s))) to int8, as
 * kdm_requant_single_s8_ but inline and short for the usual right shift (s < 0). Then the
 * divisor is 2^(32 + k), k = -1 - s >= 0, and since 2^(31 + k) is a multiple of 2^32 for k >= 1,
 * floor((x m + 2^(31+k)) / 2^(32+k)) = floor((floor(x m / 2^32) + 2^(k-1)) / 2^k): SMMUL and a
 * rounding shift (written as ((h >> (k - 1)) + 1) >> 1, which cannot overflow); k = 0 is SMMULR
 * (SMMLAR with a zero accumulator). |x m| / 2^32 < 2^30, so nothing saturates before the int8
 * clamp. s >= 0 (a real multiplier of 1 or more, rare) goes out of line.
 */
static inline __attribute__((always_inline)) int32_t kdm_requant_single_fast_(int32_t x, int32_t m,
                                                                              int32_t s, int32_t zp)
{
    if (s >= 0)
        return kdm_requant_single_s8_(x, m, s, zp);
    const int32_t k = ~s;
    const int32_t r = k ? ((kdm_smmul(x, m) >> (k - 1)) + 1) >> 1 : kdm_smmlar(x, m, 0);
    return kdm_ssat8(kdm_qadd(r, zp));
}

/*
 * One channel's double-rounding requantization of two values (kdm_quant.c explains it): x0, x1
 * raw sums, m the multiplier (0 or [2^30, 2^31)), s the shift, zp the output zero-point and
 * zp2 = 2 zp + 1; *v0, *v1 get the values with the zero-point added, saturated to int8 (a
 * narrower activation clamp comes after). Used by the convolution kernels, which
 * requantize their sums where they compute them.
 */
static inline __attribute__((always_inline)) void kdm_requant_pair_dbl_(int32_t x0, int32_t x1,
                                                                        int32_t m, int32_t s,
                                                                        int32_t zp, int32_t zp2,
                                                                        int32_t *v0, int32_t *v1)
{
    const int32_t b = (int32_t)((uint32_t)m << 1);
    if (!b) { /* m = 0: zp */
        *v0 = zp;
        *v1 = zp;
    } else if (s >= 0) {
        const int32_t l0 = (int32_t)((uint32_t)x0 << s), l1 = (int32_t)((uint32_t)x1 << s);
        *v0 = kdm_ssat8(kdm_qadd(kdm_smmlar(l0, b, l0), zp));
        *v1 = kdm_ssat8(kdm_qadd(kdm_smmlar(l1, b, l1), zp));
    } else {
        const int32_t h0 = kdm_smmlar(x0, b, x0), h1 = kdm_smmlar(x1, b, x1), r = ~s;
        *v0 = kdm_rq_dbl_out_(h0, r, zp2);
        *v1 = kdm_rq_dbl_out_(h1, r, zp2);
    }
}

/* A convolution's 2 x 2 block in double rounding: channels o, o1 (multipliers and shifts from
 * mult[], shift[]) times pixels 0, 1 (a<channel><pixel>), stored to out0[o], out1[o],
 * out0[o1], out1[o1] (o1 == o for an odd last channel, out1 == out0 for an odd last pixel: the
 * same bytes twice). */
static inline __attribute__((always_inline)) void
kdm_requant_quad_dbl_(const int32_t *mult, const int8_t *shift, int32_t o, int32_t o1, int32_t a00,
                      int32_t a01, int32_t a10, int32_t a11, int32_t zp, int32_t zp2, int8_t *out0,
                      int8_t *out1)
{
    int32_t v00, v01, v10, v11;
    kdm_requant_pair_dbl_(a00, a01, mult[o], shift[o], zp, zp2, &v00, &v01);
    kdm_requant_pair_dbl_(a10, a11, mult[o1], shift[o1], zp, zp2, &v10, &v11);
    out0[o] = (int8_t)v00;
    out1[o] = (int8_t)v01;
    out0[o1] = (int8_t)v10;
    out1[o1] = (int8_t)v11;
}

#endif
