/*
 * export.c - `distill export` as a library call: build and load the student, lower, calibrate,
 * quantize, plan, serialize, evaluate on the test set, write the files (export.h has the steps).
 *
 * Order matters for the "nothing written on bad input" promise: every check (options, output
 * directory, checkpoint, data, lowering, quantization, kdm_load of the blob) runs before the
 * first file is created. The output directory is only probed (the nearest existing ancestor
 * must be a writable directory) until then.
 *
 * The files of one export replace those of an earlier one all together or not at all: each is
 * written to a temporary name beside its final one, flushed and closed, and only when every one
 * is complete are they renamed into place (see write_outputs). Outputs of an earlier export that
 * this one does not write (model.c after --format kdm, say) are removed afterwards and named in
 * the report, so the folder never pairs new files with old ones.
 *
 * Evaluation runs the three models on every test sample: the engine's own (unfolded) model in
 * batches as `distill eval` does, the folded float graph, and the blob through the host build of
 * the runtime (kdm_load once, kdm_invoke per sample, inputs quantized with the blob's own
 * kdm_input_quant). Their accuracies and agreements go to the report.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checkpoint.h"
#include "dataset.h"
#include "export_internal.h"
#include "quant.h"
#include "fileio.h"
#include "train.h"

/* calibration samples the bias correction runs (it costs two partial forwards per weighted op) */
#define KD_EXPORT_BC_SAMPLES 256

void kd_export_opts_default(kd_export_opts *o)
{
    memset(o, 0, sizeof *o);
    o->bits = 8;
    o->formats = KD_EXPORT_KDM;
    o->calib_samples = 1000;
    o->evaluate = 1;
}

double kd_export_report_float_acc(const kd_export_report *r) { return r->acc_float; }
double kd_export_report_int_acc(const kd_export_report *r) { return r->acc_int; }
double kd_export_report_agreement(const kd_export_report *r) { return r->agree_int_float; }

void kd_export_report_free(kd_export_report *r)
{
    if (!r)
        return;
    kd_export_graph_free(r->g);
    free(r->op_bytes);
    free(r->op_wbytes);
    free(r);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Fail unless `path` could be created as a file or directory: its nearest existing ancestor
 * must be a directory we may write into, and nothing on the way may be a non-directory. */
static kd_status check_creatable(const char *path, const char *what)
{
    char p[1024];
    if (!path || !*path)
        return KD_FAIL(KD_ERR_INVALID, "export: empty %s path", what);
    if (strlen(path) >= sizeof p)
        return KD_FAIL(KD_ERR_INVALID, "export: %s path '%s' is too long", what, path);
    snprintf(p, sizeof p, "%s", path);
    struct stat s;
    for (;;) {
        if (stat(p, &s) == 0) {
            if (!S_ISDIR(s.st_mode))
                return KD_FAIL(KD_ERR_IO, "export: cannot create %s '%s': '%s' is not a directory",
                               what, path, p);
            if (access(p, W_OK | X_OK) != 0)
                return KD_FAIL(KD_ERR_IO,
                               "export: cannot create %s '%s': directory '%s' is not "
                               "writable",
                               what, path, p);
            return KD_OK;
        }
        if (errno != ENOENT && errno != ENOTDIR)
            return KD_FAIL(KD_ERR_IO, "export: cannot create %s '%s': '%s': %s", what, path, p,
                           strerror(errno));
        char *slash = strrchr(p, '/');
        while (slash && slash > p && slash[1] == '\0') {
            *slash = '\0';
            slash = strrchr(p, '/');
        }
        if (!slash) {
            snprintf(p, sizeof p, ".");
            continue;
        }
        if (slash == p) {
            p[1] = '\0';
            continue;
        }
        *slash = '\0';
    }
}

/* The names an export writes into out_dir, in the order they are written; the report is last. */
static const char *const out_names[] = {"model.kdm", "model.c", "model.h", "samples.bin",
                                        "report.json"};
#define N_OUT_NAMES 5

/* path as an absolute name with symbolic links, "." and ".." resolved, also when its last
 * components do not exist yet (those are resolved as text, as kd_mkdir_p will create them). */
static kd_status canon_path(const char *path, char *out, size_t n)
{
    char head[PATH_MAX], rest[PATH_MAX] = "", tmp[PATH_MAX], real[PATH_MAX];
    if (strlen(path) >= sizeof head)
        return KD_FAIL(KD_ERR_INVALID, "export: path '%s' is too long", path);
    snprintf(head, sizeof head, "%s", path);
    while (!realpath(head[0] ? head : ".", real)) {
        if (errno != ENOENT)
            return KD_FAIL(KD_ERR_IO, "export: cannot resolve '%s': '%s': %s", path,
                           head[0] ? head : ".", strerror(errno));
        size_t l = strlen(head);
        while (l > 1 && head[l - 1] == '/')
            head[--l] = '\0';
        char *slash = strrchr(head, '/');
        const char *comp = slash ? slash + 1 : head;
        if (strlen(comp) + 1 + strlen(rest) >= sizeof tmp)
            return KD_FAIL(KD_ERR_INVALID, "export: path '%s' is too long", path);
        size_t lc = strlen(comp), lr = strlen(rest);
        memcpy(tmp, comp, lc);
        tmp[lc] = '/';
        memcpy(tmp + lc + 1, rest, lr + 1);
        if (!lr)
            tmp[lc] = '\0';
        memcpy(rest, tmp, lc + 1 + lr + 1);
        if (!slash)
            head[0] = '\0';
        else if (slash == head)
            head[1] = '\0';
        else
            *slash = '\0';
    }
    size_t len = strlen(real);
    for (char *save = NULL, *c = strtok_r(rest, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
        if (!strcmp(c, "."))
            continue;
        if (!strcmp(c, "..")) {
            char *slash = strrchr(real, '/');
            if (slash == real)
                real[1] = '\0';
            else
                *slash = '\0';
            len = strlen(real);
            continue;
        }
        if (len + 1 + strlen(c) >= sizeof real)
            return KD_FAIL(KD_ERR_INVALID, "export: path '%s' is too long", path);
        if (len > 1)
            real[len++] = '/';
        memcpy(real + len, c, strlen(c) + 1);
        len += strlen(c);
    }
    if (len >= n)
        return KD_FAIL(KD_ERR_INVALID, "export: path '%s' is too long", path);
    memcpy(out, real, len + 1);
    return KD_OK;
}

/* --json FILE: an existing regular file (replaced) or a new name in a directory we may write
 * into, and neither the output directory nor one of the files the exporter writes into it. */
static kd_status check_json_path(const char *json, const char *out_dir)
{
    struct stat s;
    if (stat(json, &s) == 0) {
        if (S_ISDIR(s.st_mode))
            return KD_FAIL(KD_ERR_IO, "export: cannot write the report '%s': it is a directory",
                           json);
        if (!S_ISREG(s.st_mode))
            return KD_FAIL(KD_ERR_IO,
                           "export: cannot write the report '%s': it exists and is not a regular "
                           "file",
                           json);
        char dir[1024];
        kd_path_dir(json, dir, sizeof dir);
        KD_TRY(check_creatable(dir, "report directory"));
    } else if (errno == ENOENT || errno == ENOTDIR) {
        KD_TRY(check_creatable(json, "report"));
    } else {
        return KD_FAIL(KD_ERR_IO, "export: cannot write the report '%s': %s", json,
                       strerror(errno));
    }
    char cj[PATH_MAX], cd[PATH_MAX];
    KD_TRY(canon_path(json, cj, sizeof cj));
    KD_TRY(canon_path(out_dir, cd, sizeof cd));
    if (!strcmp(cj, cd))
        return KD_FAIL(KD_ERR_INVALID, "export: --json '%s' is the output directory '%s'", json,
                       out_dir);
    size_t ld = strlen(cd);
    /* cd is "/" or has no trailing slash */
    const char *in_dir =
        !strncmp(cj, cd, ld) && (ld == 1 || cj[ld] == '/') ? cj + ld + (ld > 1) : NULL;
    for (int i = 0; in_dir && i < N_OUT_NAMES - 1; i++) {
        size_t ln = strlen(out_names[i]);
        if (!strncmp(in_dir, out_names[i], ln) && (in_dir[ln] == '\0' || in_dir[ln] == '/'))
            return KD_FAIL(KD_ERR_INVALID,
                           "export: --json '%s' is the export's own output '%s/%s': give the "
                           "report another name",
                           json, out_dir, out_names[i]);
    }
    return KD_OK;
}

/* An existing output file must be replaceable (a directory in its place is not). */
static kd_status check_file_target(const char *path)
{
    struct stat s;
    if (stat(path, &s) == 0 && S_ISDIR(s.st_mode))
        return KD_FAIL(KD_ERR_IO, "export: cannot write '%s': it is a directory", path);
    return KD_OK;
}

/* The index of the largest of v, or -1 when one is not finite (no prediction to count). */
static int argmax_f(const float *v, int n)
{
    int best = 0;
    for (int i = 0; i < n; i++) {
        if (!isfinite(v[i]))
            return -1;
        if (v[i] > v[best])
            best = i;
    }
    return best;
}

static void *arena_alloc(uint32_t size)
{
    size_t n = ((size_t)size + 63) & ~(size_t)63;
    return aligned_alloc(64, n ? n : 64);
}

/* Run the blob on every test sample; fills the integer side of the report and samples.bin. */
static kd_status evaluate(kd_model *m, const kd_export_graph *g, const kd_dataset *test,
                          const uint8_t *blob, size_t blob_len, const kd_export_opts *o,
                          kd_export_report *r, uint8_t **samples, size_t *samples_len)
{
    kd_status st = KD_OK;
    kdm_model km;
    kdm_status ks = kdm_load(&km, blob, blob_len);
    if (ks != KDM_OK)
        return KD_FAIL(KD_ERR_INTERNAL, "export: kdm_load: %s", kdm_status_str(ks));
    uint32_t in_size = kdm_input_size(&km), out_size = kdm_output_size(&km);
    uint32_t sbits, obits;
    int32_t zp, ozp;
    kdm_input_quant(&km, &sbits, &zp);
    kdm_output_quant(&km, &obits, &ozp);
    float scale, oscale;
    memcpy(&scale, &sbits, 4);
    memcpy(&oscale, &obits, 4);

    int64_t n = o->evaluate ? test->n : o->n_samples;
    int batch = m->max_batch;
    size_t per = (size_t)test->c * test->h * test->w;
    int8_t *qin = malloc(in_size), *qout = malloc(out_size);
    void *arena = arena_alloc(kdm_arena_size(&km));
    int *pred_engine = malloc(sizeof(int) * (size_t)(n ? n : 1));
    float *logits = malloc(sizeof(float) * (size_t)batch * m->out_features);
    kd_export_acts a = {0};
    *samples = NULL;
    *samples_len = 0;
    size_t rec = in_size + 4 + out_size;
    if (o->n_samples > 0) {
        *samples_len = 16 + (size_t)o->n_samples * rec;
        *samples = calloc(1, *samples_len);
    }
    if (!qin || !qout || !arena || !pred_engine || !logits || (o->n_samples > 0 && !*samples)) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto done;
    }
    if ((st = kd_export_acts_new(g, &a)))
        goto done;
    if (o->evaluate) {
        /* the engine's unfolded model, as `distill eval` runs it */
        float *x_dev = NULL;
        if ((st = m->be->alloc((void **)&x_dev, (size_t)batch * per * sizeof(float))))
            goto done;
        for (int64_t s0 = 0; s0 < n && st == KD_OK; s0 += batch) {
            int nb = (int)(n - s0 < batch ? n - s0 : batch);
            st = m->be->upload(x_dev, test->x + (size_t)s0 * per, (size_t)nb * per * sizeof(float));
            if (st == KD_OK) {
                kd_model_forward(m, x_dev, nb, 0, 0);
                st = m->be->download(logits, kd_model_output(m),
                                     sizeof(float) * (size_t)nb * m->out_features);
            }
            for (int i = 0; i < nb && st == KD_OK; i++)
                if ((pred_engine[s0 + i] =
                         argmax_f(logits + (size_t)i * m->out_features, m->out_features)) < 0)
                    st = KD_FAIL(KD_ERR_INVALID,
                                 "export: the checkpoint's model gives non-finite outputs on "
                                 "test image %lld: its weights overflow float32 on this data",
                                 (long long)(s0 + i));
            if (o->progress)
                o->progress(o->progress_ctx, "engine eval", s0 + nb, n);
        }
        m->be->release(x_dev);
        if (st != KD_OK)
            goto done;
    }
    int64_t c_engine = 0, c_float = 0, c_int = 0, agree_fe = 0, agree_if = 0;
    double err_sum = 0, range_sum = 0;
    for (int64_t s = 0; s < n; s++) {
        const float *x = test->x + (size_t)s * per;
        kd_export_quantize_input(g, x, scale, zp, qin);
        ks = kdm_invoke(&km, arena, kdm_arena_size(&km), qin, qout);
        if (ks != KDM_OK) {
            st = KD_FAIL(KD_ERR_INTERNAL, "export: kdm_invoke on test sample %lld: %s",
                         (long long)s, kdm_status_str(ks));
            goto done;
        }
        if (s < o->n_samples) {
            uint8_t *p = *samples + 16 + (size_t)s * rec;
            memcpy(p, qin, in_size);
            uint32_t y = (uint32_t)test->y[s];
            p[in_size] = (uint8_t)y;
            p[in_size + 1] = (uint8_t)(y >> 8);
            p[in_size + 2] = (uint8_t)(y >> 16);
            p[in_size + 3] = (uint8_t)(y >> 24);
            memcpy(p + in_size + 4, qout, out_size);
        }
        if (!o->evaluate)
            continue;
        kd_export_forward(g, x, &a);
        const float *fo = a.v[g->output];
        int pf = argmax_f(fo, (int)out_size);
        if (pf < 0) {
            st = KD_FAIL(KD_ERR_INVALID,
                         "export: the folded float model gives non-finite outputs on test image "
                         "%lld: it overflows float32 on this data",
                         (long long)s);
            goto done;
        }
        int pi = (int)kdm_argmax_s8(qout, out_size);
        int pe = pred_engine[s];
        c_engine += pe == test->y[s];
        c_float += pf == test->y[s];
        c_int += pi == test->y[s];
        agree_fe += pf == pe;
        agree_if += pi == pf;
        double e = 0, mx = 0;
        for (uint32_t j = 0; j < out_size; j++) {
            e += fabs((double)oscale * (qout[j] - ozp) - fo[j]);
            mx = fmax(mx, fabs((double)fo[j]));
        }
        err_sum += e / out_size;
        range_sum += mx;
        if (o->progress && (s % 256 == 0 || s == n - 1))
            o->progress(o->progress_ctx, "integer eval", s + 1, n);
    }
    if (o->n_samples > 0) {
        uint8_t *p = *samples;
        memcpy(p, "KDMS", 4);
        uint32_t hdr[3] = {(uint32_t)o->n_samples, in_size, out_size};
        for (int i = 0; i < 3; i++)
            for (int b = 0; b < 4; b++)
                p[4 + 4 * i + b] = (uint8_t)(hdr[i] >> (8 * b));
    }
    if (o->evaluate && n > 0) {
        r->evaluated = 1;
        r->test_n = n;
        r->acc_engine = (double)c_engine / n;
        r->acc_float = (double)c_float / n;
        r->acc_int = (double)c_int / n;
        r->agree_float_engine = (double)agree_fe / n;
        r->agree_int_float = (double)agree_if / n;
        r->mean_int_err = err_sum / n;
        r->logit_range = range_sum / n;
    }
done:
    kd_export_acts_free(&a);
    free(qin);
    free(qout);
    free(arena);
    free(pred_engine);
    free(logits);
    if (st != KD_OK) {
        free(*samples);
        *samples = NULL;
    }
    return st;
}

/* The largest |folded - unfolded| logit over the first samples (a check of the folding). */
static kd_status fold_error(kd_model *m, const kd_export_graph *g, const kd_dataset *d, double *err,
                            int *used)
{
    *err = 0;
    int nb = (int)(d->n < m->max_batch ? d->n : m->max_batch);
    if (nb > 64)
        nb = 64;
    *used = 0;
    if (nb <= 0 || g->classes != m->out_features)
        return KD_OK;
    *used = nb;
    size_t per = (size_t)d->c * d->h * d->w;
    float *x_dev = NULL, *y = malloc(sizeof(float) * (size_t)nb * m->out_features);
    kd_export_acts a = {0};
    kd_status st = y ? KD_OK : KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    if (st || (st = m->be->alloc((void **)&x_dev, (size_t)nb * per * sizeof(float))) ||
        (st = m->be->upload(x_dev, d->x, (size_t)nb * per * sizeof(float))))
        goto done;
    kd_model_forward(m, x_dev, nb, 0, 0);
    if ((st = m->be->download(y, kd_model_output(m),
                              sizeof(float) * (size_t)nb * m->out_features)) ||
        (st = kd_export_acts_new(g, &a)))
        goto done;
    for (int s = 0; s < nb; s++) {
        kd_export_forward(g, d->x + (size_t)s * per, &a);
        const float *fo = a.v[g->output];
        if (g->op[g->nop - 1].type == KDM_OP_SOFTMAX)
            fo = a.v[g->op[g->nop - 1].in0];
        for (int j = 0; j < m->out_features; j++) {
            const double dj = fabs((double)fo[j] - y[(size_t)s * m->out_features + j]);
            if (!isfinite(dj)) { /* fmax would drop a NaN */
                st = KD_FAIL(KD_ERR_INVALID,
                             "export: the model's outputs on test image %d are not "
                             "finite (checkpoint %g, folded %g): it overflows float32 on them",
                             s, (double)y[(size_t)s * m->out_features + j], (double)fo[j]);
                goto done;
            }
            *err = fmax(*err, dj);
        }
    }
done:
    kd_export_acts_free(&a);
    if (x_dev)
        m->be->release(x_dev);
    free(y);
    return st;
}

static void add_file(kd_export_report *r, const char *path)
{
    if (r->nfiles < KD_EXPORT_MAX_FILES)
        snprintf(r->files[r->nfiles++], sizeof r->files[0], "%s", path);
}

/* One output file: written to tmp (beside path), then renamed over path. While the renames
 * run, the file it replaces is kept under bak (a hard link) so that they can be undone. */
typedef struct {
    char path[1100], tmp[1200], bak[1200];
    const void *data;
    size_t len;
    int tmp_made, bak_made, existed;
} out_file;

/* Write f's bytes to f->tmp, fsync and close it, every step checked. */
static kd_status write_tmp(out_file *f)
{
    int fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return KD_FAIL(KD_ERR_IO, "export: writing '%s': cannot create '%s': %s", f->path, f->tmp,
                       strerror(errno));
    f->tmp_made = 1;
    const uint8_t *p = f->data;
    size_t done = 0;
    while (done < f->len) {
        ssize_t w = write(fd, p + done, f->len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            close(fd);
            return KD_FAIL(KD_ERR_IO, "export: writing '%s': short write (%zu of %zu bytes): %s",
                           f->path, done, f->len, strerror(e));
        }
        done += (size_t)w;
    }
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        return KD_FAIL(KD_ERR_IO, "export: writing '%s': fsync failed: %s", f->path, strerror(e));
    }
    if (close(fd) != 0)
        return KD_FAIL(KD_ERR_IO, "export: writing '%s': close failed: %s", f->path,
                       strerror(errno));
    return KD_OK;
}

/*
 * Rename every complete temporary file over its final name. Each file about to be replaced is
 * first linked to its bak name; when a rename fails, the renames done before it are undone
 * (old files back, new names removed). A filesystem without hard links gets no copy, and a
 * failed rename there cannot bring back the files already replaced (the message names them).
 */
static kd_status commit(out_file *f, int n)
{
    for (int i = 0; i < n; i++) {
        struct stat s;
        if (lstat(f[i].path, &s) != 0 || S_ISDIR(s.st_mode))
            continue;
        f[i].existed = 1;
        unlink(f[i].bak);
        if (link(f[i].path, f[i].bak) == 0)
            f[i].bak_made = 1;
        else if (errno != EPERM && errno != EOPNOTSUPP && errno != ENOSYS && errno != EMLINK)
            return KD_FAIL(KD_ERR_IO, "export: cannot keep '%s' as '%s' while replacing it: %s",
                           f[i].path, f[i].bak, strerror(errno));
    }
    int k = 0;
    for (; k < n; k++) {
        if (rename(f[k].tmp, f[k].path) != 0)
            break;
        f[k].tmp_made = 0;
    }
    if (k == n)
        return KD_OK;
    char msg[2048];
    int e = errno;
    int len = snprintf(msg, sizeof msg, "export: writing '%s': rename of '%s' failed: %s",
                       f[k].path, f[k].tmp, strerror(e));
    for (int i = 0; i < k; i++) {
        if (f[i].bak_made ? rename(f[i].bak, f[i].path) == 0
                          : !f[i].existed && unlink(f[i].path) == 0) {
            f[i].bak_made = 0;
            continue;
        }
        if (len >= 0 && (size_t)len < sizeof msg)
            len += snprintf(msg + len, sizeof msg - (size_t)len, "; '%s' could not be put back%s%s",
                            f[i].path,
                            f[i].bak_made  ? ", its previous contents are in "
                            : f[i].existed ? " (the filesystem keeps no second name of a file)"
                                           : "",
                            f[i].bak_made ? f[i].bak : "");
        f[i].bak_made = 0; /* keep that copy */
    }
    return KD_FAIL(KD_ERR_IO, "%s", msg);
}

/*
 * Write the export's files (model.kdm, model.c + model.h, samples.bin, the report) as one set:
 * all go to temporary names first and are renamed into place only once every one is complete,
 * so a failure (a full disk, say) leaves every earlier file as it was and no temporary file.
 * Then the outputs of an earlier export in out_dir that this one does not write are removed.
 * Directories made for them are removed again when the export fails.
 */
static kd_status write_outputs(const kd_export_opts *o, kd_export_report *r, const uint8_t *blob,
                               size_t len, const uint8_t *samples, size_t samples_len)
{
    out_file f[N_OUT_NAMES];
    memset(f, 0, sizeof f);
    kd_export_text h = {NULL, 0}, c = {NULL, 0};
    char *json = NULL, report[1024], dir[1024], cd[PATH_MAX], cj[PATH_MAX], path[PATH_MAX + 16];
    char made_out[PATH_MAX] = "", made_dir[PATH_MAX] = "";
    size_t json_len = 0;
    int n = 0;
    kd_status st = KD_OK;
    if (snprintf(report, sizeof report, "%s%s", o->json_path ? o->json_path : o->out_dir,
                 o->json_path ? "" : "/report.json") >= (int)sizeof report)
        return KD_FAIL(KD_ERR_INVALID, "export: report path '%s' is too long", report);
    kd_path_dir(report, dir, sizeof dir);
    if ((st = kd_mkdir_p_made(o->out_dir, made_out, sizeof made_out)) ||
        (st = kd_mkdir_p_made(dir, made_dir, sizeof made_dir)) || /* the report's may differ */
        (st = canon_path(o->out_dir, cd, sizeof cd)) || (st = canon_path(report, cj, sizeof cj)) ||
        ((o->formats & KD_EXPORT_C) && (st = kd_export_c_source(r->g, blob, len, &h, &c))))
        goto done;

    const void *data[N_OUT_NAMES] = {o->formats & KD_EXPORT_KDM ? blob : NULL, c.text, h.text,
                                     samples, NULL};
    const size_t lens[N_OUT_NAMES] = {len, c.len, h.len, samples_len, 0};
    for (int i = 0; i < N_OUT_NAMES; i++) {
        snprintf(path, sizeof path, "%s%s%s", cd, strcmp(cd, "/") ? "/" : "", out_names[i]);
        struct stat s;
        if (i < N_OUT_NAMES - 1 && data[i]) {
            snprintf(f[n].path, sizeof f[n].path, "%s/%s", o->out_dir, out_names[i]);
            f[n].data = data[i];
            f[n].len = lens[i];
            add_file(r, f[n].path);
            n++;
        } else if (strcmp(path, cj) && lstat(path, &s) == 0 && S_ISREG(s.st_mode) &&
                   r->nremoved < KD_EXPORT_MAX_FILES) {
            snprintf(r->removed[r->nremoved++], sizeof r->removed[0], "%s/%s", o->out_dir,
                     out_names[i]);
        }
    }
    snprintf(f[n].path, sizeof f[n].path, "%s", report);
    add_file(r, f[n].path);
    if ((st = kd_export_report_json(r, &json, &json_len)))
        goto done;
    f[n].data = json;
    f[n].len = json_len;
    n++;

    for (int i = 0; i < n && st == KD_OK; i++) {
        if (snprintf(f[i].tmp, sizeof f[i].tmp, "%s.tmp.%ld", f[i].path, (long)getpid()) >=
                (int)sizeof f[i].tmp ||
            snprintf(f[i].bak, sizeof f[i].bak, "%s.old.%ld", f[i].path, (long)getpid()) >=
                (int)sizeof f[i].bak)
            st = KD_FAIL(KD_ERR_INVALID, "export: path '%s' is too long", f[i].path);
        else
            st = write_tmp(&f[i]);
    }
    if (st == KD_OK)
        st = commit(f, n);
    if (st == KD_OK)
        st = kd_fsync_dir_of(f[0].path);
    if (st == KD_OK && strcmp(dir, o->out_dir))
        st = kd_fsync_dir_of(report);
    for (int i = 0; i < r->nremoved && st == KD_OK; i++)
        if (unlink(r->removed[i]) != 0 && errno != ENOENT)
            st = KD_FAIL(KD_ERR_IO,
                         "export: the new files are in place, but '%s', left by an earlier "
                         "export, could not be removed: %s",
                         r->removed[i], strerror(errno));
    if (st == KD_OK && r->nremoved)
        st = kd_fsync_dir_of(f[0].path);
done:
    for (int i = 0; i < n; i++) {
        if (f[i].tmp_made)
            unlink(f[i].tmp);
        if (f[i].bak_made)
            unlink(f[i].bak);
    }
    if (st != KD_OK) {
        kd_remove_made_dirs(dir, made_dir);
        kd_remove_made_dirs(o->out_dir, made_out);
    }
    free(h.text);
    free(c.text);
    free(json);
    return st;
}

/* --int8-layers: the named conv / linear blocks keep 8-bit weights in an int4 export. */
static kd_status mark_int8_layers(kd_export_graph *g, const char *list, int bits)
{
    if (bits != 4)
        return KD_FAIL(KD_ERR_INVALID, "export: --int8-layers only applies to --quant int4");
    char tok[256];
    for (const char *p = list;; p++) {
        const size_t n = strcspn(p, ",");
        if (n == 0 || n >= sizeof tok)
            return KD_FAIL(KD_ERR_INVALID,
                           "export: --int8-layers '%s' holds %s layer name (a comma-separated "
                           "list of the model's conv2d and linear layers)",
                           list, n ? "an over-long" : "an empty");
        memcpy(tok, p, n);
        tok[n] = '\0';
        int found = 0;
        for (int i = 0; i < g->nop; i++)
            if (g->op[i].w && !strcmp(g->op[i].name, tok)) {
                g->op[i].wbits = 8;
                found = 1;
            }
        if (!found) {
            char names[512] = "";
            for (int i = 0; i < g->nop; i++)
                if (g->op[i].w) {
                    size_t l = strlen(names);
                    snprintf(names + l, sizeof names - l, "%s%s", l ? ", " : "", g->op[i].name);
                }
            return KD_FAIL(KD_ERR_INVALID,
                           "export: --int8-layers names '%s', which is no conv2d or linear layer "
                           "of the model (those are: %s)",
                           tok, names);
        }
        p += n;
        if (!*p)
            return KD_OK;
    }
}

static kd_status check_opts(const kd_export_opts *o)
{
    if (o->bits != 8 && o->bits != 4)
        return KD_FAIL(KD_ERR_INVALID, "export: --quant must be int8 or int4");
    if (!(o->formats & (KD_EXPORT_KDM | KD_EXPORT_C)))
        return KD_FAIL(KD_ERR_INVALID, "export: --format must be kdm, c or both");
    if (o->calib_samples < 1)
        return KD_FAIL(KD_ERR_INVALID, "export: --calib must be at least 1, got %lld",
                       (long long)o->calib_samples);
    if (o->n_samples < 0)
        return KD_FAIL(KD_ERR_INVALID, "export: --samples must be at least 0, got %lld",
                       (long long)o->n_samples);
    char path[1100];
    KD_TRY(check_creatable(o->out_dir, "output directory"));
    for (int i = 0; i < N_OUT_NAMES; i++) {
        snprintf(path, sizeof path, "%s/%s", o->out_dir, out_names[i]);
        KD_TRY(check_file_target(path));
    }
    if (o->json_path)
        KD_TRY(check_json_path(o->json_path, o->out_dir));
    return KD_OK;
}

kd_status kd_export_run(const kd_job *job, const char *checkpoint, const kd_export_opts *o,
                        kd_export_report **report)
{
    *report = NULL;
    double t0 = now_s();
    KD_TRY(check_opts(o));
    kd_set_threads(job->threads);
    kd_export_report *r = calloc(1, sizeof *r);
    if (!r)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    kd_model *m = NULL;
    kd_dataset train = {0}, test = {0};
    uint8_t *blob = NULL, *samples = NULL;
    size_t blob_len = 0, samples_len = 0;
    float *calib = NULL;
    kd_status st;
    kd_ckpt_info info = {0};
    const char *root = job->data_root[0] ? job->data_root : NULL;
    int batch = job->eval_batch_size > 0 ? job->eval_batch_size : 256;

    snprintf(r->config, sizeof r->config, "%s", job->path);
    snprintf(r->checkpoint, sizeof r->checkpoint, "%s", checkpoint);
    snprintf(r->model, sizeof r->model, "%s", job->model_desc);
    r->bits = o->bits;
    r->softmax = o->softmax;

    if ((st = kd_model_build(job->model_input, job->model_layers, kd_backend_cpu(), batch,
                             job->seed, &m)))
        goto done;
    if ((st = kd_checkpoint_load(checkpoint, m, NULL, 0, &info)))
        goto done;
    if ((st = kd_checkpoint_check_model(checkpoint, &info, m, job->model_desc,
                                        "export it with the job it was trained with")) ||
        (st = kd_check_checkpoint_quant(job, checkpoint, &info,
                                        "export it with the job it was trained with")))
        goto done;
    /* A job trained with fake-quantized weights (QAT) is the model with those weights, whatever
     * width it is exported at (its latent float weights were never what it ran with): the float
     * graph, its calibration and its accuracy use them. Exported at the job's own bits,
     * quantizing them again gives back the same integers (engine/quant.h); at the other width
     * they are quantized as any float model is. */
    r->qat_bits = job->quant_qat ? job->quant_bits : 0;
    r->qat = job->quant_qat && job->quant_bits == o->bits;
    if (r->qat_bits) {
        float *master = malloc(m->nparams * sizeof(float));
        if (!master) {
            st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
            goto done;
        }
        kd_quant_model_apply(m, r->qat_bits, master);
        free(master);
    }
    if ((st = kd_load_train_split(job, &train)) || (st = kd_check_model_fits_data(m, &train, job)))
        goto done;
    kd_apply_train_limit(job, &train); /* calibrate on the samples the job trained on */
    if ((o->evaluate || o->n_samples > 0) &&
        ((st = kd_dataset_load(job->dataset, root, 0, &test)) ||
         (st = kd_check_model_fits_data(m, &test, job))))
        goto done;
    if (o->n_samples > test.n) {
        st = KD_FAIL(KD_ERR_INVALID, "export: --samples %lld is more than the %lld test samples",
                     (long long)o->n_samples, (long long)test.n);
        goto done;
    }

    /* calibration samples spread evenly over the training split */
    int64_t nc = o->calib_samples < train.n ? o->calib_samples : train.n;
    size_t per = (size_t)train.c * train.h * train.w;
    calib = malloc(sizeof(float) * per * (size_t)(nc ? nc : 1));
    if (!calib) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto done;
    }
    for (int64_t i = 0; i < nc; i++) {
        int64_t src = i * train.n / nc;
        memcpy(calib + (size_t)i * per, train.x + (size_t)src * per, sizeof(float) * per);
    }
    r->calib_n = nc;

    if ((st = kd_export_lower(m, &r->g)))
        goto done;
    if (o->softmax && (st = kd_export_add_softmax(r->g)))
        goto done;
    float plo = (0.0f - train.mean) / train.std, phi = (1.0f - train.mean) / train.std;
    if ((st = kd_export_calibrate(r->g, calib, nc, plo, phi, o->progress, o->progress_ctx)))
        goto done;
    /* with QAT (above) the weights already sit on the max-abs grid kd_export_quantize keeps */
    if (o->int8_layers && (st = mark_int8_layers(r->g, o->int8_layers, o->bits)))
        goto done;
    if ((st = kd_export_quantize(r->g, o->bits, r->qat, o->single_rounding)))
        goto done;
    /* a model trained against quantized weights (QAT) already is the integer model; otherwise
     * remove the mean shift the weights' rounding causes */
    r->bias_corrected = !r->qat;
    if (r->bias_corrected &&
        (st = kd_export_bias_correct(r->g, calib,
                                     nc < KD_EXPORT_BC_SAMPLES ? nc : KD_EXPORT_BC_SAMPLES,
                                     o->progress, o->progress_ctx)))
        goto done;
    if ((st = kd_export_plan(r->g)) || (st = kd_export_blob(r->g, &blob, &blob_len)))
        goto done;
    r->blob_len = blob_len;
    r->flags = r->g->flags;
    r->op_mask = kd_export_op_mask(r->g);
    r->op_bytes = calloc((size_t)r->g->nop, sizeof *r->op_bytes);
    r->op_wbytes = calloc((size_t)r->g->nop, sizeof *r->op_wbytes);
    if (!r->op_bytes || !r->op_wbytes) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto done;
    }
    for (int i = 0; i < r->g->nop; i++) {
        const kd_export_op *op = &r->g->op[i];
        uint32_t rows, stride = kd_export_row_stride(op, &rows);
        /* weights, then int32 bias[out_c] and the quant record (int32 multipliers, int8 shifts,
         * padded to 4 bytes like every piece of the blob's data) */
        const uint32_t oc = (uint32_t)op->out_c;
        r->op_wbytes[i] = rows * stride;
        r->op_bytes[i] = rows * stride +
                         (stride ? 4u * oc + ((KDM_QUANT_BYTES(oc) + 3u) & ~3u) : 0) +
                         4u * (uint32_t)op->nparams;
        r->macs += op->macs;
        if (op->w)
            r->params += (int64_t)op->out_c * op->row_len + op->out_c;
    }
    if (o->evaluate && (st = fold_error(m, r->g, &test, &r->max_fold_err, &r->fold_n)))
        goto done;
    if ((o->evaluate || o->n_samples > 0) &&
        (st = evaluate(m, r->g, &test, blob, blob_len, o, r, &samples, &samples_len)))
        goto done;
    r->n_samples = o->n_samples;
    r->seconds = now_s() - t0;
    st = write_outputs(o, r, blob, blob_len, samples, samples_len);
done:
    kd_model_free(m);
    kd_dataset_free(&train);
    kd_dataset_free(&test);
    free(blob);
    free(samples);
    free(calib);
    if (st != KD_OK) {
        kd_export_report_free(r);
        return st;
    }
    *report = r;
    return KD_OK;
}
