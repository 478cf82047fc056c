/*
 * test_cache_sharded.c - `distill cache` across MPI ranks: one shard per rank and an HDF5
 * virtual-dataset (VDS) file over them, read as one cache.
 *
 * A small teacher is trained once on fake Fashion-MNIST. Its cache is then written by one
 * process and by 2 and 3 ranks under mpirun (full float32 logits with 2 views; top-k float16),
 * and every root attribute and every dataset of the sharded cache, read through its VDS file,
 * must equal the single file's bit for bit. The sharded directory is moved and a student trains
 * from it (in memory and streamed) from another working directory; a shard with a chunk
 * un-done is resumed; complete caches of another layout are accepted without recomputing; a
 * deleted shard is an error naming the VDS file and the shard. Skipped (77) without mpirun or
 * without MPI in this build.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "kd_cli_util.h"

static char tmp[256], data[300];
static char out[1 << 16];

#define TEACHER_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}}, relu,"        \
    " {conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}}, relu, global_avgpool,"                     \
    " {linear: {out: 10}}]}"
#define STUDENT_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 4, kernel: 3, stride: 2, pad: 1}}, relu,"        \
    " global_avgpool, {linear: {out: 10}}]}"

/*
 * A job: the student, and the teacher with `cache` and extra teacher keys (may be ""). One
 * thread in every process: the CPU backend's sums are split by thread, so its last bits depend
 * on the thread count, which distill otherwise divides among the ranks of a host.
 */
static void write_job(const char *path, const char *cache, const char *teacher_extra)
{
    char text[4096], out_dir[400];
    snprintf(out_dir, sizeof out_dir, "%s/student", tmp);
    snprintf(text, sizeof text,
             "run: {name: s, out_dir: %s, seed: 3, threads: 1, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, val_size: 100,\n"
             "       augment: {crop_pad: 2, hflip: true}}\n"
             "model: %s\n"
             "teacher: {model: %s, checkpoint: %s/teacher/last.safetensors, cache: %s%s}\n"
             "distill: {mode: offline, losses: [{type: ce, weight: 0.5},"
             " {type: kd, weight: 0.5, temperature: 4.0}]}\n"
             "optim: {name: adamw, lr: 0.01, epochs: 1}\n",
             out_dir, data, STUDENT_MODEL, TEACHER_MODEL, tmp, cache, teacher_extra);
    assert_int_equal(kd_write_text(path, text), 0);
}

/* distill ARGS... on `ranks` processes (0: without mpirun); the exit code, output in out. */
static int distill(int ranks, const char *const *args)
{
    int code = -1;
    assert_int_equal(kd_run_distill_ranks(ranks, args, out, sizeof out, &code), 0);
    return code;
}

static void expect_ok(int ranks, const char *const *args)
{
    int code = distill(ranks, args);
    if (code != 0)
        fail_msg("distill %s %s on %d ranks exited %d:\n%s", args[0], args[1], ranks, code, out);
}

static void expect_in_out(const char *part)
{
    if (!strstr(out, part))
        fail_msg("output lacks '%s':\n%s", part, out);
}

/* ---- exact comparison of two caches through the HDF5 API ---- */

typedef struct {
    hid_t other; /* the file compared against */
    int n;       /* objects (attributes or datasets) compared */
    char bad[512];
} cmp_ctx;

/* Both objects' whole contents, read in a's file type, must be equal bytes. */
static int same_bytes(hid_t a, hid_t b, int attr, const char *what, cmp_ctx *x)
{
    hid_t ta = attr ? H5Aget_type(a) : H5Dget_type(a), tb = attr ? H5Aget_type(b) : H5Dget_type(b);
    hid_t sa = attr ? H5Aget_space(a) : H5Dget_space(a);
    hid_t sb = attr ? H5Aget_space(b) : H5Dget_space(b);
    int ok = ta >= 0 && tb >= 0 && sa >= 0 && sb >= 0 && H5Tequal(ta, tb) > 0;
    hsize_t da[4] = {0}, db[4] = {0};
    int na = ok ? H5Sget_simple_extent_dims(sa, da, NULL) : -1;
    int nb = ok ? H5Sget_simple_extent_dims(sb, db, NULL) : -2;
    ok = ok && na == nb && na >= 0 && memcmp(da, db, sizeof da) == 0;
    hssize_t np = ok ? H5Sget_simple_extent_npoints(sa) : 0;
    size_t tsize = ok ? H5Tget_size(ta) : 0;
    ok = ok && np >= 0 && tsize > 0;
    size_t bytes = ok ? (size_t)np * tsize : 0;
    char *ba = ok ? calloc(bytes + 1, 1) : NULL, *bb = ok ? calloc(bytes + 1, 1) : NULL;
    if (ok && ba && bb) {
        herr_t ra = attr ? H5Aread(a, ta, ba) : H5Dread(a, ta, H5S_ALL, H5S_ALL, H5P_DEFAULT, ba);
        herr_t rb = attr ? H5Aread(b, ta, bb) : H5Dread(b, ta, H5S_ALL, H5S_ALL, H5P_DEFAULT, bb);
        ok = ra >= 0 && rb >= 0 && memcmp(ba, bb, bytes) == 0;
    } else {
        ok = 0;
    }
    if (!ok && !x->bad[0])
        snprintf(x->bad, sizeof x->bad, "%s differs (type, shape or values)", what);
    x->n++;
    free(ba);
    free(bb);
    /* the handles that were opened must close */
    const int closed = (ta < 0 || H5Tclose(ta) >= 0) & (tb < 0 || H5Tclose(tb) >= 0) &
                       (sa < 0 || H5Sclose(sa) >= 0) & (sb < 0 || H5Sclose(sb) >= 0);
    if (!closed && !x->bad[0])
        snprintf(x->bad, sizeof x->bad, "%s: closing its type or space failed", what);
    return ok && closed;
}

static herr_t attr_cb(hid_t loc, const char *name, const H5A_info_t *info, void *p)
{
    (void)info;
    cmp_ctx *x = p;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t b = H5Aexists(x->other, name) > 0 ? H5Aopen(x->other, name, H5P_DEFAULT) : -1;
    char what[300];
    snprintf(what, sizeof what, "root attribute '%s'", name);
    if (a < 0 || b < 0) {
        if (!x->bad[0])
            snprintf(x->bad, sizeof x->bad, "%s is missing on one side", what);
    } else {
        same_bytes(a, b, 1, what, x);
    }
    if ((a >= 0 && H5Aclose(a) < 0) || (b >= 0 && H5Aclose(b) < 0))
        if (!x->bad[0])
            snprintf(x->bad, sizeof x->bad, "%s: H5Aclose failed", what);
    return 0;
}

static herr_t dset_cb(hid_t loc, const char *name, const H5L_info_t *info, void *p)
{
    (void)info;
    cmp_ctx *x = p;
    hid_t a = H5Dopen2(loc, name, H5P_DEFAULT);
    hid_t b =
        H5Lexists(x->other, name, H5P_DEFAULT) > 0 ? H5Dopen2(x->other, name, H5P_DEFAULT) : -1;
    char what[300];
    snprintf(what, sizeof what, "dataset /%s", name);
    if (a < 0 || b < 0) {
        if (!x->bad[0])
            snprintf(x->bad, sizeof x->bad, "%s is missing on one side", what);
    } else {
        same_bytes(a, b, 0, what, x);
    }
    if ((a >= 0 && H5Dclose(a) < 0) || (b >= 0 && H5Dclose(b) < 0))
        if (!x->bad[0])
            snprintf(x->bad, sizeof x->bad, "%s: H5Dclose failed", what);
    return 0;
}

/* Number of root attributes and of root links of file f. */
static void counts(hid_t f, hsize_t *attrs, hsize_t *links)
{
    H5O_info_t oi;
    H5G_info_t gi;
    assert_true(H5Oget_info(f, &oi) >= 0);
    assert_true(H5Gget_info(f, &gi) >= 0);
    *attrs = oi.num_attrs;
    *links = gi.nlinks;
}

/* Every root attribute and dataset of a equals b's, and both have the same ones. */
static void expect_same_cache(const char *a_path, const char *b_path)
{
    assert_true(H5Eset_auto2(H5E_DEFAULT, NULL, NULL) >= 0);
    hid_t a = H5Fopen(a_path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t b = H5Fopen(b_path, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(a >= 0 && b >= 0);
    hsize_t aa, al, ba, bl, idx = 0;
    counts(a, &aa, &al);
    counts(b, &ba, &bl);
    cmp_ctx x = {b, 0, ""};
    assert_true(H5Aiterate2(a, H5_INDEX_NAME, H5_ITER_INC, &idx, attr_cb, &x) >= 0);
    int nattr = x.n;
    assert_true(H5Literate(a, H5_INDEX_NAME, H5_ITER_INC, NULL, dset_cb, &x) >= 0);
    assert_true(H5Fclose(a) >= 0);
    assert_true(H5Fclose(b) >= 0);
    if (x.bad[0])
        fail_msg("%s vs %s: %s", a_path, b_path, x.bad);
    printf("  %s == %s: %d attributes, %d datasets\n", a_path, b_path, nattr, x.n - nattr);
    assert_int_equal(aa, ba);
    assert_int_equal(al, bl);
    assert_true(nattr >= 12 && x.n - nattr >= 4);
}

/* Set /done[chunk] = 0 and zero that chunk's rows of `dset` in a shard: a run killed there. */
static void undo_chunk(const char *shard, const char *dset, int chunk, int rows)
{
    hid_t f = H5Fopen(shard, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t d = H5Dopen2(f, "done", H5P_DEFAULT);
    assert_true(d >= 0);
    uint8_t done[64];
    assert_true(H5Dread(d, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, done) >= 0);
    done[chunk] = 0;
    assert_true(H5Dwrite(d, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, done) >= 0);
    assert_true(H5Dclose(d) >= 0);
    d = H5Dopen2(f, dset, H5P_DEFAULT);
    assert_true(d >= 0);
    hid_t fs = H5Dget_space(d);
    assert_true(fs >= 0);
    hsize_t dims[3], start[3] = {(hsize_t)chunk * rows, 0, 0};
    int nd = H5Sget_simple_extent_ndims(fs);
    assert_true(nd >= 1 && nd <= 3);
    assert_true(H5Sget_simple_extent_dims(fs, dims, NULL) == nd);
    dims[0] = (hsize_t)rows;
    assert_true(H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, dims, NULL) >= 0);
    hid_t ms = H5Screate_simple(nd, dims, NULL);
    assert_true(ms >= 0);
    const hssize_t np = H5Sget_simple_extent_npoints(ms);
    assert_true(np > 0);
    float *zeros = calloc((size_t)np, sizeof(float));
    assert_non_null(zeros);
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, zeros) >= 0);
    free(zeros);
    assert_true(H5Sclose(ms) >= 0);
    assert_true(H5Sclose(fs) >= 0);
    assert_true(H5Dclose(d) >= 0);
    assert_true(H5Fclose(f) >= 0);
}

static int setup(void **state)
{
    (void)state;
    /* 400 training images, 100 held out: a cache of 300 rows */
    if (kd_cli_workspace("kd_shard_", 400, 100, 7, tmp, sizeof tmp, data, sizeof data))
        return -1;
    char job[400], text[2048], od[400];
    snprintf(job, sizeof job, "%s/teacher.yaml", tmp);
    snprintf(od, sizeof od, "%s/teacher", tmp);
    snprintf(text, sizeof text,
             "run: {name: t, out_dir: %s, seed: 3, threads: 2, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, val_size: 100}\n"
             "model: %s\noptim: {name: adamw, lr: 0.01, epochs: 1}\n",
             od, data, TEACHER_MODEL);
    if (kd_write_text(job, text))
        return -1;
    const char *argv[] = {"train", job, "--no-progress", NULL};
    int code;
    if (kd_run_distill(argv, out, sizeof out, &code) || code) {
        fprintf(stderr, "training the teacher failed (%d):\n%s", code, out);
        return -1;
    }
    return 0;
}

/* KD_KEEP_TMP=1 keeps the directory for a look after a failure. */
static int teardown(void **state)
{
    (void)state;
    if (!getenv("KD_KEEP_TMP"))
        kd_rm_rf(tmp);
    return 0;
}

/* Full float32 logits, 2 views, chunks of 32 rows: 10 chunks, 5 per rank. */
static void test_full_logits(void **state)
{
    (void)state;
    char job[400], one[400], two[400], set[500], p[600], q[600];
    const char *extra = ", views: 2, chunk_rows: 32, dtype: float32";
    snprintf(job, sizeof job, "%s/full.yaml", tmp);
    snprintf(one, sizeof one, "%s/one/t.h5", tmp);
    snprintf(two, sizeof two, "%s/two/t.h5", tmp);
    write_job(job, one, extra);
    snprintf(set, sizeof set, "teacher.cache=%s", two);

    expect_ok(0, (const char *[]){"cache", job, "--no-progress", NULL});
    expect_ok(2, (const char *[]){"cache", job, "--no-progress", "--set", set, NULL});
    expect_in_out("one shard per rank");
    expect_in_out("t.shard-0-of-2.h5");
    /* rank 0 speaks for the job */
    assert_null(strstr(strstr(out, "caching") + 1, "caching"));
    snprintf(p, sizeof p, "%s/two/t.shard-0-of-2.h5", tmp);
    assert_true(kd_file_exists(p));
    snprintf(p, sizeof p, "%s/two/t.shard-1-of-2.h5", tmp);
    assert_true(kd_file_exists(p));
    expect_same_cache(one, two);

    /* the VDS file gone and shard 1 as a kill left it, chunk 2 not done: the rerun resumes */
    assert_int_equal(unlink(two), 0);
    undo_chunk(p, "logits", 2, 32);
    expect_ok(2, (const char *[]){"cache", job, "--no-progress", "--set", set, NULL});
    expect_in_out("9 of 10 chunks already written");
    expect_same_cache(one, two);

    /* complete caches of another layout are accepted as they are */
    expect_ok(3, (const char *[]){"cache", job, "--no-progress", "--set", set, NULL});
    expect_in_out("nothing to do");
    expect_ok(0, (const char *[]){"cache", job, "--no-progress", "--set", set, NULL});
    expect_in_out("nothing to do");
    expect_ok(2, (const char *[]){"cache", job, "--no-progress", NULL});
    expect_in_out("nothing to do");
    /* a shard alone is not a cache */
    char shard_set[700];
    snprintf(shard_set, sizeof shard_set, "teacher.cache=%s", p);
    assert_int_equal(
        distill(0, (const char *[]){"train", job, "--no-progress", "--set", shard_set, NULL}), 1);
    expect_in_out("VDS file");

    /* move the directory; train from the VDS by a relative path from another directory */
    snprintf(p, sizeof p, "%s/two", tmp);
    snprintf(q, sizeof q, "%s/moved", tmp);
    assert_int_equal(rename(p, q), 0);
    char cwd[1024];
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(tmp), 0);
    const char *rel = "teacher.cache=moved/t.h5";
    expect_ok(0, (const char *[]){"train", job, "--no-progress", "--set", rel, "--set",
                                  "run.out_dir=s_mem", NULL});
    assert_true(kd_file_exists("s_mem/result.json"));
    expect_ok(0, (const char *[]){"train", job, "--no-progress", "--set", rel, "--set",
                                  "run.out_dir=s_stream", "--set", "teacher.cache_memory=stream",
                                  NULL});
    /* a missing shard: a clear error naming the VDS file and the shard */
    assert_int_equal(unlink("moved/t.shard-1-of-2.h5"), 0);
    int code = distill(0, (const char *[]){"train", job, "--no-progress", "--set", rel, "--set",
                                           "run.out_dir=s_gone", NULL});
    assert_int_equal(chdir(cwd), 0);
    if (code != 1)
        fail_msg("want exit 1 for a missing shard, got %d:\n%s", code, out);
    expect_in_out("'moved/t.h5' is sharded");
    expect_in_out("'t.shard-1-of-2.h5' is missing");
}

/* Top-k float16, 3 ranks over 10 chunks (3, 3, 4) with a short last chunk. */
static void test_topk_three_ranks(void **state)
{
    (void)state;
    char job[400], one[400], three[400], set[500];
    const char *extra = ", topk: 3, chunk_rows: 32, dtype: float16";
    snprintf(job, sizeof job, "%s/topk.yaml", tmp);
    snprintf(one, sizeof one, "%s/k1/t.h5", tmp);
    snprintf(three, sizeof three, "%s/k3/t.h5", tmp);
    write_job(job, one, extra);
    snprintf(set, sizeof set, "teacher.cache=%s", three);
    expect_ok(0, (const char *[]){"cache", job, "--no-progress", NULL});
    expect_ok(3, (const char *[]){"cache", job, "--no-progress", "--set", set, NULL});
    expect_in_out("t.shard-0-of-3.h5");
    expect_same_cache(one, three);
}

int main(void)
{
    const char *mpirun = getenv("MPIRUN");
    if (!mpirun || !*mpirun || strstr(mpirun, "NOTFOUND") || access(mpirun, X_OK) != 0 ||
        !kd_comm_have_mpi()) {
        printf("skipped: no mpirun, or distill built without MPI\n");
        return 77;
    }
    /* root in a container: Open MPI needs these besides --allow-run-as-root */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    unsetenv("HDF5_VDS_PREFIX"); /* distill refuses sharded caches while it is set */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_logits),
        cmocka_unit_test(test_topk_three_ranks),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
