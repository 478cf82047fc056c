/*
 * rng.h - deterministic random numbers.
 *
 * kd_rng is a small PCG32 generator whose whole state is two uint64 words, so
 * a checkpoint can store it and a resumed run draws the same numbers.
 * kd_mix64 is a stateless hash for counter-based draws: the value for
 * (seed, epoch, index) never depends on what was drawn before, which is what
 * makes shuffling and augmentation reproducible across resumes and ranks.
 */
#ifndef KD_RNG_H
#define KD_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t state;
    uint64_t inc;
} kd_rng;

/* Seed a generator; different streams give independent sequences. */
void kd_rng_seed(kd_rng *r, uint64_t seed, uint64_t stream);
uint32_t kd_rng_u32(kd_rng *r);
/* Uniform in [0, 1). */
float kd_rng_uniform(kd_rng *r);
/* Standard normal (Box-Muller). */
float kd_rng_normal(kd_rng *r);
/* Uniform integer in [0, n) without modulo bias; n > 0. */
uint32_t kd_rng_below(kd_rng *r, uint32_t n);

/* SplitMix64-style finaliser over a combination of three words. */
uint64_t kd_mix64(uint64_t a, uint64_t b, uint64_t c);

#endif
