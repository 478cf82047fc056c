/*
 * optim_step.h - the optimizer update, gradient norm and clipping of engine/optim.h on the
 * GPU (host-callable launchers; kernels in optim_step.cu). Not named optim.h: both engine/
 * and kernels/ are on the include path, and a second optim.h would shadow the engine's.
 *
 * Semantics are engine/optim.c's exactly: SGD (momentum, nesterov) and AdamW (bias
 * correction) with decoupled weight decay p *= 1 - lr*wd where decay_mask[i] != 0 (everywhere
 * when the mask is NULL); the step-wide constants are computed on the host in double as
 * optim.c does, and the per-element float arithmetic is written with explicitly rounded
 * intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn) in optim.c's operation order, so
 * nvcc cannot fuse it into fmas: on x86-64, where the host compiler has no fma either, the
 * result is the CPU's bit for bit. Clipping follows kd_clip_grad_norm: norm accumulated in
 * double, g *= max_norm / (norm + 1e-6) when that is below 1, nothing when the norm is not
 * finite. The norm is summed in a fixed order (a fixed grid of KD_CUDA_NORM_PARTS blocks, then
 * one block), so it repeats exactly from run to run; it agrees with the CPU's to double
 * rounding.
 *
 * Memory: params, grads, state and the mask are device memory (the mask a device copy of the
 * host uint8 mask, uploaded once); state is laid out as kd_optim_state_floats() describes
 * ([momentum] for SGD, [m | v] for AdamW). The norm needs `scratch`, KD_CUDA_NORM_SCRATCH
 * device doubles owned by the caller; afterwards scratch[KD_CUDA_NORM_PARTS] holds the norm
 * (before clipping), so a caller that wants it can download it when convenient: nothing here
 * waits for the device. Work queues on `stream` (a cudaStream_t passed as void *). 16-byte
 * vector loads when the float buffers are 16-byte aligned.
 */
#ifndef KD_KERNELS_OPTIM_STEP_H
#define KD_KERNELS_OPTIM_STEP_H

#include <stddef.h>
#include <stdint.h>

#include "optim.h" /* engine/optim.h: kd_optim_cfg */
#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KD_CUDA_NORM_PARTS   256
#define KD_CUDA_NORM_SCRATCH (KD_CUDA_NORM_PARTS + 1)

/* scratch[KD_CUDA_NORM_PARTS] = sqrt(sum g^2) */
kd_status kd_cuda_grad_norm(void *stream, const float *g, size_t n, double *scratch);

/* the norm as above, then g *= max_norm / (norm + 1e-6) when below 1 (max_norm > 0) */
kd_status kd_cuda_clip_grad_norm(void *stream, float *g, size_t n, double max_norm,
                                 double *scratch);

/* one SGD update (c->kind == KD_OPTIM_SGD); buf: n floats, unused (may be NULL) without momentum */
kd_status kd_cuda_sgd_step(void *stream, const kd_optim_cfg *c, float *params, const float *grads,
                           float *buf, const uint8_t *decay_mask, size_t n, double lr);

/* one AdamW update (c->kind == KD_OPTIM_ADAMW); state: 2n floats [m | v]; step is 1-based */
kd_status kd_cuda_adamw_step(void *stream, const kd_optim_cfg *c, float *params, const float *grads,
                             float *state, const uint8_t *decay_mask, size_t n, double lr,
                             int64_t step);

/*
 * The trainer's whole update: validates like kd_optim_step (KD_ERR_CONFIG / KD_ERR_INVALID),
 * clips grads in place when c->clip_norm > 0 (scratch needed then; else it may be NULL), then
 * runs the optimizer's step.
 */
kd_status kd_cuda_optim_step(void *stream, const kd_optim_cfg *c, float *params, float *grads,
                             float *state, const uint8_t *decay_mask, size_t n, double lr,
                             int64_t step, double *scratch);

#ifdef __cplusplus
}
#endif
#endif
