/*
 * calibrate.c - activation ranges from the float graph run over calibration samples.
 *
 * Two passes over the samples: the first records each tensor's min and max, the second fills a
 * histogram of KD_CALIB_BINS bins over [min, max] and one of |x| over [0, max |x|]. The range of a
 * tensor is then the candidate with the smallest estimated quantization MSE, where a value inside
 * the representable interval costs scale^2 / 12 (uniform rounding error) and one outside it the
 * square of its distance to the interval (clipping). Bins stand for their centres; with 2048 bins
 * even a range clipped to 1/100 of the data's span has tens of bins per quantization step, so
 * the estimate is good to a few percent. A later candidate must beat the best so far by 1 %
 * (min/max comes first), so clipping is chosen only where it pays.
 *
 * Tensors that share another's quantization (pool outputs) are skipped and copy it at the end;
 * SOFTMAX outputs have the fixed quantization kdm.h gives them (scale 1/256, zero-point -128).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"
#include "quant.h"

#define KD_CALIB_BINS 2048
/* a clipped range must beat the current choice by this factor: shaving a few values off a flat
 * distribution always lowers the MSE a hair, and is not worth clipping real values for */
#define KD_CALIB_MARGIN 0.99
#define KD_CALIB_PCTS   4

void kd_export_range_qparams(float rmin, float rmax, float *scale, int32_t *zero_point)
{
    kd_quant_act_qparams(rmin, rmax, scale, zero_point); /* one rule for training and export */
}

/* Estimated MSE of quantizing the histogram (nbins over [lo, hi]) to [rmin, rmax]. */
static double range_mse(const double *counts, int nbins, float lo, float hi, float rmin, float rmax)
{
    float s;
    int32_t zp;
    kd_export_range_qparams(rmin, rmax, &s, &zp);
    double a = (double)s * (-128 - zp), b = (double)s * (127 - zp);
    double width = ((double)hi - lo) / nbins, inside = (double)s * s / 12.0;
    double err = 0, total = 0;
    for (int i = 0; i < nbins; i++) {
        if (counts[i] == 0)
            continue;
        double v = lo + (i + 0.5) * width;
        double e = v < a ? (a - v) * (a - v) : v > b ? (v - b) * (v - b) : inside;
        err += counts[i] * e;
        total += counts[i];
    }
    return total > 0 ? err / total : 0;
}

/* The value below which `mass` of the histogram's weight lies (linear within a bin). */
static double hist_quantile(const double *counts, int nbins, double lo, double hi, double mass)
{
    double width = (hi - lo) / nbins, cum = 0;
    for (int i = 0; i < nbins; i++) {
        if (cum + counts[i] >= mass && counts[i] > 0)
            return lo + (i + (mass - cum) / counts[i]) * width;
        cum += counts[i];
    }
    return hi;
}

double kd_export_range_choice(const double *counts, const double *abs_counts, int nbins, float lo,
                              float hi, float *rmin, float *rmax, char choice[16])
{
    double total = 0;
    for (int i = 0; i < nbins; i++)
        total += counts[i];
    float best_lo = lo < 0 ? lo : 0, best_hi = hi > 0 ? hi : 0;
    snprintf(choice, 16, "minmax");
    if (!(hi > lo) || total <= 0) {
        *rmin = best_lo;
        *rmax = best_hi;
        return 0;
    }
    double best = range_mse(counts, nbins, lo, hi, best_lo, best_hi);
    /* at 8 bits clipping pays only when what it cuts is rare: a clipped value costs its squared
     * distance, a kept outlier costs every value (range / 255)^2 / 12, so the break-even mass is
     * about one value in a million; hence percentiles that close to the extremes */
    static const double pct[KD_CALIB_PCTS] = {99.9, 99.99, 99.999, 99.9999};
    double amax = fmax(fabs((double)lo), fabs((double)hi));
    for (int k = 0; k < KD_CALIB_PCTS; k++) {
        double tail = (1.0 - pct[k] / 100.0) * total;
        /* central interval: half the clipped mass on each side */
        double cl = hist_quantile(counts, nbins, lo, hi, tail / 2);
        double ch = hist_quantile(counts, nbins, lo, hi, total - tail / 2);
        /* percentile of |x|: one bound for both signs */
        double ab = hist_quantile(abs_counts, nbins, 0, amax, total - tail);
        double cand[2][2] = {{cl, ch}, {fmax(lo, -ab), fmin(hi, ab)}};
        for (int v = 0; v < 2; v++) {
            float a = (float)fmin(cand[v][0], 0), b = (float)fmax(cand[v][1], 0);
            if (!(b > a))
                continue;
            double e = range_mse(counts, nbins, lo, hi, a, b);
            if (e < KD_CALIB_MARGIN * best) {
                best = e;
                best_lo = a;
                best_hi = b;
                snprintf(choice, 16, "%s%g", v ? "abs" : "p", pct[k]);
            }
        }
    }
    *rmin = best_lo;
    *rmax = best_hi;
    return best;
}

static int own_range(const kd_export_graph *g, int i)
{
    const kd_export_tensor *t = &g->t[i];
    return t->qsrc == i && !(t->producer >= 0 && g->op[t->producer].type == KDM_OP_SOFTMAX);
}

kd_status kd_export_calibrate(kd_export_graph *g, const float *x, int64_t n, float pixel_lo,
                              float pixel_hi, kd_export_progress_fn progress, void *progress_ctx)
{
    if (n < 1)
        return KD_FAIL(KD_ERR_INVALID, "export: calibration needs at least one sample");
    kd_export_acts a = {0};
    KD_TRY(kd_export_acts_new(g, &a));
    size_t per = (size_t)g->in_c * g->in_h * g->in_w;
    double *hist = calloc((size_t)g->nt * 2 * KD_CALIB_BINS, sizeof(double));
    if (!hist) {
        kd_export_acts_free(&a);
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    double **sums = calloc((size_t)g->nt, sizeof *sums);
    if (!sums) {
        kd_export_acts_free(&a);
        free(hist);
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    kd_status st = KD_OK;
    for (int i = 0; i < g->nt; i++) {
        kd_export_tensor *t = &g->t[i];
        t->seen_min = INFINITY;
        t->seen_max = -INFINITY;
        free(t->ch_mean);
        free(t->ch_msq);
        t->ch_mean = calloc((size_t)t->c, sizeof(float));
        t->ch_msq = calloc((size_t)t->c, sizeof(float));
        sums[i] = calloc(2 * (size_t)t->c, sizeof(double));
        if (!t->ch_mean || !t->ch_msq || !sums[i])
            st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    for (int pass = 0; pass < 2 && st == KD_OK; pass++) {
        for (int64_t s = 0; s < n; s++) {
            if (progress && (s % 64 == 0 || s == n - 1))
                progress(progress_ctx, "calibrate", pass * n + s + 1, 2 * n);
            kd_export_forward(g, x + (size_t)s * per, &a);
            for (int i = 0; i < g->nt; i++) {
                kd_export_tensor *t = &g->t[i];
                const float *v = a.v[i];
                if (pass == 0) {
                    double *sm = sums[i], *sq = sums[i] + t->c;
                    for (uint32_t j = 0; j < t->bytes; j++) { /* a NaN sticks in seen_min */
                        t->seen_min = v[j] < t->seen_min || v[j] != v[j] ? v[j] : t->seen_min;
                        t->seen_max = v[j] > t->seen_max ? v[j] : t->seen_max;
                        sm[j % (uint32_t)t->c] += v[j];
                        sq[j % (uint32_t)t->c] += (double)v[j] * v[j];
                    }
                    continue;
                }
                if (!own_range(g, i) || !(t->seen_max > t->seen_min))
                    continue;
                double *h = hist + (size_t)i * 2 * KD_CALIB_BINS, *ha = h + KD_CALIB_BINS;
                double lo = t->seen_min, span = (double)t->seen_max - lo;
                double amax = fmax(fabs((double)t->seen_min), fabs((double)t->seen_max));
                for (uint32_t j = 0; j < t->bytes; j++) {
                    int b = (int)((v[j] - lo) / span * KD_CALIB_BINS);
                    int ba = (int)(fabs((double)v[j]) / amax * KD_CALIB_BINS);
                    h[b < 0 ? 0 : b >= KD_CALIB_BINS ? KD_CALIB_BINS - 1 : b] += 1;
                    ha[ba < 0 ? 0 : ba >= KD_CALIB_BINS ? KD_CALIB_BINS - 1 : ba] += 1;
                }
            }
        }
        /* after the ranges, before any histogram is binned from them */
        for (int i = 0; pass == 0 && i < g->nt; i++)
            if (!isfinite(g->t[i].seen_min) || !isfinite(g->t[i].seen_max)) {
                st = KD_FAIL(KD_ERR_INVALID,
                             "export: tensor %d (output of op %d) takes non-finite values on the "
                             "calibration samples: the float model overflows float32 on them "
                             "(distill eval refuses such a checkpoint too)",
                             i, g->t[i].producer);
                break;
            }
    }
    for (int i = 0; i < g->nt && st == KD_OK; i++) {
        kd_export_tensor *t = &g->t[i];
        double cnt = (double)n * t->h * t->w;
        for (int c = 0; c < t->c; c++) {
            t->ch_mean[c] = (float)(sums[i][c] / cnt);
            t->ch_msq[c] = (float)(sums[i][t->c + c] / cnt);
        }
        if (!own_range(g, i))
            continue;
        if (i == g->input && pixel_lo < pixel_hi) {
            t->rmin = pixel_lo < 0 ? pixel_lo : 0;
            t->rmax = pixel_hi > 0 ? pixel_hi : 0;
            snprintf(t->choice, sizeof t->choice, "pixels");
        } else {
            const double *h = hist + (size_t)i * 2 * KD_CALIB_BINS;
            kd_export_range_choice(h, h + KD_CALIB_BINS, KD_CALIB_BINS, t->seen_min, t->seen_max,
                                   &t->rmin, &t->rmax, t->choice);
        }
        kd_export_range_qparams(t->rmin, t->rmax, &t->scale, &t->zero_point);
    }
    for (int i = 0; i < g->nt && st == KD_OK; i++) {
        kd_export_tensor *t = &g->t[i];
        if (t->producer >= 0 && g->op[t->producer].type == KDM_OP_SOFTMAX) {
            t->rmin = 0;
            t->rmax = 255.0f / 256.0f;
            t->scale = 1.0f / 256.0f;
            t->zero_point = -128;
            snprintf(t->choice, sizeof t->choice, "fixed");
        } else if (t->qsrc != i) {
            const kd_export_tensor *src = &g->t[t->qsrc];
            t->rmin = src->rmin;
            t->rmax = src->rmax;
            t->scale = src->scale;
            t->zero_point = src->zero_point;
            snprintf(t->choice, sizeof t->choice, "input's");
        }
    }
    for (int i = 0; i < g->nt; i++)
        free(sums[i]);
    free(sums);
    kd_export_acts_free(&a);
    free(hist);
    return st;
}
