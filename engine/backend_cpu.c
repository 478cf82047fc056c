/*
 * backend_cpu.c - the CPU backend: host memory and the float cpu_ops. It is
 * the reference every other backend is tested against.
 */
#include <stdlib.h>
#include <string.h>

#include "augment.h"
#include "backend.h"
#include "bf16.h"

static kd_status cpu_alloc(void **p, size_t bytes)
{
    /* 64-byte alignment keeps SIMD loads and BLAS panels aligned */
    size_t rounded = (bytes + 63) / 64 * 64;
    *p = aligned_alloc(64, rounded ? rounded : 64);
    if (!*p)
        return KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu bytes of host memory", bytes);
    memset(*p, 0, rounded);
    return KD_OK;
}

static void cpu_release(void *p) { free(p); }

static kd_status cpu_copy_bytes(void *dst, const void *src, size_t bytes)
{
    if (bytes)
        memmove(dst, src, bytes);
    return KD_OK;
}

static kd_status cpu_sync(void) { return KD_OK; }

static kd_status cpu_zero(void *dst, size_t bytes)
{
    memset(dst, 0, bytes);
    return KD_OK;
}

static void cpu_copy(size_t n, const float *src, float *dst) { memmove(dst, src, n * sizeof *dst); }

static void cpu_dropout_fwd(size_t n, const float *x, float *y, float *mask, double p,
                            const uint64_t *seed)
{
    kd_cpu_dropout_fwd_f32(n, x, y, mask, p, *seed);
}

static void cpu_round_bf16(size_t n, float *x)
{
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++)
        x[i] = kd_round_bf16(x[i]);
}

static void cpu_gather_rows(int n, int cols, const void *src, const uint32_t *idx, void *dst)
{
    const size_t row = (size_t)cols * 4;
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * row, (const char *)src + (size_t)idx[i] * row, row);
}

/* The losses (backend.h): the sums returned, or added to acc */
static double cpu_ce(int n, int c, const float *logits, const int32_t *labels, double smoothing,
                     float *dlogits, double scale, int64_t *correct, double *acc)
{
    int64_t hits = 0;
    double sum = kd_cpu_ce_f32(n, c, logits, labels, smoothing, dlogits, scale, &hits);
    if (!acc) {
        if (correct)
            *correct = hits;
        return sum;
    }
    acc[0] += sum;
    acc[1] += (double)hits;
    return 0;
}

static double cpu_kd_dense(int n, int c, const float *s, const float *t, double temperature,
                           int reverse, int t2_scale, float *ds, double scale, double *acc)
{
    double sum = kd_cpu_kd_dense_f32(n, c, s, t, temperature, reverse, t2_scale, ds, scale);
    if (!acc)
        return sum;
    acc[0] += sum;
    return 0;
}

static double cpu_kd_topk(int n, int c, int k, const float *s, const float *tv, const int32_t *ti,
                          const float *t_lse, double temperature, int reverse, int t2_scale,
                          float *ds, double scale, double *acc)
{
    double sum =
        kd_cpu_kd_topk_f32(n, c, k, s, tv, ti, t_lse, temperature, reverse, t2_scale, ds, scale);
    if (!acc)
        return sum;
    acc[0] += sum;
    return 0;
}

static double cpu_kd_dkd(int n, int c, const float *s, const float *t, const int32_t *labels,
                         double temperature, double alpha, double beta, int t2_scale, float *ds,
                         double scale, double *acc)
{
    double sum =
        kd_cpu_kd_dkd_f32(n, c, s, t, labels, temperature, alpha, beta, t2_scale, ds, scale);
    if (!acc)
        return sum;
    acc[0] += sum;
    return 0;
}

/* The update in place on host memory: validated first (kd_optim_cfg_check), so that a bad
 * configuration leaves the gradients unclipped, then kd_clip_grad_norm and kd_optim_step. */
static kd_status cpu_optim_step(const kd_optim_cfg *c, float *params, float *grads, float *state,
                                const uint8_t *decay_mask, size_t n, double lr, int64_t step)
{
    KD_TRY(kd_optim_cfg_check(c));
    if (c->clip_norm > 0 && grads)
        kd_clip_grad_norm(grads, n, c->clip_norm);
    return kd_optim_step(c, params, grads, state, decay_mask, n, lr, step);
}

static const kd_backend kd_cpu_backend = {
    .name = "cpu",
    .device = KD_DEVICE_CPU,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_copy_bytes,
    .download = cpu_copy_bytes,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .linear_fwd = kd_cpu_linear_fwd_f32,
    .linear_bwd = kd_cpu_linear_bwd_f32,
    .conv2d_ws = kd_cpu_conv2d_ws_f32,
    .conv2d_fwd = kd_cpu_conv2d_fwd_f32,
    .conv2d_bwd = kd_cpu_conv2d_bwd_f32,
    .bn_fwd_train = kd_cpu_bn_fwd_train_f32,
    .bn_fwd_eval = kd_cpu_bn_fwd_eval_f32,
    .bn_bwd = kd_cpu_bn_bwd_f32,
    .act_fwd = kd_cpu_act_fwd_f32,
    .act_bwd = kd_cpu_act_bwd_f32,
    .maxpool_fwd = kd_cpu_maxpool_fwd_f32,
    .maxpool_bwd = kd_cpu_maxpool_bwd_f32,
    .avgpool_fwd = kd_cpu_avgpool_fwd_f32,
    .avgpool_bwd = kd_cpu_avgpool_bwd_f32,
    .gap_fwd = kd_cpu_gap_fwd_f32,
    .gap_bwd = kd_cpu_gap_bwd_f32,
    .dropout_fwd = cpu_dropout_fwd,
    .mul = kd_cpu_mul_f32,
    .add = kd_cpu_add_f32,
    .copy = cpu_copy,
    .round_bf16 = cpu_round_bf16,
    .ce = cpu_ce,
    .kd_dense = cpu_kd_dense,
    .kd_topk = cpu_kd_topk,
    .kd_dkd = cpu_kd_dkd,
    .gather_augment = kd_augment_gather,
    .gather_rows = cpu_gather_rows,
    .optim_step = cpu_optim_step,
};

const kd_backend *kd_backend_cpu(void) { return &kd_cpu_backend; }

/* slot names, in table order, for kd_backend_missing */
#define KD_SLOT(name)                                                                              \
    {                                                                                              \
#name, offsetof(kd_backend, name)                                                          \
    }
static const struct {
    const char *name;
    size_t off;
} kd_slots[] = {
    KD_SLOT(linear_fwd),  KD_SLOT(linear_bwd),     KD_SLOT(conv2d_ws),
    KD_SLOT(conv2d_fwd),  KD_SLOT(conv2d_bwd),     KD_SLOT(bn_fwd_train),
    KD_SLOT(bn_fwd_eval), KD_SLOT(bn_bwd),         KD_SLOT(act_fwd),
    KD_SLOT(act_bwd),     KD_SLOT(maxpool_fwd),    KD_SLOT(maxpool_bwd),
    KD_SLOT(avgpool_fwd), KD_SLOT(avgpool_bwd),    KD_SLOT(gap_fwd),
    KD_SLOT(gap_bwd),     KD_SLOT(dropout_fwd),    KD_SLOT(mul),
    KD_SLOT(add),         KD_SLOT(copy),           KD_SLOT(round_bf16),
    KD_SLOT(ce),          KD_SLOT(kd_dense),       KD_SLOT(kd_topk),
    KD_SLOT(kd_dkd),      KD_SLOT(gather_augment), KD_SLOT(gather_rows),
    KD_SLOT(optim_step),
};

const char *kd_backend_missing(const kd_backend *be, const char *needed)
{
    for (size_t i = 0; i < sizeof kd_slots / sizeof kd_slots[0]; i++) {
        size_t len = strlen(kd_slots[i].name);
        const char *p = needed;
        int wanted = 0;
        while ((p = strstr(p, kd_slots[i].name)) != NULL) {
            if ((p == needed || p[-1] == ',') && (p[len] == ',' || p[len] == '\0')) {
                wanted = 1;
                break;
            }
            p += len;
        }
        if (!wanted)
            continue;
        void *slot;
        memcpy(&slot, (const char *)be + kd_slots[i].off, sizeof slot);
        if (!slot)
            return kd_slots[i].name;
    }
    return NULL;
}
