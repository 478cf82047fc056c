/*
 * batchnorm.h - batch normalization with an optional fused activation on the GPU
 * (host-callable launchers).
 *
 * The same operation as the CPU ops kd_cpu_bn_* (engine/cpu_ops.h, engine/cpu_ops_body.h):
 * statistics per channel over N and HW; training normalizes with the biased variance, saves
 * mean and 1/sqrt(var + eps) (save_mean, save_invstd) and, when run_mean != NULL, updates the
 * running stats with PyTorch's rule (unbiased variance into run_var); the activation cap is
 * 0 none, < 0 relu, > 0 min(relu, cap). Numerics follow the CPU definition: sums of x - pivot
 * (pivot = the channel's first value) in float per thread and in double across threads,
 * mean/var/invstd and the per-channel scale and shift in double, y = x * scale + shift in
 * float without contraction (so eval mode, whose scale and shift come from the same inputs,
 * is expected to match the CPU bit for bit on x86-64).
 *
 * Layout: x, y, dy, dx [N, C, HW] contiguous; gamma, beta, save_*, run_* [C]. Training and
 * backward run one block per channel (the statistics and the pass that uses them in one
 * launch); eval runs a 2-D grid (channel, slice). 16-byte loads and stores when HW % 4 == 0
 * and the tensors are 16-byte aligned. Every pointer is device memory; work queues on
 * `stream` (a cudaStream_t passed as void *). Returns KD_ERR_INVALID for bad sizes,
 * KD_ERR_DEVICE when a launch fails.
 */
#ifndef KD_KERNELS_BATCHNORM_H
#define KD_KERNELS_BATCHNORM_H

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

kd_status kd_cuda_bn_fwd_train(void *stream, int n, int c, int hw, const float *x,
                               const float *gamma, const float *beta, float *y, float *save_mean,
                               float *save_invstd, float *run_mean, float *run_var, double momentum,
                               double eps, double cap);

kd_status kd_cuda_bn_fwd_eval(void *stream, int n, int c, int hw, const float *x,
                              const float *gamma, const float *beta, const float *run_mean,
                              const float *run_var, float *y, double eps, double cap);

/* dgamma, dbeta accumulate (+=); dx (may be NULL) is written; y is read only when cap != 0 */
kd_status kd_cuda_bn_bwd(void *stream, int n, int c, int hw, const float *x, const float *dy,
                         const float *gamma, const float *save_mean, const float *save_invstd,
                         const float *y, double cap, float *dx, float *dgamma, float *dbeta);

#ifdef __cplusplus
}
#endif
#endif
