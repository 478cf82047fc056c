/*
 * batchnorm.cu - batch normalization forward (train, eval) and backward, each with the
 * optional fused relu / relu-cap of the CPU op (contract in batchnorm.h).
 *
 * Training and backward: one block per channel. The block reduces the channel's sums
 * (float per thread over its share, double across the block in a fixed tree, so the result
 * is the same run after run), thread 0 turns them into the per-channel constants exactly as
 * the CPU op does (in double, then rounded to float), and the same block then sweeps the
 * channel again to write y or dx (a second read of x that mostly hits L2). Element e of a
 * channel is plane e / HW, offset e % HW; with VEC = 4 the unit is a float4.
 *
 * Eval: the constants depend only on the running stats, so every block recomputes its
 * channel's (a few double operations) and a 2-D grid (channel, slice) covers the tensor.
 *
 * y = x * scale + shift is written with __fmul_rn/__fadd_rn: no fused multiply-add, the
 * rounding of the CPU's separate multiply and add.
 */
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>

#include "batchnorm.h"
#include "kd_cuda_util.cuh"

#define BN_THREADS      1024 /* training and backward: one block per channel */
#define BN_EVAL_THREADS 256

/* x * sc + sh, then the fused activation: cap 0 none, < 0 relu, > 0 min(relu, cap) */
__device__ __forceinline__ float bn_out(float x, float sc, float sh, float cap, float hi)
{
    float v = __fadd_rn(__fmul_rn(x, sc), sh);
    if (cap != 0.f) { /* NaN passes (the CPU's rule) */
        v = v <= 0.f ? 0.f : v;
        v = v > hi ? hi : v;
    }
    return v;
}

/* write y for the units [start, total) of channel ch, stepping by stride */
template <int VEC>
__device__ __forceinline__ void bn_apply(int c, int hw, int ch, const float *x, float *y, float sc,
                                         float sh, float cap, unsigned total, unsigned start,
                                         unsigned stride)
{
    const unsigned hv = (unsigned)hw / VEC;
    const float hi = cap > 0.f ? cap : INFINITY;
    for (unsigned e = start; e < total; e += stride) {
        unsigned plane = e / hv, j = e - plane * hv;
        size_t off = ((size_t)plane * c + ch) * hw + (size_t)j * VEC;
        float v[VEC];
        kd_load<VEC>(x + off, v);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            v[k] = bn_out(v[k], sc, sh, cap, hi);
        kd_store<VEC>(y + off, v);
    }
}

template <int VEC>
__global__ void __launch_bounds__(BN_THREADS)
    bn_train_kernel(int n, int c, int hw, const float *x, const float *gamma, const float *beta,
                    float *y, float *save_mean, float *save_invstd, float *run_mean, float *run_var,
                    double momentum, double eps, float cap)
{
    const int ch = blockIdx.x;
    const unsigned hv = (unsigned)hw / VEC, total = (unsigned)n * hv;
    const float pivot = x[(size_t)ch * hw];
    float s = 0.f, q = 0.f;
    for (unsigned e = threadIdx.x; e < total; e += blockDim.x) {
        unsigned plane = e / hv, j = e - plane * hv;
        float v[VEC];
        kd_load<VEC>(x + ((size_t)plane * c + ch) * hw + (size_t)j * VEC, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            float d = v[k] - pivot;
            s += d;
            q += d * d;
        }
    }
    const double sum = kd_block_sum_d(s), sq = kd_block_sum_d(q);
    __shared__ float consts[2];
    if (threadIdx.x == 0) {
        /* the CPU's bn_stats and bn_fwd_train, in the same double expressions */
        const double m = (double)n * hw;
        const double dm = sum / m;
        const double mean = pivot + dm;
        double var = sq / m - dm * dm;
        if (var < 0)
            var = 0;
        const double invstd = 1.0 / sqrt(var + eps);
        save_mean[ch] = (float)mean;
        save_invstd[ch] = (float)invstd;
        if (run_mean) {
            double unbiased = m > 1 ? var * m / (m - 1) : var;
            run_mean[ch] = (float)((1 - momentum) * run_mean[ch] + momentum * mean);
            run_var[ch] = (float)((1 - momentum) * run_var[ch] + momentum * unbiased);
        }
        consts[0] = (float)(gamma[ch] * invstd);
        consts[1] = (float)(beta[ch] - mean * gamma[ch] * invstd);
    }
    __syncthreads();
    bn_apply<VEC>(c, hw, ch, x, y, consts[0], consts[1], cap, total, threadIdx.x, blockDim.x);
}

template <int VEC>
__global__ void __launch_bounds__(BN_EVAL_THREADS)
    bn_eval_kernel(int n, int c, int hw, const float *x, const float *gamma, const float *beta,
                   const float *run_mean, const float *run_var, float *y, double eps, float cap)
{
    const int ch = blockIdx.x;
    const double invstd = 1.0 / sqrt((double)run_var[ch] + eps);
    const float sc = (float)(gamma[ch] * invstd);
    /* no contraction into a double fma: the CPU's separate multiply and subtract */
    const float sh = (float)__dsub_rn(beta[ch], __dmul_rn(run_mean[ch] * gamma[ch], invstd));
    const unsigned total = (unsigned)n * ((unsigned)hw / VEC);
    bn_apply<VEC>(c, hw, ch, x, y, sc, sh, cap, total, blockIdx.y * blockDim.x + threadIdx.x,
                  gridDim.y * blockDim.x);
}

/* the gradient reaching the norm: dy, or dy where 0 < y < cap with a fused activation */
__device__ __forceinline__ float bn_gin(float g, const float *yv, int k, int masked, float hi)
{
    return masked ? g * (float)((yv[k] > 0.f) & (yv[k] < hi)) : g;
}

template <int VEC>
__global__ void __launch_bounds__(BN_THREADS)
    bn_bwd_kernel(int n, int c, int hw, const float *x, const float *dy, const float *gamma,
                  const float *save_mean, const float *save_invstd, const float *y, float cap,
                  float *dx, float *dgamma, float *dbeta)
{
    const int ch = blockIdx.x;
    const unsigned hv = (unsigned)hw / VEC, total = (unsigned)n * hv;
    const float mean = save_mean[ch];
    const double invstd = save_invstd[ch];
    const int masked = cap != 0.f;
    const float hi = cap > 0.f ? cap : INFINITY;
    float a = 0.f, b = 0.f;
    for (unsigned e = threadIdx.x; e < total; e += blockDim.x) {
        unsigned plane = e / hv, j = e - plane * hv;
        size_t off = ((size_t)plane * c + ch) * hw + (size_t)j * VEC;
        float xv[VEC], gv[VEC], yv[VEC];
        kd_load<VEC>(x + off, xv);
        kd_load<VEC>(dy + off, gv);
        if (masked)
            kd_load<VEC>(y + off, yv);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            float g = bn_gin(gv[k], yv, k, masked, hi);
            a += g;
            b += g * (xv[k] - mean);
        }
    }
    const double sdy = kd_block_sum_d(a), sdyx = kd_block_sum_d(b);
    if (threadIdx.x == 0) {
        dgamma[ch] += (float)(sdyx * invstd);
        dbeta[ch] += (float)sdy;
    }
    if (!dx)
        return;
    /* dx = gamma*invstd * (g - mean(g) - xhat * mean(g*xhat)), the CPU's float constants */
    const double m = (double)n * hw;
    const float kk = (float)(gamma[ch] * invstd), mdy = (float)(sdy / m);
    const float mdyx = (float)(sdyx * invstd / m), is = (float)invstd;
    for (unsigned e = threadIdx.x; e < total; e += blockDim.x) {
        unsigned plane = e / hv, j = e - plane * hv;
        size_t off = ((size_t)plane * c + ch) * hw + (size_t)j * VEC;
        float xv[VEC], gv[VEC], yv[VEC], o[VEC];
        kd_load<VEC>(x + off, xv);
        kd_load<VEC>(dy + off, gv);
        if (masked)
            kd_load<VEC>(y + off, yv);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            float g = bn_gin(gv[k], yv, k, masked, hi);
            o[k] = kk * (g - mdy - (xv[k] - mean) * is * mdyx);
        }
        kd_store<VEC>(dx + off, o);
    }
}

static kd_status bn_check(const char *what, int n, int c, int hw)
{
    if (n < 0 || c < 0 || hw < 0 || (size_t)n * hw > (size_t)INT_MAX)
        return KD_FAIL(KD_ERR_INVALID, "%s: bad shape n %d, c %d, hw %d (n * hw must fit an int)",
                       what, n, c, hw);
    return KD_OK;
}

/* float4 units when every plane starts 16-byte aligned */
static int bn_vec(int hw, const void *a, const void *b, const void *c, const void *d)
{
    return hw % 4 == 0 && kd_aligned16(a) && kd_aligned16(b) && kd_aligned16(c) && kd_aligned16(d);
}

extern "C" kd_status kd_cuda_bn_fwd_train(void *stream, int n, int c, int hw, const float *x,
                                          const float *gamma, const float *beta, float *y,
                                          float *save_mean, float *save_invstd, float *run_mean,
                                          float *run_var, double momentum, double eps, double cap)
{
    KD_TRY(bn_check("bn_fwd_train", n, c, hw));
    if (n == 0 || c == 0 || hw == 0)
        return KD_OK;
    cudaStream_t s = (cudaStream_t)stream;
    if (bn_vec(hw, x, y, x, y))
        bn_train_kernel<4><<<c, BN_THREADS, 0, s>>>(n, c, hw, x, gamma, beta, y, save_mean,
                                                    save_invstd, run_mean, run_var, momentum, eps,
                                                    (float)cap);
    else
        bn_train_kernel<1><<<c, BN_THREADS, 0, s>>>(n, c, hw, x, gamma, beta, y, save_mean,
                                                    save_invstd, run_mean, run_var, momentum, eps,
                                                    (float)cap);
    return kd_launch_status("bn_fwd_train");
}

extern "C" kd_status kd_cuda_bn_fwd_eval(void *stream, int n, int c, int hw, const float *x,
                                         const float *gamma, const float *beta,
                                         const float *run_mean, const float *run_var, float *y,
                                         double eps, double cap)
{
    KD_TRY(bn_check("bn_fwd_eval", n, c, hw));
    if (n == 0 || c == 0 || hw == 0)
        return KD_OK;
    const int vec = bn_vec(hw, x, y, x, y);
    const size_t units = (size_t)n * (vec ? hw / 4 : hw);
    /* slices per channel: enough blocks in all to fill the device, none without work */
    size_t slices = (512 + (size_t)c - 1) / c;
    size_t most = (units + BN_EVAL_THREADS - 1) / BN_EVAL_THREADS;
    slices = slices < most ? slices : most;
    slices = slices < 65535 ? slices : 65535;
    dim3 grid((unsigned)c, (unsigned)(slices ? slices : 1));
    cudaStream_t s = (cudaStream_t)stream;
    if (vec)
        bn_eval_kernel<4><<<grid, BN_EVAL_THREADS, 0, s>>>(n, c, hw, x, gamma, beta, run_mean,
                                                           run_var, y, eps, (float)cap);
    else
        bn_eval_kernel<1><<<grid, BN_EVAL_THREADS, 0, s>>>(n, c, hw, x, gamma, beta, run_mean,
                                                           run_var, y, eps, (float)cap);
    return kd_launch_status("bn_fwd_eval");
}

extern "C" kd_status kd_cuda_bn_bwd(void *stream, int n, int c, int hw, const float *x,
                                    const float *dy, const float *gamma, const float *save_mean,
                                    const float *save_invstd, const float *y, double cap, float *dx,
                                    float *dgamma, float *dbeta)
{
    KD_TRY(bn_check("bn_bwd", n, c, hw));
    if (n == 0 || c == 0 || hw == 0)
        return KD_OK;
    if (cap != 0 && !y)
        return KD_FAIL(KD_ERR_INVALID, "bn_bwd: a fused activation (cap %g) needs y", cap);
    cudaStream_t s = (cudaStream_t)stream;
    const void *yy = cap != 0 ? (const void *)y : (const void *)x;
    const void *dd = dx ? (const void *)dx : (const void *)x;
    if (bn_vec(hw, x, dy, yy, dd))
        bn_bwd_kernel<4><<<c, BN_THREADS, 0, s>>>(n, c, hw, x, dy, gamma, save_mean, save_invstd, y,
                                                  (float)cap, dx, dgamma, dbeta);
    else
        bn_bwd_kernel<1><<<c, BN_THREADS, 0, s>>>(n, c, hw, x, dy, gamma, save_mean, save_invstd, y,
                                                  (float)cap, dx, dgamma, dbeta);
    return kd_launch_status("bn_bwd");
}
