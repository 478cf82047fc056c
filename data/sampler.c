/*
 * sampler.c - Fisher-Yates over a generator seeded from (seed, epoch).
 *
 * The generator is created fresh for every call, so no state leaks from one
 * epoch into the next. Its stream differs from the augmentation stream: the
 * augmentation seed for sample index 0x5eed would otherwise coincide with
 * this one.
 */
#include "sampler.h"

#include "rng.h"

#define KD_SAMPLER_STREAM 0x5a3d1e5ULL

void kd_epoch_permutation(uint32_t *perm, uint32_t n, uint64_t seed, uint64_t epoch)
{
    if (n == 0)
        return;
    for (uint32_t i = 0; i < n; i++)
        perm[i] = i;
    kd_rng r;
    kd_rng_seed(&r, kd_mix64(seed, epoch, 0x5eed), KD_SAMPLER_STREAM);
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = kd_rng_below(&r, i + 1);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}
