/*
 * test_cpu_ops.c - finite-difference gradient checks of every CPU operation,
 * run on the double instantiation of the very same source (cpu_ops_body.h).
 *
 * For an op y = f(x, params) and a fixed random r, L = sum(r * y); the
 * analytic backward with dy = r must match central differences of L for
 * every input and parameter element to 1e-6 relative. Besides, the float
 * depthwise paths are held to the bytes of the direct loops' sums.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "kd_test.h"
#include "rng.h"

typedef double (*loss_fn)(void *ctx);

static double *rnd(kd_rng *r, size_t n, double scale)
{
    double *p = malloc(n * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = scale * (2.0 * kd_rng_uniform(r) - 1.0);
    return p;
}

static double dot(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Compare analytic gradient g of L w.r.t. v (n elements) with central differences. */
static void check_grad(const char *what, loss_fn f, void *ctx, double *v, const double *g, size_t n)
{
    const double h = 1e-6;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double keep = v[i];
        v[i] = keep + h;
        double lp = f(ctx);
        v[i] = keep - h;
        double lm = f(ctx);
        v[i] = keep;
        double num = (lp - lm) / (2 * h);
        double err = fabs(num - g[i]) / fmax(1.0, fabs(num) + fabs(g[i]));
        if (err > worst)
            worst = err;
        if (err > 1e-6)
            fail_msg("%s[%zu]: analytic %.10g, numeric %.10g (rel err %.3g)", what, i, g[i], num,
                     err);
    }
    (void)worst;
}

/* ---- linear ---- */
typedef struct {
    int n, in, out;
    double *x, *w, *b, *r, *y;
} lin_ctx;

static double lin_loss(void *p)
{
    lin_ctx *c = p;
    kd_cpu_linear_fwd_f64(c->n, c->in, c->out, c->x, c->w, c->b, c->y);
    return dot(c->y, c->r, (size_t)c->n * c->out);
}

static void test_linear(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 1, 1);
    lin_ctx c = {.n = 5, .in = 7, .out = 3};
    c.x = rnd(&r, 35, 1), c.w = rnd(&r, 21, 1), c.b = rnd(&r, 3, 1), c.r = rnd(&r, 15, 1);
    c.y = calloc(15, sizeof(double));
    double *dx = calloc(35, sizeof(double)), *dw = calloc(21, sizeof(double)),
           *db = calloc(3, sizeof(double));
    kd_cpu_linear_bwd_f64(c.n, c.in, c.out, c.x, c.w, c.r, dx, dw, db);
    check_grad("linear dx", lin_loss, &c, c.x, dx, 35);
    check_grad("linear dw", lin_loss, &c, c.w, dw, 21);
    check_grad("linear db", lin_loss, &c, c.b, db, 3);
    /* accumulation rule: a second backward adds to dw and db, overwrites dx */
    double dw0 = dw[4], dx0 = dx[2];
    kd_cpu_linear_bwd_f64(c.n, c.in, c.out, c.x, c.w, c.r, dx, dw, db);
    kd_assert_close(dw[4], 2 * dw0, 1e-12);
    kd_assert_close(dx[2], dx0, 1e-12);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(dx), free(dw), free(db);
}

/* ---- conv2d ---- */
typedef struct {
    kd_conv_shape s;
    double *x, *w, *b, *r, *y, *ws;
} conv_ctx;

static double conv_loss(void *p)
{
    conv_ctx *c = p;
    kd_cpu_conv2d_fwd_f64(&c->s, c->x, c->w, c->b, c->y, c->ws);
    return dot(c->y, c->r, (size_t)c->s.n * c->s.o * c->s.ho * c->s.wo);
}

static void run_conv(int n, int ci, int h, int w, int o, int k, int stride, int pad, int groups,
                     int chunk, int bias)
{
    kd_rng r;
    kd_rng_seed(&r, 7, (uint64_t)(n * 1000 + ci * 100 + groups * 10 + k));
    conv_ctx c;
    assert_true(kd_conv_shape_init(&c.s, n, ci, h, w, o, k, k, stride, pad, groups));
    if (chunk > 0)
        c.s.chunk = chunk;
    size_t nx = (size_t)n * ci * h * w, nw = (size_t)o * (ci / groups) * k * k;
    size_t ny = (size_t)n * o * c.s.ho * c.s.wo;
    c.x = rnd(&r, nx, 1), c.w = rnd(&r, nw, 1), c.b = bias ? rnd(&r, (size_t)o, 1) : NULL;
    c.r = rnd(&r, ny, 1);
    c.y = calloc(ny, sizeof(double));
    c.ws = calloc(kd_cpu_conv2d_ws_f64(&c.s) + 1, sizeof(double));
    double *dx = calloc(nx, sizeof(double)), *dw = calloc(nw, sizeof(double)),
           *db = calloc((size_t)o, sizeof(double));
    kd_cpu_conv2d_bwd_f64(&c.s, c.x, c.w, c.r, dx, dw, bias ? db : NULL, c.ws);
    check_grad("conv dx", conv_loss, &c, c.x, dx, nx);
    check_grad("conv dw", conv_loss, &c, c.w, dw, nw);
    if (bias)
        check_grad("conv db", conv_loss, &c, c.b, db, (size_t)o);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(c.ws), free(dx), free(dw), free(db);
}

static void test_conv_plain(void **state)
{
    (void)state;
    run_conv(2, 3, 6, 5, 4, 3, 1, 1, 1, 0, 1); /* all samples in one chunk */
    run_conv(3, 3, 6, 6, 4, 3, 2, 1, 1, 1, 1); /* one sample per chunk, stride 2 */
    run_conv(3, 2, 5, 5, 3, 3, 1, 0, 1, 2, 0); /* partial last chunk, no padding, no bias */
}

static void test_conv_groups(void **state)
{
    (void)state;
    run_conv(2, 4, 5, 5, 6, 3, 1, 1, 2, 0, 1); /* grouped */
    run_conv(2, 4, 6, 6, 4, 3, 1, 1, 4, 0, 1); /* depthwise */
    run_conv(2, 3, 7, 7, 6, 3, 2, 1, 3, 0, 1); /* depthwise, multiplier 2, stride 2 */
    run_conv(2, 3, 5, 4, 3, 5, 1, 2, 3, 0, 0); /* depthwise 5x5 */
}

static void test_conv_depthwise_large_plane(void **state)
{
    (void)state;
    /* planes too large for the padded-plane path take the direct loops: check both give the
     * same result by comparing with a plane small enough for the padded path, embedded in a
     * large one whose extra area is zero, and check the weight gradient by differences */
    kd_rng r;
    kd_rng_seed(&r, 21, 0);
    kd_conv_shape big, small;
    assert_true(kd_conv_shape_init(&big, 1, 2, 70, 70, 2, 3, 3, 1, 1, 2));
    assert_true(kd_conv_shape_init(&small, 1, 2, 6, 70, 2, 3, 3, 1, 1, 2));
    conv_ctx c = {.s = big};
    size_t nx = 2 * 70 * 70, ny = 2 * 70 * 70;
    c.x = calloc(nx, 8), c.w = rnd(&r, 18, 1), c.b = rnd(&r, 2, 1), c.r = rnd(&r, ny, 1);
    c.y = calloc(ny, 8), c.ws = calloc(kd_cpu_conv2d_ws_f64(&big) + 1, 8);
    double *xs = rnd(&r, 2 * 6 * 70, 1), *ys = calloc(2 * 6 * 70, 8);
    for (int ch = 0; ch < 2; ch++)
        memcpy(c.x + (size_t)ch * 4900, xs + (size_t)ch * 420, 420 * sizeof(double));
    kd_cpu_conv2d_fwd_f64(&c.s, c.x, c.w, c.b, c.y, c.ws);
    kd_cpu_conv2d_fwd_f64(&small, xs, c.w, c.b, ys, c.ws);
    /* rows 0..4 of each output plane see only the embedded rows (row 5 sees row 6 = 0) */
    for (int ch = 0; ch < 2; ch++)
        for (int i = 0; i < 5 * 70; i++)
            kd_assert_close(c.y[(size_t)ch * 4900 + i], ys[(size_t)ch * 420 + i], 1e-12);
    double dw[18] = {0}, db[2] = {0};
    double *dx = calloc(nx, 8);
    kd_cpu_conv2d_bwd_f64(&c.s, c.x, c.w, c.r, dx, dw, db, c.ws);
    check_grad("large depthwise dw", conv_loss, &c, c.w, dw, 18);
    check_grad("large depthwise db", conv_loss, &c, c.b, db, 2);
    /* dx on a few elements (the full plane would be slow to difference) */
    check_grad("large depthwise dx", conv_loss, &c, c.x + 4900 + 3000, dx + 4900 + 3000, 40);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(c.ws), free(xs), free(ys), free(dx);
}

/* Depthwise, float: the phase-split path (the forward pass, and at stride >= 2 the input gradient)
 * gives the bytes of the direct loops (the trained checkpoints do not change with the path). The
 * reference adds in their order: an output is the bias plus its taps, kernel row by row, skipping
 * padding; an input gradient is zero plus its terms by output row, kernel row and kernel column. */
static void dw_exact_case(int n, int c, int h, int w, int mult, int k, int stride, int pad)
{
    kd_rng r;
    kd_rng_seed(&r, 11, (uint64_t)(h * 100 + w * 10 + stride));
    kd_conv_shape s;
    const int o = c * mult;
    assert_true(kd_conv_shape_init(&s, n, c, h, w, o, k, k, stride, pad, c));
    const size_t nx = (size_t)n * c * h * w, nw = (size_t)o * k * k,
                 ny = (size_t)n * o * s.ho * s.wo;
    float *x = malloc(nx * 4), *wt = malloc(nw * 4), *b = malloc((size_t)o * 4),
          *g = malloc(ny * 4), *y = malloc(ny * 4), *yr = malloc(ny * 4), *dx = malloc(nx * 4),
          *dxr = calloc(nx, 4), *dw = calloc(nw, 4), *db = calloc((size_t)o, 4);
    assert_true(x && wt && b && g && y && yr && dx && dxr && dw && db);
    for (size_t i = 0; i < nx; i++)
        x[i] = (float)(2 * kd_rng_uniform(&r) - 1);
    for (size_t i = 0; i < nw; i++)
        wt[i] = (float)(2 * kd_rng_uniform(&r) - 1);
    for (int i = 0; i < o; i++)
        b[i] = (float)(2 * kd_rng_uniform(&r) - 1);
    for (size_t i = 0; i < ny; i++)
        g[i] = (float)(2 * kd_rng_uniform(&r) - 1);
    kd_cpu_conv2d_fwd_f32(&s, x, wt, b, y, NULL);
    kd_cpu_conv2d_bwd_f32(&s, x, wt, g, dx, dw, db, NULL);
    for (int ni = 0; ni < n; ni++)
        for (int oc = 0; oc < o; oc++) {
            const float *plane = x + ((size_t)ni * c + oc / mult) * h * w,
                        *kk = wt + (size_t)oc * k * k;
            const float *gp = g + ((size_t)ni * o + oc) * s.ho * s.wo;
            float *dplane = dxr + ((size_t)ni * c + oc / mult) * h * w;
            for (int oy = 0; oy < s.ho; oy++)
                for (int ox = 0; ox < s.wo; ox++) {
                    float acc = b[oc];
                    for (int ky = 0; ky < k; ky++)
                        for (int kx = 0; kx < k; kx++) {
                            const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
                            if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                                acc += kk[ky * k + kx] * plane[iy * w + ix];
                        }
                    yr[((size_t)ni * o + oc) * s.ho * s.wo + (size_t)oy * s.wo + ox] = acc;
                }
            for (int oy = 0; oy < s.ho; oy++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++)
                        for (int ox = 0; ox < s.wo; ox++) {
                            const int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
                            if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                                dplane[iy * w + ix] += kk[ky * k + kx] * gp[oy * s.wo + ox];
                        }
        }
    /* at stride 1 the input gradient takes the padded loops, which add in another order */
    if (memcmp(y, yr, ny * 4) || (stride > 1 && memcmp(dx, dxr, nx * 4)))
        fail_msg("depthwise %dx%d k%d stride %d pad %d mult %d: %s differs from the direct sum", h,
                 w, k, stride, pad, mult, memcmp(y, yr, ny * 4) ? "y" : "dx");
    free(x), free(wt), free(b), free(g), free(y), free(yr), free(dx), free(dxr), free(dw), free(db);
}

static void test_dw_strided_exact(void **state)
{
    (void)state;
    dw_exact_case(3, 5, 14, 14, 1, 3, 2, 1); /* the tiny student's stride-2 layer, smaller */
    dw_exact_case(2, 3, 13, 9, 2, 3, 2, 1);  /* odd sizes, multiplier 2 */
    dw_exact_case(2, 2, 11, 12, 1, 5, 2, 2); /* 5x5 */
    dw_exact_case(2, 2, 10, 7, 1, 3, 3, 0);  /* stride 3, no padding */
    dw_exact_case(1, 2, 9, 9, 1, 4, 2, 3);   /* padding past the kernel's reach */
    dw_exact_case(1, 2, 3, 2, 1, 3, 3, 1);   /* phases holding no pixel */
    dw_exact_case(2, 3, 14, 14, 1, 3, 1, 1); /* stride 1: the forward pass */
}

static void test_conv_1x1(void **state)
{
    (void)state;
    run_conv(2, 5, 4, 4, 3, 1, 1, 0, 1, 1, 1); /* direct path, one sample per chunk */
    run_conv(3, 5, 4, 4, 3, 1, 1, 0, 1, 2, 1); /* direct path with chunks */
    run_conv(2, 4, 5, 5, 2, 1, 2, 0, 1, 0, 1); /* strided 1x1 goes through im2col */
}

static void test_conv_matches_direct_sum(void **state)
{
    (void)state;
    /* forward value against a naive six-loop convolution */
    kd_rng r;
    kd_rng_seed(&r, 3, 3);
    kd_conv_shape s;
    assert_true(kd_conv_shape_init(&s, 2, 4, 7, 6, 6, 3, 3, 2, 1, 2));
    size_t nx = 2 * 4 * 7 * 6, nw = 6 * 2 * 9, ny = (size_t)2 * 6 * s.ho * s.wo;
    double *x = rnd(&r, nx, 1), *w = rnd(&r, nw, 1), *b = rnd(&r, 6, 1), *y = calloc(ny, 8);
    double *ws = calloc(kd_cpu_conv2d_ws_f64(&s) + 1, 8);
    kd_cpu_conv2d_fwd_f64(&s, x, w, b, y, ws);
    for (int n = 0; n < 2; n++)
        for (int o = 0; o < 6; o++)
            for (int oy = 0; oy < s.ho; oy++)
                for (int ox = 0; ox < s.wo; ox++) {
                    int g = o / 3;
                    double acc = b[o];
                    for (int ci = 0; ci < 2; ci++)
                        for (int ky = 0; ky < 3; ky++)
                            for (int kx = 0; kx < 3; kx++) {
                                int iy = oy * 2 - 1 + ky, ix = ox * 2 - 1 + kx;
                                if (iy < 0 || iy >= 7 || ix < 0 || ix >= 6)
                                    continue;
                                acc += w[((o * 2 + ci) * 3 + ky) * 3 + kx] *
                                       x[((n * 4 + g * 2 + ci) * 7 + iy) * 6 + ix];
                            }
                    kd_assert_close(y[((n * 6 + o) * s.ho + oy) * s.wo + ox], acc, 1e-12);
                }
    free(x), free(w), free(b), free(y), free(ws);
}

/* ---- batch norm ---- */
typedef struct {
    int n, c, hw;
    double cap; /* fused activation: 0 none, -1 relu, 6 relu6 */
    double *x, *g, *b, *r, *y, *m, *is;
} bn_ctx;

static double bn_loss(void *p)
{
    bn_ctx *c = p;
    kd_cpu_bn_fwd_train_f64(c->n, c->c, c->hw, c->x, c->g, c->b, c->y, c->m, c->is, NULL, NULL, 0.1,
                            1e-5, c->cap);
    return dot(c->y, c->r, (size_t)c->n * c->c * c->hw);
}

static void run_bn(int n, int ch, int hw, double cap)
{
    kd_rng r;
    kd_rng_seed(&r, 11, (uint64_t)hw);
    size_t nx = (size_t)n * ch * hw;
    bn_ctx c = {.n = n, .c = ch, .hw = hw, .cap = cap};
    /* beta spread over [-3, 3] and gamma over [-4, 4] put values on both sides of 0 and 6 */
    c.x = rnd(&r, nx, 2), c.g = rnd(&r, (size_t)ch, 4), c.b = rnd(&r, (size_t)ch, 3);
    c.r = rnd(&r, nx, 1), c.y = calloc(nx, 8), c.m = calloc((size_t)ch, 8),
    c.is = calloc((size_t)ch, 8);
    double *dx = calloc(nx, 8), *dg = calloc((size_t)ch, 8), *dbt = calloc((size_t)ch, 8);
    bn_loss(&c);
    kd_cpu_bn_bwd_f64(n, ch, hw, c.x, c.r, c.g, c.m, c.is, c.y, cap, dx, dg, dbt);
    check_grad("bn dx", bn_loss, &c, c.x, dx, nx);
    check_grad("bn dgamma", bn_loss, &c, c.g, dg, (size_t)ch);
    check_grad("bn dbeta", bn_loss, &c, c.b, dbt, (size_t)ch);
    free(c.x), free(c.g), free(c.b), free(c.r), free(c.y), free(c.m), free(c.is), free(dx),
        free(dg), free(dbt);
}

static void test_batchnorm_grad(void **state)
{
    (void)state;
    run_bn(4, 3, 5, 0);  /* BatchNorm2d */
    run_bn(6, 4, 1, 0);  /* BatchNorm1d */
    run_bn(4, 3, 5, -1); /* fused with relu */
    run_bn(4, 3, 5, 6);  /* fused with relu6 */
}

static void test_batchnorm_stats(void **state)
{
    (void)state;
    /* running stats follow PyTorch: unbiased variance, momentum 0.1 */
    double x[4] = {1, 2, 3, 6}, g = 1, b = 0, y[4], m, is, rm = 0, rv = 1;
    kd_cpu_bn_fwd_train_f64(4, 1, 1, x, &g, &b, y, &m, &is, &rm, &rv, 0.1, 1e-5, 0);
    kd_assert_close(m, 3.0, 1e-12);
    kd_assert_close(is, 1.0 / sqrt(3.5 + 1e-5), 1e-12); /* biased var 14/4 */
    kd_assert_close(rm, 0.3, 1e-12);
    kd_assert_close(rv, 0.9 + 0.1 * 14.0 / 3.0, 1e-12); /* unbiased var 14/3 */
    double ye[4];
    kd_cpu_bn_fwd_eval_f64(4, 1, 1, x, &g, &b, &rm, &rv, ye, 1e-5, 0);
    kd_assert_close(ye[3], (6 - rm) / sqrt(rv + 1e-5), 1e-12);
    /* the fused activation clamps the same values */
    double yr[4];
    kd_cpu_bn_fwd_train_f64(4, 1, 1, x, &g, &b, yr, &m, &is, NULL, NULL, 0.1, 1e-5, -1);
    kd_assert_close(yr[0], 0.0, 0);
    kd_assert_close(yr[3], y[3], 1e-15);
    double big[4] = {0, 0, 0, 100}, y6[4];
    kd_cpu_bn_fwd_train_f64(4, 1, 1, big, &g, &b, y6, &m, &is, NULL, NULL, 0.1, 1e-5, 6);
    double g6 = 10, yc[4];
    kd_cpu_bn_fwd_train_f64(4, 1, 1, big, &g6, &b, yc, &m, &is, NULL, NULL, 0.1, 1e-5, 6);
    kd_assert_close(y6[3], 3.0 * 100 / sqrt(100 * 100 * 3.0 / 16 + 1e-5) / 4, 1e-9);
    kd_assert_close(yc[3], 6.0, 0);
    /* a mean far from zero does not cancel the variance */
    double off[4] = {1e6 + 1, 1e6 + 2, 1e6 + 3, 1e6 + 6}, yo[4];
    kd_cpu_bn_fwd_train_f64(4, 1, 1, off, &g, &b, yo, &m, &is, NULL, NULL, 0.1, 1e-5, 0);
    kd_assert_close(is, 1.0 / sqrt(3.5 + 1e-5), 1e-9);
}

/* ---- activations, pooling, elementwise ---- */
typedef struct {
    int kind; /* 0 act, 1 maxpool, 2 avgpool, 3 gap, 4 dropout */
    double cap;
    kd_pool_shape p;
    size_t nx, ny;
    double *x, *r, *y, *mask;
    int32_t *arg;
} un_ctx;

static double un_loss(void *p)
{
    un_ctx *c = p;
    switch (c->kind) {
    case 0: kd_cpu_act_fwd_f64(c->nx, c->x, c->y, c->cap); break;
    case 1: kd_cpu_maxpool_fwd_f64(&c->p, c->x, c->y, c->arg); break;
    case 2: kd_cpu_avgpool_fwd_f64(&c->p, c->x, c->y); break;
    case 3: kd_cpu_gap_fwd_f64(c->p.n, c->p.c, c->p.h * c->p.w, c->x, c->y); break;
    case 4: kd_cpu_dropout_fwd_f64(c->nx, c->x, c->y, c->mask, 0.3, 99); break;
    }
    return dot(c->y, c->r, c->ny);
}

static void run_unary(int kind, double cap, int k, int stride, int pad)
{
    kd_rng r;
    kd_rng_seed(&r, 5, (uint64_t)kind);
    un_ctx c = {.kind = kind, .cap = cap};
    c.p = (kd_pool_shape){.n = 2, .c = 3, .h = 6, .w = 5, .k = k, .stride = stride, .pad = pad};
    c.p.ho = k ? (6 + 2 * pad - k) / stride + 1 : 1;
    c.p.wo = k ? (5 + 2 * pad - k) / stride + 1 : 1;
    c.nx = 2 * 3 * 6 * 5;
    c.ny = kind == 0 || kind == 4 ? c.nx : (size_t)2 * 3 * c.p.ho * c.p.wo;
    c.x = rnd(&r, c.nx, 8), c.r = rnd(&r, c.ny, 1), c.y = calloc(c.ny, 8);
    c.mask = calloc(c.nx, 8);
    c.arg = calloc(c.ny, sizeof(int32_t));
    double *dx = calloc(c.nx, 8);
    un_loss(&c);
    switch (kind) {
    case 0: kd_cpu_act_bwd_f64(c.nx, c.x, c.r, dx, cap); break;
    case 1: kd_cpu_maxpool_bwd_f64(&c.p, c.r, c.arg, dx); break;
    case 2: kd_cpu_avgpool_bwd_f64(&c.p, c.r, dx); break;
    case 3: kd_cpu_gap_bwd_f64(2, 3, 30, c.r, dx); break;
    case 4: kd_cpu_mul_f64(c.nx, c.r, c.mask, dx); break;
    }
    check_grad("unary dx", un_loss, &c, c.x, dx, c.nx);
    free(c.x), free(c.r), free(c.y), free(c.mask), free(c.arg), free(dx);
}

static void test_activations(void **state)
{
    (void)state;
    run_unary(0, -1, 0, 1, 0); /* relu */
    run_unary(0, 6, 0, 1, 0);  /* relu6: inputs span [-8, 8], so both kinks are crossed */
    double x[4] = {-1, 3, 7, 6.5}, y[4];
    kd_cpu_act_fwd_f64(4, x, y, 6);
    kd_assert_close(y[0], 0, 0);
    kd_assert_close(y[1], 3, 0);
    kd_assert_close(y[2], 6, 0);
}

/* NaN passes relu, relu6, the batchnorm's fused activation and max pooling (as in PyTorch): a
 * diverged network's NaN must reach the loss, where training stops, not become 0 or lose to a
 * finite neighbour on the way. */
static void test_nan_passes(void **state)
{
    (void)state;
    float x[4] = {NAN, -1, 2, NAN}, y[4];
    for (int cap = -1; cap <= 6; cap += 7) {
        kd_cpu_act_fwd_f32(4, x, y, cap);
        assert_true(isnan(y[0]) && isnan(y[3]));
        assert_true(y[1] == 0 && y[2] == 2);
        /* batchnorm in evaluation with its activation fused */
        const float g = 1, b = 0, rm = 0, rv = 1;
        kd_cpu_bn_fwd_eval_f32(4, 1, 1, x, &g, &b, &rm, &rv, y, 0, cap);
        assert_true(isnan(y[0]) && isnan(y[3]));
        assert_true(y[1] == 0 && y[2] == 2);
    }
    /* max pooling: a NaN anywhere in the window, first or not, is the window's value */
    const kd_pool_shape p = {1, 1, 2, 2, 2, 2, 0, 1, 1};
    const float w0[4] = {NAN, 1, 2, 0}, w1[4] = {1, NAN, 2, 0}, w2[4] = {1, 2, 0, NAN};
    const float *ws[3] = {w0, w1, w2};
    for (int i = 0; i < 3; i++) {
        float out;
        int32_t arg;
        kd_cpu_maxpool_fwd_f32(&p, ws[i], &out, &arg);
        if (!isnan(out))
            fail_msg("max pool window %d gave %g, not NaN", i, out);
    }
}

static void test_pooling(void **state)
{
    (void)state;
    run_unary(1, 0, 2, 2, 0);
    run_unary(1, 0, 3, 2, 1);
    run_unary(2, 0, 2, 2, 0);
    run_unary(2, 0, 3, 1, 1);
    run_unary(3, 0, 0, 1, 0);
}

static void test_dropout(void **state)
{
    (void)state;
    run_unary(4, 0, 0, 1, 0);
    /* about p of the mask is zero, the rest 1/(1-p), and the same seed gives the same mask */
    size_t n = 100000;
    double *x = calloc(n, 8), *y = calloc(n, 8), *m1 = calloc(n, 8), *m2 = calloc(n, 8);
    for (size_t i = 0; i < n; i++)
        x[i] = 1;
    kd_cpu_dropout_fwd_f64(n, x, y, m1, 0.25, 42);
    kd_cpu_dropout_fwd_f64(n, x, y, m2, 0.25, 42);
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++) {
        zeros += m1[i] == 0;
        assert_true(m1[i] == 0 || fabs(m1[i] - 1 / 0.75) < 1e-12);
    }
    assert_memory_equal(m1, m2, n * 8);
    assert_true(zeros > 24000 && zeros < 26000);
    kd_cpu_dropout_fwd_f64(n, x, y, m2, 0.25, 43);
    assert_memory_not_equal(m1, m2, n * 8);
    free(x), free(y), free(m1), free(m2);
}

/* ---- cross-entropy ---- */
typedef struct {
    int n, c;
    double eps;
    double *z;
    int32_t *lab;
} ce_ctx;

static double ce_loss(void *p)
{
    ce_ctx *c = p;
    return kd_cpu_ce_f64(c->n, c->c, c->z, c->lab, c->eps, NULL, 1, NULL) / c->n;
}

static void test_cross_entropy(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 13, 0);
    for (int t = 0; t < 2; t++) {
        ce_ctx c = {.n = 4, .c = 5, .eps = t ? 0.1 : 0.0};
        c.z = rnd(&r, 20, 3);
        int32_t lab[4] = {0, 4, 2, 2};
        c.lab = lab;
        double g[20];
        kd_cpu_ce_f64(c.n, c.c, c.z, lab, c.eps, g, 1, NULL);
        check_grad("ce dlogits", ce_loss, &c, c.z, g, 20);
        free(c.z);
    }
    /* a hand-computed value: logits (0, ln 3) label 1 -> p = 3/4, loss -ln(3/4);
       with smoothing 0.2: 0.8 * -ln(3/4) + 0.2 * mean(-ln(1/4), -ln(3/4)) */
    double z[2] = {0, log(3.0)};
    int32_t y = 1;
    int64_t hits = 0;
    kd_assert_close(kd_cpu_ce_f64(1, 2, z, &y, 0, NULL, 1, &hits), -log(0.75), 1e-12);
    assert_int_equal(hits, 1);
    double want = 0.8 * -log(0.75) + 0.2 * 0.5 * (-log(0.25) - log(0.75));
    kd_assert_close(kd_cpu_ce_f64(1, 2, z, &y, 0.2, NULL, 1, NULL), want, 1e-12);
    /* extreme logits stay finite */
    double big[3] = {1e4, -1e4, 0};
    int32_t yl = 1;
    double gb[3];
    double l = kd_cpu_ce_f64(1, 3, big, &yl, 0, gb, 1, NULL);
    assert_true(isfinite(l));
    kd_assert_close(l, 2e4, 1e-6);
    kd_assert_close(gb[0], 1.0, 1e-12);
    kd_assert_close(gb[1], -1.0, 1e-12);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nan_passes),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_conv_plain),
        cmocka_unit_test(test_conv_groups),
        cmocka_unit_test(test_conv_depthwise_large_plane),
        cmocka_unit_test(test_dw_strided_exact),
        cmocka_unit_test(test_conv_1x1),
        cmocka_unit_test(test_conv_matches_direct_sum),
        cmocka_unit_test(test_batchnorm_grad),
        cmocka_unit_test(test_batchnorm_stats),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_pooling),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_cross_entropy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
