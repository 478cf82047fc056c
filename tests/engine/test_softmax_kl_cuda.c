/*
 * test_softmax_kl_cuda.c - the fused softmax-KL kernels (kernels/softmax_kl.cu) against the
 * CPU op kd_cpu_kd_dense (float for float32 inputs; the double op, on the bfloat16-rounded
 * values, for bfloat16 inputs), every variant (warp, block, auto), aligned and unaligned
 * rows, C in {10, 1000, 32768} and odd sizes, T in {0.5, 1, 4, 20}, forward and reverse,
 * extreme logits (+-1e4) and -inf masks. Also the kd_dense slot of the CUDA backend.
 * Exits 77 (CTest: skipped) when distill was built without CUDA or no device answers.
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
#include "cpu_ops.h"
#include "rng.h"

#ifdef KD_HAVE_CUDA
#include <cuda_runtime.h>

#include "bf16.h"
#include "softmax_kl.h"

static const kd_backend *gpu;

/* float -> bfloat16 bits, round to nearest even */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(kd_bf16_round_bits(u) >> 16);
}

static float from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void fill(kd_rng *r, size_t nc, int c, float *s, float *t, int extreme, int reverse)
{
    for (size_t i = 0; i < nc; i++) {
        s[i] = 3.0f * kd_rng_normal(r);
        t[i] = 3.0f * kd_rng_normal(r);
        double u = kd_rng_uniform(r);
        if (extreme && u < 0.04)
            s[i] = u < 0.02 ? 1e4f : -1e4f;
        else if (extreme && u < 0.08)
            t[i] = u < 0.06 ? 1e4f : -1e4f;
        else if (u < 0.12 && (int)(i % c) != 0) { /* masks that keep the loss finite */
            if (reverse)
                s[i] = -INFINITY;
            else
                t[i] = -INFINITY;
        } else if (u < 0.13 && (int)(i % c) != 0)
            s[i] = t[i] = -INFINITY;
    }
}

static void *dev(const void *h, size_t bytes)
{
    void *d = NULL;
    assert_int_equal(cudaMalloc(&d, bytes ? bytes : 4), cudaSuccess);
    if (h)
        assert_int_equal(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

/* one configuration; `offset` shifts every row start by one element (unaligned path) */
static void run_case(int n, int c, int bf16_in, int bf16_out, double temp, int reverse, int t2,
                     int extreme, int variant, int offset)
{
    kd_rng r;
    kd_rng_seed(&r, 1000 + (uint64_t)c * 7 + n, (uint64_t)(reverse * 2 + extreme));
    const size_t nc = (size_t)n * c, tot = nc + offset;
    float *s = malloc(tot * 4), *t = malloc(tot * 4), *g = malloc(nc * 4), *gd = malloc(nc * 4);
    double *sd = NULL, *td = NULL, *gdd = NULL;
    uint16_t *sb = malloc(tot * 2), *tb = malloc(tot * 2), *gb = malloc(nc * 2);
    double *rows = malloc(sizeof(double) * n);
    assert_true(s && t && g && gd && sb && tb && gb && rows);
    fill(&r, tot, c, s, t, extreme, reverse);
    const double scale = 0.8;
    double want;
    if (bf16_in) {
        sd = malloc(nc * 8), td = malloc(nc * 8), gdd = malloc(nc * 8);
        assert_true(sd && td && gdd);
        for (size_t i = 0; i < tot; i++)
            sb[i] = to_bf16(s[i]), tb[i] = to_bf16(t[i]);
        for (size_t i = 0; i < nc; i++)
            sd[i] = from_bf16(sb[i + offset]), td[i] = from_bf16(tb[i + offset]);
        want = kd_cpu_kd_dense_f64(n, c, sd, td, temp, reverse, t2, gdd, scale);
    } else {
        want = kd_cpu_kd_dense_f32(n, c, s + offset, t + offset, temp, reverse, t2, g, scale);
    }
    const size_t esz = bf16_in ? 2 : 4, osz = bf16_out ? 2 : 4;
    char *s_d = dev(bf16_in ? (void *)sb : (void *)s, tot * esz);
    char *t_d = dev(bf16_in ? (void *)tb : (void *)t, tot * esz);
    void *g_d = dev(NULL, nc * osz);
    double *rows_d = dev(NULL, sizeof(double) * (n + 1));
    kd_status st = kd_cuda_softmax_kl(
        NULL, n, c, bf16_in ? KD_SKL_BF16 : KD_SKL_F32, s_d + offset * esz, t_d + offset * esz,
        temp, reverse, t2, g_d, bf16_out ? KD_SKL_BF16 : KD_SKL_F32, scale, rows_d, variant);
    assert_int_equal(st, KD_OK);
    assert_int_equal(kd_cuda_sum_f64(NULL, n, rows_d, rows_d + n), KD_OK);
    double got = 0;
    assert_int_equal(cudaMemcpy(&got, rows_d + n, 8, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_int_equal(cudaMemcpy(rows, rows_d, 8 * (size_t)n, cudaMemcpyDeviceToHost), cudaSuccess);
    if (bf16_out) {
        assert_int_equal(cudaMemcpy(gb, g_d, nc * 2, cudaMemcpyDeviceToHost), cudaSuccess);
        for (size_t i = 0; i < nc; i++)
            gd[i] = from_bf16(gb[i]);
    } else {
        assert_int_equal(cudaMemcpy(gd, g_d, nc * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    }
    /* loss: relative, with an absolute floor at the loss scale */
    const double coef = t2 ? temp * temp : 1;
    const double ltol = (extreme ? 1e-4 : 2e-5) * fmax(fabs(want), coef * n * 1e-2);
    if (!(fabs(got - want) <= ltol))
        fail_msg("C=%d n=%d in=%s out=%s T=%g rev=%d t2=%d extreme=%d variant=%d offset=%d: "
                 "loss %.9g, CPU %.9g",
                 c, n, bf16_in ? "bf16" : "f32", bf16_out ? "bf16" : "f32", temp, reverse, t2,
                 extreme, variant, offset, got, want);
    /* gradient: max abs error over max |reference| */
    double e = 0, m = 0;
    for (size_t i = 0; i < nc; i++) {
        double ref = bf16_in ? gdd[i] : g[i];
        m = fmax(m, fabs(ref));
        e = fmax(e, fabs(gd[i] - ref));
    }
    const double gtol = bf16_out ? 8e-3 : (extreme ? 5e-4 : 2e-5);
    if (!(e <= gtol * m))
        fail_msg("C=%d n=%d in=%s out=%s T=%g rev=%d extreme=%d variant=%d offset=%d: gradient "
                 "err %.3g of max %.3g",
                 c, n, bf16_in ? "bf16" : "f32", bf16_out ? "bf16" : "f32", temp, reverse, extreme,
                 variant, offset, e, m);
    assert_int_equal(cudaFree(s_d), cudaSuccess);
    assert_int_equal(cudaFree(t_d), cudaSuccess);
    assert_int_equal(cudaFree(g_d), cudaSuccess);
    assert_int_equal(cudaFree(rows_d), cudaSuccess);
    free(s), free(t), free(g), free(gd), free(sb), free(tb), free(gb), free(rows);
    free(sd), free(td), free(gdd);
}

static void test_variants_f32(void **state)
{
    (void)state;
    const int cs[][2] = {{257, 10}, {64, 1000}, {4, 32768}, {33, 1}, {19, 129}, {7, 1023}};
    const double temps[] = {0.5, 1, 4, 20};
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++)
        for (int ti = 0; ti < 4; ti++)
            for (int rev = 0; rev < 2; rev++)
                for (int ex = 0; ex < 2; ex++) {
                    const int n = cs[k][0], c = cs[k][1];
                    run_case(n, c, 0, 0, temps[ti], rev, ti & 1, ex, KD_SKL_AUTO, 0);
                    run_case(n, c, 0, 0, temps[ti], rev, ti & 1, ex, KD_SKL_BLOCK, 0);
                    run_case(n, c, 0, 0, temps[ti], rev, ti & 1, ex, KD_SKL_BLOCK, 1);
                    if (c <= 1024) {
                        run_case(n, c, 0, 0, temps[ti], rev, ti & 1, ex, KD_SKL_WARP, 0);
                        run_case(n, c, 0, 0, temps[ti], rev, ti & 1, ex, KD_SKL_WARP, 1);
                    }
                }
}

static void test_variants_bf16(void **state)
{
    (void)state;
    const int cs[][2] = {{257, 10}, {64, 1000}, {4, 32768}, {19, 136}};
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++)
        for (int rev = 0; rev < 2; rev++)
            for (int out = 0; out < 2; out++) {
                const int n = cs[k][0], c = cs[k][1];
                run_case(n, c, 1, out, 4.0, rev, 1, 1, KD_SKL_AUTO, 0);
                run_case(n, c, 1, out, 2.0, rev, 0, 0, KD_SKL_BLOCK, 0);
                run_case(n, c, 1, out, 1.0, rev, 1, 0, KD_SKL_BLOCK, 3);
                if (c <= 1024)
                    run_case(n, c, 1, out, 0.5, rev, 1, 0, KD_SKL_WARP, 1);
            }
}

/* kd_cuda_softmax_kl on host rows s, t [n, c] (float32), row losses into rows and the
 * gradient (scale 1) into g when g is not NULL. */
static void run_rows(int n, int c, const float *s, const float *t, int rev, int variant,
                     double *rows, float *g)
{
    const size_t nc = (size_t)n * c * sizeof(float);
    float *s_d = dev(s, nc), *t_d = dev(t, nc), *g_d = dev(NULL, nc);
    double *rows_d = dev(NULL, (size_t)n * sizeof(double));
    assert_int_equal(kd_cuda_softmax_kl(NULL, n, c, KD_SKL_F32, s_d, t_d, 2.0, rev, 1, g_d,
                                        KD_SKL_F32, 1.0, rows_d, variant),
                     KD_OK);
    assert_int_equal(cudaMemcpy(rows, rows_d, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost),
                     cudaSuccess);
    if (g)
        assert_int_equal(cudaMemcpy(g, g_d, nc, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_int_equal(cudaFree(s_d), cudaSuccess);
    assert_int_equal(cudaFree(t_d), cudaSuccess);
    assert_int_equal(cudaFree(g_d), cudaSuccess);
    assert_int_equal(cudaFree(rows_d), cudaSuccess);
}

/* the masking rules of the CPU op: infinite rows, empty targets */
static void test_masks(void **state)
{
    (void)state;
    const float ninf = -INFINITY;
    /* row 0: forward-infinite (student -inf under teacher mass); row 1: teacher all -inf;
       row 2: reverse-infinite (teacher -inf under student mass); row 3: student all -inf;
       row 4: teacher -inf where the student's probability underflows (-190 / T = -95: exp is
       subnormal, which the CPU counts as 0, so the row stays finite in reverse mode too) */
    float s[5 * 4] = {0, ninf, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, ninf, ninf, ninf, ninf, 0, -190, 1, 2};
    float t[5 * 4] = {0, 1, 2, 3, ninf, ninf, ninf, ninf, 0, ninf, 2, 3, 1, 2, 3, 4, 0, ninf, 2, 3};
    float g[20], gd[20];
    double rows[5];
    for (int variant = KD_SKL_WARP; variant <= KD_SKL_BLOCK; variant++)
        for (int rev = 0; rev < 2; rev++) {
            run_rows(5, 4, s, t, rev, variant, rows, gd);
            for (int i = 0; i < 5; i++) {
                double want =
                    kd_cpu_kd_dense_f32(1, 4, s + 4 * i, t + 4 * i, 2.0, rev, 1, g + 4 * i, 0.2);
                if (i == 4)
                    assert_false(isinf(want)); /* the case this row is for */
                if (isinf(want))
                    assert_true(isinf(rows[i]) && rows[i] > 0);
                else
                    assert_true(fabs(rows[i] - want) <= 1e-5 * fmax(1, fabs(want)));
                for (int j = 0; j < 4; j++)
                    if (!(fabs(gd[4 * i + j] - g[4 * i + j]) <= 1e-5))
                        fail_msg("variant %d rev %d row %d class %d: %g, CPU %g", variant, rev, i,
                                 j, gd[4 * i + j], g[4 * i + j]);
            }
        }
}

/* A class the other side masks (-inf) where the target's mass underflows against the row's
 * maximum (400 above it, / T = 200) counts as masked in both variants and both orders of the
 * class and the maximum: the row is finite, as on the CPU. Each thread of the block variant sees
 * part of the row, so its own maximum is not the row's. */
static void test_mask_underflow(void **state)
{
    (void)state;
    const int cs[2] = {1024, 4096}, at[2][2] = {{0, 600}, {600, 0}};
    for (int ci = 0; ci < 2; ci++) {
        const int c = cs[ci];
        float *s = malloc(sizeof(float) * 2 * c), *t = malloc(sizeof(float) * 2 * c);
        double rows[2];
        assert_non_null(s);
        assert_non_null(t);
        for (int rev = 0; rev < 2; rev++) {
            for (int i = 0; i < 2; i++) { /* row i: masked class at[i][0], maximum at[i][1] */
                float *p = rev ? s + i * c : t + i * c, *q = rev ? t + i * c : s + i * c;
                for (int j = 0; j < c; j++)
                    p[j] = q[j] = 0.01f * (float)(j % 7);
                p[at[i][0]] = 0.5f;
                q[at[i][0]] = -INFINITY;
                p[at[i][1]] = 400.0f;
            }
            for (int variant = KD_SKL_WARP; variant <= KD_SKL_BLOCK; variant++) {
                if (variant == KD_SKL_WARP && c > 1024)
                    continue;
                run_rows(2, c, s, t, rev, variant, rows, NULL);
                for (int i = 0; i < 2; i++) {
                    double want =
                        kd_cpu_kd_dense_f32(1, c, s + i * c, t + i * c, 2.0, rev, 1, NULL, 1);
                    assert_true(isfinite(want));
                    if (!(fabs(rows[i] - want) <= 1e-5 * fmax(1, fabs(want))))
                        fail_msg("c %d variant %d rev %d row %d: %g, CPU %g", c, variant, rev, i,
                                 rows[i], want);
                }
            }
        }
        free(s);
        free(t);
    }
}

/* NaN and +inf logits (not valid; a live teacher that overflows gives them) make the row's loss
 * non-finite on the device as on the CPU: never a finite loss from the terms that stayed
 * finite. Rows: one NaN teacher logit, a +inf teacher logit, an all-NaN teacher row, one NaN
 * student logit. */
static void test_invalid_rows(void **state)
{
    (void)state;
    const float nan = NAN, inf = INFINITY;
    float s[4 * 4] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, nan, 2, 3};
    float t[4 * 4] = {0, nan, 2, 3, 0, inf, 2, 3, nan, nan, nan, nan, 1, 2, 3, 4};
    float g[16];
    double rows[4];
    for (int variant = KD_SKL_WARP; variant <= KD_SKL_BLOCK; variant++)
        for (int rev = 0; rev < 2; rev++) {
            run_rows(4, 4, s, t, rev, variant, rows, NULL);
            for (int i = 0; i < 4; i++) {
                const double cpu =
                    kd_cpu_kd_dense_f32(1, 4, s + 4 * i, t + 4 * i, 2.0, rev, 1, g, 1.0);
                assert_false(isfinite(cpu));
                if (isfinite(rows[i]))
                    fail_msg("variant %d rev %d row %d: finite loss %g (CPU %g)", variant, rev, i,
                             rows[i], cpu);
            }
        }
}

static void test_backend_slot(void **state)
{
    (void)state;
    const int n = 96, c = 1000;
    kd_rng r;
    kd_rng_seed(&r, 5, 5);
    float *s = malloc((size_t)n * c * 4), *t = malloc((size_t)n * c * 4);
    float *g = malloc((size_t)n * c * 4), *gd = malloc((size_t)n * c * 4);
    assert_true(s && t && g && gd);
    fill(&r, (size_t)n * c, c, s, t, 0, 0);
    const kd_backend *cpu = kd_backend_cpu();
    double want = cpu->kd_dense(n, c, s, t, 4.0, 0, 1, g, 0.5, NULL);
    void *s_d, *t_d, *g_d;
    assert_int_equal(gpu->alloc(&s_d, (size_t)n * c * 4), KD_OK);
    assert_int_equal(gpu->alloc(&t_d, (size_t)n * c * 4), KD_OK);
    assert_int_equal(gpu->alloc(&g_d, (size_t)n * c * 4), KD_OK);
    assert_int_equal(gpu->upload(s_d, s, (size_t)n * c * 4), KD_OK);
    assert_int_equal(gpu->upload(t_d, t, (size_t)n * c * 4), KD_OK);
    double got = gpu->kd_dense(n, c, s_d, t_d, 4.0, 0, 1, g_d, 0.5, NULL);
    assert_int_equal(gpu->sync(), KD_OK);
    assert_int_equal(gpu->download(gd, g_d, (size_t)n * c * 4), KD_OK);
    assert_true(fabs(got - want) <= 2e-5 * fabs(want));
    double e = 0, m = 0;
    for (size_t i = 0; i < (size_t)n * c; i++) {
        e = fmax(e, fabs(gd[i] - g[i]));
        m = fmax(m, fabs(g[i]));
    }
    assert_true(e <= 2e-5 * m);
    /* a variant the shape cannot take is refused with a message */
    assert_int_equal(kd_cuda_softmax_kl(NULL, 1, 2048, KD_SKL_F32, s_d, t_d, 1.0, 0, 0, NULL,
                                        KD_SKL_F32, 1.0, (double *)g_d, KD_SKL_WARP),
                     KD_ERR_INVALID);
    gpu->release(s_d), gpu->release(t_d), gpu->release(g_d);
    free(s), free(t), free(g), free(gd);
}

int main(void)
{
    const char *why = NULL;
    gpu = kd_backend_cuda(&why);
    if (!gpu) {
        printf("SKIP: %s\n", why);
        return 77;
    }
    printf("%s\n", why);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_variants_f32), cmocka_unit_test(test_variants_bf16),
        cmocka_unit_test(test_masks),        cmocka_unit_test(test_mask_underflow),
        cmocka_unit_test(test_invalid_rows), cmocka_unit_test(test_backend_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

int main(void)
{
    printf("SKIP: distill was built without CUDA\n");
    return 77;
}

#endif
