/*
 * test_backend_cuda.c - every operation of the CUDA backend, run on the same random inputs
 * as the CPU backend (the reference) and compared: by relative norm ||gpu - cpu|| / ||cpu||
 * where the two sum in different orders, bit for bit where the CUDA kernel is written to
 * reproduce the CPU's arithmetic exactly (pooling, gap backward, dropout, batch norm in eval
 * mode, the optimizer updates on x86-64). Each tolerance is justified where it is used.
 * Backward passes get identical inputs on both sides (the CPU's forward outputs, saved
 * statistics and argmax indices are uploaded), so a mismatch points at the operation under
 * test. Parameter gradients start from random values, which checks that they accumulate.
 * Exits 77 (CTest: skipped) when distill was built without CUDA or no device answers, so a
 * machine without a GPU never reports a pass.
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

#include "backend.h"
#include "optim.h"
#include "rng.h"

#ifdef KD_HAVE_CUDA
#include "optim_step.h"
#endif

static const kd_backend *gpu;
static const kd_backend *cpu;

static float *host_rand(size_t n, uint64_t seed)
{
    kd_rng r;
    kd_rng_seed(&r, seed, 17);
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = kd_rng_normal(&r);
    return p;
}

static void *dev_bytes(const void *h, size_t bytes)
{
    void *d = NULL;
    assert_int_equal(gpu->alloc(&d, bytes ? bytes : 4), KD_OK);
    if (h && bytes)
        assert_int_equal(gpu->upload(d, h, bytes), KD_OK);
    return d;
}

static float *to_dev(const float *h, size_t n) { return dev_bytes(h, n * sizeof(float)); }

static void from_dev(void *h, const void *d, size_t bytes)
{
    assert_int_equal(gpu->download(h, d, bytes), KD_OK);
}

/* ||a - b|| / ||b|| over n floats, with b on the host and a on the device */
static double rel_err(const float *dev, const float *ref, size_t n)
{
    float *h = malloc((n ? n : 1) * sizeof *h);
    assert_non_null(h);
    from_dev(h, dev, n * sizeof(float));
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)h[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    free(h);
    return sqrt(num / (den > 0 ? den : 1));
}

/* rel_err within tol, else a failure naming the case and the quantity */
static void check_rel(const char *what, const char *tag, const float *dev, const float *ref,
                      size_t n, double tol)
{
    double e = rel_err(dev, ref, n);
    if (!(e <= tol))
        fail_msg("%s: %s relative error %.3g > %.3g", what, tag, e, tol);
}

/* the device floats equal the reference bit for bit (NaN payloads aside, none expected) */
static void check_same(const char *what, const char *tag, const void *dev, const void *ref,
                       size_t bytes)
{
    unsigned char *h = malloc(bytes ? bytes : 1);
    assert_non_null(h);
    from_dev(h, dev, bytes);
    if (memcmp(h, ref, bytes) != 0) {
        size_t i = 0;
        while (i < bytes && h[i] == ((const unsigned char *)ref)[i])
            i++;
        free(h);
        fail_msg("%s: %s differs from the CPU from byte %zu on", what, tag, i);
    }
    free(h);
}

static void test_linear(void **state)
{
    (void)state;
    const int n = 67, in = 129, out = 33;
    float *x = host_rand((size_t)n * in, 1), *w = host_rand((size_t)out * in, 2);
    float *b = host_rand(out, 3), *dy = host_rand((size_t)n * out, 4);
    float *y = calloc((size_t)n * out, 4), *dx = calloc((size_t)n * in, 4);
    float *dw = host_rand((size_t)out * in, 5), *db = host_rand(out, 6);
    float *dx_d = to_dev(dx, (size_t)n * in), *dw_d = to_dev(dw, (size_t)out * in);
    float *db_d = to_dev(db, out), *y_d = to_dev(y, (size_t)n * out);
    float *x_d = to_dev(x, (size_t)n * in), *w_d = to_dev(w, (size_t)out * in);
    float *b_d = to_dev(b, out), *dy_d = to_dev(dy, (size_t)n * out);
    cpu->linear_fwd(n, in, out, x, w, b, y);
    cpu->linear_bwd(n, in, out, x, w, dy, dx, dw, db); /* dw, db accumulate onto random values */
    gpu->linear_fwd(n, in, out, x_d, w_d, b_d, y_d);
    gpu->linear_bwd(n, in, out, x_d, w_d, dy_d, dx_d, dw_d, db_d);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(rel_err(y_d, y, (size_t)n * out) < 1e-5);
    assert_true(rel_err(dx_d, dx, (size_t)n * in) < 1e-5);
    assert_true(rel_err(dw_d, dw, (size_t)out * in) < 1e-5);
    assert_true(rel_err(db_d, db, out) < 1e-5);
    void *all[] = {dx_d, dw_d, db_d, y_d, x_d, w_d, b_d, dy_d};
    for (size_t i = 0; i < 8; i++)
        gpu->release(all[i]);
    free(x), free(w), free(b), free(dy), free(y), free(dx), free(dw), free(db);
}

static void test_elementwise(void **state)
{
    (void)state;
    const size_t n = 100003;
    float *a = host_rand(n, 7), *b = host_rand(n, 8), *ref = malloc(n * 4);
    for (size_t i = 0; i < n; i++)
        a[i] *= 5; /* span both ReLU6 kinks */
    float *a_d = to_dev(a, n), *b_d = to_dev(b, n), *y_d = to_dev(ref, n);
    for (int capi = 0; capi < 2; capi++) {
        double cap = capi ? 6.0 : -1.0;
        cpu->act_fwd(n, a, ref, cap);
        gpu->act_fwd(n, a_d, y_d, cap);
        assert_int_equal(gpu->sync(), KD_OK);
        assert_true(rel_err(y_d, ref, n) == 0.0);
        cpu->act_bwd(n, a, b, ref, cap);
        gpu->act_bwd(n, a_d, b_d, y_d, cap);
        assert_int_equal(gpu->sync(), KD_OK);
        assert_true(rel_err(y_d, ref, n) == 0.0);
    }
    cpu->add(n, a, b, ref);
    gpu->add(n, a_d, b_d, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(rel_err(y_d, ref, n) == 0.0);
    cpu->mul(n, a, b, ref);
    gpu->mul(n, a_d, b_d, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(rel_err(y_d, ref, n) == 0.0);
    gpu->copy(n, a_d, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(rel_err(y_d, a, n) == 0.0);
    /* bf16 rounding on every kind of bit pattern: random words (NaNs, infinities and
     * subnormals among them), ties, and values that round past bf16's largest */
    uint32_t *u = (uint32_t *)ref;
    kd_rng r;
    kd_rng_seed(&r, 77, 1);
    for (size_t i = 0; i < n; i++)
        u[i] = kd_rng_u32(&r);
    const uint32_t special[] = {0x3F808000u, 0x3F818000u, 0x7F7FFFFFu, 0x7F800001u,
                                0xFF800000u, 0x00008000u, 0x807F8000u, 0x80000000u};
    memcpy(u, special, sizeof special);
    assert_int_equal(gpu->upload(y_d, ref, n * sizeof(float)), KD_OK);
    cpu->round_bf16(n, ref);
    gpu->round_bf16(n, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_same("round_bf16", "every word", y_d, ref, n * sizeof(float));
    /* rows of a held teacher cache: 300 rows of 7 words, 129 picked with repeats */
    uint32_t pick[129];
    for (int i = 0; i < 129; i++)
        pick[i] = kd_rng_below(&r, 300);
    uint32_t *pick_d = dev_bytes(pick, sizeof pick);
    float *rows_ref = malloc(129 * 7 * sizeof(float));
    assert_non_null(rows_ref);
    cpu->gather_rows(129, 7, a, pick, rows_ref);
    gpu->gather_rows(129, 7, a_d, pick_d, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_same("gather_rows", "129 x 7", y_d, rows_ref, 129 * 7 * sizeof(float));
    gpu->release(pick_d);
    free(rows_ref);
    gpu->release(a_d), gpu->release(b_d), gpu->release(y_d);
    free(a), free(b), free(ref);
}

/* ---- convolution ---- */

typedef struct {
    int n, c, h, w, o, k, stride, pad, groups, bias;
    int extra; /* conv2d_ws is asked for a batch this much larger (a model's last, short batch) */
} conv_case;

/*
 * Tolerance: the GPU sums the same products in another order, and cuDNN may pick a Winograd
 * or FFT algorithm, which rounds in its transformed domain: such results differ from a direct
 * sum by a few 1e-6 relative (more for long reductions, as dw over N*Ho*Wo). 1e-4 leaves room
 * for that and still catches any indexing error (wrong padding, group or channel mapping),
 * which is O(1).
 */
#define CONV_TOL 1e-4

static void run_conv(const conv_case *t, uint64_t seed)
{
    char what[160];
    snprintf(what, sizeof what,
             "conv n %d c %d %dx%d -> o %d k %d stride %d pad %d groups %d bias %d extra %d", t->n,
             t->c, t->h, t->w, t->o, t->k, t->stride, t->pad, t->groups, t->bias, t->extra);
    kd_conv_shape s, full;
    assert_true(kd_conv_shape_init(&s, t->n, t->c, t->h, t->w, t->o, t->k, t->k, t->stride, t->pad,
                                   t->groups));
    assert_true(kd_conv_shape_init(&full, t->n + t->extra, t->c, t->h, t->w, t->o, t->k, t->k,
                                   t->stride, t->pad, t->groups));
    const size_t nx = (size_t)t->n * t->c * t->h * t->w, ny = (size_t)t->n * t->o * s.ho * s.wo;
    const size_t nw = (size_t)t->o * (t->c / t->groups) * t->k * t->k, nb = (size_t)t->o;
    float *x = host_rand(nx, seed), *w = host_rand(nw, seed + 1), *b = host_rand(nb, seed + 2);
    float *dy = host_rand(ny, seed + 3), *dw = host_rand(nw, seed + 4);
    float *db = host_rand(nb, seed + 5);
    float *y = calloc(ny, 4), *dx = calloc(nx, 4);
    float *cws = malloc((cpu->conv2d_ws(&s) + 1) * sizeof(float));
    assert_true(y && dx && cws);
    /* the GPU side is sized like engine/model.c sizes m->ws: at the largest batch */
    size_t ws_floats = gpu->conv2d_ws(&full);
    assert_int_equal(gpu->sync(), KD_OK); /* planning errors surface here */
    assert_true(ws_floats <= ((size_t)256 << 20) / sizeof(float));
    float *x_d = to_dev(x, nx), *w_d = to_dev(w, nw), *b_d = to_dev(b, nb);
    float *dy_d = to_dev(dy, ny), *dw_d = to_dev(dw, nw), *db_d = to_dev(db, nb);
    float *y_d = to_dev(NULL, ny), *dx_d = to_dev(NULL, nx);
    float *ws_d = to_dev(NULL, ws_floats ? ws_floats : 1);

    cpu->conv2d_fwd(&s, x, w, t->bias ? b : NULL, y, cws);
    gpu->conv2d_fwd(&s, x_d, w_d, t->bias ? b_d : NULL, y_d, ws_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "y", y_d, y, ny, CONV_TOL);

    cpu->conv2d_bwd(&s, x, w, dy, dx, dw, t->bias ? db : NULL, cws);
    gpu->conv2d_bwd(&s, x_d, w_d, dy_d, dx_d, dw_d, t->bias ? db_d : NULL, ws_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "dx", dx_d, dx, nx, CONV_TOL);
    check_rel(what, "dw", dw_d, dw, nw, CONV_TOL);
    check_rel(what, "db", db_d, db, nb, CONV_TOL); /* untouched random values without a bias */

    /* the first layer's call: no dx, no bias gradient; dw accumulates a second time */
    cpu->conv2d_bwd(&s, x, w, dy, NULL, dw, NULL, cws);
    gpu->conv2d_bwd(&s, x_d, w_d, dy_d, NULL, dw_d, NULL, ws_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "dw (second pass, dx NULL)", dw_d, dw, nw, CONV_TOL);
    check_rel(what, "db (not accumulated again)", db_d, db, nb, CONV_TOL);
    check_rel(what, "dx (untouched)", dx_d, dx, nx, CONV_TOL);

    void *all[] = {x_d, w_d, b_d, dy_d, dw_d, db_d, y_d, dx_d, ws_d};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        gpu->release(all[i]);
    free(x), free(w), free(b), free(dy), free(dw), free(db), free(y), free(dx), free(cws);
}

static void test_conv2d(void **state)
{
    (void)state;
    const conv_case cases[] = {
        {2, 3, 9, 11, 8, 3, 1, 1, 1, 1, 0},     /* dense 3x3, odd sizes */
        {3, 8, 12, 12, 8, 3, 2, 1, 8, 1, 0},    /* depthwise, stride 2 */
        {1, 16, 7, 7, 32, 3, 1, 1, 16, 0, 0},   /* depthwise, multiplier 2, n = 1, no bias */
        {4, 6, 10, 9, 4, 1, 1, 0, 2, 1, 0},     /* grouped 1x1 */
        {2, 4, 15, 15, 6, 5, 2, 2, 1, 0, 0},    /* 5x5, stride 2, pad 2 */
        {5, 12, 8, 8, 12, 3, 1, 1, 3, 1, 0},    /* 3 groups */
        {1, 3, 32, 32, 16, 3, 2, 1, 1, 1, 0},   /* an n = 1 stem */
        {2, 8, 5, 5, 8, 3, 1, 0, 8, 1, 0},      /* depthwise without padding */
        {3, 5, 13, 7, 7, 3, 2, 1, 1, 1, 2},     /* a short batch: ws sized for n = 5 */
        {6, 16, 14, 14, 16, 3, 1, 1, 16, 1, 3}, /* depthwise, short batch */
        {7, 32, 8, 8, 64, 1, 1, 0, 1, 0, 1},    /* pointwise, short batch */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_conv(&cases[i], 100 + 10 * i);
}

/* ---- batch norm ---- */

typedef struct {
    int n, c, hw;
    double cap;
} bn_case;

static void run_bn(const bn_case *t, uint64_t seed)
{
    char what[96];
    snprintf(what, sizeof what, "batchnorm n %d c %d hw %d cap %g", t->n, t->c, t->hw, t->cap);
    const int n = t->n, c = t->c, hw = t->hw;
    const size_t nx = (size_t)n * c * hw;
    const double momentum = 0.1, eps = 1e-5;
    float *x = host_rand(nx, seed), *gamma = host_rand(c, seed + 1), *beta = host_rand(c, seed + 2);
    float *rm = host_rand(c, seed + 3), *rv = host_rand(c, seed + 4);
    float *dy = host_rand(nx, seed + 5), *dg = host_rand(c, seed + 6),
          *dbt = host_rand(c, seed + 7);
    for (size_t i = 0; i < nx; i++) /* a mean well away from 0 (the pivot matters), values past 6 */
        x[i] = 4.0f * x[i] + 3.0f + (float)(i / hw % c);
    for (int i = 0; i < c; i++) {
        rv[i] = fabsf(rv[i]) + 0.5f;
        gamma[i] *= 4.0f; /* outputs well past the relu6 cap */
    }
    float *y = calloc(nx, 4), *sm = calloc(c, 4), *si = calloc(c, 4), *dx = calloc(nx, 4);
    assert_true(y && sm && si && dx);
    float *x_d = to_dev(x, nx), *g_d = to_dev(gamma, c), *b_d = to_dev(beta, c);
    float *rm_d = to_dev(rm, c), *rv_d = to_dev(rv, c), *y_d = to_dev(NULL, nx);
    float *sm_d = to_dev(NULL, c), *si_d = to_dev(NULL, c);

    /*
     * Training. Mean and variance are double on both sides, from float partial sums over
     * different groupings: they agree to a few float ulps (~1e-7 relative); y = x * scale +
     * shift then carries about the same. 1e-5 covers it with a margin; a wrong channel, a
     * biased/unbiased mix-up (a factor m/(m-1) on small m) or a wrong cap is far larger.
     */
    cpu->bn_fwd_train(n, c, hw, x, gamma, beta, y, sm, si, rm, rv, momentum, eps, t->cap);
    gpu->bn_fwd_train(n, c, hw, x_d, g_d, b_d, y_d, sm_d, si_d, rm_d, rv_d, momentum, eps, t->cap);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "train y", y_d, y, nx, 1e-5);
    check_rel(what, "save_mean", sm_d, sm, c, 1e-6);
    check_rel(what, "save_invstd", si_d, si, c, 1e-6);
    check_rel(what, "running mean", rm_d, rm, c, 1e-6);
    check_rel(what, "running var", rv_d, rv, c, 1e-6);

    /* Eval: scale and shift come from the same inputs through the same double expressions
     * and y is formed without contraction: identical on x86-64; 1e-6 allows a host compiler
     * that fuses multiply-adds (aarch64). */
    cpu->bn_fwd_eval(n, c, hw, x, gamma, beta, rm, rv, y, eps, t->cap);
    assert_int_equal(gpu->upload(rm_d, rm, c * 4), KD_OK);
    assert_int_equal(gpu->upload(rv_d, rv, c * 4), KD_OK);
    gpu->bn_fwd_eval(n, c, hw, x_d, g_d, b_d, rm_d, rv_d, y_d, eps, t->cap);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "eval y", y_d, y, nx, 1e-6);

    /* Backward on the CPU's training outputs (the activation mask reads y). dx: its
     * per-channel constants come from sums that agree to ~1e-7 relative, and dx stays within
     * a few float ulps: 1e-5. dgamma = sum dy * (x - mean) * invstd cancels: its float
     * partial sums carry ~eps * sqrt(N * HW) of the summed magnitudes (3e-6 at 2304 values
     * per channel, in a different grouping on each side): 3e-5. */
    cpu->bn_fwd_train(n, c, hw, x, gamma, beta, y, sm, si, NULL, NULL, momentum, eps, t->cap);
    float *dy_d = to_dev(dy, nx), *dg_d = to_dev(dg, c), *dbt_d = to_dev(dbt, c);
    float *dx_d = to_dev(NULL, nx);
    assert_int_equal(gpu->upload(y_d, y, nx * 4), KD_OK);
    assert_int_equal(gpu->upload(sm_d, sm, c * 4), KD_OK);
    assert_int_equal(gpu->upload(si_d, si, c * 4), KD_OK);
    cpu->bn_bwd(n, c, hw, x, dy, gamma, sm, si, y, t->cap, dx, dg, dbt);
    gpu->bn_bwd(n, c, hw, x_d, dy_d, g_d, sm_d, si_d, y_d, t->cap, dx_d, dg_d, dbt_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "dx", dx_d, dx, nx, 1e-5);
    check_rel(what, "dgamma", dg_d, dg, c, 3e-5);
    check_rel(what, "dbeta", dbt_d, dbt, c, 3e-5);
    /* without dx: the parameter gradients accumulate again */
    cpu->bn_bwd(n, c, hw, x, dy, gamma, sm, si, y, t->cap, NULL, dg, dbt);
    gpu->bn_bwd(n, c, hw, x_d, dy_d, g_d, sm_d, si_d, y_d, t->cap, NULL, dg_d, dbt_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_rel(what, "dgamma (dx NULL)", dg_d, dg, c, 3e-5);
    check_rel(what, "dbeta (dx NULL)", dbt_d, dbt, c, 3e-5);

    void *all[] = {x_d, g_d, b_d, rm_d, rv_d, y_d, sm_d, si_d, dy_d, dg_d, dbt_d, dx_d};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        gpu->release(all[i]);
    free(x), free(gamma), free(beta), free(rm), free(rv), free(dy), free(dg), free(dbt);
    free(y), free(sm), free(si), free(dx);
}

static void test_batchnorm(void **state)
{
    (void)state;
    const bn_case cases[] = {
        {4, 3, 25, -1},   /* relu, odd plane (scalar path) */
        {1, 8, 49, 6.0},  /* n = 1, relu6 */
        {16, 5, 1, 0},    /* 1x1 planes (after global pooling) */
        {3, 7, 64, 0},    /* float4 path */
        {2, 16, 196, 6},  /* float4 path, relu6 */
        {1, 2, 1, -1},    /* one value per channel: variance 0, unbiased = biased */
        {64, 4, 36, 6.0}, /* a long reduction per channel */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_bn(&cases[i], 300 + 10 * i);
}

/* ---- pooling ---- */

static kd_pool_shape pool_shape(int n, int c, int h, int w, int k, int stride, int pad)
{
    kd_pool_shape p = {.n = n, .c = c, .h = h, .w = w, .k = k, .stride = stride, .pad = pad};
    p.ho = (h + 2 * pad - k) / stride + 1;
    p.wo = (w + 2 * pad - k) / stride + 1;
    return p;
}

/* pooling and gap backward are written to round exactly as the CPU: compared bit for bit */
static void test_pooling(void **state)
{
    (void)state;
    const int cases[][7] = {
        {2, 3, 6, 5, 2, 2, 0}, {1, 4, 7, 7, 3, 2, 1}, {3, 2, 9, 8, 3, 1, 1},
        {2, 5, 4, 4, 2, 1, 0}, {1, 1, 1, 1, 1, 1, 0}, {2, 3, 11, 13, 3, 2, 0},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int *q = cases[ci];
        kd_pool_shape p = pool_shape(q[0], q[1], q[2], q[3], q[4], q[5], q[6]);
        char what[96];
        snprintf(what, sizeof what, "pool n %d c %d %dx%d k %d stride %d pad %d", p.n, p.c, p.h,
                 p.w, p.k, p.stride, p.pad);
        const size_t nx = (size_t)p.n * p.c * p.h * p.w, ny = (size_t)p.n * p.c * p.ho * p.wo;
        float *x = host_rand(nx, 500 + ci), *dy = host_rand(ny, 600 + ci);
        for (size_t i = 0; i < nx; i++) /* a few distinct values: ties in most windows */
            x[i] = roundf(x[i] * 1.5f);
        float *y = calloc(ny, 4), *dx = calloc(nx, 4);
        int32_t *arg = calloc(ny, 4);
        assert_true(y && dx && arg);
        float *x_d = to_dev(x, nx), *dy_d = to_dev(dy, ny), *y_d = to_dev(NULL, ny);
        float *dx_d = to_dev(NULL, nx);
        int32_t *arg_d = dev_bytes(NULL, ny * 4);

        cpu->maxpool_fwd(&p, x, y, arg);
        gpu->maxpool_fwd(&p, x_d, y_d, arg_d);
        assert_int_equal(gpu->sync(), KD_OK);
        check_same(what, "maxpool y", y_d, y, ny * 4);
        check_same(what, "maxpool argmax (first tap wins a tie)", arg_d, arg, ny * 4);
        cpu->maxpool_bwd(&p, dy, arg, dx);
        gpu->maxpool_bwd(&p, dy_d, arg_d, dx_d);
        assert_int_equal(gpu->sync(), KD_OK);
        check_same(what, "maxpool dx", dx_d, dx, nx * 4);

        /* average pooling on unrounded values, so the summation order shows */
        float *xr = host_rand(nx, 550 + ci);
        assert_int_equal(gpu->upload(x_d, xr, nx * 4), KD_OK);
        cpu->avgpool_fwd(&p, xr, y);
        gpu->avgpool_fwd(&p, x_d, y_d);
        assert_int_equal(gpu->sync(), KD_OK);
        check_same(what, "avgpool y", y_d, y, ny * 4);
        cpu->avgpool_bwd(&p, dy, dx);
        gpu->avgpool_bwd(&p, dy_d, dx_d);
        assert_int_equal(gpu->sync(), KD_OK);
        check_same(what, "avgpool dx", dx_d, dx, nx * 4);

        gpu->release(x_d), gpu->release(dy_d), gpu->release(y_d), gpu->release(dx_d);
        gpu->release(arg_d);
        free(x), free(xr), free(dy), free(y), free(dx), free(arg);
    }
}

/* NaN passes relu, relu6 and max pooling on the device as on the CPU (test_cpu_ops): a diverged
 * network's NaN reaches the loss. */
static void test_nan_passes(void **state)
{
    (void)state;
    const float x[4] = {NAN, -1, 2, NAN};
    float y[4];
    float *x_d = to_dev(x, 4), *y_d = to_dev(NULL, 4);
    for (int capi = 0; capi < 2; capi++) {
        gpu->act_fwd(4, x_d, y_d, capi ? 6.0 : -1.0);
        assert_int_equal(gpu->sync(), KD_OK);
        from_dev(y, y_d, sizeof y);
        assert_true(isnan(y[0]) && isnan(y[3]) && y[1] == 0 && y[2] == 2);
    }
    const kd_pool_shape p = pool_shape(1, 1, 2, 2, 2, 2, 0);
    const float w[4] = {1, NAN, 2, 0};
    int32_t *arg_d = dev_bytes(NULL, 4);
    assert_int_equal(gpu->upload(x_d, w, sizeof w), KD_OK);
    gpu->maxpool_fwd(&p, x_d, y_d, arg_d);
    assert_int_equal(gpu->sync(), KD_OK);
    from_dev(y, y_d, sizeof(float));
    assert_true(isnan(y[0]));
    gpu->release(x_d), gpu->release(y_d), gpu->release(arg_d);
    /* cross-entropy over rows holding NaN (wider than a warp, the NaN in other lanes than the
     * maximum): NaN loss, and the prediction the CPU makes (NaN never wins, a NaN first logit
     * keeps class 0), so that both count the same hits */
    enum { N = 4, C = 40 };
    float z[N * C];
    int32_t lab[N] = {0, 24, 0, 33};
    for (int i = 0; i < N * C; i++)
        z[i] = (float)(i % 7) * 0.1f;
    z[0] = NAN;                    /* row 0: class 0 */
    z[C + 8] = NAN, z[C + 24] = 5; /* row 1: 24, past the NaN's lane */
    for (int j = 0; j < C; j++)    /* row 2: every logit NaN: class 0 */
        z[2 * C + j] = NAN;
    z[3 * C + 5] = NAN, z[3 * C + 33] = 9; /* row 3: 33 */
    float *z_d = to_dev(z, N * C);
    int32_t *lab_d = dev_bytes(lab, sizeof lab);
    int64_t hits = -1, hits_d = -1;
    const double want = cpu->ce(N, C, z, lab, 0.0, NULL, 1.0, &hits, NULL);
    const double got = gpu->ce(N, C, z_d, lab_d, 0.0, NULL, 1.0, &hits_d, NULL);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(isnan(want) && isnan(got));
    assert_int_equal(hits, 4);
    assert_int_equal(hits_d, hits);
    gpu->release(z_d), gpu->release(lab_d);
}

static void test_gap(void **state)
{
    (void)state;
    const int cases[][3] = {{2, 3, 49}, {1, 5, 1}, {4, 7, 16}, {3, 64, 1000}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int n = cases[ci][0], c = cases[ci][1], hw = cases[ci][2];
        char what[64];
        snprintf(what, sizeof what, "gap n %d c %d hw %d", n, c, hw);
        const size_t nx = (size_t)n * c * hw, ny = (size_t)n * c;
        float *x = host_rand(nx, 700 + ci), *dy = host_rand(ny, 800 + ci);
        float *y = calloc(ny, 4), *dx = calloc(nx, 4);
        assert_true(y && dx);
        float *x_d = to_dev(x, nx), *dy_d = to_dev(dy, ny), *y_d = to_dev(NULL, ny);
        float *dx_d = to_dev(NULL, nx);
        cpu->gap_fwd(n, c, hw, x, y);
        gpu->gap_fwd(n, c, hw, x_d, y_d);
        cpu->gap_bwd(n, c, hw, dy, dx);
        gpu->gap_bwd(n, c, hw, dy_d, dx_d);
        assert_int_equal(gpu->sync(), KD_OK);
        /* forward: a warp-tree float sum against the CPU's sequential one. The sequential
           sum of hw N(0, 1) terms is off by ~eps * hw absolute while it is ~sqrt(hw) in size:
           ~2e-6 relative at hw = 1000. 1e-5; a wrong plane or divisor is O(1). */
        check_rel(what, "y", y_d, y, ny, 1e-5);
        check_same(what, "dx", dx_d, dx, nx * 4);
        gpu->release(x_d), gpu->release(dy_d), gpu->release(y_d), gpu->release(dx_d);
        free(x), free(dy), free(y), free(dx);
    }
}

/* the mask comes from the same stateless hash of (seed, index): identical, bit for bit */
static void test_dropout(void **state)
{
    (void)state;
    const size_t n = 100003;
    float *x = host_rand(n, 9), *y = calloc(n, 4), *mask = calloc(n, 4);
    assert_true(y && mask);
    float *x_d = to_dev(x, n), *y_d = to_dev(NULL, n), *m_d = to_dev(NULL, n);
    uint64_t *s_d = NULL; /* the seed, read from device memory */
    assert_int_equal(gpu->alloc((void **)&s_d, sizeof *s_d), KD_OK);
    const double ps[] = {0.1, 0.5, 0.9, 0.0};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) {
        const uint64_t seed = kd_mix64(42, i, 7);
        char what[64];
        snprintf(what, sizeof what, "dropout p %g", ps[i]);
        cpu->dropout_fwd(n, x, y, mask, ps[i], &seed);
        assert_int_equal(gpu->upload(s_d, &seed, sizeof seed), KD_OK);
        gpu->dropout_fwd(n, x_d, y_d, m_d, ps[i], s_d);
        assert_int_equal(gpu->sync(), KD_OK);
        check_same(what, "mask", m_d, mask, n * 4);
        check_same(what, "y", y_d, y, n * 4);
    }
    gpu->release(x_d), gpu->release(y_d), gpu->release(m_d), gpu->release(s_d);
    free(x), free(y), free(mask);
}

/*
 * Batch assembly from a resident set: the CUDA gather_augment against the CPU's
 * (kd_augment_gather) bit for bit, on parameters that cover every branch of the shift: zero
 * (the CPU's plain copy), small shifts both ways with and without the flip, halves (round to
 * even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2), shifts at and past the image size, NaN, infinities.
 */
static void test_gather_augment(void **state)
{
    (void)state;
    enum { NSET = 37, B = 29, C = 2, H = 7, W = 9 };
    const size_t per = (size_t)C * H * W;
    float *x_all = host_rand(NSET * per, 31), prm[B * 3];
    int32_t y_all[NSET], y[B];
    uint32_t idx[B];
    const float vals[] = {0.0f, 1.0f,  -2.0f, 0.5f,    1.5f, -2.5f,    3.4f,      -3.6f, 7.0f,
                          9.0f, -9.0f, 12.0f, -100.0f, NAN,  INFINITY, -INFINITY, 8.5f,  -6.5f};
    const int nv = (int)(sizeof vals / sizeof vals[0]);
    for (int i = 0; i < NSET; i++)
        y_all[i] = 1000 + i;
    for (int i = 0; i < B; i++) {
        idx[i] = (uint32_t)((i * 11 + 3) % NSET);
        prm[3 * i] = i < 2 ? 0.0f : vals[(i * 5) % nv];
        prm[3 * i + 1] = i < 2 ? 0.0f : vals[(i * 7 + 1) % nv];
        prm[3 * i + 2] = i == 0 ? 0.0f : (float)(i % 3 == 1);
    }
    float *x = malloc(B * per * sizeof(float));
    assert_non_null(x);
    const float fill = -0.42f;
    cpu->gather_augment(B, C, H, W, x_all, y_all, idx, prm, fill, x, y);
    float *xa_d = to_dev(x_all, NSET * per), *p_d = to_dev(prm, B * 3),
          *x_d = to_dev(NULL, B * per);
    int32_t *ya_d = dev_bytes(y_all, sizeof y_all), *y_d = dev_bytes(NULL, sizeof y);
    uint32_t *i_d = dev_bytes(idx, sizeof idx);
    gpu->gather_augment(B, C, H, W, xa_d, ya_d, i_d, p_d, fill, x_d, y_d);
    assert_int_equal(gpu->sync(), KD_OK);
    check_same("gather_augment", "x", x_d, x, B * per * sizeof(float));
    check_same("gather_augment", "y", y_d, y, sizeof y);
    gpu->release(xa_d), gpu->release(p_d), gpu->release(x_d);
    gpu->release(ya_d), gpu->release(y_d), gpu->release(i_d);
    free(x_all), free(x);
}

/* ---- losses ---- */

static void test_ce(void **state)
{
    (void)state;
    const struct {
        int n, c;
        double smoothing, scale;
        int ties, grad;
    } cases[] = {
        {67, 10, 0.0, 1.0, 0, 1}, {1, 1000, 0.1, 0.5, 0, 1}, {33, 7, 0.2, 2.0, 1, 1},
        {256, 3, 0.0, 1.0, 1, 0}, {5, 1, 0.0, 1.0, 0, 1},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int n = cases[ci].n, c = cases[ci].c;
        char what[96];
        snprintf(what, sizeof what, "ce n %d c %d smoothing %g", n, c, cases[ci].smoothing);
        const size_t nz = (size_t)n * c;
        float *z = host_rand(nz, 900 + ci), *d = calloc(nz, 4);
        int32_t *lab = malloc((size_t)n * 4);
        assert_true(d && lab);
        for (size_t i = 0; i < nz; i++) {
            z[i] *= 3.0f;
            if (cases[ci].ties) /* repeated maxima: the first one is the prediction */
                z[i] = roundf(z[i] * 0.5f);
        }
        kd_rng r;
        kd_rng_seed(&r, 77 + ci, 3);
        for (int i = 0; i < n; i++)
            lab[i] = (int32_t)kd_rng_below(&r, (uint32_t)c);
        float *z_d = to_dev(z, nz), *d_d = to_dev(NULL, nz);
        int32_t *lab_d = dev_bytes(lab, (size_t)n * 4);
        int64_t hits = -1, hits_d = -1;
        const int grad = cases[ci].grad;
        double want = cpu->ce(n, c, z, lab, cases[ci].smoothing, grad ? d : NULL, cases[ci].scale,
                              &hits, NULL);
        double got = gpu->ce(n, c, z_d, lab_d, cases[ci].smoothing, grad ? d_d : NULL,
                             cases[ci].scale, &hits_d, NULL);
        assert_int_equal(gpu->sync(), KD_OK);
        /* both sides compute in double from the same floats; only the summation order of
           the log-sum-exp and of the rows differs (~1e-15 relative) */
        if (!(fabs(got - want) <= 1e-9 * fmax(1.0, fabs(want))))
            fail_msg("%s: loss %.17g, CPU %.17g", what, got, want);
        assert_int_equal(hits_d, hits);
        /* the gradient is double until its final rounding to float: at most an ulp apart */
        if (grad)
            check_rel(what, "dlogits", d_d, d, nz, 1e-6);
        /* the trainer's form: twice into a device accumulator that already holds something,
         * nothing returned, then one read-back */
        const double acc0[2] = {1.25, 3.0};
        double acc[2], *acc_d = dev_bytes(acc0, sizeof acc0);
        int64_t untouched = -7;
        for (int rep = 0; rep < 2; rep++)
            assert_true(gpu->ce(n, c, z_d, lab_d, cases[ci].smoothing, NULL, 1.0, &untouched,
                                acc_d) == 0.0);
        assert_int_equal(untouched, -7);
        from_dev(acc, acc_d, sizeof acc);
        if (!(fabs(acc[0] - (1.25 + 2 * want)) <= 1e-9 * fmax(1.0, fabs(want))) ||
            acc[1] != 3.0 + 2.0 * (double)hits)
            fail_msg("%s: accumulated %.17g, %.17g; want %.17g, %.17g", what, acc[0], acc[1],
                     1.25 + 2 * want, 3.0 + 2.0 * (double)hits);
        gpu->release(acc_d);
        gpu->release(z_d), gpu->release(d_d), gpu->release(lab_d);
        free(z), free(d), free(lab);
    }
}

/* the teacher's top-k of each row (classes by decreasing logit) and its full log-sum-exp */
static void topk_targets(int n, int c, int k, const float *t, float *tv, int32_t *ti, float *lse)
{
    char *taken = malloc((size_t)c);
    assert_non_null(taken);
    for (int i = 0; i < n; i++) {
        const float *row = t + (size_t)i * c;
        memset(taken, 0, (size_t)c);
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int q = 0; q < c; q++)
                if (!taken[q] && (best < 0 || row[q] > row[best]))
                    best = q;
            taken[best] = 1;
            tv[(size_t)i * k + j] = row[best];
            ti[(size_t)i * k + j] = best;
        }
        double m = row[0], s = 0;
        for (int q = 1; q < c; q++)
            m = row[q] > m ? row[q] : m;
        for (int q = 0; q < c; q++)
            s += exp((double)row[q] - m);
        lse[i] = (float)(m + log(s));
    }
    free(taken);
}

static void run_topk(int n, int c, int k, double temp, int reverse, int t2, uint64_t seed)
{
    char what[96];
    snprintf(what, sizeof what, "kd_topk n %d c %d k %d T %g reverse %d t2 %d", n, c, k, temp,
             reverse, t2);
    const size_t nc = (size_t)n * c, nk = (size_t)n * k;
    float *s = host_rand(nc, seed), *t = host_rand(nc, seed + 1);
    float *tv = malloc(nk * 4), *lse = malloc((size_t)n * 4), *g = calloc(nc, 4);
    int32_t *ti = malloc(nk * 4);
    assert_true(tv && lse && g && ti);
    for (size_t i = 0; i < nc; i++)
        s[i] *= 2.0f, t[i] *= 3.0f;
    topk_targets(n, c, k, t, tv, ti, lse);
    const double scale = 0.7;
    double want = cpu->kd_topk(n, c, k, s, tv, ti, lse, temp, reverse, t2, g, scale, NULL);
    float *s_d = to_dev(s, nc), *tv_d = to_dev(tv, nk), *lse_d = to_dev(lse, n);
    float *g_d = to_dev(NULL, nc);
    int32_t *ti_d = dev_bytes(ti, nk * 4);
    double got = gpu->kd_topk(n, c, k, s_d, tv_d, ti_d, lse_d, temp, reverse, t2, g_d, scale, NULL);
    assert_int_equal(gpu->sync(), KD_OK);
    /*
     * The CPU takes its exponentials with a float polynomial (< 2e-7 relative) in 256-class
     * chunks, the GPU with expf per thread; the bucket sums are double on both sides. Loss and
     * gradient agree to a few 1e-7 relative on these ordinary logits; 2e-5 (loss, with a floor
     * at 1e-2 of the loss scale for nearly matched rows) and 5e-5 of the largest gradient
     * entry are the bounds test_softmax_kl_cuda uses for the dense kernel.
     */
    const double coef = t2 ? temp * temp : 1;
    if (!(fabs(got - want) <= 2e-5 * fmax(fabs(want), coef * n * 1e-2)))
        fail_msg("%s: loss %.9g, CPU %.9g", what, got, want);
    float *gd = malloc(nc * 4);
    assert_non_null(gd);
    from_dev(gd, g_d, nc * 4);
    double e = 0, m = 0;
    for (size_t i = 0; i < nc; i++) {
        m = fmax(m, fabs(g[i]));
        e = fmax(e, fabs((double)gd[i] - g[i]));
    }
    if (!(e <= 5e-5 * m))
        fail_msg("%s: gradient error %.3g of max %.3g", what, e, m);
    gpu->release(s_d), gpu->release(tv_d), gpu->release(lse_d), gpu->release(g_d);
    gpu->release(ti_d);
    free(s), free(t), free(tv), free(lse), free(g), free(ti), free(gd);
}

static void test_kd_topk(void **state)
{
    (void)state;
    const int cases[][3] = {{16, 100, 5}, {3, 1000, 50}, {8, 10, 10}, {5, 37, 1}, {1, 4096, 700}};
    const double temps[] = {1.0, 4.0, 0.5};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int rev = 0; rev < 2; rev++)
            for (int ti = 0; ti < 3; ti++)
                run_topk(cases[ci][0], cases[ci][1], cases[ci][2], temps[ti], rev, ti != 2,
                         1000 + 10 * ci);
}

/* decoupled KD: the GPU's losses and gradients against the CPU op, returned and accumulated */
static void test_kd_dkd(void **state)
{
    (void)state;
    const int shapes[][2] = {{128, 10}, {7, 1000}, {33, 2}};
    kd_rng r;
    kd_rng_seed(&r, 404, 1);
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        const int n = shapes[k][0], c = shapes[k][1];
        const size_t nc = (size_t)n * c;
        float *s = host_rand(nc, 50 + k), *t = host_rand(nc, 60 + k), *g = malloc(nc * 4);
        int32_t *y = malloc((size_t)n * 4);
        for (int i = 0; i < n; i++)
            y[i] = (int32_t)kd_rng_below(&r, (uint32_t)c);
        for (size_t i = 0; i < nc; i++)
            s[i] *= 3, t[i] *= 5; /* a confident teacher */
        float *s_d = to_dev(s, nc), *t_d = to_dev(t, nc), *g_d = to_dev(NULL, nc);
        int32_t *y_d = dev_bytes(y, (size_t)n * 4);
        double *acc_d = dev_bytes(NULL, sizeof(double));
        const double temps[] = {1.0, 4.0};
        for (int ti = 0; ti < 2; ti++) {
            double want = cpu->kd_dkd(n, c, s, t, y, temps[ti], 1.0, 8.0, 1, g, 0.7, NULL);
            double got = gpu->kd_dkd(n, c, s_d, t_d, y_d, temps[ti], 1.0, 8.0, 1, g_d, 0.7, NULL);
            assert_int_equal(gpu->sync(), KD_OK);
            if (!(fabs(got - want) <= 1e-5 * fmax(1.0, fabs(want))))
                fail_msg("dkd %dx%d T=%g: gpu %.9g cpu %.9g", n, c, temps[ti], got, want);
            check_rel("dkd", "ds", g_d, g, nc, 1e-5);
            assert_int_equal(gpu->zero(acc_d, sizeof(double)), KD_OK);
            assert_true(
                gpu->kd_dkd(n, c, s_d, t_d, y_d, temps[ti], 1.0, 8.0, 1, NULL, 1.0, acc_d) == 0.0);
            double acc = 0;
            from_dev(&acc, acc_d, sizeof acc);
            if (!(fabs(acc - want) <= 1e-5 * fmax(1.0, fabs(want))))
                fail_msg("dkd accumulated %.9g, cpu %.9g", acc, want);
        }
        gpu->release(s_d), gpu->release(t_d), gpu->release(g_d), gpu->release(y_d);
        gpu->release(acc_d);
        free(s), free(t), free(g), free(y);
    }
}

/* a repeated cached class makes its row NaN with a zero gradient; the other rows are normal */
static void test_kd_topk_bad_rows(void **state)
{
    (void)state;
    const int n = 2, c = 6, k = 2;
    float s[12] = {0.5f, 1, -1, 2, 0, 0.25f, 1, 2, 3, 4, 5, 6};
    float tv[4] = {3, 2, 5, 4}, lse[2] = {3.5f, 6.0f};
    int32_t ti[4] = {3, 1, 2, 2}; /* row 1 repeats class 2 */
    float g[12];
    double want = cpu->kd_topk(n, c, k, s, tv, ti, lse, 2.0, 0, 1, g, 1.0, NULL);
    assert_true(isnan(want));
    float *s_d = to_dev(s, 12), *tv_d = to_dev(tv, 4), *lse_d = to_dev(lse, 2);
    float *g_d = to_dev(NULL, 12);
    int32_t *ti_d = dev_bytes(ti, sizeof ti);
    double got = gpu->kd_topk(n, c, k, s_d, tv_d, ti_d, lse_d, 2.0, 0, 1, g_d, 1.0, NULL);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_true(isnan(got));
    float gd[12];
    from_dev(gd, g_d, sizeof gd);
    for (int j = 0; j < 12; j++)
        if (!(fabs(gd[j] - g[j]) <= 1e-6))
            fail_msg("class %d: %g, CPU %g", j, gd[j], g[j]);
    gpu->release(s_d), gpu->release(tv_d), gpu->release(lse_d), gpu->release(g_d);
    gpu->release(ti_d);
}

/* ---- optimizer ---- */

/*
 * Three steps of each optimizer through the optim_step slot against the CPU backend's
 * (kd_clip_grad_norm + kd_optim_step on the host). The kernels use optim.c's operation order with
 * explicitly rounded float operations, so on x86-64 (no fma in the host build) they agree bit for
 * bit; the bound 1e-6 of the largest |value| admits a host compiler that contracts to fma
 * (aarch64), an ulp or two per step. The clipped gradient carries the norm's double
 * summation order (1e-15 relative) through a float rounding: the same bound.
 */
static void max_err(const char *what, const char *tag, const float *dev, const float *ref, size_t n)
{
    float *h = malloc(n * 4);
    assert_non_null(h);
    from_dev(h, dev, n * 4);
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        e = fmax(e, fabs((double)h[i] - ref[i]));
        m = fmax(m, fabs(ref[i]));
    }
    free(h);
    if (!(e <= 1e-6 * fmax(m, 1e-30)))
        fail_msg("%s: %s max error %.3g of max %.3g", what, tag, e, m);
}

static void run_optim(const kd_optim_cfg *cfg, const char *name, size_t n, int use_mask,
                      uint64_t seed)
{
    char what[128];
    snprintf(what, sizeof what, "%s n %zu mask %d clip %g wd %g", name, n, use_mask, cfg->clip_norm,
             cfg->weight_decay);
    const size_t ns = kd_optim_state_floats(cfg, n);
    float *p = host_rand(n, seed), *st = calloc(ns ? ns : 1, 4);
    uint8_t *mask = malloc(n);
    assert_true(st && mask);
    for (size_t i = 0; i < n; i++)
        mask[i] = (uint8_t)(kd_mix64(seed, i, 1) & 1);
    float *p_d = to_dev(p, n), *g_d = to_dev(NULL, n), *st_d = to_dev(st, ns ? ns : 1);
    uint8_t *mask_d = use_mask ? dev_bytes(mask, n) : NULL;
    for (int step = 1; step <= 3; step++) {
        float *g = host_rand(n, seed + 10 * step);
        assert_int_equal(gpu->upload(g_d, g, n * 4), KD_OK);
        const double lr = 0.05 / step;
        /* the reference: the CPU backend's slot (clip + kd_optim_step on host memory) */
        assert_int_equal(
            cpu->optim_step(cfg, p, g, ns ? st : NULL, use_mask ? mask : NULL, n, lr, step), KD_OK);
        assert_int_equal(gpu->optim_step(cfg, p_d, g_d, ns ? st_d : NULL, mask_d, n, lr, step),
                         KD_OK);
        assert_int_equal(gpu->sync(), KD_OK);
        max_err(what, "clipped gradient", g_d, g, n);
        max_err(what, "params", p_d, p, n);
        if (ns)
            max_err(what, "state", st_d, st, ns);
        free(g);
    }
    gpu->release(p_d), gpu->release(g_d), gpu->release(st_d);
    if (mask_d)
        gpu->release(mask_d);
    free(p), free(st), free(mask);
}

static void test_optim_step(void **state)
{
    (void)state;
    /* 4099: float4 body plus a tail (and AdamW's v = state + n is then unaligned: the scalar
       path); 4096: every buffer on the float4 path */
    const size_t sizes[] = {4099, 4096, 1};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const size_t n = sizes[si];
        for (int variant = 0; variant < 4; variant++) {
            kd_optim_cfg c = kd_optim_cfg_default(variant == 3 ? KD_OPTIM_ADAMW : KD_OPTIM_SGD);
            const char *name = variant == 0   ? "sgd"
                               : variant == 1 ? "sgd momentum"
                               : variant == 2 ? "sgd nesterov"
                                              : "adamw";
            if (variant == 0)
                c.momentum = 0;
            if (variant == 2)
                c.nesterov = 1;
            for (int opt = 0; opt < 3; opt++) {
                c.weight_decay = opt >= 1 ? 0.01 : 0.0;
                c.clip_norm = opt == 2 ? 1.0 : 0.0; /* far below the norm: always clips */
                run_optim(&c, name, n, opt >= 1, 2000 + 100 * si + 10 * variant + opt);
            }
        }
    }
    /* kd_optim_step's argument checks */
    float *p_d = to_dev(NULL, 8);
    kd_optim_cfg bad = kd_optim_cfg_default(KD_OPTIM_SGD);
    bad.lr = -1;
    assert_int_equal(gpu->optim_step(&bad, p_d, p_d, p_d, NULL, 8, 0.1, 1), KD_ERR_CONFIG);
    kd_optim_cfg adam = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    assert_int_equal(gpu->optim_step(&adam, p_d, p_d, p_d, NULL, 8, 0.1, 0), KD_ERR_INVALID);
    assert_int_equal(gpu->optim_step(&adam, p_d, p_d, NULL, NULL, 8, 0.1, 1), KD_ERR_INVALID);
    assert_int_equal(gpu->sync(), KD_OK);
    gpu->release(p_d);
}

#ifdef KD_HAVE_CUDA
/* the device norm against kd_grad_global_norm: double sums in other orders, 1e-12 */
static void test_grad_norm(void **state)
{
    (void)state;
    const size_t sizes[] = {1, 1001, 1 << 20};
    double *scratch = dev_bytes(NULL, sizeof(double) * KD_CUDA_NORM_SCRATCH);
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const size_t n = sizes[si];
        float *g = host_rand(n, 3000 + si);
        float *g_d = to_dev(g, n);
        assert_int_equal(kd_cuda_grad_norm(kd_backend_cuda_stream(), g_d, n, scratch), KD_OK);
        double got = 0;
        from_dev(&got, scratch + KD_CUDA_NORM_PARTS, sizeof got);
        double want = kd_grad_global_norm(g, n);
        if (!(fabs(got - want) <= 1e-12 * want))
            fail_msg("n %zu: norm %.17g, CPU %.17g", n, got, want);
        gpu->release(g_d);
        free(g);
    }
    gpu->release(scratch);
}
#endif

static void test_no_missing_slots(void **state)
{
    (void)state;
    /* every operation a model can ask for is implemented */
    const char *all = "linear_fwd,linear_bwd,conv2d_ws,conv2d_fwd,conv2d_bwd,bn_fwd_train,"
                      "bn_fwd_eval,bn_bwd,act_fwd,act_bwd,maxpool_fwd,maxpool_bwd,avgpool_fwd,"
                      "avgpool_bwd,gap_fwd,gap_bwd,dropout_fwd,mul,add,copy,round_bf16,ce,kd_dense,"
                      "kd_topk,kd_dkd,gather_augment,gather_rows,optim_step";
    const char *miss = kd_backend_missing(gpu, all);
    if (miss)
        fail_msg("the CUDA backend lacks %s", miss);
    assert_null(kd_backend_missing(cpu, all));
}

int main(void)
{
    const char *why = NULL;
    cpu = kd_backend_cpu();
    gpu = kd_backend_cuda(&why);
    if (!gpu) {
        printf("SKIP: %s\n", why);
        return 77;
    }
    printf("%s\n", why);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_conv2d),
        cmocka_unit_test(test_batchnorm),
        cmocka_unit_test(test_pooling),
        cmocka_unit_test(test_nan_passes),
        cmocka_unit_test(test_gap),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_gather_augment),
        cmocka_unit_test(test_ce),
        cmocka_unit_test(test_kd_topk),
        cmocka_unit_test(test_kd_topk_bad_rows),
        cmocka_unit_test(test_kd_dkd),
        cmocka_unit_test(test_optim_step),
#ifdef KD_HAVE_CUDA
        cmocka_unit_test(test_grad_norm),
#endif
        cmocka_unit_test(test_no_missing_slots),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
