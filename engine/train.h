/*
 * train.h - running a job: supervised training, evaluation (internal).
 */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H

#include <signal.h>
#include <stdio.h>

#include "backend.h"
#include "checkpoint.h"
#include "dataset.h"
#include "job.h"
#include "status.h"

typedef struct {
    const char
        *resume;  /* checkpoint to resume from, "auto" = <out_dir>/last.safetensors, or NULL */
    int progress; /* 1: redraw a progress bar on stderr; 0: plain log lines */
    volatile sig_atomic_t *stop; /* set by a signal handler: save a checkpoint and stop */
    struct kd_comm *comm;        /* the job's ranks (engine/comm.h); NULL = one process */
    /* out (may be NULL): set to 1 when the run stopped on *stop with every rank at the same
     * step, after rank 0's checkpoint: no rank waits for another, none needs to end the job */
    int *stopped_together;
} kd_train_opts;

typedef struct {
    double loss, acc; /* mean loss, accuracy in [0, 1] */
    int64_t n;
} kd_eval_result;

/* Train the job to the end (or until *stop), writing checkpoints and metrics under out_dir. */
kd_status kd_train(const kd_job *job, const kd_train_opts *opts);

/*
 * One process's training step between batch assembly and the optimizer update, as the
 * trainer runs it: gradients zeroed, the forward pass of x, losses(ctx, m, n, 1.0) (which
 * write the output gradient and queue their sums), the backward pass. On a backend with
 * graphs (CUDA, backend.h) it is recorded once, at the first full batch after an eager full
 * batch has run (by then every per-shape plan and scratch buffer exists), and each later full
 * batch replays the record: one launch instead of one per operation. What the record reads
 * changes only in device memory (the batch, the teacher's targets, the weights) and its
 * scalars are the same at every full batch (dropout reads its mask seeds from device memory,
 * staged before each step by kd_model_stage_seeds), so a replay computes what the eager calls
 * would, bit for bit. Never recorded: a smaller batch (the last of an epoch), and a step with
 * use == 0 (set it from kd_step_can_record and the caller's own conditions: several ranks
 * sum gradients inside backward, run.cuda_graph: false). A recording that fails is said on
 * log (may be NULL) and the step and all later ones run eagerly. kd_step_release frees the
 * record.
 */
struct kd_model;
typedef void (*kd_step_losses_fn)(void *ctx, struct kd_model *m, int n, double share);
typedef struct {
    struct kd_model *m;
    const float *x; /* the batch, [max_batch, in] on the model's device */
    kd_step_losses_fn losses;
    void *ctx;
    int use;   /* record and replay full batches */
    int warm;  /* an eager full batch has run */
    void *rec; /* the record, once made */
} kd_step;
kd_status kd_step_run(kd_step *s, int n, int full, uint64_t step_seed, FILE *log);
void kd_step_release(kd_step *s);
/* The model's backend records graphs. */
int kd_step_can_record(const struct kd_model *m);

/* Evaluate a checkpoint of the job's model on the data set's test split; with progress set, a
 * progress line on stderr (for a terminal) while it takes more than a second. */
kd_status kd_eval(const kd_job *job, const char *checkpoint, int progress, kd_eval_result *out);

/* Pieces shared with `distill cache`: thread count for BLAS and OpenMP; the job's backend
 * (device: auto falls back to the CPU, saying why on log); the training split (data.val_size
 * held out by data.split_seed; the caller frees it with kd_dataset_free). */
void kd_set_threads(int n);
/* Run the program again with GOMP_SPINCOUNT=1000 (and KD_OPENMP_SPIN_SET=1, saying who set it)
 * unless the environment sets GOMP_SPINCOUNT or OMP_WAIT_POLICY (see train.c); returns only
 * when it does not (or cannot) run it again. */
void kd_openmp_short_spin(char **argv);
kd_status kd_pick_backend(const kd_job *job, const kd_backend **be, FILE *log);
kd_status kd_load_train_split(const kd_job *job, kd_dataset *train);
/* Keep the first data.train_limit samples of the (shuffled) training split, the ones the job
 * trains on; the teacher cache still covers the whole split, so a limit never invalidates it. */
void kd_apply_train_limit(const kd_job *job, kd_dataset *train);

/* Refuse a checkpoint whose recorded quantization-aware training (kd_ckpt_info.quant) differs
 * from the job's quant section (nothing recorded: accepted), ending the message with remedy. */
kd_status kd_check_checkpoint_quant(const kd_job *job, const char *checkpoint,
                                    const kd_ckpt_info *info, const char *remedy);

/* KD_ERR_SHAPE, naming the model and the data set, unless d's samples are the model's input
 * shape and d's class count its number of outputs. */
struct kd_model;
kd_status kd_check_model_fits_data(const struct kd_model *m, const kd_dataset *d,
                                   const kd_job *job);

#endif
