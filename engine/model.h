/*
 * model.h - a network as a trunk of blocks (internal to the engine).
 *
 * A model is built once from its YAML definition for a maximum batch size:
 * parameters, gradients, optimiser state and running statistics each live in
 * one contiguous buffer described by one table (PyTorch state_dict names,
 * shapes, offsets), and every activation, saved statistic and gradient lives
 * in one arena sized at build time. Nothing is allocated during a step.
 *
 * Per-sample shapes are [C, H, W] (ndim 3) or [F] (ndim 1); a batch adds N in
 * front. Parameter names follow nn.Sequential: "3.weight", "5.body.1.bias",
 * "5.proj.0.weight"; conv weights are OIHW, linear weights [out, in].
 */
#ifndef KD_MODEL_H
#define KD_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "config_yaml.h"
#include "status.h"

typedef enum {
    KD_L_LINEAR,
    KD_L_CONV2D,
    KD_L_BATCHNORM,
    KD_L_RELU,
    KD_L_RELU6,
    KD_L_MAXPOOL,
    KD_L_AVGPOOL,
    KD_L_GAP,
    KD_L_FLATTEN,
    KD_L_DROPOUT,
    KD_L_RESIDUAL,
    KD_L_COUNT_
} kd_layer_kind;

typedef struct kd_block kd_block;
struct kd_block {
    kd_layer_kind kind;
    char name[64];   /* state_dict prefix: "3", "5.body.1" */
    char where[192]; /* "file:line:col" of its definition, for messages */
    char tap[32];    /* "" when untapped */
    int in_ndim, out_ndim;
    int in[3], out[3]; /* per-sample shapes */
    size_t in_numel, out_numel;
    /* hyper-parameters */
    int features, kernel, stride, pad, groups, has_bias;
    double eps, momentum, p;
    /* parameter offsets (floats) into the model's parameter buffer; SIZE_MAX if absent */
    size_t w_off, b_off, w_numel, b_numel;
    size_t rm_off, rv_off; /* batchnorm running stats in the buffer array */
    int64_t bn_batches;    /* num_batches_tracked */
    /* fusion: a batchnorm followed by relu/relu6 applies the activation itself (fuse_cap:
     * 0 none, -1 relu, 6 relu6) and the activation block only shares its buffers (fused) */
    double fuse_cap;
    int fused;
    int seed_slot;     /* dropout: its entry in the model's seeds_dev */
    int params_before; /* some block before this one in its trunk has parameters */
    /* activations: y and dy are [N, out] */
    float *y, *dy;
    float *save_a, *save_b; /* batchnorm mean / invstd; dropout mask in save_a */
    int32_t *arg;           /* maxpool winners */
    /* residual: y = body(x) + (proj ? proj(x) : x) */
    kd_block *body, *proj;
    int nbody, nproj;
    float *dx_body, *dx_proj; /* [N, in] scratch for the two input gradients */
};

typedef enum { KD_ENTRY_PARAM, KD_ENTRY_BUFFER, KD_ENTRY_COUNTER } kd_entry_kind;

/* One row of the state table. */
typedef struct {
    char name[96];
    kd_entry_kind kind;
    int ndim;
    int64_t shape[4];
    size_t offset; /* floats into params/grads (PARAM) or buffers (BUFFER) */
    size_t numel;
    int decay;        /* weight decay applies (weights of conv/linear) */
    int64_t *counter; /* COUNTER: the bn_batches it stands for */
} kd_state_entry;

typedef struct kd_model {
    const kd_backend *be;
    kd_block *blocks;
    int nblocks;
    int in_ndim, in[3];
    size_t in_numel;
    int out_features;
    int max_batch;
    size_t nparams, nbuffers;
    float *params, *grads, *buffers; /* on the backend's device */
    uint8_t *decay_mask;             /* host, nparams */
    kd_state_entry *entries;
    int nentries;
    float *arena;
    size_t arena_floats;
    float *ws;
    size_t ws_floats;
    uint64_t def_hash; /* hash of the architecture (layer kinds, shapes, hyper-parameters) */
    char desc[64];     /* "model.yaml" or "inline" */
    /* bfloat16 mixed precision (kd_model_set_bf16): the rounded input, the float32 masters */
    int bf16;
    float *x_bf16; /* [max_batch, in] */
    float *master; /* [nparams], valid between kd_model_bf16_weights(m, 1) and (m, 0) */
    int bf16_held; /* the parameters are the rounded copy */
    int act_fq;    /* kd_model_set_act_fq: int8 fake-quantized activations (CPU) */
    /* dropout: each dropout block's mask seed for the current step, on the host and where the
     * backend reads it (kd_model_stage_seeds) */
    int ndropout;
    uint64_t *seeds_host, *seeds_dev;
    uint64_t seeds_step; /* the step seed they were derived from */
    int seeds_ready;     /* seeds_dev holds the seeds of seeds_step */
} kd_model;

/*
 * Build from a definition: `layers` is the YAML list of blocks and `input`
 * the per-sample input shape ([1, 28, 28] or [784]). The model is allocated
 * on `be` for batches up to max_batch, parameters initialised as PyTorch
 * does by default from `seed`. On failure nothing is left allocated and the
 * message names the layer ("cfg.yaml:14:7: layer 6 (linear): ...").
 */
kd_status kd_model_build(const kd_node *input, const kd_node *layers, const kd_backend *be,
                         int max_batch, uint64_t seed, kd_model **out);
void kd_model_free(kd_model *m);

/* Forward n samples x [N, in] (device memory); train selects batch statistics and dropout;
 * step_seed varies dropout masks per step. Output: kd_model_output(). */
void kd_model_forward(kd_model *m, const float *x, int n, int train, uint64_t step_seed);
/*
 * Derive every dropout block's mask seed from step_seed and store them where the backend
 * reads them (an upload, skipped when they are already there). A training forward does it
 * itself; a caller that records the forward (backend.h graphs) calls it before recording and
 * before each replay, since the recorded work reads the seeds from device memory.
 */
kd_status kd_model_stage_seeds(kd_model *m, uint64_t step_seed);
const float *kd_model_output(const kd_model *m);
/* Gradient of the loss w.r.t. the output, [N, out_features]: losses write it before backward. */
float *kd_model_output_grad(kd_model *m);
/* Backward after a training forward of the same x and n; accumulates into grads. */
void kd_model_backward(kd_model *m, const float *x, int n);
/*
 * The same backward, calling ready(ctx, from) each time the gradients of parameters
 * [from, nparams) have all been queued (after each top-level block with parameters, last
 * with from = 0): a data-parallel trainer starts summing those buckets across ranks while
 * the earlier layers are still computing. Work is queued on the backend's stream in order.
 */
typedef void (*kd_grads_ready_fn)(void *ctx, size_t from);
void kd_model_backward_notify(kd_model *m, const float *x, int n, kd_grads_ready_fn ready,
                              void *ctx);
void kd_model_zero_grad(kd_model *m);
/* The host-side bookkeeping of delta training forwards (each batchnorm's num_batches_tracked)
 * without queuing any work: +1 for a forward replayed from a recording (backend.h graphs),
 * -1 for one that was recorded but never ran. */
void kd_model_count_train_forward(kd_model *m, int delta);

/*
 * bfloat16 mixed precision, emulated in float32 storage so that every backend computes it the
 * same way (run.precision: bf16). With it on, the model rounds (be->round_bf16: to nearest,
 * ties to even) what a bf16 autocast would hold in bf16: the input batch, every block's
 * output, the output gradient the losses wrote and every input gradient a block passes back;
 * the weights and biases of convolutions and linear layers are used rounded while
 * kd_model_bf16_weights(m, 1) holds them so (the float32 values are kept aside and put back by
 * kd_model_bf16_weights(m, 0), before the optimizer updates them). Products accumulate in
 * float32; batch-norm parameters and statistics, the losses, the weight gradients and the
 * optimizer stay float32. set_bf16 allocates the two buffers it needs (KD_ERR_NOMEM).
 */
kd_status kd_model_set_bf16(kd_model *m, int on);

/*
 * Activation fake quantization for quantization-aware training (quant.activations; host
 * memory, so the CPU backend only: KD_ERR_UNSUPPORTED otherwise). Every tensor the exporter
 * will store as int8 -- a block's output unless a batchnorm or an activation that folds into
 * it follows in the same trunk, and not dropout or flatten, which change no values the
 * exporter keeps -- is fake-quantized in place over the batch's own range (kd_quant_fake_act).
 * The range always holds every value, so the straight-through gradient passes unchanged and
 * backward needs no change.
 */
kd_status kd_model_set_act_fq(kd_model *m, int on);
void kd_model_bf16_weights(kd_model *m, int round);

/* Find a tapped block by name; NULL if none. */
const kd_block *kd_model_tap(const kd_model *m, const char *tap);

/* Parameter count (trainable floats). */
size_t kd_model_num_params(const kd_model *m);

/* Text summary: one line per block with output shape and parameter count. */
void kd_model_summary(const kd_model *m, FILE *f);

#endif
