/*
 * test_cli_errors.c - the distill command on bad input: every failure exits
 * non-zero and its message names the file and the problem. Each case also
 * has a positive control where that is meaningful (the same job with good
 * input succeeds), so a check cannot pass because distill failed for some
 * other reason. Everything is written into a mkdtemp directory under /tmp.
 * KD_TEST_VERBOSE=1 prints every command with its output.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "fileio.h"
#include "kd_cli_util.h"
#include "kd_fake_data.h"
#include "safetensors.h"

#define OUT_LEN  (64 * 1024)
#define N_TRAIN  300
#define N_TEST   100
#define MLP_LINE "model: {input: [1, 28, 28], layers: [flatten, {linear: {out: 10}}]}"

static char tmp[256];  /* the test's private directory */
static char data[512]; /* a complete fake data set */
static char out[OUT_LEN];

static const char *tpath(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", tmp, name);
    return buf;
}

/*
 * A job file in block style so line numbers are known:
 *   line 8 is batch_size, line 10 the model, line 13 the lr key.
 */
static void write_job(const char *path, const char *out_dir, const char *root, const char *batch,
                      const char *model_line, const char *lr_line)
{
    char text[4096];
    snprintf(text, sizeof text,
             "run:\n"                     /* 1 */
             "  out_dir: %s\n"            /* 2 */
             "  seed: 1\n"                /* 3 */
             "  threads: 2\n"             /* 4 */
             "data:\n"                    /* 5 */
             "  dataset: fashion-mnist\n" /* 6 */
             "  root: %s\n"               /* 7 */
             "  batch_size: %s\n"         /* 8 */
             "  val_size: 50\n"           /* 9 */
             "%s\n"                       /* 10 */
             "optim:\n"                   /* 11 */
             "  name: sgd\n"              /* 12 */
             "  %s\n"                     /* 13 */
             "  momentum: 0.9\n"          /* 14 */
             "  epochs: 1\n",             /* 15 */
             out_dir, root, batch, model_line, lr_line);
    assert_int_equal(kd_write_text(path, text), 0);
}

/* The default job: the MLP on the good data set, writing into tmp/<out_name>. */
static void write_mlp_job(const char *path, const char *out_name)
{
    char od[600];
    write_job(path, tpath(od, sizeof od, out_name), data, "32", MLP_LINE, "lr: 0.05");
}

/* The file at path holds exactly want. */
static void assert_file_text(const char *path, const char *want)
{
    char *t = kd_read_text(path);
    if (!t || strcmp(t, want) != 0)
        fail_msg("%s holds '%s', not '%s'", path, t ? t : "(unreadable)", want);
    free(t);
}

/* A report in out_dir left nothing under out_dir/.new or out_dir/.old. */
static void assert_nothing_aside(const char *out_dir)
{
    char p[700];
    snprintf(p, sizeof p, "%s/.new", out_dir);
    assert_false(kd_file_exists(p));
    snprintf(p, sizeof p, "%s/.old", out_dir);
    assert_false(kd_file_exists(p));
}

/*
 * Run distill; require exit code `want_rc` and every NULL-terminated
 * substring in the combined output. Prints the command's output on failure.
 */
static void run_expect(const char *const *argv, int want_rc, ...)
{
    int rc = -1;
    int ran = kd_run_distill(argv, out, sizeof out, &rc);
    int ok = ran == 0 && rc == want_rc;
    char missing[1024] = "";
    va_list ap;
    va_start(ap, want_rc);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *)) {
        if (!strstr(out, s)) {
            ok = 0;
            size_t u = strlen(missing);
            snprintf(missing + u, sizeof missing - u, "\n    \"%s\"", s);
        }
    }
    va_end(ap);
    if (!ok || getenv("KD_TEST_VERBOSE")) {
        fprintf(stderr, "command: distill");
        for (int i = 0; argv[i]; i++)
            fprintf(stderr, " %s", argv[i]);
        fprintf(stderr, "\n--- output (exit %d, ran %d) ---\n%s--- end ---\n", rc, ran, out);
    }
    if (!ok) {
        fail_msg("want exit %d, got %d; missing from the output:%s", want_rc, rc,
                 missing[0] ? missing : " (nothing)");
    }
}

static int setup(void **state)
{
    (void)state;
    return kd_cli_workspace("kd_cli_errors_", N_TRAIN, N_TEST, 7, tmp, sizeof tmp, data,
                            sizeof data);
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(tmp);
    return 0;
}

/* Copy the good data set into tmp/<name> and return its path in dir. */
static void copy_data(const char *name, char *dir, size_t len)
{
    static const char *const files[] = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                        NULL};
    tpath(dir, len, name);
    assert_int_equal(mkdir(dir, 0755), 0);
    for (int i = 0; files[i]; i++) {
        char src[700], dst[700];
        uint8_t *b;
        size_t n;
        snprintf(src, sizeof src, "%s/%s", data, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        assert_int_equal(kd_read_file(src, &b, &n), 0);
        assert_int_equal(kd_write_bytes(dst, b, n), 0);
        free(b);
    }
}

/* Positive control: the default job trains on the fake data and writes its outputs. */
static void test_good_job_trains(void **state)
{
    (void)state;
    char job[600], res[700];
    write_mlp_job(tpath(job, sizeof job, "good.yaml"), "good");
    const char *argv[] = {"train", job, NULL};
    run_expect(argv, 0, "test: loss", NULL);
    assert_true(kd_file_exists(tpath(res, sizeof res, "good/result.json")));
    assert_true(kd_file_exists(tpath(res, sizeof res, "good/last.safetensors")));
    /* a data.train_limit past the split's size is said, not silently capped */
    char od[720];
    snprintf(od, sizeof od, "run.out_dir=%s", tpath(res, sizeof res, "good_limit"));
    const char *limit[] = {"train", job, "--set", od, "--set", "data.train_limit=100000", NULL};
    run_expect(limit, 0, "note: data.train_limit is 100000, more than the",
               "samples of the training split: all of them are used", NULL);
}

/* run.precision: bf16 trains (and says so); a precision it does not know is refused naming the
 * key's position and the value; so are quant.activations without quant.qat and quant.qat with
 * bf16. */
static void test_precision(void **state)
{
    (void)state;
    char job[600], od[600], res[700];
    write_mlp_job(tpath(job, sizeof job, "bf16.yaml"), "bf16");
    const char *argv[] = {"train", job, "--set", "run.precision=bf16", NULL};
    run_expect(argv, 0, "bf16 activations and products", "test: loss", NULL);
    assert_true(kd_file_exists(tpath(res, sizeof res, "bf16/result.json")));
    write_job(tpath(job, sizeof job, "fp16.yaml"), tpath(od, sizeof od, "fp16"), data, "32",
              MLP_LINE, "lr: 0.05");
    const char *bad[] = {"train", job, "--set", "run.precision=fp16", NULL};
    run_expect(bad, 1, "precision must be float32 or bf16", "'fp16'", NULL);
    assert_false(kd_file_exists(od));
    /* activation fake quantization belongs to quantization-aware training */
    const char *act[] = {"train", job, "--set", "quant={bits: 8, activations: true}", NULL};
    run_expect(act, 1, "quant.activations", "needs quant.qat: true", NULL);
    assert_false(kd_file_exists(od));
    /* bf16 rounding would move quantization-aware training's weights off their grid */
    const char *qb[] = {
        "train", job, "--set", "quant={bits: 8, qat: true}", "--set", "run.precision=bf16", NULL};
    run_expect(qb, 1, "quant.qat", "run.precision: float32", NULL);
    assert_false(kd_file_exists(od));
    /* teacher.view_targets: each or mean, and mean averages a cache's views */
    const char *vt_bad[] = {"train", job, "--set",
                            "teacher={model: {input: [1, 28, 28], layers: [flatten, {linear: {out: "
                            "10}}]}, checkpoint: t.safetensors, cache: t.h5, view_targets: median}",
                            NULL};
    run_expect(vt_bad, 1, "view_targets must be each or mean", "'median'", NULL);
    const char *vt_live[] = {
        "train", job, "--set",
        "teacher={model: {input: [1, 28, 28], layers: [flatten, {linear: {out: "
        "10}}]}, checkpoint: t.safetensors, view_targets: mean}",
        NULL};
    run_expect(vt_live, 1, "averages the views of a cache", "set teacher.cache", NULL);
    assert_false(kd_file_exists(od));
}

/* A learning rate that makes the weights infinite after one step: the run stops with the epoch and
 * the steps in which the loss stopped being finite (it is read back once per log interval) and a
 * hint, exit 1. */
static void test_loss_diverges(void **state)
{
    (void)state;
    char job[600], od[600];
    write_job(tpath(job, sizeof job, "diverge.yaml"), tpath(od, sizeof od, "diverge"), data, "32",
              MLP_LINE, "lr: 3.0e+38");
    const char *argv[] = {"train", job, NULL};
    run_expect(argv, 1, "loss became", "at epoch 1", "lower optim.lr", NULL);
    /* one step per epoch: the step's loss is finite and the weights it leaves are not; the
     * validation after the epoch stops the run before a metrics line or a result holds NaN */
    char one[600], od1[600];
    write_job(tpath(one, sizeof one, "diverge1.yaml"), tpath(od1, sizeof od1, "diverge1"), data,
              "250", MLP_LINE, "lr: 3.0e+38");
    const char *argv1[] = {"train", one, NULL};
    run_expect(argv1, 1, "outputs on the validation set after epoch 1 are not finite",
               "lower optim.lr", NULL);
    assert_false(kd_file_exists(tpath(od1, sizeof od1, "diverge1/result.json")));
    char *mt = kd_read_text(tpath(od1, sizeof od1, "diverge1/metrics.jsonl"));
    assert_true(!mt || !strstr(mt, "nan"));
    free(mt);
    /* past float32's range the learning rate is refused while the job is read */
    char want[700];
    write_job(job, tpath(od, sizeof od, "huge_lr"), data, "32", MLP_LINE, "lr: 1.0e+300");
    snprintf(want, sizeof want, "%s:13:7:", job); /* the value of lr */
    run_expect(argv, 1, want, "lr must be > 0 and at most 3.40282e+38", "1e+300", NULL);
    write_job(job, od, data, "32", MLP_LINE, "lr: 1.0e-50"); /* 0 in float32 */
    run_expect(argv, 1, want, "not 0 in float32", "1e-50", NULL);
    assert_false(kd_file_exists(od));
}

/* An unknown data set name is refused where the job names it. */
static void test_unknown_dataset(void **state)
{
    (void)state;
    char job[600], od[600];
    write_mlp_job(tpath(job, sizeof job, "dsname.yaml"), "dsname");
    const char *argv[] = {"train", job, "--set", "data.dataset=cifar10", NULL};
    run_expect(argv, 1, "--set data.dataset=cifar10", "unknown data set 'cifar10'",
               "fashion-mnist, mnist", NULL);
    assert_false(kd_file_exists(tpath(od, sizeof od, "dsname")));
}

/* A data directory with the train split only: the missing split is named, not the whole set. */
static void test_split_missing(void **state)
{
    (void)state;
    char dir[600], f[700], job[600], od[600];
    copy_data("halfset", dir, sizeof dir);
    snprintf(f, sizeof f, "%s/t10k-images-idx3-ubyte.gz", dir);
    assert_int_equal(remove(f), 0);
    snprintf(f, sizeof f, "%s/t10k-labels-idx1-ubyte.gz", dir);
    assert_int_equal(remove(f), 0);
    write_job(tpath(job, sizeof job, "halfset.yaml"), tpath(od, sizeof od, "halfset_out"), dir,
              "32", MLP_LINE, "lr: 0.05");
    const char *argv[] = {"eval", job, "--checkpoint", "unused.safetensors", NULL};
    run_expect(argv, 1, dir, "has the train split but not the t10k split",
               "t10k-images-idx3-ubyte[.gz]", NULL);
}

/* A model file that does not exist: the job and the line naming it come first. */
static void test_model_file_missing(void **state)
{
    (void)state;
    char job[600], od[600], want[1400], model[700];
    tpath(model, sizeof model, "no-such-model.yaml");
    char line[800];
    snprintf(line, sizeof line, "model: %s", model);
    write_job(tpath(job, sizeof job, "nomodel.yaml"), tpath(od, sizeof od, "nomodel"), data, "32",
              line, "lr: 0.05");
    const char *argv[] = {"summary", job, NULL};
    snprintf(want, sizeof want, "%s:10:8: model: cannot open config '%s'", job, model);
    run_expect(argv, 1, want, "No such file", NULL);
}

/* Two layers with one tap name: refused, naming both. */
static void test_duplicate_tap(void **state)
{
    (void)state;
    char job[600], od[600], want[700];
    write_job(tpath(job, sizeof job, "taps.yaml"), tpath(od, sizeof od, "taps"), data, "32",
              "model: {input: [1, 28, 28], layers: [flatten, {linear: {out: 16, tap: h}}, "
              "{relu: {tap: h}}, {linear: {out: 10}}]}",
              "lr: 0.05");
    const char *argv[] = {"summary", job, NULL};
    snprintf(want, sizeof want, "%s:10:", job);
    run_expect(argv, 1, want, "tap 'h' is already the name of layer 1", NULL);
    /* control: distinct names build */
    write_job(job, od, data, "32",
              "model: {input: [1, 28, 28], layers: [flatten, {linear: {out: 16, tap: h}}, "
              "{relu: {tap: g}}, {linear: {out: 10}}]}",
              "lr: 0.05");
    run_expect(argv, 0, "12730", NULL);
}

/* a. data.root is an empty directory: the set is named with the package that installs it. */
static void test_dataset_not_installed(void **state)
{
    (void)state;
    char job[600], empty[600], od[600];
    tpath(empty, sizeof empty, "empty");
    assert_int_equal(mkdir(empty, 0755), 0);
    write_job(tpath(job, sizeof job, "nodata.yaml"), tpath(od, sizeof od, "nodata"), empty, "32",
              MLP_LINE, "lr: 0.05");
    const char *argv[] = {"train", job, NULL};
    run_expect(argv, 1, "distill: error:", "data set 'fashion-mnist' not found", empty,
               "apt-get install dataset-fashion-mnist", NULL);
    const char *ev[] = {"eval", job, "--checkpoint", "whatever.safetensors", NULL};
    run_expect(ev, 1, "data set 'fashion-mnist' not found", "apt-get install dataset-fashion-mnist",
               NULL);
}

/* b. An IDX file whose header promises more than the decompressed payload holds. */
static void test_truncated_idx(void **state)
{
    (void)state;
    char dir[600], img[700], job[600], od[600];
    copy_data("trunc", dir, sizeof dir);
    snprintf(img, sizeof img, "%s/train-images-idx3-ubyte.gz", dir);
    uint32_t dims[3] = {N_TRAIN, 28, 28};
    uint8_t payload[1000];
    memset(payload, 9, sizeof payload);
    assert_int_equal(kd_fake_idx_write_gz(img, 3, dims, payload, sizeof payload), 0);
    write_job(tpath(job, sizeof job, "trunc.yaml"), tpath(od, sizeof od, "trunc_out"), dir, "32",
              MLP_LINE, "lr: 0.05");
    const char *argv[] = {"train", job, NULL};
    char want[800];
    snprintf(want, sizeof want, "'%s' is truncated", img);
    run_expect(argv, 1, want, "235200 bytes", "1000", "fashion-mnist", NULL);
}

/* c. Bytes flipped in the middle of a .gz file: the message names that file. */
static void test_corrupt_gzip(void **state)
{
    (void)state;
    char dir[600], img[700], job[600], od[600];
    copy_data("corrupt", dir, sizeof dir);
    snprintf(img, sizeof img, "%s/t10k-images-idx3-ubyte.gz", dir);
    uint8_t *b;
    size_t n;
    assert_int_equal(kd_read_file(img, &b, &n), 0);
    assert_true(n > 200);
    for (size_t i = n / 2; i < n / 2 + 32; i++)
        b[i] ^= 0xa5;
    assert_int_equal(kd_write_bytes(img, b, n), 0);
    free(b);
    write_job(tpath(job, sizeof job, "corrupt.yaml"), tpath(od, sizeof od, "corrupt_out"), dir,
              "32", MLP_LINE, "lr: 0.05");
    /* eval reads only the test split, so the corrupt file is the first thing to fail */
    char good_ckpt[700];
    tpath(good_ckpt, sizeof good_ckpt, "unused.safetensors");
    const char *argv[] = {"eval", job, "--checkpoint", good_ckpt, NULL};
    char want[800];
    snprintf(want, sizeof want, "'%s'", img);
    run_expect(argv, 1, want, "gzip", "loading data set 'fashion-mnist'", NULL);
    assert_null(strstr(out, "unused.safetensors"));
}

/* d. A YAML syntax error reports file:line:column. */
static void test_yaml_syntax_error(void **state)
{
    (void)state;
    char job[600];
    tpath(job, sizeof job, "job.yaml");
    assert_int_equal(kd_write_text(job, "run:\n"
                                        "  seed: 1\n"
                                        "  name: [a, b\n"
                                        "data: {dataset: fashion-mnist}\n"),
                     0);
    const char *argv[] = {"train", job, NULL};
    char want[700];
    /* the flow sequence opened on line 3 is still open where line 4 starts a new key */
    snprintf(want, sizeof want, "%s:4:5: YAML syntax error", job);
    run_expect(argv, 1, want, "line 3, column 9", NULL);
}

/* e. An unknown key in a section: position, the key and what is allowed. */
static void test_unknown_key(void **state)
{
    (void)state;
    char job[600], od[600], want[700];
    write_job(tpath(job, sizeof job, "unknown.yaml"), tpath(od, sizeof od, "unk"), data, "32",
              MLP_LINE, "lrr: 0.1");
    const char *argv[] = {"train", job, NULL};
    snprintf(want, sizeof want, "%s:13:3", job);
    run_expect(argv, 1, want, "unknown key 'lrr'", "optim", "lr", NULL);
    assert_false(kd_file_exists(od));
}

/* f. A value of the wrong type: position, the key name and the value. */
static void test_wrong_type(void **state)
{
    (void)state;
    char job[600], od[600], want[700];
    write_job(tpath(job, sizeof job, "type.yaml"), tpath(od, sizeof od, "type"), data, "big",
              MLP_LINE, "lr: 0.05");
    const char *argv[] = {"train", job, NULL};
    snprintf(want, sizeof want, "%s:8:15:", job);
    run_expect(argv, 1, want, "batch_size", "integer", "'big'", NULL);
    const char *sv[] = {"summary", job, NULL};
    run_expect(sv, 1, want, "batch_size", "'big'", NULL);
}

/* g. Layers whose shapes do not chain: the layer and the shape it receives are named. */
static void test_layer_shapes(void **state)
{
    (void)state;
    char job[600], od[600], want[700];
    write_job(tpath(job, sizeof job, "shapes.yaml"), tpath(od, sizeof od, "shapes"), data, "32",
              "model: {input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: "
              "1}}, {linear: {out: 10}}]}",
              "lr: 0.05");
    const char *argv[] = {"summary", job, NULL};
    snprintf(want, sizeof want, "%s:10:88:", job); /* where '{linear' starts */
    run_expect(argv, 1, want, "layer 1 (linear)", "needs a flat input", "[8, 14, 14]", "flatten",
               NULL);
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 1, "layer 1 (linear)", "[8, 14, 14]", NULL);
    /* control: with flatten in between the same model builds and reports its shapes */
    write_job(job, od, data, "32",
              "model: {input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: "
              "1}}, flatten, {linear: {out: 10}}]}",
              "lr: 0.05");
    run_expect(argv, 0, "1568", NULL);
}

/* h. The config file does not exist. */
static void test_missing_config(void **state)
{
    (void)state;
    char job[600];
    tpath(job, sizeof job, "no-such-job.yaml");
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 1, job, "No such file", NULL);
    const char *ev[] = {"eval", job, "--checkpoint", "x.safetensors", NULL};
    run_expect(ev, 1, job, NULL);
    /* an endless file named as a job or as its model: refused after 16 MiB, not read on */
    const char *endless[] = {"summary", "/dev/zero", NULL};
    run_expect(endless, 1, "'/dev/zero' is larger than 16 MiB", NULL);
    char mlp[600];
    write_mlp_job(tpath(mlp, sizeof mlp, "zero_model.yaml"), "zero_model");
    const char *model[] = {"summary", mlp, "--set", "model=/dev/zero", NULL};
    run_expect(model, 1, "'/dev/zero' is larger than 16 MiB", NULL);
}

/* i. --set with an unknown key, without '=', and without an argument. */
static void test_set_errors(void **state)
{
    (void)state;
    char job[600];
    write_mlp_job(tpath(job, sizeof job, "set.yaml"), "set");
    const char *unk[] = {"summary", job, "--set", "optim.lrr=0.1", NULL};
    run_expect(unk, 1, "unknown key 'lrr'", "optim.lrr", NULL);
    const char *noeq[] = {"summary", job, "--set", "optim.lr", NULL};
    run_expect(noeq, 1, "--set", "optim.lr", "key.path=value", NULL);
    const char *noarg[] = {"summary", job, "--set", NULL};
    run_expect(noarg, 2, "--set needs KEY=VALUE", "usage: distill summary", NULL);
    const char *badtype[] = {"summary", job, "--set=data.batch_size=huge", NULL};
    run_expect(badtype, 1, "batch_size", "'huge'", NULL);
    const char *nodata[] = {"summary", job, "--set", "data=null", NULL};
    run_expect(nodata, 1, "--set data=null", "section 'data' is empty", NULL);
    /* control: a valid override is accepted and takes effect */
    const char *ok[] = {"summary", job, "--set", "optim.lr=0.01", NULL};
    run_expect(ok, 0, "7850", NULL);
    /* keys the chosen optimizer or schedule would ignore are refused, naming their owner */
    const char *beta[] = {"summary", job, "--set", "optim.beta1=0.5", NULL};
    run_expect(beta, 1, "'beta1' belongs to adamw, not sgd", NULL);
    const char *mom[] = {"summary", job, "--set", "optim={name: adamw, lr: 0.01, momentum: 0.9}",
                         NULL};
    run_expect(mom, 1, "'momentum' belongs to sgd, not adamw", NULL);
    const char *gam[] = {"summary", job, "--set", "optim.schedule={type: cosine, gamma: 0.5}",
                         NULL};
    run_expect(gam, 1, "'gamma' belongs to a step schedule, not a cosine one", NULL);
    const char *minlr[] = {"summary", job, "--set", "optim.schedule={min_lr: 0.001}", NULL};
    run_expect(minlr, 1, "'min_lr' belongs to a cosine schedule, not a constant one", NULL);
    const char *step[] = {"summary", job, "--set",
                          "optim.schedule={type: step, step_size: 3, gamma: 0.5, warmup_steps: 2}",
                          NULL};
    run_expect(step, 0, "7850", NULL);
}

/* i2. Loss weights and the KD temperature the float32 losses cannot use: 0 or infinite once
 * rounded to float32, or outside the temperature range, are refused when the job loads. */
static void test_loss_ranges(void **state)
{
    (void)state;
    char job[600];
    write_mlp_job(tpath(job, sizeof job, "losses.yaml"), "losses");
    const char *teacher = "teacher={model: "
                          "{input: [1, 28, 28], layers: [flatten, {linear: "
                          "{out: 10}}]}, checkpoint: t.safetensors}";
    static const char *const bad[] = {
        "distill={mode: offline, losses: [{type: kd, temperature: 1e-50}]}",
        "distill={mode: offline, losses: [{type: kd, temperature: 1e39}]}",
        "distill={mode: offline, losses: [{type: kd, weight: 1e50}]}",
        "distill={mode: offline, losses: [{type: kd, weight: 1e-50}]}",
        "distill={mode: offline, losses: [{type: ce, weight: 1e-50}, {type: kd}]}",
        "distill={mode: offline, losses: [{type: dkd, alpha: 1e50}]}",
        NULL};
    for (int i = 0; bad[i]; i++) {
        const char *argv[] = {"summary", job, "--set", teacher, "--set", bad[i], NULL};
        run_expect(argv, 1, bad[i], "needs", NULL);
    }
    /* values checked once the data or the cache is at hand still name where they came from */
    const char *big_val[] = {"train", job, "--set", "data.val_size=100000000", NULL};
    run_expect(big_val, 1, "--set data.val_size=100000000: ", "leaves no training samples", NULL);
    const char *bad_comp[] = {"train", job, "--set", teacher, "--set", "teacher.compress=foo",
                              NULL};
    run_expect(bad_comp, 1, "--set teacher.compress=foo: ", "none, deflate, lz4 or zstd", NULL);
    /* a null model is a missing one, not a file named "null" */
    const char *null_model[] = {"summary", job, "--set", "model=null", NULL};
    run_expect(null_model, 1, "missing required section 'model'", NULL);
    const char *null_teacher[] = {"summary",         job, "--set", teacher, "--set",
                                  "teacher.model=~", NULL};
    run_expect(null_teacher, 1, "teacher needs 'model'", NULL);
    /* a bad value of one loss key, given by --set, is named where it came from */
    const char *terms = "distill={mode: offline, losses: [{type: ce, weight: 0.1}, {type: kd}]}";
    static const char *const bad_key[] = {
        "distill.losses.0.label_smoothing=1.0", "distill.losses.1.temperature=1000",
        "distill.losses.1.weight=-1", "distill.losses.1.alpha=1", NULL};
    for (int i = 0; bad_key[i]; i++) {
        const char *argv[] = {"summary", job,     "--set",    teacher, "--set",
                              terms,     "--set", bad_key[i], NULL};
        char want[128];
        snprintf(want, sizeof want, "--set %s: ", bad_key[i]);
        run_expect(argv, 1, want, NULL);
    }
    /* control: the same job with usual values loads */
    const char *ok[] = {"summary",
                        job,
                        "--set",
                        teacher,
                        "--set",
                        "distill={mode: offline, losses: [{type: ce, weight: 0.1}, {type: kd, "
                        "weight: 0.9, temperature: 0.5}]}",
                        NULL};
    run_expect(ok, 0, "7850", NULL);
}

/* i3. distill report: a row that cannot load its job is named, and int8_layers on a row that
 * is not int4 (where it would be ignored) is refused before any row runs. */
static void test_report_rows(void **state)
{
    (void)state;
    char spec[600], text[2048], missing[600], od[600];
    tpath(missing, sizeof missing, "no-such-job.yaml");
    snprintf(text, sizeof text,
             "out_dir: %s\n"
             "rows:\n"
             "  - {label: gone, config: %s, checkpoint: x.safetensors}\n",
             tpath(od, sizeof od, "report_out"), missing);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec1.yaml"), text), 0);
    const char *gone[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(gone, 1, "report row 1 (gone)", missing, NULL);
    snprintf(text, sizeof text,
             "out_dir: %s\n"
             "rows:\n"
             "  - {label: f, config: %s, checkpoint: x.safetensors, int8_layers: '0'}\n",
             od, missing);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec2.yaml"), text), 0);
    const char *layers[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(layers, 1, "spec2.yaml:3", "int8_layers keeps layers of an int4 export", "fp32",
               NULL);
    /* every row is checked before the first runs: a later row's missing checkpoint stops the
     * report before any work, and no output directory is made */
    char job[600], od3[600], text3[8192];
    write_mlp_job(tpath(job, sizeof job, "rows.yaml"), "rows");
    snprintf(text3, sizeof text3,
             "out_dir: %s\n"
             "rows:\n"
             "  - {label: first, config: %s, checkpoint: %s}\n"
             "  - {label: second, config: %s, checkpoint: %s/nope.safetensors}\n",
             tpath(od3, sizeof od3, "report_rows"), job, job, job, tmp);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec3.yaml"), text3), 0);
    const char *later[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(later, 1, "report row 2 (second)", "nope.safetensors", NULL);
    assert_false(kd_file_exists(od3));
    /* and a float row that runs: its accuracy is distill eval's, its label (with a bar) a
     * single cell of report.md, report.json beside it */
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", NULL);
    char ckpt[700], ev_acc[64];
    snprintf(ckpt, sizeof ckpt, "%s/rows/last.safetensors", tmp);
    const char *ev[] = {"eval", job, "--checkpoint", ckpt, NULL};
    run_expect(ev, 0, "accuracy", NULL);
    const char *acc = strstr(out, "accuracy ");
    assert_non_null(acc);
    snprintf(ev_acc, sizeof ev_acc, "%.6s", acc + 9);
    snprintf(text3, sizeof text3,
             "out_dir: %s\n"
             "rows:\n"
             "  - {label: 'mlp | fp32', config: %s, checkpoint: %s}\n",
             od3, job, ckpt);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec4.yaml"), text3), 0);
    const char *ok[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(ok, 0, "written:", ev_acc, NULL);
    char md[700];
    snprintf(md, sizeof md, "%s/report.md", od3);
    char *t = kd_read_text(md);
    assert_non_null(t);
    if (!strstr(t, "| mlp \\| fp32 | ") || !strstr(t, ev_acc))
        fail_msg("report.md lacks the row 'mlp \\| fp32' with %s:\n%s", ev_acc, t);
    free(t);
    snprintf(md, sizeof md, "%s/report.json", od3);
    assert_true(kd_file_exists(md));
    /* a later report with other rows removes the row directories it no longer writes, unless
     * they hold a file a report does not write */
    snprintf(text3, sizeof text3,
             "out_dir: %s\nrows:\n"
             "  - {label: f, config: %s, checkpoint: %s}\n"
             "  - {label: q, config: %s, checkpoint: %s, quant: int8}\n"
             "  - {label: r, config: %s, checkpoint: %s, quant: int8}\n",
             od3, job, ckpt, job, ckpt, job, ckpt);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec5.yaml"), text3), 0);
    const char *two[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(two, 0, "written:", NULL);
    char d2[700], d3[700], d1[700], keep[760];
    snprintf(d1, sizeof d1, "%s/01-int8", od3);
    snprintf(d2, sizeof d2, "%s/02-int8", od3);
    snprintf(d3, sizeof d3, "%s/03-int8", od3);
    assert_true(kd_file_exists(d2) && kd_file_exists(d3));
    snprintf(keep, sizeof keep, "%s/notes.txt", d3);
    assert_int_equal(kd_write_text(keep, "mine\n"), 0);
    snprintf(text3, sizeof text3,
             "out_dir: %s\nrows:\n  - {label: q, config: %s, checkpoint: %s, quant: int8}\n", od3,
             job, ckpt);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec6.yaml"), text3), 0);
    const char *one[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(one, 0, "written:", "03-int8 is from an earlier report and was left in place", NULL);
    assert_true(kd_file_exists(d1));
    assert_false(kd_file_exists(d2));
    assert_true(kd_file_exists(keep));
    /* a report whose second row fails leaves the earlier report as it was: its report.md and the
     * row directory the new first row would replace (marked here by a blob of other bytes) */
    char blob[760], bad[700], spec6[600], *md_before;
    snprintf(spec6, sizeof spec6, "%s", spec);
    snprintf(blob, sizeof blob, "%s/model.kdm", d1);
    assert_int_equal(kd_write_text(blob, "the earlier blob\n"), 0);
    snprintf(md, sizeof md, "%s/report.md", od3);
    md_before = kd_read_text(md);
    assert_non_null(md_before);
    assert_int_equal(kd_write_text(tpath(bad, sizeof bad, "bad.safetensors"), "not one\n"), 0);
    snprintf(text3, sizeof text3,
             "out_dir: %s\nrows:\n"
             "  - {label: q, config: %s, checkpoint: %s, quant: int8}\n"
             "  - {label: b, config: %s, checkpoint: %s, quant: int8}\n",
             od3, job, ckpt, job, bad);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "spec7.yaml"), text3), 0);
    const char *fails[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(fails, 1, "report row 2 (b)", "bad.safetensors", NULL);
    assert_file_text(blob, "the earlier blob\n");
    assert_file_text(md, md_before);
    free(md_before);
    /* and the next report that runs puts its rows in place and leaves nothing aside */
    const char *again[] = {"report", spec6, "--no-mcu", "--no-progress", NULL};
    run_expect(again, 0, "written:", NULL);
    t = kd_read_text(blob);
    assert_non_null(t);
    assert_true(strcmp(t, "the earlier blob\n") != 0);
    free(t);
    snprintf(blob, sizeof blob, "%s/report.json", d1); /* its files named where they are */
    t = kd_read_text(blob);
    assert_non_null(t);
    if (strstr(t, "/.new/") || !strstr(t, "01-int8/model.kdm"))
        fail_msg("%s names the files where they were written:\n%s", blob, t);
    free(t);
    assert_nothing_aside(od3);
    /* a file of the user's in a row directory stays in it across a new report, and what a
     * report stopped in an export left under .new does not block the next one */
    char mine[760], cut[760];
    snprintf(mine, sizeof mine, "%s/notes.txt", d1);
    assert_int_equal(kd_write_text(mine, "mine\n"), 0);
    snprintf(md, sizeof md, "%s/.new", od3);
    assert_int_equal(mkdir(md, 0755), 0);
    snprintf(md, sizeof md, "%s/.new/01-int8", od3);
    assert_int_equal(mkdir(md, 0755), 0);
    snprintf(cut, sizeof cut, "%s/model.c.tmp.4242", md);
    assert_int_equal(kd_write_text(cut, "half"), 0);
    run_expect(again, 0, "written:", NULL);
    assert_file_text(mine, "mine\n");
    assert_false(kd_file_exists(cut));
    assert_nothing_aside(od3);
    /* a report stopped while it swapped its rows in (the earlier row moved to .old, the new one
     * in place, report.md.new not yet renamed): the next report puts the earlier row back, even
     * when it fails itself */
    char old_row[760], mdn[700];
    snprintf(blob, sizeof blob, "%s/model.kdm", d1);
    assert_int_equal(kd_write_text(blob, "the earlier row\n"), 0);
    snprintf(md, sizeof md, "%s/.old", od3);
    assert_int_equal(mkdir(md, 0755), 0);
    snprintf(old_row, sizeof old_row, "%s/01-int8", md);
    assert_int_equal(rename(d1, old_row), 0);
    assert_int_equal(mkdir(d1, 0755), 0);
    assert_int_equal(kd_write_text(blob, "the interrupted row\n"), 0);
    snprintf(mdn, sizeof mdn, "%s/report.md.new", od3);
    assert_int_equal(kd_write_text(mdn, "interrupted\n"), 0);
    snprintf(md, sizeof md, "%s/report.md", od3);
    md_before = kd_read_text(md);
    assert_non_null(md_before);
    run_expect(fails, 1, "report row 2 (b)", NULL);
    assert_file_text(blob, "the earlier row\n");
    assert_file_text(md, md_before);
    free(md_before);
    assert_false(kd_file_exists(mdn));
    assert_false(kd_file_exists(old_row));
}

/* j. eval with a checkpoint of another model lists every mismatched tensor. */
static void test_eval_wrong_model(void **state)
{
    (void)state;
    char job[600], job2[600], od[600], ckpt[700];
    write_mlp_job(tpath(job, sizeof job, "mlp.yaml"), "mlp");
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", NULL);
    tpath(ckpt, sizeof ckpt, "mlp/last.safetensors");
    assert_true(kd_file_exists(ckpt));
    /* control: the checkpoint evaluates with its own model */
    const char *ev_ok[] = {"eval", job, "--checkpoint", ckpt, NULL};
    run_expect(ev_ok, 0, "accuracy", "100 samples", NULL);

    write_job(tpath(job2, sizeof job2, "mlp2.yaml"), tpath(od, sizeof od, "mlp2"), data, "32",
              "model: {input: [1, 28, 28], layers: [flatten, {linear: {out: 32}}, relu, "
              "{linear: {out: 10}}]}",
              "lr: 0.05");
    const char *ev[] = {"eval", job2, "--checkpoint", ckpt, NULL};
    run_expect(ev, 1, ckpt, "does not match the model",
               "1.weight is [10, 784] in the checkpoint but [32, 784] in the model",
               "1.bias is [10] in the checkpoint but [32] in the model",
               "missing 3.weight [10, 32]", "missing 3.bias [10]", NULL);
    assert_null(strstr(out, "accuracy"));
    /* and --resume refuses it the same way */
    const char *rs[] = {"train", job2, "--resume", ckpt, NULL};
    run_expect(rs, 1, ckpt, "1.weight is [10, 784] in the checkpoint but [32, 784] in the model",
               NULL);
}

/* Whether dir holds a file whose name starts with prefix. */
static int has_file_prefix(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int found = 0;
    for (struct dirent *e; (e = readdir(d)) && !found;)
        found = strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    closedir(d);
    return found;
}

/* k. A write failing while checkpointing leaves the previous checkpoint intact and loadable. */
static void test_failed_checkpoint_write(void **state)
{
    (void)state;
    char job[600], dir[600], ckpt[700];
    write_mlp_job(tpath(job, sizeof job, "fsize.yaml"), "fsize");
    tpath(dir, sizeof dir, "fsize");
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", NULL);
    /* result.json marks a finished run; the failing run below must not write one */
    char res[700];
    assert_int_equal(remove(tpath(res, sizeof res, "fsize/result.json")), 0);
    snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", dir);
    uint8_t *before;
    size_t nbefore;
    assert_int_equal(kd_read_file(ckpt, &before, &nbefore), 0);
    assert_true(nbefore > 4096);

    const char *rs[] = {"train", job, "--set", "optim.epochs=2", "--resume", NULL};
    int rc = -1;
    long long limit = (long long)nbefore / 2;
    assert_int_equal(kd_run_distill_fsize(rs, limit, out, sizeof out, &rc), 0);
    char want[800];
    snprintf(want, sizeof want, "writing '%s'", ckpt);
    int ok = rc == 1 && strstr(out, "resumed from") && strstr(out, want) &&
             strstr(out, "File too large");
    if (!ok || getenv("KD_TEST_VERBOSE"))
        fprintf(stderr, "--- output (exit %d) ---\n%s--- end ---\n", rc, out);
    if (!ok)
        fail_msg("want exit 1 with \"resumed from\", \"%s\" and \"File too large\"", want);
    assert_false(kd_file_exists(res));
    assert_false(has_file_prefix(dir, "last.safetensors.tmp"));

    assert_true(kd_file_holds(ckpt, before, nbefore));
    free(before);
    const char *ev[] = {"eval", job, "--checkpoint", ckpt, NULL};
    run_expect(ev, 0, "accuracy", NULL);
    /* and it still resumes: without the limit the second epoch completes */
    run_expect(rs, 0, "resumed from", "in epoch 2/2, step", "test: loss", NULL);
}

/*
 * last.safetensors is an epoch's commit point: when writing best.safetensors
 * fails, the resumed run redoes the epoch and writes best.safetensors and the
 * epoch's metrics line after all.
 */
static void test_best_write_failure_then_resume(void **state)
{
    (void)state;
    char job[600], best[700], metrics[700];
    write_mlp_job(tpath(job, sizeof job, "best.yaml"), "bestfail");
    tpath(best, sizeof best, "bestfail/best.safetensors");
    tpath(metrics, sizeof metrics, "bestfail/metrics.jsonl");
    assert_int_equal(mkdir(tpath(metrics, sizeof metrics, "bestfail"), 0755), 0);
    assert_int_equal(mkdir(best, 0755), 0); /* a directory in the way: the rename fails */
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 1, best, NULL);
    assert_int_equal(rmdir(best), 0);
    const char *rs[] = {"train", job, "--resume", NULL};
    run_expect(rs, 0, "test: loss", NULL);
    if (!kd_file_exists(best))
        fail_msg("%s was never written after the resume", best);
    char *m = kd_read_text(tpath(metrics, sizeof metrics, "bestfail/metrics.jsonl"));
    assert_non_null(m);
    if (!strstr(m, "\"epoch\": 1,")) {
        fprintf(stderr, "metrics.jsonl:\n%s\n", m);
        free(m);
        fail_msg("metrics.jsonl lost the line of epoch 1");
    }
    free(m);
}

/* l. Unknown commands and options are usage errors: exit 2 with the usage text. */
static void test_usage_errors(void **state)
{
    (void)state;
    char job[600];
    write_mlp_job(tpath(job, sizeof job, "usage.yaml"), "usage");
    const char *a[] = {"frobnicate", NULL};
    run_expect(a, 2, "unknown command 'frobnicate'", "usage: distill <command>", NULL);
    const char *b[] = {"train", job, "--bogus", NULL};
    run_expect(b, 2, "unknown option '--bogus'", "usage: distill train CONFIG", NULL);
    const char *c[] = {NULL};
    run_expect(c, 2, "missing command", "usage: distill <command>", NULL);
    const char *d[] = {"eval", job, NULL};
    run_expect(d, 2, "--checkpoint", "usage: distill eval CONFIG", NULL);
    const char *e[] = {"summary", NULL};
    run_expect(e, 2, "missing CONFIG", "usage: distill summary", NULL);
    const char *f[] = {"summary", job, "extra", NULL};
    run_expect(f, 2, "unexpected argument 'extra'", NULL);
    const char *g[] = {"eval", job, "--resume", NULL};
    run_expect(g, 2, "unknown option '--resume'", "usage: distill eval", NULL);
    /* an option given twice is refused, not silently replaced by the second */
    const char *h[] = {"eval",          job, "--checkpoint", "a.safetensors", "--checkpoint",
                       "b.safetensors", NULL};
    run_expect(h, 2, "--checkpoint is given twice", "usage: distill eval", NULL);
    const char *r2[] = {"train", job, "--resume", "--resume", NULL};
    run_expect(r2, 2, "--resume is given twice", "usage: distill train", NULL);
    const char *x[] = {"export",   job, "--checkpoint", "a.safetensors", "--quant", "int8",
                       "--format", "c", "--quant",      "int4",          "--out",   "o",
                       NULL};
    run_expect(x, 2, "--quant is given twice", "usage: distill export", NULL);
}

/* m. Help is not an error. */
static void test_help(void **state)
{
    (void)state;
    const char *a[] = {"--help", NULL};
    run_expect(a, 0, "usage: distill <command>", "train CONFIG", NULL);
    const char *b[] = {"help", "train", NULL};
    run_expect(b, 0, "usage: distill train CONFIG", "--resume", NULL);
    const char *c[] = {"train", "--help", NULL};
    run_expect(c, 0, "usage: distill train CONFIG", NULL);
    const char *d[] = {"help", "eval", NULL};
    run_expect(d, 0, "usage: distill eval CONFIG --checkpoint FILE", NULL);
    const char *e[] = {"--version", NULL};
    run_expect(e, 0, "distill 0.", NULL);
    /* help on a command that does not exist is a usage error */
    const char *f[] = {"help", "bogus", NULL};
    run_expect(f, 2, "unknown command 'bogus'", "usage: distill <command>", NULL);
}

/* A checkpoint write cut off by a kill leaves <name>.safetensors.tmp.<pid>, as large as a
 * checkpoint: the next run in that out_dir removes it, unless its process is still alive or it
 * was written to in the last minute. */
static void test_cut_writes_removed(void **state)
{
    (void)state;
    char job[600], od[600], dead[700], live[700], fresh[700];
    write_mlp_job(tpath(job, sizeof job, "cut.yaml"), "cut");
    tpath(od, sizeof od, "cut");
    assert_int_equal(mkdir(od, 0755), 0);
    /* a pid above the kernel's limit (at most 2^22) is never alive; this test's own is */
    snprintf(dead, sizeof dead, "%s/last.safetensors.tmp.%d", od, 2147483000);
    snprintf(live, sizeof live, "%s/best.safetensors.tmp.%ld", od, (long)getpid());
    snprintf(fresh, sizeof fresh, "%s/last.safetensors.tmp.%d", od, 2147483001);
    assert_int_equal(kd_write_text(dead, "half a checkpoint"), 0);
    assert_int_equal(kd_write_text(live, "being written"), 0);
    assert_int_equal(kd_write_text(fresh, "written a moment ago, on another host perhaps"), 0);
    /* the first two last written two minutes ago; the third just now */
    struct timeval old[2];
    gettimeofday(&old[0], NULL);
    old[0].tv_sec -= 120;
    old[1] = old[0];
    assert_int_equal(utimes(dead, old), 0);
    assert_int_equal(utimes(live, old), 0);
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", "a checkpoint write that was cut off", NULL);
    assert_false(kd_file_exists(dead));
    assert_true(kd_file_exists(live));
    assert_true(kd_file_exists(fresh));
}

/* --resume from a file holding weights only (a state_dict saved outside distill: no metadata, no
 * optimizer state) is refused as such, whether the job keeps optimizer state or not. */
static void test_resume_weights_only(void **state)
{
    (void)state;
    char job[600], ckpt[700], bare[700];
    write_mlp_job(tpath(job, sizeof job, "bare.yaml"), "bare");
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", NULL);
    tpath(ckpt, sizeof ckpt, "bare/last.safetensors");
    tpath(bare, sizeof bare, "bare_weights.safetensors");
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(ckpt, &st), KD_OK);
    kd_st_entry ents[16];
    size_t n = 0;
    for (size_t i = 0; i < kd_safetensors_count(st) && n < 16; i++)
        if (strcmp(kd_safetensors_entry(st, i)->name, "__optim__.state") != 0)
            ents[n++] = *kd_safetensors_entry(st, i);
    assert_int_equal(kd_safetensors_save(bare, ents, n, NULL, 0), KD_OK);
    kd_safetensors_close(st);
    char od[720];
    snprintf(od, sizeof od, "run.out_dir=%s", tpath(ckpt, sizeof ckpt, "bare2"));
    const char *momentum[] = {"train", job, "--resume", bare, "--set", od, NULL};
    run_expect(momentum, 1, bare, "holds weights only, no optimizer state", NULL);
    const char *plain[] = {"train", job,     "--resume",         bare, "--set",
                           od,      "--set", "optim.momentum=0", NULL};
    run_expect(plain, 1, bare, "holds weights only, no optimizer state", NULL);
}

/* run.comm: single under a launcher: refused inside an srun step of several tasks (each task
 * would train alone and write the same files), not in an sbatch script that merely has
 * SLURM_NTASKS set (it runs one process). */
static void test_single_under_slurm(void **state)
{
    (void)state;
    char job[600];
    write_mlp_job(tpath(job, sizeof job, "slurm.yaml"), "slurm");
    const char *tr[] = {"train", job, "--set", "run.comm=single", NULL};
    setenv("SLURM_STEP_NUM_TASKS", "4", 1);
    run_expect(tr, 1, "run.comm is single but the job was started as one of several ranks", NULL);
    unsetenv("SLURM_STEP_NUM_TASKS");
    setenv("SLURM_NTASKS", "4", 1);
    run_expect(tr, 0, "epoch 1/1", NULL);
    unsetenv("SLURM_NTASKS");
}

/* A run.out_dir another process is writing (it holds the directory's lock) is refused, naming
 * that process, and nothing is written there; once the lock is gone the job runs, and a run
 * leaves no lock file behind. A job refused after the lock was taken removes the directories
 * it made for its run. */
static void test_out_dir_in_use(void **state)
{
    (void)state;
    char job[600], od[600], p[700], who[64];
    write_mlp_job(tpath(job, sizeof job, "busy.yaml"), "busy");
    tpath(od, sizeof od, "busy");
    kd_dir_lock lock;
    assert_int_equal(kd_dir_lock_take(od, "run.out_dir", &lock, NULL), KD_OK);
    snprintf(who, sizeof who, "(pid %ld on ", (long)getpid());
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 1, "run.out_dir", od, "is in use: another distill process", who, NULL);
    snprintf(p, sizeof p, "%s/metrics.jsonl", od);
    assert_false(kd_file_exists(p));
    snprintf(p, sizeof p, "%s/config.yaml", od);
    assert_false(kd_file_exists(p));
    kd_dir_lock_drop(&lock, 0);
    snprintf(p, sizeof p, "%s/.distill.lock", od);
    assert_false(kd_file_exists(p));
    run_expect(tr, 0, "epoch 1/1", NULL);
    assert_false(kd_file_exists(p));
    char made[600], nested[700], ood[720];
    tpath(made, sizeof made, "made");
    snprintf(nested, sizeof nested, "%s/inner", made);
    snprintf(ood, sizeof ood, "run.out_dir=%s", nested);
    tpath(p, sizeof p, "no_such.safetensors");
    const char *refused[] = {"train", job, "--set", ood, "--resume", p, NULL};
    run_expect(refused, 1, p, NULL);
    assert_false(kd_file_exists(made));
    /* through "..", the directories are left as they are: removing by the path's text would
     * take an empty one that was there before (pre) and keep the one made (dd) */
    char pre[600];
    assert_int_equal(mkdir(tpath(pre, sizeof pre, "pre"), 0755), 0);
    snprintf(ood, sizeof ood, "run.out_dir=%s/dd/../pre/x", tmp);
    run_expect(refused, 1, p, NULL);
    assert_true(kd_file_exists(pre));
}

/* --resume FILE into a run.out_dir that holds another run is refused and leaves that run as it
 * was; the run's own checkpoint resumes there, from its directory or a copy elsewhere, and when
 * every epoch is done its result.json (whose train_seconds are the training's) is kept. A
 * checkpoint trained with another quant section is refused too. */
static void test_resume_into_other_run(void **state)
{
    (void)state;
    char job[600], a_last[700], a_best[700], b_last[700], a_res[700], ob[720];
    write_mlp_job(tpath(job, sizeof job, "runa.yaml"), "runa");
    const char *tr_a[] = {"train", job, NULL};
    run_expect(tr_a, 0, "epoch 1/1", NULL);
    snprintf(ob, sizeof ob, "run.out_dir=%s", tpath(b_last, sizeof b_last, "runb"));
    const char *tr_b[] = {"train", job, "--set", ob, "--set", "optim.lr=0.01", NULL};
    run_expect(tr_b, 0, "epoch 1/1", NULL);
    tpath(a_last, sizeof a_last, "runa/last.safetensors");
    tpath(a_best, sizeof a_best, "runa/best.safetensors");
    tpath(b_last, sizeof b_last, "runb/last.safetensors");
    char *res0 = kd_read_text(tpath(a_res, sizeof a_res, "runa/result.json"));
    assert_non_null(res0);
    uint8_t *ck0 = NULL;
    size_t n0 = 0;
    assert_int_equal(kd_read_file(a_last, &ck0, &n0), 0);
    const char *other[] = {"train", job, "--set", "optim.epochs=2", "--resume", b_last, NULL};
    run_expect(other, 1, "already holds a run", b_last, "is not a checkpoint of that run", NULL);
    assert_true(kd_file_holds(a_last, ck0, n0));
    assert_file_text(a_res, res0);
    const char *own[] = {"train", job, "--resume", a_best, NULL};
    run_expect(own, 0, "nothing left to train", "result.json kept: this process trained nothing",
               NULL);
    assert_file_text(a_res, res0);
    /* a copy of the run's checkpoint kept elsewhere is still that run's (its run id) */
    char copy[700];
    assert_int_equal(kd_write_bytes(tpath(copy, sizeof copy, "runa_copy.safetensors"), ck0, n0), 0);
    const char *from_copy[] = {"train", job, "--resume", copy, NULL};
    run_expect(from_copy, 0, "nothing left to train", NULL);
    assert_true(kd_file_holds(a_last, ck0, n0));
    /* and with only best.safetensors left to tell which run the directory holds */
    char moved[700];
    assert_int_equal(rename(a_last, tpath(moved, sizeof moved, "runa_last_aside")), 0);
    run_expect(from_copy, 0, "nothing left to train", NULL);
    assert_int_equal(rename(moved, a_last), 0);
    /* a fork (the run's checkpoint trained on elsewhere with another job) is a run of its own:
     * the original's directory does not take it back */
    char fork_last[700], of[720];
    snprintf(of, sizeof of, "run.out_dir=%s", tpath(fork_last, sizeof fork_last, "fork"));
    const char *fork[] = {
        "train",         job,        "--set", of,  "--set", "optim.epochs=2", "--set",
        "optim.lr=0.01", "--resume", copy,    NULL};
    run_expect(fork, 0, "epoch 2/2", NULL);
    tpath(fork_last, sizeof fork_last, "fork/last.safetensors");
    const char *back[] = {"train", job, "--set", "optim.epochs=2", "--resume", fork_last, NULL};
    run_expect(back, 1, "is not a checkpoint of that run", NULL);
    assert_true(kd_file_holds(a_last, ck0, n0));
    const char *qat[] = {"train",          job,        "--set", "quant.bits=8", "--set",
                         "quant.qat=true", "--resume", NULL};
    run_expect(qat, 1, "was trained with no quantization-aware training",
               "resume it with the quant section it was trained with", NULL);
    assert_true(kd_file_holds(a_last, ck0, n0));
    free(ck0);
    free(res0);
}

/* An executable script at path holding text. */
static void write_script(const char *path, const char *text)
{
    assert_int_equal(kd_write_text(path, text), 0);
    assert_int_equal(chmod(path, 0755), 0);
}

/* A quantized row whose firmware does not fit the Cortex-M4 board (bench/mcu/run.sh exits 3; a
 * stand-in source tree's run.sh does, with stand-ins for the tools on PATH) stays in the report
 * with its blob and arena, marked "(too big)" and without an instruction count, and the log
 * the message points at is there. Then a report whose report.md cannot be replaced. */
static void test_report_too_big(void **state)
{
    (void)state;
    char job[600], src[600], bin[600], p[700], ckpt[700], spec[600], od[600], text[4096];
    write_mlp_job(tpath(job, sizeof job, "big.yaml"), "big");
    const char *tr[] = {"train", job, NULL};
    run_expect(tr, 0, "epoch 1/1", NULL);
    tpath(ckpt, sizeof ckpt, "big/last.safetensors");
    tpath(src, sizeof src, "fakesrc");
    snprintf(p, sizeof p, "%s/bench/mcu", src);
    assert_int_equal(kd_mkdir_p(p), KD_OK);
    snprintf(p, sizeof p, "%s/bench/mcu/run.sh", src);
    write_script(p, "echo \"run.sh: $2 does not fit mps2-an386's memory: region FLASH "
                    "overflowed by 123 bytes\" >&2\nexit 3\n");
    assert_int_equal(kd_mkdir_p(tpath(bin, sizeof bin, "fakebin")), KD_OK);
    static const char *const tools[] = {"arm-none-eabi-gcc", "qemu-system-arm", "cmake"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", bin, tools[i]);
        write_script(p, "#!/bin/sh\nexit 1\n");
    }
    snprintf(text, sizeof text,
             "out_dir: %s\nrows:\n"
             "  - {label: f, config: %s, checkpoint: %s}\n"
             "  - {label: q, config: %s, checkpoint: %s, quant: int8}\n",
             tpath(od, sizeof od, "big_report"), job, ckpt, job, ckpt);
    assert_int_equal(kd_write_text(tpath(spec, sizeof spec, "big_spec.yaml"), text), 0);
    const char *path0 = getenv("PATH");
    char *saved = strdup(path0 ? path0 : "/usr/bin:/bin"), newpath[4096];
    snprintf(newpath, sizeof newpath, "%s:%s", bin, saved);
    setenv("PATH", newpath, 1);
    const char *rep[] = {"report", spec, "--mcu", "--source", src, "--no-progress", NULL};
    run_expect(rep, 0, "row 2 (q): the firmware does not fit the Cortex-M4 board's memory",
               "(too big)", "written:", NULL);
    setenv("PATH", saved, 1);
    free(saved);
    snprintf(p, sizeof p, "%s/report.md", od);
    char *md = kd_read_text(p);
    assert_non_null(md);
    if (!strstr(md, " (too big) |") || !strstr(md, "(too big): the firmware does not fit"))
        fail_msg("report.md does not mark the row too big:\n%s", md);
    free(md);
    snprintf(p, sizeof p, "%s/report.json", od);
    cJSON *j = kd_read_json(p);
    assert_non_null(j);
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(j, "rows");
    const cJSON *q = cJSON_GetArrayItem(rows, 1);
    assert_non_null(q);
    assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(q, "fits_cortex_m4")));
    assert_null(cJSON_GetObjectItemCaseSensitive(q, "m4_instructions_per_inference"));
    assert_true(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(q, "flash_bytes")));
    assert_null(cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(rows, 0), "fits_cortex_m4"));
    cJSON_Delete(j);
    snprintf(p, sizeof p, "%s/02-int8/mcu.log", od);
    char *log = kd_read_text(p);
    assert_non_null(log);
    assert_non_null(strstr(log, "overflowed by 123 bytes"));
    free(log);
    /* report.md cannot be replaced (a directory of the user's is in its place): the rows are
     * the new ones, the message names the file that holds the new report.md, nothing is left
     * under .new or .old, and the next report (the directory gone) finishes cleanly */
    char blocker[760];
    snprintf(p, sizeof p, "%s/report.md", od);
    assert_int_equal(unlink(p), 0);
    snprintf(blocker, sizeof blocker, "%s/report.md/mine", od);
    assert_int_equal(kd_mkdir_p(blocker), KD_OK);
    const char *again[] = {"report", spec, "--no-mcu", "--no-progress", NULL};
    run_expect(again, 1, "the new rows are in place but renaming", "report.md.new",
               "report.json is the new one", NULL);
    assert_nothing_aside(od);
    snprintf(p, sizeof p, "%s/report.md.new", od);
    assert_true(kd_file_exists(p));
    kd_rm_rf(blocker);
    snprintf(p, sizeof p, "%s/report.md", od);
    assert_int_equal(rmdir(p), 0);
    run_expect(again, 0, "written:", NULL);
    assert_true(kd_file_exists(p));
    snprintf(p, sizeof p, "%s/report.md.new", od);
    assert_false(kd_file_exists(p));
    assert_nothing_aside(od);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_job_trains),
        cmocka_unit_test(test_loss_diverges),
        cmocka_unit_test(test_precision),
        cmocka_unit_test(test_dataset_not_installed),
        cmocka_unit_test(test_unknown_dataset),
        cmocka_unit_test(test_split_missing),
        cmocka_unit_test(test_model_file_missing),
        cmocka_unit_test(test_duplicate_tap),
        cmocka_unit_test(test_truncated_idx),
        cmocka_unit_test(test_corrupt_gzip),
        cmocka_unit_test(test_yaml_syntax_error),
        cmocka_unit_test(test_unknown_key),
        cmocka_unit_test(test_wrong_type),
        cmocka_unit_test(test_layer_shapes),
        cmocka_unit_test(test_missing_config),
        cmocka_unit_test(test_set_errors),
        cmocka_unit_test(test_loss_ranges),
        cmocka_unit_test(test_report_rows),
        cmocka_unit_test(test_eval_wrong_model),
        cmocka_unit_test(test_failed_checkpoint_write),
        cmocka_unit_test(test_best_write_failure_then_resume),
        cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_single_under_slurm),
        cmocka_unit_test(test_cut_writes_removed),
        cmocka_unit_test(test_resume_weights_only),
        cmocka_unit_test(test_out_dir_in_use),
        cmocka_unit_test(test_resume_into_other_run),
        cmocka_unit_test(test_report_too_big),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
