/*
 * softmax_kl_topk.cu - the `kd` loss against top-k teacher targets on the GPU: the CPU op
 * kd_cpu_kd_topk (engine/loss_kd_body.h, rule in engine/loss_kd.md) with one block per row.
 *
 * Per row the block
 *   1. marks the k cached classes in a shared-memory bitmap (atomicOr; a bit already set is a
 *      repeated index), so out-of-range or repeated indices give the row a NaN loss and a zero
 *      gradient, as on the CPU;
 *   2. streams the student row once for the tail (the classes not marked): every thread keeps
 *      an online (raw max, float sum of exp((s - max) / T)) state, merged across the block in
 *      double around the block's maximum;
 *   3. reduces the k cached values in double: the student's cached log-sum-exp, the teacher's
 *      smallest value, its top mass sum exp(v - L) and its cached log-sum-exp at T;
 *   4. forms the buckets, the loss and the tail factor with the CPU's double expressions
 *      (every thread computes the same scalars from the broadcast reductions);
 *   5. writes the gradient: tail classes from the tail factor, cached classes from their
 *      bucket terms.
 * The CPU op computes its exponentials with a float polynomial inside 256-class chunks and
 * double across chunks; here expf and float per thread, double across threads: the two agree
 * to float rounding (a few 1e-7 relative on ordinary logits), not bit for bit. Reductions run
 * in a fixed tree order, so results repeat exactly from run to run.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kd_cuda_util.cuh"
#include "softmax_kl.h"

#define TK_THREADS    256
#define TK_TAIL_FLOOR 1e-12 /* KD_TOPK_TAIL_FLOOR of engine/loss_kd_body.h */
/* the class bitmap lives in shared memory: the block may use 48 KiB without an opt-in, of which
 * the block reductions' static arrays take 768 bytes (3 x 32 doubles); 47 KiB of bitmap */
#define TK_MAX_CLASSES (47 * 1024 * 8)

__device__ __forceinline__ double logaddexp(double a, double b)
{
    if (a == -INFINITY)
        return b;
    if (b == -INFINITY)
        return a;
    double m = a > b ? a : b;
    return m + log1p(exp(-fabs(a - b)));
}

/* log-sum-exp of the block's online states (m: raw max, s: sum of exp((x - m) * it)) */
__device__ __forceinline__ void merge_lse(double m, double s, double it, double *gm, double *gs)
{
    const double M = kd_block_reduce(m, kd_op_max(), -INFINITY);
    /* s != 0 with m = -inf: the thread saw only NaN, whose sum must reach the row */
    const double part = s == 0 ? 0.0 : m == -INFINITY ? s : s * exp((m - M) * it);
    *gm = M;
    *gs = kd_block_reduce(part, kd_op_sum(), 0.0);
}

__global__ void __launch_bounds__(TK_THREADS)
    topk_kernel(int c, int k, const float *s, const float *tv, const int32_t *ti,
                const float *t_lse, float inv_t, int reverse, double coef, double kk, float *ds,
                double *row_loss)
{
    extern __shared__ uint32_t member[];
    const int row = blockIdx.x, tid = threadIdx.x, bd = blockDim.x;
    const float *sr = s + (size_t)row * c;
    const float *tvr = tv + (size_t)row * k;
    const int32_t *tir = ti + (size_t)row * k;
    float *d = ds ? ds + (size_t)row * c : NULL;
    const double it = (double)inv_t; /* the CPU's it: the float 1/T widened */

    /* 1. the cached classes */
    const int words = (c + 31) / 32;
    for (int w = tid; w < words; w += bd)
        member[w] = 0;
    __syncthreads();
    int bad = 0;
    for (int i = tid; i < k; i += bd) {
        int j = tir[i];
        if (j < 0 || j >= c) {
            bad = 1;
        } else {
            uint32_t bit = 1u << (j & 31);
            if (atomicOr(&member[j >> 5], bit) & bit)
                bad = 1;
        }
    }
    if (__syncthreads_or(bad)) {
        if (d)
            for (int j = tid; j < c; j += bd)
                d[j] = 0.f;
        if (tid == 0)
            row_loss[row] = NAN;
        return;
    }
#define IS_MEMBER(j) ((member[(j) >> 5] >> ((j)&31)) & 1u)

    /* 2. the student's tail: online log-sum-exp over the unmarked classes */
    float tm = -INFINITY, ts = 0.f;
    for (int j = tid; j < c; j += bd) {
        if (IS_MEMBER(j))
            continue;
        float x = sr[j];
        if (x == -INFINITY)
            continue;
        if (x > tm) {
            ts = ts * kd_expf_ftz((tm - x) * inv_t) + 1.f;
            tm = x;
        } else {
            ts += kd_expf_ftz((x - tm) * inv_t);
        }
    }
    double tail_m, tail_sum;
    merge_lse(tm, ts, it, &tail_m, &tail_sum);

    /* 3. the cached values: student log-sum-exp (scaled values), teacher min, mass, lse */
    const double lse = (double)t_lse[row];
    double sm = -INFINITY, ssum = 0, zm = -INFINITY, zsum = 0, vmin = INFINITY, top = 0;
    for (int i = tid; i < k; i += bd) {
        double a = (double)sr[tir[i]] * it, v = (double)tvr[i], b = v * it;
        if (a != -INFINITY) {
            if (a > sm) {
                ssum = ssum * exp(sm - a) + 1;
                sm = a;
            } else {
                ssum += exp(a - sm);
            }
        }
        if (b != -INFINITY) {
            if (b > zm) {
                zsum = zsum * exp(zm - b) + 1;
                zm = b;
            } else {
                zsum += exp(b - zm);
            }
        }
        vmin = v < vmin ? v : vmin;
        top += exp(v - lse);
    }
    double ls_m, ls_s, z_m, z_s;
    merge_lse(sm, ssum, 1.0, &ls_m, &ls_s);
    merge_lse(zm, zsum, 1.0, &z_m, &z_s);
    vmin = kd_block_reduce(vmin, kd_op_min(), INFINITY);
    const double top_mass = kd_block_reduce(top, kd_op_sum(), 0.0);

    /* 4. buckets and loss (the CPU's expressions) */
    const int has_tail = k < c;
    /* an empty sum is -inf; a NaN one stays NaN (the CPU's rule) */
    const double ls_tail = tail_sum == 0 ? -INFINITY : tail_m * it + log(tail_sum);
    const double ls_cached = ls_s == 0 ? -INFINITY : ls_m + log(ls_s);
    const double ls = has_tail ? logaddexp(ls_tail, ls_cached) : ls_cached;
    double a_tail = -INFINITY;
    if (has_tail) {
        double m_hi = (c - k) * exp(vmin - lse);
        m_hi = m_hi < 1 ? m_hi : 1;
        double m = 1 - top_mass;
        m = m > TK_TAIL_FLOOR ? m : TK_TAIL_FLOOR;
        m = m < m_hi ? m : m_hi;
        if (m > 0)
            a_tail = (lse + log(m) - log((double)(c - k))) * it + log((double)(c - k));
    }
    const double z = logaddexp(a_tail, z_s == 0 ? -INFINITY : z_m + log(z_s));
    const double l_tail_q = a_tail - z, l_tail_p = ls_tail - ls;
    const int nb = k + has_tail;
    if (z == -INFINITY || (ls == -INFINITY && reverse)) { /* nothing to match */
        if (d)
            for (int j = tid; j < c; j += bd)
                d[j] = 0.f;
        if (tid == 0)
            row_loss[row] = 0;
        return;
    }
    double klp = 0;
    int inf_row = 0;
    for (int b = tid; b < nb; b += bd) {
        double lq = b < k ? (double)tvr[b] * it - z : l_tail_q;
        double lp = b < k ? (double)sr[tir[b]] * it - ls : l_tail_p;
        double lt = reverse ? lp : lq, lo = reverse ? lq : lp;
        if (lt == -INFINITY)
            continue;
        if (lo == -INFINITY) {
            inf_row = 1;
            continue;
        }
        klp += exp(lt) * (lt - lo);
    }
    double kl = kd_block_reduce(klp, kd_op_sum(), 0.0);
    inf_row = __syncthreads_or(inf_row);
    if (inf_row)
        kl = INFINITY;
    else if (kl < 0)
        kl = 0;
    if (tid == 0)
        row_loss[row] = coef * kl;
    if (!d)
        return;

    /* 5. the gradient */
    double pm = 0; /* reverse, infinite row: the student's mass on buckets where q is 0 */
    if (reverse && inf_row) {
        double part = 0;
        for (int b = tid; b < nb; b += bd) {
            double lq = b < k ? (double)tvr[b] * it - z : l_tail_q;
            double lp = b < k ? (double)sr[tir[b]] * it - ls : l_tail_p;
            if (lq == -INFINITY)
                part += exp(lp);
        }
        pm = kd_block_reduce(part, kd_op_sum(), 0.0);
    }
    double f = 0;
    if (has_tail && tail_sum > 0) {
        double a = exp(tail_m * it - ls); /* p_j = e_j * a */
        if (!reverse)
            f = a - exp(l_tail_q) / tail_sum;
        else if (!inf_row)
            f = a * (l_tail_p - l_tail_q - kl);
        else
            f = a * ((l_tail_q == -INFINITY ? 1.0 : 0.0) - pm);
    }
    const float fk = (float)(kk * f);
    const float sh = tail_m == -INFINITY ? 0.f : (float)tail_m;
    for (int j = tid; j < c; j += bd)
        if (!IS_MEMBER(j))
            d[j] = fk == 0.f ? 0.f : fk * kd_expf_ftz((sr[j] - sh) * inv_t);
    for (int i = tid; i < k; i += bd) {
        double lq = (double)tvr[i] * it - z, lp = (double)sr[tir[i]] * it - ls;
        double P = exp(lp), g;
        if (!reverse)
            g = P - exp(lq);
        else if (P == 0)
            g = 0;
        else if (!inf_row)
            g = P * (lp - lq - kl);
        else
            g = P * ((lq == -INFINITY ? 1.0 : 0.0) - pm);
        d[tir[i]] = (float)(kk * g);
    }
#undef IS_MEMBER
}

extern "C" kd_status kd_cuda_kd_topk(void *stream, int n, int c, int k, const float *s,
                                     const float *tv, const int32_t *ti, const float *t_lse,
                                     double temperature, int reverse, int t2_scale, float *ds,
                                     double scale, double *row_loss)
{
    if (n < 0 || c < 1 || k < 0 || !(temperature > 0) || !row_loss)
        return KD_FAIL(KD_ERR_INVALID, "kd_topk: bad arguments (n %d, c %d, k %d, temperature %g)",
                       n, c, k, temperature);
    if (c > TK_MAX_CLASSES)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "kd_topk: the CUDA kernel keeps a bitmap of the classes in shared memory "
                       "and takes at most %d classes, got %d (use device: cpu)",
                       TK_MAX_CLASSES, c);
    if (n == 0)
        return KD_OK;
    cudaStream_t st = (cudaStream_t)stream;
    if (k < 1 || k > c) {
        /* every row is malformed: NaN losses and zero gradients, as the CPU op gives */
        cudaError_t e = cudaSuccess;
        if (ds)
            e = cudaMemsetAsync(ds, 0, sizeof(float) * (size_t)n * c, st);
        if (e == cudaSuccess) {
            /* all-ones bytes are a NaN double */
            e = cudaMemsetAsync(row_loss, 0xff, sizeof(double) * (size_t)n, st);
        }
        if (e != cudaSuccess)
            return KD_FAIL(KD_ERR_DEVICE, "kd_topk: cudaMemsetAsync failed: %s",
                           cudaGetErrorString(e));
        return KD_OK;
    }
    const double coef = t2_scale ? temperature * temperature : 1.0;
    const float inv_t = (float)(1.0 / temperature);
    const double kk = scale * coef / temperature / n;
    const size_t smem = sizeof(uint32_t) * (size_t)((c + 31) / 32);
    topk_kernel<<<n, TK_THREADS, smem, st>>>(c, k, s, tv, ti, t_lse, inv_t, reverse ? 1 : 0, coef,
                                             kk, ds, row_loss);
    return kd_launch_status("kd_topk");
}
