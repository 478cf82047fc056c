/*
 * train.c - the supervised training loop and evaluation.
 *
 * Determinism: the sample order of epoch e is a function of (seed, e), each
 * sample's augmentation of (seed, e, sample index), dropout masks of (seed,
 * step); nothing depends on history, so a run resumed from any checkpoint
 * follows the same path as one that never stopped, bit for bit on the CPU.
 *
 * Memory: the model, optimiser state and one staging batch are allocated
 * before the first step; the loop itself allocates nothing.
 */
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "augment.h"
#include "checkpoint.h"
#include "comm.h"
#include "dataset.h"
#include "fileio.h"
#include "model.h"
#include "quant.h"
#include "rng.h"
#include "sampler.h"
#include "teacher.h"

#ifdef _OPENMP
#include <omp.h>
#endif

void openblas_set_num_threads(int num_threads);

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void kd_set_threads(int n)
{
    openblas_set_num_threads(n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

/*
 * OpenMP's idle threads spin before they sleep, and libgomp's default spin is long (300 000
 * turns, milliseconds). When jobs share a machine (a sweep of students run side by side) the
 * spinning threads of one job take the cores the other needs to reach the barriers of its many
 * short parallel regions: two 2-thread trainings of the tiny student on 2 cores ran at 717
 * samples/s together, against 5 897 for one alone. With GOMP_SPINCOUNT=1000 (tens of
 * microseconds) the pair ran at 6 357 together, and one job alone about 8 % slower than with
 * the long spin (bench/sweep_openmp.sh, README "Several jobs on one machine"). libgomp
 * reads the variable when it loads, before main, so a program (the distill command, the
 * training benchmark) calls this first thing: it sets the variable and runs itself again; a
 * GOMP_SPINCOUNT or OMP_WAIT_POLICY the user set is left as it is. It runs /proc/self/exe
 * again only when that is the file this code was mapped from (own_exe_is_proc_exe): under
 * valgrind /proc/self/exe is valgrind's tool, and when the program was started through the
 * dynamic loader (ld.so ./distill ...) it is the loader, which would read the arguments as a
 * program to run; then nothing is re-run and libgomp keeps its default.
 */
static int own_exe_is_proc_exe(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return 0;
    const uintptr_t here = (uintptr_t)&kd_openmp_short_spin;
    char line[4096], path[4096] = "";
    while (fgets(line, sizeof line, f)) {
        uintptr_t lo, hi;
        int at = 0;
        if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %*s %*s %*s %*s %n", &lo, &hi, &at) == 2 &&
            at > 0 && here >= lo && here < hi) {
            snprintf(path, sizeof path, "%s", line + at);
            path[strcspn(path, "\n")] = 0;
            break;
        }
    }
    fclose(f);
    struct stat a, b;
    return path[0] == '/' && stat(path, &a) == 0 && stat("/proc/self/exe", &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

void kd_openmp_short_spin(char **argv)
{
    if (getenv("GOMP_SPINCOUNT") || getenv("OMP_WAIT_POLICY") || !own_exe_is_proc_exe())
        return;
    if (setenv("GOMP_SPINCOUNT", "1000", 1) != 0 || setenv("KD_OPENMP_SPIN_SET", "1", 1) != 0)
        return;
    execv("/proc/self/exe", argv);
    unsetenv("GOMP_SPINCOUNT"); /* not run again: this process keeps libgomp's default */
    unsetenv("KD_OPENMP_SPIN_SET");
}

kd_status kd_pick_backend(const kd_job *job, const kd_backend **be, FILE *log)
{
    const char *why = NULL;
    if (!strcmp(job->device, "cpu")) {
        *be = kd_backend_cpu();
        return KD_OK;
    }
    const kd_backend *cuda = kd_backend_cuda(&why);
    if (cuda) {
        *be = cuda;
        return KD_OK;
    }
    if (!strcmp(job->device, "cuda"))
        return KD_FAIL(KD_ERR_DEVICE, "%s: run.device is cuda but %s", job->path, why);
    if (log)
        fprintf(log, "device: cpu (%s)\n", why);
    *be = kd_backend_cpu();
    return KD_OK;
}

/*
 * Build the job's model on *be. With device: auto a backend that lacks an
 * operation the model needs gives way to the CPU, saying so in the log.
 */
static kd_status build_model(const kd_job *job, int max_batch, const kd_backend **be, kd_model **m,
                             FILE *log)
{
    kd_status st =
        kd_model_build(job->model_input, job->model_layers, *be, max_batch, job->seed, m);
    const char *miss = NULL;
    if (st == KD_OK && !strcmp(job->mode, "offline") &&
        (miss = kd_backend_missing(*be, job->kd_dkd       ? "kd_dkd,add"
                                        : job->cache_topk ? "kd_topk,add"
                                                          : "kd_dense,add"))) {
        kd_model_free(*m);
        *m = NULL;
        st = KD_FAIL(KD_ERR_UNSUPPORTED, "the %s backend does not implement '%s' yet", (*be)->name,
                     miss);
    }
    if (st == KD_ERR_UNSUPPORTED && *be != kd_backend_cpu() && !strcmp(job->device, "auto")) {
        if (log)
            fprintf(log, "device: cpu (%s)\n", kd_last_error());
        *be = kd_backend_cpu();
        st = kd_model_build(job->model_input, job->model_layers, *be, max_batch, job->seed, m);
    }
    if (st == KD_OK && job->bf16 && (st = kd_model_set_bf16(*m, 1)) != KD_OK) {
        kd_model_free(*m);
        *m = NULL;
    }
    return st;
}

typedef struct {
    kd_dataset train, val, test;
    int have_val;
} kd_data_splits;

static void free_splits(kd_data_splits *d)
{
    kd_dataset_free(&d->train);
    kd_dataset_free(&d->val);
    kd_dataset_free(&d->test);
}

static kd_status load_splits(const kd_job *job, int need_train, kd_data_splits *d)
{
    memset(d, 0, sizeof *d);
    const char *root = job->data_root[0] ? job->data_root : NULL;
    kd_status st;
    if (need_train) {
        kd_dataset full;
        KD_TRY(kd_dataset_load(job->dataset, root, 1, &full));
        if (job->val_size >= full.n) {
            int64_t n = full.n;
            kd_dataset_free(&full);
            char pos[160];
            const kd_node *vs_node = kd_node_child(kd_node_child(job->root, "data"), "val_size");
            return KD_FAIL(KD_ERR_CONFIG,
                           "%s: data.val_size %" PRId64
                           " leaves no training samples (the training set has %" PRId64 ")",
                           vs_node ? kd_node_where(vs_node, pos, sizeof pos) : job->path,
                           job->val_size, n);
        }
        st = kd_dataset_split(&full, job->val_size, job->split_seed, &d->train, &d->val);
        kd_dataset_free(&full);
        if (st != KD_OK)
            return st;
        d->have_val = job->val_size > 0;
    }
    st = kd_dataset_load(job->dataset, root, 0, &d->test);
    if (st != KD_OK)
        free_splits(d);
    return st;
}

void kd_apply_train_limit(const kd_job *job, kd_dataset *train)
{
    if (job->train_limit > 0 && job->train_limit < train->n)
        train->n = job->train_limit;
}

/* The checkpoint tag of the job's quant section (kd_checkpoint_quant_tag), in buf. */
static const char *job_quant_tag(const kd_job *job, char *buf, size_t len)
{
    kd_checkpoint_quant_tag(job->quant_bits, job->quant_qat, job->quant_act, buf, len);
    return buf;
}

kd_status kd_load_train_split(const kd_job *job, kd_dataset *train)
{
    kd_data_splits d;
    KD_TRY(load_splits(job, 1, &d));
    *train = d.train;
    memset(&d.train, 0, sizeof d.train);
    free_splits(&d);
    return KD_OK;
}

kd_status kd_check_model_fits_data(const kd_model *m, const kd_dataset *d, const kd_job *job)
{
    size_t per = (size_t)d->c * d->h * d->w;
    if (per != m->in_numel ||
        (m->in_ndim == 3 && (m->in[0] != d->c || m->in[1] != d->h || m->in[2] != d->w)))
        return KD_FAIL(KD_ERR_SHAPE,
                       "model %s takes input [%d, %d, %d] but data set '%s' has samples of "
                       "[%d, %d, %d]",
                       job->model_desc, m->in[0], m->in[1], m->in[2], d->name, d->c, d->h, d->w);
    if (m->out_features != d->num_classes)
        return KD_FAIL(KD_ERR_SHAPE, "model %s outputs %d logits but data set '%s' has %d classes",
                       job->model_desc, m->out_features, d->name, d->num_classes);
    return KD_OK;
}

/* Quantization-aware training: the bit width and a copy of the float parameters while the
 * fake-quantized ones are in place (engine/quant.h). bits 0 = off. weights_for_step puts in
 * place the weights forward and backward run at -- fake-quantized (QAT), then bf16-rounded
 * (run.precision: bf16, engine/model.h) -- and weights_master brings the float32 masters back
 * for the update, in the reverse order. */
typedef struct {
    int bits, applied;
    float *saved;
} qat_ctx;

static kd_status qat_open(const kd_job *job, kd_model *m, qat_ctx *q)
{
    q->bits = q->applied = 0;
    q->saved = NULL;
    if (!job->quant_qat)
        return KD_OK;
    if (strcmp(m->be->name, "cpu") != 0)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "%s: quant.qat runs on the CPU backend only; set run.device: cpu",
                       job->path);
    q->saved = malloc(m->nparams * sizeof(float));
    if (!q->saved)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory for quantization-aware training");
    q->bits = job->quant_bits;
    return job->quant_act ? kd_model_set_act_fq(m, 1) : KD_OK;
}

static void weights_for_step(kd_model *m, qat_ctx *q)
{
    if (q && q->bits && !q->applied) {
        kd_quant_model_apply(m, q->bits, q->saved);
        q->applied = 1;
    }
    kd_model_bf16_weights(m, 1);
}

static void weights_master(kd_model *m, qat_ctx *q)
{
    if (m)
        kd_model_bf16_weights(m, 0);
    if (q && q->applied) {
        kd_quant_model_restore(m, q->saved);
        q->applied = 0;
    }
}

/*
 * One batch into x_dev / y_dev: samples idx[0..n) of the training set d with the augmentation
 * parameters prm (host). With the set where the backend reads it (x_all, y_all: host memory
 * for the CPU, resident device memory otherwise) the indices and parameters go to the device
 * and be->gather_augment assembles the batch there; without (a set too large for the device)
 * the CPU assembles it in x_host / y_host and it is uploaded. The indices go to idx_dev in
 * either case: a teacher cache held on the device gathers its targets with them.
 */
static kd_status assemble_batch(const kd_backend *be, const kd_dataset *d, const float *x_all,
                                const int32_t *y_all, const uint32_t *idx, const float *prm, int n,
                                uint32_t *idx_dev, float *prm_dev, float *x_host, int32_t *y_host,
                                float *x_dev, int32_t *y_dev)
{
    const float fill = (0.0f - d->mean) / d->std;
    KD_TRY(be->upload(idx_dev, idx, (size_t)n * sizeof(uint32_t))); /* the teacher reads it too */
    if (x_all) {
        KD_TRY(be->upload(prm_dev, prm, (size_t)n * KD_AUG_NPARAMS * sizeof(float)));
        be->gather_augment(n, d->c, d->h, d->w, x_all, y_all, idx_dev, prm_dev, fill, x_dev, y_dev);
        return KD_OK;
    }
    kd_augment_gather(n, d->c, d->h, d->w, d->x, d->y, idx, prm, fill, x_host, y_host);
    const size_t per = (size_t)d->c * d->h * d->w;
    KD_TRY(be->upload(x_dev, x_host, (size_t)n * per * sizeof(float)));
    return be->upload(y_dev, y_host, (size_t)n * sizeof(int32_t));
}

/*
 * The training losses summed on the device since the last call (acc: [ce sum, hits, kd sum],
 * unweighted; backend.h) come back to the host: summed over the ranks, weighted into the epoch's
 * loss sum *ep_loss and hit count *ep_correct, and the accumulator is zeroed. Waits for the
 * device, so a failure of any queued operation surfaces here; a non-finite loss ends the run
 * naming the steps (from_step, to_step] it came from, or the live teacher when its last batch of
 * logits is not finite. Every rank calls it at the same steps.
 */
static kd_status flush_stats(const kd_backend *be, kd_comm *comm, const kd_job *job,
                             kd_teacher *teacher, double *acc, double *ep_loss, int64_t *ep_correct,
                             int64_t epoch, int64_t from_step, int64_t to_step)
{
    double h[3];
    KD_TRY(be->sync());
    KD_TRY(be->download(h, acc, sizeof h));
    KD_TRY(be->zero(acc, sizeof h));
    if (comm->size > 1)
        KD_TRY(comm->ops->sum_f64(comm, h, 3));
    const double loss = job->ce_weight * h[0] + job->kd_weight * h[2];
    if (!isfinite(loss)) {
        /* a live teacher's own overflow is not the student's learning rate */
        KD_TRY(kd_teacher_check_live(teacher, job, comm));
        if (to_step - from_step <= 1)
            return KD_FAIL(KD_ERR_INTERNAL,
                           "loss became %g at epoch %" PRId64 " step %" PRId64
                           ": lower optim.lr or set optim.clip_norm",
                           loss, epoch + 1, to_step);
        return KD_FAIL(KD_ERR_INTERNAL,
                       "loss became %g at epoch %" PRId64 " between steps %" PRId64 " and %" PRId64
                       ": lower optim.lr or set optim.clip_norm",
                       loss, epoch + 1, from_step + 1, to_step);
    }
    *ep_loss += loss;
    *ep_correct += llround(h[1]);
    return KD_OK;
}

/*
 * Data set d uploaded whole to a device backend: *x, *y on success; when it does not fit
 * (KD_ERR_NOMEM, its message cleared) both stay NULL and the log says the batches will travel
 * one by one instead. Other failures are returned.
 */
static kd_status put_resident(const kd_backend *be, const kd_dataset *d, const char *what,
                              FILE *log, float **x, int32_t **y)
{
    const size_t xb = (size_t)d->n * d->c * d->h * d->w * sizeof(float);
    const size_t yb = (size_t)d->n * sizeof(int32_t);
    const double mib = (double)(xb + yb) / (1024.0 * 1024.0);
    *x = NULL;
    *y = NULL;
    kd_status st = be->alloc((void **)x, xb ? xb : 4);
    if (st == KD_OK)
        st = be->alloc((void **)y, yb ? yb : 4);
    if (st == KD_OK && (st = be->upload(*x, d->x, xb)) == KD_OK &&
        (st = be->upload(*y, d->y, yb)) == KD_OK) {
        fprintf(log, "%s resident on the %s device (%.1f MiB)\n", what, be->name, mib);
        return KD_OK;
    }
    be->release(*x);
    be->release(*y);
    *x = NULL;
    *y = NULL;
    if (st != KD_ERR_NOMEM)
        return st;
    kd_clear_error();
    fprintf(log,
            "%s (%.1f MiB) does not fit on the %s device: its batches are uploaded one by one\n",
            what, mib, be->name);
    return KD_OK;
}

/* What a non-finite loss during training says about it. */
static const char diverged_hint[] =
    ": the weights have diverged; lower optim.lr or set optim.clip_norm";

/* Mean loss and accuracy over a whole data set in eval mode; x_dev/y_dev hold one batch, or
 * x_res/y_res (not NULL) are the whole set on the device and batches are read in place (the
 * CPU backend always reads d in place: host memory is its device). With
 * quantization-aware training the model is evaluated with its quantized weights. With several
 * ranks (comm) each evaluates its slice of the set and the sums are added up. A non-finite
 * loss fails, naming `what` (the set and when) and adding `hint`. */
static kd_status evaluate(kd_model *m, const kd_dataset *d, int batch, float *x_dev, int32_t *y_dev,
                          const float *x_res, const int32_t *y_res, double smoothing, qat_ctx *q,
                          kd_comm *comm, const char *what, const char *hint, int progress,
                          kd_eval_result *r)
{
    const kd_backend *be = m->be;
    size_t per = (size_t)d->c * d->h * d->w;
    double loss = 0;
    int64_t correct = 0, lo = 0, hi = d->n;
    kd_status st = KD_OK;
    if (comm)
        kd_comm_slice(d->n, comm->rank, comm->size, &lo, &hi);
    if (be->device == KD_DEVICE_CPU) {
        x_res = d->x;
        y_res = d->y;
    }
    weights_for_step(m, q);
    /* progress (a terminal's): a line on stderr once the evaluation has taken a second, redrawn
     * every 0.2 s and cleared at the end */
    const double t0 = progress ? now_s() : 0;
    double drawn = 0;
    for (int64_t s0 = lo; s0 < hi && st == KD_OK; s0 += batch) {
        const double el = progress ? now_s() - t0 : 0;
        if (el > 1 && el - drawn > 0.2) {
            fprintf(stderr, "\revaluating the %s: %" PRId64 "/%" PRId64 " samples   ", what,
                    s0 - lo, hi - lo);
            fflush(stderr);
            drawn = el;
        }
        int n = (int)(hi - s0 < batch ? hi - s0 : batch);
        const float *xb = x_dev;
        const int32_t *yb = y_dev;
        if (x_res) {
            xb = x_res + (size_t)s0 * per;
            yb = y_res + s0;
            if (be->device != KD_DEVICE_CPU && ((uintptr_t)xb & 15u)) {
                /* a rank's slice can start anywhere: give the first layer an aligned batch */
                be->copy((size_t)n * per, xb, x_dev);
                xb = x_dev;
            }
        } else if ((st = be->upload(x_dev, d->x + (size_t)s0 * per,
                                    (size_t)n * per * sizeof(float))) ||
                   (st = be->upload(y_dev, d->y + s0, (size_t)n * sizeof(int32_t)))) {
            break;
        }
        kd_model_forward(m, xb, n, 0, 0);
        int64_t c = 0;
        loss += be->ce(n, m->out_features, kd_model_output(m), yb, smoothing, NULL, 1.0, &c, NULL);
        correct += c;
    }
    if (st == KD_OK)
        st = be->sync();
    if (drawn > 0)
        fprintf(stderr, "\r%*s\r", (int)strlen(what) + 48, "");
    weights_master(m, q);
    KD_TRY(st);
    if (comm && comm->size > 1) {
        double sums[2] = {loss, (double)correct};
        KD_TRY(comm->ops->sum_f64(comm, sums, 2));
        loss = sums[0];
        correct = (int64_t)sums[1];
    }
    r->n = d->n;
    r->loss = d->n ? loss / d->n : 0;
    r->acc = d->n ? (double)correct / d->n : 0;
    if (!isfinite(r->loss)) /* never an accuracy, a metrics line or a result made of NaN */
        return KD_FAIL(KD_ERR_INTERNAL,
                       "the model's outputs on the %s are not finite (loss %g over %" PRId64
                       " samples)%s",
                       what, r->loss, r->n, hint);
    return KD_OK;
}

static void fmt_eta(double s, char *buf, size_t len)
{
    if (!(s >= 0) || s > 99 * 3600)
        snprintf(buf, len, "--");
    else if (s >= 3600)
        snprintf(buf, len, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else
        snprintf(buf, len, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
}

static kd_status write_config_copy(const kd_job *job)
{
    char path[600];
    snprintf(path, sizeof path, "%s/config.yaml", job->out_dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return KD_FAIL(KD_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    kd_status st = kd_node_write_yaml(job->root, f);
    if (fclose(f) != 0 && st == KD_OK)
        st = KD_FAIL(KD_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return st;
}

/* The files of an earlier run in dir that a fresh start would overwrite, named in buf (comma
 * separated); 0 when there are none. Only regular files count. An empty metrics.jsonl is what a run
 * stopped before its first checkpoint leaves: it does not count. */
static int run_leftovers(const char *dir, char *buf, size_t len)
{
    static const char *const names[] = {"last.safetensors", "best.safetensors", "result.json",
                                        "metrics.jsonl"};
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char p[600];
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode) ||
            (!strcmp(names[i], "metrics.jsonl") && sb.st_size == 0))
            continue;
        int w = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", names[i]);
        if (w > 0 && (size_t)w < len - used)
            used += (size_t)w;
    }
    return used > 0;
}

/* 1 when file lies in directory dir (both as the filesystem resolves them); 0 when not, or when
 * either cannot be resolved. */
static int in_dir(const char *file, const char *dir)
{
    char fd[PATH_MAX], a[PATH_MAX], b[PATH_MAX];
    kd_path_dir(file, fd, sizeof fd);
    return realpath(fd, a) && realpath(dir, b) && !strcmp(a, b);
}

/* --resume FILE with run.out_dir dir holding a run (its files in found): KD_OK when FILE goes on
 * with that run (it lies in dir, or records the run id of dir's last or best checkpoint), else a
 * refusal: the resumed run would overwrite another. A FILE that cannot be read passes: loading
 * it says what is wrong. */
static kd_status resume_into(const char *file, const char *dir, const char *found)
{
    static const char *const names[] = {"last.safetensors", "best.safetensors"};
    kd_ckpt_info f = {0};
    if (in_dir(file, dir) || kd_checkpoint_read_info(file, &f) != KD_OK)
        return KD_OK;
    int seen = 0, unrecorded = !f.run_id;
    for (int i = 0; i < 2; i++) {
        char p[PATH_MAX];
        kd_ckpt_info d = {0};
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (kd_checkpoint_read_info(p, &d) != KD_OK)
            continue;
        seen = 1;
        unrecorded |= !d.run_id;
        if (f.run_id && f.run_id == d.run_id)
            return KD_OK;
    }
    return KD_FAIL(
        KD_ERR_CONFIG,
        "%s already holds a run (%s), and '%s' is not a checkpoint of that run%s: "
        "resuming there would overwrite it; choose another run.out_dir, or move its "
        "files away",
        dir, found, file,
        !seen        ? " (none of its checkpoints is left to tell)"
        : unrecorded ? " (or it cannot be told: a checkpoint of an earlier build records no run id)"
                     : "");
}

/* Checkpoint writes of an earlier process in dir that were cut off (killed: the atomic writer's
 * <name>.safetensors.tmp.<pid> is left behind, as large as a checkpoint) are removed, each
 * named on log; a file whose process is still alive here, or that was written to in the last
 * minute, is left alone. */
static void remove_cut_writes(const char *dir, FILE *log)
{
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        const char *t = strstr(e->d_name, ".safetensors.tmp.");
        char *end = NULL;
        long pid = t ? strtol(t + strlen(".safetensors.tmp."), &end, 10) : 0;
        if (!t || !end || *end || pid <= 0 || pid == (long)getpid() ||
            (kill((pid_t)pid, 0) != 0 ? errno != ESRCH : 1))
            continue;
        char p[1200];
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        /* and untouched for a minute: a writer on another host (a shared out_dir) is alive
         * whatever this host's pids say, and it writes on */
        if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode) || time(NULL) - sb.st_mtime < 60)
            continue;
        if (unlink(p) == 0)
            fprintf(log, "removed %s: a checkpoint write that was cut off\n", p);
    }
    if (d)
        closedir(d);
}

/* s as a JSON string with its quotes (malloc'd, free with cJSON_free), or NULL. */
static char *json_string(const char *s)
{
    cJSON *j = cJSON_CreateString(s);
    char *text = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    return text;
}

/* A fingerprint of a training split: kd_mix64 folded over its name, shape, every label and
 * every 61st input value (milliseconds for Fashion-MNIST). A checkpoint records it, and a resume
 * refuses another split, whose validation samples the run may already have trained on. */
static uint64_t split_fingerprint(const kd_dataset *d)
{
    uint64_t h = kd_mix64((uint64_t)d->n, (uint64_t)d->c << 32 | (uint64_t)d->h,
                          (uint64_t)d->w << 32 | (uint64_t)d->num_classes);
    for (const char *c = d->name; *c; c++)
        h = kd_mix64(h, (uint8_t)*c, 0);
    for (int64_t i = 0; i < d->n; i++)
        h = kd_mix64(h, (uint32_t)d->y[i], 1);
    const size_t nx = (size_t)d->n * (size_t)d->c * (size_t)d->h * (size_t)d->w;
    for (size_t i = 0; i < nx; i += 61) {
        uint32_t bits;
        memcpy(&bits, &d->x[i], sizeof bits);
        h = kd_mix64(h, bits, 2);
    }
    return h ? h : 1; /* 0 means "not recorded" */
}

/* The keys of the job that may differ between ranks: a host's cores, where a rank would write
 * (only rank 0 does), where it finds the data (the split's fingerprint covers its contents) and
 * how much memory it gives the teacher cache. */
static int per_host_key(const char *section, const char *key)
{
    static const char *const keys[][2] = {
        {"run", "threads"}, {"run", "out_dir"}, {"data", "root"}, {"teacher", "cache_memory"}};
    for (size_t i = 0; section && i < sizeof keys / sizeof keys[0]; i++)
        if (!strcmp(section, keys[i][0]) && !strcmp(key, keys[i][1]))
            return 1;
    return 0;
}

/* Whether key i of map n is left out of the canonical form: a per_host_key entry of a top-level
 * section (depth 1), or a top-level section (depth 0) that holds nothing else, so that a rank
 * given `--set run.threads=2` where the file has no run section still agrees. */
static int left_out(const kd_node *n, size_t i, int depth, const char *section)
{
    if (depth == 1)
        return per_host_key(section, n->keys[i]);
    if (depth != 0 || n->items[i]->kind != KD_NODE_MAP)
        return 0;
    const kd_node *sec = n->items[i];
    for (size_t k = 0; k < sec->len; k++)
        if (!per_host_key(n->keys[i], sec->keys[k]))
            return 0;
    return 1;
}

/* n in a canonical form: scalars with their quoting and length, maps with their keys sorted (the
 * order --set options add keys in does not matter), per_host_key entries of the top-level
 * sections left out (section: the top-level section n is, NULL elsewhere). */
static void write_canonical(FILE *f, const kd_node *n, int depth, const char *section)
{
    if (n->kind == KD_NODE_SCALAR) {
        fprintf(f, "%c%zu:%s", n->quoted ? 'q' : 's', strlen(n->value), n->value);
        return;
    }
    if (n->kind == KD_NODE_SEQ) {
        fprintf(f, "[%zu", n->len);
        for (size_t i = 0; i < n->len; i++)
            write_canonical(f, n->items[i], depth + 1, NULL);
        fputc(']', f);
        return;
    }
    size_t *ord = malloc((n->len ? n->len : 1) * sizeof *ord);
    if (!ord) {
        fputs("(out of memory)", f); /* the caller's fclose reports it as a difference at most */
        return;
    }
    for (size_t i = 0; i < n->len; i++) { /* insertion sort: maps are small */
        size_t j = i;
        for (; j > 0 && strcmp(n->keys[ord[j - 1]], n->keys[i]) > 0; j--)
            ord[j] = ord[j - 1];
        ord[j] = i;
    }
    size_t kept = 0;
    for (size_t i = 0; i < n->len; i++)
        kept += !left_out(n, i, depth, section);
    fprintf(f, "{%zu", kept);
    for (size_t i = 0; i < n->len; i++) {
        const char *k = n->keys[ord[i]];
        if (left_out(n, ord[i], depth, section))
            continue;
        fprintf(f, "%zu:%s=", strlen(k), k);
        write_canonical(f, n->items[ord[i]], depth + 1, depth == 0 ? k : NULL);
    }
    fputc('}', f);
    free(ord);
}

/* The job in canonical form (the config with its overrides, the model file and the teacher's;
 * per_host_key left out), then tail and the n bytes at extra: a malloc'd text into *text, *len. */
static kd_status job_text(const kd_job *job, const char *tail, const void *extra, size_t n,
                          char **text, size_t *len)
{
    *text = NULL;
    FILE *f = open_memstream(text, len);
    if (!f)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    const kd_node *docs[3] = {job->root, job->model_doc, job->teacher_doc};
    for (int i = 0; i < 3; i++) {
        fprintf(f, "|%d:", i);
        if (docs[i])
            write_canonical(f, docs[i], 0, NULL);
    }
    fputs(tail, f);
    if (n)
        fwrite(extra, 1, n, f);
    if (fclose(f) != 0 || !*text) {
        free(*text);
        *text = NULL;
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    }
    return KD_OK;
}

/* The id a fresh run gives its checkpoints (kd_ckpt_info.run_id): its job in canonical form,
 * hashed (never 0). Two runs of one job share it, and they train alike. */
static kd_status job_run_id(const kd_job *job, uint64_t *id)
{
    char *text;
    size_t len;
    KD_TRY(job_text(job, "", NULL, 0, &text, &len));
    uint64_t h = kd_mix64((uint64_t)len, 0x72756e6964u, 0);
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = 0;
        memcpy(&w, text + i, len - i < 8 ? len - i : 8);
        h = kd_mix64(h, w, (uint64_t)i);
    }
    free(text);
    *id = h ? h : 1;
    return KD_OK;
}

/*
 * Every rank must run the same job: its settings decide which collectives run at which step, so
 * ranks started with another config file, --set option, model file, data file, backend or
 * --resume would wait for one another forever. Compared on the MPI communicator before anything
 * else runs across the ranks (NCCL's setup included): the job as resolved in canonical form (every
 * section with its overrides, and the model and teacher files; per_host_key left out), the
 * backend, whether and how the run resumes, and a fingerprint of the training split.
 */
static kd_status ranks_same_job(kd_comm *comm, const kd_job *job, const kd_dataset *train,
                                const kd_backend *be, const char *resume)
{
    if (!comm || comm->size == 1)
        return KD_OK;
    char tail[160], *text;
    size_t len;
    snprintf(tail, sizeof tail, "|backend %s|resume %s|", be->name,
             !resume                   ? "no"
             : !strcmp(resume, "auto") ? "auto"
                                       : "file");
    const uint64_t split = split_fingerprint(train);
    KD_TRY(job_text(job, tail, &split, sizeof split, &text, &len));
    int same = 1;
    kd_status st = kd_comm_all_same(comm, text, len, &same);
    free(text);
    if (st == KD_OK && !same)
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s: the %d ranks were not started with the same job: a config file, a "
                     "--set option, the model file, the training data, the backend (run.device) "
                     "or --resume differ between them (run.threads, run.out_dir, data.root and "
                     "teacher.cache_memory may differ); start every rank with the same ones",
                     job->path, comm->size);
    return st;
}

/* A stop on *opts->stop, which every rank takes at the same step: the ranks wait for rank 0 to
 * commit its checkpoint (the others returning at once would end the job while it writes), then
 * each returns KD_ERR_INTERRUPTED with nothing left to wait for. */
static kd_status stop_together(kd_comm *comm, const kd_train_opts *opts)
{
    if (comm->size > 1)
        KD_TRY(comm->ops->barrier(comm));
    if (opts->stopped_together)
        *opts->stopped_together = 1;
    return KD_OK;
}

/* result.json, written whole or not at all (a failed write keeps a previous run's file), the
 * run's name and model path escaped as JSON strings; best_val_acc null without a validation
 * set; train_seconds is this process's, which began at resumed_at_step (0: a fresh run). */
static kd_status write_result(const char *path, const kd_job *job, size_t nparams,
                              const kd_eval_result *test, int have_val, double best_val_acc,
                              double seconds, int64_t step0)
{
    char *name = json_string(job->name), *model = json_string(job->model_desc);
    char text[8192]; /* name and model_desc are bounded: 6 bytes per escaped byte at most */
    kd_status st = KD_OK;
    if (!name || !model) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
    } else {
        char best[32] = "null"; /* no validation set (data.val_size: 0): no value */
        if (have_val)
            snprintf(best, sizeof best, "%.6f", best_val_acc);
        const int n = snprintf(text, sizeof text,
                               "{\"name\": %s, \"model\": %s, \"params\": %zu, \"epochs\": %d, "
                               "\"seed\": %" PRIu64 ", \"test_acc\": %.6f, \"test_loss\": %.6f, "
                               "\"best_val_acc\": %s, \"train_seconds\": %.1f, "
                               "\"resumed_at_step\": %" PRId64 "}\n",
                               name, model, nparams, job->epochs, job->seed, test->acc, test->loss,
                               best, seconds, step0);
        st = n > 0 && (size_t)n < sizeof text
                 ? kd_file_write_bytes(path, text, (size_t)n)
                 : KD_FAIL(KD_ERR_INTERNAL, "cannot format '%s'", path);
    }
    cJSON_free(name);
    cJSON_free(model);
    return st;
}

/* Keep only the metrics lines of epochs <= keep_epochs (a resumed run rewrites the rest). The
 * file is replaced atomically, so a crash or a full disk leaves the old one whole. */
static kd_status trim_metrics(const char *path, int64_t keep_epochs)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return KD_OK;
    char *kept = NULL;
    size_t klen = 0;
    FILE *mem = open_memstream(&kept, &klen);
    char line[4096];
    while (mem && fgets(line, sizeof line, f)) {
        long long ep = -1;
        const char *p = strstr(line, "\"epoch\":");
        if (p)
            ep = strtoll(p + 8, NULL, 10);
        if (ep >= 0 && ep <= keep_epochs)
            fputs(line, mem);
    }
    const int read_err = ferror(f);
    fclose(f);
    if (!mem)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory trimming '%s'", path);
    const int mem_err = fclose(mem) != 0;
    kd_status st = KD_OK;
    if (read_err)
        st = KD_FAIL(KD_ERR_IO, "cannot read '%s'", path);
    else if (mem_err)
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory trimming '%s'", path);
    else
        st = kd_file_write_bytes(path, kept, klen);
    free(kept);
    return st;
}

/*
 * A resumed run leaves the run directory as it found it until its first commit (a checkpoint
 * written to last.safetensors): only then is config.yaml replaced by the job it runs and are
 * the metrics lines past the checkpoint it resumed from dropped, so that a resume that fails
 * or is stopped before it (diverging, or resumed from an earlier epoch's checkpoint and then
 * interrupted) loses no line of the run it would have replaced. The two files' earlier bytes
 * are kept until that checkpoint is written, and put back if writing it (or anything before it)
 * fails; only a process killed in that window leaves them changed.
 */
typedef struct {
    int pending;         /* resume_commit_prep not yet run */
    int armed;           /* the files changed, the checkpoint not yet written */
    const char *mpath;   /* metrics.jsonl */
    char cpath[600];     /* config.yaml */
    void *old_m, *old_c; /* their earlier bytes (NULL: there was no such file) */
    size_t len_m, len_c;
} resume_guard;

static kd_status keep_old(const char *path, void **buf, size_t *len)
{
    kd_status st = kd_file_read_all(path, buf, len);
    if (st == KD_ERR_NOT_FOUND) {
        kd_clear_error();
        *buf = NULL;
        return KD_OK;
    }
    return st;
}

/* Before a resumed run's first commit: replace config.yaml, trim the metrics, open *metrics. */
static kd_status resume_commit_prep(const kd_job *job, resume_guard *g, int64_t epoch0,
                                    FILE **metrics)
{
    if (!g->pending)
        return KD_OK;
    snprintf(g->cpath, sizeof g->cpath, "%s/config.yaml", job->out_dir);
    KD_TRY(keep_old(g->mpath, &g->old_m, &g->len_m));
    KD_TRY(keep_old(g->cpath, &g->old_c, &g->len_c));
    g->armed = 1;
    KD_TRY(write_config_copy(job));
    KD_TRY(trim_metrics(g->mpath, epoch0));
    *metrics = fopen(g->mpath, "a");
    if (!*metrics)
        return KD_FAIL(KD_ERR_IO, "cannot open '%s': %s", g->mpath, strerror(errno));
    g->pending = 0;
    return KD_OK;
}

/* The first commit is written (ok) or failed: forget the earlier bytes, or put them back (after
 * the metrics file is closed). A failure to restore is added to the message, not the status. */
static void resume_guard_end(resume_guard *g, int ok)
{
    if (g->armed && !ok) {
        const char *paths[2] = {g->mpath, g->cpath};
        void *bufs[2] = {g->old_m, g->old_c};
        const size_t lens[2] = {g->len_m, g->len_c};
        char msg[KD_ERRMSG_MAX];
        snprintf(msg, sizeof msg, "%s", kd_last_error());
        for (int i = 0; i < 2; i++) {
            kd_status rs = bufs[i] ? kd_file_write_bytes(paths[i], bufs[i], lens[i])
                                   : (remove(paths[i]) == 0 || errno == ENOENT
                                          ? KD_OK
                                          : KD_FAIL(KD_ERR_IO, "%s", strerror(errno)));
            if (rs != KD_OK) {
                size_t n = strlen(msg);
                snprintf(msg + n, sizeof msg - n, "; '%s' could not be put back as it was: %s",
                         paths[i], kd_last_error());
            }
        }
        kd_fail_restore(KD_ERR_IO, msg);
    }
    free(g->old_m);
    free(g->old_c);
    g->old_m = g->old_c = NULL;
    g->armed = 0;
}

typedef struct {
    const kd_job *job;
    kd_model *m;
    float *state;
    size_t nstate;
    kd_ckpt_info info;
} kd_saver;

static kd_status save_ckpt(kd_saver *s, const char *file)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", s->job->out_dir, file);
    kd_status st = kd_checkpoint_save(path, s->m, s->state, s->nstate, &s->info);
    return st;
}

/*
 * Data parallel: every global batch of the epoch's permutation is cut into one contiguous
 * slice per rank (kd_comm_slice). Writes the samples this rank takes in steps first.. of the
 * epoch, in order, and returns how many; a run on one rank gets perm[first * batch ..).
 */
static int64_t local_order(const uint32_t *perm, int64_t n_train, int batch, int64_t first,
                           const kd_comm *c, uint32_t *out)
{
    int64_t k = 0;
    for (int64_t s0 = first * batch; s0 < n_train; s0 += batch) {
        int64_t n = n_train - s0 < batch ? n_train - s0 : batch, lo, hi;
        kd_comm_slice(n, c->rank, c->size, &lo, &hi);
        memcpy(out + k, perm + s0 + lo, (size_t)(hi - lo) * sizeof *out);
        k += hi - lo;
    }
    return k;
}

/* Gradient buckets: while the backward pass runs, each time the gradients [from, hi) add up
 * to a bucket they are handed to the communicator; the rest goes when the pass ends. */
typedef struct {
    kd_comm *c;
    float *grads;
    size_t hi, bucket; /* [hi, nparams) already queued; floats per bucket */
    kd_status st;
} grad_buckets;

static void grads_ready(void *ctx, size_t from)
{
    grad_buckets *b = ctx;
    if (b->st != KD_OK || from >= b->hi)
        return;
    if (b->hi - from >= b->bucket || from == 0) {
        b->st = b->c->ops->sum_start(b->c, b->grads + from, b->hi - from);
        b->hi = from;
    }
    if (b->st == KD_OK)
        b->st = b->c->ops->sum_progress(b->c);
}

/* the trainer's losses for kd_step_run: cross-entropy and the teacher's term */
typedef struct {
    kd_teacher *teacher;
    const kd_job *job;
    const int32_t *y;
    double *acc;
} train_losses;

static void train_losses_fn(void *ctx, kd_model *m, int n, double share)
{
    const train_losses *l = ctx;
    /* the loss is the weighted sum of the terms, each a mean over the global batch; each
     * adds its gradient (a rank's share scaled by n / batch, so the ranks' sum is exact)
     * and its sums to the device accumulator, read back by flush_stats */
    m->be->ce(n, m->out_features, kd_model_output(m), l->y, l->job->label_smoothing,
              kd_model_output_grad(m), l->job->ce_weight * share, NULL, l->acc);
    if (l->teacher)
        kd_teacher_loss(l->teacher, l->job, kd_model_output(m), l->y, n, kd_model_output_grad(m),
                        share, l->acc + 2);
}

static void step_front(const kd_step *g, int n, double share, uint64_t seed)
{
    kd_model_zero_grad(g->m);
    kd_model_forward(g->m, g->x, n, 1, seed);
    g->losses(g->ctx, g->m, n, share);
}

/* one process's whole step between batch assembly and the update, queued */
static void step_queue(const kd_step *g, int n, uint64_t seed)
{
    step_front(g, n, 1.0, seed);
    kd_model_backward(g->m, g->x, n);
}

int kd_step_can_record(const kd_model *m) { return m->be->graph_begin != NULL; }

kd_status kd_step_run(kd_step *g, int n, int full, uint64_t seed, FILE *log)
{
    const kd_backend *be = g->m->be;
    /* the dropout masks' seeds where the (recorded) forward reads them */
    KD_TRY(kd_model_stage_seeds(g->m, seed));
    if (full && g->rec) {
        kd_model_count_train_forward(g->m, 1); /* what the forward's host side counts */
        return be->graph_launch(g->rec);
    }
    if (full && g->use && g->warm) {
        kd_status st = be->graph_begin();
        int recorded = st == KD_OK;
        if (recorded) {
            step_queue(g, n, seed);
            st = be->graph_end(&g->rec);
        }
        if (st == KD_OK) { /* recording counted this forward already: the launch runs it */
            if (log)
                fprintf(log,
                        "CUDA graph recorded: full batches replay forward, losses and backward\n");
            return be->graph_launch(g->rec);
        }
        /* nothing recorded ran: the step runs eagerly below, and so do the later ones */
        if (recorded)
            kd_model_count_train_forward(g->m, -1);
        if (log)
            fprintf(log, "no CUDA graph (%s): every step runs operation by operation\n",
                    kd_last_error());
        g->use = 0;
    }
    step_queue(g, n, seed);
    g->warm |= full;
    return KD_OK;
}

void kd_step_release(kd_step *g)
{
    if (g->rec)
        g->m->be->graph_free(g->rec);
    g->rec = NULL;
}

/* The job's ranks as this loop uses them: one rank when the caller gave none. On the CUDA
 * backend the gradients travel through NCCL (device buffers), bootstrapped through MPI. */
static kd_status open_ranks(const kd_job *job, const kd_train_opts *opts, const kd_backend *be,
                            kd_comm **solo, kd_comm **nccl, kd_comm **comm)
{
    *solo = *nccl = NULL;
    *comm = opts->comm;
    if (!*comm) {
        KD_TRY(kd_comm_open("single", solo));
        *comm = *solo;
    }
    if ((*comm)->size > 1 && be->device != KD_DEVICE_CPU) {
        kd_status st = kd_comm_nccl_attach(*comm, nccl);
        if (st != KD_OK)
            return kd_fail_context(st, "%s: %d ranks on the %s backend need NCCL: ", job->path,
                                   (*comm)->size, be->name);
        *comm = *nccl;
    }
    return KD_OK;
}

static kd_status train_run(const kd_job *job, const kd_train_opts *opts, FILE *log)
{
    kd_set_threads(job->threads);
    const kd_backend *be = NULL;
    if (opts->comm && opts->comm->size > 1)
        kd_backend_cuda_prefer_device(opts->comm->local_rank);
    KD_TRY(kd_pick_backend(job, &be, log));
    kd_data_splits d;
    KD_TRY(load_splits(job, 1, &d));
    kd_status st;
    kd_model *m = NULL;
    float *x_host = NULL, *x_dev = NULL, *state = NULL, *p_host = NULL;
    uint8_t *mask_dev = NULL; /* the decay mask on the device (m->decay_mask on the CPU) */
    /* batch assembly: the training set where the backend reads it (resident), each batch's
     * sample indices and augmentation parameters (host, and their device copies) */
    const float *x_all = NULL;
    const int32_t *y_all = NULL;
    float *x_res = NULL, *xv_res = NULL, *prm_host = NULL, *prm_dev = NULL;
    int32_t *y_res = NULL, *yv_res = NULL;
    uint32_t *idx_dev = NULL;
    double *acc_dev = NULL; /* the step losses' sums on the device: [ce, hits, kd] */
    int32_t *y_host = NULL, *y_dev = NULL;
    uint32_t *perm = NULL;
    FILE *metrics = NULL;
    char mpath[600] = "";
    resume_guard guard = {.mpath = mpath};
    kd_teacher *teacher = NULL;
    qat_ctx qat = {0, 0, NULL};
    kd_comm *solo = NULL, *nccl = NULL, *comm = NULL;
    uint32_t *order = NULL;
    kd_step sg = {0};
    train_losses tl = {0};
    kd_dir_lock lock = {.fd = -1};
    int batch = job->batch_size;
    int eval_batch = job->eval_batch_size;
    int max_batch = batch > eval_batch ? batch : eval_batch;
    if ((st = build_model(job, max_batch, &be, &m, log)))
        goto done;
    if ((st = kd_check_model_fits_data(m, &d.train, job)) || (st = qat_open(job, m, &qat)) ||
        (st = ranks_same_job(opts->comm, job, &d.train, be, opts->resume)) ||
        (st = open_ranks(job, opts, be, &solo, &nccl, &comm)))
        goto done;
    const int rank = comm->rank, world = comm->size;
    /* the process that writes the run (rank 0) holds out_dir from before it looks at what is
     * there until the run ends: a second run sent there (a sweep that forgot run.out_dir) is
     * refused instead of mixing its files with this one's. Taken once the ranks agree on the
     * job, so that a rank refusing it (its MPI_Abort ends rank 0 too) leaves no directory. */
    if (rank == 0 && (st = kd_dir_lock_take(job->out_dir, "run.out_dir", &lock, log)))
        goto done;
    if (!strcmp(job->mode, "offline") &&
        (st = kd_teacher_open(job, be, &d.train, batch, m->out_features, log, &teacher)))
        goto done;
    if (job->train_limit > d.train.n)
        fprintf(log,
                "note: data.train_limit is %" PRId64 ", more than the %" PRId64
                " samples of the training split: all of them are used\n",
                (int64_t)job->train_limit, (int64_t)d.train.n);
    kd_apply_train_limit(job, &d.train);
    size_t per = m->in_numel;
    size_t nstate = kd_optim_state_floats(&job->optim, m->nparams);
    perm = malloc((size_t)d.train.n * sizeof(uint32_t));
    order = malloc((size_t)d.train.n * sizeof(uint32_t));
    prm_host = malloc((size_t)max_batch * KD_AUG_NPARAMS * sizeof(float));
    if (!perm || !order || !prm_host) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory allocating batches");
        goto done;
    }
    if ((st = be->alloc((void **)&x_dev, (size_t)max_batch * per * sizeof(float))) ||
        (st = be->alloc((void **)&y_dev, (size_t)max_batch * sizeof(int32_t))) ||
        (st = be->alloc((void **)&idx_dev, (size_t)max_batch * sizeof(uint32_t))) ||
        (st = be->alloc((void **)&prm_dev, (size_t)max_batch * KD_AUG_NPARAMS * sizeof(float))) ||
        (st = be->alloc((void **)&acc_dev, 3 * sizeof(double))) ||
        (st = be->alloc((void **)&state, (nstate ? nstate : 1) * sizeof(float))))
        goto done;
    if (!be->gather_augment) {
        st = KD_FAIL(KD_ERR_UNSUPPORTED, "the %s backend cannot assemble batches", be->name);
        goto done;
    }
    if (be->device == KD_DEVICE_CPU) { /* host memory is the CPU backend's: read in place */
        x_all = d.train.x;
        y_all = d.train.y;
    } else {
        /* the training samples live on the device when they fit, so that a step assembles and
         * augments its batch there; otherwise each batch is assembled on the host and uploaded */
        if ((st = put_resident(be, &d.train, "training set", log, &x_res, &y_res)))
            goto done;
        x_all = x_res;
        y_all = y_res;
        if (!x_res) {
            x_host = malloc((size_t)max_batch * per * sizeof(float));
            y_host = malloc((size_t)max_batch * sizeof(int32_t));
            if (!x_host || !y_host) {
                st = KD_FAIL(KD_ERR_NOMEM, "out of memory allocating batches");
                goto done;
            }
        }
        /* the validation set too, read at the end of every epoch (else uploaded batch by
         * batch) */
        if (d.have_val && (st = put_resident(be, &d.val, "validation set", log, &xv_res, &yv_res)))
            goto done;
    }
    if (!be->optim_step) {
        st = KD_FAIL(KD_ERR_UNSUPPORTED, "the %s backend has no optimizer update", be->name);
        goto done;
    }
    if (be->device == KD_DEVICE_CPU) {
        mask_dev = m->decay_mask;
    } else {
        /* the optimizer runs on the device: its decay mask goes there once; the parameters come
         * back to the host only for the ranks' epoch check */
        if ((st = be->alloc((void **)&mask_dev, m->nparams ? m->nparams : 1)) ||
            (m->nparams && (st = be->upload(mask_dev, m->decay_mask, m->nparams))))
            goto done;
        if (world > 1 && !(p_host = malloc(m->nparams * sizeof(float)))) {
            st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
            goto done;
        }
    }
    /* last, so that what a step cannot do without has its device memory first: an in-memory
     * teacher cache moves to the device when it still fits there */
    if (teacher && (st = kd_teacher_hold(teacher, batch, log)))
        goto done;

    kd_saver saver = {.job = job, .m = m, .state = nstate ? state : NULL, .nstate = nstate};
    saver.info.seed = job->seed;
    saver.info.optimizer = job->optim_name;
    char quant_tag[32];
    saver.info.quant = job_quant_tag(job, quant_tag, sizeof quant_tag);
    saver.info.batch_size = batch;
    saver.info.train_samples = d.train.n;
    saver.info.split_hash = split_fingerprint(&d.train);
    if ((st = job_run_id(job, &saver.info.job_id)))
        goto done;
    saver.info.run_id = saver.info.job_id; /* a fresh run's: a resume below keeps its own */
    int into_run = 0; /* --resume FILE into an out_dir already holding that run */
    int64_t step = 0, epoch0 = 0;
    int resuming = opts->resume != NULL;
    char path[600] = "";
    char found[160];
    if (resuming && !strcmp(opts->resume, "auto")) {
        /* a run stopped before its first checkpoint simply starts again */
        snprintf(path, sizeof path, "%s/last.safetensors", job->out_dir);
        if (access(path, F_OK) != 0) {
            if (run_leftovers(job->out_dir, found, sizeof found)) {
                st = KD_FAIL(KD_ERR_CONFIG,
                             "%s holds results of a run (%s) but no last.safetensors to resume "
                             "from; starting again would overwrite them: move them away, or "
                             "choose another run.out_dir",
                             job->out_dir, found);
                goto done;
            }
            fprintf(log, "no checkpoint at %s: starting from the beginning\n", path);
            resuming = 0;
        }
    } else if (resuming) {
        snprintf(path, sizeof path, "%s", opts->resume);
        into_run = run_leftovers(job->out_dir, found, sizeof found);
        if (into_run && (st = resume_into(path, job->out_dir, found)))
            goto done;
    } else if (run_leftovers(job->out_dir, found, sizeof found)) {
        /* a fresh start never writes over a run already in out_dir */
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s already holds a run (%s): continue it with --resume, or choose another "
                     "run.out_dir",
                     job->out_dir, found);
        goto done;
    }
    /* rank 0 decides, so that every rank starts from the same place */
    if ((st = comm->ops->bcast_bytes(comm, &resuming, sizeof resuming, 0)))
        goto done;
    kd_ckpt_info in = {0};
    if (resuming) {
        if ((st = kd_checkpoint_load(path, m, saver.state, nstate, &in)))
            goto done;
        if ((st = kd_checkpoint_check_model(path, &in, m, job->model_desc,
                                            "resume it with the model it was trained with")) ||
            (st = kd_check_checkpoint_quant(job, path, &in,
                                            "resume it with the quant section it was trained "
                                            "with")))
            goto done;
        if (!in.optimizer[0]) { /* no metadata: not a checkpoint distill wrote */
            st = kd_checkpoint_weights_only(path);
            goto done;
        }
        if (strcmp(in.optimizer, job->optim_name) != 0) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "checkpoint '%s' was trained with optimizer '%s' but the job uses '%s'",
                         path, in.optimizer, job->optim_name);
            goto done;
        }
        if (in.seed != job->seed) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "checkpoint '%s' was trained with seed %" PRIu64
                         " but the job says %" PRIu64 ": resuming would not reproduce the run",
                         path, in.seed, job->seed);
            goto done;
        }
        if ((in.batch_size && in.batch_size != batch) ||
            (in.train_samples && in.train_samples != d.train.n)) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "checkpoint '%s' comes from a run with batch size %" PRId64 " on %" PRId64
                         " training samples, but the job now has batch size %d "
                         "on %" PRId64 ": resuming would change what each step means",
                         path, in.batch_size, in.train_samples, batch, d.train.n);
            goto done;
        }
        if (in.split_hash && in.split_hash != saver.info.split_hash) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "checkpoint '%s' was trained on another training split (data.dataset, "
                         "data.split_seed, data.val_size or data.train_limit differ, or the data "
                         "files): its validation numbers would mix samples it trained on; resume "
                         "with the data settings it was trained with",
                         path);
            goto done;
        }
        int64_t spe = (d.train.n + batch - 1) / batch;
        if (in.step < 0 || in.epoch < 0 || in.epoch != in.step / spe || in.epoch_seen < 0 ||
            in.epoch_seen > d.train.n) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "checkpoint '%s' holds an inconsistent position (step %" PRId64
                         ", epoch %" PRId64 " with %" PRId64 " steps per epoch, %" PRId64
                         " of %" PRId64 " samples seen in its epoch)",
                         path, in.step, in.epoch, spe, in.epoch_seen, d.train.n);
            goto done;
        }
        /* steps, not whole epochs: a checkpoint taken mid-epoch can be past the end too */
        const int64_t job_steps = spe * job->epochs;
        if (in.step > job_steps) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "checkpoint '%s' is at step %" PRId64 " (%.2f epochs), past the end of "
                         "the job's %d epochs (step %" PRId64 ", optim.epochs): raise "
                         "optim.epochs to train on, or evaluate it with distill eval",
                         path, in.step, (double)in.step / (double)spe, job->epochs, job_steps);
            goto done;
        }
        step = in.step;
        epoch0 = in.epoch;
        saver.info.best_val_acc = in.best_val_acc;
        /* the run goes on: its checkpoints keep the id its first job gave them, unless this is
         * a fork (a checkpoint taken elsewhere, into a directory of its own, with another job):
         * that run is a new one, which the original's directory must not take back */
        const int fork = strcmp(opts->resume, "auto") != 0 && !into_run &&
                         !in_dir(path, job->out_dir) && in.job_id != saver.info.job_id;
        if (in.run_id && !fork)
            saver.info.run_id = in.run_id;
        else if (in.run_id)
            saver.info.run_id = kd_mix64(in.run_id, saver.info.job_id, 0x666f726bu) | 1u;
        /* epochs counted from 1, as the progress lines and the stop message count them */
        if (step == job_steps)
            fprintf(log,
                    "resumed from %s after its last epoch (%d), step %" PRId64
                    ": every epoch is done, nothing left to train\n",
                    path, job->epochs, step);
        else
            fprintf(log, "resumed from %s in epoch %" PRId64 "/%d, step %" PRId64 "\n", path,
                    epoch0 + 1, job->epochs, step);
    }
    if (world > 1) {
        /* each rank reads the checkpoint itself: all must have read the same one (a rank's
         * own stale out_dir would put it at another step, and the ranks would wait for one
         * another) */
        double pos[6] = {(double)step,          (double)epoch0,
                         (double)in.epoch_seen, (double)in.epoch_correct,
                         in.epoch_loss,         in.best_val_acc};
        int same = 1;
        if ((st = kd_comm_all_same(comm, pos, sizeof pos, &same)))
            goto done;
        if (!same) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "the ranks resumed from different checkpoints (this rank's, '%s', is "
                         "at step %" PRId64 "): every rank must read the same one (a run.out_dir "
                         "all the ranks share, or --resume with one file)",
                         path, step);
            goto done;
        }
    }
    /* the schedule and the ranks' share of each batch are checked before out_dir is touched:
     * a refused job (or resume) leaves the run directory as it was */
    const int64_t n_train = d.train.n;
    const int64_t steps_per_epoch = (n_train + batch - 1) / batch;
    kd_sched_cfg sched = job->sched;
    if (sched.kind == KD_SCHED_COSINE)
        sched.total_steps = steps_per_epoch * job->epochs;
    if ((st = kd_sched_cfg_check(&sched, job->optim.lr))) {
        kd_fail_context(st, "%s (%" PRId64 " steps per epoch x %d epochs): ", job->path,
                        steps_per_epoch, job->epochs);
        goto done;
    }
    saver.info.schedule_steps = sched.kind == KD_SCHED_COSINE ? sched.total_steps : 0;
    if (resuming && rank == 0 && in.schedule_steps && saver.info.schedule_steps &&
        in.schedule_steps != saver.info.schedule_steps && step < sched.total_steps) {
        /* a longer (or shorter) run reshapes the cosine from here on: said, not refused */
        kd_sched_cfg was = sched;
        was.total_steps = in.schedule_steps;
        fprintf(log,
                "note: the cosine schedule now spans %" PRId64 " steps (optim.epochs %d), the "
                "checkpoint's run %" PRId64 ": the learning rate at step %" PRId64
                " is %.6g instead of %.6g, and the decay is stretched from there\n",
                sched.total_steps, job->epochs, in.schedule_steps, step,
                kd_sched_lr(&sched, job->optim.lr, step), kd_sched_lr(&was, job->optim.lr, step));
    }
    if (world > 1 && n_train < world) {
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s: %d ranks share each batch, but the training split has %" PRId64
                     " sample%s: every rank needs at least one (raise data.train_limit, or run on "
                     "fewer ranks)",
                     job->path, world, n_train, n_train == 1 ? "" : "s");
        goto done;
    }
    if (world > 1 && (batch < world || (n_train % batch && n_train % batch < world))) {
        const int have = batch < world ? batch : (int)(n_train % batch);
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s: %d ranks share each batch, but %s has %d sample%s: every rank needs "
                     "at least one (change data.batch_size or the number of ranks)",
                     job->path, world, batch < world ? "data.batch_size" : "the last batch", have,
                     have == 1 ? "" : "s");
        goto done;
    }
    if (rank == 0) /* the job runs: what a killed process left in out_dir can go */
        remove_cut_writes(job->out_dir, log);
    /* every rank starts from rank 0's parameters, optimizer state and buffers */
    if (world > 1 &&
        ((st = comm->ops->bcast_f32(comm, m->params, m->nparams, 0)) ||
         (nstate && (st = comm->ops->bcast_f32(comm, state, nstate, 0))) ||
         (m->nbuffers && (st = comm->ops->bcast_f32(comm, m->buffers, m->nbuffers, 0)))))
        goto done;
    if (rank != 0) /* only rank 0 writes files */
        goto train;
    /* out_dir exists (the lock made it, and removes it again if the job fails before anything
     * is written); a resumed run's config copy and metrics wait for its first commit
     * (resume_commit_prep) */
    if (!resuming && (st = write_config_copy(job)))
        goto done;
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", job->out_dir);
    guard.pending = resuming;
    if (!resuming && !(metrics = fopen(mpath, "w"))) {
        st = KD_FAIL(KD_ERR_IO, "cannot open '%s': %s", mpath, strerror(errno));
        goto done;
    }

train:;
    const kd_augment_cfg *aug = kd_augment_on(&job->augment) ? &job->augment : NULL;
    fprintf(log,
            "training %s: %zu parameters, %" PRId64 " samples, %" PRId64
            " steps/epoch, %d epochs, batch %d, %s backend, %d threads",
            job->model_desc, m->nparams, n_train, steps_per_epoch, job->epochs, batch, be->name,
            job->threads);
    if (world > 1)
        fprintf(log, " per rank, %d ranks (%s, gradient buckets of %d KiB)", world, comm->name,
                job->bucket_kb);
    if (job->bf16)
        fprintf(log, ", bf16 activations and products (emulated in float32 storage)");
    if (be->graph_begin && job->cuda_graph) {
        /* recording takes the second full batch of this process's run, replay the third on */
        const int64_t full = n_train / batch, in_ep = step % steps_per_epoch;
        const int64_t full_left =
            full * (job->epochs - step / steps_per_epoch) - (in_ep < full ? in_ep : full);
        fprintf(log, world > 1       ? ", no CUDA graph (the gradient sum runs inside backward)"
                     : full_left < 3 ? ", no CUDA graph (fewer than 3 full batches left to run)"
                                     : ", full batches replayed from a CUDA graph once recorded");
    }
    if (job->threads > 1 && getenv("GOMP_SPINCOUNT"))
        fprintf(log, ", OpenMP spin %s", getenv("GOMP_SPINCOUNT"));
    fputc('\n', log);
    grad_buckets buckets = {
        .c = comm, .grads = m->grads, .bucket = (size_t)job->bucket_kb * 1024 / sizeof(float)};
    tl = (train_losses){.teacher = teacher, .job = job, .y = y_dev, .acc = acc_dev};
    sg = (kd_step){.m = m,
                   .x = x_dev,
                   .losses = train_losses_fn,
                   .ctx = &tl,
                   .use = job->cuda_graph && world == 1 && kd_step_can_record(m)};
    const double t_run = now_s();
    const int64_t step0 = step; /* where this process started: its time and speed cover steps on */
    for (int64_t epoch = step / steps_per_epoch; epoch < job->epochs; epoch++) {
        kd_epoch_permutation(perm, (uint32_t)n_train, job->seed, (uint64_t)epoch);
        int64_t first = step - epoch * steps_per_epoch;
        /* this rank's samples of the rest of the epoch, in the order it takes them */
        int64_t n_local = local_order(perm, n_train, batch, first, comm, order), at = 0;
        if (teacher && (st = kd_teacher_epoch(teacher, order, n_local)))
            goto done;
        double ep_loss = 0, t0 = now_s(), last_log = 0;
        int64_t ep_correct = 0, ep_seen = 0, ep_flushed = 0, flushed_step = step;
        int stop = 0;    /* a rank was asked to stop (SIGINT/SIGTERM) */
        if (first > 0) { /* resumed mid-epoch: the sums so far came with the checkpoint */
            ep_loss = in.epoch_loss;
            ep_correct = in.epoch_correct;
            ep_seen = ep_flushed = in.epoch_seen;
        }
        const int64_t ep_seen0 = ep_seen; /* speeds count what this process has run */
        for (int64_t k = first; k < steps_per_epoch; k++) {
            int64_t s0 = k * batch, lo, hi;
            int n = (int)(n_train - s0 < batch ? n_train - s0 : batch);
            kd_comm_slice(n, rank, world, &lo, &hi);
            const int nl = (int)(hi - lo); /* this rank's share of the batch */
            const uint32_t *idx = order + at;
            at += nl;
            /* the samples' augmentation (the teacher's cached views, or fresh draws), then the
             * batch assembled where the training set lives */
            if (teacher)
                st = kd_teacher_batch(teacher, idx, nl, epoch, aug, job->seed, prm_host);
            else
                kd_augment_draw_batch(aug, job->seed, (uint64_t)epoch, idx, nl, prm_host);
            if (st || (st = assemble_batch(be, &d.train, x_all, y_all, idx, prm_host, nl, idx_dev,
                                           prm_dev, x_host, y_host, x_dev, y_dev)))
                goto done;
            weights_for_step(m, &qat); /* forward and backward at the quantized weights */
            /* the teacher's targets for this batch (its forward pass, or cache rows) */
            if (teacher && (st = kd_teacher_targets(teacher, x_dev, idx_dev, nl)))
                goto done;
            const uint64_t fwd_seed = kd_mix64(job->seed, (uint64_t)step, 0xd0);
            if (world == 1) {
                if ((st = kd_step_run(&sg, nl, nl == batch, fwd_seed, log)))
                    goto done;
            } else {
                step_front(&sg, nl, (double)nl / n, fwd_seed);
                buckets.hi = m->nparams;
                buckets.st = KD_OK;
                kd_model_backward_notify(m, x_dev, nl, grads_ready, &buckets);
                if ((st = buckets.st) || (st = comm->ops->sum_finish(comm)))
                    goto done;
            }
            weights_master(m, &qat); /* the update applies to the float master weights */
            /* a stop request (SIGINT/SIGTERM on any rank), agreed at the same step */
            double stop_v = opts->stop && *opts->stop ? 1.0 : 0.0;
            if (world > 1 && (st = comm->ops->sum_f64(comm, &stop_v, 1)))
                goto done;
            stop = stop_v > 0;
            double lr = kd_sched_lr(&sched, job->optim.lr, step);
            /* clipping and the update where the parameters live (backend.h) */
            if ((st = be->optim_step(&job->optim, m->params, m->grads, state, mask_dev, m->nparams,
                                     lr, step + 1)))
                goto done;
            step++;
            ep_seen += n;
            double el = now_s() - t0;
            int last = k + 1 == steps_per_epoch;
            const int ckpt_step = job->checkpoint_every > 0 && step % job->checkpoint_every == 0;
            const int ckpt = rank == 0 && !last && (stop || ckpt_step);
            const int log_due = !opts->progress && (k + 1) % job->log_every == 0;
            const int bar_due = opts->progress && (el - last_log > 0.2 || last);
            /* the loss sums come back only here: every log_every steps, at a checkpoint, a stop
             * and the end of the epoch (the same steps on every rank, whatever each prints) and,
             * for one process, when the progress bar is redrawn; the device runs on between */
            if ((k + 1) % job->log_every == 0 || last || stop || ckpt_step ||
                (bar_due && world == 1)) {
                if ((st = flush_stats(be, comm, job, teacher, acc_dev, &ep_loss, &ep_correct, epoch,
                                      flushed_step, step)))
                    goto done;
                flushed_step = step;
                ep_flushed = ep_seen;
            }
            double sps = (double)(ep_seen - ep_seen0) / (el > 1e-9 ? el : 1e-9);
            double left = ((double)(steps_per_epoch - k - 1) * batch +
                           (double)(job->epochs - epoch - 1) * n_train) /
                          (sps > 0 ? sps : 1);
            char eta[32];
            fmt_eta(left, eta, sizeof eta);
            const double shown = ep_flushed > 0 ? (double)ep_flushed : 1.0;
            if (bar_due) {
                last_log = el;
                int width = 24, fill_n = (int)((k + 1) * width / steps_per_epoch);
                char bar[32];
                for (int i = 0; i < width; i++)
                    bar[i] = i < fill_n ? '#' : '.';
                bar[width] = 0;
                fprintf(stderr,
                        "\repoch %" PRId64 "/%d [%s] %" PRId64 "/%" PRId64
                        " loss %.4f acc %.2f%% %.0f samples/s ETA %s   ",
                        epoch + 1, job->epochs, bar, k + 1, steps_per_epoch, ep_loss / shown,
                        100.0 * ep_correct / shown, sps, eta);
                fflush(stderr);
            } else if (log_due) {
                fprintf(log,
                        "epoch %" PRId64 "/%d step %" PRId64 "/%" PRId64
                        " loss %.4f acc %.2f%% lr %.3g %.0f samples/s eta %s\n",
                        epoch + 1, job->epochs, k + 1, steps_per_epoch, ep_loss / shown,
                        100.0 * ep_correct / shown, lr, sps, eta);
            }
            if (ckpt) {
                saver.info.step = step;
                saver.info.epoch = epoch;
                saver.info.epoch_loss = ep_loss;
                saver.info.epoch_correct = ep_correct;
                saver.info.epoch_seen = ep_seen;
                if ((st = resume_commit_prep(job, &guard, epoch0, &metrics)) ||
                    (st = save_ckpt(&saver, "last.safetensors")))
                    goto done;
                resume_guard_end(&guard, 1);
            }
            if (stop && !last) {
                if (opts->progress)
                    fputc('\n', stderr);
                if ((st = stop_together(comm, opts)))
                    goto done;
                st = KD_FAIL(KD_ERR_INTERRUPTED,
                             "stopped at epoch %" PRId64 " step %" PRId64
                             "; checkpoint saved in %s/last.safetensors (continue with --resume)",
                             epoch + 1, step, job->out_dir);
                goto done;
            }
        }
        if (opts->progress)
            fputc('\n', stderr);
        double train_time = now_s() - t0;
        if (world > 1) {
            /* one model: batchnorm statistics are rank 0's (each rank normalises its own
             * slice), and the ranks' parameters must still be identical */
            float *P = m->params;
            if (p_host && (st = be->download(p_host, m->params, m->nparams * sizeof(float))))
                goto done;
            if (p_host)
                P = p_host;
            if ((m->nbuffers && (st = comm->ops->bcast_f32(comm, m->buffers, m->nbuffers, 0))) ||
                (st = kd_comm_check_same(comm, P, m->nparams * sizeof(float), "the parameters")))
                goto done;
        }
        kd_eval_result val = {0};
        char what[64];
        snprintf(what, sizeof what, "validation set after epoch %" PRId64, epoch + 1);
        if (d.have_val && (st = evaluate(m, &d.val, eval_batch, x_dev, y_dev, xv_res, yv_res, 0.0,
                                         &qat, comm, what, diverged_hint, opts->progress, &val)))
            goto done;
        int best = d.have_val && val.acc > saver.info.best_val_acc;
        if (best)
            saver.info.best_val_acc = val.acc;
        saver.info.step = step;
        saver.info.epoch = epoch + 1;
        saver.info.epoch_loss = 0;
        saver.info.epoch_correct = saver.info.epoch_seen = 0;
        if (rank != 0)
            goto epoch_end;
        /* last.safetensors is the epoch's commit point, so it is written after everything
         * else: a failure before it resumes from the previous epoch and redoes this one,
         * rewriting best.safetensors and this epoch's metrics line identically */
        if ((st = resume_commit_prep(job, &guard, epoch0, &metrics)) ||
            (best && (st = save_ckpt(&saver, "best.safetensors"))))
            goto done;
        double lr_now = kd_sched_lr(&sched, job->optim.lr, step > 0 ? step - 1 : 0);
        char vl[32] = "null", va[32] = "null"; /* no validation set: no values */
        if (d.have_val) {
            snprintf(vl, sizeof vl, "%.6f", val.loss);
            snprintf(va, sizeof va, "%.6f", val.acc);
        }
        /* after a resume mid-epoch, epoch_s and samples_per_s cover this process's part */
        fprintf(metrics,
                "{\"epoch\": %" PRId64 ", \"step\": %" PRId64
                ", \"train_loss\": %.6f, \"train_acc\": %.6f, \"val_loss\": %s, "
                "\"val_acc\": %s, \"lr\": %.6g, \"samples_per_s\": %.1f, \"epoch_s\": %.2f}\n",
                epoch + 1, step, ep_seen ? ep_loss / ep_seen : 0.0,
                ep_seen ? (double)ep_correct / ep_seen : 0.0, vl, va, lr_now,
                (double)(ep_seen - ep_seen0) / (train_time > 0 ? train_time : 1), train_time);
        if (fflush(metrics) != 0 || fsync(fileno(metrics)) != 0) {
            st = KD_FAIL(KD_ERR_IO, "cannot write '%s': %s", mpath, strerror(errno));
            goto done;
        }
        if ((st = save_ckpt(&saver, "last.safetensors")))
            goto done;
        resume_guard_end(&guard, 1);
        if (d.have_val)
            fprintf(log,
                    "epoch %" PRId64 "/%d: train loss %.4f acc %.2f%% | val loss %.4f acc "
                    "%.2f%%%s | %.1fs\n",
                    epoch + 1, job->epochs, ep_seen ? ep_loss / ep_seen : 0.0,
                    ep_seen ? 100.0 * ep_correct / ep_seen : 0.0, val.loss, 100 * val.acc,
                    best ? " (best)" : "", train_time);
        else
            fprintf(log, "epoch %" PRId64 "/%d: train loss %.4f acc %.2f%% | %.1fs\n", epoch + 1,
                    job->epochs, ep_seen ? ep_loss / ep_seen : 0.0,
                    ep_seen ? 100.0 * ep_correct / ep_seen : 0.0, train_time);
    epoch_end:
        if (stop && epoch + 1 < job->epochs) {
            if ((st = stop_together(comm, opts)))
                goto done;
            st = KD_FAIL(KD_ERR_INTERRUPTED,
                         "stopped after epoch %" PRId64 "; checkpoint saved in "
                         "%s/last.safetensors (continue with --resume)",
                         epoch + 1, job->out_dir);
            goto done;
        }
    }
    {
        kd_eval_result test;
        if ((st = evaluate(m, &d.test, eval_batch, x_dev, y_dev, NULL, NULL, 0.0, &qat, comm,
                           "test set after training", diverged_hint, opts->progress, &test)))
            goto done;
        if (rank != 0)
            goto done;
        double total = now_s() - t_run;
        fprintf(log, "test: loss %.4f acc %.2f%% (%" PRId64 " samples) | %zu parameters | %.1fs\n",
                test.loss, 100 * test.acc, test.n, m->nparams, total);
        char rpath[600];
        snprintf(rpath, sizeof rpath, "%s/result.json", job->out_dir);
        if (step0 == steps_per_epoch * job->epochs && access(rpath, F_OK) == 0) {
            /* its train_seconds are the training's, which this process did none of */
            fprintf(log, "%s kept: this process trained nothing\n", rpath);
            goto done;
        }
        st = write_result(rpath, job, m->nparams, &test, d.have_val, saver.info.best_val_acc, total,
                          step0);
    }
done:
    st = kd_comm_drop_after(st, nccl); /* before anything below can wait on the device */
    kd_step_release(&sg);
    weights_master(m, &qat);
    free(qat.saved);
    kd_teacher_close(teacher);
    st = kd_comm_close_after(st, nccl);
    st = kd_comm_close_after(st, solo);
    free(order);
    if (metrics)
        fclose(metrics);
    resume_guard_end(&guard, st == KD_OK); /* a failed first commit: the earlier files back */
    if (m) {
        be->release(x_dev);
        be->release(y_dev);
        be->release(state);
        be->release(idx_dev);
        be->release(prm_dev);
        be->release(acc_dev);
        be->release(x_res);
        be->release(y_res);
        be->release(xv_res);
        be->release(yv_res);
        if (mask_dev != m->decay_mask)
            be->release(mask_dev);
    }
    free(x_host);
    free(y_host);
    free(prm_host);
    free(perm);
    free(p_host);
    kd_model_free(m);
    free_splits(&d);
    /* last: a job refused before it wrote anything leaves no run directory it made */
    kd_dir_lock_drop(&lock, st != KD_OK);
    return st;
}

kd_status kd_train(const kd_job *job, const kd_train_opts *opts)
{
    /* ranks other than 0 train silently: rank 0 speaks for the job */
    FILE *quiet = NULL;
    if (opts->comm && opts->comm->rank != 0 && !(quiet = fopen("/dev/null", "w")))
        return KD_FAIL(KD_ERR_IO, "cannot open /dev/null: %s", strerror(errno));
    if (job->have_teacher && !strcmp(job->mode, "none")) {
        /* a section this training never reads: said, not silently ignored (a job file that
         * holds both a student and its teacher may train the teacher through it this way) */
        char pos[160];
        fprintf(quiet ? quiet : stderr,
                "note: %s: the job has a teacher, but distill.mode is none: this run learns from "
                "the labels alone (distill.mode: offline and a kd or dkd term learn from it)\n",
                kd_node_where(kd_node_child(job->root, "teacher"), pos, sizeof pos));
    }
    kd_status st = train_run(job, opts, quiet ? quiet : stderr);
    if (quiet)
        fclose(quiet);
    return st;
}

/* kd_checkpoint_check_quant against the job's quant section */
kd_status kd_check_checkpoint_quant(const kd_job *job, const char *checkpoint,
                                    const kd_ckpt_info *info, const char *remedy)
{
    char tag[32];
    return kd_checkpoint_check_quant(checkpoint, info, job_quant_tag(job, tag, sizeof tag), remedy);
}

kd_status kd_eval(const kd_job *job, const char *checkpoint, int progress, kd_eval_result *out)
{
    kd_set_threads(job->threads);
    const kd_backend *be = NULL;
    KD_TRY(kd_pick_backend(job, &be, NULL));
    kd_data_splits d;
    KD_TRY(load_splits(job, 0, &d));
    kd_model *m = NULL;
    float *x_dev = NULL;
    int32_t *y_dev = NULL;
    kd_status st;
    int batch = job->eval_batch_size;
    qat_ctx qat = {0, 0, NULL};
    kd_ckpt_info info;
    if ((st = build_model(job, batch, &be, &m, NULL)) ||
        (st = kd_check_model_fits_data(m, &d.test, job)) || (st = qat_open(job, m, &qat)) ||
        (st = kd_checkpoint_load(checkpoint, m, NULL, 0, &info)) ||
        (st = kd_checkpoint_check_model(checkpoint, &info, m, job->model_desc,
                                        "evaluate it with the job it was trained with")) ||
        (st = kd_check_checkpoint_quant(job, checkpoint, &info,
                                        "evaluate it with the job it was trained with")) ||
        (st = be->alloc((void **)&x_dev, (size_t)batch * m->in_numel * sizeof(float))) ||
        (st = be->alloc((void **)&y_dev, (size_t)batch * sizeof(int32_t))))
        goto done;
    st = evaluate(m, &d.test, batch, x_dev, y_dev, NULL, NULL, 0.0, &qat, NULL, "test set",
                  ": its finite weights overflow float32 on this data", progress, out);
done:
    free(qat.saved);
    if (m) {
        be->release(x_dev);
        be->release(y_dev);
    }
    kd_model_free(m);
    free_splits(&d);
    return st;
}
