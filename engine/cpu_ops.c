/*
 * cpu_ops.c - instantiates the CPU operations for float and double from
 * cpu_ops_body.h, so the math exists once. See cpu_ops.h.
 */
#include "cpu_ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "rng.h"

int kd_conv_shape_init(kd_conv_shape *s, int n, int c, int h, int w, int o, int kh, int kw,
                       int stride, int pad, int groups)
{
    if (n <= 0 || c <= 0 || h <= 0 || w <= 0 || o <= 0 || kh <= 0 || kw <= 0 || stride <= 0 ||
        pad < 0 || groups <= 0 || c % groups || o % groups)
        return 0;
    /* in 64 bits: a padded size or the output plane may not fit an int */
    const int64_t hp = (int64_t)h + 2 * (int64_t)pad, wp = (int64_t)w + 2 * (int64_t)pad;
    if (hp < kh || wp < kw)
        return 0;
    const int64_t ho64 = (hp - kh) / stride + 1, wo64 = (wp - kw) / stride + 1;
    if (ho64 * wo64 > KD_CONV_MAX_PLANE)
        return 0;
    const int ho = (int)ho64, wo = (int)wo64;
    *s = (kd_conv_shape){.n = n,
                         .c = c,
                         .h = h,
                         .w = w,
                         .o = o,
                         .kh = kh,
                         .kw = kw,
                         .stride = stride,
                         .pad = pad,
                         .groups = groups,
                         .ho = ho,
                         .wo = wo};
    /* enough samples per chunk that each GEMM has about 1024 columns */
    int chunk = (1024 + ho * wo - 1) / (ho * wo);
    s->chunk = chunk < n ? chunk : n;
    return 1;
}

#define T    float
#define SFX  f32
#define GEMM cblas_sgemm
#include "cpu_ops_body.h"
#undef T
#undef SFX
#undef GEMM

#define T    double
#define SFX  f64
#define GEMM cblas_dgemm
#include "cpu_ops_body.h"
#undef T
#undef SFX
#undef GEMM
