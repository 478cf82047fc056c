/*
 * quant.h - the weight quantizer shared by quantization-aware training and the exporter.
 *
 * Weights are quantized symmetrically per output channel (mcu_runtime/include/kdm.h): for a row
 * w[o, 0..k) (a conv's O x (I*kh*kw) or a linear's out x in), scale[o] = max|w[o, :]| / qmax
 * with qmax = 127 for 8 bits and 7 for 4 bits, and q = clamp(round(w / scale), -qmax, qmax),
 * rounding half away from zero. A row of zeros gets scale 0 and q = 0.
 *
 * Folding a following BatchNorm multiplies row o by a constant g[o]; with max-abs scales
 * the folded row quantizes to the same integers (its scale is |g[o]| times larger), so
 * training against these fake-quantized weights is training against what the exporter
 * will ship.
 */
#ifndef KD_QUANT_H
#define KD_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* 127 for bits == 8, 7 for bits == 4; 0 for anything else. */
int kd_quant_qmax(int bits);

/* scales[o] for out_c rows of k weights. */
void kd_quant_row_scales(const float *w, int64_t out_c, int64_t k, int bits, float *scales);

/* The integer of one weight given its row's scale (0 for a NaN quotient: pass finite weights). */
int kd_quant_round(float w, float scale, int qmax);

/* wq = scale[o] * q(w): the fake-quantized copy of w (wq may equal w); a non-finite weight is
 * copied as it is, and the row's scale comes from its finite weights. */
void kd_quant_fake_rows(const float *w, int64_t out_c, int64_t k, int bits, float *wq);

/*
 * Activations are int8, asymmetric, per tensor (mcu_runtime/include/kdm.h): the range [lo, hi] is
 * widened to hold 0, scale = (hi - lo) / 255 and zero_point = round(-128 - lo / scale) clamped
 * to [-128, 127]; an empty range gives scale 1/255, zero point -128. The exporter's rule.
 */
void kd_quant_act_qparams(float rmin, float rmax, float *scale, int32_t *zero_point);

/*
 * x[0..n) fake-quantized in place as an int8 activation over its own range (min and max of
 * the values; quantization-aware training uses each batch's range): x = scale * (q - zp) with
 * q = clamp(round(x / scale) + zp, -128, 127), rounding half away from zero. NaN stays NaN.
 * The grid used comes back in *scale, *zero_point.
 */
void kd_quant_fake_act(float *x, size_t n, float *scale, int32_t *zero_point);
/* The same on a given grid (a pooling's output keeps its input's, as the exporter does). */
void kd_quant_fake_act_on(float *x, size_t n, float scale, int32_t zero_point);

/*
 * Quantization-aware training on a model whose parameters are in host memory: replace every
 * conv / linear weight (the state entries weight decay applies to) by its fake-quantized value,
 * after copying all m->nparams parameters to `saved`; restore puts the float master weights
 * back. Forward and backward run between the two, so the gradient computed at the quantized
 * weights updates the float ones (the straight-through estimator; max-abs scales never clip).
 */
struct kd_model;
void kd_quant_model_apply(struct kd_model *m, int bits, float *saved);
void kd_quant_model_restore(struct kd_model *m, const float *saved);

#endif
