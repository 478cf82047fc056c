/*
 * dkd_row.h - one row of the decoupled KD loss (engine/loss_kd.md, "Decoupled KD"), written once
 * for the CPU op (engine/loss_kd_body.h, float and double) and the CUDA kernel (kernels/dkd.cu).
 *
 * KD_DEFINE_DKD_ROW(NAME, T, QUAL) defines
 *   QUAL double NAME(int c, const T *s, const T *t, int y, double inv_t, double alpha,
 *                    double beta, T *ds, double kk)
 * returning the row's alpha * target-class KL + beta * non-target KL (before the T^2 factor)
 * and, when ds is not NULL, writing ds[j] = kk * (its gradient with respect to s[j] / T). All
 * arithmetic in double; y must be in [0, c).
 */
#ifndef KD_DKD_ROW_H
#define KD_DKD_ROW_H

#include <math.h>

#define KD_DEFINE_DKD_ROW(NAME, T, QUAL)                                                           \
    QUAL double NAME(int c, const T *s, const T *t, int y, double inv_t, double alpha,             \
                     double beta, T *ds, double kk)                                                \
    {                                                                                              \
        double ma = -INFINITY, mb = -INFINITY;                                                     \
        for (int j = 0; j < c; j++) {                                                              \
            ma = fmax(ma, (double)t[j] * inv_t);                                                   \
            mb = fmax(mb, (double)s[j] * inv_t);                                                   \
        }                                                                                          \
        double za = 0, zb = 0; /* non-target sums, relative to the row maxima */                   \
        for (int j = 0; j < c; j++) {                                                              \
            if (j == y)                                                                            \
                continue;                                                                          \
            za += exp((double)t[j] * inv_t - ma);                                                  \
            zb += exp((double)s[j] * inv_t - mb);                                                  \
        }                                                                                          \
        const double ea = exp((double)t[y] * inv_t - ma), eb = exp((double)s[y] * inv_t - mb);     \
        const double la = log(ea + za), lb = log(eb + zb); /* full log-sum-exps, less the max */   \
        const double bt = ea / (ea + za), ps = eb / (eb + zb);                                     \
        double tc = 0; /* KL of (bt, 1 - bt) against (ps, 1 - ps) */                               \
        if (bt > 0)                                                                                \
            tc += bt * (((double)t[y] * inv_t - ma - la) - ((double)s[y] * inv_t - mb - lb));      \
        if (za > 0)                                                                                \
            tc += (1.0 - bt) * ((log(za) - la) - (log(zb) - lb));                                  \
        const double lza = za > 0 ? log(za) : 0, lzb = zb > 0 ? log(zb) : 0;                       \
        double nc = 0; /* KL of the non-target softmaxes */                                        \
        for (int j = 0; j < c; j++) {                                                              \
            if (j == y)                                                                            \
                continue;                                                                          \
            const double lr = (double)t[j] * inv_t - ma - lza, r = exp(lr);                        \
            if (r > 0)                                                                             \
                nc += r * (lr - ((double)s[j] * inv_t - mb - lzb));                                \
        }                                                                                          \
        if (ds) {                                                                                  \
            for (int j = 0; j < c; j++) {                                                          \
                double g = alpha * (ps - bt);                                                      \
                if (j != y) {                                                                      \
                    const double q = zb > 0 ? exp((double)s[j] * inv_t - mb - lzb) : 0;            \
                    const double r = za > 0 ? exp((double)t[j] * inv_t - ma - lza) : 0;            \
                    g = alpha * q * (bt - ps) + beta * (q - r);                                    \
                }                                                                                  \
                ds[j] = (T)(kk * g);                                                               \
            }                                                                                      \
        }                                                                                          \
        return alpha * tc + beta * nc;                                                             \
    }

#endif
