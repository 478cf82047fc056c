/*
 * cpu_ops.h - the CPU reference operations, for float and for double.
 *
 * engine/cpu_ops.c is compiled twice from one source: once with float
 * (suffix _f32, what training runs) and once with double (suffix _f64, what
 * the finite-difference gradient tests run, so they check the very same math
 * in double precision with tight tolerances). Every matrix product goes
 * through OpenBLAS (cblas_sgemm / cblas_dgemm).
 *
 * Shape legend: N batch, C channels in, O channels out, H/W input height and
 * width, Ho/Wo output height and width, K kernel taps per output = C/g*kh*kw.
 * All activations are NCHW and contiguous.
 *
 * Gradient rule, stated once: parameter gradients (dw, db, dgamma, dbeta)
 * accumulate with +=; activation gradients (dx) are written with =.
 */
#ifndef KD_CPU_OPS_H
#define KD_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

/* A convolution's geometry; filled by kd_conv_shape_init. */
typedef struct {
    int n, c, h, w; /* input */
    int o, kh, kw;  /* output channels and kernel */
    int stride, pad, groups;
    int ho, wo; /* output spatial size */
    int chunk;  /* samples per im2col chunk (workspace sizing) */
} kd_conv_shape;

/* Output positions per channel a convolution may have (ho * wo); the im2col and index
 * arithmetic stays well inside int. */
#define KD_CONV_MAX_PLANE (1 << 24)

/* Fills ho/wo/chunk; returns 0 when the geometry is impossible or its output plane exceeds
 * KD_CONV_MAX_PLANE. */
int kd_conv_shape_init(kd_conv_shape *s, int n, int c, int h, int w, int o, int kh, int kw,
                       int stride, int pad, int groups);

/* A pooling window's geometry. */
typedef struct {
    int n, c, h, w, k, stride, pad, ho, wo;
} kd_pool_shape;

#define KD_CPU_OPS_DECLARE(T, SFX)                                                                 \
    /* x [N, I], w [O, I], b [O] or NULL -> y [N, O] */                                            \
    void kd_cpu_linear_fwd_##SFX(int n, int in, int out, const T *x, const T *w, const T *b,       \
                                 T *y);                                                            \
    /* dy [N, O] -> dx [N, I] (may be NULL), dw += , db += (may be NULL) */                        \
    void kd_cpu_linear_bwd_##SFX(int n, int in, int out, const T *x, const T *w, const T *dy,      \
                                 T *dx, T *dw, T *db);                                             \
    /* elements of T the conv needs as scratch */                                                  \
    size_t kd_cpu_conv2d_ws_##SFX(const kd_conv_shape *s);                                         \
    /* x [N, C, H, W], w [O, C/g, kh, kw], b [O] or NULL -> y [N, O, Ho, Wo] */                    \
    void kd_cpu_conv2d_fwd_##SFX(const kd_conv_shape *s, const T *x, const T *w, const T *b, T *y, \
                                 T *ws);                                                           \
    /* dy [N, O, Ho, Wo] -> dx (may be NULL) =, dw +=, db (may be NULL) += */                      \
    void kd_cpu_conv2d_bwd_##SFX(const kd_conv_shape *s, const T *x, const T *w, const T *dy,      \
                                 T *dx, T *dw, T *db, T *ws);                                      \
    /* batch norm over N and HW per channel, then the fused activation act(cap): cap 0 none,       \
       cap < 0 relu, cap > 0 min(relu, cap). Training saves mean and 1/std and updates the         \
       running stats with PyTorch's rule (unbiased variance into running_var). */                  \
    void kd_cpu_bn_fwd_train_##SFX(int n, int c, int hw, const T *x, const T *gamma,               \
                                   const T *beta, T *y, T *save_mean, T *save_invstd, T *run_mean, \
                                   T *run_var, double momentum, double eps, double cap);           \
    void kd_cpu_bn_fwd_eval_##SFX(int n, int c, int hw, const T *x, const T *gamma, const T *beta, \
                                  const T *run_mean, const T *run_var, T *y, double eps,           \
                                  double cap);                                                     \
    /* y is the forward output (read only when cap != 0, to mask dy like the activation) */        \
    void kd_cpu_bn_bwd_##SFX(int n, int c, int hw, const T *x, const T *dy, const T *gamma,        \
                             const T *save_mean, const T *save_invstd, const T *y, double cap,     \
                             T *dx, T *dgamma, T *dbeta);                                          \
    /* relu (cap < 0) or clipped relu min(max(x, 0), cap) */                                       \
    void kd_cpu_act_fwd_##SFX(size_t n, const T *x, T *y, double cap);                             \
    void kd_cpu_act_bwd_##SFX(size_t n, const T *x, const T *dy, T *dx, double cap);               \
    /* max pooling; arg [N, C, Ho, Wo] records the winning input offset within the plane */        \
    void kd_cpu_maxpool_fwd_##SFX(const kd_pool_shape *p, const T *x, T *y, int32_t *arg);         \
    void kd_cpu_maxpool_bwd_##SFX(const kd_pool_shape *p, const T *dy, const int32_t *arg, T *dx); \
    /* average pooling, padding counted in the divisor (PyTorch's default) */                      \
    void kd_cpu_avgpool_fwd_##SFX(const kd_pool_shape *p, const T *x, T *y);                       \
    void kd_cpu_avgpool_bwd_##SFX(const kd_pool_shape *p, const T *dy, T *dx);                     \
    /* x [N, C, HW] -> y [N, C] */                                                                 \
    void kd_cpu_gap_fwd_##SFX(int n, int c, int hw, const T *x, T *y);                             \
    void kd_cpu_gap_bwd_##SFX(int n, int c, int hw, const T *dy, T *dx);                           \
    /* inverted dropout: mask holds 0 or 1/(1-p), drawn from (seed, index) */                      \
    void kd_cpu_dropout_fwd_##SFX(size_t n, const T *x, T *y, T *mask, double p, uint64_t seed);   \
    void kd_cpu_mul_##SFX(size_t n, const T *a, const T *b, T *y);                                 \
    /* y = a + b */                                                                                \
    void kd_cpu_add_##SFX(size_t n, const T *a, const T *b, T *y);                                 \
    /* mean cross-entropy with label smoothing eps over N rows of C logits. Writes                 \
       dlogits = scale * d(mean loss)/dlogits when dlogits != NULL; returns the summed loss        \
       (not the mean) and counts argmax hits in *correct. */                                       \
    double kd_cpu_ce_##SFX(int n, int c, const T *logits, const int32_t *labels, double smoothing, \
                           T *dlogits, double scale, int64_t *correct);                            \
    /* distillation loss coef * KL at temperature T over N rows of C logits (engine/loss_kd.md):   \
       forward KL(p_t || p_s) or reverse KL(p_s || p_t), coef = T^2 when t2_scale else 1.          \
       Returns the summed row losses; writes ds = scale * d(sum / n)/ds when ds != NULL. */        \
    double kd_cpu_kd_dense_##SFX(int n, int c, const T *s, const T *t, double temperature,         \
                                 int reverse, int t2_scale, T *ds, double scale);                  \
    /* the same against top-k teacher targets: tv [N, K] raw logits, ti [N, K] their classes,      \
       t_lse [N] the teacher's full-row log-sum-exp at T = 1; the other C - K classes form one     \
       tail bucket (rule in loss_kd_body.h). k == c is the dense loss. */                          \
    /* decoupled KD against full teacher rows and the labels (loss_kd_body.h): coef * (alpha *     \
       target-class KL + beta * non-target KL); writes ds = scale * d(sum / n)/ds when ds != NULL  \
     */                                                                                            \
    double kd_cpu_kd_dkd_##SFX(int n, int c, const T *s, const T *t, const int32_t *labels,        \
                               double temperature, double alpha, double beta, int t2_scale, T *ds, \
                               double scale);                                                      \
    double kd_cpu_kd_topk_##SFX(int n, int c, int k, const T *s, const T *tv, const int32_t *ti,   \
                                const T *t_lse, double temperature, int reverse, int t2_scale,     \
                                T *ds, double scale);

KD_CPU_OPS_DECLARE(float, f32)
KD_CPU_OPS_DECLARE(double, f64)

#endif
