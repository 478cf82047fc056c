/*
 * teacher.c - soft targets for offline distillation, and `distill cache`.
 *
 * The cache holds, for each sample of the training split and each of its V
 * views, the teacher's raw logits (T = 1) and the augmentation parameters of
 * that view. Epoch e of a student uses view e mod V of every sample, applying
 * the stored parameters to the stored image, so student and teacher always
 * see the same pixels. Temperatures are applied when the loss is computed, so
 * one cache serves every temperature. `distill cache` on several MPI ranks writes one
 * shard per rank and a VDS file over them (see kd_cache_build's section below).
 */
#include "teacher.h"

#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "augment.h"
#include "cache.h"
#include "checkpoint.h"
#include "comm.h"
#include "fileio.h"
#include "sha256.h"

struct kd_teacher {
    const kd_backend *be;
    kd_cache *cache; /* offline from the cache ... */
    kd_model *model; /* ... or a frozen teacher run live */
    int classes, topk, views, nparams_aug;
    int view_mean; /* teacher.view_targets: mean (targets: the mean over the cache's views) */
    int64_t epoch;
    /* one batch of targets: host staging and device copies */
    float *logits_h, *tv_h, *lse_h;
    int32_t *ti_h;
    float *t_dev, *tv_dev, *lse_dev, *grad_dev;
    int32_t *ti_dev;
    /* the whole cache held where the backend computes (kd_teacher_hold): [V][N][C] logits (one
     * [N][C] array, the views' mean, with view_targets: mean), or [V][N][K] top-k values and
     * classes and [V][N] log-sum-exps; NULL when not held */
    int64_t rows;
    int view;   /* the view of the current batch */
    int live_n; /* rows of the live teacher's last batch in t_dev */
    float *res_t, *res_tv, *res_lse;
    int32_t *res_ti;
};

void kd_dataset_sha256(const kd_dataset *d, char hex[65])
{
    kd_sha256 s;
    kd_sha256_init(&s);
    int64_t dims[5] = {d->n, d->c, d->h, d->w, d->num_classes};
    kd_sha256_update(&s, d->name, strlen(d->name));
    kd_sha256_update(&s, dims, sizeof dims);
    kd_sha256_update(&s, d->x, (size_t)d->n * d->c * d->h * d->w * sizeof(float));
    kd_sha256_update(&s, d->y, (size_t)d->n * sizeof(int32_t));
    uint8_t dig[32];
    kd_sha256_final(&s, dig);
    kd_sha256_to_hex(dig, hex);
}

void kd_teacher_close(kd_teacher *t)
{
    if (!t)
        return;
    kd_cache_close(t->cache);
    kd_model_free(t->model);
    free(t->logits_h);
    free(t->tv_h);
    free(t->lse_h);
    free(t->ti_h);
    if (t->be) {
        t->be->release(t->t_dev);
        t->be->release(t->tv_dev);
        t->be->release(t->lse_dev);
        t->be->release(t->grad_dev);
        t->be->release(t->ti_dev);
        t->be->release(t->res_t);
        t->be->release(t->res_tv);
        t->be->release(t->res_lse);
        t->be->release(t->res_ti);
    }
    free(t);
}

/* The teacher must take the data set's samples as they are. */
static kd_status check_teacher_input(const kd_job *job, const kd_model *m, const kd_dataset *d)
{
    int ok = m->in_numel == (size_t)d->c * d->h * d->w &&
             (m->in_ndim != 3 || (m->in[0] == d->c && m->in[1] == d->h && m->in[2] == d->w));
    if (!ok)
        return KD_FAIL(KD_ERR_SHAPE,
                       "teacher %s takes input [%d, %d, %d] but data set '%s' has samples of "
                       "[%d, %d, %d]",
                       job->teacher_desc, m->in[0], m->in[1], m->in[2], d->name, d->c, d->h, d->w);
    if (m->out_features != d->num_classes)
        return KD_FAIL(KD_ERR_SHAPE,
                       "teacher %s outputs %d logits but data set '%s' has %d classes",
                       job->teacher_desc, m->out_features, d->name, d->num_classes);
    return KD_OK;
}

/* Build the teacher model and load its checkpoint (also used by `distill cache`); a checkpoint
 * trained with quantization-aware training is said on log (may be NULL) to run as float. */
static kd_status open_teacher_model(const kd_job *job, const kd_backend *be, int max_batch,
                                    FILE *log, kd_model **out)
{
    KD_TRY(kd_model_build(job->teacher_input, job->teacher_layers, be, max_batch, job->seed, out));
    kd_ckpt_info info;
    kd_status st = kd_checkpoint_load(job->teacher_ckpt, *out, NULL, 0, &info);
    if (st == KD_OK)
        st = kd_checkpoint_check_model(job->teacher_ckpt, &info, *out, job->teacher_desc,
                                       "give teacher.model the model it was trained with");
    if (st != KD_OK) {
        kd_model_free(*out);
        *out = NULL;
        return kd_fail_context(st, "loading the teacher (%s): ", job->teacher_desc);
    }
    if (log && info.quant && info.quant[0] && strcmp(info.quant, "none") != 0)
        fprintf(log,
                "note: teacher checkpoint '%s' was trained with quantization-aware training "
                "(%s); the teacher runs its float weights, not the quantized model it was "
                "evaluated as in training\n",
                job->teacher_ckpt, info.quant);
    return KD_OK;
}

/* Above this many bytes the CPU backend keeps reading the cache's own (float16) rows. */
#define KD_HOLD_CPU_LIMIT ((size_t)1 << 30)

static void release_held(kd_teacher *t)
{
    t->be->release(t->res_t);
    t->be->release(t->res_tv);
    t->be->release(t->res_lse);
    t->be->release(t->res_ti);
    t->res_t = t->res_tv = t->res_lse = NULL;
    t->res_ti = NULL;
}

/*
 * An in-memory cache copied whole, as float32, to where the backend computes, so that a step
 * takes its targets with be->gather_rows from the batch's indices instead of the host copying
 * and uploading them. Staged max_batch rows at a time through the batch buffers. When it does
 * not fit (device memory, or over KD_HOLD_CPU_LIMIT for the CPU) the per-batch path stays and
 * the log says so; other failures are returned.
 */
kd_status kd_teacher_hold(kd_teacher *t, int max_batch, FILE *log)
{
    if (!t->cache || t->rows)
        return KD_OK;
    const kd_backend *be = t->be;
    if (!be->gather_rows || !kd_cache_in_memory(t->cache))
        return KD_OK;
    /* with view_targets: mean one array: the views' mean */
    const size_t N = (size_t)kd_cache_meta_of(t->cache)->num_samples;
    const size_t V = t->view_mean ? 1 : (size_t)t->views;
    const size_t C = (size_t)t->classes, K = (size_t)t->topk;
    const size_t bytes = V * N * (K ? 2 * K + 1 : C) * 4;
    const double mib = (double)bytes / (1024.0 * 1024.0);
    if (be->device == KD_DEVICE_CPU && bytes > KD_HOLD_CPU_LIMIT)
        return KD_OK;
    kd_status st = K ? be->alloc((void **)&t->res_tv, V * N * K * 4)
                     : be->alloc((void **)&t->res_t, V * N * C * 4);
    if (st == KD_OK && K && (st = be->alloc((void **)&t->res_ti, V * N * K * 4)) == KD_OK)
        st = be->alloc((void **)&t->res_lse, V * N * 4);
    if (st == KD_ERR_NOMEM) {
        kd_clear_error();
        release_held(t);
        if (log)
            fprintf(log,
                    "teacher cache (%.1f MiB as float32) does not fit on the %s device: its "
                    "rows are uploaded batch by batch\n",
                    mib, be->name);
        return KD_OK;
    }
    uint32_t *rows = malloc((size_t)max_batch * sizeof *rows);
    if (!rows)
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
    for (size_t v = 0; st == KD_OK && v < V; v++) {
        for (size_t r0 = 0; st == KD_OK && r0 < N; r0 += (size_t)max_batch) {
            const int cnt = (int)(N - r0 < (size_t)max_batch ? N - r0 : (size_t)max_batch);
            for (int i = 0; i < cnt; i++)
                rows[i] = (uint32_t)(r0 + (size_t)i);
            const size_t at = v * N + r0;
            const int view = t->view_mean ? KD_CACHE_VIEW_MEAN : (int)v;
            if ((st = kd_cache_get_rows(t->cache, rows, cnt, view, K ? NULL : t->logits_h,
                                        K ? t->tv_h : NULL, K ? t->ti_h : NULL, K ? t->lse_h : NULL,
                                        NULL, NULL)))
                break;
            if (K) {
                if ((st = be->upload(t->res_tv + at * K, t->tv_h, (size_t)cnt * K * 4)) ||
                    (st = be->upload(t->res_ti + at * K, t->ti_h, (size_t)cnt * K * 4)))
                    break;
                st = be->upload(t->res_lse + at, t->lse_h, (size_t)cnt * 4);
            } else {
                st = be->upload(t->res_t + at * C, t->logits_h, (size_t)cnt * C * 4);
            }
        }
    }
    free(rows);
    if (st) {
        release_held(t);
        return st;
    }
    t->rows = (int64_t)N;
    if (log)
        fprintf(log, "teacher cache held on the %s device (%.1f MiB as float32)\n", be->name, mib);
    return KD_OK;
}

/* The element type teacher.dtype names (the job loader admits float16 and float32). */
static kd_dtype cache_dtype(const kd_job *job)
{
    return strcmp(job->cache_dtype, "float32") ? KD_DTYPE_F16 : KD_DTYPE_F32;
}

kd_status kd_teacher_open(const kd_job *job, const kd_backend *be, const kd_dataset *train,
                          int max_batch, int classes, FILE *log, kd_teacher **out)
{
    *out = NULL;
    kd_teacher *t = calloc(1, sizeof *t);
    if (!t)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    t->be = be;
    t->classes = classes;
    t->views = 1;
    kd_status st = KD_OK;
    if (job->teacher_cache[0]) {
        kd_cache_expect e;
        kd_cache_expect_init(&e);
        e.num_samples = train->n;
        e.num_classes = classes;
        e.views = job->cache_views;
        e.topk = job->cache_topk;
        e.dtype = cache_dtype(job); /* as distill cache checks it too */
        e.aug_nparams = KD_AUG_NPARAMS;
        e.labels = train->y;
        if (job->cache_stream)
            e.memory_limit = -1;
        kd_dataset_sha256(train, e.dataset_sha256);
        /* view_targets mean trains unaugmented from a cache of augmented views: no check */
        if (!job->view_mean)
            kd_augment_describe(&job->augment, e.augment, sizeof e.augment);
        if (access(job->teacher_ckpt, R_OK) == 0) {
            if ((st = kd_sha256_file_hex(job->teacher_ckpt, e.teacher_sha256)))
                goto fail;
        } else if (log) {
            fprintf(log,
                    "note: teacher checkpoint %s is not readable, so the cache's teacher "
                    "hash is not checked\n",
                    job->teacher_ckpt);
        }
        if ((st = kd_cache_open(job->teacher_cache, &e, &t->cache))) {
            if (st == KD_ERR_NOT_FOUND && job->view_mean)
                st = kd_fail_context(st, "the teacher cache is missing (write it with `distill "
                                         "cache` and the job that augments: same teacher, data, "
                                         "teacher.views, topk 0): ");
            else if (st == KD_ERR_NOT_FOUND)
                st = kd_fail_context(st,
                                     "the teacher cache is missing (write it with: distill "
                                     "cache %s, and the same --set options, if any): ",
                                     job->path);
            goto fail;
        }
        const kd_cache_meta *meta = kd_cache_meta_of(t->cache);
        t->topk = meta->topk;
        if (t->topk && job->kd_dkd) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "%s: a 'dkd' term needs full teacher logits; the cache %s holds the "
                         "top %d only (write it with teacher.topk: 0)",
                         job->path, job->teacher_cache, t->topk);
            goto fail;
        }
        t->views = meta->views;
        t->nparams_aug = meta->aug_nparams;
        t->view_mean = job->view_mean; /* full logits: job.c refuses it with teacher.topk > 0,
                                        * and the cache must match teacher.topk */
        if (t->view_mean && log)
            fprintf(log,
                    "teacher targets: the mean of the cache's %d views' logits; the student "
                    "trains on unaugmented images\n",
                    t->views);
    } else {
        if ((st = open_teacher_model(job, be, max_batch, log, &t->model)) ||
            (st = check_teacher_input(job, t->model, train)))
            goto fail;
        if (t->model->out_features != classes) {
            st = KD_FAIL(KD_ERR_SHAPE, "teacher %s outputs %d logits but the student %s has %d",
                         job->teacher_desc, t->model->out_features, job->model_desc, classes);
            goto fail;
        }
        if (log)
            fprintf(log, "teacher: %s runs live (no teacher.cache)\n", job->teacher_desc);
    }
    size_t mb = (size_t)max_batch, C = (size_t)classes, K = (size_t)(t->topk ? t->topk : 1);
    t->logits_h = malloc(mb * C * sizeof(float));
    t->tv_h = malloc(mb * K * sizeof(float));
    t->ti_h = malloc(mb * K * sizeof(int32_t));
    t->lse_h = malloc(mb * sizeof(float));
    if (!t->logits_h || !t->tv_h || !t->ti_h || !t->lse_h) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = be->alloc((void **)&t->t_dev, mb * C * sizeof(float))) ||
        (st = be->alloc((void **)&t->grad_dev, mb * C * sizeof(float))) ||
        (st = be->alloc((void **)&t->tv_dev, mb * K * sizeof(float))) ||
        (st = be->alloc((void **)&t->ti_dev, mb * K * sizeof(int32_t))) ||
        (st = be->alloc((void **)&t->lse_dev, mb * sizeof(float))))
        goto fail;
    *out = t;
    return KD_OK;
fail:
    kd_teacher_close(t);
    return st;
}

kd_status kd_teacher_epoch(kd_teacher *t, const uint32_t *order, int64_t n)
{
    if (t->cache && !kd_cache_in_memory(t->cache)) {
        kd_cache_stream_end(t->cache);
        return kd_cache_stream_begin(t->cache, order, n);
    }
    return KD_OK;
}

kd_status kd_teacher_batch(kd_teacher *t, const uint32_t *idx, int n, int64_t epoch,
                           const kd_augment_cfg *aug, uint64_t seed, float *params)
{
    if (!t->cache) {
        kd_augment_draw_batch(aug, seed, (uint64_t)epoch, idx, n, params);
        return KD_OK;
    }
    int view = t->view_mean ? KD_CACHE_VIEW_MEAN : (int)(epoch % t->views);
    t->view = view < 0 ? 0 : view; /* the held array's view (one array for the mean) */
    if (t->rows && t->view_mean) { /* held, and the image is not augmented */
        if (params)
            memset(params, 0, (size_t)n * KD_AUG_NPARAMS * sizeof(float));
        return KD_OK;
    }
    if (t->rows) /* the targets are held on the device: only the augmentation comes from here */
        return kd_cache_get_rows(t->cache, idx, n, view, NULL, NULL, NULL, NULL, params, NULL);
    return kd_cache_get_rows(t->cache, idx, n, view, t->topk ? NULL : t->logits_h,
                             t->topk ? t->tv_h : NULL, t->topk ? t->ti_h : NULL,
                             t->topk ? t->lse_h : NULL, params, NULL);
}

kd_status kd_teacher_targets(kd_teacher *t, const float *x_dev, const uint32_t *idx_dev, int n)
{
    const kd_backend *be = t->be;
    size_t C = (size_t)t->classes;
    if (t->model) {
        kd_model_forward(t->model, x_dev, n, 0, 0);
        be->copy((size_t)n * C, kd_model_output(t->model), t->t_dev);
        t->live_n = n;
        return KD_OK;
    }
    if (t->rows) {
        const size_t at = (size_t)t->view * (size_t)t->rows;
        if (t->topk) {
            const int K = t->topk;
            be->gather_rows(n, K, t->res_tv + at * K, idx_dev, t->tv_dev);
            be->gather_rows(n, K, t->res_ti + at * K, idx_dev, t->ti_dev);
            be->gather_rows(n, 1, t->res_lse + at, idx_dev, t->lse_dev);
        } else {
            be->gather_rows(n, (int)C, t->res_t + at * C, idx_dev, t->t_dev);
        }
        return KD_OK;
    }
    if (t->topk) {
        size_t K = (size_t)t->topk;
        KD_TRY(be->upload(t->tv_dev, t->tv_h, (size_t)n * K * sizeof(float)));
        KD_TRY(be->upload(t->ti_dev, t->ti_h, (size_t)n * K * sizeof(int32_t)));
        return be->upload(t->lse_dev, t->lse_h, (size_t)n * sizeof(float));
    }
    return be->upload(t->t_dev, t->logits_h, (size_t)n * C * sizeof(float));
}

kd_status kd_teacher_check_live(kd_teacher *t, const kd_job *job, kd_comm *comm)
{
    if (!t || !t->model) /* the same on every rank: one job */
        return KD_OK;
    const size_t C = (size_t)t->classes, n = t->live_n > 0 ? (size_t)t->live_n : 0;
    kd_status st = n ? t->be->download(t->logits_h, t->t_dev, n * C * sizeof(float)) : KD_OK;
    size_t at = 0; /* the first non-finite logit, or n * C */
    while (st == KD_OK && at < n * C && isfinite(t->logits_h[at]))
        at++;
    double any = st != KD_OK || at < n * C; /* every rank learns whether any rank found one */
    if (comm && comm->size > 1)
        KD_TRY(comm->ops->sum_f64(comm, &any, 1));
    KD_TRY(st);
    if (!(any > 0))
        return KD_OK;
    char where[96];
    if (at < n * C)
        snprintf(where, sizeof where, "%g, row %zu class %zu of the last batch",
                 (double)t->logits_h[at], at / C, at % C);
    else
        snprintf(where, sizeof where, "on another rank's share of the last batch");
    return KD_FAIL(KD_ERR_INVALID,
                   "the teacher (%s) run live from '%s' gave a non-finite logit (%s): its finite "
                   "weights overflow float32 on this data; check the checkpoint",
                   job->teacher_desc, job->teacher_ckpt, where);
}

double kd_teacher_loss(kd_teacher *t, const kd_job *job, const float *s_dev, const int32_t *y_dev,
                       int n, float *ds_dev, double grad_scale, double *acc)
{
    const kd_backend *be = t->be;
    double sum;
    if (job->kd_dkd)
        sum = be->kd_dkd(n, t->classes, s_dev, t->t_dev, y_dev, job->kd_temperature, job->kd_alpha,
                         job->kd_beta, job->kd_t2, t->grad_dev, job->kd_weight * grad_scale, acc);
    else if (t->topk)
        sum = be->kd_topk(n, t->classes, t->topk, s_dev, t->tv_dev, t->ti_dev, t->lse_dev,
                          job->kd_temperature, job->kd_reverse, job->kd_t2, t->grad_dev,
                          job->kd_weight * grad_scale, acc);
    else
        sum = be->kd_dense(n, t->classes, s_dev, t->t_dev, job->kd_temperature, job->kd_reverse,
                           job->kd_t2, t->grad_dev, job->kd_weight * grad_scale, acc);
    be->add((size_t)n * t->classes, ds_dev, t->grad_dev, ds_dev);
    return job->kd_weight * sum;
}

/* ---- distill cache ---- */

/*
 * One process writes the cache at teacher.cache itself. W > 1 ranks split the global chunk
 * grid (chunk_rows rows per chunk) into W contiguous ranges, kd_comm_slice over chunks, and
 * rank r writes the rows of its range to its own shard, kd_cache_shard_path(cache, r, W), an
 * ordinary resumable cache file with row_begin/row_end set. Each chunk is computed by the same
 * code in the same batches whichever file it goes to, so a sharded cache holds the same values
 * as a single file. When every rank has finished, rank 0 writes the VDS file at the cache path
 * (kd_cache_vds_write). Every rank passes through the same collectives in the same order:
 * ranks_agree after each phase turns any rank's failure into a failure of all, so no rank is
 * left waiting for another that gave up.
 */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* What one `distill cache` process holds while it computes chunks. */
typedef struct {
    const kd_job *job;
    const kd_train_opts *opts;
    FILE *log;         /* rank 0: stderr; other ranks: /dev/null */
    int progress;      /* redraw a progress line on stderr (rank 0 only) */
    const char *label; /* what the progress lines count: "" (the cache) or rank 0's shard */
    const kd_backend *be;
    kd_dataset train;
    int have_train;
    kd_model *m;
    kd_cache_meta meta; /* the global cache: rows [0, N), chunk_rows resolved */
    kd_cache_write_opts wo;
    const kd_augment_cfg *aug;
    float fill;
    size_t per;
    int batch, C, V, K;
    int64_t chunks_skipped, chunks_total; /* of the file(s) this process wrote */
    float *x_host, *x_dev, *rowbuf, *logits, *augp, *tv, *lse;
    int32_t *ti;
} cache_run;

static void cache_run_free(cache_run *r)
{
    if (r->m)
        r->be->release(r->x_dev);
    kd_model_free(r->m);
    free(r->x_host);
    free(r->rowbuf);
    free(r->logits);
    free(r->augp);
    free(r->tv);
    free(r->ti);
    free(r->lse);
    if (r->have_train)
        kd_dataset_free(&r->train);
    if (r->log && r->log != stderr)
        fclose(r->log);
}

/* Backend, training split, teacher, the cache's metadata and the buffers of one chunk. */
static kd_status cache_run_open(cache_run *r)
{
    const kd_job *job = r->job;
    if (job->view_mean)
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: teacher.view_targets: mean trains from a cache of augmented views "
                       "without augmenting; write that cache with the job that augments (the "
                       "same teacher, data and teacher.views)",
                       job->path);
    kd_set_threads(job->threads);
    if (r->opts->comm && r->opts->comm->size > 1) /* one device per rank of a host */
        kd_backend_cuda_prefer_device(r->opts->comm->local_rank);
    KD_TRY(kd_pick_backend(job, &r->be, r->log));
    KD_TRY(kd_load_train_split(job, &r->train));
    r->have_train = 1;
    r->batch = job->eval_batch_size;
    kd_status st = open_teacher_model(job, r->be, r->batch, r->log, &r->m);
    if (st == KD_ERR_UNSUPPORTED && r->be != kd_backend_cpu() && !strcmp(job->device, "auto")) {
        fprintf(r->log, "device: cpu (%s)\n", kd_last_error());
        r->be = kd_backend_cpu();
        st = open_teacher_model(job, r->be, r->batch, r->log, &r->m);
    }
    if (st != KD_OK)
        return st;
    const kd_dataset *train = &r->train;
    r->per = (size_t)train->c * train->h * train->w;
    KD_TRY(check_teacher_input(job, r->m, train));
    r->C = r->m->out_features;
    r->V = job->cache_views;
    r->K = job->cache_topk;
    if (r->K != 0 && (r->K < 0 || r->K >= r->C))
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: teacher.topk %d must be below the %d classes (0 "
                       "stores full logits)",
                       job->path, r->K, r->C);
    r->meta = (kd_cache_meta){.num_samples = train->n,
                              .row_begin = 0,
                              .row_end = train->n,
                              .num_classes = r->C,
                              .views = r->V,
                              .topk = r->K,
                              .aug_nparams = KD_AUG_NPARAMS,
                              .dtype = cache_dtype(job),
                              .chunk_rows = job->cache_chunk_rows ? job->cache_chunk_rows
                                                                  : KD_CACHE_DEFAULT_CHUNK_ROWS};
    kd_dataset_sha256(train, r->meta.dataset_sha256);
    kd_augment_describe(&job->augment, r->meta.augment, sizeof r->meta.augment);
    KD_TRY(kd_sha256_file_hex(job->teacher_ckpt, r->meta.teacher_sha256));
    kd_cache_write_opts_init(&r->wo);
    int comp = kd_cache_compress_from_name(job->cache_compress);
    if (comp < 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: teacher.compress must be none, deflate, lz4 or zstd, got "
                       "'%s'",
                       job->path, job->cache_compress);
    r->wo.compress = (kd_cache_compress)comp;
    char dir[512];
    snprintf(dir, sizeof dir, "%s", job->teacher_cache);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        KD_TRY(kd_mkdir_p(dir));
    }
    const size_t R = (size_t)r->meta.chunk_rows, V = (size_t)r->V, C = (size_t)r->C;
    const size_t K = (size_t)(r->K ? r->K : 1);
    r->x_host = malloc((size_t)r->batch * r->per * sizeof(float));
    r->rowbuf = malloc((size_t)r->batch * C * sizeof(float));
    r->logits = malloc(R * V * C * sizeof(float));
    r->augp = malloc(R * V * KD_AUG_NPARAMS * sizeof(float));
    r->tv = malloc(R * V * K * sizeof(float));
    r->ti = malloc(R * V * K * sizeof(int32_t));
    r->lse = malloc(R * V * sizeof(float));
    if (!r->x_host || !r->rowbuf || !r->logits || !r->augp || !r->tv || !r->ti || !r->lse)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    KD_TRY(r->be->alloc((void **)&r->x_dev, (size_t)r->batch * r->per * sizeof(float)));
    r->fill = (0.0f - train->mean) / train->std;
    r->aug = kd_augment_on(&job->augment) ? &job->augment : NULL;
    if (r->V > 1 && !r->aug)
        fprintf(r->log, "note: %d views but data.augment is off, so every view is the same image\n",
                r->V);
    return KD_OK;
}

/*
 * The teacher's outputs for global rows [r0, r0 + rows) (one chunk), every view, in batches
 * of eval_batch_size starting at r0: logits [rows, V, C], augp [rows, V, P] and, for top-k,
 * tv/ti [rows, V, K] and lse [rows, V]. The same for every file layout, so a chunk's values
 * do not depend on which file (or rank) it goes to.
 */
static kd_status cache_chunk_compute(cache_run *r, int64_t r0, int64_t rows)
{
    const int V = r->V, C = r->C, batch = r->batch;
    const size_t per = r->per;
    const kd_dataset *train = &r->train;
    for (int v = 0; v < V; v++) {
        for (int64_t b0 = 0; b0 < rows; b0 += batch) {
            int n = (int)(rows - b0 < batch ? rows - b0 : batch);
            for (int i = 0; i < n; i++) {
                int64_t row = r0 + b0 + i;
                float *p = r->augp + ((size_t)(b0 + i) * V + v) * KD_AUG_NPARAMS;
                if (r->aug)
                    kd_augment_draw(r->aug, r->job->seed, (uint64_t)v, (uint64_t)row, p);
                else
                    memset(p, 0, KD_AUG_NPARAMS * sizeof(float));
                kd_augment_apply(p, train->x + (size_t)row * per, r->x_host + (size_t)i * per,
                                 train->c, train->h, train->w, r->fill);
            }
            KD_TRY(r->be->upload(r->x_dev, r->x_host, (size_t)n * per * sizeof(float)));
            kd_model_forward(r->m, r->x_dev, n, 0, 0);
            KD_TRY(
                r->be->download(r->rowbuf, kd_model_output(r->m), (size_t)n * C * sizeof(float)));
            for (int i = 0; i < n; i++)
                memcpy(r->logits + ((size_t)(b0 + i) * V + v) * C, r->rowbuf + (size_t)i * C,
                       C * sizeof(float));
        }
    }
    if (r->K)
        kd_topk_rows(r->logits, (int)(rows * V), C, r->K, r->tv, r->ti, r->lse);
    return KD_OK;
}

/*
 * Write global rows [row_begin, row_end) into the cache file `path` (the whole cache or one
 * shard), resuming what an earlier run wrote there. Progress and resume notes go to r->log.
 */
static kd_status cache_write_file(cache_run *r, const char *path, int64_t row_begin,
                                  int64_t row_end)
{
    kd_cache_meta meta = r->meta;
    meta.row_begin = row_begin;
    meta.row_end = row_end;
    kd_cache_writer *w = NULL;
    KD_TRY(kd_cache_writer_open(path, &meta, &r->wo, &w));
    kd_status st = KD_OK;
    FILE *log = r->log;
    const int V = r->V, K = r->K;
    const int64_t nchunks = kd_cache_writer_num_chunks(w);
    const int64_t missing = kd_cache_writer_chunks_missing(w);
    const int64_t R = kd_cache_writer_meta(w)->chunk_rows;
    r->chunks_skipped += nchunks - missing;
    r->chunks_total += nchunks;
    const int64_t damaged = kd_cache_writer_chunks_damaged(w);
    if (missing < nchunks)
        fprintf(log, "resuming %s: %" PRId64 " of %" PRId64 " chunks already written\n", path,
                nchunks - missing, nchunks);
    if (kd_cache_writer_done_lost(w))
        fprintf(log,
                "%s: its /done dataset (which chunks are written) could not be read: computing "
                "every chunk again\n",
                path);
    if (damaged)
        fprintf(log,
                "%s: %" PRId64 " chunk(s) marked written could not be read back (a checksum "
                "fails): computing them again\n",
                path, damaged);
    double t0 = now_s();
    int64_t done_rows = 0;
    for (int64_t c = 0; c < nchunks; c++) {
        if (kd_cache_writer_chunk_done(w, c))
            continue;
        if (r->opts->stop && *r->opts->stop) {
            st = KD_FAIL(KD_ERR_INTERRUPTED,
                         "stopped with %" PRId64 " chunks of %s left; run `distill cache %s` "
                         "again (with the same --set options, if any)%s to resume",
                         kd_cache_writer_chunks_missing(w), path, r->job->path,
                         r->label[0] ? " on the same number of ranks" : "");
            goto done;
        }
        int64_t r0 = row_begin + c * R, rows = kd_cache_writer_chunk_nrows(w, c);
        if ((st = cache_chunk_compute(r, r0, rows)))
            goto done;
        if ((st =
                 kd_cache_writer_put(w, c, K ? NULL : r->logits, K ? r->tv : NULL, K ? r->ti : NULL,
                                     K ? r->lse : NULL, r->augp, r->train.y + r0)))
            goto done;
        done_rows += rows;
        double el = now_s() - t0;
        double rate = done_rows * V / (el > 1e-9 ? el : 1e-9);
        int64_t left = kd_cache_writer_chunks_missing(w);
        if (r->progress)
            fprintf(stderr, "\rcache%s: %" PRId64 "/%" PRId64 " chunks, %.0f views/s, ETA %.0fs   ",
                    r->label, nchunks - left, nchunks, rate, left * R * V / (rate > 0 ? rate : 1));
        else if ((nchunks - left) % 10 == 0 || left == 0)
            fprintf(log, "cache%s: %" PRId64 "/%" PRId64 " chunks, %.0f views/s\n", r->label,
                    nchunks - left, nchunks, rate);
    }
    if (r->progress)
        fputc('\n', stderr);
done:;
    kd_status st2 = kd_cache_writer_close(w);
    return st != KD_OK ? st : st2;
}

/*
 * Shard files next to `path` named for another number of ranks than `world` (0: for none)
 * are left over from a sharded run that was stopped and then given up; say so once.
 */
static void note_stale_shards(FILE *log, const char *path, int world)
{
    char dir[4096], prefix[4200];
    const char *base = strrchr(path, '/');
    if (base)
        snprintf(dir, sizeof dir, "%.*s", (int)(base - path), path);
    else
        snprintf(dir, sizeof dir, ".");
    if (kd_cache_shard_path(base ? base + 1 : path, 0, 1, prefix, sizeof prefix) != KD_OK)
        return;
    char *cut = strstr(prefix, ".shard-");
    if (!cut)
        return;
    cut[strlen(".shard-")] = '\0';
    DIR *d = opendir(dir);
    if (!d)
        return;
    int n = 0, w0 = 0;
    char first[512] = "";
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int r, w;
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0 ||
            sscanf(e->d_name + strlen(prefix), "%d-of-%d", &r, &w) != 2 || w == world)
            continue;
        if (!n++) {
            snprintf(first, sizeof first, "%s", e->d_name);
            w0 = w;
        }
    }
    closedir(d);
    if (n)
        fprintf(log,
                "note: %d shard file(s) in %s from a run on another number of ranks (such as %s, "
                "of %d ranks) are not part of %s; finish that run with the same number of ranks "
                "or delete them\n",
                n, dir, first, w0, path);
}

/*
 * Every rank learns whether every rank succeeded; collective. A rank that failed returns its
 * own status and message; the others fail with the status of the lowest failed rank.
 */
static kd_status ranks_agree(kd_comm *comm, kd_status st, const char *what)
{
    if (!comm || comm->size < 2)
        return st;
    /* max over ranks of (W - rank) << 32 | status: the lowest failed rank and its status */
    uint64_t v = st == KD_OK ? 0 : ((uint64_t)(comm->size - comm->rank) << 32) | (uint32_t)st;
    kd_status cs = comm->ops->max_u64(comm, &v, 1);
    if (st != KD_OK)
        return st;
    if (cs != KD_OK)
        return cs;
    if (v == 0)
        return KD_OK;
    return KD_FAIL((kd_status)(v & 0xffffffffu), "rank %d of %d failed %s (its message says why)",
                   comm->size - (int)(v >> 32), comm->size, what);
}

/* One process: write (or resume) the cache file; a complete sharded cache is accepted. */
static kd_status cache_build_single(cache_run *r)
{
    const char *path = r->job->teacher_cache;
    kd_cache_info info;
    /* a single file's chunks are read back by the writer that opens it below */
    kd_status st = kd_cache_inspect(path, 0, &info);
    if (info.sharded) {
        KD_TRY(kd_cache_meta_compare(path, &info.meta, &r->meta));
        if (st == KD_ERR_FORMAT)
            return kd_fail_context(st,
                                   "one process cannot repair a sharded cache (run `mpirun "
                                   "-np %d distill cache %s` or delete it and its shards): ",
                                   info.shard_world > 1 ? info.shard_world : 2, r->job->path);
        if (st != KD_OK)
            return st;
        fprintf(r->log, "%s is complete: a sharded cache over %d shard files; nothing to do\n",
                path, info.nshards);
        return KD_OK;
    }
    /* anything else (nothing, a partial or damaged file) is the writer's to resume or refuse */
    note_stale_shards(r->log, path, 0);
    fprintf(r->log, "caching %s over %" PRId64 " samples x %d views (%s%s) into %s\n",
            r->job->teacher_desc, r->train.n, r->V, r->K ? "top-k" : "full logits",
            r->meta.dtype == KD_DTYPE_F16 ? ", float16" : ", float32", path);
    double t0 = now_s();
    KD_TRY(cache_write_file(r, path, 0, r->train.n));
    fprintf(r->log, "wrote %s: %" PRId64 " samples x %d views in %.1fs\n", path, r->train.n, r->V,
            now_s() - t0);
    return KD_OK;
}

/*
 * Rank 0 of a sharded run: what is at the cache path decides. *write = 1: write (or resume,
 * or repair) the shards and the VDS file; 0: a complete cache with this run's metadata is
 * there already, of whatever layout, and nothing is computed.
 */
static kd_status cache_sharded_decide(cache_run *r, int world, int32_t *write)
{
    const char *path = r->job->teacher_cache, *cfg = r->job->path;
    kd_cache_info info;
    kd_status st = kd_cache_inspect(path, 1, &info);
    *write = 1;
    if (info.sharded) {
        KD_TRY(kd_cache_meta_compare(path, &info.meta, &r->meta));
        if (st == KD_OK) {
            fprintf(r->log, "%s is complete: a sharded cache over %d shard files; nothing to do\n",
                    path, info.nshards);
            *write = 0;
            return KD_OK;
        }
        if (st != KD_ERR_FORMAT)
            return st;
        if (info.shard_world != world)
            return kd_fail_context(st,
                                   "a sharded cache written by %d ranks can only be repaired by "
                                   "%d ranks (or delete it and its shards): ",
                                   info.shard_world, info.shard_world);
        fprintf(r->log, "note: repairing the sharded cache: %s\n", kd_last_error());
        return KD_OK;
    }
    if (st != KD_OK)
        return st;
    if (info.partial)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' is being written by one process as '%s.partial' (compressed "
                       "caches are staged there); finish it with `distill cache %s` without "
                       "mpirun, or delete '%s.partial' to write it on %d ranks",
                       path, path, cfg, path, world);
    if (!info.exists)
        return KD_OK;
    KD_TRY(kd_cache_meta_compare(path, &info.meta, &r->meta));
    if (info.chunks_missing)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' is one file written by one process, and %" PRId64 " of %" PRId64
                       " chunks are still missing; %d ranks write a sharded cache and cannot "
                       "resume it: finish it with `distill cache %s` without mpirun, or delete "
                       "it to write it on %d ranks",
                       path, info.chunks_missing, info.chunks, world, cfg, world);
    fprintf(r->log, "%s is complete: one file written by one process; nothing to do\n", path);
    *write = 0;
    return KD_OK;
}

/* W ranks: each writes its shard, then rank 0 the VDS file (see the top of this section). */
static kd_status cache_build_sharded(cache_run *r, kd_comm *comm)
{
    const char *path = r->job->teacher_cache;
    const int rank = comm->rank, world = comm->size;
    const int64_t N = r->train.n, R = r->meta.chunk_rows, nchunks = (N + R - 1) / R;
    kd_status st = KD_OK;
    int32_t write = 1;
    if (rank == 0)
        st = cache_sharded_decide(r, world, &write);
    KD_TRY(ranks_agree(comm, st, "checking the existing cache"));
    KD_TRY(comm->ops->bcast_bytes(comm, &write, sizeof write, 0));
    if (!write)
        return KD_OK;

    /* rank k's shard: whole chunks [c0, c1) of the global grid (none when W > chunks) */
    char shard[4200];
    int64_t c0, c1;
    kd_comm_slice(nchunks, rank, world, &c0, &c1);
    const int64_t row_end = c1 * R < N ? c1 * R : N;
    if (rank == 0) {
        note_stale_shards(r->log, path, world);
        fprintf(r->log,
                "caching %s over %" PRId64 " samples x %d views (%s%s) into %s: %d ranks, "
                "%" PRId64 " chunks of %" PRId64 " rows, one shard per rank\n",
                r->job->teacher_desc, N, r->V, r->K ? "top-k" : "full logits",
                r->meta.dtype == KD_DTYPE_F16 ? ", float16" : ", float32", path, world, nchunks, R);
    }
    double t0 = now_s();
    st = kd_cache_shard_path(path, rank, world, shard, sizeof shard);
    if (st == KD_OK && c1 > c0)
        st = cache_write_file(r, shard, c0 * R, row_end);
    KD_TRY(ranks_agree(comm, st, "writing its shard"));
    double counts[2] = {(double)r->chunks_skipped, (double)r->chunks_total};
    KD_TRY(comm->ops->sum_f64(comm, counts, 2));

    /* rank 0 stitches the non-empty shards, in rank (= row) order */
    st = KD_OK;
    if (rank == 0) {
        char(*names)[4200] = calloc((size_t)world, sizeof *names);
        const char **list = calloc((size_t)world, sizeof *list);
        int n = 0;
        if (!names || !list)
            st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
        for (int k = 0; st == KD_OK && k < world; k++) {
            int64_t a, b;
            kd_comm_slice(nchunks, k, world, &a, &b);
            if (b > a &&
                (st = kd_cache_shard_path(path, k, world, names[n], sizeof *names)) == KD_OK)
                list[n] = names[n], n++;
        }
        if (st == KD_OK)
            st = kd_cache_vds_write(path, &r->meta, n, list, r->wo.fsync);
        if (st == KD_OK) {
            fprintf(r->log,
                    "wrote %s: %" PRId64 " samples x %d views in %.1fs, a VDS file over %d "
                    "shard file%s (%s%s)",
                    path, N, r->V, now_s() - t0, n, n == 1 ? "" : "s", list[0],
                    n == 1 ? "" : " ...");
            if (counts[0] > 0)
                fprintf(r->log, "; %.0f of %.0f chunks already written by an earlier run",
                        counts[0], counts[1]);
            fputc('\n', r->log);
        }
        free(names);
        free(list);
    }
    return ranks_agree(comm, st, "writing the VDS file");
}

kd_status kd_cache_build(const kd_job *job, const kd_train_opts *opts)
{
    if (!job->have_teacher || !job->teacher_cache[0])
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: `distill cache` needs a 'teacher' section with 'model', 'checkpoint' "
                       "and 'cache' (the file to write)",
                       job->path);
    kd_comm *comm = opts->comm && opts->comm->size > 1 ? opts->comm : NULL;
    cache_run r;
    memset(&r, 0, sizeof r);
    r.job = job;
    r.opts = opts;
    r.log = stderr;
    if (comm && comm->rank != 0) {
        /* rank 0 speaks for the job; the others stay silent */
        FILE *null = fopen("/dev/null", "w");
        if (null)
            r.log = null;
    }
    r.progress = opts->progress && (!comm || comm->rank == 0);
    r.label = comm ? " (rank 0's shard)" : "";
    kd_status st = cache_run_open(&r);
    if (comm) {
        st = ranks_agree(comm, st, "setting up the teacher");
        if (st == KD_OK)
            st = cache_build_sharded(&r, comm);
    } else if (st == KD_OK) {
        st = cache_build_single(&r);
    }
    cache_run_free(&r);
    return st;
}
