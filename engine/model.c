/*
 * model.c - building a model from its YAML definition, and running it.
 *
 * Building walks the definition twice: the first walk parses every block,
 * infers shapes, lays out parameters and counts arena floats; after one
 * allocation per buffer class, the second walk hands each block its slices.
 * Forward and backward are plain recursions over the trunk; a residual block
 * runs its body and optional projection as sub-trunks.
 *
 * Gradient rule: parameter gradients accumulate (+=) until zero_grad; an
 * activation gradient is written (=) by the block that consumes the
 * activation. A residual body's last block shares the residual's dy.
 */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "rng.h"

static const char *const kd_layer_names[KD_L_COUNT_] = {
    [KD_L_LINEAR] = "linear",     [KD_L_CONV2D] = "conv2d",      [KD_L_BATCHNORM] = "batchnorm",
    [KD_L_RELU] = "relu",         [KD_L_RELU6] = "relu6",        [KD_L_MAXPOOL] = "maxpool2d",
    [KD_L_AVGPOOL] = "avgpool2d", [KD_L_GAP] = "global_avgpool", [KD_L_FLATTEN] = "flatten",
    [KD_L_DROPOUT] = "dropout",   [KD_L_RESIDUAL] = "residual",
};

typedef struct {
    kd_model *m;
    size_t nparams, nbuffers;
    kd_state_entry *entries;
    int nentries, cap;
    uint64_t hash;
    size_t ws_floats;
} kd_builder;

/* Values per sample one activation may hold (256 MiB of float32): beyond it the batch buffers and
 * the kernels' int arithmetic would overflow long before any machine could train it. */
#define KD_MAX_SAMPLE_NUMEL (1 << 26)

static char *shape_text(int ndim, const int *s, char *buf, size_t len)
{
    int64_t v[3];
    for (int i = 0; i < ndim; i++)
        v[i] = s[i];
    return kd_shape_str(v, ndim, buf, len);
}

static kd_status add_entry(kd_builder *bd, const char *prefix, const char *leaf, kd_entry_kind kind,
                           int ndim, const int64_t *shape, size_t offset, int decay)
{
    if (bd->nentries == bd->cap) {
        int cap = bd->cap ? bd->cap * 2 : 32;
        kd_state_entry *e = realloc(bd->entries, sizeof *e * (size_t)cap);
        if (!e)
            return KD_FAIL(KD_ERR_NOMEM, "out of memory building the state table");
        bd->entries = e;
        bd->cap = cap;
    }
    kd_state_entry *e = &bd->entries[bd->nentries++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s.%s", prefix, leaf);
    e->kind = kind;
    e->ndim = ndim;
    e->numel = 1;
    for (int i = 0; i < ndim; i++) {
        e->shape[i] = shape[i];
        e->numel *= (size_t)shape[i];
    }
    e->offset = offset;
    e->decay = decay;
    return KD_OK;
}

static void hash_in(kd_builder *bd, uint64_t a, uint64_t b) { bd->hash = kd_mix64(bd->hash, a, b); }

/* The decayed weight of a linear or conv layer (shape wshape) and its optional bias. */
static kd_status add_weight_bias(kd_builder *bd, kd_block *b, const char *name, int wndim,
                                 const int64_t *wshape)
{
    b->w_numel = 1;
    for (int i = 0; i < wndim; i++)
        b->w_numel *= (size_t)wshape[i];
    b->w_off = bd->nparams;
    KD_TRY(add_entry(bd, name, "weight", KD_ENTRY_PARAM, wndim, wshape, bd->nparams, 1));
    bd->nparams += b->w_numel;
    b->b_numel = 0;
    if (b->has_bias) {
        int64_t bs[1] = {b->features};
        b->b_numel = (size_t)b->features;
        b->b_off = bd->nparams;
        KD_TRY(add_entry(bd, name, "bias", KD_ENTRY_PARAM, 1, bs, bd->nparams, 0));
        bd->nparams += b->b_numel;
    }
    return KD_OK;
}

static kd_status parse_trunk(kd_builder *bd, const kd_node *list, const char *prefix, int in_ndim,
                             const int *in, kd_block **out, int *count, const char *what);

static kd_status get_pos_int(const kd_node *opts, const char *key, int required, int min, int *out,
                             const char *where)
{
    if (!opts)
        return required ? KD_FAIL(KD_ERR_CONFIG, "%s: missing required key '%s'", where, key)
                        : KD_OK;
    int64_t v = *out;
    KD_TRY(kd_node_get_int(opts, key, required, &v));
    if (v < min || v > (1 << 24)) {
        char pos[160];
        kd_node_where(kd_node_child(opts, key), pos, sizeof pos);
        return KD_FAIL(KD_ERR_CONFIG, "%s: '%s' must be in [%d, %d], got %lld", pos, key, min,
                       1 << 24, (long long)v);
    }
    *out = (int)v;
    return KD_OK;
}

/* Parse one block definition (a one-key map or a bare name) and infer its output shape. */
static kd_status parse_block(kd_builder *bd, const kd_node *item, const char *name, int in_ndim,
                             const int *in, kd_block *b)
{
    memset(b, 0, sizeof *b);
    b->w_off = b->b_off = b->rm_off = b->rv_off = SIZE_MAX;
    snprintf(b->name, sizeof b->name, "%s", name);
    kd_node_where(item, b->where, sizeof b->where);
    const char *kname = NULL;
    const kd_node *opts = NULL;
    if (item->kind == KD_NODE_SCALAR) {
        kname = item->value;
    } else if (item->kind == KD_NODE_MAP && item->len == 1) {
        kname = item->keys[0];
        opts = item->items[0];
        if (opts->kind == KD_NODE_SCALAR && opts->value[0] && strcmp(opts->value, "null") &&
            strcmp(opts->value, "~"))
            return KD_FAIL(KD_ERR_CONFIG, "%s: options of '%s' must be a mapping, got '%s'",
                           b->where, kname, opts->value);
        if (opts->kind == KD_NODE_SCALAR)
            opts = NULL;
        else if (opts->kind != KD_NODE_MAP)
            return KD_FAIL(KD_ERR_CONFIG, "%s: options of '%s' must be a mapping", b->where, kname);
    } else {
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: layer %s must be a name or a one-key mapping like "
                       "'- conv2d: {out: 16, kernel: 3}'",
                       b->where, name);
    }
    int kind = -1;
    for (int k = 0; k < KD_L_COUNT_; k++)
        if (strcmp(kname, kd_layer_names[k]) == 0)
            kind = k;
    if (kind < 0)
        return KD_FAIL(
            KD_ERR_CONFIG,
            "%s: unknown layer type '%s' (known: linear, conv2d, batchnorm, relu, relu6, "
            "maxpool2d, avgpool2d, global_avgpool, flatten, dropout, residual)",
            b->where, kname);
    b->kind = (kd_layer_kind)kind;
    char what[96], ins[64], outs[64];
    snprintf(what, sizeof what, "layer %s (%s)", name, kname);

    static const char *const k_linear[] = {"out", "in", "bias", "tap", NULL};
    static const char *const k_conv[] = {"out",    "in",   "kernel", "stride", "pad",
                                         "groups", "bias", "tap",    NULL};
    static const char *const k_bn[] = {"eps", "momentum", "tap", NULL};
    static const char *const k_pool[] = {"kernel", "stride", "pad", "tap", NULL};
    static const char *const k_drop[] = {"p", "tap", NULL};
    static const char *const k_res[] = {"body", "proj", "tap", NULL};
    static const char *const k_plain[] = {"tap", NULL};
    const char *const *allowed = k_plain;
    switch (b->kind) {
    case KD_L_LINEAR: allowed = k_linear; break;
    case KD_L_CONV2D: allowed = k_conv; break;
    case KD_L_BATCHNORM: allowed = k_bn; break;
    case KD_L_MAXPOOL:
    case KD_L_AVGPOOL: allowed = k_pool; break;
    case KD_L_DROPOUT: allowed = k_drop; break;
    case KD_L_RESIDUAL: allowed = k_res; break;
    default: break;
    }
    if (opts) {
        KD_TRY(kd_node_check_keys(opts, allowed, what));
        const char *tap = NULL;
        KD_TRY(kd_node_get_str(opts, "tap", 0, &tap));
        if (tap) {
            if (strlen(tap) >= sizeof b->tap)
                return KD_FAIL(KD_ERR_CONFIG, "%s: tap name '%s' is longer than %zu characters",
                               b->where, tap, sizeof b->tap - 1);
            snprintf(b->tap, sizeof b->tap, "%s", tap);
        }
    }
    b->in_ndim = in_ndim;
    memcpy(b->in, in, sizeof b->in);
    b->in_numel = (size_t)in[0] * (in_ndim == 3 ? (size_t)in[1] * in[2] : 1);
    b->out_ndim = in_ndim;
    memcpy(b->out, in, sizeof b->out);
    shape_text(in_ndim, in, ins, sizeof ins);
    if (b->in_numel > KD_MAX_SAMPLE_NUMEL) /* the model's input; a block's is checked as output */
        return KD_FAIL(KD_ERR_SHAPE,
                       "%s: its input %s holds %zu values per sample, more than the engine's "
                       "limit of %d in one activation",
                       b->where, ins, b->in_numel, KD_MAX_SAMPLE_NUMEL);
    hash_in(bd, (uint64_t)b->kind,
            ((uint64_t)in_ndim << 48) ^ ((uint64_t)in[0] << 32) ^ ((uint64_t)in[1] << 16) ^
                (uint64_t)in[2]);

    switch (b->kind) {
    case KD_L_LINEAR: {
        if (in_ndim != 1)
            return KD_FAIL(KD_ERR_SHAPE,
                           "%s: %s needs a flat input of features but receives %s; add "
                           "'- flatten' or '- global_avgpool' before it",
                           b->where, what, ins);
        int expect = in[0];
        b->has_bias = 1;
        KD_TRY(get_pos_int(opts, "out", 1, 1, &b->features, b->where));
        KD_TRY(get_pos_int(opts, "in", 0, 1, &expect, b->where));
        if (expect != in[0])
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s is declared with in: %d but receives %s", b->where,
                           what, expect, ins);
        if (opts)
            KD_TRY(kd_node_get_bool(opts, "bias", 0, &b->has_bias));
        b->out[0] = b->features;
        int64_t ws[2] = {b->features, in[0]};
        KD_TRY(add_weight_bias(bd, b, name, 2, ws));
        hash_in(bd, (uint64_t)b->features, (uint64_t)b->has_bias);
        break;
    }
    case KD_L_CONV2D: {
        if (in_ndim != 3)
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s needs an input of [C, H, W] but receives %s",
                           b->where, what, ins);
        int expect = in[0];
        b->stride = 1;
        b->groups = 1;
        b->has_bias = 1;
        KD_TRY(get_pos_int(opts, "out", 1, 1, &b->features, b->where));
        KD_TRY(get_pos_int(opts, "kernel", 1, 1, &b->kernel, b->where));
        KD_TRY(get_pos_int(opts, "stride", 0, 1, &b->stride, b->where));
        KD_TRY(get_pos_int(opts, "pad", 0, 0, &b->pad, b->where));
        KD_TRY(get_pos_int(opts, "groups", 0, 1, &b->groups, b->where));
        KD_TRY(get_pos_int(opts, "in", 0, 1, &expect, b->where));
        KD_TRY(kd_node_get_bool(opts, "bias", 0, &b->has_bias));
        if (expect != in[0])
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s is declared with in: %d but receives %s", b->where,
                           what, expect, ins);
        if (in[0] % b->groups || b->features % b->groups)
            return KD_FAIL(KD_ERR_SHAPE,
                           "%s: %s: groups %d must divide both input channels (%d) and out (%d)",
                           b->where, what, b->groups, in[0], b->features);
        kd_conv_shape cs;
        if (!kd_conv_shape_init(&cs, 1, in[0], in[1], in[2], b->features, b->kernel, b->kernel,
                                b->stride, b->pad, b->groups))
            return KD_FAIL(KD_ERR_SHAPE,
                           "%s: %s: kernel %d, stride %d, pad %d on input %s gives no output, or "
                           "more than %d positions per channel",
                           b->where, what, b->kernel, b->stride, b->pad, ins, KD_CONV_MAX_PLANE);
        b->out[0] = b->features;
        b->out[1] = cs.ho;
        b->out[2] = cs.wo;
        int64_t ws[4] = {b->features, in[0] / b->groups, b->kernel, b->kernel};
        KD_TRY(add_weight_bias(bd, b, name, 4, ws));
        kd_conv_shape full;
        kd_conv_shape_init(&full, bd->m->max_batch, in[0], in[1], in[2], b->features, b->kernel,
                           b->kernel, b->stride, b->pad, b->groups);
        size_t ws_need = bd->m->be->conv2d_ws ? bd->m->be->conv2d_ws(&full) : 0;
        if (ws_need > bd->ws_floats)
            bd->ws_floats = ws_need;
        hash_in(bd,
                ((uint64_t)b->features << 32) ^ ((uint64_t)b->kernel << 16) ^ (uint64_t)b->stride,
                ((uint64_t)b->pad << 32) ^ ((uint64_t)b->groups << 1) ^ (uint64_t)b->has_bias);
        break;
    }
    case KD_L_BATCHNORM: {
        b->eps = 1e-5;
        b->momentum = 0.1;
        if (opts) {
            KD_TRY(kd_node_get_float(opts, "eps", 0, &b->eps));
            KD_TRY(kd_node_get_float(opts, "momentum", 0, &b->momentum));
        }
        if (!(b->eps > 0) || !(b->momentum >= 0 && b->momentum <= 1))
            return KD_FAIL(KD_ERR_CONFIG, "%s: %s needs eps > 0 and momentum in [0, 1]", b->where,
                           what);
        int64_t cs[1] = {in[0]};
        b->w_numel = b->b_numel = (size_t)in[0];
        b->w_off = bd->nparams;
        KD_TRY(add_entry(bd, name, "weight", KD_ENTRY_PARAM, 1, cs, bd->nparams, 0));
        bd->nparams += b->w_numel;
        b->b_off = bd->nparams;
        KD_TRY(add_entry(bd, name, "bias", KD_ENTRY_PARAM, 1, cs, bd->nparams, 0));
        bd->nparams += b->b_numel;
        b->rm_off = bd->nbuffers;
        KD_TRY(add_entry(bd, name, "running_mean", KD_ENTRY_BUFFER, 1, cs, bd->nbuffers, 0));
        bd->nbuffers += (size_t)in[0];
        b->rv_off = bd->nbuffers;
        KD_TRY(add_entry(bd, name, "running_var", KD_ENTRY_BUFFER, 1, cs, bd->nbuffers, 0));
        bd->nbuffers += (size_t)in[0];
        KD_TRY(add_entry(bd, name, "num_batches_tracked", KD_ENTRY_COUNTER, 0, NULL, 0, 0));
        hash_in(bd, (uint64_t)(b->eps * 1e12), (uint64_t)(b->momentum * 1e12));
        break;
    }
    case KD_L_MAXPOOL:
    case KD_L_AVGPOOL: {
        if (in_ndim != 3)
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s needs an input of [C, H, W] but receives %s",
                           b->where, what, ins);
        KD_TRY(get_pos_int(opts, "kernel", 1, 1, &b->kernel, b->where));
        b->stride = b->kernel;
        KD_TRY(get_pos_int(opts, "stride", 0, 1, &b->stride, b->where));
        KD_TRY(get_pos_int(opts, "pad", 0, 0, &b->pad, b->where));
        if (2 * b->pad > b->kernel)
            return KD_FAIL(KD_ERR_CONFIG, "%s: %s: pad %d must be at most half the kernel %d",
                           b->where, what, b->pad, b->kernel);
        if (in[1] + 2 * b->pad < b->kernel || in[2] + 2 * b->pad < b->kernel)
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s: kernel %d does not fit input %s", b->where, what,
                           b->kernel, ins);
        b->out[1] = (in[1] + 2 * b->pad - b->kernel) / b->stride + 1;
        b->out[2] = (in[2] + 2 * b->pad - b->kernel) / b->stride + 1;
        hash_in(bd, ((uint64_t)b->kernel << 32) ^ (uint64_t)b->stride, (uint64_t)b->pad);
        break;
    }
    case KD_L_GAP:
        if (in_ndim != 3)
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s needs an input of [C, H, W] but receives %s",
                           b->where, what, ins);
        b->out_ndim = 1;
        b->out[1] = b->out[2] = 1;
        break;
    case KD_L_FLATTEN:
        b->out_ndim = 1;
        b->out[0] = (int)b->in_numel;
        b->out[1] = b->out[2] = 1;
        break;
    case KD_L_DROPOUT:
        b->p = 0.5;
        if (opts)
            KD_TRY(kd_node_get_float(opts, "p", 0, &b->p));
        if (!(b->p >= 0 && b->p < 1))
            return KD_FAIL(KD_ERR_CONFIG, "%s: %s: p must be in [0, 1), got %g", b->where, what,
                           b->p);
        hash_in(bd, (uint64_t)(b->p * 1e12), 0);
        break;
    case KD_L_RESIDUAL: {
        const kd_node *body = opts ? kd_node_child(opts, "body") : NULL;
        const kd_node *proj = opts ? kd_node_child(opts, "proj") : NULL;
        if (!body || body->kind != KD_NODE_SEQ || body->len == 0)
            return KD_FAIL(KD_ERR_CONFIG, "%s: %s needs 'body:' with a non-empty list of layers",
                           b->where, what);
        char sub[80];
        snprintf(sub, sizeof sub, "%s.body", name);
        KD_TRY(parse_trunk(bd, body, sub, in_ndim, in, &b->body, &b->nbody, what));
        const kd_block *bl = &b->body[b->nbody - 1];
        b->out_ndim = bl->out_ndim;
        memcpy(b->out, bl->out, sizeof b->out);
        int skip_ndim = in_ndim;
        const int *skip = in;
        if (proj) {
            if (proj->kind != KD_NODE_SEQ || proj->len == 0)
                return KD_FAIL(KD_ERR_CONFIG, "%s: %s: 'proj:' must be a non-empty list of layers",
                               b->where, what);
            snprintf(sub, sizeof sub, "%s.proj", name);
            KD_TRY(parse_trunk(bd, proj, sub, in_ndim, in, &b->proj, &b->nproj, what));
            skip_ndim = b->proj[b->nproj - 1].out_ndim;
            skip = b->proj[b->nproj - 1].out;
        }
        int same = skip_ndim == b->out_ndim;
        for (int i = 0; i < skip_ndim && same; i++)
            same = skip[i] == b->out[i];
        if (!same) {
            char sk[64];
            shape_text(b->out_ndim, b->out, outs, sizeof outs);
            shape_text(skip_ndim, skip, sk, sizeof sk);
            return KD_FAIL(KD_ERR_SHAPE, "%s: %s: body output %s does not match the %s %s; %s",
                           b->where, what, outs, proj ? "projection output" : "skip input", sk,
                           proj ? "fix the proj layers"
                                : "add 'proj: [conv2d: {out: ..., kernel: 1, stride: ...}]'");
        }
        hash_in(bd, 0x5e51d, (uint64_t)b->nbody << 8 | (uint64_t)b->nproj);
        break;
    }
    default: break;
    }
    b->out_numel = (size_t)b->out[0] * (b->out_ndim == 3 ? (size_t)b->out[1] * b->out[2] : 1);
    if (b->out_numel > KD_MAX_SAMPLE_NUMEL)
        return KD_FAIL(KD_ERR_SHAPE,
                       "%s: on input %s its output holds %zu values per sample, more than the "
                       "engine's limit of %d in one activation",
                       b->where, ins, b->out_numel, KD_MAX_SAMPLE_NUMEL);
    return KD_OK;
}

static void free_trunk(kd_block *blocks, int n)
{
    if (!blocks)
        return;
    for (int i = 0; i < n; i++) {
        free_trunk(blocks[i].body, blocks[i].nbody);
        free_trunk(blocks[i].proj, blocks[i].nproj);
    }
    free(blocks);
}

static kd_status parse_trunk(kd_builder *bd, const kd_node *list, const char *prefix, int in_ndim,
                             const int *in, kd_block **out, int *count, const char *what)
{
    if (list->kind != KD_NODE_SEQ) {
        char pos[160];
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be a list of layers",
                       kd_node_where(list, pos, sizeof pos), what);
    }
    kd_block *blocks = calloc(list->len ? list->len : 1, sizeof *blocks);
    if (!blocks)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory parsing layers");
    int cur_ndim = in_ndim;
    int cur[3] = {in[0], in[1], in[2]};
    for (size_t i = 0; i < list->len; i++) {
        char name[64];
        if (prefix[0])
            snprintf(name, sizeof name, "%s.%zu", prefix, i);
        else
            snprintf(name, sizeof name, "%zu", i);
        kd_status st = parse_block(bd, list->items[i], name, cur_ndim, cur, &blocks[i]);
        if (st != KD_OK) {
            free_trunk(blocks, (int)i + 1);
            return st;
        }
        cur_ndim = blocks[i].out_ndim;
        memcpy(cur, blocks[i].out, sizeof cur);
    }
    *out = blocks;
    *count = (int)list->len;
    return KD_OK;
}

static const kd_block *find_tap(const kd_block *blocks, int n, const char *tap)
{
    for (int i = 0; i < n; i++) {
        if (blocks[i].tap[0] && strcmp(blocks[i].tap, tap) == 0)
            return &blocks[i];
        const kd_block *b = find_tap(blocks[i].body, blocks[i].nbody, tap);
        if (!b)
            b = find_tap(blocks[i].proj, blocks[i].nproj, tap);
        if (b)
            return b;
    }
    return NULL;
}

/* Every tap name once in the whole model (residual bodies and projections included): a
 * loss or export naming a tap must not silently take the first of two. */
static kd_status check_taps(const kd_block *blocks, int n, const kd_block *all, int nall)
{
    for (int i = 0; i < n; i++) {
        const kd_block *b = &blocks[i];
        const kd_block *first = b->tap[0] ? find_tap(all, nall, b->tap) : b;
        if (first != b)
            return KD_FAIL(KD_ERR_CONFIG, "%s: tap '%s' is already the name of layer %s (%s)",
                           b->where, b->tap, first->name, first->where);
        KD_TRY(check_taps(b->body, b->nbody, all, nall));
        KD_TRY(check_taps(b->proj, b->nproj, all, nall));
    }
    return KD_OK;
}

/* Hand out arena slices (base != NULL) or only count them (base == NULL). */
static void arena_walk(kd_block *blocks, int n, int batch, float *base, size_t *cur)
{
#define TAKE(ptr, type, count)                                                                     \
    do {                                                                                           \
        size_t cnt_ = (size_t)(count);                                                             \
        if (base)                                                                                  \
            (ptr) = (type *)(base + *cur);                                                         \
        *cur += (cnt_ + 15) / 16 * 16;                                                             \
    } while (0)
    for (int i = 0; i < n; i++) {
        kd_block *b = &blocks[i];
        size_t act = (size_t)batch * b->out_numel;
        if (b->fused) {
            /* the batchnorm before it wrote the activated output into its own buffers */
            if (base) {
                b->y = blocks[i - 1].y;
                b->dy = blocks[i - 1].dy;
            }
            continue;
        }
        TAKE(b->y, float, act);
        TAKE(b->dy, float, act);
        switch (b->kind) {
        case KD_L_BATCHNORM:
            TAKE(b->save_a, float, b->in[0]);
            TAKE(b->save_b, float, b->in[0]);
            break;
        case KD_L_DROPOUT: TAKE(b->save_a, float, act); break;
        case KD_L_MAXPOOL: TAKE(b->arg, int32_t, act); break;
        case KD_L_RESIDUAL:
            arena_walk(b->body, b->nbody, batch, base, cur);
            TAKE(b->dx_body, float, (size_t)batch * b->in_numel);
            if (b->nproj) {
                arena_walk(b->proj, b->nproj, batch, base, cur);
                TAKE(b->dx_proj, float, (size_t)batch * b->in_numel);
                if (base)
                    b->proj[b->nproj - 1].dy = b->dy;
            }
            if (base)
                b->body[b->nbody - 1].dy = b->dy;
            break;
        default: break;
        }
    }
#undef TAKE
}

static int has_params(const kd_block *b)
{
    if (b->w_off != SIZE_MAX || b->b_off != SIZE_MAX)
        return 1;
    for (int i = 0; i < b->nbody; i++)
        if (has_params(&b->body[i]))
            return 1;
    for (int i = 0; i < b->nproj; i++)
        if (has_params(&b->proj[i]))
            return 1;
    return 0;
}

/* number the dropout blocks (their entries in seeds_dev) in forward order */
static void seed_slot_walk(kd_block *blocks, int n, int *next)
{
    for (int i = 0; i < n; i++) {
        if (blocks[i].kind == KD_L_DROPOUT)
            blocks[i].seed_slot = (*next)++;
        seed_slot_walk(blocks[i].body, blocks[i].nbody, next);
        seed_slot_walk(blocks[i].proj, blocks[i].nproj, next);
    }
}

/* each dropout block's mask seed for a step: block i of a trunk draws from
 * mix(seed, i, 0xb10c), a residual's body and projection from mix(that, 1 | 2, 0) */
static void seed_walk(const kd_block *blocks, int n, uint64_t seed, uint64_t *out)
{
    for (int i = 0; i < n; i++) {
        const uint64_t s = kd_mix64(seed, (uint64_t)i, 0xb10c);
        if (blocks[i].kind == KD_L_DROPOUT)
            out[blocks[i].seed_slot] = kd_mix64(s, 0xd7, 0);
        seed_walk(blocks[i].body, blocks[i].nbody, kd_mix64(s, 1, 0), out);
        seed_walk(blocks[i].proj, blocks[i].nproj, kd_mix64(s, 2, 0), out);
    }
}

kd_status kd_model_stage_seeds(kd_model *m, uint64_t step_seed)
{
    if (!m->ndropout || (m->seeds_ready && m->seeds_step == step_seed))
        return KD_OK;
    seed_walk(m->blocks, m->nblocks, step_seed, m->seeds_host);
    m->seeds_ready = 0;
    KD_TRY(m->be->upload(m->seeds_dev, m->seeds_host, (size_t)m->ndropout * sizeof(uint64_t)));
    m->seeds_step = step_seed;
    m->seeds_ready = 1;
    return KD_OK;
}

/*
 * Decide fusions and which blocks need their input gradient. A batchnorm
 * fuses the relu/relu6 right after it unless the batchnorm's own output is
 * tapped, or the activation ends a residual branch (whose gradient buffer the
 * residual shares).
 */
static void plan_walk(kd_block *blocks, int n, int nested)
{
    int seen = 0;
    for (int i = 0; i < n; i++) {
        kd_block *b = &blocks[i];
        b->params_before = seen;
        seen |= has_params(b);
        if (b->kind == KD_L_BATCHNORM && i + 1 < n && !b->tap[0] &&
            (blocks[i + 1].kind == KD_L_RELU || blocks[i + 1].kind == KD_L_RELU6) &&
            !(nested && i + 1 == n - 1)) {
            b->fuse_cap = blocks[i + 1].kind == KD_L_RELU ? -1.0 : 6.0;
            blocks[i + 1].fused = 1;
        }
        if (b->kind == KD_L_RESIDUAL) {
            plan_walk(b->body, b->nbody, 1);
            plan_walk(b->proj, b->nproj, 1);
        }
    }
}

static void counters_walk(kd_block *blocks, int n, kd_state_entry *e, int ne, int *next)
{
    for (int i = 0; i < n; i++) {
        kd_block *b = &blocks[i];
        if (b->kind == KD_L_BATCHNORM) {
            for (; *next < ne; (*next)++)
                if (e[*next].kind == KD_ENTRY_COUNTER) {
                    e[(*next)++].counter = &b->bn_batches;
                    break;
                }
        }
        if (b->kind == KD_L_RESIDUAL) {
            counters_walk(b->body, b->nbody, e, ne, next);
            counters_walk(b->proj, b->nproj, e, ne, next);
        }
    }
}

static void init_walk(kd_block *blocks, int n, float *p, float *buf, kd_rng *r)
{
    for (int i = 0; i < n; i++) {
        kd_block *b = &blocks[i];
        if (b->kind == KD_L_LINEAR || b->kind == KD_L_CONV2D) {
            /* PyTorch's default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for both */
            double fan_in = (double)b->w_numel / b->features;
            float bound = (float)(1.0 / sqrt(fan_in));
            for (size_t j = 0; j < b->w_numel; j++)
                p[b->w_off + j] = (2.0f * kd_rng_uniform(r) - 1.0f) * bound;
            for (size_t j = 0; j < b->b_numel; j++)
                p[b->b_off + j] = (2.0f * kd_rng_uniform(r) - 1.0f) * bound;
        } else if (b->kind == KD_L_BATCHNORM) {
            for (size_t j = 0; j < b->w_numel; j++) {
                p[b->w_off + j] = 1.0f;
                p[b->b_off + j] = 0.0f;
                buf[b->rm_off + j] = 0.0f;
                buf[b->rv_off + j] = 1.0f;
            }
        } else if (b->kind == KD_L_RESIDUAL) {
            init_walk(b->body, b->nbody, p, buf, r);
            init_walk(b->proj, b->nproj, p, buf, r);
        }
    }
}

static const char *needed_ops(const kd_block *blocks, int n, char *buf, size_t len)
{
    for (int i = 0; i < n; i++) {
        const kd_block *b = &blocks[i];
        const char *ops = "";
        switch (b->kind) {
        case KD_L_LINEAR: ops = "linear_fwd,linear_bwd,"; break;
        case KD_L_CONV2D: ops = "conv2d_ws,conv2d_fwd,conv2d_bwd,"; break;
        case KD_L_BATCHNORM: ops = "bn_fwd_train,bn_fwd_eval,bn_bwd,"; break;
        case KD_L_RELU:
        case KD_L_RELU6: ops = "act_fwd,act_bwd,"; break;
        case KD_L_MAXPOOL: ops = "maxpool_fwd,maxpool_bwd,"; break;
        case KD_L_AVGPOOL: ops = "avgpool_fwd,avgpool_bwd,"; break;
        case KD_L_GAP: ops = "gap_fwd,gap_bwd,"; break;
        case KD_L_FLATTEN: ops = "copy,"; break;
        case KD_L_DROPOUT: ops = "dropout_fwd,mul,copy,"; break;
        case KD_L_RESIDUAL: ops = "add,"; break;
        default: break;
        }
        /* append each op once, so any depth of model fits the buffer */
        char one[32];
        for (const char *p = ops; *p;) {
            const char *comma = strchr(p, ',');
            size_t l = (size_t)(comma - p);
            snprintf(one, sizeof one, ",%.*s,", (int)l, p);
            if (!strstr(buf, one)) {
                size_t used = strlen(buf);
                snprintf(buf + used, len - used, "%.*s,", (int)l, p);
            }
            p = comma + 1;
        }
        if (b->kind == KD_L_RESIDUAL) {
            needed_ops(b->body, b->nbody, buf, len);
            needed_ops(b->proj, b->nproj, buf, len);
        }
    }
    return buf;
}

kd_status kd_model_build(const kd_node *input, const kd_node *layers, const kd_backend *be,
                         int max_batch, uint64_t seed, kd_model **out)
{
    *out = NULL;
    char pos[160];
    if (!input || input->kind != KD_NODE_SEQ || (input->len != 1 && input->len != 3))
        return KD_FAIL(KD_ERR_CONFIG, "%s: 'input' must be a list [C, H, W] or [features]",
                       input ? kd_node_where(input, pos, sizeof pos) : "model");
    if (!layers)
        return KD_FAIL(KD_ERR_CONFIG, "model definition has no 'layers'");
    if (max_batch <= 0)
        return KD_FAIL(KD_ERR_INVALID, "batch size must be positive, got %d", max_batch);
    kd_model *m = calloc(1, sizeof *m);
    if (!m)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    m->be = be;
    m->max_batch = max_batch;
    m->in_ndim = (int)input->len;
    m->in[1] = m->in[2] = 1;
    for (size_t i = 0; i < input->len; i++) {
        int64_t v;
        kd_status st = kd_node_as_int(input->items[i], "input dimension", &v);
        if (st == KD_OK && (v < 1 || v > 65536))
            st = KD_FAIL(KD_ERR_CONFIG, "%s: input dimension must be in [1, 65536], got %lld",
                         kd_node_where(input->items[i], pos, sizeof pos), (long long)v);
        if (st != KD_OK) {
            free(m);
            return st;
        }
        m->in[i] = (int)v;
    }
    m->in_numel = (size_t)m->in[0] * m->in[1] * m->in[2];
    kd_builder bd = {.m = m, .hash = 0x6b64};
    kd_status st =
        parse_trunk(&bd, layers, "", m->in_ndim, m->in, &m->blocks, &m->nblocks, "'layers'");
    if (st != KD_OK) {
        free(bd.entries);
        free(m);
        return st;
    }
    m->entries = bd.entries;
    m->nentries = bd.nentries;
    m->nparams = bd.nparams;
    m->nbuffers = bd.nbuffers;
    m->def_hash = bd.hash;
    m->ws_floats = bd.ws_floats;
    st = check_taps(m->blocks, m->nblocks, m->blocks, m->nblocks);
    if (st != KD_OK)
        goto fail;
    if (m->nblocks == 0) {
        st = KD_FAIL(KD_ERR_CONFIG, "%s: the model has no layers",
                     kd_node_where(layers, pos, sizeof pos));
        goto fail;
    }
    const kd_block *last = &m->blocks[m->nblocks - 1];
    if (last->out_ndim != 1) {
        char s[64];
        st = KD_FAIL(KD_ERR_SHAPE,
                     "%s: the last layer must output a flat vector of logits, but layer %s gives "
                     "%s",
                     last->where, last->name, shape_text(last->out_ndim, last->out, s, sizeof s));
        goto fail;
    }
    m->out_features = last->out[0];
    /* the leading comma lets needed_ops look names up as ",name," */
    char need[1024] = ",ce,";
    needed_ops(m->blocks, m->nblocks, need, sizeof need);
    const char *miss = kd_backend_missing(be, need);
    if (miss) {
        st = KD_FAIL(KD_ERR_UNSUPPORTED, "the %s backend does not implement '%s' yet", be->name,
                     miss);
        goto fail;
    }
    int next = 0;
    counters_walk(m->blocks, m->nblocks, m->entries, m->nentries, &next);
    plan_walk(m->blocks, m->nblocks, 0);
    seed_slot_walk(m->blocks, m->nblocks, &m->ndropout);
    m->seeds_host = calloc(m->ndropout ? m->ndropout : 1, sizeof(uint64_t));
    if (!m->seeds_host) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = be->alloc((void **)&m->seeds_dev,
                        (m->ndropout ? m->ndropout : 1) * sizeof(uint64_t))) != KD_OK)
        goto fail;

    size_t count = 0;
    arena_walk(m->blocks, m->nblocks, max_batch, NULL, &count);
    m->arena_floats = count;
    if ((st = be->alloc((void **)&m->arena, count * sizeof(float))) != KD_OK)
        goto fail;
    size_t cur = 0;
    arena_walk(m->blocks, m->nblocks, max_batch, m->arena, &cur);
    if ((st = be->alloc((void **)&m->params, (m->nparams ? m->nparams : 1) * sizeof(float))) ||
        (st = be->alloc((void **)&m->grads, (m->nparams ? m->nparams : 1) * sizeof(float))) ||
        (st = be->alloc((void **)&m->buffers, (m->nbuffers ? m->nbuffers : 1) * sizeof(float))) ||
        (st = be->alloc((void **)&m->ws, (m->ws_floats ? m->ws_floats : 1) * sizeof(float))))
        goto fail;
    m->decay_mask = calloc(m->nparams ? m->nparams : 1, 1);
    float *hp = calloc(m->nparams ? m->nparams : 1, sizeof(float));
    float *hb = calloc(m->nbuffers ? m->nbuffers : 1, sizeof(float));
    if (!m->decay_mask || !hp || !hb) {
        free(hp);
        free(hb);
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < m->nentries; i++)
        if (m->entries[i].kind == KD_ENTRY_PARAM && m->entries[i].decay)
            memset(m->decay_mask + m->entries[i].offset, 1, m->entries[i].numel);
    kd_rng r;
    kd_rng_seed(&r, seed, 0x1417);
    init_walk(m->blocks, m->nblocks, hp, hb, &r);
    st = be->upload(m->params, hp, m->nparams * sizeof(float));
    if (st == KD_OK)
        st = be->upload(m->buffers, hb, m->nbuffers * sizeof(float));
    free(hp);
    free(hb);
    if (st != KD_OK)
        goto fail;
    *out = m;
    return KD_OK;
fail:
    kd_model_free(m);
    return st;
}

void kd_model_free(kd_model *m)
{
    if (!m)
        return;
    if (m->be) {
        m->be->release(m->arena);
        m->be->release(m->params);
        m->be->release(m->grads);
        m->be->release(m->buffers);
        m->be->release(m->ws);
        m->be->release(m->x_bf16);
        m->be->release(m->master);
        m->be->release(m->seeds_dev);
    }
    free(m->seeds_host);
    free(m->decay_mask);
    free(m->entries);
    free_trunk(m->blocks, m->nblocks);
    free(m);
}

/* ---- running ---- */

static void chain_fwd(kd_model *m, kd_block *blocks, int count, const float *x, int n, int train);

static kd_pool_shape pool_shape(const kd_block *b, int n)
{
    return (kd_pool_shape){.n = n,
                           .c = b->in[0],
                           .h = b->in[1],
                           .w = b->in[2],
                           .k = b->kernel,
                           .stride = b->stride,
                           .pad = b->pad,
                           .ho = b->out[1],
                           .wo = b->out[2]};
}

static void block_fwd(kd_model *m, kd_block *b, const float *x, int n, int train)
{
    const kd_backend *be = m->be;
    float *P = m->params;
    size_t act = (size_t)n * b->out_numel;
    switch (b->kind) {
    case KD_L_LINEAR:
        be->linear_fwd(n, b->in[0], b->features, x, P + b->w_off, b->has_bias ? P + b->b_off : NULL,
                       b->y);
        break;
    case KD_L_CONV2D: {
        kd_conv_shape s;
        kd_conv_shape_init(&s, n, b->in[0], b->in[1], b->in[2], b->features, b->kernel, b->kernel,
                           b->stride, b->pad, b->groups);
        be->conv2d_fwd(&s, x, P + b->w_off, b->has_bias ? P + b->b_off : NULL, b->y, m->ws);
        break;
    }
    case KD_L_BATCHNORM: {
        int hw = b->in_ndim == 3 ? b->in[1] * b->in[2] : 1;
        if (train) {
            be->bn_fwd_train(n, b->in[0], hw, x, P + b->w_off, P + b->b_off, b->y, b->save_a,
                             b->save_b, m->buffers + b->rm_off, m->buffers + b->rv_off, b->momentum,
                             b->eps, b->fuse_cap);
            b->bn_batches++;
        } else {
            be->bn_fwd_eval(n, b->in[0], hw, x, P + b->w_off, P + b->b_off, m->buffers + b->rm_off,
                            m->buffers + b->rv_off, b->y, b->eps, b->fuse_cap);
        }
        break;
    }
    case KD_L_RELU:
    case KD_L_RELU6:
        if (!b->fused)
            be->act_fwd(act, x, b->y, b->kind == KD_L_RELU ? -1.0 : 6.0);
        break;
    case KD_L_MAXPOOL: {
        kd_pool_shape p = pool_shape(b, n);
        be->maxpool_fwd(&p, x, b->y, b->arg);
        break;
    }
    case KD_L_AVGPOOL: {
        kd_pool_shape p = pool_shape(b, n);
        be->avgpool_fwd(&p, x, b->y);
        break;
    }
    case KD_L_GAP: be->gap_fwd(n, b->in[0], b->in[1] * b->in[2], x, b->y); break;
    case KD_L_FLATTEN: be->copy(act, x, b->y); break;
    case KD_L_DROPOUT:
        if (train && b->p > 0)
            be->dropout_fwd(act, x, b->y, b->save_a, b->p, m->seeds_dev + b->seed_slot);
        else
            be->copy(act, x, b->y);
        break;
    case KD_L_RESIDUAL:
        chain_fwd(m, b->body, b->nbody, x, n, train);
        if (b->nproj) {
            chain_fwd(m, b->proj, b->nproj, x, n, train);
            be->add(act, b->body[b->nbody - 1].y, b->proj[b->nproj - 1].y, b->y);
        } else {
            be->add(act, b->body[b->nbody - 1].y, x, b->y);
        }
        break;
    default: break;
    }
}

/* Block i of a trunk ends a tensor the exporter stores as int8 (kd_model_set_act_fq): not
 * dropout or flatten (the exporter drops them), and not a block that a batchnorm or activation
 * after it (past any dropout / flatten) folds into. */
static int act_quantized(const kd_block *blocks, int count, int i)
{
    const kd_layer_kind k = blocks[i].kind;
    if (k == KD_L_DROPOUT || k == KD_L_FLATTEN)
        return 0;
    int j = i + 1;
    while (j < count && (blocks[j].kind == KD_L_DROPOUT || blocks[j].kind == KD_L_FLATTEN))
        j++;
    if (j < count) {
        const kd_layer_kind next = blocks[j].kind;
        if (next == KD_L_BATCHNORM || next == KD_L_RELU || next == KD_L_RELU6)
            return 0;
    }
    return 1;
}

static int is_pool(kd_layer_kind k)
{
    return k == KD_L_MAXPOOL || k == KD_L_AVGPOOL || k == KD_L_GAP;
}

static void chain_fwd(kd_model *m, kd_block *blocks, int count, const float *x, int n, int train)
{
    const float *in = x;
    float scale = 0; /* the int8 grid of the last tensor quantized in this trunk */
    int32_t zp = 0;
    int grid_is_input = 0; /* ... and it is block i's input */
    for (int i = 0; i < count; i++) {
        block_fwd(m, &blocks[i], in, n, train);
        if (m->act_fq && act_quantized(blocks, count, i)) {
            const size_t cnt = (size_t)n * blocks[i].out_numel;
            if (is_pool(blocks[i].kind) && grid_is_input) /* the exporter keeps the input's */
                kd_quant_fake_act_on(blocks[i].y, cnt, scale, zp);
            else
                kd_quant_fake_act(blocks[i].y, cnt, &scale, &zp);
            grid_is_input = 1;
        } else if (blocks[i].kind != KD_L_DROPOUT && blocks[i].kind != KD_L_FLATTEN) {
            grid_is_input = 0;
        }
        if (m->bf16 && !blocks[i].fused) /* a fused activation's output is the batchnorm's */
            m->be->round_bf16((size_t)n * blocks[i].out_numel, blocks[i].y);
        in = blocks[i].y;
    }
}

typedef struct {
    kd_grads_ready_fn fn;
    void *ctx;
} grads_ready;
static void chain_bwd(kd_model *m, kd_block *blocks, int count, const float *x, int n, float *dx,
                      const grads_ready *ready);
static size_t block_param_lo(const kd_block *b);

/* dy of b is ready; write dx (may be NULL: nobody needs it) and accumulate param grads. */
static void block_bwd(kd_model *m, kd_block *b, const float *x, int n, float *dx)
{
    const kd_backend *be = m->be;
    float *P = m->params, *G = m->grads;
    size_t act = (size_t)n * b->out_numel;
    switch (b->kind) {
    case KD_L_LINEAR:
        be->linear_bwd(n, b->in[0], b->features, x, P + b->w_off, b->dy, dx, G + b->w_off,
                       b->has_bias ? G + b->b_off : NULL);
        break;
    case KD_L_CONV2D: {
        kd_conv_shape s;
        kd_conv_shape_init(&s, n, b->in[0], b->in[1], b->in[2], b->features, b->kernel, b->kernel,
                           b->stride, b->pad, b->groups);
        be->conv2d_bwd(&s, x, P + b->w_off, b->dy, dx, G + b->w_off,
                       b->has_bias ? G + b->b_off : NULL, m->ws);
        break;
    }
    case KD_L_BATCHNORM: {
        int hw = b->in_ndim == 3 ? b->in[1] * b->in[2] : 1;
        be->bn_bwd(n, b->in[0], hw, x, b->dy, P + b->w_off, b->save_a, b->save_b, b->y, b->fuse_cap,
                   dx, G + b->w_off, G + b->b_off);
        break;
    }
    case KD_L_RELU:
    case KD_L_RELU6:
        /* fused: the batchnorm's backward applies the mask; dy already is its dy */
        if (dx && !b->fused)
            be->act_bwd(act, x, b->dy, dx, b->kind == KD_L_RELU ? -1.0 : 6.0);
        break;
    case KD_L_MAXPOOL:
        if (dx) {
            kd_pool_shape p = pool_shape(b, n);
            be->maxpool_bwd(&p, b->dy, b->arg, dx);
        }
        break;
    case KD_L_AVGPOOL:
        if (dx) {
            kd_pool_shape p = pool_shape(b, n);
            be->avgpool_bwd(&p, b->dy, dx);
        }
        break;
    case KD_L_GAP:
        if (dx)
            be->gap_bwd(n, b->in[0], b->in[1] * b->in[2], b->dy, dx);
        break;
    case KD_L_FLATTEN:
        if (dx)
            be->copy(act, b->dy, dx);
        break;
    case KD_L_DROPOUT:
        if (dx) {
            if (b->p > 0)
                be->mul(act, b->dy, b->save_a, dx);
            else
                be->copy(act, b->dy, dx);
        }
        break;
    case KD_L_RESIDUAL:
        chain_bwd(m, b->body, b->nbody, x, n, dx ? b->dx_body : NULL, NULL);
        if (b->nproj)
            chain_bwd(m, b->proj, b->nproj, x, n, dx ? b->dx_proj : NULL, NULL);
        if (dx)
            be->add((size_t)n * b->in_numel, b->dx_body, b->nproj ? b->dx_proj : b->dy, dx);
        break;
    default: break;
    }
}

/* Backward through a trunk; stops early once no earlier block has parameters and the
 * caller needs no input gradient (dx == NULL), so e.g. the first layer skips its dx.
 * ready (top level only): told after each block with parameters that the gradients from
 * its first parameter to the end of the buffer are final (parameters follow block order). */
static void chain_bwd(kd_model *m, kd_block *blocks, int count, const float *x, int n, float *dx,
                      const grads_ready *ready)
{
    for (int i = count - 1; i >= 0; i--) {
        const float *in = i ? blocks[i - 1].y : x;
        int more = dx || blocks[i].params_before;
        float *din = !more ? NULL : i ? blocks[i - 1].dy : dx;
        block_bwd(m, &blocks[i], in, n, din);
        if (din && m->bf16 && !blocks[i].fused)
            m->be->round_bf16((size_t)n * blocks[i].in_numel, din);
        size_t lo;
        if (ready && (lo = block_param_lo(&blocks[i])) != SIZE_MAX && lo > 0)
            ready->fn(ready->ctx, lo);
        if (!more)
            break;
    }
}

/* The input the first block reads: x, or its bf16 rounding (kd_model_set_bf16). */
static const float *model_input(kd_model *m, const float *x, int n, int fresh)
{
    if (!m->bf16)
        return x;
    if (fresh) {
        m->be->copy((size_t)n * m->in_numel, x, m->x_bf16);
        m->be->round_bf16((size_t)n * m->in_numel, m->x_bf16);
    }
    return m->x_bf16;
}

void kd_model_forward(kd_model *m, const float *x, int n, int train, uint64_t step_seed)
{
    /* a failed upload leaves seeds_ready 0 and its message in kd_last_error(); the trainer
     * stages the seeds itself first and stops on the failure */
    if (train)
        (void)kd_model_stage_seeds(m, step_seed);
    chain_fwd(m, m->blocks, m->nblocks, model_input(m, x, n, 1), n, train);
}

const float *kd_model_output(const kd_model *m) { return m->blocks[m->nblocks - 1].y; }

float *kd_model_output_grad(kd_model *m) { return m->blocks[m->nblocks - 1].dy; }

/* The losses wrote the output gradient in float32; a bf16 backward starts from its rounding. */
static void round_output_grad(kd_model *m, int n)
{
    if (m->bf16)
        m->be->round_bf16((size_t)n * m->out_features, kd_model_output_grad(m));
}

void kd_model_backward(kd_model *m, const float *x, int n)
{
    round_output_grad(m, n);
    chain_bwd(m, m->blocks, m->nblocks, model_input(m, x, n, 0), n, NULL, NULL);
}

/* Lowest parameter offset inside b (nested blocks included); SIZE_MAX when it has none. */
static size_t block_param_lo(const kd_block *b)
{
    size_t lo = SIZE_MAX;
    if (b->w_off != SIZE_MAX && b->w_off < lo)
        lo = b->w_off;
    if (b->b_off != SIZE_MAX && b->b_off < lo)
        lo = b->b_off;
    for (int i = 0; i < b->nbody; i++) {
        size_t l = block_param_lo(&b->body[i]);
        lo = l < lo ? l : lo;
    }
    for (int i = 0; i < b->nproj; i++) {
        size_t l = block_param_lo(&b->proj[i]);
        lo = l < lo ? l : lo;
    }
    return lo;
}

void kd_model_backward_notify(kd_model *m, const float *x, int n, kd_grads_ready_fn fn, void *ctx)
{
    grads_ready r = {fn, ctx};
    round_output_grad(m, n);
    chain_bwd(m, m->blocks, m->nblocks, model_input(m, x, n, 0), n, NULL, &r);
    fn(ctx, 0);
}

void kd_model_zero_grad(kd_model *m) { m->be->zero(m->grads, m->nparams * sizeof(float)); }

void kd_model_count_train_forward(kd_model *m, int delta)
{
    /* every batchnorm's counter is one state entry (counters_walk) */
    for (int i = 0; i < m->nentries; i++)
        if (m->entries[i].kind == KD_ENTRY_COUNTER)
            *m->entries[i].counter += delta;
}

kd_status kd_model_set_act_fq(kd_model *m, int on)
{
    if (on && m->be->device != KD_DEVICE_CPU)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "activation fake quantization runs on the CPU backend only");
    m->act_fq = on != 0;
    return KD_OK;
}

kd_status kd_model_set_bf16(kd_model *m, int on)
{
    if (on && !m->x_bf16) {
        if (!m->be->round_bf16)
            return KD_FAIL(KD_ERR_UNSUPPORTED, "the %s backend cannot round to bfloat16",
                           m->be->name);
        KD_TRY(
            m->be->alloc((void **)&m->x_bf16, (size_t)m->max_batch * m->in_numel * sizeof(float)));
        kd_status st = m->be->alloc((void **)&m->master, m->nparams * sizeof(float));
        if (st) {
            m->be->release(m->x_bf16);
            m->x_bf16 = NULL;
            return st;
        }
    }
    if (!on)
        kd_model_bf16_weights(m, 0); /* the float32 masters back first */
    m->bf16 = on != 0;
    return KD_OK;
}

/* Round the weights and biases of the convolutions and linear layers in blocks. */
static void round_weights_walk(kd_model *m, kd_block *blocks, int n)
{
    for (int i = 0; i < n; i++) {
        kd_block *b = &blocks[i];
        if (b->kind == KD_L_LINEAR || b->kind == KD_L_CONV2D) {
            m->be->round_bf16(b->w_numel, m->params + b->w_off);
            if (b->has_bias)
                m->be->round_bf16(b->b_numel, m->params + b->b_off);
        } else if (b->kind == KD_L_RESIDUAL) {
            round_weights_walk(m, b->body, b->nbody);
            round_weights_walk(m, b->proj, b->nproj);
        }
    }
}

void kd_model_bf16_weights(kd_model *m, int round)
{
    if (!m->bf16 || (round != 0) == m->bf16_held)
        return;
    if (round) {
        m->be->copy(m->nparams, m->params, m->master);
        round_weights_walk(m, m->blocks, m->nblocks);
    } else {
        m->be->copy(m->nparams, m->master, m->params);
    }
    m->bf16_held = round != 0;
}

const kd_block *kd_model_tap(const kd_model *m, const char *tap)
{
    return find_tap(m->blocks, m->nblocks, tap);
}

size_t kd_model_num_params(const kd_model *m) { return m->nparams; }

static void summary_walk(const kd_block *blocks, int n, int depth, FILE *f)
{
    for (int i = 0; i < n; i++) {
        const kd_block *b = &blocks[i];
        char s[64];
        size_t np =
            (b->w_off != SIZE_MAX ? b->w_numel : 0) + (b->b_off != SIZE_MAX ? b->b_numel : 0);
        fprintf(f, "  %*s%-12s %-16s %-18s %8zu%s%s\n", depth * 2, "", b->name,
                kd_layer_names[b->kind], shape_text(b->out_ndim, b->out, s, sizeof s), np,
                b->tap[0] ? "  tap=" : "", b->tap);
        if (b->kind == KD_L_RESIDUAL) {
            summary_walk(b->body, b->nbody, depth + 1, f);
            summary_walk(b->proj, b->nproj, depth + 1, f);
        }
    }
}

void kd_model_summary(const kd_model *m, FILE *f)
{
    char s[64];
    fprintf(f, "  %-12s %-16s %-18s %8s\n", "name", "layer", "output", "params");
    fprintf(f, "  %-12s %-16s %-18s %8s\n", "", "input", shape_text(m->in_ndim, m->in, s, sizeof s),
            "");
    summary_walk(m->blocks, m->nblocks, 0, f);
    fprintf(f, "  total parameters: %zu (%.1f KiB as float32)\n", m->nparams,
            m->nparams * 4.0 / 1024);
}
