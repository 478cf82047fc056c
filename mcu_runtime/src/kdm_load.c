/*
 * kdm_load.c - validation of a .kdm blob (format: kdm.h) and the model's accessors.
 *
 * kdm_load checks everything kdm_invoke later trusts, in this order: the pointer and the
 * length, magic, version, total_len, the CRC, flags, counts, the arena plan (scratch inside the
 * arena), the table and data offsets, the input / output indices, every tensor, every op. Each
 * check answers its own status. Reads are byte-assembled little-endian loads at offsets already
 * proven inside [blob, blob + total_len), and every sum or product of blob fields is done in 64
 * bits (or, in check_window, in 32 bits on fields bounded first), so a hostile blob can neither
 * make the loader read out of bounds nor overflow.
 *
 * Limits of this runtime beyond the format (so that every index a kernel computes fits int32):
 * a blob and an arena below 2^31 bytes; pad and stride at most 65535; an average pooling window
 * (or a global pool's h * w) below 2^24 values; max pooling with pad < kernel so that no window
 * lies entirely in the padding.
 *
 * What each op must satisfy is in check_op(); the scratch each op needs comes from
 * kdm_op_scratch_size, the same function the exporter sizes the header with.
 */
#include <string.h>

#include "kdm_internal.h"
#include "kdm_kernels.h"

#define KDM_LIMIT          0x7FFFFFFFu /* blob and arena sizes */
#define KDM_MAX_DIM        65535
#define KDM_MAX_POOL_COUNT ((1 << 24) - 1)

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        kdm_status st_ = (expr);                                                                   \
        if (st_ != KDM_OK)                                                                         \
            return st_;                                                                            \
    } while (0)

const char *kdm_status_str(kdm_status st)
{
    static const char *const text[KDM_STATUS_COUNT_] = {
        "ok",
        "bad argument",
        "not a .kdm blob (bad magic)",
        "unsupported .kdm version",
        "blob truncated",
        "CRC mismatch",
        "offset, size, index or count out of range",
        "blob or offset not 4-byte aligned",
        "unknown or disabled op",
        "tensor shapes do not fit the op",
        "op parameter out of range",
        "arena too small or misaligned",
    };
    return (unsigned)st < KDM_STATUS_COUNT_ ? text[st] : "unknown status";
}

/* The constant-data region of the blob, where every op array must lie. */
typedef struct {
    uint32_t data_off, data_len;
} data_region;

/* ---- helpers ----------------------------------------------------------------------------------
 */

/* The tensor at index idx (any int32 from an op record), or KDM_ERR_RANGE. */
static kdm_status tensor_at(const kdm_model *m, int32_t idx, kdm_tensor_ *t)
{
    if (idx < 0 || (uint32_t)idx >= m->n_tensors)
        return KDM_ERR_RANGE;
    kdm_tensor_get_(m->tensors, (uint32_t)idx, t);
    return KDM_OK;
}

static uint64_t tensor_bytes(const kdm_tensor_ *t)
{
    return (uint64_t)(uint32_t)t->c * (uint32_t)t->h * (uint32_t)t->w;
}

static int overlap(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len)
{
    return a_len && b_len && a < b + b_len && b < a + a_len;
}

static int same_shape(const kdm_tensor_ *a, const kdm_tensor_ *b)
{
    return a->c == b->c && a->h == b->h && a->w == b->w;
}

/* An array of `bytes` at blob offset `off` inside the data region, 4-byte aligned. */
static kdm_status check_array(const data_region *d, int32_t off, uint64_t bytes)
{
    if (off < 0 || (uint32_t)off < d->data_off ||
        (uint64_t)(uint32_t)off + bytes > (uint64_t)d->data_off + d->data_len)
        return KDM_ERR_RANGE;
    return (off & 3) ? KDM_ERR_ALIGN : KDM_OK;
}

/* A multiplier (0 or [2^30, 2^31)) and a shift ([-31, 30]) of a requantization. */
static int quant_ok(int32_t mult, int32_t shift)
{
    return (mult == 0 || mult >= (1 << 30)) && shift >= -31 && shift <= 30;
}

/* floor(span / stride) + 1 == out, for out in 1 .. KDM_MAX_DIM and stride in 1 .. KDM_MAX_DIM:
 * (out - 1) stride <= span < out stride, each product below 2^32. */
static int window_fits(uint32_t span, uint32_t stride, int32_t out)
{
    return (uint32_t)(out - 1) * stride <= span && span < (uint32_t)out * stride;
}

/* Kernel, stride, pad and the output size formula of a windowed op. */
static kdm_status check_window(const int32_t *r, const kdm_tensor_ *ti, const kdm_tensor_ *to)
{
    int32_t kh = r[KDM_F_KH], kw = r[KDM_F_KW], stride = r[KDM_F_STRIDE], pad = r[KDM_F_PAD];
    if (kh < 1 || kw < 1 || stride < 1 || stride > KDM_MAX_DIM || pad < 0 || pad > KDM_MAX_DIM)
        return KDM_ERR_PARAM;
    /* span / stride + 1 == out, tested without a division: a 64-bit one links libgcc's
     * (about 860 bytes on a Cortex-M4, 800 on an M0+), and the ARMv6-M cores have no 32-bit
     * divide instruction either. h, w, out <= KDM_MAX_DIM (checked with the tensors, before the
     * ops), so span cannot overflow. */
    const int32_t span_h = ti->h + 2 * pad - kh, span_w = ti->w + 2 * pad - kw;
    if (span_h < 0 || span_w < 0 || !window_fits((uint32_t)span_h, (uint32_t)stride, to->h) ||
        !window_fits((uint32_t)span_w, (uint32_t)stride, to->w))
        return KDM_ERR_SHAPE;
    return KDM_OK;
}

/* ---- per-op checks ----------------------------------------------------------------------------
 */

/* CONV2D, DEPTHWISE_CONV2D, FULLY_CONNECTED: geometry, weights, bias and requantization. */
static kdm_status check_weighted(const kdm_model *m, const data_region *d, const int32_t *r,
                                 const kdm_tensor_ *ti, const kdm_tensor_ *to)
{
    int32_t type = r[KDM_F_TYPE], wbits = r[KDM_F_WBITS];
    if (wbits != 8 && wbits != 4)
        return KDM_ERR_PARAM;
    if (!(KDM_WBITS_MASK & KDM_WBITS_BIT(wbits)))
        return KDM_ERR_OP;
    uint64_t k, rows, out_c = (uint32_t)to->c;
    if (type == KDM_OP_FULLY_CONNECTED) {
        if (to->h != 1 || to->w != 1)
            return KDM_ERR_SHAPE;
        k = tensor_bytes(ti);
        rows = out_c;
    } else {
        TRY(check_window(r, ti, to));
        if (type == KDM_OP_DEPTHWISE_CONV2D && ti->c != to->c)
            return KDM_ERR_SHAPE;
        k = type == KDM_OP_CONV2D ? (uint64_t)r[KDM_F_KH] * (uint64_t)r[KDM_F_KW] * (uint32_t)ti->c
                                  : (uint32_t)ti->c;
        rows = type == KDM_OP_CONV2D ? out_c : (uint64_t)r[KDM_F_KH] * (uint64_t)r[KDM_F_KW];
    }
    uint64_t packed = wbits == 8 ? k : (k + 1) / 2;
    int32_t row_stride = r[KDM_F_ROW_STRIDE];
    if (row_stride < 1 || (uint64_t)row_stride < packed)
        return KDM_ERR_PARAM;
    if (row_stride & 3)
        return KDM_ERR_ALIGN;
    /* rows < 2^36 (kernel sizes are bounded by check_window), row_stride < 2^31 */
    if (rows > d->data_len)
        return KDM_ERR_RANGE;
    TRY(check_array(d, r[KDM_F_WEIGHTS], rows * (uint32_t)row_stride));
    TRY(check_array(d, r[KDM_F_BIAS], 4 * out_c));
    TRY(check_array(d, r[KDM_F_QUANT], KDM_QUANT_BYTES(out_c)));
    const uint8_t *q = m->blob + r[KDM_F_QUANT];
    for (uint64_t c = 0; c < out_c; c++)
        if (!quant_ok((int32_t)kdm_rd32_(q + 4 * c), (int8_t)q[4 * out_c + c]))
            return KDM_ERR_PARAM;
    return KDM_OK;
}

/* ADD: equal shapes and TFLite's parameters in range. */
static kdm_status check_add(const kdm_model *m, const data_region *d, const int32_t *r,
                            const kdm_tensor_ *ti, const kdm_tensor_ *t2, const kdm_tensor_ *to)
{
    if (!same_shape(ti, t2) || !same_shape(ti, to))
        return KDM_ERR_SHAPE;
    TRY(check_array(d, r[KDM_F_PARAMS], 4 * KDM_ADD_WORDS));
    const uint8_t *p = m->blob + r[KDM_F_PARAMS];
    int32_t ls = (int32_t)kdm_rd32_(p);
    if (ls < 0 || ls > 20)
        return KDM_ERR_PARAM;
    for (int i = KDM_ADD_M1; i < KDM_ADD_WORDS; i += 2)
        if (!quant_ok((int32_t)kdm_rd32_(p + 4 * i), (int32_t)kdm_rd32_(p + 4 * i + 4)))
            return KDM_ERR_PARAM;
    return KDM_OK;
}

/* SOFTMAX: a [C] vector in and out, the exponential table in range. */
static kdm_status check_softmax(const kdm_model *m, const data_region *d, const int32_t *r,
                                const kdm_tensor_ *ti, const kdm_tensor_ *to)
{
    if (ti->h != 1 || ti->w != 1 || !same_shape(ti, to))
        return KDM_ERR_SHAPE;
    TRY(check_array(d, r[KDM_F_PARAMS], 4 * KDM_SOFTMAX_LUT));
    const uint8_t *p = m->blob + r[KDM_F_PARAMS];
    for (int i = 0; i < KDM_SOFTMAX_LUT; i++) {
        int32_t e = (int32_t)kdm_rd32_(p + 4 * i);
        if (e < (i == 0) || e > 65536)
            return KDM_ERR_PARAM;
    }
    return KDM_OK;
}

/* Whether the runtime is built with an op (KDM_OP_MASK): the checks of the others are dead code
 * that the compiler drops (check_op refuses those ops first). */
#define HAS(op) ((KDM_OP_MASK & KDM_OP_BIT(op)) != 0)

static kdm_status check_op(const kdm_model *m, const data_region *d, const int32_t *r)
{
    int32_t type = r[KDM_F_TYPE];
    if (type < 1 || type >= KDM_OP_COUNT_ || !HAS(type))
        return KDM_ERR_OP;
    kdm_tensor_ ti, to, t2 = {0, 0, 0, 0, 0, 0};
    TRY(tensor_at(m, r[KDM_F_IN0], &ti));
    TRY(tensor_at(m, r[KDM_F_OUT], &to));
    if (HAS(KDM_OP_ADD) && type == KDM_OP_ADD) {
        TRY(tensor_at(m, r[KDM_F_IN1], &t2));
        if (overlap(t2.off, tensor_bytes(&t2), to.off, tensor_bytes(&to)))
            return KDM_ERR_RANGE;
    }
    if (overlap(ti.off, tensor_bytes(&ti), to.off, tensor_bytes(&to)) &&
        !(type == KDM_OP_RESHAPE && ti.off == to.off))
        return KDM_ERR_RANGE;
    if (r[KDM_F_ACT_MIN] < -128 || r[KDM_F_ACT_MAX] > 127 || r[KDM_F_ACT_MIN] > r[KDM_F_ACT_MAX])
        return KDM_ERR_PARAM;
    switch (type) {
    case KDM_OP_CONV2D:
    case KDM_OP_DEPTHWISE_CONV2D:
    case KDM_OP_FULLY_CONNECTED: TRY(check_weighted(m, d, r, &ti, &to)); break;
    case KDM_OP_ADD:
        if (HAS(KDM_OP_ADD))
            TRY(check_add(m, d, r, &ti, &t2, &to));
        break;
    case KDM_OP_MAXPOOL2D:
    case KDM_OP_AVGPOOL2D:
        if (!HAS(KDM_OP_MAXPOOL2D) && !HAS(KDM_OP_AVGPOOL2D))
            break;
        TRY(check_window(r, &ti, &to));
        if (ti.c != to.c)
            return KDM_ERR_SHAPE;
        if (type == KDM_OP_MAXPOOL2D &&
            (r[KDM_F_PAD] >= r[KDM_F_KH] || r[KDM_F_PAD] >= r[KDM_F_KW]))
            return KDM_ERR_PARAM;
        if (type == KDM_OP_AVGPOOL2D &&
            (r[KDM_F_PAD] != 0 || (int64_t)r[KDM_F_KH] * r[KDM_F_KW] > KDM_MAX_POOL_COUNT))
            return KDM_ERR_PARAM;
        break;
    case KDM_OP_GLOBAL_AVGPOOL:
        if (to.c != ti.c || to.h != 1 || to.w != 1)
            return KDM_ERR_SHAPE;
        if ((int64_t)ti.h * ti.w > KDM_MAX_POOL_COUNT)
            return KDM_ERR_PARAM;
        break;
    case KDM_OP_RESHAPE:
        if (tensor_bytes(&ti) != tensor_bytes(&to))
            return KDM_ERR_SHAPE;
        break;
    case KDM_OP_SOFTMAX:
        if (HAS(KDM_OP_SOFTMAX))
            TRY(check_softmax(m, d, r, &ti, &to));
        break;
    default: return KDM_ERR_OP;
    }
    if (kdm_op_scratch_size(r, (uint32_t)ti.c, (uint32_t)ti.h, (uint32_t)ti.w) > m->scratch_size)
        return KDM_ERR_RANGE;
    return KDM_OK;
}

/* A table of n records of `rec` bytes at blob offset off, after the header. */
static kdm_status check_table(uint32_t off, uint64_t n, uint32_t rec, uint32_t len)
{
    if (off < KDM_HEADER_SIZE || (uint64_t)off + n * rec > len)
        return KDM_ERR_RANGE;
    return (off & 3) ? KDM_ERR_ALIGN : KDM_OK;
}

static kdm_status validate(kdm_model *m, const uint8_t *b, size_t len)
{
    if (len < KDM_HEADER_SIZE)
        return KDM_ERR_TRUNCATED;
    if (kdm_rd32_(b) != KDM_MAGIC)
        return KDM_ERR_MAGIC;
    if (kdm_rd32_(b + 4) != KDM_VERSION)
        return KDM_ERR_VERSION;
    uint32_t total = kdm_rd32_(b + 8);
    if (total < KDM_HEADER_SIZE || total > KDM_LIMIT)
        return KDM_ERR_RANGE;
    if (total > len)
        return KDM_ERR_TRUNCATED;
    if (kdm_crc32(b + 16, total - 16) != kdm_rd32_(b + 12))
        return KDM_ERR_CRC;
    m->blob = b;
    m->len = total;
    m->flags = kdm_rd32_(b + 16);
    if (m->flags & ~(uint32_t)KDM_FLAG_SINGLE_ROUNDING)
        return KDM_ERR_PARAM;
    if (!(KDM_ROUNDING_MASK & KDM_ROUNDING_BIT(m->flags & KDM_FLAG_SINGLE_ROUNDING)))
        return KDM_ERR_OP;
    m->n_tensors = kdm_rd32_(b + 20);
    m->n_ops = kdm_rd32_(b + 24);
    if (m->n_tensors < 1 || m->n_tensors > KDM_MAX_TENSORS || m->n_ops < 1 ||
        m->n_ops > KDM_MAX_OPS)
        return KDM_ERR_RANGE;
    m->arena_size = kdm_rd32_(b + 28);
    m->scratch_off = kdm_rd32_(b + 32);
    m->scratch_size = kdm_rd32_(b + 36);
    if (m->arena_size > KDM_LIMIT || (uint64_t)m->scratch_off + m->scratch_size > m->arena_size)
        return KDM_ERR_RANGE;
    if (m->scratch_off & 3)
        return KDM_ERR_ALIGN;
    m->input = kdm_rd32_(b + 40);
    m->output = kdm_rd32_(b + 44);
    uint32_t toff = kdm_rd32_(b + 48), ooff = kdm_rd32_(b + 52);
    data_region d = {kdm_rd32_(b + 56), kdm_rd32_(b + 60)};
    TRY(check_table(toff, m->n_tensors, 4 * KDM_TENSOR_WORDS, total));
    TRY(check_table(ooff, m->n_ops, 4 * KDM_OP_WORDS, total));
    TRY(check_table(d.data_off, d.data_len, 1, total));
    m->tensors = b + toff;
    m->ops = b + ooff;
    if (m->input >= m->n_tensors || m->output >= m->n_tensors)
        return KDM_ERR_RANGE;
    for (uint32_t i = 0; i < m->n_tensors; i++) {
        kdm_tensor_ t;
        kdm_tensor_get_(m->tensors, i, &t);
        if (t.c < 1 || t.c > KDM_MAX_DIM || t.h < 1 || t.h > KDM_MAX_DIM || t.w < 1 ||
            t.w > KDM_MAX_DIM)
            return KDM_ERR_SHAPE;
        if (t.zp < -128 || t.zp > 127)
            return KDM_ERR_PARAM;
        uint64_t n = tensor_bytes(&t);
        if ((uint64_t)t.off + n > m->arena_size ||
            overlap(t.off, n, m->scratch_off, m->scratch_size))
            return KDM_ERR_RANGE;
    }
    for (uint32_t i = 0; i < m->n_ops; i++)
        TRY(check_op(m, &d, kdm_op_rec_(m->ops, i)));
    return KDM_OK;
}

kdm_status kdm_load(kdm_model *m, const void *blob, size_t len)
{
    if (!m)
        return KDM_ERR_ARG;
    memset(m, 0, sizeof *m); /* padding too: "zeroed" means every byte */
    if (!blob)
        return KDM_ERR_ARG;
    if ((uintptr_t)blob & 3)
        return KDM_ERR_ALIGN;
    kdm_model v;
    memset(&v, 0, sizeof v);
    kdm_status st = validate(&v, (const uint8_t *)blob, len);
    if (st == KDM_OK)
        *m = v;
    return st;
}

/* ---- accessors --------------------------------------------------------------------------------
 */

uint32_t kdm_arena_size(const kdm_model *m) { return m && m->blob ? m->arena_size : 0; }

static uint32_t tensor_size(const kdm_model *m, uint32_t i)
{
    if (!m || !m->blob)
        return 0;
    kdm_tensor_ t;
    kdm_tensor_get_(m->tensors, i, &t);
    return (uint32_t)tensor_bytes(&t);
}

uint32_t kdm_input_size(const kdm_model *m) { return m ? tensor_size(m, m->input) : 0; }
uint32_t kdm_output_size(const kdm_model *m) { return m ? tensor_size(m, m->output) : 0; }

static void tensor_quant(const kdm_model *m, uint32_t i, uint32_t *scale_bits, int32_t *zp)
{
    kdm_tensor_ t = {0, 0, 0, 0, 0, 0};
    if (m && m->blob)
        kdm_tensor_get_(m->tensors, i, &t);
    if (scale_bits)
        *scale_bits = t.scale_bits;
    if (zp)
        *zp = t.zp;
}

void kdm_input_quant(const kdm_model *m, uint32_t *scale_bits, int32_t *zero_point)
{
    tensor_quant(m, m ? m->input : 0, scale_bits, zero_point);
}

void kdm_output_quant(const kdm_model *m, uint32_t *scale_bits, int32_t *zero_point)
{
    tensor_quant(m, m ? m->output : 0, scale_bits, zero_point);
}

/* Each argument pinned to 2^20 (far above any valid value) for kdm_op_scratch_size, which sees
 * unvalidated records: a product of two stays below 2^40 and the helpers saturate the rest. */
static uint32_t pin(int64_t v) { return v < 0 ? 0 : v > (1 << 20) ? (1u << 20) : (uint32_t)v; }

uint32_t kdm_op_scratch_size(const int32_t *op, uint32_t in_c, uint32_t in_h, uint32_t in_w)
{
    if (!op)
        return 0;
    const uint32_t kh = pin(op[KDM_F_KH]), c = pin(in_c), w = pin(in_w);
    switch (op[KDM_F_TYPE]) {
    case KDM_OP_CONV2D: return kdm_conv2d_scratch_size_(kh, pin(op[KDM_F_KW]), c);
    case KDM_OP_DEPTHWISE_CONV2D: /* kernel and stride as they are: the shape test needs no pin */
        return kdm_depthwise_scratch_size_((uint32_t)op[KDM_F_KH], (uint32_t)op[KDM_F_KW],
                                           (uint32_t)op[KDM_F_STRIDE], in_c, w, pin(op[KDM_F_PAD]));
    case KDM_OP_FULLY_CONNECTED: return kdm_fully_connected_scratch_size_(c, pin(in_h), w);
    default: return 0;
    }
}

uint32_t kdm_op_macs(const kdm_model *m, uint32_t i)
{
    if (!m || !m->blob || i >= m->n_ops)
        return 0;
    const int32_t *r = kdm_op_rec_(m->ops, i);
    kdm_tensor_ ti, to;
    kdm_tensor_get_(m->tensors, (uint32_t)r[KDM_F_IN0], &ti);
    kdm_tensor_get_(m->tensors, (uint32_t)r[KDM_F_OUT], &to);
    uint64_t out = tensor_bytes(&to), macs = 0;
    if (r[KDM_F_TYPE] == KDM_OP_CONV2D)
        macs = out * (uint64_t)r[KDM_F_KH] * (uint64_t)r[KDM_F_KW] * (uint32_t)ti.c;
    else if (r[KDM_F_TYPE] == KDM_OP_DEPTHWISE_CONV2D)
        macs = out * (uint64_t)r[KDM_F_KH] * (uint64_t)r[KDM_F_KW];
    else if (r[KDM_F_TYPE] == KDM_OP_FULLY_CONNECTED)
        macs = out * tensor_bytes(&ti);
    return macs > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)macs;
}
