/*
 * test_loss_kd.c - the `kd` distillation loss (engine/loss_kd_body.h, rules in
 * engine/loss_kd.md) against references written here independently: plain
 * two-pass softmax in long double, losses and gradients straight from the
 * definitions, the top-k tail rule built as an explicit surrogate teacher row
 * with its gradient taken by finite differences. Also: finite-difference
 * checks of the double instantiation, float against double, top-k with k == C
 * against dense, the masking rules (-inf logits) and a hand-computed 1x2 case.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_ops.h"
#include "kd_test.h"
#include "rng.h"

static const double temps[] = {0.5, 1, 2, 4, 20};
#define NTEMPS (int)(sizeof temps / sizeof temps[0])

/* ---- the dense reference: two-pass log-softmax in long double ---- */

/* lp[j] = log softmax(x / T)[j]; returns 0 when the row is all -inf (lp all -inf) */
static int ref_log_softmax(int c, const double *x, double temp, long double *lp)
{
    long double m = -INFINITY;
    for (int j = 0; j < c; j++)
        if ((long double)x[j] / temp > m)
            m = (long double)x[j] / temp;
    if (m == -INFINITY) {
        for (int j = 0; j < c; j++)
            lp[j] = -INFINITY;
        return 0;
    }
    long double sum = 0;
    for (int j = 0; j < c; j++)
        sum += expl((long double)x[j] / temp - m);
    long double lse = m + logl(sum);
    for (int j = 0; j < c; j++)
        lp[j] = (long double)x[j] / temp - lse;
    return 1;
}

/*
 * KL of one row between log-distributions lt (target) and lo (other), and its
 * gradient w.r.t. the logits of the student (the argument `student_is_target` says which
 * one that is), straight from the definitions; the masking rules of loss_kd.md.
 */
static long double ref_row(int c, const long double *ls, const long double *lt_, int reverse,
                           long double *g /* d KL / d(s/T) */)
{
    const long double *lt = reverse ? ls : lt_, *lo = reverse ? lt_ : ls;
    int any_t = 0, any_s = 0;
    for (int j = 0; j < c; j++) {
        any_t |= lt_[j] > -INFINITY;
        any_s |= ls[j] > -INFINITY;
    }
    if (!(reverse ? any_s : any_t)) {
        for (int j = 0; j < c; j++)
            g[j] = 0;
        return 0;
    }
    long double kl = 0;
    int inf = 0;
    for (int j = 0; j < c; j++) {
        if (lt[j] == -INFINITY)
            continue;
        if (lo[j] == -INFINITY)
            inf = 1;
        else
            kl += expl(lt[j]) * (lt[j] - lo[j]);
    }
    if (inf)
        kl = INFINITY;
    long double pm = 0;
    for (int j = 0; j < c; j++)
        if (lt_[j] == -INFINITY)
            pm += expl(ls[j]);
    for (int j = 0; j < c; j++) {
        long double ps = expl(ls[j]), pt = expl(lt_[j]);
        if (!reverse)
            g[j] = ps - pt;
        else if (ps == 0)
            g[j] = 0;
        else if (!inf)
            g[j] = ps * (ls[j] - lt_[j] - kl);
        else
            g[j] = ps * ((lt_[j] == -INFINITY ? 1 : 0) - pm);
    }
    return kl;
}

/* summed loss over rows (times coef) and ds = scale * d(sum / n)/ds */
static double ref_dense(int n, int c, const double *s, const double *t, double temp, int reverse,
                        int t2, double *ds, double scale)
{
    long double *ls = malloc(sizeof(long double) * c), *lt = malloc(sizeof(long double) * c);
    long double *g = malloc(sizeof(long double) * c);
    assert_non_null(ls), assert_non_null(lt), assert_non_null(g);
    const long double coef = t2 ? (long double)temp * temp : 1;
    long double total = 0;
    for (int i = 0; i < n; i++) {
        ref_log_softmax(c, s + (size_t)i * c, temp, ls);
        ref_log_softmax(c, t + (size_t)i * c, temp, lt);
        total += coef * ref_row(c, ls, lt, reverse, g);
        for (int j = 0; j < c; j++)
            ds[(size_t)i * c + j] = (double)(scale * coef / temp / n * g[j]);
    }
    free(ls), free(lt), free(g);
    return (double)total;
}

/* ---- inputs ---- */

enum { MASK_NONE, MASK_TEACHER, MASK_STUDENT };

/*
 * Random logits: normal * sd, a few at +-1e4 (when extreme), and -inf entries placed so the
 * loss stays finite: `mask` MASK_TEACHER puts -inf in the teacher (and sometimes the student
 * at the same class), MASK_STUDENT the mirror image (finite for reverse KL).
 */
static void fill(kd_rng *r, int n, int c, double *s, double *t, double sd, int extreme, int mask)
{
    for (size_t i = 0; i < (size_t)n * c; i++) {
        s[i] = sd * kd_rng_normal(r);
        t[i] = sd * kd_rng_normal(r);
        if (extreme) {
            double u = kd_rng_uniform(r);
            if (u < 0.05)
                s[i] = u < 0.025 ? 1e4 : -1e4;
            else if (u < 0.10)
                t[i] = u < 0.075 ? 1e4 : -1e4;
        }
    }
    if (mask == MASK_NONE)
        return;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < c; j++) {
            double u = kd_rng_uniform(r);
            if (u > 0.2 || j == i % c)
                continue; /* keep at least one class of every row unmasked */
            double *a = mask == MASK_TEACHER ? t : s, *b = mask == MASK_TEACHER ? s : t;
            a[(size_t)i * c + j] = -INFINITY;
            if (u < 0.07)
                b[(size_t)i * c + j] = -INFINITY;
        }
}

static double max_abs(const double *a, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(a[i]));
    return m;
}

/* max |a - b| / max(max |b|, floor) */
static double grad_err(const double *a, const double *b, size_t n, double floor)
{
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        if (!(a[i] == b[i]))
            e = fmax(e, fabs(a[i] - b[i]));
    }
    return e / fmax(max_abs(b, n), floor);
}

static double rel(double a, double b) { return a == b ? 0 : fabs(a - b) / fmax(fabs(b), 1e-300); }

/* ---- dense against the reference, float against double ---- */

/* the loss scale below which float is compared in absolute terms */
static double coef_floor(double temp, int t2, int n) { return (t2 ? temp * temp : 1) * n * 1e-2; }

static void run_dense_case(kd_rng *r, int n, int c, double sd, int extreme, double temp,
                           int reverse, int t2)
{
    size_t nc = (size_t)n * c;
    double *s = malloc(nc * 8), *t = malloc(nc * 8), *g = malloc(nc * 8), *gr = malloc(nc * 8);
    float *sf = malloc(nc * 4), *tf = malloc(nc * 4), *gf = malloc(nc * 4);
    double *gfd = malloc(nc * 8);
    assert_true(s && t && g && gr && sf && tf && gf && gfd);
    fill(r, n, c, s, t, sd, extreme, reverse ? MASK_STUDENT : MASK_TEACHER);
    /* the float op sees the same (float-representable) values */
    for (size_t i = 0; i < nc; i++) {
        sf[i] = (float)s[i], tf[i] = (float)t[i];
        s[i] = sf[i], t[i] = tf[i];
    }
    const double scale = 0.7;
    double want = ref_dense(n, c, s, t, temp, reverse, t2, gr, scale);
    double got = kd_cpu_kd_dense_f64(n, c, s, t, temp, reverse, t2, g, scale);
    assert_true(isfinite(want));
    if (rel(got, want) > 1e-11 && fabs(got - want) > 1e-12 * n)
        fail_msg("dense f64 C=%d T=%g rev=%d t2=%d extreme=%d: loss %.17g, reference %.17g", c,
                 temp, reverse, t2, extreme, got, want);
    double e = grad_err(g, gr, nc, 1e-300);
    if (e > 1e-11)
        fail_msg("dense f64 C=%d T=%g rev=%d t2=%d extreme=%d: gradient rel err %.3g", c, temp,
                 reverse, t2, extreme, e);
    /* without ds the loss is the same */
    kd_assert_close(kd_cpu_kd_dense_f64(n, c, s, t, temp, reverse, t2, NULL, scale), got, 0);
    /* float against double */
    double gotf = kd_cpu_kd_dense_f32(n, c, sf, tf, temp, reverse, t2, gf, scale);
    for (size_t i = 0; i < nc; i++)
        gfd[i] = gf[i];
    /* float rounding of (s - t) / T at |logits| ~ 1e4 is ~1e-3 absolute per term */
    double ltol = extreme ? 1e-4 : 1e-5;
    if (fabs(gotf - got) > ltol * fmax(fabs(got), coef_floor(temp, t2, n)))
        fail_msg("dense f32 C=%d T=%g rev=%d t2=%d extreme=%d: loss %.9g, f64 %.9g", c, temp,
                 reverse, t2, extreme, gotf, got);
    /* float log-probabilities carry ~6e-8 * |logit gap| / T absolute error: at gaps of 2e4 and
       T = 0.5 that is ~2e-3, which reaches the gradient through log p_t - KL (reverse) */
    e = grad_err(gfd, g, nc, 0);
    if (e > (extreme ? 5e-4 : 2e-5))
        fail_msg("dense f32 C=%d T=%g rev=%d t2=%d extreme=%d: gradient rel err %.3g", c, temp,
                 reverse, t2, extreme, e);
    free(s), free(t), free(g), free(gr), free(sf), free(tf), free(gf), free(gfd);
}

static void test_dense_reference(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 41, 0);
    const int shapes[][2] = {{3, 1}, {5, 10}, {4, 257}, {2, 1000}, {2, 4099}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++)
        for (int ti = 0; ti < NTEMPS; ti++)
            for (int rev = 0; rev < 2; rev++)
                for (int t2 = 0; t2 < 2; t2++)
                    for (int ex = 0; ex < 2; ex++)
                        run_dense_case(&r, shapes[sh][0], shapes[sh][1], 3.0, ex, temps[ti], rev,
                                       t2);
}

/* rows that share a large offset, and rows far apart: no overflow, no cancellation blow-up */
static void test_dense_extreme_rows(void **state)
{
    (void)state;
    const int c = 6;
    double s[2 * 6] = {1e4, 1e4 - 1, 1e4 - 2, -1e4, 0, 1e4 - 3, -1e4, 1e4, 0, 0, -1e4, 5};
    double t[2 * 6] = {1e4 - 1, 1e4, 1e4 - 5, -1e4, 1e4 - 2, 0, 1e4, -1e4, 0, -1e4, 1e4, 5};
    double g[12], gr[12];
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int rev = 0; rev < 2; rev++) {
            double want = ref_dense(2, c, s, t, temps[ti], rev, 1, gr, 1);
            double got = kd_cpu_kd_dense_f64(2, c, s, t, temps[ti], rev, 1, g, 1);
            assert_true(isfinite(got));
            assert_true(rel(got, want) < 1e-12);
            assert_true(grad_err(g, gr, 12, 1e-300) < 1e-12);
            float sf[12], tf[12], gf[12];
            for (int i = 0; i < 12; i++)
                sf[i] = (float)s[i], tf[i] = (float)t[i];
            double gotf = kd_cpu_kd_dense_f32(2, c, sf, tf, temps[ti], rev, 1, gf, 1);
            assert_true(isfinite(gotf));
            assert_true(rel(gotf, got) < 1e-5);
            for (int i = 0; i < 12; i++)
                assert_true(isfinite(gf[i]));
        }
}

/* ---- finite differences on the double instantiation ---- */

typedef struct {
    int n, c, k, reverse, t2;
    double temp;
    double *s, *t, *tv, *lse;
    int32_t *ti;
} fd_ctx;

static double fd_dense(fd_ctx *x)
{
    return kd_cpu_kd_dense_f64(x->n, x->c, x->s, x->t, x->temp, x->reverse, x->t2, NULL, 1) / x->n;
}

static double fd_topk(fd_ctx *x)
{
    return kd_cpu_kd_topk_f64(x->n, x->c, x->k, x->s, x->tv, x->ti, x->lse, x->temp, x->reverse,
                              x->t2, NULL, 1) /
           x->n;
}

static void check_fd(const char *what, double (*f)(fd_ctx *), fd_ctx *x, const double *g)
{
    const double h = 1e-6;
    for (size_t i = 0; i < (size_t)x->n * x->c; i++) {
        double keep = x->s[i];
        if (!isfinite(keep)) {
            if (g[i] != 0)
                fail_msg("%s[%zu]: a -inf logit has gradient %g", what, i, g[i]);
            continue;
        }
        x->s[i] = keep + h;
        double lp = f(x);
        x->s[i] = keep - h;
        double lm = f(x);
        x->s[i] = keep;
        double num = (lp - lm) / (2 * h);
        double err = fabs(num - g[i]) / fmax(1.0, fabs(num) + fabs(g[i]));
        if (err > 1e-6)
            fail_msg("%s[%zu]: analytic %.10g, numeric %.10g (rel err %.3g)", what, i, g[i], num,
                     err);
    }
}

static void test_dense_finite_differences(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 43, 0);
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int rev = 0; rev < 2; rev++) {
            fd_ctx x = {.n = 3, .c = 7, .reverse = rev, .t2 = ti & 1, .temp = temps[ti]};
            x.s = malloc(21 * 8), x.t = malloc(21 * 8);
            fill(&r, x.n, x.c, x.s, x.t, 2.0, 0, rev ? MASK_STUDENT : MASK_TEACHER);
            double g[21];
            kd_cpu_kd_dense_f64(x.n, x.c, x.s, x.t, x.temp, rev, x.t2, g, 1);
            check_fd("kd dense ds", fd_dense, &x, g);
            free(x.s), free(x.t);
        }
}

/* ---- decoupled KD ---- */

/* one row of dkd straight from its definition, in long double: the binary (target, rest) KL
 * and the KL of the softmaxes over the non-target classes (the row must have c >= 2) */
static long double ref_dkd_row(int c, const double *s, const double *t, int y, double temp,
                               double alpha, double beta, int t2)
{
    long double ls[64], lt[64];
    ref_log_softmax(c, s, temp, ls);
    ref_log_softmax(c, t, temp, lt);
    long double ps = expl(ls[y]), pt = expl(lt[y]);
    long double tc = pt * (lt[y] - ls[y]) + (1 - pt) * (logl(1 - pt) - logl(1 - ps));
    long double nc = 0;
    for (int j = 0; j < c; j++)
        if (j != y) {
            long double qt = expl(lt[j]) / (1 - pt), qs = expl(ls[j]) / (1 - ps);
            nc += qt * (logl(qt) - logl(qs));
        }
    return (t2 ? (long double)temp * temp : 1.0L) * (alpha * tc + beta * nc);
}

static double fd_dkd_alpha, fd_dkd_beta;
static const int32_t *fd_dkd_y;

static double fd_dkd(fd_ctx *x)
{
    return kd_cpu_kd_dkd_f64(x->n, x->c, x->s, x->t, fd_dkd_y, x->temp, fd_dkd_alpha, fd_dkd_beta,
                             x->t2, NULL, 1) /
           x->n;
}

/* dkd against the long-double definition and its gradient against finite differences, over
 * temperatures, weights and both T^2 settings; float agrees with double */
static void test_dkd_reference(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 91, 0);
    enum { N = 4, C = 9 };
    static const double ab[][2] = {{1, 8}, {1, 0}, {0, 1}, {0.5, 2}};
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int w = 0; w < 4; w++) {
            double sv[N * C], tv[N * C], g[N * C];
            float sf[N * C], tf[N * C], gf[N * C];
            int32_t y[N];
            fill(&r, N, C, sv, tv, 3.0, 0, MASK_NONE);
            for (int i = 0; i < N; i++)
                y[i] = (int32_t)kd_rng_below(&r, C);
            const int t2 = (ti + w) & 1;
            double got =
                kd_cpu_kd_dkd_f64(N, C, sv, tv, y, temps[ti], ab[w][0], ab[w][1], t2, g, 1);
            long double want = 0;
            for (int i = 0; i < N; i++)
                want +=
                    ref_dkd_row(C, sv + i * C, tv + i * C, y[i], temps[ti], ab[w][0], ab[w][1], t2);
            if (rel(got, (double)want) > 1e-9 && fabs(got - (double)want) > 1e-12)
                fail_msg("dkd T=%g a=%g b=%g: %.15g, reference %.15Lg", temps[ti], ab[w][0],
                         ab[w][1], got, want);
            fd_ctx x = {.n = N, .c = C, .t2 = t2, .temp = temps[ti], .s = sv, .t = tv};
            fd_dkd_alpha = ab[w][0], fd_dkd_beta = ab[w][1], fd_dkd_y = y;
            check_fd("dkd ds", fd_dkd, &x, g);
            for (int i = 0; i < N * C; i++)
                sf[i] = (float)sv[i], tf[i] = (float)tv[i];
            double gotf =
                kd_cpu_kd_dkd_f32(N, C, sf, tf, y, temps[ti], ab[w][0], ab[w][1], t2, gf, 1);
            double gd[N * C];
            kd_cpu_kd_dkd_f64(N, C, sv, tv, y, temps[ti], ab[w][0], ab[w][1], t2, gd, 1);
            assert_true(rel(gotf, got) < 1e-4 || fabs(gotf - got) < 1e-5);
            for (int i = 0; i < N * C; i++)
                kd_assert_close(gf[i], gd[i], 1e-5 * fmax(1.0, max_abs(gd, N * C)));
        }
}

/* KD is DKD with alpha = 1 and, row by row, beta = 1 - (teacher's probability of the label):
 * the identity that motivates the decoupling, checked on the loss and the gradient */
static void test_dkd_generalises_kd(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 92, 0);
    enum { C = 10 };
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int row = 0; row < 6; row++) {
            double sv[C], tv[C], gk[C], gd[C];
            fill(&r, 1, C, sv, tv, 2.5, 0, MASK_NONE);
            int32_t y = (int32_t)kd_rng_below(&r, C);
            long double lt[C];
            ref_log_softmax(C, tv, temps[ti], lt);
            const double beta = (double)(1 - expl(lt[y]));
            double kd = kd_cpu_kd_dense_f64(1, C, sv, tv, temps[ti], 0, 1, gk, 1);
            double dkd = kd_cpu_kd_dkd_f64(1, C, sv, tv, &y, temps[ti], 1.0, beta, 1, gd, 1);
            kd_assert_close(dkd, kd, 1e-10 * fmax(1.0, fabs(kd)));
            for (int j = 0; j < C; j++)
                kd_assert_close(gd[j], gk[j], 1e-10 * fmax(1.0, max_abs(gk, C)));
        }
}

/* a teacher whose label logit leads by 800 (every non-target probability underflows against
 * it): the non-target part still compares the other classes, the gradient sums to zero; a
 * label outside the row gives NaN and a zero gradient */
static void test_dkd_extreme_and_bad_label(void **state)
{
    (void)state;
    const double t[3] = {800, 0, 1}, s[3] = {0, 0, 0};
    double g[3];
    int32_t y = 0;
    double loss = kd_cpu_kd_dkd_f64(1, 3, s, t, &y, 1.0, 1.0, 8.0, 1, g, 1);
    const double r1 = 1 / (1 + exp(1.0)), r2 = 1 - r1; /* teacher softmax over classes 1, 2 */
    const double nc = r1 * log(r1 / 0.5) + r2 * log(r2 / 0.5);
    kd_assert_close(loss, log(3.0) + 8 * nc, 1e-12);
    kd_assert_close(g[0], 1.0 / 3 - 1, 1e-12);
    kd_assert_close(g[1], 0.5 * (1 - 1.0 / 3) + 8 * (0.5 - r1), 1e-12);
    kd_assert_close(g[2], 0.5 * (1 - 1.0 / 3) + 8 * (0.5 - r2), 1e-12);
    kd_assert_close(g[0] + g[1] + g[2], 0, 1e-12);
    /* the student just as sure: finite */
    const double s2[3] = {900, 0, 0};
    loss = kd_cpu_kd_dkd_f64(1, 3, s2, t, &y, 1.0, 1.0, 8.0, 1, g, 1);
    assert_true(isfinite(loss) && isfinite(g[0]) && isfinite(g[1]) && isfinite(g[2]));
    kd_assert_close(loss, 8 * (r1 * log(r1 / 0.5) + r2 * log(r2 / 0.5)), 1e-9);
    int32_t bad = 3;
    g[0] = g[1] = g[2] = 7;
    assert_true(isnan(kd_cpu_kd_dkd_f64(1, 3, s, t, &bad, 1.0, 1.0, 8.0, 1, g, 1)));
    assert_true(g[0] == 0 && g[1] == 0 && g[2] == 0);
}

/* ---- T^2 and batchmean by hand ---- */

static void test_dense_by_hand(void **state)
{
    (void)state;
    /* T = 2, teacher (0, 2 ln 3) -> p_t = (1/4, 3/4); student (0, 0) -> p_s = (1/2, 1/2) */
    const double temp = 2, l3 = log(3.0);
    double s[4] = {0, 0, 0, 0}, t[4] = {0, 2 * l3, 0, 2 * l3}, g[4];
    const double kl = 0.25 * log(0.25 / 0.5) + 0.75 * log(0.75 / 0.5); /* 0.130812035941137 */
    kd_assert_close(kl, 0.1308120359411369, 1e-15);
    kd_assert_close(kd_cpu_kd_dense_f64(1, 2, s, t, temp, 0, 0, g, 1), kl, 1e-15);
    /* d KL / ds = (p_s - p_t) / T = (1/8, -1/8) */
    kd_assert_close(g[0], 0.125, 1e-15);
    kd_assert_close(g[1], -0.125, 1e-15);
    /* with T^2: loss 4 KL, gradient T (p_s - p_t) = (1/2, -1/2); scale multiplies ds only */
    kd_assert_close(kd_cpu_kd_dense_f64(1, 2, s, t, temp, 0, 1, g, 3), 4 * kl, 1e-14);
    kd_assert_close(g[0], 1.5, 1e-14);
    kd_assert_close(g[1], -1.5, 1e-14);
    /* batchmean: two equal rows sum to 2 * 4 KL, each row's gradient halves */
    kd_assert_close(kd_cpu_kd_dense_f64(2, 2, s, t, temp, 0, 1, g, 1), 8 * kl, 1e-14);
    for (int i = 0; i < 2; i++) {
        kd_assert_close(g[2 * i], 0.25, 1e-15);
        kd_assert_close(g[2 * i + 1], -0.25, 1e-15);
    }
    /* reverse: KL(p_s || p_t) = 1/2 ln 2 + 1/2 ln(2/3); d/db_j = p_s (log p_s/p_t - KL) */
    const double rk = 0.5 * log(0.5 / 0.25) + 0.5 * log(0.5 / 0.75);
    kd_assert_close(kd_cpu_kd_dense_f64(1, 2, s, t, temp, 1, 1, g, 1), 4 * rk, 1e-14);
    kd_assert_close(g[0], temp * 0.5 * (log(2.0) - rk), 1e-14);
    kd_assert_close(g[1], temp * 0.5 * (log(2.0 / 3) - rk), 1e-14);
}

/* ---- masking: -inf logits ---- */

static void test_dense_masks(void **state)
{
    (void)state;
    const double temp = 2;
    double g[4], gr[4];
    /* forward, student -inf where the teacher has mass: +inf loss, finite (p_s - p_t) / T */
    double s1[3] = {0, -INFINITY, 1}, t1[3] = {0, 0.5, 1};
    double l = kd_cpu_kd_dense_f64(1, 3, s1, t1, temp, 0, 0, g, 1);
    assert_true(isinf(l) && l > 0);
    ref_dense(1, 3, s1, t1, temp, 0, 0, gr, 1);
    assert_true(grad_err(g, gr, 3, 0) < 1e-14);
    assert_true(g[1] < 0);
    /* forward, teacher -inf: the class contributes nothing, whatever the student says */
    double s2[3] = {0, 7, 1}, t2[3] = {0, -INFINITY, 1}, s2b[3] = {0, -INFINITY, 1};
    double la = kd_cpu_kd_dense_f64(1, 3, s2, t2, temp, 0, 0, NULL, 1);
    double want = ref_dense(1, 3, s2, t2, temp, 0, 0, gr, 1);
    kd_assert_close(la, want, 1e-14);
    double lb = kd_cpu_kd_dense_f64(1, 3, s2b, t2, temp, 0, 0, g, 1);
    kd_assert_close(lb, 0, 1e-15); /* student masked the same class: p_s = p_t */
    kd_assert_close(g[1], 0, 0);
    /* reverse mirror: teacher -inf where the student has mass -> +inf, gradient of the masked
       student mass: p_s (1[masked] - P_m) / T, finite */
    l = kd_cpu_kd_dense_f64(1, 3, s2, t2, temp, 1, 0, g, 1);
    assert_true(isinf(l) && l > 0);
    ref_dense(1, 3, s2, t2, temp, 1, 0, gr, 1);
    assert_true(grad_err(g, gr, 3, 0) < 1e-14);
    assert_true(g[1] > 0 && g[0] < 0 && g[2] < 0);
    kd_assert_close(g[0] + g[1] + g[2], 0, 1e-15);
    /* reverse, student -inf: contributes nothing */
    l = kd_cpu_kd_dense_f64(1, 3, s1, t1, temp, 1, 0, g, 1);
    assert_true(isfinite(l));
    kd_assert_close(l, ref_dense(1, 3, s1, t1, temp, 1, 0, gr, 1), 1e-14);
    if (grad_err(g, gr, 3, 0) > 1e-14)
        fail_msg("reverse, student -inf: gradient (%g %g %g), reference (%g %g %g)", g[0], g[1],
                 g[2], gr[0], gr[1], gr[2]);
    kd_assert_close(g[1], 0, 0);
    /* whole rows: target all -inf -> 0 and zero gradient; other all -inf -> +inf */
    double ninf[2] = {-INFINITY, -INFINITY}, fin[2] = {0, 1};
    assert_true(kd_cpu_kd_dense_f64(1, 2, fin, ninf, temp, 0, 1, g, 1) == 0);
    assert_true(g[0] == 0 && g[1] == 0);
    assert_true(kd_cpu_kd_dense_f64(1, 2, ninf, fin, temp, 1, 1, g, 1) == 0);
    assert_true(g[0] == 0 && g[1] == 0);
    l = kd_cpu_kd_dense_f64(1, 2, ninf, fin, temp, 0, 1, g, 1);
    assert_true(isinf(l) && l > 0);
    ref_dense(1, 2, ninf, fin, temp, 0, 1, gr, 1);
    assert_true(grad_err(g, gr, 2, 0) < 1e-14); /* -T p_t */
    l = kd_cpu_kd_dense_f64(1, 2, fin, ninf, temp, 1, 1, g, 1);
    assert_true(isinf(l) && l > 0);
    assert_true(g[0] == 0 && g[1] == 0); /* P_m = 1: nothing left to move */
    /* float follows the same rules */
    float s1f[3] = {0, -INFINITY, 1}, t1f[3] = {0, 0.5f, 1}, gf[3];
    l = kd_cpu_kd_dense_f32(1, 3, s1f, t1f, temp, 0, 0, gf, 1);
    assert_true(isinf(l) && l > 0);
    for (int j = 0; j < 3; j++)
        assert_true(isfinite(gf[j]));
}

/* A class the other side masks (-inf) while the target has mass there makes the loss +inf, but
 * only if that mass does not underflow against the row's maximum: a target logit 99.5 / T below
 * the maximum is exp(-99.5) = 0 in float, 800 below it 0 in double. The rows span several
 * 256-class chunks; the answer must not depend on whether the masked class comes before or after
 * the maximum (the rescaling between chunks once kept an earlier +inf). */
static void test_dense_mask_underflow_any_order(void **state)
{
    (void)state;
    enum { C = 600 };
    static float tf[C], sf[C], gf[C];
    static double td[C], sd[C], gd[C];
    const int pos[2][2] = {{0, 300}, {300, 0}}; /* masked class, row maximum */
    for (int rev = 0; rev < 2; rev++) {
        double lf[4], ld[4];
        for (int o = 0; o < 4;
             o++) { /* o >= 2: the same rows with the class masked on both sides */
            const int a = pos[o & 1][0], b = pos[o & 1][1];
            for (int j = 0; j < C; j++) {
                tf[j] = sf[j] = 0.01f * (float)(j % 7);
                td[j] = sd[j] = 0.01 * (j % 5);
            }
            float *pf = rev ? sf : tf, *qf = rev ? tf : sf;
            double *pd = rev ? sd : td, *qd = rev ? td : sd;
            pf[b] = 100.0f;
            pd[b] = 800.0;
            pf[a] = o < 2 ? 0.5f : -INFINITY;
            pd[a] = o < 2 ? 0.5 : -INFINITY;
            qf[a] = -INFINITY;
            qd[a] = -INFINITY;
            lf[o] = kd_cpu_kd_dense_f32(1, C, sf, tf, 1.0, rev, 0, gf, 1);
            ld[o] = kd_cpu_kd_dense_f64(1, C, sd, td, 1.0, rev, 0, gd, 1);
            for (int j = 0; j < C; j++)
                if (!isfinite(gf[j]) || !isfinite(gd[j]))
                    fail_msg("rev %d case %d: gradient %d not finite", rev, o, j);
        }
        for (int o = 0; o < 2; o++) {
            if (!isfinite(lf[o]) || !isfinite(ld[o]))
                fail_msg("rev %d, masked class %s the maximum: loss %g (float), %g (double)", rev,
                         o ? "after" : "before", lf[o], ld[o]);
            kd_assert_close(lf[o], lf[o + 2], 1e-6 * lf[o + 2]);
            kd_assert_close(ld[o], ld[o + 2], 1e-12 * ld[o + 2]);
        }
    }
}

/* NaN and +inf are not valid logits: a row holding one has a NaN (or +inf) loss, never a
 * finite one made of the terms the NaN failed to enter, so that training stops on it. A live
 * teacher whose outputs overflow gives such rows. */
static void test_invalid_logits_not_dropped(void **state)
{
    (void)state;
    const double bad[2] = {NAN, INFINITY};
    double g[3];
    float gf[3];
    for (int b = 0; b < 2; b++) {
        for (int rev = 0; rev < 2; rev++) {
            /* the whole row and one class; the teacher's row and the student's */
            for (int whole = 0; whole < 2; whole++) {
                double t[3] = {0.5, bad[b], -1}, s[3] = {0.2, 0.1, 0.3};
                float tf[3], sf[3];
                if (whole)
                    t[0] = t[2] = bad[b];
                for (int j = 0; j < 3; j++)
                    tf[j] = (float)t[j], sf[j] = (float)s[j];
                for (int who = 0; who < 2; who++) {
                    const double *ss = who ? t : s, *tt = who ? s : t;
                    const float *ssf = who ? tf : sf, *ttf = who ? sf : tf;
                    const double l = kd_cpu_kd_dense_f64(1, 3, ss, tt, 2.0, rev, 1, g, 1);
                    const double lf = kd_cpu_kd_dense_f32(1, 3, ssf, ttf, 2.0, rev, 1, gf, 1);
                    if (isfinite(l) || isfinite(lf))
                        fail_msg("dense: %s %s in the %s row (%s) gave a finite loss %g / %g",
                                 whole ? "all" : "one", b ? "+inf" : "NaN",
                                 who ? "student" : "teacher", rev ? "reverse" : "forward", l, lf);
                }
                int32_t y = 2;
                const double d = kd_cpu_kd_dkd_f64(1, 3, s, t, &y, 2.0, 1.0, 8.0, 1, g, 1);
                const double df = kd_cpu_kd_dkd_f32(1, 3, sf, tf, &y, 2.0, 1.0, 8.0, 1, gf, 1);
                if (isfinite(d) || isfinite(df))
                    fail_msg("dkd: %s %s teacher logits gave a finite loss %g / %g",
                             whole ? "all" : "one", b ? "+inf" : "NaN", d, df);
                y = 1; /* the label's own logit */
                if (isfinite(kd_cpu_kd_dkd_f64(1, 3, s, t, &y, 2.0, 1.0, 8.0, 1, g, 1)))
                    fail_msg("dkd: a %s label logit gave a finite loss", b ? "+inf" : "NaN");
                /* top-k (k = 1 of 3): the bad value among the student's tail classes, or among
                 * the cached values */
                const double tv[1] = {0.5}, tvb[1] = {bad[b]}, lse = 1.2;
                const int32_t ti[1] = {0};
                const double sb[3] = {0.2, bad[b], whole ? bad[b] : 0.3};
                const double lt = kd_cpu_kd_topk_f64(1, 3, 1, sb, tv, ti, &lse, 2.0, rev, 1, g, 1);
                const double lv = kd_cpu_kd_topk_f64(1, 3, 1, s, tvb, ti, &lse, 2.0, rev, 1, g, 1);
                if (isfinite(lt) || isfinite(lv))
                    fail_msg("top-k: %s %s (%s) gave a finite loss: tail %g, cached %g",
                             whole ? "all" : "one", b ? "+inf" : "NaN", rev ? "reverse" : "forward",
                             lt, lv);
            }
        }
    }
}

/* ---- top-k ---- */

/* the k largest of row t (ties by lower index) into tv/ti, and the row's T = 1 log-sum-exp */
static void make_topk(int c, int k, const double *t, double *tv, int32_t *ti, double *lse)
{
    char *used = calloc(c, 1);
    assert_non_null(used);
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int j = 0; j < c; j++)
            if (!used[j] && (best < 0 || t[j] > t[best]))
                best = j;
        used[best] = 1;
        ti[i] = best;
        tv[i] = t[best];
    }
    long double m = -INFINITY, sum = 0;
    for (int j = 0; j < c; j++)
        m = t[j] > m ? t[j] : m;
    for (int j = 0; j < c; j++)
        sum += expl(t[j] - m);
    *lse = (double)(m + logl(sum));
    free(used);
}

/*
 * The tail rule of loss_kd.md, built independently: a surrogate teacher row whose tail
 * classes all hold u = L + log(m / (C - k)); both distributions are softmaxes over C
 * classes in long double, summed into the k + 1 buckets; KL over the buckets.
 */
static long double ref_topk_row(int c, int k, const double *s, const double *tv, const int32_t *ti,
                                double lse, double temp, int reverse)
{
    long double *surr = malloc(sizeof(long double) * c), *lps = malloc(sizeof(long double) * c);
    char *top = calloc(c, 1);
    assert_true(surr && lps && top);
    long double top_mass = 0, vmin = INFINITY;
    for (int i = 0; i < k; i++) {
        top[ti[i]] = 1;
        top_mass += expl((long double)tv[i] - lse);
        vmin = tv[i] < vmin ? tv[i] : vmin;
    }
    long double m = 1 - top_mass, m_hi = (c - k) * expl(vmin - lse);
    m_hi = m_hi < 1 ? m_hi : 1;
    if (m < 1e-12L)
        m = 1e-12L;
    if (m > m_hi)
        m = m_hi;
    long double u = c > k && m > 0 ? lse + logl(m / (c - k)) : -INFINITY;
    for (int j = 0; j < c; j++)
        surr[j] = u;
    for (int i = 0; i < k; i++)
        surr[ti[i]] = tv[i];
    /* two-pass softmaxes */
    long double mt = -INFINITY, ms = -INFINITY, st = 0, ss = 0;
    for (int j = 0; j < c; j++) {
        mt = surr[j] / temp > mt ? surr[j] / temp : mt;
        ms = s[j] / temp > ms ? s[j] / temp : ms;
    }
    for (int j = 0; j < c; j++) {
        st += expl(surr[j] / temp - mt);
        ss += expl(s[j] / temp - ms);
    }
    /* buckets: k top classes in ti order, then the tail */
    long double q[k + 1], p[k + 1];
    q[k] = 0, p[k] = 0;
    for (int i = 0; i < k; i++) {
        q[i] = expl(tv[i] / temp - mt) / st;
        p[i] = expl(s[ti[i]] / temp - ms) / ss;
    }
    for (int j = 0; j < c; j++)
        if (!top[j]) {
            q[k] += expl(surr[j] / temp - mt) / st;
            p[k] += expl(s[j] / temp - ms) / ss;
        }
    long double kl = 0;
    for (int b = 0; b <= k; b++) {
        long double a = reverse ? p[b] : q[b], o = reverse ? q[b] : p[b];
        if (a > 0)
            kl += a * logl(a / o);
    }
    free(surr), free(lps), free(top);
    return kl;
}

static double ref_topk(int n, int c, int k, const double *s, const double *tv, const int32_t *ti,
                       const double *lse, double temp, int reverse, int t2)
{
    long double total = 0, coef = t2 ? (long double)temp * temp : 1;
    for (int i = 0; i < n; i++)
        total += coef * ref_topk_row(c, k, s + (size_t)i * c, tv + (size_t)i * k,
                                     ti + (size_t)i * k, lse[i], temp, reverse);
    return (double)total;
}

typedef struct {
    int n, c, k;
    double *s, *t, *tv, *lse;
    int32_t *ti;
} topk_case;

static topk_case topk_make(kd_rng *r, int n, int c, int k, double sd)
{
    topk_case x = {.n = n, .c = c, .k = k};
    x.s = malloc(sizeof(double) * n * c), x.t = malloc(sizeof(double) * n * c);
    x.tv = malloc(sizeof(double) * n * k), x.ti = malloc(sizeof(int32_t) * n * k);
    x.lse = malloc(sizeof(double) * n);
    assert_true(x.s && x.t && x.tv && x.ti && x.lse);
    fill(r, n, c, x.s, x.t, sd, 0, MASK_NONE);
    for (int i = 0; i < n; i++)
        make_topk(c, k, x.t + (size_t)i * c, x.tv + (size_t)i * k, x.ti + (size_t)i * k, x.lse + i);
    return x;
}

static void topk_free(topk_case *x)
{
    free(x->s), free(x->t), free(x->tv), free(x->ti), free(x->lse);
}

static void test_topk_full_equals_dense(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 47, 0);
    const int n = 4, c = 33;
    topk_case x = topk_make(&r, n, c, c, 3.0);
    x.s[5] = -INFINITY; /* a masked student class stays allowed (finite reverse) */
    double gd[4 * 33], gk[4 * 33];
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int rev = 0; rev < 2; rev++)
            for (int t2 = 0; t2 < 2; t2++) {
                double ld = kd_cpu_kd_dense_f64(n, c, x.s, x.t, temps[ti], rev, t2, gd, 0.9);
                double lk = kd_cpu_kd_topk_f64(n, c, c, x.s, x.tv, x.ti, x.lse, temps[ti], rev, t2,
                                               gk, 0.9);
                if (rel(lk, ld) > 1e-12)
                    fail_msg("k == C T=%g rev=%d: top-k %.17g, dense %.17g", temps[ti], rev, lk,
                             ld);
                assert_true(grad_err(gk, gd, (size_t)n * c, 1e-300) < 1e-12);
            }
    topk_free(&x);
}

static void test_topk_reference(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 53, 0);
    const int shapes[][3] = {{3, 10, 1}, {3, 10, 3}, {2, 100, 5}, {2, 1000, 20}, {2, 3000, 64}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++) {
        const int n = shapes[sh][0], c = shapes[sh][1], k = shapes[sh][2];
        topk_case x = topk_make(&r, n, c, k, 2.5);
        double *g = malloc(sizeof(double) * n * c);
        float *sf = malloc(4 * n * c), *tvf = malloc(4 * n * k), *lf = malloc(4 * n);
        float *gf = malloc(4 * n * c);
        assert_true(g && sf && tvf && lf && gf);
        for (int i = 0; i < n * c; i++)
            sf[i] = (float)x.s[i], x.s[i] = sf[i];
        for (int i = 0; i < n * k; i++)
            tvf[i] = (float)x.tv[i], x.tv[i] = tvf[i];
        for (int i = 0; i < n; i++)
            lf[i] = (float)x.lse[i], x.lse[i] = lf[i];
        for (int ti = 0; ti < NTEMPS; ti++)
            for (int rev = 0; rev < 2; rev++) {
                const int t2 = rev ^ (ti & 1);
                double want = ref_topk(n, c, k, x.s, x.tv, x.ti, x.lse, temps[ti], rev, t2);
                double got =
                    kd_cpu_kd_topk_f64(n, c, k, x.s, x.tv, x.ti, x.lse, temps[ti], rev, t2, g, 1);
                if (rel(got, want) > 1e-10)
                    fail_msg("top-k C=%d k=%d T=%g rev=%d: %.17g, reference %.17g", c, k, temps[ti],
                             rev, got, want);
                /* the gradient: finite differences of the op (its loss matches the reference) */
                if (c <= 100) {
                    fd_ctx f = {.n = n,
                                .c = c,
                                .k = k,
                                .reverse = rev,
                                .t2 = t2,
                                .temp = temps[ti],
                                .s = x.s,
                                .tv = x.tv,
                                .lse = x.lse,
                                .ti = x.ti};
                    check_fd("kd top-k ds", fd_topk, &f, g);
                }
                double gotf =
                    kd_cpu_kd_topk_f32(n, c, k, sf, tvf, x.ti, lf, temps[ti], rev, t2, gf, 1);
                if (fabs(gotf - got) > 1e-5 * fmax(fabs(got), coef_floor(temps[ti], t2, n)))
                    fail_msg("top-k f32 C=%d k=%d T=%g rev=%d: %.9g, f64 %.9g", c, k, temps[ti],
                             rev, gotf, got);
                double e = 0;
                for (int i = 0; i < n * c; i++)
                    e = fmax(e, fabs(gf[i] - g[i]));
                if (e > 2e-5 * max_abs(g, (size_t)n * c))
                    fail_msg("top-k f32 C=%d k=%d T=%g rev=%d: gradient err %.3g", c, k, temps[ti],
                             rev, e);
            }
        topk_free(&x);
        free(g), free(sf), free(tvf), free(lf), free(gf);
    }
}

/* when teacher and student are both constant over the tail, bucket KL is full KL */
static void test_topk_uniform_tail_equals_dense(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 59, 0);
    const int n = 3, c = 50, k = 7;
    topk_case x = topk_make(&r, n, c, k, 1.0);
    for (int i = 0; i < n; i++) {
        double *s = x.s + (size_t)i * c, *t = x.t + (size_t)i * c;
        for (int j = 0; j < c; j++)
            t[j] = -3.0 - i, s[j] = 0.25 * i - 1.0;
        for (int q = 0; q < k; q++) {
            int j = (q * 7 + i) % c;
            t[j] = 2.0 * kd_rng_normal(&r);
            s[j] = 2.0 * kd_rng_normal(&r);
        }
        make_topk(c, k, t, x.tv + (size_t)i * k, x.ti + (size_t)i * k, x.lse + i);
    }
    double gd[3 * 50], gk[3 * 50];
    for (int ti = 0; ti < NTEMPS; ti++)
        for (int rev = 0; rev < 2; rev++) {
            double ld = kd_cpu_kd_dense_f64(n, c, x.s, x.t, temps[ti], rev, 1, gd, 1);
            double lk =
                kd_cpu_kd_topk_f64(n, c, k, x.s, x.tv, x.ti, x.lse, temps[ti], rev, 1, gk, 1);
            if (rel(lk, ld) > 1e-10)
                fail_msg("uniform tail T=%g rev=%d: top-k %.17g, dense %.17g", temps[ti], rev, lk,
                         ld);
            assert_true(grad_err(gk, gd, (size_t)n * c, 1e-300) < 1e-10);
        }
    topk_free(&x);
}

/* At T = 1 the k + 1 buckets group the teacher's true distribution, so the bucket KL is at most
 * the full KL in either direction (the data-processing inequality), row by row. At T != 1 the
 * tail bucket is the equal-tail stand-in, not a grouping, and the bound fails: a row where the
 * top-k loss at T = 0.5 exceeds the dense one shows it. */
static void test_topk_lower_bound_at_t1(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 61, 0);
    const int c = 37, ks[] = {1, 3, 7, 36};
    for (int kk = 0; kk < 4; kk++) {
        const int k = ks[kk];
        topk_case x = topk_make(&r, 8, c, k, 4.0);
        for (int i = 0; i < 8; i++)
            for (int rev = 0; rev < 2; rev++) {
                const double *si = x.s + (size_t)i * c;
                double full =
                           kd_cpu_kd_dense_f64(1, c, si, x.t + (size_t)i * c, 1.0, rev, 0, NULL, 1),
                       bucket = kd_cpu_kd_topk_f64(1, c, k, si, x.tv + (size_t)i * k,
                                                   x.ti + (size_t)i * k, x.lse + i, 1.0, rev, 0,
                                                   NULL, 1);
                if (bucket > full * (1 + 1e-12) + 1e-15)
                    fail_msg("k=%d row %d rev=%d: bucket KL %.17g above the full KL %.17g", k, i,
                             rev, bucket, full);
            }
        topk_free(&x);
    }
    double s4[4] = {0, 0, 0, 0}, t4[4] = {3, 1, -3, 0}, tv = 3, lse = 0;
    int32_t ti = 0;
    for (int j = 0; j < 4; j++)
        lse += exp(t4[j]);
    lse = log(lse);
    const double full = kd_cpu_kd_dense_f64(1, 4, s4, t4, 0.5, 0, 1, NULL, 1),
                 bucket = kd_cpu_kd_topk_f64(1, 4, 1, s4, &tv, &ti, &lse, 0.5, 0, 1, NULL, 1);
    if (!(bucket > full))
        fail_msg("T = 0.5: bucket %.17g, full %.17g (expected above)", bucket, full);
}

/* 1 - sum(top-k) <= 0 from rounding: clamped to the floor, the loss stays finite both ways */
static void test_topk_tail_clamp(void **state)
{
    (void)state;
    const int c = 5, k = 2;
    double s[5] = {1, 0.5, -1, 0, 2}, tv[2] = {3, 2.5};
    int32_t ti[2] = {4, 0};
    /* a log-sum-exp slightly below log(e^3 + e^2.5): the top-k "mass" exceeds 1 */
    double lse = log(exp(3.0) + exp(2.5)) - 1e-9, g[5];
    for (int rev = 0; rev < 2; rev++) {
        double l = kd_cpu_kd_topk_f64(1, c, k, s, tv, ti, &lse, 2.0, rev, 1, g, 1);
        assert_true(isfinite(l));
        kd_assert_close(l, ref_topk(1, c, k, s, tv, ti, &lse, 2.0, rev, 1), 1e-12 * fabs(l));
        for (int j = 0; j < c; j++)
            assert_true(isfinite(g[j]));
        fd_ctx f = {.n = 1,
                    .c = c,
                    .k = k,
                    .reverse = rev,
                    .t2 = 1,
                    .temp = 2.0,
                    .s = s,
                    .tv = tv,
                    .lse = &lse,
                    .ti = ti};
        check_fd("kd top-k clamped ds", fd_topk, &f, g);
    }
    /* bad indices: NaN loss, zero gradient */
    int32_t dup[2] = {1, 1};
    assert_true(isnan(kd_cpu_kd_topk_f64(1, c, k, s, tv, dup, &lse, 2.0, 0, 1, g, 1)));
    assert_true(g[0] == 0 && g[4] == 0);
    int32_t out[2] = {1, 5};
    assert_true(isnan(kd_cpu_kd_topk_f64(1, c, k, s, tv, out, &lse, 2.0, 0, 1, NULL, 1)));
}

/*
 * The CPU backend's loss slots in the trainer's form (backend.h): with an accumulator the sums
 * are added to it, 0 is returned and *correct is left alone; the sums equal the returned ones.
 */
static void test_slots_accumulate(void **state)
{
    (void)state;
    const kd_backend *be = kd_backend_cpu();
    enum { N = 6, C = 5, K = 3 };
    float s[N * C], t[N * C], g[N * C], tv[N * K], lse[N];
    int32_t ti[N * K], lab[N];
    kd_rng r;
    kd_rng_seed(&r, 5, 9);
    for (int i = 0; i < N * C; i++) {
        s[i] = 2.0f * kd_rng_normal(&r);
        t[i] = 2.0f * kd_rng_normal(&r);
    }
    for (int i = 0; i < N; i++) {
        lab[i] = i % C;
        double m = -INFINITY, z = 0;
        for (int j = 0; j < C; j++)
            m = fmax(m, t[i * C + j]);
        for (int j = 0; j < C; j++)
            z += exp(t[i * C + j] - m);
        lse[i] = (float)(m + log(z));
        for (int j = 0; j < K; j++) { /* any K classes: the slot, not top-k selection, is tested */
            ti[i * K + j] = (i + j) % C;
            tv[i * K + j] = t[i * C + (i + j) % C];
        }
    }
    int64_t hits = -1, keep = -5;
    const double ce = be->ce(N, C, s, lab, 0.1, g, 1.0, &hits, NULL);
    const double kd = be->kd_dense(N, C, s, t, 2.0, 0, 1, g, 1.0, NULL);
    const double tk = be->kd_topk(N, C, K, s, tv, ti, lse, 2.0, 0, 1, g, 1.0, NULL);
    double acc[4] = {0.5, 1.0, 0.25, 0.0};
    assert_true(be->ce(N, C, s, lab, 0.1, g, 1.0, &keep, acc) == 0.0);
    assert_true(be->kd_dense(N, C, s, t, 2.0, 0, 1, g, 1.0, acc + 2) == 0.0);
    assert_true(be->kd_topk(N, C, K, s, tv, ti, lse, 2.0, 0, 1, g, 1.0, acc + 3) == 0.0);
    assert_int_equal(keep, -5);
    assert_true(hits >= 0 && hits <= N);
    assert_true(acc[0] == 0.5 + ce && acc[1] == 1.0 + (double)hits);
    assert_true(acc[2] == 0.25 + kd && acc[3] == tk);
    assert_true(ce > 0 && kd > 0 && tk > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slots_accumulate),
        cmocka_unit_test(test_dense_by_hand),
        cmocka_unit_test(test_dense_reference),
        cmocka_unit_test(test_dense_extreme_rows),
        cmocka_unit_test(test_dense_finite_differences),
        cmocka_unit_test(test_dense_masks),
        cmocka_unit_test(test_dense_mask_underflow_any_order),
        cmocka_unit_test(test_dkd_reference),
        cmocka_unit_test(test_dkd_generalises_kd),
        cmocka_unit_test(test_dkd_extreme_and_bad_label),
        cmocka_unit_test(test_invalid_logits_not_dropped),
        cmocka_unit_test(test_topk_full_equals_dense),
        cmocka_unit_test(test_topk_reference),
        cmocka_unit_test(test_topk_uniform_tail_equals_dense),
        cmocka_unit_test(test_topk_lower_bound_at_t1),
        cmocka_unit_test(test_topk_tail_clamp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
