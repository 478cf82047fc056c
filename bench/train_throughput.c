/*
 * train_throughput.c - training and teacher-inference throughput of distill against PyTorch on
 * Fashion-MNIST, on the CPU or on a CUDA device.
 *
 *   ./build/bench_train_throughput [--device cpu|cuda] [--warmup N] [--steps N] [--batch N]
 *                                  [--threads N] [--rounds N] [--root DIR] [--python PATH]
 *                                  [--only FILE[,FILE...]] [--compile | --no-compile]
 *                                  [--no-graph] [--infer] [--eval-batch N] [--json PATH]
 *
 * Training (the default), for the MLP and the tiny CNN of configs/fashion-mnist/models, and the
 * teacher CNN (teacher_cnn.yaml) only when --only names it (on the CPU it is slow): build the
 * model, train it with AdamW (lr 1e-3, weight decay 1e-4) and mean cross-entropy on the
 * pre-loaded training set (one permutation per epoch, batches gathered by index, no
 * augmentation), check that the first 50 steps lower a finite loss, then time `steps` steps. On
 * the CPU each phase is timed: batch gather (the trainer's: the sample indices and augmentation
 * parameters uploaded, the backend's gather_augment from the resident set), zero_grad, forward,
 * loss, backward, optimizer; and every cblas_sgemm the engine issues is timed in place: the
 * executable is linked with --wrap=cblas_sgemm (bench/CMakeLists.txt), so the "BLAS" share is
 * measured, not estimated. The PyTorch peer (bench/pytorch/train_throughput.py, run with --python)
 * runs the same schedule in the same invocation, alternating with distill for `rounds` rounds (the
 * host is shared, so a single run can be off by a factor of two); the tables show medians, the JSON
 * every round.
 *
 * --device cuda: the model is built on the CUDA backend; when no device answers the bench says
 * so and exits 2. A model that needs an operation the backend does not implement yet is reported
 * as not measured (never run on the CPU instead), the others still run, and the exit status is
 * 2. The step is engine/train.c's: the training set resident on the device and each batch
 * gathered there (gather_augment), one be->sync() after backward, then the backend's fused
 * optimizer update (optim_step); the clock of a timed block is read after a final be->sync().
 * As in the trainer (run.cuda_graph), the timed steps replay a CUDA graph of zero_grad, forward,
 * loss and backward, recorded once after the warm-up (engine/train.h, kd_step_run), unless
 * --no-graph asks for every operation to be launched one by one; the JSON says which
 * ("cuda_graph").
 * Phases are not timed on the device (queued work lands in whichever phase waits for it): only the
 * whole step, split at the trainer's own sync into "to sync" (gather, forward, loss, backward) and
 * "optimizer" (the device update). The peer gets --device cuda (its data set on the device,
 * torch.cuda.synchronize() before reading the clock) and runs twice per round, eager and under
 * torch.compile: the tables give distill / eager and distill / compile. --compile runs the compiled
 * peer on the CPU too,
 * --no-compile drops it. A torch without a working torch.compile is reported ("torch.compile
 * unavailable (torch X)") and the bench carries on with eager alone.
 *
 * --infer: teacher-cache throughput instead of training, for the models --only names (default
 * the teacher). As `distill cache` runs the teacher (engine/teacher.c, cache_chunk_compute): a
 * batch of --eval-batch (500) rows of the training set, in order, is uploaded, run through
 * kd_model_forward with train = 0 and its logits downloaded; --warmup and --steps count such
 * batches (full batches only, wrapping at the end of the set). Before timing, the logits must be
 * finite and, on cuda, match the CPU backend's for the same parameters on 64 rows (relative L2
 * error below 1e-2: loose enough for TF32 arithmetic). The peer forwards in eval mode under
 * torch.inference_mode(), eager and compiled, its set on the device and the logits gathered in
 * one device tensor copied to the host at the end of its timed block.
 *
 * Targets, distill / PyTorch samples/s: on the CPU the MLP 1x and the tiny CNN 1.5x; on CUDA the
 * tiny CNN 5x eager and 2x torch.compile, the teacher 1x both, the teacher's inference 1x both.
 * The JSON goes to --json, by default bench/results/train_throughput.json (CPU training),
 * train_throughput_cuda.json, infer_throughput.json or infer_throughput_cuda.json.
 * Exits 1 when a check fails, 2 when the PyTorch peer is unavailable, no CUDA device answers or
 * the CUDA backend lacks an operation a model needs.
 */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "augment.h"
#include "config_yaml.h"
#include "dataset.h"
#include "model.h"
#include "optim.h"
#include "sampler.h"
#include "train.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef KD_SOURCE_DIR
#define KD_SOURCE_DIR "."
#endif

#define CHECK_STEPS 50 /* steps whose losses must fall before anything is timed */
#define MAX_ROUNDS  9
#define REF_ROWS    64   /* --infer on cuda: rows checked against the CPU backend */
#define REF_TOL     1e-2 /* their relative L2 error */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
/* ---- every GEMM of the engine, timed where it happens (link option --wrap=cblas_sgemm) ---- */

static double g_blas_s, g_blas_flops;
static long g_blas_calls;

void __real_cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER order,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE ta,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE tb, OPENBLAS_CONST blasint m,
                        OPENBLAS_CONST blasint n, OPENBLAS_CONST blasint k,
                        OPENBLAS_CONST float alpha, OPENBLAS_CONST float *a,
                        OPENBLAS_CONST blasint lda, OPENBLAS_CONST float *b,
                        OPENBLAS_CONST blasint ldb, OPENBLAS_CONST float beta, float *c,
                        OPENBLAS_CONST blasint ldc);
void __wrap_cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER order,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE ta,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE tb, OPENBLAS_CONST blasint m,
                        OPENBLAS_CONST blasint n, OPENBLAS_CONST blasint k,
                        OPENBLAS_CONST float alpha, OPENBLAS_CONST float *a,
                        OPENBLAS_CONST blasint lda, OPENBLAS_CONST float *b,
                        OPENBLAS_CONST blasint ldb, OPENBLAS_CONST float beta, float *c,
                        OPENBLAS_CONST blasint ldc);

void __wrap_cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER order,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE ta,
                        OPENBLAS_CONST enum CBLAS_TRANSPOSE tb, OPENBLAS_CONST blasint m,
                        OPENBLAS_CONST blasint n, OPENBLAS_CONST blasint k,
                        OPENBLAS_CONST float alpha, OPENBLAS_CONST float *a,
                        OPENBLAS_CONST blasint lda, OPENBLAS_CONST float *b,
                        OPENBLAS_CONST blasint ldb, OPENBLAS_CONST float beta, float *c,
                        OPENBLAS_CONST blasint ldc)
{
    double t0 = now_s();
    __real_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    g_blas_s += now_s() - t0;
    g_blas_flops += 2.0 * m * n * k;
    g_blas_calls++;
}

/* ---- options and models ---- */

typedef struct {
    int warmup, steps, batch, threads, rounds, eval_batch;
    int cuda;     /* --device cuda */
    int compile;  /* also run the peer under torch.compile; -1 until decided (on with cuda) */
    int infer;    /* time inference instead of training */
    int no_graph; /* --no-graph: every step operation by operation, as run.cuda_graph: false */
    const char *root, *python, *only, *json;
    const kd_backend *be;
} bench_opts;

typedef struct {
    const char *file, *label;
    int by_default;    /* measured when --only does not name models (training only) */
    double cpu;        /* training target on the CPU, distill / PyTorch; 0: none */
    double gpu, gpu_c; /* training targets on CUDA against eager and torch.compile */
    double inf, inf_c; /* inference targets on CUDA against eager and torch.compile */
} model_spec;

static const model_spec k_models[] = {
    {"mlp.yaml", "MLP 784-256-10", 1, 1.0, 0, 0, 0, 0},
    {"tiny_cnn.yaml", "tiny CNN", 1, 1.5, 5.0, 2.0, 0, 0},
    {"teacher_cnn.yaml", "teacher CNN", 0, 0, 1.0, 1.0, 1.0, 1.0},
};
#define NSPECS ((int)(sizeof k_models / sizeof k_models[0]))

/* Whether the comma-separated list names `file`. */
static int listed(const char *list, const char *file)
{
    size_t len = strlen(file);
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (!strncmp(p, file, len) && (p[len] == ',' || p[len] == '\0'))
            return 1;
    return 0;
}

/* Every name of --only must be a model of k_models. */
static int only_is_valid(const char *list)
{
    int ok = 1;
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        size_t len = strcspn(p, ",");
        int found = 0;
        for (int i = 0; i < NSPECS; i++)
            found |= strlen(k_models[i].file) == len && !strncmp(p, k_models[i].file, len);
        if (!found) {
            fprintf(stderr,
                    "bench_train_throughput: --only: no model '%.*s' (mlp.yaml, "
                    "tiny_cnn.yaml, teacher_cnn.yaml)\n",
                    (int)len, p);
            ok = 0;
        }
    }
    return ok;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_train_throughput [--device cpu|cuda] [--warmup N (>= %d when "
            "training)] [--steps N] [--batch N] [--threads N] [--rounds N (<= %d)] [--root DIR] "
            "[--python PATH] [--only mlp.yaml,tiny_cnn.yaml,teacher_cnn.yaml] [--compile | "
            "--no-compile] [--no-graph] [--infer] [--eval-batch N] [--json PATH]\n",
            CHECK_STEPS, MAX_ROUNDS);
}

static int parse_args(int argc, char **argv, bench_opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *num = !strcmp(a, "--warmup")       ? &o->warmup
                   : !strcmp(a, "--steps")      ? &o->steps
                   : !strcmp(a, "--batch")      ? &o->batch
                   : !strcmp(a, "--threads")    ? &o->threads
                   : !strcmp(a, "--rounds")     ? &o->rounds
                   : !strcmp(a, "--eval-batch") ? &o->eval_batch
                                                : NULL;
        const char **str = !strcmp(a, "--root")     ? &o->root
                           : !strcmp(a, "--python") ? &o->python
                           : !strcmp(a, "--only")   ? &o->only
                           : !strcmp(a, "--json")   ? &o->json
                                                    : NULL;
        if ((num || str || !strcmp(a, "--device")) && !v) {
            fprintf(stderr, "bench_train_throughput: %s needs a value\n", a);
            return 0;
        }
        if (num) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 1000000) {
                fprintf(stderr, "bench_train_throughput: %s wants a positive integer, got '%s'\n",
                        a, v);
                return 0;
            }
            *num = (int)n;
            i++;
        } else if (str) {
            *str = argv[++i];
        } else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
                fprintf(stderr, "bench_train_throughput: --device is cpu or cuda, got '%s'\n", v);
                return 0;
            }
            o->cuda = !strcmp(argv[++i], "cuda");
        } else if (!strcmp(a, "--compile") || !strcmp(a, "--no-compile")) {
            o->compile = !strcmp(a, "--compile");
        } else if (!strcmp(a, "--infer")) {
            o->infer = 1;
        } else if (!strcmp(a, "--no-graph")) {
            o->no_graph = 1;
        } else {
            usage();
            return 0;
        }
    }
    if (o->rounds > MAX_ROUNDS) {
        fprintf(stderr, "bench_train_throughput: --rounds must be at most %d\n", MAX_ROUNDS);
        return 0;
    }
    if (!o->infer && o->warmup < CHECK_STEPS) {
        fprintf(stderr, "bench_train_throughput: --warmup must be at least %d (the check)\n",
                CHECK_STEPS);
        return 0;
    }
    if (o->only && !only_is_valid(o->only))
        return 0;
    if (o->compile < 0)
        o->compile = o->cuda;
    return 1;
}

/*
 * Build a model file on be for batches up to max_batch. 0: built; 2: the backend lacks an
 * operation the model needs (why says which); 1: any other failure, already printed.
 */
static int build_model(const char *yaml, const kd_backend *be, int max_batch, kd_model **m,
                       char *why, size_t why_len)
{
    kd_node *root = NULL;
    *m = NULL;
    kd_status st = kd_yaml_load_file(yaml, &root);
    if (st == KD_OK)
        st = kd_model_build(kd_node_child(root, "input"), kd_node_child(root, "layers"), be,
                            max_batch, 1, m);
    kd_node_free(root);
    if (st == KD_ERR_UNSUPPORTED) {
        snprintf(why, why_len, "%s", kd_last_error());
        return 2;
    }
    if (st != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
        return 1;
    }
    return 0;
}

static int model_fits(const kd_model *m, const kd_dataset *d, const char *yaml)
{
    if (m->in_numel != (size_t)d->c * d->h * d->w || m->out_features != d->num_classes) {
        fprintf(stderr, "bench_train_throughput: %s does not fit %s\n", yaml, d->name);
        return 0;
    }
    return 1;
}

/* ---- training ---- */

enum { PH_GATHER, PH_ZERO, PH_FWD, PH_LOSS, PH_BWD, PH_OPTIM, PH_COUNT };
static const char *const ph_names[PH_COUNT] = {"gather", "zero_grad", "forward",
                                               "loss",   "backward",  "optimizer"};

typedef struct {
    double t[PH_COUNT]; /* seconds summed over the timed steps; on a device only the split at
                           the step's sync (PH_GATHER..PH_BWD, PH_OPTIM) means anything */
    double blas_fwd_s, blas_bwd_s, blas_flops;
    long blas_calls;
} phase_acc;

typedef struct {
    kd_model *m;
    const kd_dataset *d;
    kd_optim_cfg optim;
    float *state, *x_dev, *prm_host, *prm_dev;
    const float *x_all; /* the training set where the backend reads it, as train.c */
    const int32_t *y_all;
    float *x_res; /* off the CPU: the resident copy (x_all, y_all point at it) */
    int32_t *y_res;
    size_t nstate;
    int32_t *y_dev;
    uint32_t *perm, *idx_dev;
    uint8_t *mask_dev; /* the decay mask where the update runs */
    double *acc_dev;   /* the timed steps' loss and hit sums, as the trainer's */
    int64_t pos, epoch, step;
    int batch;
    kd_step rec; /* the trainer's step recording (engine/train.h): zero_grad .. backward */
} trainer;

/* the timed steps' loss, as kd_step_run calls it: mean cross-entropy, sums on the device */
static void bench_ce(void *ctx, kd_model *m, int n, double share)
{
    trainer *tr = ctx;
    m->be->ce(n, m->out_features, kd_model_output(m), tr->y_dev, 0.0, kd_model_output_grad(m),
              share, NULL, tr->acc_dev);
}

/*
 * One training step as engine/train.c does it, each phase timed into acc (may be NULL). With
 * loss_out the step's mean loss is read back at once (the warm-up's learning check); without,
 * the loss sum goes to the device accumulator as in the trainer, which reads it back once per
 * log interval (trainer_time reads it at the end), and nothing waits for the device on the CPU
 * side of the step: on a device the phase split is then only where the host got to.
 */
static kd_status train_step(trainer *tr, phase_acc *acc, double *loss_out)
{
    kd_model *m = tr->m;
    const kd_backend *be = m->be;
    double t[PH_COUNT + 1], b0, b1, b2, f0;
    long c0 = g_blas_calls;
    f0 = g_blas_flops;

    t[0] = now_s();
    if (tr->pos + tr->batch > tr->d->n) { /* next epoch; every step is a full batch */
        tr->epoch++;
        tr->pos = 0;
        kd_epoch_permutation(tr->perm, (uint32_t)tr->d->n, 1, (uint64_t)tr->epoch);
    }
    /* the trainer's batch assembly: parameters drawn on the host (here the identity), indices
     * and parameters uploaded, the batch gathered where the set lives */
    const uint32_t *idx = tr->perm + tr->pos;
    kd_augment_draw_batch(NULL, 1, (uint64_t)tr->epoch, idx, tr->batch, tr->prm_host);
    tr->pos += tr->batch;
    KD_TRY(be->upload(tr->idx_dev, idx, (size_t)tr->batch * sizeof(uint32_t)));
    KD_TRY(be->upload(tr->prm_dev, tr->prm_host, (size_t)tr->batch * KD_AUG_NPARAMS * 4));
    be->gather_augment(tr->batch, tr->d->c, tr->d->h, tr->d->w, tr->x_all, tr->y_all, tr->idx_dev,
                       tr->prm_dev, (0.0f - tr->d->mean) / tr->d->std, tr->x_dev, tr->y_dev);
    t[1] = now_s();
    if (!loss_out && tr->rec.use) { /* the trainer's recorded step: one phase, "forward" */
        KD_TRY(
            kd_step_run(&tr->rec, tr->batch, 1, (uint64_t)tr->step, tr->rec.rec ? NULL : stderr));
        b0 = b1 = b2 = g_blas_s;
        t[2] = t[1];
        t[3] = t[4] = t[5] = now_s();
        goto update;
    }
    kd_model_zero_grad(m);
    t[2] = now_s();
    b0 = g_blas_s;
    kd_model_forward(m, tr->x_dev, tr->batch, 1, (uint64_t)tr->step);
    b1 = g_blas_s;
    t[3] = now_s();
    int64_t correct = 0;
    double loss = be->ce(tr->batch, m->out_features, kd_model_output(m), tr->y_dev, 0.0,
                         kd_model_output_grad(m), 1.0, &correct, loss_out ? NULL : tr->acc_dev);
    t[4] = now_s();
    kd_model_backward(m, tr->x_dev, tr->batch);
    b2 = g_blas_s;
    t[5] = now_s();
update:
    KD_TRY(be->optim_step(&tr->optim, m->params, m->grads, tr->state, tr->mask_dev, m->nparams,
                          tr->optim.lr, tr->step + 1));
    t[6] = now_s();
    tr->step++;
    if (acc) {
        for (int p = 0; p < PH_COUNT; p++)
            acc->t[p] += t[p + 1] - t[p];
        acc->blas_fwd_s += b1 - b0;
        acc->blas_bwd_s += b2 - b1;
        acc->blas_calls += g_blas_calls - c0;
        acc->blas_flops += g_blas_flops - f0;
    }
    if (loss_out)
        *loss_out = loss / tr->batch; /* ce returns the summed loss */
    return KD_OK;
}

typedef struct {
    double sps, step_ms; /* step_ms: per training step, or per inference batch */
    phase_acc ph;
} distill_round;

/*
 * Build the model and run the warm-up, whose first CHECK_STEPS steps must lower a finite loss.
 * Returns 0 when ready, 2 when the backend lacks an operation (why says which), 1 otherwise.
 */
static int trainer_init(trainer *tr, const char *yaml, const kd_dataset *d, const bench_opts *o,
                        double *first_loss, double *check_loss, char *why, size_t why_len)
{
    memset(tr, 0, sizeof *tr);
    tr->d = d;
    tr->batch = o->batch;
    int rc = build_model(yaml, o->be, o->batch, &tr->m, why, why_len);
    if (rc != 0)
        return rc;
    kd_model *m = tr->m;
    const kd_backend *be = m->be;
    if (!model_fits(m, d, yaml))
        return 1;
    tr->optim = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    tr->optim.lr = 1e-3;
    tr->optim.weight_decay = 1e-4;
    tr->nstate = kd_optim_state_floats(&tr->optim, m->nparams);
    tr->prm_host = malloc((size_t)o->batch * KD_AUG_NPARAMS * sizeof(float));
    tr->perm = malloc((size_t)d->n * sizeof(uint32_t));
    const size_t xb = (size_t)d->n * m->in_numel * sizeof(float), yb = (size_t)d->n * 4;
    if (!tr->prm_host || !tr->perm ||
        be->alloc((void **)&tr->x_dev, (size_t)o->batch * m->in_numel * sizeof(float)) ||
        be->alloc((void **)&tr->y_dev, (size_t)o->batch * sizeof(int32_t)) ||
        be->alloc((void **)&tr->idx_dev, (size_t)o->batch * sizeof(uint32_t)) ||
        be->alloc((void **)&tr->prm_dev, (size_t)o->batch * KD_AUG_NPARAMS * sizeof(float)) ||
        be->alloc((void **)&tr->state, tr->nstate * sizeof(float)) ||
        be->alloc((void **)&tr->acc_dev, 2 * sizeof(double)) ||
        (be->device != KD_DEVICE_CPU &&
         (be->alloc((void **)&tr->x_res, xb) || be->alloc((void **)&tr->y_res, yb) ||
          be->upload(tr->x_res, d->x, xb) || be->upload(tr->y_res, d->y, yb) ||
          be->alloc((void **)&tr->mask_dev, m->nparams) ||
          be->upload(tr->mask_dev, m->decay_mask, m->nparams)))) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 1;
    }
    tr->x_all = be->device == KD_DEVICE_CPU ? d->x : tr->x_res;
    tr->y_all = be->device == KD_DEVICE_CPU ? d->y : tr->y_res;
    if (be->device == KD_DEVICE_CPU)
        tr->mask_dev = m->decay_mask;
    kd_epoch_permutation(tr->perm, (uint32_t)d->n, 1, 0);

    double loss, head = 0, tail = 0;
    for (int i = 0; i < o->warmup; i++) {
        if (train_step(tr, NULL, &loss) != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
            return 1;
        }
        if (i == 0)
            *first_loss = loss;
        if (i < CHECK_STEPS && !isfinite(loss)) {
            fprintf(stderr, "bench_train_throughput: %s: loss is %g at step %d\n", yaml, loss,
                    i + 1);
            return 1;
        }
        if (i < 10)
            head += loss / 10;
        else if (i >= CHECK_STEPS - 10 && i < CHECK_STEPS)
            tail += loss / 10;
    }
    *check_loss = tail;
    if (!(*first_loss > 1.5 && *first_loss < 3.5) || !(tail < 0.8 * head)) {
        fprintf(stderr,
                "bench_train_throughput: %s does not learn: first loss %.4f (expected about "
                "ln 10 = 2.30), mean loss of steps 1-10 %.4f, of steps %d-%d %.4f (must fall "
                "below 80%%)\n",
                yaml, *first_loss, head, CHECK_STEPS - 9, CHECK_STEPS, tail);
        return 1;
    }
    /* the trainer's recording (run.cuda_graph), made before any clock runs: one eager step of
     * the timed kind (its sums to the device accumulator) warms what the recording uses, and
     * the next step records and replays */
    tr->rec = (kd_step){.m = m,
                        .x = tr->x_dev,
                        .losses = bench_ce,
                        .ctx = tr,
                        .use = !o->no_graph && kd_step_can_record(m)};
    for (int i = 0; tr->rec.use && i < 2; i++)
        if (train_step(tr, NULL, NULL) != KD_OK || be->sync() != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
            return 1;
        }
    if (o->no_graph && kd_step_can_record(m))
        fprintf(stderr, "  %s: no CUDA graph (--no-graph)\n", yaml);
    return 0;
}

/* Time `steps` more steps; the clock stops after the device has finished them. */
static int trainer_time(trainer *tr, int steps, distill_round *r)
{
    double sums[2] = {0, 0};
    memset(r, 0, sizeof *r);
    const kd_backend *be = tr->m->be;
    if (be->zero(tr->acc_dev, sizeof sums) != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 0;
    }
    double t0 = now_s();
    for (int i = 0; i < steps; i++) {
        if (train_step(tr, &r->ph, NULL) != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
            return 0;
        }
    }
    /* the trainer's read-back at the end of a log interval: it waits for the device */
    if (be->sync() != KD_OK || be->download(sums, tr->acc_dev, sizeof sums) != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 0;
    }
    double el = now_s() - t0, loss = sums[0] / ((double)steps * tr->batch);
    if (!isfinite(loss)) {
        fprintf(stderr, "bench_train_throughput: the loss became %g while timing\n", loss);
        return 0;
    }
    r->sps = (double)steps * tr->batch / el;
    r->step_ms = 1e3 * el / steps;
    return 1;
}

static void trainer_free(trainer *tr)
{
    if (tr->m) {
        kd_step_release(&tr->rec);
        tr->m->be->release(tr->x_dev);
        tr->m->be->release(tr->y_dev);
        tr->m->be->release(tr->state);
        tr->m->be->release(tr->idx_dev);
        tr->m->be->release(tr->acc_dev);
        tr->m->be->release(tr->prm_dev);
        tr->m->be->release(tr->x_res);
        tr->m->be->release(tr->y_res);
        if (tr->mask_dev != tr->m->decay_mask)
            tr->m->be->release(tr->mask_dev);
    }
    free(tr->prm_host);
    free(tr->perm);
    kd_model_free(tr->m);
    memset(tr, 0, sizeof *tr);
}

/* ---- inference, as the teacher cache is built ---- */

typedef struct {
    kd_model *m;
    const kd_dataset *d;
    float *x_dev, *logits; /* one batch of inputs on the device; its logits on the host */
    int64_t pos;           /* next row */
    int batch;
} inferer;

/* One batch as cache_chunk_compute runs it: upload, forward in eval mode, download the logits. */
static kd_status infer_batch(inferer *in)
{
    kd_model *m = in->m;
    const kd_backend *be = m->be;
    if (in->pos + in->batch > in->d->n)
        in->pos = 0;
    KD_TRY(be->upload(in->x_dev, in->d->x + (size_t)in->pos * m->in_numel,
                      (size_t)in->batch * m->in_numel * sizeof(float)));
    kd_model_forward(m, in->x_dev, in->batch, 0, 0);
    KD_TRY(be->download(in->logits, kd_model_output(m),
                        (size_t)in->batch * m->out_features * sizeof(float)));
    in->pos += in->batch;
    return KD_OK;
}

/*
 * The first batch's logits must be finite and, off the CPU, match the CPU backend's for the
 * same parameters and running statistics on the first REF_ROWS rows.
 */
static int inferer_check(inferer *in, const char *yaml)
{
    kd_model *m = in->m, *ref = NULL;
    const size_t nl = (size_t)in->batch * m->out_features;
    in->pos = 0;
    if (infer_batch(in) != KD_OK || m->be->sync() != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
        return 0;
    }
    for (size_t i = 0; i < nl; i++)
        if (!isfinite(in->logits[i])) {
            fprintf(stderr, "bench_train_throughput: %s: logit %zu is %g\n", yaml, i,
                    in->logits[i]);
            return 0;
        }
    if (m->be->device == KD_DEVICE_CPU)
        return 1;
    char why[512];
    int rows = in->batch < REF_ROWS ? in->batch : REF_ROWS, ok = 0;
    if (build_model(yaml, kd_backend_cpu(), rows, &ref, why, sizeof why) != 0 ||
        m->be->download(ref->params, m->params, m->nparams * sizeof(float)) != KD_OK ||
        (m->nbuffers &&
         m->be->download(ref->buffers, m->buffers, m->nbuffers * sizeof(float)) != KD_OK)) {
        fprintf(stderr, "bench_train_throughput: %s: the CPU reference: %s\n", yaml,
                kd_last_error());
    } else {
        kd_model_forward(ref, in->d->x, rows, 0, 0);
        const float *want = kd_model_output(ref);
        double num = 0, den = 0;
        for (size_t i = 0; i < (size_t)rows * m->out_features; i++) {
            num += ((double)in->logits[i] - want[i]) * ((double)in->logits[i] - want[i]);
            den += (double)want[i] * want[i];
        }
        double rel = sqrt(num / (den > 0 ? den : 1));
        ok = rel < REF_TOL;
        fprintf(stderr,
                "  %s: %s logits vs the CPU backend's, %d rows: relative L2 error %.2e (%s %.0e)\n",
                yaml, m->be->name, rows, rel, ok ? "below" : "NOT below", REF_TOL);
    }
    kd_model_free(ref);
    return ok;
}

/* Time `batches` batches; the clock stops after the device has finished them. */
static int inferer_time(inferer *in, int batches, distill_round *r)
{
    memset(r, 0, sizeof *r);
    double t0 = now_s();
    for (int i = 0; i < batches; i++)
        if (infer_batch(in) != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
            return 0;
        }
    if (in->m->be->sync() != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 0;
    }
    double el = now_s() - t0;
    r->sps = (double)batches * in->batch / el;
    r->step_ms = 1e3 * el / batches;
    return 1;
}

static void inferer_free(inferer *in)
{
    if (in->m)
        in->m->be->release(in->x_dev);
    free(in->logits);
    kd_model_free(in->m);
    memset(in, 0, sizeof *in);
}

/* ---- the PyTorch peer ---- */

/*
 * Run the peer (eager, or under torch.compile when compiled); its JSON (stdout's last '{' line),
 * or NULL when it is unavailable or fails, with why saying so (the peer's own error when it
 * printed one).
 */
static cJSON *run_peer(const bench_opts *o, const char *yaml, int compiled, char *why,
                       size_t why_len)
{
    if (access(o->python, X_OK) != 0) {
        snprintf(why, why_len, "%s: %s", o->python, strerror(errno));
        return NULL;
    }
    char cmd[4096], extra[128] = "";
    if (o->infer)
        snprintf(extra, sizeof extra, " --infer --eval-batch %d", o->eval_batch);
    snprintf(cmd, sizeof cmd,
             "'%s' '%s/bench/pytorch/train_throughput.py' --model '%s' --batch %d --warmup %d "
             "--steps %d --threads %d%s%s%s",
             o->python, o->root, yaml, o->batch, o->warmup, o->steps, o->threads,
             o->cuda ? " --device cuda" : "", compiled ? " --compile" : "", extra);
    FILE *p = popen(cmd, "r");
    if (!p) {
        snprintf(why, why_len, "cannot run %s: %s", o->python, strerror(errno));
        return NULL;
    }
    char line[8192], last[8192] = "";
    while (fgets(line, sizeof line, p))
        if (line[0] == '{')
            snprintf(last, sizeof last, "%s", line);
    int rc = pclose(p);
    cJSON *j = last[0] ? cJSON_Parse(last) : NULL;
    if (rc != 0 || !j || !cJSON_IsNumber(cJSON_GetObjectItem(j, "samples_per_s"))) {
        const char *err = cJSON_GetStringValue(cJSON_GetObjectItem(j, "error"));
        if (err)
            snprintf(why, why_len, "%s", err);
        else
            snprintf(why, why_len,
                     "%s exited with status %d%s; it needs PyTorch and NumPy for that "
                     "interpreter",
                     o->python, WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, j ? "" : ", no JSON");
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* ---- report ---- */

typedef struct {
    const char *file, *label;
    double target, target_c; /* distill / PyTorch samples/s the issue asks for; 0: none */
    size_t params;
    double first_loss, check_loss;
    char not_measured[512];  /* why the model did not run (an operation the backend lacks) */
    char c_unavailable[512]; /* why torch.compile did not run */
    int nrounds, c_rounds;
    distill_round d[MAX_ROUNDS];
    cJSON *peer[MAX_ROUNDS], *peer_c[MAX_ROUNDS];
    double d_sps[MAX_ROUNDS], p_sps[MAX_ROUNDS], c_sps[MAX_ROUNDS];
    double d_med, p_med, c_med; /* c_med 0 when torch.compile never ran */
    int d_med_round;            /* the round whose phases are shown */
    int graph;                  /* distill's steps were replayed from a CUDA graph */
} model_result;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
    double s[MAX_ROUNDS];
    memcpy(s, v, sizeof *v * (size_t)n);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static double min_of(const double *v, int n)
{
    double m = v[0];
    for (int i = 1; i < n; i++)
        m = v[i] < m ? v[i] : m;
    return m;
}

static double max_of(const double *v, int n)
{
    double m = v[0];
    for (int i = 1; i < n; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

static void summarise(model_result *r)
{
    for (int k = 0; k < r->nrounds; k++) {
        r->d_sps[k] = r->d[k].sps;
        r->p_sps[k] = cJSON_GetObjectItem(r->peer[k], "samples_per_s")->valuedouble;
    }
    for (int k = 0; k < r->c_rounds; k++)
        r->c_sps[k] = cJSON_GetObjectItem(r->peer_c[k], "samples_per_s")->valuedouble;
    r->d_med = median(r->d_sps, r->nrounds);
    r->p_med = median(r->p_sps, r->nrounds);
    r->c_med = r->c_rounds ? median(r->c_sps, r->c_rounds) : 0;
    r->d_med_round = 0;
    for (int k = 1; k < r->nrounds; k++)
        if (fabs(r->d_sps[k] - r->d_med) < fabs(r->d_sps[r->d_med_round] - r->d_med))
            r->d_med_round = k;
}

static void where_text(const phase_acc *a, char *buf, size_t len)
{
    double tot = 0;
    for (int p = 0; p < PH_COUNT; p++)
        tot += a->t[p];
    double fb = a->t[PH_FWD] + a->t[PH_BWD];
    snprintf(buf, len,
             "fwd %.0f%%, bwd %.0f%%, optim %.0f%%, gather %.0f%%, loss %.0f%%, zero %.0f%%; "
             "BLAS %.0f%% of fwd+bwd",
             100 * a->t[PH_FWD] / tot, 100 * a->t[PH_BWD] / tot, 100 * a->t[PH_OPTIM] / tot,
             100 * a->t[PH_GATHER] / tot, 100 * a->t[PH_LOSS] / tot, 100 * a->t[PH_ZERO] / tot,
             fb > 0 ? 100 * (a->blas_fwd_s + a->blas_bwd_s) / fb : 0.0);
}

/* ms per step before the step's sync (gather to backward) and after it (the optimizer). */
static double to_sync_s(const phase_acc *a)
{
    return a->t[PH_GATHER] + a->t[PH_ZERO] + a->t[PH_FWD] + a->t[PH_LOSS] + a->t[PH_BWD];
}

/* The last column of the comparison table: where distill's time goes, as far as it is known. */
static void step_text(const model_result *r, const bench_opts *o, char *buf, size_t len)
{
    const distill_round *dr = &r->d[r->d_med_round];
    if (o->infer)
        snprintf(buf, len, "%.3f ms per batch of %d (upload, forward, download)", dr->step_ms,
                 o->eval_batch);
    else if (o->cuda)
        snprintf(buf, len, "%.3f ms: %.3f to the step's sync + %.3f host optimizer", dr->step_ms,
                 1e3 * to_sync_s(&dr->ph) / o->steps, 1e3 * dr->ph.t[PH_OPTIM] / o->steps);
    else
        where_text(&dr->ph, buf, len);
}

static cJSON *numbers(const double *v, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

/* A target and whether it is met: null when there is no target, or for "met" when the peer did
 * not run (measured 0). */
static void add_target(cJSON *j, const char *name, const char *met_name, double target,
                       int measured, double ratio)
{
    if (target > 0)
        cJSON_AddNumberToObject(j, name, target);
    else
        cJSON_AddNullToObject(j, name);
    if (target > 0 && measured)
        cJSON_AddBoolToObject(j, met_name, ratio >= target);
    else
        cJSON_AddNullToObject(j, met_name);
}

/* The peer's medians, every round and its runs; takes the run objects over. */
static cJSON *peer_json(double med, const double *sps, cJSON **runs, int n)
{
    cJSON *p = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddNumberToObject(p, "samples_per_s", med);
    cJSON_AddItemToObject(p, "samples_per_s_rounds", numbers(sps, n));
    for (int k = 0; k < n; k++) {
        cJSON_AddItemToArray(arr, runs[k]);
        runs[k] = NULL;
    }
    cJSON_AddItemToObject(p, "runs", arr);
    return p;
}

/* distill's side of a training round on the CPU: every phase and the BLAS share. */
static void distill_phases_cpu(cJSON *dj, const phase_acc *a, int steps)
{
    cJSON *ms = cJSON_CreateObject(), *pct = cJSON_CreateObject();
    double tot = 0;
    for (int p = 0; p < PH_COUNT; p++)
        tot += a->t[p];
    for (int p = 0; p < PH_COUNT; p++) {
        cJSON_AddNumberToObject(ms, ph_names[p], 1e3 * a->t[p] / steps);
        cJSON_AddNumberToObject(pct, ph_names[p], 100 * a->t[p] / tot);
    }
    double fb = a->t[PH_FWD] + a->t[PH_BWD], blas = a->blas_fwd_s + a->blas_bwd_s;
    cJSON_AddItemToObject(dj, "phase_ms", ms);
    cJSON_AddItemToObject(dj, "phase_pct", pct);
    cJSON_AddNumberToObject(dj, "blas_ms_forward", 1e3 * a->blas_fwd_s / steps);
    cJSON_AddNumberToObject(dj, "blas_ms_backward", 1e3 * a->blas_bwd_s / steps);
    cJSON_AddNumberToObject(dj, "blas_fraction_of_fwd_bwd", fb > 0 ? blas / fb : 0);
    cJSON_AddNumberToObject(dj, "blas_calls_per_step", (double)a->blas_calls / steps);
    cJSON_AddNumberToObject(dj, "blas_gflops", blas > 0 ? a->blas_flops / blas * 1e-9 : 0);
}

/* The model's JSON; takes the peer objects over. */
static cJSON *result_json(model_result *r, const bench_opts *o)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "model", r->file);
    if (r->not_measured[0]) {
        cJSON_AddStringToObject(j, "not_measured", r->not_measured);
        return j;
    }
    const int steps = o->steps, batch = o->infer ? o->eval_batch : o->batch;
    const phase_acc *a = &r->d[r->d_med_round].ph;
    cJSON *dj = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "params", (double)r->params);
    cJSON_AddNumberToObject(dj, "samples_per_s", r->d_med);
    cJSON_AddBoolToObject(dj, "cuda_graph", r->graph);
    cJSON_AddItemToObject(dj, "samples_per_s_rounds", numbers(r->d_sps, r->nrounds));
    cJSON_AddNumberToObject(dj, o->infer ? "batch_ms" : "step_ms", 1e3 * batch / r->d_med);
    if (!o->infer) {
        cJSON_AddNumberToObject(dj, "first_loss", r->first_loss);
        cJSON_AddNumberToObject(dj, "loss_steps_41_50", r->check_loss);
    }
    if (!o->infer && !o->cuda) {
        distill_phases_cpu(dj, a, steps);
    } else if (!o->infer) {
        cJSON *ms = cJSON_CreateObject();
        cJSON_AddNumberToObject(ms, "to_sync", 1e3 * to_sync_s(a) / steps);
        cJSON_AddNumberToObject(ms, "optimizer_host", 1e3 * a->t[PH_OPTIM] / steps);
        cJSON_AddItemToObject(dj, "phase_ms", ms);
        cJSON_AddStringToObject(dj, "phase_note",
                                "on the device only the split at the step's one sync is "
                                "timed: gather, upload, forward, loss and backward up to "
                                "be->sync(), then the optimizer on host copies");
    }
    cJSON_AddItemToObject(j, "distill", dj);
    cJSON_AddItemToObject(j, "pytorch", peer_json(r->p_med, r->p_sps, r->peer, r->nrounds));
    cJSON_AddNumberToObject(j, "ratio", r->d_med / r->p_med);
    add_target(j, "target_ratio", "target_met", r->target, 1, r->d_med / r->p_med);
    if (!o->compile)
        return j;
    if (r->c_rounds) {
        cJSON_AddItemToObject(j, "pytorch_compile",
                              peer_json(r->c_med, r->c_sps, r->peer_c, r->c_rounds));
        cJSON_AddNumberToObject(j, "ratio_compile", r->d_med / r->c_med);
    } else {
        cJSON *c = cJSON_CreateObject();
        cJSON_AddStringToObject(c, "unavailable", r->c_unavailable);
        cJSON_AddItemToObject(j, "pytorch_compile", c);
        cJSON_AddNullToObject(j, "ratio_compile");
    }
    add_target(j, "target_ratio_compile", "target_met_compile", r->target_c, r->c_rounds,
               r->c_rounds ? r->d_med / r->c_med : 0);
    if (r->c_rounds && r->c_unavailable[0])
        cJSON_AddStringToObject(j, "compile_note", r->c_unavailable);
    return j;
}

static int write_json(const char *path, cJSON *doc)
{
    char *text = cJSON_Print(doc);
    FILE *f = fopen(path, "w");
    int ok = f && text && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0)
        ok = 0;
    if (!ok)
        fprintf(stderr, "bench_train_throughput: cannot write %s: %s\n", path, strerror(errno));
    else
        printf("wrote %s\n", path);
    free(text);
    return ok;
}

/* Where the JSON goes: --json, else bench/results/<default name> (the folder made if needed). */
static int json_path(const bench_opts *o, char *path, size_t len)
{
    if (o->json) {
        snprintf(path, len, "%s", o->json);
        return 1;
    }
    char dir[2048];
    snprintf(dir, sizeof dir, "%s/bench/results", o->root);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "bench_train_throughput: cannot create %s: %s\n", dir, strerror(errno));
        return 0;
    }
    snprintf(path, len, "%s/%s%s.json", dir, o->infer ? "infer_throughput" : "train_throughput",
             o->cuda ? "_cuda" : "");
    return 1;
}

/* ---- one model ---- */

/* After distill's round k, the peer's: eager, then compiled while that works. 0, or 2 when
 * the eager peer is unavailable. */
static int peer_round(model_result *r, const bench_opts *o, const char *yaml, int k)
{
    char why[512];
    if (!(r->peer[k] = run_peer(o, yaml, 0, why, sizeof why))) {
        /* distill's own figure still helps when comparing two builds without the peer */
        fprintf(stderr, "  %s round %d: distill %.0f samples/s\n", r->file, k + 1, r->d[k].sps);
        fprintf(stderr, "bench_train_throughput: PyTorch peer unavailable (%s)\n", why);
        return 2;
    }
    r->nrounds = k + 1;
    if (o->compile && !r->c_unavailable[0]) {
        if ((r->peer_c[r->c_rounds] =
                 run_peer(o, yaml, 1, r->c_unavailable, sizeof r->c_unavailable)))
            r->c_rounds++;
        else
            fprintf(stderr, "  %s: %s: eager PyTorch only from here on\n", r->file,
                    r->c_unavailable);
    }
    fprintf(stderr, "  %s round %d: distill %.0f samples/s, PyTorch %.0f samples/s", r->file, k + 1,
            r->d[k].sps, cJSON_GetObjectItem(r->peer[k], "samples_per_s")->valuedouble);
    if (r->c_rounds == r->nrounds)
        fprintf(stderr, ", torch.compile %.0f samples/s",
                cJSON_GetObjectItem(r->peer_c[k], "samples_per_s")->valuedouble);
    fputc('\n', stderr);
    return 0;
}

static void not_measured(model_result *r, const bench_opts *o)
{
    fprintf(stderr, "bench_train_throughput: %s not measured on %s: %s\n", r->file, o->be->name,
            r->not_measured);
}

/* Training: warm-up and check, then `rounds` alternations of distill's timed steps and the
 * peer's run. 0, 1 (a check failed), 2 (the peer is unavailable or the backend lacks an op). */
static int bench_model(model_result *r, const kd_dataset *d, const bench_opts *o)
{
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "%s/configs/fashion-mnist/models/%s", o->root, r->file);
    trainer tr;
    int rc = trainer_init(&tr, yaml, d, o, &r->first_loss, &r->check_loss, r->not_measured,
                          sizeof r->not_measured);
    if (rc != 0) {
        if (rc == 2)
            not_measured(r, o);
        trainer_free(&tr);
        return rc;
    }
    r->params = tr.m->nparams;
    r->graph = tr.rec.use && tr.rec.rec;
    fprintf(stderr, "  %s: check passed, loss %.3f -> %.3f over %d steps%s\n", r->file,
            r->first_loss, r->check_loss, CHECK_STEPS,
            r->graph ? "; steps replayed from a CUDA graph" : "");
    for (int k = 0; k < o->rounds && rc == 0; k++)
        rc = trainer_time(&tr, o->steps, &r->d[k]) ? peer_round(r, o, yaml, k) : 1;
    trainer_free(&tr);
    return rc;
}

/* Inference: check, warm-up, then `rounds` alternations as above. */
static int bench_infer(model_result *r, const kd_dataset *d, const bench_opts *o)
{
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "%s/configs/fashion-mnist/models/%s", o->root, r->file);
    inferer in = {.d = d, .batch = o->eval_batch};
    int rc =
        build_model(yaml, o->be, o->eval_batch, &in.m, r->not_measured, sizeof r->not_measured);
    if (rc == 2)
        not_measured(r, o);
    if (rc == 0 && !model_fits(in.m, d, yaml))
        rc = 1;
    if (rc == 0 &&
        (!(in.logits = malloc((size_t)in.batch * in.m->out_features * sizeof(float))) ||
         in.m->be->alloc((void **)&in.x_dev, (size_t)in.batch * in.m->in_numel * sizeof(float)))) {
        fprintf(stderr, "bench_train_throughput: out of memory\n");
        rc = 1;
    }
    if (rc == 0 && !inferer_check(&in, yaml))
        rc = 1;
    for (int i = 0; rc == 0 && i < o->warmup; i++)
        if (infer_batch(&in) != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
            rc = 1;
        }
    if (rc == 0) {
        r->params = in.m->nparams;
        fprintf(stderr, "  %s: logits checked, %d warm-up batches of %d\n", r->file, o->warmup,
                in.batch);
    }
    for (int k = 0; k < o->rounds && rc == 0; k++)
        rc = inferer_time(&in, o->steps, &r->d[k]) ? peer_round(r, o, yaml, k) : 1;
    inferer_free(&in);
    return rc;
}

/* ---- tables ---- */

/* The CPU training tables, eager peer only: where each phase of distill's step goes. */
static void print_cpu_tables(const model_result *res, int n)
{
    printf("\n%-16s | %7s | %17s | %17s | %5s | %s\n", "model", "params", "distill samples/s",
           "PyTorch samples/s", "ratio", "where distill's step goes");
    printf("%.16s-|-%.7s-|-%.17s-|-%.17s-|-%.5s-|-%.60s\n", "----------------------------",
           "----------", "---------------------", "---------------------", "-------",
           "--------------------------------------------------------------------------------");
    for (int i = 0; i < n; i++) {
        char where[256];
        where_text(&res[i].d[res[i].d_med_round].ph, where, sizeof where);
        printf("%-16s | %7zu | %17.0f | %17.0f | %4.2fx | %s\n", res[i].label, res[i].params,
               res[i].d_med, res[i].p_med, res[i].d_med / res[i].p_med, where);
    }
    printf("\nrange over rounds (samples/s): ");
    for (int i = 0; i < n; i++)
        printf("%s%s distill %.0f-%.0f, PyTorch %.0f-%.0f", i ? "; " : "", res[i].label,
               min_of(res[i].d_sps, res[i].nrounds), max_of(res[i].d_sps, res[i].nrounds),
               min_of(res[i].p_sps, res[i].nrounds), max_of(res[i].p_sps, res[i].nrounds));
    printf("\n");
}

/* distill's phases on the CPU, ms per step, with the BLAS time inside forward and backward. */
static void print_cpu_phases(const model_result *res, int n, const bench_opts *o)
{
    printf("\ndistill, ms per step ");
    for (int p = 0; p < PH_COUNT; p++)
        printf(" %9s", ph_names[p]);
    printf(" %9s %9s %7s %6s\n", "total", "BLAS", "GFLOP/s", "GEMMs");
    for (int i = 0; i < n; i++) {
        const distill_round *dr = &res[i].d[res[i].d_med_round];
        const phase_acc *a = &dr->ph;
        double blas = a->blas_fwd_s + a->blas_bwd_s;
        printf("%-21s", res[i].label);
        for (int p = 0; p < PH_COUNT; p++)
            printf(" %9.3f", 1e3 * a->t[p] / o->steps);
        printf(" %9.3f %9.3f %7.1f %6.0f\n", dr->step_ms, 1e3 * blas / o->steps,
               blas > 0 ? a->blas_flops / blas * 1e-9 : 0.0, (double)a->blas_calls / o->steps);
    }
}

/* Against eager and torch.compile: samples/s, both ratios, and distill's step. */
static void print_pair_table(const model_result *res, int n, const bench_opts *o)
{
    printf("\n%-16s | %7s | %17s | %15s | %17s | %8s | %10s | %s\n", "model", "params",
           "distill samples/s", "eager samples/s", "compile samples/s", "vs eager", "vs compile",
           o->infer ? "distill per batch" : "distill per step");
    printf("-----------------|---------|-------------------|-----------------|------------------"
           "-|----------|------------|------------------------------------------\n");
    for (int i = 0; i < n; i++) {
        const model_result *r = &res[i];
        if (r->not_measured[0]) {
            printf("%-16s | not measured: %s\n", r->label, r->not_measured);
            continue;
        }
        char step[256], c[32] = "-", cr[32] = "-";
        step_text(r, o, step, sizeof step);
        if (r->c_rounds) {
            snprintf(c, sizeof c, "%.0f", r->c_med);
            snprintf(cr, sizeof cr, "%.2fx", r->d_med / r->c_med);
        }
        printf("%-16s | %7zu | %17.0f | %15.0f | %17s | %7.2fx | %10s | %s\n", r->label, r->params,
               r->d_med, r->p_med, c, r->d_med / r->p_med, cr, step);
    }
    printf("\nrange over rounds (samples/s): ");
    for (int i = 0, first = 1; i < n; i++) {
        const model_result *r = &res[i];
        if (r->not_measured[0])
            continue;
        printf("%s%s distill %.0f-%.0f, eager %.0f-%.0f", first ? "" : "; ", r->label,
               min_of(r->d_sps, r->nrounds), max_of(r->d_sps, r->nrounds),
               min_of(r->p_sps, r->nrounds), max_of(r->p_sps, r->nrounds));
        if (r->c_rounds)
            printf(", compile %.0f-%.0f", min_of(r->c_sps, r->c_rounds),
                   max_of(r->c_sps, r->c_rounds));
        first = 0;
    }
    printf("\n");
    for (int i = 0; i < n; i++)
        if (res[i].c_unavailable[0] && !res[i].not_measured[0])
            printf("%s: %s%s\n", res[i].label, res[i].c_unavailable,
                   res[i].c_rounds ? " (after some rounds)" : "");
}

static void print_target(const char *peer, double target, double ratio, int first)
{
    if (target > 0)
        printf("%s>= %.1fx %s: %s (%.2fx)", first ? "" : ", ", target, peer,
               ratio >= target ? "met" : "MISSED", ratio);
}

static void print_targets(const model_result *res, int n)
{
    printf("targets: ");
    for (int i = 0; i < n; i++) {
        const model_result *r = &res[i];
        printf("%s%s ", i ? "; " : "", r->label);
        if (r->not_measured[0]) {
            printf("not measured");
            continue;
        }
        double ratio = r->d_med / r->p_med;
        if (r->target <= 0 && (r->target_c <= 0 || !r->c_rounds)) {
            printf("%.2fx (no target)", ratio);
            continue;
        }
        /* "PyTorch" alone when there is no compiled peer, as the CPU table has always said */
        print_target(r->c_med > 0 || r->target_c > 0 ? "eager" : "PyTorch", r->target, ratio, 1);
        if (r->target_c > 0 && !r->c_rounds)
            printf("%storch.compile not measured", r->target > 0 ? ", " : "");
        else if (r->c_rounds)
            print_target("torch.compile", r->target_c, r->d_med / r->c_med, r->target <= 0);
    }
    printf("\n");
}

/* ---- main ---- */

/* The models this run measures, with the targets for its device and mode. */
static int select_models(const bench_opts *o, model_result *res)
{
    int n = 0;
    for (int i = 0; i < NSPECS; i++) {
        const model_spec *s = &k_models[i];
        int want = o->only    ? listed(o->only, s->file)
                   : o->infer ? !strcmp(s->file, "teacher_cnn.yaml")
                              : s->by_default;
        if (!want)
            continue;
        memset(&res[n], 0, sizeof res[n]);
        res[n].file = s->file;
        res[n].label = s->label;
        res[n].target = o->infer ? (o->cuda ? s->inf : 0) : o->cuda ? s->gpu : s->cpu;
        res[n].target_c = !o->cuda ? 0 : o->infer ? s->inf_c : s->gpu_c;
        n++;
    }
    return n;
}

static const char *peer_string(const model_result *res, int n, const char *key)
{
    for (int i = 0; i < n; i++)
        if (res[i].nrounds)
            return cJSON_GetStringValue(cJSON_GetObjectItem(res[i].peer[0], key));
    return NULL;
}

static cJSON *result_doc(model_result *res, int n, const bench_opts *o, int64_t samples,
                         const char *device_info)
{
    const char *torch_v = peer_string(res, n, "torch");
    const char *gpu = peer_string(res, n, "device_name");
    cJSON *doc = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddStringToObject(doc, "bench", o->infer ? "infer_throughput" : "train_throughput");
    cJSON_AddStringToObject(doc, "device", o->cuda ? "cuda" : "cpu");
    if (o->cuda) {
        cJSON_AddStringToObject(doc, "device_info", device_info);
        cJSON_AddStringToObject(doc, "device_name", gpu ? gpu : "?");
    }
    cJSON_AddStringToObject(doc, "dataset", "fashion-mnist (train split)");
    if (o->infer) {
        cJSON_AddNumberToObject(doc, "samples", (double)samples);
        cJSON_AddNumberToObject(doc, "eval_batch", o->eval_batch);
        cJSON_AddNumberToObject(doc, "warmup_batches", o->warmup);
        cJSON_AddNumberToObject(doc, "timed_batches", o->steps);
    } else {
        cJSON_AddNumberToObject(doc, "batch", o->batch);
        cJSON_AddNumberToObject(doc, "warmup_steps", o->warmup);
        cJSON_AddNumberToObject(doc, "timed_steps", o->steps);
    }
    cJSON_AddNumberToObject(doc, "rounds", o->rounds);
    cJSON_AddNumberToObject(doc, "threads", o->threads);
    if (!o->infer)
        cJSON_AddStringToObject(doc, "optimizer", "AdamW lr 1e-3 weight_decay 1e-4");
    cJSON_AddStringToObject(doc, "torch", torch_v ? torch_v : "?");
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(arr, result_json(&res[i], o));
    cJSON_AddItemToObject(doc, "models", arr);
    return doc;
}

int main(int argc, char **argv)
{
    bench_opts o = {.warmup = 50,
                    .steps = 200,
                    .batch = 128,
                    .threads = 2,
                    .rounds = 3,
                    .eval_batch = 500,
                    .compile = -1,
                    .root = NULL,
                    .python = "/usr/bin/python3"};
    /* distill's OpenMP spin, as the distill command runs with it (engine/train.c); the PyTorch
     * peer keeps its own default: the variable is dropped again before it is started, unless
     * the user set it for both */
    kd_openmp_short_spin(argv);
    if (getenv("KD_OPENMP_SPIN_SET")) {
        unsetenv("GOMP_SPINCOUNT");
        unsetenv("KD_OPENMP_SPIN_SET");
    }
    if (!parse_args(argc, argv, &o))
        return 1;
    if (!o.root) /* the current directory when it is the repository, else the source tree */
        o.root = access("configs/fashion-mnist/models/mlp.yaml", R_OK) == 0 ? "." : KD_SOURCE_DIR;
    openblas_set_num_threads(o.threads);
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    const char *device_info = "";
    o.be = o.cuda ? kd_backend_cuda(&device_info) : kd_backend_cpu();
    if (!o.be) {
        fprintf(stderr, "bench_train_throughput: --device cuda: no device: %s\n", device_info);
        return 2;
    }
    model_result res[NSPECS];
    const int NMODELS = select_models(&o, res);
    if (NMODELS == 0) {
        fprintf(stderr, "bench_train_throughput: --only selects no model\n");
        return 1;
    }

    kd_dataset d;
    if (kd_dataset_load("fashion-mnist", NULL, 1, &d) != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 1;
    }
    if (o.infer)
        printf("inference throughput (as `distill cache` runs the teacher): Fashion-MNIST train "
               "(%lld samples) in eval batches of %d, %d warm-up + %d timed batches x %d rounds "
               "(median shown), %d threads\n",
               (long long)d.n, o.eval_batch, o.warmup, o.steps, o.rounds, o.threads);
    else
        printf("train throughput: Fashion-MNIST train (%lld samples), batch %d, AdamW lr 1e-3 wd "
               "1e-4, %d warm-up + %d timed steps x %d rounds (median shown), %d threads\n",
               (long long)d.n, o.batch, o.warmup, o.steps, o.rounds, o.threads);
    if (o.cuda)
        printf("device: cuda (%s); PyTorch eager%s\n", device_info,
               o.compile ? " and torch.compile" : " only");
    fflush(stdout);
    int rc = 0, missing_op = 0;
    for (int i = 0; i < NMODELS && rc == 0; i++) {
        rc = o.infer ? bench_infer(&res[i], &d, &o) : bench_model(&res[i], &d, &o);
        if (rc == 2 && res[i].not_measured[0]) { /* the others still run */
            missing_op = 1;
            rc = 0;
        }
    }
    const int64_t samples = d.n;
    kd_dataset_free(&d);
    if (rc != 0) {
        for (int i = 0; i < NMODELS; i++) {
            for (int k = 0; k < res[i].nrounds; k++)
                cJSON_Delete(res[i].peer[k]);
            for (int k = 0; k < res[i].c_rounds; k++)
                cJSON_Delete(res[i].peer_c[k]);
        }
        return rc;
    }
    for (int i = 0; i < NMODELS; i++)
        if (!res[i].not_measured[0])
            summarise(&res[i]);

    if (!o.cuda && !o.compile && !o.infer)
        print_cpu_tables(res, NMODELS);
    else
        print_pair_table(res, NMODELS, &o);
    if (!o.cuda && !o.infer)
        print_cpu_phases(res, NMODELS, &o);
    print_targets(res, NMODELS);

    char path[2100];
    cJSON *doc = result_doc(res, NMODELS, &o, samples, device_info);
    int ok = json_path(&o, path, sizeof path) && write_json(path, doc);
    cJSON_Delete(doc);
    return !ok ? 1 : missing_op ? 2 : 0;
}
