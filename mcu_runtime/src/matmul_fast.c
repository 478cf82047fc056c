/*
 * matmul_fast.c - convolution and fully-connected layers for cores without the DSP extension
 * (Cortex-M0/M0+/M3; see kdm_kernels.h), int8 or int4 weights. Bit-identical to the reference
 * kernels: the same int32 sums modulo 2^32 and the same requantization; only the order of the
 * additions differs.
 *
 * A pointwise convolution (1x1, stride 1, no padding) and a fully-connected layer are the matrix
 * product out[p][o] = requant(bias[o] + sum_c in[p][c] w[o][c]) (a fully-connected layer has
 * one "pixel" of n_in values). The reference kernels work out an
 * input index and a padding test for every MAC; here the sums of two output channels for two
 * pixels run together, so that each input byte and each weight loaded serves two multiplies.
 * Output channels go two at a time in the outer loop: int4 rows are unpacked into int8 in the
 * scratch area there (two shifts per nibble), once for all pixels; int8 rows are read where
 * they lie. A lone last pixel or channel runs the same loop with one row repeated.
 *
 * On ARMv6-M the inner loop is inline assembly: 16 instructions per 4 MACs (LDRSB with a
 * register offset from the rows' ends and one negative index, MULS, ADD into high registers),
 * where GCC's own loop spilled to the stack at 6 per MAC. It needs four high registers, which
 * GCC does not give inline assembly at -Os (it keeps r8 - r11 out of Thumb-1 code there), and
 * GCC's divided syntax (clang reads it otherwise): other builds, and other cores (Cortex-M3,
 * hosts), run the plain C loop.
 *
 * Other convolutions (3x3, strides, padding) gather the windows of two output pixels into the
 * scratch area (im2col, the input zero-point in the padding) and run the same loop against
 * every pair of output channels (conv_im2col).
 */
#include "kdm_kernels.h"

/*
 * Sums of output channels o and o + 1 (int8 rows w0, w1) over k inputs for pixels x0 and x1,
 * into a[0..3] = (o, x0), (o, x1), (o + 1, x0), (o + 1, x1); a holds the biases on entry.
 * ARMv6-M: six LDRSB, four MULS, four ADD and ADDS / BNE per input.
 */
static void dot2x2(const int8_t *x0, const int8_t *x1, const int8_t *w0, const int8_t *w1,
                   int32_t k, uint32_t *a)
{
    uint32_t a00 = a[0], a01 = a[1], a10 = a[2], a11 = a[3];
#if defined(__GNUC__) && !defined(__clang__) && !defined(__OPTIMIZE_SIZE__) &&                     \
    defined(__ARM_ARCH_ISA_THUMB) && __ARM_ARCH_ISA_THUMB == 1
    if (k > 0) {
        const int8_t *e0 = x0 + k, *e1 = x1 + k, *f0 = w0 + k, *f1 = w1 + k;
        int32_t i = -k, t0, t1;
        /* GCC reads ARMv6-M inline assembly in divided syntax: MUL and ADD of low registers
         * set the flags, ADD to a high register does not */
        __asm__("1:\n\t"
                "ldrsb %[t0], [%[e0], %[i]]\n\t"
                "ldrsb %[t1], [%[f0], %[i]]\n\t"
                "mul %[t1], %[t0]\n\t"
                "add %[a00], %[t1]\n\t"
                "ldrsb %[t1], [%[f1], %[i]]\n\t"
                "mul %[t1], %[t0]\n\t"
                "add %[a10], %[t1]\n\t"
                "ldrsb %[t0], [%[e1], %[i]]\n\t"
                "ldrsb %[t1], [%[f0], %[i]]\n\t"
                "mul %[t1], %[t0]\n\t"
                "add %[a01], %[t1]\n\t"
                "ldrsb %[t1], [%[f1], %[i]]\n\t"
                "mul %[t1], %[t0]\n\t"
                "add %[a11], %[t1]\n\t"
                "add %[i], #1\n\t"
                "bne 1b"
                : [a00] "+h"(a00), [a01] "+h"(a01), [a10] "+h"(a10), [a11] "+h"(a11), [i] "+l"(i),
                  [t0] "=&l"(t0), [t1] "=&l"(t1)
                : [e0] "l"(e0), [e1] "l"(e1), [f0] "l"(f0), [f1] "l"(f1)
                : "cc", "memory");
    }
#else
    for (int32_t c = 0; c < k; c++) {
        int32_t xa = x0[c], xb = x1[c], wa = w0[c], wb = w1[c];
        a00 += (uint32_t)(xa * wa);
        a01 += (uint32_t)(xb * wa);
        a10 += (uint32_t)(xa * wb);
        a11 += (uint32_t)(xb * wb);
    }
#endif
    a[0] = a00;
    a[1] = a01;
    a[2] = a10;
    a[3] = a11;
}

/* The k int4 weights of a row (two per byte, low nibble first) as int8: each byte is loaded
 * once and both nibbles are taken with shifts (kdm_nibble_ per weight loads the byte twice and
 * shifts by a variable: the fully-connected layer, which unpacks for one pixel only, took 23.6
 * instructions per MAC that way on the Cortex-M0+, 15.1 this way). */
static void unpack_s4(const uint8_t *row, int32_t k, int8_t *dst)
{
    for (int32_t c = 0; c + 1 < k; c += 2) {
        uint32_t b = row[c >> 1];
        dst[c] = (int8_t)((int32_t)(b << 28) >> 28);
        dst[c + 1] = (int8_t)((int32_t)(b << 24) >> 28);
    }
    if (k & 1)
        dst[k - 1] = (int8_t)((int32_t)((uint32_t)row[k >> 1] << 28) >> 28);
}

/* Weight rows o (into *w0) and o + 1 (into *w1; row o again when !two_ch) as int8: where they
 * lie (int8), or unpacked into dst, row o + 1 at dst + k (int4). */
static void rows2(const uint8_t *w, int wbits, int32_t o, int two_ch, int32_t row_stride, int32_t k,
                  int8_t *dst, const int8_t **w0, const int8_t **w1)
{
    if (KDM_IS_W8_(wbits)) {
        *w0 = (const int8_t *)w + o * row_stride;
        *w1 = two_ch ? *w0 + row_stride : *w0;
        return;
    }
    unpack_s4(w + o * row_stride, k, dst);
    if (two_ch)
        unpack_s4(w + (o + 1) * row_stride, k, dst + k);
    *w0 = dst;
    *w1 = two_ch ? dst + k : dst;
}

/* Outputs o, o + 1 (if two_ch) of pixels x0 (into o0[0], o0[1]) and x1 (if two_pix: o1[0],
 * o1[1]); a lone pixel or channel passes x1 = x0 or w1 = w0. */
static void block2x2(const kdm_requant_params *q, int32_t o, int two_ch, int two_pix,
                     const int8_t *x0, const int8_t *x1, const int8_t *w0, const int8_t *w1,
                     int32_t k, int8_t *o0, int8_t *o1)
{
    const uint32_t b0 = (uint32_t)q->bias[o], b1 = (uint32_t)q->bias[two_ch ? o + 1 : o];
    uint32_t a[4] = {b0, b0, b1, b1};
    dot2x2(x0, x1, w0, w1, k, a);
    o0[0] = kdm_requant_out_(q, o, (int32_t)a[0]);
    if (two_pix)
        o1[0] = kdm_requant_out_(q, o, (int32_t)a[1]);
    if (two_ch) {
        o0[1] = kdm_requant_out_(q, o + 1, (int32_t)a[2]);
        if (two_pix)
            o1[1] = kdm_requant_out_(q, o + 1, (int32_t)a[3]);
    }
}

/*
 * out[p][o] for n_pix pixels of k inputs (pixel p at in + p k) and n_out weight rows
 * row_stride bytes apart; wbits 8 or 4 (int4 rows are unpacked to int8 in scratch, two rows at
 * a time, then serve every pixel). A lone pixel or channel is passed twice (x1 = x0, w1 = w0)
 * and only the sums it owns are stored.
 */
static void matmul(const kdm_requant_params *q, const int8_t *in, int32_t n_pix, int32_t k,
                   const uint8_t *w, int32_t row_stride, int32_t n_out, int wbits, int8_t *out,
                   int8_t *scratch)
{
    for (int32_t o = 0; o < n_out; o += 2) {
        const int two_ch = o + 1 < n_out;
        const int8_t *w0, *w1;
        rows2(w, wbits, o, two_ch, row_stride, k, scratch, &w0, &w1);
        for (int32_t p = 0; p < n_pix; p += 2) {
            const int two_pix = p + 1 < n_pix;
            const int8_t *x0 = in + p * k, *x1 = two_pix ? x0 + k : x0;
            int8_t *o0 = out + p * n_out + o;
            block2x2(q, o, two_ch, two_pix, x0, x1, w0, w1, k, o0, o0 + n_out);
        }
    }
}

/* The k = kernel_h kernel_w in_c inputs of output pixel (oy, ox) in the weights' order
 * (ky, kx, c), the input zero-point in the padding. */
static void im2col(const kdm_conv_params *p, const int8_t *in, int32_t oy, int32_t ox, int8_t *dst)
{
    const int32_t ch = p->in_c;
    const int8_t zp = (int8_t)p->in_zp;
    for (int32_t ky = 0; ky < p->kernel_h; ky++) {
        const uint32_t iy = (uint32_t)(oy * p->stride - p->pad + ky);
        for (int32_t kx = 0; kx < p->kernel_w; kx++, dst += ch) {
            const uint32_t ix = (uint32_t)(ox * p->stride - p->pad + kx);
            if (iy < (uint32_t)p->in_h && ix < (uint32_t)p->in_w) {
                const int8_t *src = in + ((int32_t)iy * p->in_w + (int32_t)ix) * ch;
                for (int32_t c = 0; c < ch; c++)
                    dst[c] = src[c];
            } else {
                for (int32_t c = 0; c < ch; c++)
                    dst[c] = zp;
            }
        }
    }
}

/* Other convolutions: two output pixels' windows gathered into the scratch area (im2col, k
 * bytes each), then every pair of output channels against them (int4 rows unpacked after the
 * windows, two at a time). Pixels are the outer loop here, so that each window is gathered
 * once. */
static void conv_im2col(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                        const uint8_t *w, int wbits, int8_t *out, int8_t *scratch)
{
    const int32_t k = p->kernel_h * p->kernel_w * p->in_c, n_pix = p->out_h * p->out_w;
    const int32_t n_out = p->out_c, rs = p->row_stride;
    int8_t *col = scratch, *rows = scratch + 2 * k;
    /* pixel n at (oy, ox), kept by counting (no division: see depthwise_fast.c's dw_inner) */
    for (int32_t n = 0, oy = 0, ox = 0; n < n_pix; n += 2) {
        const int two_pix = n + 1 < n_pix;
        for (int32_t i = 0; i <= two_pix; i++) {
            im2col(p, in, oy, ox, col + i * k);
            if (++ox == p->out_w) {
                ox = 0;
                oy++;
            }
        }
        const int8_t *x1 = two_pix ? col + k : col;
        int8_t *o0 = out + n * n_out;
        for (int32_t o = 0; o < n_out; o += 2) {
            const int two_ch = o + 1 < n_out;
            const int8_t *w0, *w1;
            rows2(w, wbits, o, two_ch, rs, k, rows, &w0, &w1);
            block2x2(q, o, two_ch, two_pix, col, x1, w0, w1, k, o0 + o, o0 + n_out + o);
        }
    }
}

static int pointwise(const kdm_conv_params *p)
{
    return p->kernel_h == 1 && p->kernel_w == 1 && p->stride == 1 && p->pad == 0;
}

void kdm_conv2d_s8_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                        const int8_t *w, int8_t *out, void *scratch)
{
    if (!pointwise(p)) {
        conv_im2col(p, q, in, (const uint8_t *)w, 8, out, scratch);
        return;
    }
    matmul(q, in, p->in_h * p->in_w, p->in_c, (const uint8_t *)w, p->row_stride, p->out_c, 8, out,
           scratch);
}

void kdm_conv2d_s4_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                        const uint8_t *w, int8_t *out, void *scratch)
{
    if (!pointwise(p)) {
        conv_im2col(p, q, in, w, 4, out, scratch);
        return;
    }
    matmul(q, in, p->in_h * p->in_w, p->in_c, w, p->row_stride, p->out_c, 4, out, scratch);
}

void kdm_fully_connected_s8_fast(const kdm_fc_params *p, const kdm_requant_params *q,
                                 const int8_t *in, const int8_t *w, int8_t *out, void *scratch)
{
    matmul(q, in, 1, p->n_in, (const uint8_t *)w, p->row_stride, p->n_out, 8, out, scratch);
}

void kdm_fully_connected_s4_fast(const kdm_fc_params *p, const kdm_requant_params *q,
                                 const int8_t *in, const uint8_t *w, int8_t *out, void *scratch)
{
    matmul(q, in, 1, p->n_in, w, p->row_stride, p->n_out, 4, out, scratch);
}
