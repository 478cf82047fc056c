/*
 * conv2d_s4_ref.c - reference 2-D convolution, int4 weights and int8 activations (W4A8; see
 * kdm_kernels.h). Same as conv2d_s8_ref.c with weight w[o][ky][kx][c] the signed nibble
 * k = (ky * kernel_w + kx) * in_c + c of row o:
 *
 * out[oy][ox][o] = requant(bias[o] + sum over (ky, kx, c) of w[o][ky][kx][c] * x), where x is
 * in[oy * stride - pad + ky][ox * stride - pad + kx][c], or the input zero-point when that
 * position lies in the padding. Written for reading, not speed: the DSP kernel is checked
 * against it.
 */
#include "kdm_kernels.h"

void kdm_conv2d_s4_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                       const uint8_t *w, int8_t *out, void *scratch)
{
    (void)scratch;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            for (int32_t o = 0; o < p->out_c; o++) {
                const uint8_t *row = w + o * p->row_stride;
                uint32_t acc = (uint32_t)q->bias[o];
                for (int32_t ky = 0; ky < p->kernel_h; ky++) {
                    int32_t iy = oy * p->stride - p->pad + ky;
                    for (int32_t kx = 0; kx < p->kernel_w; kx++) {
                        int32_t ix = ox * p->stride - p->pad + kx;
                        int inside = iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w;
                        int32_t k0 = (ky * p->kernel_w + kx) * p->in_c;
                        for (int32_t c = 0; c < p->in_c; c++) {
                            int32_t x = inside ? in[(iy * p->in_w + ix) * p->in_c + c] : p->in_zp;
                            acc += (uint32_t)(x * kdm_nibble_(row, k0 + c));
                        }
                    }
                }
                out[(oy * p->out_w + ox) * p->out_c + o] = kdm_requant_out_(q, o, (int32_t)acc);
            }
        }
    }
}
