/*
 * conv2d_s4_dsp.c - 2-D convolution, int4 weights and int8 activations (W4A8), for the
 * Cortex-M DSP extension (bit-identical to conv2d_s4_ref.c; see kdm_kernels.h).
 *
 * Weights stay packed: one 32-bit load brings 8 nibbles n0 .. n7 of a row, decoded in
 * registers. XOR with 0x88888888 turns each signed nibble s into u = s + 8 in 0 .. 15, and
 * masking with 0x000F000F after shifts of 0, 8, 4 and 12 leaves the int16 lane pairs
 * (u0, u4), (u2, u6), (u1, u5), (u3, u7), ready for SMLAD. The +8 bias of every weight is
 * removed at the end: sum (u - 8) x = sum u x - 8 * sum x, with sum x of the column computed
 * while staging (all modulo 2^32, so exact whatever wraps).
 *
 * im2col stages two output pixels as int16, interleaved by groups of eight K values
 * (32 bytes a group), each lane pair of pixel 0 beside the same pair of pixel 1:
 * [(x0,x4) px0, px1] [(x2,x6) px0, px1] [(x1,x5) px0, px1] [(x3,x7) px0, px1], the order the
 * decoded lanes need, and one LDRD brings a pair for both pixels. Per group (2 channels x 2
 * pixels x 8 = 32 MACs) in C: 2 weight loads, 2 XOR, 8 AND (the shift folded into the operand:
 * the mask is kept in a register), 8 staged loads, 16 SMLAD and the loop: 39 instructions as
 * GCC 12 compiles it for the Cortex-M4, 1.22 per MAC; 32 in the assembly channel loop
 * (kdm_conv_pair_job_s4_, below), which runs a pixel pair's channels when out_c is even and the
 * requantization the usual one, K staged rounded up to 8 with zeros past it (a row of 4-byte
 * multiples holds 8 nibbles per 4 bytes; the tiny student's first conv, K = 9, one input channel
 * staged a window row at a time: 7.19 -> 5.51 instructions per MAC, 5.04 with the zeros past K
 * staged once per layer, 4.85 with the slot offsets in a rotating word, 4.19 with the 3x3 windows
 * inside the input staged from three word loads) (on the tiny student's INT4 1x1 layers
 * 2.59 / 2.21 / 1.71 -> 1.91 / 1.64 / 1.34 instructions per MAC). 1x1 kernels use the same
 * path (staging a pixel is a conversion, and the pairs (k, k+4) need reordering anyway). The last K
 * mod 8 values follow the groups, column 0 then column 1, summed in C. An odd last pixel or channel
 * is paired with itself. All channels of a pixel pair run in one out-of-line function (channels)
 * whose blocks requantize their four sums as soon as they are complete (kdm_requant_pair_dbl_, the
 * channel's multiplier and shift serving both pixels), as in conv2d_s8_dsp.c: on the tiny student's
 * INT4 1x1 layers 2.70 / 2.30 / 1.76 -> 2.65 / 2.25 / 1.73 instructions per MAC against collecting
 * 16 channels' sums for a separate requantization loop.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

#define ONES16      0x00010001u
#define LANES4      0x000F000Fu
#define NIBBLE_BIAS 0x88888888u

/* The int16 slot of grouped value k of column j: group k / 8, then lane pair h / 2 (h = k mod 8
 * bit-reversed), column j, then the lane. */
static inline int32_t slot4(int32_t k, int32_t j)
{
    const int32_t h = ((k & 1) << 2) + (k & 2) + ((k >> 2) & 1);
    return 16 * (k >> 3) + 4 * (h >> 1) + 2 * j + (h & 1);
}

/* Stage the receptive field of output pixel `pix` as column j (0 or 1) of col, its first k8
 * values (a multiple of 8) in groups and the rest in the tail, or, with k8 past K (the assembly
 * channel loop's K rounded up to 8), all of them in groups, the slots up to k8 left as the
 * caller zeroed them; return the sum of the grouped values (modulo 2^32). */
static uint32_t im2col(const kdm_conv_params *p, const int8_t *in, int32_t pix, int32_t j,
                       uint8_t *col, int32_t k8)
{
    const int32_t oy = pix / p->out_w, ox = pix - oy * p->out_w;
    const int32_t y0 = oy * p->stride - p->pad, x0 = ox * p->stride - p->pad;
    const int32_t ch = p->in_c, k_all = p->kernel_h * p->kernel_w * ch;
    if ((ch & 7) == 0) {
        const uint32_t zz = kdm_pack16(p->in_zp, p->in_zp);
        int32_t sum = 0;
        uint8_t *d = col + 4 * j;
        for (int32_t ky = 0; ky < p->kernel_h; ky++) {
            const int32_t iy = y0 + ky;
            for (int32_t kx = 0; kx < p->kernel_w; kx++) {
                const int32_t ix = x0 + kx;
                if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
                    for (int32_t c = 0; c < ch; c += 8, d += 32) {
                        kdm_st32a(d, zz);
                        kdm_st32a(d + 8, zz);
                        kdm_st32a(d + 16, zz);
                        kdm_st32a(d + 24, zz);
                    }
                    sum = (int32_t)((uint32_t)sum + (uint32_t)(ch * p->in_zp));
                    continue;
                }
                const int8_t *s = in + (iy * p->in_w + ix) * ch;
                for (int32_t c = 0; c < ch; c += 8, d += 32) {
                    uint32_t va = kdm_ld32(s + c), vb = kdm_ld32(s + c + 4);
                    uint32_t ae = kdm_sxtb16(va), ao = kdm_sxtb16_ror8(va);
                    uint32_t be = kdm_sxtb16(vb), bo = kdm_sxtb16_ror8(vb);
                    kdm_st32a(d, kdm_pkhbt16(ae, be));
                    kdm_st32a(d + 8, kdm_pkhtb16(be, ae));
                    kdm_st32a(d + 16, kdm_pkhbt16(ao, bo));
                    kdm_st32a(d + 24, kdm_pkhtb16(bo, ao));
                    sum = kdm_smlad(ae, ONES16, sum);
                    sum = kdm_smlad(ao, ONES16, sum);
                    sum = kdm_smlad(be, ONES16, sum);
                    sum = kdm_smlad(bo, ONES16, sum);
                }
            }
        }
        return (uint32_t)sum;
    }
    const int32_t tail = k_all - k8;
    uint32_t sum = 0;
    int32_t k = 0;
    if (ch == 1 && k_all <= k8) { /* one input channel, every value grouped (a first conv) */
        /* the geometry the inner loop reads in locals (the stores may alias *p for the
         * compiler); value k at byte 32 (k / 8) + 2 ((k / 4) % 2) + (0, 16, 8, 24)[k % 4] of
         * column 0 (slot4()'s order), the last term the low byte of `lane`, which turns a byte
         * per value */
        const int32_t in_h = p->in_h, in_w = p->in_w, kw = p->kernel_w, zp = p->in_zp;
        uint8_t *g = col + 4 * j;
        /* a 3x3 window inside the input whose rows can be read as words (the last row's fourth
         * byte still in the tensor): rows a, b, c give the five words (a0, b1), (a2, c0),
         * (a1, b2), (b0, c1), (c2, 0) of slot4()'s order, whose lanes sum to the window's */
        if (kw == 3 && p->kernel_h == 3 && x0 >= 0 && y0 >= 0 && x0 + 3 <= in_w && y0 + 3 <= in_h &&
            (y0 + 3 < in_h || x0 + 3 < in_w)) {
            const int8_t *s = in + y0 * in_w + x0;
            const uint32_t ra = kdm_ld32(s), rb = kdm_ld32(s + in_w), rc = kdm_ld32(s + 2 * in_w);
            const uint32_t a02 = kdm_sxtb16(ra), b02 = kdm_sxtb16(rb), c02 = kdm_sxtb16(rc);
            const uint32_t v0 = kdm_pkhbt16(a02, kdm_sxtb16_ror8(rb)),
                           v1 = kdm_pkhbt16(a02 >> 16, c02),
                           v2 = kdm_pkhbt16(kdm_sxtb16_ror8(ra), b02 >> 16),
                           v3 = kdm_pkhbt16(b02, kdm_sxtb16_ror8(rc)), v4 = c02 >> 16;
            kdm_st32a(g, v0);
            kdm_st32a(g + 8, v1);
            kdm_st32a(g + 16, v2);
            kdm_st32a(g + 24, v3);
            kdm_st32a(g + 32, v4);
            int32_t s5 = kdm_smlad(v0, ONES16, kdm_smlad(v1, ONES16, 0));
            s5 = kdm_smlad(v2, ONES16, kdm_smlad(v3, ONES16, s5));
            return (uint32_t)kdm_smlad(v4, ONES16, s5);
        }
        uint32_t lane = 0x18081000u, half = 0;
        for (int32_t iy = y0; iy < y0 + p->kernel_h; iy++) {
            const int row_in = (uint32_t)iy < (uint32_t)in_h;
            const int8_t *s = in + (row_in ? iy : 0) * in_w;
            for (int32_t ix = x0; ix < x0 + kw; ix++) {
                const int32_t x = row_in && (uint32_t)ix < (uint32_t)in_w ? s[ix] : zp;
                kdm_st16(g + half + (lane & 0xFF), x);
                sum += (uint32_t)x;
                lane = lane >> 8 | lane << 24;
                if (!(lane & 0xFF)) {
                    half ^= 2;
                    if (!half)
                        g += 32;
                }
            }
        }
        return sum;
    }
    for (int32_t ky = 0; ky < p->kernel_h; ky++) {
        const int32_t iy = y0 + ky;
        for (int32_t kx = 0; kx < p->kernel_w; kx++) {
            const int32_t ix = x0 + kx;
            const int inside = iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w;
            const int8_t *s = inside ? in + (iy * p->in_w + ix) * ch : in;
            for (int32_t c = 0; c < ch; c++, k++) {
                int32_t x = inside ? s[c] : p->in_zp;
                int32_t at = k < k8 ? slot4(k, j) : 2 * k8 + j * tail + (k - k8);
                kdm_st16(col + 2 * at, x);
                if (k < k8)
                    sum += (uint32_t)x;
            }
        }
    }
    return sum;
}

/* The 2 x 2 block: rows w0, w1 (channels o, o1) x pixels (px0, px1); sum0 / sum1 from im2col,
 * b0 / b1 the channels' biases; raw sums to acc0[0..1] (pixel 0) and acc1[0..1] (pixel 1). */
static inline __attribute__((always_inline)) void block(const uint8_t *w0, const uint8_t *w1,
                                                        const uint8_t *col, int32_t k_all,
                                                        uint32_t sum0, uint32_t sum1, uint32_t b0,
                                                        uint32_t b1, int32_t *acc0, int32_t *acc1)
{
    const uint32_t lanes = kdm_in_register(LANES4);
    const int32_t k8 = k_all & ~7;
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0;
    const uint8_t *c = col;
    for (int32_t g = k8 >> 3; g > 0; g--) {
        uint32_t y0 = kdm_ld32(w0) ^ NIBBLE_BIAS, y1 = kdm_ld32(w1) ^ NIBBLE_BIAS;
        w0 += 4;
        w1 += 4;
        uint32_t m0 = y0 & lanes, m1 = y1 & lanes;
        uint32_t x = kdm_ld32a(c);
        a00 = kdm_smlad(m0, x, a00);
        a10 = kdm_smlad(m1, x, a10);
        x = kdm_ld32a(c + 4);
        a01 = kdm_smlad(m0, x, a01);
        a11 = kdm_smlad(m1, x, a11);
        m0 = (y0 >> 8) & lanes;
        m1 = (y1 >> 8) & lanes;
        x = kdm_ld32a(c + 8);
        a00 = kdm_smlad(m0, x, a00);
        a10 = kdm_smlad(m1, x, a10);
        x = kdm_ld32a(c + 12);
        a01 = kdm_smlad(m0, x, a01);
        a11 = kdm_smlad(m1, x, a11);
        m0 = (y0 >> 4) & lanes;
        m1 = (y1 >> 4) & lanes;
        x = kdm_ld32a(c + 16);
        a00 = kdm_smlad(m0, x, a00);
        a10 = kdm_smlad(m1, x, a10);
        x = kdm_ld32a(c + 20);
        a01 = kdm_smlad(m0, x, a01);
        a11 = kdm_smlad(m1, x, a11);
        m0 = (y0 >> 12) & lanes;
        m1 = (y1 >> 12) & lanes;
        x = kdm_ld32a(c + 24);
        a00 = kdm_smlad(m0, x, a00);
        a10 = kdm_smlad(m1, x, a10);
        x = kdm_ld32a(c + 28);
        a01 = kdm_smlad(m0, x, a01);
        a11 = kdm_smlad(m1, x, a11);
        c += 32;
    }
    uint32_t s00 = b0 + (uint32_t)a00 - 8u * sum0, s01 = b0 + (uint32_t)a01 - 8u * sum1;
    uint32_t s10 = b1 + (uint32_t)a10 - 8u * sum0, s11 = b1 + (uint32_t)a11 - 8u * sum1;
    const int32_t tail = k_all - k8;
    for (int32_t t = 0; t < tail; t++) {
        int32_t x0 = (int16_t)kdm_ld16(c + 2 * t), x1 = (int16_t)kdm_ld16(c + 2 * (tail + t));
        int32_t v0 = kdm_nibble_(w0, t), v1 = kdm_nibble_(w1, t);
        s00 += (uint32_t)(v0 * x0);
        s01 += (uint32_t)(v0 * x1);
        s10 += (uint32_t)(v1 * x0);
        s11 += (uint32_t)(v1 * x1);
    }
    acc0[0] = (int32_t)s00;
    acc0[1] = (int32_t)s10;
    acc1[0] = (int32_t)s01;
    acc1[1] = (int32_t)s11;
}

/* Every output channel of the two staged columns, in 2 x 2 blocks whose four raw sums are
 * requantized as soon as they are complete (the channel's multiplier and shift serving both
 * pixels), into out0 / out1 (out1 == out0 for an odd last pixel, an odd last channel pairs with
 * itself: the same bytes twice); single rounding out of line. */
static KDM_NOINLINE void channels(const kdm_requant_params *q, const uint8_t *w, int32_t rs,
                                  int32_t out_c, const uint8_t *col, int32_t k_all, uint32_t sum0,
                                  uint32_t sum1, int8_t *out0, int8_t *out1)
{
    const int32_t zp = q->out_zp, zp2 = 2 * zp + 1;
    const int single = KDM_SINGLE_ROUNDING_(q->flags);
    for (int32_t o = 0; o < out_c; o += 2) {
        const int32_t o1 = o + 1 < out_c ? o + 1 : o;
        int32_t acc0[2], acc1[2];
        block(w + o * rs, w + o1 * rs, col, k_all, sum0, sum1, (uint32_t)q->bias[o],
              (uint32_t)q->bias[o1], acc0, acc1);
        if (single) /* not the exporter's default: out of line */
            kdm_requant_quad_single_(q, o, o1, acc0[0], acc1[0], acc0[1], acc1[1], out0, out1);
        else
            kdm_requant_quad_dbl_(q->mult, q->shift, o, o1, acc0[0], acc1[0], acc0[1], acc1[1], zp,
                                  zp2, out0, out1);
    }
}

#if KDM_ASM_JOBS
/*
 * A pixel pair's whole channel loop in assembly, for K (staged) a multiple of 8, out_c even and
 * every multiplier non-zero with a negative shift (checked once per call), as in
 * conv2d_s8_dsp.c. Per group of 8 K values and 2 x 2 block (32 MACs): a weight word of each
 * row and its XOR, then per lane pair one LDRD of both pixels' staged words, an AND that
 * decodes the lane pair of each row (the shift folded into the operand) and four SMLAD: 32
 * instructions, where block() compiles to 39. The block's sums start from bias - 8 * column
 * sum (corr0 / corr1). The loop takes two groups a turn; an odd count enters at the second.
 */
typedef struct {
    kdm_pair_job_ base;    /* kdm_dsp.h */
    uint32_t corr0, corr1; /* -8 x the sum of each staged column (mod 2^32) */
    int32_t odd;           /* K / 8 is odd */
} pair_job4;

typedef char pair_job4_layout_[(__builtin_offsetof(pair_job4, corr0) == 48 &&
                                __builtin_offsetof(pair_job4, odd) == 56)
                                   ? 1
                                   : -1];

void kdm_conv_pair_job_s4_(pair_job4 *j);

/* one lane pair (shift s of the weight words, 0 / 8 / 4 / 12) of the group */
#define KDM_JOB4_LANE(s)                                                                           \
    "ldrd r0, r1, [r4], #8\n\t"                                                                    \
    "and r2, r3, r6, lsr #" s "\n\t"                                                               \
    "smlad r8, r2, r0, r8\n\t"                                                                     \
    "smlad r9, r2, r1, r9\n\t"                                                                     \
    "and r2, r3, r7, lsr #" s "\n\t"                                                               \
    "smlad r10, r2, r0, r10\n\t"                                                                   \
    "smlad r11, r2, r1, r11\n\t"

/* one group of 8 K values: the weight words of rows o (r12) and o + 1 (lr), nibbles + 8 */
#define KDM_JOB4_GROUP                                                                             \
    "ldr r6, [r12], #4\n\t"                                                                        \
    "eor r6, r6, #0x88888888\n\t"                                                                  \
    "ldr r7, [lr], #4\n\t"                                                                         \
    "eor r7, r7, #0x88888888\n\t" KDM_JOB4_LANE("0") KDM_JOB4_LANE("8") KDM_JOB4_LANE("4")         \
        KDM_JOB4_LANE("12")

/* r0 = j. In the K loop: r0 / r1 the two pixels' staged words of a lane pair, r2 a decoded lane
 * pair, r3 the lane mask 0x000F000F, r4 the staged columns, r5 the job, r6 / r7 the weight words,
 * r8 a00, r9 a01, r10 a10, r11 a11 (a<channel><pixel>), r12 / lr weight rows o / o + 1. */
__asm__(".section .text.kdm_conv_pair_job_s4_,\"ax\",%progbits\n\t"
        ".syntax unified\n\t"
        ".thumb\n\t"
        ".p2align 2\n\t"
        ".global kdm_conv_pair_job_s4_\n\t"
        ".type kdm_conv_pair_job_s4_, %function\n\t"
        ".thumb_func\n"
        "kdm_conv_pair_job_s4_:\n\t"
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"
        "mov r5, r0\n\t"
        "ldr r12, [r0, #20]\n\t"
        "mov r3, #0x000F000F\n"
        "1:\n\t" /* a block: biases less 8 x the column sums, weight rows, column */
        "ldr r0, [r5, #0]\n\t"
        "ldrd r8, r10, [r0], #8\n\t"
        "str r0, [r5, #0]\n\t"
        "ldrd r0, r1, [r5, #48]\n\t"
        "add r9, r8, r1\n\t"
        "add r8, r8, r0\n\t"
        "add r11, r10, r1\n\t"
        "add r10, r10, r0\n\t"
        "ldr r0, [r5, #28]\n\t"
        "add lr, r12, r0\n\t"
        "ldr r4, [r5, #32]\n\t"
        "ldr r0, [r5, #56]\n\t"
        "cbz r0, 2f\n\t"
        "b 3f\n"
        "2:\n\t" KDM_JOB4_GROUP "3:\n\t" KDM_JOB4_GROUP "ldr r0, [r5, #36]\n\t"
        "cmp r4, r0\n\t"
        "bne 2b\n\t" KDM_ASM_PAIR_JOB_END "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n\t"
        ".size kdm_conv_pair_job_s4_, . - kdm_conv_pair_job_s4_\n\t"
        ".text");
#endif

void kdm_conv2d_s4_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const uint8_t *w, int8_t *out, void *scratch)
{
    const kdm_requant_params rq = *q; /* a local copy: the int8 stores cannot alias it */
    const int32_t n_pix = p->out_h * p->out_w, out_c = p->out_c;
    const int32_t k_all = p->kernel_h * p->kernel_w * p->in_c;
    const int narrow = rq.act_min != -128 || rq.act_max != 127;
    uint8_t *col = (uint8_t *)scratch;
    int32_t k8 = k_all & ~7; /* the grouped values; the rest is the C path's tail */
#if KDM_ASM_JOBS
    /* the assembly channel loop takes K rounded up to 8, the staged zeros past K meeting the
     * rows' padding nibbles (a row of row_stride >= 4 bytes always has room for them) */
    const int32_t kup = (k_all + 7) & ~7;
    const int fast = kup <= 2 * p->row_stride && !(out_c & 1) && kdm_requant_simple_(&rq, out_c);
    if (fast)
        k8 = kup;
    pair_job4 job;
    kdm_pair_job_init_(&job.base, &rq, w, p->row_stride, kup / 2, col, kup, out_c);
    job.odd = (kup >> 3) & 1;
#endif
    if (k_all < k8) /* the zeros past K, which im2col never writes */
        memset(col, 0, (size_t)(4 * k8));
    for (int32_t pix = 0; pix < n_pix; pix += 2) {
        const int32_t pix1 = pix + 1 < n_pix ? pix + 1 : pix;
        int8_t *out0 = out + pix * out_c, *out1 = out + pix1 * out_c;
        uint32_t sum0 = im2col(p, in, pix, 0, col, k8), sum1 = im2col(p, in, pix1, 1, col, k8);
#if KDM_ASM_JOBS
        if (fast) {
            kdm_pair_job_start_(&job.base, &rq, out0, out1);
            job.corr0 = 0u - 8u * sum0;
            job.corr1 = 0u - 8u * sum1;
            kdm_conv_pair_job_s4_(&job);
        } else
#endif
            channels(&rq, w, p->row_stride, out_c, col, k_all, sum0, sum1, out0, out1);
        if (narrow) {
            kdm_clamp_row_(out0, out_c, rq.act_min, rq.act_max);
            kdm_clamp_row_(out1, out_c, rq.act_min, rq.act_max);
        }
    }
}
