/*
 * avgpool_s8.c - 2-D average pooling without padding (see kdm_kernels.h): the mean of the
 * kernel_h x kernel_w window, rounded half away from zero as TFLite does
 * (kdm_div_round_), clamped. kdm_load bounds the
 * window below 2^24 values, so the int32 sum cannot overflow (|sum| < 2^31) and kdm_div_round_
 * rounds its magnitude in 32 unsigned bits.
 */
#include "kdm_kernels.h"

void kdm_avgpool_s8(const kdm_conv_params *p, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out)
{
    int32_t count = p->kernel_h * p->kernel_w;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int8_t *base = in + (oy * p->stride * p->in_w + ox * p->stride) * p->in_c;
            int8_t *o = out + (oy * p->out_w + ox) * p->in_c;
            for (int32_t c = 0; c < p->in_c; c++) {
                int32_t sum = 0;
                for (int32_t y = 0; y < p->kernel_h; y++)
                    for (int32_t x = 0; x < p->kernel_w; x++)
                        sum += base[(y * p->in_w + x) * p->in_c + c];
                int32_t v = kdm_div_round_(sum, count);
                o[c] = (int8_t)(v < act_min ? act_min : v > act_max ? act_max : v);
            }
        }
    }
}
