/*
 * test_export_quant.c - the exporter's integer arithmetic and arena plan:
 *   - requantization multipliers: range of (multiplier, shift), relative accuracy, and the
 *     runtime's kdm_requantize with them against the exact product computed in double (within
 *     one code for any factor; exact when the product is an integer; single rounding exact for
 *     every representable factor);
 *   - bias folding: the zero-point term makes raw int8 accumulation equal the real dot product;
 *     overflow refused;
 *   - activation ranges: zero exactly representable, the MSE choice clips a lone outlier and
 *     keeps min/max for a uniform distribution; int4 clipping never loses to max-abs;
 *   - arena plans: no two tensors alive at once overlap (all pairs checked), total within
 *     [lower bound, sum of sizes], and a chain meets max(size[i] + size[i + 1]).
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
#include "quant.h"
#include "rng.h"

static double log_uniform(kd_rng *r, double lo, double hi)
{
    return exp(log(lo) + (log(hi) - log(lo)) * kd_rng_uniform(r));
}

static void test_multiplier_range(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 1, 2);
    for (int i = 0; i < 20000; i++) {
        double real = log_uniform(&r, 1e-9, 1e8);
        int32_t m, s;
        assert_int_equal(kd_quant_multiplier(real, &m, &s), KD_OK);
        if (real < ldexp(1, -32)) {
            assert_int_equal(m, 0);
            continue;
        }
        assert_true(m >= (1 << 30));
        assert_true(s >= -31 && s <= 30);
        double back = ldexp((double)m, s - 31);
        kd_assert_close(back / real, 1.0, ldexp(1, -30));
    }
    int32_t m, s;
    assert_int_equal(kd_quant_multiplier(0, &m, &s), KD_OK);
    assert_int_equal(m, 0);
    assert_int_equal(s, 0);
    assert_int_equal(kd_quant_multiplier(ldexp(1, -40), &m, &s), KD_OK);
    assert_int_equal(m, 0);
    assert_int_equal(kd_quant_multiplier(0.5, &m, &s), KD_OK);
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, 0);
    /* a mantissa that rounds up to 2^31 moves to the next exponent */
    assert_int_equal(kd_quant_multiplier(1.0 - ldexp(1, -40), &m, &s), KD_OK);
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, 1);
    assert_int_equal(kd_quant_multiplier(ldexp(1, 31), &m, &s), KD_ERR_UNSUPPORTED);
    assert_int_equal(kd_quant_multiplier(-1, &m, &s), KD_ERR_UNSUPPORTED);
    assert_int_equal(kd_quant_multiplier(NAN, &m, &s), KD_ERR_UNSUPPORTED);
}

/* round half away from zero, as the two-step scheme's second step does */
static double round_away(double v) { return v < 0 ? -floor(-v + 0.5) : floor(v + 0.5); }

static void test_requantize_vs_double(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 3, 4);
    int64_t off_by_one = 0, n = 0;
    for (int i = 0; i < 3000; i++) {
        double real = log_uniform(&r, 1e-6, 4.0);
        int32_t m, s;
        assert_int_equal(kd_quant_multiplier(real, &m, &s), KD_OK);
        double eff = ldexp((double)m, s - 31); /* the factor the integers represent */
        for (int k = 0; k < 20; k++) {
            /* accumulators whose product stays in int32 (the runtime saturates beyond) */
            double lim = fmin(2147483647.0, 5e8 / eff);
            int32_t acc = (int32_t)((2 * kd_rng_uniform(&r) - 1) * lim);
            double exact = (double)acc * eff;
            for (uint32_t flags = 0; flags <= KDM_FLAG_SINGLE_ROUNDING; flags++) {
                int32_t got = kdm_requantize(acc, m, s, flags);
                double want = flags ? floor(exact + 0.5) : round_away(exact);
                if (fabs(got - want) > 1)
                    fail_msg("acc %d real %.17g (m %d s %d) flags %u: got %d, exact %.17g", acc,
                             real, m, s, flags, got, exact);
                /* the single rounding is the exact rounding of the represented product */
                if (flags)
                    assert_true(got == want);
                off_by_one += got != want;
                n++;
            }
            /* an integral product comes out exactly in both schemes: acc a multiple of the
             * power of two the multiplier's odd part is divided by */
            int tz = __builtin_ctz((unsigned)m);
            int e = 31 - s - tz;
            if (e >= 0 && e <= 30) {
                int32_t step = (int32_t)1 << e;
                int32_t kmax = (int32_t)fmin(1000.0, fmin(2147483647.0 / step, 5e8 / (eff * step)));
                for (int32_t q = -kmax; q <= kmax; q += kmax / 7 + 1) {
                    int32_t a2 = q * step;
                    double ex2 = (double)a2 * eff;
                    assert_true(ex2 == floor(ex2));
                    for (uint32_t flags = 0; flags <= KDM_FLAG_SINGLE_ROUNDING; flags++)
                        assert_int_equal(kdm_requantize(a2, m, s, flags), (int32_t)ex2);
                }
            }
        }
    }
    /* double rounding differs from the exact rounding only near ties: rarely */
    assert_true(off_by_one < n / 20);
    /* representable factors: 3/8 times multiples of 8 is exact */
    int32_t m, s;
    assert_int_equal(kd_quant_multiplier(0.375, &m, &s), KD_OK);
    for (int32_t acc = -8000; acc <= 8000; acc += 8) {
        assert_int_equal(kdm_requantize(acc, m, s, 0), acc / 8 * 3);
        assert_int_equal(kdm_requantize(acc, m, s, KDM_FLAG_SINGLE_ROUNDING), acc / 8 * 3);
    }
}

static void test_bias_folding(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 9, 9);
    for (int trial = 0; trial < 200; trial++) {
        /* one output channel of a fully-connected layer over k inputs */
        enum { K = 40 };
        float w[K], x[K];
        int8_t qx[K];
        float in_lo = -3 * kd_rng_uniform(&r), in_hi = 0.5f + 4 * kd_rng_uniform(&r);
        float s_in;
        int32_t zp;
        kd_export_range_qparams(in_lo, in_hi, &s_in, &zp);
        for (int j = 0; j < K; j++) {
            w[j] = (2 * kd_rng_uniform(&r) - 1) * 0.3f;
            /* inputs on the quantization grid, so only the weights are rounded */
            int q = (int)(kd_rng_uniform(&r) * 255.999f) - 128;
            qx[j] = (int8_t)q;
            x[j] = s_in * (float)(q - zp);
        }
        float b = (2 * kd_rng_uniform(&r) - 1) * 2;
        float sw;
        kd_quant_row_scales(w, 1, K, 8, &sw);
        int64_t sum = 0, acc_w = 0;
        double real = b;
        for (int j = 0; j < K; j++) {
            int q = kd_quant_round(w[j], sw, 127);
            sum += q;
            acc_w += (int64_t)q * qx[j];
            real += (double)sw * q * x[j];
        }
        int32_t bq;
        assert_int_equal(kd_quant_bias(b, s_in, sw, zp, sum, &bq), KD_OK);
        /* bias + sum q_w * q_x (raw int8 inputs) at scale s_in * s_w is the real output */
        double got = ((double)bq + (double)acc_w) * s_in * sw;
        kd_assert_close(got, real, 0.5 * s_in * sw + 1e-9);
        assert_int_equal(bq, (int32_t)(llround(b / ((double)s_in * sw)) - (int64_t)zp * sum));
    }
    int32_t out;
    assert_int_equal(kd_quant_bias(1e6, 1e-3, 1e-6, 0, 0, &out), KD_ERR_UNSUPPORTED);
    assert_int_equal(kd_quant_bias(5.0, 0.0, 1.0, 3, 2, &out), KD_OK);
    assert_int_equal(out, -6);
}

/* The accumulator bound: bias + sum q x over x in [-128, 127] (and shifted left by a positive
 * double-rounding shift) must stay in int32, exactly at the edges. */
static void test_accumulator_bound(void **state)
{
    (void)state;
    const int8_t q[3] = {127, -127, 0};
    /* the weights add at most 127 * 127 + 127 * 128 = 32385 and take away as much */
    assert_int_equal(kd_quant_acc_fits(INT32_MAX - 32385, q, 3, 0), KD_OK);
    assert_int_equal(kd_quant_acc_fits(INT32_MAX - 32384, q, 3, 0), KD_ERR_UNSUPPORTED);
    assert_non_null(strstr(kd_last_error(), "beyond int32"));
    assert_int_equal(kd_quant_acc_fits(INT32_MIN + 32385, q, 3, 0), KD_OK);
    assert_int_equal(kd_quant_acc_fits(INT32_MIN + 32384, q, 3, 0), KD_ERR_UNSUPPORTED);
    /* positive and negative weights reach the edge with -128 and 127 inputs respectively */
    const int8_t neg[1] = {-128}, pos[1] = {1};
    assert_int_equal(kd_quant_acc_fits(INT32_MAX - 16384, neg, 1, 0), KD_OK);
    assert_int_equal(kd_quant_acc_fits(INT32_MAX - 16383, neg, 1, 0), KD_ERR_UNSUPPORTED);
    assert_int_equal(kd_quant_acc_fits(INT32_MIN + 128, pos, 1, 0), KD_OK);
    assert_int_equal(kd_quant_acc_fits(INT32_MIN + 127, pos, 1, 0), KD_ERR_UNSUPPORTED);
    /* a left shift of 2 divides the room by 4 */
    assert_int_equal(kd_quant_acc_fits((INT32_MAX >> 2) - 127, pos, 1, 2), KD_OK);
    assert_int_equal(kd_quant_acc_fits((INT32_MAX >> 2) - 126, pos, 1, 2), KD_ERR_UNSUPPORTED);
    assert_non_null(strstr(kd_last_error(), "left shift"));
}

static void test_range_qparams(void **state)
{
    (void)state;
    const float ranges[][2] = {{-1, 1}, {0, 6}, {-0.3f, 7.7f}, {-5, 0}, {0.5f, 2}, {-3, -1}};
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        float s;
        int32_t zp;
        kd_export_range_qparams(ranges[i][0], ranges[i][1], &s, &zp);
        float lo = fminf(ranges[i][0], 0), hi = fmaxf(ranges[i][1], 0);
        kd_assert_close(s, (hi - lo) / 255.0, 1e-6 * (hi - lo));
        assert_true(zp >= -128 && zp <= 127);
        /* 0 is the code zp exactly; both ends are within half a step of a code */
        kd_assert_close(s * (-128 - zp), lo, 0.5 * s + 1e-6);
        kd_assert_close(s * (127 - zp), hi, 0.5 * s + 1e-6);
    }
    float s;
    int32_t zp;
    kd_export_range_qparams(0, 6, &s, &zp);
    assert_int_equal(zp, -128);
    kd_export_range_qparams(0, 0, &s, &zp);
    assert_true(s > 0);
    assert_int_equal(zp, -128);
}

static void test_range_choice(void **state)
{
    (void)state;
    enum { NB = 2048 };
    static double h[NB], ha[NB];
    kd_rng r;
    kd_rng_seed(&r, 2, 2);
    /* a narrow bell on [-1, 1] (10^7 values) plus one far outlier at 50: clipping it wins */
    float lo = -1, hi = 50;
    memset(h, 0, sizeof h);
    memset(ha, 0, sizeof ha);
    for (int i = 0; i < 100000; i++) {
        float v = (kd_rng_uniform(&r) + kd_rng_uniform(&r) + kd_rng_uniform(&r)) / 1.5f - 1;
        h[(int)((v - lo) / (hi - lo) * NB)] += 100;
        ha[(int)(fabsf(v) / 50 * NB)] += 100;
    }
    h[NB - 1] += 1;
    ha[NB - 1] += 1;
    float a, b;
    char choice[16];
    double e = kd_export_range_choice(h, ha, NB, lo, hi, &a, &b, choice);
    assert_string_not_equal(choice, "minmax");
    assert_true(b < 5);
    assert_true(a <= 0 && b >= 0);
    float s0;
    int32_t z0;
    kd_export_range_qparams(lo, hi, &s0, &z0);
    assert_true(e < (double)s0 * s0 / 12);
    /* uniform on [-2, 3]: nothing to clip */
    lo = -2;
    hi = 3;
    for (int i = 0; i < NB; i++) {
        h[i] = 100;
        ha[i] = 0;
    }
    for (int i = 0; i < NB; i++) {
        float v = lo + (i + 0.5f) * (hi - lo) / NB;
        ha[(int)(fabsf(v) / 3 * NB)] += 100;
    }
    kd_export_range_choice(h, ha, NB, lo, hi, &a, &b, choice);
    assert_string_equal(choice, "minmax");
    kd_assert_close(a, -2, 1e-6);
    kd_assert_close(b, 3, 1e-6);
}

static void test_clip_scale(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 4, 4);
    int clipped = 0;
    for (int t = 0; t < 200; t++) {
        enum { K = 72 };
        float w[K], smax;
        for (int j = 0; j < K; j++) {
            float u = kd_rng_uniform(&r) + kd_rng_uniform(&r) + kd_rng_uniform(&r) - 1.5f;
            w[j] = u * 0.2f;
        }
        kd_quant_row_scales(w, 1, K, 4, &smax);
        float s = kd_quant_clip_scale(w, NULL, K, 4);
        assert_true(s <= smax * (1 + 1e-6f) && s >= 0.5f * smax * (1 - 1e-6f));
        double e_max = 0, e_clip = 0;
        for (int j = 0; j < K; j++) {
            double d0 = w[j] - smax * kd_quant_round(w[j], smax, 7);
            double d1 = w[j] - s * kd_quant_round(w[j], s, 7);
            e_max += d0 * d0;
            e_clip += d1 * d1;
        }
        assert_true(e_clip <= e_max + 1e-12);
        clipped += s < smax;
    }
    /* bell-shaped rows are where clipping pays */
    assert_true(clipped > 100);
    float zero[4] = {0, 0, 0, 0};
    assert_true(kd_quant_clip_scale(zero, NULL, 4, 4) == 0);
}

/* Every pair alive at once is disjoint, and the plan stays within its bounds. */
static void check_plan(int n, const uint32_t *size, const int *first, const int *last,
                       uint32_t *total, uint32_t *bound)
{
    uint32_t *off = malloc(sizeof *off * (size_t)n);
    assert_non_null(off);
    char method[16];
    assert_int_equal(kd_export_plan_arena(n, size, first, last, off, total, bound, method), KD_OK);
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) {
        uint32_t si = (size[i] + 3) & ~3u;
        sum += si;
        assert_int_equal(off[i] % 4, 0);
        assert_true(off[i] + si <= *total);
        for (int j = i + 1; j < n; j++) {
            uint32_t sj = (size[j] + 3) & ~3u;
            int live = first[i] <= last[j] && first[j] <= last[i];
            if (live && off[i] < off[j] + sj && off[j] < off[i] + si)
                fail_msg("tensors %d [%u, +%u) and %d [%u, +%u) overlap while both alive", i,
                         off[i], si, j, off[j], sj);
        }
    }
    assert_true(*total <= sum);
    assert_true(*total >= *bound);
    free(off);
}

static void test_plan_random_graphs(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 6, 6);
    for (int t = 0; t < 300; t++) {
        int n = 1 + (int)(kd_rng_uniform(&r) * 40);
        uint32_t size[40];
        int first[40], last[40];
        for (int i = 0; i < n; i++) {
            size[i] = 1 + (uint32_t)(kd_rng_uniform(&r) * 5000);
            first[i] = (int)(kd_rng_uniform(&r) * n) - 1;
            last[i] = first[i] + (int)(kd_rng_uniform(&r) * 6);
        }
        uint32_t total, bound;
        check_plan(n, size, first, last, &total, &bound);
    }
}

static void test_plan_chains(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 8, 8);
    /* the chain where largest-first alone needs 17 */
    {
        const uint32_t size[4] = {5 * 4, 4 * 4, 6 * 4, 7 * 4};
        const int first[4] = {-1, 0, 1, 2}, last[4] = {0, 1, 2, 3};
        uint32_t total, bound;
        check_plan(4, size, first, last, &total, &bound);
        assert_int_equal(total, 13 * 4);
    }
    for (int t = 0; t < 500; t++) {
        int n = 2 + (int)(kd_rng_uniform(&r) * 14);
        uint32_t size[16];
        int first[16], last[16];
        uint32_t want = 0;
        for (int i = 0; i < n; i++) {
            size[i] = 1 + (uint32_t)(kd_rng_uniform(&r) * 10000);
            first[i] = i - 1; /* tensor i is written by op i - 1 and read by op i */
            last[i] = i;
        }
        for (int i = 0; i + 1 < n; i++) {
            uint32_t pair = ((size[i] + 3) & ~3u) + ((size[i + 1] + 3) & ~3u);
            want = pair > want ? pair : want;
        }
        uint32_t total, bound;
        check_plan(n, size, first, last, &total, &bound);
        assert_int_equal(bound, want);
        if (total != want)
            fail_msg("chain of %d tensors: plan %u bytes, bound %u", n, total, want);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_multiplier_range), cmocka_unit_test(test_requantize_vs_double),
        cmocka_unit_test(test_bias_folding),     cmocka_unit_test(test_accumulator_bound),
        cmocka_unit_test(test_range_qparams),    cmocka_unit_test(test_range_choice),
        cmocka_unit_test(test_clip_scale),       cmocka_unit_test(test_plan_random_graphs),
        cmocka_unit_test(test_plan_chains),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
