/*
 * elementwise.cu - activations, sums, bias and dropout kernels for the CUDA
 * backend. Grid-stride loops so one launch shape serves every size; the bias
 * gradients give each column (channel) one thread block and reduce in shared
 * memory in a fixed order.
 */
#include <cuda_runtime.h>

#include "elementwise.h"
#include "kd_cuda_util.cuh"

__global__ void act_fwd_kernel(size_t n, const float *x, float *y, float cap)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i] <= 0.f ? 0.f : x[i]; /* NaN passes (the CPU's rule) */
        y[i] = (cap >= 0.f && v > cap) ? cap : v;
    }
}

__global__ void act_bwd_kernel(size_t n, const float *x, const float *dy, float *dx, float cap)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        /* the CPU's arithmetic (cpu_ops_body.h act_bwd): dy times the 0/1 mask, so a blocked
         * inf or NaN gradient gives NaN and a blocked negative one -0, on both backends */
        const float c = cap < 0.f ? INFINITY : cap;
        dx[i] = dy[i] * (float)((x[i] > 0.f) & (x[i] < c));
    }
}

__global__ void add_kernel(size_t n, const float *a, const float *b, float *y)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

__global__ void mul_kernel(size_t n, const float *a, const float *b, float *y)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = a[i] * b[i];
}

/* engine/bf16.h's kd_bf16_round_bits on each element */
__global__ void round_bf16_kernel(size_t n, float *x)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7f800000u) == 0x7f800000u)
            u = (u & 0x007fffffu) ? (u | 0x00400000u) & 0xffff0000u : u;
        else
            u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        x[i] = __uint_as_float(u);
    }
}

__global__ void bias_rows_kernel(size_t n, int cols, const float *bias, float *y)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}

__global__ void bias_grad_rows_kernel(int rows, int cols, const float *dy, float *db)
{
    __shared__ float part[256];
    int c = blockIdx.x;
    float acc = 0.f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        acc += dy[(size_t)r * cols + c];
    const float sum = kd_tree_sum(part, acc);
    if (threadIdx.x == 0)
        db[c] += sum;
}

extern "C" kd_status kd_cuda_act_fwd(void *stream, size_t n, const float *x, float *y, float cap)
{
    act_fwd_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, x, y, cap);
    return kd_launch_status("act_fwd");
}

extern "C" kd_status kd_cuda_act_bwd(void *stream, size_t n, const float *x, const float *dy,
                                     float *dx, float cap)
{
    act_bwd_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, x, dy, dx, cap);
    return kd_launch_status("act_bwd");
}

extern "C" kd_status kd_cuda_add(void *stream, size_t n, const float *a, const float *b, float *y)
{
    add_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, a, b, y);
    return kd_launch_status("add");
}

extern "C" kd_status kd_cuda_mul(void *stream, size_t n, const float *a, const float *b, float *y)
{
    mul_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, a, b, y);
    return kd_launch_status("mul");
}

/* one thread per word of the output: dst[i, j] = src[idx[i], j] */
__global__ void gather_rows_kernel(size_t total, int cols, const unsigned int *src,
                                   const unsigned int *idx, unsigned int *dst)
{
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t i = k / (size_t)cols, j = k - i * (size_t)cols;
        dst[k] = src[(size_t)idx[i] * cols + j];
    }
}

extern "C" kd_status kd_cuda_gather_rows(void *stream, int n, int cols, const void *src,
                                         const uint32_t *idx, void *dst)
{
    if (n < 0 || cols < 0)
        return KD_FAIL(KD_ERR_INVALID, "gather_rows: bad shape n %d, cols %d", n, cols);
    const size_t total = (size_t)n * (size_t)cols;
    if (total == 0)
        return KD_OK;
    gather_rows_kernel<<<kd_grid_for(total, 256), 256, 0, (cudaStream_t)stream>>>(
        total, cols, (const unsigned int *)src, (const unsigned int *)idx, (unsigned int *)dst);
    return kd_launch_status("gather_rows");
}

extern "C" kd_status kd_cuda_round_bf16(void *stream, size_t n, float *x)
{
    if (n == 0)
        return KD_OK;
    round_bf16_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, x);
    return kd_launch_status("round_bf16");
}

extern "C" kd_status kd_cuda_bias_rows(void *stream, int rows, int cols, const float *bias,
                                       float *y)
{
    if (rows < 0 || cols < 0)
        return KD_FAIL(KD_ERR_INVALID, "bias_rows: bad shape rows %d, cols %d", rows, cols);
    if (rows == 0 || cols == 0)
        return KD_OK;
    const size_t n = (size_t)rows * (size_t)cols;
    bias_rows_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, cols, bias, y);
    return kd_launch_status("bias_rows");
}

extern "C" kd_status kd_cuda_bias_grad_rows(void *stream, int rows, int cols, const float *dy,
                                            float *db)
{
    if (rows < 0 || cols < 0)
        return KD_FAIL(KD_ERR_INVALID, "bias_grad_rows: bad shape rows %d, cols %d", rows, cols);
    if (rows == 0 || cols == 0)
        return KD_OK;
    bias_grad_rows_kernel<<<cols, 256, 0, (cudaStream_t)stream>>>(rows, cols, dy, db);
    return kd_launch_status("bias_grad_rows");
}

__global__ void bias_nchw_kernel(size_t n, int c, int hw, const float *bias, float *y)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[(i / hw) % c];
}

/* one block per channel: float per thread, double across the block */
__global__ void bias_grad_nchw_kernel(int n, int c, int hw, const float *dy, float *db)
{
    __shared__ double part[256];
    const int ch = blockIdx.x;
    const size_t total = (size_t)n * hw;
    float acc = 0.f;
    for (size_t e = threadIdx.x; e < total; e += blockDim.x) {
        size_t plane = e / hw, j = e - plane * hw;
        acc += dy[(plane * c + ch) * hw + j];
    }
    const double sum = kd_tree_sum(part, (double)acc);
    if (threadIdx.x == 0)
        db[ch] += (float)sum;
}

/* engine/rng.c's kd_mix64, the same 64-bit arithmetic */
__device__ __forceinline__ uint64_t mix64(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t z = a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL) * 0xC2B2AE3D27D4EB4FULL ^
                 (c + 0x165667B19E3779F9ULL) * 0xFF51AFD7ED558CCDULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__global__ void dropout_kernel(size_t n, const float *x, float *y, float *mask, uint64_t thresh,
                               float keep, const uint64_t *seed_dev)
{
    const uint64_t seed = *seed_dev;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = mix64(seed, i, 0xD50F) >> 32;
        float m = r < thresh ? 0.f : keep;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

extern "C" kd_status kd_cuda_bias_nchw(void *stream, int n, int c, int hw, const float *bias,
                                       float *y)
{
    if (n < 0 || c < 0 || hw < 0)
        return KD_FAIL(KD_ERR_INVALID, "bias_nchw: bad shape n %d, c %d, hw %d", n, c, hw);
    if (n == 0 || c == 0 || hw == 0)
        return KD_OK;
    size_t total = (size_t)n * c * hw;
    bias_nchw_kernel<<<kd_grid_for(total, 256), 256, 0, (cudaStream_t)stream>>>(total, c, hw, bias,
                                                                                y);
    return kd_launch_status("bias_nchw");
}

extern "C" kd_status kd_cuda_bias_grad_nchw(void *stream, int n, int c, int hw, const float *dy,
                                            float *db)
{
    if (n < 0 || c < 0 || hw < 0)
        return KD_FAIL(KD_ERR_INVALID, "bias_grad_nchw: bad shape n %d, c %d, hw %d", n, c, hw);
    if (n == 0 || c == 0 || hw == 0)
        return KD_OK;
    bias_grad_nchw_kernel<<<c, 256, 0, (cudaStream_t)stream>>>(n, c, hw, dy, db);
    return kd_launch_status("bias_grad_nchw");
}

extern "C" kd_status kd_cuda_dropout_fwd(void *stream, size_t n, const float *x, float *y,
                                         float *mask, double p, const uint64_t *seed_dev)
{
    if (!(p >= 0 && p < 1))
        return KD_FAIL(KD_ERR_INVALID, "dropout: p must be in [0, 1), got %g", p);
    if (n == 0)
        return KD_OK;
    /* the CPU op's constants: keep = 1 / (1 - p) rounded to float, 2^32 p as the threshold */
    const float keep = (float)(1.0 / (1.0 - p));
    const uint64_t thresh = (uint64_t)(p * 4294967296.0);
    dropout_kernel<<<kd_grid_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, x, y, mask, thresh,
                                                                          keep, seed_dev);
    return kd_launch_status("dropout");
}

/* kd_augment_apply's shift_of: NaN and values at or past -extent give -extent, values at or past
 * extent give extent, the rest round to nearest even (lrintf in the default rounding mode) */
__device__ __forceinline__ int aug_shift(float v, int extent)
{
    if (!(v > -(float)extent))
        return -extent;
    if (!(v < (float)extent))
        return extent;
    return __float2int_rn(v);
}

__global__ void gather_augment_kernel(size_t total, int c, int h, int w, const float *x_all,
                                      const int32_t *y_all, const uint32_t *idx,
                                      const float *params, float fill, float *x_out, int32_t *y_out,
                                      int n)
{
    const size_t plane = (size_t)h * w, per = plane * c;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = e / per, r = e - i * per, ch = r / plane, q = r - ch * plane;
        const int y = (int)(q / w), x = (int)(q - (size_t)y * w);
        const float *p = params + 3 * i;
        const int dx = aug_shift(p[0], w), dy = aug_shift(p[1], h), flip = p[2] >= 0.5f;
        const int sx = (flip ? w - 1 - x : x) - dx, sy = y - dy;
        x_out[e] = sy >= 0 && sy < h && sx >= 0 && sx < w
                       ? x_all[(size_t)idx[i] * per + ch * plane + (size_t)sy * w + sx]
                       : fill;
        if (y_out && e < (size_t)n)
            y_out[e] = y_all[idx[e]];
    }
}

extern "C" kd_status kd_cuda_gather_augment(void *stream, int n, int c, int h, int w,
                                            const float *x_all, const int32_t *y_all,
                                            const uint32_t *idx, const float *params, float fill,
                                            float *x_out, int32_t *y_out)
{
    if (n < 0 || c < 0 || h < 0 || w < 0)
        return KD_FAIL(KD_ERR_INVALID, "gather_augment: bad shape n %d, c %d, h %d, w %d", n, c, h,
                       w);
    if (n == 0 || c == 0 || h == 0 || w == 0)
        return KD_OK;
    const size_t total = (size_t)n * c * h * w;
    gather_augment_kernel<<<kd_grid_for(total, 256), 256, 0, (cudaStream_t)stream>>>(
        total, c, h, w, x_all, y_all, idx, params, fill, x_out, y_out, n);
    return kd_launch_status("gather_augment");
}

__global__ void add_f64_kernel(int n, const double *src, double *dst)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        dst[i] += src[i];
}

extern "C" kd_status kd_cuda_add_f64(void *stream, int n, const double *src, double *dst)
{
    if (n < 0)
        return KD_FAIL(KD_ERR_INVALID, "add_f64: n = %d", n);
    if (n == 0)
        return KD_OK;
    add_f64_kernel<<<(n + 255) / 256, 256, 0, (cudaStream_t)stream>>>(n, src, dst);
    return kd_launch_status("add_f64");
}
