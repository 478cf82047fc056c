/*
 * softmax_kl.cu - the fused softmax-KL distillation loss (see softmax_kl.h for the contract,
 * engine/loss_kd.md for the math). One source for every variant: the element types, the
 * vector width and the row strategy are template arguments picked by the launcher.
 *
 * Per row the kernel keeps, for the target distribution p (teacher in forward, student in
 * reverse) and the other one q, an online log-sum-exp state (running raw maximum m, sum of
 * exp((x - m) / T)) and w = sum_j e^p_j ((p_j - m_p) - (q_j - m_q)), so that
 *     KL(p || q) = w / (T S_p) + log(S_q / S_p).
 * Two partial states merge by rebasing both to the larger maxima (rebase() below), which is
 * what makes the block variant single-pass over memory for the loss. Masking follows the CPU
 * op: e^p_j == 0 contributes nothing (-inf target classes), q = -inf under target mass gives
 * +inf, and the reverse direction's infinite rows get the gradient of the student's mass on
 * teacher-masked classes.
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kd_cuda_util.cuh"
#include "softmax_kl.h"

#define SKL_WARP_ROWS    8   /* warps (rows) per block of the warp variant */
#define SKL_BLOCK        512 /* threads per row of the block variant */
#define SKL_WARP_MAX_COL 1024

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x)
{
    return __float2bfloat16(x);
}

/* VEC consecutive elements; one or more 16-byte transactions when VEC * sizeof(T) allows */
template <typename T, int VEC> __device__ __forceinline__ void load_vec(const T *p, float *out)
{
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
        constexpr int NV = VEC * sizeof(T) / 16;
#pragma unroll
        for (int v = 0; v < NV; v++) {
            uint4 u = reinterpret_cast<const uint4 *>(p)[v];
            const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
            for (int k = 0; k < 16 / (int)sizeof(T); k++)
                out[v * (16 / sizeof(T)) + k] = to_f(e[k]);
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            out[k] = to_f(p[k]);
    }
}

template <typename T, int VEC> __device__ __forceinline__ void store_vec(T *p, const float *in)
{
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
        constexpr int NV = VEC * sizeof(T) / 16, PER = 16 / sizeof(T);
#pragma unroll
        for (int v = 0; v < NV; v++) {
            uint4 u;
            T *e = reinterpret_cast<T *>(&u);
#pragma unroll
            for (int k = 0; k < PER; k++)
                e[k] = from_f<T>(in[v * PER + k]);
            reinterpret_cast<uint4 *>(p)[v] = u;
        }
    } else if constexpr (VEC * sizeof(T) == 8) {
        uint2 u;
        T *e = reinterpret_cast<T *>(&u);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            e[k] = from_f<T>(in[k]);
        *reinterpret_cast<uint2 *>(p) = u;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            p[k] = from_f<T>(in[k]);
    }
}

/* ---- the online state ---- */

/* pinf: the largest target logit of a class the other side masks (-inf); kept out of w, it
 * makes the row +inf only if its mass does not underflow against the row's final maximum (the
 * CPU reference's rule, whichever thread or chunk holds the maximum) */
struct skl_state {
    float mp, sp, mq, sq, w, pinf;
};

__device__ __forceinline__ float shift_of(float m) { return m == -INFINITY ? 0.f : m; }

/* express a relative to new maxima Mp >= a.mp, Mq >= a.mq */
__device__ __forceinline__ void rebase(skl_state &a, float Mp, float Mq, float inv_t)
{
    float fp = a.mp == -INFINITY ? 0.f : kd_expf_ftz((a.mp - Mp) * inv_t);
    float fq = a.mq == -INFINITY ? 0.f : kd_expf_ftz((a.mq - Mq) * inv_t);
    float dp = a.mp == -INFINITY ? 0.f : Mp - a.mp;
    float dq = a.mq == -INFINITY ? 0.f : Mq - a.mq;
    a.w = fp == 0.f ? 0.f : (dp == 0.f && dq == 0.f ? a.w : fp * (a.w - a.sp * (dp - dq)));
    a.sp *= fp;
    a.sq *= fq;
    a.mp = Mp;
    a.mq = Mq;
}

__device__ __forceinline__ void merge(skl_state &a, skl_state b, float inv_t)
{
    float Mp = fmaxf(a.mp, b.mp), Mq = fmaxf(a.mq, b.mq);
    rebase(a, Mp, Mq, inv_t);
    rebase(b, Mp, Mq, inv_t);
    a.sp += b.sp;
    a.sq += b.sq;
    a.w += b.w;
    a.pinf = fmaxf(a.pinf, b.pinf);
}

/* add one class to a state whose maxima already cover it */
__device__ __forceinline__ void add_class(skl_state &a, float p, float q, float inv_t)
{
    float xp = p - shift_of(a.mp), xq = q - shift_of(a.mq);
    float ep = kd_expf_ftz(xp * inv_t), eq = kd_expf_ftz(xq * inv_t);
    a.sp += ep;
    a.sq += eq;
    if (q == -INFINITY)
        a.pinf = p > a.pinf ? p : a.pinf;
    else
        a.w += ep > 0.f ? ep * (xp - xq) : 0.f;
}

__device__ __forceinline__ skl_state shfl_state(skl_state a, int off)
{
    skl_state b;
    b.mp = __shfl_xor_sync(0xffffffffu, a.mp, off);
    b.sp = __shfl_xor_sync(0xffffffffu, a.sp, off);
    b.mq = __shfl_xor_sync(0xffffffffu, a.mq, off);
    b.sq = __shfl_xor_sync(0xffffffffu, a.sq, off);
    b.w = __shfl_xor_sync(0xffffffffu, a.w, off);
    b.pinf = __shfl_xor_sync(0xffffffffu, a.pinf, off);
    return b;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int off = 16; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* the row's KL from its merged state; also sets the degenerate-row flags */
struct skl_row {
    float kl;
    int empty; /* the target is all -inf: loss 0, gradient 0 */
    int inf;   /* +inf loss */
};

__device__ __forceinline__ skl_row row_result(const skl_state &a, float inv_t)
{
    skl_row r;
    r.empty = a.sp == 0.f; /* a NaN sum (NaN or +inf logits) is not empty: NaN goes on */
    r.inf =
        !r.empty && (!(a.sq > 0.f) || isinf(a.w) ||
                     (a.pinf != -INFINITY && kd_expf_ftz((a.pinf - shift_of(a.mp)) * inv_t) > 0.f));
    if (r.empty) {
        r.kl = 0.f;
    } else if (r.inf) {
        r.kl = INFINITY;
    } else { /* KL >= 0; a negative is rounding, and NaN passes (fmaxf would drop it) */
        const float kl = a.w * inv_t / a.sp + logf(a.sq / a.sp);
        r.kl = kl < 0.f ? 0.f : kl;
    }
    return r;
}

/*
 * Gradient of one class. ss/st: the student's and teacher's sums, shs/sht their shifts;
 * kg = scale * coef / (T n); c0 = log(S_t / S_s) - KL (reverse, finite rows); pm the
 * student's mass on teacher-masked classes (reverse, infinite rows).
 */
struct skl_grad {
    float inv_t, kg, shs, sht, ins, int_, c0, pm;
    int reverse, empty, inf;
};

__device__ __forceinline__ float grad_of(const skl_grad &g, float s, float t)
{
    if (g.empty)
        return 0.f;
    float xs = s - g.shs, xt = t - g.sht;
    float ps = kd_expf_ftz(xs * g.inv_t) * g.ins;
    if (!g.reverse)
        return g.kg * (ps - kd_expf_ftz(xt * g.inv_t) * g.int_);
    if (!(ps > 0.f))
        return 0.f;
    if (!g.inf)
        return g.kg * ps * ((xs - xt) * g.inv_t + g.c0);
    return g.kg * ps * ((t == -INFINITY ? 1.f : 0.f) - g.pm);
}

__device__ __forceinline__ skl_grad grad_setup(const skl_state &a, const skl_row &r, float inv_t,
                                               float kg, int reverse)
{
    skl_grad g;
    float ss = reverse ? a.sp : a.sq, st = reverse ? a.sq : a.sp;
    g.inv_t = inv_t;
    g.kg = kg;
    g.shs = shift_of(reverse ? a.mp : a.mq);
    g.sht = shift_of(reverse ? a.mq : a.mp);
    g.ins = ss > 0.f ? 1.f / ss : 0.f;
    g.int_ = st > 0.f ? 1.f / st : 0.f;
    g.c0 = r.inf || r.empty ? 0.f : logf(st / ss) - r.kl;
    g.pm = 0.f;
    g.reverse = reverse;
    g.empty = r.empty;
    g.inf = r.inf;
    return g;
}

/* ---- variant 1: a warp per row, the row in registers (VPT values per lane) ---- */

template <int VPT, int VEC, typename Tin, typename Tout>
__global__ void __launch_bounds__(32 * SKL_WARP_ROWS)
    skl_warp_kernel(int n, int c, const Tin *s, const Tin *t, float inv_t, int reverse, float kg,
                    float coef, Tout *ds, double *row_loss)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * SKL_WARP_ROWS + threadIdx.x / 32;
    if (row >= n)
        return; /* the whole warp leaves together */
    const Tin *sr = s + (size_t)row * c, *tr = t + (size_t)row * c;
    float xs[VPT], xt[VPT];
#pragma unroll
    for (int v = 0; v < VPT / VEC; v++) {
        int base = (v * 32 + lane) * VEC;
        if (base < c) {
            load_vec<Tin, VEC>(sr + base, xs + v * VEC);
            load_vec<Tin, VEC>(tr + base, xt + v * VEC);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; k++)
                xs[v * VEC + k] = xt[v * VEC + k] = -INFINITY;
        }
    }
    /* the whole row is here: exact maxima first, then one sum (no rescaling needed) */
    skl_state a = {-INFINITY, 0.f, -INFINITY, 0.f, 0.f, -INFINITY};
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        a.mp = fmaxf(a.mp, reverse ? xs[i] : xt[i]);
        a.mq = fmaxf(a.mq, reverse ? xt[i] : xs[i]);
    }
    a.mp = warp_max(a.mp);
    a.mq = warp_max(a.mq);
#pragma unroll
    for (int i = 0; i < VPT; i++)
        add_class(a, reverse ? xs[i] : xt[i], reverse ? xt[i] : xs[i], inv_t);
    a.sp = kd_warp_sum_f(a.sp);
    a.sq = kd_warp_sum_f(a.sq);
    a.w = kd_warp_sum_f(a.w);
    a.pinf = warp_max(a.pinf);
    skl_row r = row_result(a, inv_t);
    if (lane == 0)
        row_loss[row] = (double)coef * (double)r.kl;
    if (!ds)
        return;
    skl_grad g = grad_setup(a, r, inv_t, kg, reverse);
    if (reverse && r.inf && !r.empty) {
        float pm = 0.f;
#pragma unroll
        for (int i = 0; i < VPT; i++)
            if (xt[i] == -INFINITY && xs[i] != -INFINITY)
                pm += kd_expf_ftz((xs[i] - g.shs) * inv_t) * g.ins;
        g.pm = kd_warp_sum_f(pm);
    }
    Tout *dr = ds + (size_t)row * c;
#pragma unroll
    for (int v = 0; v < VPT / VEC; v++) {
        int base = (v * 32 + lane) * VEC;
        if (base < c) {
            float o[VEC];
#pragma unroll
            for (int k = 0; k < VEC; k++)
                o[k] = grad_of(g, xs[v * VEC + k], xt[v * VEC + k]);
            store_vec<Tout, VEC>(dr + base, o);
        }
    }
}

/* ---- variant 2: a block per row, online state per thread, merged across the block ---- */

__device__ skl_state block_merge(skl_state a, float inv_t)
{
    __shared__ skl_state part[SKL_BLOCK / 32];
    for (int off = 16; off > 0; off >>= 1)
        merge(a, shfl_state(a, off), inv_t);
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (lane == 0)
        part[warp] = a;
    __syncthreads();
    if (warp == 0) {
        a = lane < (int)(blockDim.x / 32) ? part[lane] : skl_state{-INFINITY, 0.f, -INFINITY,
                                                                   0.f,       0.f, -INFINITY};
        for (int off = 16; off > 0; off >>= 1)
            merge(a, shfl_state(a, off), inv_t);
        if (lane == 0)
            part[0] = a;
    }
    __syncthreads();
    a = part[0];
    __syncthreads(); /* part is reused by the next call */
    return a;
}

/* the block's float sum (kd_block_reduce in float: warp shuffles, then the first warp) */
__device__ float block_sum(float v) { return kd_block_reduce(v, kd_op_sum(), 0.f); }

template <int VEC, typename Tin, typename Tout>
__global__ void __launch_bounds__(SKL_BLOCK)
    skl_block_kernel(int n, int c, const Tin *s, const Tin *t, float inv_t, int reverse, float kg,
                     float coef, Tout *ds, double *row_loss)
{
    const int row = blockIdx.x;
    const Tin *sr = s + (size_t)row * c, *tr = t + (size_t)row * c;
    const int nvec = c / VEC;
    skl_state a = {-INFINITY, 0.f, -INFINITY, 0.f, 0.f, -INFINITY};
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float xs[VEC], xt[VEC];
        load_vec<Tin, VEC>(sr + v * VEC, xs);
        load_vec<Tin, VEC>(tr + v * VEC, xt);
        float vmp = -INFINITY, vmq = -INFINITY;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            vmp = fmaxf(vmp, reverse ? xs[k] : xt[k]);
            vmq = fmaxf(vmq, reverse ? xt[k] : xs[k]);
        }
        if (vmp > a.mp || vmq > a.mq)
            rebase(a, fmaxf(a.mp, vmp), fmaxf(a.mq, vmq), inv_t);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            add_class(a, reverse ? xs[k] : xt[k], reverse ? xt[k] : xs[k], inv_t);
    }
    a = block_merge(a, inv_t);
    skl_row r = row_result(a, inv_t);
    if (threadIdx.x == 0)
        row_loss[row] = (double)coef * (double)r.kl;
    if (!ds)
        return;
    skl_grad g = grad_setup(a, r, inv_t, kg, reverse);
    if (reverse && r.inf && !r.empty) { /* rare: one more sweep for the masked mass */
        float pm = 0.f;
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float xs = to_f(sr[j]), xt = to_f(tr[j]);
            if (xt == -INFINITY && xs != -INFINITY)
                pm += kd_expf_ftz((xs - g.shs) * inv_t) * g.ins;
        }
        g.pm = block_sum(pm);
    }
    Tout *dr = ds + (size_t)row * c;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        float xs[VEC], xt[VEC], o[VEC];
        load_vec<Tin, VEC>(sr + v * VEC, xs);
        load_vec<Tin, VEC>(tr + v * VEC, xt);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            o[k] = grad_of(g, xs[k], xt[k]);
        store_vec<Tout, VEC>(dr + v * VEC, o);
    }
}

/* ---- launch ---- */

struct skl_args {
    int n, c;
    const void *s, *t;
    float inv_t, kg, coef;
    int reverse;
    void *ds;
    double *row_loss;
    cudaStream_t stream;
};

template <int VPT, int VEC, typename Tin, typename Tout> static void launch_warp(const skl_args &a)
{
    unsigned blocks = (unsigned)((a.n + SKL_WARP_ROWS - 1) / SKL_WARP_ROWS);
    skl_warp_kernel<VPT, VEC, Tin, Tout><<<blocks, 32 * SKL_WARP_ROWS, 0, a.stream>>>(
        a.n, a.c, (const Tin *)a.s, (const Tin *)a.t, a.inv_t, a.reverse, a.kg, a.coef,
        (Tout *)a.ds, a.row_loss);
}

/* values per lane: the smallest of 4, 8, 16, 32 (and at least VEC) covering c */
template <int VEC, typename Tin, typename Tout> static void dispatch_warp(const skl_args &a)
{
    if (a.c <= 32 * 4 && VEC <= 4)
        launch_warp<(VEC > 4 ? VEC : 4), VEC, Tin, Tout>(a);
    else if (a.c <= 32 * 8)
        launch_warp<8, VEC, Tin, Tout>(a);
    else if (a.c <= 32 * 16)
        launch_warp<16, VEC, Tin, Tout>(a);
    else
        launch_warp<32, VEC, Tin, Tout>(a);
}

template <int VEC, typename Tin, typename Tout> static void dispatch_block(const skl_args &a)
{
    skl_block_kernel<VEC, Tin, Tout>
        <<<a.n, SKL_BLOCK, 0, a.stream>>>(a.n, a.c, (const Tin *)a.s, (const Tin *)a.t, a.inv_t,
                                          a.reverse, a.kg, a.coef, (Tout *)a.ds, a.row_loss);
}

template <typename Tin, typename Tout> static void dispatch(const skl_args &a, int warp, int vec)
{
    constexpr int V = 16 / sizeof(Tin); /* elements per 16-byte load */
    if (warp)
        vec ? dispatch_warp<V, Tin, Tout>(a) : dispatch_warp<1, Tin, Tout>(a);
    else
        vec ? dispatch_block<V, Tin, Tout>(a) : dispatch_block<1, Tin, Tout>(a);
}

extern "C" kd_status kd_cuda_softmax_kl(void *stream, int n, int c, int in_dtype, const void *s,
                                        const void *t, double temperature, int reverse,
                                        int t2_scale, void *ds, int ds_dtype, double scale,
                                        double *row_loss, int variant)
{
    if (n < 0 || c < 1 || !(temperature > 0) || !s || !t || !row_loss)
        return KD_FAIL(KD_ERR_INVALID,
                       "softmax_kl: bad arguments (n %d, c %d, temperature %g, pointers %s)", n, c,
                       temperature, s && t && row_loss ? "set" : "missing");
    if ((in_dtype != KD_SKL_F32 && in_dtype != KD_SKL_BF16) ||
        (ds_dtype != KD_SKL_F32 && ds_dtype != KD_SKL_BF16))
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "softmax_kl: dtypes %d -> %d (float32 = %d, "
                       "bfloat16 = %d)",
                       in_dtype, ds_dtype, KD_SKL_F32, KD_SKL_BF16);
    if (variant == KD_SKL_WARP && c > SKL_WARP_MAX_COL)
        return KD_FAIL(KD_ERR_INVALID,
                       "softmax_kl: the warp variant holds at most %d classes "
                       "per row, got %d (use the block variant)",
                       SKL_WARP_MAX_COL, c);
    if (variant != KD_SKL_AUTO && variant != KD_SKL_WARP && variant != KD_SKL_BLOCK)
        return KD_FAIL(KD_ERR_INVALID, "softmax_kl: unknown variant %d", variant);
    if (n == 0)
        return KD_OK;
    const double coef = t2_scale ? temperature * temperature : 1.0;
    skl_args a = {n,
                  c,
                  s,
                  t,
                  (float)(1.0 / temperature),
                  (float)(scale * coef / temperature / n),
                  (float)coef,
                  reverse ? 1 : 0,
                  ds,
                  row_loss,
                  (cudaStream_t)stream};
    const int warp = variant == KD_SKL_WARP || (variant == KD_SKL_AUTO && c <= SKL_WARP_MAX_COL);
    const int per = in_dtype == KD_SKL_F32 ? 4 : 8;
    const int vec = c % per == 0 && kd_aligned16(s) && kd_aligned16(t) && (!ds || kd_aligned16(ds));
    if (in_dtype == KD_SKL_F32)
        ds_dtype == KD_SKL_F32 ? dispatch<float, float>(a, warp, vec)
                               : dispatch<float, __nv_bfloat16>(a, warp, vec);
    else
        ds_dtype == KD_SKL_F32 ? dispatch<__nv_bfloat16, float>(a, warp, vec)
                               : dispatch<__nv_bfloat16, __nv_bfloat16>(a, warp, vec);
    return kd_launch_status(warp ? "softmax_kl (warp per row)" : "softmax_kl (block per row)");
}

__global__ void sum_f64_kernel(int n, const double *x, double *out)
{
    __shared__ double part[256];
    double acc = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        acc += x[i];
    const double sum = kd_tree_sum(part, acc);
    if (threadIdx.x == 0)
        *out = sum;
}

extern "C" kd_status kd_cuda_sum_f64(void *stream, int n, const double *x, double *out)
{
    if (n < 0)
        return KD_FAIL(KD_ERR_INVALID, "sum_f64: n = %d", n);
    sum_f64_kernel<<<1, 256, 0, (cudaStream_t)stream>>>(n, x, out);
    return kd_launch_status("sum_f64");
}
