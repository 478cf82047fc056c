/*
 * cross_entropy.cu - label-smoothed cross-entropy, a warp per row (contract in
 * cross_entropy.h). Each lane scans its strided share of the row for the maximum and the
 * first index holding it; lanes merge (larger value, then smaller index), which is the CPU's
 * "first maximal logit". The exponentials and sums are double, as in the CPU op, so the row
 * losses agree with it to double rounding.
 */
#include <cuda_runtime.h>
#include <math.h>

#include "cross_entropy.h"
#include "kd_cuda_util.cuh"

#define CE_WARPS 8 /* rows (warps) per block */

__global__ void __launch_bounds__(32 * CE_WARPS)
    ce_kernel(int n, int c, const float *logits, const int32_t *labels, double smoothing,
              float *dlogits, double k, double *row_loss, double *row_hit)
{
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * CE_WARPS;
    for (int row = blockIdx.x * CE_WARPS + threadIdx.x / 32; row < n; row += warps) {
        const float *z = logits + (size_t)row * c;
        float *d = dlogits ? dlogits + (size_t)row * c : NULL;
        const int y = labels[row];
        if (y < 0 || y >= c) {
            if (lane == 0) {
                row_loss[row] = NAN;
                row_hit[row] = 0;
            }
            if (d)
                for (int j = lane; j < c; j += 32)
                    d[j] = 0.f;
            continue;
        }
        /* the first maximal logit of the row, as the CPU picks it: NaN never wins, except that a
         * NaN first logit keeps class 0 (the loss is NaN either way; only the hit count differs) */
        float mx = -INFINITY;
        int am = -1;
        for (int j = lane; j < c; j += 32)
            if (z[j] == z[j] && (am < 0 || z[j] > mx)) {
                mx = z[j];
                am = j;
            }
        for (int off = 16; off > 0; off >>= 1) {
            float om = __shfl_xor_sync(0xffffffffu, mx, off);
            int oa = __shfl_xor_sync(0xffffffffu, am, off);
            if (oa >= 0 && (am < 0 || om > mx || (om == mx && oa < am))) {
                mx = om;
                am = oa;
            }
        }
        if (am < 0 || z[0] != z[0])
            am = 0;
        const double m = mx;
        double se = 0, sz = 0;
        for (int j = lane; j < c; j += 32) {
            double v = (double)z[j] - m;
            se += exp(v);
            sz += v;
        }
        se = kd_warp_sum_d(se);
        sz = kd_warp_sum_d(sz);
        const double lse = log(se);
        const double on = 1.0 - smoothing, off = smoothing / c;
        if (lane == 0) {
            double nll = lse - ((double)z[y] - m);
            double smooth = lse - sz / c;
            row_loss[row] = on * nll + smoothing * smooth;
            row_hit[row] = am == y ? 1.0 : 0.0;
        }
        if (d)
            for (int j = lane; j < c; j += 32) {
                double pj = exp((double)z[j] - m - lse);
                double q = off + (j == y ? on : 0.0);
                d[j] = (float)(k * (pj - q));
            }
    }
}

extern "C" kd_status kd_cuda_ce(void *stream, int n, int c, const float *logits,
                                const int32_t *labels, double smoothing, float *dlogits,
                                double scale, double *row_loss, double *row_hit)
{
    if (n < 0 || c < 1 || !row_loss || !row_hit)
        return KD_FAIL(KD_ERR_INVALID, "cross-entropy: bad arguments (n %d, c %d%s)", n, c,
                       row_loss && row_hit ? "" : ", no row outputs");
    if (n == 0)
        return KD_OK;
    unsigned blocks = (unsigned)((n + CE_WARPS - 1) / CE_WARPS);
    blocks = blocks < 65535 ? blocks : 65535;
    ce_kernel<<<blocks, 32 * CE_WARPS, 0, (cudaStream_t)stream>>>(
        n, c, logits, labels, smoothing, dlogits, scale / n, row_loss, row_hit);
    return kd_launch_status("cross-entropy");
}
