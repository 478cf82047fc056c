/*
 * test_offline.c - `distill cache` and offline distillation through the CLI,
 * on a small fake data set: a teacher is trained, cached, and students learn
 * from the cache and from the live teacher; a cache killed half-way resumes
 * to the same contents as one written in one go; every mismatch between a
 * cache and the job is refused with a message naming the file and both sides.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "augment.h"
#include "cache.h"
#include "kd_cli_util.h"
#include "kd_fake_data.h"
#include "kd_test.h"

static char dir[256], data[300];
static char out[1 << 16];

static const char *tp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
    return buf;
}

#define TEACHER_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}},"              \
    " {batchnorm: {}}, relu, {conv2d: {out: 16, kernel: 3, stride: 2, pad: 1}}, relu,"             \
    " global_avgpool, {linear: {out: 10}}]}"
/* the teacher with relu6 for its first relu: the same parameter shapes, another architecture */
#define TEACHER_MODEL_RELU6                                                                        \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}},"              \
    " {batchnorm: {}}, relu6, {conv2d: {out: 16, kernel: 3, stride: 2, pad: 1}}, relu,"            \
    " global_avgpool, {linear: {out: 10}}]}"
#define STUDENT_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}},"              \
    " {batchnorm: {}}, relu, {conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}}, relu,"              \
    " global_avgpool, {linear: {out: 10}}]}"

/* A job file: the student (or teacher) model, optional teacher section and losses. */
static void write_job(const char *path, const char *out_name, const char *model,
                      const char *teacher, const char *distill, int epochs)
{
    char od[300], text[4096];
    snprintf(text, sizeof text,
             "run: {name: t, out_dir: %s, seed: 3, threads: 2, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, val_size: 100,\n"
             "       augment: {crop_pad: 2, hflip: true}}\n"
             "model: %s\n%s%s"
             "optim: {name: adamw, lr: 0.01, epochs: %d}\n",
             tp(od, sizeof od, out_name), data, model, teacher, distill, epochs);
    assert_int_equal(kd_write_text(path, text), 0);
}

static int run(const char *const *argv, int *code)
{
    int rc = kd_run_distill(argv, out, sizeof out, code);
    assert_int_equal(rc, 0);
    return *code;
}

static void expect_ok(const char *const *argv)
{
    int code;
    if (run(argv, &code) != 0)
        fail_msg("distill %s %s exited %d:\n%s", argv[0], argv[1], code, out);
}

static void expect_fail(const char *const *argv, const char *const *parts)
{
    int code;
    run(argv, &code);
    if (code != 1)
        fail_msg("want exit 1, got %d:\n%s", code, out);
    for (int i = 0; parts[i]; i++)
        if (!strstr(out, parts[i]))
            fail_msg("output lacks '%s':\n%s", parts[i], out);
}

static char teacher_sec[1024], teacher2_sec[1024], live_sec[1024];
static const char *const kd_losses = "distill: {mode: offline, losses: [{type: ce, weight: 0.5},"
                                     " {type: kd, weight: 0.5, temperature: 4.0}]}\n";

static int setup(void **state)
{
    (void)state;
    if (kd_cli_workspace("kd_offline_", 700, 200, 5, dir, sizeof dir, data, sizeof data))
        return -1;
    char job[300], p1[300], p2[300], c1[300];
    /* two teachers with different weights (different seeds of the same model) */
    write_job(tp(job, sizeof job, "teacher.yaml"), "teacher", TEACHER_MODEL, "", "", 3);
    const char *t1[] = {"train", job, NULL};
    int code;
    if (kd_run_distill(t1, out, sizeof out, &code) || code) {
        fprintf(stderr, "training the teacher failed (%d):\n%s", code, out);
        return -1;
    }
    const char *t2[] = {"train", job, "--set", "run.seed=4", "--set", NULL, NULL};
    char od[320];
    snprintf(od, sizeof od, "run.out_dir=%s", tp(p2, sizeof p2, "teacher2"));
    t2[5] = od;
    if (kd_run_distill(t2, out, sizeof out, &code) || code) {
        fprintf(stderr, "training the second teacher failed (%d):\n%s", code, out);
        return -1;
    }
    snprintf(teacher_sec, sizeof teacher_sec,
             "teacher: {model: %s, checkpoint: %s, cache: %s, views: 2}\n", TEACHER_MODEL,
             tp(p1, sizeof p1, "teacher/last.safetensors"), tp(c1, sizeof c1, "cache/t.h5"));
    snprintf(teacher2_sec, sizeof teacher2_sec,
             "teacher: {model: %s, checkpoint: %s/teacher2/last.safetensors, cache: %s, "
             "views: 2}\n",
             TEACHER_MODEL, dir, c1);
    snprintf(live_sec, sizeof live_sec, "teacher: {model: %s, checkpoint: %s}\n", TEACHER_MODEL,
             p1);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(dir);
    return 0;
}

/* Set every float of tensor `name` in the safetensors bytes f (n of them) to v. */
static void set_tensor(uint8_t *f, size_t n, const char *name, float v)
{
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | f[i];
    assert_true(hlen + 8 <= n);
    char *h = malloc(hlen + 1);
    memcpy(h, f + 8, hlen);
    h[hlen] = 0;
    char key[64];
    snprintf(key, sizeof key, "\"%s\"", name);
    const char *at = strstr(h, key), *off = at ? strstr(at, "data_offsets") : NULL;
    long a = -1, b = -1;
    assert_non_null(off);
    assert_int_equal(sscanf(off, "data_offsets\" : [ %ld , %ld", &a, &b), 2);
    assert_true(a >= 0 && b > a && 8 + hlen + (uint64_t)b <= n && (b - a) % 4 == 0);
    for (long i = a; i < b; i += 4)
        memcpy(f + 8 + hlen + i, &v, 4);
    free(h);
}

static void test_cache_then_distill(void **state)
{
    (void)state;
    char job[300], res[300];
    write_job(tp(job, sizeof job, "student.yaml"), "student", STUDENT_MODEL, teacher_sec, kd_losses,
              4);
    expect_ok((const char *[]){"cache", job, NULL});
    assert_non_null(strstr(out, "wrote"));
    /* a second run finds every chunk written */
    expect_ok((const char *[]){"cache", job, NULL});
    assert_non_null(strstr(out, "chunks already written"));
    expect_ok((const char *[]){"train", job, NULL});
    char *r = kd_read_text(tp(res, sizeof res, "student/result.json"));
    assert_non_null(r);
    double acc = atof(strstr(r, "\"test_acc\": ") + 12);
    free(r);
    if (!(acc > 0.3)) /* ten classes: chance is 0.1 */
        fail_msg("distilled student reached only %.3f:\n%s", acc, out);
    /* the live teacher gives a working run too */
    write_job(tp(job, sizeof job, "live.yaml"), "live", STUDENT_MODEL, live_sec, kd_losses, 1);
    expect_ok((const char *[]){"train", job, NULL});
    assert_non_null(strstr(out, "runs live"));
    assert_null(strstr(out, "quantization-aware"));
    /* a teacher trained with quantization-aware training runs its float weights, and says so
     * (its checkpoint's quant metadata "none" made "qat8", same length) */
    char qat[300], qsec[1024];
    uint8_t *qk;
    size_t nq;
    assert_int_equal(kd_read_file(tp(res, sizeof res, "teacher/last.safetensors"), &qk, &nq), 0);
    char *q = memmem(qk, nq, "\"quant\"", 7), *none = q ? memmem(q, 16, "none", 4) : NULL;
    assert_non_null(none);
    memcpy(none, "qat8", 4);
    assert_int_equal(kd_write_bytes(tp(qat, sizeof qat, "qat.safetensors"), qk, nq), 0);
    free(qk);
    snprintf(qsec, sizeof qsec, "teacher: {model: %s, checkpoint: %s}\n", TEACHER_MODEL, qat);
    write_job(tp(job, sizeof job, "qatt.yaml"), "qatt", STUDENT_MODEL, qsec, kd_losses, 1);
    expect_ok((const char *[]){"train", job, NULL});
    assert_non_null(strstr(out, "was trained with quantization-aware training (qat8)"));
    /* a live teacher whose finite weights overflow float32 is named as the cause of the
     * non-finite loss, not the student's learning rate */
    char huge[300], sec[1024];
    uint8_t *ck;
    size_t nck;
    assert_int_equal(kd_read_file(tp(res, sizeof res, "teacher/last.safetensors"), &ck, &nck), 0);
    /* batchnorm scale and shift: every normalised value above 0.14 overflows */
    set_tensor(ck, nck, "1.weight", 3e38f);
    set_tensor(ck, nck, "1.bias", 3e38f);
    assert_int_equal(kd_write_bytes(tp(huge, sizeof huge, "huge.safetensors"), ck, nck), 0);
    free(ck);
    snprintf(sec, sizeof sec, "teacher: {model: %s, checkpoint: %s}\n", TEACHER_MODEL, huge);
    write_job(tp(job, sizeof job, "huge.yaml"), "huge", STUDENT_MODEL, sec, kd_losses, 1);
    expect_fail((const char *[]){"train", job, NULL},
                (const char *const[]){"huge.safetensors", "gave a non-finite logit", NULL});
    assert_null(strstr(out, "lower optim.lr"));
    /* the teacher's checkpoint under another architecture with equal shapes is refused */
    snprintf(sec, sizeof sec, "teacher: {model: %s, checkpoint: %s}\n", TEACHER_MODEL_RELU6,
             tp(res, sizeof res, "teacher/last.safetensors"));
    write_job(tp(job, sizeof job, "other.yaml"), "other", STUDENT_MODEL, sec, kd_losses, 1);
    expect_fail((const char *[]){"train", job, NULL},
                (const char *const[]){"another architecture", "teacher.model", NULL});
}

/* The two files hold the same bytes. */
static void expect_same_file(const char *a, const char *b)
{
    uint8_t *x, *y;
    size_t nx, ny;
    assert_int_equal(kd_read_file(a, &x, &nx), 0);
    assert_int_equal(kd_read_file(b, &y, &ny), 0);
    if (nx != ny || memcmp(x, y, nx) != 0)
        fail_msg("%s and %s differ", a, b);
    free(x);
    free(y);
}

/* An in-memory cache is held whole where the backend computes and a step gathers its targets
 * there; a streamed one hands over each batch's rows. Both must train the same weights, for
 * full logits (views 2: the view changes per epoch) and for top-k targets. */
static void test_held_cache_equals_streamed(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        char job[300], sec[1200], cache[300], a[300], b[300], oa[340], ob[340];
        const char *name = k ? "heldtopk.h5" : "held.h5";
        snprintf(sec, sizeof sec,
                 "teacher: {model: %s, checkpoint: %s/teacher/last.safetensors, cache: %s, "
                 "views: 2%s}\n",
                 TEACHER_MODEL, dir, tp(cache, sizeof cache, name), k ? ", topk: 3" : "");
        write_job(tp(job, sizeof job, "held.yaml"), "held", STUDENT_MODEL, sec, kd_losses, 3);
        expect_ok((const char *[]){"cache", job, NULL});
        snprintf(oa, sizeof oa, "run.out_dir=%s", tp(a, sizeof a, k ? "held_k_mem" : "held_mem"));
        snprintf(ob, sizeof ob, "run.out_dir=%s", tp(b, sizeof b, k ? "held_k_str" : "held_str"));
        expect_ok((const char *[]){"train", job, "--set", oa, NULL});
        assert_non_null(strstr(out, "teacher cache held on the cpu device"));
        expect_ok((const char *[]){"train", job, "--set", ob, "--set",
                                   "teacher.cache_memory=stream", NULL});
        assert_null(strstr(out, "teacher cache held"));
        strcat(a, "/last.safetensors");
        strcat(b, "/last.safetensors");
        expect_same_file(a, b);
        /* view_targets: mean: unaugmented images against the views' mean logits; held and
         * streamed alike; refused with augmentation, with a top-k cache and by `distill cache` */
        const char *mean = "teacher.view_targets=mean", *noaug = "data.augment={}";
        snprintf(oa, sizeof oa, "run.out_dir=%s", tp(a, sizeof a, k ? "mean_k" : "mean_mem"));
        snprintf(ob, sizeof ob, "run.out_dir=%s", tp(b, sizeof b, "mean_str"));
        if (!k) {
            expect_ok(
                (const char *[]){"train", job, "--set", oa, "--set", mean, "--set", noaug, NULL});
            assert_non_null(strstr(out, "the mean of the cache's 2 views"));
            assert_non_null(strstr(out, "teacher cache held on the cpu device"));
            expect_ok((const char *[]){"train", job, "--set", ob, "--set", mean, "--set", noaug,
                                       "--set", "teacher.cache_memory=stream", NULL});
            assert_null(strstr(out, "teacher cache held"));
            strcat(a, "/last.safetensors");
            strcat(b, "/last.safetensors");
            expect_same_file(a, b);
            expect_fail((const char *[]){"train", job, "--set", oa, "--set", mean, NULL},
                        (const char *[]){"view_targets", "remove data.augment", NULL});
            expect_fail((const char *[]){"cache", job, "--set", mean, "--set", noaug, NULL},
                        (const char *[]){"view_targets: mean", "write that cache", NULL});
        } else {
            expect_fail(
                (const char *[]){"train", job, "--set", oa, "--set", mean, "--set", noaug, NULL},
                (const char *[]){"view_targets: mean needs full teacher logits",
                                 "teacher.topk is 3", NULL});
        }
        /* decoupled KD reads the batch's labels too: it trains from the full cache and is
         * refused a top-k one, naming both */
        const char *dkd = "distill.losses=[{type: ce, weight: 0.5}, {type: dkd, weight: 0.5, "
                          "temperature: 4.0, alpha: 1.0, beta: 8.0}]";
        snprintf(oa, sizeof oa, "run.out_dir=%s", tp(a, sizeof a, k ? "dkd_k" : "dkd"));
        if (!k) {
            expect_ok((const char *[]){"train", job, "--set", oa, "--set", dkd, NULL});
            assert_non_null(strstr(out, "test: loss"));
        } else {
            expect_fail((const char *[]){"train", job, "--set", oa, "--set", dkd, NULL},
                        (const char *[]){"'dkd' term needs full teacher logits", "heldtopk.h5",
                                         "top 3", NULL});
        }
    }
}

/* Read every row and view of a cache into one buffer for comparison. */
static float *cache_contents(const char *path, size_t *len)
{
    kd_cache_expect e;
    kd_cache_expect_init(&e);
    kd_cache *c = NULL;
    assert_int_equal(kd_cache_open(path, &e, &c), KD_OK);
    const kd_cache_meta *m = kd_cache_meta_of(c);
    int64_t n = m->num_samples;
    size_t per = (size_t)m->num_classes + KD_AUG_NPARAMS;
    float *all = calloc((size_t)n * m->views * per, sizeof(float));
    uint32_t *rows = malloc((size_t)n * sizeof(uint32_t));
    float *lg = malloc((size_t)n * m->num_classes * sizeof(float));
    float *ap = malloc((size_t)n * KD_AUG_NPARAMS * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        rows[i] = (uint32_t)i;
    for (int v = 0; v < m->views; v++) {
        assert_int_equal(kd_cache_get_rows(c, rows, (int)n, v, lg, NULL, NULL, NULL, ap, NULL),
                         KD_OK);
        for (int64_t i = 0; i < n; i++) {
            float *dst = all + ((size_t)v * n + i) * per;
            memcpy(dst, lg + i * m->num_classes, m->num_classes * sizeof(float));
            memcpy(dst + m->num_classes, ap + i * KD_AUG_NPARAMS, KD_AUG_NPARAMS * sizeof(float));
        }
    }
    *len = (size_t)n * m->views * per;
    kd_cache_close(c);
    free(rows);
    free(lg);
    free(ap);
    return all;
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void test_cache_resumes_after_sigkill(void **state)
{
    (void)state;
    char job[300], logp[300], sec[1024], cpath[300], ref[300];
    /* small chunks so the kill lands between chunk writes more often than not */
    snprintf(sec, sizeof sec,
             "teacher: {model: %s, checkpoint: %s/teacher/last.safetensors, cache: %s, views: 3, "
             "chunk_rows: 16, dtype: float32}\n",
             TEACHER_MODEL, dir, tp(cpath, sizeof cpath, "kill/t.h5"));
    write_job(tp(job, sizeof job, "kill.yaml"), "kill", STUDENT_MODEL, sec, kd_losses, 1);
    /* the reference cache, written in one go, also times a whole run */
    char set[400];
    snprintf(set, sizeof set, "teacher.cache=%s", tp(ref, sizeof ref, "kill/ref.h5"));
    double t0 = mono_s();
    expect_ok((const char *[]){"cache", job, "--set", set, NULL});
    double full = mono_s() - t0;
    srand((unsigned)time(NULL));
    int killed = 0;
    for (int attempt = 0; attempt < 10 && !killed; attempt++) {
        unlink(cpath);
        double start = mono_s();
        pid_t pid = kd_spawn_distill((const char *[]){"cache", job, NULL},
                                     tp(logp, sizeof logp, "kill.log"));
        assert_true(pid > 0);
        /* once the file exists, kill at a random point of what is left of a whole run */
        for (int i = 0; i < 400 && !kd_file_exists(cpath); i++)
            usleep(2000);
        double left = full - (mono_s() - start);
        if (left > 0)
            usleep((useconds_t)(left * 1e6 * (0.05 + 0.75 * rand() / (double)RAND_MAX)));
        kill(pid, SIGKILL);
        int code;
        kd_wait_exit(pid, &code);
        killed = code == 128 + SIGKILL;
    }
    assert_true(killed);
    /* resume, then compare contents with the reference */
    expect_ok((const char *[]){"cache", job, NULL});
    size_t la, lb;
    float *a = cache_contents(cpath, &la), *b = cache_contents(ref, &lb);
    assert_int_equal(la, lb);
    assert_memory_equal(a, b, la * sizeof(float));
    free(a);
    free(b);
}

static void test_bad_caches(void **state)
{
    (void)state;
    char job[300], set[400], c1[300];
    tp(c1, sizeof c1, "cache/t.h5");
    /* a cache written for another teacher */
    write_job(tp(job, sizeof job, "other.yaml"), "other", STUDENT_MODEL, teacher2_sec, kd_losses,
              1);
    expect_fail((const char *[]){"train", job, NULL}, (const char *const[]){c1, "teacher", NULL});
    /* a missing cache says how to write it */
    write_job(tp(job, sizeof job, "missing.yaml"), "missing", STUDENT_MODEL, teacher_sec, kd_losses,
              1);
    snprintf(set, sizeof set, "teacher.cache=%s/nope.h5", dir);
    expect_fail((const char *[]){"train", job, "--set", set, NULL},
                (const char *const[]){"nope.h5", "distill cache", "missing.yaml", NULL});
    const char *once = strstr(out, "distill cache");
    if (strstr(once + 1, "distill cache"))
        fail_msg("the advice is given twice:\n%s", out);
    /* another element type than teacher.dtype asks for (the cache is float16) */
    expect_fail((const char *[]){"train", job, "--set", "teacher.dtype=float32", NULL},
                (const char *const[]){c1, "float32", "float16", NULL});
    /* another number of views */
    expect_fail((const char *[]){"train", job, "--set", "teacher.views=3", NULL},
                (const char *const[]){c1, "3", "2", NULL});
    /* another augmentation than the cached views': the student would train on the views */
    expect_fail((const char *[]){"train", job, "--set", "data.augment={}", NULL},
                (const char *const[]){c1, "'crop_pad=2 hflip=1'", "data.augment is 'none'", NULL});
    expect_fail((const char *[]){"train", job, "--set", "data.augment.crop_pad=3", NULL},
                (const char *const[]){c1, "'crop_pad=3 hflip=1'", "distill cache", NULL});
    /* another training split (more held out): sample count differs */
    expect_fail((const char *[]){"train", job, "--set", "data.val_size=150", NULL},
                (const char *const[]){c1, "550", "600", NULL});
    /* a student with another class count */
    write_job(tp(job, sizeof job, "classes.yaml"), "classes",
              "{input: [1, 28, 28], layers: [flatten, {linear: {out: 7}}]}", teacher_sec, kd_losses,
              1);
    expect_fail((const char *[]){"train", job, NULL}, (const char *const[]){"7", "10", NULL});
    /* a truncated cache */
    char cut[300];
    uint8_t *bytes;
    size_t len;
    assert_int_equal(kd_read_file(c1, &bytes, &len), 0);
    assert_int_equal(kd_write_bytes(tp(cut, sizeof cut, "cut.h5"), bytes, len / 2), 0);
    free(bytes);
    write_job(tp(job, sizeof job, "cut.yaml"), "cut", STUDENT_MODEL, teacher_sec, kd_losses, 1);
    snprintf(set, sizeof set, "teacher.cache=%s", cut);
    expect_fail((const char *[]){"train", job, "--set", set, NULL},
                (const char *const[]){"cut.h5", NULL});
    /* offline without a kd term, and a kd term without offline */
    write_job(tp(job, sizeof job, "nokd.yaml"), "nokd", STUDENT_MODEL, teacher_sec,
              "distill: {mode: offline, losses: [{type: ce}]}\n", 1);
    expect_fail((const char *[]){"train", job, NULL}, (const char *const[]){"'kd'", NULL});
    write_job(tp(job, sizeof job, "kdnone.yaml"), "kdnone", STUDENT_MODEL, teacher_sec,
              "distill: {mode: none, losses: [{type: kd}]}\n", 1);
    expect_fail((const char *[]){"train", job, NULL},
                (const char *const[]){"kdnone.yaml:", "offline", NULL});
    /* a bad direction names the key's position */
    write_job(tp(job, sizeof job, "dir.yaml"), "dir", STUDENT_MODEL, teacher_sec,
              "distill: {mode: offline, losses: [{type: kd, direction: sideways}]}\n", 1);
    expect_fail((const char *[]){"train", job, NULL},
                (const char *const[]){"dir.yaml:", "sideways", NULL});
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_then_distill),
        cmocka_unit_test(test_held_cache_equals_streamed),
        cmocka_unit_test(test_cache_resumes_after_sigkill),
        cmocka_unit_test(test_bad_caches),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
