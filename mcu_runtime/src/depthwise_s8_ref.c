/*
 * depthwise_s8_ref.c - reference depthwise convolution (channel multiplier 1), int8 weights
 * (see kdm_kernels.h).
 *
 * out[oy][ox][c] = requant(bias[c] + sum over (ky, kx) of w[ky * kernel_w + kx][c] * x), where
 * x is in[oy * stride - pad + ky][ox * stride - pad + kx][c], or the input zero-point in the
 * padding. Weight row p (one kernel tap) holds in_c weights, rows row_stride bytes apart.
 */
#include "kdm_kernels.h"

void kdm_depthwise_s8_ref(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const int8_t *w, int8_t *out, void *scratch)
{
    (void)scratch;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            for (int32_t c = 0; c < p->in_c; c++) {
                uint32_t acc = (uint32_t)q->bias[c];
                for (int32_t ky = 0; ky < p->kernel_h; ky++) {
                    int32_t iy = oy * p->stride - p->pad + ky;
                    for (int32_t kx = 0; kx < p->kernel_w; kx++) {
                        int32_t ix = ox * p->stride - p->pad + kx;
                        int inside = iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w;
                        int32_t x = inside ? in[(iy * p->in_w + ix) * p->in_c + c] : p->in_zp;
                        acc += (uint32_t)(x * w[(ky * p->kernel_w + kx) * p->row_stride + c]);
                    }
                }
                out[(oy * p->out_w + ox) * p->in_c + c] = kdm_requant_out_(q, c, (int32_t)acc);
            }
        }
    }
}
