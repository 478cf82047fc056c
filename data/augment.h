/*
 * augment.h - reproducible image augmentation and batch assembly.
 *
 * Augmentation is split into drawing parameters and applying them. The draw
 * for a sample is a pure function of (seed, epoch, dataset index), so a
 * sample gets the same view in an epoch wherever it lands in a batch, and a
 * teacher-logit cache can store the KD_AUG_NPARAMS floats next to the logits
 * and replay the exact view later.
 *
 * Parameters: dx, dy (integers stored as floats) shift the image content
 * right/down by that many pixels; flip (0 or 1) mirrors left-right after the
 * shift. So dst(y, x) = src(y - dy, x' - dx) with x' = flip ? w-1-x : x, and
 * positions that fall outside src take the fill value.
 */
#ifndef KD_AUGMENT_H
#define KD_AUGMENT_H

#include <stddef.h>
#include <stdint.h>

#include "dataset.h"

#define KD_AUG_NPARAMS 3 /* dx, dy, flip */

typedef struct {
    int crop_pad; /* dx, dy uniform in [-crop_pad, crop_pad]; 0 disables */
    int hflip;    /* nonzero: flip with probability 0.5 */
} kd_augment_cfg;

/* 1 when cfg augments anything (a crop pad or flips); NULL augments nothing. Inline: the config
 * code uses it without linking the augmentation. */
static inline int kd_augment_on(const kd_augment_cfg *cfg)
{
    return cfg && (cfg->crop_pad > 0 || cfg->hflip);
}

/* The configuration as one short string, the teacher cache's `augment` attribute: "none" when
 * cfg is NULL or augments nothing, else "crop_pad=N hflip=0|1". len >= KD_AUG_DESC_LEN. */
#define KD_AUG_DESC_LEN 48
void kd_augment_describe(const kd_augment_cfg *cfg, char *buf, size_t len);

/*
 * Draw the parameters for sample `index` of `epoch`: counter-based
 * (kd_mix64(seed, epoch, index) seeds the draw), so they are the same
 * whatever order samples are visited in. cfg NULL draws the identity.
 */
void kd_augment_draw(const kd_augment_cfg *cfg, uint64_t seed, uint64_t epoch, uint64_t index,
                     float params[KD_AUG_NPARAMS]);

/* kd_augment_draw for each of idx[0..count) (the draw counter is the sample index) into
 * params[i * KD_AUG_NPARAMS ..]; cfg NULL gives zeros (the identity). */
void kd_augment_draw_batch(const kd_augment_cfg *cfg, uint64_t seed, uint64_t epoch,
                           const uint32_t *idx, int count, float *params);

/* Apply recorded parameters: dst and src are c*h*w, must not alias. */
void kd_augment_apply(const float params[KD_AUG_NPARAMS], const float *src, float *dst, int c,
                      int h, int w, float fill);

/*
 * Batch assembly from recorded parameters: x_out[i] (c*h*w floats) is sample idx[i] of x_all
 * (samples of c*h*w floats back to back) with params[i * KD_AUG_NPARAMS ..] applied, fill
 * outside the shifted image; y_out[i] = y_all[idx[i]] (y_out may be NULL). Every idx[i] must
 * index x_all. This is the CPU backend's gather_augment slot (backend.h), which the CUDA
 * kernel (kernels/augment.cu) must equal bit for bit.
 */
void kd_augment_gather(int count, int c, int h, int w, const float *x_all, const int32_t *y_all,
                       const uint32_t *idx, const float *params, float fill, float *x_out,
                       int32_t *y_out);

/*
 * Copy samples idx[0..count) of d into x_out (count*c*h*w) and y_out (count;
 * may be NULL), augmenting with aug (NULL = none) using idx[i] as the draw
 * counter. params_out (may be NULL) receives count*KD_AUG_NPARAMS floats,
 * zeros when aug is NULL. The fill is the normalised black pixel of d.
 * Every idx[i] must be below d->n.
 */
void kd_batch_gather(const kd_dataset *d, const uint32_t *idx, int count, const kd_augment_cfg *aug,
                     uint64_t seed, uint64_t epoch, float *x_out, int32_t *y_out,
                     float *params_out);

#endif
