/*
 * checkpoint.h - model and training state in safetensors files.
 *
 * Tensors are named as PyTorch's state_dict names them ("3.weight",
 * "1.running_mean", "1.num_batches_tracked"), so a checkpoint loads into the
 * mirrored nn.Sequential; the optimiser state goes in one extra tensor
 * "__optim__.state" [k, nparams]. Metadata (all strings): format, model_hash,
 * step, epoch, best_val_acc, seed, optimizer, batch_size, train_samples, the epoch's running
 * sums, split_hash, schedule_steps. Saving is atomic: the
 * previous file survives any failure.
 */
#ifndef KD_CHECKPOINT_H
#define KD_CHECKPOINT_H

#include <stdint.h>

#include "model.h"
#include "status.h"

typedef struct {
    int64_t step;  /* optimiser updates done */
    int64_t epoch; /* epochs fully done */
    double best_val_acc;
    uint64_t seed;
    const char *optimizer; /* "sgd" / "adamw" */
    int64_t batch_size;    /* what a step meant, so a resume can refuse another meaning; */
    int64_t train_samples; /* 0 when unknown (a checkpoint written outside training) */
    /* the running sums of a checkpoint taken mid-epoch, so metrics resume exactly too */
    double epoch_loss;
    int64_t epoch_correct, epoch_seen;
    /* the training split's fingerprint (0 = not recorded) and the steps a cosine schedule spans
     * (0: another schedule), so that a resume can refuse another split and tell when the
     * schedule changed under it */
    uint64_t split_hash;
    int64_t schedule_steps;
    /* how the weights were trained (kd_checkpoint_quant_tag: "none", "qat4", "qat8-act", ...);
     * NULL when saving: not recorded; read back as "" when the file does not record it */
    const char *quant;
    /* read back only: the architecture hash the file was written for (0 = not recorded) */
    uint64_t model_hash;
    /* the run the weights belong to: a hash of the job that started it, carried on by its
     * resumes; and a hash of the job that wrote this checkpoint (0 = not recorded; saving 0
     * records nothing) */
    uint64_t run_id, job_id;
} kd_ckpt_info;

/* The tag a job's quant section gives its checkpoints: "none" without QAT, else "qat" and the
 * bits, "-act" when activations are fake-quantized too. */
void kd_checkpoint_quant_tag(int bits, int qat, int act, char *buf, size_t len);

/* KD_OK unless checkpoint `path` records weights trained otherwise (QAT or not, other bits)
 * than `tag` says: their float values are then not the model the job describes, so a refusal
 * naming both and ending with `remedy`. */
kd_status kd_checkpoint_check_quant(const char *path, const kd_ckpt_info *info, const char *tag,
                                    const char *remedy);

/* Save params, buffers, counters and (if state != NULL) nstate optimiser floats, atomically;
 * a non-finite value is refused (the run diverged) and path keeps what it held. */
kd_status kd_checkpoint_save(const char *path, const kd_model *m, const float *state, size_t nstate,
                             const kd_ckpt_info *info);

/*
 * Load into m. Every model tensor must be present with the same shape;
 * mismatches are listed by name and shape in the message and nothing in m is
 * changed. When state != NULL the optimiser state must be present with nstate
 * floats. info (may be NULL) receives the metadata fields above;
 * info->optimizer points into a static buffer.
 */
kd_status kd_checkpoint_load(const char *path, kd_model *m, float *state, size_t nstate,
                             kd_ckpt_info *info);

/* The metadata of checkpoint `path` into info, as kd_checkpoint_load gives it, from its header
 * alone (no tensor is read). */
kd_status kd_checkpoint_read_info(const char *path, kd_ckpt_info *info);

/* The refusal to resume from `path`, a file without distill's metadata (weights only). */
kd_status kd_checkpoint_weights_only(const char *path);

/* KD_OK unless checkpoint `path` (read into info) records an architecture hash other than m's:
 * then a refusal naming the file and model desc, ending with `remedy` (what to do instead). */
kd_status kd_checkpoint_check_model(const char *path, const kd_ckpt_info *info, const kd_model *m,
                                    const char *desc, const char *remedy);

#endif
