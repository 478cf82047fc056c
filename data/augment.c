/*
 * augment.c - shift-with-fill and horizontal flip from recorded parameters.
 *
 * The draw always consumes the generator the same way (dx, dy, then the
 * flip bit) so turning one augmentation off does not reshuffle the others.
 * Its stream constant keeps it apart from the sampler, which also seeds
 * from kd_mix64(seed, epoch, ...). Apply works row by row: a shifted row is
 * a contiguous copy plus fill at either end, and a flip reverses the
 * destination row afterwards, so no per-pixel bounds arithmetic is needed.
 */
#include "augment.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "rng.h"

#define KD_AUGMENT_STREAM 0xa06e47ULL

void kd_augment_describe(const kd_augment_cfg *cfg, char *buf, size_t len)
{
    if (!kd_augment_on(cfg))
        snprintf(buf, len, "none");
    else
        snprintf(buf, len, "crop_pad=%d hflip=%d", cfg->crop_pad > 0 ? cfg->crop_pad : 0,
                 cfg->hflip ? 1 : 0);
}

void kd_augment_draw(const kd_augment_cfg *cfg, uint64_t seed, uint64_t epoch, uint64_t index,
                     float params[KD_AUG_NPARAMS])
{
    kd_rng r;
    kd_rng_seed(&r, kd_mix64(seed, epoch, index), KD_AUGMENT_STREAM);
    int pad = (cfg && cfg->crop_pad > 0) ? cfg->crop_pad : 0;
    uint32_t span = 2u * (uint32_t)pad + 1u;
    int dx = (int)kd_rng_below(&r, span) - pad;
    int dy = (int)kd_rng_below(&r, span) - pad;
    uint32_t coin = kd_rng_u32(&r) >> 31;
    params[0] = (float)dx;
    params[1] = (float)dy;
    params[2] = (cfg && cfg->hflip && coin) ? 1.0f : 0.0f;
}

/* Round to an integer shift, clamped so that garbage parameters cannot overflow the index math. */
static long shift_of(float v, int extent)
{
    if (!(v > -(float)extent))
        return -extent;
    if (!(v < (float)extent))
        return extent;
    return lrintf(v);
}

void kd_augment_apply(const float params[KD_AUG_NPARAMS], const float *src, float *dst, int c,
                      int h, int w, float fill)
{
    long dx = shift_of(params[0], w);
    long dy = shift_of(params[1], h);
    int flip = params[2] >= 0.5f;
    size_t plane = (size_t)h * (size_t)w;

    /* Source columns [x0 - dx, x1 - dx) land in destination columns [x0, x1). */
    long x0 = dx > 0 ? dx : 0;
    long x1 = dx < 0 ? w + dx : w;
    if (x1 < x0)
        x1 = x0 = 0;

    for (int ch = 0; ch < c; ch++) {
        const float *s = src + (size_t)ch * plane;
        float *d = dst + (size_t)ch * plane;
        for (int y = 0; y < h; y++) {
            float *row = d + (size_t)y * (size_t)w;
            long sy = y - dy;
            if (sy < 0 || sy >= h || x1 == x0) {
                for (int x = 0; x < w; x++)
                    row[x] = fill;
                continue;
            }
            for (long x = 0; x < x0; x++)
                row[x] = fill;
            memcpy(row + x0, s + (size_t)sy * (size_t)w + (x0 - dx),
                   (size_t)(x1 - x0) * sizeof *row);
            for (long x = x1; x < w; x++)
                row[x] = fill;
            if (flip) {
                for (int a = 0, b = w - 1; a < b; a++, b--) {
                    float t = row[a];
                    row[a] = row[b];
                    row[b] = t;
                }
            }
        }
    }
}

void kd_augment_gather(int count, int c, int h, int w, const float *x_all, const int32_t *y_all,
                       const uint32_t *idx, const float *params, float fill, float *x_out,
                       int32_t *y_out)
{
    size_t per = (size_t)c * (size_t)h * (size_t)w;
    for (int i = 0; i < count; i++) {
        const float *p = params + (size_t)i * KD_AUG_NPARAMS;
        const float *src = x_all + (size_t)idx[i] * per;
        float *dst = x_out + (size_t)i * per;
        if (p[0] == 0.0f && p[1] == 0.0f && p[2] == 0.0f)
            memcpy(dst, src, per * sizeof *dst);
        else
            kd_augment_apply(p, src, dst, c, h, w, fill);
        if (y_out)
            y_out[i] = y_all[idx[i]];
    }
}

void kd_augment_draw_batch(const kd_augment_cfg *cfg, uint64_t seed, uint64_t epoch,
                           const uint32_t *idx, int count, float *params)
{
    for (int i = 0; i < count; i++) {
        float *p = params + (size_t)i * KD_AUG_NPARAMS;
        if (cfg)
            kd_augment_draw(cfg, seed, epoch, idx[i], p);
        else
            p[0] = p[1] = p[2] = 0.0f;
    }
}

void kd_batch_gather(const kd_dataset *d, const uint32_t *idx, int count, const kd_augment_cfg *aug,
                     uint64_t seed, uint64_t epoch, float *x_out, int32_t *y_out, float *params_out)
{
    float fill = (0.0f - d->mean) / d->std;
    for (int i = 0; i < count; i++) {
        float p[KD_AUG_NPARAMS];
        kd_augment_draw_batch(aug, seed, epoch, idx + i, 1, p);
        kd_augment_gather(1, d->c, d->h, d->w, d->x, d->y, idx + i, p, fill,
                          x_out + (size_t)i * d->c * d->h * d->w, y_out ? y_out + i : NULL);
        if (params_out)
            memcpy(params_out + (size_t)i * KD_AUG_NPARAMS, p, sizeof p);
    }
}
