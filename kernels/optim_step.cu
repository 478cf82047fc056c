/*
 * optim_step.cu - SGD / AdamW updates, the global gradient norm and clipping over the flat
 * parameter buffer (contract in optim_step.h).
 *
 * Updates: one grid-stride kernel per optimizer, VEC = 4 (float4 loads of params, grads and
 * state, a uchar4 of the mask) when the buffers allow, the n % 4 leftover elements done by
 * the first threads of the grid. The optimizer variant (plain / momentum / nesterov) and the
 * presence of a mask are uniform arguments: every thread takes the same branch, which costs
 * nothing in a memory-bound loop. Per element the arithmetic is engine/optim.c's, operation
 * for operation, with explicitly rounded intrinsics so nothing is contracted into an fma.
 *
 * Norm: KD_CUDA_NORM_PARTS blocks (a fixed grid, whatever the device) each sum their
 * grid-stride share of g^2 in double into scratch[b]; one block sums the parts in a fixed
 * tree and writes sqrt into scratch[KD_CUDA_NORM_PARTS]. Clipping reads that value on the
 * device, so the host never waits.
 */
#include <cuda_runtime.h>
#include <math.h>

#include "kd_cuda_util.cuh"
#include "optim_step.h"

#define OPT_THREADS 256
#define CLIP_EPS    1e-6 /* torch.nn.utils.clip_grad_norm_'s, as engine/optim.c */

enum { SGD_PLAIN, SGD_MOMENTUM, SGD_NESTEROV };

struct sgd_consts {
    float keep, lr, mom;
    int mode;
};

struct adamw_consts {
    float keep, beta1, w1, beta2, w2, step_size, bc2_sqrt, eps;
};

/* engine/optim.c's sgd_kernel body */
__device__ __forceinline__ void sgd_one(float &p, float g, float &b, bool decay,
                                        const sgd_consts &k)
{
    float pi = decay ? __fmul_rn(p, k.keep) : p;
    float d = g;
    if (k.mode != SGD_PLAIN) {
        float nb = __fadd_rn(__fmul_rn(b, k.mom), d);
        b = nb;
        d = k.mode == SGD_NESTEROV ? __fadd_rn(d, __fmul_rn(k.mom, nb)) : nb;
    }
    p = __fsub_rn(pi, __fmul_rn(k.lr, d));
}

/* engine/optim.c's adamw_kernel body */
__device__ __forceinline__ void adamw_one(float &p, float g, float &m, float &v, bool decay,
                                          const adamw_consts &k)
{
    float pi = decay ? __fmul_rn(p, k.keep) : p;
    float mi = __fadd_rn(__fmul_rn(m, k.beta1), __fmul_rn(k.w1, g));
    float vi = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(__fmul_rn(k.w2, g), g));
    m = mi;
    v = vi;
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), k.bc2_sqrt), k.eps);
    p = __fsub_rn(pi, __fdiv_rn(__fmul_rn(k.step_size, mi), denom));
}

template <int VEC> __device__ __forceinline__ void load_mask(const uint8_t *mask, size_t i, bool *o)
{
    if (!mask) {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            o[k] = true;
    } else if constexpr (VEC == 4) {
        uchar4 u = *reinterpret_cast<const uchar4 *>(mask + i);
        o[0] = u.x != 0, o[1] = u.y != 0, o[2] = u.z != 0, o[3] = u.w != 0;
    } else {
        o[0] = mask[i] != 0;
    }
}

template <int VEC>
__global__ void sgd_kernel(size_t n, float *p, const float *g, float *buf, const uint8_t *mask,
                           sgd_consts k)
{
    const size_t units = n / VEC, gid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const bool mom = k.mode != SGD_PLAIN;
    for (size_t u = gid; u < units; u += stride) {
        const size_t i = u * VEC;
        float pv[VEC], gv[VEC], bv[VEC] = {}; /* bv is read only with momentum */
        bool dv[VEC];
        kd_load<VEC>(p + i, pv);
        kd_load<VEC>(g + i, gv);
        if (mom)
            kd_load<VEC>(buf + i, bv);
        load_mask<VEC>(mask, i, dv);
#pragma unroll
        for (int e = 0; e < VEC; e++)
            sgd_one(pv[e], gv[e], bv[e], dv[e], k);
        kd_store<VEC>(p + i, pv);
        if (mom)
            kd_store<VEC>(buf + i, bv);
    }
    if (VEC > 1 && gid < n - units * VEC) { /* the leftover elements */
        const size_t i = units * VEC + gid;
        float b = mom ? buf[i] : 0.f;
        sgd_one(p[i], g[i], b, !mask || mask[i], k);
        if (mom)
            buf[i] = b;
    }
}

template <int VEC>
__global__ void adamw_kernel(size_t n, float *p, const float *g, float *m, float *v,
                             const uint8_t *mask, adamw_consts k)
{
    const size_t units = n / VEC, gid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t u = gid; u < units; u += stride) {
        const size_t i = u * VEC;
        float pv[VEC], gv[VEC], mv[VEC], vv[VEC];
        bool dv[VEC];
        kd_load<VEC>(p + i, pv);
        kd_load<VEC>(g + i, gv);
        kd_load<VEC>(m + i, mv);
        kd_load<VEC>(v + i, vv);
        load_mask<VEC>(mask, i, dv);
#pragma unroll
        for (int e = 0; e < VEC; e++)
            adamw_one(pv[e], gv[e], mv[e], vv[e], dv[e], k);
        kd_store<VEC>(p + i, pv);
        kd_store<VEC>(m + i, mv);
        kd_store<VEC>(v + i, vv);
    }
    if (VEC > 1 && gid < n - units * VEC) {
        const size_t i = units * VEC + gid;
        adamw_one(p[i], g[i], m[i], v[i], !mask || mask[i], k);
    }
}

template <int VEC> __global__ void sumsq_kernel(size_t n, const float *g, double *parts)
{
    const size_t units = n / VEC, gid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    double acc = 0;
    for (size_t u = gid; u < units; u += stride) {
        float gv[VEC];
        kd_load<VEC>(g + u * VEC, gv);
#pragma unroll
        for (int e = 0; e < VEC; e++)
            acc += (double)gv[e] * (double)gv[e];
    }
    if (VEC > 1 && gid < n - units * VEC) {
        double x = g[units * VEC + gid];
        acc += x * x;
    }
    acc = kd_block_sum_d(acc);
    if (threadIdx.x == 0)
        parts[blockIdx.x] = acc;
}

__global__ void norm_finish_kernel(double *parts)
{
    double acc = 0;
    for (int b = threadIdx.x; b < KD_CUDA_NORM_PARTS; b += blockDim.x)
        acc += parts[b];
    acc = kd_block_sum_d(acc);
    if (threadIdx.x == 0)
        parts[KD_CUDA_NORM_PARTS] = sqrt(acc);
}

template <int VEC>
__global__ void clip_kernel(size_t n, float *g, double max_norm, const double *norm)
{
    const double nv = *norm;
    if (!isfinite(nv))
        return; /* scaling would only spread NaN; the caller checks its loss */
    const double coef = max_norm / (nv + CLIP_EPS);
    if (!(coef < 1.0))
        return;
    const float cf = (float)coef;
    const size_t units = n / VEC, gid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t u = gid; u < units; u += stride) {
        float gv[VEC];
        kd_load<VEC>(g + u * VEC, gv);
#pragma unroll
        for (int e = 0; e < VEC; e++)
            gv[e] = __fmul_rn(gv[e], cf);
        kd_store<VEC>(g + u * VEC, gv);
    }
    if (VEC > 1 && gid < n - units * VEC)
        g[units * VEC + gid] = __fmul_rn(g[units * VEC + gid], cf);
}

static int aligned4(const void *p) { return ((uintptr_t)p & 3u) == 0; }

extern "C" kd_status kd_cuda_grad_norm(void *stream, const float *g, size_t n, double *scratch)
{
    if (!scratch || (n && !g))
        return KD_FAIL(KD_ERR_INVALID, "grad_norm: NULL %s", scratch ? "gradients" : "scratch");
    cudaStream_t s = (cudaStream_t)stream;
    if (kd_aligned16(g))
        sumsq_kernel<4><<<KD_CUDA_NORM_PARTS, OPT_THREADS, 0, s>>>(n, g, scratch);
    else
        sumsq_kernel<1><<<KD_CUDA_NORM_PARTS, OPT_THREADS, 0, s>>>(n, g, scratch);
    KD_TRY(kd_launch_status("grad_norm (parts)"));
    norm_finish_kernel<<<1, OPT_THREADS, 0, s>>>(scratch);
    return kd_launch_status("grad_norm (finish)");
}

extern "C" kd_status kd_cuda_clip_grad_norm(void *stream, float *g, size_t n, double max_norm,
                                            double *scratch)
{
    KD_TRY(kd_cuda_grad_norm(stream, g, n, scratch));
    if (!(max_norm > 0.0) || n == 0)
        return KD_OK;
    cudaStream_t s = (cudaStream_t)stream;
    if (kd_aligned16(g))
        clip_kernel<4><<<kd_grid_for(n / 4 + 1, OPT_THREADS), OPT_THREADS, 0, s>>>(
            n, g, max_norm, scratch + KD_CUDA_NORM_PARTS);
    else
        clip_kernel<1><<<kd_grid_for(n, OPT_THREADS), OPT_THREADS, 0, s>>>(
            n, g, max_norm, scratch + KD_CUDA_NORM_PARTS);
    return kd_launch_status("clip_grad_norm");
}

extern "C" kd_status kd_cuda_sgd_step(void *stream, const kd_optim_cfg *c, float *params,
                                      const float *grads, float *buf, const uint8_t *decay_mask,
                                      size_t n, double lr)
{
    if (!c || c->kind != KD_OPTIM_SGD)
        return KD_FAIL(KD_ERR_INVALID, "sgd step: not an SGD configuration");
    if (n == 0)
        return KD_OK;
    sgd_consts k;
    k.keep = (float)(1.0 - lr * c->weight_decay);
    k.lr = (float)lr;
    k.mom = (float)c->momentum;
    k.mode = c->momentum == 0.0 ? SGD_PLAIN : c->nesterov ? SGD_NESTEROV : SGD_MOMENTUM;
    if (k.mode != SGD_PLAIN && !buf)
        return KD_FAIL(KD_ERR_INVALID, "sgd step: momentum %g needs a state buffer", c->momentum);
    cudaStream_t s = (cudaStream_t)stream;
    const int vec = kd_aligned16(params) && kd_aligned16(grads) &&
                    (k.mode == SGD_PLAIN || kd_aligned16(buf)) &&
                    (!decay_mask || aligned4(decay_mask));
    if (vec)
        sgd_kernel<4><<<kd_grid_for(n / 4 + 1, OPT_THREADS), OPT_THREADS, 0, s>>>(
            n, params, grads, buf, decay_mask, k);
    else
        sgd_kernel<1><<<kd_grid_for(n, OPT_THREADS), OPT_THREADS, 0, s>>>(n, params, grads, buf,
                                                                          decay_mask, k);
    return kd_launch_status("sgd step");
}

extern "C" kd_status kd_cuda_adamw_step(void *stream, const kd_optim_cfg *c, float *params,
                                        const float *grads, float *state, const uint8_t *decay_mask,
                                        size_t n, double lr, int64_t step)
{
    if (!c || c->kind != KD_OPTIM_ADAMW)
        return KD_FAIL(KD_ERR_INVALID, "adamw step: not an AdamW configuration");
    if (step < 1)
        return KD_FAIL(KD_ERR_INVALID, "adamw step: step is 1-based, got %lld", (long long)step);
    if (n == 0)
        return KD_OK;
    if (!state)
        return KD_FAIL(KD_ERR_INVALID, "adamw step: NULL state, need %zu floats", 2 * n);
    /* the step-wide constants of engine/optim.c's adamw_step, in double then float */
    adamw_consts k;
    k.keep = (float)(1.0 - lr * c->weight_decay);
    k.beta1 = (float)c->beta1;
    k.w1 = (float)(1.0 - c->beta1);
    k.beta2 = (float)c->beta2;
    k.w2 = (float)(1.0 - c->beta2);
    k.step_size = (float)(lr / (1.0 - pow(c->beta1, (double)step)));
    k.bc2_sqrt = (float)sqrt(1.0 - pow(c->beta2, (double)step));
    k.eps = (float)c->eps;
    float *m = state, *v = state + n;
    cudaStream_t s = (cudaStream_t)stream;
    const int vec = kd_aligned16(params) && kd_aligned16(grads) && kd_aligned16(m) &&
                    kd_aligned16(v) && (!decay_mask || aligned4(decay_mask));
    if (vec)
        adamw_kernel<4><<<kd_grid_for(n / 4 + 1, OPT_THREADS), OPT_THREADS, 0, s>>>(
            n, params, grads, m, v, decay_mask, k);
    else
        adamw_kernel<1><<<kd_grid_for(n, OPT_THREADS), OPT_THREADS, 0, s>>>(n, params, grads, m, v,
                                                                            decay_mask, k);
    return kd_launch_status("adamw step");
}

extern "C" kd_status kd_cuda_optim_step(void *stream, const kd_optim_cfg *c, float *params,
                                        float *grads, float *state, const uint8_t *decay_mask,
                                        size_t n, double lr, int64_t step, double *scratch)
{
    /* kd_optim_step's checks, in its order */
    KD_TRY(kd_optim_cfg_check(c));
    if (!(lr >= 0.0) || !isfinite(lr))
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: lr must be finite and >= 0, got %g", lr);
    if (c->kind == KD_OPTIM_ADAMW && step < 1)
        return KD_FAIL(KD_ERR_INVALID, "adamw step: step is 1-based, got %lld", (long long)step);
    if (n == 0)
        return KD_OK;
    if (params == NULL || grads == NULL)
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: NULL %s for %zu parameters",
                       params == NULL ? "params" : "grads", n);
    if (state == NULL && kd_optim_state_floats(c, n) > 0)
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: NULL state, need %zu floats",
                       kd_optim_state_floats(c, n));
    if (c->clip_norm > 0)
        KD_TRY(kd_cuda_clip_grad_norm(stream, grads, n, c->clip_norm, scratch));
    if (c->kind == KD_OPTIM_SGD)
        return kd_cuda_sgd_step(stream, c, params, grads, state, decay_mask, n, lr);
    return kd_cuda_adamw_step(stream, c, params, grads, state, decay_mask, n, lr, step);
}
