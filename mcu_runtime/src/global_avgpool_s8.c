/*
 * global_avgpool_s8.c - global average pooling (see kdm_kernels.h): out[k] = the mean of channel
 * k over the h * w pixels, rounded half away from zero (kdm_div_round_), clamped. kdm_load
 * bounds h * w below 2^24, so the int32 sum cannot overflow (|sum| < 2^31) and kdm_div_round_
 * rounds its magnitude in 32 unsigned bits.
 *
 * The reference kernel reads one channel at a time. The DSP kernel, for maps of up to 256
 * pixels, takes four channels per word load: two SXTAB16 add channels (k, k + 2) and (k + 1,
 * k + 3) into 16-bit lanes (256 values of -128 .. 127 sum within -32768 .. 32512, so a lane
 * cannot wrap), 6 instructions per pixel and four channels on the Cortex-M4 where the reference
 * takes 6.5 per byte; larger maps and the last c % 4 channels go one channel at a time. The
 * sums are exact either way.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

void kdm_global_avgpool_s8_ref(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                               const int8_t *in, int8_t *out)
{
    for (int32_t k = 0; k < c; k++) {
        int32_t sum = 0;
        for (int32_t i = 0; i < hw; i++)
            sum += in[i * c + k];
        const int32_t v = kdm_div_round_(sum, hw);
        out[k] = (int8_t)(v < act_min ? act_min : v > act_max ? act_max : v);
    }
}

void kdm_global_avgpool_s8_dsp(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                               const int8_t *in, int8_t *out)
{
    const int32_t size = hw * c;
    for (int32_t k = 0, n; k < c; k += n) {
        uint32_t e = 0, o = 0; /* four channels: lanes (k, k + 2) and (k + 1, k + 3) */
        int32_t sum = 0;       /* one channel */
        n = k + 4 <= c && hw <= 256 ? 4 : 1;
        if (n == 4)
            for (int32_t at = k; at < size; at += c) {
                const uint32_t v = kdm_ld32(in + at);
                e = kdm_sxtab16(e, v);
                o = kdm_sxtab16_ror8(o, v);
            }
        else
            for (int32_t at = k; at < size; at += c)
                sum += in[at];
        for (int32_t i = 0; i < n; i++) {
            if (n == 4) { /* channel k + i in e's bottom lane: e, o = o, e >> 16 after each */
                const uint32_t t = e;
                sum = (int16_t)t;
                e = o;
                o = t >> 16;
            }
            const int32_t v = kdm_div_round_(sum, hw);
            out[k + i] = (int8_t)(v < act_min ? act_min : v > act_max ? act_max : v);
        }
    }
}
