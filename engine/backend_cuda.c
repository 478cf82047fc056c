/*
 * backend_cuda.c - the CUDA backend (host side): device memory, cuBLAS
 * matrix products, cuDNN convolutions and the kernels/ launchers. It is
 * selected by device: cuda or device: auto when a device answers, and runs on
 * the device that kd_backend_cuda_prefer_device named (a data-parallel rank's
 * local_rank) or else the runtime's current one. Operations queue on one
 * stream (kd_stream) and keep the first error, which sync() reports. Like the
 * rest of the backend, nothing here is thread-safe: one host thread drives it.
 *
 * Implemented (every slot of kd_backend; tests/engine/test_backend_cuda.c
 * compares each with the CPU backend):
 *   memory      alloc, release, upload, download (waits for the stream), zero, sync
 *   linear      linear_fwd, linear_bwd: cuBLAS SGEMM
 *   conv2d      conv2d_ws, conv2d_fwd, conv2d_bwd: cuDNN (groups, depthwise), bias
 *               and bias gradient by kernels/elementwise.cu
 *   batchnorm   bn_fwd_train, bn_fwd_eval, bn_bwd with the fused relu / relu-cap:
 *               kernels/batchnorm.cu
 *   activation  act_fwd, act_bwd, mul, add, copy: kernels/elementwise.cu, memcpy
 *   pooling     maxpool_fwd/bwd, avgpool_fwd/bwd, gap_fwd/bwd: kernels/pool.cu
 *   dropout     dropout_fwd: kernels/elementwise.cu, the CPU's mask bit for bit, the seed
 *               read from device memory (so a graph replays with the step's seed)
 *   losses      ce (kernels/cross_entropy.cu), kd_dense (kernels/softmax_kl.cu),
 *               kd_dkd (kernels/dkd.cu),
 *               kd_topk (kernels/softmax_kl_topk.cu); each returns a host value
 *               (a download that waits for the stream) or, for the trainer, adds
 *               its sums to a device accumulator and waits for nothing
 *   data        gather_augment: the batch assembled and augmented from the resident
 *               training set; gather_rows: the batch's rows of the resident teacher
 *               cache; kernels/elementwise.cu
 *   optimizer   optim_step: clipping, SGD and AdamW on the device,
 *               kernels/optim_step.cu
 *   precision   round_bf16: run.precision: bf16 is emulated in float32 storage
 *               (engine/model.h), the same rounding on every backend
 *   graphs      graph_begin, graph_end, graph_launch, graph_free: stream capture into
 *               a CUDA graph (the trainer records a step's forward, losses and backward
 *               once and replays it); cuBLAS gets a workspace of ours so that it never
 *               allocates while recording, and the loss scratch is never freed under a
 *               graph
 * Not implemented: bfloat16 / half storage and tensor-core bf16 products
 * (everything is stored as float32; bf16 is emulated by rounding),
 * kd_topk beyond 385024 classes (refused with a message), and any fusing of
 * conv + bias + activation in one cuDNN call.
 *
 * Matrix products: row-major [N, I] activations are column-major [I, N], so
 * y = x W^T is cublasSgemm(T, N) with W as stored; TF32 is off so results
 * match the CPU reference to float rounding.
 *
 * Convolutions: cuDNN's legacy API on NCHW float tensors, OIHW filters, cross-
 * correlation (PyTorch's and the CPU op's convention), group count = groups.
 * Math type CUDNN_FMA_MATH: plain float FMA, no tensor cores. CUDNN_DEFAULT_MATH
 * would let cuDNN run float convolutions as TF32 on Ampere and newer (10-bit
 * mantissa, ~1e-3 relative error) and CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION may
 * even down-convert to half; both are faster, but convolutions then stop
 * agreeing with the CPU reference (and with the TF32-free cuBLAS path) to float
 * rounding. KD_CONV_MATH is the one switch.
 *
 * Algorithms: chosen once per shape (a plan cache keyed by every field of
 * kd_conv_shape) with cudnnGet*Algorithm_v7, cuDNN's heuristics, not
 * cudnnFind*: Find benchmarks every algorithm on the device, so its choice
 * changes with timing noise from run to run (and with it the rounding), while
 * the heuristics give the same choice for the same device and cuDNN. From the
 * ranked list the first algorithm is taken that succeeds, uses no tensor-op
 * math, is deterministic (a second pass accepts non-deterministic ones) and
 * whose workspace, asked of cuDNN for that algorithm, fits the bound; a
 * zero-workspace algorithm is the last resort.
 *
 * Workspace: the caller owns it (engine/model.c sizes m->ws with conv2d_ws for
 * every conv layer at the largest batch and passes it to every call).
 * conv2d_ws(s) plans s with a bound of KD_CONV_WS_CAP (256 MiB) per
 * operation and returns, in floats, the largest workspace of the three chosen
 * algorithms (forward, backward data, backward filter); the plan remembers that
 * its caller holds that much. A call with that exact shape uses those
 * algorithms. A call with a shape conv2d_ws never saw (the smaller last batch
 * of an epoch) may only assume the smallest amount reported for a shape of the
 * same geometry and at least its batch (the model that runs it sized one of
 * those, and its buffer covers the largest), and is planned within that bound,
 * or with no workspace when there is none; ws == NULL also means no workspace.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

#ifdef KD_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include "batchnorm.h"
#include "cross_entropy.h"
#include "cuda_check.h"
#include "elementwise.h"
#include "optim_step.h"
#include "pool.h"
#include "softmax_kl.h"

static cudaStream_t kd_stream;
static int kd_stream_ready;       /* kd_backend_cuda() succeeded: kd_stream is the one */
static int kd_prefer_device = -1; /* kd_backend_cuda_prefer_device; -1: the current device */
static cublasHandle_t kd_blas;
/* cuBLAS's workspace, ours rather than its internal pool, so that a CUDA graph recording
 * never makes cuBLAS allocate (sizes as NVIDIA advises: 32 MiB on Hopper, else 8 MiB) */
#define KD_BLAS_WS_BYTES  ((size_t)8 << 20)
#define KD_BLAS_WS_HOPPER ((size_t)32 << 20)
static void *kd_blas_ws;
static double *kd_norm_scratch; /* KD_CUDA_NORM_SCRATCH doubles for optim_step's clipping */
static kd_status kd_sticky = KD_OK;
static char kd_sticky_msg[512];

/* while a graph is recorded, errors belong to the recording (graph_end reports them) */
static int kd_recording;
static kd_status kd_rec_err;
static char kd_rec_msg[512];

static void keep(kd_status st)
{
    if (st != KD_OK && kd_recording) {
        if (kd_rec_err == KD_OK) {
            kd_rec_err = st;
            snprintf(kd_rec_msg, sizeof kd_rec_msg, "%s", kd_last_error());
        }
        return;
    }
    if (st != KD_OK && kd_sticky == KD_OK) {
        kd_sticky = st;
        snprintf(kd_sticky_msg, sizeof kd_sticky_msg, "%s", kd_last_error());
    }
}

/* A failed cuBLAS / cuDNN call may leave the CUDA runtime's last error set (a launch it made
 * failed): cleared here, so that the next kernel's launch check does not report it as its own. */
static void keep_blas(cublasStatus_t s, const char *what)
{
    if (s != CUBLAS_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        keep(KD_FAIL(KD_ERR_DEVICE, "%s failed: cuBLAS status %d", what, (int)s));
    }
}

/* engine/cuda_check.h: the failure names the line of the call */
#define cuda_check(e, what) KD_CUDA_CHECK(e, what)

static kd_status cu_alloc(void **p, size_t bytes)
{
    *p = NULL;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 4);
    if (e == cudaErrorMemoryAllocation) {
        /* not sticky: cleared, so that a caller may go on without the buffer */
        (void)cudaGetLastError();
        *p = NULL;
        return KD_FAIL(KD_ERR_NOMEM, "allocating %zu bytes on the GPU: out of device memory",
                       bytes);
    }
    kd_status st = cuda_check(e, "cudaMalloc");
    if (st != KD_OK)
        return kd_fail_context(st, "allocating %zu bytes on the GPU: ", bytes);
    st = cuda_check(cudaMemsetAsync(*p, 0, bytes ? bytes : 4, kd_stream), "cudaMemsetAsync");
    if (st != KD_OK) { /* the caller gets no buffer: none is left behind */
        cudaError_t fe = cudaFree(*p);
        *p = NULL;
        if (fe != cudaSuccess)
            return kd_fail_context(st, "cudaFree failed too (%s) after: ", cudaGetErrorString(fe));
    }
    return st;
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

/* The bytes, after the stream's work: a failure kept since the last sync() is reported here
 * (backend.h), so that results computed after it are never taken as good. */
static kd_status cu_download(void *dst, const void *src, size_t bytes)
{
    KD_TRY(cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, kd_stream),
                      "cudaMemcpyAsync device->host"));
    return cu_sync();
}

/* Also kept: callers (gradient zeroing) go on without looking, and the next sync() or download
 * reports it. */
static kd_status cu_zero(void *dst, size_t bytes)
{
    kd_status st = cuda_check(cudaMemsetAsync(dst, 0, bytes, kd_stream), "cudaMemsetAsync");
    keep(st);
    return st;
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

static void cu_gather_rows(int n, int cols, const void *src, const uint32_t *idx, void *dst)
{
    keep(kd_cuda_gather_rows(kd_stream, n, cols, src, idx, dst));
}

static void cu_round_bf16(size_t n, float *x) { keep(kd_cuda_round_bf16(kd_stream, n, x)); }

static void keep_dnn(cudnnStatus_t s, const char *what)
{
    if (s != CUDNN_STATUS_SUCCESS) {
        (void)cudaGetLastError(); /* as keep_blas */
        keep(KD_FAIL(KD_ERR_DEVICE, "%s failed: %s (cuDNN status %d)", what, cudnnGetErrorString(s),
                     (int)s));
    }
}

static kd_status dnn_check_at(cudnnStatus_t s, const char *what, const char *file, int line)
{
    if (s == CUDNN_STATUS_SUCCESS)
        return KD_OK;
    return kd_fail_at(KD_ERR_DEVICE, file, line, "%s failed: %s (cuDNN status %d)", what,
                      cudnnGetErrorString(s), (int)s);
}
#define dnn_check(call, what) dnn_check_at((call), (what), __FILE__, __LINE__)

/* ---- scratch for the per-row losses of ce / kd_dense / kd_topk ---- */

/*
 * At least `count` device doubles, grown on demand and kept for the process (so only the first
 * calls of a run allocate). Every user downloads its result before returning, so the stream
 * is idle whenever the buffer is replaced. NULL (error kept) on failure.
 */
static double *kd_rows;
static size_t kd_rows_cap;

/* CUDA graphs (graph_begin .. graph_free): records alive, a recording under way, and the
 * scratch buffers outgrown while a record (which may use them) exists */
static int kd_graphs;
static void **kd_retired;
static int kd_nretired, kd_retired_cap;

/* p is no longer the backend's: freed now, or kept until the last graph goes */
static void scratch_drop(void *p)
{
    if (!p)
        return;
    if (kd_graphs > 0) {
        if (kd_nretired == kd_retired_cap) {
            int cap = kd_retired_cap ? 2 * kd_retired_cap : 8;
            void **grown = realloc(kd_retired, sizeof *grown * (size_t)cap);
            if (!grown) { /* cannot remember it: leaked rather than freed under a graph */
                keep(KD_FAIL(KD_ERR_NOMEM, "cannot keep a scratch buffer for a CUDA graph"));
                return;
            }
            kd_retired = grown;
            kd_retired_cap = cap;
        }
        kd_retired[kd_nretired++] = p;
        return;
    }
    keep(cuda_check(cudaStreamSynchronize(kd_stream), "cudaStreamSynchronize"));
    keep(cuda_check(cudaFree(p), "cudaFree"));
}

static double *rows_scratch(size_t count)
{
    if (count <= kd_rows_cap)
        return kd_rows;
    if (kd_recording) { /* no allocation while recording: the recording fails instead */
        keep(KD_FAIL(KD_ERR_DEVICE,
                     "the per-row loss scratch would grow from %zu to %zu doubles during a CUDA "
                     "graph recording",
                     kd_rows_cap, count));
        return NULL;
    }
    scratch_drop(kd_rows);
    kd_rows = NULL;
    kd_rows_cap = 0;
    kd_status st = cuda_check(cudaMalloc((void **)&kd_rows, sizeof(double) * count),
                              "cudaMalloc (per-row losses)");
    if (st != KD_OK) {
        kd_rows = NULL;
        keep(st);
        return NULL;
    }
    kd_rows_cap = count;
    return kd_rows;
}

/* rows[0..n) summed into rows[n] and downloaded: the host value a loss slot returns */
/* the sum of rows[0..n) (rows + n is its slot): downloaded and returned, or added to acc[0] */
static double rows_total(int n, double *rows, double *acc)
{
    kd_status st = kd_cuda_sum_f64(kd_stream, n, rows, rows + n);
    double total = NAN;
    if (st == KD_OK && acc) {
        keep(kd_cuda_add_f64(kd_stream, 1, rows + n, acc));
        return 0;
    }
    if (st == KD_OK)
        st = cu_download(&total, rows + n, sizeof total);
    keep(st);
    return st == KD_OK ? total : NAN;
}

/* a per-row loss kernel's launch status, then rows_total */
static double rows_launched(kd_status st, int n, double *rows, double *acc)
{
    if (st != KD_OK) {
        keep(st);
        return NAN;
    }
    return rows_total(n, rows, acc);
}

static double cu_kd_dense(int n, int c, const float *s, const float *t, double temperature,
                          int reverse, int t2_scale, float *ds, double scale, double *acc)
{
    if (n <= 0)
        return 0;
    double *rows = rows_scratch((size_t)n + 1);
    if (!rows)
        return NAN;
    kd_status st = kd_cuda_softmax_kl(kd_stream, n, c, KD_SKL_F32, s, t, temperature, reverse,
                                      t2_scale, ds, KD_SKL_F32, scale, rows, KD_SKL_AUTO);
    return rows_launched(st, n, rows, acc);
}

static double cu_kd_topk(int n, int c, int k, const float *s, const float *tv, const int32_t *ti,
                         const float *t_lse, double temperature, int reverse, int t2_scale,
                         float *ds, double scale, double *acc)
{
    if (n <= 0)
        return 0;
    double *rows = rows_scratch((size_t)n + 1);
    if (!rows)
        return NAN;
    kd_status st = kd_cuda_kd_topk(kd_stream, n, c, k, s, tv, ti, t_lse, temperature, reverse,
                                   t2_scale, ds, scale, rows);
    return rows_launched(st, n, rows, acc);
}

static double cu_kd_dkd(int n, int c, const float *s, const float *t, const int32_t *labels,
                        double temperature, double alpha, double beta, int t2_scale, float *ds,
                        double scale, double *acc)
{
    if (n <= 0)
        return 0;
    double *rows = rows_scratch((size_t)n + 1);
    if (!rows)
        return NAN;
    kd_status st = kd_cuda_dkd(kd_stream, n, c, s, t, labels, temperature, alpha, beta, t2_scale,
                               ds, scale, rows);
    return rows_launched(st, n, rows, acc);
}

/* labels on the device; the loss sum and the hit count come back in one download, or are added
 * to acc[0], acc[1] on the device */
static double cu_ce(int n, int c, const float *logits, const int32_t *labels, double smoothing,
                    float *dlogits, double scale, int64_t *correct, double *acc)
{
    if (correct && !acc)
        *correct = 0;
    if (n <= 0)
        return 0;
    double *rows = rows_scratch(2 * (size_t)n + 2); /* losses [n], hits [n], the two sums */
    if (!rows)
        return NAN;
    double *sums = rows + 2 * (size_t)n, got[2] = {NAN, 0};
    kd_status st =
        kd_cuda_ce(kd_stream, n, c, logits, labels, smoothing, dlogits, scale, rows, rows + n);
    if (st == KD_OK)
        st = kd_cuda_sum_f64(kd_stream, n, rows, sums);
    if (st == KD_OK)
        st = kd_cuda_sum_f64(kd_stream, n, rows + n, sums + 1);
    if (st == KD_OK && acc) {
        keep(kd_cuda_add_f64(kd_stream, 2, sums, acc));
        return 0;
    }
    if (st == KD_OK)
        st = cu_download(got, sums, sizeof got);
    keep(st);
    if (st != KD_OK)
        return NAN;
    if (correct)
        *correct = (int64_t)llround(got[1]);
    return got[0];
}

/* ---- convolution: cuDNN, one plan per shape (policy in the file comment) ---- */

#define KD_CONV_WS_CAP ((size_t)256 << 20) /* bytes of workspace one conv algorithm may use */
#define KD_CONV_MATH   CUDNN_FMA_MATH      /* no TF32: see the file comment */

typedef struct {
    kd_conv_shape s;
    cudnnTensorDescriptor_t x, y;
    cudnnFilterDescriptor_t w;
    cudnnConvolutionDescriptor_t conv;
    int chosen;    /* the algorithms below are valid */
    size_t limit;  /* the workspace bound they were chosen under */
    size_t sized;  /* bytes conv2d_ws reported for exactly this shape (a caller holds them) */
    int was_sized; /* conv2d_ws was asked about this shape */
    int fwd, bwd_data, bwd_filter;     /* cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t */
    size_t ws_fwd, ws_data, ws_filter; /* bytes each chosen algorithm needs */
} kd_conv_plan;

static cudnnHandle_t kd_dnn;
static int kd_dnn_ready;
static kd_conv_plan *kd_plans; /* grown by realloc: hold indices, not pointers, across calls */
static int kd_nplans, kd_plans_cap;

/* the cuDNN handle, created on first use (an MLP never loads cuDNN's kernels) */
static kd_status dnn_handle(void)
{
    if (kd_dnn_ready)
        return KD_OK;
    KD_TRY(dnn_check(cudnnCreate(&kd_dnn), "cudnnCreate"));
    kd_status st = dnn_check(cudnnSetStream(kd_dnn, kd_stream), "cudnnSetStream");
    if (st != KD_OK) {
        /* the cudnnSetStream failure is the one reported; a failed destroy is added to it */
        cudnnStatus_t ds = cudnnDestroy(kd_dnn);
        if (ds != CUDNN_STATUS_SUCCESS)
            return kd_fail_context(st,
                                   "cudnnDestroy failed too (%s) after: ", cudnnGetErrorString(ds));
        return st;
    }
    kd_dnn_ready = 1;
    return KD_OK;
}

static int conv_same_geometry(const kd_conv_shape *a, const kd_conv_shape *b)
{
    return a->c == b->c && a->h == b->h && a->w == b->w && a->o == b->o && a->kh == b->kh &&
           a->kw == b->kw && a->stride == b->stride && a->pad == b->pad && a->groups == b->groups &&
           a->ho == b->ho && a->wo == b->wo;
}

static int conv_same_shape(const kd_conv_shape *a, const kd_conv_shape *b)
{
    return a->n == b->n && a->chunk == b->chunk && conv_same_geometry(a, b);
}

static void conv_plan_destroy(kd_conv_plan *p)
{
    if (p->x)
        keep_dnn(cudnnDestroyTensorDescriptor(p->x), "cudnnDestroyTensorDescriptor");
    if (p->y)
        keep_dnn(cudnnDestroyTensorDescriptor(p->y), "cudnnDestroyTensorDescriptor");
    if (p->w)
        keep_dnn(cudnnDestroyFilterDescriptor(p->w), "cudnnDestroyFilterDescriptor");
    if (p->conv)
        keep_dnn(cudnnDestroyConvolutionDescriptor(p->conv), "cudnnDestroyConvolutionDescriptor");
}

static kd_status conv_plan_describe(kd_conv_plan *p)
{
    const kd_conv_shape *s = &p->s;
    KD_TRY(dnn_check(cudnnCreateTensorDescriptor(&p->x), "cudnnCreateTensorDescriptor"));
    KD_TRY(dnn_check(cudnnCreateTensorDescriptor(&p->y), "cudnnCreateTensorDescriptor"));
    KD_TRY(dnn_check(cudnnCreateFilterDescriptor(&p->w), "cudnnCreateFilterDescriptor"));
    KD_TRY(
        dnn_check(cudnnCreateConvolutionDescriptor(&p->conv), "cudnnCreateConvolutionDescriptor"));
    KD_TRY(dnn_check(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, s->n,
                                                s->c, s->h, s->w),
                     "cudnnSetTensor4dDescriptor (conv input)"));
    KD_TRY(dnn_check(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, s->n,
                                                s->o, s->ho, s->wo),
                     "cudnnSetTensor4dDescriptor (conv output)"));
    KD_TRY(dnn_check(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, s->o,
                                                s->c / s->groups, s->kh, s->kw),
                     "cudnnSetFilter4dDescriptor"));
    KD_TRY(
        dnn_check(cudnnSetConvolution2dDescriptor(p->conv, s->pad, s->pad, s->stride, s->stride, 1,
                                                  1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
                  "cudnnSetConvolution2dDescriptor"));
    KD_TRY(dnn_check(cudnnSetConvolutionGroupCount(p->conv, s->groups),
                     "cudnnSetConvolutionGroupCount"));
    KD_TRY(dnn_check(cudnnSetConvolutionMathType(p->conv, KD_CONV_MATH),
                     "cudnnSetConvolutionMathType"));
    int dn, dc, dh, dw;
    KD_TRY(dnn_check(cudnnGetConvolution2dForwardOutputDim(p->conv, p->x, p->w, &dn, &dc, &dh, &dw),
                     "cudnnGetConvolution2dForwardOutputDim"));
    if (dn != s->n || dc != s->o || dh != s->ho || dw != s->wo)
        return KD_FAIL(KD_ERR_SHAPE,
                       "conv2d: cuDNN computes output [%d, %d, %d, %d], the shape says "
                       "[%d, %d, %d, %d]",
                       dn, dc, dh, dw, s->n, s->o, s->ho, s->wo);
    return KD_OK;
}

/* the plan of shape s (descriptors set, algorithms maybe not chosen yet), or -1 (error set) */
static int conv_plan_index(const kd_conv_shape *s)
{
    if (!s) {
        keep(KD_FAIL(KD_ERR_INVALID, "conv2d: no shape"));
        return -1;
    }
    for (int i = 0; i < kd_nplans; i++)
        if (conv_same_shape(&kd_plans[i].s, s))
            return i;
    if (kd_recording) { /* cuDNN set-up allocates and queries: not inside a recording */
        keep(KD_FAIL(KD_ERR_DEVICE, "conv2d: a shape first seen during a CUDA graph recording"));
        return -1;
    }
    if (s->n < 1 || s->c < 1 || s->o < 1 || s->groups < 1 || s->c % s->groups || s->o % s->groups ||
        s->ho < 1 || s->wo < 1) {
        keep(KD_FAIL(KD_ERR_INVALID, "conv2d: bad shape"));
        return -1;
    }
    kd_status st = dnn_handle();
    if (st != KD_OK) {
        keep(st);
        return -1;
    }
    if (kd_nplans == kd_plans_cap) {
        int cap = kd_plans_cap ? 2 * kd_plans_cap : 16;
        kd_conv_plan *grown = realloc(kd_plans, sizeof *grown * cap);
        if (!grown) {
            keep(KD_FAIL(KD_ERR_NOMEM, "conv2d: cannot grow the plan cache to %d shapes", cap));
            return -1;
        }
        kd_plans = grown;
        kd_plans_cap = cap;
    }
    kd_conv_plan p;
    memset(&p, 0, sizeof p);
    p.s = *s;
    st = conv_plan_describe(&p);
    if (st != KD_OK) {
        conv_plan_destroy(&p);
        keep(kd_fail_context(st,
                             "conv2d n %d c %d %dx%d -> o %d k %dx%d stride %d pad %d "
                             "groups %d: ",
                             s->n, s->c, s->h, s->w, s->o, s->kh, s->kw, s->stride, s->pad,
                             s->groups));
        return -1;
    }
    kd_plans[kd_nplans] = p;
    return kd_nplans++;
}

/* tensor-op math would bring TF32 (or half) back: only plain float math is accepted */
static int conv_math_ok(cudnnMathType_t m)
{
    return m == CUDNN_DEFAULT_MATH || m == CUDNN_FMA_MATH;
}

enum { KD_CONV_FWD, KD_CONV_DATA, KD_CONV_FILTER };

/* one row of cuDNN's ranked list for an operation */
typedef struct {
    int algo;
    int usable;        /* cuDNN can run it here, with plain float math */
    int deterministic; /* same bits on every run (no atomics) */
} kd_algo_rank;

#define KD_ALGO_MAX 16 /* above every CUDNN_CONVOLUTION_*_ALGO_COUNT */

/* cuDNN's heuristics for operation op of plan p, best first */
/* the ranking of cuDNN's answer perf[0 .. got) (each direction has its own perf struct type, with
 * the same fields): usable = it ran, with the math we allow; deterministic as cuDNN says */
#define RANK_PERF(perf)                                                                            \
    for (int i = 0; i < got && i < KD_ALGO_MAX; i++)                                               \
        r[i] = (kd_algo_rank)                                                                      \
        {                                                                                          \
            (int)(perf)[i].algo,                                                                   \
                (perf)[i].status == CUDNN_STATUS_SUCCESS &&conv_math_ok((perf)[i].mathType),       \
                (perf)[i].determinism == CUDNN_DETERMINISTIC                                       \
        }

static kd_status conv_rank(int op, const kd_conv_plan *p, kd_algo_rank *r, int *count)
{
    int got = 0;
    switch (op) {
    case KD_CONV_FWD: {
        cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
        KD_TRY(dnn_check(cudnnGetConvolutionForwardAlgorithm_v7(kd_dnn, p->x, p->w, p->conv, p->y,
                                                                CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
                                                                &got, perf),
                         "cudnnGetConvolutionForwardAlgorithm_v7"));
        RANK_PERF(perf);
        break;
    }
    case KD_CONV_DATA: {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        KD_TRY(dnn_check(cudnnGetConvolutionBackwardDataAlgorithm_v7(
                             kd_dnn, p->w, p->y, p->conv, p->x,
                             CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &got, perf),
                         "cudnnGetConvolutionBackwardDataAlgorithm_v7"));
        RANK_PERF(perf);
        break;
    }
    default: {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
        KD_TRY(dnn_check(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                             kd_dnn, p->x, p->y, p->conv, p->w,
                             CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &got, perf),
                         "cudnnGetConvolutionBackwardFilterAlgorithm_v7"));
        RANK_PERF(perf);
        break;
    }
    }
    *count = got < KD_ALGO_MAX ? got : KD_ALGO_MAX;
    return KD_OK;
}
#undef RANK_PERF

/* the workspace algorithm algo of operation op needs with plan p's descriptors */
static cudnnStatus_t conv_ws_size(int op, const kd_conv_plan *p, int algo, size_t *ws)
{
    switch (op) {
    case KD_CONV_FWD:
        return cudnnGetConvolutionForwardWorkspaceSize(kd_dnn, p->x, p->w, p->conv, p->y,
                                                       (cudnnConvolutionFwdAlgo_t)algo, ws);
    case KD_CONV_DATA:
        return cudnnGetConvolutionBackwardDataWorkspaceSize(
            kd_dnn, p->w, p->y, p->conv, p->x, (cudnnConvolutionBwdDataAlgo_t)algo, ws);
    default:
        return cudnnGetConvolutionBackwardFilterWorkspaceSize(
            kd_dnn, p->x, p->y, p->conv, p->w, (cudnnConvolutionBwdFilterAlgo_t)algo, ws);
    }
}

/*
 * Operation op's algorithm: the first of cuDNN's ranked list that is usable, deterministic
 * (pass 0; pass 1 takes any) and fits `limit`, its workspace asked of cuDNN for this
 * descriptor; else the first zero-workspace fallback (implicit GEMM, ALGO_1, ALGO_0) that fits.
 */
static kd_status conv_choose_op(int op, const kd_conv_plan *p, size_t limit, int *algo,
                                size_t *need)
{
    static const char *const names[] = {"forward", "backward data", "backward filter"};
    kd_algo_rank r[KD_ALGO_MAX];
    int count = 0;
    KD_TRY(conv_rank(op, p, r, &count));
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < count; i++) {
            size_t ws = 0;
            if (!r[i].usable || (pass == 0 && !r[i].deterministic) ||
                conv_ws_size(op, p, r[i].algo, &ws) != CUDNN_STATUS_SUCCESS || ws > limit)
                continue;
            *algo = r[i].algo;
            *need = ws;
            return KD_OK;
        }
    const int fallback[3][2] = {
        {CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM},
        {CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, CUDNN_CONVOLUTION_BWD_DATA_ALGO_0},
        {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0},
    };
    for (int i = 0; i < 2; i++) {
        size_t ws = 0;
        if (conv_ws_size(op, p, fallback[op][i], &ws) == CUDNN_STATUS_SUCCESS && ws <= limit) {
            *algo = fallback[op][i];
            *need = ws;
            return KD_OK;
        }
    }
    return KD_FAIL(KD_ERR_UNSUPPORTED,
                   "no cuDNN convolution %s algorithm with plain float math fits %zu bytes of "
                   "workspace",
                   names[op], limit);
}

/* choose the three algorithms of plan i within `limit` bytes of workspace */
static kd_status conv_plan_choose(int i, size_t limit)
{
    kd_conv_plan *p = &kd_plans[i];
    p->chosen = 0;
    KD_TRY(conv_choose_op(KD_CONV_FWD, p, limit, &p->fwd, &p->ws_fwd));
    KD_TRY(conv_choose_op(KD_CONV_DATA, p, limit, &p->bwd_data, &p->ws_data));
    KD_TRY(conv_choose_op(KD_CONV_FILTER, p, limit, &p->bwd_filter, &p->ws_filter));
    p->limit = limit;
    p->chosen = 1;
    return KD_OK;
}

static size_t conv_plan_need(const kd_conv_plan *p)
{
    size_t m = p->ws_fwd > p->ws_data ? p->ws_fwd : p->ws_data;
    return m > p->ws_filter ? m : p->ws_filter;
}

/*
 * The workspace a call with shape s and buffer ws may assume: what conv2d_ws reported for s,
 * else the smallest amount reported for a shape of the same geometry and a batch >= s->n,
 * else none.
 */
static size_t conv_ws_bound(const kd_conv_shape *s, const float *ws)
{
    if (!ws)
        return 0;
    size_t best = 0;
    int found = 0;
    for (int i = 0; i < kd_nplans; i++) {
        const kd_conv_plan *p = &kd_plans[i];
        if (!p->was_sized || !conv_same_geometry(&p->s, s) || p->s.n < s->n)
            continue;
        if (conv_same_shape(&p->s, s))
            return p->sized;
        if (!found || p->sized < best)
            best = p->sized;
        found = 1;
    }
    return found ? best : 0;
}

/* the plan a conv call with shape s and buffer ws runs, or NULL (error kept) */
static kd_conv_plan *conv_plan_for_call(const kd_conv_shape *s, const float *ws)
{
    int i = conv_plan_index(s);
    if (i < 0)
        return NULL;
    size_t bound = conv_ws_bound(s, ws);
    if (!kd_plans[i].chosen || kd_plans[i].limit != bound) {
        if (kd_recording) {
            keep(KD_FAIL(KD_ERR_DEVICE, "conv2d: algorithms to choose during a CUDA graph "
                                        "recording (another workspace size than before)"));
            return NULL;
        }
        kd_status st = conv_plan_choose(i, bound);
        if (st != KD_OK) {
            keep(st);
            return NULL;
        }
    }
    return &kd_plans[i];
}

static size_t cu_conv2d_ws(const kd_conv_shape *s)
{
    int i = conv_plan_index(s);
    if (i < 0)
        return 0;
    kd_conv_plan *p = &kd_plans[i];
    if (!p->was_sized) {
        kd_status st = conv_plan_choose(i, KD_CONV_WS_CAP);
        if (st != KD_OK) {
            keep(st);
            return 0;
        }
        p->sized = conv_plan_need(p);
        p->was_sized = 1;
        /* the same choice within exactly that bound (every algorithm ranked ahead of a chosen
           one was refused for needing more than the cap), so calls with this shape keep it */
        p->limit = p->sized;
    }
    return (p->sized + sizeof(float) - 1) / sizeof(float);
}

static void cu_conv2d_fwd(const kd_conv_shape *s, const float *x, const float *w, const float *b,
                          float *y, float *ws)
{
    kd_conv_plan *p = conv_plan_for_call(s, ws);
    if (!p)
        return;
    const float one = 1.f, zero = 0.f;
    keep_dnn(cudnnConvolutionForward(kd_dnn, &one, p->x, x, p->w, w, p->conv,
                                     (cudnnConvolutionFwdAlgo_t)p->fwd, p->ws_fwd ? ws : NULL,
                                     p->ws_fwd, &zero, p->y, y),
             "cudnnConvolutionForward");
    if (b)
        keep(kd_cuda_bias_nchw(kd_stream, s->n, s->o, s->ho * s->wo, b, y));
}

static void cu_conv2d_bwd(const kd_conv_shape *s, const float *x, const float *w, const float *dy,
                          float *dx, float *dw, float *db, float *ws)
{
    kd_conv_plan *p = conv_plan_for_call(s, ws);
    if (!p)
        return;
    const float one = 1.f, zero = 0.f;
    if (db)
        keep(kd_cuda_bias_grad_nchw(kd_stream, s->n, s->o, s->ho * s->wo, dy, db));
    /* beta = 1: the weight gradient accumulates, as every parameter gradient does */
    keep_dnn(cudnnConvolutionBackwardFilter(kd_dnn, &one, p->x, x, p->y, dy, p->conv,
                                            (cudnnConvolutionBwdFilterAlgo_t)p->bwd_filter,
                                            p->ws_filter ? ws : NULL, p->ws_filter, &one, p->w, dw),
             "cudnnConvolutionBackwardFilter");
    if (dx)
        keep_dnn(cudnnConvolutionBackwardData(kd_dnn, &one, p->w, w, p->y, dy, p->conv,
                                              (cudnnConvolutionBwdDataAlgo_t)p->bwd_data,
                                              p->ws_data ? ws : NULL, p->ws_data, &zero, p->x, dx),
                 "cudnnConvolutionBackwardData");
}

/* ---- batch norm, pooling, dropout ---- */

static void cu_bn_fwd_train(int n, int c, int hw, const float *x, const float *gamma,
                            const float *beta, float *y, float *save_mean, float *save_invstd,
                            float *run_mean, float *run_var, double momentum, double eps,
                            double cap)
{
    keep(kd_cuda_bn_fwd_train(kd_stream, n, c, hw, x, gamma, beta, y, save_mean, save_invstd,
                              run_mean, run_var, momentum, eps, cap));
}

static void cu_bn_fwd_eval(int n, int c, int hw, const float *x, const float *gamma,
                           const float *beta, const float *run_mean, const float *run_var, float *y,
                           double eps, double cap)
{
    keep(kd_cuda_bn_fwd_eval(kd_stream, n, c, hw, x, gamma, beta, run_mean, run_var, y, eps, cap));
}

static void cu_bn_bwd(int n, int c, int hw, const float *x, const float *dy, const float *gamma,
                      const float *save_mean, const float *save_invstd, const float *y, double cap,
                      float *dx, float *dgamma, float *dbeta)
{
    keep(kd_cuda_bn_bwd(kd_stream, n, c, hw, x, dy, gamma, save_mean, save_invstd, y, cap, dx,
                        dgamma, dbeta));
}

static void cu_maxpool_fwd(const kd_pool_shape *p, const float *x, float *y, int32_t *arg)
{
    keep(kd_cuda_maxpool_fwd(kd_stream, p, x, y, arg));
}

static void cu_maxpool_bwd(const kd_pool_shape *p, const float *dy, const int32_t *arg, float *dx)
{
    keep(kd_cuda_maxpool_bwd(kd_stream, p, dy, arg, dx));
}

static void cu_avgpool_fwd(const kd_pool_shape *p, const float *x, float *y)
{
    keep(kd_cuda_avgpool_fwd(kd_stream, p, x, y));
}

static void cu_avgpool_bwd(const kd_pool_shape *p, const float *dy, float *dx)
{
    keep(kd_cuda_avgpool_bwd(kd_stream, p, dy, dx));
}

static void cu_gap_fwd(int n, int c, int hw, const float *x, float *y)
{
    keep(kd_cuda_gap_fwd(kd_stream, n, c, hw, x, y));
}

static void cu_gap_bwd(int n, int c, int hw, const float *dy, float *dx)
{
    keep(kd_cuda_gap_bwd(kd_stream, n, c, hw, dy, dx));
}

static void cu_dropout_fwd(size_t n, const float *x, float *y, float *mask, double p,
                           const uint64_t *seed)
{
    keep(kd_cuda_dropout_fwd(kd_stream, n, x, y, mask, p, seed));
}

static void cu_gather_augment(int n, int c, int h, int w, const float *x_all, const int32_t *y_all,
                              const uint32_t *idx, const float *params, float fill, float *x_out,
                              int32_t *y_out)
{
    keep(kd_cuda_gather_augment(kd_stream, n, c, h, w, x_all, y_all, idx, params, fill, x_out,
                                y_out));
}

/* ---- optimizer ---- */

static kd_status cu_optim_step(const kd_optim_cfg *c, float *params, float *grads, float *state,
                               const uint8_t *decay_mask, size_t n, double lr, int64_t step)
{
    return kd_cuda_optim_step(kd_stream, c, params, grads, state, decay_mask, n, lr, step,
                              kd_norm_scratch);
}

/* ---- CUDA graphs (backend.h: graph_begin .. graph_free) ---- */

static kd_status cu_graph_begin(void)
{
    if (kd_recording)
        return KD_FAIL(KD_ERR_INVALID, "a CUDA graph is already being recorded");
    /* thread-local mode: a call from this thread that cannot be recorded (an allocation, a
     * synchronization) fails and invalidates the recording instead of running */
    kd_status st = cuda_check(cudaStreamBeginCapture(kd_stream, cudaStreamCaptureModeThreadLocal),
                              "cudaStreamBeginCapture");
    if (st != KD_OK) {
        (void)cudaGetLastError(); /* not the next launch's error */
        return st;
    }
    kd_recording = 1;
    kd_rec_err = KD_OK;
    return KD_OK;
}

static kd_status cu_graph_end(void **out)
{
    *out = NULL;
    if (!kd_recording)
        return KD_FAIL(KD_ERR_INVALID, "no CUDA graph is being recorded");
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(kd_stream, &g);
    kd_recording = 0;
    char why[600] = "";
    if (kd_rec_err != KD_OK) { /* an error while recording: nothing of it ran */
        snprintf(why, sizeof why, "%s", kd_rec_msg);
        kd_rec_err = KD_OK;
    }
    if (e != cudaSuccess && !why[0])
        snprintf(why, sizeof why, "cudaStreamEndCapture: %s", cudaGetErrorString(e));
    if (!why[0] && !g)
        snprintf(why, sizeof why, "cudaStreamEndCapture gave no graph");
    if (why[0]) {
        const cudaError_t de = g ? cudaGraphDestroy(g) : cudaSuccess;
        (void)cudaGetLastError(); /* the recording's error is not the next operation's */
        return KD_FAIL(KD_ERR_DEVICE, "recording a CUDA graph failed: %s%s%s", why,
                       de != cudaSuccess ? "; cudaGraphDestroy then failed too: " : "",
                       de != cudaSuccess ? cudaGetErrorString(de) : "");
    }
    cudaGraphExec_t x = NULL;
    e = cudaGraphInstantiate(&x, g, 0);
    kd_status st = cuda_check(e, "cudaGraphInstantiate");
    kd_status dst = cuda_check(cudaGraphDestroy(g), "cudaGraphDestroy");
    if (st == KD_OK && dst != KD_OK) { /* the instance is not kept either */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kd_last_error());
        const cudaError_t xe = cudaGraphExecDestroy(x);
        st = KD_FAIL(KD_ERR_DEVICE, "%s%s%s", msg,
                     xe != cudaSuccess ? "; cudaGraphExecDestroy then failed too: " : "",
                     xe != cudaSuccess ? cudaGetErrorString(xe) : "");
    }
    if (st != KD_OK) {
        (void)cudaGetLastError(); /* the failure is reported here, not by the next launch's check */
        return st;
    }
    kd_graphs++;
    *out = x;
    return KD_OK;
}

static kd_status cu_graph_launch(void *g)
{
    if (!g)
        return KD_FAIL(KD_ERR_INVALID, "no CUDA graph to launch");
    return cuda_check(cudaGraphLaunch((cudaGraphExec_t)g, kd_stream), "cudaGraphLaunch");
}

static void cu_graph_free(void *g)
{
    if (!g)
        return;
    /* a launched graph may still run: wait before its buffers can go */
    keep(cuda_check(cudaStreamSynchronize(kd_stream), "cudaStreamSynchronize"));
    keep(cuda_check(cudaGraphExecDestroy((cudaGraphExec_t)g), "cudaGraphExecDestroy"));
    if (kd_graphs > 0 && --kd_graphs == 0) {
        for (int i = 0; i < kd_nretired; i++)
            keep(cuda_check(cudaFree(kd_retired[i]), "cudaFree"));
        kd_nretired = 0;
    }
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
    .conv2d_ws = cu_conv2d_ws,
    .conv2d_fwd = cu_conv2d_fwd,
    .conv2d_bwd = cu_conv2d_bwd,
    .bn_fwd_train = cu_bn_fwd_train,
    .bn_fwd_eval = cu_bn_fwd_eval,
    .bn_bwd = cu_bn_bwd,
    .act_fwd = cu_act_fwd,
    .act_bwd = cu_act_bwd,
    .maxpool_fwd = cu_maxpool_fwd,
    .maxpool_bwd = cu_maxpool_bwd,
    .avgpool_fwd = cu_avgpool_fwd,
    .avgpool_bwd = cu_avgpool_bwd,
    .gap_fwd = cu_gap_fwd,
    .gap_bwd = cu_gap_bwd,
    .dropout_fwd = cu_dropout_fwd,
    .mul = cu_mul,
    .add = cu_add,
    .copy = cu_copy,
    .round_bf16 = cu_round_bf16,
    .ce = cu_ce,
    .kd_dense = cu_kd_dense,
    .kd_topk = cu_kd_topk,
    .kd_dkd = cu_kd_dkd,
    .gather_augment = cu_gather_augment,
    .gather_rows = cu_gather_rows,
    .optim_step = cu_optim_step,
    .graph_begin = cu_graph_begin,
    .graph_end = cu_graph_end,
    .graph_launch = cu_graph_launch,
    .graph_free = cu_graph_free,
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
    int dev = kd_prefer_device >= 0 ? kd_prefer_device % count : -1, major = 0;
    size_t blas_ws = 0;
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
    } else if ((e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) !=
               cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaDeviceGetAttribute failed: %s", cudaGetErrorString(e));
    } else if ((e = cudaMalloc(&kd_blas_ws,
                               blas_ws = major >= 9 ? KD_BLAS_WS_HOPPER : KD_BLAS_WS_BYTES)) !=
               cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaMalloc of the %zu-byte cuBLAS workspace failed: %s",
                 blas_ws, cudaGetErrorString(e));
    } else if ((bs = cublasSetWorkspace(kd_blas, kd_blas_ws, blas_ws)) != CUBLAS_STATUS_SUCCESS) {
        /* after cublasSetStream, which resets the workspace to cuBLAS's own pool */
        snprintf(reason, sizeof reason, "cublasSetWorkspace failed: status %d", (int)bs);
    } else if ((e = cudaMalloc((void **)&kd_norm_scratch, sizeof(double) * KD_CUDA_NORM_SCRATCH)) !=
               cudaSuccess) {
        snprintf(reason, sizeof reason, "cudaMalloc of %zu bytes failed: %s",
                 sizeof(double) * KD_CUDA_NORM_SCRATCH, cudaGetErrorString(e));
    } else {
        int nccl = 0;
        ncclResult_t nr = ncclGetVersion(&nccl);
        snprintf(reason, sizeof reason, "CUDA device %d of %d ready (cuDNN %zu, NCCL %d%s)", dev,
                 count, (size_t)cudnnGetVersion(), nccl, nr == ncclSuccess ? "" : " unknown");
        ready = &kd_cuda_backend;
        kd_stream_ready = 1;
    }
    if (!ready) { /* what a partial start created goes; the job may go on without CUDA */
        const int clean = (!kd_blas_ws || cudaFree(kd_blas_ws) == cudaSuccess) &
                          (!kd_blas || cublasDestroy(kd_blas) == CUBLAS_STATUS_SUCCESS) &
                          (!kd_stream || cudaStreamDestroy(kd_stream) == cudaSuccess);
        kd_blas_ws = NULL;
        kd_blas = NULL;
        kd_stream = NULL;
        if (!clean) {
            (void)cudaGetLastError(); /* reported in `reason`; not the next operation's error */
            const size_t used = strlen(reason);
            snprintf(reason + used, sizeof reason - used, "; releasing the partial start failed");
        }
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
