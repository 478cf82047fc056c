/*
 * global_avgpool_s8.c - global average pooling (see kdm_kernels.h): out[k] = the mean of channel
 * k over the h * w pixels, rounded half away from zero (kdm_div_round_), clamped. kdm_load
 * bounds h * w below 2^24, so the int32 sum and the rounding cannot overflow.
 *
 * Up to 256 pixels, four channels at a time: one word load per pixel and two SXTAB16 add
 * channels (k, k + 2) and (k + 1, k + 3) into 16-bit lanes (256 values of -128 .. 127 sum within
 * -32768 .. 32512, so a lane cannot wrap): 6 instructions per pixel and four channels on the
 * Cortex-M4, where reading channel by channel took 6.5 per byte. Larger maps and the last
 * c % 4 channels are summed one channel at a time. The sums are exact either way. Arm cores
 * without the DSP extension (Cortex-M0+) only take the channel loop, which is smaller and faster
 * there than the SXTAB16 emulation; hosts run the emulation so that the tests cover that path.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

#if (defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP) || !defined(__arm__)
#define GAP_LANES 1
#else
#define GAP_LANES 0
#endif

void kdm_global_avgpool_s8(int32_t c, int32_t hw, int32_t act_min, int32_t act_max,
                           const int8_t *in, int8_t *out)
{
    for (int32_t k = 0, n; k < c; k += n) {
        const int8_t *p = in + k, *const end = p + hw * c;
        uint32_t e = 0, o = 0; /* four channels: lanes (k, k + 2) and (k + 1, k + 3) */
        int32_t sum = 0;       /* one channel */
        n = GAP_LANES && k + 4 <= c && hw <= 256 ? 4 : 1;
        if (n == 4)
            for (; p != end; p += c) {
                const uint32_t v = kdm_ld32(p);
                e = kdm_sxtab16(e, v);
                o = kdm_sxtab16_ror8(o, v);
            }
        else
            for (; p != end; p += c)
                sum += *p;
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
