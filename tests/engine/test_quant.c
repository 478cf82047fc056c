/*
 * test_quant.c - the per-channel weight quantizer shared by quantization-aware training and the
 * exporter (engine/quant.h): grid, range and error bounds, invariance under a per-row scale
 * (what BatchNorm folding does), and the model-level apply / restore used by QAT.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "config_yaml.h"
#include "model.h"
#include "quant.h"
#include "rng.h"

static void random_rows(float *w, int64_t n, uint64_t seed)
{
    kd_rng r;
    kd_rng_seed(&r, seed, 7);
    for (int64_t i = 0; i < n; i++)
        w[i] = (float)(kd_rng_normal(&r) * 0.3);
}

static void test_grid_and_error(void **state)
{
    (void)state;
    enum { ROWS = 37, K = 53 };
    static float w[ROWS * K], wq[ROWS * K], s[ROWS];
    for (int bits = 4; bits <= 8; bits += 4) {
        int qmax = kd_quant_qmax(bits);
        random_rows(w, ROWS * K, (uint64_t)bits);
        for (int j = 0; j < K; j++)
            w[5 * K + j] = 0.0f; /* an all-zero row */
        kd_quant_row_scales(w, ROWS, K, bits, s);
        kd_quant_fake_rows(w, ROWS, K, bits, wq);
        assert_true(s[5] == 0.0f);
        for (int o = 0; o < ROWS; o++) {
            int hit_max = o == 5;
            for (int j = 0; j < K; j++) {
                float x = w[o * K + j], y = wq[o * K + j];
                if (s[o] == 0.0f) {
                    assert_true(y == 0.0f);
                    continue;
                }
                int q = kd_quant_round(x, s[o], qmax);
                assert_true(q >= -qmax && q <= qmax);
                assert_true(y == s[o] * (float)q);
                /* round to nearest: the error is at most half a step */
                assert_true(fabsf(x - y) <= 0.5f * s[o] * (1 + 1e-5f));
                hit_max |= abs(q) == qmax;
            }
            assert_true(hit_max); /* the largest |w| of a row lands on +-qmax */
        }
        /* quantizing quantized weights changes nothing */
        static float wq2[ROWS * K];
        kd_quant_fake_rows(wq, ROWS, K, bits, wq2);
        for (int i = 0; i < ROWS * K; i++)
            assert_true(fabsf(wq2[i] - wq[i]) <= 1e-6f * fabsf(wq[i]));
    }
    assert_int_equal(kd_quant_qmax(8), 127);
    assert_int_equal(kd_quant_qmax(4), 7);
    assert_int_equal(kd_quant_qmax(5), 0);
    /* half away from zero */
    assert_int_equal(kd_quant_round(2.5f, 1.0f, 7), 3);
    assert_int_equal(kd_quant_round(-2.5f, 1.0f, 7), -3);
    assert_int_equal(kd_quant_round(100.0f, 1.0f, 7), 7);
    assert_int_equal(kd_quant_round(-1000.0f, 1.0f, 127), -127);
}

/* A non-finite weight stays as it is in the fake-quantized copy (a diverged run's forward pass
 * must not turn finite), and the rest of its row is quantized with its finite weights' scale. */
static void test_fake_rows_nonfinite(void **state)
{
    (void)state;
    const float w[4] = {0.5f, NAN, -1.0f, 0.25f}, inf[2] = {INFINITY, 0.5f};
    float wq[4], want[3], iq[2];
    const float fin[3] = {0.5f, -1.0f, 0.25f};
    kd_quant_fake_rows(w, 1, 4, 4, wq);
    kd_quant_fake_rows(fin, 1, 3, 4, want);
    assert_true(isnan(wq[1]));
    assert_true(wq[0] == want[0] && wq[2] == want[1] && wq[3] == want[2]);
    kd_quant_fake_rows(inf, 1, 2, 8, iq);
    kd_quant_fake_rows(inf + 1, 1, 1, 8, want); /* the finite weight alone */
    assert_true(isinf(iq[0]) && iq[0] > 0);
    assert_true(iq[1] == want[0] && fabsf(want[0] - 0.5f) < 1e-6f);
    assert_int_equal(kd_quant_round(NAN, 0.1f, 7), 0);
}

/* Multiplying a row by g (BatchNorm folding) multiplies its scale by |g| and keeps its integers
 * (up to float ties), so QAT trains against the integers the exporter ships. */
static void test_row_scale_invariance(void **state)
{
    (void)state;
    enum { ROWS = 64, K = 72 };
    static float w[ROWS * K], wf[ROWS * K], s[ROWS], sf[ROWS];
    random_rows(w, ROWS * K, 99);
    kd_rng r;
    kd_rng_seed(&r, 3, 1);
    float g[ROWS];
    for (int o = 0; o < ROWS; o++) {
        g[o] = (float)((kd_rng_uniform(&r) * 3 + 0.05) * (o % 3 == 0 ? -1 : 1));
        for (int j = 0; j < K; j++)
            wf[o * K + j] = w[o * K + j] * g[o];
    }
    for (int bits = 4; bits <= 8; bits += 4) {
        int qmax = kd_quant_qmax(bits), same = 0, total = 0;
        kd_quant_row_scales(w, ROWS, K, bits, s);
        kd_quant_row_scales(wf, ROWS, K, bits, sf);
        for (int o = 0; o < ROWS; o++) {
            assert_true(fabsf(sf[o] - fabsf(g[o]) * s[o]) <= 1e-5f * sf[o]);
            for (int j = 0; j < K; j++) {
                int a = kd_quant_round(w[o * K + j], s[o], qmax);
                int b = kd_quant_round(wf[o * K + j], sf[o], qmax);
                if (g[o] < 0)
                    b = -b;
                assert_true(abs(a - b) <= 1);
                same += a == b;
                total++;
            }
        }
        assert_true(same >= total - total / 500);
    }
}

/* conv, batchnorm, relu, depthwise conv, global average pool, linear; for batches up to n */
static kd_model *small_model(int n)
{
    static const char *yaml = "input: [2, 6, 6]\n"
                              "layers:\n"
                              "  - conv2d: {out: 4, kernel: 3, pad: 1}\n"
                              "  - batchnorm: {}\n"
                              "  - relu: {}\n"
                              "  - conv2d: {out: 4, kernel: 3, pad: 1, groups: 4, bias: false}\n"
                              "  - global_avgpool: {}\n"
                              "  - linear: {out: 3}\n";
    kd_node *doc = NULL;
    assert_int_equal(kd_yaml_load_string(yaml, "q.yaml", &doc), KD_OK);
    kd_model *m = NULL;
    assert_int_equal(kd_model_build(kd_node_child(doc, "input"), kd_node_child(doc, "layers"),
                                    kd_backend_cpu(), n, 5, &m),
                     KD_OK);
    kd_node_free(doc);
    return m;
}

static void test_model_apply_restore(void **state)
{
    (void)state;
    kd_model *m = small_model(2);
    /* give biases and BatchNorm parameters non-grid values too */
    for (size_t i = 0; i < m->nparams; i++)
        m->params[i] += 0.0137f * (float)(i % 11);
    float *orig = malloc(m->nparams * sizeof(float)), *saved = malloc(m->nparams * sizeof(float));
    memcpy(orig, m->params, m->nparams * sizeof(float));
    kd_quant_model_apply(m, 4, saved);
    assert_memory_equal(saved, orig, m->nparams * sizeof(float));
    int weights = 0;
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        if (e->kind != KD_ENTRY_PARAM)
            continue;
        const float *p = m->params + e->offset, *o = orig + e->offset;
        int is_weight = e->decay && e->ndim >= 2;
        if (!is_weight) {
            /* biases and BatchNorm affine parameters stay float */
            assert_memory_equal(p, o, e->numel * sizeof(float));
            continue;
        }
        weights++;
        int64_t rows = e->shape[0], k = (int64_t)e->numel / rows;
        float *want = malloc(e->numel * sizeof(float));
        kd_quant_fake_rows(o, rows, k, 4, want);
        assert_memory_equal(p, want, e->numel * sizeof(float));
        /* at most 15 distinct values per row */
        for (int64_t r = 0; r < rows; r++) {
            float sc = 0;
            for (int64_t j = 0; j < k; j++)
                sc = fmaxf(sc, fabsf(o[r * k + j]));
            sc /= 7;
            for (int64_t j = 0; j < k; j++) {
                float q = p[r * k + j] / sc;
                assert_true(fabsf(q - roundf(q)) < 1e-4f && fabsf(q) <= 7.0001f);
            }
        }
        free(want);
    }
    assert_int_equal(weights, 3); /* two convs and the linear */
    kd_quant_model_restore(m, saved);
    assert_memory_equal(m->params, orig, m->nparams * sizeof(float));
    free(orig);
    free(saved);
    kd_model_free(m);
}

/* kd_quant_fake_act: every value lands on the int8 grid of the batch's range (0 included,
 * exactly representable), within half a step of where it was; NaN stays NaN. */
static void test_fake_act(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 11, 2);
    for (int t = 0; t < 3; t++) {
        const size_t n = 5000;
        float *x = malloc(n * sizeof(float)), *o = malloc(n * sizeof(float));
        float lo = 0, hi = 0;
        for (size_t i = 0; i < n; i++) {
            /* t 0: both signs; t 1: non-negative (a ReLU's output); t 2: all negative */
            float v = kd_rng_normal(&r) * 3.0f;
            x[i] = t == 1 ? fabsf(v) : t == 2 ? -fabsf(v) - 0.5f : v;
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
        }
        x[7] = 0.0f;
        memcpy(o, x, n * sizeof(float));
        float s, s_used;
        int32_t zp, zp_used;
        kd_quant_fake_act(x, n, &s_used, &zp_used);
        kd_quant_act_qparams(lo, hi, &s, &zp);
        assert_true(s_used == s && zp_used == zp); /* the grid it used comes back */
        assert_true(s > 0);
        assert_true(fabsf(s - (hi - lo) / 255.0f) <= 1e-6f * (hi - lo));
        if (t == 1)
            assert_int_equal(zp, -128);
        assert_true(x[7] == 0.0f);
        for (size_t i = 0; i < n; i++) {
            float q = x[i] / s + (float)zp;
            if (!(fabsf(q - roundf(q)) < 1e-3f && q >= -128.001f && q <= 127.001f))
                fail_msg("case %d: %g became %g, not on the grid (q %g)", t, o[i], x[i], q);
            if (!(fabsf(x[i] - o[i]) <= 0.5001f * s))
                fail_msg("case %d: %g moved to %g, more than half a step %g", t, o[i], x[i], s);
        }
        free(x);
        free(o);
    }
    float nan3[3] = {1.0f, NAN, -2.0f};
    float s3;
    int32_t z3;
    kd_quant_fake_act(nan3, 3, &s3, &z3);
    assert_true(isnan(nan3[1]));
    assert_true(fabsf(nan3[0] - 1.0f) < 0.01f && fabsf(nan3[2] + 2.0f) < 0.01f);
}

/* With activation fake quantization, the tensors the exporter stores are on an int8 grid (at
 * most 256 distinct values); a convolution followed by its batchnorm is not quantized. */
static void test_model_act_fq(void **state)
{
    (void)state;
    const int n = 8;
    kd_model *m = small_model(n);
    assert_int_equal(kd_model_set_act_fq(m, 1), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 4, 4);
    float *x = malloc((size_t)n * m->in_numel * sizeof(float));
    for (size_t i = 0; i < (size_t)n * m->in_numel; i++)
        x[i] = kd_rng_normal(&r);
    kd_model_forward(m, x, n, 1, 1);
    /* the conv before its batchnorm is not quantized; the batchnorm's buffer is (the ReLU
     * folded into it writes there, and that is the stored tensor) */
    assert_true(m->blocks[2].fused);
    static const int quantized[] = {0, 1, 1, 1, 1, 1};
    for (int b = 0; b < m->nblocks; b++) {
        const float *y = m->blocks[b].y;
        size_t cnt = (size_t)n * m->blocks[b].out_numel;
        float *sorted = malloc(cnt * sizeof(float));
        memcpy(sorted, y, cnt * sizeof(float));
        int distinct = 0;
        for (size_t i = 0; i < cnt; i++) { /* small tensors: quadratic is fine */
            int seen = 0;
            for (size_t j = 0; j < i && !seen; j++)
                seen = sorted[j] == sorted[i];
            distinct += !seen;
        }
        free(sorted);
        if (quantized[b] && distinct > 256)
            fail_msg("block %d: %d distinct values, not an int8 tensor", b, distinct);
        if (!quantized[b] && cnt > 256 && distinct <= 256)
            fail_msg("block %d was quantized (%d distinct values)", b, distinct);
    }
    /* the global average pool keeps its input's grid (the exporter does): its outputs are
     * whole steps of the depthwise conv's output grid away from any of its values */
    const float *dw = m->blocks[3].y, *gap = m->blocks[4].y;
    const size_t ndw = (size_t)n * m->blocks[3].out_numel;
    float step = INFINITY;
    for (size_t i = 0; i < ndw; i++)
        for (size_t j = 0; j < ndw; j++)
            if (dw[j] > dw[i])
                step = fminf(step, dw[j] - dw[i]);
    assert_true(isfinite(step) && step > 0);
    for (size_t i = 0; i < (size_t)n * m->blocks[4].out_numel; i++) {
        float k = (gap[i] - dw[0]) / step;
        if (!(fabsf(k - roundf(k)) < 1e-2f))
            fail_msg("pooled value %g is off the input's grid (step %g)", gap[i], step);
    }
    free(x);
    kd_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fake_rows_nonfinite),
        cmocka_unit_test(test_grid_and_error),
        cmocka_unit_test(test_row_scale_invariance),
        cmocka_unit_test(test_model_apply_restore),
        cmocka_unit_test(test_fake_act),
        cmocka_unit_test(test_model_act_fq),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
