/*
 * test_export_lower.c - lowering a model to runtime ops: the folded float graph computes what the
 * engine's unfolded model computes (batchnorm folding, fused relu / relu6, depthwise, pointwise,
 * pools, residuals with and without projection, a flatten feeding a linear whose columns are
 * permuted from CHW to NHWC), and every layer arrangement the runtime lacks is refused naming the
 * block and what is missing.
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

#include "export.h"
#include "kd_test.h"
#include "model.h"
#include "rng.h"

/* conv + bn + relu, depthwise + bn + relu6, pointwise + bn + relu, gap, linear */
static const char *const mobile =
    "input: [3, 10, 10]\n"
    "layers:\n"
    "  - conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}\n"
    "  - batchnorm: {}\n"
    "  - relu: {}\n"
    "  - conv2d: {out: 8, kernel: 3, pad: 1, groups: 8, bias: false}\n"
    "  - batchnorm: {eps: 0.001}\n"
    "  - relu6: {}\n"
    "  - conv2d: {out: 12, kernel: 1}\n"
    "  - batchnorm: {}\n"
    "  - relu: {}\n"
    "  - global_avgpool: {}\n"
    "  - linear: {out: 5}\n";

/* residual blocks (identity and projection), max pool, dropout, flatten of [8, 2, 2], a linear
 * with a folded batchnorm */
static const char *const resnet = "input: [2, 8, 8]\n"
                                  "layers:\n"
                                  "  - conv2d: {out: 6, kernel: 3, pad: 1}\n"
                                  "  - batchnorm: {}\n"
                                  "  - relu: {}\n"
                                  "  - residual:\n"
                                  "      body:\n"
                                  "        - conv2d: {out: 6, kernel: 3, pad: 1}\n"
                                  "        - batchnorm: {}\n"
                                  "        - relu: {}\n"
                                  "        - conv2d: {out: 6, kernel: 3, pad: 1, bias: false}\n"
                                  "        - batchnorm: {}\n"
                                  "  - relu: {}\n"
                                  "  - maxpool2d: {kernel: 2}\n"
                                  "  - relu: {}\n"
                                  "  - residual:\n"
                                  "      body:\n"
                                  "        - conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}\n"
                                  "        - batchnorm: {}\n"
                                  "      proj:\n"
                                  "        - conv2d: {out: 8, kernel: 1, stride: 2, bias: false}\n"
                                  "        - batchnorm: {}\n"
                                  "  - relu6: {}\n"
                                  "  - dropout: {p: 0.2}\n"
                                  "  - flatten: {}\n"
                                  "  - linear: {out: 7}\n"
                                  "  - batchnorm: {}\n"
                                  "  - relu: {}\n"
                                  "  - linear: {out: 4}\n";

static kd_model *build(const char *yaml, int batch, kd_status *st_out)
{
    kd_node *doc = NULL;
    kd_status st = kd_yaml_load_string(yaml, "model.yaml", &doc);
    kd_model *m = NULL;
    if (st == KD_OK)
        st = kd_model_build(kd_node_child(doc, "input"), kd_node_child(doc, "layers"),
                            kd_backend_cpu(), batch, 7, &m);
    kd_node_free(doc);
    if (st_out)
        *st_out = st;
    return m;
}

/* Random weights, and batchnorm statistics far from the identity so folding matters. */
static void randomize(kd_model *m, uint64_t seed)
{
    kd_rng r;
    kd_rng_seed(&r, seed, 3);
    float *p = malloc(sizeof(float) * (m->nparams + 1));
    float *b = malloc(sizeof(float) * (m->nbuffers + 1));
    assert_non_null(p);
    assert_non_null(b);
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        int bn_scale = strstr(e->name, "weight") && e->ndim == 1;
        int var = strstr(e->name, "running_var") != NULL;
        for (size_t j = 0; j < e->numel; j++) {
            float u = kd_rng_uniform(&r);
            if (e->kind == KD_ENTRY_COUNTER)
                continue;
            float v = var ? 0.3f + 2.0f * u : bn_scale ? 0.5f + u : (2 * u - 1) * 0.6f;
            (e->kind == KD_ENTRY_PARAM ? p : b)[e->offset + j] = v;
        }
    }
    assert_int_equal(m->be->upload(m->params, p, sizeof(float) * m->nparams), KD_OK);
    assert_int_equal(m->be->upload(m->buffers, b, sizeof(float) * m->nbuffers), KD_OK);
    free(p);
    free(b);
}

/* Engine eval forward vs the folded graph's forward on n random inputs; the graph is returned
 * for further checks (the caller frees it). */
static kd_export_graph *check_fold(const char *yaml, int n, int want_ops, const kdm_op_type *types)
{
    kd_status st;
    kd_model *m = build(yaml, n, &st);
    if (!m)
        fail_msg("build: %s", kd_last_error());
    randomize(m, 11);
    kd_export_graph *g = NULL;
    st = kd_export_lower(m, &g);
    if (st != KD_OK)
        fail_msg("lower: %s", kd_last_error());
    assert_int_equal(g->nop, want_ops);
    for (int i = 0; i < want_ops; i++)
        if (g->op[i].type != types[i])
            fail_msg("op %d is %s, expected %s", i, kd_export_op_type_name(g->op[i].type),
                     kd_export_op_type_name(types[i]));
    size_t per = m->in_numel;
    float *x = malloc(sizeof(float) * per * (size_t)n);
    assert_non_null(x);
    kd_rng r;
    kd_rng_seed(&r, 5, 1);
    for (size_t i = 0; i < per * (size_t)n; i++)
        x[i] = 4 * kd_rng_uniform(&r) - 2;
    kd_model_forward(m, x, n, 0, 0);
    const float *y = kd_model_output(m);
    kd_export_acts a = {0};
    assert_int_equal(kd_export_acts_new(g, &a), KD_OK);
    int nout = m->out_features;
    assert_int_equal(g->classes, nout);
    for (int s = 0; s < n; s++) {
        kd_export_forward(g, x + (size_t)s * per, &a);
        const float *f = a.v[g->output];
        double scale = 1;
        for (int j = 0; j < nout; j++)
            scale = fmax(scale, fabs(y[(size_t)s * nout + j]));
        for (int j = 0; j < nout; j++)
            kd_assert_close(f[j], y[(size_t)s * nout + j], 1e-5 * scale);
    }
    kd_export_acts_free(&a);
    kd_model_free(m);
    free(x);
    return g;
}

static void test_fold_mobile(void **state)
{
    (void)state;
    const kdm_op_type t[] = {KDM_OP_CONV2D, KDM_OP_DEPTHWISE_CONV2D, KDM_OP_CONV2D,
                             KDM_OP_GLOBAL_AVGPOOL, KDM_OP_FULLY_CONNECTED};
    kd_export_graph *g = check_fold(mobile, 6, 5, t);
    /* fused activations: relu, relu6, relu, none */
    assert_int_equal(g->op[0].act, KD_EXPORT_ACT_RELU);
    assert_int_equal(g->op[1].act, KD_EXPORT_ACT_RELU6);
    assert_int_equal(g->op[2].act, KD_EXPORT_ACT_RELU);
    assert_int_equal(g->op[4].act, KD_EXPORT_ACT_NONE);
    assert_string_equal(g->op[0].fused, "1,2");
    /* the pool output keeps its input's quantization */
    assert_int_equal(g->t[g->op[3].out].qsrc, g->op[3].in0);
    kd_export_graph_free(g);
}

static void test_fold_resnet(void **state)
{
    (void)state;
    const char *yaml = resnet;
    const kdm_op_type t[] = {
        KDM_OP_CONV2D,          KDM_OP_CONV2D,         KDM_OP_CONV2D, KDM_OP_ADD,
        KDM_OP_MAXPOOL2D,       KDM_OP_CONV2D,         KDM_OP_CONV2D, KDM_OP_ADD,
        KDM_OP_FULLY_CONNECTED, KDM_OP_FULLY_CONNECTED};
    kd_export_graph *g = check_fold(yaml, 5, 10, t);
    /* relu after the first residual fuses into its ADD, the relu after the max pool is dropped,
     * relu6 fuses into the second ADD */
    assert_int_equal(g->op[3].act, KD_EXPORT_ACT_RELU);
    assert_int_equal(g->op[7].act, KD_EXPORT_ACT_RELU6);
    assert_string_equal(g->op[3].name, "3");
    /* the second ADD reads the body's and the projection's outputs */
    assert_int_equal(g->op[7].in0, g->op[5].out);
    assert_int_equal(g->op[7].in1, g->op[6].out);
    /* the first ADD's skip input is the stem's output */
    assert_int_equal(g->op[3].in1, g->op[0].out);
    kd_export_graph_free(g);
}

/* relu / relu6 after a max pool (PyTorch's MNIST example: conv -> maxpool -> relu) is the clamp
 * of the op before the pool; one whose pool input is also a residual's skip path is not. */
static void test_act_after_maxpool(void **state)
{
    (void)state;
    const char *yaml = "input: [2, 9, 9]\n"
                       "layers:\n"
                       "  - conv2d: {out: 6, kernel: 3, pad: 1}\n"
                       "  - maxpool2d: {kernel: 2, stride: 2}\n"
                       "  - relu\n"
                       "  - conv2d: {out: 6, kernel: 3, pad: 1, groups: 6}\n"
                       "  - batchnorm\n"
                       "  - maxpool2d: {kernel: 3, stride: 1, pad: 1}\n"
                       "  - relu6\n"
                       "  - flatten\n"
                       "  - linear: {out: 5}\n";
    const kdm_op_type t[] = {KDM_OP_CONV2D, KDM_OP_MAXPOOL2D, KDM_OP_DEPTHWISE_CONV2D,
                             KDM_OP_MAXPOOL2D, KDM_OP_FULLY_CONNECTED};
    kd_export_graph *g = check_fold(yaml, 4, 5, t);
    assert_int_equal(g->op[0].act, KD_EXPORT_ACT_RELU);
    assert_int_equal(g->op[2].act, KD_EXPORT_ACT_RELU6);
    assert_string_equal(g->op[1].fused, "2");
    /* both the clamped output and the pool's carry the clamp's range */
    assert_true(g->t[g->op[2].out].lo == 0 && g->t[g->op[2].out].hi == 6);
    assert_true(g->t[g->op[3].out].lo == 0 && g->t[g->op[3].out].hi == 6);
    kd_export_graph_free(g);
}

/* A flatten of [C, H, W] into a linear, where the column permutation is all that differs. */
static void test_flatten_permutation(void **state)
{
    (void)state;
    const char *yaml = "input: [3, 4, 5]\n"
                       "layers:\n"
                       "  - conv2d: {out: 4, kernel: 3, pad: 1}\n"
                       "  - flatten: {}\n"
                       "  - linear: {out: 6}\n";
    const kdm_op_type t[] = {KDM_OP_CONV2D, KDM_OP_FULLY_CONNECTED};
    kd_export_graph_free(check_fold(yaml, 3, 2, t));
}

static void expect_unsupported(const char *layers, const char *const *parts)
{
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "input: [4, 8, 8]\nlayers:\n%s", layers);
    kd_status st;
    kd_model *m = build(yaml, 1, &st);
    if (!m)
        fail_msg("build: %s", kd_last_error());
    kd_export_graph *g = NULL;
    kd_clear_error();
    st = kd_export_lower(m, &g);
    kd_model_free(m);
    if (st != KD_ERR_UNSUPPORTED)
        fail_msg("want KD_ERR_UNSUPPORTED, got %d (%s) for\n%s", st, kd_last_error(), layers);
    assert_null(g);
    for (int i = 0; parts[i]; i++)
        if (!strstr(kd_last_error(), parts[i]))
            fail_msg("message lacks '%s': %s", parts[i], kd_last_error());
}

static void test_unsupported(void **state)
{
    (void)state;
    const char *const grouped[] = {"model.yaml:4:5", "layer 1 (conv2d)", "groups 2", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n"
                       "  - conv2d: {out: 4, kernel: 3, groups: 2}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       grouped);
    const char *const mult[] = {"layer 0 (conv2d)", "channel multiplier 2", NULL};
    expect_unsupported("  - conv2d: {out: 8, kernel: 3, groups: 4}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       mult);
    const char *const avgpad[] = {"layer 1 (avgpool2d)", "pad", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n"
                       "  - avgpool2d: {kernel: 3, stride: 1, pad: 1}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       avgpad);
    const char *const bn_after_relu[] = {"layer 2 (batchnorm)", "batchnorm", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n  - relu\n  - batchnorm\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       bn_after_relu);
    const char *const bn_first[] = {"layer 0 (batchnorm)", NULL};
    expect_unsupported("  - batchnorm\n  - conv2d: {out: 4, kernel: 1}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       bn_first);
    const char *const relu_input[] = {"layer 0 (relu)", "activation", NULL};
    expect_unsupported("  - relu\n  - conv2d: {out: 4, kernel: 1}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       relu_input);
    /* pre-activation residual: the relu reads the block input that the skip path also reads */
    const char *const preact[] = {"layer 1.body.0 (relu)", "skip path", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n"
                       "  - residual: {body: [relu, {conv2d: {out: 4, kernel: 1}}]}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       preact);
    /* a residual around a linear after a flatten: the engine adds vectors, the runtime's skip
     * tensor keeps its [C, H, W] shape (and NHWC order) */
    const char *const flat_res[] = {"layer 1 (residual)", "one shape", "256x1x1", "4x8x8", NULL};
    expect_unsupported("  - flatten\n  - residual: {body: [{linear: {out: 256}}]}\n"
                       "  - linear: {out: 3}\n",
                       flat_res);
    /* a max pool and relu at the start of a residual body: the skip path reads the pool's
     * input unclamped */
    const char *const pool_preact[] = {"layer 1.body.1 (relu)", "skip path", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n"
                       "  - residual: {body: [{maxpool2d: {kernel: 3, stride: 1, pad: 1}}, relu]}\n"
                       "  - global_avgpool\n  - linear: {out: 3}\n",
                       pool_preact);
    /* a relu after a max pool of the model input: no op before the pool to clamp */
    const char *const pool_input[] = {"layer 1 (relu)", "max pool of one", NULL};
    expect_unsupported("  - maxpool2d: {kernel: 2, stride: 2}\n  - relu\n"
                       "  - conv2d: {out: 4, kernel: 1}\n  - global_avgpool\n"
                       "  - linear: {out: 3}\n",
                       pool_input);
    const char *const bn_after_gap[] = {"layer 2 (batchnorm)", NULL};
    expect_unsupported("  - conv2d: {out: 4, kernel: 1}\n  - global_avgpool\n  - batchnorm\n"
                       "  - linear: {out: 3}\n",
                       bn_after_gap);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fold_mobile),         cmocka_unit_test(test_fold_resnet),
        cmocka_unit_test(test_flatten_permutation), cmocka_unit_test(test_act_after_maxpool),
        cmocka_unit_test(test_unsupported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
