/*
 * dkd_row.h - one row of the decoupled KD loss (engine/loss_kd.md, "Decoupled KD"), written once
 * for the CPU op (engine/loss_kd_body.h, float and double) and the CUDA kernel (kernels/dkd.cu).
 *
 * KD_DEFINE_DKD_ROW(NAME, T, QUAL) defines
 *   QUAL double NAME(int c, const T *s, const T *t, int y, double inv_t, double alpha,
 *                    double beta, T *ds, double kk)
 * returning the row's alpha * target-class KL + beta * non-target KL (before the T^2 factor)
 * and, when ds is not NULL, writing ds[j] = kk * (its gradient with respect to s[j] / T). All
 * arithmetic in double, from log-sum-exps over the non-target classes taken about their own
 * maximum (so a label logit far ahead of the rest underflows nothing). A label outside [0, c)
 * gives NaN and a zero gradient; a single class, 0 and a zero gradient; NaN or +inf logits a
 * NaN loss.
 */
#ifndef KD_DKD_ROW_H
#define KD_DKD_ROW_H

#include <math.h>

#define KD_DEFINE_DKD_ROW(NAME, T, QUAL)                                                           \
    QUAL double NAME(int c, const T *s, const T *t, int y, double inv_t, double alpha,             \
                     double beta, T *ds, double kk)                                                \
    {                                                                                              \
        if (y < 0 || y >= c || c < 2) {                                                            \
            /* no such label (NaN row), or no other class to compare (a zero row) */               \
            if (ds)                                                                                \
                for (int j = 0; j < c; j++)                                                        \
                    ds[j] = (T)0;                                                                  \
            return y < 0 || y >= c ? NAN : 0.0;                                                    \
        }                                                                                          \
        /* maxima and sums over the non-target classes, so that both sums are >= 1 however far     \
         * the label's logit leads, then the full log-sum-exps from them */                        \
        double ma = -INFINITY, mb = -INFINITY;                                                     \
        for (int j = 0; j < c; j++) {                                                              \
            if (j == y)                                                                            \
                continue;                                                                          \
            ma = fmax(ma, (double)t[j] * inv_t);                                                   \
            mb = fmax(mb, (double)s[j] * inv_t);                                                   \
        }                                                                                          \
        double za = 0, zb = 0;                                                                     \
        for (int j = 0; j < c; j++) {                                                              \
            if (j == y)                                                                            \
                continue;                                                                          \
            za += exp((double)t[j] * inv_t - ma);                                                  \
            zb += exp((double)s[j] * inv_t - mb);                                                  \
        }                                                                                          \
        const double na = ma + log(za), nb = mb + log(zb); /* log-sum-exps of the non-targets */   \
        const double ya = (double)t[y] * inv_t, yb = (double)s[y] * inv_t;                         \
        const double la = fmax(ya, na) + log1p(exp(-fabs(ya - na)));                               \
        const double lb = fmax(yb, nb) + log1p(exp(-fabs(yb - nb)));                               \
        const double bt = exp(ya - la), ct = exp(na - la); /* teacher p_y and 1 - p_y */           \
        const double ps = exp(yb - lb);                                                            \
        double tc = 0; /* KL of (p_y, 1 - p_y): teacher against student */                         \
        if (bt > 0)                                                                                \
            tc += bt * ((ya - la) - (yb - lb));                                                    \
        if (ct > 0)                                                                                \
            tc += ct * ((na - la) - (nb - lb));                                                    \
        double nc = 0; /* KL of the non-target softmaxes */                                        \
        for (int j = 0; j < c; j++) {                                                              \
            if (j == y)                                                                            \
                continue;                                                                          \
            const double lr = (double)t[j] * inv_t - na, r = exp(lr);                              \
            if (r > 0)                                                                             \
                nc += r * (lr - ((double)s[j] * inv_t - nb));                                      \
        }                                                                                          \
        if (ds) {                                                                                  \
            for (int j = 0; j < c; j++) {                                                          \
                double g = alpha * (ps - bt);                                                      \
                if (j != y) {                                                                      \
                    const double q = exp((double)s[j] * inv_t - nb);                               \
                    const double r = exp((double)t[j] * inv_t - na);                               \
                    g = alpha * q * (bt - ps) + beta * (q - r);                                    \
                }                                                                                  \
                ds[j] = (T)(kk * g);                                                               \
            }                                                                                      \
        }                                                                                          \
        /* NaN or +inf logits leave a log-sum-exp NaN or infinite: the row is NaN, not the         \
         * partial sum of the terms its NaNs failed to enter */                                    \
        return isfinite(la) && isfinite(lb) ? alpha * tc + beta * nc : NAN;                        \
    }

#endif
