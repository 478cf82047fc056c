/*
 * train_throughput.c - training throughput of distill against PyTorch on Fashion-MNIST.
 *
 *   ./build/bench_train_throughput [--warmup N] [--steps N] [--batch N] [--threads N]
 *                                  [--rounds N] [--root DIR] [--python PATH] [--only FILE]
 *
 * For the MLP and the tiny CNN of configs/fashion-mnist/models: build the model, train it with
 * AdamW (lr 1e-3, weight decay 1e-4) and mean cross-entropy on the pre-loaded training set
 * (one permutation per epoch, batches gathered by index, no augmentation), check that the
 * first 50 steps lower a finite loss, then time `steps` steps phase by phase: batch gather
 * (kd_batch_gather and the upload, as the trainer does), zero_grad, forward, loss, backward,
 * optimizer. Every cblas_sgemm the engine issues is timed in place: the executable is linked
 * with --wrap=cblas_sgemm (bench/CMakeLists.txt), so the "BLAS" share is measured, not
 * estimated. The PyTorch peer (bench/pytorch/train_throughput.py) runs the same schedule in
 * the same invocation, alternating with distill for `rounds` rounds (the host is shared, so a
 * single run can be off by a factor of two); the table shows medians, the JSON every round.
 * Exits 1 when a check fails, 2 when the PyTorch peer is unavailable.
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

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef KD_SOURCE_DIR
#define KD_SOURCE_DIR "."
#endif

#define CHECK_STEPS 50 /* steps whose losses must fall before anything is timed */
#define MAX_ROUNDS  9

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

/* ---- options ---- */

typedef struct {
    int warmup, steps, batch, threads, rounds;
    const char *root, *python, *only;
} bench_opts;

static int parse_args(int argc, char **argv, bench_opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *num = !strcmp(a, "--warmup")    ? &o->warmup
                   : !strcmp(a, "--steps")   ? &o->steps
                   : !strcmp(a, "--batch")   ? &o->batch
                   : !strcmp(a, "--threads") ? &o->threads
                   : !strcmp(a, "--rounds")  ? &o->rounds
                                             : NULL;
        if ((num || !strcmp(a, "--root") || !strcmp(a, "--python") || !strcmp(a, "--only")) && !v) {
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
        } else if (!strcmp(a, "--root")) {
            o->root = argv[++i];
        } else if (!strcmp(a, "--python")) {
            o->python = argv[++i];
        } else if (!strcmp(a, "--only")) {
            o->only = argv[++i];
        } else {
            fprintf(stderr,
                    "usage: bench_train_throughput [--warmup N (>= %d)] [--steps N] [--batch N] "
                    "[--threads N] [--rounds N (<= %d)] [--root DIR] [--python PATH] "
                    "[--only mlp.yaml|tiny_cnn.yaml]\n",
                    CHECK_STEPS, MAX_ROUNDS);
            return 0;
        }
    }
    if (o->rounds > MAX_ROUNDS) {
        fprintf(stderr, "bench_train_throughput: --rounds must be at most %d\n", MAX_ROUNDS);
        return 0;
    }
    if (o->warmup < CHECK_STEPS) {
        fprintf(stderr, "bench_train_throughput: --warmup must be at least %d (the check)\n",
                CHECK_STEPS);
        return 0;
    }
    return 1;
}

/* ---- one model ---- */

enum { PH_GATHER, PH_ZERO, PH_FWD, PH_LOSS, PH_BWD, PH_OPTIM, PH_COUNT };
static const char *const ph_names[PH_COUNT] = {"gather", "zero_grad", "forward",
                                               "loss",   "backward",  "optimizer"};

typedef struct {
    double t[PH_COUNT]; /* seconds summed over the timed steps */
    double blas_fwd_s, blas_bwd_s, blas_flops;
    long blas_calls;
} phase_acc;

typedef struct {
    kd_model *m;
    const kd_dataset *d;
    kd_optim_cfg optim;
    float *state, *x_host, *x_dev;
    int32_t *y_host, *y_dev;
    uint32_t *perm;
    int64_t pos, epoch, step;
    int batch;
} trainer;

/* One training step as engine/train.c does it, each phase timed into acc (may be NULL). */
static kd_status train_step(trainer *tr, phase_acc *acc, double *loss_out)
{
    kd_model *m = tr->m;
    const kd_backend *be = m->be;
    const size_t per = m->in_numel;
    double t[PH_COUNT + 1], b0, b1, b2, f0;
    long c0 = g_blas_calls;
    f0 = g_blas_flops;

    t[0] = now_s();
    if (tr->pos + tr->batch > tr->d->n) { /* next epoch; every step is a full batch */
        tr->epoch++;
        tr->pos = 0;
        kd_epoch_permutation(tr->perm, (uint32_t)tr->d->n, 1, (uint64_t)tr->epoch);
    }
    kd_batch_gather(tr->d, tr->perm + tr->pos, tr->batch, NULL, 1, (uint64_t)tr->epoch, tr->x_host,
                    tr->y_host, NULL);
    tr->pos += tr->batch;
    KD_TRY(be->upload(tr->x_dev, tr->x_host, (size_t)tr->batch * per * sizeof(float)));
    KD_TRY(be->upload(tr->y_dev, tr->y_host, (size_t)tr->batch * sizeof(int32_t)));
    t[1] = now_s();
    kd_model_zero_grad(m);
    t[2] = now_s();
    b0 = g_blas_s;
    kd_model_forward(m, tr->x_dev, tr->batch, 1, (uint64_t)tr->step);
    b1 = g_blas_s;
    t[3] = now_s();
    int64_t correct = 0;
    double loss = be->ce(tr->batch, m->out_features, kd_model_output(m), tr->y_dev, 0.0,
                         kd_model_output_grad(m), 1.0, &correct);
    t[4] = now_s();
    kd_model_backward(m, tr->x_dev, tr->batch);
    KD_TRY(be->sync());
    b2 = g_blas_s;
    t[5] = now_s();
    KD_TRY(kd_optim_step(&tr->optim, m->params, m->grads, tr->state, m->decay_mask, m->nparams,
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
    *loss_out = loss / tr->batch; /* ce returns the summed loss */
    return KD_OK;
}

typedef struct {
    double sps, step_ms;
    phase_acc ph;
} distill_round;

/* Build the model and run the warm-up, whose first CHECK_STEPS steps must lower a finite loss. */
static int trainer_init(trainer *tr, const char *yaml, const kd_dataset *d, const bench_opts *o,
                        double *first_loss, double *check_loss)
{
    kd_node *root = NULL;
    memset(tr, 0, sizeof *tr);
    tr->d = d;
    tr->batch = o->batch;
    int ok = 0;
    kd_status st = kd_yaml_load_file(yaml, &root);
    if (st == KD_OK)
        st = kd_model_build(kd_node_child(root, "input"), kd_node_child(root, "layers"),
                            kd_backend_cpu(), o->batch, 1, &tr->m);
    kd_node_free(root);
    if (st != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
        return 0;
    }
    kd_model *m = tr->m;
    const kd_backend *be = m->be;
    if (m->in_numel != (size_t)d->c * d->h * d->w || m->out_features != d->num_classes) {
        fprintf(stderr, "bench_train_throughput: %s does not fit %s\n", yaml, d->name);
        return 0;
    }
    tr->optim = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    tr->optim.lr = 1e-3;
    tr->optim.weight_decay = 1e-4;
    size_t nstate = kd_optim_state_floats(&tr->optim, m->nparams);
    tr->x_host = malloc((size_t)o->batch * m->in_numel * sizeof(float));
    tr->y_host = malloc((size_t)o->batch * sizeof(int32_t));
    tr->perm = malloc((size_t)d->n * sizeof(uint32_t));
    if (!tr->x_host || !tr->y_host || !tr->perm ||
        be->alloc((void **)&tr->x_dev, (size_t)o->batch * m->in_numel * sizeof(float)) ||
        be->alloc((void **)&tr->y_dev, (size_t)o->batch * sizeof(int32_t)) ||
        be->alloc((void **)&tr->state, nstate * sizeof(float))) {
        fprintf(stderr, "bench_train_throughput: out of memory\n");
        return 0;
    }
    kd_epoch_permutation(tr->perm, (uint32_t)d->n, 1, 0);

    double loss, head = 0, tail = 0;
    for (int i = 0; i < o->warmup; i++) {
        if ((st = train_step(tr, NULL, &loss))) {
            fprintf(stderr, "bench_train_throughput: %s: %s\n", yaml, kd_last_error());
            return 0;
        }
        if (i == 0)
            *first_loss = loss;
        if (i < CHECK_STEPS && !isfinite(loss)) {
            fprintf(stderr, "bench_train_throughput: %s: loss is %g at step %d\n", yaml, loss,
                    i + 1);
            return 0;
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
        return 0;
    }
    ok = 1;
    return ok;
}

/* Time `steps` more steps. */
static int trainer_time(trainer *tr, int steps, distill_round *r)
{
    double loss = 0;
    memset(r, 0, sizeof *r);
    double t0 = now_s();
    for (int i = 0; i < steps; i++) {
        if (train_step(tr, &r->ph, &loss) != KD_OK) {
            fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
            return 0;
        }
    }
    double el = now_s() - t0;
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
        tr->m->be->release(tr->x_dev);
        tr->m->be->release(tr->y_dev);
        tr->m->be->release(tr->state);
    }
    free(tr->x_host);
    free(tr->y_host);
    free(tr->perm);
    kd_model_free(tr->m);
    memset(tr, 0, sizeof *tr);
}

/* ---- the PyTorch peer ---- */

/* Run the peer; its JSON (stdout's last '{' line) or NULL when it is unavailable or fails. */
static cJSON *run_peer(const bench_opts *o, const char *yaml)
{
    if (access(o->python, X_OK) != 0) {
        fprintf(stderr, "bench_train_throughput: PyTorch peer unavailable: %s: %s\n", o->python,
                strerror(errno));
        return NULL;
    }
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "'%s' '%s/bench/pytorch/train_throughput.py' --model '%s' --batch %d --warmup %d "
             "--steps %d --threads %d",
             o->python, o->root, yaml, o->batch, o->warmup, o->steps, o->threads);
    FILE *p = popen(cmd, "r");
    if (!p) {
        fprintf(stderr, "bench_train_throughput: PyTorch peer unavailable: cannot run %s: %s\n",
                o->python, strerror(errno));
        return NULL;
    }
    char line[8192], last[8192] = "";
    while (fgets(line, sizeof line, p))
        if (line[0] == '{')
            snprintf(last, sizeof last, "%s", line);
    int rc = pclose(p);
    cJSON *j = last[0] ? cJSON_Parse(last) : NULL;
    if (rc != 0 || !j || !cJSON_IsNumber(cJSON_GetObjectItem(j, "samples_per_s"))) {
        fprintf(stderr,
                "bench_train_throughput: PyTorch peer unavailable (%s exited with status %d%s); "
                "it needs PyTorch and NumPy for that interpreter\n",
                o->python, WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, j ? "" : ", no JSON");
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* ---- report ---- */

typedef struct {
    const char *file, *label;
    double target; /* distill / PyTorch samples/s the issue asks for */
    size_t params;
    double first_loss, check_loss;
    int nrounds;
    distill_round d[MAX_ROUNDS];
    cJSON *peer[MAX_ROUNDS];
    double d_sps[MAX_ROUNDS], p_sps[MAX_ROUNDS];
    double d_med, p_med;
    int d_med_round; /* the round whose phases are shown */
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
    r->d_med = median(r->d_sps, r->nrounds);
    r->p_med = median(r->p_sps, r->nrounds);
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

static cJSON *numbers(const double *v, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

/* The model's JSON; takes the peer objects over. */
static cJSON *result_json(model_result *r, int steps, int batch)
{
    const distill_round *dr = &r->d[r->d_med_round];
    const phase_acc *a = &dr->ph;
    cJSON *j = cJSON_CreateObject(), *dj = cJSON_CreateObject(), *ms = cJSON_CreateObject(),
          *pct = cJSON_CreateObject(), *pj = cJSON_CreateArray();
    double tot = 0;
    for (int p = 0; p < PH_COUNT; p++)
        tot += a->t[p];
    for (int p = 0; p < PH_COUNT; p++) {
        cJSON_AddNumberToObject(ms, ph_names[p], 1e3 * a->t[p] / steps);
        cJSON_AddNumberToObject(pct, ph_names[p], 100 * a->t[p] / tot);
    }
    double fb = a->t[PH_FWD] + a->t[PH_BWD], blas = a->blas_fwd_s + a->blas_bwd_s;
    cJSON_AddStringToObject(j, "model", r->file);
    cJSON_AddNumberToObject(j, "params", (double)r->params);
    cJSON_AddNumberToObject(dj, "samples_per_s", r->d_med);
    cJSON_AddItemToObject(dj, "samples_per_s_rounds", numbers(r->d_sps, r->nrounds));
    cJSON_AddNumberToObject(dj, "step_ms", 1e3 * batch / r->d_med);
    cJSON_AddNumberToObject(dj, "first_loss", r->first_loss);
    cJSON_AddNumberToObject(dj, "loss_steps_41_50", r->check_loss);
    cJSON_AddItemToObject(dj, "phase_ms", ms);
    cJSON_AddItemToObject(dj, "phase_pct", pct);
    cJSON_AddNumberToObject(dj, "blas_ms_forward", 1e3 * a->blas_fwd_s / steps);
    cJSON_AddNumberToObject(dj, "blas_ms_backward", 1e3 * a->blas_bwd_s / steps);
    cJSON_AddNumberToObject(dj, "blas_fraction_of_fwd_bwd", fb > 0 ? blas / fb : 0);
    cJSON_AddNumberToObject(dj, "blas_calls_per_step", (double)a->blas_calls / steps);
    cJSON_AddNumberToObject(dj, "blas_gflops", blas > 0 ? a->blas_flops / blas * 1e-9 : 0);
    cJSON_AddItemToObject(j, "distill", dj);
    cJSON *p0 = cJSON_CreateObject();
    cJSON_AddNumberToObject(p0, "samples_per_s", r->p_med);
    cJSON_AddItemToObject(p0, "samples_per_s_rounds", numbers(r->p_sps, r->nrounds));
    for (int k = 0; k < r->nrounds; k++) {
        cJSON_AddItemToArray(pj, r->peer[k]);
        r->peer[k] = NULL;
    }
    cJSON_AddItemToObject(p0, "runs", pj);
    cJSON_AddItemToObject(j, "pytorch", p0);
    cJSON_AddNumberToObject(j, "ratio", r->d_med / r->p_med);
    cJSON_AddNumberToObject(j, "target_ratio", r->target);
    cJSON_AddBoolToObject(j, "target_met", r->d_med / r->p_med >= r->target);
    return j;
}

static int write_json(const char *root, cJSON *doc)
{
    char dir[2048], path[2100];
    snprintf(dir, sizeof dir, "%s/bench/results", root);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "bench_train_throughput: cannot create %s: %s\n", dir, strerror(errno));
        return 0;
    }
    snprintf(path, sizeof path, "%s/train_throughput.json", dir);
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

/* Warm-up and check, then `rounds` alternations of distill's timed steps and the peer's run. */
static int bench_model(model_result *r, const kd_dataset *d, const bench_opts *o)
{
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "%s/configs/fashion-mnist/models/%s", o->root, r->file);
    trainer tr;
    int rc = 0;
    if (!trainer_init(&tr, yaml, d, o, &r->first_loss, &r->check_loss)) {
        trainer_free(&tr);
        return 1;
    }
    r->params = tr.m->nparams;
    fprintf(stderr, "  %s: check passed, loss %.3f -> %.3f over %d steps\n", r->file, r->first_loss,
            r->check_loss, CHECK_STEPS);
    for (int k = 0; k < o->rounds && rc == 0; k++) {
        if (!trainer_time(&tr, o->steps, &r->d[k])) {
            rc = 1;
            break;
        }
        if (!(r->peer[k] = run_peer(o, yaml))) {
            rc = 2;
            break;
        }
        r->nrounds = k + 1;
        fprintf(stderr, "  %s round %d: distill %.0f samples/s, PyTorch %.0f samples/s\n", r->file,
                k + 1, r->d[k].sps, cJSON_GetObjectItem(r->peer[k], "samples_per_s")->valuedouble);
    }
    trainer_free(&tr);
    return rc;
}

int main(int argc, char **argv)
{
    bench_opts o = {.warmup = 50,
                    .steps = 200,
                    .batch = 128,
                    .threads = 2,
                    .rounds = 3,
                    .root = NULL,
                    .python = "/usr/bin/python3"};
    if (!parse_args(argc, argv, &o))
        return 1;
    if (!o.root) /* the current directory when it is the repository, else the source tree */
        o.root = access("configs/fashion-mnist/models/mlp.yaml", R_OK) == 0 ? "." : KD_SOURCE_DIR;
    openblas_set_num_threads(o.threads);
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    model_result all[] = {
        {.file = "mlp.yaml", .label = "MLP 784-256-10", .target = 1.0},
        {.file = "tiny_cnn.yaml", .label = "tiny CNN", .target = 1.5},
    };
    model_result res[sizeof all / sizeof all[0]];
    int NMODELS = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!o.only || !strcmp(o.only, all[i].file))
            res[NMODELS++] = all[i];
    if (NMODELS == 0) {
        fprintf(stderr, "bench_train_throughput: --only: no model '%s'\n", o.only);
        return 1;
    }

    kd_dataset d;
    if (kd_dataset_load("fashion-mnist", NULL, 1, &d) != KD_OK) {
        fprintf(stderr, "bench_train_throughput: %s\n", kd_last_error());
        return 1;
    }
    printf("train throughput: Fashion-MNIST train (%lld samples), batch %d, AdamW lr 1e-3 wd "
           "1e-4, %d warm-up + %d timed steps x %d rounds (median shown), %d threads\n",
           (long long)d.n, o.batch, o.warmup, o.steps, o.rounds, o.threads);
    fflush(stdout);
    int rc = 0;
    for (int i = 0; i < NMODELS && rc == 0; i++)
        rc = bench_model(&res[i], &d, &o);
    kd_dataset_free(&d);
    if (rc != 0) {
        for (int i = 0; i < NMODELS; i++)
            for (int k = 0; k < res[i].nrounds; k++)
                cJSON_Delete(res[i].peer[k]);
        return rc;
    }
    for (int i = 0; i < NMODELS; i++)
        summarise(&res[i]);

    const char *torch_v = cJSON_GetStringValue(cJSON_GetObjectItem(res[0].peer[0], "torch"));
    printf("\n%-16s | %7s | %17s | %17s | %5s | %s\n", "model", "params", "distill samples/s",
           "PyTorch samples/s", "ratio", "where distill's step goes");
    printf("%.16s-|-%.7s-|-%.17s-|-%.17s-|-%.5s-|-%.60s\n", "----------------------------",
           "----------", "---------------------", "---------------------", "-------",
           "--------------------------------------------------------------------------------");
    for (int i = 0; i < NMODELS; i++) {
        char where[256];
        where_text(&res[i].d[res[i].d_med_round].ph, where, sizeof where);
        printf("%-16s | %7zu | %17.0f | %17.0f | %4.2fx | %s\n", res[i].label, res[i].params,
               res[i].d_med, res[i].p_med, res[i].d_med / res[i].p_med, where);
    }
    printf("\nrange over rounds (samples/s): ");
    for (int i = 0; i < NMODELS; i++)
        printf("%s%s distill %.0f-%.0f, PyTorch %.0f-%.0f", i ? "; " : "", res[i].label,
               min_of(res[i].d_sps, res[i].nrounds), max_of(res[i].d_sps, res[i].nrounds),
               min_of(res[i].p_sps, res[i].nrounds), max_of(res[i].p_sps, res[i].nrounds));
    printf("\n\ndistill, ms per step ");
    for (int p = 0; p < PH_COUNT; p++)
        printf(" %9s", ph_names[p]);
    printf(" %9s %9s %7s %6s\n", "total", "BLAS", "GFLOP/s", "GEMMs");
    for (int i = 0; i < NMODELS; i++) {
        const distill_round *dr = &res[i].d[res[i].d_med_round];
        const phase_acc *a = &dr->ph;
        double blas = a->blas_fwd_s + a->blas_bwd_s;
        printf("%-21s", res[i].label);
        for (int p = 0; p < PH_COUNT; p++)
            printf(" %9.3f", 1e3 * a->t[p] / o.steps);
        printf(" %9.3f %9.3f %7.1f %6.0f\n", dr->step_ms, 1e3 * blas / o.steps,
               blas > 0 ? a->blas_flops / blas * 1e-9 : 0.0, (double)a->blas_calls / o.steps);
    }
    printf("targets: ");
    for (int i = 0; i < NMODELS; i++) {
        double ratio = res[i].d_med / res[i].p_med;
        printf("%s%s >= %.1fx PyTorch: %s (%.2fx)", i ? "; " : "", res[i].label, res[i].target,
               ratio >= res[i].target ? "met" : "MISSED", ratio);
    }
    printf("\n");

    cJSON *doc = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddStringToObject(doc, "bench", "train_throughput");
    cJSON_AddStringToObject(doc, "dataset", "fashion-mnist (train split)");
    cJSON_AddNumberToObject(doc, "batch", o.batch);
    cJSON_AddNumberToObject(doc, "warmup_steps", o.warmup);
    cJSON_AddNumberToObject(doc, "timed_steps", o.steps);
    cJSON_AddNumberToObject(doc, "rounds", o.rounds);
    cJSON_AddNumberToObject(doc, "threads", o.threads);
    cJSON_AddStringToObject(doc, "optimizer", "AdamW lr 1e-3 weight_decay 1e-4");
    cJSON_AddStringToObject(doc, "torch", torch_v ? torch_v : "?");
    for (int i = 0; i < NMODELS; i++)
        cJSON_AddItemToArray(arr, result_json(&res[i], o.steps, o.batch));
    cJSON_AddItemToObject(doc, "models", arr);
    int ok = write_json(o.root, doc);
    cJSON_Delete(doc);
    return ok ? 0 : 1;
}
