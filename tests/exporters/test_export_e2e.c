/*
 * test_export_e2e.c - `distill export` end to end on small students trained for a few steps on the
 * fake data set: INT8 and INT4 blobs load with kdm_load, the runtime's integer outputs track the
 * engine's float outputs (checked here independently of the exporter's own report), model.c holds
 * the very bytes of model.kdm (compiled with the host compiler when there is one), samples.bin
 * replays bit for bit; and bad inputs (an op the runtime lacks, a checkpoint of another model, a
 * damaged or missing checkpoint, an output directory that cannot be created, bad flags) fail with
 * a message naming the culprit and leave nothing behind.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "dataset.h"
#include "job.h"
#include "kd_cli_util.h"
#include "kd_test.h"
#include "kdm.h"
#include "model.h"
#include "quant.h"

static char dir[128], data[300];
static char out[1 << 16];

/* conv + bn + relu, depthwise, pointwise, a residual block, max pool, gap, linear */
#define MODEL_A                                                                                    \
    "{input: [1, 28, 28], layers: ["                                                               \
    "{conv2d: {out: 8, kernel: 3, stride: 2, pad: 1, bias: false}}, batchnorm, relu,"              \
    " {conv2d: {out: 8, kernel: 3, pad: 1, groups: 8, bias: false}}, batchnorm, relu,"             \
    " {conv2d: {out: 16, kernel: 1, bias: false}}, batchnorm, relu,"                               \
    " {residual: {body: [{conv2d: {out: 16, kernel: 3, pad: 1}}, batchnorm, relu,"                 \
    " {conv2d: {out: 16, kernel: 1}}, batchnorm]}}, relu,"                                         \
    " {maxpool2d: {kernel: %d}}, global_avgpool, {linear: {out: 10}}]}"
/* a flatten of [4, 7, 7] into a linear: the NHWC column permutation */
#define MODEL_B                                                                                    \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 4, kernel: 3, stride: 2, pad: 1}}, relu,"        \
    " {maxpool2d: {kernel: 2}}, flatten, {linear: {out: 10}}]}"
/* a grouped convolution the runtime does not have */
#define MODEL_C                                                                                    \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 4, kernel: 3, stride: 2}},"                      \
    " {conv2d: {out: 4, kernel: 3, groups: 2}}, global_avgpool, {linear: {out: 10}}]}"

static const char *tp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
    return buf;
}

/* name.yaml: the model trained 3 epochs into name/, with `extra` (YAML lines) appended */
static void write_job_extra(const char *name, const char *model, const char *extra)
{
    char path[400], od[300], text[4096];
    snprintf(text, sizeof text,
             "run: {name: %s, out_dir: %s, seed: 2, threads: 2, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, val_size: 50}\n"
             "model: %s\n"
             "optim: {name: adamw, lr: 0.01, epochs: 3}\n%s",
             name, tp(od, sizeof od, name), data, model, extra);
    char fname[64];
    snprintf(fname, sizeof fname, "%s.yaml", name);
    assert_int_equal(kd_write_text(tp(path, sizeof path, fname), text), 0);
}

static void write_job(const char *name, const char *model) { write_job_extra(name, model, ""); }

static int run(const char *const *argv)
{
    int code = -1;
    assert_int_equal(kd_run_distill(argv, out, sizeof out, &code), 0);
    return code;
}

static int setup(void **state)
{
    (void)state;
    if (kd_cli_workspace("kd_export_", 600, 300, 4, dir, sizeof dir, data, sizeof data))
        return -1;
    char model[2048];
    snprintf(model, sizeof model, MODEL_A, 2);
    write_job("a", model);
    snprintf(model, sizeof model, MODEL_A, 1); /* same parameters, another architecture */
    write_job("a2", model);
    write_job("b", MODEL_B);
    write_job("c", MODEL_C);
    const char *const names[] = {"a", "b"};
    for (int i = 0; i < 2; i++) {
        char job[300], fname[64];
        snprintf(fname, sizeof fname, "%s.yaml", names[i]);
        const char *argv[] = {"train", tp(job, sizeof job, fname), NULL};
        int code = -1;
        if (kd_run_distill(argv, out, sizeof out, &code) || code) {
            fprintf(stderr, "training %s failed (%d):\n%s", names[i], code, out);
            return -1;
        }
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(dir);
    return 0;
}

/* The job's model with the checkpoint's weights, and the fake test split. */
static kd_model *load_model(const char *name, kd_dataset *test)
{
    char path[300], ck[300], fname[64];
    snprintf(fname, sizeof fname, "%s.yaml", name);
    kd_job job;
    if (kd_job_load(tp(path, sizeof path, fname), NULL, &job) != KD_OK)
        fail_msg("job: %s", kd_last_error());
    kd_model *m = NULL;
    snprintf(fname, sizeof fname, "%s/last.safetensors", name);
    if (kd_model_build(job.model_input, job.model_layers, kd_backend_cpu(), 300, 1, &m) ||
        kd_checkpoint_load(tp(ck, sizeof ck, fname), m, NULL, 0, NULL))
        fail_msg("model: %s", kd_last_error());
    kd_job_free(&job);
    if (test && kd_dataset_load("fashion-mnist", data, 0, test) != KD_OK)
        fail_msg("data: %s", kd_last_error());
    return m;
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void quantize(const float *x, size_t n, float scale, int32_t zp, int8_t *q)
{
    for (size_t i = 0; i < n; i++) {
        float v = roundf(x[i] / scale) + (float)zp;
        q[i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
    }
}

typedef struct {
    double agree, mean_err, mean_max;
} track;

/* Run the blob on the whole test split and compare with the engine's float logits. */
static track compare(const char *name, const uint8_t *blob, size_t len)
{
    kd_dataset test;
    kd_model *m = load_model(name, &test);
    kdm_model km;
    kdm_status ks = kdm_load(&km, blob, len);
    if (ks != KDM_OK)
        fail_msg("kdm_load: %s", kdm_status_str(ks));
    assert_int_equal(kdm_input_size(&km), 784);
    assert_int_equal(kdm_output_size(&km), 10);
    uint32_t sb, ob;
    int32_t zp, ozp;
    kdm_input_quant(&km, &sb, &zp);
    kdm_output_quant(&km, &ob, &ozp);
    float scale, oscale;
    memcpy(&scale, &sb, 4);
    memcpy(&oscale, &ob, 4);
    uint8_t *arena = aligned_alloc(16, (kdm_arena_size(&km) + 15) & ~15u);
    assert_non_null(arena);
    kd_model_forward(m, test.x, (int)test.n, 0, 0);
    const float *y = kd_model_output(m);
    track t = {0, 0, 0};
    for (int64_t s = 0; s < test.n; s++) {
        int8_t q[784], o[10];
        quantize(test.x + s * 784, 784, scale, zp, q);
        assert_int_equal(kdm_invoke(&km, arena, kdm_arena_size(&km), q, o), KDM_OK);
        const float *f = y + s * 10;
        int fa = 0;
        double err = 0, mx = 0;
        for (int j = 0; j < 10; j++) {
            fa = f[j] > f[fa] ? j : fa;
            err += fabs(oscale * (o[j] - ozp) - f[j]);
            mx = fmax(mx, fabs(f[j]));
        }
        t.agree += (int)kdm_argmax_s8(o, 10) == fa;
        t.mean_err += err / 10;
        t.mean_max += mx;
    }
    t.agree /= (double)test.n;
    t.mean_err /= (double)test.n;
    t.mean_max /= (double)test.n;
    free(arena);
    kd_dataset_free(&test);
    kd_model_free(m);
    return t;
}

static uint8_t *read_all(const char *path, size_t *len)
{
    uint8_t *buf = NULL;
    if (kd_read_file(path, &buf, len))
        fail_msg("cannot read %s", path);
    return buf;
}

/* model.c compiled with a tiny main that writes the array back out equals model.kdm. */
static void check_c_source(const char *odir, const char *kdm_path)
{
    if (system("command -v cc >/dev/null 2>&1") != 0) {
        fprintf(stderr, "no host compiler: model.c not compiled\n");
        return;
    }
    char main_c[400], exe[400], dump[400], cmd[4096];
    snprintf(main_c, sizeof main_c, "%s/dump_main.c", odir);
    snprintf(exe, sizeof exe, "%s/dump", odir);
    snprintf(dump, sizeof dump, "%s/dump.bin", odir);
    assert_int_equal(kd_write_text(main_c,
                                   "#include <stdio.h>\n#include \"model.h\"\n"
                                   "_Static_assert(sizeof kdm_model_blob == KDM_MODEL_BLOB_LEN, "
                                   "\"len\");\n"
                                   "int main(int c, char **v) {\n"
                                   "  if ((unsigned long)kdm_model_blob % 4) return 3;\n"
                                   "  if (kdm_model_blob_len != KDM_MODEL_BLOB_LEN) return 4;\n"
                                   "  FILE *f = fopen(v[1], \"wb\");\n"
                                   "  if (!f || fwrite(kdm_model_blob, 1, kdm_model_blob_len, f) "
                                   "!= kdm_model_blob_len) return 2;\n"
                                   "  return fclose(f) != 0; (void)c; }\n"),
                     0);
    snprintf(cmd, sizeof cmd,
             "cc -std=c99 -Wall -Wextra -Werror -pedantic -Wno-gnu-attributes -Wno-attributes "
             "-I%s -o %s %s %s/model.c && %s %s",
             odir, exe, main_c, odir, exe, dump);
    if (system(cmd) != 0)
        fail_msg("compiling or running model.c failed: %s", cmd);
    if (!kd_files_equal(dump, kdm_path))
        fail_msg("model.c does not hold the bytes of %s", kdm_path);
}

/* The report.json an export wrote into odir, parsed (the caller frees it). */
static cJSON *read_report(const char *odir)
{
    char path[400];
    snprintf(path, sizeof path, "%s/report.json", odir);
    cJSON *rep = kd_read_json(path);
    assert_non_null(rep);
    return rep;
}

static void test_int8(void **state)
{
    (void)state;
    char job[300], ck[300], odir[300], path[400];
    const char *argv[] = {"export",
                          tp(job, sizeof job, "a.yaml"),
                          "--checkpoint",
                          tp(ck, sizeof ck, "a/last.safetensors"),
                          "--quant",
                          "int8",
                          "--format",
                          "both",
                          "--out",
                          tp(odir, sizeof odir, "e8/sub"),
                          "--calib",
                          "200",
                          "--samples",
                          "16",
                          NULL};
    if (run(argv) != 0)
        fail_msg("export failed:\n%s", out);
    assert_non_null(strstr(out, "CONV2D"));
    assert_non_null(strstr(out, "DEPTHWISE_CONV2D"));
    assert_non_null(strstr(out, "ADD"));
    snprintf(path, sizeof path, "%s/model.kdm", odir);
    size_t len;
    uint8_t *blob = read_all(path, &len);
    track t = compare("a", blob, len);
    fprintf(stderr, "int8: agreement %.3f, mean |err| %.4f, mean max |logit| %.3f\n", t.agree,
            t.mean_err, t.mean_max);
    assert_true(t.agree >= 0.95);
    assert_true(t.mean_err <= 0.05 * t.mean_max);
    check_c_source(odir, path);

    /* the report agrees with the files */
    cJSON *rep = read_report(odir);
    cJSON *tot = cJSON_GetObjectItem(rep, "totals");
    assert_int_equal((size_t)cJSON_GetNumberValue(cJSON_GetObjectItem(tot, "blob_bytes")), len);
    kdm_model km;
    assert_int_equal(kdm_load(&km, blob, len), KDM_OK);
    assert_int_equal((uint32_t)cJSON_GetNumberValue(cJSON_GetObjectItem(tot, "arena_bytes")),
                     kdm_arena_size(&km));
    cJSON *acc = cJSON_GetObjectItem(rep, "accuracy");
    assert_non_null(acc);
    double fa = cJSON_GetNumberValue(cJSON_GetObjectItem(acc, "float"));
    double ea = cJSON_GetNumberValue(cJSON_GetObjectItem(acc, "engine"));
    double ia = cJSON_GetNumberValue(cJSON_GetObjectItem(acc, "int"));
    assert_true(fabs(fa - ea) <= 1.0 / 300 + 1e-9); /* folding moves at most a tie */
    assert_true(fabs(ia - fa) <= 0.05);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(rep, "ops")), (int)rd32(blob + 24));
    /* every constant byte is some op's: the ops' const_bytes add up to the blob's data_len, and
     * each op's packed weights are part of its constants */
    double const_sum = 0;
    const cJSON *op_j;
    cJSON_ArrayForEach(op_j, cJSON_GetObjectItem(rep, "ops"))
    {
        const double wb = cJSON_GetNumberValue(cJSON_GetObjectItem(op_j, "weight_bytes")),
                     cb = cJSON_GetNumberValue(cJSON_GetObjectItem(op_j, "const_bytes"));
        assert_true(wb >= 0 && wb <= cb);
        const_sum += cb;
    }
    assert_int_equal((uint32_t)const_sum, rd32(blob + 60));
    cJSON_Delete(rep);

    /* samples.bin replays bit for bit */
    snprintf(path, sizeof path, "%s/samples.bin", odir);
    size_t slen;
    uint8_t *s = read_all(path, &slen);
    assert_memory_equal(s, "KDMS", 4);
    assert_int_equal(rd32(s + 4), 16);
    assert_int_equal(rd32(s + 8), 784);
    assert_int_equal(rd32(s + 12), 10);
    assert_int_equal(slen, 16 + 16 * (784 + 4 + 10));
    kd_dataset test;
    assert_int_equal(kd_dataset_load("fashion-mnist", data, 0, &test), KD_OK);
    uint8_t *arena = aligned_alloc(16, (kdm_arena_size(&km) + 15) & ~15u);
    uint32_t sb;
    int32_t zp;
    kdm_input_quant(&km, &sb, &zp);
    float scale;
    memcpy(&scale, &sb, 4);
    for (int i = 0; i < 16; i++) {
        const uint8_t *r = s + 16 + (size_t)i * (784 + 4 + 10);
        int8_t q[784], o[10];
        quantize(test.x + (size_t)i * 784, 784, scale, zp, q);
        assert_memory_equal(r, q, 784);
        assert_int_equal((int32_t)rd32(r + 784), test.y[i]);
        assert_int_equal(kdm_invoke(&km, arena, kdm_arena_size(&km), (const int8_t *)r, o), KDM_OK);
        assert_memory_equal(r + 788, o, 10);
    }
    free(arena);
    kd_dataset_free(&test);
    free(s);
    free(blob);
}

static void test_int4_and_rounding(void **state)
{
    (void)state;
    char job[300], ck[300], o8[300], o4[300], path[400];
    tp(job, sizeof job, "a.yaml");
    tp(ck, sizeof ck, "a/last.safetensors");
    const char *a8[] = {"export",     job,        "--checkpoint", ck,      "--quant",
                        "int8",       "--format", "kdm",          "--out", tp(o8, sizeof o8, "e8s"),
                        "--rounding", "single",   "--no-eval",    NULL};
    if (run(a8) != 0)
        fail_msg("int8 export failed:\n%s", out);
    const char *a4[] = {"export", job,        "--checkpoint", ck,      "--quant",
                        "int4",   "--format", "kdm",          "--out", tp(o4, sizeof o4, "e4"),
                        NULL};
    if (run(a4) != 0)
        fail_msg("int4 export failed:\n%s", out);
    size_t l8, l4;
    snprintf(path, sizeof path, "%s/model.kdm", o8);
    uint8_t *b8 = read_all(path, &l8);
    snprintf(path, sizeof path, "%s/model.kdm", o4);
    uint8_t *b4 = read_all(path, &l4);
    assert_int_equal(rd32(b8 + 16), KDM_FLAG_SINGLE_ROUNDING);
    assert_int_equal(rd32(b4 + 16), 0);
    assert_true(l4 < l8);
    /* every weighted op of the int4 blob says 4 bits */
    uint32_t nops = rd32(b4 + 24), ops_off = rd32(b4 + 52);
    int weighted = 0;
    for (uint32_t i = 0; i < nops; i++) {
        const uint8_t *rec = b4 + ops_off + i * KDM_OP_WORDS * 4;
        uint32_t type = rd32(rec);
        if (type == KDM_OP_CONV2D || type == KDM_OP_DEPTHWISE_CONV2D ||
            type == KDM_OP_FULLY_CONNECTED) {
            assert_int_equal(rd32(rec + 8 * 4), 4);
            weighted++;
        }
    }
    assert_int_equal(weighted, 6);
    track t8 = compare("a", b8, l8), t4 = compare("a", b4, l4);
    fprintf(stderr, "int8 single rounding: agreement %.3f; int4: agreement %.3f, mean |err| %.4f\n",
            t8.agree, t4.agree, t4.mean_err);
    assert_true(t8.agree >= 0.95);
    assert_true(t4.agree >= 0.6);
    assert_true(t4.mean_err <= 0.3 * t4.mean_max);
    free(b8);
    free(b4);
}

static void test_flatten_model(void **state)
{
    (void)state;
    char job[300], ck[300], odir[300], path[400];
    const char *argv[] = {"export",
                          tp(job, sizeof job, "b.yaml"),
                          "--checkpoint",
                          tp(ck, sizeof ck, "b/last.safetensors"),
                          "--quant",
                          "int8",
                          "--format",
                          "kdm",
                          "--out",
                          tp(odir, sizeof odir, "eb"),
                          "--json",
                          tp(path, sizeof path, "reports/b.json"),
                          NULL};
    if (run(argv) != 0)
        fail_msg("export failed:\n%s", out);
    assert_true(kd_file_exists(path));
    snprintf(path, sizeof path, "%s/report.json", odir);
    assert_false(kd_file_exists(path));
    snprintf(path, sizeof path, "%s/model.kdm", odir);
    size_t len;
    uint8_t *blob = read_all(path, &len);
    track t = compare("b", blob, len);
    fprintf(stderr, "flatten model int8: agreement %.3f\n", t.agree);
    assert_true(t.agree >= 0.95);
    free(blob);
}

/* --int8-layers keeps the named layer at 8 bits; --softmax ends the model with SOFTMAX. */
static void test_options(void **state)
{
    (void)state;
    char job[300], ck[300], odir[300], path[400];
    tp(job, sizeof job, "a.yaml");
    tp(ck, sizeof ck, "a/last.safetensors");
    const char *argv[] = {"export",
                          job,
                          "--checkpoint",
                          ck,
                          "--quant",
                          "int4",
                          "--int8-layers",
                          "0,9.body.3",
                          "--softmax",
                          "--format",
                          "kdm",
                          "--out",
                          tp(odir, sizeof odir, "eo"),
                          NULL};
    if (run(argv) != 0)
        fail_msg("export failed:\n%s", out);
    snprintf(path, sizeof path, "%s/model.kdm", odir);
    size_t len;
    uint8_t *blob = read_all(path, &len);
    uint32_t nops = rd32(blob + 24), ops_off = rd32(blob + 52);
    int bits8 = 0;
    for (uint32_t i = 0; i < nops; i++) {
        const uint8_t *rec = blob + ops_off + i * KDM_OP_WORDS * 4;
        bits8 += rd32(rec + 8 * 4) == 8;
    }
    assert_int_equal(bits8, 2);
    assert_int_equal(rd32(blob + ops_off + (nops - 1) * KDM_OP_WORDS * 4), KDM_OP_SOFTMAX);
    track t = compare("a", blob, len);
    assert_true(t.agree >= 0.6);
    free(blob);
    /* a name that is no conv2d or linear layer */
    const char *bad[] = {
        "export", job,        "--checkpoint", ck,      "--quant", "int4", "--int8-layers",
        "2",      "--format", "kdm",          "--out", odir,      NULL};
    int code = run(bad);
    if (code != 1 || !strstr(out, "'2'") || !strstr(out, "0, 3, 6, 9.body.0"))
        fail_msg("want exit 1 naming the layers, got %d:\n%s", code, out);
    /* an empty name in the list (a doubled or trailing comma) is refused, not skipped */
    for (int i = 0; i < 2; i++) {
        bad[7] = i ? "0," : "0,,6";
        code = run(bad);
        if (code != 1 || !strstr(out, "holds an empty layer name"))
            fail_msg("want exit 1 on --int8-layers %s, got %d:\n%s", bad[7], code, out);
    }
    /* calibration draws from the samples the job trains on: data.train_limit's */
    const char *limited[] = {"export",       job,
                             "--checkpoint", ck,
                             "--set",        "data.train_limit=37",
                             "--calib",      "1000",
                             "--quant",      "int8",
                             "--format",     "kdm",
                             "--out",        tp(odir, sizeof odir, "el"),
                             "--no-eval",    NULL};
    if (run(limited) != 0)
        fail_msg("export failed:\n%s", out);
    cJSON *rep = read_report(odir);
    assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(rep, "calibration_samples")),
                     37);
    cJSON_Delete(rep);
}

/* A job trained with quant: {bits: 4, qat: true} exports with exactly the max-abs integers the
 * training fake-quantized against (up to the sign a negative batchnorm scale gives a row), and
 * without bias correction. The model is a's, trained one epoch with QAT; a's own checkpoint
 * (trained without) is refused by that job, and the QAT one by a's. */
static void test_qat_job(void **state)
{
    (void)state;
    char path[400], odir[300], ck[300], qjob[300];
    /* model a trained one epoch with QAT into aq/ */
    char model[2048];
    snprintf(model, sizeof model, MODEL_A, 2);
    write_job_extra("aq", model, "quant: {bits: 4, qat: true}\n");
    const char *train[] = {"train", tp(qjob, sizeof qjob, "aq.yaml"), "--set", "optim.epochs=1",
                           NULL};
    if (run(train) != 0)
        fail_msg("QAT training failed:\n%s", out);
    char other[300], ajob[300];
    const char *mixed[] = {"export",       qjob,
                           "--checkpoint", tp(other, sizeof other, "a/last.safetensors"),
                           "--quant",      "int4",
                           "--format",     "kdm",
                           "--out",        tp(odir, sizeof odir, "eqx"),
                           "--no-eval",    NULL};
    if (run(mixed) != 1 || !strstr(out, "was trained with no quantization-aware training") ||
        !strstr(out, "the job has quant: {bits: 4, qat: true}"))
        fail_msg("a checkpoint trained without QAT was not refused by the QAT job:\n%s", out);
    const char *mixed2[] = {"eval", tp(ajob, sizeof ajob, "a.yaml"), "--checkpoint",
                            tp(other, sizeof other, "aq/last.safetensors"), NULL};
    if (run(mixed2) != 1 || !strstr(out, "was trained with quant: {bits: 4, qat: true}"))
        fail_msg("the QAT checkpoint was not refused by the job without QAT:\n%s", out);
    const char *argv[] = {"export",       qjob,
                          "--checkpoint", tp(ck, sizeof ck, "aq/last.safetensors"),
                          "--quant",      "int4",
                          "--format",     "kdm",
                          "--out",        tp(odir, sizeof odir, "eq"),
                          "--no-eval",    NULL};
    if (run(argv) != 0)
        fail_msg("export failed:\n%s", out);
    cJSON *rep = read_report(odir);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(rep, "qat")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(rep, "bias_correction")));
    cJSON *op0 = cJSON_GetArrayItem(cJSON_GetObjectItem(rep, "ops"), 0);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(op0, "weight_scales")), "maxabs");
    cJSON_Delete(rep);

    /* the first conv's rows (1 input channel: OHWI is OIHW) against the engine's quantizer on
     * the unfolded weights */
    kd_model *m = load_model("aq", NULL);
    const kd_block *conv = &m->blocks[0], *bn = &m->blocks[1];
    int out_c = conv->features, k = 9;
    float *w = malloc(sizeof(float) * (size_t)out_c * k), g[64], v[64];
    assert_int_equal(m->be->download(w, m->params + conv->w_off, sizeof(float) * out_c * k), KD_OK);
    assert_int_equal(m->be->download(g, m->params + bn->w_off, sizeof(float) * out_c), KD_OK);
    assert_int_equal(m->be->download(v, m->buffers + bn->rv_off, sizeof(float) * out_c), KD_OK);
    float *scale = malloc(sizeof(float) * (size_t)out_c);
    kd_quant_row_scales(w, out_c, k, 4, scale);
    snprintf(path, sizeof path, "%s/model.kdm", odir);
    size_t len;
    uint8_t *blob = read_all(path, &len);
    const uint8_t *rec = blob + rd32(blob + 52);
    assert_int_equal(rd32(rec), KDM_OP_CONV2D);
    uint32_t woff = rd32(rec + 11 * 4), stride = rd32(rec + 12 * 4);
    for (int o = 0; o < out_c; o++) {
        int sign = g[o] / sqrtf(v[o] + 1e-5f) < 0 ? -1 : 1;
        for (int j = 0; j < k; j++) {
            uint8_t byte = blob[woff + o * stride + j / 2];
            int q = (int)((byte >> (4 * (j & 1))) & 15u);
            q = q >= 8 ? q - 16 : q;
            assert_int_equal(q, sign * kd_quant_round(w[o * k + j], scale[o], 7));
        }
    }
    free(blob);

    /* Exported at int8, the float model is still the one the job trained and evaluates: the
     * int4 grid's weights (not the latent floats), quantized again. Each row's largest weight is
     * on +-7 of that grid, so its int8 codes are round(127 k / 7) for the int4 codes k. */
    argv[5] = "int8";
    tp(odir, sizeof odir, "eq8");
    argv[9] = odir;
    if (run(argv) != 0)
        fail_msg("int8 export failed:\n%s", out);
    rep = read_report(odir);
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(rep, "qat")));
    assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetObjectItem(rep, "qat_bits")), 4);
    cJSON_Delete(rep);
    if (!strstr(out, "the job's int4 QAT weights"))
        fail_msg("the report does not say which float model it quantized:\n%s", out);
    snprintf(path, sizeof path, "%s/model.kdm", odir);
    blob = read_all(path, &len);
    rec = blob + rd32(blob + 52);
    assert_int_equal(rd32(rec), KDM_OP_CONV2D);
    woff = rd32(rec + 11 * 4);
    stride = rd32(rec + 12 * 4);
    for (int o = 0; o < out_c; o++) {
        int sign = g[o] / sqrtf(v[o] + 1e-5f) < 0 ? -1 : 1;
        for (int j = 0; j < k; j++) {
            int q = (int8_t)blob[woff + o * stride + j];
            int k4 = kd_quant_round(w[o * k + j], scale[o], 7);
            assert_int_equal(q, sign * (int)lrint(127.0 * k4 / 7.0));
        }
    }
    free(blob);
    free(w);
    free(scale);
    kd_model_free(m);
}

/* A channel whose batchnorm scale is near 0 folds into weights far smaller than its bias: its
 * weight scale is raised so the bias fits (as TFLite does) instead of the export failing, and
 * the integer model still agrees with the float one. */
static void test_tiny_weight_channel(void **state)
{
    (void)state;
    char src[300], ck[300], odir[300], job[300];
    uint8_t *b = NULL;
    size_t n = 0;
    assert_int_equal(kd_read_file(tp(src, sizeof src, "a/last.safetensors"), &b, &n), 0);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i];
    char *head = malloc(hlen + 1);
    memcpy(head, b + 8, hlen);
    head[hlen] = 0;
    cJSON *h = cJSON_Parse(head);
    free(head);
    /* the batchnorm after the pointwise conv (layer 7, 16 channels): channel 3's scale */
    cJSON *e = cJSON_GetObjectItem(h, "7.weight");
    assert_non_null(e);
    size_t at =
        8 + hlen +
        (size_t)cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(e, "data_offsets"), 0));
    cJSON_Delete(h);
    const float tiny = 1e-9f;
    memcpy(b + at + 3 * sizeof(float), &tiny, sizeof tiny);
    assert_int_equal(kd_write_bytes(tp(ck, sizeof ck, "a_tiny.safetensors"), b, n), 0);
    free(b);
    const char *argv[] = {"export",
                          tp(job, sizeof job, "a.yaml"),
                          "--checkpoint",
                          ck,
                          "--quant",
                          "int8",
                          "--format",
                          "kdm",
                          "--out",
                          tp(odir, sizeof odir, "etiny"),
                          NULL};
    if (run(argv) != 0)
        fail_msg("export failed:\n%s", out);
    cJSON *rep = read_report(odir);
    cJSON *acc = cJSON_GetObjectItem(rep, "accuracy");
    const double agree = cJSON_GetNumberValue(cJSON_GetObjectItem(acc, "int_float_agreement"));
    fprintf(stderr, "tiny-weight channel: int vs float agreement %.3f\n", agree);
    assert_true(agree >= 0.9);
    cJSON_Delete(rep);
}

static void expect_fail(const char *const *argv, int want, const char *const *parts)
{
    int code = run(argv);
    if (code != want)
        fail_msg("want exit %d, got %d:\n%s", want, code, out);
    for (int i = 0; parts[i]; i++)
        if (!strstr(out, parts[i]))
            fail_msg("output lacks '%s':\n%s", parts[i], out);
}

static void test_bad_inputs(void **state)
{
    (void)state;
    char job[300], ck[300], odir[300], path[400], cjob[300], cck[300];
    tp(job, sizeof job, "a.yaml");
    tp(ck, sizeof ck, "a/last.safetensors");
    tp(odir, sizeof odir, "bad/out");

    /* an op the runtime lacks: a checkpoint of model C written by the library */
    {
        kd_job j;
        assert_int_equal(kd_job_load(tp(cjob, sizeof cjob, "c.yaml"), NULL, &j), KD_OK);
        kd_model *m = NULL;
        assert_int_equal(kd_model_build(j.model_input, j.model_layers, kd_backend_cpu(), 1, 1, &m),
                         KD_OK);
        kd_ckpt_info info = {0};
        info.optimizer = "adamw";
        assert_int_equal(
            kd_checkpoint_save(tp(cck, sizeof cck, "c.safetensors"), m, NULL, 0, &info), KD_OK);
        kd_model_free(m);
        kd_job_free(&j);
    }
    const char *unsup[] = {"export",   cjob,  "--checkpoint", cck,  "--quant",   "int8",
                           "--format", "kdm", "--out",        odir, "--no-eval", NULL};
    const char *const p_unsup[] = {"c.yaml:", "layer 1 (conv2d)", "groups 2", NULL};
    expect_fail(unsup, 1, p_unsup);
    assert_false(kd_file_exists(odir));

    /* a checkpoint of another model */
    char bck[300];
    const char *wrong[] = {"export",
                           job,
                           "--checkpoint",
                           tp(bck, sizeof bck, "b/last.safetensors"),
                           "--quant",
                           "int8",
                           "--format",
                           "kdm",
                           "--out",
                           odir,
                           NULL};
    const char *const p_wrong[] = {bck, "does not match", NULL};
    expect_fail(wrong, 1, p_wrong);
    /* the same parameter shapes, another architecture */
    char a2[300];
    const char *arch[] = {"export",
                          tp(a2, sizeof a2, "a2.yaml"),
                          "--checkpoint",
                          ck,
                          "--quant",
                          "int8",
                          "--format",
                          "kdm",
                          "--out",
                          odir,
                          NULL};
    const char *const p_arch[] = {ck, "another architecture", NULL};
    expect_fail(arch, 1, p_arch);
    /* missing and damaged checkpoints */
    char miss[300];
    const char *missing[] = {"export",
                             job,
                             "--checkpoint",
                             tp(miss, sizeof miss, "nope.safetensors"),
                             "--quant",
                             "int8",
                             "--format",
                             "kdm",
                             "--out",
                             odir,
                             NULL};
    const char *const p_missing[] = {miss, NULL};
    expect_fail(missing, 1, p_missing);
    size_t len;
    uint8_t *ckb = read_all(ck, &len);
    char dmg[300];
    assert_int_equal(kd_write_bytes(tp(dmg, sizeof dmg, "damaged.safetensors"), ckb, len / 2), 0);
    free(ckb);
    const char *damaged[] = {"export",   job,   "--checkpoint", dmg,  "--quant", "int8",
                             "--format", "kdm", "--out",        odir, NULL};
    const char *const p_damaged[] = {dmg, NULL};
    expect_fail(damaged, 1, p_damaged);
    assert_false(kd_file_exists(odir));
    /* finite weights whose float model overflows (batchnorm scale and shift 3e38): refused at
     * calibration, nothing written */
    char ovf[300];
    {
        kd_job j;
        assert_int_equal(kd_job_load(job, NULL, &j), KD_OK);
        kd_model *m = NULL;
        assert_int_equal(kd_model_build(j.model_input, j.model_layers, kd_backend_cpu(), 1, 1, &m),
                         KD_OK);
        assert_int_equal(kd_checkpoint_load(ck, m, NULL, 0, NULL), KD_OK);
        int hits = 0;
        for (int i = 0; i < m->nentries; i++)
            if (!strcmp(m->entries[i].name, "1.weight") || !strcmp(m->entries[i].name, "1.bias"))
                for (size_t k = 0; k < m->entries[i].numel; k++, hits++)
                    m->params[m->entries[i].offset + k] = 3e38f;
        assert_int_equal(hits, 16);
        kd_ckpt_info info = {0};
        info.optimizer = "adamw";
        assert_int_equal(
            kd_checkpoint_save(tp(ovf, sizeof ovf, "overflow.safetensors"), m, NULL, 0, &info),
            KD_OK);
        kd_model_free(m);
        kd_job_free(&j);
    }
    const char *overflow[] = {"export",   job,   "--checkpoint", ovf,  "--quant", "int8",
                              "--format", "kdm", "--out",        odir, NULL};
    const char *const p_overflow[] = {"takes non-finite values on the calibration samples",
                                      "overflows float32", NULL};
    expect_fail(overflow, 1, p_overflow);
    assert_false(kd_file_exists(odir));

    /* an output directory under a regular file */
    char afile[300], under[400];
    assert_int_equal(kd_write_text(tp(afile, sizeof afile, "afile"), "x"), 0);
    snprintf(under, sizeof under, "%s/out", afile);
    const char *nodir[] = {"export",   job,   "--checkpoint", ck,    "--quant", "int8",
                           "--format", "kdm", "--out",        under, NULL};
    const char *const p_nodir[] = {under, "not a directory", NULL};
    expect_fail(nodir, 1, p_nodir);

    /* a directory we may not write into (root may write anywhere: checked only for others) */
    if (geteuid() != 0) {
        char ro[300], inside[400];
        assert_int_equal(mkdir(tp(ro, sizeof ro, "ro"), 0555), 0);
        snprintf(inside, sizeof inside, "%s/out", ro);
        const char *rodir[] = {"export",   job,   "--checkpoint", ck,     "--quant", "int8",
                               "--format", "kdm", "--out",        inside, NULL};
        const char *const p_ro[] = {inside, "not writable", NULL};
        expect_fail(rodir, 1, p_ro);
    }

    /* a failed export leaves an older export untouched */
    char keep[300];
    tp(keep, sizeof keep, "keep");
    assert_int_equal(mkdir(keep, 0755), 0);
    snprintf(path, sizeof path, "%s/model.kdm", keep);
    assert_int_equal(kd_write_text(path, "old blob"), 0);
    const char *again[] = {"export",   job,   "--checkpoint", dmg,  "--quant", "int8",
                           "--format", "kdm", "--out",        keep, NULL};
    expect_fail(again, 1, p_damaged);
    char *text = kd_read_text(path);
    assert_non_null(text);
    assert_string_equal(text, "old blob");
    free(text);

    /* bad flags: usage errors, exit 2 */
    const char *q3[] = {"export",   job,   "--checkpoint", ck,   "--quant", "int3",
                        "--format", "kdm", "--out",        odir, NULL};
    const char *const p_q3[] = {"int3", "usage: distill export", NULL};
    expect_fail(q3, 2, p_q3);
    const char *noout[] = {"export", job,        "--checkpoint", ck,  "--quant",
                           "int8",   "--format", "kdm",          NULL};
    const char *const p_noout[] = {"--out", NULL};
    expect_fail(noout, 2, p_noout);
    const char *calib0[] = {"export", job,  "--checkpoint", ck,  "--quant", "int8", "--format", "c",
                            "--out",  odir, "--calib",      "0", NULL};
    const char *const p_calib0[] = {"--calib must be a count in [1, 100000000], got '0'", NULL};
    expect_fail(calib0, 2, p_calib0);
    const char *fmt[] = {"export",   job,   "--checkpoint", ck,   "--quant", "int8",
                         "--format", "elf", "--out",        odir, NULL};
    const char *const p_fmt[] = {"elf", NULL};
    expect_fail(fmt, 2, p_fmt);
    assert_false(kd_file_exists(odir));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_int8),          cmocka_unit_test(test_int4_and_rounding),
        cmocka_unit_test(test_flatten_model), cmocka_unit_test(test_options),
        cmocka_unit_test(test_qat_job),       cmocka_unit_test(test_tiny_weight_channel),
        cmocka_unit_test(test_bad_inputs),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
