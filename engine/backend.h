/*
 * backend.h - the table of primitive operations a model runs on (internal).
 *
 * Layers call these slots and never know which backend runs them. The CPU
 * backend fills every slot with the float instantiation of cpu_ops; the CUDA
 * backend fills the slots it implements and leaves the rest NULL, and
 * kd_backend_missing() names the first empty slot a model would need, so an
 * unfinished backend is refused (or, with device: auto, the CPU is used)
 * before any work starts.
 *
 * Operations return nothing: a backend that can fail asynchronously (CUDA)
 * keeps the first error and reports it from sync() or the next download, which
 * the trainer does once per log interval. All pointers given to an operation live on the backend's
 * device.
 */
#ifndef KD_BACKEND_H
#define KD_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "cpu_ops.h"
#include "optim.h"
#include "status.h"
#include "tensor.h"

typedef struct kd_backend {
    const char *name;
    kd_device device;

    kd_status (*alloc)(void **p, size_t bytes); /* zero-filled; KD_ERR_NOMEM when it does not fit */
    void (*release)(void *p);
    kd_status (*upload)(void *dst, const void *src, size_t bytes);   /* host -> device */
    kd_status (*download)(void *dst, const void *src, size_t bytes); /* device -> host */
    kd_status (*zero)(void *dst, size_t bytes);
    kd_status (*sync)(void); /* waits for queued work; returns the first error */

    void (*linear_fwd)(int n, int in, int out, const float *x, const float *w, const float *b,
                       float *y);
    void (*linear_bwd)(int n, int in, int out, const float *x, const float *w, const float *dy,
                       float *dx, float *dw, float *db);
    size_t (*conv2d_ws)(const kd_conv_shape *s);
    void (*conv2d_fwd)(const kd_conv_shape *s, const float *x, const float *w, const float *b,
                       float *y, float *ws);
    void (*conv2d_bwd)(const kd_conv_shape *s, const float *x, const float *w, const float *dy,
                       float *dx, float *dw, float *db, float *ws);
    /* batch norm with an optional fused activation (cap: 0 none, < 0 relu, > 0 relu-cap) */
    void (*bn_fwd_train)(int n, int c, int hw, const float *x, const float *gamma,
                         const float *beta, float *y, float *save_mean, float *save_invstd,
                         float *run_mean, float *run_var, double momentum, double eps, double cap);
    void (*bn_fwd_eval)(int n, int c, int hw, const float *x, const float *gamma, const float *beta,
                        const float *run_mean, const float *run_var, float *y, double eps,
                        double cap);
    void (*bn_bwd)(int n, int c, int hw, const float *x, const float *dy, const float *gamma,
                   const float *save_mean, const float *save_invstd, const float *y, double cap,
                   float *dx, float *dgamma, float *dbeta);
    void (*act_fwd)(size_t n, const float *x, float *y, double cap);
    void (*act_bwd)(size_t n, const float *x, const float *dy, float *dx, double cap);
    void (*maxpool_fwd)(const kd_pool_shape *p, const float *x, float *y, int32_t *arg);
    void (*maxpool_bwd)(const kd_pool_shape *p, const float *dy, const int32_t *arg, float *dx);
    void (*avgpool_fwd)(const kd_pool_shape *p, const float *x, float *y);
    void (*avgpool_bwd)(const kd_pool_shape *p, const float *dy, float *dx);
    void (*gap_fwd)(int n, int c, int hw, const float *x, float *y);
    void (*gap_bwd)(int n, int c, int hw, const float *dy, float *dx);
    /* seed: one uint64 in the backend's memory, read when the operation runs (so recorded
       work, see graph_begin, uses whatever the caller has stored there since) */
    void (*dropout_fwd)(size_t n, const float *x, float *y, float *mask, double p,
                        const uint64_t *seed);
    void (*mul)(size_t n, const float *a, const float *b, float *y);
    void (*add)(size_t n, const float *a, const float *b, float *y);
    void (*copy)(size_t n, const float *src, float *dst);
    /* x[i] rounded in place to the nearest bfloat16, ties to even, kept as float32 (the low 16
       bits become 0): kd_round_bf16 (engine/bf16.h) element by element */
    void (*round_bf16)(size_t n, float *x);
    /*
     * The losses report their sums in one of two ways. acc == NULL: the sum is returned (and
     * ce's hit count stored in *correct), which waits for the device. acc != NULL (device
     * memory, doubles): the sums are added there instead and nothing waits (the return value is
     * 0, *correct untouched): ce adds its loss sum to acc[0] and its hit count to acc[1], the
     * kd losses their sum to acc[0]; the trainer reads acc back once per log interval.
     */
    /* summed cross-entropy; dlogits = scale * d(mean)/dlogits; labels on the device */
    double (*ce)(int n, int c, const float *logits, const int32_t *labels, double smoothing,
                 float *dlogits, double scale, int64_t *correct, double *acc);
    /* distillation loss coef * KL(.. || ..) at a temperature (engine/loss_kd.md): summed row
       losses; ds = scale * d(sum / n)/ds when ds != NULL. kd_topk takes the teacher as top-k
       raw logits tv [N, K], their classes ti [N, K] and full-row log-sum-exps t_lse [N]. */
    double (*kd_dense)(int n, int c, const float *s, const float *t, double temperature,
                       int reverse, int t2_scale, float *ds, double scale, double *acc);
    double (*kd_topk)(int n, int c, int k, const float *s, const float *tv, const int32_t *ti,
                      const float *t_lse, double temperature, int reverse, int t2_scale, float *ds,
                      double scale, double *acc);
    /* decoupled KD (the `dkd` term, loss_kd_body.h) of student s against teacher rows t with the
       labels (device int32): the summed row losses, and ds = scale * d(sum / n)/ds when ds */
    double (*kd_dkd)(int n, int c, const float *s, const float *t, const int32_t *labels,
                     double temperature, double alpha, double beta, int t2_scale, float *ds,
                     double scale, double *acc);
    /*
     * Batch assembly where the data set lives: x_out[i] = sample idx[i] of x_all ([*, c, h,
     * w]) augmented by params[i * KD_AUG_NPARAMS ..], y_out[i] = y_all[idx[i]] (y_out may be
     * NULL): data/augment.h's kd_augment_gather, which the CPU backend is. Every pointer is
     * device memory and every idx[i] indexes x_all (the caller checks).
     */
    void (*gather_augment)(int n, int c, int h, int w, const float *x_all, const int32_t *y_all,
                           const uint32_t *idx, const float *params, float fill, float *x_out,
                           int32_t *y_out);
    /* dst[i, 0..cols) = src[idx[i], 0..cols) for i < n: rows of 4-byte words (float or int32),
       every pointer device memory; the teacher cache held on the device is read this way */
    void (*gather_rows)(int n, int cols, const void *src, const uint32_t *idx, void *dst);
    /*
     * The whole optimizer update on the backend's device, so parameters, gradients and state
     * never travel to the host (every backend fills it; the trainer calls nothing else). It
     * validates like kd_optim_step, clips grads in place first when c->clip_norm > 0
     * (kd_clip_grad_norm's rule), then applies kd_optim_step's update; step is 1-based.
     * params, grads, state (kd_optim_state_floats() floats) and decay_mask are device memory:
     * decay_mask is a device copy of the model's host uint8 mask (uploaded once), or NULL to
     * decay everything. Bad arguments are returned at once; a device failure is returned when
     * the launch fails or else kept for sync(). Nothing waits for the device.
     */
    kd_status (*optim_step)(const kd_optim_cfg *c, float *params, float *grads, float *state,
                            const uint8_t *decay_mask, size_t n, double lr, int64_t step);
    /*
     * Recorded work (CUDA graphs; NULL on a backend without them). graph_begin starts
     * recording: the operations queued from then on are kept instead of run. graph_end stops
     * and, on success, gives *g, an executable record of them that has not run yet;
     * graph_launch runs it (each time with the pointers and scalar arguments recorded, so it
     * replays work whose inputs change only in device memory). A recording that fails (an
     * operation that cannot be recorded, or any error while recording) returns the reason
     * and leaves *g NULL: none of the recorded work ran, and the backend goes on as before,
     * so the caller queues the same work again to run it. graph_free releases a record. While
     * a record exists the backend frees none of its own scratch buffers (one it outgrows is
     * kept until the last record is released), since a record may still use it.
     */
    kd_status (*graph_begin)(void);
    kd_status (*graph_end)(void **g);
    kd_status (*graph_launch)(void *g);
    void (*graph_free)(void *g);
} kd_backend;

/* The CPU backend: always available. */
const kd_backend *kd_backend_cpu(void);

/*
 * The CUDA backend, or NULL when distill was built without CUDA or no device
 * answers; *why then says which (for the log line of device: auto).
 */
const kd_backend *kd_backend_cuda(const char **why);

/*
 * Ask the CUDA backend to run on device (index mod the number of visible devices) when it
 * first initializes, i.e. on the first kd_backend_cuda() call. A data-parallel job calls it
 * with its rank's local_rank (engine/comm.h) before picking the backend, so the ranks on
 * one host spread over its devices; CUDA_VISIBLE_DEVICES still decides which devices are
 * visible. A negative index, or no call at all, keeps the CUDA runtime's current device
 * (device 0 unless the process changed it). Calls after the backend has initialized change
 * nothing. A no-op in builds without CUDA.
 */
void kd_backend_cuda_prefer_device(int index);

/*
 * The stream every CUDA backend operation is queued on (a cudaStream_t, created with
 * cudaStreamNonBlocking, so it does not synchronize with the legacy default stream), or
 * NULL before the backend has initialized and in builds without CUDA. Code that queues
 * device work of its own (the NCCL communicator, engine/comm_nccl.c) orders it against
 * the backend's through events on this stream.
 */
void *kd_backend_cuda_stream(void);

/* Name of the first operation slot in `needed` (comma-separated) that be lacks, or NULL. */
const char *kd_backend_missing(const kd_backend *be, const char *needed);

#endif
