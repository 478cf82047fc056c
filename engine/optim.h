/*
 * optim.h - optimizers, learning-rate schedules and gradient clipping.
 *
 * Everything works on one flat float32 buffer: all parameters of a model are
 * contiguous, and so are their gradients and the optimizer state, so one call
 * updates the whole model. The update rules follow PyTorch (torch.optim.SGD
 * with dampening 0, torch.optim.AdamW with amsgrad off) so that a run here and
 * a run there can be compared number for number. The one deliberate
 * difference: weight decay is decoupled for SGD too (p *= 1 - lr*wd before the
 * gradient update, as AdamW does) rather than torch.optim.SGD's coupled
 * g += wd*p.
 *
 * Invariants: the state buffer holds kd_optim_state_floats() floats laid out
 * as [momentum] for SGD and [m | v] for AdamW, and is all zeros before the
 * first step; it is plain data, so a checkpoint can store it as it is.
 */
#ifndef KD_OPTIM_H
#define KD_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KD_OPTIM_SGD, KD_OPTIM_ADAMW } kd_optim_kind;
typedef enum { KD_SCHED_CONSTANT, KD_SCHED_STEP, KD_SCHED_COSINE } kd_sched_kind;

typedef struct {
    kd_optim_kind kind;
    double lr;                /* peak learning rate */
    double momentum;          /* SGD, in [0, 1) */
    int nesterov;             /* SGD, needs momentum > 0 */
    double beta1, beta2, eps; /* AdamW (defaults 0.9, 0.999, 1e-8) */
    /*
     * Decoupled, for both optimizers: p *= 1 - lr*wd before the gradient
     * update, only where decay_mask[i] != 0 (everywhere if the mask is NULL).
     */
    double weight_decay;
    /*
     * > 0: the caller clips with kd_clip_grad_norm(grads, n, clip_norm) before
     * kd_optim_step (which takes the gradients read-only); 0 disables.
     */
    double clip_norm;
} kd_optim_cfg;

typedef struct {
    kd_sched_kind kind;
    /*
     * Linear warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps,
     * so the first step uses lr / warmup_steps and step warmup_steps - 1 the
     * full lr. 0 disables warm-up.
     */
    int64_t warmup_steps;
    /*
     * Cosine: with t = step - warmup_steps and T = total_steps - warmup_steps,
     * min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2, so step
     * warmup_steps has lr and every step >= total_steps has min_lr.
     */
    int64_t total_steps;
    double min_lr;     /* cosine floor, default 0 */
    int64_t step_size; /* step: lr * gamma^floor((step - warmup_steps) / step_size) */
    double gamma;
} kd_sched_cfg;

/* Defaults: lr 1e-3, momentum 0.9 for SGD, betas (0.9, 0.999), eps 1e-8, no decay, no clip. */
kd_optim_cfg kd_optim_cfg_default(kd_optim_kind kind);
/* Defaults: constant lr, no warm-up, min_lr 0, gamma 0.1, step_size 1. */
kd_sched_cfg kd_sched_cfg_default(kd_sched_kind kind);

/* Learning rate for the 0-based step; negative steps count as step 0. */
double kd_sched_lr(const kd_sched_cfg *s, double base_lr, int64_t step);

/*
 * Rejects negative warm-up, a step schedule without step_size > 0 and
 * gamma > 0, and a cosine schedule with total_steps <= warmup_steps or
 * min_lr outside [0, base_lr].
 */
kd_status kd_sched_cfg_check(const kd_sched_cfg *s, double base_lr);

/* SGD with momentum: n; without: 0; AdamW: 2n. */
size_t kd_optim_state_floats(const kd_optim_cfg *c, size_t nparams);

/*
 * Global L2 norm of g, accumulated in double. The summation order depends
 * only on n, never on the thread count, so the result is reproducible.
 */
double kd_grad_global_norm(const float *g, size_t n);

/*
 * Scale g in place by max_norm / (norm + 1e-6) when that factor is below 1,
 * exactly as torch.nn.utils.clip_grad_norm_; max_norm <= 0 disables. Returns
 * the norm before clipping. A non-finite norm leaves g untouched (scaling would only spread
 * NaN): the caller should check the result and skip the step.
 */
double kd_clip_grad_norm(float *g, size_t n, double max_norm);

/*
 * One update. step is the 1-based count of updates including this one
 * (AdamW bias correction). state has kd_optim_state_floats() floats, zeroed
 * before the first step. decay_mask may be NULL (decay everything). lr is
 * the scheduled rate for this step (kd_sched_lr), finite and >= 0.
 */
kd_status kd_optim_step(const kd_optim_cfg *c, float *params, const float *grads, float *state,
                        const uint8_t *decay_mask, size_t n, double lr, int64_t step);

/*
 * Rejects lr <= 0, momentum outside [0,1), betas outside [0,1), eps <= 0,
 * lr, wd or eps beyond float32's range (eps also below its smallest value),
 * wd < 0, nesterov without momentum and a negative clip_norm
 * (KD_ERR_CONFIG, with a message naming the field and its value).
 */
kd_status kd_optim_cfg_check(const kd_optim_cfg *c);

/* kd_optim_cfg_check, and on a KD_ERR_CONFIG failure the config key it is about ("lr",
 * "momentum", ...) in *key (NULL when there is none); key may be NULL. */
kd_status kd_optim_cfg_check_key(const kd_optim_cfg *c, const char **key);

#ifdef __cplusplus
}
#endif
#endif
