/*
 * depthwise_s8_dsp.c - depthwise convolution, int8 weights, for the Cortex-M DSP extension
 * (bit-identical to depthwise_s8_ref.c; see kdm_kernels.h).
 *
 * Channels are innermost (NHWC) in both the input pixels and the weight rows, so four channels
 * of one tap are one word of input and one word of weights. Both are split with SXTB16 /
 * SXTB16 ROR #8 into (c0, c2) and (c1, c3) lanes and each channel accumulates separately with
 * SMLABB / SMLATT (SMLAD does not apply: it would add two channels together): per tap and 4
 * channels 2 loads, 4 SXTB16, 4 multiply-accumulates and 2 pointer steps. Output pixels whose
 * window lies inside the input (all but a border of pad pixels) walk the window with no
 * checks, in a function of their own so that its loop keeps every value in a register (inlined
 * into the pixel loops, GCC spills there), a 3-wide window row unrolled; a border pixel runs the
 * same function over the part of its window inside the input, then adds its padded taps with a
 * word of zero-points (no input loads, no per-tap bounds checks).
 * Channels past the last multiple of 4 are summed in C. The raw sums of a pixel's channels go
 * to scratch (in_c int32) and are requantized in one loop afterwards: with the requantization
 * inlined into the channel-group loop (four copies) GCC spills the accumulators of the taps.
 * With only kernel_h * kernel_w MACs per output, the requantization (16 instructions per output
 * in kdm_quant.c's loop) is a large share of the time; for the usual case (double rounding,
 * multipliers below 1, an even channel count) the Cortex-M4 runs it two channels at a time in
 * assembly (kdm_requant_pairs_, kdm_quant.c, 10.5 per output): on the tiny student 7.20 / 7.00
 * / 7.05 -> 6.53 / 6.37 / 6.44 instructions per MAC.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

/* One tap of four channels: input word v (zero-points when padded), weights at wp. */
#define TAP(x02, x13, wp)                                                                          \
    do {                                                                                           \
        uint32_t wv = kdm_ld32(wp), w02 = kdm_sxtb16(wv), w13 = kdm_sxtb16_ror8(wv);               \
        a0 = kdm_smlabb(w02, x02, a0);                                                             \
        a2 = kdm_smlatt(w02, x02, a2);                                                             \
        a1 = kdm_smlabb(w13, x13, a1);                                                             \
        a3 = kdm_smlatt(w13, x13, a3);                                                             \
    } while (0)

/* The geometry the interior loop needs. */
typedef struct {
    int32_t kh, kw, ch, rs;
    int32_t row_skip;  /* input bytes from a window row's end to the next */
    int32_t wrow_skip; /* weight bytes likewise (non-zero for a window cut by the border) */
} window;

/* Channels 0 .. c4 - 1, four at a time, over a window inside the input: ip0 and wp0 point at the
 * window's first pixel and weight row; the sums start from init[0 .. c4) (the biases, read in
 * place) and go to acc[0 .. c4).
 */
static KDM_NOINLINE void window4(const window *g, const int8_t *ip0, const int8_t *wp0,
                                 const int32_t *init, int32_t *acc, int32_t c4)
{
    const int32_t ch = g->ch, rs = g->rs, kw = g->kw, skip = g->row_skip;
#define STEP()                                                                                     \
    do {                                                                                           \
        uint32_t v = kdm_ld32(ip);                                                                 \
        TAP(kdm_sxtb16(v), kdm_sxtb16_ror8(v), wp);                                                \
        ip += ch;                                                                                  \
        wp += rs;                                                                                  \
    } while (0)
    for (int32_t c = 0; c < c4; c += 4) {
        const int8_t *ip = ip0 + c, *wp = wp0 + c;
        int32_t a0 = init[c], a1 = init[c + 1], a2 = init[c + 2], a3 = init[c + 3];
        if (kw == 3) { /* the common kernel: a window row without loop upkeep */
            for (int32_t ky = g->kh; ky > 0; ky--, ip += skip, wp += g->wrow_skip) {
                STEP();
                STEP();
                STEP();
            }
        } else {
            for (int32_t ky = g->kh; ky > 0; ky--, ip += skip, wp += g->wrow_skip)
                for (int32_t kx = kw; kx > 0; kx--)
                    STEP();
        }
        acc[c] = a0;
        acc[c + 1] = a1;
        acc[c + 2] = a2;
        acc[c + 3] = a3;
    }
#undef STEP
}

void kdm_depthwise_s8_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const int8_t *w, int8_t *out, void *scratch)
{
    const kdm_requant_params rq = *q; /* a local copy: the int8 stores cannot alias it */
    int32_t *acc = (int32_t *)scratch;
    const int32_t ch = p->in_c, c4 = ch & ~3, kh = p->kernel_h, kw = p->kernel_w;
    const int32_t rs = p->row_stride;
    const window g = {kh, kw, ch, rs, (p->in_w - kw) * ch, 0};
    const uint32_t zz = kdm_pack16(p->in_zp, p->in_zp);
#if KDM_ASM_JOBS
    const int pairs = !(ch & 1) && kdm_requant_simple_(&rq, ch);
    const int narrow = rq.act_min != -128 || rq.act_max != 127;
    const int32_t zp2 = 2 * rq.out_zp + 1;
#endif
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        const int32_t y0 = oy * p->stride - p->pad;
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int32_t x0 = ox * p->stride - p->pad;
            int8_t *o = out + (oy * p->out_w + ox) * ch;
            if (y0 >= 0 && x0 >= 0 && y0 + kh <= p->in_h && x0 + kw <= p->in_w) {
                const int8_t *ip = in + (y0 * p->in_w + x0) * ch;
                window4(&g, ip, w, rq.bias, acc, c4);
            } else {
                /* the taps inside the input as a smaller window, then the padded ones (input
                 * zero-points, no loads, no per-tap checks) */
                const int32_t kya = y0 < 0 ? -y0 : 0, kxa = x0 < 0 ? -x0 : 0;
                const int32_t kyb = y0 + kh > p->in_h ? p->in_h - y0 : kh;
                const int32_t kxb = x0 + kw > p->in_w ? p->in_w - x0 : kw;
                if (kya < kyb && kxa < kxb) {
                    const int32_t nx = kxb - kxa;
                    const window gb = {kyb - kya, nx, ch, rs, (p->in_w - nx) * ch, (kw - nx) * rs};
                    const int8_t *ip = in + ((y0 + kya) * p->in_w + x0 + kxa) * ch;
                    const int8_t *wb = w + (kya * kw + kxa) * rs;
                    window4(&gb, ip, wb, rq.bias, acc, c4);
                } else {
                    for (int32_t c = 0; c < c4; c++)
                        acc[c] = rq.bias[c];
                }
                for (int32_t ky = 0; ky < kh; ky++) {
                    for (int32_t kx = 0; kx < kw; kx++) {
                        if (ky >= kya && ky < kyb && kx >= kxa && kx < kxb)
                            continue;
                        const int8_t *wp = w + (ky * kw + kx) * rs;
                        for (int32_t c = 0; c < c4; c += 4) {
                            int32_t a0 = acc[c], a1 = acc[c + 1], a2 = acc[c + 2], a3 = acc[c + 3];
                            TAP(zz, zz, wp + c);
                            acc[c] = a0;
                            acc[c + 1] = a1;
                            acc[c + 2] = a2;
                            acc[c + 3] = a3;
                        }
                    }
                }
            }
            for (int32_t c = c4; c < ch; c++) {
                uint32_t sum = (uint32_t)rq.bias[c];
                for (int32_t ky = 0; ky < kh; ky++) {
                    const int32_t iy = y0 + ky;
                    for (int32_t kx = 0; kx < kw; kx++) {
                        const int32_t ix = x0 + kx;
                        int32_t x = iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w
                                        ? in[(iy * p->in_w + ix) * ch + c]
                                        : p->in_zp;
                        sum += (uint32_t)(x * w[(ky * kw + kx) * rs + c]);
                    }
                }
                acc[c] = (int32_t)sum;
            }
#if KDM_ASM_JOBS
            if (pairs) {
                kdm_requant_pairs_(acc, rq.mult, rq.shift, o, ch >> 1, zp2);
                if (narrow)
                    kdm_clamp_row_(o, ch, rq.act_min, rq.act_max);
                continue;
            }
#endif
            kdm_requant_row_(&rq, 0, acc, o, ch);
        }
    }
}
