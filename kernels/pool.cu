/*
 * pool.cu - max / average / global average pooling, forward and backward (contract in
 * pool.h). Forward: a thread per output element, the CPU's loop over the window. Backward: a
 * thread per input element gathers from the outputs whose window covers it: for input row iy
 * those are oy in [ceil((iy + pad - k + 1) / stride), floor((iy + pad) / stride)] within
 * [0, Ho) (the same for columns), visited in increasing (oy, ox) order, the order in which the
 * CPU op scatters, so the float sums round the same way and no atomics are needed. Products
 * that the CPU rounds before adding use __fmul_rn so nvcc cannot fuse them into an fma.
 */
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>

#include "kd_cuda_util.cuh"
#include "pool.h"

#define POOL_THREADS 256

struct pool_geo {
    int h, w, k, stride, pad, ho, wo;
};

/* the outputs along one axis whose window covers input coordinate i: [*lo, *hi] */
__device__ __forceinline__ void covering(int i, int k, int stride, int pad, int nout, int *lo,
                                         int *hi)
{
    int t = i + pad - k + 1;
    *lo = t <= 0 ? 0 : (t + stride - 1) / stride;
    int h = (i + pad) / stride;
    *hi = h < nout - 1 ? h : nout - 1;
}

__global__ void maxpool_fwd_kernel(size_t total, pool_geo g, const float *x, float *y, int32_t *arg)
{
    const size_t per = (size_t)g.ho * g.wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t nc = i / per;
        int r = (int)(i - nc * per), oy = r / g.wo, ox = r - oy * g.wo;
        const float *plane = x + nc * g.h * g.w;
        float best = -INFINITY;
        int32_t bi = -1;
        for (int ky = 0; ky < g.k; ky++) {
            int iy = oy * g.stride - g.pad + ky;
            if (iy < 0 || iy >= g.h)
                continue;
            for (int kx = 0; kx < g.k; kx++) {
                int ix = ox * g.stride - g.pad + kx;
                if (ix < 0 || ix >= g.w)
                    continue;
                float v = plane[iy * g.w + ix];
                if (bi < 0 || v > best || v != v) { /* NaN wins (the CPU's rule) */
                    best = v;
                    bi = iy * g.w + ix;
                }
            }
        }
        y[i] = best;
        arg[i] = bi;
    }
}

__global__ void maxpool_bwd_kernel(size_t total, pool_geo g, const float *dy, const int32_t *arg,
                                   float *dx)
{
    const size_t per = (size_t)g.h * g.w, pero = (size_t)g.ho * g.wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t nc = i / per;
        int r = (int)(i - nc * per), iy = r / g.w, ix = r - iy * g.w;
        int oy0, oy1, ox0, ox1;
        covering(iy, g.k, g.stride, g.pad, g.ho, &oy0, &oy1);
        covering(ix, g.k, g.stride, g.pad, g.wo, &ox0, &ox1);
        const float *gp = dy + nc * pero;
        const int32_t *ap = arg + nc * pero;
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; oy++)
            for (int ox = ox0; ox <= ox1; ox++)
                if (ap[oy * g.wo + ox] == r)
                    acc += gp[oy * g.wo + ox];
        dx[i] = acc;
    }
}

__global__ void avgpool_fwd_kernel(size_t total, pool_geo g, float inv, const float *x, float *y)
{
    const size_t per = (size_t)g.ho * g.wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t nc = i / per;
        int r = (int)(i - nc * per), oy = r / g.wo, ox = r - oy * g.wo;
        const float *plane = x + nc * g.h * g.w;
        float acc = 0.f;
        for (int ky = 0; ky < g.k; ky++) {
            int iy = oy * g.stride - g.pad + ky;
            if (iy < 0 || iy >= g.h)
                continue;
            for (int kx = 0; kx < g.k; kx++) {
                int ix = ox * g.stride - g.pad + kx;
                if (ix >= 0 && ix < g.w)
                    acc += plane[iy * g.w + ix];
            }
        }
        y[i] = acc * inv;
    }
}

__global__ void avgpool_bwd_kernel(size_t total, pool_geo g, float inv, const float *dy, float *dx)
{
    const size_t per = (size_t)g.h * g.w, pero = (size_t)g.ho * g.wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t nc = i / per;
        int r = (int)(i - nc * per), iy = r / g.w, ix = r - iy * g.w;
        int oy0, oy1, ox0, ox1;
        covering(iy, g.k, g.stride, g.pad, g.ho, &oy0, &oy1);
        covering(ix, g.k, g.stride, g.pad, g.wo, &ox0, &ox1);
        const float *gp = dy + nc * pero;
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; oy++)
            for (int ox = ox0; ox <= ox1; ox++)
                acc = __fadd_rn(acc, __fmul_rn(gp[oy * g.wo + ox], inv));
        dx[i] = acc;
    }
}

/* a warp per plane: y[i] = mean of x[i * hw .. i * hw + hw) */
__global__ void gap_fwd_kernel(size_t planes, int hw, const float *x, float *y)
{
    const size_t warps = (size_t)gridDim.x * blockDim.x / 32;
    const int lane = threadIdx.x & 31;
    for (size_t i = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; i < planes; i += warps) {
        const float *p = x + i * hw;
        float acc = 0.f;
        for (int j = lane; j < hw; j += 32)
            acc += p[j];
        acc = kd_warp_sum_f(acc);
        if (lane == 0)
            y[i] = acc / (float)hw;
    }
}

__global__ void gap_bwd_kernel(size_t total, int hw, const float *dy, float *dx)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        dx[i] = dy[i / hw] / (float)hw;
}

static kd_status pool_geometry(const char *what, const kd_pool_shape *p, pool_geo *g,
                               size_t *in_total, size_t *out_total)
{
    if (!p || p->n < 0 || p->c < 0 || p->h < 1 || p->w < 1 || p->k < 1 || p->stride < 1 ||
        p->pad < 0 || p->ho < 1 || p->wo < 1 || (size_t)p->h * p->w > (size_t)INT_MAX ||
        (size_t)p->ho * p->wo > (size_t)INT_MAX)
        return KD_FAIL(KD_ERR_INVALID, "%s: bad pooling shape", what);
    *g = pool_geo{p->h, p->w, p->k, p->stride, p->pad, p->ho, p->wo};
    *in_total = (size_t)p->n * p->c * p->h * p->w;
    *out_total = (size_t)p->n * p->c * p->ho * p->wo;
    return KD_OK;
}

extern "C" kd_status kd_cuda_maxpool_fwd(void *stream, const kd_pool_shape *p, const float *x,
                                         float *y, int32_t *arg)
{
    pool_geo g;
    size_t nin, nout;
    KD_TRY(pool_geometry("maxpool_fwd", p, &g, &nin, &nout));
    if (nout == 0)
        return KD_OK;
    maxpool_fwd_kernel<<<kd_grid_for(nout, POOL_THREADS), POOL_THREADS, 0, (cudaStream_t)stream>>>(
        nout, g, x, y, arg);
    return kd_launch_status("maxpool_fwd");
}

extern "C" kd_status kd_cuda_maxpool_bwd(void *stream, const kd_pool_shape *p, const float *dy,
                                         const int32_t *arg, float *dx)
{
    pool_geo g;
    size_t nin, nout;
    KD_TRY(pool_geometry("maxpool_bwd", p, &g, &nin, &nout));
    if (nin == 0)
        return KD_OK;
    maxpool_bwd_kernel<<<kd_grid_for(nin, POOL_THREADS), POOL_THREADS, 0, (cudaStream_t)stream>>>(
        nin, g, dy, arg, dx);
    return kd_launch_status("maxpool_bwd");
}

extern "C" kd_status kd_cuda_avgpool_fwd(void *stream, const kd_pool_shape *p, const float *x,
                                         float *y)
{
    pool_geo g;
    size_t nin, nout;
    KD_TRY(pool_geometry("avgpool_fwd", p, &g, &nin, &nout));
    if (nout == 0)
        return KD_OK;
    const float inv = (float)(1.0 / (p->k * p->k));
    avgpool_fwd_kernel<<<kd_grid_for(nout, POOL_THREADS), POOL_THREADS, 0, (cudaStream_t)stream>>>(
        nout, g, inv, x, y);
    return kd_launch_status("avgpool_fwd");
}

extern "C" kd_status kd_cuda_avgpool_bwd(void *stream, const kd_pool_shape *p, const float *dy,
                                         float *dx)
{
    pool_geo g;
    size_t nin, nout;
    KD_TRY(pool_geometry("avgpool_bwd", p, &g, &nin, &nout));
    if (nin == 0)
        return KD_OK;
    const float inv = (float)(1.0 / (p->k * p->k));
    avgpool_bwd_kernel<<<kd_grid_for(nin, POOL_THREADS), POOL_THREADS, 0, (cudaStream_t)stream>>>(
        nin, g, inv, dy, dx);
    return kd_launch_status("avgpool_bwd");
}

extern "C" kd_status kd_cuda_gap_fwd(void *stream, int n, int c, int hw, const float *x, float *y)
{
    if (n < 0 || c < 0 || hw < 1)
        return KD_FAIL(KD_ERR_INVALID, "gap_fwd: bad shape n %d, c %d, hw %d", n, c, hw);
    const size_t planes = (size_t)n * c;
    if (planes == 0)
        return KD_OK;
    gap_fwd_kernel<<<kd_grid_for(planes * 32, POOL_THREADS), POOL_THREADS, 0,
                     (cudaStream_t)stream>>>(planes, hw, x, y);
    return kd_launch_status("gap_fwd");
}

extern "C" kd_status kd_cuda_gap_bwd(void *stream, int n, int c, int hw, const float *dy, float *dx)
{
    if (n < 0 || c < 0 || hw < 1)
        return KD_FAIL(KD_ERR_INVALID, "gap_bwd: bad shape n %d, c %d, hw %d", n, c, hw);
    const size_t total = (size_t)n * c * hw;
    if (total == 0)
        return KD_OK;
    gap_bwd_kernel<<<kd_grid_for(total, POOL_THREADS), POOL_THREADS, 0, (cudaStream_t)stream>>>(
        total, hw, dy, dx);
    return kd_launch_status("gap_bwd");
}
