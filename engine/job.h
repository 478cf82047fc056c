/*
 * job.h - a training job as read from its YAML file (internal).
 *
 * kd_job_load reads the file, applies --set overrides, and checks every key:
 * unknown keys, wrong types and missing required keys are errors naming
 * file:line:column. The resolved tree is kept so the run directory can hold
 * the exact config that ran.
 */
#ifndef KD_JOB_H
#define KD_JOB_H

#include <stdint.h>

#include "augment.h"
#include "config_yaml.h"
#include "optim.h"
#include "status.h"

typedef struct {
    char path[512];
    kd_node *root;      /* the job file with overrides applied */
    kd_node *model_doc; /* the model file when `model:` names one (else NULL) */
    char model_desc[640];
    const kd_node *model_input, *model_layers;

    /* run */
    char name[128];
    char out_dir[512];
    uint64_t seed;
    char device[16]; /* auto | cpu | cuda */
    int threads;
    int threads_given;    /* run.threads was set (else: cores, shared among the ranks of a host) */
    char comm[16];        /* auto | single | mpi | nccl (engine/comm.h) */
    int bucket_kb;        /* gradient bucket size for the all-reduce, KiB */
    int log_every;        /* steps between plain log lines */
    int checkpoint_every; /* steps between mid-epoch checkpoints; 0 = end of epoch only */
    int bf16; /* run.precision: bf16 -- bfloat16 activations and matmul inputs (engine/model.h) */
    int cuda_graph; /* run.cuda_graph: replay each full batch's step from a CUDA graph */

    /* data */
    char dataset[64];
    char data_root[512]; /* "" = search the default places */
    int batch_size;
    int eval_batch_size;
    int64_t val_size;
    kd_augment_cfg augment;
    int64_t train_limit; /* use only the first N training samples (0 = all) */
    uint64_t split_seed; /* which samples are held out; independent of run.seed so runs with
                          * different seeds share one training split (and one teacher cache) */

    /* distill */
    char mode[16]; /* none | offline */
    double ce_weight;
    double label_smoothing;
    int have_kd;      /* a kd term is listed */
    double kd_weight; /* alpha of the kd term */
    double kd_temperature;
    int kd_reverse; /* direction: forward KL(t||s) (0) or reverse KL(s||t) (1) */
    int kd_t2;      /* multiply by T^2 (default on) */
    int kd_dkd;     /* the term is `dkd`: decoupled KD, kd_alpha * target-class KL + kd_beta *
                       non-target KL (engine/loss_kd.md) */
    double kd_alpha, kd_beta;

    /* teacher (offline mode and `distill cache`) */
    int have_teacher;
    kd_node *teacher_doc; /* the teacher's model file */
    char teacher_desc[640];
    const kd_node *teacher_input, *teacher_layers;
    char teacher_ckpt[512];
    char teacher_cache[512]; /* "" = run the teacher live */
    int cache_views;         /* augmented views per sample in the cache */
    int cache_topk;          /* 0 = full logits */
    char cache_dtype[16];    /* float16 | float32 */
    char cache_compress[16]; /* none | deflate | lz4 | zstd */
    int cache_chunk_rows;
    int cache_stream; /* teacher.cache_memory: auto (0: held in memory when it fits) | stream */
    int view_mean;    /* teacher.view_targets: each (0: epoch e trains on view e mod V) | mean
                       * (1: the unaugmented image against the mean of the V views' logits) */

    /* quant: the bit width the student is meant for (0 = no section); with qat, training
     * fake-quantizes conv/linear weights per output channel with a straight-through estimator
     * (engine/quant.h) and the exporter quantizes with the same max-abs rule */
    int quant_bits; /* 8 | 4 */
    int quant_qat;
    int quant_act; /* quant.activations: activations fake-quantized to int8 too (with qat) */

    /* optim */
    char optim_name[16];
    kd_optim_cfg optim;
    kd_sched_cfg sched;
    int epochs;
} kd_job;

/* overrides: NULL-terminated list of "key.path=value" (may be NULL). */
kd_status kd_job_load(const char *path, const char *const *overrides, kd_job *job);
void kd_job_free(kd_job *job);

#endif
