/*
 * quant.c - symmetric per-output-channel weight quantization (see quant.h).
 */
#include "quant.h"

#include <math.h>
#include <string.h>

#include "model.h"

int kd_quant_qmax(int bits) { return bits == 8 ? 127 : bits == 4 ? 7 : 0; }

void kd_quant_row_scales(const float *w, int64_t out_c, int64_t k, int bits, float *scales)
{
    int qmax = kd_quant_qmax(bits);
    for (int64_t o = 0; o < out_c; o++) {
        float m = 0.0f;
        for (int64_t j = 0; j < k; j++)
            m = fmaxf(m, fabsf(w[o * k + j]));
        scales[o] = qmax ? m / (float)qmax : 0.0f;
    }
}

int kd_quant_round(float w, float scale, int qmax)
{
    if (!(scale > 0.0f))
        return 0;
    float r = roundf(w / scale); /* half away from zero */
    if (r != r) /* NaN has no integer (the conversion is undefined); callers keep it apart */
        return 0;
    return r > (float)qmax ? qmax : r < (float)-qmax ? -qmax : (int)r;
}

void kd_quant_fake_rows(const float *w, int64_t out_c, int64_t k, int bits, float *wq)
{
    int qmax = kd_quant_qmax(bits);
    for (int64_t o = 0; o < out_c; o++) {
        float m = 0.0f; /* the scale of the row's finite weights */
        for (int64_t j = 0; j < k; j++)
            m = isfinite(w[o * k + j]) ? fmaxf(m, fabsf(w[o * k + j])) : m;
        float s = qmax ? m / (float)qmax : 0.0f;
        /* a non-finite weight stays as it is, so that a diverged run's forward pass is not
         * finite */
        for (int64_t j = 0; j < k; j++) {
            const float x = w[o * k + j];
            wq[o * k + j] = isfinite(x) ? s * (float)kd_quant_round(x, s, qmax) : x;
        }
    }
}

void kd_quant_act_qparams(float rmin, float rmax, float *scale, int32_t *zero_point)
{
    double lo = rmin < 0 ? rmin : 0, hi = rmax > 0 ? rmax : 0;
    if (!(hi - lo > 1e-30)) { /* an all-zero tensor: any scale represents it; keep [0, 1] */
        *scale = 1.0f / 255.0f;
        *zero_point = -128;
        return;
    }
    float s = (float)((hi - lo) / 255.0);
    double z = round(-128.0 - lo / (double)s);
    *scale = s;
    *zero_point = (int32_t)(z < -128 ? -128 : z > 127 ? 127 : z);
}

void kd_quant_fake_act_on(float *x, size_t n, float scale, int32_t zero_point)
{
    const float inv = 1.0f / scale, zp = (float)zero_point;
    for (size_t i = 0; i < n; i++) {
        float q = roundf(x[i] * inv) + zp;
        q = q < -128.0f ? -128.0f : q > 127.0f ? 127.0f : q;
        x[i] = x[i] == x[i] ? scale * (q - zp) : x[i];
    }
}

void kd_quant_fake_act(float *x, size_t n, float *scale, int32_t *zero_point)
{
    float lo = 0.0f, hi = 0.0f;
    for (size_t i = 0; i < n; i++) { /* NaN compares false: it leaves the range alone */
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    kd_quant_act_qparams(lo, hi, scale, zero_point);
    kd_quant_fake_act_on(x, n, *scale, *zero_point);
}

void kd_quant_model_apply(kd_model *m, int bits, float *saved)
{
    memcpy(saved, m->params, m->nparams * sizeof(float));
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        if (e->kind != KD_ENTRY_PARAM || !e->decay || e->ndim < 2 || e->shape[0] < 1)
            continue;
        float *w = m->params + e->offset;
        kd_quant_fake_rows(w, e->shape[0], (int64_t)e->numel / e->shape[0], bits, w);
    }
}

void kd_quant_model_restore(kd_model *m, const float *saved)
{
    memcpy(m->params, saved, m->nparams * sizeof(float));
}
