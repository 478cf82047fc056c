/*
 * backend_cuda.c - the CUDA backend (host side): device memory, cuBLAS
 * matrix products and the kernels/ launchers. It is selected by device: cuda
 * or device: auto when a device answers, and runs on the device that
 * kd_backend_cuda_prefer_device named (a data-parallel rank's local_rank) or
 * else the runtime's current one. Operations queue on one stream and
 * keep the first error, which sync() reports; slots not implemented yet are
 * NULL and a model that needs one is refused at build time (or, with
 * device: auto, trained on the CPU).
 *
 * Matrix products: row-major [N, I] activations are column-major [I, N], so
 * y = x W^T is cublasSgemm(T, N) with W as stored; TF32 is off so results
 * match the CPU reference to float rounding.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"

#ifdef KD_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include "cuda_check.h"
#include "elementwise.h"
#include "softmax_kl.h"

static cudaStream_t kd_stream;
static int kd_stream_ready;       /* kd_backend_cuda() succeeded: kd_stream is the one */
static int kd_prefer_device = -1; /* kd_backend_cuda_prefer_device; -1: the current device */
static cublasHandle_t kd_blas;
static kd_status kd_sticky = KD_OK;
static char kd_sticky_msg[512];

static void keep(kd_status st)
{
    if (st != KD_OK && kd_sticky == KD_OK) {
        kd_sticky = st;
        snprintf(kd_sticky_msg, sizeof kd_sticky_msg, "%s", kd_last_error());
    }
}

static void keep_blas(cublasStatus_t s, const char *what)
{
    if (s != CUBLAS_STATUS_SUCCESS)
        keep(KD_FAIL(KD_ERR_DEVICE, "%s failed: cuBLAS status %d", what, (int)s));
}

/* engine/cuda_check.h: the failure names the line of the call */
#define cuda_check(e, what) KD_CUDA_CHECK(e, what)

static kd_status cu_alloc(void **p, size_t bytes)
{
    *p = NULL;
    kd_status st = cuda_check(cudaMalloc(p, bytes ? bytes : 4), "cudaMalloc");
    if (st != KD_OK)
        return kd_fail_context(st, "allocating %zu bytes on the GPU: ", bytes);
    return cuda_check(cudaMemsetAsync(*p, 0, bytes ? bytes : 4, kd_stream), "cudaMemsetAsync");
}

static void cu_release(void *p)
{
    if (p)
        keep(cuda_check(cudaFree(p), "cudaFree"));
}

static kd_status cu_upload(void *dst, const void *src, size_t bytes)
{
    return cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, kd_stream),
                      "cudaMemcpyAsync host->device");
}

static kd_status cu_download(void *dst, const void *src, size_t bytes)
{
    KD_TRY(cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, kd_stream),
                      "cudaMemcpyAsync device->host"));
    return cuda_check(cudaStreamSynchronize(kd_stream), "cudaStreamSynchronize");
}

static kd_status cu_zero(void *dst, size_t bytes)
{
    return cuda_check(cudaMemsetAsync(dst, 0, bytes, kd_stream), "cudaMemsetAsync");
}

static kd_status cu_sync(void)
{
    keep(cuda_check(cudaStreamSynchronize(kd_stream), "cudaStreamSynchronize"));
    if (kd_sticky != KD_OK) {
        kd_status st = kd_sticky;
        kd_sticky = KD_OK;
        return KD_FAIL(st, "%s", kd_sticky_msg);
    }
    return KD_OK;
}

static void cu_linear_fwd(int n, int in, int out, const float *x, const float *w, const float *b,
                          float *y)
{
    const float one = 1.f, zero = 0.f;
    keep_blas(cublasSgemm(kd_blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, w, in, x, in, &zero,
                          y, out),
              "cublasSgemm (linear forward)");
    if (b)
        keep(kd_cuda_bias_rows(kd_stream, n, out, b, y));
}

static void cu_linear_bwd(int n, int in, int out, const float *x, const float *w, const float *dy,
                          float *dx, float *dw, float *db)
{
    const float one = 1.f, zero = 0.f;
    keep_blas(cublasSgemm(kd_blas, CUBLAS_OP_N, CUBLAS_OP_T, in, out, n, &one, x, in, dy, out, &one,
                          dw, in),
              "cublasSgemm (linear weight gradient)");
    if (db)
        keep(kd_cuda_bias_grad_rows(kd_stream, n, out, dy, db));
    if (dx)
        keep_blas(cublasSgemm(kd_blas, CUBLAS_OP_N, CUBLAS_OP_N, in, n, out, &one, w, in, dy, out,
                              &zero, dx, in),
                  "cublasSgemm (linear input gradient)");
}

static void cu_act_fwd(size_t n, const float *x, float *y, double cap)
{
    keep(kd_cuda_act_fwd(kd_stream, n, x, y, (float)cap));
}

static void cu_act_bwd(size_t n, const float *x, const float *dy, float *dx, double cap)
{
    keep(kd_cuda_act_bwd(kd_stream, n, x, dy, dx, (float)cap));
}

static void cu_add(size_t n, const float *a, const float *b, float *y)
{
    keep(kd_cuda_add(kd_stream, n, a, b, y));
}

static void cu_mul(size_t n, const float *a, const float *b, float *y)
{
    keep(kd_cuda_mul(kd_stream, n, a, b, y));
}

static void cu_copy(size_t n, const float *src, float *dst)
{
    keep(cuda_check(
        cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, kd_stream),
        "cudaMemcpyAsync device->device"));
}

/* per-row losses and their sum for kd_dense; grown on demand, kept for the process */
static double *kd_kl_rows;
static int kd_kl_cap;

static double cu_kd_dense(int n, int c, const float *s, const float *t, double temperature,
                          int reverse, int t2_scale, float *ds, double scale)
{
    if (n <= 0)
        return 0;
    if (n > kd_kl_cap) {
        if (kd_kl_rows)
            keep(cuda_check(cudaFree(kd_kl_rows), "cudaFree"));
        kd_kl_rows = NULL;
        kd_kl_cap = 0;
        kd_status st = cuda_check(cudaMalloc((void **)&kd_kl_rows, sizeof(double) * (n + 1)),
                                  "cudaMalloc (kd loss rows)");
        if (st != KD_OK) {
            keep(st);
            return NAN;
        }
        kd_kl_cap = n;
    }
    kd_status st = kd_cuda_softmax_kl(kd_stream, n, c, KD_SKL_F32, s, t, temperature, reverse,
                                      t2_scale, ds, KD_SKL_F32, scale, kd_kl_rows, KD_SKL_AUTO);
    if (st == KD_OK)
        st = kd_cuda_sum_f64(kd_stream, n, kd_kl_rows, kd_kl_rows + kd_kl_cap);
    double total = NAN;
    if (st == KD_OK)
        st = cu_download(&total, kd_kl_rows + kd_kl_cap, sizeof total);
    keep(st);
    return st == KD_OK ? total : NAN;
}

static const kd_backend kd_cuda_backend = {
    .name = "cuda",
    .device = KD_DEVICE_CUDA,
    .alloc = cu_alloc,
    .release = cu_release,
    .upload = cu_upload,
    .download = cu_download,
    .zero = cu_zero,
    .sync = cu_sync,
    .linear_fwd = cu_linear_fwd,
    .linear_bwd = cu_linear_bwd,
    .act_fwd = cu_act_fwd,
    .act_bwd = cu_act_bwd,
    .mul = cu_mul,
    .add = cu_add,
    .copy = cu_copy,
    .kd_dense = cu_kd_dense,
};

void kd_backend_cuda_prefer_device(int index) { kd_prefer_device = index < 0 ? -1 : index; }

void *kd_backend_cuda_stream(void) { return kd_stream_ready ? (void *)kd_stream : NULL; }

const kd_backend *kd_backend_cuda(const char **why)
{
    static int tried;
    static const kd_backend *ready;
    static char reason[256];
    if (tried) {
        if (why)
            *why = reason;
        return ready;
    }
    tried = 1;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        snprintf(reason, sizeof reason, "no CUDA device answered (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        if (why)
            *why = reason;
        return NULL;
    }
    /* the device first: the stream, cuBLAS and later NCCL all belong to the current one */
    int dev = kd_prefer_device >= 0 ? kd_prefer_device % count : -1;
    cublasStatus_t bs;
    if (dev >= 0 && (e = cudaSetDevice(dev)) != cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaSetDevice(%d) failed (%d devices visible): %s", dev,
                 count, cudaGetErrorString(e));
    } else if (dev < 0 && (e = cudaGetDevice(&dev)) != cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaGetDevice failed: %s", cudaGetErrorString(e));
    } else if ((e = cudaStreamCreateWithFlags(&kd_stream, cudaStreamNonBlocking)) != cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaStreamCreate failed: %s", cudaGetErrorString(e));
    } else if ((bs = cublasCreate(&kd_blas)) != CUBLAS_STATUS_SUCCESS) {
        snprintf(reason, sizeof reason, "cublasCreate failed: status %d", (int)bs);
    } else if ((bs = cublasSetStream(kd_blas, kd_stream)) != CUBLAS_STATUS_SUCCESS) {
        snprintf(reason, sizeof reason, "cublasSetStream failed: status %d", (int)bs);
    } else {
        int nccl = 0;
        ncclResult_t nr = ncclGetVersion(&nccl);
        snprintf(reason, sizeof reason, "CUDA device %d of %d ready (cuDNN %zu, NCCL %d%s)", dev,
                 count, (size_t)cudnnGetVersion(), nccl, nr == ncclSuccess ? "" : " unknown");
        ready = &kd_cuda_backend;
        kd_stream_ready = 1;
    }
    if (why)
        *why = reason;
    return ready;
}

#else

void kd_backend_cuda_prefer_device(int index) {}

void *kd_backend_cuda_stream(void) { return NULL; }

const kd_backend *kd_backend_cuda(const char **why)
{
    if (why)
        *why = "distill was built without CUDA";
    return NULL;
}

#endif
