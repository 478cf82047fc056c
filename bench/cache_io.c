/*
 * cache_io.c - teacher-cache I/O: for a Fashion-MNIST-sized cache (55000 rows x
 * 10 classes, 1 and 4 views, float32 and float16) and each compression choice
 * (none, shuffle+deflate 1 and 4, lz4/zstd when the plugin loads), the file
 * size, write MB/s (kd_cache_writer: chunks of 1024 rows, flush + fsync per
 * chunk as in production) and read MB/s (kd_cache_open loading the whole
 * cache with its checks, and one streamed epoch in a chunk-shuffled order).
 * MB/s are logical bytes (the datasets' uncompressed contents) per second,
 * MB = 1e6 bytes. The peer is a raw binary file of the same bytes written
 * with fwrite + fsync and read with fread. Reads hit the page cache (the file
 * was just written), so they measure HDF5, filters and checks, not the disk.
 * Every configuration is read back and compared before it is timed.
 *
 *     bench_cache_io [--out bench/results/cache_io.json] [--dir /tmp] [--reps 3]
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "augment.h"
#include "cache.h"
#include "sampler.h"

#ifndef KD_SOURCE_DIR
#define KD_SOURCE_DIR "."
#endif

#define N_ROWS    55000
#define N_CLASSES 10

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Logit-like values: a sum of uniforms (roughly normal, sd ~3), full-entropy mantissas. */
static float *make_logits(int views, uint64_t seed)
{
    size_t n = (size_t)N_ROWS * views * N_CLASSES;
    float *x = malloc(n * sizeof *x);
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        double acc = 0;
        for (int k = 0; k < 4; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            acc += (double)(s >> 11) * 0x1p-53 - 0.5;
        }
        x[i] = (float)(acc * 5.2);
    }
    return x;
}

typedef struct {
    const char *name;
    kd_cache_compress comp;
    int level;
} comp_choice;

typedef struct {
    int views;
    const char *dtype;
    const char *compress;
    double size_mb, ratio, write_mbs, read_mbs, stream_mbs;
} result;

static size_t logical_bytes(int views, kd_dtype dt)
{
    size_t es = dt == KD_DTYPE_F16 ? 2 : 4;
    return (size_t)N_ROWS * views * N_CLASSES * es + (size_t)N_ROWS * views * KD_AUG_NPARAMS * 4 +
           (size_t)N_ROWS * 4;
}

static int fail(const char *what)
{
    fprintf(stderr, "bench_cache_io: %s: %s\n", what, kd_last_error());
    return 1;
}

/* Write the whole cache; returns seconds or -1. */
static double write_cache(const char *path, const kd_cache_meta *m, const kd_cache_write_opts *o,
                          const float *logits, const float *aug, const int32_t *lab)
{
    unlink(path);
    double t0 = now_s();
    kd_cache_writer *w;
    if (kd_cache_writer_open(path, m, o, &w) != KD_OK)
        return -1;
    size_t per = (size_t)m->views * N_CLASSES;
    for (int64_t ch = 0; ch < kd_cache_writer_num_chunks(w); ch++) {
        size_t r0 = (size_t)(ch * m->chunk_rows);
        if (kd_cache_writer_put(w, ch, logits + r0 * per, NULL, NULL, NULL,
                                aug + r0 * m->views * KD_AUG_NPARAMS, lab + r0) != KD_OK) {
            kd_cache_writer_close(w);
            return -1;
        }
    }
    if (kd_cache_writer_close(w) != KD_OK)
        return -1;
    return now_s() - t0;
}

static void expect_of(kd_cache_expect *e, const kd_cache_meta *m)
{
    kd_cache_expect_init(e);
    e->num_samples = m->num_samples;
    e->num_classes = m->num_classes;
    e->views = m->views;
    e->topk = 0;
    e->dtype = (int)m->dtype;
}

/* Everything read back equals what was written (float16: the rounded values). */
static int validate(const char *path, const kd_cache_meta *m, const float *logits,
                    const int32_t *lab)
{
    kd_cache_expect e;
    expect_of(&e, m);
    kd_cache *c;
    if (kd_cache_open(path, &e, &c) != KD_OK)
        return fail("validate open");
    uint32_t rows[1000];
    float out[1000 * N_CLASSES];
    int32_t y[1000];
    int bad = 0;
    for (int64_t r0 = 0; r0 < N_ROWS && !bad; r0 += 1000) {
        for (int i = 0; i < 1000; i++)
            rows[i] = (uint32_t)((r0 + i * 7919) % N_ROWS);
        for (int v = 0; v < m->views && !bad; v++) {
            if (kd_cache_get_rows(c, rows, 1000, v, out, NULL, NULL, NULL, NULL, y) != KD_OK)
                return fail("validate get_rows");
            for (int i = 0; i < 1000 && !bad; i++) {
                bad |= y[i] != lab[rows[i]];
                for (int k = 0; k < N_CLASSES; k++) {
                    float want = logits[((size_t)rows[i] * m->views + v) * N_CLASSES + k];
                    if (m->dtype == KD_DTYPE_F16)
                        want = kd_f16_to_f32(kd_f32_to_f16(want));
                    bad |= out[i * N_CLASSES + k] != want;
                }
            }
        }
    }
    kd_cache_close(c);
    if (bad)
        fprintf(stderr, "bench_cache_io: %s: read back differs from what was written\n", path);
    return bad;
}

/* Chunk-shuffled epoch order: chunks in a random order, rows shuffled within each chunk. */
static void chunk_order(uint32_t *order, int64_t chunk_rows)
{
    int64_t nch = (N_ROWS + chunk_rows - 1) / chunk_rows, k = 0;
    uint32_t *perm = malloc(sizeof *perm * (size_t)nch);
    for (int64_t i = 0; i < nch; i++)
        perm[i] = (uint32_t)i;
    srand(5);
    for (int64_t i = nch - 1; i > 0; i--) {
        int64_t j = rand() % (i + 1);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int64_t i = 0; i < nch; i++) {
        int64_t r0 = (int64_t)perm[i] * chunk_rows, r1 = r0 + chunk_rows;
        if (r1 > N_ROWS)
            r1 = N_ROWS;
        int64_t b = k;
        for (int64_t r = r0; r < r1; r++)
            order[k++] = (uint32_t)r;
        for (int64_t r = k - 1; r > b; r--) {
            int64_t j = b + rand() % (r - b + 1);
            uint32_t t = order[r];
            order[r] = order[j];
            order[j] = t;
        }
    }
    free(perm);
}

/* Seconds to load the whole cache (best of reps), or to stream one epoch when streamed. */
static double read_cache(const char *path, const kd_cache_meta *m, int reps, int streamed)
{
    kd_cache_expect e;
    expect_of(&e, m);
    if (streamed)
        e.memory_limit = -1;
    double best = 1e30;
    uint32_t *order = malloc(sizeof *order * N_ROWS);
    float *out = malloc(sizeof(float) * 256 * N_CLASSES);
    chunk_order(order, m->chunk_rows);
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        kd_cache *c;
        if (kd_cache_open(path, &e, &c) != KD_OK) {
            fail("read open");
            best = -1;
            break;
        }
        if (streamed) {
            /* One epoch: every row once, a view chosen per batch (all views are read). */
            kd_cache_stream_begin(c, order, N_ROWS);
            for (int64_t p = 0; p < N_ROWS; p += 256) {
                int cnt = (int)(N_ROWS - p < 256 ? N_ROWS - p : 256);
                if (kd_cache_get_rows(c, order + p, cnt, (int)(p / 256) % m->views, out, NULL, NULL,
                                      NULL, NULL, NULL) != KD_OK) {
                    fail("stream get_rows");
                    best = -1;
                    break;
                }
            }
        }
        kd_cache_close(c);
        double t = now_s() - t0;
        if (t < best)
            best = t;
    }
    free(order);
    free(out);
    return best;
}

/* The peer: the same logical bytes in a raw file, fwrite + fsync, then fread. */
static void raw_peer(const char *path, const float *logits, size_t nlogits, size_t bytes, int reps,
                     double *w_s, double *r_s)
{
    uint8_t *src = calloc(bytes, 1);
    memcpy(src, logits, nlogits * sizeof(float) < bytes ? nlogits * sizeof(float) : bytes);
    double t0 = now_s();
    FILE *f = fopen(path, "wb");
    fwrite(src, 1, bytes, f);
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    *w_s = now_s() - t0;
    void *buf = malloc(bytes);
    *r_s = 1e30;
    for (int r = 0; r < reps; r++) {
        t0 = now_s();
        f = fopen(path, "rb");
        size_t got = fread(buf, 1, bytes, f);
        fclose(f);
        double t = now_s() - t0;
        if (got == bytes && t < *r_s)
            *r_s = t;
    }
    free(buf);
    free(src);
    unlink(path);
}

int main(int argc, char **argv)
{
    const char *out_json = KD_SOURCE_DIR "/bench/results/cache_io.json";
    const char *dir = "/tmp";
    int reps = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc)
            out_json = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--out file.json] [--dir tmpdir] [--reps n]\n", argv[0]);
            return 2;
        }
    }
    comp_choice comps[5] = {
        {"none", KD_CACHE_COMPRESS_NONE, 0},
        {"shuffle+deflate-1", KD_CACHE_COMPRESS_DEFLATE, 1},
        {"shuffle+deflate-4", KD_CACHE_COMPRESS_DEFLATE, 4},
    };
    int ncomp = 3;
    if (kd_cache_compress_available(KD_CACHE_COMPRESS_LZ4))
        comps[ncomp++] = (comp_choice){"shuffle+lz4", KD_CACHE_COMPRESS_LZ4, 0};
    else
        printf("lz4: HDF5 filter 32004 not available (hdf5-filter-plugin); skipped\n");
    if (kd_cache_compress_available(KD_CACHE_COMPRESS_ZSTD))
        comps[ncomp++] = (comp_choice){"shuffle+zstd-3", KD_CACHE_COMPRESS_ZSTD, 3};
    else
        printf("zstd: HDF5 filter 32015 not available (no zstd plugin installed); skipped\n");

    char path[1024], rawpath[1024];
    snprintf(path, sizeof path, "%s/kd_bench_cache_%ld.h5", dir, (long)getpid());
    snprintf(rawpath, sizeof rawpath, "%s/kd_bench_raw_%ld.bin", dir, (long)getpid());
    result res[64];
    int nres = 0;
    double peer_w[2][2], peer_r[2][2];
    const int view_set[2] = {1, 4};
    const kd_dtype dt_set[2] = {KD_DTYPE_F32, KD_DTYPE_F16};

    printf("\n%-5s %-7s %-18s %9s %6s %10s %10s %10s\n", "views", "dtype", "compression", "size MB",
           "ratio", "write MB/s", "load MB/s", "strm MB/s");
    for (int vi = 0; vi < 2; vi++) {
        int V = view_set[vi];
        float *logits = make_logits(V, 1 + (uint64_t)V);
        float *aug = malloc(sizeof(float) * N_ROWS * V * KD_AUG_NPARAMS);
        int32_t *lab = malloc(sizeof(int32_t) * N_ROWS);
        kd_augment_cfg acfg = {2, 1};
        for (int64_t r = 0; r < N_ROWS; r++) {
            lab[r] = (int32_t)(r % N_CLASSES);
            for (int v = 0; v < V; v++)
                kd_augment_draw(&acfg, 42, (uint64_t)v, (uint64_t)r,
                                aug + ((size_t)r * V + v) * KD_AUG_NPARAMS);
        }
        for (int di = 0; di < 2; di++) {
            kd_cache_meta m;
            memset(&m, 0, sizeof m);
            m.num_samples = N_ROWS;
            m.num_classes = N_CLASSES;
            m.views = V;
            m.dtype = dt_set[di];
            m.aug_nparams = KD_AUG_NPARAMS;
            m.chunk_rows = 1024;
            size_t lb = logical_bytes(V, m.dtype);
            raw_peer(rawpath, logits, (size_t)N_ROWS * V * N_CLASSES, lb, reps, &peer_w[vi][di],
                     &peer_r[vi][di]);
            printf("%-5d %-7s %-18s %9.2f %6.2f %10.1f %10.1f %10s\n", V,
                   m.dtype == KD_DTYPE_F16 ? "float16" : "float32", "raw file (peer)", lb / 1e6,
                   1.0, lb / 1e6 / peer_w[vi][di], lb / 1e6 / peer_r[vi][di], "-");
            for (int ci = 0; ci < ncomp; ci++) {
                kd_cache_write_opts o;
                kd_cache_write_opts_init(&o);
                o.compress = comps[ci].comp;
                o.level = comps[ci].level;
                if (write_cache(path, &m, &o, logits, aug, lab) < 0)
                    return fail("write");
                if (validate(path, &m, logits, lab))
                    return 1;
                double wt = 1e30;
                for (int r = 0; r < reps; r++) {
                    double t = write_cache(path, &m, &o, logits, aug, lab);
                    if (t < 0)
                        return fail("write");
                    if (t < wt)
                        wt = t;
                }
                struct stat sb;
                stat(path, &sb);
                double rt = read_cache(path, &m, reps, 0), st = read_cache(path, &m, reps, 1);
                if (rt < 0 || st < 0)
                    return 1;
                result *R = &res[nres++];
                R->views = V;
                R->dtype = m.dtype == KD_DTYPE_F16 ? "float16" : "float32";
                R->compress = comps[ci].name;
                R->size_mb = (double)sb.st_size / 1e6;
                R->ratio = (double)lb / (double)sb.st_size;
                R->write_mbs = lb / 1e6 / wt;
                R->read_mbs = lb / 1e6 / rt;
                R->stream_mbs = lb / 1e6 / st;
                printf("%-5d %-7s %-18s %9.2f %6.2f %10.1f %10.1f %10.1f\n", V, R->dtype,
                       R->compress, R->size_mb, R->ratio, R->write_mbs, R->read_mbs, R->stream_mbs);
            }
            unlink(path);
        }
        free(logits);
        free(aug);
        free(lab);
    }
    printf("\nratio = logical bytes / file size; MB/s = logical bytes (1e6) per second; load = "
           "kd_cache_open holding the whole cache (checks included); strm = one epoch streamed "
           "in a chunk-shuffled order (best of reps); peer = raw fwrite+fsync / fread of the same "
           "bytes. Writes fsync twice per 1024-row chunk.\n");

    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "benchmark", "cache_io");
    cJSON_AddNumberToObject(root, "rows", N_ROWS);
    cJSON_AddNumberToObject(root, "classes", N_CLASSES);
    cJSON_AddNumberToObject(root, "chunk_rows", 1024);
    cJSON_AddNumberToObject(root, "reps", reps);
    cJSON_AddStringToObject(root, "units", "MB = 1e6 logical (uncompressed) bytes");
    cJSON *peers = cJSON_AddArrayToObject(root, "peer_raw_file");
    for (int vi = 0; vi < 2; vi++)
        for (int di = 0; di < 2; di++) {
            cJSON *p = cJSON_CreateObject();
            size_t lb = logical_bytes(view_set[vi], dt_set[di]);
            cJSON_AddNumberToObject(p, "views", view_set[vi]);
            cJSON_AddStringToObject(p, "dtype", di ? "float16" : "float32");
            cJSON_AddNumberToObject(p, "write_mb_s", lb / 1e6 / peer_w[vi][di]);
            cJSON_AddNumberToObject(p, "read_mb_s", lb / 1e6 / peer_r[vi][di]);
            cJSON_AddItemToArray(peers, p);
        }
    cJSON *arr = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; i < nres; i++) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddNumberToObject(r, "views", res[i].views);
        cJSON_AddStringToObject(r, "dtype", res[i].dtype);
        cJSON_AddStringToObject(r, "compression", res[i].compress);
        cJSON_AddNumberToObject(r, "file_mb", round(res[i].size_mb * 1000) / 1000);
        cJSON_AddNumberToObject(r, "compression_ratio", round(res[i].ratio * 1000) / 1000);
        cJSON_AddNumberToObject(r, "write_mb_s", round(res[i].write_mbs * 10) / 10);
        cJSON_AddNumberToObject(r, "load_mb_s", round(res[i].read_mbs * 10) / 10);
        cJSON_AddNumberToObject(r, "stream_mb_s", round(res[i].stream_mbs * 10) / 10);
        cJSON_AddItemToArray(arr, r);
    }
    char *txt = cJSON_Print(root);
    FILE *f = fopen(out_json, "w");
    if (!f) {
        fprintf(stderr, "bench_cache_io: cannot write %s\n", out_json);
        return 1;
    }
    fprintf(f, "%s\n", txt);
    fclose(f);
    printf("wrote %s\n", out_json);
    free(txt);
    cJSON_Delete(root);
    return 0;
}
