/*
 * loss_kd_body.h - the `kd` distillation loss, written once over a real type
 * T. cpu_ops_body.h includes it, so engine/cpu_ops.c compiles it for float
 * (_f32, training) and double (_f64, the finite-difference tests). The math,
 * the masking rules and the top-k tail rule are derived in engine/loss_kd.md;
 * this comment is the summary.
 *
 * Shapes: N rows (n), C classes (c), K cached teacher classes per row (k).
 *   s [N, C] student logits, t [N, C] teacher logits, ds [N, C] (written with =),
 *   tv [N, K] teacher top-k raw logits, ti [N, K] their class indices (distinct, in [0, C)),
 *   t_lse [N] log-sum-exp of the teacher's full raw row at temperature 1.
 *
 * Per row, with a = t/T, b = s/T, p_t = softmax(a), p_s = softmax(b), coef = T^2 or 1:
 *   forward  loss = coef * KL(p_t || p_s),  d/ds = coef/T * (p_s - p_t)
 *   reverse  loss = coef * KL(p_s || p_t),  d/ds = coef/T * p_s * (log p_s - log p_t - KL)
 * The ops return the summed row losses and write ds = scale * d(sum loss / N)/ds.
 *
 * One fused pass per row: student and teacher are streamed once in chunks of
 * KD_CHUNK elements with an online (running max, rescaled sum) log-sum-exp for
 * both, accumulating sum_j e_j ((p_j - m_p) - (q_j - m_q)) for the loss on the way; a second
 * sweep over the same (now cached) row writes the gradient. No softmax tensor
 * is stored. Accumulators are T inside a chunk (vectorised) and double across
 * chunks.
 *
 * Masking (-inf logits; +inf and NaN are not valid inputs: a row holding one has a NaN or
 * +inf loss, in every loss, so the trainer stops on it):
 *   - a class whose target probability is 0 (teacher -inf in forward, student
 *     -inf in reverse) contributes 0 to the loss;
 *   - a class where the target has mass but the other distribution is -inf
 *     makes the row loss +inf. Forward: the gradient stays the finite
 *     coef/T * (p_s - p_t). Reverse: the gradient is undefined (inf - inf);
 *     the row gets coef/T * p_s * (1[t_j = -inf] - P_m), the gradient of the
 *     student's mass P_m on the teacher-masked classes, a finite direction that
 *     removes the offending mass;
 *   - a row whose target is entirely -inf has loss 0 and gradient 0; a row
 *     whose other distribution is entirely -inf (the target is not) has loss +inf.
 *   A probability that underflows (below ~1e-38 in float) counts as masked.
 *
 * Top-k targets: the tail outside the k cached classes is one bucket; see the
 * comment above OP(kd_topk) for the rule.
 */

#ifndef KD_LOSS_KD_ONCE_
#define KD_LOSS_KD_ONCE_

#include "dkd_row.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KD_CHUNK 256 /* elements per online-softmax chunk: two rows of it stay in L1 */
/* Floor on the top-k tail mass at T = 1 when 1 - sum(top-k) rounds to <= 0 (see loss_kd.md). */
#define KD_TOPK_TAIL_FLOOR 1e-12
#define KD_TOPK_STACK      512 /* sorted top-k indices kept on the stack up to this k */

/*
 * exp for x <= 0 (what a softmax needs after subtracting the max), written so
 * that loops over it vectorise: Cody-Waite reduction x = n ln2 + r, a Taylor
 * polynomial in r (|r| <= ln2/2), 2^n built in the exponent bits. Below the
 * smallest normal result it returns exactly 0 (so -inf gives 0); NaN stays
 * NaN. Float: relative error < 2e-7 (degree 7); double: < 3e-16 (degree 13).
 */
static inline float kd_kexp_f32(float x)
{
    const float lo = -87.33f, hi = 88.0f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float fn = xc * 1.44269504088896341f + magic;
    int32_t fbits, mbits;
    memcpy(&fbits, &fn, 4);
    memcpy(&mbits, &magic, 4);
    int32_t ni = fbits - mbits;
    float nf = fn - magic;
    float r = xc - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t sbits = (ni + 127) << 23;
    float sc;
    memcpy(&sc, &sbits, 4);
    float y = p * sc;
    return x < lo ? 0.f : y;
}

static inline double kd_kexp_f64(double x)
{
    const double lo = -708.39, hi = 709.0;
    double xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double fn = xc * 1.4426950408889634074 + magic;
    int64_t fbits, mbits;
    memcpy(&fbits, &fn, 8);
    memcpy(&mbits, &magic, 8);
    int64_t ni = fbits - mbits;
    double nf = fn - magic;
    double r = xc - nf * 6.93147180369123816490e-01;
    r = r - nf * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0; /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t sbits = (ni + 1023) << 52;
    double sc;
    memcpy(&sc, &sbits, 8);
    double y = p * sc;
    return x < lo ? 0.0 : y;
}

/* log(exp(a) + exp(b)) for a, b in [-inf, inf) */
static inline double kd_logaddexp(double a, double b)
{
    if (a == -INFINITY)
        return b;
    if (b == -INFINITY)
        return a;
    double m = a > b ? a : b;
    return m + log1p(exp(-fabs(a - b)));
}

static int kd_cmp_i32(const void *x, const void *y)
{
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

#endif /* KD_LOSS_KD_ONCE_ */

#define KEXP KD_CAT(kd_kexp, SFX)

/*
 * Online log-sum-exp state of one stream: every e_j = exp((x_j - m) / T) is
 * relative to the running raw maximum m, and sum holds sum_j e_j. When a
 * chunk raises the maximum the sum is rescaled by exp((m_old - m_new) / T).
 */
typedef struct {
    double m;   /* running raw maximum (-inf while empty) */
    double sum; /* sum of exp((x - m) / T) */
} OP(kd_lse);

/* the shift used inside exp: the max, or 0 for an all -inf stream (so exp(-inf - 0) = 0) */
static inline T OP(kd_shift)(double m) { return m == -INFINITY ? (T)0 : (T)m; }

/* rescale st to a new maximum m; returns the rescale factor (1 when m is not larger) */
static inline double OP(kd_lse_raise)(OP(kd_lse) * st, double m, double inv_t)
{
    if (!(m > st->m))
        return 1;
    double f = st->m == -INFINITY ? 0 : exp((st->m - m) * inv_t);
    st->sum *= f;
    st->m = m;
    return f;
}

/* stream x[0..len) into a single online log-sum-exp */
static void OP(kd_lse_stream)(const T *x, int len, T inv_t, OP(kd_lse) * st)
{
    for (int j0 = 0; j0 < len; j0 += KD_CHUNK) {
        const int cl = len - j0 < KD_CHUNK ? len - j0 : KD_CHUNK;
        const T *xc = x + j0;
        T mx = -(T)INFINITY;
#pragma omp simd reduction(max : mx)
        for (int j = 0; j < cl; j++)
            mx = xc[j] > mx ? xc[j] : mx;
        OP(kd_lse_raise)(st, (double)mx, (double)inv_t);
        const T sh = OP(kd_shift)(st->m);
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < cl; j++)
            acc += KEXP((xc[j] - sh) * inv_t);
        st->sum += (double)acc;
    }
}

/*
 * One pass over a row pair: p is the target stream (teacher in forward,
 * student in reverse), q the other. Fills both log-sum-exp states and returns
 *     w = sum_j e^p_j * ((p_j - m_p) - (q_j - m_q))   over classes with e^p_j > 0,
 * so that KL(p || q) = w / (T sum_p) + log(sum_q / sum_p). Differences are
 * taken from each row's own maximum, where the terms that matter are small:
 * a large common offset (logits near 1e4) never enters the float sums.
 * Raising a maximum by dp (dq) changes w to f_p * (w - sum_p * (dp - dq)).
 * A class with q_j = -inf and e^p_j > 0 makes w = +inf; whether e^p_j > 0 is
 * decided against the row's final maximum (the largest such p_j is kept
 * aside), so the answer does not depend on which chunk the maximum is in.
 */
static double OP(kd_pair_stream)(const T *p, const T *q, int c, T inv_t, OP(kd_lse) * sp,
                                 OP(kd_lse) * sq)
{
    double w = 0;
    T pinf = -(T)INFINITY; /* the largest p_j with q_j = -inf */
    for (int j0 = 0; j0 < c; j0 += KD_CHUNK) {
        const int cl = c - j0 < KD_CHUNK ? c - j0 : KD_CHUNK;
        const T *pc = p + j0, *qc = q + j0;
        T mp = -(T)INFINITY, mq = -(T)INFINITY;
#pragma omp simd reduction(max : mp, mq, pinf)
        for (int j = 0; j < cl; j++) {
            mp = pc[j] > mp ? pc[j] : mp;
            mq = qc[j] > mq ? qc[j] : mq;
            pinf = qc[j] == -(T)INFINITY && pc[j] > pinf ? pc[j] : pinf;
        }
        const double mp0 = sp->m, mq0 = sq->m, sum_p0 = sp->sum;
        double fp = OP(kd_lse_raise)(sp, (double)mp, (double)inv_t);
        OP(kd_lse_raise)(sq, (double)mq, (double)inv_t);
        /* an empty stream had no terms; nothing to shift */
        double dp = mp0 == -INFINITY ? 0 : sp->m - mp0, dq = mq0 == -INFINITY ? 0 : sq->m - mq0;
        if (fp == 0) /* the old terms underflow against the new maximum */
            w = 0;
        else if (dp != 0 || dq != 0)
            w = fp * (w - sum_p0 * (dp - dq));
        const T shp = OP(kd_shift)(sp->m), shq = OP(kd_shift)(sq->m);
        T ap = 0, aq = 0, aw = 0;
#pragma omp simd reduction(+ : ap, aq, aw)
        for (int j = 0; j < cl; j++) {
            T xp = pc[j] - shp, xq = qc[j] - shq;
            T ep = KEXP(xp * inv_t);
            T eq = KEXP(xq * inv_t);
            ap += ep;
            aq += eq;
            aw += ep > 0 && qc[j] != -(T)INFINITY ? ep * (xp - xq) : (T)0;
        }
        sp->sum += (double)ap;
        sq->sum += (double)aq;
        w += (double)aw;
    }
    if (pinf != -(T)INFINITY && KEXP((pinf - OP(kd_shift)(sp->m)) * inv_t) > 0)
        w = INFINITY;
    return w;
}

/* Loss of one dense row (KL before coef) and its gradient times kk into d (if d). */
static double OP(kd_dense_row)(int c, const T *s, const T *t, T inv_t, int reverse, T *d, double kk)
{
    const T *p = reverse ? s : t, *q = reverse ? t : s;
    OP(kd_lse) sp = {-INFINITY, 0}, sq = {-INFINITY, 0};
    const double w = OP(kd_pair_stream)(p, q, c, inv_t, &sp, &sq);
    const double it = (double)inv_t;
    double kl;
    if (sp.sum == 0) { /* the target is all -inf: nothing to match (a NaN sum is not) */
        if (d)
            memset(d, 0, sizeof(T) * c);
        return 0;
    }
    if (!(sq.sum > 0))
        kl = INFINITY;
    else
        kl = w * it / sp.sum + log(sq.sum / sp.sum);
    if (kl < 0) /* KL >= 0; a negative is rounding (NaN passes through) */
        kl = 0;
    if (!d)
        return kl;
    /* student / teacher states */
    const OP(kd_lse) *ss = reverse ? &sp : &sq, *st = reverse ? &sq : &sp;
    const T shs = OP(kd_shift)(ss->m), sht = OP(kd_shift)(st->m);
    const T ins = ss->sum > 0 ? (T)(1.0 / ss->sum) : (T)0;
    const T int_ = st->sum > 0 ? (T)(1.0 / st->sum) : (T)0;
    const T k = (T)kk;
    if (!reverse) {
#pragma omp simd
        for (int j = 0; j < c; j++) {
            T ps = KEXP((s[j] - shs) * inv_t) * ins;
            T pt = KEXP((t[j] - sht) * inv_t) * int_;
            d[j] = k * (ps - pt);
        }
    } else if (isfinite(kl)) {
        /* g_j = log p_s - log p_t - KL = ((s - Ms) - (t - Mt)) / T + log(St / Ss) - KL, in
           double: with logits far apart (1e4) both parts are large and cancel */
        const double c0 = log(st->sum / ss->sum) - kl, ms = ss->m, mt = st->m;
        const double ked = kk;
#pragma omp simd
        for (int j = 0; j < c; j++) {
            T ps = KEXP((s[j] - shs) * inv_t) * ins;
            double g = (((double)s[j] - ms) - ((double)t[j] - mt)) * it + c0;
            d[j] = ps > 0 ? (T)(ked * (double)ps * g) : (T)0;
        }
    } else {
        /* infinite reverse row: the gradient of the student's mass on teacher-masked classes */
        double pm = 0;
        for (int j = 0; j < c; j++)
            if (t[j] == -(T)INFINITY)
                pm += (double)(KEXP((s[j] - shs) * inv_t) * ins);
        const T pmt = (T)pm;
#pragma omp simd
        for (int j = 0; j < c; j++) {
            T ps = KEXP((s[j] - shs) * inv_t) * ins;
            T ind = t[j] == -(T)INFINITY ? (T)1 : (T)0;
            d[j] = k * ps * (ind - pmt);
        }
    }
    return kl;
}

double OP(kd_dense)(int n, int c, const T *s, const T *t, double temperature, int reverse,
                    int t2_scale, T *ds, double scale)
{
    const double coef = t2_scale ? temperature * temperature : 1.0;
    const T inv_t = (T)(1.0 / temperature);
    const double kk = scale * coef / temperature / n;
    double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if ((long)n * c > 32768)
    for (int i = 0; i < n; i++) {
        size_t off = (size_t)i * c;
        total +=
            coef * OP(kd_dense_row)(c, s + off, t + off, inv_t, reverse, ds ? ds + off : NULL, kk);
    }
    return total;
}

/*
 * Top-k targets. Per row the cache holds the teacher's k largest raw logits
 * v_i (classes ti_i) and L, the log-sum-exp of the full raw row at T = 1. The
 * distributions are compared over k + 1 buckets: the k cached classes and one
 * tail bucket holding the other C - k classes.
 *
 *   tail mass at T = 1:  m = 1 - sum_i exp(v_i - L), clamped to
 *                        [min(FLOOR, m_hi), m_hi], m_hi = min(1, (C-k) exp(v_min - L))
 *                        (every tail logit is <= v_min; FLOOR = 1e-12 absorbs the rounding
 *                        of 1 - sum when the top-k holds nearly all the mass)
 *   tail logits:         assumed equal, u = L + log(m / (C - k)), so at temperature T
 *                        the tail bucket's teacher log-weight is u / T + log(C - k)
 *   teacher buckets:     log q_i = v_i / T - Z, log q_tail = u / T + log(C - k) - Z,
 *                        Z = logsumexp(v_1 / T, ..., v_k / T, u / T + log(C - k))
 *   student buckets:     log P_i = s_{ti_i} / T - LS, log P_tail = LS_tail - LS, LS_tail the
 *                        log-sum-exp of s / T over the tail classes, computed directly (not as
 *                        1 - sum P_i, which cancels when the top-k dominates)
 *   loss:                forward KL(q || P), reverse KL(P || q) over the buckets, times coef
 *   gradient (b = s / T; divide by T for s):
 *     forward  cached class:  P_i - q_i
 *              tail class j:  p_j - q_tail * p_j / P_tail  (the teacher's tail mass spread
 *                             in proportion to the student's tail probabilities)
 *     reverse  any class j:   p_j * (g_B(j) - KL), g_B = log P_B - log q_B, B(j) j's bucket
 *
 * With k == C there is no tail bucket and this is the dense loss exactly. Masking follows
 * the dense rules bucket by bucket (an infinite reverse row gets the gradient of the
 * student's mass on the buckets where q is 0). Indices that are out of range or repeated
 * give the row a NaN loss and a zero gradient.
 */
static double OP(kd_topk_row)(int c, int k, const T *s, const T *tv, const int32_t *ti, double lse,
                              T inv_t, int reverse, T *d, double kk, int32_t *sorted)
{
    const double it = (double)inv_t;
    if (sorted) {
        memcpy(sorted, ti, sizeof(int32_t) * k);
        qsort(sorted, k, sizeof(int32_t), kd_cmp_i32);
    }
    int bad = !sorted || k < 1 || k > c;
    for (int i = 0; !bad && i < k; i++)
        bad = sorted[i] < 0 || sorted[i] >= c || (i > 0 && sorted[i] == sorted[i - 1]);
    if (bad) {
        if (d)
            memset(d, 0, sizeof(T) * c);
        return NAN;
    }
    const int has_tail = k < c;
    /* student: online log-sum-exp over the tail segments between the sorted cached classes */
    OP(kd_lse) tail = {-INFINITY, 0};
    int prev = -1;
    for (int i = 0; i <= k; i++) {
        int next = i < k ? sorted[i] : c;
        if (next - prev - 1 > 0)
            OP(kd_lse_stream)(s + prev + 1, next - prev - 1, inv_t, &tail);
        prev = next;
    }
    /* an empty tail is -inf; a NaN sum (NaN or +inf logits there) stays NaN */
    const double ls_tail = tail.sum == 0 ? -INFINITY : tail.m * it + log(tail.sum);
    double ls = has_tail ? ls_tail : -INFINITY;
    for (int i = 0; i < k; i++)
        ls = kd_logaddexp(ls, (double)s[ti[i]] * it);
    /* teacher buckets */
    double vmin = INFINITY, top_mass = 0;
    for (int i = 0; i < k; i++) {
        double v = (double)tv[i];
        vmin = v < vmin ? v : vmin;
        top_mass += exp(v - lse);
    }
    double a_tail = -INFINITY;
    if (has_tail) {
        double m_hi = (c - k) * exp(vmin - lse);
        m_hi = m_hi < 1 ? m_hi : 1;
        double m = 1 - top_mass;
        m = m > KD_TOPK_TAIL_FLOOR ? m : KD_TOPK_TAIL_FLOOR;
        m = m < m_hi ? m : m_hi;
        if (m > 0)
            a_tail = (lse + log(m) - log((double)(c - k))) * it + log((double)(c - k));
    }
    double z = a_tail;
    for (int i = 0; i < k; i++)
        z = kd_logaddexp(z, (double)tv[i] * it);
    /* bucket log-probabilities: lq (teacher), lp (student); index k is the tail */
    const double l_tail_q = a_tail - z, l_tail_p = ls_tail - ls;
    const int nb = k + has_tail;
    double kl = 0;
    int inf_row = 0;
    /* the target is all -inf (teacher in forward, student in reverse): nothing to match */
    if (z == -INFINITY || (ls == -INFINITY && reverse)) {
        if (d)
            memset(d, 0, sizeof(T) * c);
        return 0;
    }
    for (int b = 0; b < nb; b++) {
        double lq = b < k ? (double)tv[b] * it - z : l_tail_q;
        double lp = b < k ? (double)s[ti[b]] * it - ls : l_tail_p;
        double lt = reverse ? lp : lq, lo = reverse ? lq : lp; /* target, other */
        if (lt == -INFINITY)
            continue;
        if (lo == -INFINITY) {
            inf_row = 1;
            continue;
        }
        kl += exp(lt) * (lt - lo);
    }
    if (inf_row)
        kl = INFINITY;
    else if (kl < 0)
        kl = 0;
    if (!d)
        return kl;
    /* tail classes: d_j = kk * e_j * f with e_j = exp((s_j - M_tail) / T), p_j = e_j A */
    double f = 0;
    const double q_tail = exp(l_tail_q);
    double pm = 0; /* reverse, infinite row: student mass on buckets where q is 0 */
    if (reverse && inf_row) {
        for (int b = 0; b < nb; b++) {
            double lq = b < k ? (double)tv[b] * it - z : l_tail_q;
            double lp = b < k ? (double)s[ti[b]] * it - ls : l_tail_p;
            if (lq == -INFINITY)
                pm += exp(lp);
        }
    }
    if (has_tail && tail.sum > 0) {
        double a = exp(tail.m * it - ls); /* p_j = e_j * a */
        if (!reverse)
            f = a - q_tail / tail.sum; /* p_j - q_tail * e_j / sum_tail(e) */
        else if (!inf_row)
            f = a * (l_tail_p - l_tail_q - kl);
        else
            f = a * ((l_tail_q == -INFINITY ? 1.0 : 0.0) - pm);
    }
    const T fk = (T)(kk * f), sh = OP(kd_shift)(tail.m);
#pragma omp simd
    for (int j = 0; j < c; j++)
        d[j] = fk * KEXP((s[j] - sh) * inv_t);
    for (int i = 0; i < k; i++) {
        double lq = (double)tv[i] * it - z, lp = (double)s[ti[i]] * it - ls;
        double P = exp(lp), g;
        if (!reverse)
            g = P - exp(lq);
        else if (P == 0)
            g = 0;
        else if (!inf_row)
            g = P * (lp - lq - kl);
        else
            g = P * ((lq == -INFINITY ? 1.0 : 0.0) - pm);
        d[ti[i]] = (T)(kk * g);
    }
    return kl;
}

double OP(kd_topk)(int n, int c, int k, const T *s, const T *tv, const int32_t *ti, const T *t_lse,
                   double temperature, int reverse, int t2_scale, T *ds, double scale)
{
    const double coef = t2_scale ? temperature * temperature : 1.0;
    const T inv_t = (T)(1.0 / temperature);
    const double kk = scale * coef / temperature / n;
    double total = 0;
#pragma omp parallel reduction(+ : total) if ((long)n * c > 32768)
    {
        int32_t stack[KD_TOPK_STACK];
        int32_t *sorted = k <= KD_TOPK_STACK ? stack : malloc(sizeof(int32_t) * (k > 0 ? k : 1));
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            size_t off = (size_t)i * c, koff = (size_t)i * k;
            total += coef * OP(kd_topk_row)(c, k, s + off, tv + koff, ti + koff, (double)t_lse[i],
                                            inv_t, reverse, ds ? ds + off : NULL, kk, sorted);
        }
        if (sorted != stack)
            free(sorted);
    }
    return total;
}

/*
 * Decoupled KD (the `dkd` term; engine/loss_kd.md, "Decoupled KD"): with the label y of the row,
 * a = t/T, b = s/T, the target-class KD compares the binary distributions (p_y, 1 - p_y) of
 * teacher and student, the non-target KD their softmaxes over the other C - 1 classes:
 *   loss = coef * (alpha * KL(bin_t || bin_s) + beta * KL(nt_t || nt_s)),  coef = T^2 or 1.
 * Standard KD is the case beta = 1 - p_y(teacher) row by row, which is why a confident teacher
 * passes almost nothing of its other classes on through it; dkd keeps beta fixed.
 * Gradient (d/ds = coef/T * d/db), with P = student softmax, q = P restricted to y' != y and
 * renormalised, bt = teacher p_y, r = teacher's non-target softmax:
 *   j == y: alpha * (P_y - bt);   j != y: alpha * q_j * (bt - P_y) + beta * (q_j - r_j).
 * Per row in double (engine/dkd_row.h, shared with the CUDA kernel); no tensor is stored.
 * A teacher p_y or non-target term of probability 0 adds nothing; a label outside [0, C)
 * makes its row NaN with a zero gradient (as on the GPU).
 */
KD_DEFINE_DKD_ROW(OP(kd_dkd_row), T, static)

double OP(kd_dkd)(int n, int c, const T *s, const T *t, const int32_t *labels, double temperature,
                  double alpha, double beta, int t2_scale, T *ds, double scale)
{
    const double coef = t2_scale ? temperature * temperature : 1.0, inv_t = 1.0 / temperature;
    const double kk = scale * coef * inv_t / n;
    double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if ((long)n * c > 32768)
    for (int i = 0; i < n; i++) {
        const size_t off = (size_t)i * c;
        total += coef * OP(kd_dkd_row)(c, s + off, t + off, labels[i], inv_t, alpha, beta,
                                       ds ? ds + off : NULL, kk);
    }
    return total;
}

#undef KEXP
