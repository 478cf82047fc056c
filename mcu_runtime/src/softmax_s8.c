/*
 * softmax_s8.c - softmax over a [n] vector with the exporter's exponential table (see
 * kdm_kernels.h). d = max - x is in 0 .. 255, e = lut[d] in 0 .. 65536 with lut[0] >= 1, so
 * the sum is in [1, 65535 * 65536] and 256 * e <= 2^24: everything fits uint32, and the
 * rounded quotient round(256 * e / sum) (half up) is in 0 .. 256 before the -128 offset.
 */
#include "kdm_kernels.h"

void kdm_softmax_s8(const int32_t *lut, int32_t act_min, int32_t act_max, const int8_t *in,
                    int8_t *out, int32_t n)
{
    int32_t mx = -128;
    for (int32_t i = 0; i < n; i++)
        mx = in[i] > mx ? in[i] : mx;
    uint32_t sum = 0;
    for (int32_t i = 0; i < n; i++)
        sum += (uint32_t)lut[mx - in[i]];
    for (int32_t i = 0; i < n; i++) {
        uint32_t num = 256u * (uint32_t)lut[mx - in[i]];
        uint32_t quo = num / sum, rem = num % sum;
        int32_t v = (int32_t)(quo + (rem >= sum - rem)) - 128;
        out[i] = (int8_t)(v < act_min ? act_min : v > act_max ? act_max : v);
    }
}
