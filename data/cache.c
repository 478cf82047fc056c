/*
 * cache.c - the HDF5 teacher-logit cache (schema: data/README.md).
 *
 * Row layout in memory (one "row" = one sample, all its views), used by the
 * in-memory reader, the streaming ring and the chunk loader alike:
 *   main [V, W] of esize bytes (W = C for full logits, K for top-k values,
 *   stored as in the file: float32, or float16 bits), idx [V, K] int32,
 *   lse [V] float32, aug [V, P] float32, lab int32.
 *
 * Crash safety of the writer: every dataset is created with its chunks
 * allocated up front (H5D_ALLOC_TIME_EARLY) and without object timestamps,
 * so a put rewrites chunks whose index entries already exist. The data are
 * written and flushed (+fsync) before /done is, and /done is one small
 * fixed-size chunk rewritten in place. A SIGKILL can therefore only lose work
 * on the chunk being written, which /done does not yet claim. A new file is
 * built under a temporary name and renamed into place once complete.
 *
 * A compressed chunk changes size when it is rewritten, so HDF5 must move it
 * and rewrite its index and free-space records, and a SIGKILL in the middle
 * of that can leave a file HDF5 cannot extend. Compressed caches are
 * therefore written uncompressed to <cache>.partial (crash-safe as above),
 * and when the last chunk is done the writer's close copies it into a
 * compressed file under a temporary name, renames that to <cache> and removes
 * the partial file. <cache> exists only once it is complete.
 *
 * Sharded caches: W writers each write an ordinary resumable cache file (a
 * shard) holding whole chunks [c0, c1) of the global chunk grid, and then one
 * of them writes a VDS file whose datasets map rows onto the shards' datasets
 * by relative file name. HDF5 reads fill values, silently, for a source it
 * cannot open, so every reader checks each mapping and shard (present,
 * complete, same metadata, exactly the mapped rows) before trusting the VDS
 * file, and then reads one row through every mapping, which makes HDF5 open
 * every source at once and keep it open as long as the dataset is.
 *
 * HDF5 errors: automatic printing is turned off per thread (the thread-safe
 * library keeps that setting per thread) and h5_fail folds the innermost and
 * outermost entries of HDF5's error stack into our message.
 */
#include "cache.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "augment.h"
#include "fileio.h"

#define KD_CACHE_DEFAULT_MEMORY_LIMIT ((int64_t)2 << 30)

/* ---- small helpers ------------------------------------------------------------------------ */

/* Turn off HDF5's printing of its error stack (this file reports errors itself, h5_detail). Its
 * result is not acted on: if it ever failed, HDF5 would only print its own stack to stderr
 * beside this file's messages, and every call's result is still checked. */
static void h5_quiet(void) { (void)H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

typedef struct {
    char inner[384];
    char outer[256];
} h5_err_text;

static herr_t h5_walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    h5_err_text *t = data;
    /* Walking upward: entry 0 is where HDF5 detected the error, the last is the API call. */
    if (n == 0)
        snprintf(t->inner, sizeof t->inner, "%s", e->desc ? e->desc : "");
    snprintf(t->outer, sizeof t->outer, "%s%s%s", e->func_name ? e->func_name : "",
             e->func_name ? ": " : "", e->desc ? e->desc : "");
    return 0;
}

/* HDF5's error stack as "api: what (innermost detail)", then cleared. */
static void h5_detail(char *buf, size_t len)
{
    h5_err_text t = {{0}, {0}};
    /* Best effort, on a path that is reporting a failure already: if the walk fails, t stays
     * empty and the message says there is no detail; a failed clear leaves stale entries that
     * the next h5_detail would show first. */
    (void)H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, h5_walk_cb, &t);
    (void)H5Eclear2(H5E_DEFAULT);
    if (!t.outer[0])
        snprintf(buf, len, "no HDF5 error detail");
    else if (t.inner[0] && strcmp(t.inner, t.outer) != 0 && !strstr(t.outer, t.inner))
        snprintf(buf, len, "%s (%s)", t.outer, t.inner);
    else
        snprintf(buf, len, "%s", t.outer);
}

/* Record "cache 'path': call failed: <hdf5 detail>" with status st. */
static kd_status h5_fail_at(kd_status st, const char *file, int line, const char *path,
                            const char *call)
{
    char d[700];
    h5_detail(d, sizeof d);
    return kd_fail_at(st, file, line, "cache '%s': %s failed: %s", path, call, d);
}
#define H5_FAIL(st, path, call) h5_fail_at((st), __FILE__, __LINE__, (path), (call))

/* Evaluate an HDF5 call; on a negative result record the failure and jump to `done`. */
#define H5_CHECK(expr, call)                                                                       \
    do {                                                                                           \
        if ((expr) < 0) {                                                                          \
            st = H5_FAIL(KD_ERR_IO, path, call);                                                   \
            goto done;                                                                             \
        }                                                                                          \
    } while (0)

/* Close a handle without acting on the result: for error paths (the first error is the one
 * reported), handles of files only read, and handles that carry no data (dataspaces, property
 * lists, types). A dataset or attribute closed after this code wrote through it uses H5_CLOSE. */
static void close_id(hid_t *id, herr_t (*fn)(hid_t))
{
    if (*id >= 0)
        (void)fn(*id);
    *id = H5I_INVALID_HID;
}

/* Close a handle written through: a failure is recorded in st (with the function's `path`)
 * unless an earlier failure already is. */
#define H5_CLOSE(id, fn)                                                                           \
    do {                                                                                           \
        if ((id) >= 0 && fn(id) < 0 && st == KD_OK)                                                \
            st = H5_FAIL(KD_ERR_IO, path, #fn);                                                    \
        (id) = H5I_INVALID_HID;                                                                    \
    } while (0)

static pthread_once_t f16_once = PTHREAD_ONCE_INIT;
static hid_t f16_type_id = H5I_INVALID_HID;

/* IEEE binary16 little-endian, built the way h5py builds numpy's float16. */
static void f16_type_make(void)
{
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    if (t >= 0 && H5Tset_fields(t, 15, 10, 5, 0, 10) >= 0 && H5Tset_size(t, 2) >= 0 &&
        H5Tset_ebias(t, 15) >= 0)
        f16_type_id = t; /* lives as long as the process */
    else if (t >= 0) /* its result changes nothing: the type stays unmade, which its users report */
        (void)H5Tclose(t);
}

static hid_t f16_type(void)
{
    pthread_once(&f16_once, f16_type_make);
    return f16_type_id;
}

static const char *dtype_str(kd_dtype dt)
{
    return dt == KD_DTYPE_F16 ? "float16" : dt == KD_DTYPE_F32 ? "float32" : "unsupported";
}

static int valid_hash(const char *h)
{
    size_t n = strnlen(h, 65);
    if (n == 0)
        return 1;
    if (n != 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((h[i] >= '0' && h[i] <= '9') || (h[i] >= 'a' && h[i] <= 'f')))
            return 0;
    return 1;
}

static int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t meta_rows(const kd_cache_meta *m) { return m->row_end - m->row_begin; }

static int64_t meta_chunks(const kd_cache_meta *m) { return div_up(meta_rows(m), m->chunk_rows); }

/* W: values per view in the main dataset. */
static int meta_width(const kd_cache_meta *m) { return m->topk ? m->topk : m->num_classes; }

static size_t meta_esize(const kd_cache_meta *m) { return m->dtype == KD_DTYPE_F16 ? 2 : 4; }

/* ---- float16 ------------------------------------------------------------------------------ */

uint16_t kd_f32_to_f16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t exp = (u >> 23) & 0xff, man = u & 0x7fffff;
    if (exp == 0xff) /* Inf stays Inf; NaN stays a (quiet) NaN */
        return (uint16_t)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        /* Subnormal half: m * 2^-24 with m = full * 2^(e - 14), rounded to nearest even. */
        if (e < -10)
            return sign; /* below half the smallest subnormal: rounds to zero */
        uint32_t full = man | 0x800000;
        int shift = 14 - e;
        uint32_t m = full >> shift, rem = full & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1)))
            m++; /* may carry into the smallest normal: still the right encoding */
        return (uint16_t)(sign | m);
    }
    uint32_t hv = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (hv & 1)))
        hv++; /* a carry out of the mantissa bumps the exponent, up to Inf */
    return (uint16_t)(sign | hv);
}

float kd_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-8f; /* 2^-24, exact */
        return sign ? -v : v;
    }
    if (exp == 31)
        u = sign | 0x7f800000 | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- top-k -------------------------------------------------------------------------------- */

static double row_lse(const float *x, int c)
{
    double mx = x[0];
    for (int j = 1; j < c; j++)
        if (x[j] > mx)
            mx = x[j];
    double s = 0.0;
    for (int j = 0; j < c; j++)
        s += exp((double)x[j] - mx);
    return mx + log(s);
}

void kd_topk_rows(const float *logits, int n, int c, int k, float *values, int32_t *indices,
                  float *lse)
{
    for (int r = 0; r < n; r++) {
        const float *x = logits + (size_t)r * c;
        float *v = values + (size_t)r * k;
        int32_t *ix = indices + (size_t)r * k;
        int have = 0;
        for (int j = 0; j < c; j++) {
            /* Strictly greater to enter a full list, and inserted after equal values:
             * ties keep the lower class index first. */
            if (have == k && !(x[j] > v[k - 1]))
                continue;
            int p = have < k ? have : k - 1;
            while (p > 0 && x[j] > v[p - 1]) {
                v[p] = v[p - 1];
                ix[p] = ix[p - 1];
                p--;
            }
            v[p] = x[j];
            ix[p] = j;
            if (have < k)
                have++;
        }
        lse[r] = (float)row_lse(x, c);
    }
}

/*
 * What is wrong with one (row, view) of a top-k cache, or NULL when nothing is. v: its K values
 * (finite), ix: their classes (in [0, C)), lse: its stored logsumexp (finite). Every class must
 * appear once, the values must not increase from slot to slot, and lse, the log-sum-exp of the
 * whole row, must be at least that of the K values (else the top-k would hold more than all of the
 * probability mass and the rest a negative share) and at most that of the whole row with its other
 * C - K logits at the smallest top-k value (which they cannot exceed), so equal to it when K = C.
 * The comparisons allow for values rounded to the stored dtype (f16: float16, else float32) and a
 * logsumexp rounded to float32 or summed in float: a row that kd_topk_rows computed always
 * passes. seen: C entries of scratch, *stamp: a counter advanced by each call (seen is cleared
 * when it wraps). The reason is written into buf.
 */
static const char *topk_entry_bad(const float *v, const int32_t *ix, float lse, int K, int C,
                                  int f16, uint32_t *seen, uint32_t *stamp, char *buf, size_t len)
{
    if (++*stamp == 0) {
        memset(seen, 0, (size_t)C * sizeof *seen);
        *stamp = 1;
    }
    for (int k = 0; k < K; k++) {
        if (seen[ix[k]] == *stamp) {
            int first = 0;
            while (ix[first] != ix[k])
                first++;
            snprintf(buf, len,
                     "duplicate class index %d (top-k slots %d and %d): each slot must name "
                     "another class",
                     ix[k], first, k);
            return buf;
        }
        seen[ix[k]] = *stamp;
    }
    /* ascending values are most likely the K smallest logits (np.argsort(x) without the minus),
     * which no logsumexp check can tell from the largest */
    for (int k = 1; k < K; k++)
        if (v[k] > v[k - 1]) {
            snprintf(buf, len,
                     "top-k values are not in descending order (slot %d holds %.9g, slot %d "
                     "%.9g): the slots must hold the K largest logits, largest first",
                     k - 1, (double)v[k - 1], k, (double)v[k]);
            return buf;
        }
    double mx = v[0], amax = 0.0, sum = 0.0;
    int at = 0;
    for (int k = 0; k < K; k++) {
        if (v[k] > mx) {
            mx = v[k];
            at = k;
        }
        if (fabs((double)v[k]) > amax)
            amax = fabs((double)v[k]);
    }
    for (int k = 0; k < K; k++)
        sum += exp((double)v[k] - mx);
    const double lk = mx + log(sum), l = lse;
    /* the whole row's log-sum-exp with its other C - K logits at the smallest top-k value */
    const double ub = lk + log1p((double)(C - K) * exp((double)v[K - 1] - lk));
    /* a stored value differs from the logit it rounds by up to 2^-11 (float16) or 2^-24
     * (float32) of its magnitude, a logsumexp summed in float by a few float32 steps */
    const double tol = 1e-4 + (f16 ? 0x1p-10 : 0x1p-20) * amax + 0x1p-20 * fabs(l);
    if (l < mx - tol)
        snprintf(buf, len,
                 "logsumexp %.9g is below top-k logit %.9g (class %d): the classes outside the "
                 "top-k would have negative probability",
                 l, mx, ix[at]);
    else if (l < lk - tol)
        snprintf(buf, len,
                 "logsumexp %.9g is below %.9g, the log-sum-exp of its %d top-k logits: the "
                 "classes outside the top-k would have negative probability",
                 l, lk, K);
    else if (K == C && l > lk + tol)
        snprintf(buf, len,
                 "logsumexp %.9g differs from %.9g, the log-sum-exp of the %d logits stored "
                 "(topk = num_classes: they are the whole row)",
                 l, lk, K);
    else if (K < C && l > ub + tol)
        snprintf(buf, len,
                 "logsumexp %.9g is above %.9g, the most the row can hold when its other %d "
                 "classes are at most the smallest top-k logit %.9g: they would hold more than "
                 "the top-k order allows",
                 l, ub, C - K, (double)v[K - 1]);
    else
        return NULL;
    return buf;
}

/* ---- options ------------------------------------------------------------------------------ */

void kd_cache_write_opts_init(kd_cache_write_opts *o)
{
    memset(o, 0, sizeof *o);
    o->compress = KD_CACHE_COMPRESS_NONE;
    o->shuffle = -1;
    o->fsync = 1;
}

void kd_cache_expect_init(kd_cache_expect *e)
{
    memset(e, 0, sizeof *e);
    e->num_samples = -1;
    e->num_classes = -1;
    e->views = -1;
    e->topk = -1;
    e->dtype = -1;
    e->aug_nparams = -1;
}

static H5Z_filter_t compress_filter(kd_cache_compress c)
{
    switch (c) {
    case KD_CACHE_COMPRESS_DEFLATE: return H5Z_FILTER_DEFLATE;
    case KD_CACHE_COMPRESS_LZ4: return KD_H5Z_FILTER_LZ4;
    case KD_CACHE_COMPRESS_ZSTD: return KD_H5Z_FILTER_ZSTD;
    default: return H5Z_FILTER_NONE;
    }
}

int kd_cache_compress_available(kd_cache_compress c)
{
    h5_quiet();
    if (c == KD_CACHE_COMPRESS_NONE)
        return 1;
    H5Z_filter_t id = compress_filter(c);
    if (id == H5Z_FILTER_NONE)
        return 0;
    /* In HDF5 1.10 this also tries to load a dynamic plugin for the id. A failure (< 0) counts
     * as "not available": the caller then names the filter that cannot be used. */
    htri_t a = H5Zfilter_avail(id);
    (void)H5Eclear2(H5E_DEFAULT);
    return a > 0;
}

static const char *filter_name(H5Z_filter_t id)
{
    switch (id) {
    case H5Z_FILTER_DEFLATE: return "deflate";
    case H5Z_FILTER_SHUFFLE: return "shuffle";
    case H5Z_FILTER_FLETCHER32: return "fletcher32";
    case H5Z_FILTER_SZIP: return "szip";
    case H5Z_FILTER_NBIT: return "nbit";
    case H5Z_FILTER_SCALEOFFSET: return "scaleoffset";
    case KD_H5Z_FILTER_LZ4: return "lz4";
    case KD_H5Z_FILTER_ZSTD: return "zstd";
    case 307: return "bzip2";
    case 32001: return "blosc";
    default: return "unknown";
    }
}

/* ---- attributes --------------------------------------------------------------------------- */

static kd_status attr_write_i64(hid_t loc, const char *path, const char *name, int64_t v)
{
    kd_status st = KD_OK;
    hid_t sp = H5I_INVALID_HID, a = H5I_INVALID_HID;
    H5_CHECK(sp = H5Screate(H5S_SCALAR), "H5Screate");
    H5_CHECK(a = H5Acreate2(loc, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT), "H5Acreate2");
    H5_CHECK(H5Awrite(a, H5T_NATIVE_INT64, &v), "H5Awrite");
done:
    H5_CLOSE(a, H5Aclose);
    close_id(&sp, H5Sclose);
    if (st != KD_OK)
        kd_fail_context(st, "writing attribute '%s': ", name);
    return st;
}

static kd_status attr_write_str(hid_t loc, const char *path, const char *name, const char *s)
{
    kd_status st = KD_OK;
    hid_t sp = H5I_INVALID_HID, a = H5I_INVALID_HID, t = H5I_INVALID_HID;
    H5_CHECK(t = H5Tcopy(H5T_C_S1), "H5Tcopy");
    H5_CHECK(H5Tset_size(t, strlen(s) + 1), "H5Tset_size");
    H5_CHECK(H5Tset_strpad(t, H5T_STR_NULLTERM), "H5Tset_strpad");
    H5_CHECK(sp = H5Screate(H5S_SCALAR), "H5Screate");
    H5_CHECK(a = H5Acreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT), "H5Acreate2");
    H5_CHECK(H5Awrite(a, t, s), "H5Awrite");
done:
    H5_CLOSE(a, H5Aclose);
    close_id(&sp, H5Sclose);
    close_id(&t, H5Tclose);
    if (st != KD_OK)
        kd_fail_context(st, "writing attribute '%s': ", name);
    return st;
}

/* 1 when the root has attribute name, 0 when not, a status (negative never) on failure. */
static kd_status attr_open(hid_t loc, const char *path, const char *name, int required, hid_t *out)
{
    *out = H5I_INVALID_HID;
    htri_t ex = H5Aexists(loc, name);
    if (ex < 0)
        return H5_FAIL(KD_ERR_FORMAT, path, "H5Aexists");
    if (!ex) {
        if (!required)
            return KD_OK;
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' has no root attribute '%s' (see data/README.md for the schema)",
                       path, name);
    }
    *out = H5Aopen(loc, name, H5P_DEFAULT);
    if (*out < 0)
        return H5_FAIL(KD_ERR_FORMAT, path, "H5Aopen");
    return KD_OK;
}

/* Integer attribute of any integer type, converted to int64. *found = 0 when optional & absent. */
static kd_status attr_read_i64(hid_t loc, const char *path, const char *name, int required,
                               int64_t *v, int *found)
{
    kd_status st = KD_OK;
    hid_t a, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    if (found)
        *found = 0;
    KD_TRY(attr_open(loc, path, name, required, &a));
    if (a < 0)
        return KD_OK;
    H5_CHECK(t = H5Aget_type(a), "H5Aget_type");
    H5_CHECK(sp = H5Aget_space(a), "H5Aget_space");
    if (H5Tget_class(t) != H5T_INTEGER || H5Sget_simple_extent_npoints(sp) != 1) {
        st = KD_FAIL(KD_ERR_FORMAT, "cache '%s': root attribute '%s' must be one integer", path,
                     name);
        goto done;
    }
    H5_CHECK(H5Aread(a, H5T_NATIVE_INT64, v), "H5Aread");
    if (found)
        *found = 1;
done:
    close_id(&sp, H5Sclose);
    close_id(&t, H5Tclose);
    close_id(&a, H5Aclose);
    return st;
}

/* String attribute, fixed-length or variable-length (h5py's default), into buf; "" when it is
 * absent and not required. */
static kd_status attr_read_str(hid_t loc, const char *path, const char *name, int required,
                               char *buf, size_t len)
{
    kd_status st = KD_OK;
    hid_t a, t = H5I_INVALID_HID, mt = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    char *tmp = NULL;
    buf[0] = '\0';
    KD_TRY(attr_open(loc, path, name, required, &a));
    if (a < 0) /* optional and absent: "" */
        return KD_OK;
    H5_CHECK(t = H5Aget_type(a), "H5Aget_type");
    H5_CHECK(sp = H5Aget_space(a), "H5Aget_space");
    if (H5Tget_class(t) != H5T_STRING || H5Sget_simple_extent_npoints(sp) != 1) {
        st = KD_FAIL(KD_ERR_FORMAT, "cache '%s': root attribute '%s' must be one string", path,
                     name);
        goto done;
    }
    H5_CHECK(mt = H5Tcopy(t), "H5Tcopy");
    htri_t var = H5Tis_variable_str(t);
    H5_CHECK(var, "H5Tis_variable_str");
    if (var) {
        char *vs = NULL;
        H5_CHECK(H5Aread(a, mt, &vs), "H5Aread");
        snprintf(buf, len, "%s", vs ? vs : "");
        if (vs)
            (void)H5free_memory(vs); /* nothing to do if HDF5 cannot free its own string */
    } else {
        size_t n = H5Tget_size(t);
        if (n == 0) {
            st = H5_FAIL(KD_ERR_IO, path, "H5Tget_size");
            goto done;
        }
        tmp = calloc(n + 1, 1);
        if (!tmp) {
            st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
            goto done;
        }
        H5_CHECK(H5Aread(a, mt, tmp), "H5Aread");
        /* Space-padded (Fortran style) strings lose their padding. */
        while (n > 0 && (tmp[n - 1] == ' ' || tmp[n - 1] == '\0'))
            tmp[--n] = '\0';
        snprintf(buf, len, "%s", tmp);
    }
done:
    free(tmp);
    close_id(&mt, H5Tclose);
    close_id(&sp, H5Sclose);
    close_id(&t, H5Tclose);
    close_id(&a, H5Aclose);
    return st;
}

static kd_status meta_write(hid_t f, const char *path, const kd_cache_meta *m)
{
    KD_TRY(attr_write_str(f, path, "format", KD_CACHE_FORMAT));
    KD_TRY(attr_write_i64(f, path, "version", KD_CACHE_VERSION));
    KD_TRY(attr_write_i64(f, path, "num_samples", m->num_samples));
    KD_TRY(attr_write_i64(f, path, "num_classes", m->num_classes));
    KD_TRY(attr_write_i64(f, path, "views", m->views));
    KD_TRY(attr_write_i64(f, path, "topk", m->topk));
    KD_TRY(attr_write_str(f, path, "dtype", dtype_str(m->dtype)));
    KD_TRY(attr_write_str(f, path, "teacher_sha256", m->teacher_sha256));
    KD_TRY(attr_write_str(f, path, "dataset_sha256", m->dataset_sha256));
    if (m->augment[0])
        KD_TRY(attr_write_str(f, path, "augment", m->augment));
    KD_TRY(attr_write_i64(f, path, "chunk_rows", m->chunk_rows));
    KD_TRY(attr_write_i64(f, path, "row_begin", m->row_begin));
    KD_TRY(attr_write_i64(f, path, "row_end", m->row_end));
    return KD_OK;
}

/* The crop_pad and hflip of an `augment` value as kd_augment_describe writes it ("none": 0, 0);
 * 0 when s is not one ("" included). */
static int augment_parse(const char *s, int *pad, int *flip)
{
    int used = 0;
    *pad = *flip = 0;
    return !strcmp(s, "none") || (sscanf(s, "crop_pad=%d hflip=%d%n", pad, flip, &used) == 2 &&
                                  !s[used] && *pad >= 0 && (*flip == 0 || *flip == 1));
}

/* 1 when s is a value of the `augment` attribute: "none", or "crop_pad=N hflip=B" (N >= 0, B 0
 * or 1), or "" (unknown); s is then rewritten in the form distill writes (kd_augment_describe:
 * "crop_pad=0 hflip=0" is "none"), which is how values are compared. */
static int valid_augment(char *s, size_t len)
{
    int pad, flip;
    if (!s[0])
        return 1;
    if (!augment_parse(s, &pad, &flip))
        return 0;
    const kd_augment_cfg cfg = {pad, flip};
    kd_augment_describe(&cfg, s, len);
    return 1;
}

/* 1 when two augment values differ; "" (unknown: a file written before the attribute existed, or
 * by another tool) differs from nothing. */
static int augment_differs(const char *a, const char *b)
{
    return a[0] && b[0] && strcmp(a, b) != 0;
}

/* Read /done (n chunks) into done and check that each entry is 0 or 1. */
static kd_status read_done(hid_t ds, int64_t n, uint8_t *done, const char *path, int *unreadable)
{
    if (unreadable)
        *unreadable = 0;
    if (H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, done) < 0) {
        if (unreadable)
            *unreadable = 1;
        char d[700];
        h5_detail(d, sizeof d);
        /* without /done nothing says which chunks were written, so resuming cannot help */
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s': its /done dataset (which chunks are written) cannot be read "
                       "(%s): the file is damaged; run `distill cache` again, which then computes "
                       "every chunk again (unless the file is compressed), or delete it and write "
                       "it anew",
                       path, d);
    }
    for (int64_t i = 0; i < n; i++)
        if (done[i] > 1)
            return KD_FAIL(KD_ERR_FORMAT,
                           "cache '%s': /done[%lld] is %u; only 0 (chunk missing) and 1 (chunk "
                           "written) are valid",
                           path, (long long)i, (unsigned)done[i]);
    return KD_OK;
}

/* Read and sanity-check the root attributes (aug_nparams comes later from /aug_params). */
static kd_status meta_read(hid_t f, const char *path, kd_cache_meta *m)
{
    char s[128];
    int64_t v;
    int found;
    memset(m, 0, sizeof *m);
    KD_TRY(attr_read_str(f, path, "format", 1, s, sizeof s));
    if (strcmp(s, KD_CACHE_FORMAT) != 0)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' is not a distill teacher cache: its format attribute is '%s', "
                       "expected '%s'",
                       path, s, KD_CACHE_FORMAT);
    KD_TRY(attr_read_i64(f, path, "version", 1, &v, NULL));
    if (v != KD_CACHE_VERSION)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' has format version %lld, this distill reads version %d", path,
                       (long long)v, KD_CACHE_VERSION);
    int64_t nc, nv, nk; /* as stored: a bad value is reported as it is */
    KD_TRY(attr_read_i64(f, path, "num_samples", 1, &m->num_samples, NULL));
    KD_TRY(attr_read_i64(f, path, "num_classes", 1, &nc, NULL));
    KD_TRY(attr_read_i64(f, path, "views", 1, &nv, NULL));
    KD_TRY(attr_read_i64(f, path, "topk", 1, &nk, NULL));
    KD_TRY(attr_read_i64(f, path, "chunk_rows", 1, &m->chunk_rows, NULL));
    if (m->num_samples < 1 || m->num_samples > INT32_MAX || nc < 1 || nc > INT32_MAX || nv < 1 ||
        nv > INT32_MAX || nk < 0 || nk > nc || m->chunk_rows < 1 || m->chunk_rows > INT32_MAX)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' has invalid attributes: num_samples %lld, num_classes %lld, "
                       "views %lld, topk %lld, chunk_rows %lld (need N, C, V, chunk_rows from 1 "
                       "to 2^31 - 1 and 0 <= topk <= C)",
                       path, (long long)m->num_samples, (long long)nc, (long long)nv, (long long)nk,
                       (long long)m->chunk_rows);
    m->num_classes = (int)nc;
    m->views = (int)nv;
    m->topk = (int)nk;
    KD_TRY(attr_read_str(f, path, "dtype", 1, s, sizeof s));
    if (strcmp(s, "float16") == 0)
        m->dtype = KD_DTYPE_F16;
    else if (strcmp(s, "float32") == 0)
        m->dtype = KD_DTYPE_F32;
    else
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' has dtype '%s'; a cache stores 'float16' or 'float32'", path, s);
    KD_TRY(
        attr_read_str(f, path, "teacher_sha256", 1, m->teacher_sha256, sizeof m->teacher_sha256));
    KD_TRY(
        attr_read_str(f, path, "dataset_sha256", 1, m->dataset_sha256, sizeof m->dataset_sha256));
    if (!valid_hash(m->teacher_sha256) || !valid_hash(m->dataset_sha256))
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s': teacher_sha256 and dataset_sha256 must be 64 lowercase hex "
                       "digits or empty",
                       path);
    KD_TRY(attr_read_str(f, path, "augment", 0, s, sizeof s)); /* optional: "" unknown */
    if (strlen(s) >= sizeof m->augment || !valid_augment(s, sizeof m->augment))
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s': attribute augment is '%.60s'; it must be 'none' or "
                       "'crop_pad=N hflip=0|1' (see data/README.md)",
                       path, s);
    memcpy(m->augment, s, strlen(s) + 1);
    KD_TRY(attr_read_i64(f, path, "row_begin", 0, &m->row_begin, &found));
    if (!found)
        m->row_begin = 0;
    KD_TRY(attr_read_i64(f, path, "row_end", 0, &m->row_end, &found));
    if (!found)
        m->row_end = m->num_samples;
    if (m->row_begin < 0 || m->row_end <= m->row_begin || m->row_end > m->num_samples)
        return KD_FAIL(KD_ERR_FORMAT, "cache '%s' has an invalid row range [%lld, %lld) of %lld",
                       path, (long long)m->row_begin, (long long)m->row_end,
                       (long long)m->num_samples);
    return KD_OK;
}

/* ---- datasets ----------------------------------------------------------------------------- */

typedef struct {
    hid_t main, idx, lse, aug, lab, done;
} cache_dsets;

static void dsets_init(cache_dsets *d)
{
    d->main = d->idx = d->lse = d->aug = d->lab = d->done = H5I_INVALID_HID;
}

/* Close the datasets; returns how many closes failed (for a writer, whose datasets were written
 * through: kd_cache_writer_close reports it; the readers' callers have nothing to lose). */
static int dsets_close(cache_dsets *d)
{
    hid_t *ids[] = {&d->main, &d->idx, &d->lse, &d->aug, &d->lab, &d->done};
    int bad = 0;
    for (int i = 0; i < 6; i++) {
        if (*ids[i] >= 0 && H5Dclose(*ids[i]) < 0)
            bad++;
        *ids[i] = H5I_INVALID_HID;
    }
    return bad;
}

static char *dims_str(const hsize_t *d, int n, char *buf, size_t len)
{
    size_t k = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < n && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, i ? ", %llu" : "%llu", (unsigned long long)d[i]);
    if (k < len)
        snprintf(buf + k, len - k, "]");
    return buf;
}

/*
 * A chunked dataset's chunks: each of the dataset's rank, no dimension 0 and none larger than
 * the dataset's (a damaged chunk shape makes HDF5 read out of bounds), and every chunk that
 * covers the dataset present in the file (a chunk missing from the index reads back as the fill
 * value, zeros, without an error; distill allocates every chunk when it creates the file, and
 * so does any writer that filled the dataset).
 */
static kd_status chunks_check(hid_t d, const char *path, const char *name, int nd,
                              const hsize_t *dims, const hsize_t *maxd, int cn,
                              const hsize_t *cdims)
{
    char a[128], b[128];
    int ok = cn == nd;
    for (int i = 0; i < cn && ok; i++) {
        /* an extendible dimension may have chunks up to its maximum size (an unlimited one:
         * up to the largest chunk_rows distill takes) */
        const hsize_t big = (hsize_t)1 << 24, lim = maxd[i] == H5S_UNLIMITED
                                                        ? (dims[i] > big ? dims[i] : big)
                                                    : maxd[i] > dims[i] ? maxd[i]
                                                                        : dims[i];
        ok = cdims[i] >= 1 && cdims[i] <= lim;
    }
    if (!ok)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s': dataset /%s of shape %s has chunks of %s: the file is damaged "
                       "(delete it and write the cache again)",
                       path, name, dims_str(dims, nd, a, sizeof a),
                       dims_str(cdims, cn < 0 || cn > 8 ? 0 : cn, b, sizeof b));
    hsize_t at[8] = {0};
    for (;;) {
        unsigned mask = 0;
        haddr_t addr = HADDR_UNDEF;
        hsize_t bytes = 0;
        if (H5Dget_chunk_info_by_coord(d, at, &mask, &addr, &bytes) < 0)
            return H5_FAIL(KD_ERR_IO, path, "H5Dget_chunk_info_by_coord");
        if (addr == HADDR_UNDEF)
            return KD_FAIL(KD_ERR_FORMAT,
                           "cache '%s': dataset /%s has no chunk at %s in the file (its values "
                           "would read as zeros): the file is damaged (delete it and write the "
                           "cache again)",
                           path, name, dims_str(at, nd, a, sizeof a));
        int i = nd - 1; /* the next chunk, last dimension fastest */
        for (; i >= 0; i--) {
            at[i] += cdims[i];
            if (at[i] < dims[i])
                break;
            at[i] = 0;
        }
        if (i < 0)
            return KD_OK;
    }
}

/*
 * Open /name and check its element class and size and its shape. dims[i] == 0
 * means "any extent >= 1" and receives the extent found. The dataset is opened
 * with a chunk cache that holds at least two of its chunks, and every filter
 * in its pipeline must be available. A virtual dataset (a sharded cache) has
 * no chunks of its own: its chunk cache, which HDF5 hands on to the source
 * datasets, is sized for two blocks of chunk_rows rows, and its relative
 * source file names are looked up in vds_dir (NULL: HDF5's default lookup).
 */
static kd_status dset_open(hid_t f, const char *path, const char *name, H5T_class_t cls,
                           size_t size, int ndims, hsize_t *dims, const char *vds_dir,
                           int64_t chunk_rows, hid_t *out)
{
    kd_status st = KD_OK;
    hid_t d = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID, dcpl = H5I_INVALID_HID,
          dapl = H5I_INVALID_HID;
    *out = H5I_INVALID_HID;
    htri_t ex = H5Lexists(f, name, H5P_DEFAULT);
    if (ex < 0)
        return H5_FAIL(KD_ERR_IO, path, "H5Lexists");
    if (ex == 0) {
        (void)H5Eclear2(H5E_DEFAULT); /* best effort: nothing failed, the stack should be empty */
        return KD_FAIL(KD_ERR_FORMAT, "cache '%s' has no dataset /%s (see data/README.md)", path,
                       name);
    }
    H5_CHECK(d = H5Dopen2(f, name, H5P_DEFAULT), "H5Dopen2");
    H5_CHECK(t = H5Dget_type(d), "H5Dget_type");
    if (H5Tget_class(t) != cls || H5Tget_size(t) != size ||
        (cls == H5T_INTEGER && size == 4 && H5Tget_sign(t) != H5T_SGN_2)) {
        const char *want = cls == H5T_FLOAT ? (size == 2 ? "float16" : "float32")
                           : size == 4      ? "int32"
                                            : "uint8";
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s': dataset /%s is stored as a %zu-byte %s, the schema needs %s",
                     path, name, H5Tget_size(t),
                     H5Tget_class(t) == H5T_FLOAT     ? "float"
                     : H5Tget_class(t) == H5T_INTEGER ? "integer"
                                                      : "non-numeric type",
                     want);
        goto done;
    }
    H5_CHECK(sp = H5Dget_space(d), "H5Dget_space");
    hsize_t got[8] = {0}, maxd[8] = {0};
    int nd = H5Sget_simple_extent_ndims(sp);
    H5_CHECK(nd, "H5Sget_simple_extent_ndims");
    int ok = nd == ndims && nd <= 8;
    if (ok) {
        H5_CHECK(H5Sget_simple_extent_dims(sp, got, maxd), "H5Sget_simple_extent_dims");
        for (int i = 0; i < nd; i++)
            if (dims[i] ? got[i] != dims[i] : got[i] < 1)
                ok = 0;
    }
    if (!ok) {
        char a[128], b[128];
        if (nd > 8 || nd < 0)
            nd = 0;
        H5Sget_simple_extent_dims(sp, got, NULL);
        st =
            KD_FAIL(KD_ERR_FORMAT,
                    "cache '%s': dataset /%s has shape %s, its attributes imply %s (0 = any)", path,
                    name, dims_str(got, nd, a, sizeof a), dims_str(dims, ndims, b, sizeof b));
        goto done;
    }
    for (int i = 0; i < nd; i++)
        dims[i] = got[i];

    H5_CHECK(dcpl = H5Dget_create_plist(d), "H5Dget_create_plist");
    int nf = H5Pget_nfilters(dcpl);
    H5_CHECK(nf, "H5Pget_nfilters");
    for (int i = 0; i < nf; i++) {
        unsigned flags, cd[8];
        size_t ncd = 8;
        char fname[64];
        H5Z_filter_t id =
            H5Pget_filter2(dcpl, (unsigned)i, &flags, &ncd, cd, sizeof fname, fname, NULL);
        H5_CHECK(id, "H5Pget_filter2");
        htri_t av = H5Zfilter_avail(id);
        (void)H5Eclear2(H5E_DEFAULT); /* what a failed plugin search left, dropped */
        if (av <= 0) {
            st = KD_FAIL(KD_ERR_UNSUPPORTED,
                         "cache '%s': dataset /%s is compressed with HDF5 filter %d (%s), which "
                         "this HDF5 cannot load: install hdf5-filter-plugin (Debian) or point "
                         "HDF5_PLUGIN_PATH at the plugin",
                         path, name, (int)id, filter_name(id));
            goto done;
        }
    }
    H5D_layout_t layout = H5Pget_layout(dcpl);
    H5_CHECK(layout, "H5Pget_layout");
    if (layout == H5D_CONTIGUOUS) {
        /* a contiguous dataset gets its storage when first written: none means it never was
         * (its values would all be the fill value) */
        H5D_space_status_t space;
        H5_CHECK(H5Dget_space_status(d, &space), "H5Dget_space_status");
        if (space == H5D_SPACE_STATUS_NOT_ALLOCATED) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s': dataset /%s was never written (a contiguous dataset with "
                         "no storage: every value would be its fill value)",
                         path, name);
            goto done;
        }
    }
    if (layout == H5D_CHUNKED || layout == H5D_VIRTUAL) {
        size_t bytes = size;
        if (layout == H5D_CHUNKED) {
            hsize_t cdims[8];
            int cn = H5Pget_chunk(dcpl, 8, cdims);
            H5_CHECK(cn, "H5Pget_chunk");
            if ((st = chunks_check(d, path, name, nd, got, maxd, cn, cdims)) != KD_OK)
                goto done;
            for (int i = 0; i < cn; i++)
                bytes *= (size_t)cdims[i];
        } else {
            bytes *= (size_t)(chunk_rows > 0 ? chunk_rows : 1);
            for (int i = 1; i < nd; i++)
                bytes *= (size_t)got[i];
        }
        /* Two chunks, so a read that straddles a boundary keeps both; the 1 MiB default
         * would make HDF5 re-read and re-filter a bigger chunk for every partial access. */
        size_t want = 2 * bytes + ((size_t)1 << 20);
        H5_CHECK(dapl = H5Pcreate(H5P_DATASET_ACCESS), "H5Pcreate");
        H5_CHECK(H5Pset_chunk_cache(dapl, 521, want, 1.0), "H5Pset_chunk_cache");
        if (layout == H5D_VIRTUAL && vds_dir)
            H5_CHECK(H5Pset_virtual_prefix(dapl, vds_dir), "H5Pset_virtual_prefix");
        close_id(&d, H5Dclose);
        H5_CHECK(d = H5Dopen2(f, name, dapl), "H5Dopen2");
    }
    *out = d;
    d = H5I_INVALID_HID;
done:
    close_id(&dapl, H5Pclose);
    close_id(&dcpl, H5Pclose);
    close_id(&sp, H5Sclose);
    close_id(&t, H5Tclose);
    close_id(&d, H5Dclose);
    return st;
}

/* Open and check every dataset against m; fills m->aug_nparams from /aug_params. vds_dir: as
 * for dset_open. */
static kd_status dsets_open(hid_t f, const char *path, kd_cache_meta *m, const char *vds_dir,
                            cache_dsets *ds)
{
    hsize_t n = (hsize_t)meta_rows(m), v = (hsize_t)m->views;
    size_t es = meta_esize(m);
    dsets_init(ds);
    kd_status st;
    hsize_t dm[3] = {n, v, (hsize_t)meta_width(m)};
    st = dset_open(f, path, m->topk ? "topk_values" : "logits", H5T_FLOAT, es, 3, dm, vds_dir,
                   m->chunk_rows, &ds->main);
    if (st == KD_OK && m->topk) {
        hsize_t di[3] = {n, v, (hsize_t)m->topk}, dl[2] = {n, v};
        st = dset_open(f, path, "topk_indices", H5T_INTEGER, 4, 3, di, vds_dir, m->chunk_rows,
                       &ds->idx);
        if (st == KD_OK)
            st = dset_open(f, path, "logsumexp", H5T_FLOAT, 4, 2, dl, vds_dir, m->chunk_rows,
                           &ds->lse);
    }
    hsize_t da[3] = {n, v, 0}, dl1[1] = {n}, dd[1] = {(hsize_t)meta_chunks(m)};
    if (st == KD_OK)
        st =
            dset_open(f, path, "aug_params", H5T_FLOAT, 4, 3, da, vds_dir, m->chunk_rows, &ds->aug);
    if (st == KD_OK)
        st = dset_open(f, path, "labels", H5T_INTEGER, 4, 1, dl1, vds_dir, m->chunk_rows, &ds->lab);
    if (st == KD_OK)
        st = dset_open(f, path, "done", H5T_INTEGER, 1, 1, dd, vds_dir, m->chunk_rows, &ds->done);
    if (st != KD_OK) {
        dsets_close(ds);
        return st;
    }
    m->aug_nparams = (int)da[2];
    return KD_OK;
}

/* 1 when dataset d is virtual, 0 when not, -1 on an HDF5 failure. */
static int dset_is_virtual(hid_t d)
{
    hid_t dcpl = H5Dget_create_plist(d);
    if (dcpl < 0)
        return -1;
    H5D_layout_t l = H5Pget_layout(dcpl);
    if (H5Pclose(dcpl) < 0)
        return -1;
    return l < 0 ? -1 : l == H5D_VIRTUAL;
}

/* Read or write rows [r0, r0+R) of a dataset with `ndims` dims (inner dims whole). */
static herr_t dset_rows_io(hid_t d, int write, hid_t memtype, int64_t r0, int64_t R, void *buf)
{
    hid_t fs = H5Dget_space(d);
    if (fs < 0)
        return -1;
    hsize_t dims[3], start[3] = {(hsize_t)r0, 0, 0};
    int nd = H5Sget_simple_extent_ndims(fs);
    herr_t rc = -1;
    hid_t ms = H5I_INVALID_HID;
    if (nd < 1 || nd > 3 || H5Sget_simple_extent_dims(fs, dims, NULL) < 0)
        goto done;
    dims[0] = (hsize_t)R;
    if (H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, dims, NULL) < 0)
        goto done;
    ms = H5Screate_simple(nd, dims, NULL);
    if (ms < 0)
        goto done;
    rc = write ? H5Dwrite(d, memtype, ms, fs, H5P_DEFAULT, buf)
               : H5Dread(d, memtype, ms, fs, H5P_DEFAULT, buf);
done:;
    /* Every API call below clears HDF5's error stack: keep the failure's stack for h5_detail. */
    hid_t es = rc < 0 ? H5Eget_current_stack() : H5I_INVALID_HID;
    if (ms >= 0 && H5Sclose(ms) < 0)
        rc = -1;
    if (H5Sclose(fs) < 0)
        rc = -1;
    /* Best effort: if the stack cannot be put back, the message says there is no detail. */
    if (es >= 0)
        (void)H5Eset_current_stack(es);
    return rc;
}

/* 1 when dataset d's filters include a compressor (anything but fletcher32 and shuffle), 0
 * when not, -1 on an HDF5 failure. */
static int dset_compressed(hid_t d)
{
    hid_t dcpl = H5Dget_create_plist(d);
    if (dcpl < 0)
        return -1;
    int nf = H5Pget_nfilters(dcpl), comp = nf < 0 ? -1 : 0;
    for (int i = 0; i < nf && comp == 0; i++) {
        unsigned flags;
        size_t ncd = 0;
        H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &ncd, NULL, 0, NULL, NULL);
        if (id < 0)
            comp = -1;
        else if (id != H5Z_FILTER_FLETCHER32 && id != H5Z_FILTER_SHUFFLE)
            comp = 1;
    }
    if (H5Pclose(dcpl) < 0)
        comp = -1;
    return comp;
}

/* The chunks of a file that cannot be read (chunks_scan). */
typedef struct {
    int64_t nbad;     /* chunks with a dataset that cannot be read */
    int64_t first;    /* the first of them (-1: none) */
    const char *dset; /* the first failing dataset of that chunk */
    char detail[700]; /* HDF5's account of that failure */
} chunk_scan;

/*
 * Read every chunk that done[] marks written (done NULL: every chunk) of every dataset of the
 * file ds (metadata m), in its stored type, and count in *out the chunks whose data cannot be
 * read back (a checksum that fails, a chunk that cannot be decoded). With clear set, their done
 * entries become 0 (in done only). A read failure is not an error of this function: it returns
 * KD_OK, or KD_ERR_NOMEM.
 */
static kd_status chunks_scan(const cache_dsets *ds, const kd_cache_meta *m, uint8_t *done,
                             int clear, const char *path, chunk_scan *out)
{
    memset(out, 0, sizeof *out);
    out->first = -1;
    const int64_t n = meta_rows(m), cr = m->chunk_rows < n ? m->chunk_rows : n;
    const size_t W = (size_t)meta_width(m) * meta_esize(m);
    size_t widest = W > (size_t)m->aug_nparams * 4 ? W : (size_t)m->aug_nparams * 4;
    if (m->topk && widest < (size_t)m->topk * 4)
        widest = (size_t)m->topk * 4;
    const hid_t mt = m->dtype == KD_DTYPE_F16 ? f16_type() : H5T_NATIVE_FLOAT;
    if (mt < 0)
        return KD_FAIL(KD_ERR_INTERNAL, "cache '%s': cannot build the float16 HDF5 type", path);
    void *buf = malloc((size_t)cr * (size_t)m->views * widest);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
    const struct {
        hid_t d, t;
        const char *name;
    } sets[] = {{ds->main, mt, m->topk ? "topk_values" : "logits"},
                {ds->idx, H5T_NATIVE_INT32, "topk_indices"},
                {ds->lse, H5T_NATIVE_FLOAT, "logsumexp"},
                {ds->aug, H5T_NATIVE_FLOAT, "aug_params"},
                {ds->lab, H5T_NATIVE_INT32, "labels"}};
    for (int64_t i = 0; i < meta_chunks(m); i++) {
        if (done && !done[i])
            continue;
        const int64_t r0 = i * m->chunk_rows, R = n - r0 < m->chunk_rows ? n - r0 : m->chunk_rows;
        for (size_t k = 0; k < sizeof sets / sizeof sets[0]; k++) {
            if (sets[k].d < 0 || dset_rows_io(sets[k].d, 0, sets[k].t, r0, R, buf) >= 0)
                continue;
            if (out->nbad++ == 0) {
                out->first = i;
                out->dset = sets[k].name;
                h5_detail(out->detail, sizeof out->detail);
            } else {
                (void)H5Eclear2(H5E_DEFAULT); /* best effort: the first failure is the one told */
            }
            if (clear && done)
                done[i] = 0;
            break;
        }
    }
    free(buf);
    return KD_OK;
}

/* What a scan found, for a message: "N chunk(s) cannot be read: the first, chunk i (rows a..b),
 * fails in /name (H5Dread failed: ...)". */
static void scan_text(const chunk_scan *s, const kd_cache_meta *m, char *buf, size_t len)
{
    const int64_t r0 = s->first * m->chunk_rows;
    const int64_t r1 = r0 + m->chunk_rows < meta_rows(m) ? r0 + m->chunk_rows : meta_rows(m);
    snprintf(buf, len,
             "%lld of its %lld chunks cannot be read back (a checksum fails or the data cannot be "
             "decoded): the first, chunk %lld (rows %lld..%lld), in /%s (H5Dread failed: %s)",
             (long long)s->nbad, (long long)meta_chunks(m), (long long)s->first,
             (long long)(m->row_begin + r0), (long long)(m->row_begin + r1 - 1), s->dset,
             s->detail);
}

/* ---- writer ------------------------------------------------------------------------------- */

struct kd_cache_writer {
    char *path;       /* the file being written: the cache itself, or <cache>.partial */
    char *final_path; /* compressed caches: where the finished cache goes; else NULL */
    kd_cache_write_opts opts;
    hid_t file;
    cache_dsets ds;
    kd_cache_meta meta;
    int fsync;
    int64_t nchunks;
    uint8_t *done;
    uint16_t *half;        /* chunk_rows * V * W scratch for float16 */
    float *zeros;          /* chunk_rows * V * P zeros for aug_params NULL */
    int readonly;          /* the file could not be opened for writing and needs nothing written */
    int64_t damaged;       /* done chunks found unreadable at open, now to be written again */
    int done_lost;         /* /done could not be read at open: every chunk is written again */
    uint32_t *seen, stamp; /* top-k checks of put_validate: C class stamps */
};

static kd_status meta_validate(const kd_cache_meta *m, const char *path)
{
    if (m->num_samples < 1 || m->num_classes < 1 || m->views < 1 || m->topk < 0 ||
        m->topk > m->num_classes || m->aug_nparams < 1 || m->chunk_rows < 1)
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s': need num_samples, num_classes, views, aug_nparams and "
                       "chunk_rows >= 1 and 0 <= topk <= num_classes (got %lld, %d, %d, %d, "
                       "%lld, topk %d)",
                       path, (long long)m->num_samples, m->num_classes, m->views, m->aug_nparams,
                       (long long)m->chunk_rows, m->topk);
    if (m->dtype != KD_DTYPE_F32 && m->dtype != KD_DTYPE_F16)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': dtype must be float32 or float16", path);
    if (m->row_begin < 0 || m->row_end <= m->row_begin || m->row_end > m->num_samples)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': row range [%lld, %lld) is not inside [0, %lld)",
                       path, (long long)m->row_begin, (long long)m->row_end,
                       (long long)m->num_samples);
    if (!valid_hash(m->teacher_sha256) || !valid_hash(m->dataset_sha256))
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s': teacher_sha256 and dataset_sha256 must be 64 lowercase hex "
                       "digits or empty",
                       path);
    char aug[sizeof m->augment];
    memcpy(aug, m->augment, sizeof aug);
    if (!memchr(aug, 0, sizeof aug) || !valid_augment(aug, sizeof aug) ||
        strcmp(aug, m->augment) != 0) /* written only in distill's own form */
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s': augment must be 'none', 'crop_pad=N hflip=0|1' or empty", path);
    return KD_OK;
}

/* Create one dataset [rows, a, b] (ndims 1..3) with the cache's chunking and filters. */
static kd_status dset_create(hid_t f, const char *path, const char *name, hid_t ftype, int ndims,
                             const hsize_t *dims, const hsize_t *chunk,
                             const kd_cache_write_opts *o, int compress)
{
    kd_status st = KD_OK;
    hid_t sp = H5I_INVALID_HID, dcpl = H5I_INVALID_HID, d = H5I_INVALID_HID;
    H5_CHECK(sp = H5Screate_simple(ndims, dims, NULL), "H5Screate_simple");
    H5_CHECK(dcpl = H5Pcreate(H5P_DATASET_CREATE), "H5Pcreate");
    H5_CHECK(H5Pset_chunk(dcpl, ndims, chunk), "H5Pset_chunk");
    /* Chunk index built now, so puts only rewrite existing entries (see the file comment). */
    H5_CHECK(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), "H5Pset_alloc_time");
    H5_CHECK(H5Pset_obj_track_times(dcpl, 0), "H5Pset_obj_track_times");
    if (compress && o->compress != KD_CACHE_COMPRESS_NONE) {
        int shuffle = o->shuffle < 0 ? 1 : o->shuffle;
        if (shuffle)
            H5_CHECK(H5Pset_shuffle(dcpl), "H5Pset_shuffle");
        if (o->compress == KD_CACHE_COMPRESS_DEFLATE) {
            H5_CHECK(H5Pset_deflate(dcpl, (unsigned)(o->level ? o->level : 4)), "H5Pset_deflate");
        } else if (o->compress == KD_CACHE_COMPRESS_LZ4) {
            H5_CHECK(H5Pset_filter(dcpl, KD_H5Z_FILTER_LZ4, H5Z_FLAG_MANDATORY, 0, NULL),
                     "H5Pset_filter(lz4)");
        } else {
            unsigned cd = (unsigned)(o->level ? o->level : 3);
            H5_CHECK(H5Pset_filter(dcpl, KD_H5Z_FILTER_ZSTD, H5Z_FLAG_MANDATORY, 1, &cd),
                     "H5Pset_filter(zstd)");
        }
    } else if (compress && o->shuffle > 0) {
        H5_CHECK(H5Pset_shuffle(dcpl), "H5Pset_shuffle");
    }
    /* Last, so the checksum covers the bytes as stored. */
    H5_CHECK(H5Pset_fletcher32(dcpl), "H5Pset_fletcher32");
    H5_CHECK(d = H5Dcreate2(f, name, ftype, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT), "H5Dcreate2");
done:
    H5_CLOSE(d, H5Dclose);
    close_id(&dcpl, H5Pclose);
    close_id(&sp, H5Sclose);
    if (st != KD_OK)
        kd_fail_context(st, "creating /%s: ", name);
    return st;
}

static kd_status file_fsync(hid_t f, const char *path)
{
    int *fd = NULL;
    if (H5Fget_vfd_handle(f, H5P_DEFAULT, (void **)&fd) < 0 || !fd)
        return H5_FAIL(KD_ERR_IO, path, "H5Fget_vfd_handle");
    if (fsync(*fd) != 0)
        return KD_FAIL(KD_ERR_IO, "cache '%s': fsync failed: %s", path, strerror(errno));
    return KD_OK;
}

/* Build an empty cache skeleton at `tmp` (left open in *out, flushed). */
static kd_status cache_build(const char *tmp, const kd_cache_meta *m, const kd_cache_write_opts *o,
                             hid_t *out)
{
    kd_status st = KD_OK;
    const char *path = tmp; /* HDF5 failures name the file being built */
    hid_t f = H5I_INVALID_HID, fcpl = H5I_INVALID_HID;
    *out = H5I_INVALID_HID;
    H5_CHECK(fcpl = H5Pcreate(H5P_FILE_CREATE), "H5Pcreate");
    H5_CHECK(f = H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, H5P_DEFAULT), "H5Fcreate");
    st = meta_write(f, path, m);
    if (st != KD_OK)
        goto done;
    {
        hsize_t n = (hsize_t)meta_rows(m), v = (hsize_t)m->views, w = (hsize_t)meta_width(m);
        hsize_t cr = (hsize_t)(m->chunk_rows < meta_rows(m) ? m->chunk_rows : meta_rows(m));
        hsize_t nch = (hsize_t)meta_chunks(m);
        hid_t ft = m->dtype == KD_DTYPE_F16 ? f16_type() : H5T_IEEE_F32LE;
        if (ft < 0) {
            st = KD_FAIL(KD_ERR_INTERNAL, "cache '%s': cannot build the float16 HDF5 type", path);
            goto done;
        }
        hsize_t d3[3] = {n, v, w}, c3[3] = {cr, v, w};
        const char *mainname = m->topk ? "topk_values" : "logits";
        if ((st = dset_create(f, path, mainname, ft, 3, d3, c3, o, 1)) != KD_OK)
            goto done;
        if (m->topk) {
            hsize_t d2[2] = {n, v}, c2[2] = {cr, v};
            if ((st = dset_create(f, path, "topk_indices", H5T_STD_I32LE, 3, d3, c3, o, 1)) !=
                    KD_OK ||
                (st = dset_create(f, path, "logsumexp", H5T_IEEE_F32LE, 2, d2, c2, o, 1)) != KD_OK)
                goto done;
        }
        hsize_t da[3] = {n, v, (hsize_t)m->aug_nparams}, ca[3] = {cr, v, (hsize_t)m->aug_nparams};
        hsize_t dl[1] = {n}, cl[1] = {cr}, dd[1] = {nch};
        if ((st = dset_create(f, path, "aug_params", H5T_IEEE_F32LE, 3, da, ca, o, 1)) != KD_OK ||
            (st = dset_create(f, path, "labels", H5T_STD_I32LE, 1, dl, cl, o, 1)) != KD_OK ||
            (st = dset_create(f, path, "done", H5T_STD_U8LE, 1, dd, dd, o, 0)) != KD_OK)
            goto done;
    }
    H5_CHECK(H5Fflush(f, H5F_SCOPE_LOCAL), "H5Fflush");
    *out = f;
    f = H5I_INVALID_HID;
done:
    close_id(&f, H5Fclose);
    close_id(&fcpl, H5Pclose);
    return st;
}

static char *tmp_name(const char *final_path)
{
    size_t tlen = strlen(final_path) + 32;
    char *tmp = malloc(tlen);
    if (tmp)
        snprintf(tmp, tlen, "%s.tmp.%ld", final_path, (long)getpid());
    return tmp;
}

/* Rename the closed file tmp over final_path and (when asked) fsync the directory. */
static kd_status rename_into_place(const char *tmp, const char *final_path, int sync)
{
    if (rename(tmp, final_path) != 0)
        return KD_FAIL(KD_ERR_IO, "cache '%s': rename from '%s' failed: %s", final_path, tmp,
                       strerror(errno));
    kd_status st = sync ? kd_fsync_dir_of(final_path) : KD_OK;
    return st ? kd_fail_context(st, "cache '%s': ", final_path) : KD_OK;
}

/* fsync (when asked) and close *f, rename tmp over final_path, fsync the directory. */
static kd_status close_and_rename(hid_t *f, const char *tmp, const char *final_path, int sync)
{
    kd_status st = KD_OK;
    const char *path = tmp;
    if (sync && (st = file_fsync(*f, tmp)) != KD_OK)
        return st;
    herr_t rc = H5Fclose(*f);
    *f = H5I_INVALID_HID;
    H5_CHECK(rc, "H5Fclose");
    st = rename_into_place(tmp, final_path, sync);
done:
    return st;
}

/* Build a complete empty cache at final_path via a temporary file and an atomic rename. */
static kd_status cache_create(const char *final_path, const kd_cache_meta *m,
                              const kd_cache_write_opts *o)
{
    kd_status st = KD_OK;
    char *tmp = tmp_name(final_path);
    hid_t f = H5I_INVALID_HID;
    if (!tmp)
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", final_path);
    if ((st = cache_build(tmp, m, o, &f)) != KD_OK)
        goto done;
    st = close_and_rename(&f, tmp, final_path, o->fsync);
done:
    close_id(&f, H5Fclose);
    if (st != KD_OK)
        unlink(tmp);
    free(tmp);
    if (st != KD_OK)
        kd_fail_context(st, "creating cache '%s': ", final_path);
    return st;
}

/* Copy dataset `name` row block by row block, in its stored type. */
static kd_status dset_copy(hid_t fs, hid_t fd, const char *src_path, const char *dst_path,
                           const char *name, int64_t block_rows)
{
    kd_status st = KD_OK;
    const char *path = src_path;
    hid_t ds = H5I_INVALID_HID, dd = H5I_INVALID_HID, t = H5I_INVALID_HID, sp = H5I_INVALID_HID;
    void *buf = NULL;
    hsize_t dims[3] = {0, 1, 1};
    H5_CHECK(ds = H5Dopen2(fs, name, H5P_DEFAULT), "H5Dopen2");
    H5_CHECK(t = H5Dget_type(ds), "H5Dget_type");
    H5_CHECK(sp = H5Dget_space(ds), "H5Dget_space");
    int nd = H5Sget_simple_extent_ndims(sp);
    if (nd < 1 || nd > 3 || H5Sget_simple_extent_dims(sp, dims, NULL) < 0) {
        st = KD_FAIL(KD_ERR_FORMAT, "cache '%s': /%s has an unexpected shape", src_path, name);
        goto done;
    }
    const size_t esize = H5Tget_size(t);
    if (esize == 0) {
        st = H5_FAIL(KD_ERR_IO, src_path, "H5Tget_size");
        goto done;
    }
    size_t row = esize * (size_t)(nd > 1 ? dims[1] : 1) * (size_t)(nd > 2 ? dims[2] : 1);
    if (strcmp(name, "done") == 0)
        block_rows = (int64_t)dims[0];
    buf = malloc(row * (size_t)block_rows);
    if (!buf) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", dst_path);
        goto done;
    }
    path = dst_path;
    H5_CHECK(dd = H5Dopen2(fd, name, H5P_DEFAULT), "H5Dopen2");
    for (int64_t r0 = 0; r0 < (int64_t)dims[0]; r0 += block_rows) {
        int64_t R = (int64_t)dims[0] - r0 < block_rows ? (int64_t)dims[0] - r0 : block_rows;
        path = src_path;
        H5_CHECK(dset_rows_io(ds, 0, t, r0, R, buf), "H5Dread");
        path = dst_path;
        H5_CHECK(dset_rows_io(dd, 1, t, r0, R, buf), "H5Dwrite");
    }
done:
    free(buf);
    H5_CLOSE(dd, H5Dclose);
    close_id(&sp, H5Sclose);
    close_id(&t, H5Tclose);
    close_id(&ds, H5Dclose);
    if (st != KD_OK)
        kd_fail_context(st, "copying /%s: ", name);
    return st;
}

/* The finished <cache>.partial becomes the compressed <cache> (see the file comment). */
static kd_status cache_compress_finish(const char *partial, const char *final_path,
                                       const kd_cache_meta *m, const kd_cache_write_opts *o)
{
    static const char *const names[] = {"logits",     "topk_values", "topk_indices", "logsumexp",
                                        "aug_params", "labels",      "done"};
    kd_status st = KD_OK;
    char *tmp = tmp_name(final_path);
    const char *path = partial;
    hid_t fs = H5I_INVALID_HID, fd = H5I_INVALID_HID;
    if (!tmp)
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", final_path);
    H5_CHECK(fs = H5Fopen(partial, H5F_ACC_RDONLY, H5P_DEFAULT), "H5Fopen");
    if ((st = cache_build(tmp, m, o, &fd)) != KD_OK)
        goto done;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        htri_t e = H5Lexists(fs, names[i], H5P_DEFAULT);
        if (e < 0) {
            st = H5_FAIL(KD_ERR_FORMAT, partial, "H5Lexists");
            goto done;
        }
        if (e && (st = dset_copy(fs, fd, partial, tmp, names[i], m->chunk_rows)) != KD_OK)
            goto done;
    }
    path = tmp;
    H5_CHECK(H5Fflush(fd, H5F_SCOPE_LOCAL), "H5Fflush");
    if ((st = close_and_rename(&fd, tmp, final_path, o->fsync)) != KD_OK)
        goto done;
    unlink(partial); /* a leftover is removed by the next writer_open of this cache */
done:
    close_id(&fd, H5Fclose);
    close_id(&fs, H5Fclose);
    if (st != KD_OK)
        unlink(tmp);
    free(tmp);
    if (st != KD_OK)
        kd_fail_context(st, "compressing '%s' into '%s': ", partial, final_path);
    return st;
}

/* The existing file's metadata must equal the requested one, field by field. */
static kd_status meta_compare_resume(const char *path, const kd_cache_meta *have,
                                     const kd_cache_meta *want)
{
    const char *hint = "delete the file or choose another cache path; a cache is never "
                       "overwritten";
#define CMP_I(field, name, st_)                                                                    \
    if (have->field != want->field)                                                                \
        return KD_FAIL(st_, "cache '%s' exists with %s %lld, this run writes %s %lld: %s", path,   \
                       name, (long long)have->field, name, (long long)want->field, hint);
    CMP_I(num_samples, "num_samples", KD_ERR_SHAPE)
    CMP_I(num_classes, "num_classes", KD_ERR_SHAPE)
    CMP_I(views, "views", KD_ERR_SHAPE)
    CMP_I(topk, "topk", KD_ERR_SHAPE)
    CMP_I(aug_nparams, "aug_params width", KD_ERR_SHAPE)
    CMP_I(chunk_rows, "chunk_rows", KD_ERR_CONFIG)
    CMP_I(row_begin, "row_begin", KD_ERR_CONFIG)
    CMP_I(row_end, "row_end", KD_ERR_CONFIG)
#undef CMP_I
    if (have->dtype != want->dtype)
        return KD_FAIL(KD_ERR_CONFIG, "cache '%s' exists with dtype %s, this run writes %s: %s",
                       path, dtype_str(have->dtype), dtype_str(want->dtype), hint);
    if (strcmp(have->teacher_sha256, want->teacher_sha256) != 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' exists for teacher sha256 '%s', this run's teacher is '%s': %s",
                       path, have->teacher_sha256, want->teacher_sha256, hint);
    if (strcmp(have->dataset_sha256, want->dataset_sha256) != 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' exists for dataset sha256 '%s', this run's dataset is '%s': %s",
                       path, have->dataset_sha256, want->dataset_sha256, hint);
    if (augment_differs(have->augment, want->augment))
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' exists with views augmented '%s', this run augments '%s': %s",
                       path, have->augment, want->augment, hint);
    return KD_OK;
}

/*
 * 1 when another process has path open under an HDF5 file lock that an open for writing
 * (write set) or reading would conflict with; 0 when not, or when that cannot be told.
 */
static int file_locked(const char *path, int write)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    int busy = flock(fd, (write ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    close(fd); /* releases the lock when it was taken */
    return busy;
}

/* 1 when path opens read-only as HDF5 and its root attributes are a cache's. */
static int readable_cache(const char *path)
{
    kd_cache_meta m;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    int ok = f >= 0 && meta_read(f, path, &m) == KD_OK;
    close_id(&f, H5Fclose);
    (void)H5Eclear2(H5E_DEFAULT); /* best effort: a failure here only means "not readable" */
    return ok;
}

/*
 * Record why H5Fopen (the call that just failed; its detail is on HDF5's stack) could not open
 * the existing cache at path: to read it (resume 0), to resume it (resume 1), or, when it was
 * not writable (werr: the errno of access(W_OK)), to read it for a resume. A file that another
 * process holds, that this user cannot read, or that is a readable cache open elsewhere or not
 * writable, is said to be so (KD_ERR_IO); only one that is none of these is called damaged
 * (KD_ERR_FORMAT), with `damaged` saying what to do.
 */
static kd_status open_fail(const char *path, int resume, int werr, const char *damaged)
{
    char d[700];
    h5_detail(d, sizeof d);
    const char *to = resume ? " to resume it" : "";
    if (file_locked(path, resume && !werr))
        return KD_FAIL(KD_ERR_IO,
                       "cache '%s' is open in another process (a running `distill cache` or "
                       "`distill train`?), so it cannot be opened%s: H5Fopen failed: %s; run "
                       "this again when that process has ended (the file is not damaged)",
                       path, to, d);
    if (access(path, R_OK) != 0)
        return KD_FAIL(KD_ERR_IO, "cache '%s' cannot be read%s: %s", path, to, strerror(errno));
    /* something else at the path (a mistyped teacher.cache naming a checkpoint, a directory) is
     * not a damaged cache: it is left alone, and so should the user leave it */
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return KD_FAIL(KD_ERR_FORMAT, "cache '%s' is a directory (check teacher.cache)", path);
    htri_t h5 = H5Fis_hdf5(path);
    (void)H5Eclear2(H5E_DEFAULT);
    if (h5 == 0 && stat(path, &sb) == 0 && sb.st_size > 0)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' is not an HDF5 file (no HDF5 signature): it is no cache, "
                       "and it is left as it is (check teacher.cache)",
                       path);
    if (resume && !werr && readable_cache(path))
        return KD_FAIL(KD_ERR_IO,
                       "cache '%s' is a readable cache but cannot be opened for writing to resume "
                       "it: H5Fopen failed: %s; check that the file is writable and not open "
                       "elsewhere (it is not damaged: do not delete it)",
                       path, d);
    if (werr)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' cannot be opened for writing (%s) and cannot be read either: "
                       "H5Fopen failed: %s; %s",
                       path, strerror(werr), d, damaged);
    return KD_FAIL(KD_ERR_FORMAT, "cache '%s' %s: H5Fopen failed: %s; %s", path,
                   resume ? "exists but cannot be reopened to resume it" : "cannot be opened", d,
                   damaged);
}

static void writer_free(kd_cache_writer *w)
{
    if (!w)
        return;
    dsets_close(&w->ds);
    close_id(&w->file, H5Fclose);
    free(w->done);
    free(w->half);
    free(w->zeros);
    free(w->seen);
    free(w->path);
    free(w->final_path);
    free(w);
}

/*
 * The damage `found` describes has been cleared from w->done (those chunks are missing now): write
 * /done so, on disk before anything else, so that no later run trusts them, and they are written
 * again. A compressed file is not repaired in place (its rewritten chunks would move: see the
 * file comment), and a file opened read-only (werr: why it is not writable) cannot be: both are
 * refused. /done is written whole, which does not read its stored chunk (that may be the damage).
 */
static kd_status writer_repair(kd_cache_writer *w, int werr, const char *found)
{
    kd_status st = KD_OK;
    const char *path = w->path;
    int comp = dset_compressed(w->ds.main);
    if (comp < 0)
        return H5_FAIL(KD_ERR_IO, path, "H5Dget_create_plist");
    if (werr)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' is damaged: %s; it cannot be opened for writing (%s) to compute "
                       "them again: make it writable and run `distill cache` again, or delete it "
                       "and start over",
                       path, found, strerror(werr));
    if (comp)
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' is damaged: %s; it is compressed, and a compressed cache is not "
                       "rewritten in place: delete it and run `distill cache` again to write it "
                       "anew",
                       path, found);
    H5_CHECK(H5Dwrite(w->ds.done, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, w->done),
             "H5Dwrite(/done)");
    H5_CHECK(H5Fflush(w->file, H5F_SCOPE_LOCAL), "H5Fflush");
    if (w->fsync)
        st = file_fsync(w->file, path);
done:
    return st;
}

/*
 * A resumed file's done chunks must read back (/done only says they were written). Chunks that
 * cannot be read are marked missing, on disk too, so that they are written again
 * (writer_repair); a read-only file with chunks missing is refused too.
 */
static kd_status writer_check_chunks(kd_cache_writer *w, int werr)
{
    const char *path = w->path;
    chunk_scan sc;
    char found[1200];
    KD_TRY(chunks_scan(&w->ds, &w->meta, w->done, 1, path, &sc));
    if (sc.nbad) {
        scan_text(&sc, &w->meta, found, sizeof found);
        KD_TRY(writer_repair(w, werr, found));
        w->damaged = sc.nbad;
    }
    if (werr && kd_cache_writer_chunks_missing(w))
        return KD_FAIL(KD_ERR_IO,
                       "cache '%s' has %lld of %lld chunks still to write, and it cannot be opened "
                       "for writing to resume it: %s; make it writable, or copy it to a writable "
                       "place and point teacher.cache there (the file is not damaged)",
                       path, (long long)kd_cache_writer_chunks_missing(w), (long long)w->nchunks,
                       strerror(werr));
    return KD_OK;
}

kd_status kd_cache_writer_open(const char *path, const kd_cache_meta *meta,
                               const kd_cache_write_opts *opts, kd_cache_writer **out)
{
    *out = NULL;
    h5_quiet();
    if (!path || !*path || !meta)
        return KD_FAIL(KD_ERR_INVALID, "kd_cache_writer_open: no path or metadata");
    kd_cache_write_opts o;
    if (opts)
        o = *opts;
    else
        kd_cache_write_opts_init(&o);
    kd_cache_meta m = *meta;
    if (m.chunk_rows == 0)
        m.chunk_rows = KD_CACHE_DEFAULT_CHUNK_ROWS;
    if (m.row_begin == 0 && m.row_end == 0)
        m.row_end = m.num_samples;
    KD_TRY(meta_validate(&m, path));
    if ((unsigned)o.compress > KD_CACHE_COMPRESS_ZSTD)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': unknown compression %d", path, (int)o.compress);
    if (o.compress == KD_CACHE_COMPRESS_DEFLATE && (o.level < 0 || o.level > 9))
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': deflate level %d is outside 1..9", path,
                       o.level);
    if (o.compress == KD_CACHE_COMPRESS_ZSTD && (o.level < 0 || o.level > 22))
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': zstd level %d is outside 1..22", path, o.level);

    struct stat sb;
    int exists = stat(path, &sb) == 0;
    if (!exists && o.compress != KD_CACHE_COMPRESS_NONE &&
        !kd_cache_compress_available(o.compress)) {
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "cache '%s': %s compression needs the HDF5 filter plugin for filter id %d, "
                       "which this HDF5 cannot load: install hdf5-filter-plugin (Debian; it "
                       "ships lz4) or set HDF5_PLUGIN_PATH, or use deflate",
                       path, kd_cache_compress_name(o.compress), (int)compress_filter(o.compress));
    }
    int staged = !exists && o.compress != KD_CACHE_COMPRESS_NONE;
    size_t plen = strlen(path) + sizeof ".partial";
    char *partial = malloc(plen);
    if (!partial)
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
    snprintf(partial, plen, "%s.partial", path);
    if (exists && o.compress != KD_CACHE_COMPRESS_NONE)
        unlink(partial); /* left over if a run stopped between the final rename and the unlink */
    if (staged && stat(partial, &sb) != 0) {
        kd_cache_write_opts plain = o;
        plain.compress = KD_CACHE_COMPRESS_NONE;
        plain.shuffle = 0;
        kd_status cs = cache_create(partial, &m, &plain);
        if (cs != KD_OK) {
            free(partial);
            return cs;
        }
    } else if (!exists && !staged) {
        kd_status cs = cache_create(path, &m, &o);
        if (cs != KD_OK) {
            free(partial);
            return cs;
        }
    }

    kd_status st = KD_OK;
    kd_cache_writer *w = calloc(1, sizeof *w);
    if (w) {
        w->path = staged ? partial : strdup(path);
        w->final_path = staged ? strdup(path) : NULL;
    }
    if (!staged)
        free(partial);
    if (!w || !w->path || (staged && !w->final_path)) {
        if (w) {
            free(w->path);
            free(w->final_path);
        } else if (staged) {
            free(partial);
        }
        free(w);
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
    }
    path = w->path;
    dsets_init(&w->ds);
    w->fsync = o.fsync;
    w->opts = o;
    /* A cache that cannot be written (a read-only file system, no write permission) is
     * opened read-only: when it is complete and readable nothing needs writing. */
    const int werr = access(path, W_OK) == 0 ? 0 : errno;
    w->readonly = werr != 0;
    w->file = H5Fopen(path, werr ? H5F_ACC_RDONLY : H5F_ACC_RDWR, H5P_DEFAULT);
    if (w->file < 0) {
        st = open_fail(path, 1, werr,
                       werr ? "the file is damaged or not HDF5: delete it, or point teacher.cache "
                              "at a writable path, to start over"
                            : "the file is damaged or not HDF5: delete it to start over");
        goto done;
    }
    kd_cache_meta have;
    if ((st = meta_read(w->file, path, &have)) != KD_OK ||
        (st = dsets_open(w->file, path, &have, NULL, &w->ds)) != KD_OK ||
        (st = meta_compare_resume(path, &have, &m)) != KD_OK)
        goto done;
    int virt = dset_is_virtual(w->ds.main);
    if (virt != 0) {
        st = virt < 0 ? H5_FAIL(KD_ERR_FORMAT, path, "H5Dget_create_plist")
                      : KD_FAIL(KD_ERR_CONFIG,
                                "cache '%s' is a sharded cache (a virtual-dataset file over shard "
                                "files, written by `distill cache` under mpirun); it is read-only "
                                "and cannot be resumed as one file",
                                path);
        goto done;
    }
    w->meta = have;
    w->nchunks = meta_chunks(&have);
    size_t per_chunk = (size_t)have.chunk_rows * (size_t)have.views;
    w->done = malloc((size_t)w->nchunks);
    w->half = have.dtype == KD_DTYPE_F16 ? malloc(per_chunk * (size_t)meta_width(&have) * 2) : NULL;
    w->zeros = calloc(per_chunk * (size_t)have.aug_nparams, sizeof(float));
    w->seen = have.topk ? calloc((size_t)have.num_classes, sizeof(uint32_t)) : NULL;
    if (!w->done || !w->zeros || (have.dtype == KD_DTYPE_F16 && !w->half) ||
        (have.topk && !w->seen)) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    int lost;
    if ((st = read_done(w->ds.done, w->nchunks, w->done, path, &lost)) == KD_OK) {
        st = writer_check_chunks(w, werr);
    } else if (lost) { /* nothing says which chunks were written: all are written again */
        memset(w->done, 0, (size_t)w->nchunks);
        st = writer_repair(w, werr, "its /done dataset (which chunks are written) cannot be read");
        w->done_lost = st == KD_OK;
    }
done:
    if (st != KD_OK) {
        writer_free(w);
        return st;
    }
    *out = w;
    return KD_OK;
}

int64_t kd_cache_writer_num_chunks(const kd_cache_writer *w) { return w->nchunks; }

int64_t kd_cache_writer_chunk_nrows(const kd_cache_writer *w, int64_t chunk)
{
    if (chunk < 0 || chunk >= w->nchunks)
        return 0;
    int64_t r0 = chunk * w->meta.chunk_rows, n = meta_rows(&w->meta);
    return n - r0 < w->meta.chunk_rows ? n - r0 : w->meta.chunk_rows;
}

int kd_cache_writer_chunk_done(const kd_cache_writer *w, int64_t chunk)
{
    return chunk >= 0 && chunk < w->nchunks && w->done[chunk] != 0;
}

int64_t kd_cache_writer_chunks_missing(const kd_cache_writer *w)
{
    int64_t k = 0;
    for (int64_t i = 0; i < w->nchunks; i++)
        k += w->done[i] == 0;
    return k;
}

const kd_cache_meta *kd_cache_writer_meta(const kd_cache_writer *w) { return &w->meta; }

int64_t kd_cache_writer_chunks_damaged(const kd_cache_writer *w) { return w->damaged; }

int kd_cache_writer_done_lost(const kd_cache_writer *w) { return w->done_lost; }

/* Check one chunk's inputs before anything is written. */
static kd_status put_validate(kd_cache_writer *w, int64_t g0, int64_t R, const float *main,
                              const int32_t *idx, const float *lse, const int32_t *labels)
{
    const kd_cache_meta *m = &w->meta;
    int V = m->views, W = meta_width(m), C = m->num_classes;
    int f16 = m->dtype == KD_DTYPE_F16;
    for (int64_t r = 0; r < R; r++) {
        for (int v = 0; v < V; v++) {
            const float *x = main + ((size_t)r * V + v) * W;
            for (int j = 0; j < W; j++) {
                if (!isfinite(x[j]))
                    return KD_FAIL(KD_ERR_INVALID,
                                   "cache '%s': non-finite %s %g at row %lld view %d: the "
                                   "teacher's output is not finite",
                                   w->path, m->topk ? "top-k value" : "logit", (double)x[j],
                                   (long long)(g0 + r), v);
                if (f16 && fabsf(x[j]) > 65504.0f)
                    return KD_FAIL(KD_ERR_INVALID,
                                   "cache '%s': logit %g at row %lld view %d does not fit "
                                   "float16 (|x| <= 65504): write the cache with teacher.dtype: "
                                   "float32, after deleting '%s' (made for float16, it would be "
                                   "refused)",
                                   w->path, (double)x[j], (long long)(g0 + r), v, w->path);
            }
            if (m->topk) {
                const int32_t *ix = idx + ((size_t)r * V + v) * W;
                for (int j = 0; j < W; j++)
                    if (ix[j] < 0 || ix[j] >= C)
                        return KD_FAIL(KD_ERR_INVALID,
                                       "cache '%s': top-k index %d at row %lld view %d is outside "
                                       "[0, %d)",
                                       w->path, ix[j], (long long)(g0 + r), v, C);
                if (!isfinite(lse[(size_t)r * V + v]))
                    return KD_FAIL(KD_ERR_INVALID,
                                   "cache '%s': non-finite logsumexp at row %lld view %d", w->path,
                                   (long long)(g0 + r), v);
                char why[256];
                if (topk_entry_bad(x, ix, lse[(size_t)r * V + v], W, C, f16, w->seen, &w->stamp,
                                   why, sizeof why))
                    return KD_FAIL(KD_ERR_INVALID,
                                   "cache '%s': invalid top-k entry at row %lld view %d: %s",
                                   w->path, (long long)(g0 + r), v, why);
            }
        }
        if (labels[r] < 0 || labels[r] >= C)
            return KD_FAIL(KD_ERR_INVALID, "cache '%s': label %d at row %lld is outside [0, %d)",
                           w->path, labels[r], (long long)(g0 + r), C);
    }
    return KD_OK;
}

kd_status kd_cache_writer_put(kd_cache_writer *w, int64_t chunk, const float *logits_or_null,
                              const float *topk_values, const int32_t *topk_indices,
                              const float *lse, const float *aug_params, const int32_t *labels)
{
    h5_quiet();
    const char *path = w->path;
    const kd_cache_meta *m = &w->meta;
    if (chunk < 0 || chunk >= w->nchunks)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': chunk %lld is outside [0, %lld)", path,
                       (long long)chunk, (long long)w->nchunks);
    const float *main = m->topk ? topk_values : logits_or_null;
    if (!main || !labels || (m->topk && (!topk_indices || !lse)))
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': a %s cache needs %s and labels for every chunk",
                       path, m->topk ? "top-k" : "full-logit",
                       m->topk ? "topk_values, topk_indices, lse" : "logits");
    if (w->readonly)
        return KD_FAIL(KD_ERR_IO,
                       "cache '%s' was opened read-only (it is not writable, and complete): "
                       "chunk %lld cannot be written",
                       path, (long long)chunk);
    int64_t R = kd_cache_writer_chunk_nrows(w, chunk), r0 = chunk * m->chunk_rows;
    KD_TRY(put_validate(w, m->row_begin + r0, R, main, topk_indices, lse, labels));

    kd_status st = KD_OK;
    size_t nmain = (size_t)R * m->views * meta_width(m);
    const void *mainbuf = main;
    hid_t mt = H5T_NATIVE_FLOAT;
    if (m->dtype == KD_DTYPE_F16) {
        for (size_t i = 0; i < nmain; i++)
            w->half[i] = kd_f32_to_f16(main[i]);
        mainbuf = w->half;
        mt = f16_type();
    }
    H5_CHECK(dset_rows_io(w->ds.main, 1, mt, r0, R, (void *)mainbuf), "H5Dwrite(main)");
    if (m->topk) {
        H5_CHECK(dset_rows_io(w->ds.idx, 1, H5T_NATIVE_INT32, r0, R, (void *)topk_indices),
                 "H5Dwrite(/topk_indices)");
        H5_CHECK(dset_rows_io(w->ds.lse, 1, H5T_NATIVE_FLOAT, r0, R, (void *)lse),
                 "H5Dwrite(/logsumexp)");
    }
    H5_CHECK(dset_rows_io(w->ds.aug, 1, H5T_NATIVE_FLOAT, r0, R,
                          (void *)(aug_params ? aug_params : w->zeros)),
             "H5Dwrite(/aug_params)");
    H5_CHECK(dset_rows_io(w->ds.lab, 1, H5T_NATIVE_INT32, r0, R, (void *)labels),
             "H5Dwrite(/labels)");
    /* The data must be on disk before /done claims them. */
    H5_CHECK(H5Fflush(w->file, H5F_SCOPE_LOCAL), "H5Fflush(data)");
    if (w->fsync && (st = file_fsync(w->file, path)) != KD_OK)
        goto done;
    w->done[chunk] = 1;
    if (H5Dwrite(w->ds.done, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, w->done) < 0) {
        w->done[chunk] = 0;
        st = H5_FAIL(KD_ERR_IO, path, "H5Dwrite(/done)");
        goto done;
    }
    if (H5Fflush(w->file, H5F_SCOPE_LOCAL) < 0) {
        w->done[chunk] = 0;
        st = H5_FAIL(KD_ERR_IO, path, "H5Fflush");
        goto done;
    }
    if (w->fsync && (st = file_fsync(w->file, path)) != KD_OK)
        goto done;
done:
    if (st != KD_OK)
        kd_fail_context(st, "writing chunk %lld: ", (long long)chunk);
    return st;
}

kd_status kd_cache_writer_close(kd_cache_writer *w)
{
    if (!w)
        return KD_OK;
    h5_quiet();
    kd_status st = KD_OK;
    const char *path = w->path;
    if (dsets_close(&w->ds) > 0)
        st = H5_FAIL(KD_ERR_IO, path, "H5Dclose");
    if (w->file >= 0 && H5Fclose(w->file) < 0 && st == KD_OK)
        st = H5_FAIL(KD_ERR_IO, path, "H5Fclose");
    w->file = H5I_INVALID_HID;
    if (st == KD_OK && w->final_path && kd_cache_writer_chunks_missing(w) == 0)
        st = cache_compress_finish(w->path, w->final_path, &w->meta, &w->opts);
    writer_free(w);
    return st;
}

/* ---- sharded caches: shard names, the VDS file and its checks ----------------------------- */

kd_status kd_cache_shard_path(const char *path, int rank, int world, char *buf, size_t len)
{
    if (!path || !*path || world < 1 || rank < 0 || rank >= world)
        return KD_FAIL(KD_ERR_INVALID, "kd_cache_shard_path: bad path or rank %d of %d", rank,
                       world);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t stem = dot && dot != base ? (size_t)(dot - path) : strlen(path);
    int n = snprintf(buf, len, "%.*s.shard-%d-of-%d%s", (int)stem, path, rank, world, path + stem);
    if (n < 0 || (size_t)n >= len)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': the shard file name is too long", path);
    return KD_OK;
}

/* W of a ".shard-r-of-W" name, 0 when the name is not one. */
static int shard_world_of(const char *name)
{
    const char *p = strstr(name, ".shard-");
    int r, w;
    if (!p || sscanf(p, ".shard-%d-of-%d", &r, &w) != 2 || r < 0 || w < 1 || r >= w)
        return 0;
    return w;
}

/* The directory of path, made absolute (the lookup place of a VDS file's relative shards). */
static kd_status abs_dir_of(const char *path, char *buf, size_t len)
{
    char dir[4096], *abs;
    kd_path_dir(path, dir, sizeof dir);
    if (!(abs = realpath(dir, NULL)))
        return KD_FAIL(KD_ERR_IO, "cache '%s': cannot resolve its directory '%s': %s", path, dir,
                       strerror(errno));
    int n = snprintf(buf, len, "%s", abs);
    free(abs);
    if (n < 0 || (size_t)n >= len)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': its directory name is too long", path);
    return KD_OK;
}

/*
 * The first metadata field other than the row range in which a and b differ, its two values
 * written into va and vb; NULL when they agree.
 */
static const char *meta_diff(const kd_cache_meta *a, const kd_cache_meta *b, char *va, char *vb,
                             size_t len)
{
#define DIFF_I(field, name)                                                                        \
    if (a->field != b->field) {                                                                    \
        snprintf(va, len, "%lld", (long long)a->field);                                            \
        snprintf(vb, len, "%lld", (long long)b->field);                                            \
        return name;                                                                               \
    }
    DIFF_I(num_samples, "num_samples")
    DIFF_I(num_classes, "num_classes")
    DIFF_I(views, "views")
    DIFF_I(topk, "topk")
    DIFF_I(aug_nparams, "aug_params width")
    DIFF_I(chunk_rows, "chunk_rows")
#undef DIFF_I
    if (a->dtype != b->dtype) {
        snprintf(va, len, "%s", dtype_str(a->dtype));
        snprintf(vb, len, "%s", dtype_str(b->dtype));
        return "dtype";
    }
    if (strcmp(a->teacher_sha256, b->teacher_sha256) != 0) {
        snprintf(va, len, "'%s'", a->teacher_sha256);
        snprintf(vb, len, "'%s'", b->teacher_sha256);
        return "teacher_sha256";
    }
    if (strcmp(a->dataset_sha256, b->dataset_sha256) != 0) {
        snprintf(va, len, "'%s'", a->dataset_sha256);
        snprintf(vb, len, "'%s'", b->dataset_sha256);
        return "dataset_sha256";
    }
    if (augment_differs(a->augment, b->augment)) {
        snprintf(va, len, "'%s'", a->augment);
        snprintf(vb, len, "'%s'", b->augment);
        return "augment";
    }
    return NULL;
}

/* One shard file of a sharded cache, held open read-only while the cache is open. */
typedef struct {
    char *name; /* as the VDS file names it (a basename when distill wrote it) */
    char *file; /* where it is looked up: <VDS directory>/name, or name when absolute */
    hid_t fid;
    kd_cache_meta meta;
} vds_shard;

typedef struct {
    vds_shard *v;
    int n, cap;
    int world; /* W of the first ".shard-r-of-W" name seen, 0 = none */
} vds_shards;

static void shards_free(vds_shards *s)
{
    for (int i = 0; i < s->n; i++) {
        close_id(&s->v[i].fid, H5Fclose);
        free(s->v[i].name);
        free(s->v[i].file);
    }
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int shards_find(const vds_shards *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->v[i].name, name) == 0)
            return i;
    return -1;
}

/* Append a shard (name as stored, file where it lies); its index, or -1 when out of memory. */
static int shards_add(vds_shards *s, const char *name, const char *file)
{
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 4;
        vds_shard *v = realloc(s->v, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        s->cap = cap;
    }
    vds_shard *sh = &s->v[s->n];
    memset(sh, 0, sizeof *sh);
    sh->fid = H5I_INVALID_HID;
    sh->name = strdup(name);
    sh->file = strdup(file);
    if (!sh->name || !sh->file) {
        free(sh->name);
        free(sh->file);
        return -1;
    }
    if (!s->world)
        s->world = shard_world_of(name);
    return s->n++;
}

/*
 * Open shard sh->file read-only and check it against the sharded cache `vds` (metadata of the
 * whole cache, from the VDS file at vds_path): it exists, is a cache with the same metadata
 * apart from its row range, starts on a chunk boundary, is not itself virtual, and every chunk
 * of it is done. Messages name the VDS file and the shard. sh->fid stays open.
 */
static kd_status shard_open(const char *vds_path, const kd_cache_meta *vds, vds_shard *sh)
{
    static const char *const redo = "rerun `distill cache` with the same config and the same "
                                    "number of ranks to rewrite it";
    /* a shard that is there but not this cache's is never overwritten: it must go first */
    char del[1400], np[32] = "";
    const int w = shard_world_of(sh->name);
    if (w > 1)
        snprintf(np, sizeof np, "mpirun -np %d ", w);
    snprintf(del, sizeof del,
             "delete '%s' and rerun `%sdistill cache` with the same config to write it again",
             sh->file, np);
    struct stat sb;
    kd_status st = KD_OK;
    cache_dsets ds;
    dsets_init(&ds);
    uint8_t *done = NULL;
    if (stat(sh->file, &sb) != 0)
        return KD_FAIL(errno == ENOENT ? KD_ERR_FORMAT : KD_ERR_IO,
                       "cache '%s' is sharded and its shard '%s' %s (looked for '%s'): the "
                       "shards must stay in the directory of the VDS file; %s",
                       vds_path, sh->name, errno == ENOENT ? "is missing" : "cannot be read",
                       sh->file, redo);
    sh->fid = H5Fopen(sh->file, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (sh->fid < 0) {
        char d[700];
        h5_detail(d, sizeof d);
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s' is sharded and its shard '%s' cannot be opened: H5Fopen "
                       "failed: %s; the shard is damaged: %s",
                       vds_path, sh->file, d, del);
    }
    if ((st = meta_read(sh->fid, sh->file, &sh->meta)) != KD_OK ||
        (st = dsets_open(sh->fid, sh->file, &sh->meta, NULL, &ds)) != KD_OK) {
        kd_fail_context(st, "cache '%s' (sharded): ", vds_path);
        goto done;
    }
    char va[80], vb[80];
    const char *field = meta_diff(&sh->meta, vds, va, vb, sizeof va);
    if (field) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s' is sharded and its shard '%s' has %s %s where the VDS file has "
                     "%s: the shard belongs to another cache; %s",
                     vds_path, sh->file, field, va, vb, del);
        goto done;
    }
    const int shard_virt = dset_is_virtual(ds.main);
    if (shard_virt < 0) {
        st = H5_FAIL(KD_ERR_FORMAT, sh->file, "H5Dget_create_plist");
        goto done;
    }
    if (shard_virt) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s' is sharded and its shard '%s' is itself a virtual-dataset file; "
                     "shards must hold their rows",
                     vds_path, sh->file);
        goto done;
    }
    if (sh->meta.row_begin % sh->meta.chunk_rows != 0 ||
        (sh->meta.row_end % sh->meta.chunk_rows != 0 && sh->meta.row_end != vds->num_samples)) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s': shard '%s' holds rows [%lld, %lld), which do not start and end "
                     "on multiples of chunk_rows %lld",
                     vds_path, sh->file, (long long)sh->meta.row_begin, (long long)sh->meta.row_end,
                     (long long)sh->meta.chunk_rows);
        goto done;
    }
    int64_t nch = meta_chunks(&sh->meta), missing = 0;
    if (!(done = malloc((size_t)nch))) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", vds_path);
        goto done;
    }
    if ((st = read_done(ds.done, nch, done, sh->file, NULL))) {
        kd_fail_context(st, "cache '%s' (sharded): ", vds_path);
        goto done;
    }
    for (int64_t i = 0; i < nch; i++)
        missing += done[i] == 0;
    if (missing)
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s' is sharded and its shard '%s' is incomplete: %lld of %lld chunks "
                     "are missing; %s",
                     vds_path, sh->file, (long long)missing, (long long)nch, redo);
done:
    free(done);
    dsets_close(&ds);
    if (st != KD_OK)
        close_id(&sh->fid, H5Fclose);
    return st;
}

typedef struct {
    int64_t a, b; /* rows (chunks for /done) [a, b) of the virtual dataset */
    int shard;
} vds_span;

static int span_cmp(const void *x, const void *y)
{
    const vds_span *p = x, *q = y;
    return p->a < q->a ? -1 : p->a > q->a;
}

/* A string property of mapping i (which = 0: source file name, 1: source dataset name). */
static char *vds_mapping_str(hid_t dcpl, size_t i, int which)
{
    ssize_t n = which ? H5Pget_virtual_dsetname(dcpl, i, NULL, 0)
                      : H5Pget_virtual_filename(dcpl, i, NULL, 0);
    if (n < 0)
        return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s)
        return NULL;
    ssize_t m = which ? H5Pget_virtual_dsetname(dcpl, i, s, (size_t)n + 1)
                      : H5Pget_virtual_filename(dcpl, i, s, (size_t)n + 1);
    if (m < 0) {
        free(s);
        return NULL;
    }
    s[n] = '\0';
    return s;
}

/*
 * Check one virtual dataset /name (open as d) of the VDS file at path: each mapping takes
 * whole rows [a, b) of it from the same-named dataset of a shard that holds exactly those rows
 * (for /done: the shard's chunks), the mappings tile the dataset, and every shard is opened
 * and checked (shard_open) the first time it is named. Then one row of each mapping is read,
 * so that HDF5 opens every source now and keeps it open while d is.
 */
static kd_status vds_check_dset(const char *path, const kd_cache_meta *m, const char *vds_dir,
                                const char *name, hid_t d, vds_shards *shards)
{
    kd_status st = KD_OK;
    hid_t dcpl = H5I_INVALID_HID, fs = H5I_INVALID_HID, vsp = H5I_INVALID_HID,
          ssp = H5I_INVALID_HID, ft = H5I_INVALID_HID;
    vds_span *spans = NULL;
    char *fname = NULL, *dname = NULL;
    void *row = NULL;
    size_t count = 0;
    int is_done = strcmp(name, "done") == 0, shard_err = 0;
    hsize_t dims[3] = {0, 1, 1};
    H5_CHECK(dcpl = H5Dget_create_plist(d), "H5Dget_create_plist");
    H5_CHECK(H5Pget_virtual_count(dcpl, &count), "H5Pget_virtual_count");
    H5_CHECK(fs = H5Dget_space(d), "H5Dget_space");
    int nd = H5Sget_simple_extent_ndims(fs);
    if (nd < 1 || nd > 3 || H5Sget_simple_extent_dims(fs, dims, NULL) < 0) {
        st = H5_FAIL(KD_ERR_FORMAT, path, "H5Sget_simple_extent_dims");
        goto done;
    }
    hsize_t inner = dims[1] * dims[2];
    if (count < 1 || !(spans = calloc(count, sizeof *spans))) {
        st = count < 1 ? KD_FAIL(KD_ERR_FORMAT, "cache '%s': virtual dataset /%s maps no shard",
                                 path, name)
                       : KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        hsize_t s0[3] = {0, 0, 0}, s1[3] = {0, 0, 0}, sd[3] = {0, 0, 0};
        H5_CHECK(vsp = H5Pget_virtual_vspace(dcpl, i), "H5Pget_virtual_vspace");
        H5_CHECK(ssp = H5Pget_virtual_srcspace(dcpl, i), "H5Pget_virtual_srcspace");
        H5_CHECK(H5Sget_select_bounds(vsp, s0, s1), "H5Sget_select_bounds");
        hssize_t vn = H5Sget_select_npoints(vsp);
        H5_CHECK(vn, "H5Sget_select_npoints");
        int64_t a = (int64_t)s0[0], b = (int64_t)s1[0] + 1;
        int whole = vn == (hssize_t)((hsize_t)(b - a) * inner);
        for (int k = 1; k < nd; k++)
            whole = whole && s0[k] == 0 && s1[k] == dims[k] - 1;
        /* The source: all of the shard's dataset (whose shape shard_open checks), or a block
         * of the same size from its first row. A stored "all" selection comes back without
         * its extent, which HDF5 fills in from the source when it opens it. */
        H5S_sel_type sel = H5Sget_select_type(ssp);
        H5_CHECK(sel, "H5Sget_select_type");
        if (whole && sel != H5S_SEL_ALL) {
            hssize_t sn = H5Sget_select_npoints(ssp);
            H5_CHECK(sn, "H5Sget_select_npoints");
            H5_CHECK(H5Sget_select_bounds(ssp, sd, s1), "H5Sget_select_bounds");
            whole = sel == H5S_SEL_HYPERSLABS && sn == vn && sd[0] == 0 &&
                    s1[0] == (hsize_t)(b - a - 1);
        }
        close_id(&vsp, H5Sclose);
        close_id(&ssp, H5Sclose);
        if (!whole) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s': mapping %zu of virtual dataset /%s is not a block of whole "
                         "rows taken from a whole shard dataset (see data/README.md)",
                         path, i, name);
            goto done;
        }
        if (!(fname = vds_mapping_str(dcpl, i, 0)) || !(dname = vds_mapping_str(dcpl, i, 1))) {
            st = H5_FAIL(KD_ERR_FORMAT, path, "H5Pget_virtual_filename");
            goto done;
        }
        if (strcmp(dname + (dname[0] == '/'), name) != 0 || strcmp(fname, ".") == 0) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s': virtual dataset /%s maps rows %lld..%lld to dataset '%s' "
                         "of '%s'; a sharded cache maps each dataset to the same-named dataset "
                         "of a shard file",
                         path, name, (long long)a, (long long)(b - 1), dname, fname);
            goto done;
        }
        int k = shards_find(shards, fname);
        if (k < 0) {
            char file[4200];
            if (fname[0] == '/')
                snprintf(file, sizeof file, "%s", fname);
            else
                snprintf(file, sizeof file, "%s/%s", vds_dir, fname);
            if ((k = shards_add(shards, fname, file)) < 0) {
                st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
                goto done;
            }
            if ((st = shard_open(path, m, &shards->v[k])) != KD_OK) {
                shard_err = 1; /* its message names the VDS file and the shard */
                goto done;
            }
        }
        const kd_cache_meta *sm = &shards->v[k].meta;
        int64_t want_a = is_done ? sm->row_begin / sm->chunk_rows : sm->row_begin;
        int64_t want_b = is_done ? want_a + meta_chunks(sm) : sm->row_end;
        if (a != want_a || b != want_b) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s': virtual dataset /%s maps %s [%lld, %lld) to shard '%s', "
                         "which holds %s [%lld, %lld)",
                         path, name, is_done ? "chunks" : "rows", (long long)a, (long long)b,
                         shards->v[k].file, is_done ? "chunks" : "rows", (long long)want_a,
                         (long long)want_b);
            goto done;
        }
        spans[i] = (vds_span){a, b, k};
        free(fname);
        free(dname);
        fname = dname = NULL;
    }
    qsort(spans, count, sizeof *spans, span_cmp);
    int64_t at = 0;
    for (size_t i = 0; i <= count; i++) {
        int64_t next = i < count ? spans[i].a : (int64_t)dims[0];
        if (next != at) {
            st = KD_FAIL(KD_ERR_FORMAT, "cache '%s': %s %lld..%lld of virtual dataset /%s are %s",
                         path, is_done ? "chunks" : "rows", (long long)(next > at ? at : next),
                         (long long)((next > at ? next : at) - 1), name,
                         next > at ? "mapped to no shard" : "mapped to two shards");
            goto done;
        }
        if (i < count)
            at = spans[i].b;
    }
    /* Read one row per mapping: HDF5 opens each source and keeps it open from now on. */
    H5_CHECK(ft = H5Dget_type(d), "H5Dget_type");
    size_t esize = H5Tget_size(ft);
    if (esize == 0) {
        st = H5_FAIL(KD_ERR_FORMAT, path, "H5Tget_size");
        goto done;
    }
    if (!(row = malloc(esize * (size_t)inner))) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < count; i++)
        H5_CHECK(dset_rows_io(d, 0, ft, spans[i].a, 1, row), "H5Dread(virtual dataset)");
done:
    if (st != KD_OK && !shard_err && !strstr(kd_last_error(), "virtual dataset /"))
        kd_fail_context(st, "checking virtual dataset /%s: ", name);
    free(row);
    free(fname);
    free(dname);
    free(spans);
    close_id(&ft, H5Tclose);
    close_id(&vsp, H5Sclose);
    close_id(&ssp, H5Sclose);
    close_id(&fs, H5Sclose);
    close_id(&dcpl, H5Pclose);
    return st;
}

/*
 * When the cache at path (open as ds, metadata m) is a VDS file, check every virtual dataset and
 * every shard it maps (see vds_check_dset); *shards receives the shard files, open. A file
 * without virtual datasets passes untouched. On failure the caller frees *shards.
 */
static kd_status vds_check(const char *path, const kd_cache_meta *m, const cache_dsets *ds,
                           const char *vds_dir, vds_shards *shards)
{
    const char *names[] = {m->topk ? "topk_values" : "logits",
                           "topk_indices",
                           "logsumexp",
                           "aug_params",
                           "labels",
                           "done"};
    const hid_t ids[] = {ds->main, ds->idx, ds->lse, ds->aug, ds->lab, ds->done};
    for (int i = 0; i < 6; i++) {
        if (ids[i] < 0)
            continue;
        int v = dset_is_virtual(ids[i]);
        if (v < 0)
            return H5_FAIL(KD_ERR_FORMAT, path, "H5Dget_create_plist");
        if (!v)
            continue;
        const char *prefix = getenv("HDF5_VDS_PREFIX");
        if (prefix && *prefix)
            return KD_FAIL(KD_ERR_CONFIG,
                           "cache '%s' is sharded, and HDF5_VDS_PREFIX ('%s') would make HDF5 "
                           "look for its shards elsewhere than distill checks them (the VDS "
                           "file's directory '%s'): unset HDF5_VDS_PREFIX",
                           path, prefix, vds_dir);
        KD_TRY(vds_check_dset(path, m, vds_dir, names[i], ids[i], shards));
    }
    return KD_OK;
}

/* Create virtual dataset /name [dims] of type ft over the shards' same-named datasets. */
static kd_status vds_dset_create(hid_t f, const char *path, const char *name, hid_t ft, int nd,
                                 const hsize_t *dims, const vds_shards *sh)
{
    kd_status st = KD_OK;
    hid_t vsp = H5I_INVALID_HID, dcpl = H5I_INVALID_HID, sel = H5I_INVALID_HID,
          ssp = H5I_INVALID_HID, d = H5I_INVALID_HID;
    int is_done = strcmp(name, "done") == 0;
    char src[64];
    snprintf(src, sizeof src, "/%s", name);
    H5_CHECK(vsp = H5Screate_simple(nd, dims, NULL), "H5Screate_simple");
    H5_CHECK(dcpl = H5Pcreate(H5P_DATASET_CREATE), "H5Pcreate");
    H5_CHECK(H5Pset_obj_track_times(dcpl, 0), "H5Pset_obj_track_times");
    for (int i = 0; i < sh->n; i++) {
        const kd_cache_meta *sm = &sh->v[i].meta;
        int64_t a = is_done ? sm->row_begin / sm->chunk_rows : sm->row_begin;
        int64_t b = is_done ? a + meta_chunks(sm) : sm->row_end;
        hsize_t start[3] = {(hsize_t)a, 0, 0}, block[3] = {(hsize_t)(b - a), 1, 1};
        for (int k = 1; k < nd; k++)
            block[k] = dims[k];
        H5_CHECK(sel = H5Scopy(vsp), "H5Scopy");
        H5_CHECK(H5Sselect_hyperslab(sel, H5S_SELECT_SET, start, NULL, block, NULL),
                 "H5Sselect_hyperslab");
        H5_CHECK(ssp = H5Screate_simple(nd, block, NULL), "H5Screate_simple");
        H5_CHECK(H5Pset_virtual(dcpl, sel, sh->v[i].name, src, ssp), "H5Pset_virtual");
        close_id(&sel, H5Sclose);
        close_id(&ssp, H5Sclose);
    }
    H5_CHECK(d = H5Dcreate2(f, name, ft, vsp, H5P_DEFAULT, dcpl, H5P_DEFAULT), "H5Dcreate2");
done:
    H5_CLOSE(d, H5Dclose);
    close_id(&ssp, H5Sclose);
    close_id(&sel, H5Sclose);
    close_id(&dcpl, H5Pclose);
    close_id(&vsp, H5Sclose);
    if (st != KD_OK)
        kd_fail_context(st, "creating virtual dataset /%s: ", name);
    return st;
}

/* Build the VDS file at tmp (closed on return) for the checked shards sh of cache m. */
static kd_status vds_build(const char *tmp, const kd_cache_meta *m, const vds_shards *sh, int sync)
{
    kd_status st = KD_OK;
    const char *path = tmp;
    hid_t f = H5I_INVALID_HID;
    hsize_t n = (hsize_t)m->num_samples, v = (hsize_t)m->views, w = (hsize_t)meta_width(m);
    hid_t ft = m->dtype == KD_DTYPE_F16 ? f16_type() : H5T_IEEE_F32LE;
    if (ft < 0)
        return KD_FAIL(KD_ERR_INTERNAL, "cache '%s': cannot build the float16 HDF5 type", path);
    H5_CHECK(f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), "H5Fcreate");
    if ((st = meta_write(f, path, m)) != KD_OK)
        goto done;
    {
        hsize_t d3[3] = {n, v, w}, dk[3] = {n, v, (hsize_t)m->topk}, d2[2] = {n, v};
        hsize_t da[3] = {n, v, (hsize_t)m->aug_nparams}, dl[1] = {n};
        hsize_t dd[1] = {(hsize_t)meta_chunks(m)};
        if ((st = vds_dset_create(f, path, m->topk ? "topk_values" : "logits", ft, 3, d3, sh)))
            goto done;
        if (m->topk && ((st = vds_dset_create(f, path, "topk_indices", H5T_STD_I32LE, 3, dk, sh)) ||
                        (st = vds_dset_create(f, path, "logsumexp", H5T_IEEE_F32LE, 2, d2, sh))))
            goto done;
        if ((st = vds_dset_create(f, path, "aug_params", H5T_IEEE_F32LE, 3, da, sh)) ||
            (st = vds_dset_create(f, path, "labels", H5T_STD_I32LE, 1, dl, sh)) ||
            (st = vds_dset_create(f, path, "done", H5T_STD_U8LE, 1, dd, sh)))
            goto done;
    }
    H5_CHECK(H5Fflush(f, H5F_SCOPE_LOCAL), "H5Fflush");
    if (sync && (st = file_fsync(f, path)) != KD_OK)
        goto done;
    herr_t rc = H5Fclose(f);
    f = H5I_INVALID_HID;
    H5_CHECK(rc, "H5Fclose");
done:
    close_id(&f, H5Fclose);
    return st;
}

/* Open the built VDS file at tmp as a reader would and check it with its shards. */
static kd_status vds_verify(const char *tmp, const char *vds_dir, const kd_cache_meta *want)
{
    kd_status st = KD_OK;
    const char *path = tmp;
    hid_t f = H5I_INVALID_HID;
    kd_cache_meta m;
    cache_dsets ds;
    vds_shards sh = {0};
    dsets_init(&ds);
    H5_CHECK(f = H5Fopen(tmp, H5F_ACC_RDONLY, H5P_DEFAULT), "H5Fopen");
    if ((st = meta_read(f, tmp, &m)) != KD_OK ||
        (st = dsets_open(f, tmp, &m, vds_dir, &ds)) != KD_OK ||
        (st = vds_check(tmp, &m, &ds, vds_dir, &sh)) != KD_OK)
        goto done;
    char va[80], vb[80];
    const char *field = meta_diff(&m, want, va, vb, sizeof va);
    if (field || m.row_begin != 0 || m.row_end != m.num_samples)
        st = KD_FAIL(KD_ERR_INTERNAL, "cache '%s': the VDS file written has %s %s, wanted %s", tmp,
                     field ? field : "a row range other than [0, N)", field ? va : "",
                     field ? vb : "");
done:
    dsets_close(&ds);
    close_id(&f, H5Fclose);
    shards_free(&sh);
    return st;
}

kd_status kd_cache_vds_write(const char *path, const kd_cache_meta *meta, int nshards,
                             const char *const *shards, int sync)
{
    h5_quiet();
    if (!path || !*path || !meta || nshards < 1 || !shards)
        return KD_FAIL(KD_ERR_INVALID, "kd_cache_vds_write: no path, metadata or shards");
    kd_cache_meta m = *meta;
    if (m.chunk_rows == 0)
        m.chunk_rows = KD_CACHE_DEFAULT_CHUNK_ROWS;
    m.row_begin = 0;
    m.row_end = m.num_samples;
    KD_TRY(meta_validate(&m, path));
    kd_status st = KD_OK;
    vds_shards sh = {0};
    char dir[4096], sdir[4096], absdir[4096];
    char *tmp = NULL;
    kd_path_dir(path, dir, sizeof dir);
    if ((st = abs_dir_of(path, absdir, sizeof absdir)) != KD_OK)
        goto done;
    for (int i = 0; i < nshards; i++) {
        kd_path_dir(shards[i], sdir, sizeof sdir);
        if (strcmp(dir, sdir) != 0) {
            st = KD_FAIL(KD_ERR_INVALID,
                         "cache '%s': shard '%s' is not in the VDS file's directory '%s'", path,
                         shards[i], dir);
            goto done;
        }
        const char *base = strrchr(shards[i], '/');
        int k = shards_add(&sh, base ? base + 1 : shards[i], shards[i]);
        if (k < 0) {
            st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
            goto done;
        }
        if ((st = shard_open(path, &m, &sh.v[k])) != KD_OK)
            goto done;
        int64_t expect = k ? sh.v[k - 1].meta.row_end : 0;
        if (sh.v[k].meta.row_begin != expect) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s': shard '%s' holds rows [%lld, %lld), the shards before it end "
                         "at row %lld",
                         path, shards[i], (long long)sh.v[k].meta.row_begin,
                         (long long)sh.v[k].meta.row_end, (long long)expect);
            goto done;
        }
    }
    if (sh.v[sh.n - 1].meta.row_end != m.num_samples) {
        st = KD_FAIL(KD_ERR_FORMAT, "cache '%s': the shards end at row %lld of %lld", path,
                     (long long)sh.v[sh.n - 1].meta.row_end, (long long)m.num_samples);
        goto done;
    }
    /* The shards are checked; HDF5 opens them itself through the VDS file from here on. */
    for (int i = 0; i < sh.n; i++)
        close_id(&sh.v[i].fid, H5Fclose);
    if (!(tmp = tmp_name(path))) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    if ((st = vds_build(tmp, &m, &sh, sync)) != KD_OK ||
        (st = vds_verify(tmp, absdir, &m)) != KD_OK)
        goto done;
    st = rename_into_place(tmp, path, sync);
done:
    if (st != KD_OK && tmp)
        unlink(tmp);
    free(tmp);
    shards_free(&sh);
    if (st != KD_OK && !strstr(kd_last_error(), path))
        kd_fail_context(st, "writing the VDS file '%s': ", path);
    return st;
}

/*
 * Read back every chunk of shard sh (checked and held open by vds_check) of the sharded cache
 * at vds_path; a chunk that cannot be read is KD_ERR_FORMAT naming both files.
 */
static kd_status shard_scan(const char *vds_path, vds_shard *sh)
{
    cache_dsets ds;
    kd_cache_meta m = sh->meta;
    chunk_scan sc;
    kd_status st = dsets_open(sh->fid, sh->file, &m, NULL, &ds);
    if (st == KD_OK && (st = chunks_scan(&ds, &m, NULL, 0, sh->file, &sc)) == KD_OK && sc.nbad) {
        char found[1200];
        scan_text(&sc, &m, found, sizeof found);
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s' is sharded and its shard '%s' is damaged: %s; rerun `distill "
                     "cache` with the same config and the same number of ranks to compute them "
                     "again",
                     vds_path, sh->file, found);
    }
    dsets_close(&ds);
    return st;
}

kd_status kd_cache_inspect(const char *path, int scan_file, kd_cache_info *info)
{
    memset(info, 0, sizeof *info);
    h5_quiet();
    if (!path || !*path)
        return KD_FAIL(KD_ERR_INVALID, "kd_cache_inspect: no path");
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (errno != ENOENT)
            return KD_FAIL(KD_ERR_IO, "cache '%s' cannot be read: %s", path, strerror(errno));
        char partial[4200];
        snprintf(partial, sizeof partial, "%s.partial", path);
        info->partial = stat(partial, &sb) == 0;
        return KD_OK;
    }
    info->exists = 1;
    kd_status st = KD_OK;
    char absdir[4096];
    cache_dsets ds;
    vds_shards sh = {0};
    uint8_t *done = NULL;
    dsets_init(&ds);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return open_fail(path, 0, 0, "the file is damaged or not HDF5: delete it to start over");
    if ((st = meta_read(f, path, &info->meta)) != KD_OK ||
        (st = abs_dir_of(path, absdir, sizeof absdir)) != KD_OK ||
        (st = dsets_open(f, path, &info->meta, absdir, &ds)) != KD_OK)
        goto done;
    info->chunks = div_up(info->meta.num_samples, info->meta.chunk_rows);
    int v = dset_is_virtual(ds.main);
    if (v < 0) {
        st = H5_FAIL(KD_ERR_FORMAT, path, "H5Dget_create_plist");
        goto done;
    }
    if (v) {
        info->sharded = 1;
        st = vds_check(path, &info->meta, &ds, absdir, &sh);
        info->shard_world = sh.world;
        info->nshards = sh.n;
        for (int i = 0; st == KD_OK && i < sh.n; i++)
            st = shard_scan(path, &sh.v[i]);
        goto done;
    }
    int64_t nch = meta_chunks(&info->meta);
    if (!(done = malloc((size_t)nch))) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    if ((st = read_done(ds.done, nch, done, path, NULL)))
        goto done;
    for (int64_t i = 0; i < nch; i++)
        info->chunks_missing += done[i] == 0;
    chunk_scan sc;
    if (scan_file && (st = chunks_scan(&ds, &info->meta, done, 0, path, &sc)) == KD_OK && sc.nbad) {
        char found[1200];
        scan_text(&sc, &info->meta, found, sizeof found);
        st = KD_FAIL(KD_ERR_FORMAT,
                     "cache '%s' is damaged: %s; `distill cache` with the same config, run by one "
                     "process (without mpirun), computes them again",
                     path, found);
    }
done:
    free(done);
    dsets_close(&ds);
    close_id(&f, H5Fclose);
    shards_free(&sh);
    return st;
}

kd_status kd_cache_meta_compare(const char *path, const kd_cache_meta *have,
                                const kd_cache_meta *want)
{
    kd_cache_meta w = *want;
    if (w.chunk_rows == 0)
        w.chunk_rows = KD_CACHE_DEFAULT_CHUNK_ROWS;
    if (w.row_begin == 0 && w.row_end == 0)
        w.row_end = w.num_samples;
    return meta_compare_resume(path, have, &w);
}

/* ---- reader ------------------------------------------------------------------------------- */

/* n rows in the in-memory layout (see the file comment). */
typedef struct {
    int64_t cap;
    uint8_t *main;
    int32_t *idx;
    float *lse;
    float *aug;
    int32_t *lab;
} rowbuf;

typedef struct {
    pthread_t th;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t *order;
    int64_t n, slot_rows, nseg, pos;
    int nslots;
    rowbuf *slots;
    int64_t *slot_seg; /* segment a slot holds; -1 free */
    int stop;
    kd_status err;
    int64_t err_seg;
    char errmsg[2048];
    rowbuf chunk;      /* producer only */
    int64_t *sorted;   /* producer only: positions of a segment grouped by chunk */
    int64_t *bucket;   /* producer only: nchunks + 1 counters */
    int64_t cur_chunk; /* producer only: chunk held in `chunk`, -1 none */
} kd_stream;

struct kd_cache {
    char *path;
    hid_t file;
    cache_dsets ds;
    kd_cache_meta meta;
    kd_cache_expect opts;
    int64_t nchunks;
    int W, V, K, P;
    size_t esize;
    int in_memory;
    vds_shards shards; /* a sharded cache: its shard files, held open; else empty */
    rowbuf all;        /* in memory: every row */
    float *widen;      /* 2 W floats: one float16 row widened by row_emit, and a view mean */
    /* top-k checks of rows_check, run by one thread at a time (kd_cache_open, then the
     * prefetch thread): K floats (float16 values widened) and C class stamps */
    float *chk_vals;
    uint32_t *chk_seen, chk_stamp;
    /* the augment attribute's crop_pad and hflip, which every view's aug_params must follow;
     * aug_pad -1 when the attribute is unknown ("") */
    int aug_pad, aug_flip;
    kd_stream *stream;
};

static void rowbuf_free(rowbuf *b)
{
    free(b->main);
    free(b->idx);
    free(b->lse);
    free(b->aug);
    free(b->lab);
    memset(b, 0, sizeof *b);
}

static int rowbuf_alloc(const kd_cache *c, rowbuf *b, int64_t rows)
{
    size_t r = (size_t)rows, v = (size_t)c->V;
    memset(b, 0, sizeof *b);
    b->cap = rows;
    b->main = malloc(r * v * (size_t)c->W * c->esize);
    b->aug = malloc(r * v * (size_t)c->P * sizeof(float));
    b->lab = malloc(r * sizeof(int32_t));
    if (c->K) {
        b->idx = malloc(r * v * (size_t)c->K * sizeof(int32_t));
        b->lse = malloc(r * v * sizeof(float));
    }
    if (!b->main || !b->aug || !b->lab || (c->K && (!b->idx || !b->lse))) {
        rowbuf_free(b);
        return -1;
    }
    return 0;
}

static size_t row_bytes(const kd_cache *c)
{
    size_t v = (size_t)c->V;
    return v * c->W * c->esize + v * c->P * 4 + 4 + (c->K ? v * c->K * 4 + v * 4 : 0);
}

/* Stored values finite, indices and labels in range, each top-k entry consistent
 * (topk_entry_bad), for rows [j0, j0+R) of b (global g0). */
static kd_status rows_check(kd_cache *c, const rowbuf *b, int64_t j0, int64_t R, int64_t g0)
{
    const char *what = c->K ? "top-k value" : "logit";
    size_t per = (size_t)c->V * c->W;
    for (int64_t r = 0; r < R; r++) {
        size_t base = (size_t)(j0 + r) * per;
        for (size_t e = 0; e < per; e++) {
            int bad;
            double val = 0;
            if (c->esize == 2) {
                uint16_t h = ((const uint16_t *)b->main)[base + e];
                bad = (h & 0x7c00) == 0x7c00;
                if (bad)
                    val = kd_f16_to_f32(h);
            } else {
                val = ((const float *)b->main)[base + e];
                bad = !isfinite(val);
            }
            if (bad)
                return KD_FAIL(KD_ERR_FORMAT,
                               "cache '%s' holds a non-finite %s (%g) at row %lld view %d class "
                               "slot %d: the teacher's output was not finite; rebuild the cache "
                               "with `distill cache`",
                               c->path, what, val, (long long)(g0 + r), (int)(e / c->W),
                               (int)(e % c->W));
        }
        if (c->K) {
            for (int v = 0; v < c->V; v++) {
                float l = b->lse[(size_t)(j0 + r) * c->V + v];
                if (!isfinite(l))
                    return KD_FAIL(KD_ERR_FORMAT,
                                   "cache '%s' holds a non-finite logsumexp (%g) at row %lld view "
                                   "%d; rebuild the cache with `distill cache`",
                                   c->path, (double)l, (long long)(g0 + r), v);
                const int32_t *ix = b->idx + ((size_t)(j0 + r) * c->V + v) * c->K;
                for (int k = 0; k < c->K; k++)
                    if (ix[k] < 0 || ix[k] >= c->meta.num_classes)
                        return KD_FAIL(KD_ERR_FORMAT,
                                       "cache '%s': top-k index %d at row %lld view %d is outside "
                                       "[0, %d)",
                                       c->path, ix[k], (long long)(g0 + r), v, c->meta.num_classes);
                const size_t vi = (size_t)(j0 + r) * c->V + v;
                const float *vals = (const float *)b->main + vi * c->K;
                if (c->esize == 2) {
                    const uint16_t *h = (const uint16_t *)b->main + vi * c->K;
                    for (int k = 0; k < c->K; k++)
                        c->chk_vals[k] = kd_f16_to_f32(h[k]);
                    vals = c->chk_vals;
                }
                char why[256];
                if (topk_entry_bad(vals, ix, l, c->K, c->meta.num_classes, c->esize == 2,
                                   c->chk_seen, &c->chk_stamp, why, sizeof why))
                    return KD_FAIL(KD_ERR_FORMAT,
                                   "cache '%s' holds an invalid top-k entry at row %lld view %d: "
                                   "%s; rebuild the cache with `distill cache`",
                                   c->path, (long long)(g0 + r), v, why);
            }
        }
        const float *aug = b->aug + (size_t)(j0 + r) * c->V * c->P;
        for (int e = 0; e < c->V * c->P; e++) {
            if (!isfinite(aug[e]))
                return KD_FAIL(KD_ERR_FORMAT,
                               "cache '%s' holds a non-finite augmentation parameter (%g) at row "
                               "%lld view %d parameter %d; rebuild the cache with `distill cache`",
                               c->path, (double)aug[e], (long long)(g0 + r), e / c->P, e % c->P);
            /* a known augmentation's views, as kd_augment_apply reads them: shifts that round
             * within crop_pad, a flip in [0, 1] (>= 0.5 flips) and none without hflip; anything
             * else is not a view the teacher was given */
            const int k = e % c->P;
            const double v = aug[e];
            if (c->aug_pad >= 0 && c->P == KD_AUG_NPARAMS &&
                (k < 2 ? fabs(nearbyint(v)) > c->aug_pad
                       : v < 0 || v > 1 || (!c->aug_flip && v >= 0.5)))
                return KD_FAIL(KD_ERR_FORMAT,
                               "cache '%s' holds augmentation parameter %d = %g at row %lld view "
                               "%d, which its augment attribute '%s' never draws (shifts within "
                               "crop_pad, a flip in [0, 1] and only with hflip); the file is "
                               "damaged: rebuild the cache with `distill cache`",
                               c->path, k, v, (long long)(g0 + r), e / c->P, c->meta.augment);
        }
        int32_t y = b->lab[j0 + r];
        if (y < 0 || y >= c->meta.num_classes)
            return KD_FAIL(KD_ERR_FORMAT, "cache '%s': label %d at row %lld is outside [0, %d)",
                           c->path, y, (long long)(g0 + r), c->meta.num_classes);
        if (c->opts.labels && y != c->opts.labels[g0 + r])
            return KD_FAIL(KD_ERR_CONFIG,
                           "cache '%s': row %lld holds label %d, the job's training sample %lld "
                           "has label %d: the cache was written for other data or another sample "
                           "order; rebuild it with `distill cache`",
                           c->path, (long long)(g0 + r), y, (long long)(g0 + r),
                           c->opts.labels[g0 + r]);
    }
    return KD_OK;
}

/* Read file rows [r0, r0+R) into b at row j0, then check them. HDF5 calls only. */
static kd_status rows_load(kd_cache *c, rowbuf *b, int64_t j0, int64_t r0, int64_t R)
{
    size_t v = (size_t)c->V, j = (size_t)j0;
    hid_t mt = c->esize == 2 ? f16_type() : H5T_NATIVE_FLOAT;
    const char *bad = NULL;
    if (dset_rows_io(c->ds.main, 0, mt, r0, R, b->main + j * v * c->W * c->esize) < 0)
        bad = c->K ? "topk_values" : "logits";
    else if (c->K && dset_rows_io(c->ds.idx, 0, H5T_NATIVE_INT32, r0, R, b->idx + j * v * c->K) < 0)
        bad = "topk_indices";
    else if (c->K && dset_rows_io(c->ds.lse, 0, H5T_NATIVE_FLOAT, r0, R, b->lse + j * v) < 0)
        bad = "logsumexp";
    else if (dset_rows_io(c->ds.aug, 0, H5T_NATIVE_FLOAT, r0, R, b->aug + j * v * c->P) < 0)
        bad = "aug_params";
    else if (dset_rows_io(c->ds.lab, 0, H5T_NATIVE_INT32, r0, R, b->lab + j) < 0)
        bad = "labels";
    if (bad) {
        char d[700];
        h5_detail(d, sizeof d);
        return KD_FAIL(KD_ERR_FORMAT,
                       "cache '%s': rows %lld..%lld of /%s cannot be read (H5Dread failed: %s): "
                       "the cache is damaged (a checksum fails or the data cannot be decoded); "
                       "run `distill cache` again with the same config%s, which finds the chunks "
                       "that cannot be read and computes them again, or delete the cache and "
                       "write it anew",
                       c->path, (long long)(c->meta.row_begin + r0),
                       (long long)(c->meta.row_begin + r0 + R - 1), bad, d,
                       c->shards.n ? " and the same number of ranks" : "");
    }
    return rows_check(c, b, j0, R, c->meta.row_begin + r0);
}

static void row_copy(const kd_cache *c, rowbuf *dst, int64_t jd, const rowbuf *src, int64_t js)
{
    size_t v = (size_t)c->V;
    memcpy(dst->main + (size_t)jd * v * c->W * c->esize,
           src->main + (size_t)js * v * c->W * c->esize, v * c->W * c->esize);
    memcpy(dst->aug + (size_t)jd * v * c->P, src->aug + (size_t)js * v * c->P,
           v * c->P * sizeof(float));
    dst->lab[jd] = src->lab[js];
    if (c->K) {
        memcpy(dst->idx + (size_t)jd * v * c->K, src->idx + (size_t)js * v * c->K,
               v * c->K * sizeof(int32_t));
        memcpy(dst->lse + (size_t)jd * v, src->lse + (size_t)js * v, v * sizeof(float));
    }
}

/* The stored values of view slot vi of buffer b as floats (float16 widened into c->widen). */
static const float *row_vals(kd_cache *c, const rowbuf *b, size_t vi)
{
    if (c->esize == 4)
        return (const float *)b->main + vi * c->W;
    const uint16_t *h = (const uint16_t *)b->main + vi * c->W;
    for (int k = 0; k < c->W; k++)
        c->widen[k] = kd_f16_to_f32(h[k]);
    return c->widen;
}

/* Write row j of b, view `view` (or the views' mean), into output slot i (outputs may be
 * NULL). */
static void row_emit(kd_cache *c, const rowbuf *b, int64_t j, int view, int i, float *lo, float *tv,
                     int32_t *ti, float *lse_out, float *ao, int32_t *yo)
{
    int C = c->meta.num_classes, K = c->K;
    const int mean = view == KD_CACHE_VIEW_MEAN; /* full logits only (kd_cache_get_rows checks) */
    size_t vi = mean ? 0 : (size_t)j * c->V + view;
    const float *vals;
    if (mean) {
        float *m = c->widen + c->W;
        for (int k = 0; k < C; k++)
            m[k] = 0.0f;
        for (int v = 0; v < c->V; v++) {
            const float *r = row_vals(c, b, (size_t)j * c->V + v);
            for (int k = 0; k < C; k++)
                m[k] += r[k];
        }
        for (int k = 0; k < C; k++)
            m[k] /= (float)c->V;
        vals = m;
    } else {
        vals = row_vals(c, b, vi);
    }
    if (!K) {
        if (lo)
            memcpy(lo + (size_t)i * C, vals, (size_t)C * sizeof(float));
        if (lse_out)
            lse_out[i] = (float)row_lse(vals, C);
    } else {
        const int32_t *ix = b->idx + vi * K;
        double l = b->lse[vi];
        if (tv)
            memcpy(tv + (size_t)i * K, vals, (size_t)K * sizeof(float));
        if (ti)
            memcpy(ti + (size_t)i * K, ix, (size_t)K * sizeof(int32_t));
        if (lse_out)
            lse_out[i] = (float)l;
        if (lo) {
            float *row = lo + (size_t)i * C;
            if (K < C) {
                /* The probability mass outside the top-k, spread evenly over the other classes. */
                double mass = 0.0;
                for (int k = 0; k < K; k++)
                    mass += exp((double)vals[k] - l);
                double rest = 1.0 - mass;
                if (rest < 1e-12)
                    rest = 1e-12;
                float tail = (float)(l + log(rest / (C - K)));
                for (int k = 0; k < C; k++)
                    row[k] = tail;
            }
            for (int k = 0; k < K; k++)
                row[ix[k]] = vals[k];
        }
    }
    if (ao && mean) /* the unaugmented image */
        memset(ao + (size_t)i * c->P, 0, (size_t)c->P * sizeof(float));
    else if (ao)
        memcpy(ao + (size_t)i * c->P, b->aug + vi * c->P, (size_t)c->P * sizeof(float));
    if (yo)
        yo[i] = b->lab[j];
}

static kd_status expect_check(const char *path, const kd_cache_meta *m, const kd_cache_expect *e)
{
    if (e->num_samples >= 0 && e->num_samples != m->num_samples)
        return KD_FAIL(KD_ERR_SHAPE, "cache '%s' was written for %lld samples, the job has %lld",
                       path, (long long)m->num_samples, (long long)e->num_samples);
    if (e->num_classes >= 0 && e->num_classes != m->num_classes)
        return KD_FAIL(KD_ERR_SHAPE, "cache '%s' was written for %d classes, the job has %d", path,
                       m->num_classes, e->num_classes);
    if (e->views >= 0 && e->views != m->views)
        return KD_FAIL(KD_ERR_SHAPE,
                       "cache '%s' holds %d view(s) per sample, the job asks for %d views", path,
                       m->views, e->views);
    if (e->topk >= 0 && e->topk != m->topk)
        return KD_FAIL(KD_ERR_SHAPE,
                       "cache '%s' stores topk %d (0 = full logits), the job asks for topk %d",
                       path, m->topk, e->topk);
    if (e->aug_nparams >= 0 && e->aug_nparams != m->aug_nparams)
        return KD_FAIL(KD_ERR_SHAPE,
                       "cache '%s' stores %d augmentation parameters per view, the job uses %d",
                       path, m->aug_nparams, e->aug_nparams);
    if (e->dtype >= 0 && e->dtype != (int)m->dtype)
        return KD_FAIL(KD_ERR_CONFIG, "cache '%s' stores %s, the job asks for %s", path,
                       dtype_str(m->dtype), dtype_str((kd_dtype)e->dtype));
    /* compared only when both sides have one (data/README.md): a cache written outside distill
     * may leave them empty */
    if (e->teacher_sha256[0] && m->teacher_sha256[0] &&
        strcmp(e->teacher_sha256, m->teacher_sha256) != 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' was written by teacher sha256 '%s', the job's teacher has "
                       "sha256 '%s': rebuild it with `distill cache`",
                       path, m->teacher_sha256, e->teacher_sha256);
    if (e->dataset_sha256[0] && m->dataset_sha256[0] &&
        strcmp(e->dataset_sha256, m->dataset_sha256) != 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' was written for dataset sha256 '%s', the job's dataset has "
                       "sha256 '%s': rebuild it with `distill cache`",
                       path, m->dataset_sha256, e->dataset_sha256);
    /* the student trains on the cached views (their /aug_params), whatever the job's
     * data.augment says: a different augmentation is refused rather than silently replaced */
    if (augment_differs(e->augment, m->augment))
        return KD_FAIL(KD_ERR_CONFIG,
                       "cache '%s' holds views augmented '%s', the job's data.augment is '%s': "
                       "the student would train on the cached views, not the job's; rebuild the "
                       "cache with `distill cache` or set data.augment to match",
                       path, m->augment, e->augment);
    return KD_OK;
}

kd_status kd_cache_open(const char *path, const kd_cache_expect *expect, kd_cache **out)
{
    *out = NULL;
    h5_quiet();
    if (!path || !*path)
        return KD_FAIL(KD_ERR_INVALID, "kd_cache_open: no path");
    kd_cache_expect e;
    if (expect)
        e = *expect;
    else
        kd_cache_expect_init(&e);
    struct stat sb;
    if (stat(path, &sb) != 0 && errno == ENOENT) {
        char partial[4200];
        snprintf(partial, sizeof partial, "%s.partial", path);
        if (stat(partial, &sb) == 0)
            return KD_FAIL(KD_ERR_FORMAT,
                           "cache '%s' is not finished: '%s' holds the chunks written so far; "
                           "rerun `distill cache` with the same config to finish it",
                           path, partial);
        errno = ENOENT;
    }
    if (stat(path, &sb) != 0)
        return KD_FAIL(errno == ENOENT ? KD_ERR_NOT_FOUND : KD_ERR_IO,
                       "cache '%s' cannot be read: %s", path, strerror(errno));

    kd_status st = KD_OK;
    kd_cache *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup(path))) {
        free(c);
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
    }
    dsets_init(&c->ds);
    c->opts = e;
    c->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (c->file < 0) {
        st = open_fail(path, 0, 0,
                       "the file is damaged or not HDF5 (truncated or partly copied?): rebuild it "
                       "with `distill cache`");
        goto done;
    }
    if ((st = meta_read(c->file, path, &c->meta)) != KD_OK)
        goto done;
    if (c->meta.row_begin != 0 || c->meta.row_end != c->meta.num_samples) {
        st = KD_FAIL(KD_ERR_UNSUPPORTED,
                     "cache '%s' is a shard holding rows [%lld, %lld) of %lld; open the "
                     "cache's VDS file that stitches the shards (the name without "
                     "'.shard-R-of-W')",
                     path, (long long)c->meta.row_begin, (long long)c->meta.row_end,
                     (long long)c->meta.num_samples);
        goto done;
    }
    char vds_dir[4096];
    if ((st = abs_dir_of(path, vds_dir, sizeof vds_dir)) != KD_OK ||
        (st = dsets_open(c->file, path, &c->meta, vds_dir, &c->ds)) != KD_OK ||
        (st = expect_check(path, &c->meta, &e)) != KD_OK ||
        (st = vds_check(path, &c->meta, &c->ds, vds_dir, &c->shards)) != KD_OK)
        goto done;
    c->nchunks = meta_chunks(&c->meta);
    c->V = c->meta.views;
    c->W = meta_width(&c->meta);
    c->K = c->meta.topk;
    c->P = c->meta.aug_nparams;
    c->esize = meta_esize(&c->meta);
    if (!augment_parse(c->meta.augment, &c->aug_pad, &c->aug_flip))
        c->aug_pad = -1;
    if (!(c->widen = malloc(2 * (size_t)c->W * sizeof(float))) ||
        (c->K && (!(c->chk_vals = malloc((size_t)c->K * sizeof(float))) ||
                  !(c->chk_seen = calloc((size_t)c->meta.num_classes, sizeof(uint32_t)))))) {
        st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
        goto done;
    }
    {
        uint8_t *done = malloc((size_t)c->nchunks);
        if (!done) {
            st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", path);
            goto done;
        }
        if ((st = read_done(c->ds.done, c->nchunks, done, path, NULL))) {
            free(done);
            goto done;
        }
        int64_t missing = 0, first = -1;
        for (int64_t i = 0; i < c->nchunks; i++)
            if (!done[i]) {
                missing++;
                if (first < 0)
                    first = i;
            }
        free(done);
        if (missing) {
            int64_t r0 = first * c->meta.chunk_rows;
            int64_t r1 = r0 + c->meta.chunk_rows < c->meta.num_samples ? r0 + c->meta.chunk_rows
                                                                       : c->meta.num_samples;
            st = KD_FAIL(KD_ERR_FORMAT,
                         "cache '%s' is incomplete: %lld of %lld chunks are missing (first: chunk "
                         "%lld, rows %lld..%lld); run `distill cache` with the same settings to "
                         "resume it",
                         path, (long long)missing, (long long)c->nchunks, (long long)first,
                         (long long)r0, (long long)(r1 - 1));
            goto done;
        }
    }
    int64_t limit = e.memory_limit == 0 ? KD_CACHE_DEFAULT_MEMORY_LIMIT : e.memory_limit;
    int64_t need = (int64_t)row_bytes(c) * c->meta.num_samples;
    if (limit >= 0 && need <= limit) {
        if (rowbuf_alloc(c, &c->all, c->meta.num_samples) != 0) {
            st = KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory holding %lld bytes", path,
                         (long long)need);
            goto done;
        }
        for (int64_t i = 0; i < c->nchunks && st == KD_OK; i++) {
            int64_t r0 = i * c->meta.chunk_rows;
            int64_t R = c->meta.num_samples - r0 < c->meta.chunk_rows ? c->meta.num_samples - r0
                                                                      : c->meta.chunk_rows;
            st = rows_load(c, &c->all, r0, r0, R);
        }
        if (st != KD_OK)
            goto done;
        c->in_memory = 1;
    }
done:
    if (st != KD_OK) {
        kd_cache_close(c);
        return st;
    }
    *out = c;
    return KD_OK;
}

const kd_cache_meta *kd_cache_meta_of(const kd_cache *c) { return &c->meta; }

int kd_cache_in_memory(const kd_cache *c) { return c->in_memory; }

/* ---- streaming ---------------------------------------------------------------------------- */

/* Fill ring slot `slot` with the rows of segment seg; producer thread only. */
static kd_status stream_fill(kd_cache *c, kd_stream *s, int64_t seg, rowbuf *slot)
{
    int64_t p0 = seg * s->slot_rows, p1 = p0 + s->slot_rows < s->n ? p0 + s->slot_rows : s->n;
    int64_t m = p1 - p0, cr = c->meta.chunk_rows;
    /* Positions grouped by chunk (a counting sort, stable), so each chunk the segment
     * touches is read once. */
    memset(s->bucket, 0, (size_t)(c->nchunks + 1) * sizeof *s->bucket);
    for (int64_t i = p0; i < p1; i++)
        s->bucket[s->order[i] / cr + 1]++;
    for (int64_t k = 0; k < c->nchunks; k++)
        s->bucket[k + 1] += s->bucket[k];
    for (int64_t i = p0; i < p1; i++)
        s->sorted[s->bucket[s->order[i] / cr]++] = i;
    for (int64_t i = 0; i < m; i++) {
        int64_t pos = s->sorted[i];
        int64_t row = s->order[pos], ch = row / c->meta.chunk_rows;
        if (ch != s->cur_chunk) {
            int64_t r0 = ch * c->meta.chunk_rows;
            int64_t R = c->meta.num_samples - r0 < c->meta.chunk_rows ? c->meta.num_samples - r0
                                                                      : c->meta.chunk_rows;
            s->cur_chunk = -1;
            KD_TRY(rows_load(c, &s->chunk, 0, r0, R));
            s->cur_chunk = ch;
        }
        row_copy(c, slot, pos - p0, &s->chunk, row - s->cur_chunk * c->meta.chunk_rows);
        if (s->stop)
            return KD_ERR_INTERRUPTED;
    }
    return KD_OK;
}

static void *stream_main(void *arg)
{
    kd_cache *c = arg;
    kd_stream *s = c->stream;
    h5_quiet();
    for (int64_t seg = 0; seg < s->nseg; seg++) {
        int slot = (int)(seg % s->nslots);
        pthread_mutex_lock(&s->mu);
        while (s->slot_seg[slot] != -1 && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        int stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        kd_status st = stream_fill(c, s, seg, &s->slots[slot]);
        pthread_mutex_lock(&s->mu);
        if (st != KD_OK) {
            if (!s->stop) {
                s->err = st;
                s->err_seg = seg;
                snprintf(s->errmsg, sizeof s->errmsg, "%s", kd_last_error());
            }
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            break;
        }
        s->slot_seg[slot] = seg;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

static void stream_free(const kd_cache *c, kd_stream *s)
{
    if (!s)
        return;
    if (s->slots)
        for (int i = 0; i < s->nslots; i++)
            rowbuf_free(&s->slots[i]);
    rowbuf_free(&s->chunk);
    free(s->slots);
    free(s->slot_seg);
    free(s->sorted);
    free(s->bucket);
    free(s->order);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

void kd_cache_stream_end(kd_cache *c)
{
    kd_stream *s = c ? c->stream : NULL;
    if (!s)
        return;
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
    }
    stream_free(c, s);
    c->stream = NULL;
}

kd_status kd_cache_stream_begin(kd_cache *c, const uint32_t *order, int64_t n)
{
    if (c->in_memory)
        return KD_OK;
    kd_cache_stream_end(c);
    if (n < 1 || !order)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': empty stream order", c->path);
    for (int64_t i = 0; i < n; i++)
        if (order[i] >= (uint64_t)c->meta.num_samples)
            return KD_FAIL(KD_ERR_INVALID,
                           "cache '%s': stream order position %lld names row %u, the cache has "
                           "%lld rows",
                           c->path, (long long)i, order[i], (long long)c->meta.num_samples);
    kd_stream *s = calloc(1, sizeof *s);
    if (!s)
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory", c->path);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->n = n;
    s->nslots = c->opts.prefetch_slots > 0 ? c->opts.prefetch_slots : 4;
    /* a chunk holds at most the cache's rows, whatever chunk_rows a writer chose */
    const int64_t cr =
        c->meta.chunk_rows < c->meta.num_samples ? c->meta.chunk_rows : c->meta.num_samples;
    s->slot_rows = c->opts.slot_rows > 0 ? c->opts.slot_rows : 4 * cr;
    if (s->slot_rows > n)
        s->slot_rows = n;
    s->nseg = div_up(n, s->slot_rows);
    s->cur_chunk = -1;
    s->order = malloc((size_t)n * sizeof *order);
    s->slots = calloc((size_t)s->nslots, sizeof *s->slots);
    s->slot_seg = malloc((size_t)s->nslots * sizeof *s->slot_seg);
    s->sorted = malloc((size_t)s->slot_rows * sizeof *s->sorted);
    s->bucket = malloc((size_t)(c->nchunks + 1) * sizeof *s->bucket);
    int bad = !s->order || !s->slots || !s->slot_seg || !s->sorted || !s->bucket ||
              rowbuf_alloc(c, &s->chunk, cr) != 0;
    for (int i = 0; !bad && i < s->nslots; i++) {
        bad = rowbuf_alloc(c, &s->slots[i], s->slot_rows) != 0;
        s->slot_seg[i] = -1;
    }
    if (bad) {
        stream_free(c, s);
        return KD_FAIL(KD_ERR_NOMEM, "cache '%s': out of memory for the prefetch ring", c->path);
    }
    memcpy(s->order, order, (size_t)n * sizeof *order);
    c->stream = s;
    if (pthread_create(&s->th, NULL, stream_main, c) != 0) {
        c->stream = NULL;
        stream_free(c, s);
        return KD_FAIL(KD_ERR_INTERNAL, "cache '%s': cannot start the prefetch thread", c->path);
    }
    s->started = 1;
    return KD_OK;
}

static kd_status stream_get(kd_cache *c, const uint32_t *rows, int count, int view, float *lo,
                            float *tv, int32_t *ti, float *lse, float *ao, int32_t *yo)
{
    kd_stream *s = c->stream;
    if (!s)
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s' is streamed (larger than the memory limit): call "
                       "kd_cache_stream_begin with the epoch's order first",
                       c->path);
    if (s->pos + count > s->n)
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s': the stream order has %lld rows, %lld consumed, %d asked for; "
                       "begin a new stream for the next epoch",
                       c->path, (long long)s->n, (long long)s->pos, count);
    for (int i = 0; i < count; i++)
        if (rows[i] != s->order[s->pos + i])
            return KD_FAIL(KD_ERR_INVALID,
                           "cache '%s' is streamed in the order given to kd_cache_stream_begin: "
                           "position %lld should be row %u, got row %u",
                           c->path, (long long)(s->pos + i), s->order[s->pos + i], rows[i]);
    int i = 0;
    while (i < count) {
        int64_t pos = s->pos, seg = pos / s->slot_rows;
        int slot = (int)(seg % s->nslots);
        pthread_mutex_lock(&s->mu);
        while (s->slot_seg[slot] != seg && !(s->err != KD_OK && s->err_seg <= seg))
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->slot_seg[slot] != seg) {
            kd_status err = s->err;
            char msg[sizeof s->errmsg];
            memcpy(msg, s->errmsg, sizeof msg);
            pthread_mutex_unlock(&s->mu);
            kd_clear_error();
            return kd_fail_context(err, "%s", msg);
        }
        pthread_mutex_unlock(&s->mu);
        int64_t seg_end = (seg + 1) * s->slot_rows < s->n ? (seg + 1) * s->slot_rows : s->n;
        int64_t take = seg_end - pos < count - i ? seg_end - pos : count - i;
        for (int64_t k = 0; k < take; k++, i++)
            row_emit(c, &s->slots[slot], pos + k - seg * s->slot_rows, view, i, lo, tv, ti, lse, ao,
                     yo);
        s->pos += take;
        if (s->pos == seg_end) {
            pthread_mutex_lock(&s->mu);
            s->slot_seg[slot] = -1;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
        }
    }
    return KD_OK;
}

kd_status kd_cache_get_rows(kd_cache *c, const uint32_t *rows, int count, int view,
                            float *logits_out, float *topk_values_out, int32_t *topk_indices_out,
                            float *lse_out, float *aug_params_out, int32_t *labels_out)
{
    if (view == KD_CACHE_VIEW_MEAN && c->K)
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s' stores the top %d logits of each view: their mean over views "
                       "needs full logits (write the cache with teacher.topk: 0)",
                       c->path, c->K);
    if ((view < 0 || view >= c->V) && view != KD_CACHE_VIEW_MEAN)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': view %d is outside [0, %d)", c->path, view,
                       c->V);
    if (!c->K && (topk_values_out || topk_indices_out))
        return KD_FAIL(KD_ERR_INVALID,
                       "cache '%s' stores full logits: ask for logits, not top-k values", c->path);
    if (count < 0)
        return KD_FAIL(KD_ERR_INVALID, "cache '%s': negative row count", c->path);
    if (!c->in_memory)
        return stream_get(c, rows, count, view, logits_out, topk_values_out, topk_indices_out,
                          lse_out, aug_params_out, labels_out);
    for (int i = 0; i < count; i++) {
        if (rows[i] >= (uint64_t)c->meta.num_samples)
            return KD_FAIL(KD_ERR_INVALID, "cache '%s': row %u is outside [0, %lld)", c->path,
                           rows[i], (long long)c->meta.num_samples);
        row_emit(c, &c->all, rows[i], view, i, logits_out, topk_values_out, topk_indices_out,
                 lse_out, aug_params_out, labels_out);
    }
    return KD_OK;
}

void kd_cache_close(kd_cache *c)
{
    if (!c)
        return;
    h5_quiet();
    kd_cache_stream_end(c);
    rowbuf_free(&c->all);
    free(c->widen);
    free(c->chk_vals);
    free(c->chk_seen);
    dsets_close(&c->ds);
    close_id(&c->file, H5Fclose);
    shards_free(&c->shards);
    free(c->path);
    free(c);
}
