/*
 * teacher.c - soft targets for offline distillation, and `distill cache`.
 *
 * The cache holds, for each sample of the training split and each of its V
 * views, the teacher's raw logits (T = 1) and the augmentation parameters of
 * that view. Epoch e of a student uses view e mod V of every sample, applying
 * the stored parameters to the stored image, so student and teacher always
 * see the same pixels. Temperatures are applied when the loss is computed, so
 * one cache serves every temperature.
 */
#include "teacher.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "augment.h"
#include "cache.h"
#include "checkpoint.h"
#include "fileio.h"
#include "sha256.h"

struct kd_teacher {
    const kd_backend *be;
    kd_cache *cache; /* offline from the cache ... */
    kd_model *model; /* ... or a frozen teacher run live */
    int classes, topk, views, nparams_aug;
    int64_t epoch;
    float fill;
    /* one batch of targets: host staging and device copies */
    float *logits_h, *tv_h, *lse_h, *aug_h;
    int32_t *ti_h;
    float *t_dev, *tv_dev, *lse_dev, *grad_dev;
    int32_t *ti_dev;
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
    free(t->aug_h);
    free(t->ti_h);
    if (t->be) {
        t->be->release(t->t_dev);
        t->be->release(t->tv_dev);
        t->be->release(t->lse_dev);
        t->be->release(t->grad_dev);
        t->be->release(t->ti_dev);
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

/* Build the teacher model and load its checkpoint (also used by `distill cache`). */
static kd_status open_teacher_model(const kd_job *job, const kd_backend *be, int max_batch,
                                    kd_model **out)
{
    KD_TRY(kd_model_build(job->teacher_input, job->teacher_layers, be, max_batch, job->seed, out));
    kd_status st = kd_checkpoint_load(job->teacher_ckpt, *out, NULL, 0, NULL);
    if (st != KD_OK) {
        kd_model_free(*out);
        *out = NULL;
        return kd_fail_context(st, "loading the teacher (%s): ", job->teacher_desc);
    }
    return KD_OK;
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
    t->fill = (0.0f - train->mean) / train->std;
    kd_status st = KD_OK;
    if (job->teacher_cache[0]) {
        kd_cache_expect e;
        kd_cache_expect_init(&e);
        e.num_samples = train->n;
        e.num_classes = classes;
        e.views = job->cache_views;
        e.topk = job->cache_topk;
        e.aug_nparams = KD_AUG_NPARAMS;
        if (job->cache_stream)
            e.memory_limit = -1;
        kd_dataset_sha256(train, e.dataset_sha256);
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
            if (st == KD_ERR_NOT_FOUND)
                st = kd_fail_context(st,
                                     "the teacher cache is missing (write it with: distill "
                                     "cache %s): ",
                                     job->path);
            goto fail;
        }
        const kd_cache_meta *meta = kd_cache_meta_of(t->cache);
        t->topk = meta->topk;
        t->views = meta->views;
        t->nparams_aug = meta->aug_nparams;
    } else {
        if ((st = open_teacher_model(job, be, max_batch, &t->model)) ||
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
    t->aug_h = malloc(mb * KD_AUG_NPARAMS * sizeof(float));
    if (!t->logits_h || !t->tv_h || !t->ti_h || !t->lse_h || !t->aug_h) {
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

kd_status kd_teacher_batch(kd_teacher *t, const kd_dataset *d, const uint32_t *idx, int n,
                           int64_t epoch, const kd_augment_cfg *aug, uint64_t seed, float *x_host,
                           int32_t *y_host)
{
    if (!t->cache) {
        kd_batch_gather(d, idx, n, aug, seed, (uint64_t)epoch, x_host, y_host, NULL);
        return KD_OK;
    }
    int view = (int)(epoch % t->views);
    KD_TRY(kd_cache_get_rows(t->cache, idx, n, view, t->topk ? NULL : t->logits_h,
                             t->topk ? t->tv_h : NULL, t->topk ? t->ti_h : NULL,
                             t->topk ? t->lse_h : NULL, t->aug_h, NULL));
    size_t per = (size_t)d->c * d->h * d->w;
    for (int i = 0; i < n; i++) {
        kd_augment_apply(t->aug_h + (size_t)i * KD_AUG_NPARAMS, d->x + (size_t)idx[i] * per,
                         x_host + (size_t)i * per, d->c, d->h, d->w, t->fill);
        y_host[i] = d->y[idx[i]];
    }
    return KD_OK;
}

kd_status kd_teacher_targets(kd_teacher *t, const float *x_dev, int n)
{
    const kd_backend *be = t->be;
    size_t C = (size_t)t->classes;
    if (t->model) {
        kd_model_forward(t->model, x_dev, n, 0, 0);
        be->copy((size_t)n * C, kd_model_output(t->model), t->t_dev);
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

double kd_teacher_loss(kd_teacher *t, const kd_job *job, const float *s_dev, int n, float *ds_dev,
                       double grad_scale)
{
    const kd_backend *be = t->be;
    double sum;
    if (t->topk)
        sum = be->kd_topk(n, t->classes, t->topk, s_dev, t->tv_dev, t->ti_dev, t->lse_dev,
                          job->kd_temperature, job->kd_reverse, job->kd_t2, t->grad_dev,
                          job->kd_weight * grad_scale);
    else
        sum = be->kd_dense(n, t->classes, s_dev, t->t_dev, job->kd_temperature, job->kd_reverse,
                           job->kd_t2, t->grad_dev, job->kd_weight * grad_scale);
    be->add((size_t)n * t->classes, ds_dev, t->grad_dev, ds_dev);
    return job->kd_weight * sum;
}

/* ---- distill cache ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

kd_status kd_cache_build(const kd_job *job, const kd_train_opts *opts)
{
    FILE *log = stderr;
    if (!job->have_teacher || !job->teacher_cache[0])
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: `distill cache` needs a 'teacher' section with 'model', 'checkpoint' "
                       "and 'cache' (the file to write)",
                       job->path);
    kd_set_threads(job->threads);
    const kd_backend *be = NULL;
    KD_TRY(kd_pick_backend(job, &be, log));
    kd_dataset train;
    KD_TRY(kd_load_train_split(job, &train));
    kd_model *m = NULL;
    kd_cache_writer *w = NULL;
    float *x_host = NULL, *x_dev = NULL, *logits = NULL, *tv = NULL, *lse = NULL, *augp = NULL;
    float *rowbuf = NULL;
    int32_t *ti = NULL;
    int batch = job->eval_batch_size;
    kd_status st = open_teacher_model(job, be, batch, &m);
    if (st == KD_ERR_UNSUPPORTED && be != kd_backend_cpu() && !strcmp(job->device, "auto")) {
        fprintf(log, "device: cpu (%s)\n", kd_last_error());
        be = kd_backend_cpu();
        st = open_teacher_model(job, be, batch, &m);
    }
    if (st != KD_OK)
        goto done;
    size_t per = (size_t)train.c * train.h * train.w;
    if ((st = check_teacher_input(job, m, &train)))
        goto done;
    const int C = m->out_features, V = job->cache_views, K = job->cache_topk;
    if (K < 0 || K >= C) {
        if (K != 0) {
            st = KD_FAIL(KD_ERR_CONFIG,
                         "%s: teacher.topk %d must be below the %d classes (0 "
                         "stores full logits)",
                         job->path, K, C);
            goto done;
        }
    }
    kd_cache_meta meta = {.num_samples = train.n,
                          .num_classes = C,
                          .views = V,
                          .topk = K,
                          .aug_nparams = KD_AUG_NPARAMS,
                          .dtype =
                              strcmp(job->cache_dtype, "float32") ? KD_DTYPE_F16 : KD_DTYPE_F32,
                          .chunk_rows = job->cache_chunk_rows};
    kd_dataset_sha256(&train, meta.dataset_sha256);
    if ((st = kd_sha256_file_hex(job->teacher_ckpt, meta.teacher_sha256)))
        goto done;
    kd_cache_write_opts wo;
    kd_cache_write_opts_init(&wo);
    int comp = kd_cache_compress_from_name(job->cache_compress);
    if (comp < 0) {
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s: teacher.compress must be none, deflate, lz4 or zstd, got "
                     "'%s'",
                     job->path, job->cache_compress);
        goto done;
    }
    wo.compress = (kd_cache_compress)comp;
    char dir[512];
    snprintf(dir, sizeof dir, "%s", job->teacher_cache);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        if ((st = kd_mkdir_p(dir)))
            goto done;
    }
    if ((st = kd_cache_writer_open(job->teacher_cache, &meta, &wo, &w)))
        goto done;
    const int64_t nchunks = kd_cache_writer_num_chunks(w);
    const int64_t missing = kd_cache_writer_chunks_missing(w);
    const int64_t R = kd_cache_writer_meta(w)->chunk_rows;
    if (missing < nchunks)
        fprintf(log, "resuming %s: %" PRId64 " of %" PRId64 " chunks already written\n",
                job->teacher_cache, nchunks - missing, nchunks);
    if (V > 1 && !job->augment.crop_pad && !job->augment.hflip)
        fprintf(log, "note: %d views but data.augment is off, so every view is the same image\n",
                V);
    x_host = malloc((size_t)batch * per * sizeof(float));
    rowbuf = malloc((size_t)batch * C * sizeof(float));
    logits = malloc((size_t)R * V * C * sizeof(float));
    augp = malloc((size_t)R * V * KD_AUG_NPARAMS * sizeof(float));
    tv = malloc((size_t)R * V * (K ? K : 1) * sizeof(float));
    ti = malloc((size_t)R * V * (K ? K : 1) * sizeof(int32_t));
    lse = malloc((size_t)R * V * sizeof(float));
    if (!x_host || !rowbuf || !logits || !augp || !tv || !ti || !lse) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = be->alloc((void **)&x_dev, (size_t)batch * per * sizeof(float))))
        goto done;
    const float fill = (0.0f - train.mean) / train.std;
    const kd_augment_cfg *aug =
        (job->augment.crop_pad > 0 || job->augment.hflip) ? &job->augment : NULL;
    fprintf(log, "caching %s over %" PRId64 " samples x %d views (%s%s) into %s\n",
            job->teacher_desc, train.n, V, K ? "top-k" : "full logits",
            meta.dtype == KD_DTYPE_F16 ? ", float16" : ", float32", job->teacher_cache);
    double t0 = now_s();
    int64_t done_rows = 0;
    for (int64_t c = 0; c < nchunks; c++) {
        if (kd_cache_writer_chunk_done(w, c))
            continue;
        if (opts->stop && *opts->stop) {
            st = KD_FAIL(KD_ERR_INTERRUPTED,
                         "stopped with %" PRId64 " chunks left; run `distill cache %s` again to "
                         "resume",
                         kd_cache_writer_chunks_missing(w), job->path);
            goto done;
        }
        int64_t r0 = c * R, rows = kd_cache_writer_chunk_nrows(w, c);
        for (int v = 0; v < V; v++) {
            for (int64_t b0 = 0; b0 < rows; b0 += batch) {
                int n = (int)(rows - b0 < batch ? rows - b0 : batch);
                for (int i = 0; i < n; i++) {
                    int64_t row = r0 + b0 + i;
                    float *p = augp + ((size_t)(b0 + i) * V + v) * KD_AUG_NPARAMS;
                    if (aug)
                        kd_augment_draw(aug, job->seed, (uint64_t)v, (uint64_t)row, p);
                    else
                        memset(p, 0, KD_AUG_NPARAMS * sizeof(float));
                    kd_augment_apply(p, train.x + (size_t)row * per, x_host + (size_t)i * per,
                                     train.c, train.h, train.w, fill);
                }
                if ((st = be->upload(x_dev, x_host, (size_t)n * per * sizeof(float))))
                    goto done;
                kd_model_forward(m, x_dev, n, 0, 0);
                if ((st = be->download(rowbuf, kd_model_output(m), (size_t)n * C * sizeof(float))))
                    goto done;
                for (int i = 0; i < n; i++)
                    memcpy(logits + ((size_t)(b0 + i) * V + v) * C, rowbuf + (size_t)i * C,
                           C * sizeof(float));
            }
        }
        if (K)
            kd_topk_rows(logits, (int)(rows * V), C, K, tv, ti, lse);
        int32_t *labels = train.y + r0;
        if ((st = kd_cache_writer_put(w, c, K ? NULL : logits, K ? tv : NULL, K ? ti : NULL,
                                      K ? lse : NULL, augp, labels)))
            goto done;
        done_rows += rows;
        double el = now_s() - t0;
        double rate = done_rows * V / (el > 1e-9 ? el : 1e-9);
        int64_t left = kd_cache_writer_chunks_missing(w);
        if (opts->progress)
            fprintf(stderr, "\rcache: %" PRId64 "/%" PRId64 " chunks, %.0f views/s, ETA %.0fs   ",
                    nchunks - left, nchunks, rate, left * R * V / (rate > 0 ? rate : 1));
        else if ((nchunks - left) % 10 == 0 || left == 0)
            fprintf(log, "cache: %" PRId64 "/%" PRId64 " chunks, %.0f views/s\n", nchunks - left,
                    nchunks, rate);
    }
    if (opts->progress)
        fputc('\n', stderr);
    st = kd_cache_writer_close(w);
    w = NULL;
    if (st == KD_OK)
        fprintf(log, "wrote %s: %" PRId64 " samples x %d views in %.1fs\n", job->teacher_cache,
                train.n, V, now_s() - t0);
done:
    if (w) {
        kd_status st2 = kd_cache_writer_close(w);
        if (st == KD_OK)
            st = st2;
    }
    if (m)
        be->release(x_dev);
    kd_model_free(m);
    free(x_host);
    free(rowbuf);
    free(logits);
    free(augp);
    free(tv);
    free(ti);
    free(lse);
    kd_dataset_free(&train);
    return st;
}
