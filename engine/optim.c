/*
 * optim.c - SGD and AdamW over one flat float32 buffer, learning-rate
 * schedules and global-norm gradient clipping.
 *
 * The per-element arithmetic is float32 and is written in the same operation
 * order as PyTorch's CPU kernels (mul/add, addcmul, addcdiv), with the step-wide
 * constants (bias corrections, decay factor) computed once in double as
 * PyTorch computes them in Python; that keeps the two within float rounding
 * of each other. Each loop has the mask/no-mask and SGD variant decided
 * outside it, so the body is branch-free and vectorises; large buffers are
 * also split across OpenMP threads, which cannot change any result because
 * elements are independent. The gradient norm is the one reduction: it sums
 * fixed blocks whose boundaries depend only on n, so it is reproducible
 * whatever the thread count.
 */
#include "optim.h"

#include <float.h>
#include <math.h>

#ifdef _OPENMP
#define KD_OMP_(...) _Pragma(#__VA_ARGS__)
#define KD_OMP(...)  KD_OMP_(omp __VA_ARGS__)
#else
#define KD_OMP(...)
#endif

#if defined(__GNUC__)
#define KD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KD_ALWAYS_INLINE inline
#endif

/*
 * Under the default -fmath-errno, clang treats sqrtf as a libcall that may
 * write errno and refuses to vectorise a loop calling it (and warns when told
 * to with omp simd); the elementwise builtin of newer clang is the bare
 * instruction. v >= 0 always, so errno never mattered. GCC vectorises sqrtf
 * as it is.
 */
#define KD_SQRT_SIMD 1
#if defined(__clang__)
#if defined(__has_builtin) && __has_builtin(__builtin_elementwise_sqrt)
#define KD_SQRTF(x) __builtin_elementwise_sqrt(x)
#else
#undef KD_SQRT_SIMD
#define KD_SQRT_SIMD 0
#endif
#endif
#ifndef KD_SQRTF
#define KD_SQRTF(x) sqrtf(x)
#endif

/* Below this many elements, starting threads costs more than the update. */
#define KD_OPTIM_PAR_MIN ((size_t)1 << 16)

/* The norm is summed over at most this many blocks of at least the minimum size. */
#define KD_NORM_BLOCKS    256
#define KD_NORM_MIN_BLOCK ((size_t)4096)

/* torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing. */
#define KD_CLIP_EPS 1e-6

/* M_PI is POSIX, not C11. */
#define KD_PI 3.14159265358979323846

kd_optim_cfg kd_optim_cfg_default(kd_optim_kind kind)
{
    kd_optim_cfg c = {0};
    c.kind = kind;
    c.lr = 1e-3;
    c.momentum = kind == KD_OPTIM_SGD ? 0.9 : 0.0;
    c.nesterov = 0;
    c.beta1 = 0.9;
    c.beta2 = 0.999;
    c.eps = 1e-8;
    c.weight_decay = 0.0;
    c.clip_norm = 0.0;
    return c;
}

kd_sched_cfg kd_sched_cfg_default(kd_sched_kind kind)
{
    kd_sched_cfg s = {0};
    s.kind = kind;
    s.warmup_steps = 0;
    s.total_steps = 0;
    s.min_lr = 0.0;
    s.step_size = 1;
    s.gamma = 0.1;
    return s;
}

double kd_sched_lr(const kd_sched_cfg *s, double base_lr, int64_t step)
{
    if (s == NULL)
        return base_lr;
    if (step < 0)
        step = 0;
    if (s->warmup_steps > 0 && step < s->warmup_steps)
        return base_lr * (double)(step + 1) / (double)s->warmup_steps;

    int64_t warm = s->warmup_steps > 0 ? s->warmup_steps : 0;
    int64_t t = step - warm;
    switch (s->kind) {
    case KD_SCHED_CONSTANT: return base_lr;
    case KD_SCHED_STEP:
        /* A config that never passed kd_sched_cfg_check degrades to constant, not to a crash. */
        if (s->step_size <= 0)
            return base_lr;
        return base_lr * pow(s->gamma, (double)(t / s->step_size));
    case KD_SCHED_COSINE: {
        int64_t span = s->total_steps - warm;
        if (span <= 0 || t >= span)
            return s->min_lr;
        double progress = (double)t / (double)span;
        return s->min_lr + (base_lr - s->min_lr) * 0.5 * (1.0 + cos(KD_PI * progress));
    }
    }
    return base_lr;
}

kd_status kd_sched_cfg_check(const kd_sched_cfg *s, double base_lr)
{
    if (s == NULL)
        return KD_FAIL(KD_ERR_INVALID, "schedule config: NULL");
    if (s->warmup_steps < 0)
        return KD_FAIL(KD_ERR_CONFIG, "schedule: warmup_steps must be >= 0, got %lld",
                       (long long)s->warmup_steps);
    switch (s->kind) {
    case KD_SCHED_CONSTANT: return KD_OK;
    case KD_SCHED_STEP:
        if (s->step_size <= 0)
            return KD_FAIL(KD_ERR_CONFIG, "step schedule: step_size must be > 0, got %lld",
                           (long long)s->step_size);
        if (!(s->gamma > 0.0) || !isfinite(s->gamma))
            return KD_FAIL(KD_ERR_CONFIG, "step schedule: gamma must be finite and > 0, got %g",
                           s->gamma);
        return KD_OK;
    case KD_SCHED_COSINE:
        if (s->total_steps <= s->warmup_steps)
            return KD_FAIL(KD_ERR_CONFIG,
                           "cosine schedule: total_steps (%lld) must exceed warmup_steps (%lld)",
                           (long long)s->total_steps, (long long)s->warmup_steps);
        if (!(s->min_lr >= 0.0) || !(s->min_lr <= base_lr))
            return KD_FAIL(KD_ERR_CONFIG, "cosine schedule: min_lr must be in [0, lr=%g], got %g",
                           base_lr, s->min_lr);
        return KD_OK;
    }
    return KD_FAIL(KD_ERR_CONFIG, "schedule: unknown kind %d", (int)s->kind);
}

size_t kd_optim_state_floats(const kd_optim_cfg *c, size_t nparams)
{
    if (c == NULL)
        return 0;
    switch (c->kind) {
    case KD_OPTIM_SGD: return c->momentum != 0.0 ? nparams : 0;
    case KD_OPTIM_ADAMW: return 2 * nparams;
    }
    return 0;
}

double kd_grad_global_norm(const float *g, size_t n)
{
    if (g == NULL || n == 0)
        return 0.0;
    size_t block = (n + KD_NORM_BLOCKS - 1) / KD_NORM_BLOCKS;
    if (block < KD_NORM_MIN_BLOCK)
        block = KD_NORM_MIN_BLOCK;
    size_t nblocks = (n + block - 1) / block;
    double part[KD_NORM_BLOCKS];

    KD_OMP(parallel for schedule(static) if (n >= KD_OPTIM_PAR_MIN))
    for (size_t b = 0; b < nblocks; b++) {
        size_t lo = b * block;
        size_t hi = lo + block < n ? lo + block : n;
        double acc = 0.0;
        KD_OMP(simd reduction(+ : acc))
        for (size_t i = lo; i < hi; i++) {
            double x = (double)g[i];
            acc += x * x;
        }
        part[b] = acc;
    }

    double total = 0.0;
    for (size_t b = 0; b < nblocks; b++)
        total += part[b];
    return sqrt(total);
}

double kd_clip_grad_norm(float *g, size_t n, double max_norm)
{
    double norm = kd_grad_global_norm(g, n);
    if (!(max_norm > 0.0) || !isfinite(norm))
        return norm;
    double coef = max_norm / (norm + KD_CLIP_EPS);
    if (coef < 1.0) {
        const float cf = (float)coef;
        KD_OMP(parallel for simd schedule(static) if (parallel : n >= KD_OPTIM_PAR_MIN))
        for (size_t i = 0; i < n; i++)
            g[i] *= cf;
    }
    return norm;
}

/* A failed check's status, with the config key it is about in *key. */
static kd_status bad_key(const char **key, const char *name, kd_status st)
{
    *key = name;
    return st;
}

kd_status kd_optim_cfg_check_key(const kd_optim_cfg *c, const char **key)
{
    const char *unused;
    if (!key)
        key = &unused;
    *key = NULL;
    if (c == NULL)
        return KD_FAIL(KD_ERR_INVALID, "optimizer config: NULL");
    /* the updates run in float32, so a value past FLT_MAX would be inf there */
    if (!(c->lr <= FLT_MAX) || !((float)c->lr > 0.0f)) /* 1e-50 is 0 in float32 */
        return bad_key(key, "lr",
                       KD_FAIL(KD_ERR_CONFIG,
                               "optimizer: lr must be > 0 and at most %g, and not 0 in float32, "
                               "got %g",
                               (double)FLT_MAX, c->lr));
    if (!(c->weight_decay >= 0.0) || !(c->weight_decay <= FLT_MAX))
        return bad_key(key, "weight_decay",
                       KD_FAIL(KD_ERR_CONFIG,
                               "optimizer: weight_decay must be >= 0 and at most %g (float32), "
                               "got %g",
                               (double)FLT_MAX, c->weight_decay));
    if (!(c->clip_norm >= 0.0))
        return bad_key(key, "clip_norm",
                       KD_FAIL(KD_ERR_CONFIG,
                               "optimizer: clip_norm must be >= 0 (0 disables), got %g",
                               c->clip_norm));
    switch (c->kind) {
    case KD_OPTIM_SGD:
        if (!(c->momentum >= 0.0 && c->momentum < 1.0))
            return bad_key(
                key, "momentum",
                KD_FAIL(KD_ERR_CONFIG, "sgd: momentum must be in [0, 1), got %g", c->momentum));
        if (c->nesterov && c->momentum == 0.0)
            return bad_key(key, "nesterov",
                           KD_FAIL(KD_ERR_CONFIG, "sgd: nesterov requires momentum > 0"));
        return KD_OK;
    case KD_OPTIM_ADAMW:
        if (!(c->beta1 >= 0.0 && c->beta1 < 1.0))
            return bad_key(
                key, "beta1",
                KD_FAIL(KD_ERR_CONFIG, "adamw: beta1 must be in [0, 1), got %g", c->beta1));
        if (!(c->beta2 >= 0.0 && c->beta2 < 1.0))
            return bad_key(
                key, "beta2",
                KD_FAIL(KD_ERR_CONFIG, "adamw: beta2 must be in [0, 1), got %g", c->beta2));
        if (!(c->eps <= FLT_MAX) || !((float)c->eps > 0.0f))
            return bad_key(key, "eps",
                           KD_FAIL(KD_ERR_CONFIG,
                                   "adamw: eps must be > 0 and at most %g, and not 0 in float32, "
                                   "got %g",
                                   (double)FLT_MAX, c->eps));
        return KD_OK;
    }
    return KD_FAIL(KD_ERR_CONFIG, "optimizer: unknown kind %d", (int)c->kind);
}

kd_status kd_optim_cfg_check(const kd_optim_cfg *c) { return kd_optim_cfg_check_key(c, NULL); }

enum { KD_SGD_PLAIN, KD_SGD_MOMENTUM, KD_SGD_NESTEROV };

/*
 * Always inlined so that each call site, with a literal mode and a literal
 * NULL or real mask, becomes its own branch-free loop.
 */
static KD_ALWAYS_INLINE void sgd_kernel(float *restrict p, const float *restrict g,
                                        float *restrict buf, const uint8_t *restrict mask, size_t n,
                                        float keep, float lr, float mom, int mode)
{
    KD_OMP(parallel for simd schedule(static) if (parallel : n >= KD_OPTIM_PAR_MIN))
    for (size_t i = 0; i < n; i++) {
        float pi = p[i] * ((mask == NULL || mask[i]) ? keep : 1.0f);
        float d = g[i];
        if (mode != KD_SGD_PLAIN) {
            float b = buf[i] * mom + d;
            buf[i] = b;
            d = mode == KD_SGD_NESTEROV ? d + mom * b : b;
        }
        p[i] = pi - lr * d;
    }
}

static void sgd_step(const kd_optim_cfg *c, float *p, const float *g, float *buf,
                     const uint8_t *mask, size_t n, double lr)
{
    const float keep = (float)(1.0 - lr * c->weight_decay);
    const float lrf = (float)lr;
    const float mom = (float)c->momentum;
    int mode = c->momentum == 0.0 ? KD_SGD_PLAIN : c->nesterov ? KD_SGD_NESTEROV : KD_SGD_MOMENTUM;

    switch (mode) {
    case KD_SGD_PLAIN:
        if (mask)
            sgd_kernel(p, g, buf, mask, n, keep, lrf, mom, KD_SGD_PLAIN);
        else
            sgd_kernel(p, g, buf, NULL, n, keep, lrf, mom, KD_SGD_PLAIN);
        break;
    case KD_SGD_MOMENTUM:
        if (mask)
            sgd_kernel(p, g, buf, mask, n, keep, lrf, mom, KD_SGD_MOMENTUM);
        else
            sgd_kernel(p, g, buf, NULL, n, keep, lrf, mom, KD_SGD_MOMENTUM);
        break;
    default:
        if (mask)
            sgd_kernel(p, g, buf, mask, n, keep, lrf, mom, KD_SGD_NESTEROV);
        else
            sgd_kernel(p, g, buf, NULL, n, keep, lrf, mom, KD_SGD_NESTEROV);
        break;
    }
}

typedef struct {
    float keep; /* 1 - lr*wd */
    float beta1;
    float w1; /* 1 - beta1 */
    float beta2;
    float w2;        /* 1 - beta2 */
    float step_size; /* lr / (1 - beta1^t) */
    float bc2_sqrt;  /* sqrt(1 - beta2^t) */
    float eps;
} adamw_consts;

static KD_ALWAYS_INLINE void adamw_kernel(float *restrict p, const float *restrict g,
                                          float *restrict m, float *restrict v,
                                          const uint8_t *restrict mask, size_t n,
                                          const adamw_consts *k)
{
    /* Scalars in locals: clang will not vectorise through loads from a struct in the loop. */
    const float keep = k->keep, beta1 = k->beta1, w1 = k->w1, beta2 = k->beta2, w2 = k->w2;
    const float step_size = k->step_size, bc2_sqrt = k->bc2_sqrt, eps = k->eps;

#if KD_SQRT_SIMD
    KD_OMP(parallel for simd schedule(static) if (parallel : n >= KD_OPTIM_PAR_MIN))
#else
    KD_OMP(parallel for schedule(static) if (n >= KD_OPTIM_PAR_MIN))
#endif
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        float pi = p[i] * ((mask == NULL || mask[i]) ? keep : 1.0f);
        /*
         * torch 1.x writes m.mul_(b1).add_(g, alpha=1-b1); torch 2.x uses lerp,
         * which differs from this only in the last bit.
         */
        float mi = m[i] * beta1 + w1 * gi;
        float vi = v[i] * beta2 + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = KD_SQRTF(vi) / bc2_sqrt + eps;
        /* (step_size * m) / denom, the order of torch's addcdiv */
        p[i] = pi - step_size * mi / denom;
    }
}

static void adamw_step(const kd_optim_cfg *c, float *p, const float *g, float *state,
                       const uint8_t *mask, size_t n, double lr, int64_t step)
{
    adamw_consts k;
    k.keep = (float)(1.0 - lr * c->weight_decay);
    k.beta1 = (float)c->beta1;
    k.w1 = (float)(1.0 - c->beta1);
    k.beta2 = (float)c->beta2;
    k.w2 = (float)(1.0 - c->beta2);
    k.step_size = (float)(lr / (1.0 - pow(c->beta1, (double)step)));
    k.bc2_sqrt = (float)sqrt(1.0 - pow(c->beta2, (double)step));
    k.eps = (float)c->eps;

    float *m = state;
    float *v = state + n;
    if (mask)
        adamw_kernel(p, g, m, v, mask, n, &k);
    else
        adamw_kernel(p, g, m, v, NULL, n, &k);
}

kd_status kd_optim_step(const kd_optim_cfg *c, float *params, const float *grads, float *state,
                        const uint8_t *decay_mask, size_t n, double lr, int64_t step)
{
    KD_TRY(kd_optim_cfg_check(c));
    if (!(lr >= 0.0) || !isfinite(lr))
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: lr must be finite and >= 0, got %g", lr);
    if (c->kind == KD_OPTIM_ADAMW && step < 1)
        return KD_FAIL(KD_ERR_INVALID, "adamw step: step is 1-based, got %lld", (long long)step);
    if (n == 0)
        return KD_OK;
    if (params == NULL || grads == NULL)
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: NULL %s for %zu parameters",
                       params == NULL ? "params" : "grads", n);
    if (state == NULL && kd_optim_state_floats(c, n) > 0)
        return KD_FAIL(KD_ERR_INVALID, "optimizer step: NULL state, need %zu floats",
                       kd_optim_state_floats(c, n));

    if (c->kind == KD_OPTIM_SGD)
        sgd_step(c, params, grads, state, decay_mask, n, lr);
    else
        adamw_step(c, params, grads, state, decay_mask, n, lr, step);
    return KD_OK;
}
