/*
 * train.h - running a job: supervised training, evaluation (internal).
 */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H

#include <signal.h>
#include <stdio.h>

#include "backend.h"
#include "dataset.h"
#include "job.h"
#include "status.h"

typedef struct {
    const char
        *resume;  /* checkpoint to resume from, "auto" = <out_dir>/last.safetensors, or NULL */
    int progress; /* 1: redraw a progress bar on stderr; 0: plain log lines */
    volatile sig_atomic_t *stop; /* set by a signal handler: save a checkpoint and stop */
    struct kd_comm *comm;        /* the job's ranks (engine/comm.h); NULL = one process */
} kd_train_opts;

typedef struct {
    double loss, acc; /* mean loss, accuracy in [0, 1] */
    int64_t n;
} kd_eval_result;

/* Train the job to the end (or until *stop), writing checkpoints and metrics under out_dir. */
kd_status kd_train(const kd_job *job, const kd_train_opts *opts);

/* Evaluate a checkpoint of the job's model on the data set's test split. */
kd_status kd_eval(const kd_job *job, const char *checkpoint, kd_eval_result *out);

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

/* KD_ERR_SHAPE, naming the model and the data set, unless d's samples are the model's input
 * shape and d's class count its number of outputs. */
struct kd_model;
kd_status kd_check_model_fits_data(const struct kd_model *m, const kd_dataset *d,
                                   const kd_job *job);

#endif
