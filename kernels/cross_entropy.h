/*
 * cross_entropy.h - cross-entropy with label smoothing on the GPU (host-callable launcher).
 *
 * The CPU op kd_cpu_ce (engine/cpu_ops.h) row by row: with q = (1 - eps) onehot(y) + eps / C,
 *     row_loss[i] = -sum_j q_j log softmax(z_i)_j
 *     dlogits[i, j] = scale / n * (softmax(z_i)_j - q_j)          (when dlogits != NULL)
 *     row_hit[i] = 1 when the first maximal logit is the label, else 0.
 * Like the CPU op the log-sum-exp, the losses and the gradient are computed in double from
 * the float logits (the gradient is rounded to float at the end). The caller sums row_loss and
 * row_hit (kd_cuda_sum_f64 in kernels/softmax_kl.h: a fixed order). A label outside [0, C)
 * gives its row a NaN loss, no hit and a zero gradient (the CPU op does not check).
 *
 * One warp per row (rows contiguous, [n, c]). Every pointer is device memory; labels are
 * int32; work queues on `stream` (a cudaStream_t passed as void *). Returns KD_ERR_INVALID
 * for bad arguments, KD_ERR_DEVICE when the launch fails.
 */
#ifndef KD_KERNELS_CROSS_ENTROPY_H
#define KD_KERNELS_CROSS_ENTROPY_H

#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

kd_status kd_cuda_ce(void *stream, int n, int c, const float *logits, const int32_t *labels,
                     double smoothing, float *dlogits, double scale, double *row_loss,
                     double *row_hit);

#ifdef __cplusplus
}
#endif
#endif
