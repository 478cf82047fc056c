/*
 * dkd.cu - the decoupled KD loss (the `dkd` term) on the GPU: the row function of
 * engine/dkd_row.h that the CPU op uses too, in double, one thread per row (the class counts
 * this loss is used with are small; a row is read three times from L1/L2).
 */
#include <cuda_runtime.h>

#include "dkd_row.h"
#include "kd_cuda_util.cuh"
#include "softmax_kl.h"

KD_DEFINE_DKD_ROW(dkd_row, float, __device__ static)

__global__ void dkd_kernel(int n, int c, const float *s, const float *t, const int32_t *labels,
                           double inv_t, double alpha, double beta, double coef, float *ds,
                           double kk, double *row_loss)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const size_t off = (size_t)i * c; /* a label outside [0, c): NaN row, zero gradient */
    row_loss[i] = coef * dkd_row(c, s + off, t + off, labels[i], inv_t, alpha, beta,
                                 ds ? ds + off : NULL, kk);
}

extern "C" kd_status kd_cuda_dkd(void *stream, int n, int c, const float *s, const float *t,
                                 const int32_t *labels, double temperature, double alpha,
                                 double beta, int t2_scale, float *ds, double scale,
                                 double *row_loss)
{
    /* ds may be NULL (the loss alone); c = 1 is a zero row (dkd_row) */
    if (n < 0 || (n > 0 && (c < 1 || !s || !t || !labels || !row_loss)) || !(temperature > 0))
        return KD_FAIL(KD_ERR_INVALID,
                       "dkd: bad arguments (n %d, c %d, temperature %g%s): it needs a class or "
                       "more, a positive temperature, logits, targets, labels and row sums",
                       n, c, temperature,
                       !s || !t || !labels || !row_loss ? ", a NULL buffer" : "");
    if (n == 0)
        return KD_OK;
    const double coef = t2_scale ? temperature * temperature : 1.0, inv_t = 1.0 / temperature;
    const double kk = scale * coef * inv_t / n;
    dkd_kernel<<<(n + 127) / 128, 128, 0, (cudaStream_t)stream>>>(n, c, s, t, labels, inv_t, alpha,
                                                                  beta, coef, ds, kk, row_loss);
    return kd_launch_status("dkd");
}
