/*
 * lower.c - the engine's block list becomes the runtime's op list, with batchnorms folded, relus
 * fused and weights laid out in the runtime's orders; and the float forward of that graph.
 *
 * Layouts. Engine activations are CHW per sample, runtime ones NHWC; the graph's float forward
 * works in NHWC so every tensor it computes is the float twin of the runtime's int8 tensor. Float
 * weights are kept one row per output channel (what per-channel quantization walks): CONV2D
 * OHWI [o][ky][kx][ci], DEPTHWISE [c][ky][kx] (transposed to the runtime's [ky][kx][c] rows only
 * when packed), FULLY_CONNECTED [o][i] with i in NHWC order.
 *
 * Invariants while lowering: `cur` is the tensor the next block reads; an op may absorb a
 * following batchnorm or relu only while its output is unread (its producer is the last op
 * emitted) and is not the input of an enclosing residual (whose skip path still reads it
 * unchanged). A flatten emits nothing: the tensor keeps its runtime shape and `flat` records
 * that the engine now sees it as [C * H * W] in CHW order, which the next linear's weight
 * permutation undoes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"

typedef struct {
    kd_export_graph *g;
    const float *P, *B; /* host copies of the model's parameters and buffers */
    int pinned[64];     /* inputs of the residual blocks being lowered */
    int npinned;
} lower_ctx;

typedef struct {
    int t;    /* runtime tensor */
    int flat; /* the engine sees it as a vector [c * h * w] */
} cursor;

static const char *op_name(kdm_op_type t)
{
    switch (t) {
    case KDM_OP_CONV2D: return "CONV2D";
    case KDM_OP_DEPTHWISE_CONV2D: return "DEPTHWISE_CONV2D";
    case KDM_OP_FULLY_CONNECTED: return "FULLY_CONNECTED";
    case KDM_OP_ADD: return "ADD";
    case KDM_OP_MAXPOOL2D: return "MAXPOOL2D";
    case KDM_OP_AVGPOOL2D: return "AVGPOOL2D";
    case KDM_OP_GLOBAL_AVGPOOL: return "GLOBAL_AVGPOOL";
    case KDM_OP_RESHAPE: return "RESHAPE";
    case KDM_OP_SOFTMAX: return "SOFTMAX";
    default: return "?";
    }
}

static const char *block_kind(const kd_block *b)
{
    static const char *const names[KD_L_COUNT_] = {
        [KD_L_LINEAR] = "linear",     [KD_L_CONV2D] = "conv2d",      [KD_L_BATCHNORM] = "batchnorm",
        [KD_L_RELU] = "relu",         [KD_L_RELU6] = "relu6",        [KD_L_MAXPOOL] = "maxpool2d",
        [KD_L_AVGPOOL] = "avgpool2d", [KD_L_GAP] = "global_avgpool", [KD_L_FLATTEN] = "flatten",
        [KD_L_DROPOUT] = "dropout",   [KD_L_RESIDUAL] = "residual",
    };
    return b->kind < KD_L_COUNT_ ? names[b->kind] : "?";
}

static kd_status add_tensor(kd_export_graph *g, int c, int h, int w, int producer, int *idx)
{
    if (g->nt == g->cap_t) {
        int cap = g->cap_t ? 2 * g->cap_t : 16;
        kd_export_tensor *t = realloc(g->t, sizeof *t * (size_t)cap);
        if (!t)
            return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        g->t = t;
        g->cap_t = cap;
    }
    if (c < 1 || h < 1 || w < 1 || c > 65535 || h > 65535 || w > 65535)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "export: a tensor of [%d, %d, %d] does not fit the runtime (each dimension "
                       "1 .. 65535)",
                       c, h, w);
    kd_export_tensor *t = &g->t[g->nt];
    memset(t, 0, sizeof *t);
    t->c = c;
    t->h = h;
    t->w = w;
    t->bytes = (uint32_t)c * (uint32_t)h * (uint32_t)w;
    t->producer = producer;
    t->last_use = producer;
    t->qsrc = g->nt;
    t->lo = -INFINITY;
    t->hi = INFINITY;
    *idx = g->nt++;
    return KD_OK;
}

/* A new op reading in0 (and in1) into a new tensor of shape (c, h, w). */
static kd_status add_op(kd_export_graph *g, kdm_op_type type, const kd_block *b, int in0, int in1,
                        int c, int h, int w, int *op_idx)
{
    if (g->nop == g->cap_op) {
        int cap = g->cap_op ? 2 * g->cap_op : 16;
        kd_export_op *o = realloc(g->op, sizeof *o * (size_t)cap);
        if (!o)
            return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        g->op = o;
        g->cap_op = cap;
    }
    int out = -1;
    KD_TRY(add_tensor(g, c, h, w, g->nop, &out));
    kd_export_op *o = &g->op[g->nop];
    memset(o, 0, sizeof *o);
    o->type = type;
    snprintf(o->name, sizeof o->name, "%s", b ? b->name : "softmax");
    snprintf(o->where, sizeof o->where, "%s", b ? b->where : "");
    o->in0 = in0;
    o->in1 = in1;
    o->out = out;
    g->t[in0].last_use = g->nop;
    if (in1 >= 0)
        g->t[in1].last_use = g->nop;
    *op_idx = g->nop++;
    return KD_OK;
}

static kd_status unsupported(const kd_block *b, const char *why)
{
    return KD_FAIL(KD_ERR_UNSUPPORTED, "%s: layer %s (%s): %s; the runtime (kdm.h) cannot run it",
                   b->where, b->name, block_kind(b), why);
}

static int is_pinned(const lower_ctx *cx, int t)
{
    for (int i = 0; i < cx->npinned; i++)
        if (cx->pinned[i] == t)
            return 1;
    return 0;
}

/* The op that may absorb a batchnorm or relu applied to tensor t, or NULL. */
static kd_export_op *absorber(lower_ctx *cx, int t)
{
    kd_export_graph *g = cx->g;
    int p = g->t[t].producer;
    if (p < 0 || p != g->nop - 1 || is_pinned(cx, t))
        return NULL;
    return &g->op[p];
}

static void note_fused(kd_export_op *o, const kd_block *b)
{
    size_t n = strlen(o->fused);
    snprintf(o->fused + n, sizeof o->fused - n, "%s%s", n ? "," : "", b->name);
}

static kd_status lower_conv(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_graph *g = cx->g;
    int cin = b->in[0], k = b->kernel, cout = b->features;
    kdm_op_type type;
    if (b->groups == 1)
        type = KDM_OP_CONV2D;
    else if (b->groups == cin && cout == cin)
        type = KDM_OP_DEPTHWISE_CONV2D;
    else {
        char why[128];
        if (b->groups == cin)
            snprintf(why, sizeof why,
                     "depthwise conv2d with channel multiplier %d (DEPTHWISE_CONV2D needs out == "
                     "in)",
                     cout / cin);
        else
            snprintf(why, sizeof why,
                     "grouped conv2d with groups %d (CONV2D needs groups 1, DEPTHWISE_CONV2D "
                     "groups == in == out == %d)",
                     b->groups, cin);
        return unsupported(b, why);
    }
    int oi = -1;
    KD_TRY(add_op(g, type, b, cur->t, -1, cout, b->out[1], b->out[2], &oi));
    kd_export_op *o = &g->op[oi];
    o->kernel = k;
    o->stride = b->stride;
    o->pad = b->pad;
    o->out_c = cout;
    o->row_len = type == KDM_OP_CONV2D ? k * k * cin : k * k;
    o->w = malloc(sizeof(float) * (size_t)o->out_c * o->row_len);
    o->b = calloc((size_t)cout, sizeof(float));
    if (!o->w || !o->b)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    const float *w = cx->P + b->w_off; /* OIHW, I = cin / groups */
    if (type == KDM_OP_CONV2D) {
        for (int oc = 0; oc < cout; oc++)
            for (int ci = 0; ci < cin; ci++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++)
                        o->w[(size_t)oc * o->row_len + (ky * k + kx) * cin + ci] =
                            w[(((size_t)oc * cin + ci) * k + ky) * k + kx];
    } else {
        memcpy(o->w, w, sizeof(float) * (size_t)cout * k * k);
    }
    if (b->has_bias)
        memcpy(o->b, cx->P + b->b_off, sizeof(float) * (size_t)cout);
    int64_t per_out = (int64_t)b->out[1] * b->out[2];
    o->macs = per_out * cout * (int64_t)o->row_len;
    cur->t = o->out;
    cur->flat = 0;
    return KD_OK;
}

static kd_status lower_linear(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_graph *g = cx->g;
    const kd_export_tensor *in = &g->t[cur->t];
    int C = in->c, H = in->h, W = in->w, F = b->in[0], out = b->features;
    if ((int64_t)C * H * W != F)
        return KD_FAIL(KD_ERR_INTERNAL, "%s: layer %s: input of %d features lowered to [%d,%d,%d]",
                       b->where, b->name, F, C, H, W);
    int oi = -1;
    KD_TRY(add_op(g, KDM_OP_FULLY_CONNECTED, b, cur->t, -1, out, 1, 1, &oi));
    kd_export_op *o = &g->op[oi];
    o->out_c = out;
    o->row_len = F;
    o->w = malloc(sizeof(float) * (size_t)out * F);
    o->b = calloc((size_t)out, sizeof(float));
    if (!o->w || !o->b)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    const float *w = cx->P + b->w_off;
    /* engine column i = ch * H * W + y * W + x (CHW); runtime column j = (y * W + x) * C + ch */
    for (int r = 0; r < out; r++)
        for (int ch = 0; ch < C; ch++)
            for (int p = 0; p < H * W; p++)
                o->w[(size_t)r * F + (size_t)p * C + ch] =
                    w[(size_t)r * F + (size_t)ch * H * W + p];
    if (b->has_bias)
        memcpy(o->b, cx->P + b->b_off, sizeof(float) * (size_t)out);
    o->macs = (int64_t)out * F;
    cur->t = o->out;
    cur->flat = 1;
    return KD_OK;
}

static kd_status lower_bn(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_op *o = absorber(cx, cur->t);
    if (!o ||
        (o->type != KDM_OP_CONV2D && o->type != KDM_OP_DEPTHWISE_CONV2D &&
         o->type != KDM_OP_FULLY_CONNECTED) ||
        o->act != KD_EXPORT_ACT_NONE || o->out_c != b->in[0])
        return unsupported(b, "a batchnorm that does not directly follow a conv2d or linear layer "
                              "(nothing to fold it into)");
    const float *gam = cx->P + b->w_off, *beta = cx->P + b->b_off;
    const float *mean = cx->B + b->rm_off, *var = cx->B + b->rv_off;
    for (int c = 0; c < o->out_c; c++) {
        double s = (double)gam[c] / sqrt((double)var[c] + b->eps);
        for (int j = 0; j < o->row_len; j++)
            o->w[(size_t)c * o->row_len + j] = (float)(o->w[(size_t)c * o->row_len + j] * s);
        o->b[c] = (float)(beta[c] + ((double)o->b[c] - mean[c]) * s);
    }
    note_fused(o, b);
    return KD_OK;
}

static kd_status lower_act(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_graph *g = cx->g;
    int six = b->kind == KD_L_RELU6;
    kd_export_tensor *t = &g->t[cur->t];
    kd_export_op *p = t->producer >= 0 ? &g->op[t->producer] : NULL;
    if (t->lo >= 0 && (!six || t->hi <= 6)) {
        /* already in range (e.g. a max pool of a relu): nothing to do */
        if (p)
            note_fused(p, b);
        return KD_OK;
    }
    kd_export_op *o = absorber(cx, cur->t), *pool = NULL;
    int pool_pinned = 0;
    if (o && o->type == KDM_OP_MAXPOOL2D) {
        /* relu / relu6 after a max pool (conv -> maxpool -> relu, as PyTorch's MNIST example
         * writes it): a non-decreasing clamp commutes with max, so it is the clamp of the op
         * before the pool, when the pool alone reads that op's output */
        const int ti = o->in0, q = g->t[ti].producer; /* -1: the pool reads the model input */
        pool = o;
        pool_pinned = is_pinned(cx, ti);
        o = q >= 0 && q == g->nop - 2 && !pool_pinned ? &g->op[q] : NULL;
    }
    if (!o || (o->type != KDM_OP_CONV2D && o->type != KDM_OP_DEPTHWISE_CONV2D &&
               o->type != KDM_OP_FULLY_CONNECTED && o->type != KDM_OP_ADD))
        return unsupported(b, is_pinned(cx, cur->t) || pool_pinned
                                  ? "an activation of a residual block's input (or of a max "
                                    "pool of it), which the skip path reads unclamped (a "
                                    "pre-activation block: no op output clamp can apply to one "
                                    "path alone)"
                                  : "an activation that does not follow a conv2d, linear, "
                                    "residual or a max pool of one (no op output clamp to fuse "
                                    "it into)");
    o->act = six || o->act == KD_EXPORT_ACT_RELU6 ? KD_EXPORT_ACT_RELU6 : KD_EXPORT_ACT_RELU;
    for (int k = 0; k < 2; k++) { /* the op's output, and the pool's that carries its range */
        kd_export_tensor *r = k ? t : &g->t[o->out];
        r->lo = 0;
        r->hi = o->act == KD_EXPORT_ACT_RELU6 ? 6 : INFINITY;
    }
    if (pool)
        note_fused(pool, b);
    else
        note_fused(o, b);
    return KD_OK;
}

static kd_status lower_pool(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_graph *g = cx->g;
    kdm_op_type type = b->kind == KD_L_MAXPOOL   ? KDM_OP_MAXPOOL2D
                       : b->kind == KD_L_AVGPOOL ? KDM_OP_AVGPOOL2D
                                                 : KDM_OP_GLOBAL_AVGPOOL;
    if (type == KDM_OP_AVGPOOL2D && b->pad)
        return unsupported(b, "avgpool2d with pad (AVGPOOL2D has pad 0 only)");
    int oh = type == KDM_OP_GLOBAL_AVGPOOL ? 1 : b->out[1];
    int ow = type == KDM_OP_GLOBAL_AVGPOOL ? 1 : b->out[2];
    int oi = -1;
    KD_TRY(add_op(g, type, b, cur->t, -1, b->in[0], oh, ow, &oi));
    kd_export_op *o = &g->op[oi];
    if (type != KDM_OP_GLOBAL_AVGPOOL) {
        o->kernel = b->kernel;
        o->stride = b->stride;
        o->pad = b->pad;
    }
    kd_export_tensor *in = &g->t[o->in0], *out = &g->t[o->out];
    /* kdm.h: pool outputs carry their input's quantization */
    out->qsrc = in->qsrc;
    out->lo = in->lo;
    out->hi = in->hi;
    cur->t = o->out;
    cur->flat = type == KDM_OP_GLOBAL_AVGPOOL;
    return KD_OK;
}

static kd_status lower_trunk(lower_ctx *cx, const kd_block *blocks, int n, cursor *cur);

static kd_status lower_residual(lower_ctx *cx, const kd_block *b, cursor *cur)
{
    kd_export_graph *g = cx->g;
    if (cx->npinned == (int)(sizeof cx->pinned / sizeof cx->pinned[0]))
        return unsupported(b, "residual blocks nested too deep");
    cursor x = *cur, body = *cur, skip = *cur;
    cx->pinned[cx->npinned++] = x.t;
    kd_status st = lower_trunk(cx, b->body, b->nbody, &body);
    if (st == KD_OK && b->nproj)
        st = lower_trunk(cx, b->proj, b->nproj, &skip);
    cx->npinned--;
    if (st != KD_OK)
        return st;
    const kd_export_tensor *tb = &g->t[body.t], *ts = &g->t[skip.t];
    if (tb->c != ts->c || tb->h != ts->h || tb->w != ts->w) {
        /* after a flatten the engine adds two vectors; the runtime's tensors keep their shapes
         * (and a flattened [C, H, W] its NHWC order), and ADD takes two of one shape */
        char why[200];
        snprintf(why, sizeof why,
                 "ADD needs its two inputs in one shape, and here the body gives %dx%dx%d and the "
                 "skip path %dx%dx%d (a flattened tensor keeps its runtime shape)",
                 tb->c, tb->h, tb->w, ts->c, ts->h, ts->w);
        return unsupported(b, why);
    }
    int oi = -1;
    KD_TRY(add_op(g, KDM_OP_ADD, b, body.t, skip.t, tb->c, tb->h, tb->w, &oi));
    cur->t = g->op[oi].out;
    cur->flat = body.flat;
    return KD_OK;
}

static kd_status lower_trunk(lower_ctx *cx, const kd_block *blocks, int n, cursor *cur)
{
    for (int i = 0; i < n; i++) {
        const kd_block *b = &blocks[i];
        switch (b->kind) {
        case KD_L_CONV2D: KD_TRY(lower_conv(cx, b, cur)); break;
        case KD_L_LINEAR: KD_TRY(lower_linear(cx, b, cur)); break;
        case KD_L_BATCHNORM: KD_TRY(lower_bn(cx, b, cur)); break;
        case KD_L_RELU:
        case KD_L_RELU6: KD_TRY(lower_act(cx, b, cur)); break;
        case KD_L_MAXPOOL:
        case KD_L_AVGPOOL:
        case KD_L_GAP: KD_TRY(lower_pool(cx, b, cur)); break;
        case KD_L_FLATTEN: cur->flat = 1; break;
        case KD_L_DROPOUT: break; /* identity at inference */
        case KD_L_RESIDUAL: KD_TRY(lower_residual(cx, b, cur)); break;
        default: return unsupported(b, "an unknown layer kind");
        }
    }
    return KD_OK;
}

void kd_export_graph_free(kd_export_graph *g)
{
    if (!g)
        return;
    for (int i = 0; i < g->nop; i++) {
        kd_export_op *o = &g->op[i];
        free(o->w);
        free(o->b);
        free(o->q);
        free(o->wscale);
        free(o->bcorr);
        free(o->bias_q);
        free(o->mult);
        free(o->shift);
    }
    for (int i = 0; i < g->nt; i++) {
        free(g->t[i].ch_mean);
        free(g->t[i].ch_msq);
    }
    free(g->op);
    free(g->t);
    free(g);
}

kd_status kd_export_lower(const kd_model *m, kd_export_graph **out)
{
    *out = NULL;
    kd_export_graph *g = calloc(1, sizeof *g);
    float *P = malloc(sizeof(float) * (m->nparams + 1));
    float *B = malloc(sizeof(float) * (m->nbuffers + 1));
    kd_status st = KD_OK;
    if (!g || !P || !B) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        goto fail;
    }
    if ((st = m->be->download(P, m->params, sizeof(float) * m->nparams)) ||
        (st = m->be->download(B, m->buffers, sizeof(float) * m->nbuffers)) || (st = m->be->sync()))
        goto fail;
    g->in_c = m->in[0];
    g->in_h = m->in_ndim == 3 ? m->in[1] : 1;
    g->in_w = m->in_ndim == 3 ? m->in[2] : 1;
    int in = -1;
    if ((st = add_tensor(g, g->in_c, g->in_h, g->in_w, -1, &in)))
        goto fail;
    g->input = in;
    lower_ctx cx = {.g = g, .P = P, .B = B};
    cursor cur = {.t = in, .flat = m->in_ndim == 1};
    if ((st = lower_trunk(&cx, m->blocks, m->nblocks, &cur)))
        goto fail;
    if (g->nop == 0) {
        st = KD_FAIL(KD_ERR_UNSUPPORTED,
                     "export: model %s has no layer the runtime computes (a .kdm needs at least "
                     "one op)",
                     m->desc);
        goto fail;
    }
    const kd_export_tensor *t = &g->t[cur.t];
    if (t->h * t->w > 1 && t->c > 1) {
        /* a flattened [C, H, W] output would come out in NHWC order, not the engine's CHW */
        const kd_block *last = &m->blocks[m->nblocks - 1];
        st = unsupported(last, "the model ends in a flattened [C, H, W] tensor with H * W > 1 "
                               "(end it with a linear layer or global_avgpool)");
        goto fail;
    }
    g->output = cur.t;
    g->t[cur.t].last_use = g->nop;
    g->classes = (int)t->bytes;
    free(P);
    free(B);
    *out = g;
    return KD_OK;
fail:
    free(P);
    free(B);
    kd_export_graph_free(g);
    return st;
}

kd_status kd_export_add_softmax(kd_export_graph *g)
{
    const kd_export_tensor *t = &g->t[g->output];
    int oi = -1;
    KD_TRY(add_op(g, KDM_OP_SOFTMAX, NULL, g->output, -1, t->c, t->h, t->w, &oi));
    g->output = g->op[oi].out;
    kd_export_tensor *o = &g->t[g->output];
    o->last_use = g->nop;
    o->lo = 0;
    o->hi = 1;
    return KD_OK;
}

const char *kd_export_op_type_name(kdm_op_type t) { return op_name(t); }

/* ---- float forward (NHWC) ---- */

kd_status kd_export_acts_new(const kd_export_graph *g, kd_export_acts *a)
{
    a->nt = g->nt;
    a->v = calloc((size_t)g->nt, sizeof *a->v);
    if (!a->v)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    for (int i = 0; i < g->nt; i++) {
        a->v[i] = malloc(sizeof(float) * g->t[i].bytes);
        if (!a->v[i]) {
            kd_export_acts_free(a);
            return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
        }
    }
    return KD_OK;
}

void kd_export_acts_free(kd_export_acts *a)
{
    if (!a->v)
        return;
    for (int i = 0; i < a->nt; i++)
        free(a->v[i]);
    free(a->v);
    a->v = NULL;
    a->nt = 0;
}

static float act_f(float v, int act)
{
    if (act == KD_EXPORT_ACT_NONE)
        return v;
    v = v <= 0 ? 0 : v; /* NaN passes, as in the engine: the checks downstream must see it */
    return act == KD_EXPORT_ACT_RELU6 && v > 6 ? 6 : v;
}

static void fwd_conv(const kd_export_op *o, const float *w, const float *b, int act,
                     const kd_export_tensor *ti, const float *x, const kd_export_tensor *to,
                     float *y)
{
    int C = ti->c, H = ti->h, W = ti->w, k = o->kernel;
    int dw = o->type == KDM_OP_DEPTHWISE_CONV2D;
    for (int oy = 0; oy < to->h; oy++)
        for (int ox = 0; ox < to->w; ox++) {
            float *out = y + ((size_t)oy * to->w + ox) * to->c;
            for (int oc = 0; oc < to->c; oc++) {
                const float *wr = w + (size_t)oc * o->row_len;
                float acc = b[oc];
                for (int ky = 0; ky < k; ky++) {
                    int iy = oy * o->stride - o->pad + ky;
                    if (iy < 0 || iy >= H)
                        continue;
                    for (int kx = 0; kx < k; kx++) {
                        int ix = ox * o->stride - o->pad + kx;
                        if (ix < 0 || ix >= W)
                            continue;
                        const float *xp = x + ((size_t)iy * W + ix) * C;
                        if (dw) {
                            acc += xp[oc] * wr[ky * k + kx];
                        } else {
                            const float *wp = wr + (ky * k + kx) * C;
                            for (int ci = 0; ci < C; ci++)
                                acc += xp[ci] * wp[ci];
                        }
                    }
                }
                out[oc] = act_f(acc, act);
            }
        }
}

static void fwd_pool(const kd_export_op *o, const kd_export_tensor *ti, const float *x,
                     const kd_export_tensor *to, float *y)
{
    int C = ti->c, H = ti->h, W = ti->w, k = o->kernel;
    if (o->type == KDM_OP_GLOBAL_AVGPOOL) {
        for (int c = 0; c < C; c++) {
            float acc = 0;
            for (int p = 0; p < H * W; p++)
                acc += x[(size_t)p * C + c];
            y[c] = acc / (float)(H * W);
        }
        return;
    }
    int mx = o->type == KDM_OP_MAXPOOL2D;
    for (int oy = 0; oy < to->h; oy++)
        for (int ox = 0; ox < to->w; ox++)
            for (int c = 0; c < C; c++) {
                float best = -INFINITY, acc = 0;
                for (int ky = 0; ky < k; ky++) {
                    int iy = oy * o->stride - o->pad + ky;
                    if (iy < 0 || iy >= H)
                        continue;
                    for (int kx = 0; kx < k; kx++) {
                        int ix = ox * o->stride - o->pad + kx;
                        if (ix < 0 || ix >= W)
                            continue;
                        float v = x[((size_t)iy * W + ix) * C + c];
                        best = v > best || v != v ? v : best; /* NaN wins, as in the engine */
                        acc += v;
                    }
                }
                y[((size_t)oy * to->w + ox) * C + c] = mx ? best : acc * (1.0f / (float)(k * k));
            }
}

void kd_export_forward_ex(const kd_export_graph *g, const float *x, kd_export_acts *a,
                          const kd_export_fwd_opts *f)
{
    /* the engine's CHW sample into the runtime's HWC order */
    int C = g->in_c, HW = g->in_h * g->in_w;
    float *in = a->v[g->input];
    for (int c = 0; c < C; c++)
        for (int p = 0; p < HW; p++)
            in[(size_t)p * C + c] = x[(size_t)c * HW + p];
    int last = f && f->stop_after >= 0 ? f->stop_after : g->nop - 1;
    for (int i = 0; i <= last && i < g->nop; i++) {
        const kd_export_op *o = &g->op[i];
        const kd_export_tensor *ti = &g->t[o->in0], *to = &g->t[o->out];
        const float *xi = a->v[o->in0];
        float *y = a->v[o->out];
        int act = f && f->raw_op == i ? KD_EXPORT_ACT_NONE : o->act;
        const float *w = o->w, *b = o->b;
        if (f && i <= f->quant_upto && f->w[i]) {
            w = f->w[i];
            b = f->b[i];
        }
        switch (o->type) {
        case KDM_OP_CONV2D:
        case KDM_OP_DEPTHWISE_CONV2D: fwd_conv(o, w, b, act, ti, xi, to, y); break;
        case KDM_OP_FULLY_CONNECTED:
            for (int r = 0; r < o->out_c; r++) {
                const float *wr = w + (size_t)r * o->row_len;
                float acc = b[r];
                for (int j = 0; j < o->row_len; j++)
                    acc += xi[j] * wr[j];
                y[r] = act_f(acc, act);
            }
            break;
        case KDM_OP_ADD: {
            const float *x2 = a->v[o->in1];
            for (uint32_t j = 0; j < to->bytes; j++)
                y[j] = act_f(xi[j] + x2[j], act);
            break;
        }
        case KDM_OP_MAXPOOL2D:
        case KDM_OP_AVGPOOL2D:
        case KDM_OP_GLOBAL_AVGPOOL: fwd_pool(o, ti, xi, to, y); break;
        case KDM_OP_SOFTMAX: {
            float mx = -INFINITY, sum = 0;
            for (uint32_t j = 0; j < to->bytes; j++)
                mx = xi[j] > mx ? xi[j] : mx;
            for (uint32_t j = 0; j < to->bytes; j++)
                sum += y[j] = expf(xi[j] - mx);
            for (uint32_t j = 0; j < to->bytes; j++)
                y[j] /= sum;
            break;
        }
        default: memcpy(y, xi, sizeof(float) * to->bytes); break;
        }
    }
}

void kd_export_forward(const kd_export_graph *g, const float *x, kd_export_acts *a)
{
    kd_export_forward_ex(g, x, a, NULL);
}
