/*
 * kdm_kernels.h - the runtime's kernels (internal): one reference and, for conv, depthwise and
 * fully-connected, one DSP implementation per op and weight type, and one for cores without
 * DSP (_fast: matmul_fast.c for conv and fully-connected, depthwise_fast.c), with identical
 * signatures so the dispatch (kdm_invoke.c) picks one by name and the test compares them bit
 * for bit.
 *
 * Conventions shared by every kernel:
 *   - Activations are int8 NHWC with N = 1: element (y, x, c) of an [h][w][c] tensor is at
 *     (y * w + x) * c_count + c. Inputs and outputs never overlap (kdm_load checks it).
 *   - Accumulators are int32 and wrap modulo 2^32 (two's complement), as SMLAD does; the C code
 *     adds in uint32_t so that a wrapped sum is defined behaviour and every implementation
 *     reaches the same bits whatever its summation order.
 *   - Weights (int8 or int4) are read in the blob's layout, rows `row_stride` bytes apart
 *     (row_stride a multiple of 4, rows 4-byte aligned). int4: two per byte, low nibble first,
 *     decoded as a signed 4-bit value (-8 .. 7; the exporter writes -7 .. 7). Row padding is
 *     never read as a weight.
 *   - bias / mult point into the blob (4-byte aligned little-endian int32, read in place: the
 *     runtime targets little-endian machines), shift to its int8 per channel after mult.
 *   - `scratch` is the arena's scratch area, 4-byte aligned, at least the op's
 *     kdm_op_scratch_size bytes; kernels that need none ignore it.
 *   - Sizes are positive and every index fits int32 (kdm_load bounds the arena and the blob
 *     below 2^31 bytes).
 */
#ifndef KDM_KERNELS_H
#define KDM_KERNELS_H

#include <stdint.h>

#include "kdm.h"

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) &&                                 \
    __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the kdm runtime reads the blob's int32 arrays in place and needs a little-endian target"
#endif

/* Per-output-channel requantization of one op. */
typedef struct {
    const int32_t *bias;      /* [out_c] int32 at scale s_in * s_w[c], input zero-point folded */
    const int32_t *mult;      /* [out_c] Q31 multiplier, 0 or in [2^30, 2^31) */
    const int8_t *shift;      /* [out_c] power-of-two exponent in [-31, 30] */
    int32_t out_zp;           /* output zero-point, -128 .. 127 */
    int32_t act_min, act_max; /* output clamp, -128 <= act_min <= act_max <= 127 */
    uint32_t flags;           /* the model's flags (KDM_FLAG_SINGLE_ROUNDING) */
} kdm_requant_params;

/* Geometry of a convolution, depthwise convolution or pooling window. */
typedef struct {
    int32_t in_c, in_h, in_w;    /* input [in_h][in_w][in_c] */
    int32_t out_c, out_h, out_w; /* output [out_h][out_w][out_c]; depthwise: out_c = in_c */
    int32_t kernel_h, kernel_w;  /* >= 1 */
    int32_t stride, pad;         /* stride >= 1, pad >= 0 on all four sides */
    int32_t in_zp;               /* input zero-point: the value read at padded positions */
    int32_t row_stride;          /* bytes between weight rows (unused by pools) */
} kdm_conv_params;

/* Geometry of a fully-connected layer. */
typedef struct {
    int32_t n_in;       /* input values (the whole input tensor, NHWC order) */
    int32_t n_out;      /* output values */
    int32_t row_stride; /* bytes between weight rows */
} kdm_fc_params;

/* ADD: TFLite's quantized add. */
typedef struct {
    int32_t zp1, zp2, out_zp; /* zero-points of the two inputs and of the output */
    int32_t left_shift;       /* 0 .. 20 */
    int32_t m1, s1, m2, s2;   /* input rescales (multiplier, shift) as in kdm_requant_params */
    int32_t m_out, s_out;     /* output rescale */
    int32_t act_min, act_max; /* output clamp */
    uint32_t flags;           /* rounding */
} kdm_add_params;

/* ---- convolution: w = out_c rows of K = kernel_h * kernel_w * in_c weights (OHWI) ---------- */

/* int8 weights; scratch: none (ref); 2 staged int16 columns of K rounded up to 8 (dsp) */
void kdm_conv2d_s8_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const int8_t *w, int8_t *out, void *scratch);
void kdm_conv2d_s8_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const int8_t *w, int8_t *out, void *scratch);
/* int4 weights (rows of ceil(K / 2) packed bytes); scratch: none (ref), 2 columns of K rounded
 * up to 8 (dsp) */
void kdm_conv2d_s4_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const uint8_t *w, int8_t *out, void *scratch);
void kdm_conv2d_s4_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const uint8_t *w, int8_t *out, void *scratch);
/* without DSP: blocked, 1x1 at stride 1 without padding straight from the input (int4: two rows
 * unpacked into scratch), other shapes from two pixels' windows gathered into scratch */
void kdm_conv2d_s8_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                        const int8_t *w, int8_t *out, void *scratch);
void kdm_conv2d_s4_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                        const uint8_t *w, int8_t *out, void *scratch);

/* ---- depthwise: w = kernel_h * kernel_w rows (tap ky * kernel_w + kx) of in_c weights ------- */

/* scratch: none (ref); kdm_depthwise_scratch_size_: buffered input rows and weight tables (dsp),
 * three buffered rows of in_w + 2 pad bytes (fast, 3x3 only) */
void kdm_depthwise_s8_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const int8_t *w, int8_t *out, void *scratch);
void kdm_depthwise_s8_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const int8_t *w, int8_t *out, void *scratch);
void kdm_depthwise_s4_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const uint8_t *w, int8_t *out, void *scratch);
void kdm_depthwise_s4_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const uint8_t *w, int8_t *out, void *scratch);
/* without DSP: channel by channel; 3x3 at stride 1 or 2 from rows buffered in scratch, other
 * kernels with the windows inside the input read with no padding test (kernels of more than 25
 * taps through the reference kernel) */
void kdm_depthwise_s8_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                           const int8_t *w, int8_t *out, void *scratch);
void kdm_depthwise_s4_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                           const uint8_t *w, int8_t *out, void *scratch);

/* ---- fully-connected: w = n_out rows of n_in weights; in [n_in], out [n_out] ---------------- */

/* scratch: none (ref); the input staged as n_in int16 (dsp) */
void kdm_fully_connected_s8_ref(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const int8_t *w, int8_t *out, void *scratch);
void kdm_fully_connected_s8_dsp(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const int8_t *w, int8_t *out, void *scratch);
void kdm_fully_connected_s4_ref(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const uint8_t *w, int8_t *out, void *scratch);
void kdm_fully_connected_s4_dsp(const kdm_fc_params *p, const kdm_requant_params *q,
                                const int8_t *in, const uint8_t *w, int8_t *out, void *scratch);
/* without DSP (int4: two rows unpacked into scratch) */
void kdm_fully_connected_s8_fast(const kdm_fc_params *p, const kdm_requant_params *q,
                                 const int8_t *in, const int8_t *w, int8_t *out, void *scratch);
void kdm_fully_connected_s4_fast(const kdm_fc_params *p, const kdm_requant_params *q,
                                 const int8_t *in, const uint8_t *w, int8_t *out, void *scratch);

/* ---- ops without weights (one portable implementation each, and a DSP add) ------------------ */

/* out[i] = clamp(out_zp + rq(rq(a[i] - zp1 << ls, m1, s1) + rq(b[i] - zp2 << ls, m2, s2),
 * m_out, s_out)), i < n. */
void kdm_add_s8_ref(const kdm_add_params *p, const int8_t *a, const int8_t *b, int8_t *out,
                    int32_t n);
void kdm_add_s8_dsp(const kdm_add_params *p, const int8_t *a, const int8_t *b, int8_t *out,
                    int32_t n);

/* Pools keep the input's quantization; out_c = in_c; results clamped to [act_min, act_max].
 * Max pool skips padded positions (kdm_load guarantees pad < kernel, so no window is empty);
 * average pool has pad 0 and rounds sum / (kernel_h * kernel_w) half away from zero. */
void kdm_maxpool_s8(const kdm_conv_params *p, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out);
void kdm_avgpool_s8(const kdm_conv_params *p, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out);
/* in [h][w][c] -> out [c]: the mean over h * w (< 2^24) pixels, rounded half away from zero. */
void kdm_global_avgpool_s8_ref(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                               const int8_t *in, int8_t *out);
void kdm_global_avgpool_s8_dsp(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                               const int8_t *in, int8_t *out);

/* Softmax over n values: lut[d] = round(65536 * exp(-d * s_in)) with lut[0] >= 1 and every
 * entry in [0, 65536] (kdm_load checks); out = clamp(round(256 * e / sum) - 128). */
void kdm_softmax_s8(const int32_t *lut, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out, int32_t n);

/* ---- requantization (one copy, used by kdm_requantize and every kernel) --------------------- */

/* Whether the DSP kernels round once (KDM_FLAG_SINGLE_ROUNDING in flags): a constant when
 * KDM_ROUNDING_MASK (kdm.h) admits one rounding only, so the other one's code is not linked
 * (kdm_load has refused models of the other rounding). */
#define KDM_SINGLE_ROUNDING_(flags)                                                                \
    (KDM_ROUNDING_MASK == KDM_ROUNDING_BIT(1)   ? 1                                                \
     : KDM_ROUNDING_MASK == KDM_ROUNDING_BIT(0) ? 0                                                \
                                                : ((flags)&KDM_FLAG_SINGLE_ROUNDING) != 0)

#if defined(__GNUC__)
#define KDM_ALWAYS_INLINE static inline __attribute__((always_inline))
#define KDM_NOINLINE      __attribute__((noinline))
#else
#define KDM_ALWAYS_INLINE static inline
#define KDM_NOINLINE
#endif

/*
 * RoundingDivideByPOT: v / 2^right, ties away from zero, right in 0 .. 31, v < INT32_MAX (the
 * doubling high multiply below never reaches INT32_MAX). Negative values are first moved down
 * by one, so that a tie rounds down (away from zero); then floor((t + 2^(right-1)) / 2^right)
 * is taken as floor((floor(t / 2^(right-1)) + 1) / 2), which cannot overflow: two shifts and
 * an add.
 */
KDM_ALWAYS_INLINE int32_t kdm_round_shift_(int32_t v, int32_t right)
{
    if (right == 0)
        return v;
    int32_t u = (v + (v >> 31)) >> (right - 1);
    return (u + 1) >> 1;
}

/*
 * ARMv6-M (Cortex-M0/M0+, GCC or clang): floor((x * m + 2^30) / 2^31) for m in [0, 2^31), in
 * at most 34 instructions of assembly (kdm_quant.c; 15 when |x| < 2^15) where C's 64-bit
 * product and shift took libgcc's __aeabi_lmul and Thumb-1 64-bit arithmetic.
 */
#if defined(__GNUC__) && defined(__ARM_ARCH_ISA_THUMB) && __ARM_ARCH_ISA_THUMB == 1
#define KDM_M0_ASM 1
int32_t kdm_dbl_high_m0_(int32_t x, int32_t m);
#else
#define KDM_M0_ASM 0
#endif

/*
 * TFLite's MultiplyByQuantizedMultiplier, bit for bit, for mult != INT32_MIN (kdm_load admits
 * 0 and [2^30, 2^31) only; kdm_requantize handles the rest). Double rounding: x * 2^left wraps
 * like TFLite's int32 multiply on ARM; the saturating rounding doubling high multiply is
 * floor((x * mult + 2^30) / 2^31), which equals gemmlowp's nudge-then-truncate for every
 * product (ties go up, toward +infinity) and cannot saturate or reach INT32_MIN unless
 * mult = INT32_MIN; then kdm_round_shift_. Single rounding: the 64-bit product, one rounding
 * half up, saturated to int32. shift in [-31, 30]. Inlined: it runs once per output value.
 */
KDM_ALWAYS_INLINE int32_t kdm_requant_(int32_t x, int32_t mult, int32_t shift, uint32_t flags)
{
    if (flags & KDM_FLAG_SINGLE_ROUNDING) {
        int32_t total = 31 - shift; /* 1 .. 62 */
        int64_t r = ((int64_t)x * mult + ((int64_t)1 << (total - 1))) >> total;
        return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (int32_t)r;
    }
    int32_t left = shift > 0 ? shift : 0;
#if KDM_M0_ASM
    if (mult >= 0)
        return kdm_round_shift_(kdm_dbl_high_m0_((int32_t)((uint32_t)x << left), mult),
                                left - shift);
#endif
    int64_t a = (int32_t)((uint32_t)x << left);
    return kdm_round_shift_((int32_t)((a * mult + (1 << 30)) >> 31), left - shift);
}

/* The int8 output of channel c for accumulator acc: requantize, add the zero-point, clamp.
 * The clamp comes before the zero-point so a saturated value cannot overflow. */
static inline int8_t kdm_requant_out_(const kdm_requant_params *q, int32_t c, int32_t acc)
{
    int32_t v = kdm_requant_(acc, q->mult[c], q->shift[c], q->flags);
    int32_t lo = q->act_min - q->out_zp, hi = q->act_max - q->out_zp;
    v = v < lo ? lo : v > hi ? hi : v;
    return (int8_t)(v + q->out_zp);
}

/*
 * out[i] = clamp(out_zp + requant(acc[i], mult[c0 + i], shift[c0 + i])), i < n: the
 * fully-connected DSP kernels collect raw sums (at most KDM_CHUNK rows at a time, on the stack)
 * and requantize them here, in a loop with the rounding mode hoisted out (kdm_quant.c); the
 * depthwise kernel's portable loop and the convolutions' C paths one value at a time.
 */
#define KDM_CHUNK 16
void kdm_requant_row_(const kdm_requant_params *q, int32_t c0, const int32_t *acc, int8_t *out,
                      int32_t n);

/* out[i] clamped to [lo, hi], i < n: the activation, when it is narrower than int8. */
void kdm_clamp_row_(int8_t *out, int32_t n, int32_t lo, int32_t hi);
/* 1 when each of the op's n channels has a multiplier != 0 and a negative shift and the op rounds
 * twice, or rounds once with every shift <= -2 in a Thumb-2 runtime built for single rounding
 * only (the usual cases, which the convolutions' assembly channel loops handle), else 0. */
int kdm_requant_simple_(const kdm_requant_params *q, int32_t n);
/* clamp(zp + requant(x, m, s)) to [-128, 127] in single rounding (the activation clamp apart). */
int8_t kdm_requant_single_s8_(int32_t x, int32_t m, int32_t s, int32_t zp);
/* kdm_requant_quad_dbl_ (kdm_dsp.h) in single rounding, out of line: channels o, o1 times
 * pixels 0, 1 (a<channel><pixel>) into out0[o], out1[o], out0[o1], out1[o1]; the activation
 * clamp apart. */
void kdm_requant_quad_single_(const kdm_requant_params *q, int32_t o, int32_t o1, int32_t a00,
                              int32_t a01, int32_t a10, int32_t a11, int8_t *out0, int8_t *out1);

/* Whether an op of weight width wbits has int8 weights: a constant when KDM_WBITS_MASK admits one
 * width only, so that the other width's code is dropped (kdm_load refuses ops of that width). */
#define KDM_IS_W8_(wbits)                                                                          \
    (((KDM_WBITS_MASK >> 8) & 1) && (!((KDM_WBITS_MASK >> 4) & 1) || (wbits) == 8))

/* Weight k of an int4 row: nibble k (low nibble first), as a signed 4-bit value. */
static inline int32_t kdm_nibble_(const uint8_t *row, int32_t k)
{
    uint32_t b = (uint32_t)row[k >> 1] >> ((k & 1) * 4);
    return (int32_t)((b & 15u) ^ 8u) - 8;
}

/* A weight byte's value: int8, or the int4 nibble whose bits a left shift by up puts at the top
 * (28 - 4 (c & 1) for channel c). */
static inline int32_t kdm_dw_tap_(const uint8_t *b, int w8, int32_t up)
{
    return w8 ? (int8_t)*b : (int32_t)((uint32_t)*b << up) >> 28;
}

/* Depthwise weight of tap t (ky * kernel_w + kx), channel c (rows rs bytes apart). */
static inline int32_t kdm_dw_weight_(const uint8_t *w, int wbits, int32_t rs, int32_t t, int32_t c)
{
    const int w8 = KDM_IS_W8_(wbits);
    return kdm_dw_tap_(w + t * rs + (w8 ? c : c >> 1), w8, 28 - 4 * (c & 1));
}

/* sum / count rounded half away from zero (TFLite's pools): count > 0, sum > INT32_MIN. The
 * magnitude is rounded in 32 unsigned bits, |sum| + count / 2 < 2^32. */
static inline int32_t kdm_div_round_(int32_t sum, int32_t count)
{
    const uint32_t mag = sum < 0 ? 0u - (uint32_t)sum : (uint32_t)sum;
    const uint32_t q = (mag + (uint32_t)count / 2) / (uint32_t)count;
    return sum < 0 ? -(int32_t)q : (int32_t)q;
}

/* ---- scratch sizes (the largest over the implementations; see kdm_op_scratch_size) ----------
 * In 32 bits, saturating at 2^32 - 1 (the arguments come from records not yet validated, each at
 * most 2^20). */

static inline uint32_t kdm_mulsat_(uint32_t a, uint32_t b)
{
    const uint64_t r = (uint64_t)a * b;
    return r >> 32 ? 0xFFFFFFFFu : (uint32_t)r;
}

/* conv: two staged int16 columns of K = kh kw in_c values rounded up to 8 (every kernel size and
 * weight width) */
static inline uint32_t kdm_conv2d_scratch_size_(uint32_t kh, uint32_t kw, uint32_t in_c)
{
    const uint32_t k = kdm_mulsat_(kdm_mulsat_(kh, kw), in_c);
    return kdm_mulsat_(k > 0xFFFFFFF0u ? k : (k + 7) & ~7u, 4);
}

/* Whether depthwise_dsp.c buffers rows for a depthwise layer (3x3 at stride 1 or 2 with four or
 * more channels; other layers need no scratch). */
static inline int kdm_depthwise_rows_(uint32_t kh, uint32_t kw, uint32_t stride, uint32_t in_c)
{
    return kh == 3 && kw == 3 && stride <= 2 && in_c >= 4;
}

/* depthwise (depthwise_dsp.c): four channels' weight tables of KDM_DW_TAB_WORDS words and
 * buffers of 3 rows of (in_w + 2 pad + 3) / 2 words each */
#define KDM_DW_TAB_WORDS 10
static inline uint32_t kdm_depthwise_scratch_size_(uint32_t kh, uint32_t kw, uint32_t stride,
                                                   uint32_t in_c, uint32_t in_w, uint32_t pad)
{
    if (!kdm_depthwise_rows_(kh, kw, stride, in_c))
        return 0;
    const uint32_t n = kdm_mulsat_(kh, (in_w + 2 * pad + 3) / 2); /* in_w, pad <= 2^20 */
    return kdm_mulsat_(n > 0xFFFFFF00u ? n : n + KDM_DW_TAB_WORDS, 16);
}

/* fully-connected: the input (in_c in_h in_w values) as int16, rounded up to whole words */
static inline uint32_t kdm_fully_connected_scratch_size_(uint32_t in_c, uint32_t in_h,
                                                         uint32_t in_w)
{
    const uint32_t n = kdm_mulsat_(kdm_mulsat_(kdm_mulsat_(in_c, in_h), in_w), 2);
    return n > 0xFFFFFFF0u ? 0xFFFFFFFFu : (n + 3) & ~3u;
}

#endif
