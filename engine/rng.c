/*
 * rng.c - PCG32 (O'Neill's XSH-RR variant) and a 64-bit mixing hash.
 */
#include "rng.h"

#include <math.h>

void kd_rng_seed(kd_rng *r, uint64_t seed, uint64_t stream)
{
    r->state = 0;
    r->inc = (stream << 1u) | 1u;
    (void)kd_rng_u32(r);
    r->state += seed;
    (void)kd_rng_u32(r);
}

uint32_t kd_rng_u32(kd_rng *r)
{
    uint64_t old = r->state;
    r->state = old * 6364136223846793005ULL + r->inc;
    uint32_t xorshifted = (uint32_t)(((old >> 18u) ^ old) >> 27u);
    uint32_t rot = (uint32_t)(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
}

float kd_rng_uniform(kd_rng *r) { return (float)(kd_rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

float kd_rng_normal(kd_rng *r)
{
    float u1 = ((float)(kd_rng_u32(r) >> 8) + 0.5f) * (1.0f / 16777216.0f);
    float u2 = kd_rng_uniform(r);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530718f * u2);
}

uint32_t kd_rng_below(kd_rng *r, uint32_t n)
{
    uint32_t threshold = (uint32_t)(-n) % n;
    for (;;) {
        uint32_t x = kd_rng_u32(r);
        if (x >= threshold)
            return x % n;
    }
}

uint64_t kd_mix64(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t z = a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL) * 0xC2B2AE3D27D4EB4FULL ^
                 (c + 0x165667B19E3779F9ULL) * 0xFF51AFD7ED558CCDULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
