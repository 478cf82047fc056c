/*
 * kdm_random_model.c - random-weight .kdm models for the Cortex-M firmware tests and benchmark
 * (bench/mcu), built with the host serializer (exporters/kdm_writer.h) and run through the host
 * runtime for the reference outputs.
 *
 *   kdm_random_model export --quant int8|int4 [--samples N] [--seed S] --out DIR
 *       DIR/model.c, DIR/model.h and DIR/samples.bin in the layout `distill export --format c`
 *       writes, for a network with the tiny Fashion-MNIST student's shapes
 *       (configs/fashion-mnist/models/tiny_cnn.yaml with BatchNorm folded): conv3x3 s2 1->24,
 *       dw3x3 24, pw 24->32, dw3x3 s2 32, pw 32->64, dw3x3 64, pw 64->128, global average
 *       pool, FC 128->10, on a 28x28x1 input; every weight int8 or every weight int4.
 *   kdm_random_model kcheck [--cases N] [--seed S] [--rounding double|single|both] --out FILE.c
 *       N small models of randomized shapes (conv, depthwise, fully-connected at 8 and 4 bits,
 *       pools, add, softmax, short chains), each with a random input and the host runtime's
 *       output, as C data for the kernel_check firmware (struct in bench/mcu/kernel_check.h).
 *       Their requantization rounds as asked (default: both, alternately); the file names the
 *       KDM_ROUNDING_MASK the firmware's runtime is built with (a "kcheck-rounding-mask" line),
 *       so a single- or double-only build runs its own code.
 *
 * Files are written only when their bytes change, so an incremental firmware build recompiles
 * nothing when the same seed is generated again.
 *
 * The numbers are not a trained network's, but they are shaped like one so that outputs are
 * not all clamped: weights uniform over the full int8 / int4 range, biases with the input
 * zero-point term folded in as the exporter does (bias - zp_in * sum(w)), and per-channel
 * requantization multipliers chosen so that an accumulator's spread maps to about +-40 output
 * steps. Arena plans: `export` alternates the tensors between two regions (an op's input and
 * output never share one), `kcheck` gives every tensor its own region; the scratch area follows
 * the tensors, sized by kdm_op_scratch_size.
 *
 * samples.bin (little-endian): "KDMS", u32 n, u32 in_size, u32 out_size, then n records of
 * { int8 input[in_size], int32 label, int8 host_output[out_size] }.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kdm.h"
#include "kdm_writer.h"
#include "rng.h"
#include "status.h"

#define GEN_MAX_TENSORS 16
#define GEN_MAX_OPS     16
#define GEN_X_STD       40.0 /* assumed spread of an int8 activation around its zero-point */

typedef struct {
    int32_t c, h, w, zp;
    float scale;
    uint32_t arena_off;
} gen_tensor;

typedef struct {
    kdm_builder *b;
    kd_rng rng;
    gen_tensor t[GEN_MAX_TENSORS];
    int nt;
    int32_t op[GEN_MAX_OPS][KDM_OP_WORDS];
    int nops;
    int kcheck; /* kcheck cases: unusual requantization and weight layouts too (else export's) */
    char desc[96];
} gen_model;

/* ---- small helpers ------------------------------------------------------------------------ */

static int rnd_int(gen_model *g, int lo, int hi) /* uniform in [lo, hi] */
{
    return lo + (int)kd_rng_below(&g->rng, (uint32_t)(hi - lo + 1));
}

static double rnd_range(gen_model *g, double lo, double hi)
{
    return lo + (hi - lo) * kd_rng_uniform(&g->rng);
}

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Append n int32 values little-endian; *off = their blob offset. */
static kd_status put_words(gen_model *g, const int32_t *v, size_t n, uint32_t *off)
{
    uint8_t *buf = malloc(n * 4 + 4);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    for (size_t i = 0; i < n; i++)
        put_le32(buf + 4 * i, (uint32_t)v[i]);
    kd_status st = kdm_builder_data(g->b, buf, n * 4, off);
    free(buf);
    return st;
}

/* The real multiplier m as a Q31 multiplier in [2^30, 2^31) and a power-of-two shift. */
static void quantize_multiplier(double m, int32_t *mult, int32_t *shift)
{
    int e;
    double f = frexp(m, &e);
    long long q = llround(f * 2147483648.0);
    if (q == 2147483648LL) {
        q /= 2;
        e++;
    }
    if (e < -31) { /* too small to matter: the output is the zero-point */
        q = 0;
        e = 0;
    }
    *mult = (int32_t)q;
    *shift = e > 30 ? 30 : e;
}

static int add_tensor(gen_model *g, int32_t c, int32_t h, int32_t w, int32_t zp, float scale)
{
    gen_tensor *t = &g->t[g->nt];
    t->c = c;
    t->h = h;
    t->w = w;
    t->zp = zp;
    t->scale = scale;
    return g->nt++;
}

static int32_t *new_op(gen_model *g, int type, int in0, int out)
{
    int32_t *op = g->op[g->nops++];
    memset(op, 0, sizeof g->op[0]);
    op[0] = type;
    op[1] = in0;
    op[2] = -1;
    op[3] = out;
    op[9] = -128;
    op[10] = 127;
    return op;
}

/* Output clamp of a layer: none, ReLU (at the zero-point) or a ReLU6-like upper bound too. */
/* act: 0 none, 1 relu (from the zero-point), 2 relu with a ceiling, 3 a clamp a few steps wide */
static void set_activation(int32_t *op, int32_t zp_out, int act)
{
    if (act >= 1)
        op[9] = zp_out;
    if (act == 2)
        op[10] = zp_out + 100 > 127 ? 127 : zp_out + 100;
    if (act == 3) {
        op[9] = zp_out - 3 < -128 ? -128 : zp_out - 3;
        op[10] = zp_out + 5 > 127 ? 127 : zp_out + 5;
    }
}

/*
 * Weights: `rows` rows of `row_len` values, uniform over [-qmax, qmax], packed (int4: low
 * nibble first) with rows padded to a multiple of 4 bytes, int8 convolution rows to 8 as the
 * exporter pads them (in kcheck cases only half of them: the Cortex-M4 kernels take both).
 * w receives the unpacked values.
 */
static kd_status put_weights(gen_model *g, int rows, int row_len, int wbits, int8_t *w, int32_t *op)
{
    int qmax = wbits == 8 ? 127 : 7;
    int packed = wbits == 8 ? row_len : (row_len + 1) / 2;
    int align = wbits == 8 && op[0] == KDM_OP_CONV2D && (!g->kcheck || rnd_int(g, 0, 1)) ? 8 : 4;
    int stride = (packed + align - 1) & -align;
    uint8_t *buf = calloc((size_t)rows * stride + 4, 1);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < row_len; i++) {
            int8_t v = (int8_t)rnd_int(g, -qmax, qmax);
            w[(size_t)r * row_len + i] = v;
            uint8_t *p = buf + (size_t)r * stride;
            if (wbits == 8)
                p[i] = (uint8_t)v;
            else
                p[i / 2] |= (uint8_t)(((uint8_t)v & 15u) << (4 * (i & 1)));
        }
    }
    uint32_t off;
    kd_status st = kdm_builder_data(g->b, buf, (size_t)rows * stride, &off);
    free(buf);
    op[11] = (int32_t)off;
    op[12] = stride;
    op[8] = wbits;
    return st;
}

/*
 * Bias (with the input zero-point folded in) and per-channel requantization for `out_c`
 * channels whose accumulators sum k products; wsum[o] = sum of channel o's weights.
 */
static kd_status put_bias_quant(gen_model *g, int32_t *op, int out_c, int k, int wbits,
                                const int32_t *wsum, int32_t zp_in)
{
    double w_std = wbits == 8 ? 127.0 / sqrt(3.0) : sqrt((15.0 * 15.0 - 1.0) / 12.0);
    double acc_std = sqrt((double)k) * w_std * GEN_X_STD;
    int32_t *v = malloc(sizeof(int32_t) * 3 * (size_t)out_c);
    if (!v)
        return KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    int32_t *bias = v, *mult = v + out_c, *shift = v + 2 * out_c;
    const int odd = g->kcheck && rnd_int(g, 0, 2) == 0;
    for (int o = 0; o < out_c; o++) {
        bias[o] = (int32_t)(rnd_range(g, -1.0, 1.0) * acc_std) - zp_in * wsum[o];
        /* a multiplier that keeps the outputs in range; in a third of the kcheck layers now
         * and then one of 4 .. 256 times that (a left shift for the smaller accumulators), 0
         * (every output at the zero-point), or an extreme one (mantissa 2^30 or 2^31 - 1, any
         * shift) beside a bias near the int32 limits, for the saturating steps; the kernels
         * take these on their own paths (the other layers keep the assembly paths that want
         * every channel usual) */
        const int kind = odd ? rnd_int(g, 0, 9) : 9;
        const double scale = kind == 0 ? 0.0 : kind <= 2 ? ldexp(1.0, rnd_int(g, 2, 8)) : 1.0;
        quantize_multiplier(GEN_X_STD / acc_std * rnd_range(g, 0.5, 2.0) * scale, &mult[o],
                            &shift[o]);
        if (kind == 3) {
            mult[o] = rnd_int(g, 0, 1) ? 1073741824 : 2147483647;
            shift[o] = rnd_int(g, 0, 1) ? rnd_int(g, -31, 30) : rnd_int(g, -3, 2);
            bias[o] = rnd_int(g, 0, 1) ? INT32_MAX - rnd_int(g, 0, 1 << 20)
                                       : INT32_MIN + rnd_int(g, 0, 1 << 20);
        }
    }
    uint32_t boff, qoff = 0;
    kd_status st = put_words(g, bias, (size_t)out_c, &boff);
    uint8_t *q = st == KD_OK ? malloc(KDM_QUANT_BYTES((size_t)out_c)) : NULL;
    if (st == KD_OK && !q)
        st = KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    if (st == KD_OK) { /* int32 multipliers, then int8 shifts */
        for (int o = 0; o < out_c; o++) {
            put_le32(q + 4 * o, (uint32_t)mult[o]);
            q[4 * out_c + o] = (uint8_t)(int8_t)shift[o];
        }
        st = kdm_builder_data(g->b, q, KDM_QUANT_BYTES((size_t)out_c), &qoff);
    }
    free(q);
    free(v);
    op[13] = (int32_t)boff;
    op[14] = (int32_t)qoff;
    return st;
}

/* ---- layers ------------------------------------------------------------------------------- */

/* CONV2D (OHWI rows) or DEPTHWISE_CONV2D (one row per kernel position); the output tensor. */
static kd_status add_conv(gen_model *g, int type, int in, int out_c, int kh, int kw, int stride,
                          int pad, int wbits, int act, int *out)
{
    const gen_tensor x = g->t[in];
    if (type == KDM_OP_DEPTHWISE_CONV2D)
        out_c = x.c;
    int oh = (x.h + 2 * pad - kh) / stride + 1, ow = (x.w + 2 * pad - kw) / stride + 1;
    int32_t zp = g->kcheck && rnd_int(g, 0, 4) == 0 ? rnd_int(g, -120, 120) : rnd_int(g, -40, 40);
    *out = add_tensor(g, out_c, oh, ow, zp, (float)rnd_range(g, 0.02, 0.2));
    int32_t *op = new_op(g, type, in, *out);
    op[4] = kh;
    op[5] = kw;
    op[6] = stride;
    op[7] = pad;
    set_activation(op, zp, act);

    int rows = type == KDM_OP_CONV2D ? out_c : kh * kw;
    int row_len = type == KDM_OP_CONV2D ? kh * kw * x.c : x.c;
    int8_t *w = malloc((size_t)rows * row_len);
    int32_t *wsum = calloc((size_t)out_c, sizeof *wsum);
    kd_status st = w && wsum ? KD_OK : KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    if (st == KD_OK)
        st = put_weights(g, rows, row_len, wbits, w, op);
    if (st == KD_OK) {
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < row_len; i++)
                wsum[type == KDM_OP_CONV2D ? r : i] += w[(size_t)r * row_len + i];
        st =
            put_bias_quant(g, op, out_c, type == KDM_OP_CONV2D ? row_len : rows, wbits, wsum, x.zp);
    }
    free(w);
    free(wsum);
    return st;
}

static kd_status add_fc(gen_model *g, int in, int out_c, int wbits, int act, int *out)
{
    const gen_tensor x = g->t[in];
    int k = x.c * x.h * x.w;
    int32_t zp = rnd_int(g, -40, 40);
    *out = add_tensor(g, out_c, 1, 1, zp, (float)rnd_range(g, 0.05, 0.3));
    int32_t *op = new_op(g, KDM_OP_FULLY_CONNECTED, in, *out);
    set_activation(op, zp, act);
    int8_t *w = malloc((size_t)out_c * k);
    int32_t *wsum = calloc((size_t)out_c, sizeof *wsum);
    kd_status st = w && wsum ? KD_OK : KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    if (st == KD_OK)
        st = put_weights(g, out_c, k, wbits, w, op);
    if (st == KD_OK) {
        for (int o = 0; o < out_c; o++)
            for (int i = 0; i < k; i++)
                wsum[o] += w[(size_t)o * k + i];
        st = put_bias_quant(g, op, out_c, k, wbits, wsum, x.zp);
    }
    free(w);
    free(wsum);
    return st;
}

/* MAXPOOL2D / AVGPOOL2D (pad 0 for average) / GLOBAL_AVGPOOL: output quantization = input's. */
static int add_pool(gen_model *g, int type, int in, int k, int stride, int pad)
{
    const gen_tensor x = g->t[in];
    int oh = 1, ow = 1;
    if (type != KDM_OP_GLOBAL_AVGPOOL) {
        oh = (x.h + 2 * pad - k) / stride + 1;
        ow = (x.w + 2 * pad - k) / stride + 1;
    }
    int out = add_tensor(g, x.c, oh, ow, x.zp, x.scale);
    int32_t *op = new_op(g, type, in, out);
    if (type != KDM_OP_GLOBAL_AVGPOOL) {
        op[4] = op[5] = k;
        op[6] = stride;
        op[7] = pad;
    }
    return out;
}

/* TFLite's quantized add of two same-shape tensors (parameters from their scales). */
static kd_status add_add(gen_model *g, int a, int b, int act, int *out)
{
    const gen_tensor ta = g->t[a], tb = g->t[b];
    int32_t zp = rnd_int(g, -40, 40);
    float so = (float)rnd_range(g, 0.05, 0.3);
    *out = add_tensor(g, ta.c, ta.h, ta.w, zp, so);
    int32_t *op = new_op(g, KDM_OP_ADD, a, *out);
    op[2] = b;
    set_activation(op, zp, act);
    const int left_shift = 20;
    double twice_max = 2.0 * (ta.scale > tb.scale ? ta.scale : tb.scale);
    int32_t p[7] = {left_shift};
    quantize_multiplier(ta.scale / twice_max, &p[1], &p[2]);
    quantize_multiplier(tb.scale / twice_max, &p[3], &p[4]);
    quantize_multiplier(twice_max / ((double)(1 << left_shift) * so), &p[5], &p[6]);
    uint32_t off;
    kd_status st = put_words(g, p, 7, &off);
    op[15] = (int32_t)off;
    return st;
}

static kd_status add_softmax(gen_model *g, int in, int *out)
{
    const gen_tensor x = g->t[in];
    *out = add_tensor(g, x.c, x.h, x.w, -128, 1.0f / 256.0f);
    int32_t *op = new_op(g, KDM_OP_SOFTMAX, in, *out);
    int32_t lut[256];
    for (int d = 0; d < 256; d++)
        lut[d] = (int32_t)llround(65536.0 * exp(-(double)d * x.scale));
    uint32_t off;
    kd_status st = put_words(g, lut, 256, &off);
    op[15] = (int32_t)off;
    return st;
}

/* ---- finishing: arena plan, header, host run ---------------------------------------------- */

enum { PLAN_PINGPONG, PLAN_DISTINCT };

static uint32_t align4(uint32_t v) { return (v + 3u) & ~3u; }

static uint32_t tensor_bytes(const gen_tensor *t) { return align4((uint32_t)(t->c * t->h * t->w)); }

/* Plan the arena, append the tables and lay out the blob (*blob malloc'd). */
static kd_status gen_finish(gen_model *g, int plan, uint32_t flags, uint8_t **blob, size_t *len,
                            uint32_t *arena_size)
{
    uint32_t end = 0;
    if (plan == PLAN_PINGPONG) {
        uint32_t region[2] = {0, 0};
        for (int i = 0; i < g->nt; i++)
            if (tensor_bytes(&g->t[i]) > region[i & 1])
                region[i & 1] = tensor_bytes(&g->t[i]);
        for (int i = 0; i < g->nt; i++)
            g->t[i].arena_off = (i & 1) ? region[0] : 0;
        end = region[0] + region[1];
    } else {
        for (int i = 0; i < g->nt; i++) {
            g->t[i].arena_off = end;
            end += tensor_bytes(&g->t[i]);
        }
    }
    uint32_t scratch = 0;
    for (int i = 0; i < g->nops; i++) {
        const gen_tensor *x = &g->t[g->op[i][1]];
        uint32_t s = kdm_op_scratch_size(g->op[i], (uint32_t)x->c, (uint32_t)x->h, (uint32_t)x->w);
        if (s > scratch)
            scratch = s;
    }
    kdm_header_fields h = {flags, end + align4(scratch), end, scratch, 0, (uint32_t)(g->nt - 1)};
    for (int i = 0; i < g->nt; i++) {
        const gen_tensor *t = &g->t[i];
        uint32_t sbits;
        memcpy(&sbits, &t->scale, 4);
        int32_t rec[KDM_TENSOR_WORDS] = {(int32_t)t->arena_off, t->c, t->h, t->w, t->zp,
                                         (int32_t)sbits};
        if (kdm_builder_tensor(g->b, rec) < 0)
            return KD_ERR_INVALID;
    }
    for (int i = 0; i < g->nops; i++)
        if (kdm_builder_op(g->b, g->op[i]) < 0)
            return KD_ERR_INVALID;
    *arena_size = h.arena_size;
    return kdm_builder_finish(g->b, &h, blob, len);
}

/* Load `blob` with the host runtime and run it on n inputs of in_size bytes. */
static kd_status host_run(const uint8_t *blob, size_t len, const int8_t *in, int8_t *out, int n)
{
    kdm_model m;
    kdm_status ks = kdm_load(&m, blob, len);
    if (ks != KDM_OK)
        return KD_FAIL(KD_ERR_FORMAT, "host kdm_load: %s", kdm_status_str(ks));
    void *arena = aligned_alloc(16, (kdm_arena_size(&m) + 15u) & ~15u);
    if (!arena)
        return KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    uint32_t in_size = kdm_input_size(&m), out_size = kdm_output_size(&m);
    for (int i = 0; i < n && ks == KDM_OK; i++)
        ks = kdm_invoke(&m, arena, kdm_arena_size(&m), in + (size_t)i * in_size,
                        out + (size_t)i * out_size);
    free(arena);
    if (ks != KDM_OK)
        return KD_FAIL(KD_ERR_FORMAT, "host kdm_invoke: %s", kdm_status_str(ks));
    return KD_OK;
}

/* ---- output files ------------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} text_buf;

static void tb_printf(text_buf *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(text_buf *t, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        size_t room = t->cap - t->len;
        int n = t->p ? vsnprintf(t->p + t->len, room, fmt, ap) : -1;
        va_end(ap);
        if (t->p && n >= 0 && (size_t)n < room) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap * 2 : 65536;
        char *p = realloc(t->p, cap);
        if (!p) {
            t->oom = 1;
            return;
        }
        t->p = p;
        t->cap = cap;
    }
}

static void tb_bytes(text_buf *t, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        tb_printf(t, "%s0x%02x,", i % 16 == 0 ? "\n    " : " ", p[i]);
    tb_printf(t, "\n");
}

/* Write p[0..n) to path unless the file already holds exactly these bytes. */
static kd_status write_if_changed(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (f) {
        int same = 1;
        const uint8_t *q = p;
        for (size_t i = 0; i < n && same; i++)
            same = fgetc(f) == q[i];
        same = same && fgetc(f) == EOF;
        fclose(f);
        if (same)
            return KD_OK;
    }
    f = fopen(path, "wb");
    if (!f)
        return KD_FAIL(KD_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    size_t w = fwrite(p, 1, n, f);
    if (fclose(f) != 0 || w != n)
        return KD_FAIL(KD_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return KD_OK;
}

static kd_status write_text(const char *path, text_buf *t)
{
    if (t->oom)
        return KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    return write_if_changed(path, t->p, t->len);
}

/* ---- export: the tiny student ------------------------------------------------------------- */

static kd_status build_tiny(gen_model *g, int wbits)
{
    int t = add_tensor(g, 1, 28, 28, -128, 1.0f / 255.0f); /* pixels 0..1 */
    KD_TRY(add_conv(g, KDM_OP_CONV2D, t, 24, 3, 3, 2, 1, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, t, 0, 3, 3, 1, 1, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_CONV2D, t, 32, 1, 1, 1, 0, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, t, 0, 3, 3, 2, 1, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_CONV2D, t, 64, 1, 1, 1, 0, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, t, 0, 3, 3, 1, 1, wbits, 1, &t));
    KD_TRY(add_conv(g, KDM_OP_CONV2D, t, 128, 1, 1, 1, 0, wbits, 1, &t));
    t = add_pool(g, KDM_OP_GLOBAL_AVGPOOL, t, 0, 0, 0);
    return add_fc(g, t, 10, wbits, 0, &t);
}

/* An image-like input: a few soft blobs on a dark background, quantized with zp -128. */
static void tiny_input(gen_model *g, int8_t *x)
{
    double cy[3], cx[3], r2[3], a[3];
    for (int j = 0; j < 3; j++) {
        cy[j] = rnd_range(g, 4, 24);
        cx[j] = rnd_range(g, 4, 24);
        r2[j] = rnd_range(g, 4, 40);
        a[j] = rnd_range(g, 0.3, 1.0);
    }
    for (int y = 0; y < 28; y++)
        for (int xx = 0; xx < 28; xx++) {
            double v = 0.03 * kd_rng_uniform(&g->rng);
            for (int j = 0; j < 3; j++)
                v += a[j] * exp(-((y - cy[j]) * (y - cy[j]) + (xx - cx[j]) * (xx - cx[j])) / r2[j]);
            long q = lround(v * 255.0) - 128;
            x[y * 28 + xx] = (int8_t)(q > 127 ? 127 : q);
        }
}

static kd_status cmd_export(const char *dir, int wbits, int n, uint64_t seed)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return KD_FAIL(KD_ERR_IO, "cannot create %s: %s", dir, strerror(errno));
    gen_model g = {0};
    kd_rng_seed(&g.rng, seed, (uint64_t)wbits);
    KD_TRY(kdm_builder_new(&g.b));
    uint8_t *blob = NULL;
    size_t len = 0;
    uint32_t arena = 0;
    kd_status st = build_tiny(&g, wbits);
    if (st == KD_OK)
        st = gen_finish(&g, PLAN_PINGPONG, 0, &blob, &len, &arena);
    kdm_builder_free(g.b);
    if (st != KD_OK)
        return st;

    uint32_t mask = 0;
    for (int i = 0; i < g.nops; i++)
        mask |= KDM_OP_BIT(g.op[i][0]);
    const uint32_t in_size = 28 * 28, out_size = 10;
    size_t rec = in_size + 4 + out_size;
    int8_t *in = malloc((size_t)n * in_size + 1), *out = malloc((size_t)n * out_size + 1);
    uint8_t *bin = malloc(16 + (size_t)n * rec);
    text_buf c = {0}, h = {0};
    char path[4096];
    st = in && out && bin ? KD_OK : KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
    for (int i = 0; st == KD_OK && i < n; i++)
        tiny_input(&g, in + (size_t)i * in_size);
    if (st == KD_OK)
        st = host_run(blob, len, in, out, n);
    if (st == KD_OK) {
        memcpy(bin, "KDMS", 4);
        put_le32(bin + 4, (uint32_t)n);
        put_le32(bin + 8, in_size);
        put_le32(bin + 12, out_size);
        for (int i = 0; i < n; i++) {
            uint8_t *r = bin + 16 + (size_t)i * rec;
            memcpy(r, in + (size_t)i * in_size, in_size);
            put_le32(r + in_size, (uint32_t)rnd_int(&g, 0, 9));
            memcpy(r + in_size + 4, out + (size_t)i * out_size, out_size);
        }
        snprintf(path, sizeof path, "%s/samples.bin", dir);
        st = write_if_changed(path, bin, 16 + (size_t)n * rec);
    }
    if (st == KD_OK) {
        tb_printf(
            &h,
            "/* model.h - random-weight tiny student, int%d (kdm_random_model, seed %llu) */\n"
            "#ifndef KDM_MODEL_H\n#define KDM_MODEL_H\n\n#include <stdint.h>\n\n"
            "#define KDM_MODEL_ARENA_SIZE %uu\n#define KDM_MODEL_OP_MASK 0x%08Xu\n"
            "#define KDM_MODEL_WBITS_MASK 0x%Xu\n\n"
            "extern const uint8_t kdm_model_blob[];\nextern const uint32_t "
            "kdm_model_blob_len;\n\n#endif\n",
            wbits, (unsigned long long)seed, arena, mask, wbits == 4 ? 0x10u : 0x100u);
        tb_printf(
            &c,
            "/* model.c - random-weight tiny student, int%d (kdm_random_model, seed %llu) */\n"
            "#include \"model.h\"\n\n"
            "const uint8_t kdm_model_blob[] __attribute__((aligned(4))) = {",
            wbits, (unsigned long long)seed);
        tb_bytes(&c, blob, len);
        tb_printf(&c, "};\nconst uint32_t kdm_model_blob_len = %zuu;\n", len);
        snprintf(path, sizeof path, "%s/model.h", dir);
        st = write_text(path, &h);
    }
    if (st == KD_OK) {
        snprintf(path, sizeof path, "%s/model.c", dir);
        st = write_text(path, &c);
    }
    free(c.p);
    free(h.p);
    free(in);
    free(out);
    free(bin);
    free(blob);
    return st;
}

/* ---- kcheck: randomized shapes ------------------------------------------------------------ */

static const int kc_channels[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 40};
#define KC_NCH ((int)(sizeof kc_channels / sizeof kc_channels[0]))

/* One random case; returns its input tensor's size through the model (tensor 0). */
static kd_status build_case(gen_model *g, int kind)
{
    int wbits = rnd_int(g, 0, 1) ? 8 : 4, act = rnd_int(g, 0, 3);
    int c = kc_channels[rnd_int(g, 0, KC_NCH - 1)];
    int h = rnd_int(g, 1, 12), w = rnd_int(g, 1, 12);
    int t, k, kw, s, p;
    switch (kind) {
    case 0: /* conv: square or 1xk / kx1 kernels, padding up to k/2 (2x2 kernels make K a multiple
               of 8 with an in_c that is not, which the INT4 assembly channel loop then takes) */
        k = (int[]){1, 2, 3, 5}[rnd_int(g, 0, 3)];
        kw = rnd_int(g, 0, 3) == 0 ? (k == 1 ? 3 : 1) : k;
        if (rnd_int(g, 0, 3) == 0) /* a first layer: one or three input channels */
            c = rnd_int(g, 0, 1) ? 1 : 3;
        s = rnd_int(g, 1, 2);
        p = rnd_int(g, 0, (k < kw ? k : kw) / 2);
        h = h + k - 1;
        w = w + kw - 1;
        t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
        KD_TRY(add_conv(g, KDM_OP_CONV2D, t, rnd_int(g, 1, 20), k, kw, s, p, wbits, act, &t));
        snprintf(g->desc, sizeof g->desc, "conv2d_s%d %dx%dx%d k%dx%d s%d p%d ->%d", wbits, c, h, w,
                 k, kw, s, p, g->t[t].c);
        return KD_OK;
    case 1: /* depthwise: any channel count up to 70, padding up to k - 1 */
        c = rnd_int(g, 1, 70);
        k = rnd_int(g, 0, 3) == 0 ? 5 : 3;
        s = rnd_int(g, 1, 2);
        p = rnd_int(g, 0, 3) == 0 ? rnd_int(g, 0, k - 1) : rnd_int(g, 0, k / 2);
        h = h + k - 1;
        w = w + k - 1;
        t = add_tensor(g, c, h, w, rnd_int(g, -128, 127), 0.05f); /* any padding value */
        KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, t, 0, k, k, s, p, wbits, act, &t));
        snprintf(g->desc, sizeof g->desc, "dwconv_s%d %dx%dx%d k%d s%d p%d", wbits, c, h, w, k, s,
                 p);
        return KD_OK;
    case 2: { /* fully-connected over a whole feature map */
        h = rnd_int(g, 1, 4);
        w = rnd_int(g, 1, 4);
        int out_c = rnd_int(g, 1, 40);
        t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
        KD_TRY(add_fc(g, t, out_c, wbits, act, &t));
        snprintf(g->desc, sizeof g->desc, "fc_s%d %d->%d", wbits, c * h * w, out_c);
        return KD_OK;
    }
    case 3: /* pools; every other global average pool is over more than 256 pixels, where the
               Cortex-M4 kernel no longer sums four channels in 16-bit lanes */
        k = rnd_int(g, 2, 3);
        s = rnd_int(g, 1, 2);
        h = h + k;
        w = w + k;
        if (rnd_int(g, 0, 2) == 0) {
            static int n_gap; /* the cases are made one after another */
            if (n_gap++ & 1) {
                h = rnd_int(g, 12, 24);
                w = rnd_int(g, 17, 24);
            }
            t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
            t = add_pool(g, KDM_OP_GLOBAL_AVGPOOL, t, 0, 0, 0);
            snprintf(g->desc, sizeof g->desc, "gap %dx%dx%d", c, h, w);
            return KD_OK;
        }
        t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
        if (rnd_int(g, 0, 1)) {
            p = rnd_int(g, 0, k - 1 < 1 ? 0 : 1);
            t = add_pool(g, KDM_OP_MAXPOOL2D, t, k, s, p);
            snprintf(g->desc, sizeof g->desc, "maxpool %dx%dx%d k%d s%d p%d", c, h, w, k, s, p);
        } else {
            t = add_pool(g, KDM_OP_AVGPOOL2D, t, k, s, 0);
            snprintf(g->desc, sizeof g->desc, "avgpool %dx%dx%d k%d s%d", c, h, w, k, s);
        }
        return KD_OK;
    case 4: { /* residual: x + dwconv3x3(x) */
        int x = add_tensor(g, c, h, w, rnd_int(g, -30, 30), (float)rnd_range(g, 0.02, 0.2));
        KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, x, 0, 3, 3, 1, 1, wbits, act, &t));
        KD_TRY(add_add(g, x, t, rnd_int(g, 0, 1), &t));
        snprintf(g->desc, sizeof g->desc, "dw+add_s%d %dx%dx%d", wbits, c, h, w);
        return KD_OK;
    }
    case 5: { /* pointwise: 1x1, in_c a multiple of 8 (the Cortex-M4's assembly channel loop) */
        c = 8 * rnd_int(g, 1, 8);
        s = rnd_int(g, 0, 3) == 0 ? 2 : 1;
        t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
        KD_TRY(add_conv(g, KDM_OP_CONV2D, t, rnd_int(g, 1, 33), 1, 1, s, 0, wbits, act, &t));
        snprintf(g->desc, sizeof g->desc, "pw_s%d %dx%dx%d s%d ->%d", wbits, c, h, w, s, g->t[t].c);
        return KD_OK;
    }
    case 6: { /* a first layer: one input channel, 3x3 (the Cortex-M4 stages whole window rows
               where they lie inside the input), with an even out_c, rows and requantization as
               the exporter writes them, for its assembly channel loops; int8 and int4 weights
               by turns */
        static int n_first; /* the cases are made one after another */
        wbits = n_first++ & 1 ? 4 : 8;
        s = rnd_int(g, 1, 2);
        p = rnd_int(g, 0, 1);
        h += 2;
        w += 2;
        t = add_tensor(g, 1, h, w, rnd_int(g, -30, 30), 0.05f);
        g->kcheck = 0;
        KD_TRY(add_conv(g, KDM_OP_CONV2D, t, 2 * rnd_int(g, 1, 12), 3, 3, s, p, wbits, act, &t));
        g->kcheck = 1;
        snprintf(g->desc, sizeof g->desc, "conv2d_s%d 1x%dx%d k3x3 s%d p%d ->%d", wbits, h, w, s, p,
                 g->t[t].c);
        return KD_OK;
    }
    default: { /* a short network: conv, depthwise, pointwise, pool, FC, softmax */
        int c2 = kc_channels[rnd_int(g, 0, KC_NCH - 1)];
        h += 2;
        w += 2;
        t = add_tensor(g, c, h, w, rnd_int(g, -30, 30), 0.05f);
        KD_TRY(add_conv(g, KDM_OP_CONV2D, t, c2, 3, 3, 1, 1, wbits, 1, &t));
        KD_TRY(add_conv(g, KDM_OP_DEPTHWISE_CONV2D, t, 0, 3, 3, 2, 1, wbits, 1, &t));
        KD_TRY(add_conv(g, KDM_OP_CONV2D, t, rnd_int(g, 1, 24), 1, 1, 1, 0, wbits, 1, &t));
        t = add_pool(g, KDM_OP_GLOBAL_AVGPOOL, t, 0, 0, 0);
        KD_TRY(add_fc(g, t, rnd_int(g, 2, 12), wbits, 0, &t));
        KD_TRY(add_softmax(g, t, &t));
        snprintf(g->desc, sizeof g->desc, "net_s%d %dx%dx%d c%d", wbits, c, h, w, c2);
        return KD_OK;
    }
    }
}

static kd_status cmd_kcheck(const char *path, int n, uint64_t seed, int rounding)
{
    text_buf c = {0}, cases = {0};
    uint32_t arena_max = 4;
    kd_status st = KD_OK;
    /* the runtime's KDM_ROUNDING_MASK for these cases, read by bench/mcu/run.sh kcheck */
    tb_printf(&c,
              "/* kernel-check cases: %d random models (kdm_random_model, seed %llu) */\n"
              "/* kcheck-rounding-mask 0x%x */\n"
              "#include \"kernel_check.h\"\n",
              n, (unsigned long long)seed,
              rounding == 2 ? 3u
              : rounding    ? 2u
                            : 1u);
    for (int i = 0; i < n && st == KD_OK; i++) {
        gen_model g = {0};
        g.kcheck = 1;
        kd_rng_seed(&g.rng, seed, 1000u + (uint64_t)i);
        st = kdm_builder_new(&g.b);
        if (st != KD_OK)
            break;
        uint8_t *blob = NULL;
        size_t len = 0;
        uint32_t arena = 0;
        /* the first cases walk every kind once, the rest draw it; flags: the rounding asked
         * for, both alternately by default */
        st = build_case(&g, i < 8 ? i : rnd_int(&g, 0, 7));
        if (st == KD_OK)
            st = gen_finish(&g, PLAN_DISTINCT,
                            (uint32_t)(rounding == 2 ? i & 1 : rounding) * KDM_FLAG_SINGLE_ROUNDING,
                            &blob, &len, &arena);
        kdm_builder_free(g.b);
        const gen_tensor *ti = &g.t[0], *to = &g.t[g.nt - 1];
        size_t in_size = (size_t)ti->c * ti->h * ti->w, out_size = (size_t)to->c * to->h * to->w;
        int8_t *in = malloc(in_size), *out = malloc(out_size);
        if (st == KD_OK && (!in || !out))
            st = KD_FAIL(KD_ERR_NOMEM, "random model: out of memory");
        for (size_t j = 0; st == KD_OK && j < in_size; j++)
            in[j] = (int8_t)rnd_int(&g, -128, 127);
        if (st == KD_OK)
            st = host_run(blob, len, in, out, 1);
        if (st != KD_OK)
            kd_fail_context(st, "case %d (%s): ", i, g.desc);
        if (st == KD_OK) {
            if (arena > arena_max)
                arena_max = arena;
            tb_printf(&c, "\nstatic const uint8_t blob_%d[] __attribute__((aligned(4))) = {", i);
            tb_bytes(&c, blob, len);
            tb_printf(&c, "};\nstatic const int8_t in_%d[] = {", i);
            tb_bytes(&c, (const uint8_t *)in, in_size);
            tb_printf(&c, "};\nstatic const int8_t out_%d[] = {", i);
            tb_bytes(&c, (const uint8_t *)out, out_size);
            tb_printf(&c, "};\n");
            tb_printf(&cases, "    {blob_%d, %zuu, in_%d, out_%d, %zuu, %zuu, \"%s\"},\n", i, len,
                      i, i, in_size, out_size, g.desc);
        }
        free(in);
        free(out);
        free(blob);
    }
    if (st == KD_OK) {
        tb_printf(&c, "\nconst kc_case kc_cases[] = {\n%s};\nconst uint32_t kc_n_cases = %du;\n",
                  cases.p ? cases.p : "", n);
        tb_printf(&c,
                  "uint8_t kc_arena[%u] __attribute__((aligned(8)));\n"
                  "const uint32_t kc_arena_size = %uu;\n",
                  arena_max, arena_max);
        st = write_text(path, &c);
    }
    free(c.p);
    free(cases.p);
    return st;
}

/* ---- command line ------------------------------------------------------------------------- */

static int usage(void)
{
    fprintf(stderr, "usage: kdm_random_model export --quant int8|int4 [--samples N] [--seed S] "
                    "--out DIR\n"
                    "       kdm_random_model kcheck [--cases N] [--seed S] "
                    "[--rounding double|single|both] --out FILE.c\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    const char *out = NULL, *quant = "int8";
    int n = -1, rounding = 2; /* kcheck: 0 double, 1 single, 2 both */
    unsigned long long seed = 1;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--out"))
            out = argv[i + 1];
        else if (!strcmp(argv[i], "--quant"))
            quant = argv[i + 1];
        else if (!strcmp(argv[i], "--samples") || !strcmp(argv[i], "--cases"))
            n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--rounding") && !strcmp(argv[i + 1], "double"))
            rounding = 0;
        else if (!strcmp(argv[i], "--rounding") && !strcmp(argv[i + 1], "single"))
            rounding = 1;
        else if (!strcmp(argv[i], "--rounding") && !strcmp(argv[i + 1], "both"))
            rounding = 2;
        else
            return usage();
    }
    if (!out || (argc % 2) != 0)
        return usage();
    kd_status st;
    if (!strcmp(argv[1], "export")) {
        int wbits = !strcmp(quant, "int8") ? 8 : !strcmp(quant, "int4") ? 4 : 0;
        if (wbits == 0)
            return usage();
        st = cmd_export(out, wbits, n < 0 ? 16 : n, seed);
    } else if (!strcmp(argv[1], "kcheck")) {
        st = cmd_kcheck(out, n < 0 ? 64 : n, seed, rounding);
    } else {
        return usage();
    }
    if (st != KD_OK) {
        fprintf(stderr, "kdm_random_model: %s\n", kd_last_error());
        return 1;
    }
    return 0;
}
