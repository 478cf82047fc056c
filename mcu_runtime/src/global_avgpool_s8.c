/*
 * global_avgpool_s8.c - global average pooling (see kdm_kernels.h): out[k] = the mean of channel
 * k over the h * w pixels, rounded half away from zero (kdm_div_round_), clamped. kdm_load
 * bounds h * w below 2^24, so the int32 sum and the rounding cannot overflow.
 */
#include "kdm_kernels.h"

void kdm_global_avgpool_s8(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                           const int8_t *in, int8_t *out)
{
    for (int32_t k = 0; k < c; k++) {
        int32_t sum = 0;
        for (int32_t i = 0; i < hw; i++)
            sum += in[i * c + k];
        int32_t v = kdm_div_round_(sum, hw);
        out[k] = (int8_t)(v < act_min ? act_min : v > act_max ? act_max : v);
    }
}
