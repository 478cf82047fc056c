/*
 * kdm_invoke.c - run a loaded model: the op dispatch and the arena rules.
 *
 * The model was validated by kdm_load, so nothing here re-checks the blob; only the arena the
 * caller passes is checked (4-byte aligned, at least arena_size bytes) before anything is
 * written. Kernel choice: the DSP kernels when the compiler targets the DSP extension
 * (__ARM_FEATURE_DSP) unless KDM_FORCE_REF=1; KDM_FORCE_DSP=1 picks them on any target (the
 * host then runs their portable emulation, for tests). Without them, convolutions and
 * fully-connected layers run the blocked kernels of matmul_fast.c and depthwise convolutions
 * those of depthwise_fast.c (KDM_FORCE_REF=1: the reference kernels), the other ops their
 * reference kernels. An op outside KDM_OP_MASK is compiled out, so its kernels are never
 * referenced and the linker drops them.
 */
#include <string.h>

#include "kdm_internal.h"
#include "kdm_kernels.h"

#ifndef KDM_FORCE_REF
#define KDM_FORCE_REF 0
#endif
#ifndef KDM_FORCE_DSP
#define KDM_FORCE_DSP 0
#endif
#if KDM_FORCE_DSP || (defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP && !KDM_FORCE_REF)
#define KDM_KERNEL(name)    name##_dsp
#define KDM_KERNEL_MM(name) name##_dsp
#else
#define KDM_KERNEL(name) name##_ref
#if KDM_FORCE_REF
#define KDM_KERNEL_MM(name) name##_ref
#else
#define KDM_KERNEL_MM(name) name##_fast
#endif
#endif

/* `#if` cannot see enum constants: the op numbers again, checked against kdm_op_type below. */
#define KDM_N_CONV2D           1
#define KDM_N_DEPTHWISE_CONV2D 2
#define KDM_N_FULLY_CONNECTED  3
#define KDM_N_ADD              4
#define KDM_N_MAXPOOL2D        5
#define KDM_N_AVGPOOL2D        6
#define KDM_N_GLOBAL_AVGPOOL   7
#define KDM_N_RESHAPE          8
#define KDM_N_SOFTMAX          9
typedef char kdm_op_numbers_match_
    [(KDM_N_CONV2D == KDM_OP_CONV2D && KDM_N_DEPTHWISE_CONV2D == KDM_OP_DEPTHWISE_CONV2D &&
      KDM_N_FULLY_CONNECTED == KDM_OP_FULLY_CONNECTED && KDM_N_ADD == KDM_OP_ADD &&
      KDM_N_MAXPOOL2D == KDM_OP_MAXPOOL2D && KDM_N_AVGPOOL2D == KDM_OP_AVGPOOL2D &&
      KDM_N_GLOBAL_AVGPOOL == KDM_OP_GLOBAL_AVGPOOL && KDM_N_RESHAPE == KDM_OP_RESHAPE &&
      KDM_N_SOFTMAX == KDM_OP_SOFTMAX)
         ? 1
         : -1];
#define KDM_HAS(op) ((KDM_OP_MASK >> KDM_N_##op) & 1)

/* The weight width a weighted op runs at: a constant when KDM_WBITS_MASK has one width only, so
 * the other width's kernels are never referenced (kdm_load refuses ops of that width). */
#define IS_W8(x) KDM_IS_W8_((x)->r[KDM_F_WBITS])

/* One op's record and its tensors, decoded. */
typedef struct {
    const int32_t *r;
    kdm_tensor_ in, in2, out;
    const kdm_model *m;
    uint8_t *arena;
} op_ctx;

#define IN(x)      ((const int8_t *)((x)->arena + (x)->in.off))
#define OUT(x)     ((int8_t *)((x)->arena + (x)->out.off))
#define BLOB(x, f) ((const void *)((x)->m->blob + (x)->r[f]))
#define SCRATCH(x) ((void *)((x)->arena + (x)->m->scratch_off))

/* Bias, multipliers and shifts of a weighted op, with its output quantization and clamp. */
static inline kdm_requant_params requant_of(const op_ctx *x)
{
    const int32_t *quant = (const int32_t *)BLOB(x, KDM_F_QUANT);
    kdm_requant_params q = {(const int32_t *)BLOB(x, KDM_F_BIAS),
                            quant,
                            (const int8_t *)(quant + x->out.c),
                            x->out.zp,
                            x->r[KDM_F_ACT_MIN],
                            x->r[KDM_F_ACT_MAX],
                            x->m->flags};
    return q;
}

static inline kdm_conv_params conv_of(const op_ctx *x)
{
    const int32_t *r = x->r;
    kdm_conv_params p = {x->in.c,         x->in.h,      x->in.w,     x->out.c,
                         x->out.h,        x->out.w,     r[KDM_F_KH], r[KDM_F_KW],
                         r[KDM_F_STRIDE], r[KDM_F_PAD], x->in.zp,    r[KDM_F_ROW_STRIDE]};
    return p;
}

#if KDM_HAS(CONV2D)
static void run_conv(const op_ctx *x)
{
    kdm_conv_params p = conv_of(x);
    kdm_requant_params q = requant_of(x);
    if (IS_W8(x))
        KDM_KERNEL_MM(kdm_conv2d_s8)(&p, &q, IN(x), BLOB(x, KDM_F_WEIGHTS), OUT(x), SCRATCH(x));
    else
        KDM_KERNEL_MM(kdm_conv2d_s4)(&p, &q, IN(x), BLOB(x, KDM_F_WEIGHTS), OUT(x), SCRATCH(x));
}
#endif

#if KDM_HAS(DEPTHWISE_CONV2D)
static void run_depthwise(const op_ctx *x)
{
    kdm_conv_params p = conv_of(x);
    kdm_requant_params q = requant_of(x);
    const void *w = BLOB(x, KDM_F_WEIGHTS);
    if (IS_W8(x))
        KDM_KERNEL_MM(kdm_depthwise_s8)(&p, &q, IN(x), w, OUT(x), SCRATCH(x));
    else
        KDM_KERNEL_MM(kdm_depthwise_s4)(&p, &q, IN(x), w, OUT(x), SCRATCH(x));
}
#endif

#if KDM_HAS(FULLY_CONNECTED)
static void run_fully_connected(const op_ctx *x)
{
    kdm_fc_params p = {x->in.c * x->in.h * x->in.w, x->out.c, x->r[KDM_F_ROW_STRIDE]};
    kdm_requant_params q = requant_of(x);
    const void *w = BLOB(x, KDM_F_WEIGHTS);
    if (IS_W8(x))
        KDM_KERNEL_MM(kdm_fully_connected_s8)(&p, &q, IN(x), w, OUT(x), SCRATCH(x));
    else
        KDM_KERNEL_MM(kdm_fully_connected_s4)(&p, &q, IN(x), w, OUT(x), SCRATCH(x));
}
#endif

#if KDM_HAS(ADD)
static void run_add(const op_ctx *x)
{
    const int32_t *w = (const int32_t *)BLOB(x, KDM_F_PARAMS);
    kdm_add_params p = {
        x->in.zp,        x->in2.zp,       x->out.zp,           w[KDM_ADD_LEFT_SHIFT],
        w[KDM_ADD_M1],   w[KDM_ADD_S1],   w[KDM_ADD_M2],       w[KDM_ADD_S2],
        w[KDM_ADD_MOUT], w[KDM_ADD_SOUT], x->r[KDM_F_ACT_MIN], x->r[KDM_F_ACT_MAX],
        x->m->flags};
    KDM_KERNEL(kdm_add_s8)
    (&p, IN(x), (const int8_t *)(x->arena + x->in2.off), OUT(x), x->in.c * x->in.h * x->in.w);
}
#endif

/* The dispatch: one case per op type, each compiled only when KDM_OP_MASK has it. */
static void run_op(const kdm_model *m, uint8_t *arena, uint32_t i)
{
    const int32_t *r = kdm_op_rec_(m->ops, i);
    op_ctx x = {r, {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}, m, arena};
    kdm_tensor_get_(m->tensors, (uint32_t)r[KDM_F_IN0], &x.in);
    kdm_tensor_get_(m->tensors, (uint32_t)r[KDM_F_OUT], &x.out);
    const int32_t lo = r[KDM_F_ACT_MIN], hi = r[KDM_F_ACT_MAX];
    switch (r[KDM_F_TYPE]) {
#if KDM_HAS(CONV2D)
    case KDM_OP_CONV2D: run_conv(&x); break;
#endif
#if KDM_HAS(DEPTHWISE_CONV2D)
    case KDM_OP_DEPTHWISE_CONV2D: run_depthwise(&x); break;
#endif
#if KDM_HAS(FULLY_CONNECTED)
    case KDM_OP_FULLY_CONNECTED: run_fully_connected(&x); break;
#endif
#if KDM_HAS(ADD)
    case KDM_OP_ADD:
        kdm_tensor_get_(m->tensors, (uint32_t)r[KDM_F_IN1], &x.in2);
        run_add(&x);
        break;
#endif
#if KDM_HAS(MAXPOOL2D)
    case KDM_OP_MAXPOOL2D: {
        kdm_conv_params p = conv_of(&x);
        kdm_maxpool_s8(&p, lo, hi, IN(&x), OUT(&x));
        break;
    }
#endif
#if KDM_HAS(AVGPOOL2D)
    case KDM_OP_AVGPOOL2D: {
        kdm_conv_params p = conv_of(&x);
        kdm_avgpool_s8(&p, lo, hi, IN(&x), OUT(&x));
        break;
    }
#endif
#if KDM_HAS(GLOBAL_AVGPOOL)
    case KDM_OP_GLOBAL_AVGPOOL:
        KDM_KERNEL(kdm_global_avgpool_s8)(x.in.c, x.in.h * x.in.w, lo, hi, IN(&x), OUT(&x));
        break;
#endif
#if KDM_HAS(RESHAPE)
    case KDM_OP_RESHAPE: /* distinct regions never overlap (kdm_load) */
        if (x.in.off != x.out.off)
            memcpy(OUT(&x), IN(&x), (size_t)x.in.c * x.in.h * x.in.w);
        break;
#endif
#if KDM_HAS(SOFTMAX)
    case KDM_OP_SOFTMAX:
        kdm_softmax_s8((const int32_t *)BLOB(&x, KDM_F_PARAMS), lo, hi, IN(&x), OUT(&x), x.in.c);
        break;
#endif
    default: break; /* unreachable: kdm_load refuses ops outside the mask */
    }
    (void)lo;
    (void)hi;
}

/* The arena rules shared by kdm_invoke and kdm_invoke_op. */
static kdm_status arena_ok(const kdm_model *m, const void *arena, size_t arena_len)
{
    if (!m || !m->blob || !arena)
        return KDM_ERR_ARG;
    if (((uintptr_t)arena & 3) || arena_len < m->arena_size)
        return KDM_ERR_ARENA;
    return KDM_OK;
}

/* Whether n >= 1 bytes at p overlap the `size` bytes at lo (one unsigned comparison: p + n - 1
 * - lo wraps to a large value when p + n <= lo). */
static int overlaps(const void *p, uint32_t n, uintptr_t lo, uint32_t size)
{
    return (uintptr_t)p + n - 1u - lo < (uintptr_t)size + n - 1u;
}

kdm_status kdm_invoke(const kdm_model *m, void *arena, size_t arena_len, const int8_t *input,
                      int8_t *output)
{
    kdm_status st = arena_ok(m, arena, arena_len);
    if (st != KDM_OK)
        return st;
    if (!input || !output)
        return KDM_ERR_ARG;
    uint8_t *a = (uint8_t *)arena;
    /* the copies in and out must not overlap the tensors they copy (memcpy) */
    kdm_tensor_ t;
    kdm_tensor_get_(m->tensors, m->output, &t);
    const uint32_t no = t.c * t.h * t.w, off = t.off;
    kdm_tensor_get_(m->tensors, m->input, &t);
    const uint32_t ni = t.c * t.h * t.w;
    if (overlaps(output, no, (uintptr_t)a, m->arena_size) ||
        overlaps(input, ni, (uintptr_t)a, m->arena_size))
        return KDM_ERR_ARG;
    memcpy(a + t.off, input, ni);
    for (uint32_t i = 0; i < m->n_ops; i++)
        run_op(m, a, i);
    memcpy(output, a + off, no);
    return KDM_OK;
}

kdm_status kdm_invoke_op(const kdm_model *m, void *arena, size_t arena_len, uint32_t i)
{
    kdm_status st = arena_ok(m, arena, arena_len);
    if (st != KDM_OK)
        return st;
    if (i >= m->n_ops)
        return KDM_ERR_RANGE;
    run_op(m, (uint8_t *)arena, i);
    return KDM_OK;
}

uint32_t kdm_argmax_s8(const int8_t *x, uint32_t n)
{
    uint32_t best = 0;
    for (uint32_t i = 1; x && i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}
