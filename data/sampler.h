/*
 * sampler.h - per-epoch shuffling.
 *
 * The order of an epoch is a pure function of (seed, epoch): a resumed run
 * and every rank of a distributed run compute the same permutation without
 * sharing any generator state.
 */
#ifndef KD_SAMPLER_H
#define KD_SAMPLER_H

#include <stdint.h>

/* Write a permutation of 0..n-1 into perm[0..n), determined by (seed, epoch) alone. */
void kd_epoch_permutation(uint32_t *perm, uint32_t n, uint64_t seed, uint64_t epoch);

#endif
