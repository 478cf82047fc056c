/*
 * test_cuda_graph.c - training steps replayed from a CUDA graph (run.cuda_graph, the default
 * on the CUDA backend) against the same jobs run operation by operation: the checkpoints
 * must hold the same bytes, for a student from scratch, distilled from a cache held on the
 * device (full logits whose view changes per epoch, and top-k), distilled from the live
 * teacher, in bf16, and with dropout (whose mask seed the replay must read anew each step).
 * Each job's last batch is smaller than the others, so the trainer moves between replays and
 * eager steps every epoch, and an evaluation with a larger batch between epochs outgrows the
 * loss scratch a graph uses.
 *
 * Label gpu: exits 77 (CTest: skipped) when distill was built without CUDA or no device
 * answers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "kd_cli_util.h"

static char dir[256], data[300];
static char out[1 << 16];

static const char *tp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
    return buf;
}

#define TEACHER_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 16, kernel: 3, stride: 2, pad: 1}},"             \
    " {batchnorm: {}}, relu, {conv2d: {out: 32, kernel: 3, stride: 2, pad: 1}}, relu,"             \
    " global_avgpool, {linear: {out: 10}}]}"
/* batchnorm (host-side counters), depthwise and pointwise convolutions, a residual block */
#define STUDENT_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}},"              \
    " {batchnorm: {}}, relu, {residual: {body: [{conv2d: {out: 8, kernel: 3, pad: 1, groups: 8}}," \
    " {batchnorm: {}}, relu, {conv2d: {out: 8, kernel: 1}}]}}, {maxpool2d: {kernel: 2}},"          \
    " global_avgpool, {linear: {out: 10}}]}"
#define DROPOUT_MODEL                                                                              \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}}, relu,"        \
    " global_avgpool, {dropout: {p: 0.2}}, {linear: {out: 10}}]}"

static const char *const kd_losses = "distill: {mode: offline, losses: [{type: ce, weight: 0.5},"
                                     " {type: kd, weight: 0.5, temperature: 4.0}]}\n";

/* batch 32 over 700 - 100 samples: 18 full batches and one of 24 per epoch; evaluation in
 * batches of 100 */
static void write_job(const char *path, const char *out_name, const char *model,
                      const char *teacher, const char *distill, int epochs)
{
    char od[300], text[4096];
    snprintf(text, sizeof text,
             "run: {name: t, out_dir: %s, seed: 3, device: cuda, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, eval_batch_size: 100,\n"
             "       val_size: 100, augment: {crop_pad: 2, hflip: true}}\n"
             "model: %s\n%s%s"
             "optim: {name: adamw, lr: 0.01, epochs: %d, clip_norm: 5.0}\n",
             tp(od, sizeof od, out_name), data, model, teacher, distill, epochs);
    assert_int_equal(kd_write_text(path, text), 0);
}

static void expect_ok(const char *const *argv)
{
    int code;
    assert_int_equal(kd_run_distill(argv, out, sizeof out, &code), 0);
    if (code != 0)
        fail_msg("distill %s %s exited %d:\n%s", argv[0], argv[1], code, out);
}

static void expect_same_file(const char *a, const char *b)
{
    if (!kd_files_equal(a, b))
        fail_msg("%s and %s differ", a, b);
}

/* Every epoch's training sums (read back from the device accumulator the graph adds to) and
 * validation figures are equal; the timings may differ. */
static void expect_same_metrics(const char *a_path, const char *b_path)
{
    static const char *const keys[] = {"epoch",    "step",    "train_loss", "train_acc",
                                       "val_loss", "val_acc", NULL};
    char *a = kd_read_text(a_path), *b = kd_read_text(b_path);
    if (!a || !b)
        fail_msg("cannot read %s or %s", a_path, b_path);
    const char *pa = a, *pb = b;
    int lines = 0;
    while (*pa && *pb) {
        for (int k = 0; keys[k]; k++) {
            double va, vb;
            if (kd_json_number(pa, keys[k], &va) || kd_json_number(pb, keys[k], &vb))
                fail_msg("%s: line %d lacks %s", a_path, lines + 1, keys[k]);
            if (va != vb)
                fail_msg("epoch line %d: %s %.9g with the graph, %.9g without", lines + 1, keys[k],
                         va, vb);
        }
        pa = strchr(pa, '\n');
        pb = strchr(pb, '\n');
        if (!pa || !pb)
            break;
        pa++, pb++, lines++;
    }
    if ((pa && *pa) || (pb && *pb) || lines < 2)
        fail_msg("%s and %s differ in length (%d lines compared)", a_path, b_path, lines);
    free(a);
    free(b);
}

/* `distill train job` twice, into <name>_graph and <name>_eager: the first must record a
 * graph, the second (run.cuda_graph: false) must not, and both checkpoints must be equal */
static void train_both_ways(const char *job, const char *name, const char *extra)
{
    char a[400], b[400], oa[440], ob[440], fa[480], fb[480], na[64], nb[64];
    snprintf(na, sizeof na, "%s_graph", name);
    snprintf(nb, sizeof nb, "%s_eager", name);
    snprintf(oa, sizeof oa, "run.out_dir=%s", tp(a, sizeof a, na));
    snprintf(ob, sizeof ob, "run.out_dir=%s", tp(b, sizeof b, nb));
    const char *ga[] = {"train", job, "--set", oa, extra ? "--set" : NULL, extra, NULL};
    expect_ok(ga);
    if (!strstr(out, "full batches replayed from a CUDA graph") ||
        !strstr(out, "CUDA graph recorded"))
        fail_msg("%s: no CUDA graph was recorded:\n%s", name, out);
    const char *gb[] = {
        "train", job, "--set", ob, "--set", "run.cuda_graph=false", extra ? "--set" : NULL,
        extra,   NULL};
    expect_ok(gb);
    if (strstr(out, "CUDA graph"))
        fail_msg("%s: run.cuda_graph: false still mentions a graph:\n%s", name, out);
    static const char *const files[] = {"last.safetensors", "best.safetensors", NULL};
    for (int i = 0; files[i]; i++) {
        snprintf(fa, sizeof fa, "%s/%s", a, files[i]);
        snprintf(fb, sizeof fb, "%s/%s", b, files[i]);
        expect_same_file(fa, fb);
    }
    snprintf(fa, sizeof fa, "%s/metrics.jsonl", a);
    snprintf(fb, sizeof fb, "%s/metrics.jsonl", b);
    expect_same_metrics(fa, fb);
}

static char teacher_ckpt[300];

static int setup(void **state)
{
    (void)state;
    if (kd_cli_workspace("kd_cuda_graph_", 700, 200, 9, dir, sizeof dir, data, sizeof data))
        return -1;
    char job[300];
    write_job(tp(job, sizeof job, "teacher.yaml"), "teacher", TEACHER_MODEL, "", "", 2);
    const char *t[] = {"train", job, NULL};
    int code;
    if (kd_run_distill(t, out, sizeof out, &code) || code) {
        fprintf(stderr, "training the teacher failed (%d):\n%s", code, out);
        return -1;
    }
    tp(teacher_ckpt, sizeof teacher_ckpt, "teacher/last.safetensors");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(dir);
    return 0;
}

static void test_scratch(void **state)
{
    (void)state;
    char job[300];
    write_job(tp(job, sizeof job, "scratch.yaml"), "scratch", STUDENT_MODEL, "", "", 3);
    train_both_ways(job, "scratch", NULL);
}

static void test_bf16(void **state)
{
    (void)state;
    char job[300];
    write_job(tp(job, sizeof job, "bf16.yaml"), "bf16", STUDENT_MODEL, "", "", 2);
    train_both_ways(job, "bf16", "run.precision=bf16");
}

static void test_cached_teacher(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        char job[300], sec[1200], cache[300];
        snprintf(sec, sizeof sec, "teacher: {model: %s, checkpoint: %s, cache: %s, views: 2%s}\n",
                 TEACHER_MODEL, teacher_ckpt, tp(cache, sizeof cache, k ? "topk.h5" : "full.h5"),
                 k ? ", topk: 3" : "");
        write_job(tp(job, sizeof job, "cached.yaml"), "cached", STUDENT_MODEL, sec, kd_losses, 3);
        expect_ok((const char *[]){"cache", job, NULL});
        train_both_ways(job, k ? "topk" : "full", NULL);
        if (!strstr(out, "teacher cache held on the cuda device"))
            fail_msg("the cache was not held on the device:\n%s", out);
    }
}

static void test_live_teacher(void **state)
{
    (void)state;
    char job[300], sec[1200];
    snprintf(sec, sizeof sec, "teacher: {model: %s, checkpoint: %s}\n", TEACHER_MODEL,
             teacher_ckpt);
    write_job(tp(job, sizeof job, "live.yaml"), "live", STUDENT_MODEL, sec, kd_losses, 2);
    train_both_ways(job, "live", NULL);
}

static void test_dropout(void **state)
{
    (void)state;
    char job[300];
    write_job(tp(job, sizeof job, "dropout.yaml"), "dropout", DROPOUT_MODEL, "", "", 2);
    train_both_ways(job, "dropout", NULL);
}

int main(void)
{
    const char *why = NULL;
    if (!kd_backend_cuda(&why)) {
        printf("skipped: %s\n", why ? why : "no CUDA backend");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scratch),        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_cached_teacher), cmocka_unit_test(test_live_teacher),
        cmocka_unit_test(test_dropout),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
