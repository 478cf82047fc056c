/*
 * quantize.c - integers of a calibrated graph: weights, folded biases, requantization
 * multipliers, ADD and SOFTMAX parameters, output clamps.
 *
 * Scales. Weights are symmetric per output channel (kd_quant_* from engine/quant.h); the bias of
 * channel o is an int32 at scale s_in * s_w[o] with the input zero-point term folded in, so the
 * runtime accumulates raw int8 inputs: acc = bias_q[o] + sum q_w * q_x equals
 * (b + sum w * x_real) / (s_in s_w[o]) up to rounding. The accumulator is brought to the output
 * scale by M = s_in s_w[o] / s_out, stored as a Q31 multiplier and a power-of-two shift
 * (kd_quant_multiplier) the way TFLite's QuantizeMultiplier does: frexp gives M = q 2^e with q in
 * [0.5, 1), multiplier = round(q 2^31) (2^31 itself becomes 2^30 with e + 1), shift = e.
 *
 * A channel whose weights are all zero has no scale of its own; its output is the constant
 * act(b), so it gets a nominal scale putting its bias at 2^16 codes, enough to represent b to
 * the output's precision (multiplier 0 when b is 0 too).
 */
#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"
#include "quant.h"

kd_status kd_quant_multiplier(double real, int32_t *mult, int32_t *shift)
{
    *mult = 0;
    *shift = 0;
    if (!(real >= 0) || !isfinite(real))
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "export: requantization factor %g is not a finite "
                       "non-negative number",
                       real);
    if (real == 0)
        return KD_OK;
    int e;
    double q = frexp(real, &e); /* real = q * 2^e, q in [0.5, 1) */
    int64_t m = llround(q * 2147483648.0);
    if (m == INT64_C(2147483648)) {
        m /= 2;
        e++;
    }
    if (e < -31)
        return KD_OK; /* below 2^-32: every int32 accumulator rounds to 0 */
    if (e > 30)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "export: requantization factor %g is too large (at most 2^30)", real);
    *mult = (int32_t)m;
    *shift = e;
    return KD_OK;
}

kd_status kd_quant_acc_fits(int32_t bias_q, const int8_t *q, int k, int left)
{
    int64_t lo = bias_q, hi = bias_q;
    for (int j = 0; j < k; j++) {
        lo += q[j] >= 0 ? -128 * (int64_t)q[j] : 127 * (int64_t)q[j];
        hi += q[j] >= 0 ? 127 * (int64_t)q[j] : -128 * (int64_t)q[j];
    }
    if (lo * ((int64_t)1 << left) < INT32_MIN || hi * ((int64_t)1 << left) > INT32_MAX)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "export: its accumulator can reach [%" PRId64 ", %" PRId64 "]%s, beyond "
                       "int32, so the runtime's outputs would wrap (the bias, %" PRId32
                       " codes, is far larger than what the weights add)",
                       lo, hi, left ? " before the requantization's left shift" : "", bias_q);
    return KD_OK;
}

kd_status kd_quant_bias(double b, double s_in, double s_w, int32_t zp_in, int64_t sum_q,
                        int32_t *out)
{
    double s = s_in * s_w;
    double r = s > 0 ? round(b / s) : 0;
    double v = r - (double)zp_in * (double)sum_q;
    if (!(fabs(v) <= 2147483647.0))
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "export: bias %g at scale %g is %.0f codes, beyond int32 (the weights of "
                       "its channel are far smaller than its bias)",
                       b, s, v);
    *out = (int32_t)v;
    return KD_OK;
}

float kd_quant_clip_scale(const float *w, const float *imp, int64_t k, int bits)
{
    int qmax = kd_quant_qmax(bits);
    float m = 0;
    for (int64_t j = 0; j < k; j++)
        m = fmaxf(m, fabsf(w[j]));
    if (!(m > 0) || !qmax)
        return 0;
    float best_s = m / (float)qmax;
    double best = INFINITY;
    /* from r = 1 down, so max-abs wins ties */
    for (int i = 25; i >= 0; i--) {
        float s = (0.5f + 0.02f * (float)i) * m / (float)qmax;
        double e = 0;
        for (int64_t j = 0; j < k; j++) {
            double d = (double)w[j] - (double)s * kd_quant_round(w[j], s, qmax);
            e += d * d * (imp ? imp[j] : 1.0);
        }
        if (e < best) {
            best = e;
            best_s = s;
        }
    }
    return best_s;
}

static kd_status fail_op(const kd_export_op *o, const char *what)
{
    return kd_fail_context(KD_ERR_UNSUPPORTED, "%s: layer %s (%s): %s: ", o->where, o->name,
                           kd_export_op_type_name(o->type), what);
}

static void clamp_of(const kd_export_tensor *t, int act, int32_t *lo, int32_t *hi)
{
    *lo = -128;
    *hi = 127;
    if (act == KD_EXPORT_ACT_NONE)
        return;
    *lo = t->zero_point > -128 ? t->zero_point : -128;
    if (act == KD_EXPORT_ACT_RELU6) {
        double top = t->zero_point + round(6.0 / t->scale);
        *hi = top < 127 ? (int32_t)(top < *lo ? *lo : top) : 127;
    }
}

/* Bias, multiplier and shift of output channel c from the row's integers and scale. */
static kd_status channel_ints(const kd_export_graph *g, kd_export_op *o, int c)
{
    const kd_export_tensor *ti = &g->t[o->in0], *to = &g->t[o->out];
    int64_t sum = 0;
    for (int j = 0; j < o->row_len; j++)
        sum += o->q[(size_t)c * o->row_len + j];
    double b = (double)o->b[c] + (o->bcorr ? o->bcorr[c] : 0.0);
    double sw = o->wscale[c];
    if (!(sw > 0) && b != 0)
        sw = fabs(b) / ((double)ti->scale * 65536.0);
    char what[48];
    snprintf(what, sizeof what, "output channel %d", c);
    if (kd_quant_bias(b, ti->scale, sw, ti->zero_point, sum, &o->bias_q[c]) ||
        kd_quant_multiplier((double)ti->scale * sw / to->scale, &o->mult[c], &o->shift[c]))
        return fail_op(o, what);
    /* the runtime's accumulator must not wrap (padding reads the zero-point, a raw int8 too) */
    const int left =
        !(g->flags & KDM_FLAG_SINGLE_ROUNDING) && o->mult[c] && o->shift[c] > 0 ? o->shift[c] : 0;
    if (kd_quant_acc_fits(o->bias_q[c], o->q + (size_t)c * o->row_len, o->row_len, left))
        return fail_op(o, what);
    return KD_OK;
}

static kd_status quantize_weights(kd_export_graph *g, kd_export_op *o, int bits, int qat)
{
    const kd_export_tensor *ti = &g->t[o->in0];
    size_t n = (size_t)o->out_c * o->row_len;
    int qmax = kd_quant_qmax(bits);
    o->wbits = bits;
    free(o->q);
    free(o->wscale);
    free(o->bias_q);
    free(o->mult);
    free(o->shift);
    free(o->bcorr);
    o->bcorr = NULL;
    o->q = malloc(n ? n : 1);
    o->wscale = malloc(sizeof(float) * (size_t)o->out_c);
    o->bias_q = malloc(sizeof(int32_t) * (size_t)o->out_c);
    o->mult = malloc(sizeof(int32_t) * (size_t)o->out_c);
    o->shift = malloc(sizeof(int32_t) * (size_t)o->out_c);
    float *imp = malloc(sizeof(float) * (size_t)(o->row_len ? o->row_len : 1));
    kd_status st = KD_OK;
    if (!o->q || !o->wscale || !o->bias_q || !o->mult || !o->shift || !imp) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto done;
    }
    /* int4 post-training: a clipping search, each weight's error weighted by the mean square
     * of the input it multiplies (what the error costs at the output, channels taken apart) */
    int ptq4 = bits == 4 && !qat;
    snprintf(o->wchoice, sizeof o->wchoice, "%s", ptq4 ? "clip" : "maxabs");
    if (!ptq4)
        kd_quant_row_scales(o->w, o->out_c, o->row_len, bits, o->wscale);
    for (int c = 0; c < o->out_c && st == KD_OK; c++) {
        const float *wr = o->w + (size_t)c * o->row_len;
        if (ptq4) {
            for (int j = 0; j < o->row_len && ti->ch_msq; j++)
                imp[j] = ti->ch_msq[o->type == KDM_OP_DEPTHWISE_CONV2D ? c : j % ti->c];
            o->wscale[c] = kd_quant_clip_scale(wr, ti->ch_msq ? imp : NULL, o->row_len, bits);
        }
        /* A channel whose weights are tiny beside its bias (a batchnorm scale near 0 folded
         * in) would need a bias of more than int32 codes at its weights' scale: as TFLite does,
         * its weight scale is raised until the bias is 2^24 codes (its weights then round to
         * the few codes, mostly 0, they are worth beside that bias). */
        const double bias_codes_max = 16777216.0, b = fabs((double)o->b[c]);
        if (o->wscale[c] > 0 && b / ((double)ti->scale * o->wscale[c]) > bias_codes_max)
            o->wscale[c] = (float)(b / ((double)ti->scale * bias_codes_max));
        for (int j = 0; j < o->row_len; j++)
            o->q[(size_t)c * o->row_len + j] = (int8_t)kd_quant_round(wr[j], o->wscale[c], qmax);
        st = channel_ints(g, o, c);
    }
done:
    free(imp);
    return st;
}

static int weighted(const kd_export_op *o)
{
    return o->q && (o->type == KDM_OP_CONV2D || o->type == KDM_OP_DEPTHWISE_CONV2D ||
                    o->type == KDM_OP_FULLY_CONNECTED);
}

kd_status kd_export_bias_correct(kd_export_graph *g, const float *x, int64_t n,
                                 kd_export_progress_fn progress, void *progress_ctx)
{
    int nop = g->nop, maxc = 1;
    float **w = calloc((size_t)nop, sizeof *w), **b = calloc((size_t)nop, sizeof *b);
    kd_export_acts a = {0};
    double *mf = NULL, *mq = NULL;
    kd_status st = KD_OK;
    if (!w || !b) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto done;
    }
    for (int i = 0; i < nop; i++) {
        kd_export_op *o = &g->op[i];
        if (!weighted(o))
            continue;
        size_t nw = (size_t)o->out_c * o->row_len;
        w[i] = malloc(sizeof(float) * (nw ? nw : 1));
        b[i] = malloc(sizeof(float) * (size_t)o->out_c);
        free(o->bcorr);
        o->bcorr = calloc((size_t)o->out_c, sizeof(float));
        if (!w[i] || !b[i] || !o->bcorr) {
            st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
            goto done;
        }
        for (size_t j = 0; j < nw; j++)
            w[i][j] = o->wscale[j / (size_t)o->row_len] * (float)o->q[j];
        memcpy(b[i], o->b, sizeof(float) * (size_t)o->out_c);
        maxc = o->out_c > maxc ? o->out_c : maxc;
    }
    mf = malloc(sizeof(double) * (size_t)maxc);
    mq = malloc(sizeof(double) * (size_t)maxc);
    if (!mf || !mq || (st = kd_export_acts_new(g, &a)))
        goto done;
    size_t per = (size_t)g->in_c * g->in_h * g->in_w;
    for (int i = 0; i < nop; i++) {
        kd_export_op *o = &g->op[i];
        if (!weighted(o))
            continue;
        const kd_export_tensor *t = &g->t[o->out];
        /* the float model, and the model with quantized weights (and corrected biases) up to
         * op i, both stopped at op i's output before its activation */
        kd_export_fwd_opts ff = {-1, i, i, w, b}, fq = {i, i, i, w, b};
        if (progress)
            progress(progress_ctx, "bias correction", i + 1, nop);
        memset(mf, 0, sizeof(double) * (size_t)o->out_c);
        memset(mq, 0, sizeof(double) * (size_t)o->out_c);
        for (int64_t s = 0; s < n; s++) {
            kd_export_forward_ex(g, x + (size_t)s * per, &a, &ff);
            for (uint32_t j = 0; j < t->bytes; j++)
                mf[j % (uint32_t)t->c] += a.v[o->out][j];
            kd_export_forward_ex(g, x + (size_t)s * per, &a, &fq);
            for (uint32_t j = 0; j < t->bytes; j++)
                mq[j % (uint32_t)t->c] += a.v[o->out][j];
        }
        double cnt = (double)n * t->h * t->w;
        for (int c = 0; c < o->out_c && st == KD_OK; c++) {
            o->bcorr[c] = (float)((mf[c] - mq[c]) / cnt);
            b[i][c] = o->b[c] + o->bcorr[c];
            st = channel_ints(g, o, c);
        }
        if (st != KD_OK)
            goto done;
    }
done:
    for (int i = 0; w && b && i < nop; i++) {
        free(w[i]);
        free(b[i]);
    }
    free(w);
    free(b);
    free(mf);
    free(mq);
    kd_export_acts_free(&a);
    return st;
}

static kd_status quantize_add(kd_export_graph *g, kd_export_op *o)
{
    /* TFLite's quantized add: both inputs brought to twice the larger input scale, 20 bits up */
    const kd_export_tensor *a = &g->t[o->in0], *b = &g->t[o->in1], *y = &g->t[o->out];
    double twice = 2.0 * fmax(a->scale, b->scale);
    const int left = 20;
    double r[3] = {a->scale / twice, b->scale / twice, twice / ((double)(1 << left) * y->scale)};
    o->params[0] = left;
    for (int i = 0; i < 3; i++)
        if (kd_quant_multiplier(r[i], &o->params[1 + 2 * i], &o->params[2 + 2 * i]))
            return fail_op(o, "add scales");
    o->nparams = 7;
    return KD_OK;
}

static void quantize_softmax(kd_export_graph *g, kd_export_op *o)
{
    double s = g->t[o->in0].scale;
    for (int d = 0; d < 256; d++)
        o->params[d] = (int32_t)llround(65536.0 * exp(-d * s));
    o->nparams = 256;
}

kd_status kd_export_quantize(kd_export_graph *g, int bits, int qat, int single_rounding)
{
    if (bits != 8 && bits != 4)
        return KD_FAIL(KD_ERR_INVALID, "export: weight bits must be 8 or 4, got %d", bits);
    g->flags = single_rounding ? KDM_FLAG_SINGLE_ROUNDING : 0;
    for (int i = 0; i < g->nop; i++) {
        kd_export_op *o = &g->op[i];
        switch (o->type) {
        case KDM_OP_CONV2D:
        case KDM_OP_DEPTHWISE_CONV2D:
        case KDM_OP_FULLY_CONNECTED:
            KD_TRY(quantize_weights(g, o, o->wbits ? o->wbits : bits, qat));
            break;
        case KDM_OP_ADD: KD_TRY(quantize_add(g, o)); break;
        case KDM_OP_SOFTMAX: quantize_softmax(g, o); break;
        default: break;
        }
        clamp_of(&g->t[o->out], o->act, &o->act_min, &o->act_max);
    }
    return KD_OK;
}
