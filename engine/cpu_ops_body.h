/*
 * cpu_ops_body.h - the body of the CPU operations, written once over a real
 * type. engine/cpu_ops.c includes it twice: with T=float, SFX=f32 and
 * GEMM=cblas_sgemm, and with T=double, SFX=f64 and GEMM=cblas_dgemm. No
 * include guard on purpose. See cpu_ops.h for shapes and the gradient rule.
 */
#define KD_CAT_(a, b) a##_##b
#define KD_CAT(a, b)  KD_CAT_(a, b)
#define OP(name)      KD_CAT(kd_cpu_##name, SFX)

void OP(linear_fwd)(int n, int in, int out, const T *x, const T *w, const T *b, T *y)
{
    /* y[N,O] = x[N,I] * w[O,I]^T */
    GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1, x, in, w, in, 0, y, out);
    if (b) {
        for (int i = 0; i < n; i++)
            for (int o = 0; o < out; o++)
                y[(size_t)i * out + o] += b[o];
    }
}

void OP(linear_bwd)(int n, int in, int out, const T *x, const T *w, const T *dy, T *dx, T *dw,
                    T *db)
{
    /* dw[O,I] += dy[N,O]^T * x[N,I] */
    GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1, dy, out, x, in, 1, dw, in);
    if (db) {
        for (int i = 0; i < n; i++)
            for (int o = 0; o < out; o++)
                db[o] += dy[(size_t)i * out + o];
    }
    /* dx[N,I] = dy[N,O] * w[O,I] */
    if (dx)
        GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1, dy, out, w, in, 0, dx, in);
}

/* ---- convolution: im2col + GEMM per group over chunks of samples; depthwise direct ---- */

/* Whether a GEMM called from inside an OpenMP loop runs on its calling thread alone: true for
 * OpenBLAS built on OpenMP (it sees the enclosing parallel region); a pthread build would start
 * its own threads under each of ours. */
static int OP(blas_nests)(void) { return openblas_get_parallel() == 2; }

static int OP(conv_is_depthwise)(const kd_conv_shape *s)
{
    return s->groups > 1 && s->groups == s->c;
}

size_t OP(conv2d_ws)(const kd_conv_shape *s)
{
    if (OP(conv_is_depthwise)(s))
        return 0;
    size_t kg = (size_t)(s->c / s->groups) * s->kh * s->kw;
    size_t og = (size_t)(s->o / s->groups);
    size_t cols = (size_t)s->chunk * s->ho * s->wo;
    return (kg + og) * cols;
}

/* The outputs b in [0, n) whose input column b * st + off lies in [0, w): [*lo, *hi), lo <= hi. */
static void OP(inside_cols)(int w, int st, int off, int n, int *lo, int *hi)
{
    *lo = off < 0 ? (-off + st - 1) / st : 0;
    *hi = w - 1 - off < 0 ? 0 : (w - 1 - off) / st + 1;
    if (*hi > n)
        *hi = n;
    if (*lo > *hi)
        *lo = *hi;
}

/* col[(ci*kh+ky)*kw+kx][si*HWo + p] for samples s0..s0+cnt-1 of group g */
static void OP(im2col)(const kd_conv_shape *s, const T *x, int s0, int cnt, int g, T *col)
{
    const int cg = s->c / s->groups, hwo = s->ho * s->wo;
    const size_t ncols = (size_t)cnt * hwo;
    const int rows = cg * s->kh * s->kw;
#pragma omp parallel for schedule(static) if (rows * ncols > 32768)
    for (int r = 0; r < rows; r++) {
        const int ci = r / (s->kh * s->kw), ky = (r / s->kw) % s->kh, kx = r % s->kw;
        const int st = s->stride, off = kx - s->pad; /* input column ox * st + off */
        int lo, hi;
        OP(inside_cols)(s->w, st, off, s->wo, &lo, &hi);
        T *dst = col + (size_t)r * ncols;
        for (int si = 0; si < cnt; si++) {
            const T *plane = x + ((size_t)(s0 + si) * s->c + (size_t)g * cg + ci) * s->h * s->w;
            T *d = dst + (size_t)si * hwo;
            if (s->kh == 1 && s->kw == 1 && s->stride == 1 && s->pad == 0) { /* the plane as is */
                memcpy(d, plane, sizeof(T) * hwo);
                continue;
            }
            for (int oy = 0; oy < s->ho; oy++) {
                int iy = oy * s->stride - s->pad + ky;
                T *drow = d + (size_t)oy * s->wo;
                if (iy < 0 || iy >= s->h) {
                    for (int ox = 0; ox < s->wo; ox++)
                        drow[ox] = 0;
                    continue;
                }
                const T *xrow = plane + (size_t)iy * s->w;
                for (int ox = 0; ox < lo; ox++)
                    drow[ox] = 0;
                if (st == 1) /* unit stride, which vectorises */
                    for (int ox = lo; ox < hi; ox++)
                        drow[ox] = xrow[ox + off];
                else
                    for (int ox = lo; ox < hi; ox++)
                        drow[ox] = xrow[ox * st + off];
                for (int ox = hi; ox < s->wo; ox++)
                    drow[ox] = 0;
            }
        }
    }
}

/* dx[...] += col2im(col); parallel over input channels so writes never collide */
static void OP(col2im)(const kd_conv_shape *s, const T *col, int s0, int cnt, int g, T *dx)
{
    const int cg = s->c / s->groups, hwo = s->ho * s->wo;
    const size_t ncols = (size_t)cnt * hwo;
#pragma omp parallel for schedule(static) if (cg * ncols * s->kh * s->kw > 32768)
    for (int ci = 0; ci < cg; ci++) {
        for (int si = 0; si < cnt; si++) {
            T *plane = dx + ((size_t)(s0 + si) * s->c + (size_t)g * cg + ci) * s->h * s->w;
            for (int ky = 0; ky < s->kh; ky++)
                for (int kx = 0; kx < s->kw; kx++) {
                    const T *src =
                        col + (size_t)((ci * s->kh + ky) * s->kw + kx) * ncols + (size_t)si * hwo;
                    for (int oy = 0; oy < s->ho; oy++) {
                        int iy = oy * s->stride - s->pad + ky;
                        if (iy < 0 || iy >= s->h)
                            continue;
                        T *xrow = plane + (size_t)iy * s->w;
                        const T *srow = src + (size_t)oy * s->wo;
                        for (int ox = 0; ox < s->wo; ox++) {
                            int ix = ox * s->stride - s->pad + kx;
                            if (ix >= 0 && ix < s->w)
                                xrow[ix] += srow[ox];
                        }
                    }
                }
        }
    }
}

/*
 * Depthwise, small planes: the input plane is copied into a zero-bordered buffer wp = w + 2*pad
 * wide, and outputs are computed on rows of the same width, so every kernel tap is one
 * contiguous multiply-add over the whole plane (long vectorised loops instead of many 7- or
 * 14-wide ones); the wp - wo extra columns are discarded. The backward pass below works so at
 * stride 1; the forward pass at every stride and the input gradient at stride 2 or more split
 * the buffer into phases first (dw_phase_plan). Larger planes use the direct loops further down.
 */
#define KD_DW_PLANE_MAX 4096

/* n elements from src to dst, the two not overlapping: the planes' rows are 7 to 28 elements
 * long, copied a few hundred thousand times per training step, where a call to memcpy costs more
 * than the copy; the fixed-size blocks compile to plain vector moves */
static inline void OP(copy_row)(T *dst, const T *src, int n)
{
    enum { B = 16 / sizeof(T) };
    if (n < B) {
        for (int i = 0; i < n; i++)
            dst[i] = src[i];
        return;
    }
    for (int i = 0; i + B <= n; i += B)
        __builtin_memcpy(dst + i, src + i, sizeof(T) * B);
    __builtin_memcpy(dst + n - B, src + n - B, sizeof(T) * B); /* the tail, overlapping */
}

/*
 * Depthwise through phases: the zero-bordered plane P (as above) is split into its st * st
 * phases, Q[ry][rx][a * wq + b] = P[(a st + ry) wp + b st + rx], so that tap (ky, kx) reads phase
 * (ky % st, kx % st) from offset (ky / st, kx / st) with unit stride, and each tap is again one
 * contiguous multiply-add over rows wq wide (the wq - wo extra columns are discarded); at stride
 * 1 the one phase is P. Every output adds its taps in dw_fwd's order, and every input gradient
 * its terms in dw_bwd's (dw_bwd runs output rows upwards, which for one input row is kernel rows
 * downwards), so the results are theirs bit for bit: the padding only adds zeros (unless a
 * weight is infinite, when inf * 0 makes NaN where the direct loops skip the padding).
 */
/* A convolution's phase split: phase rows wq wide, phases qsz apart, outputs computed on rows wq
 * wide (span values), and where tap t starts in the phases (Q + off[t]) */
typedef struct {
    int wq, qsz, span, ntaps;
    size_t off[64];
} OP(dw_phases);

/* Whether the split fits (stack planes of KD_DW_PLANE_MAX, at most 64 taps), and then ph. */
static int OP(dw_phase_plan)(const kd_conv_shape *s, OP(dw_phases) * ph)
{
    const int st = s->stride, hq = (s->h + 2 * s->pad + st - 1) / st;
    ph->wq = (s->w + 2 * s->pad + st - 1) / st;
    ph->qsz = hq * ph->wq + s->kw; /* a tap's run ends at most kw / st past the last phase row */
    ph->span = s->ho * ph->wq;
    ph->ntaps = s->kh * s->kw;
    if (ph->ntaps > 64 || (size_t)st * st * ph->qsz > KD_DW_PLANE_MAX)
        return 0;
    for (int ky = 0; ky < s->kh; ky++)
        for (int kx = 0; kx < s->kw; kx++)
            ph->off[ky * s->kw + kx] = (size_t)((ky % st) * st + kx % st) * ph->qsz +
                                       (size_t)(ky / st) * ph->wq + (size_t)(kx / st);
    return 1;
}

/* Q (st * st phases of qsz) from the plane in, zero where P is padding; or, with in NULL, the
 * plane out from Q (an input gradient accumulated in phases) */
static void OP(dw_phase_move)(const kd_conv_shape *s, const OP(dw_phases) * ph, const T *in, T *out,
                              T *Q)
{
    const int st = s->stride, wq = ph->wq, qsz = ph->qsz;
    if (in)
        memset(Q, 0, sizeof(T) * (size_t)st * st * qsz);
    for (int ry = 0; ry < st; ry++)
        for (int rx = 0; rx < st; rx++) {
            const int ix0 = rx - s->pad; /* ix of column b is b st + ix0 */
            int lo, hi;
            OP(inside_cols)(s->w, st, ix0, wq, &lo, &hi);
            T *phase = Q + (size_t)(ry * st + rx) * qsz;
            for (int a = 0, iy = ry - s->pad; iy < s->h; a++, iy += st) {
                if (iy < 0 || hi <= lo)
                    continue;
                T *q = phase + (size_t)a * wq + lo;
                const size_t i0 = (size_t)iy * s->w + (size_t)(lo * st + ix0); /* >= 0 from lo */
                if (st == 1 && in)
                    OP(copy_row)(q, in + i0, hi - lo);
                else if (st == 1)
                    OP(copy_row)(out + i0, q, hi - lo);
                else if (in)
                    for (int b = 0; b < hi - lo; b++)
                        q[b] = in[i0 + (size_t)b * st];
                else
                    for (int b = 0; b < hi - lo; b++)
                        out[i0 + (size_t)b * st] = q[b];
            }
        }
}

/* G[oy * wq + ox] = g[oy * wo + ox] for ox < wo, zero in the extra columns (output rows as the
 * phase split computes them) */
static void OP(dw_widen)(const kd_conv_shape *s, int wq, const T *g, T *G)
{
    for (int oy = 0; oy < s->ho; oy++) {
        OP(copy_row)(G + (size_t)oy * wq, g + (size_t)oy * s->wo, s->wo);
        for (int ox = s->wo; ox < wq; ox++)
            G[(size_t)oy * wq + ox] = 0;
    }
}

/* Stride 1 (ph: the one phase, the padded plane), every gradient. */
static void OP(dw_bwd_padded)(const kd_conv_shape *s, const OP(dw_phases) * ph, const T *x,
                              const T *w, const T *dy, T *dx, T *dw, T *db)
{
    const int mult = s->o / s->c, wp = ph->wq, hwo = s->ho * s->wo;
    const int span = ph->span, hw = s->h * s->w;
    /* parameter grads: one output channel per iteration, summed over the batch */
#pragma omp parallel for schedule(static)
    for (int o = 0; o < s->o; o++) {
        T P[KD_DW_PLANE_MAX], G[KD_DW_PLANE_MAX], taps[64];
        const int ntaps = s->kh * s->kw, ci = o / mult;
        double dk[64] = {0};
        double bsum = 0;
        for (int ni = 0; ni < s->n; ni++) {
            const T *g = dy + ((size_t)ni * s->o + o) * hwo;
            OP(dw_phase_move)(s, ph, x + ((size_t)ni * s->c + ci) * hw, NULL, P);
            OP(dw_widen)(s, wp, g, G);
            T gs = 0;
#pragma omp simd reduction(+ : gs)
            for (int i = 0; i < hwo; i++)
                gs += g[i];
            bsum += gs;
            for (int ky = 0; ky < s->kh; ky++)
                for (int kx = 0; kx < s->kw; kx++) {
                    const T *src = P + (size_t)ky * wp + kx;
                    T acc = 0;
#pragma omp simd reduction(+ : acc)
                    for (int i = 0; i < span; i++)
                        acc += G[i] * src[i];
                    taps[ky * s->kw + kx] = acc;
                }
            for (int t = 0; t < ntaps; t++)
                dk[t] += taps[t];
        }
        for (int t = 0; t < ntaps; t++)
            dw[(size_t)o * ntaps + t] += (T)dk[t];
        if (db)
            db[o] += (T)bsum;
    }
    if (!dx)
        return;
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)s->n * s->c; nc++) {
        T D[KD_DW_PLANE_MAX], G[KD_DW_PLANE_MAX];
        int ni = (int)(nc / s->c), ci = (int)(nc % s->c);
        memset(D, 0, sizeof(T) * (size_t)ph->qsz);
        for (int m = 0; m < mult; m++) {
            int o = ci * mult + m;
            OP(dw_widen)(s, wp, dy + ((size_t)ni * s->o + o) * hwo, G);
            const T *k = w + (size_t)o * s->kh * s->kw;
            for (int ky = 0; ky < s->kh; ky++)
                for (int kx = 0; kx < s->kw; kx++) {
                    const T kv = k[ky * s->kw + kx];
                    T *dst = D + (size_t)ky * wp + kx;
#pragma omp simd
                    for (int i = 0; i < span; i++)
                        dst[i] += kv * G[i];
                }
        }
        OP(dw_phase_move)(s, ph, NULL, dx + (size_t)nc * hw, D);
    }
}

static void OP(dw_fwd_phased)(const kd_conv_shape *s, const OP(dw_phases) * ph, const T *x,
                              const T *w, const T *b, T *y)
{
    const int mult = s->o / s->c, hwo = s->ho * s->wo, wq = ph->wq, span = ph->span;
#pragma omp parallel for schedule(static)
    for (long no = 0; no < (long)s->n * s->o; no++) {
        T Q[KD_DW_PLANE_MAX], acc[KD_DW_PLANE_MAX];
        const int ni = (int)(no / s->o), o = (int)(no % s->o), ci = o / mult;
        OP(dw_phase_move)(s, ph, x + ((size_t)ni * s->c + ci) * s->h * s->w, NULL, Q);
        const T *k = w + (size_t)o * s->kh * s->kw;
        const T bias = b ? b[o] : 0;
        for (int i = 0; i < span; i++)
            acc[i] = bias;
        for (int t = 0; t < ph->ntaps; t++) { /* kernel row by row */
            const T kv = k[t], *src = Q + ph->off[t];
#pragma omp simd
            for (int i = 0; i < span; i++)
                acc[i] += kv * src[i];
        }
        T *out = y + (size_t)no * hwo;
        for (int oy = 0; oy < s->ho; oy++)
            OP(copy_row)(out + (size_t)oy * s->wo, acc + (size_t)oy * wq, s->wo);
    }
}

/* dx only (dw_bwd computes the parameter gradients) */
static void OP(dw_bwd_dx_phased)(const kd_conv_shape *s, const OP(dw_phases) * ph, const T *w,
                                 const T *dy, T *dx)
{
    const int st = s->stride, mult = s->o / s->c, hwo = s->ho * s->wo, hw = s->h * s->w;
    const int span = ph->span;
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)s->n * s->c; nc++) {
        T D[KD_DW_PLANE_MAX], G[KD_DW_PLANE_MAX];
        const int ni = (int)(nc / s->c), ci = (int)(nc % s->c);
        memset(D, 0, sizeof(T) * (size_t)st * st * ph->qsz);
        for (int m = 0; m < mult; m++) {
            const int o = ci * mult + m;
            OP(dw_widen)(s, ph->wq, dy + ((size_t)ni * s->o + o) * hwo, G);
            const T *k = w + (size_t)o * s->kh * s->kw;
            for (int j = 0; j < ph->ntaps; j++) { /* kernel rows from the last, columns in order */
                const int t = (s->kh - 1 - j / s->kw) * s->kw + j % s->kw;
                const T kv = k[t];
                T *dst = D + ph->off[t];
#pragma omp simd
                for (int i = 0; i < span; i++)
                    dst[i] += kv * G[i];
            }
        }
        OP(dw_phase_move)(s, ph, NULL, dx + (size_t)nc * hw, D);
    }
}

static void OP(dw_fwd)(const kd_conv_shape *s, const T *x, const T *w, const T *b, T *y)
{
    const int mult = s->o / s->c, hwo = s->ho * s->wo;
#pragma omp parallel for schedule(static)
    for (long no = 0; no < (long)s->n * s->o; no++) {
        int ni = (int)(no / s->o), o = (int)(no % s->o), ci = o / mult;
        const T *plane = x + ((size_t)ni * s->c + ci) * s->h * s->w;
        const T *k = w + (size_t)o * s->kh * s->kw;
        T *out = y + (size_t)no * hwo;
        T bias = b ? b[o] : 0;
        for (int i = 0; i < hwo; i++)
            out[i] = bias;
        for (int oy = 0; oy < s->ho; oy++) {
            T *orow = out + (size_t)oy * s->wo;
            for (int ky = 0; ky < s->kh; ky++) {
                int iy = oy * s->stride - s->pad + ky;
                if (iy < 0 || iy >= s->h)
                    continue;
                const T *xrow = plane + (size_t)iy * s->w;
                for (int kx = 0; kx < s->kw; kx++) {
                    T kv = k[ky * s->kw + kx];
                    int off = kx - s->pad; /* ix = ox*stride + off */
                    int lo = off < 0 ? (-off + s->stride - 1) / s->stride : 0;
                    int hi = (s->w - 1 - off) / s->stride + 1;
                    if (s->w - 1 - off < 0)
                        hi = 0;
                    if (hi > s->wo)
                        hi = s->wo;
                    if (s->stride == 1) {
                        for (int ox = lo; ox < hi; ox++)
                            orow[ox] += kv * xrow[ox + off];
                    } else {
                        for (int ox = lo; ox < hi; ox++)
                            orow[ox] += kv * xrow[ox * s->stride + off];
                    }
                }
            }
        }
    }
}

static void OP(dw_bwd)(const kd_conv_shape *s, const T *x, const T *w, const T *dy, T *dx, T *dw,
                       T *db)
{
    const int mult = s->o / s->c, hwo = s->ho * s->wo, hw = s->h * s->w;
    /* parameter grads: one output channel per iteration, summed over the batch */
#pragma omp parallel for schedule(static)
    for (int o = 0; o < s->o; o++) {
        int ci = o / mult;
        T *dk = dw + (size_t)o * s->kh * s->kw;
        T bsum = 0;
        for (int ni = 0; ni < s->n; ni++) {
            const T *g = dy + ((size_t)ni * s->o + o) * hwo;
            const T *plane = x + ((size_t)ni * s->c + ci) * hw;
            for (int i = 0; i < hwo; i++)
                bsum += g[i];
            for (int ky = 0; ky < s->kh; ky++)
                for (int kx = 0; kx < s->kw; kx++) {
                    T acc = 0;
                    int off = kx - s->pad;
                    int lo = off < 0 ? (-off + s->stride - 1) / s->stride : 0;
                    int hi = (s->w - 1 - off) < 0 ? 0 : (s->w - 1 - off) / s->stride + 1;
                    if (hi > s->wo)
                        hi = s->wo;
                    for (int oy = 0; oy < s->ho; oy++) {
                        int iy = oy * s->stride - s->pad + ky;
                        if (iy < 0 || iy >= s->h)
                            continue;
                        const T *xrow = plane + (size_t)iy * s->w;
                        const T *grow = g + (size_t)oy * s->wo;
                        T racc = 0;
                        if (s->stride == 1) {
#pragma omp simd reduction(+ : racc)
                            for (int ox = lo; ox < hi; ox++)
                                racc += grow[ox] * xrow[ox + off];
                        } else {
#pragma omp simd reduction(+ : racc)
                            for (int ox = lo; ox < hi; ox++)
                                racc += grow[ox] * xrow[ox * s->stride + off];
                        }
                        acc += racc;
                    }
                    dk[ky * s->kw + kx] += acc;
                }
        }
        if (db)
            db[o] += bsum;
    }
    if (!dx)
        return;
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)s->n * s->c; nc++) {
        int ni = (int)(nc / s->c), ci = (int)(nc % s->c);
        T *dplane = dx + (size_t)nc * hw;
        for (int i = 0; i < hw; i++)
            dplane[i] = 0;
        for (int m = 0; m < mult; m++) {
            int o = ci * mult + m;
            const T *g = dy + ((size_t)ni * s->o + o) * hwo;
            const T *k = w + (size_t)o * s->kh * s->kw;
            for (int oy = 0; oy < s->ho; oy++) {
                const T *grow = g + (size_t)oy * s->wo;
                for (int ky = 0; ky < s->kh; ky++) {
                    int iy = oy * s->stride - s->pad + ky;
                    if (iy < 0 || iy >= s->h)
                        continue;
                    T *drow = dplane + (size_t)iy * s->w;
                    for (int kx = 0; kx < s->kw; kx++) {
                        T kv = k[ky * s->kw + kx];
                        int off = kx - s->pad;
                        int lo = off < 0 ? (-off + s->stride - 1) / s->stride : 0;
                        int hi = (s->w - 1 - off) < 0 ? 0 : (s->w - 1 - off) / s->stride + 1;
                        if (hi > s->wo)
                            hi = s->wo;
                        for (int ox = lo; ox < hi; ox++)
                            drow[ox * s->stride + off] += kv * grow[ox];
                    }
                }
            }
        }
    }
}

void OP(conv2d_fwd)(const kd_conv_shape *s, const T *x, const T *w, const T *b, T *y, T *ws)
{
    if (OP(conv_is_depthwise)(s)) {
        OP(dw_phases) ph;
        if (OP(dw_phase_plan)(s, &ph)) /* at stride 1, the padded plane itself */
            OP(dw_fwd_phased)(s, &ph, x, w, b, y);
        else
            OP(dw_fwd)(s, x, w, b, y);
        return;
    }
    const int cg = s->c / s->groups, og = s->o / s->groups, hwo = s->ho * s->wo;
    const int kg = cg * s->kh * s->kw;
    const int direct1x1 = s->kh == 1 && s->kw == 1 && s->stride == 1 && s->pad == 0;
    for (int s0 = 0; s0 < s->n; s0 += s->chunk) {
        int cnt = s->n - s0 < s->chunk ? s->n - s0 : s->chunk;
        for (int g = 0; g < s->groups; g++) {
            const T *wg = w + (size_t)g * og * kg;
            if (cnt == 1) {
                /* one sample: the product lands straight in y's [O_g, HoWo] slab */
                T *yg = y + ((size_t)s0 * s->o + (size_t)g * og) * hwo;
                const T *colp;
                if (direct1x1) {
                    colp = x + ((size_t)s0 * s->c + (size_t)g * cg) * hwo;
                } else {
                    OP(im2col)(s, x, s0, 1, g, ws);
                    colp = ws;
                }
                GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, og, hwo, kg, 1, wg, kg, colp, hwo,
                     0, yg, hwo);
                continue;
            }
            const size_t ncols = (size_t)cnt * hwo;
            T *col = ws, *tmp = ws + (size_t)kg * ncols;
            OP(im2col)(s, x, s0, cnt, g, col);
            GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, og, (int)ncols, kg, 1, wg, kg, col,
                 (int)ncols, 0, tmp, (int)ncols);
#pragma omp parallel for schedule(static) if (og * ncols > 32768)
            for (int oc = 0; oc < og; oc++)
                for (int si = 0; si < cnt; si++)
                    memcpy(y + ((size_t)(s0 + si) * s->o + (size_t)g * og + oc) * hwo,
                           tmp + (size_t)oc * ncols + (size_t)si * hwo, sizeof(T) * hwo);
        }
    }
    if (b) {
#pragma omp parallel for schedule(static)
        for (long no = 0; no < (long)s->n * s->o; no++) {
            T bv = b[no % s->o];
            T *p = y + (size_t)no * hwo;
            for (int i = 0; i < hwo; i++)
                p[i] += bv;
        }
    }
}

void OP(conv2d_bwd)(const kd_conv_shape *s, const T *x, const T *w, const T *dy, T *dx, T *dw,
                    T *db, T *ws)
{
    if (OP(conv_is_depthwise)(s)) {
        OP(dw_phases) ph;
        const int phased = OP(dw_phase_plan)(s, &ph);
        if (phased && s->stride == 1) {
            OP(dw_bwd_padded)(s, &ph, x, w, dy, dx, dw, db);
        } else if (phased) {
            OP(dw_bwd)(s, x, w, dy, NULL, dw, db);
            if (dx)
                OP(dw_bwd_dx_phased)(s, &ph, w, dy, dx);
        } else {
            OP(dw_bwd)(s, x, w, dy, dx, dw, db);
        }
        return;
    }
    const int cg = s->c / s->groups, og = s->o / s->groups, hwo = s->ho * s->wo;
    const int kg = cg * s->kh * s->kw;
    const int direct1x1 = s->kh == 1 && s->kw == 1 && s->stride == 1 && s->pad == 0;
    if (db) {
        for (int ni = 0; ni < s->n; ni++)
            for (int o = 0; o < s->o; o++) {
                const T *g = dy + ((size_t)ni * s->o + o) * hwo;
                T acc = 0;
                for (int i = 0; i < hwo; i++)
                    acc += g[i];
                db[o] += acc;
            }
    }
    if (dx && !direct1x1)
        memset(dx, 0, sizeof(T) * (size_t)s->n * s->c * s->h * s->w);
    for (int s0 = 0; s0 < s->n; s0 += s->chunk) {
        int cnt = s->n - s0 < s->chunk ? s->n - s0 : s->chunk;
        const size_t ncols = (size_t)cnt * hwo;
        for (int g = 0; g < s->groups; g++) {
            const T *wg = w + (size_t)g * og * kg;
            T *dwg = dw + (size_t)g * og * kg;
            T *col = ws, *gy = ws + (size_t)kg * ncols;
            const T *gyp;
            if (cnt == 1) {
                gyp = dy + ((size_t)s0 * s->o + (size_t)g * og) * hwo;
            } else {
#pragma omp parallel for schedule(static) if (og * ncols > 32768)
                for (int oc = 0; oc < og; oc++)
                    for (int si = 0; si < cnt; si++)
                        memcpy(gy + (size_t)oc * ncols + (size_t)si * hwo,
                               dy + ((size_t)(s0 + si) * s->o + (size_t)g * og + oc) * hwo,
                               sizeof(T) * hwo);
                gyp = gy;
            }
            const T *colp;
            if (direct1x1 && cnt == 1) {
                colp = x + ((size_t)s0 * s->c + (size_t)g * cg) * hwo;
            } else {
                OP(im2col)(s, x, s0, cnt, g, col);
                colp = col;
            }
            /* dw_g[Og, Kg] += gy[Og, cols] * col[Kg, cols]^T */
            GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, og, kg, (int)ncols, 1, gyp, (int)ncols,
                 colp, (int)ncols, 1, dwg, kg);
            if (!dx || (direct1x1 && OP(blas_nests)()))
                continue;
            if (direct1x1 && cnt == 1) {
                T *dxg = dx + ((size_t)s0 * s->c + (size_t)g * cg) * hwo;
                GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, kg, hwo, og, 1, wg, kg, gyp, hwo, 0,
                     dxg, hwo);
                continue;
            }
            /* col[Kg, cols] = w_g[Og, Kg]^T * gy[Og, cols], then scatter-add into dx */
            GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, kg, (int)ncols, og, 1, wg, kg, gyp,
                 (int)ncols, 0, col, (int)ncols);
            if (direct1x1) {
                for (int si = 0; si < cnt; si++)
                    for (int ci = 0; ci < cg; ci++)
                        memcpy(dx + ((size_t)(s0 + si) * s->c + (size_t)g * cg + ci) * hwo,
                               col + (size_t)ci * ncols + (size_t)si * hwo, sizeof(T) * hwo);
            } else {
                OP(col2im)(s, col, s0, cnt, g, dx);
            }
        }
    }
    if (dx && direct1x1 && OP(blas_nests)()) {
        /* a 1x1 convolution's input gradient, one product per sample straight into place, the
         * samples over the threads (with OpenBLAS 0.3.21 on AVX-512 the float bytes are the
         * batched product's; double ones differ in the last bits) */
#pragma omp parallel for schedule(static)
        for (int ni = 0; ni < s->n; ni++)
            for (int g = 0; g < s->groups; g++)
                GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, kg, hwo, og, 1,
                     w + (size_t)g * og * kg, kg, dy + ((size_t)ni * s->o + (size_t)g * og) * hwo,
                     hwo, 0, dx + ((size_t)ni * s->c + (size_t)g * cg) * hwo, hwo);
    }
}

/* ---- batch norm, optionally fused with the activation that follows ---- */

/*
 * Per-channel statistics in one pass. Sums are taken around a pivot (the
 * channel's first value) so a large mean does not cancel the variance, in T
 * within a plane (vectorised) and in double across planes.
 */
static void OP(bn_stats)(int n, int c, int hw, const T *x, int ch, double *mean, double *var)
{
    const T pivot = x[(size_t)ch * hw];
    double s = 0, q = 0;
    for (int i = 0; i < n; i++) {
        const T *p = x + ((size_t)i * c + ch) * hw;
        T ps = 0, pq = 0;
#pragma omp simd reduction(+ : ps, pq)
        for (int j = 0; j < hw; j++) {
            T d = p[j] - pivot;
            ps += d;
            pq += d * d;
        }
        s += ps;
        q += pq;
    }
    const double m = (double)n * hw;
    double dm = s / m;
    *mean = pivot + dm;
    *var = q / m - dm * dm;
    if (*var < 0)
        *var = 0;
}

static void OP(bn_apply)(int n, int c, int hw, const T *x, T *y, int ch, T sc, T sh, T cap)
{
    for (int i = 0; i < n; i++) {
        const T *p = x + ((size_t)i * c + ch) * hw;
        T *q = y + ((size_t)i * c + ch) * hw;
        if (cap == 0) {
#pragma omp simd
            for (int j = 0; j < hw; j++)
                q[j] = p[j] * sc + sh;
        } else {
            const T hi = cap > 0 ? cap : (T)INFINITY;
#pragma omp simd
            for (int j = 0; j < hw; j++) {
                T v = p[j] * sc + sh; /* NaN passes: the trainer must see it */
                v = v <= 0 ? 0 : v;
                q[j] = v > hi ? hi : v;
            }
        }
    }
}

void OP(bn_fwd_train)(int n, int c, int hw, const T *x, const T *gamma, const T *beta, T *y,
                      T *save_mean, T *save_invstd, T *run_mean, T *run_var, double momentum,
                      double eps, double cap)
{
    const double m = (double)n * hw;
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < c; ch++) {
        double mean, var;
        OP(bn_stats)(n, c, hw, x, ch, &mean, &var);
        double invstd = 1.0 / sqrt(var + eps);
        save_mean[ch] = (T)mean;
        save_invstd[ch] = (T)invstd;
        if (run_mean) {
            double unbiased = m > 1 ? var * m / (m - 1) : var;
            run_mean[ch] = (T)((1 - momentum) * run_mean[ch] + momentum * mean);
            run_var[ch] = (T)((1 - momentum) * run_var[ch] + momentum * unbiased);
        }
        OP(bn_apply)
        (n, c, hw, x, y, ch, (T)(gamma[ch] * invstd), (T)(beta[ch] - mean * gamma[ch] * invstd),
         (T)cap);
    }
}

void OP(bn_fwd_eval)(int n, int c, int hw, const T *x, const T *gamma, const T *beta,
                     const T *run_mean, const T *run_var, T *y, double eps, double cap)
{
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < c; ch++) {
        double invstd = 1.0 / sqrt((double)run_var[ch] + eps);
        OP(bn_apply)
        (n, c, hw, x, y, ch, (T)(gamma[ch] * invstd),
         (T)(beta[ch] - run_mean[ch] * gamma[ch] * invstd), (T)cap);
    }
}

void OP(bn_bwd)(int n, int c, int hw, const T *x, const T *dy, const T *gamma, const T *save_mean,
                const T *save_invstd, const T *y, double cap, T *dx, T *dgamma, T *dbeta)
{
    const double m = (double)n * hw;
    /* with a fused activation, the gradient reaching the norm is dy where 0 < y < cap */
    const T lo = 0, hi = cap > 0 ? (T)cap : (T)INFINITY;
    const int masked = cap != 0;
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < c; ch++) {
        const T mean = save_mean[ch];
        const double invstd = save_invstd[ch];
        double sdy = 0, sdyx = 0;
        for (int i = 0; i < n; i++) {
            size_t off = ((size_t)i * c + ch) * hw;
            const T *p = x + off, *g = dy + off, *o = y + off;
            T a = 0, b = 0;
            if (masked) {
#pragma omp simd reduction(+ : a, b)
                for (int j = 0; j < hw; j++) {
                    T gj = g[j] * (T)((o[j] > lo) & (o[j] < hi));
                    a += gj;
                    b += gj * (p[j] - mean);
                }
            } else {
#pragma omp simd reduction(+ : a, b)
                for (int j = 0; j < hw; j++) {
                    a += g[j];
                    b += g[j] * (p[j] - mean);
                }
            }
            sdy += a;
            sdyx += b;
        }
        dgamma[ch] += (T)(sdyx * invstd);
        dbeta[ch] += (T)sdy;
        if (!dx)
            continue;
        /* dx = gamma*invstd * (g - mean(g) - xhat * mean(g*xhat)) */
        const T k = (T)(gamma[ch] * invstd), mdy = (T)(sdy / m);
        const T mdyx = (T)(sdyx * invstd / m), is = (T)invstd;
        for (int i = 0; i < n; i++) {
            size_t off = ((size_t)i * c + ch) * hw;
            const T *p = x + off, *g = dy + off, *o = y + off;
            T *q = dx + off;
            if (masked) {
#pragma omp simd
                for (int j = 0; j < hw; j++) {
                    T gj = g[j] * (T)((o[j] > lo) & (o[j] < hi));
                    q[j] = k * (gj - mdy - (p[j] - mean) * is * mdyx);
                }
            } else {
#pragma omp simd
                for (int j = 0; j < hw; j++)
                    q[j] = k * (g[j] - mdy - (p[j] - mean) * is * mdyx);
            }
        }
    }
}

/* ---- activations ---- */

/* relu / relu6 written so that NaN passes (as in PyTorch): a diverged network's NaN must reach
 * the loss, where the trainer stops on it, not turn into 0 here */
void OP(act_fwd)(size_t n, const T *x, T *y, double cap)
{
    if (cap < 0) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++)
            y[i] = x[i] <= 0 ? 0 : x[i];
    } else {
        const T c = (T)cap;
#pragma omp parallel for simd schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++)
            y[i] = x[i] <= 0 ? 0 : (x[i] > c ? c : x[i]);
    }
}

void OP(act_bwd)(size_t n, const T *x, const T *dy, T *dx, double cap)
{
    const T c = cap < 0 ? (T)INFINITY : (T)cap;
    /* a multiply by the 0/1 mask rather than a select: a conditional load of dy keeps the
     * compiler from vectorising, and the data-dependent branch mispredicts half the time */
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++)
        dx[i] = dy[i] * (T)((x[i] > 0) & (x[i] < c));
}

/* ---- pooling ---- */

void OP(maxpool_fwd)(const kd_pool_shape *p, const T *x, T *y, int32_t *arg)
{
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)p->n * p->c; nc++) {
        const T *plane = x + (size_t)nc * p->h * p->w;
        T *out = y + (size_t)nc * p->ho * p->wo;
        int32_t *a = arg + (size_t)nc * p->ho * p->wo;
        for (int oy = 0; oy < p->ho; oy++)
            for (int ox = 0; ox < p->wo; ox++) {
                T best = -(T)INFINITY;
                int32_t bi = -1;
                for (int ky = 0; ky < p->k; ky++) {
                    int iy = oy * p->stride - p->pad + ky;
                    if (iy < 0 || iy >= p->h)
                        continue;
                    for (int kx = 0; kx < p->k; kx++) {
                        int ix = ox * p->stride - p->pad + kx;
                        if (ix < 0 || ix >= p->w)
                            continue;
                        T v = plane[iy * p->w + ix];
                        if (bi < 0 || v > best || v != v) { /* NaN wins, as in PyTorch */
                            best = v;
                            bi = iy * p->w + ix;
                        }
                    }
                }
                out[oy * p->wo + ox] = best;
                a[oy * p->wo + ox] = bi;
            }
    }
}

void OP(maxpool_bwd)(const kd_pool_shape *p, const T *dy, const int32_t *arg, T *dx)
{
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)p->n * p->c; nc++) {
        T *plane = dx + (size_t)nc * p->h * p->w;
        memset(plane, 0, sizeof(T) * p->h * p->w);
        const T *g = dy + (size_t)nc * p->ho * p->wo;
        const int32_t *a = arg + (size_t)nc * p->ho * p->wo;
        for (int i = 0; i < p->ho * p->wo; i++)
            if (a[i] >= 0)
                plane[a[i]] += g[i];
    }
}

void OP(avgpool_fwd)(const kd_pool_shape *p, const T *x, T *y)
{
    const T inv = (T)(1.0 / (p->k * p->k));
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)p->n * p->c; nc++) {
        const T *plane = x + (size_t)nc * p->h * p->w;
        T *out = y + (size_t)nc * p->ho * p->wo;
        for (int oy = 0; oy < p->ho; oy++)
            for (int ox = 0; ox < p->wo; ox++) {
                T acc = 0;
                for (int ky = 0; ky < p->k; ky++) {
                    int iy = oy * p->stride - p->pad + ky;
                    if (iy < 0 || iy >= p->h)
                        continue;
                    for (int kx = 0; kx < p->k; kx++) {
                        int ix = ox * p->stride - p->pad + kx;
                        if (ix >= 0 && ix < p->w)
                            acc += plane[iy * p->w + ix];
                    }
                }
                out[oy * p->wo + ox] = acc * inv;
            }
    }
}

void OP(avgpool_bwd)(const kd_pool_shape *p, const T *dy, T *dx)
{
    const T inv = (T)(1.0 / (p->k * p->k));
#pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)p->n * p->c; nc++) {
        T *plane = dx + (size_t)nc * p->h * p->w;
        memset(plane, 0, sizeof(T) * p->h * p->w);
        const T *g = dy + (size_t)nc * p->ho * p->wo;
        for (int oy = 0; oy < p->ho; oy++)
            for (int ox = 0; ox < p->wo; ox++) {
                T v = g[oy * p->wo + ox] * inv;
                for (int ky = 0; ky < p->k; ky++) {
                    int iy = oy * p->stride - p->pad + ky;
                    if (iy < 0 || iy >= p->h)
                        continue;
                    for (int kx = 0; kx < p->k; kx++) {
                        int ix = ox * p->stride - p->pad + kx;
                        if (ix >= 0 && ix < p->w)
                            plane[iy * p->w + ix] += v;
                    }
                }
            }
    }
}

void OP(gap_fwd)(int n, int c, int hw, const T *x, T *y)
{
    for (long i = 0; i < (long)n * c; i++) {
        const T *p = x + (size_t)i * hw;
        T acc = 0;
        for (int j = 0; j < hw; j++)
            acc += p[j];
        y[i] = acc / (T)hw;
    }
}

void OP(gap_bwd)(int n, int c, int hw, const T *dy, T *dx)
{
    for (long i = 0; i < (long)n * c; i++) {
        T v = dy[i] / (T)hw;
        T *p = dx + (size_t)i * hw;
        for (int j = 0; j < hw; j++)
            p[j] = v;
    }
}

/* ---- elementwise ---- */

void OP(dropout_fwd)(size_t n, const T *x, T *y, T *mask, double p, uint64_t seed)
{
    const T keep = (T)(1.0 / (1.0 - p));
    /* 2^32 * p as the drop threshold on a 32-bit draw per element */
    const uint64_t thresh = (uint64_t)(p * 4294967296.0);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        uint64_t r = kd_mix64(seed, i, 0xD50F) >> 32;
        mask[i] = r < thresh ? 0 : keep;
        y[i] = x[i] * mask[i];
    }
}

void OP(mul)(size_t n, const T *a, const T *b, T *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] * b[i];
}

void OP(add)(size_t n, const T *a, const T *b, T *y)
{
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

/* ---- loss ---- */

double OP(ce)(int n, int c, const T *logits, const int32_t *labels, double smoothing, T *dlogits,
              double scale, int64_t *correct)
{
    double total = 0;
    int64_t hits = 0;
    const double on = 1.0 - smoothing, off = smoothing / c;
#pragma omp parallel for schedule(static) reduction(+ : total, hits) if (n * c > 65536)
    for (int i = 0; i < n; i++) {
        const T *z = logits + (size_t)i * c;
        int y = labels[i];
        double mx = z[0];
        int am = 0;
        for (int j = 1; j < c; j++)
            if (z[j] > mx) {
                mx = z[j];
                am = j;
            }
        hits += am == y;
        double se = 0, sz = 0;
        for (int j = 0; j < c; j++) {
            se += exp((double)z[j] - mx);
            sz += (double)z[j] - mx;
        }
        double lse = log(se);
        /* -sum_j q_j log p_j with q = on*onehot + off */
        double nll = lse - ((double)z[y] - mx);
        double smooth = lse - sz / c;
        total += on * nll + smoothing * smooth;
        if (dlogits) {
            T *d = dlogits + (size_t)i * c;
            double k = scale / n;
            for (int j = 0; j < c; j++) {
                double pj = exp((double)z[j] - mx - lse);
                double q = off + (j == y ? on : 0.0);
                d[j] = (T)(k * (pj - q));
            }
        }
    }
    if (correct)
        *correct = hits;
    return total;
}

#include "loss_kd_body.h"

#undef OP
#undef KD_CAT
#undef KD_CAT_
