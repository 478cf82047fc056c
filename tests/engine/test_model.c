/*
 * test_model.c - building models from YAML, the state table's PyTorch names,
 * shape errors, whole-model gradients (float, finite differences accumulated
 * in double) and checkpoint round trips.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bf16.h"
#include "checkpoint.h"
#include "config_yaml.h"
#include "fileio.h"
#include "kd_test.h"
#include "model.h"
#include "rng.h"
#include "safetensors.h"

static const char *const every_layer =
    "input: [2, 8, 8]\n"
    "layers:\n"
    "  - conv2d: {out: 6, kernel: 3, pad: 1}\n" /* 0 */
    "  - batchnorm: {}\n"                       /* 1 */
    "  - relu6: {tap: stem}\n"                  /* 2 */
    "  - residual:\n"                           /* 3 */
    "      body:\n"
    "        - conv2d: {out: 6, kernel: 3, pad: 1, groups: 6, bias: false}\n"
    "        - batchnorm: {}\n"
    "        - relu: {}\n"
    "        - conv2d: {out: 6, kernel: 1}\n"
    "  - maxpool2d: {kernel: 2}\n" /* 4 -> [6,4,4] */
    "  - residual:\n"              /* 5 */
    "      body:\n"
    "        - conv2d: {out: 8, kernel: 3, stride: 2, pad: 1, groups: 2}\n"
    "      proj:\n"
    "        - conv2d: {out: 8, kernel: 1, stride: 2, bias: false}\n"
    "        - batchnorm: {}\n"
    "  - avgpool2d: {kernel: 2, stride: 1}\n" /* 6 -> [8,1,1] */
    "  - flatten: {}\n"                       /* 7 -> [8] */
    "  - dropout: {p: 0.25}\n"                /* 8 */
    "  - linear: {out: 5}\n"                  /* 9 */
    "  - batchnorm: {}\n"                     /* 10 */
    "  - relu: {}\n"                          /* 11 */
    "  - linear: {out: 3, tap: logits}\n";    /* 12 */

static kd_model *build(const char *yaml, int batch, kd_status *st_out)
{
    kd_node *doc = NULL;
    kd_status st = kd_yaml_load_string(yaml, "model.yaml", &doc);
    kd_model *m = NULL;
    if (st == KD_OK)
        st = kd_model_build(kd_node_child(doc, "input"), kd_node_child(doc, "layers"),
                            kd_backend_cpu(), batch, 42, &m);
    kd_node_free(doc);
    if (st_out)
        *st_out = st;
    return m;
}

static void test_build_names_and_shapes(void **state)
{
    (void)state;
    kd_status st;
    kd_model *m = build(every_layer, 4, &st);
    assert_int_equal(st, KD_OK);
    assert_non_null(m);
    assert_int_equal(m->out_features, 3);
    const char *want[] = {"0.weight",
                          "0.bias",
                          "1.weight",
                          "1.bias",
                          "1.running_mean",
                          "1.running_var",
                          "1.num_batches_tracked",
                          "3.body.0.weight",
                          "3.body.1.weight",
                          "3.body.1.bias",
                          "3.body.1.running_mean",
                          "3.body.1.running_var",
                          "3.body.1.num_batches_tracked",
                          "3.body.3.weight",
                          "3.body.3.bias",
                          "5.body.0.weight",
                          "5.body.0.bias",
                          "5.proj.0.weight",
                          "5.proj.1.weight",
                          "5.proj.1.bias",
                          "5.proj.1.running_mean",
                          "5.proj.1.running_var",
                          "5.proj.1.num_batches_tracked",
                          "9.weight",
                          "9.bias",
                          "10.weight",
                          "10.bias",
                          "10.running_mean",
                          "10.running_var",
                          "10.num_batches_tracked",
                          "12.weight",
                          "12.bias"};
    assert_int_equal(m->nentries, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < m->nentries; i++)
        assert_string_equal(m->entries[i].name, want[i]);
    /* OIHW conv weights, [out, in] linear weights */
    assert_int_equal(m->entries[0].ndim, 4);
    assert_int_equal(m->entries[0].shape[0], 6);
    assert_int_equal(m->entries[0].shape[1], 2);
    assert_int_equal(m->entries[7].shape[1], 1);  /* depthwise: C/groups = 1 */
    assert_int_equal(m->entries[15].shape[1], 3); /* groups 2: 6/2 inputs per group */
    assert_int_equal(m->entries[23].shape[0], 5);
    assert_int_equal(m->entries[23].shape[1], 8);
    /* parameter count: sum of PARAM entries equals nparams */
    size_t total = 0;
    for (int i = 0; i < m->nentries; i++)
        if (m->entries[i].kind == KD_ENTRY_PARAM)
            total += m->entries[i].numel;
    assert_int_equal(total, m->nparams);
    const kd_block *tap = kd_model_tap(m, "stem");
    assert_non_null(tap);
    assert_int_equal(tap->out[0], 6);
    assert_null(kd_model_tap(m, "nope"));
    kd_model_free(m);
}

static double proj_loss(kd_model *m, const float *x, int n, const float *r)
{
    kd_model_forward(m, x, n, 1, 7);
    const float *y = kd_model_output(m);
    double s = 0;
    for (int i = 0; i < n * m->out_features; i++)
        s += (double)y[i] * r[i];
    return s;
}

static void test_model_gradients(void **state)
{
    (void)state;
    const int n = 4;
    kd_model *m = build(every_layer, n, NULL);
    assert_non_null(m);
    kd_rng rg;
    kd_rng_seed(&rg, 3, 3);
    float *x = malloc(sizeof(float) * n * m->in_numel);
    float r[4 * 3];
    for (size_t i = 0; i < n * m->in_numel; i++)
        x[i] = kd_rng_normal(&rg);
    for (int i = 0; i < n * 3; i++)
        r[i] = kd_rng_normal(&rg);
    kd_model_zero_grad(m);
    proj_loss(m, x, n, r);
    memcpy(kd_model_output_grad(m), r, sizeof r);
    kd_model_backward(m, x, n);
    float *g = malloc(sizeof(float) * m->nparams);
    memcpy(g, m->grads, sizeof(float) * m->nparams);
    /* every parameter, central differences in float with the loss summed in double */
    int bad = 0;
    const float h = 3e-4f; /* small enough that few ReLU kinks fall inside [-h, h] */
    for (size_t i = 0; i < m->nparams; i++) {
        float keep = m->params[i];
        m->params[i] = keep + h;
        double lp = proj_loss(m, x, n, r);
        m->params[i] = keep - h;
        double lm = proj_loss(m, x, n, r);
        m->params[i] = keep;
        double num = (lp - lm) / (2.0 * h);
        double err = fabs(num - g[i]) / fmax(0.05, fabs(num) + fabs(g[i]));
        if (err > 0.03) {
            bad++;
            print_message("param %zu: analytic %g numeric %g\n", i, g[i], num);
        }
    }
    /* a ReLU kink can sit within h of a pre-activation: allow a handful of such elements */
    assert_true(bad <= (int)(m->nparams / 100) + 1);
    /* parameter gradients accumulate: a second backward doubles them */
    proj_loss(m, x, n, r);
    memcpy(kd_model_output_grad(m), r, sizeof r);
    kd_model_backward(m, x, n);
    for (size_t i = 0; i < m->nparams; i += 7)
        kd_assert_close(m->grads[i], 2 * g[i], 1e-5 + 1e-4 * fabs(g[i]));
    free(x);
    free(g);
    kd_model_free(m);
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* kd_round_bf16: hand-picked cases, then random bit patterns against the nearer of the two
 * bfloat16 neighbours measured in double (ties: the even one). */
static void test_round_bf16(void **state)
{
    (void)state;
    static const uint32_t cases[][2] = {
        {0x3F800000u, 0x3F800000u}, /* 1 */
        {0x3F808000u, 0x3F800000u}, /* 1 + 2^-8: a tie, down to the even 1 */
        {0x3F818000u, 0x3F820000u}, /* a tie, up to the even neighbour */
        {0x3F808001u, 0x3F810000u}, /* just past the tie */
        {0x3F807FFFu, 0x3F800000u}, /* just short of it */
        {0xBF808000u, 0xBF800000u}, /* negative tie */
        {0x7F7FFFFFu, 0x7F800000u}, /* FLT_MAX rounds past bf16's largest: inf */
        {0x7F7F7FFFu, 0x7F7F0000u}, /* bf16's largest stays */
        {0xFF800000u, 0xFF800000u}, /* -inf */
        {0x00008000u, 0x00000000u}, /* subnormal tie to even 0 */
        {0x00018000u, 0x00020000u}, /* subnormal tie up */
        {0x807F8000u, 0x80800000u}, /* the largest subnormals round into the normals */
        {0x00000000u, 0x00000000u}, {0x80000000u, 0x80000000u}, /* -0 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint32_t got = bits_of(kd_round_bf16(float_of(cases[i][0])));
        if (got != cases[i][1])
            fail_msg("round_bf16(0x%08x) = 0x%08x, expected 0x%08x", cases[i][0], got, cases[i][1]);
    }
    /* NaNs stay NaN, also with a payload only in the dropped bits */
    assert_true(isnan(kd_round_bf16(float_of(0x7F800001u))));
    assert_true(isnan(kd_round_bf16(float_of(0xFFC00000u))));
    kd_rng r;
    kd_rng_seed(&r, 17, 1);
    for (int i = 0; i < 200000; i++) {
        uint32_t u = kd_rng_u32(&r);
        if ((u & 0x7F800000u) == 0x7F800000u || (u & 0x7FFF0000u) == 0x7F7F0000u)
            continue; /* inf / NaN, and the top binade's upper neighbour is inf */
        const uint32_t lo = u & 0xFFFF0000u, hi = lo + 0x10000u;
        const double x = float_of(u), dl = fabs(x - float_of(lo)), dh = fabs(float_of(hi) - x);
        const uint32_t want = dl < dh ? lo : dh < dl ? hi : ((lo >> 16) & 1u) ? hi : lo;
        const uint32_t got = bits_of(kd_round_bf16(float_of(u)));
        if (got != want)
            fail_msg("round_bf16(0x%08x) = 0x%08x, expected 0x%08x", u, got, want);
    }
}

static int is_bf16(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (bits_of(x[i]) & 0xFFFFu)
            return 0;
    return 1;
}

/* run.precision: bf16 on a model of every layer kind: the activations, the output gradient
 * and the input gradients passed back are bfloat16 values, the conv / linear weights are
 * rounded while held and come back bit for bit, batch-norm parameters are not rounded, and
 * the result differs from float32 by bf16-sized amounts. */
static void test_model_bf16(void **state)
{
    (void)state;
    const int n = 4;
    kd_model *ref = build(every_layer, n, NULL), *m = build(every_layer, n, NULL);
    assert_non_null(ref);
    assert_non_null(m);
    assert_int_equal(kd_model_set_bf16(m, 1), KD_OK);
    kd_rng rg;
    kd_rng_seed(&rg, 5, 5);
    float *x = malloc(sizeof(float) * n * m->in_numel);
    float *before = malloc(sizeof(float) * m->nparams);
    for (size_t i = 0; i < n * m->in_numel; i++)
        x[i] = kd_rng_normal(&rg);
    memcpy(before, m->params, sizeof(float) * m->nparams);
    assert_false(is_bf16(m->params, m->nparams));

    kd_model_bf16_weights(m, 1);
    kd_model_bf16_weights(m, 1); /* a second hold changes nothing */
    const kd_block *conv = &m->blocks[0], *bn = &m->blocks[1], *fc = &m->blocks[12];
    assert_true(is_bf16(m->params + conv->w_off, conv->w_numel));
    assert_true(is_bf16(m->params + conv->b_off, conv->b_numel));
    assert_true(is_bf16(m->params + fc->w_off, fc->w_numel));
    assert_memory_equal(m->params + bn->w_off, before + bn->w_off, bn->w_numel * sizeof(float));
    kd_model_forward(m, x, n, 1, 9);
    kd_model_forward(ref, x, n, 1, 9);
    for (int i = 0; i < m->nblocks; i++)
        if (!m->blocks[i].fused && !is_bf16(m->blocks[i].y, (size_t)n * m->blocks[i].out_numel))
            fail_msg("block %d's output is not bf16", i);
    assert_true(is_bf16(m->x_bf16, (size_t)n * m->in_numel));
    const float *o = kd_model_output(m), *oref = kd_model_output(ref);
    double diff = 0, mag = 0;
    for (int i = 0; i < n * 3; i++) {
        diff = fmax(diff, fabs(o[i] - oref[i]));
        mag = fmax(mag, fabs(oref[i]));
    }
    assert_true(diff > 0);          /* the rounding happened */
    assert_true(diff < 0.05 * mag); /* and it is a rounding, not a different model */

    float *dy = kd_model_output_grad(m);
    for (int i = 0; i < n * 3; i++)
        dy[i] = 0.1f + 0.3f * (float)i; /* not bf16 values: the backward rounds them */
    kd_model_zero_grad(m);
    kd_model_backward(m, x, n);
    assert_true(is_bf16(dy, (size_t)n * 3));
    for (int i = 0; i + 1 < m->nblocks; i++) /* the gradients passed back to blocks 0..11 */
        if (!is_bf16(m->blocks[i].dy, (size_t)n * m->blocks[i].out_numel))
            fail_msg("the gradient into block %d's output is not bf16", i);
    int nonzero = 0;
    for (size_t i = 0; i < m->nparams; i++) {
        assert_true(isfinite(m->grads[i]));
        nonzero += m->grads[i] != 0;
    }
    assert_true(nonzero > (int)m->nparams / 2);

    kd_model_bf16_weights(m, 0);
    assert_memory_equal(m->params, before, sizeof(float) * m->nparams);
    kd_model_bf16_weights(m, 0); /* a second release changes nothing */
    assert_memory_equal(m->params, before, sizeof(float) * m->nparams);
    free(x);
    free(before);
    kd_model_free(m);
    kd_model_free(ref);
}

static void expect_build_error(const char *yaml, kd_status want, const char *const *parts)
{
    kd_status st;
    kd_model *m = build(yaml, 2, &st);
    assert_null(m);
    assert_int_equal(st, want);
    for (int i = 0; parts[i]; i++)
        if (!strstr(kd_last_error(), parts[i]))
            fail_msg("message '%s' lacks '%s'", kd_last_error(), parts[i]);
}

static void test_shape_errors(void **state)
{
    (void)state;
    expect_build_error(
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out: 4, kernel: 3}\n"
        "  - linear: {out: 10}\n",
        KD_ERR_SHAPE,
        (const char *[]){"model.yaml:4:", "layer 1 (linear)", "[4, 6, 6]", "flatten", NULL});
    expect_build_error("input: [1, 8, 8]\nlayers:\n  - flatten\n  - linear: {out: 10, in: 100}\n",
                       KD_ERR_SHAPE, (const char *[]){"layer 1 (linear)", "in: 100", "[64]", NULL});
    expect_build_error(
        "input: [3, 8, 8]\nlayers:\n  - residual:\n      body:\n"
        "        - conv2d: {out: 5, kernel: 1}\n  - global_avgpool\n",
        KD_ERR_SHAPE,
        (const char *[]){"layer 0 (residual)", "[5, 8, 8]", "[3, 8, 8]", "proj", NULL});
    expect_build_error("input: [3, 8, 8]\nlayers:\n  - conv2d: {out: 4, kernel: 3, groups: 2}\n",
                       KD_ERR_SHAPE, (const char *[]){"groups 2", "(3)", NULL});
    expect_build_error("input: [1, 4, 4]\nlayers:\n  - conv2d: {out: 4, kernel: 7}\n", KD_ERR_SHAPE,
                       (const char *[]){"kernel 7", "[1, 4, 4]", NULL});
    /* sizes whose int arithmetic would wrap (a 65536 x 65536 output plane once divided by 0) */
    expect_build_error("input: [1, 28, 28]\nlayers:\n  - conv2d: {out: 1, kernel: 1, pad: 32754}\n"
                       "  - global_avgpool\n  - linear: {out: 10}\n",
                       KD_ERR_SHAPE, (const char *[]){"pad 32754", "positions per channel", NULL});
    expect_build_error("input: [4, 65536, 65536]\nlayers:\n  - conv2d: {out: 1, kernel: 1}\n"
                       "  - global_avgpool\n  - linear: {out: 10}\n",
                       KD_ERR_SHAPE, (const char *[]){"[4, 65536, 65536]", NULL});
    expect_build_error("input: [1, 4096, 4096]\nlayers:\n  - conv2d: {out: 16, kernel: 1}\n"
                       "  - global_avgpool\n  - linear: {out: 10}\n",
                       KD_ERR_SHAPE, (const char *[]){"output holds 268435456 values", NULL});
    expect_build_error("input: [1, 65536, 65536]\nlayers:\n  - flatten\n  - linear: {out: 10}\n",
                       KD_ERR_SHAPE, (const char *[]){"4294967296 values per sample", NULL});
    expect_build_error("input: [1, 8, 8]\nlayers:\n  - conv3d: {out: 4}\n", KD_ERR_CONFIG,
                       (const char *[]){"model.yaml:3:", "unknown layer type 'conv3d'", NULL});
    expect_build_error("input: [1, 8, 8]\nlayers:\n  - conv2d: {out: 4, kernal: 3}\n",
                       KD_ERR_CONFIG, (const char *[]){"kernal", NULL});
    expect_build_error("input: [1, 8, 8]\nlayers:\n  - conv2d: {out: four, kernel: 3}\n",
                       KD_ERR_CONFIG, (const char *[]){"model.yaml:3:", "four", NULL});
    expect_build_error("input: [1, 8, 8]\nlayers:\n  - conv2d: {out: 4, kernel: 3}\n", KD_ERR_SHAPE,
                       (const char *[]){"flat vector of logits", NULL});
}

/* 1 when the file at path holds exactly the n bytes at want. */
static int same_bytes(const char *path, const void *want, size_t n)
{
    void *got = NULL;
    size_t len = 0;
    const int same =
        kd_file_read_all(path, &got, &len) == KD_OK && len == n && memcmp(got, want, n) == 0;
    free(got);
    return same;
}

/* The checkpoint at src copied to dst with float idx of entry `name` set to v, and the metadata
 * the loader needs (kd_checkpoint_save refuses non-finite values, so damaged files are made
 * here). */
static void write_poisoned(const char *src, const char *dst, const char *name, size_t idx, float v)
{
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(src, &st), KD_OK);
    const size_t ne = kd_safetensors_count(st);
    kd_st_entry *ents = malloc(ne * sizeof *ents);
    float *copy = NULL;
    assert_non_null(ents);
    for (size_t i = 0; i < ne; i++) {
        ents[i] = *kd_safetensors_entry(st, i);
        if (strcmp(ents[i].name, name) != 0)
            continue;
        size_t n = 1;
        for (int d = 0; d < ents[i].ndim; d++)
            n *= (size_t)ents[i].shape[d];
        assert_true(ents[i].dtype == KD_DTYPE_F32 && idx < n);
        copy = malloc(n * sizeof(float));
        assert_non_null(copy);
        memcpy(copy, ents[i].data, n * sizeof(float));
        copy[idx] = v;
        ents[i].data = copy;
    }
    assert_non_null(copy);
    const char *meta[] = {"format",     kd_safetensors_meta(st, "format"),
                          "model_hash", kd_safetensors_meta(st, "model_hash"),
                          "optimizer",  kd_safetensors_meta(st, "optimizer")};
    assert_int_equal(kd_safetensors_save(dst, ents, ne, meta, 3), KD_OK);
    free(copy);
    free(ents);
    kd_safetensors_close(st);
}

/* The every_layer model with distinct parameter and buffer values. */
static kd_model *build_filled(void)
{
    kd_model *a = build(every_layer, 2, NULL);
    for (size_t i = 0; i < a->nparams; i++)
        a->params[i] += 0.001f * (float)i;
    for (size_t i = 0; i < a->nbuffers; i++)
        a->buffers[i] = 0.5f + 0.01f * (float)i;
    return a;
}

/*
 * A state_dict written by PyTorch in another precision and without what only distill writes
 * (metadata, optimizer state, num_batches_tracked): weights in float64 load exactly, buffers in
 * bfloat16 as their float32 widening, missing counters as 0. A tensor of an integer type is
 * refused as such, and names with DistributedDataParallel's 'module.' prefix get a hint.
 */
static void test_checkpoint_other_precisions(void **state)
{
    (void)state;
    char dir[] = "/tmp/kd_model_XXXXXX", path[256];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/pt.safetensors", dir);
    kd_model *a = build_filled();
    kd_st_entry *ents = calloc((size_t)a->nentries, sizeof *ents);
    double *w64 = malloc(a->nparams * sizeof(double));
    uint16_t *b16 = malloc((a->nbuffers + 1) * sizeof(uint16_t));
    float *b_want = malloc((a->nbuffers + 1) * sizeof(float));
    char(*names)[80] = calloc((size_t)a->nentries, sizeof *names);
    assert_true(ents && w64 && b16 && b_want && names);
    for (size_t i = 0; i < a->nparams; i++)
        w64[i] = a->params[i];
    for (size_t i = 0; i < a->nbuffers; i++) {
        uint32_t u;
        memcpy(&u, &a->buffers[i], 4);
        b16[i] = (uint16_t)(u >> 16);
        u &= 0xffff0000u;
        memcpy(&b_want[i], &u, 4);
    }
    size_t n = 0;
    for (int i = 0; i < a->nentries; i++) {
        const kd_state_entry *e = &a->entries[i];
        if (e->kind == KD_ENTRY_COUNTER)
            continue;
        kd_st_entry *t = &ents[n++];
        t->name = e->name;
        t->ndim = e->ndim;
        memcpy(t->shape, e->shape, sizeof t->shape);
        t->dtype = e->kind == KD_ENTRY_PARAM ? KD_DTYPE_F64 : KD_DTYPE_BF16;
        t->data = e->kind == KD_ENTRY_PARAM ? (const void *)(w64 + e->offset)
                                            : (const void *)(b16 + e->offset);
    }
    assert_int_equal(kd_safetensors_save(path, ents, n, NULL, 0), KD_OK);
    kd_model *b = build(every_layer, 2, NULL);
    b->blocks[1].bn_batches = 5;
    assert_int_equal(kd_checkpoint_load(path, b, NULL, 0, NULL), KD_OK);
    assert_memory_equal(a->params, b->params, a->nparams * sizeof(float));
    assert_memory_equal(b_want, b->buffers, a->nbuffers * sizeof(float));
    assert_int_equal(b->blocks[1].bn_batches, 0);
    /* weights only: no resume from it */
    float st1[8];
    assert_int_equal(kd_checkpoint_load(path, b, st1, 8, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "holds weights only, no optimizer state"));
    /* an integer weight: refused for its type, not as another model */
    ents[0].dtype = KD_DTYPE_I8;
    assert_int_equal(kd_safetensors_save(path, ents, n, NULL, 0), KD_OK);
    assert_int_equal(kd_checkpoint_load(path, b, NULL, 0, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "of a type distill does not read"));
    assert_non_null(strstr(kd_last_error(), "0.weight has dtype I8"));
    ents[0].dtype = KD_DTYPE_F64;
    /* every name prefixed with 'module.' */
    for (size_t i = 0; i < n; i++) {
        snprintf(names[i], sizeof names[i], "module.%s", ents[i].name);
        ents[i].name = names[i];
    }
    assert_int_equal(kd_safetensors_save(path, ents, n, NULL, 0), KD_OK);
    assert_int_equal(kd_checkpoint_load(path, b, NULL, 0, NULL), KD_ERR_SHAPE);
    assert_non_null(strstr(kd_last_error(), "its names start with 'module.'"));
    free(ents), free(w64), free(b16), free(b_want), free(names);
    kd_model_free(a);
    kd_model_free(b);
    unlink(path);
    rmdir(dir);
}

static void test_checkpoint_round_trip(void **state)
{
    (void)state;
    char dir[] = "/tmp/kd_model_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/ck.safetensors", dir);
    kd_model *a = build_filled();
    a->blocks[1].bn_batches = 17;
    float opt[3 * 1000];
    size_t nstate = a->nparams;
    for (size_t i = 0; i < nstate; i++)
        opt[i] = (float)i;
    kd_ckpt_info info = {
        .step = 5, .epoch = 1, .best_val_acc = 0.75, .seed = 9, .optimizer = "sgd"};
    assert_true(nstate <= 3000);
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_OK);
    kd_model *b = build(every_layer, 2, NULL);
    float opt2[3 * 1000] = {0};
    kd_ckpt_info in;
    assert_int_equal(kd_checkpoint_load(path, b, opt2, nstate, &in), KD_OK);
    assert_memory_equal(a->params, b->params, a->nparams * sizeof(float));
    assert_memory_equal(a->buffers, b->buffers, a->nbuffers * sizeof(float));
    assert_memory_equal(opt, opt2, nstate * sizeof(float));
    assert_int_equal(b->blocks[1].bn_batches, 17);
    assert_int_equal(in.step, 5);
    assert_int_equal(in.epoch, 1);
    assert_int_equal(in.seed, 9);
    kd_assert_close(in.best_val_acc, 0.75, 0);

    /* a checkpoint of another model: every difference listed, the model untouched */
    kd_model *c = build("input: [2, 8, 8]\nlayers:\n  - conv2d: {out: 5, kernel: 3, pad: 1}\n"
                        "  - global_avgpool\n  - linear: {out: 3}\n  - linear: {out: 3}\n",
                        2, NULL);
    assert_non_null(c);
    float *before = malloc(c->nparams * sizeof(float));
    memcpy(before, c->params, c->nparams * sizeof(float));
    assert_int_equal(kd_checkpoint_load(path, c, NULL, 0, NULL), KD_ERR_SHAPE);
    const char *msg = kd_last_error();
    assert_non_null(strstr(msg, path));
    assert_non_null(strstr(msg, "0.weight is [6, 2, 3, 3] in the checkpoint but [5, 2, 3, 3]"));
    assert_non_null(strstr(msg, "missing 3.weight [3, 3]"));
    assert_non_null(strstr(msg, "unexpected 1.running_mean"));
    assert_memory_equal(before, c->params, c->nparams * sizeof(float));
    /* optimiser state of the wrong size is refused */
    assert_int_equal(kd_checkpoint_load(path, b, opt2, 2 * nstate, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "optimiser state"));
    free(before);

    /* a diverged model is never saved: the file keeps what it held */
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_OK);
    void *good = NULL;
    size_t ngood = 0;
    assert_int_equal(kd_file_read_all(path, &good, &ngood), KD_OK);
    const float w3 = a->params[3];
    a->params[3] = NAN;
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_ERR_INTERNAL);
    assert_non_null(strstr(kd_last_error(), "0.weight[3] is nan"));
    assert_non_null(strstr(kd_last_error(), "the file keeps what it held"));
    a->params[3] = w3;
    opt[7] = INFINITY;
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_ERR_INTERNAL);
    assert_non_null(strstr(kd_last_error(), "optimizer state holds inf at index 7"));
    opt[7] = 7.f;
    assert_true(same_bytes(path, good, ngood));
    free(good);

    /* values no trained model holds are refused on loading, naming the tensor, and leave b
     * untouched (the damaged files written around kd_checkpoint_save) */
    float *b_params = malloc(b->nparams * sizeof(float));
    memcpy(b_params, b->params, b->nparams * sizeof(float));
    char bad[300];
    snprintf(bad, sizeof bad, "%s/bad.safetensors", dir);
    write_poisoned(path, bad, "0.weight", 3, NAN);
    assert_int_equal(kd_checkpoint_load(bad, b, opt2, nstate, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), bad));
    assert_non_null(strstr(kd_last_error(), "0.weight[3] is nan"));
    const char *var_name = NULL;
    for (int i = 0; i < a->nentries && !var_name; i++)
        if (strstr(a->entries[i].name, "running_var"))
            var_name = a->entries[i].name;
    assert_non_null(var_name);
    write_poisoned(path, bad, var_name, 0, -0.5f);
    assert_int_equal(kd_checkpoint_load(bad, b, opt2, nstate, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "a variance must be finite and >= 0"));
    write_poisoned(path, bad, "__optim__.state", 7, INFINITY);
    assert_int_equal(kd_checkpoint_load(bad, b, opt2, nstate, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "__optim__.state) holds inf at index 7"));
    /* AdamW's state: first moments (the first half) may be negative, second moments may not */
    const size_t np = a->nparams;
    assert_true(2 * np <= 3000);
    for (size_t i = 0; i < 2 * np; i++)
        opt[i] = (i < np ? -1.f : 1.f) * (float)(i + 1) * 1e-3f;
    kd_ckpt_info adam = info;
    adam.optimizer = "adamw";
    assert_int_equal(kd_checkpoint_save(path, a, opt, 2 * np, &adam), KD_OK);
    assert_int_equal(kd_checkpoint_load(path, b, opt2, 2 * np, NULL), KD_OK);
    assert_memory_equal(opt, opt2, 2 * np * sizeof(float));
    write_poisoned(path, bad, "__optim__.state", np + 2, -0.25f);
    assert_int_equal(kd_checkpoint_load(bad, b, opt2, 2 * np, NULL), KD_ERR_FORMAT);
    assert_non_null(strstr(kd_last_error(), "an AdamW second moment, which cannot be negative"));
    assert_memory_equal(a->params, b->params, b->nparams * sizeof(float));
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_OK);
    for (size_t i = 0; i < nstate; i++)
        opt[i] = (float)i;
    assert_memory_equal(b_params, b->params, b->nparams * sizeof(float));
    free(b_params);
    unlink(bad);

    /* metadata that is not what kd_checkpoint_save writes */
    assert_int_equal(kd_checkpoint_save(path, a, opt, nstate, &info), KD_OK);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    size_t ne = kd_safetensors_count(st);
    kd_st_entry *ents = malloc(ne * sizeof *ents);
    for (size_t i = 0; i < ne; i++)
        ents[i] = *kd_safetensors_entry(st, i);
    const char *bad_meta[][4] = {{"step", "abc", "step", "'abc'"},
                                 {"step", "-3", "step", "'-3'"},
                                 {"best_val_acc", "nan", "best_val_acc", "[0, 1]"},
                                 {"best_val_acc", "2.0", "best_val_acc", "[0, 1]"}};
    char bad_path[300];
    snprintf(bad_path, sizeof bad_path, "%s/meta.safetensors", dir);
    for (size_t k = 0; k < sizeof bad_meta / sizeof bad_meta[0]; k++) {
        const char *meta[] = {"format",       kd_safetensors_meta(st, "format"),
                              "model_hash",   kd_safetensors_meta(st, "model_hash"),
                              "optimizer",    "sgd",
                              bad_meta[k][0], bad_meta[k][1]};
        assert_int_equal(kd_safetensors_save(bad_path, ents, ne, meta, 4), KD_OK);
        kd_ckpt_info got;
        assert_int_equal(kd_checkpoint_load(bad_path, b, opt2, nstate, &got), KD_ERR_FORMAT);
        assert_non_null(strstr(kd_last_error(), bad_meta[k][2]));
        assert_non_null(strstr(kd_last_error(), bad_meta[k][3]));
    }
    free(ents);
    kd_safetensors_close(st);
    unlink(bad_path);

    kd_model_free(a);
    kd_model_free(b);
    kd_model_free(c);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_names_and_shapes),
        cmocka_unit_test(test_model_gradients),
        cmocka_unit_test(test_round_bf16),
        cmocka_unit_test(test_model_bf16),
        cmocka_unit_test(test_shape_errors),
        cmocka_unit_test(test_checkpoint_round_trip),
        cmocka_unit_test(test_checkpoint_other_precisions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
