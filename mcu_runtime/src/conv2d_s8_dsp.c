/*
 * conv2d_s8_dsp.c - 2-D convolution, int8 weights, for the Cortex-M DSP extension
 * (bit-identical to conv2d_s8_ref.c; see kdm_kernels.h).
 *
 * General kernels: im2col of two output pixels at a time into scratch as int16, then a matrix
 * product over 2 output channels x 2 pixels per inner loop. The two columns are interleaved by
 * groups of four (K index k .. k+3), 16 bytes a group:
 *     [px0 (x[k], x[k+2])] [px0 (x[k+1], x[k+3])] [px1 (x[k], x[k+2])] [px1 (x[k+1], x[k+3])]
 * matching the lanes SXTB16 / SXTB16 ROR #8 make of a word of four weights, so one pointer walks
 * both columns. On the Cortex-M4 the inner loop is one asm statement (all_groups) taking
 * two groups (32 MACs) per turn: 2 LDM of four staged words, 4 weight loads, 8 SXTB16, 16 SMLAD
 * and 3 for the loop, 33 instructions, 1.03 per MAC (GCC 12 made 41 of the same loop in C, with
 * 8 staged loads); an odd group count enters the loop at its second group. The last K mod 4 values
 * of each column follow the groups, column 0 then column 1, and are summed in C. Padded positions
 * are staged as the input zero-point. When in_c is a multiple of 4 each kernel tap is staged a word
 * at a time (load, SXTB16, SXTB16 ROR #8, two stores); one input channel (a first conv) a window
 * row at a time, or, for a 3x3 window inside the input, from one word load per window row
 * (SXTB16 and PKHBT put the nine values in their slots, five word stores); otherwise value by
 * value.
 *
 * When out_c is even, every channel's multiplier non-zero with a negative shift (double rounding,
 * or single rounding in a runtime built for it only) and the weight rows have room for K rounded
 * up to 8 (the exporter pads int8 conv rows to 8 bytes), the Cortex-M4 runs a pixel pair's whole
 * channel loop in assembly (kdm_conv_pair_job_s8_), K staged rounded up to 8 with zeros past it
 * (the first conv of the tiny student, K = 9: 6.42 -> 5.04 instructions per MAC with its
 * one-channel staging, 4.68 with the zeros past K staged once per layer by the caller instead of
 * for every pixel, 4.43 with the one-channel staging's slot offsets kept in a rotating word and
 * the geometry in locals instead of slot() per value, 3.88 with the 3x3 windows inside the input
 * staged from three word loads); otherwise channels() in C.
 *
 * 1x1 kernels take the same path: staging a pixel is then a straight int8 -> int16 conversion
 * (no gather), and the staged loop beats reading pixels in place, which needs two more SXTB16
 * per group and more live registers than the Cortex-M4 has (measured under QEMU with
 * bench/mcu on a 32 -> 32 channel 1x1 layer: 2.9 instructions per MAC in place, 2.75 staged).
 *
 * An odd last pixel is computed as a pair with itself, an odd last channel as a pair with
 * itself. All channels of a pixel pair run in one out-of-line function (channels), whose loop
 * has only the block's pointers and counters to keep: each block's four raw sums are
 * requantized as soon as they are complete (kdm_requant_pair_dbl_, the channel's multiplier
 * and shift serving both pixels) and stored, with no round trip through memory. Measured on
 * the tiny student's 1x1 layers against collecting 16 channels' sums on the stack for
 * a separate requantization loop: 2.66 / 2.30 / 1.79 -> 2.49 / 2.16 / 1.72 instructions per MAC.
 * Single rounding (not the exporter's default) goes out of line, kdm_requant_quad_single_, so that
 * it does not cost the default path registers.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

/* The int16 slot of grouped value k of column j: group k / 4, column j, lane order (0, 2, 1, 3). */
static inline int32_t slot(int32_t k, int32_t j)
{
    return 8 * (k >> 2) + 4 * j + ((k & 1) << 1) + ((k >> 1) & 1);
}

/* Stage the receptive field of output pixel `pix` as column j (0 or 1) of col: its first k4
 * values (a multiple of 4) in groups and the rest in the tail, or, with k4 past K (the assembly
 * channel loop's K rounded up to 8), all of them in groups, the slots up to k4 left as the caller
 * zeroed them. */
static void im2col(const kdm_conv_params *p, const int8_t *in, int32_t pix, int32_t j, uint8_t *col,
                   int32_t k4)
{
    const int32_t oy = pix / p->out_w, ox = pix - oy * p->out_w;
    const int32_t y0 = oy * p->stride - p->pad, x0 = ox * p->stride - p->pad;
    const int32_t ch = p->in_c, k_all = p->kernel_h * p->kernel_w * ch;
    if ((ch & 3) == 0) {
        const uint32_t zz = kdm_pack16(p->in_zp, p->in_zp);
        uint8_t *d = col + 8 * j;
        for (int32_t ky = 0; ky < p->kernel_h; ky++) {
            const int32_t iy = y0 + ky;
            for (int32_t kx = 0; kx < p->kernel_w; kx++, d += 4 * ch) {
                const int32_t ix = x0 + kx;
                if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
                    for (int32_t c = 0; c < ch; c += 4) {
                        kdm_st32a(d + 4 * c, zz);
                        kdm_st32a(d + 4 * c + 4, zz);
                    }
                    continue;
                }
                const int8_t *s = in + (iy * p->in_w + ix) * ch;
                for (int32_t c = 0; c < ch; c += 4) {
                    uint32_t v = kdm_ld32(s + c);
                    kdm_st32a(d + 4 * c, kdm_sxtb16(v));
                    kdm_st32a(d + 4 * c + 4, kdm_sxtb16_ror8(v));
                }
            }
        }
        return;
    }
    if (ch == 1 && k_all <= k4) { /* one input channel, every value grouped (a first conv) */
        /* the geometry the inner loop reads in locals (the stores may alias *p for the
         * compiler); value k at byte 16 (k / 4) + (0, 4, 2, 6)[k % 4] of column 0 (the lane
         * order of slot()), the last term the low byte of `lane`, which turns a byte per value */
        const int32_t in_h = p->in_h, in_w = p->in_w, kw = p->kernel_w, zp = p->in_zp;
        uint8_t *g = col + 8 * j;
        /* a 3x3 window inside the input whose rows can be read as words (the last row's fourth
         * byte still in the tensor): rows a, b, c give the five words (a0, a2), (a1, b0),
         * (b1, c0), (b2, c1), (c2, 0) of slot()'s order with no per-value work */
        if (kw == 3 && p->kernel_h == 3 && x0 >= 0 && y0 >= 0 && x0 + 3 <= in_w && y0 + 3 <= in_h &&
            (y0 + 3 < in_h || x0 + 3 < in_w)) {
            const int8_t *s = in + y0 * in_w + x0;
            const uint32_t ra = kdm_ld32(s), rb = kdm_ld32(s + in_w), rc = kdm_ld32(s + 2 * in_w);
            const uint32_t b02 = kdm_sxtb16(rb), c02 = kdm_sxtb16(rc);
            kdm_st32a(g, kdm_sxtb16(ra));
            kdm_st32a(g + 4, kdm_pkhbt16(kdm_sxtb16_ror8(ra), b02));
            kdm_st32a(g + 16, kdm_pkhbt16(kdm_sxtb16_ror8(rb), c02));
            kdm_st32a(g + 20, kdm_pkhbt16(b02 >> 16, kdm_sxtb16_ror8(rc)));
            kdm_st32a(g + 32, c02 >> 16);
            return;
        }
        uint32_t lane = 0x06020400u;
        for (int32_t iy = y0; iy < y0 + p->kernel_h; iy++) {
            const int row_in = (uint32_t)iy < (uint32_t)in_h;
            const int8_t *s = in + (row_in ? iy : 0) * in_w;
            for (int32_t ix = x0; ix < x0 + kw; ix++) {
                kdm_st16(g + (lane & 0xFF), row_in && (uint32_t)ix < (uint32_t)in_w ? s[ix] : zp);
                lane = lane >> 8 | lane << 24;
                if (!(lane & 0xFF))
                    g += 16;
            }
        }
        return;
    }
    const int32_t tail = k_all - k4; /* negative (unused) with zeros past K */
    int32_t k = 0;
    for (int32_t ky = 0; ky < p->kernel_h; ky++) {
        const int32_t iy = y0 + ky;
        for (int32_t kx = 0; kx < p->kernel_w; kx++) {
            const int32_t ix = x0 + kx;
            const int inside = iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w;
            const int8_t *s = inside ? in + (iy * p->in_w + ix) * ch : in;
            for (int32_t c = 0; c < ch; c++, k++) {
                int32_t at = k < k4 ? slot(k, j) : 2 * k4 + j * tail + (k - k4);
                kdm_st16(col + 2 * at, inside ? s[c] : p->in_zp);
            }
        }
    }
}

/* One group of four K values for the 2 x 2 block: a weight word of each row (w0, w1 advance by
 * 4), split with SXTB16 / SXTB16 ROR #8, times the staged pairs of both columns at c. */
#define GROUP(c)                                                                                   \
    do {                                                                                           \
        uint32_t va = kdm_ld32(w0), vb = kdm_ld32(w1);                                             \
        uint32_t wa = kdm_sxtb16(va), wb = kdm_sxtb16(vb), x = kdm_ld32a(c);                       \
        a00 = kdm_smlad(wa, x, a00);                                                               \
        a10 = kdm_smlad(wb, x, a10);                                                               \
        x = kdm_ld32a((c) + 8);                                                                    \
        a01 = kdm_smlad(wa, x, a01);                                                               \
        a11 = kdm_smlad(wb, x, a11);                                                               \
        wa = kdm_sxtb16_ror8(va);                                                                  \
        wb = kdm_sxtb16_ror8(vb);                                                                  \
        x = kdm_ld32a((c) + 4);                                                                    \
        a00 = kdm_smlad(wa, x, a00);                                                               \
        a10 = kdm_smlad(wb, x, a10);                                                               \
        x = kdm_ld32a((c) + 12);                                                                   \
        a01 = kdm_smlad(wa, x, a01);                                                               \
        a11 = kdm_smlad(wb, x, a11);                                                               \
        w0 += 4;                                                                                   \
        w1 += 4;                                                                                   \
    } while (0)

#if KDM_ASM_JOBS
/*
 * One group of four K values of the 2 x 2 block in assembly, for the C path's inline loop
 * (all_groups, GCC's registers) and the whole-channel-loop job (kdm_conv_pair_job_s8_, fixed
 * registers): LDM brings the group's four staged words (x0 - x3, ascending registers), then per
 * weight row (w0, w1, advanced by 4) one load into v, SXTB16 into e, two SMLAD, SXTB16 ROR #8 of
 * v, two SMLAD: 15 instructions per 16 MACs, the products and sums of GROUP.
 */
#define KDM_S8_ROW(w, v, e, x0, x1, x2, x3, a0, a1)                                                \
    "ldr " v ", [" w "], #4\n\t"                                                                   \
    "sxtb16 " e ", " v "\n\t"                                                                      \
    "smlad " a0 ", " e ", " x0 ", " a0 "\n\t"                                                      \
    "smlad " a1 ", " e ", " x2 ", " a1 "\n\t"                                                      \
    "sxtb16 " v ", " v ", ror #8\n\t"                                                              \
    "smlad " a0 ", " v ", " x1 ", " a0 "\n\t"                                                      \
    "smlad " a1 ", " v ", " x3 ", " a1 "\n\t"
#define KDM_S8_GROUP(c, w0, w1, v, e, x0, x1, x2, x3, a00, a01, a10, a11)                          \
    "ldm " c "!, {" x0 ", " x1 ", " x2 ", " x3                                                     \
    "}\n\t" KDM_S8_ROW(w0, v, e, x0, x1, x2, x3, a00, a01)                                         \
        KDM_S8_ROW(w1, v, e, x0, x1, x2, x3, a10, a11)
#endif

/* Optimized GNU C builds for Thumb-2 cores with the DSP extension: the asm loop needs 13 registers,
 * more than an -O0 build may leave free. */
#if KDM_ASM_JOBS && defined(__GNUC__) && defined(__OPTIMIZE__)
#define CONV_ASM 1
#else
#define CONV_ASM 0
#endif

#if CONV_ASM
/*
 * Every group of the 2 x 2 block (k4 / 4 >= 1 of them, ending at `end`), as GROUP does them, in
 * one asm statement of KDM_S8_GROUP (the registers of an LDM list must ascend, hence the staged
 * words in r0 - r3). The loop takes two groups a turn; an
 * odd count enters at the second. The loop test reads `end` from the stack so that the loop
 * needs 13 registers, which GCC can give it. The same products and sums as GROUP in another
 * order (the sums wrap, so the result is the same bits).
 */
#define KDM_GROUP_ASM                                                                              \
    KDM_S8_GROUP("%[c]", "%[w0]", "%[w1]", "%[v]", "%[e]", "%[x0]", "%[x1]", "%[x2]", "%[x3]",     \
                 "%[a00]", "%[a01]", "%[a10]", "%[a11]")

static inline __attribute__((always_inline)) void
all_groups(int32_t *p00, int32_t *p01, int32_t *p10, int32_t *p11, const int8_t **pw0,
           const int8_t **pw1, const uint8_t *c, const uint8_t *end, int32_t odd)
{
    register uint32_t x0 __asm__("r0");
    register uint32_t x1 __asm__("r1");
    register uint32_t x2 __asm__("r2");
    register uint32_t x3 __asm__("r3");
    uint32_t v, e;
    int32_t a00 = *p00, a01 = *p01, a10 = *p10, a11 = *p11;
    const int8_t *w0 = *pw0, *w1 = *pw1;
    __asm__ volatile("ldr %[x0], %[odd]\n\t"
                     "cbnz %[x0], 2f\n"
                     "1:\n\t" KDM_GROUP_ASM "2:\n\t" KDM_GROUP_ASM "ldr %[x0], %[end]\n\t"
                     "cmp %[c], %[x0]\n\t"
                     "bne 1b"
                     : [a00] "+r"(a00), [a01] "+r"(a01), [a10] "+r"(a10), [a11] "+r"(a11),
                       [w0] "+r"(w0), [w1] "+r"(w1), [c] "+r"(c), [x0] "=&r"(x0), [x1] "=&r"(x1),
                       [x2] "=&r"(x2), [x3] "=&r"(x3), [v] "=&r"(v), [e] "=&r"(e)
                     : [end] "m"(end), [odd] "m"(odd)
                     : "cc", "memory");
    *p00 = a00;
    *p01 = a01;
    *p10 = a10;
    *p11 = a11;
    *pw0 = w0;
    *pw1 = w1;
}
#endif

/* Every output channel of the two staged columns, two channels at a time (a 2 x 2 block with
 * the two columns): the four raw sums are requantized as soon as they are complete, the
 * channel's multiplier and shift serving both pixels, into out0 / out1 (out1 == out0 for an odd
 * last pixel, an odd last channel pairs with itself: the same bytes twice). */
static KDM_NOINLINE void channels(const kdm_requant_params *q, const int8_t *w, int32_t rs,
                                  int32_t out_c, const uint8_t *col, int32_t k_all, int8_t *out0,
                                  int8_t *out1)
{
    const int32_t k4 = k_all & ~3, tail = k_all - k4, zp = q->out_zp, zp2 = 2 * zp + 1;
    const int single = KDM_SINGLE_ROUNDING_(q->flags);
#if CONV_ASM
    const uint8_t *const cend = col + 4 * k4; /* 16 staged bytes per group of 4 */
    const int32_t odd = (k4 >> 2) & 1;
#endif
    for (int32_t o = 0; o < out_c; o += 2) {
        const int32_t o1 = o + 1 < out_c ? o + 1 : o;
        const int8_t *w0 = w + o * rs, *w1 = w + o1 * rs;
        int32_t a00 = q->bias[o], a01 = a00, a10 = q->bias[o1], a11 = a10;
#if CONV_ASM
        const uint8_t *c = cend;
        if (k4)
            all_groups(&a00, &a01, &a10, &a11, &w0, &w1, col, cend, odd);
#else
        const uint8_t *c = col;
        for (int32_t g = k4 >> 3; g > 0; g--, c += 32) {
            GROUP(c);
            GROUP(c + 16);
        }
        if (k4 & 4) {
            GROUP(c);
            c += 16;
        }
#endif
        if (tail) {
            uint32_t s00 = (uint32_t)a00, s01 = (uint32_t)a01, s10 = (uint32_t)a10,
                     s11 = (uint32_t)a11;
            for (int32_t t = 0; t < tail; t++) {
                int32_t x0 = (int16_t)kdm_ld16(c + 2 * t),
                        x1 = (int16_t)kdm_ld16(c + 2 * (tail + t));
                s00 += (uint32_t)(w0[t] * x0);
                s01 += (uint32_t)(w0[t] * x1);
                s10 += (uint32_t)(w1[t] * x0);
                s11 += (uint32_t)(w1[t] * x1);
            }
            a00 = (int32_t)s00;
            a01 = (int32_t)s01;
            a10 = (int32_t)s10;
            a11 = (int32_t)s11;
        }
        if (single) /* not the exporter's default: out of line */
            kdm_requant_quad_single_(q, o, o1, a00, a01, a10, a11, out0, out1);
        else
            kdm_requant_quad_dbl_(q->mult, q->shift, o, o1, a00, a01, a10, a11, zp, zp2, out0,
                                  out1);
    }
}

#if KDM_ASM_JOBS
/*
 * The whole channel loop of a pixel pair in assembly, for the common case: K (staged) a multiple
 * of 8, out_c even, and every channel's multiplier non-zero and shift negative
 * (kdm_conv2d_s8_dsp checks all of it once per call). Per 2 x 2 block: the two biases by one
 * LDRD, all_groups' loop, the requantization of kdm_requant_pair_dbl_ (SMMLAR, ADD,
 * ASR, QADD, SSAT ASR #1 per value; multipliers two at a time by LDRD, the int8 shifts by two
 * LDRSB) and four post-incremented byte stores: about 56 instructions around the loop, where the C
 * version (channels) spends 82, its values spilled around the loop's 13 registers. The pointers
 * live in a kdm_pair_job_ (kdm_dsp.h), which the function advances.
 */
void kdm_conv_pair_job_s8_(kdm_pair_job_ *j);

/* one group of four K values of the block (r0 - r3 staged, r6 / r7 a weight word and its lanes) */
#define KDM_JOB_GROUP                                                                              \
    KDM_S8_GROUP("r4", "r12", "lr", "r6", "r7", "r0", "r1", "r2", "r3", "r8", "r9", "r10", "r11")

/* r0 = j. Registers in the K loop: r0 - r3 staged words, r4 the staged column, r5 the job, r6 /
 * r7 a weight word and its lanes, r8 a00, r9 a01, r10 a10, r11 a11 (a<channel><pixel>), r12 / lr
 * weight rows o / o + 1. The job and the values that 16-bit Thumb encodings can reach (LDM, LDR
 * / STR with an offset, CMP, LSLS, MVNS) are in low registers: the function is 306 bytes. */
__asm__(".section .text.kdm_conv_pair_job_s8_,\"ax\",%progbits\n\t"
        ".syntax unified\n\t"
        ".thumb\n\t"
        ".p2align 2\n\t"
        ".global kdm_conv_pair_job_s8_\n\t"
        ".type kdm_conv_pair_job_s8_, %function\n\t"
        ".thumb_func\n"
        "kdm_conv_pair_job_s8_:\n\t"
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"
        "mov r5, r0\n\t"
        "ldr r12, [r0, #20]\n"
        "1:\n\t" /* a block: biases, weight rows, column */
        "ldr r0, [r5, #0]\n\t"
        "ldrd r8, r10, [r0], #8\n\t"
        "str r0, [r5, #0]\n\t"
        "mov r9, r8\n\t"
        "mov r11, r10\n\t"
        "ldr r0, [r5, #28]\n\t"
        "add lr, r12, r0\n\t"
        "ldr r4, [r5, #32]\n"
        "2:\n\t" KDM_JOB_GROUP KDM_JOB_GROUP "ldr r0, [r5, #36]\n\t"
        "cmp r4, r0\n\t"
        "bne 2b\n\t" KDM_ASM_PAIR_JOB_END "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n\t"
        ".size kdm_conv_pair_job_s8_, . - kdm_conv_pair_job_s8_\n\t"
        ".text");

#endif

void kdm_conv2d_s8_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const int8_t *w, int8_t *out, void *scratch)
{
    const kdm_requant_params rq = *q; /* a local copy: the int8 stores cannot alias it */
    const int32_t n_pix = p->out_h * p->out_w, out_c = p->out_c;
    const int32_t k_all = p->kernel_h * p->kernel_w * p->in_c;
    const int narrow = rq.act_min != -128 || rq.act_max != 127;
    uint8_t *col = (uint8_t *)scratch;
    int32_t k4 = k_all & ~3; /* the grouped values; the rest is the C path's tail */
#if KDM_ASM_JOBS
    /* the assembly channel loop takes K rounded up to 8 where the rows have room for it (the
     * exporter pads them so), the staged zeros past K meeting the rows' padding */
    const int32_t kup = (k_all + 7) & ~7;
    const int fast = kup <= p->row_stride && !(out_c & 1) && kdm_requant_simple_(&rq, out_c);
    if (fast)
        k4 = kup;
    kdm_pair_job_ job;
    kdm_pair_job_init_(&job, &rq, w, p->row_stride, kup, col, kup, out_c);
#endif
    if (k_all < k4) /* the zeros past K, which im2col never writes */
        memset(col, 0, (size_t)(4 * k4));
    for (int32_t pix = 0; pix < n_pix; pix += 2) {
        const int32_t pix1 = pix + 1 < n_pix ? pix + 1 : pix;
        int8_t *out0 = out + pix * out_c, *out1 = out + pix1 * out_c;
        im2col(p, in, pix, 0, col, k4);
        im2col(p, in, pix1, 1, col, k4);
#if KDM_ASM_JOBS
        if (fast) {
            kdm_pair_job_start_(&job, &rq, out0, out1);
            kdm_conv_pair_job_s8_(&job);
        } else
#endif
            channels(&rq, w, p->row_stride, out_c, col, k_all, out0, out1);
        if (narrow) {
            kdm_clamp_row_(out0, out_c, rq.act_min, rq.act_max);
            kdm_clamp_row_(out1, out_c, rq.act_min, rq.act_max);
        }
    }
}
