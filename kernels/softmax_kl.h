/*
 * softmax_kl.h - the fused softmax-KL distillation loss on the GPU (host-callable launchers).
 *
 * The same loss as the CPU op kd_cpu_kd_dense_* (engine/loss_kd_body.h, engine/loss_kd.md):
 * per row, with p^T = softmax(logits / T),
 *     forward  coef * KL(p_t^T || p_s^T),   reverse  coef * KL(p_s^T || p_t^T),
 * coef = T^2 when t2_scale else 1; the same -inf masking rules. One kernel reads the student
 * and teacher rows, computes both log-sum-exps, the row loss and the gradient
 * ds = scale * d(sum_rows loss / n)/ds; no softmax tensor is stored.
 *
 * Layout: s, t, ds are row-major [n, c] with rows contiguous; row_loss is [n] doubles.
 * Inputs are float32 or bfloat16 (both the same dtype); the gradient is written as float32 or
 * bfloat16 (ds_dtype; bfloat16 gradients are rounded from the float result). All math is in
 * float32 with the row's per-class terms taken relative to its own maximum.
 *
 * Variants (the `variant` argument; one kernel source, chosen at launch):
 *   KD_SKL_WARP   one warp per row, the row held in registers (c <= 1024), 16-byte vector
 *                 loads and stores when every row start is 16-byte aligned;
 *   KD_SKL_BLOCK  one 512-thread block per row for any c: each thread streams its part of the
 *                 row with an online (running max, rescaled sum) log-sum-exp, the partial
 *                 states merge across the block, a second sweep (L2-resident) writes ds;
 *   KD_SKL_AUTO   warp when c <= 1024, else block.
 *
 * Every pointer is device memory; work queues on `stream` (a cudaStream_t passed as void *).
 * Returns KD_ERR_INVALID for bad arguments, KD_ERR_DEVICE when the launch fails.
 */
#ifndef KD_KERNELS_SOFTMAX_KL_H
#define KD_KERNELS_SOFTMAX_KL_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { KD_SKL_F32 = 0, KD_SKL_BF16 = 1 };                    /* element types */
enum { KD_SKL_AUTO = 0, KD_SKL_WARP = 1, KD_SKL_BLOCK = 2 }; /* variants */

/* row_loss[i] = coef * KL of row i; ds (may be NULL) as described above */
kd_status kd_cuda_softmax_kl(void *stream, int n, int c, int in_dtype, const void *s, const void *t,
                             double temperature, int reverse, int t2_scale, void *ds, int ds_dtype,
                             double scale, double *row_loss, int variant);

/*
 * The same loss against top-k teacher targets: the CPU op kd_cpu_kd_topk_f32 (the tail-bucket
 * rule of engine/loss_kd.md), float32 only. s, ds [n, c]; tv [n, k] the teacher's top-k raw
 * logits, ti [n, k] their classes, t_lse [n] the teacher's full-row log-sum-exp at T = 1;
 * row_loss[i] = coef * (bucket KL of row i); ds (may be NULL) = scale * d(sum / n)/ds. One
 * block per row (kernels/softmax_kl_topk.cu) with a bitmap of the cached classes in shared
 * memory, so c is limited to 385024 classes (KD_ERR_UNSUPPORTED beyond). Repeated or out of
 * range indices (and k outside [1, c]) give the row a NaN loss and a zero gradient.
 */
kd_status kd_cuda_kd_topk(void *stream, int n, int c, int k, const float *s, const float *tv,
                          const int32_t *ti, const float *t_lse, double temperature, int reverse,
                          int t2_scale, float *ds, double scale, double *row_loss);

/*
 * Decoupled KD (kernels/dkd.cu): the CPU op kd_cpu_kd_dkd_f32 row by row in double, one thread
 * per row. s, t, ds [n, c], labels [n] on the device; row_loss[i] = the row's loss; ds (may be
 * NULL) = scale * d(sum / n)/ds. A label outside [0, c) gives its row a NaN loss and a zero
 * gradient.
 */
kd_status kd_cuda_dkd(void *stream, int n, int c, const float *s, const float *t,
                      const int32_t *labels, double temperature, double alpha, double beta,
                      int t2_scale, float *ds, double scale, double *row_loss);

/* *out = sum of x[0..n) (one block, a fixed order: deterministic) */
kd_status kd_cuda_sum_f64(void *stream, int n, const double *x, double *out);

#ifdef __cplusplus
}
#endif
#endif
