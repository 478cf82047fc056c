/*
 * pool.h - max, average and global average pooling on the GPU (host-callable launchers).
 *
 * The same operations as the CPU ops kd_cpu_{maxpool,avgpool,gap}_* (engine/cpu_ops.h):
 *   maxpool  window k x k, stride, zero-free padding (padded taps are skipped); arg [N, C, Ho,
 *            Wo] holds the winning offset iy * W + ix within the input plane: the first tap in
 *            (ky, kx) order wins a tie, and a window with no input tap gives -inf and -1;
 *   avgpool  the window's sum over its input taps times 1 / (k * k): padding counts in the
 *            divisor (PyTorch's count_include_pad default);
 *   gap      x [N, C, HW] -> y [N, C], the plane's mean.
 * Backward passes write dx (=). They gather rather than scatter: a thread per input element
 * adds the gradients of the outputs whose window covers it, in increasing output order, which
 * is the CPU's order of accumulation; maxpool/avgpool forward and backward and gap backward
 * are therefore bit-identical to the CPU op, gap forward (a warp per plane) agrees to float
 * rounding.
 *
 * Every pointer is device memory; work queues on `stream` (a cudaStream_t passed as void *).
 * Returns KD_ERR_INVALID for a bad shape, KD_ERR_DEVICE when a launch fails.
 */
#ifndef KD_KERNELS_POOL_H
#define KD_KERNELS_POOL_H

#include <stdint.h>

#include "cpu_ops.h" /* kd_pool_shape */
#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

kd_status kd_cuda_maxpool_fwd(void *stream, const kd_pool_shape *p, const float *x, float *y,
                              int32_t *arg);
kd_status kd_cuda_maxpool_bwd(void *stream, const kd_pool_shape *p, const float *dy,
                              const int32_t *arg, float *dx);
kd_status kd_cuda_avgpool_fwd(void *stream, const kd_pool_shape *p, const float *x, float *y);
kd_status kd_cuda_avgpool_bwd(void *stream, const kd_pool_shape *p, const float *dy, float *dx);
kd_status kd_cuda_gap_fwd(void *stream, int n, int c, int hw, const float *x, float *y);
kd_status kd_cuda_gap_bwd(void *stream, int n, int c, int hw, const float *dy, float *dx);

#ifdef __cplusplus
}
#endif
#endif
