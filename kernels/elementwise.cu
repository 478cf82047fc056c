/*
 * elementwise.cu - activations, sums and bias kernels for the CUDA backend.
 * Grid-stride loops so one launch shape serves every size; the bias gradient
 * gives each column one thread block and reduces rows in shared memory.
 */
#include <cuda_runtime.h>

#include "elementwise.h"

static kd_status launch_status(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return KD_FAIL(KD_ERR_DEVICE, "%s launch failed: %s", what, cudaGetErrorString(e));
    return KD_OK;
}

static unsigned grid_for(size_t n)
{
    size_t blocks = (n + 255) / 256;
    return (unsigned)(blocks > 65535 ? 65535 : (blocks ? blocks : 1));
}

__global__ void act_fwd_kernel(size_t n, const float *x, float *y, float cap)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i] > 0.f ? x[i] : 0.f;
        y[i] = (cap >= 0.f && v > cap) ? cap : v;
    }
}

__global__ void act_bwd_kernel(size_t n, const float *x, const float *dy, float *dx, float cap)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        bool pass = x[i] > 0.f && (cap < 0.f || x[i] < cap);
        dx[i] = pass ? dy[i] : 0.f;
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
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        db[c] += part[0];
}

extern "C" kd_status kd_cuda_act_fwd(void *stream, size_t n, const float *x, float *y, float cap)
{
    act_fwd_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(n, x, y, cap);
    return launch_status("act_fwd");
}

extern "C" kd_status kd_cuda_act_bwd(void *stream, size_t n, const float *x, const float *dy,
                                     float *dx, float cap)
{
    act_bwd_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(n, x, dy, dx, cap);
    return launch_status("act_bwd");
}

extern "C" kd_status kd_cuda_add(void *stream, size_t n, const float *a, const float *b, float *y)
{
    add_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(n, a, b, y);
    return launch_status("add");
}

extern "C" kd_status kd_cuda_mul(void *stream, size_t n, const float *a, const float *b, float *y)
{
    mul_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(n, a, b, y);
    return launch_status("mul");
}

extern "C" kd_status kd_cuda_bias_rows(void *stream, int rows, int cols, const float *bias,
                                       float *y)
{
    size_t n = (size_t)rows * cols;
    bias_rows_kernel<<<grid_for(n), 256, 0, (cudaStream_t)stream>>>(n, cols, bias, y);
    return launch_status("bias_rows");
}

extern "C" kd_status kd_cuda_bias_grad_rows(void *stream, int rows, int cols, const float *dy,
                                            float *db)
{
    if (cols <= 0)
        return KD_OK;
    bias_grad_rows_kernel<<<cols, 256, 0, (cudaStream_t)stream>>>(rows, cols, dy, db);
    return launch_status("bias_grad_rows");
}
