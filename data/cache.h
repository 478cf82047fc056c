/*
 * cache.h - the teacher-logit cache: an HDF5 file of raw teacher logits (T = 1)
 * for every sample and augmented view, written once by `distill cache` and read
 * by every student run. data/README.md documents its schema, for writers in other frameworks
 * too.
 *
 * Shapes: N samples (rows), V views per sample, C classes, K top-k entries
 * (K = 0 stores the full C logits), P = KD_AUG_NPARAMS augmentation floats.
 * A file holds rows [row_begin, row_end) of an N-row global cache. One
 * process writes one file holding [0, N). W processes (`mpirun -np W distill
 * cache`) write one shard each, kd_cache_shard_path(path, r, W), holding the
 * rows of a contiguous range of whole chunks, and then a small HDF5
 * virtual-dataset (VDS) file at path whose datasets map row ranges onto the
 * shards (kd_cache_vds_write). Readers open path and see one [0, N) cache.
 *
 * Writing (resumable):
 *
 *     kd_cache_meta m = {.num_samples = n, .num_classes = 10, .views = 1,
 *                        .dtype = KD_DTYPE_F16, .aug_nparams = KD_AUG_NPARAMS};
 *     strcpy(m.teacher_sha256, teacher_hex);  strcpy(m.dataset_sha256, data_hex);
 *     kd_cache_writer *w;
 *     KD_TRY(kd_cache_writer_open("t.h5", &m, NULL, &w));
 *     for (int64_t i = 0; i < kd_cache_writer_num_chunks(w); i++)
 *         if (!kd_cache_writer_chunk_done(w, i))
 *             ... compute rows of chunk i, kd_cache_writer_put(w, i, logits, ...);
 *     KD_TRY(kd_cache_writer_close(w));
 *
 * Every put writes one chunk of rows, flushes (and fsyncs) the file, and only
 * then sets /done[chunk] = 1 and flushes again. A process killed at any point
 * leaves a file whose done chunks are complete; opening it again with the
 * same metadata resumes. Opening it with other metadata is an error naming
 * both sides: a cache is never silently overwritten.
 *
 * Reading:
 *
 *     kd_cache_expect e;
 *     kd_cache_expect_init(&e);            every field "not checked"
 *     e.num_samples = n; e.num_classes = 10; e.views = 1;
 *     strcpy(e.teacher_sha256, teacher_hex);
 *     kd_cache *c;
 *     KD_TRY(kd_cache_open("t.h5", &e, &c));
 *     KD_TRY(kd_cache_get_rows(c, idx, count, view, logits, NULL, NULL, NULL, NULL, NULL));
 *     kd_cache_close(c);
 *
 * Sharded (VDS) caches: kd_cache_open checks, before reading any value,
 * that every shard the VDS file maps exists (HDF5 itself would silently read
 * fill values for a missing one), is a complete cache with the same metadata,
 * and holds exactly the rows mapped to it; the message names the VDS file and
 * the shard. Shard names in the VDS file are relative (basenames) and are
 * looked up in the VDS file's directory, whatever the working directory, so
 * the directory can be moved as a whole. HDF5_VDS_PREFIX would redirect
 * HDF5's lookup behind these checks, so a sharded cache is refused while it
 * is set.
 *
 * Status codes: KD_ERR_NOT_FOUND (no file), KD_ERR_FORMAT (not a valid cache:
 * damaged, truncated, wrong types, incomplete, non-finite values, a missing shard),
 * KD_ERR_SHAPE (N, C, V, K or P differ from the job), KD_ERR_CONFIG (hashes,
 * dtype or chunking differ; an option that cannot be honoured),
 * KD_ERR_UNSUPPORTED (a compression filter that is not installed), KD_ERR_IO.
 * Every message names the file; mismatches name both sides.
 *
 * HDF5's automatic error printing is switched off for every thread that
 * calls into this module; its error stack is folded into our messages.
 */
#ifndef KD_CACHE_H
#define KD_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KD_CACHE_FORMAT             "distill-teacher-cache"
#define KD_CACHE_VERSION            1
#define KD_CACHE_DEFAULT_CHUNK_ROWS 1024

/* Registered HDF5 filter ids of the optional compressors (hdf5-filter-plugin). */
#define KD_H5Z_FILTER_LZ4  32004
#define KD_H5Z_FILTER_ZSTD 32015

/* What a cache file is: written as root attributes, compared on resume and on open. */
typedef struct {
    int64_t num_samples;     /* N: rows of the global cache */
    int64_t row_begin;       /* rows [row_begin, row_end) live in this file; */
    int64_t row_end;         /* 0, 0 at writer_open means [0, N) */
    int num_classes;         /* C */
    int views;               /* V >= 1 */
    int topk;                /* K: 0 = full logits, else 1 <= K < C */
    int aug_nparams;         /* P: floats per view in /aug_params (KD_AUG_NPARAMS) */
    kd_dtype dtype;          /* KD_DTYPE_F32 or KD_DTYPE_F16: /logits or /topk_values */
    int64_t chunk_rows;      /* rows per chunk (HDF5 chunk and /done unit); 0 = default */
    char teacher_sha256[65]; /* hex sha256 of the teacher's weights ("" = unknown) */
    char dataset_sha256[65]; /* hex sha256 identifying the data set ("" = unknown) */
    char augment[48];        /* the views' augmentation, kd_augment_describe ("" = unknown) */
} kd_cache_meta;

typedef enum {
    KD_CACHE_COMPRESS_NONE,    /* fletcher32 only */
    KD_CACHE_COMPRESS_DEFLATE, /* gzip (built into HDF5), level 1..9 */
    KD_CACHE_COMPRESS_LZ4,     /* filter 32004: needs hdf5-filter-plugin at run time */
    KD_CACHE_COMPRESS_ZSTD,    /* filter 32015: needs a zstd HDF5 plugin at run time */
} kd_cache_compress;

/* How a new cache file is stored; ignored for a file that is resumed (its filters stay). */
typedef struct {
    kd_cache_compress compress;
    int level;   /* deflate 1..9 (0 = 4), zstd 1..22 (0 = 3); unused for lz4 */
    int shuffle; /* byte shuffle before compression: 1 on, 0 off, -1 = on when compressing */
    int fsync;   /* 1 (default): fsync after each flush so done chunks survive power loss */
} kd_cache_write_opts;

/* Defaults: no compression, shuffle -1, fsync on. */
void kd_cache_write_opts_init(kd_cache_write_opts *o);

/* "none", "deflate", "lz4", "zstd" and back (-1 when unknown). */
const char *kd_cache_compress_name(kd_cache_compress c);
int kd_cache_compress_from_name(const char *name);

/*
 * 1 when the compressor can be used in this process (deflate: HDF5 built with
 * zlib; lz4/zstd: the plugin loads). Never fails.
 */
int kd_cache_compress_available(kd_cache_compress c);

/* ---- writer ---------------------------------------------------------------------------- */

typedef struct kd_cache_writer kd_cache_writer;

/*
 * Create the cache at path, or reopen it for resume when it exists with the
 * same metadata (hashes, N, C, V, K, P, dtype, chunk_rows, row range). A new
 * file is built as path.tmp.<pid> (datasets allocated, /done all zero),
 * flushed and renamed into place, so path is never a half-created file.
 * opts may be NULL (defaults). Existing file with other metadata:
 * KD_ERR_CONFIG or KD_ERR_SHAPE naming the field, the file's value and the
 * requested one. A compressor that is not available: KD_ERR_UNSUPPORTED.
 * A sharded cache's VDS file at path is never written through: KD_ERR_CONFIG.
 * An existing file's done chunks are read back once: those that cannot be
 * read (a failing checksum) are marked not done, on disk too, and so are
 * written again (kd_cache_writer_chunks_damaged counts them); a compressed
 * file is not repaired in place (KD_ERR_FORMAT: delete it). An existing file
 * that cannot be written (read-only file system, permissions) is opened
 * read-only when it is complete and readable (kd_cache_writer_put then
 * fails), else refused with KD_ERR_IO saying why. A file another process
 * holds open, or one readable but not writable, is refused with KD_ERR_IO;
 * only a file that is not a readable cache is called damaged (KD_ERR_FORMAT).
 * On failure *out is NULL and nothing is left open.
 */
kd_status kd_cache_writer_open(const char *path, const kd_cache_meta *meta,
                               const kd_cache_write_opts *opts, kd_cache_writer **out);

/* Chunks in this file: ceil((row_end - row_begin) / chunk_rows). */
int64_t kd_cache_writer_num_chunks(const kd_cache_writer *w);
/* Rows of chunk i (chunk_rows, except a shorter last chunk); 0 when out of range. */
int64_t kd_cache_writer_chunk_nrows(const kd_cache_writer *w, int64_t chunk);
/* 1 when /done[chunk] was set (by this or an earlier run), else 0. */
int kd_cache_writer_chunk_done(const kd_cache_writer *w, int64_t chunk);
/* Chunks not yet done. */
int64_t kd_cache_writer_chunks_missing(const kd_cache_writer *w);
/* The metadata in force (defaults filled in). */
const kd_cache_meta *kd_cache_writer_meta(const kd_cache_writer *w);
/* Chunks /done claimed that could not be read back at open (now missing, to be written again). */
int64_t kd_cache_writer_chunks_damaged(const kd_cache_writer *w);
/* 1 when the existing file's /done could not be read at open: nothing says which chunks were
 * written, so all are missing (and /done zeroed on disk). Not for a compressed file or one that
 * cannot be opened for writing: those are refused. */
int kd_cache_writer_done_lost(const kd_cache_writer *w);

/*
 * Write chunk `chunk` (0-based in this file): R = kd_cache_writer_chunk_nrows
 * rows, local rows [chunk*chunk_rows, +R). Arrays are row-major float32 /
 * int32 with these shapes:
 *   full (K = 0):  logits [R, V, C]; topk_values, topk_indices, lse NULL
 *   top-k:         logits NULL; topk_values [R, V, K] (descending),
 *                  topk_indices [R, V, K] in [0, C), lse [R, V]
 *                  (kd_topk_rows computes all three from full logits)
 *   aug_params [R, V, P] (NULL writes zeros: identity views), labels [R] in [0, C).
 * Values must be finite and, for float16, within +-65504, and each top-k
 * entry must name K different classes with an lse no smaller than the
 * log-sum-exp of its K values (equal to it when K = C) (else KD_ERR_INVALID
 * naming the row and view; nothing is written). Float16 conversion rounds to
 * nearest even. Order on disk: data, flush (+fsync), /done[chunk] = 1, flush
 * (+fsync). Rewriting a done chunk is allowed (it is overwritten in place).
 */
kd_status kd_cache_writer_put(kd_cache_writer *w, int64_t chunk, const float *logits_or_null,
                              const float *topk_values, const int32_t *topk_indices,
                              const float *lse, const float *aug_params, const int32_t *labels);

/* Flush and close; frees w (also on failure). NULL is fine. */
kd_status kd_cache_writer_close(kd_cache_writer *w);

/* ---- shards and the virtual-dataset file ------------------------------------------------ */

/*
 * The shard of rank `rank` (0-based) among `world` writers of the cache at
 * path: the file name with ".shard-<rank>-of-<world>" before its extension,
 * in the same directory ("runs/t/logits.h5" -> "runs/t/logits.shard-1-of-2.h5";
 * a name without an extension gets the suffix at its end). KD_ERR_INVALID
 * when buf (len bytes) is too small.
 */
kd_status kd_cache_shard_path(const char *path, int rank, int world, char *buf, size_t len);

/*
 * Write the VDS file that stitches shard files into the cache at path.
 * meta: the global cache (num_samples N, chunk_rows as the shards use it;
 * row range ignored). shards[0..nshards) are the shard files in row order;
 * each must lie in path's directory and be a complete cache with meta's
 * metadata, and together their row ranges must tile [0, N) with every
 * boundary on a chunk_rows multiple (else KD_ERR_FORMAT / KD_ERR_CONFIG
 * naming the shard). The VDS file gets meta's root attributes with row range
 * [0, N) and one virtual dataset per schema dataset (/done included), each
 * mapping the shard's rows (or chunks) to the shard's dataset by basename.
 * It is built as path.tmp.<pid>, flushed (fsynced when sync), closed and
 * renamed over path, so path is never a half-written VDS. On failure the
 * temporary file is removed and path is untouched.
 */
kd_status kd_cache_vds_write(const char *path, const kd_cache_meta *meta, int nshards,
                             const char *const *shards, int sync);

/* What sits at a cache path (kd_cache_inspect). */
typedef struct {
    int exists;             /* 1: a file at path */
    int partial;            /* 1: no file at path but <path>.partial (an unfinished compressed
                               single-file cache) */
    int sharded;            /* 1: path is a VDS file over shards */
    int shard_world;        /* sharded: W of the ".shard-r-of-W" names it maps (0 = other names) */
    int nshards;            /* sharded: shard files it maps */
    int64_t chunks;         /* chunks of the global cache */
    int64_t chunks_missing; /* single file: /done entries still 0 */
    kd_cache_meta meta;     /* root attributes (aug_nparams from /aug_params) */
} kd_cache_info;

/*
 * Look at path: *info says whether a cache is there, single or sharded, its
 * metadata and (single) how many chunks are missing. A sharded cache's shards
 * are checked as kd_cache_open checks them; when one is missing or bad the
 * status says so (naming it) while info->exists, sharded, shard_world and
 * meta are still filled in. Every written chunk of each shard, and with
 * scan_file those of a single file, is read back once, without checking
 * values: one that cannot be read is KD_ERR_FORMAT naming the file, the chunk
 * and its rows (a writer opening the file reads its chunks back itself, so a
 * caller about to open one passes scan_file 0). No file: KD_OK with exists 0.
 * A file that is not a readable cache: its kd_cache_open error.
 */
kd_status kd_cache_inspect(const char *path, int scan_file, kd_cache_info *info);

/*
 * KD_OK when an existing cache's metadata `have` (say, from kd_cache_inspect)
 * is what a writer of `want` would produce: hashes, N, C, V, K, P, dtype,
 * chunk_rows (0 in want = the default) and row range (0, 0 = [0, N)). Else
 * KD_ERR_SHAPE or KD_ERR_CONFIG naming path, the field and both values.
 */
kd_status kd_cache_meta_compare(const char *path, const kd_cache_meta *have,
                                const kd_cache_meta *want);

/*
 * Top-k of n rows of c logits: values[n*k] sorted descending (ties: lower
 * class index first), indices[n*k] the classes, lse[n] = log sum_j exp(x_j)
 * over the full row (computed stably in double). 1 <= k <= c.
 */
void kd_topk_rows(const float *logits, int n, int c, int k, float *values, int32_t *indices,
                  float *lse);

/* IEEE binary16 conversions: round to nearest even, overflow to +-Inf, NaN kept. */
uint16_t kd_f32_to_f16(float x);
float kd_f16_to_f32(uint16_t h);

/* ---- reader ---------------------------------------------------------------------------- */

/* What the job expects; -1 or "" leaves a field unchecked. */
typedef struct {
    int64_t num_samples;
    int num_classes;
    int views;
    int topk;  /* 0 = full logits */
    int dtype; /* KD_DTYPE_F32 / KD_DTYPE_F16, -1 any */
    int aug_nparams;
    char teacher_sha256[65];
    char dataset_sha256[65];
    char augment[48]; /* the job's data.augment as kd_augment_describe writes it */
    /* num_samples labels the cache's rows must hold, row by row (NULL: only their range is
     * checked); borrowed: it must outlive the opened cache, whose streaming checks read it */
    const int32_t *labels;
    /* Loading options (not checks). */
    int64_t memory_limit; /* bytes: hold the whole cache when it fits (0 = 2 GiB; -1 = stream) */
    int prefetch_slots;   /* streaming ring size (0 = 4) */
    int64_t slot_rows;    /* rows of the epoch order per slot (0 = 4 * chunk_rows) */
} kd_cache_expect;

/* Everything unchecked, default loading options. */
void kd_cache_expect_init(kd_cache_expect *e);

typedef struct kd_cache kd_cache;

/*
 * Open and validate a cache (a single file, or a VDS file over shards: see
 * the top of this header): format and version, the file's row range covers
 * [0, N) (a shard alone is refused: open its VDS file), every shard of a VDS
 * file present, complete and matching, N/C/V/K/P/dtype/hashes against expect, dataset types and
 * shapes, every /done chunk set (else KD_ERR_FORMAT saying how many chunks are missing and that
 * `distill cache` resumes it), compression filters available. When the cache fits in
 * expect->memory_limit it is loaded whole, checking as it loads that every stored logit / top-k
 * value / logsumexp is finite (the first bad row and view is named), top-k indices and labels are
 * in [0, C), each top-k entry names K different classes and its logsumexp is no smaller than
 * the log-sum-exp of its K values (equal to it when K = C), within float rounding. Data that
 * cannot be read (a failing checksum) is KD_ERR_FORMAT naming the rows and saying that
 * `distill cache` computes them again. Otherwise it is streamed (kd_cache_stream_begin) and the
 * same checks run on each chunk as the prefetch thread loads it. On failure *out is NULL.
 */
kd_status kd_cache_open(const char *path, const kd_cache_expect *expect, kd_cache **out);

/* The file's metadata. */
const kd_cache_meta *kd_cache_meta_of(const kd_cache *c);
/* 1 when the whole cache is in memory (random access), 0 when streamed. */
int kd_cache_in_memory(const kd_cache *c);

/*
 * Streaming mode: announce the order in which rows will be consumed this
 * epoch (order[0..n) global row indices < N; any permutation or subset; the
 * array is copied). A prefetch thread then walks the order slot_rows
 * positions at a time, reads every chunk those positions touch, keeps only
 * the needed rows (all views) and fills a ring of prefetch_slots buffers
 * ahead of the consumer. Cost: each slot reads each chunk it touches once,
 * so an order that visits rows chunk by chunk (sequential, or chunks
 * shuffled and rows shuffled within a window of chunks) reads the file once
 * per epoch, while a fully random permutation reads up to
 * min(slot_rows, num_chunks) chunks per slot. In memory this is a no-op.
 * Calling it again ends the previous stream. While a stream runs its thread
 * is the only user of the file; HDF5 here is the thread-safe build.
 */
kd_status kd_cache_stream_begin(kd_cache *c, const uint32_t *order, int64_t n);
/* Stop the prefetch thread and free the ring (also done by close). */
void kd_cache_stream_end(kd_cache *c);

/* The `view` of kd_cache_get_rows that asks for the mean over every view (full logits only). */
#define KD_CACHE_VIEW_MEAN (-1)

/*
 * Copy rows rows[0..count) of view `view` (0 <= view < V, or KD_CACHE_VIEW_MEAN: each logit
 * the mean of its V stored values, summed in view order in float and divided by V, the
 * augmentation parameters zero, i.e. the unaugmented image); one thread at a
 * time per kd_cache (a float16 row is widened in a buffer it owns). In memory: any
 * rows, any order. Streaming: rows must be the next count entries of the
 * order given to kd_cache_stream_begin (else KD_ERR_INVALID naming the
 * position, the row given and the row expected); it blocks until the
 * prefetch thread has them and reports its errors (damaged chunk,
 * non-finite values). Each output may be NULL:
 *   logits_out [count, C]: full caches copy the stored logits (float16
 *     widened); top-k caches rebuild a dense row: the K stored logits, and
 *     every other class gets lse + log(r / (C - K)) where
 *     r = 1 - sum_k exp(v_k - lse) is the probability mass outside the top-k
 *     (floored at 1e-12 of the row), i.e. the missing mass spread evenly.
 *   topk_values_out, topk_indices_out [count, K]: top-k caches only
 *     (KD_ERR_INVALID on a full cache).
 *   lse_out [count]: stored (top-k) or computed from the row (full).
 *   aug_params_out [count, P], labels_out [count].
 */
kd_status kd_cache_get_rows(kd_cache *c, const uint32_t *rows, int count, int view,
                            float *logits_out, float *topk_values_out, int32_t *topk_indices_out,
                            float *lse_out, float *aug_params_out, int32_t *labels_out);

/* Stop streaming, close the file, free everything. NULL is fine. */
void kd_cache_close(kd_cache *c);

#ifdef __cplusplus
}
#endif
#endif
