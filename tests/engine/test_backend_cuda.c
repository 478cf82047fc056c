/*
 * test_backend_cuda.c - every operation the CUDA backend implements, run on
 * the same random inputs as the CPU backend and compared by relative norm.
 * Exits 77 (CTest: skipped) when distill was built without CUDA or no
 * device answers, so a machine without a GPU never reports a pass.
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
#include "rng.h"

static const kd_backend *gpu;
static const kd_backend *cpu;

static float *host_rand(size_t n, uint64_t seed)
{
    kd_rng r;
    kd_rng_seed(&r, seed, 17);
    float *p = malloc(n * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = kd_rng_normal(&r);
    return p;
}

static float *to_dev(const float *h, size_t n)
{
    void *d = NULL;
    assert_int_equal(gpu->alloc(&d, n * sizeof(float)), KD_OK);
    assert_int_equal(gpu->upload(d, h, n * sizeof(float)), KD_OK);
    return d;
}

/* ||a - b|| / ||b|| over n floats, with b on the host and a on the device */
static double rel_err(const float *dev, const float *ref, size_t n)
{
    float *h = malloc(n * sizeof *h);
    assert_non_null(h);
    assert_int_equal(gpu->download(h, dev, n * sizeof(float)), KD_OK);
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)h[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    free(h);
    return sqrt(num / (den > 0 ? den : 1));
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
    gpu->release(a_d), gpu->release(b_d), gpu->release(y_d);
    free(a), free(b), free(ref);
}

static void test_missing_slots_are_named(void **state)
{
    (void)state;
    /* the slots this backend lacks are refused by name, never run */
    const char *miss = kd_backend_missing(gpu, "linear_fwd,conv2d_fwd");
    if (gpu->conv2d_fwd)
        assert_null(miss);
    else
        assert_string_equal(miss, "conv2d_fwd");
    assert_null(kd_backend_missing(cpu, "linear_fwd,conv2d_fwd,bn_bwd,ce"));
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
        cmocka_unit_test(test_missing_slots_are_named),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
