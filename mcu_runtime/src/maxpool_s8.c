/*
 * maxpool_s8.c - 2-D max pooling (see kdm_kernels.h). The window of output (oy, ox) is clipped
 * to the input, so padding is skipped and the work per output is the clipped window only;
 * kdm_load's pad < kernel guarantees a clipped window is never empty.
 */
#include "kdm_kernels.h"

void kdm_maxpool_s8(const kdm_conv_params *p, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out)
{
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        int32_t y0 = oy * p->stride - p->pad, y1 = y0 + p->kernel_h;
        y0 = y0 < 0 ? 0 : y0;
        y1 = y1 > p->in_h ? p->in_h : y1;
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            int32_t x0 = ox * p->stride - p->pad, x1 = x0 + p->kernel_w;
            x0 = x0 < 0 ? 0 : x0;
            x1 = x1 > p->in_w ? p->in_w : x1;
            int8_t *o = out + (oy * p->out_w + ox) * p->in_c;
            for (int32_t c = 0; c < p->in_c; c++) {
                int32_t m = -128;
                for (int32_t y = y0; y < y1; y++)
                    for (int32_t x = x0; x < x1; x++) {
                        int32_t v = in[(y * p->in_w + x) * p->in_c + c];
                        m = v > m ? v : m;
                    }
                m = m < act_min ? act_min : m > act_max ? act_max : m;
                o[c] = (int8_t)m;
            }
        }
    }
}
