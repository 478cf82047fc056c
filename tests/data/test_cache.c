/*
 * test_cache.c - the HDF5 teacher cache: float16 conversion and top-k helpers,
 * round trips (full float32/float16, top-k, in memory and streamed, each
 * compression choice), chunk boundaries, resume after a SIGKILL at a random
 * point (the finished file equals an uninterrupted write), and every bad input
 * the reader and writer must refuse, checking status and message (the file
 * and both sides): inconsistent top-k entries, a chunk whose checksum fails
 * (refused by the reader, recomputed by a resuming writer), a cache that
 * cannot be written (read-only: run as an unprivileged user, dropping root in
 * a child when the test runs as root) or that another process holds open.
 * Files live in a fresh mkdtemp directory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "kd_test.h"

static char tmpdir[256];

#define HASH_T  "1111111111111111111111111111111111111111111111111111111111111111"
#define HASH_T2 "2222222222222222222222222222222222222222222222222222222222222222"
#define HASH_D  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define HASH_D2 "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

static void tmp_path(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", tmpdir, name);
}

static kd_cache_meta make_meta(int64_t n, int c, int v, int k, kd_dtype dt, int64_t chunk)
{
    kd_cache_meta m;
    memset(&m, 0, sizeof m);
    m.num_samples = n;
    m.num_classes = c;
    m.views = v;
    m.topk = k;
    m.dtype = dt;
    m.aug_nparams = 3;
    m.chunk_rows = chunk;
    strcpy(m.teacher_sha256, HASH_T);
    strcpy(m.dataset_sha256, HASH_D);
    strcpy(m.augment, "crop_pad=2 hflip=1");
    return m;
}

/* The deterministic teacher: logit of (row, view, class); ties on purpose for some rows. */
static float logit_of(int64_t r, int v, int c)
{
    if (r % 7 == 3)
        return (float)((c % 3) - 1); /* repeated values exercise tie ordering */
    return (float)(4.0 * sin(0.37 * (double)r + 1.3 * v + 0.71 * c) + 0.01 * c);
}

/* Everything chunk `ch` of m holds, as the writer takes it. */
typedef struct {
    float *logits, *tv, *lse, *aug;
    int32_t *ti, *lab;
} chunk_data;

/* Row g's view v augmentation parameter p, as 'crop_pad=2 hflip=1' draws them: whole shifts in
 * [-2, 2], a flip of 0 or 1. */
static float aug_of(int64_t g, int v, int p)
{
    return p < 2 ? (float)((g + v + p) % 5) - 2.0f : (float)((g + v) % 2);
}

static void chunk_make(const kd_cache_meta *m, int64_t ch, int64_t R, chunk_data *d)
{
    int V = m->views, C = m->num_classes, K = m->topk, P = m->aug_nparams;
    d->logits = malloc(sizeof(float) * (size_t)R * V * C);
    d->tv = malloc(sizeof(float) * (size_t)R * V * (K ? K : 1));
    d->ti = malloc(sizeof(int32_t) * (size_t)R * V * (K ? K : 1));
    d->lse = malloc(sizeof(float) * (size_t)R * V);
    d->aug = malloc(sizeof(float) * (size_t)R * V * P);
    d->lab = malloc(sizeof(int32_t) * (size_t)R);
    for (int64_t r = 0; r < R; r++) {
        int64_t g = ch * m->chunk_rows + r;
        d->lab[r] = (int32_t)(g % C);
        for (int v = 0; v < V; v++) {
            for (int c = 0; c < C; c++)
                d->logits[((size_t)r * V + v) * C + c] = logit_of(g, v, c);
            for (int p = 0; p < P; p++)
                d->aug[((size_t)r * V + v) * P + p] = aug_of(g, v, p);
        }
    }
    if (K)
        kd_topk_rows(d->logits, (int)(R * V), C, K, d->tv, d->ti, d->lse);
}

static void chunk_free(chunk_data *d)
{
    free(d->logits);
    free(d->tv);
    free(d->ti);
    free(d->lse);
    free(d->aug);
    free(d->lab);
}

static kd_status put_chunk(kd_cache_writer *w, const kd_cache_meta *m, int64_t ch)
{
    chunk_data d;
    int64_t R = kd_cache_writer_chunk_nrows(w, ch);
    chunk_make(m, ch, R, &d);
    kd_status st = m->topk ? kd_cache_writer_put(w, ch, NULL, d.tv, d.ti, d.lse, d.aug, d.lab)
                           : kd_cache_writer_put(w, ch, d.logits, NULL, NULL, NULL, d.aug, d.lab);
    chunk_free(&d);
    return st;
}

static void assert_ok(kd_status st)
{
    if (st != KD_OK)
        fail_msg("status %s: %s", kd_status_str(st), kd_last_error());
}

/* Write every chunk (or only those with (chunk % every) == 0 when every > 1). */
static void write_cache(const char *path, const kd_cache_meta *m, const kd_cache_write_opts *o,
                        int every)
{
    kd_cache_writer *w = NULL;
    assert_ok(kd_cache_writer_open(path, m, o, &w));
    for (int64_t ch = 0; ch < kd_cache_writer_num_chunks(w); ch++)
        if (every <= 1 || ch % every == 0)
            assert_ok(put_chunk(w, m, ch));
    assert_ok(kd_cache_writer_close(w));
}

static float stored(const kd_cache_meta *m, float x)
{
    return m->dtype == KD_DTYPE_F16 ? kd_f16_to_f32(kd_f32_to_f16(x)) : x;
}

/* Read rows through get_rows (in the given order, in batches) and compare with the teacher. */
static void verify_rows(kd_cache *c, const kd_cache_meta *m, const uint32_t *order, int64_t n,
                        int batch)
{
    int C = m->num_classes, K = m->topk, V = m->views, P = m->aug_nparams;
    float *lo = malloc(sizeof(float) * (size_t)batch * C);
    float *tv = malloc(sizeof(float) * (size_t)batch * (K ? K : 1));
    int32_t *ti = malloc(sizeof(int32_t) * (size_t)batch * (K ? K : 1));
    float *lse = malloc(sizeof(float) * (size_t)batch);
    float *aug = malloc(sizeof(float) * (size_t)batch * P);
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)batch);
    float *row = malloc(sizeof(float) * C), *rtv = malloc(sizeof(float) * (K ? K : 1));
    int32_t *rti = malloc(sizeof(int32_t) * (K ? K : 1));
    for (int64_t p0 = 0; p0 < n; p0 += batch) {
        int cnt = (int)(n - p0 < batch ? n - p0 : batch);
        int view = (int)((p0 / batch) % V);
        assert_ok(kd_cache_get_rows(c, order + p0, cnt, view, lo, K ? tv : NULL, K ? ti : NULL, lse,
                                    aug, lab));
        for (int i = 0; i < cnt; i++) {
            int64_t g = order[p0 + i];
            assert_int_equal(lab[i], g % C);
            for (int p = 0; p < P; p++)
                assert_true(aug[(size_t)i * P + p] == aug_of(g, view, p));
            for (int k = 0; k < C; k++)
                row[k] = logit_of(g, view, k);
            float want_lse;
            if (!K) {
                for (int k = 0; k < C; k++)
                    if (lo[(size_t)i * C + k] != stored(m, row[k]))
                        fail_msg("row %lld view %d class %d: %g, want %g", (long long)g, view, k,
                                 lo[(size_t)i * C + k], stored(m, row[k]));
                kd_topk_rows(row, 1, C, 1, rtv, rti, &want_lse);
                kd_assert_close(lse[i], want_lse, m->dtype == KD_DTYPE_F16 ? 1e-2 : 1e-5);
            } else {
                kd_topk_rows(row, 1, C, K, rtv, rti, &want_lse);
                assert_true(lse[i] == want_lse);
                double mass = 0.0;
                for (int k = 0; k < K; k++) {
                    assert_int_equal(ti[(size_t)i * K + k], rti[k]);
                    assert_true(tv[(size_t)i * K + k] == stored(m, rtv[k]));
                    assert_true(lo[(size_t)i * C + rti[k]] == stored(m, rtv[k]));
                }
                /* The dense rebuild is a distribution: softmax sums to one. */
                for (int k = 0; k < C; k++)
                    mass += exp((double)lo[(size_t)i * C + k] - want_lse);
                kd_assert_close(mass, 1.0, m->dtype == KD_DTYPE_F16 ? 2e-2 : 1e-4);
            }
        }
    }
    free(lo);
    free(tv);
    free(ti);
    free(lse);
    free(aug);
    free(lab);
    free(row);
    free(rtv);
    free(rti);
}

static void expect_init_from(kd_cache_expect *e, const kd_cache_meta *m)
{
    kd_cache_expect_init(e);
    e->num_samples = m->num_samples;
    e->num_classes = m->num_classes;
    e->views = m->views;
    e->topk = m->topk;
    e->dtype = (int)m->dtype;
    e->aug_nparams = m->aug_nparams;
    strcpy(e->teacher_sha256, m->teacher_sha256);
    strcpy(e->dataset_sha256, m->dataset_sha256);
    strcpy(e->augment, m->augment);
}

static uint32_t *perm_make(int64_t n, unsigned seed, int shuffle)
{
    uint32_t *p = malloc(sizeof *p * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = (uint32_t)i;
    srand(seed);
    for (int64_t i = n - 1; shuffle && i > 0; i--) {
        int64_t j = rand() % (i + 1);
        uint32_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
    return p;
}

/* Open with the matching expectation and check every row, in memory and streamed. */
static void check_cache(const char *path, const kd_cache_meta *m)
{
    kd_cache_expect e;
    expect_init_from(&e, m);
    kd_cache *c = NULL;
    uint32_t *seq = perm_make(m->num_samples, 1, 0), *shuf = perm_make(m->num_samples, 7, 1);
    assert_ok(kd_cache_open(path, &e, &c));
    assert_int_equal(kd_cache_in_memory(c), 1);
    verify_rows(c, m, shuf, m->num_samples, 37);
    kd_cache_close(c);

    e.memory_limit = -1; /* stream */
    e.prefetch_slots = 3;
    e.slot_rows = 50;
    assert_ok(kd_cache_open(path, &e, &c));
    assert_int_equal(kd_cache_in_memory(c), 0);
    for (int epoch = 0; epoch < 2; epoch++) {
        const uint32_t *order = epoch ? shuf : seq;
        assert_ok(kd_cache_stream_begin(c, order, m->num_samples));
        verify_rows(c, m, order, m->num_samples, 23);
    }
    kd_cache_close(c);
    free(seq);
    free(shuf);
}

/* ---- float16 and top-k ---- */

static void test_f16(void **state)
{
    /* Every finite half survives half -> float -> half. */
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff))
            continue; /* NaN */
        assert_int_equal(kd_f32_to_f16(kd_f16_to_f32((uint16_t)h)), h);
    }
    assert_true(isnan(kd_f16_to_f32(kd_f32_to_f16(NAN))));
    assert_int_equal(kd_f32_to_f16(INFINITY), 0x7c00);
    assert_int_equal(kd_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(kd_f32_to_f16(65519.0f), 0x7bff);
    assert_int_equal(kd_f32_to_f16(65520.0f), 0x7c00);        /* tie rounds to even: Inf */
    assert_int_equal(kd_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie, even stays */
    assert_int_equal(kd_f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie, odd rounds up */
    assert_int_equal(kd_f32_to_f16(0x1p-25f), 0x0000);        /* tie below the subnormal */
    assert_int_equal(kd_f32_to_f16(0x3p-26f), 0x0001);        /* 0.75 ulp -> 1 */
    assert_int_equal(kd_f32_to_f16(0x3p-25f), 0x0002);        /* 1.5 ulp, tie -> even 2 */
    assert_int_equal(kd_f32_to_f16(0x5p-25f), 0x0002);        /* 2.5 ulp, tie -> even 2 */
    assert_int_equal(kd_f32_to_f16(-0x1p-24f), 0x8001);
    assert_int_equal(kd_f32_to_f16(0x1.ffcp-15f), 0x0400); /* rounds up into the normals */
#ifdef __FLT16_MAX__
    /* Agree with the compiler's conversion on many random floats. */
    srand(3);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = ((uint32_t)rand() << 16) ^ (uint32_t)rand();
        float x;
        memcpy(&x, &u, 4);
        if (isnan(x))
            continue;
        _Float16 y = (_Float16)x;
        uint16_t yb;
        memcpy(&yb, &y, 2);
        if (kd_f32_to_f16(x) != yb)
            fail_msg("%a: got 0x%04x, compiler 0x%04x", (double)x, kd_f32_to_f16(x), yb);
    }
#endif
}

static void test_topk(void **state)
{
    const float x[2][6] = {{1, 3, 3, -2, 5, 3}, {0, 0, 0, 0, 0, 0}};
    float v[2][4], lse[2];
    int32_t ix[2][4];
    kd_topk_rows(&x[0][0], 2, 6, 4, &v[0][0], &ix[0][0], lse);
    const int32_t want0[4] = {4, 1, 2, 5}, want1[4] = {0, 1, 2, 3};
    for (int k = 0; k < 4; k++) {
        assert_int_equal(ix[0][k], want0[k]);
        assert_int_equal(ix[1][k], want1[k]);
        assert_true(v[0][k] == x[0][want0[k]]);
    }
    double s = 0;
    for (int j = 0; j < 6; j++)
        s += exp(x[0][j]);
    kd_assert_close(lse[0], log(s), 1e-5);
    kd_assert_close(lse[1], log(6.0), 1e-6);
}

/* ---- round trips ---- */

static void roundtrip(const char *name, kd_cache_meta m, const kd_cache_write_opts *o)
{
    char path[512];
    tmp_path(path, sizeof path, name);
    write_cache(path, &m, o, 1);
    check_cache(path, &m);
}

static void test_roundtrip_full_f32(void **state)
{
    roundtrip("full32.h5", make_meta(1000, 10, 2, 0, KD_DTYPE_F32, 128), NULL);
}

static void test_roundtrip_full_f16(void **state)
{
    roundtrip("full16.h5", make_meta(1000, 10, 2, 0, KD_DTYPE_F16, 128), NULL);
}

static void test_roundtrip_topk(void **state)
{
    roundtrip("topk32.h5", make_meta(700, 20, 3, 5, KD_DTYPE_F32, 64), NULL);
    roundtrip("topk16.h5", make_meta(700, 20, 1, 4, KD_DTYPE_F16, 64), NULL);
}

/* KD_CACHE_VIEW_MEAN: each logit the float mean of its views (summed in view order), zero
 * augmentation, the label, the row's log-sum-exp; in memory and streamed; refused on top-k. */
static void check_view_mean(kd_cache *c, const kd_cache_meta *m, const uint32_t *order, int batch)
{
    const int C = m->num_classes, V = m->views, P = m->aug_nparams;
    float *lo = malloc(sizeof(float) * (size_t)batch * C), *lse = malloc(sizeof(float) * batch);
    float *aug = malloc(sizeof(float) * (size_t)batch * P), want[64];
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)batch);
    for (int64_t p0 = 0; p0 < m->num_samples; p0 += batch) {
        int cnt = (int)(m->num_samples - p0 < batch ? m->num_samples - p0 : batch);
        memset(aug, 0x7f, sizeof(float) * (size_t)batch * P);
        assert_ok(kd_cache_get_rows(c, order + p0, cnt, KD_CACHE_VIEW_MEAN, lo, NULL, NULL, lse,
                                    aug, lab));
        for (int i = 0; i < cnt; i++) {
            int64_t g = order[p0 + i];
            assert_int_equal(lab[i], g % C);
            for (int p = 0; p < P; p++)
                assert_true(aug[(size_t)i * P + p] == 0.0f);
            double s = 0.0, mx = -INFINITY;
            for (int k = 0; k < C; k++) {
                float sum = 0.0f;
                for (int v = 0; v < V; v++)
                    sum += stored(m, logit_of(g, v, k));
                want[k] = sum / (float)V;
                if (lo[(size_t)i * C + k] != want[k])
                    fail_msg("row %lld class %d: mean %g, want %g", (long long)g, k,
                             lo[(size_t)i * C + k], want[k]);
                mx = want[k] > mx ? want[k] : mx;
            }
            for (int k = 0; k < C; k++)
                s += exp(want[k] - mx);
            kd_assert_close(lse[i], mx + log(s), 1e-5);
        }
    }
    free(lo);
    free(lse);
    free(aug);
    free(lab);
}

static void test_view_mean(void **state)
{
    char path[512];
    kd_cache_meta m = make_meta(300, 10, 3, 0, KD_DTYPE_F16, 64);
    tmp_path(path, sizeof path, "viewmean.h5");
    write_cache(path, &m, NULL, 1);
    kd_cache_expect e;
    expect_init_from(&e, &m);
    uint32_t *shuf = perm_make(m.num_samples, 5, 1);
    kd_cache *c = NULL;
    assert_ok(kd_cache_open(path, &e, &c));
    check_view_mean(c, &m, shuf, 29);
    /* a view outside [0, V) that is not the mean is refused */
    assert_int_equal(kd_cache_get_rows(c, shuf, 1, -2, NULL, NULL, NULL, NULL, NULL, NULL),
                     KD_ERR_INVALID);
    assert_int_equal(kd_cache_get_rows(c, shuf, 1, 3, NULL, NULL, NULL, NULL, NULL, NULL),
                     KD_ERR_INVALID);
    kd_cache_close(c);
    e.memory_limit = -1; /* streamed */
    e.slot_rows = 40;
    assert_ok(kd_cache_open(path, &e, &c));
    assert_ok(kd_cache_stream_begin(c, shuf, m.num_samples));
    check_view_mean(c, &m, shuf, 17);
    kd_cache_close(c);

    kd_cache_meta t = make_meta(100, 20, 2, 4, KD_DTYPE_F32, 32);
    tmp_path(path, sizeof path, "viewmean_topk.h5");
    write_cache(path, &t, NULL, 1);
    expect_init_from(&e, &t);
    assert_ok(kd_cache_open(path, &e, &c));
    float lo[20];
    assert_int_equal(
        kd_cache_get_rows(c, shuf, 1, KD_CACHE_VIEW_MEAN, lo, NULL, NULL, NULL, NULL, NULL),
        KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "top 4"));
    kd_cache_close(c);
    free(shuf);
}

static void test_chunk_boundaries(void **state)
{
    const int64_t ns[] = {1, 127, 128, 129, 256, 300};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        char name[64], path[512];
        snprintf(name, sizeof name, "bound%lld.h5", (long long)ns[i]);
        tmp_path(path, sizeof path, name);
        kd_cache_meta m = make_meta(ns[i], 10, 1, 0, KD_DTYPE_F32, 128);
        kd_cache_writer *w;
        assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
        int64_t nch = (ns[i] + 127) / 128;
        assert_int_equal(kd_cache_writer_num_chunks(w), nch);
        assert_int_equal(kd_cache_writer_chunk_nrows(w, nch - 1), ns[i] - (nch - 1) * 128);
        assert_int_equal(kd_cache_writer_chunk_nrows(w, nch), 0);
        assert_int_equal(kd_cache_writer_chunks_missing(w), nch);
        /* Written out of order: the chunk index decides where rows land. */
        for (int64_t ch = nch - 1; ch >= 0; ch--)
            assert_ok(put_chunk(w, &m, ch));
        assert_int_equal(kd_cache_writer_chunks_missing(w), 0);
        assert_ok(kd_cache_writer_close(w));
        check_cache(path, &m);
    }
    /* chunk_rows 0 takes the default; a chunk larger than the data set is one chunk. */
    char path[512];
    tmp_path(path, sizeof path, "defchunk.h5");
    kd_cache_meta m = make_meta(50, 10, 1, 0, KD_DTYPE_F32, 0);
    kd_cache_writer *w;
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_meta(w)->chunk_rows, KD_CACHE_DEFAULT_CHUNK_ROWS);
    assert_int_equal(kd_cache_writer_num_chunks(w), 1);
    assert_ok(kd_cache_writer_close(w));
}

static void test_compression(void **state)
{
    kd_cache_write_opts o;
    kd_cache_write_opts_init(&o);
    o.fsync = 0;
    o.compress = KD_CACHE_COMPRESS_DEFLATE;
    o.level = 1;
    roundtrip("deflate1.h5", make_meta(500, 10, 2, 0, KD_DTYPE_F16, 64), &o);
    o.level = 6;
    o.shuffle = 0;
    roundtrip("deflate6.h5", make_meta(500, 10, 2, 3, KD_DTYPE_F32, 64), &o);
    o.shuffle = -1;
    const kd_cache_compress plug[2] = {KD_CACHE_COMPRESS_LZ4, KD_CACHE_COMPRESS_ZSTD};
    for (int i = 0; i < 2; i++) {
        char name[64], path[512];
        snprintf(name, sizeof name, "%s.h5", kd_cache_compress_name(plug[i]));
        tmp_path(path, sizeof path, name);
        o.compress = plug[i];
        o.level = 0;
        kd_cache_meta m = make_meta(500, 10, 2, 0, KD_DTYPE_F32, 64);
        if (kd_cache_compress_available(plug[i])) {
            roundtrip(name, m, &o);
            print_message("%s: available, round trip checked\n", name);
        } else {
            kd_cache_writer *w = (kd_cache_writer *)1;
            kd_clear_error();
            assert_int_equal(kd_cache_writer_open(path, &m, &o, &w), KD_ERR_UNSUPPORTED);
            assert_null(w);
            assert_non_null(strstr(kd_last_error(), "hdf5-filter-plugin"));
            assert_non_null(strstr(kd_last_error(), kd_cache_compress_name(plug[i])));
            struct stat sb;
            assert_int_not_equal(stat(path, &sb), 0); /* nothing created */
            print_message("%s: not available, refused: %s\n", name, kd_last_error());
        }
    }
}

/* ---- resume after SIGKILL ---- */

/* Every dataset of the file as raw bytes, for whole-file comparison. */
static void assert_same_datasets(const char *a, const char *b)
{
    const char *names[] = {"logits",     "topk_values", "topk_indices", "logsumexp",
                           "aug_params", "labels",      "done"};
    hid_t fa = H5Fopen(a, H5F_ACC_RDONLY, H5P_DEFAULT),
          fb = H5Fopen(b, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(fa >= 0 && fb >= 0);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        htri_t ea = H5Lexists(fa, names[i], H5P_DEFAULT), eb = H5Lexists(fb, names[i], H5P_DEFAULT);
        assert_int_equal(ea, eb);
        if (ea <= 0)
            continue;
        hid_t da = H5Dopen2(fa, names[i], H5P_DEFAULT), db = H5Dopen2(fb, names[i], H5P_DEFAULT);
        assert_true(da >= 0 && db >= 0);
        hid_t ta = H5Dget_type(da), tb = H5Dget_type(db);
        assert_true(ta >= 0 && tb >= 0);
        assert_true(H5Tequal(ta, tb) > 0);
        hid_t sa = H5Dget_space(da), sb = H5Dget_space(db);
        assert_true(sa >= 0 && sb >= 0);
        hssize_t na = H5Sget_simple_extent_npoints(sa);
        hssize_t nb = H5Sget_simple_extent_npoints(sb);
        assert_true(na >= 0);
        assert_int_equal(na, nb);
        const size_t tsize = H5Tget_size(ta);
        assert_true(tsize > 0);
        size_t bytes = (size_t)na * tsize;
        void *ba = malloc(bytes + 1), *bb = malloc(bytes + 1);
        assert_true(ba && bb);
        assert_true(H5Dread(da, ta, H5S_ALL, H5S_ALL, H5P_DEFAULT, ba) >= 0);
        assert_true(H5Dread(db, tb, H5S_ALL, H5S_ALL, H5P_DEFAULT, bb) >= 0);
        if (memcmp(ba, bb, bytes) != 0)
            fail_msg("dataset /%s differs between '%s' and '%s'", names[i], a, b);
        free(ba);
        free(bb);
        assert_true(H5Sclose(sa) >= 0 && H5Sclose(sb) >= 0);
        assert_true(H5Tclose(ta) >= 0 && H5Tclose(tb) >= 0);
        assert_true(H5Dclose(da) >= 0 && H5Dclose(db) >= 0);
    }
    assert_true(H5Fclose(fa) >= 0);
    assert_true(H5Fclose(fb) >= 0);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Child: write chunks in order; with self_kill >= 0, SIGKILL itself after that many puts. */
static void child_write(const char *path, const kd_cache_meta *m, const kd_cache_write_opts *o,
                        int self_kill)
{
    kd_cache_writer *w;
    if (kd_cache_writer_open(path, m, o, &w) != KD_OK)
        _exit(3);
    int puts = 0;
    for (int64_t ch = 0; ch < kd_cache_writer_num_chunks(w); ch++) {
        if (self_kill >= 0 && puts == self_kill)
            raise(SIGKILL);
        if (kd_cache_writer_chunk_done(w, ch))
            continue;
        if (put_chunk(w, m, ch) != KD_OK)
            _exit(4);
        puts++;
    }
    if (self_kill >= 0)
        raise(SIGKILL);
    kd_cache_writer_close(w);
    _exit(0);
}

static void test_resume_after_sigkill(void **state)
{
    char ref[512], path[512];
    tmp_path(ref, sizeof ref, "resume_ref.h5");
    for (int variant = 0; variant < 2; variant++) {
        kd_cache_meta m = variant ? make_meta(6000, 10, 2, 3, KD_DTYPE_F16, 100)
                                  : make_meta(6000, 10, 2, 0, KD_DTYPE_F32, 100);
        kd_cache_write_opts o;
        kd_cache_write_opts_init(&o);
        o.fsync = 0; /* a SIGKILL keeps the page cache; fsync guards against power loss */
        o.compress = variant ? KD_CACHE_COMPRESS_DEFLATE : KD_CACHE_COMPRESS_NONE;
        unlink(ref);
        double t0 = now_s();
        write_cache(ref, &m, &o, 1);
        double full = now_s() - t0;
        int64_t nch = (m.num_samples + m.chunk_rows - 1) / m.chunk_rows;
        srand(1234 + (unsigned)variant);
        for (int trial = 0; trial < 8; trial++) {
            tmp_path(path, sizeof path, "resume.h5");
            unlink(path);
            /* Even trials: the child kills itself after a random number of puts; odd
             * trials: killed by the parent after a random delay, wherever it is. The
             * second kill of a trial hits an already resumed file. */
            for (int round = 0; round < 2; round++) {
                int self_kill = trial % 2 == 0 ? rand() % (int)(nch / 2 + 1) : -1;
                pid_t pid = fork();
                assert_true(pid >= 0);
                if (pid == 0)
                    child_write(path, &m, &o, self_kill);
                if (self_kill < 0) {
                    useconds_t us = (useconds_t)((double)rand() / RAND_MAX * full * 1e6);
                    usleep(us);
                    kill(pid, SIGKILL);
                }
                int status;
                assert_int_equal(waitpid(pid, &status, 0), pid);
                if (WIFEXITED(status))
                    assert_int_equal(WEXITSTATUS(status), 0); /* finished before the kill */
                else
                    assert_int_equal(WTERMSIG(status), SIGKILL);
            }
            /* Killed before the skeleton was renamed into place: no file, and nothing to
             * resume (the writer below starts afresh). */
            struct stat sb;
            int existed = stat(path, &sb) == 0;
            kd_cache_writer *w;
            assert_ok(kd_cache_writer_open(path, &m, &o, &w));
            int64_t missing = kd_cache_writer_chunks_missing(w);
            print_message("variant %d trial %d (%s): %s, %lld of %lld chunks missing\n", variant,
                          trial, trial % 2 == 0 ? "self-kill after k puts" : "timer kill",
                          existed ? "file left behind" : "no file yet", (long long)missing,
                          (long long)nch);
            char partial_path[600];
            snprintf(partial_path, sizeof partial_path, "%s.partial", path);
            if (!existed && stat(partial_path, &sb) == 0) {
                /* Compressed caches are staged in <cache>.partial; the reader says so. */
                assert_int_not_equal(o.compress, KD_CACHE_COMPRESS_NONE);
                kd_cache *c = (kd_cache *)1;
                kd_clear_error();
                assert_int_equal(kd_cache_open(path, NULL, &c), KD_ERR_FORMAT);
                assert_null(c);
                assert_non_null(strstr(kd_last_error(), "not finished"));
                assert_non_null(strstr(kd_last_error(), "distill cache"));
            }
            if (existed && missing) {
                /* Until resumed, the reader refuses it and says how to finish it. */
                assert_ok(kd_cache_writer_close(w));
                kd_cache *c = (kd_cache *)1;
                kd_clear_error();
                assert_int_equal(kd_cache_open(path, NULL, &c), KD_ERR_FORMAT);
                assert_null(c);
                char num[64];
                snprintf(num, sizeof num, "%lld of %lld chunks", (long long)missing,
                         (long long)nch);
                assert_non_null(strstr(kd_last_error(), num));
                assert_non_null(strstr(kd_last_error(), "distill cache"));
                assert_ok(kd_cache_writer_open(path, &m, &o, &w));
            }
            for (int64_t ch = 0; ch < nch; ch++)
                if (!kd_cache_writer_chunk_done(w, ch))
                    assert_ok(put_chunk(w, &m, ch));
            assert_ok(kd_cache_writer_close(w));
            assert_same_datasets(ref, path);
        }
        check_cache(path, &m);
    }
}

/* ---- bad inputs ---- */

static void expect_open_fail(const char *path, const kd_cache_expect *e, kd_status want,
                             const char *n1, const char *n2)
{
    kd_cache *c = (kd_cache *)1;
    kd_clear_error();
    kd_status st = kd_cache_open(path, e, &c);
    const char *msg = kd_last_error();
    if (st != want)
        fail_msg("status %s, want %s: %s", kd_status_str(st), kd_status_str(want), msg);
    assert_null(c);
    print_message("refused as expected: %s\n", msg);
    if (!strstr(msg, path) || (n1 && !strstr(msg, n1)) || (n2 && !strstr(msg, n2)))
        fail_msg("message '%s' lacks the path '%s' or '%s' / '%s'", msg, path, n1 ? n1 : "",
                 n2 ? n2 : "");
}

static void test_reader_mismatches(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "good.h5");
    kd_cache_meta m = make_meta(600, 10, 2, 0, KD_DTYPE_F16, 128);
    write_cache(path, &m, NULL, 1);
    kd_cache_expect e;

    expect_init_from(&e, &m);
    strcpy(e.teacher_sha256, HASH_T2);
    expect_open_fail(path, &e, KD_ERR_CONFIG, HASH_T, HASH_T2);
    expect_init_from(&e, &m);
    strcpy(e.dataset_sha256, HASH_D2);
    expect_open_fail(path, &e, KD_ERR_CONFIG, HASH_D, HASH_D2);
    expect_init_from(&e, &m);
    e.num_samples = 550;
    expect_open_fail(path, &e, KD_ERR_SHAPE, "written for 600 samples", "the job has 550");
    expect_init_from(&e, &m);
    e.num_classes = 100;
    expect_open_fail(path, &e, KD_ERR_SHAPE, "10 classes", "100");
    expect_init_from(&e, &m);
    e.views = 4;
    expect_open_fail(path, &e, KD_ERR_SHAPE, "2 view", "4 views");
    expect_init_from(&e, &m);
    e.topk = 5;
    expect_open_fail(path, &e, KD_ERR_SHAPE, "topk 0", "topk 5");
    expect_init_from(&e, &m);
    e.dtype = KD_DTYPE_F32;
    expect_open_fail(path, &e, KD_ERR_CONFIG, "float16", "float32");
    /* views augmented otherwise than the job's data.augment: the student would train on them */
    expect_init_from(&e, &m);
    strcpy(e.augment, "none");
    expect_open_fail(path, &e, KD_ERR_CONFIG, "views augmented 'crop_pad=2 hflip=1'",
                     "data.augment is 'none'");
    strcpy(e.augment, "crop_pad=4 hflip=1");
    expect_open_fail(path, &e, KD_ERR_CONFIG, "'crop_pad=2 hflip=1'", "'crop_pad=4 hflip=1'");

    /* Labels row by row against the job's (the writer stored g % 10): equal opens, one
     * different row is named, held in memory or streamed */
    kd_cache *c;
    int32_t want[600];
    for (int g = 0; g < 600; g++)
        want[g] = g % 10;
    expect_init_from(&e, &m);
    e.labels = want;
    assert_ok(kd_cache_open(path, &e, &c));
    kd_cache_close(c);
    want[417] = 3;
    expect_open_fail(path, &e, KD_ERR_CONFIG, "row 417 holds label 7",
                     "training sample 417 has label 3");
    e.memory_limit = -1;
    assert_ok(kd_cache_open(path, &e, &c));
    uint32_t order[600];
    for (int g = 0; g < 600; g++)
        order[g] = (uint32_t)g;
    int32_t lab[600];
    kd_status st = kd_cache_stream_begin(c, order, 600);
    if (st == KD_OK)
        st = kd_cache_get_rows(c, order, 600, 0, NULL, NULL, NULL, NULL, NULL, lab);
    assert_int_equal(st, KD_ERR_CONFIG);
    assert_non_null(strstr(kd_last_error(), "row 417 holds label 7"));
    kd_cache_close(c);

    /* Unchecked fields: an all-default expectation opens it. */
    assert_ok(kd_cache_open(path, NULL, &c));
    assert_int_equal(kd_cache_meta_of(c)->num_samples, 600);
    assert_int_equal(kd_cache_meta_of(c)->aug_nparams, 3);
    kd_cache_close(c);

    /* Missing file. */
    char missing[512];
    tmp_path(missing, sizeof missing, "nope.h5");
    /* the advice (which command, which job) is the caller's: engine/teacher.c adds it */
    expect_open_fail(missing, NULL, KD_ERR_NOT_FOUND, "No such file", NULL);

    /* Not HDF5 at all. */
    char junk[512];
    tmp_path(junk, sizeof junk, "junk.h5");
    FILE *f = fopen(junk, "w");
    fputs("definitely not hdf5\n", f);
    fclose(f);
    /* not HDF5 at all (a mistyped path naming a checkpoint, say): no cache, so no advice to
     * delete it */
    expect_open_fail(junk, NULL, KD_ERR_FORMAT, "not an HDF5 file", "left as it is");
    assert_null(strstr(kd_last_error(), "delete"));
}

static void test_truncated(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "trunc.h5");
    kd_cache_meta m = make_meta(2000, 10, 2, 0, KD_DTYPE_F32, 128);
    write_cache(path, &m, NULL, 1);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(truncate(path, sb.st_size / 2), 0);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "truncated", "distill cache");
}

static void test_half_written(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "half.h5");
    kd_cache_meta m = make_meta(1000, 10, 1, 0, KD_DTYPE_F32, 100);
    write_cache(path, &m, NULL, 2); /* chunks 0, 2, 4, 6, 8 */
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "5 of 10 chunks are missing",
                     "first: chunk 1, rows 100..199");
    assert_non_null(strstr(kd_last_error(), "resume"));
    /* Resume finishes it. */
    kd_cache_writer *w;
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_chunks_missing(w), 5);
    for (int64_t ch = 0; ch < 10; ch++) {
        assert_int_equal(kd_cache_writer_chunk_done(w, ch), ch % 2 == 0);
        if (!kd_cache_writer_chunk_done(w, ch))
            assert_ok(put_chunk(w, &m, ch));
    }
    assert_ok(kd_cache_writer_close(w));
    check_cache(path, &m);
}

/* Overwrite one stored element of /name at (row, view, cls) with a float32 value or f16 bits. */
static void poke(const char *path, const char *name, int64_t row, int view, int cls, float val)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    assert_true(d >= 0);
    hid_t fs = H5Dget_space(d);
    assert_true(fs >= 0);
    int nd = H5Sget_simple_extent_ndims(fs);
    assert_true(nd >= 1 && nd <= 3);
    hsize_t start[3] = {(hsize_t)row, (hsize_t)view, (hsize_t)cls}, one[3] = {1, 1, 1};
    assert_true(H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, one, NULL) >= 0);
    hid_t ms = H5Screate_simple(nd, one, NULL);
    assert_true(ms >= 0);
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, &val) >= 0);
    assert_true(H5Sclose(ms) >= 0);
    assert_true(H5Sclose(fs) >= 0);
    assert_true(H5Dclose(d) >= 0);
    assert_true(H5Fclose(f) >= 0);
}

static void test_nonfinite(void **state)
{
    char path[512];
    kd_cache_expect e;
    /* NaN in a float32 cache, found in memory. */
    tmp_path(path, sizeof path, "nan.h5");
    kd_cache_meta m = make_meta(600, 10, 2, 0, KD_DTYPE_F32, 128);
    write_cache(path, &m, NULL, 1);
    poke(path, "logits", 333, 1, 4, NAN);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 333 view 1", "non-finite");
    /* ... and by the prefetch thread when streamed: reported by get_rows. */
    expect_init_from(&e, &m);
    e.memory_limit = -1;
    e.slot_rows = 100;
    kd_cache *c;
    assert_ok(kd_cache_open(path, &e, &c));
    uint32_t *seq = perm_make(600, 1, 0);
    float lo[100 * 10];
    assert_ok(kd_cache_stream_begin(c, seq, 600));
    kd_status st = KD_OK;
    int64_t p = 0;
    for (; p < 600 && st == KD_OK; p += 100)
        st = kd_cache_get_rows(c, seq + p, 100, 0, lo, NULL, NULL, NULL, NULL, NULL);
    assert_int_equal(st, KD_ERR_FORMAT);
    /* Checked a chunk (128 rows) at a time: the batch that fails is the first whose slot
     * touches chunk 2 (rows 256..383) or the one holding row 333 itself. */
    assert_true(p - 100 == 200 || p - 100 == 300);
    assert_non_null(strstr(kd_last_error(), "row 333 view 1"));
    assert_non_null(strstr(kd_last_error(), path));
    kd_cache_close(c);
    free(seq);

    /* Inf in a float16 cache (written through HDF5's conversion: 1e6 overflows to Inf). */
    tmp_path(path, sizeof path, "inf16.h5");
    m = make_meta(600, 10, 1, 0, KD_DTYPE_F16, 128);
    write_cache(path, &m, NULL, 1);
    poke(path, "logits", 17, 0, 9, INFINITY);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 17 view 0", "non-finite");

    /* -Inf in a top-k cache's values and NaN in its logsumexp. */
    tmp_path(path, sizeof path, "inftopk.h5");
    m = make_meta(300, 10, 2, 3, KD_DTYPE_F32, 128);
    write_cache(path, &m, NULL, 1);
    poke(path, "topk_values", 299, 1, 2, -INFINITY);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 299 view 1", "non-finite");
    tmp_path(path, sizeof path, "nanlse.h5");
    write_cache(path, &m, NULL, 1);
    poke(path, "logsumexp", 5, 0, 0, NAN);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "logsumexp", "row 5 view 0");

    /* NaN in a view's augmentation parameters (the student would train on a clamped view). */
    tmp_path(path, sizeof path, "nanaug.h5");
    m = make_meta(300, 10, 2, 0, KD_DTYPE_F32, 128);
    write_cache(path, &m, NULL, 1);
    check_cache(path, &m);
    poke(path, "aug_params", 42, 1, m.aug_nparams - 1, NAN);
    char where[96];
    snprintf(where, sizeof where, "row 42 view 1 parameter %d", m.aug_nparams - 1);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "non-finite augmentation parameter", where);
}

/* /done holds 0 or 1 per chunk; any other byte is damage, refused by the reader and by a
 * resuming writer alike. */
static void test_done_values(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "done2.h5");
    kd_cache_meta m = make_meta(500, 10, 1, 0, KD_DTYPE_F32, 100);
    write_cache(path, &m, NULL, 1);
    check_cache(path, &m);
    poke(path, "done", 3, 0, 0, 2.0f);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "/done[3] is 2", "only 0");
    kd_cache_writer *w = NULL;
    assert_int_equal(kd_cache_writer_open(path, &m, NULL, &w), KD_ERR_FORMAT);
    assert_null(w);
    assert_non_null(strstr(kd_last_error(), "/done[3] is 2"));
    assert_non_null(strstr(kd_last_error(), path));
}

static void test_writer_refuses(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "wr.h5");
    kd_cache_meta m = make_meta(300, 10, 1, 0, KD_DTYPE_F16, 100);
    kd_cache_writer *w;
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_ok(put_chunk(w, &m, 0));
    assert_ok(kd_cache_writer_close(w));

    /* Other metadata for an existing file: refused, naming both sides; file untouched. */
    struct {
        const char *what, *n1, *n2;
        kd_status st;
    } cases[] = {
        {"teacher", HASH_T, HASH_T2, KD_ERR_CONFIG},
        {"dataset", HASH_D, HASH_D2, KD_ERR_CONFIG},
        {"samples", "num_samples 300", "num_samples 301", KD_ERR_SHAPE},
        {"classes", "num_classes 10", "num_classes 11", KD_ERR_SHAPE},
        {"views", "views 1", "views 2", KD_ERR_SHAPE},
        {"dtype", "float16", "float32", KD_ERR_CONFIG},
        {"chunk", "chunk_rows 100", "chunk_rows 50", KD_ERR_CONFIG},
        {"topk", "topk 0", "topk 2", KD_ERR_SHAPE},
        {"augment", "'crop_pad=2 hflip=1'", "'none'", KD_ERR_CONFIG},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kd_cache_meta o = m;
        switch (i) {
        case 0: strcpy(o.teacher_sha256, HASH_T2); break;
        case 1: strcpy(o.dataset_sha256, HASH_D2); break;
        case 2: o.num_samples = 301; break;
        case 3: o.num_classes = 11; break;
        case 4: o.views = 2; break;
        case 5: o.dtype = KD_DTYPE_F32; break;
        case 6: o.chunk_rows = 50; break;
        case 7: o.topk = 2; break;
        case 8: strcpy(o.augment, "none"); break;
        }
        kd_clear_error();
        w = (kd_cache_writer *)1;
        kd_status st = kd_cache_writer_open(path, &o, NULL, &w);
        const char *msg = kd_last_error();
        if (st != cases[i].st || !strstr(msg, path) || !strstr(msg, cases[i].n1) ||
            !strstr(msg, cases[i].n2) || !strstr(msg, "never overwritten"))
            fail_msg("%s: status %s, message '%s'", cases[i].what, kd_status_str(st), msg);
        assert_null(w);
    }
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_chunks_missing(w), 2);

    /* Bad values: nothing written. */
    chunk_data d;
    chunk_make(&m, 1, 100, &d);
    d.logits[5 * 10 + 3] = NAN;
    kd_clear_error();
    assert_int_equal(kd_cache_writer_put(w, 1, d.logits, NULL, NULL, NULL, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "row 105 view 0"));
    d.logits[5 * 10 + 3] = 70000.0f;
    assert_int_equal(kd_cache_writer_put(w, 1, d.logits, NULL, NULL, NULL, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "float16"));
    d.logits[5 * 10 + 3] = 1.0f;
    d.lab[7] = 10;
    assert_int_equal(kd_cache_writer_put(w, 1, d.logits, NULL, NULL, NULL, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "label 10 at row 107"));
    assert_int_equal(kd_cache_writer_put(w, 3, d.logits, NULL, NULL, NULL, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_int_equal(kd_cache_writer_put(w, 1, NULL, NULL, NULL, NULL, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_int_equal(kd_cache_writer_chunk_done(w, 1), 0);
    chunk_free(&d);
    assert_ok(kd_cache_writer_close(w));

    /* Invalid metadata for a new file. */
    char p2[512];
    tmp_path(p2, sizeof p2, "wr2.h5");
    kd_cache_meta bad = m;
    bad.topk = 11;
    assert_int_equal(kd_cache_writer_open(p2, &bad, NULL, &w), KD_ERR_INVALID);
    bad = m;
    strcpy(bad.teacher_sha256, "xyz");
    assert_int_equal(kd_cache_writer_open(p2, &bad, NULL, &w), KD_ERR_INVALID);
    bad = m;
    strcpy(bad.augment, "crop_pad=2");
    assert_int_equal(kd_cache_writer_open(p2, &bad, NULL, &w), KD_ERR_INVALID);
    struct stat sb;
    assert_int_not_equal(stat(p2, &sb), 0);
}

/* Set integer root attribute `name` of the file at path to v. */
static void set_attr(const char *path, const char *name, int64_t v)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    assert_true(a >= 0);
    assert_true(H5Awrite(a, H5T_NATIVE_INT64, &v) >= 0);
    assert_true(H5Aclose(a) >= 0);
    assert_true(H5Fclose(f) >= 0);
}

/* Replace (value) or delete (NULL) string root attribute `name` of the file at path. */
static void set_str_attr(const char *path, const char *name, const char *value)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    if (H5Aexists(f, name) > 0)
        assert_true(H5Adelete(f, name) >= 0);
    if (value) {
        hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
        assert_true(t >= 0 && sp >= 0 && H5Tset_size(t, strlen(value) + 1) >= 0);
        hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
        assert_true(a >= 0);
        assert_true(H5Awrite(a, t, value) >= 0);
        assert_true(H5Aclose(a) >= 0 && H5Sclose(sp) >= 0 && H5Tclose(t) >= 0);
    }
    assert_true(H5Fclose(f) >= 0);
}

/* The augment attribute: checked against data.augment when both are known; a value that is
 * not one distill writes is refused; a file without it (written elsewhere) is not checked. */
static void test_augment_attr(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "aug.h5");
    kd_cache_meta m = make_meta(300, 10, 1, 0, KD_DTYPE_F32, 100);
    write_cache(path, &m, NULL, 1);
    kd_cache_expect e;
    expect_init_from(&e, &m);
    kd_cache *c;
    assert_ok(kd_cache_open(path, &e, &c));
    assert_string_equal(kd_cache_meta_of(c)->augment, "crop_pad=2 hflip=1");
    kd_cache_close(c);
    e.augment[0] = '\0'; /* the job's augmentation unknown: not compared */
    assert_ok(kd_cache_open(path, &e, &c));
    kd_cache_close(c);
    const char *bad[] = {"crop_pad=-1 hflip=0", "crop_pad=2 hflip=2", "crop_pad=2 hflip=1 x",
                         "sideways"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        set_str_attr(path, "augment", bad[i]);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "attribute augment is", bad[i]);
    }
    /* another writer's spelling of a valid value is read in distill's form: "crop_pad=0
     * hflip=0" is "none" (which these views, drawn with crop_pad 2, do not follow) */
    set_str_attr(path, "augment", "crop_pad=0 hflip=0");
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "its augment attribute 'none' never draws", NULL);
    set_str_attr(path, "augment", "crop_pad=2  hflip=1");
    assert_ok(kd_cache_open(path, &e, &c));
    assert_string_equal(kd_cache_meta_of(c)->augment, "crop_pad=2 hflip=1");
    kd_cache_close(c);
    /* an attribute the stored views do not follow (shifted views called unaugmented, flips
     * without hflip, shifts beyond crop_pad): the views are not what the file says */
    set_str_attr(path, "augment", "none");
    strcpy(e.augment, "none");
    expect_open_fail(path, &e, KD_ERR_FORMAT, "never draws", "'none'");
    set_str_attr(path, "augment", "crop_pad=2 hflip=0");
    strcpy(e.augment, "crop_pad=2 hflip=0");
    expect_open_fail(path, &e, KD_ERR_FORMAT, "parameter 2 = 1", "never draws");
    set_str_attr(path, "augment", "crop_pad=1 hflip=1");
    strcpy(e.augment, "crop_pad=1 hflip=1");
    expect_open_fail(path, &e, KD_ERR_FORMAT, "= -2", "never draws");
    set_str_attr(path, "augment", "crop_pad=2 hflip=1");
    strcpy(e.augment, "crop_pad=2 hflip=1");
    assert_ok(kd_cache_open(path, &e, &c));
    kd_cache_close(c);
    /* a shift beyond crop_pad in one view of one row */
    poke(path, "aug_params", 17, 0, 1, 3.0f);
    expect_open_fail(path, &e, KD_ERR_FORMAT, "parameter 1 = 3 at row 17 view 0", "never draws");
    poke(path, "aug_params", 17, 0, 1, 2.0f);
    assert_ok(kd_cache_open(path, &e, &c));
    kd_cache_close(c);
    set_str_attr(path, "augment", NULL);
    strcpy(e.augment, "crop_pad=1 hflip=0");
    assert_ok(kd_cache_open(path, &e, &c));
    assert_string_equal(kd_cache_meta_of(c)->augment, "");
    kd_cache_close(c);
}

/* Attributes out of range are reported with the value stored. */
static void test_bad_attrs(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "attrs.h5");
    kd_cache_meta m = make_meta(300, 10, 2, 0, KD_DTYPE_F32, 100);
    write_cache(path, &m, NULL, 1);
    set_attr(path, "num_classes", 0);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "invalid attributes", "num_classes 0,");
    set_attr(path, "num_classes", 10);
    set_attr(path, "views", 0);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "invalid attributes", "views 0,");
    set_attr(path, "views", -7);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "invalid attributes", "views -7,");
    /* a chunk_rows no cache has (sizes computed from it would wrap) */
    set_attr(path, "views", 2);
    set_attr(path, "chunk_rows", (int64_t)1 << 62);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "invalid attributes",
                     "chunk_rows 4611686018427387904 (need");
}

/* The class of top-k slot k of (row g, view v) as the writer stored it. */
static int topk_class(const kd_cache_meta *m, int64_t g, int v, int k)
{
    float row[64], tv[64], lse;
    int32_t ti[64];
    for (int c = 0; c < m->num_classes; c++)
        row[c] = logit_of(g, v, c);
    kd_topk_rows(row, 1, m->num_classes, m->topk, tv, ti, &lse);
    return ti[k];
}

/* Top-k entries must name K different classes and a logsumexp no smaller than the log-sum-exp
 * of their values and no larger than the whole row's with the other classes at the smallest
 * top-k value (equal to it when K = C); what the writer computes always passes. */
static void test_topk_entries(void **state)
{
    char path[512], want[128];
    kd_cache_writer *w;
    for (int f16 = 0; f16 < 2; f16++) {
        kd_cache_meta m = make_meta(300, 10, 2, 3, f16 ? KD_DTYPE_F16 : KD_DTYPE_F32, 128);
        /* a class index repeated in one entry */
        tmp_path(path, sizeof path, f16 ? "dup16.h5" : "dup32.h5");
        write_cache(path, &m, NULL, 1);
        check_cache(path, &m);
        int c0 = topk_class(&m, 201, 1, 0);
        poke(path, "topk_indices", 201, 1, 2, (float)c0);
        snprintf(want, sizeof want, "duplicate class index %d", c0);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 201 view 1", want);
        /* ... also when streamed: the prefetch thread's error, reported by get_rows */
        kd_cache_expect e;
        expect_init_from(&e, &m);
        e.memory_limit = -1;
        kd_cache *c;
        assert_ok(kd_cache_open(path, &e, &c));
        uint32_t *seq = perm_make(300, 1, 0);
        float lo[300 * 10];
        assert_ok(kd_cache_stream_begin(c, seq, 300));
        assert_int_equal(kd_cache_get_rows(c, seq, 300, 0, lo, NULL, NULL, NULL, NULL, NULL),
                         KD_ERR_FORMAT);
        assert_non_null(strstr(kd_last_error(), want));
        kd_cache_close(c);
        free(seq);

        /* values not in descending order (the K smallest logits, say) */
        tmp_path(path, sizeof path, f16 ? "asc16.h5" : "asc32.h5");
        write_cache(path, &m, NULL, 1);
        poke(path, "topk_values", 50, 0, 2, 100.0f);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 50 view 0",
                         "not in descending order (slot 1 holds");

        /* a logsumexp below the largest top-k logit: negative mass outside the top-k */
        tmp_path(path, sizeof path, f16 ? "lse16.h5" : "lse32.h5");
        write_cache(path, &m, NULL, 1);
        poke(path, "logsumexp", 17, 0, 0, -40.0f);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 17 view 0",
                         "logsumexp -40 is below top-k logit");
        /* above the largest, below the log-sum-exp of the three (row 3 is a tie: 1, 1, 1) */
        write_cache(path, &m, NULL, 1);
        poke(path, "logsumexp", 3, 1, 0, 1.5f);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 3 view 1",
                         "the log-sum-exp of its 3 top-k logits");
        /* above what the whole row can hold with its other 7 classes at most the smallest
         * top-k logit (1 in the tied row 3: at most log(10 e) = 3.30) */
        write_cache(path, &m, NULL, 1);
        poke(path, "logsumexp", 3, 1, 0, 3.4f);
        expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 3 view 1",
                         "the most the row can hold when its other 7 classes");
        poke(path, "logsumexp", 3, 1, 0, 3.3f); /* log(10) + 1 = 3.3026: it may */
        kd_cache *ok = NULL;
        assert_ok(kd_cache_open(path, NULL, &ok));
        kd_cache_close(ok);
    }

    /* K = C: the logsumexp is that of the values stored, within rounding */
    kd_cache_meta m = make_meta(300, 10, 1, 10, KD_DTYPE_F16, 128);
    tmp_path(path, sizeof path, "kc.h5");
    write_cache(path, &m, NULL, 1);
    check_cache(path, &m);
    poke(path, "logsumexp", 250, 0, 0, 9.0f);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "row 250 view 0", "logsumexp 9 differs from");

    /* Peaked rows with large logits: float16 rounds the top value above the logsumexp by up to
     * half a step (16 at 30000); the writer's own rows still open. */
    m = make_meta(64, 10, 1, 2, KD_DTYPE_F16, 64);
    tmp_path(path, sizeof path, "peaked.h5");
    float lg[64 * 10], tv[64 * 2], lse[64], aug[64 * 3] = {0};
    int32_t ti[64 * 2], lab[64];
    for (int r = 0; r < 64; r++) {
        lab[r] = r % 10;
        for (int c = 0; c < 10; c++)
            lg[r * 10 + c] = c == r % 10 ? 30000.0f + 0.37f * (float)r : -30000.0f;
    }
    kd_topk_rows(lg, 64, 10, 2, tv, ti, lse);
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_ok(kd_cache_writer_put(w, 0, NULL, tv, ti, lse, aug, lab));
    assert_ok(kd_cache_writer_close(w));
    kd_cache *c;
    assert_ok(kd_cache_open(path, NULL, &c));
    kd_cache_close(c);

    /* The writer refuses such entries before writing anything. */
    m = make_meta(100, 10, 1, 3, KD_DTYPE_F32, 100);
    tmp_path(path, sizeof path, "wdup.h5");
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    chunk_data d;
    chunk_make(&m, 0, 100, &d);
    d.ti[40 * 3 + 1] = d.ti[40 * 3 + 0];
    assert_int_equal(kd_cache_writer_put(w, 0, NULL, d.tv, d.ti, d.lse, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "row 40 view 0"));
    assert_non_null(strstr(kd_last_error(), "duplicate class index"));
    d.ti[40 * 3 + 1] = topk_class(&m, 40, 0, 1);
    const float l60 = d.lse[60];
    d.lse[60] = d.tv[60 * 3] - 1.0f;
    assert_int_equal(kd_cache_writer_put(w, 0, NULL, d.tv, d.ti, d.lse, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "row 60 view 0"));
    d.lse[60] = l60;
    /* the slots in ascending order (row 70's entry reversed) */
    const float t0 = d.tv[70 * 3];
    const int32_t i0 = d.ti[70 * 3];
    d.tv[70 * 3] = d.tv[70 * 3 + 2];
    d.ti[70 * 3] = d.ti[70 * 3 + 2];
    d.tv[70 * 3 + 2] = t0;
    d.ti[70 * 3 + 2] = i0;
    assert_int_equal(kd_cache_writer_put(w, 0, NULL, d.tv, d.ti, d.lse, d.aug, d.lab),
                     KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "row 70 view 0"));
    assert_non_null(strstr(kd_last_error(), "descending"));
    assert_int_equal(kd_cache_writer_chunk_done(w, 0), 0);
    chunk_free(&d);
    assert_ok(kd_cache_writer_close(w));
}

/* Flip one byte inside the stored chunk of /name that holds `row` (its checksum then fails). */
static void damage_chunk(const char *path, const char *name, int64_t row)
{
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    assert_true(d >= 0);
    hsize_t at[3] = {(hsize_t)row, 0, 0};
    unsigned mask = 0;
    haddr_t addr = HADDR_UNDEF;
    hsize_t size = 0;
    assert_true(H5Dget_chunk_info_by_coord(d, at, &mask, &addr, &size) >= 0);
    assert_true(addr != HADDR_UNDEF && size > 8);
    assert_true(H5Dclose(d) >= 0);
    assert_true(H5Fclose(f) >= 0);
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char b;
    off_t off = (off_t)(addr + size / 2);
    assert_int_equal(pread(fd, &b, 1, off), 1);
    b ^= 0x10;
    assert_int_equal(pwrite(fd, &b, 1, off), 1);
    assert_int_equal(close(fd), 0);
}

/* A complete cache of m written to tmp/<name> (its path into path), opened for writing. */
static hid_t written_rw(const char *name, const kd_cache_meta *m, char *path, size_t len)
{
    tmp_path(path, len, name);
    write_cache(path, m, NULL, 1);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    return f;
}

/* A chunk the file's index has lost reads back as the fill value (zeros) without an HDF5 error:
 * here /labels is made again with chunks allocated only when written, and chunk 0 never is. The
 * reader and a resuming writer refuse the file, naming the chunk. */
static void test_missing_chunk(void **state)
{
    (void)state;
    char path[512];
    kd_cache_meta m = make_meta(1000, 10, 2, 0, KD_DTYPE_F32, 128);
    hid_t f = written_rw("hole.h5", &m, path, sizeof path);
    int32_t *lab = malloc(sizeof(int32_t) * 1000);
    assert_non_null(lab);
    hid_t d = H5Dopen2(f, "labels", H5P_DEFAULT);
    assert_true(d >= 0);
    assert_true(H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, lab) >= 0);
    assert_true(H5Dclose(d) >= 0);
    assert_true(H5Ldelete(f, "labels", H5P_DEFAULT) >= 0);
    hsize_t n = 1000, chunk = 128, start = 128, count = 1000 - 128;
    hid_t sp = H5Screate_simple(1, &n, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    assert_true(sp >= 0 && dcpl >= 0);
    assert_true(H5Pset_chunk(dcpl, 1, &chunk) >= 0);
    assert_true(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_INCR) >= 0);
    d = H5Dcreate2(f, "labels", H5T_STD_I32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(d >= 0);
    hid_t ms = H5Screate_simple(1, &count, NULL);
    assert_true(ms >= 0);
    assert_true(H5Sselect_hyperslab(sp, H5S_SELECT_SET, &start, NULL, &count, NULL) >= 0);
    assert_true(H5Dwrite(d, H5T_NATIVE_INT32, ms, sp, H5P_DEFAULT, lab + 128) >= 0);
    assert_true(H5Sclose(ms) >= 0 && H5Sclose(sp) >= 0 && H5Pclose(dcpl) >= 0);
    assert_true(H5Dclose(d) >= 0 && H5Fclose(f) >= 0);
    free(lab);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "/labels has no chunk at [0]", "damaged");
    kd_cache_writer *w = (kd_cache_writer *)1;
    kd_clear_error();
    assert_int_equal(kd_cache_writer_open(path, &m, NULL, &w), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "/labels has no chunk at [0]"));
}

/* A contiguous dataset that was never written (no storage allocated: h5py's create_dataset
 * without data) is refused, not read as its fill value. */
static void test_contiguous_unwritten(void **state)
{
    (void)state;
    char path[512];
    kd_cache_meta m = make_meta(300, 10, 1, 0, KD_DTYPE_F32, 100);
    hid_t f = written_rw("contig.h5", &m, path, sizeof path);
    assert_true(H5Ldelete(f, "logits", H5P_DEFAULT) >= 0);
    hsize_t dims[3] = {300, 1, 10};
    hid_t sp = H5Screate_simple(3, dims, NULL);
    assert_true(sp >= 0);
    hid_t d = H5Dcreate2(f, "logits", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(d >= 0);
    assert_true(H5Dclose(d) >= 0 && H5Sclose(sp) >= 0 && H5Fclose(f) >= 0);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "dataset /logits was never written", NULL);
}

/* A chunk whose checksum fails: the reader says the cache is damaged and what to do; inspect
 * does not call it complete; a resuming writer marks the chunk missing (on disk too) and a
 * rewrite of it repairs the cache; a compressed cache is refused instead. */
static void test_damaged_chunk(void **state)
{
    char path[512];
    tmp_path(path, sizeof path, "flip.h5");
    kd_cache_meta m = make_meta(1000, 10, 2, 0, KD_DTYPE_F16, 128);
    write_cache(path, &m, NULL, 1);
    damage_chunk(path, "logits", 300); /* chunk 2, rows 256..383 */
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "rows 256..383 of /logits cannot be read",
                     "run `distill cache` again");
    assert_non_null(strstr(kd_last_error(), "Fletcher32"));
    kd_cache_info info;
    kd_clear_error();
    assert_int_equal(kd_cache_inspect(path, 1, &info), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), path));
    assert_non_null(strstr(kd_last_error(), "chunk 2 (rows 256..383)"));
    /* without scan_file the file's metadata and /done are read, not its chunks */
    assert_ok(kd_cache_inspect(path, 0, &info));
    assert_int_equal(info.chunks_missing, 0);

    kd_cache_writer *w;
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_chunks_missing(w), 1);
    assert_int_equal(kd_cache_writer_chunks_damaged(w), 1);
    assert_int_equal(kd_cache_writer_chunk_done(w, 2), 0);
    assert_ok(kd_cache_writer_close(w));
    /* /done now says so: a reader calls it incomplete */
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "1 of 8 chunks are missing", "chunk 2");
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_chunks_damaged(w), 0);
    assert_ok(put_chunk(w, &m, 2));
    assert_ok(kd_cache_writer_close(w));
    check_cache(path, &m);
    assert_ok(kd_cache_inspect(path, 1, &info));
    assert_int_equal(info.chunks_missing, 0);

    /* /done itself: the reader says what to do, and a resuming writer, which cannot know which
     * chunks were written, writes them all again */
    damage_chunk(path, "done", 0);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "its /done dataset", "run `distill cache` again");
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_true(kd_cache_writer_done_lost(w));
    assert_int_equal(kd_cache_writer_chunks_missing(w), 8);
    assert_ok(kd_cache_writer_close(w));
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "8 of 8 chunks are missing", "resume");
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_false(kd_cache_writer_done_lost(w));
    for (int ch = 0; ch < 8; ch++)
        assert_ok(put_chunk(w, &m, ch));
    assert_ok(kd_cache_writer_close(w));
    check_cache(path, &m);

    /* /aug_params of a top-k cache: the same */
    m = make_meta(500, 10, 1, 3, KD_DTYPE_F32, 100);
    tmp_path(path, sizeof path, "flipk.h5");
    write_cache(path, &m, NULL, 1);
    damage_chunk(path, "aug_params", 499);
    expect_open_fail(path, NULL, KD_ERR_FORMAT, "rows 400..499 of /aug_params", "damaged");
    assert_ok(kd_cache_writer_open(path, &m, NULL, &w));
    assert_int_equal(kd_cache_writer_chunk_done(w, 4), 0);
    assert_int_equal(kd_cache_writer_chunks_missing(w), 1);
    assert_ok(put_chunk(w, &m, 4));
    assert_ok(kd_cache_writer_close(w));
    check_cache(path, &m);

    if (!kd_cache_compress_available(KD_CACHE_COMPRESS_DEFLATE))
        return;
    kd_cache_write_opts o;
    kd_cache_write_opts_init(&o);
    o.compress = KD_CACHE_COMPRESS_DEFLATE;
    m = make_meta(500, 10, 1, 0, KD_DTYPE_F32, 100);
    tmp_path(path, sizeof path, "flipz.h5");
    write_cache(path, &m, &o, 1);
    damage_chunk(path, "logits", 150);
    kd_clear_error();
    w = (kd_cache_writer *)1;
    assert_int_equal(kd_cache_writer_open(path, &m, &o, &w), KD_ERR_FORMAT);
    assert_null(w);
    assert_non_null(strstr(kd_last_error(), path));
    assert_non_null(strstr(kd_last_error(), "compressed"));
    assert_non_null(strstr(kd_last_error(), "chunk 1 (rows 100..199)"));
    /* its /done unreadable: not rewritten either */
    tmp_path(path, sizeof path, "flipzd.h5");
    write_cache(path, &m, &o, 1);
    damage_chunk(path, "done", 0);
    kd_clear_error();
    assert_int_equal(kd_cache_writer_open(path, &m, &o, &w), KD_ERR_FORMAT);
    assert_null(w);
    assert_non_null(strstr(kd_last_error(), "its /done dataset"));
    assert_non_null(strstr(kd_last_error(), "is compressed"));
    assert_non_null(strstr(kd_last_error(), "delete it"));
}

/* Child of test_not_writable (no cmocka asserts here): 0 when every check holds. */
static int not_writable_child(const char *good, const char *half, const char *junk,
                              const kd_cache_meta *m)
{
    kd_cache_writer *w = NULL;
    if (access(good, W_OK) == 0 || errno != EACCES)
        return 10;
    /* complete: opened read-only, nothing to write */
    if (kd_cache_writer_open(good, m, NULL, &w) != KD_OK) {
        fprintf(stderr, "complete: %s\n", kd_last_error());
        return 11;
    }
    if (kd_cache_writer_chunks_missing(w) != 0 || put_chunk(w, m, 0) != KD_ERR_IO ||
        !strstr(kd_last_error(), "read-only") || kd_cache_writer_close(w) != KD_OK)
        return 12;
    /* incomplete: refused, saying why, not called damaged */
    kd_status st = kd_cache_writer_open(half, m, NULL, &w);
    const char *msg = kd_last_error();
    fprintf(stderr, "incomplete: %s\n", msg);
    if (st != KD_ERR_IO || w || !strstr(msg, half) || !strstr(msg, strerror(EACCES)) ||
        !strstr(msg, "not damaged") || strstr(msg, "delete"))
        return 13;
    /* the reader opens it as before */
    kd_cache *c;
    if (kd_cache_open(good, NULL, &c) != KD_OK)
        return 14;
    kd_cache_close(c);
    /* not HDF5 at all: damaged */
    st = kd_cache_writer_open(junk, m, NULL, &w);
    msg = kd_last_error();
    fprintf(stderr, "junk: %s\n", msg);
    if (st != KD_ERR_FORMAT || !strstr(msg, junk) || !strstr(msg, "not an HDF5 file"))
        return 15;
    return 0;
}

/* A cache on a read-only file system or without write permission: a complete one is opened
 * read-only, an incomplete one refused with the reason, and only a file that is not a cache is
 * called damaged. As root (who may write anyway) the checks run in a child that drops to an
 * unprivileged user. */
static void test_not_writable(void **state)
{
    char good[512], half[512], junk[512];
    tmp_path(good, sizeof good, "ro_good.h5");
    tmp_path(half, sizeof half, "ro_half.h5");
    tmp_path(junk, sizeof junk, "ro_junk.h5");
    kd_cache_meta m = make_meta(400, 10, 1, 0, KD_DTYPE_F16, 100);
    write_cache(good, &m, NULL, 1);
    write_cache(half, &m, NULL, 2);
    FILE *f = fopen(junk, "w");
    assert_non_null(f);
    fputs("not hdf5\n", f);
    assert_int_equal(fclose(f), 0);
    const char *files[] = {good, half, junk};
    for (int i = 0; i < 3; i++)
        assert_int_equal(chmod(files[i], 0444), 0);
    assert_int_equal(chmod(tmpdir, 0755), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(77);
        _exit(not_writable_child(good, half, junk, &m));
    }
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    assert_int_equal(chmod(tmpdir, 0700), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(chmod(files[i], 0644), 0);
    assert_true(WIFEXITED(ws));
    if (WEXITSTATUS(ws) == 77) {
        print_message("skipped: cannot drop root privileges to test a file that is not "
                      "writable\n");
        return;
    }
    assert_int_equal(WEXITSTATUS(ws), 0);
}

/* A cache another process holds open (HDF5 locks the files it opens) is not called damaged. */
static void test_open_elsewhere(void **state)
{
    const char *lk = getenv("HDF5_USE_FILE_LOCKING");
    if (lk && (strcmp(lk, "FALSE") == 0 || strcmp(lk, "0") == 0)) {
        print_message("skipped: HDF5 file locking is off\n");
        return;
    }
    char path[512];
    tmp_path(path, sizeof path, "busy.h5");
    kd_cache_meta m = make_meta(300, 10, 1, 0, KD_DTYPE_F32, 100);
    write_cache(path, &m, NULL, 1);
    int up[2], down[2];
    assert_int_equal(pipe(up), 0);
    assert_int_equal(pipe(down), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* hold the cache open for writing until the parent closes its pipe */
        close(up[0]);
        close(down[1]);
        kd_cache_writer *w;
        char b = kd_cache_writer_open(path, &m, NULL, &w) == KD_OK ? 'y' : 'n';
        if (write(up[1], &b, 1) != 1 || read(down[0], &b, 1) < 0)
            _exit(2);
        kd_cache_writer_close(w);
        _exit(0);
    }
    close(up[1]);
    close(down[0]);
    char b = 0;
    assert_int_equal(read(up[0], &b, 1), 1);
    assert_int_equal(b, 'y');
    kd_cache_writer *w = NULL;
    kd_clear_error();
    kd_status st = kd_cache_writer_open(path, &m, NULL, &w);
    char msg[KD_ERRMSG_MAX];
    snprintf(msg, sizeof msg, "%s", kd_last_error());
    kd_cache *c = NULL;
    kd_status st2 = kd_cache_open(path, NULL, &c);
    char msg2[KD_ERRMSG_MAX];
    snprintf(msg2, sizeof msg2, "%s", kd_last_error());
    close(down[1]);
    close(up[0]);
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    print_message("refused as expected: %s\n", msg);
    assert_int_equal(st, KD_ERR_IO);
    assert_null(w);
    assert_non_null(strstr(msg, path));
    assert_non_null(strstr(msg, "open in another process"));
    assert_null(strstr(msg, "delete"));
    assert_int_equal(st2, KD_ERR_IO);
    assert_null(c);
    assert_non_null(strstr(msg2, "open in another process"));
    assert_true(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
    check_cache(path, &m);
}

static int setup(void **state)
{
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/kd_cache_XXXXXX", base);
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16),
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_roundtrip_full_f32),
        cmocka_unit_test(test_roundtrip_full_f16),
        cmocka_unit_test(test_roundtrip_topk),
        cmocka_unit_test(test_chunk_boundaries),
        cmocka_unit_test(test_view_mean),
        cmocka_unit_test(test_compression),
        cmocka_unit_test(test_resume_after_sigkill),
        cmocka_unit_test(test_reader_mismatches),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_half_written),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_done_values),
        cmocka_unit_test(test_writer_refuses),
        cmocka_unit_test(test_bad_attrs),
        cmocka_unit_test(test_augment_attr),
        cmocka_unit_test(test_topk_entries),
        cmocka_unit_test(test_damaged_chunk),
        cmocka_unit_test(test_missing_chunk),
        cmocka_unit_test(test_contiguous_unwritten),
        cmocka_unit_test(test_not_writable),
        cmocka_unit_test(test_open_elsewhere),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
