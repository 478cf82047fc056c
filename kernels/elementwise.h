/*
 * elementwise.h - host-callable launchers for the elementwise CUDA kernels.
 *
 * Every pointer is device memory; every launcher queues work on `stream`
 * (a cudaStream_t passed as void * so C callers need no CUDA headers) and
 * returns KD_ERR_DEVICE with the CUDA error text when the launch fails. The
 * launchers that take int sizes refuse a negative one with KD_ERR_INVALID before
 * anything is queued; a size of 0 queues nothing.
 */
#ifndef KD_KERNELS_ELEMENTWISE_H
#define KD_KERNELS_ELEMENTWISE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* y = relu(x) (cap < 0) or min(max(x, 0), cap) */
kd_status kd_cuda_act_fwd(void *stream, size_t n, const float *x, float *y, float cap);
/* dx = dy where 0 < x < cap, else 0 */
kd_status kd_cuda_act_bwd(void *stream, size_t n, const float *x, const float *dy, float *dx,
                          float cap);
kd_status kd_cuda_add(void *stream, size_t n, const float *a, const float *b, float *y);
kd_status kd_cuda_mul(void *stream, size_t n, const float *a, const float *b, float *y);
/* dst[i, 0..cols) = src[idx[i], 0..cols) for i < n, rows of 4-byte words */
kd_status kd_cuda_gather_rows(void *stream, int n, int cols, const void *src, const uint32_t *idx,
                              void *dst);
/* x[i] rounded in place to the nearest bfloat16 (engine/bf16.h's rule), kept as float32 */
kd_status kd_cuda_round_bf16(void *stream, size_t n, float *x);
/* y[r, c] += bias[c] for a row-major [rows, cols] matrix */
kd_status kd_cuda_bias_rows(void *stream, int rows, int cols, const float *bias, float *y);
/* db[c] += sum_r dy[r, c] */
kd_status kd_cuda_bias_grad_rows(void *stream, int rows, int cols, const float *dy, float *db);
/* y[i, c, j] += bias[c] for an [n, c, hw] tensor (a convolution's bias) */
kd_status kd_cuda_bias_nchw(void *stream, int n, int c, int hw, const float *bias, float *y);
/* db[c] += sum over i, j of dy[i, c, j]; one block per channel, a fixed summation order */
kd_status kd_cuda_bias_grad_nchw(void *stream, int n, int c, int hw, const float *dy, float *db);
/*
 * Inverted dropout, the CPU op kd_cpu_dropout_fwd exactly: element i is dropped when
 * kd_mix64(seed, i, 0xD50F) >> 32 < p * 2^32 (engine/rng.c's stateless hash, so the GPU mask
 * is the CPU mask bit for bit); mask[i] = 0 or (float)(1 / (1 - p)), y = x * mask. The seed is
 * read from device memory (seed_dev) when the kernel runs, so a CUDA graph that recorded the
 * launch draws a new mask whenever the caller stores a new seed there.
 */
kd_status kd_cuda_dropout_fwd(void *stream, size_t n, const float *x, float *y, float *mask,
                              double p, const uint64_t *seed_dev);

/*
 * Batch assembly, data/augment.h's kd_augment_gather exactly: x_out[i] is sample idx[i] of
 * x_all ([*, c, h, w]) shifted by (params[3i], params[3i + 1]) (rounded to nearest even and
 * clamped to +-w, +-h as kd_augment_apply does) and mirrored when params[3i + 2] >= 0.5, fill
 * outside the image; y_out[i] = y_all[idx[i]]. One thread per output value: every load is a
 * plain read of the resident data set, so a step assembles its batch without the host.
 */
/* dst[i] += src[i], i < n, in double: the trainer's device-side loss and hit sums */
kd_status kd_cuda_add_f64(void *stream, int n, const double *src, double *dst);
kd_status kd_cuda_gather_augment(void *stream, int n, int c, int h, int w, const float *x_all,
                                 const int32_t *y_all, const uint32_t *idx, const float *params,
                                 float fill, float *x_out, int32_t *y_out);
#ifdef __cplusplus
}
#endif
#endif
