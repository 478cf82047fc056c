/*
 * kd_cuda_util.cuh - device helpers shared by the kernels/ sources (CUDA C++ only; C code
 * includes the per-kernel .h launchers instead).
 *
 * - kd_launch_status(): the launcher's verdict after a <<<...>>> (cudaGetLastError), as
 *   kd_status with the CUDA error text; every launcher returns it.
 * - kd_grid_for(): blocks for a grid-stride loop over n items (capped: the loops stride).
 * - kd_block_sum_d(), kd_block_reduce(): block-wide reductions in a fixed tree order, so a
 *   result is the same run after run (no atomics), returned to every thread. Every thread of
 *   the block must call them (they synchronize); blockDim.x must be a multiple of 32 and at
 *   most 1024.
 */
#ifndef KD_KERNELS_CUDA_UTIL_CUH
#define KD_KERNELS_CUDA_UTIL_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

static inline kd_status kd_launch_status(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return KD_FAIL(KD_ERR_DEVICE, "%s launch failed: %s", what, cudaGetErrorString(e));
    return KD_OK;
}

static inline unsigned kd_grid_for(size_t n, unsigned threads)
{
    size_t blocks = (n + threads - 1) / threads;
    return (unsigned)(blocks > 65535 ? 65535 : (blocks ? blocks : 1));
}

static inline int kd_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* expf with the CPU's underflow (engine/loss_kd_body.h kd_kexp_f32): exactly 0 below -87.33,
 * where the result would be subnormal. The losses treat a probability of 0 as masked, so the
 * two backends must agree on which ones are 0, not only on the values. */
__device__ __forceinline__ float kd_expf_ftz(float x) { return x < -87.33f ? 0.f : expf(x); }

__device__ __forceinline__ double kd_warp_sum_d(double v)
{
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float kd_warp_sum_f(float v)
{
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* VEC (1 or 4) consecutive floats; VEC == 4 is one 16-byte transaction (p 16-byte aligned) */
template <int VEC> __device__ __forceinline__ void kd_load(const float *p, float *o)
{
    if constexpr (VEC == 4) {
        float4 u = *reinterpret_cast<const float4 *>(p);
        o[0] = u.x, o[1] = u.y, o[2] = u.z, o[3] = u.w;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            o[k] = p[k];
    }
}

template <int VEC> __device__ __forceinline__ void kd_store(float *p, const float *o)
{
    if constexpr (VEC == 4) {
        *reinterpret_cast<float4 *>(p) = make_float4(o[0], o[1], o[2], o[3]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            p[k] = o[k];
    }
}

/* operators for kd_block_reduce */
struct kd_op_sum {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct kd_op_max {
    template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct kd_op_min {
    template <typename T> __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

/* op over the block's values of type T (float or double), returned to every thread: each warp
 * by xor shuffles, then the warps' results by the first warp (ident: the operator's identity,
 * for the idle lanes); blockDim.x a multiple of 32, at most 1024 */
template <typename T> struct kd_type_of {
    typedef T type; /* keeps ident out of template deduction: v alone decides T */
};
template <typename T, typename Op>
__device__ __forceinline__ T kd_block_reduce(T v, Op op, typename kd_type_of<T>::type ident)
{
    __shared__ T part[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    for (int off = 16; off > 0; off >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? part[lane] : ident;
        for (int off = 16; off > 0; off >>= 1)
            v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0)
            part[0] = v;
    }
    __syncthreads();
    v = part[0];
    __syncthreads();
    return v;
}

/* the block's sum, returned to every thread */
__device__ __forceinline__ double kd_block_sum_d(double v)
{
    return kd_block_reduce(v, kd_op_sum(), 0.0);
}

/*
 * The sum of every thread's v by a shared-memory tree over part[0 .. blockDim.x) (blockDim.x a
 * power of two): pairs halving each round, a fixed order, so the result is the same run to
 * run. Every thread gets the sum.
 */
template <typename T> __device__ __forceinline__ T kd_tree_sum(T *part, T v)
{
    part[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    return part[0];
}

#endif
