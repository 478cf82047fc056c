/*
 * test_kdm_kernels.c - the runtime's kernels (mcu_runtime/src/kdm_kernels.h) on the host.
 *
 * 1. Reference vs DSP kernels, bit for bit, on randomized shapes and parameters: conv s8 / s4
 *    (1x1 with and without padding or stride, 3x3 stride 1 / 2 pad 0 / 1, 5x5, 1x3, 3x1, odd
 *    channel counts, K not a multiple of 4 or 8), depthwise s8 / s4, fully-connected s8 / s4,
 *    with both roundings. The DSP kernels run on their portable emulation of the DSP
 *    instructions (kdm_dsp.h), the same C the Cortex-M build compiles with the instructions.
 *    Weight row padding is filled with random bytes (it must never be read as a weight), the
 *    scratch area is exactly kdm_op_scratch_size bytes followed by a canary, and the output
 *    buffers carry guard bytes. All three also against the kernels for cores without DSP
 *    (matmul_fast.c, here their C loop, and depthwise_fast.c).
 * 2. Each reference kernel against a straightforward int64 computation written here (with the
 *    public kdm_requantize), on cases small enough that no accumulator wraps.
 * 3. kdm_requantize against hand-derived TFLite values (ties, negative numbers, saturation).
 * 4. ADD, max / average / global pools and softmax against independent computations.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdm.h"
#include "kdm_dsp.h"
#include "kdm_kernels.h"

#define GUARD      16
#define GUARD_BYTE 0x5A
#define CANARY     0xC3

/* ---- deterministic random numbers ------------------------------------------------------------ */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* uniform in [lo, hi] */
static int32_t rnd_in(int32_t lo, int32_t hi)
{
    return lo + (int32_t)(rnd() % (uint32_t)(hi - lo + 1));
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

/* ---- one weighted-op case ---------------------------------------------------------------------
 */

enum { K_CONV, K_DW, K_FC };

typedef struct {
    int kind, wbits;
    kdm_conv_params c; /* conv / depthwise geometry; FC uses fc below */
    kdm_fc_params fc;
    int32_t rows, row_len; /* weight rows and values per row */
    int8_t *in;
    uint8_t *w; /* packed blob layout with random row padding */
    int8_t *wv; /* the same weights unpacked, rows x row_len */
    int32_t *bias, *mult;
    int8_t *shift;
    kdm_requant_params q;
    int32_t n_in, n_out; /* input / output element counts */
} wcase;

static int32_t packed_len(int wbits, int32_t n) { return wbits == 8 ? n : (n + 1) / 2; }

/* Fill the case's arrays: weights over the full int8 / int4 range (int4: -8 .. 7, the decoder's
 * whole range), inputs over int8, requantization that keeps outputs spread. */
static void wcase_fill(wcase *t, uint32_t flags)
{
    int32_t packed = packed_len(t->wbits, t->row_len);
    int32_t stride = ((packed + 3) & ~3) + 4 * rnd_in(0, 1);
    int32_t out_c = t->kind == K_FC ? t->fc.n_out : t->c.out_c;
    if (t->kind == K_FC)
        t->fc.row_stride = stride;
    else
        t->c.row_stride = stride;
    t->in = xmalloc((size_t)t->n_in);
    for (int32_t i = 0; i < t->n_in; i++)
        t->in[i] = (int8_t)rnd_in(-128, 127);
    t->w = xmalloc((size_t)t->rows * stride);
    t->wv = xmalloc((size_t)t->rows * t->row_len);
    for (int32_t i = 0; i < t->rows * stride; i++)
        t->w[i] = (uint8_t)rnd(); /* padding keeps these random bytes */
    for (int32_t r = 0; r < t->rows; r++) {
        uint8_t *row = t->w + (size_t)r * stride;
        if (t->wbits == 4 && (t->row_len & 1))
            row[t->row_len / 2] = (uint8_t)(row[t->row_len / 2] & 0xF0u); /* pad nibble random */
        for (int32_t i = 0; i < t->row_len; i++) {
            int8_t v = (int8_t)(t->wbits == 8 ? rnd_in(-127, 127) : rnd_in(-8, 7));
            t->wv[(size_t)r * t->row_len + i] = v;
            if (t->wbits == 8)
                row[i] = (uint8_t)v;
            else if (i & 1)
                row[i / 2] = (uint8_t)((row[i / 2] & 0x0Fu) | ((uint8_t)v << 4));
            else
                row[i / 2] = (uint8_t)((row[i / 2] & 0xF0u) | ((uint8_t)v & 0x0Fu));
        }
    }
    int32_t k = t->kind == K_CONV ? t->c.kernel_h * t->c.kernel_w * t->c.in_c
                : t->kind == K_DW ? t->c.kernel_h * t->c.kernel_w
                                  : t->fc.n_in;
    /* accumulator spread ~ sqrt(k) * 128 * wmax / 2: aim the output at a few dozen steps */
    int32_t spread_log2 = 7 + (t->wbits == 8 ? 6 : 2);
    for (int32_t kk = k; kk > 1; kk >>= 2)
        spread_log2++;
    t->bias = xmalloc(sizeof(int32_t) * (size_t)out_c);
    t->mult = xmalloc(sizeof(int32_t) * (size_t)out_c);
    t->shift = xmalloc(sizeof(int8_t) * (size_t)out_c);
    for (int32_t o = 0; o < out_c; o++) {
        t->bias[o] = rnd_in(-(1 << spread_log2), 1 << spread_log2);
        t->mult[o] = rnd_in(0, 9) == 0 ? 0 : (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu));
        t->shift[o] = (int8_t)(-(spread_log2 - 5) + rnd_in(-2, 2));
    }
    t->mult[0] = 0x7FFFFFFF; /* the largest multiplier */
    /* clamps: none, a ReLU at the zero-point, or a narrower band */
    int32_t zp = rnd_in(-20, 20), lo = rnd_in(0, 3) == 0 ? zp : rnd_in(-128, -60);
    int32_t hi = rnd_in(60, 127);
    kdm_requant_params q = {t->bias, t->mult, t->shift, zp, lo, hi, flags};
    t->q = q;
}

static void wcase_free(wcase *t)
{
    free(t->in);
    free(t->w);
    free(t->wv);
    free(t->bias);
    free(t->mult);
    free(t->shift);
}

/* A random conv / depthwise geometry; 1x1 kernels are pad 0 half of the time, and one case in
 * eight pads by at least the kernel's smaller side. */
static void random_geometry(wcase *t, int kind, int wbits)
{
    static const int32_t channels[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 40};
    static const int32_t kernels[][2] = {{1, 1}, {3, 3}, {3, 3}, {5, 5}, {1, 3}, {3, 1}, {2, 2}};
    memset(t, 0, sizeof *t);
    t->kind = kind;
    t->wbits = wbits;
    kdm_conv_params *c = &t->c;
    const int32_t *k = kernels[rnd_in(0, 6)];
    c->kernel_h = k[0];
    c->kernel_w = k[1];
    c->stride = rnd_in(1, 2);
    int32_t kmin = k[0] < k[1] ? k[0] : k[1];
    c->pad = k[0] == 1 && k[1] == 1 ? rnd_in(0, 2) / 2 : rnd_in(0, kmin / 2);
    if (rnd_in(0, 7) == 0) /* padding as wide as the kernel: windows wholly in the padding */
        c->pad = rnd_in(kmin, kmin + 2);
    c->in_c = kind == K_DW ? rnd_in(1, 70) : channels[rnd_in(0, 16)];
    c->in_h = rnd_in(k[0], k[0] + 8);
    c->in_w = rnd_in(k[1], k[1] + 8);
    c->out_c = kind == K_DW ? c->in_c : rnd_in(1, 21);
    c->out_h = (c->in_h + 2 * c->pad - c->kernel_h) / c->stride + 1;
    c->out_w = (c->in_w + 2 * c->pad - c->kernel_w) / c->stride + 1;
    c->in_zp = rnd_in(-128, 127);
    t->rows = kind == K_DW ? c->kernel_h * c->kernel_w : c->out_c;
    t->row_len = kind == K_DW ? c->in_c : c->kernel_h * c->kernel_w * c->in_c;
    t->n_in = c->in_c * c->in_h * c->in_w;
    t->n_out = c->out_c * c->out_h * c->out_w;
}

static void random_fc(wcase *t, int wbits, int32_t n_in, int32_t n_out)
{
    memset(t, 0, sizeof *t);
    t->kind = K_FC;
    t->wbits = wbits;
    t->fc.n_in = n_in;
    t->fc.n_out = n_out;
    t->rows = n_out;
    t->row_len = n_in;
    t->n_in = n_in;
    t->n_out = n_out;
}

/* The op record kdm_op_scratch_size sees for this case. */
static uint32_t case_scratch(const wcase *t)
{
    int32_t op[KDM_OP_WORDS] = {0};
    op[0] = t->kind == K_CONV ? KDM_OP_CONV2D
            : t->kind == K_DW ? KDM_OP_DEPTHWISE_CONV2D
                              : KDM_OP_FULLY_CONNECTED;
    op[4] = t->c.kernel_h;
    op[5] = t->c.kernel_w;
    op[6] = t->c.stride;
    op[7] = t->c.pad;
    op[8] = t->wbits;
    if (t->kind == K_FC)
        return kdm_op_scratch_size(op, (uint32_t)t->fc.n_in, 1, 1);
    return kdm_op_scratch_size(op, (uint32_t)t->c.in_c, (uint32_t)t->c.in_h, (uint32_t)t->c.in_w);
}

/* The implementations of each kernel, by impl (0: reference, 1: DSP, 2: the kernels for cores
 * without DSP); conv and depthwise share a signature. */
typedef void (*conv_s8_fn)(const kdm_conv_params *, const kdm_requant_params *, const int8_t *,
                           const int8_t *, int8_t *, void *);
typedef void (*conv_s4_fn)(const kdm_conv_params *, const kdm_requant_params *, const int8_t *,
                           const uint8_t *, int8_t *, void *);
typedef void (*fc_s8_fn)(const kdm_fc_params *, const kdm_requant_params *, const int8_t *,
                         const int8_t *, int8_t *, void *);
typedef void (*fc_s4_fn)(const kdm_fc_params *, const kdm_requant_params *, const int8_t *,
                         const uint8_t *, int8_t *, void *);
static const conv_s8_fn conv_s8[2][3] = {
    {kdm_conv2d_s8_ref, kdm_conv2d_s8_dsp, kdm_conv2d_s8_fast},
    {kdm_depthwise_s8_ref, kdm_depthwise_s8_dsp, kdm_depthwise_s8_fast}};
static const conv_s4_fn conv_s4[2][3] = {
    {kdm_conv2d_s4_ref, kdm_conv2d_s4_dsp, kdm_conv2d_s4_fast},
    {kdm_depthwise_s4_ref, kdm_depthwise_s4_dsp, kdm_depthwise_s4_fast}};
static const fc_s8_fn fc_s8[3] = {kdm_fully_connected_s8_ref, kdm_fully_connected_s8_dsp,
                                  kdm_fully_connected_s8_fast};
static const fc_s4_fn fc_s4[3] = {kdm_fully_connected_s4_ref, kdm_fully_connected_s4_dsp,
                                  kdm_fully_connected_s4_fast};

/* Run one implementation (impl as above) into out (n_out + guard bytes). */
static void run_impl(const wcase *t, int impl, int8_t *out)
{
    uint32_t ssize = case_scratch(t);
    uint8_t *scratch = xmalloc(ssize + 4);
    memset(scratch, CANARY, ssize + 4);
    memset(out, GUARD_BYTE, (size_t)t->n_out + GUARD);
    const int8_t *w8 = (const int8_t *)t->w;
    const uint8_t *w4 = t->w;
    const int dw = t->kind == K_DW;
    if (t->kind == K_FC && t->wbits == 8)
        fc_s8[impl](&t->fc, &t->q, t->in, w8, out, scratch);
    else if (t->kind == K_FC)
        fc_s4[impl](&t->fc, &t->q, t->in, w4, out, scratch);
    else if (t->wbits == 8)
        conv_s8[dw][impl](&t->c, &t->q, t->in, w8, out, scratch);
    else
        conv_s4[dw][impl](&t->c, &t->q, t->in, w4, out, scratch);
    for (uint32_t i = ssize; i < ssize + 4; i++)
        assert_int_equal(scratch[i], CANARY); /* no write past kdm_op_scratch_size */
    for (int32_t i = 0; i < GUARD; i++)
        assert_int_equal((uint8_t)out[t->n_out + i], GUARD_BYTE);
    free(scratch);
}

static const char *kind_name(int kind)
{
    return kind == K_CONV ? "conv" : kind == K_DW ? "depthwise" : "fc";
}

/* Reference, DSP and no-DSP outputs equal; returns how many distinct output values
 * were seen (a case whose outputs are all clamped to one value would prove little). */
static int check_ref_vs_dsp(const wcase *t)
{
    static const char *const impl_name[] = {"reference", "dsp", "fast"};
    int8_t *a = xmalloc((size_t)t->n_out + GUARD), *b = xmalloc((size_t)t->n_out + GUARD);
    run_impl(t, 0, a);
    for (int impl = 1; impl <= 2; impl++) {
        run_impl(t, impl, b);
        for (int32_t i = 0; i < t->n_out; i++) {
            if (a[i] != b[i])
                fail_msg("%s s%d: output %d: reference %d, %s %d (in %dx%dx%d k %dx%d s%d p%d "
                         "out_c %d, fc %d->%d, flags %u)",
                         kind_name(t->kind), t->wbits, i, a[i], impl_name[impl], b[i], t->c.in_c,
                         t->c.in_h, t->c.in_w, t->c.kernel_h, t->c.kernel_w, t->c.stride, t->c.pad,
                         t->c.out_c, t->fc.n_in, t->fc.n_out, t->q.flags);
        }
    }
    int seen[256] = {0}, distinct = 0;
    for (int32_t i = 0; i < t->n_out; i++)
        distinct += !seen[a[i] + 128]++;
    free(a);
    free(b);
    return distinct;
}

static void test_ref_vs_dsp(void **state)
{
    int distinct_total = 0, cases = 0;
    for (int rep = 0; rep < 400; rep++) {
        for (int kind = K_CONV; kind <= K_FC; kind++) {
            for (int wbits = 8; wbits >= 4; wbits -= 4) {
                wcase t;
                if (kind == K_FC)
                    random_fc(&t, wbits, rnd_in(0, 3) ? rnd_in(1, 80) : rnd_in(80, 700),
                              rnd_in(1, 21));
                else
                    random_geometry(&t, kind, wbits);
                wcase_fill(&t, (uint32_t)(rep & 1) * KDM_FLAG_SINGLE_ROUNDING);
                distinct_total += check_ref_vs_dsp(&t) > 3;
                cases++;
                wcase_free(&t);
            }
        }
    }
    /* most cases must produce varied outputs, or equality would be vacuous */
    assert_true(distinct_total > cases * 3 / 4);
}

/* Shapes the speed paths care about, each at both weight widths: 1x1 pointwise with in_c a
 * multiple of 4 and 8, 3x3 with the staged fast path, stride 2, wide FC with every tail. */
static void test_ref_vs_dsp_fast_paths(void **state)
{
    static const int32_t conv[][8] = {
        /* in_c, h, w, out_c, k, stride, pad */
        {16, 6, 7, 16, 1, 1, 0}, {32, 5, 5, 9, 1, 2, 0},  {24, 4, 4, 7, 1, 1, 1},
        {16, 7, 6, 16, 3, 1, 1}, {32, 8, 8, 5, 3, 2, 1},  {8, 5, 9, 3, 3, 1, 0},
        {40, 3, 3, 2, 3, 1, 1},  {64, 2, 3, 17, 1, 1, 0},
    };
    for (size_t i = 0; i < sizeof conv / sizeof conv[0]; i++) {
        for (int wbits = 8; wbits >= 4; wbits -= 4) {
            wcase t;
            memset(&t, 0, sizeof t);
            t.kind = K_CONV;
            t.wbits = wbits;
            kdm_conv_params *c = &t.c;
            c->in_c = conv[i][0];
            c->in_h = conv[i][1];
            c->in_w = conv[i][2];
            c->out_c = conv[i][3];
            c->kernel_h = c->kernel_w = conv[i][4];
            c->stride = conv[i][5];
            c->pad = conv[i][6];
            c->out_h = (c->in_h + 2 * c->pad - c->kernel_h) / c->stride + 1;
            c->out_w = (c->in_w + 2 * c->pad - c->kernel_w) / c->stride + 1;
            c->in_zp = -7;
            t.rows = c->out_c;
            t.row_len = c->kernel_h * c->kernel_w * c->in_c;
            t.n_in = c->in_c * c->in_h * c->in_w;
            t.n_out = c->out_c * c->out_h * c->out_w;
            wcase_fill(&t, (uint32_t)i & 1);
            int distinct = check_ref_vs_dsp(&t);
            if (distinct <= 3)
                fail_msg("case %d s%d: %d distinct outputs", (int)i, wbits, distinct);
            wcase_free(&t);
        }
    }
    for (int32_t n_in = 1; n_in <= 70; n_in++) { /* every tail length of 4 and 8 */
        for (int wbits = 8; wbits >= 4; wbits -= 4) {
            wcase t;
            random_fc(&t, wbits, n_in, n_in % 5 + 1);
            wcase_fill(&t, 0);
            check_ref_vs_dsp(&t);
            wcase_free(&t);
        }
    }
}

/* ---- reference kernels against int64 loops written here ----------------------------------- */

static int8_t naive_out(const wcase *t, int32_t o, int64_t acc)
{
    assert_true(acc >= INT32_MIN && acc <= INT32_MAX); /* the cases are chosen not to wrap */
    int64_t v =
        (int64_t)t->q.out_zp + kdm_requantize((int32_t)acc, t->mult[o], t->shift[o], t->q.flags);
    v = v < t->q.act_min ? t->q.act_min : v > t->q.act_max ? t->q.act_max : v;
    return (int8_t)v;
}

static void naive_run(const wcase *t, int8_t *out)
{
    if (t->kind == K_FC) {
        for (int32_t o = 0; o < t->fc.n_out; o++) {
            int64_t acc = t->bias[o];
            for (int32_t i = 0; i < t->fc.n_in; i++)
                acc += (int64_t)t->wv[(size_t)o * t->row_len + i] * t->in[i];
            out[o] = naive_out(t, o, acc);
        }
        return;
    }
    const kdm_conv_params *c = &t->c;
    for (int32_t y = 0; y < c->out_h; y++)
        for (int32_t x = 0; x < c->out_w; x++)
            for (int32_t o = 0; o < c->out_c; o++) {
                int64_t acc = t->bias[o];
                for (int32_t ky = 0; ky < c->kernel_h; ky++)
                    for (int32_t kx = 0; kx < c->kernel_w; kx++) {
                        int32_t iy = y * c->stride - c->pad + ky, ix = x * c->stride - c->pad + kx;
                        int inside = iy >= 0 && iy < c->in_h && ix >= 0 && ix < c->in_w;
                        int32_t c0 = t->kind == K_DW ? o : 0,
                                c1 = t->kind == K_DW ? o + 1 : c->in_c;
                        for (int32_t ci = c0; ci < c1; ci++) {
                            int64_t xv =
                                inside ? t->in[(iy * c->in_w + ix) * c->in_c + ci] : c->in_zp;
                            int64_t wv =
                                t->kind == K_DW
                                    ? t->wv[(size_t)(ky * c->kernel_w + kx) * t->row_len + ci]
                                    : t->wv[(size_t)o * t->row_len +
                                            (ky * c->kernel_w + kx) * c->in_c + ci];
                            acc += wv * xv;
                        }
                    }
                out[(y * c->out_w + x) * c->out_c + o] = naive_out(t, o, acc);
            }
}

static void test_ref_vs_naive(void **state)
{
    int checked = 0;
    for (int rep = 0; rep < 60; rep++) {
        for (int kind = K_CONV; kind <= K_FC; kind++) {
            for (int wbits = 8; wbits >= 4; wbits -= 4) {
                wcase t;
                if (kind == K_FC)
                    random_fc(&t, wbits, rnd_in(1, 200), rnd_in(1, 12));
                else
                    random_geometry(&t, kind, wbits);
                wcase_fill(&t, (uint32_t)(rep & 1));
                int8_t *want = xmalloc((size_t)t.n_out), *got = xmalloc((size_t)t.n_out + GUARD);
                naive_run(&t, want);
                run_impl(&t, 0, got);
                assert_memory_equal(want, got, (size_t)t.n_out);
                checked += t.n_out;
                free(want);
                free(got);
                wcase_free(&t);
            }
        }
    }
    assert_true(checked > 1000);
}

/* ---- requantization -------------------------------------------------------------------------- */

static void test_requantize_tflite(void **state)
{
    const int32_t half = 1 << 30, one = 0x7FFFFFFF;
    /* doubling high multiply: round(x * m / 2^31), ties up (gemmlowp's nudge) */
    assert_int_equal(kdm_requantize(100, half, 0, 0), 50);
    assert_int_equal(kdm_requantize(3, half, 0, 0), 2);   /* 1.5 -> 2 */
    assert_int_equal(kdm_requantize(-3, half, 0, 0), -1); /* -1.5 -> -1 */
    assert_int_equal(kdm_requantize(1, half, 0, 0), 1);   /* 0.5 -> 1 */
    assert_int_equal(kdm_requantize(-1, half, 0, 0), 0);  /* -0.5 -> 0 */
    assert_int_equal(kdm_requantize(-5, half, 0, 0), -2); /* -2.5 -> -2 */
    /* rounding right shift: ties away from zero */
    assert_int_equal(kdm_requantize(5, one, -1, 0), 3);   /* 2.5 -> 3 */
    assert_int_equal(kdm_requantize(-5, one, -1, 0), -3); /* -2.5 -> -3 */
    assert_int_equal(kdm_requantize(-7, one, -2, 0), -2); /* -1.75 -> -2 */
    assert_int_equal(kdm_requantize(-5, one, -2, 0), -1); /* -1.25 -> -1 */
    assert_int_equal(kdm_requantize(-6, one, -2, 0), -2); /* -1.5 -> -2 */
    assert_int_equal(kdm_requantize(6, one, -2, 0), 2);   /* 1.5 -> 2 */
    assert_int_equal(kdm_requantize(-1, one, -31, 0), 0);
    assert_int_equal(kdm_requantize(INT32_MAX, one, -31, 0), 1);
    assert_int_equal(kdm_requantize(INT32_MIN, one, -31, 0), -1);
    /* two roundings in a row: 0.75 * 3 = 2.25 -> SRDHM(3, 0.75) = 2 (2.25) -> /2 = 1 (1.0);
     * a single rounding of 3 * 0.75 / 2 = 1.125 -> 1 as well, but 0.5 * 3 / 2 = 0.75 differs:
     * double: SRDHM(3, 0.5) = 2, 2 / 2 = 1; single: round(0.75) = 1; and 0.5 * 5 / 4 = 0.625:
     * double: SRDHM = 3 (2.5 up), 3 / 4 = 0.75 -> 1; single: round(0.625) = 1 */
    assert_int_equal(kdm_requantize(3, 3 << 29, -1, 0), 1);
    assert_int_equal(kdm_requantize(5, half, -2, 0), 1);
    assert_int_equal(kdm_requantize(5, half, -3, 0), 0);                        /* 0.375 -> 0 */
    assert_int_equal(kdm_requantize(9, half, -3, 0), 1);                        /* SRDHM 5, 5/8 */
    assert_int_equal(kdm_requantize(9, half, -3, KDM_FLAG_SINGLE_ROUNDING), 1); /* 0.5625 */
    assert_int_equal(kdm_requantize(7, half, -3, 0), 1);                        /* SRDHM 4, 4/8 */
    assert_int_equal(kdm_requantize(7, half, -3, KDM_FLAG_SINGLE_ROUNDING), 0); /* 0.4375 */
    /* left shifts: x * 2^shift first (wrapping like TFLite's int32 multiply) */
    assert_int_equal(kdm_requantize(10, half, 1, 0), 10);
    assert_int_equal(kdm_requantize(-10, half, 3, 0), -40);
    assert_int_equal(kdm_requantize(1 << 30, half, 1, 0), -(1 << 30)); /* 2^31 wraps */
    /* the one saturating product */
    assert_int_equal(kdm_requantize(INT32_MIN, INT32_MIN, 0, 0), INT32_MAX);
    assert_int_equal(kdm_requantize(INT32_MIN, INT32_MIN, -1, 0), 1 << 30);
    assert_int_equal(kdm_requantize(INT32_MAX, INT32_MIN, 0, 0), -INT32_MAX);
    /* zero multiplier */
    assert_int_equal(kdm_requantize(123456, 0, -5, 0), 0);
    /* single rounding: (x * m + 2^(30 - shift)) >> (31 - shift), saturated */
    assert_int_equal(kdm_requantize(3, half, 0, KDM_FLAG_SINGLE_ROUNDING), 2);
    assert_int_equal(kdm_requantize(-3, half, 0, KDM_FLAG_SINGLE_ROUNDING), -1);
    assert_int_equal(kdm_requantize(-5, one, -1, KDM_FLAG_SINGLE_ROUNDING), -2); /* ~-2.5 up */
    assert_int_equal(kdm_requantize(INT32_MAX, one, 30, KDM_FLAG_SINGLE_ROUNDING), INT32_MAX);
    assert_int_equal(kdm_requantize(INT32_MIN, one, 30, KDM_FLAG_SINGLE_ROUNDING), INT32_MIN);
}

/* Against a long-hand transcription of TFLite's reference on many random inputs. */
static int32_t tflite_mbqm(int32_t x, int32_t m, int32_t shift)
{
    int32_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    int32_t a = (int32_t)((uint32_t)x << left);
    int32_t h;
    if (a == INT32_MIN && m == INT32_MIN) {
        h = INT32_MAX;
    } else {
        int64_t ab = (int64_t)a * m;
        int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
        h = (int32_t)((ab + nudge) / ((int64_t)1 << 31));
    }
    int32_t mask = (int32_t)(((int64_t)1 << right) - 1);
    int32_t rem = h & mask, threshold = (mask >> 1) + (h < 0 ? 1 : 0);
    return (h >> right) + (rem > threshold ? 1 : 0);
}

static void test_requantize_random(void **state)
{
    /* negative multipliers (outside what a model carries) at extreme accumulators: the doubling
     * high multiply reaches INT32_MAX there (INT32_MIN * (INT32_MIN + 1)) */
    static const int32_t xe[] = {INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX},
                         me[] = {INT32_MIN, INT32_MIN + 1, -0x40000000, -1, 0x40000000, INT32_MAX};
    for (int a = 0; a < 7; a++)
        for (int b = 0; b < 6; b++)
            for (int32_t s = -31; s <= 30; s++)
                assert_int_equal(kdm_requantize(xe[a], me[b], s, 0), tflite_mbqm(xe[a], me[b], s));
    assert_int_equal(kdm_requantize(INT32_MIN, INT32_MIN + 1, -1, 0), 1 << 30);
    for (int i = 0; i < 200000; i++) {
        int32_t x = (int32_t)rnd();
        if (i & 1)
            x >>= rnd() % 31; /* small magnitudes too */
        int32_t m = i % 7 == 0 ? (int32_t)rnd() : (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu));
        int32_t s = rnd_in(-31, 30);
        assert_int_equal(kdm_requantize(x, m, s, 0), tflite_mbqm(x, m, s));
    }
}

/* The DSP kernels' inline single rounding (kdm_dsp.h, here its portable emulation) against a
 * direct int64 evaluation of round_half_up(x * m / 2^(31 - s)), saturated, plus zp, clamped to
 * int8: random and extreme x, multipliers 0 and [2^30, 2^31), every shift. */
static void test_requantize_single_fast(void **state)
{
    static const int32_t xs[] = {INT32_MIN, INT32_MIN + 1, -1,         0,
                                 1,         INT32_MAX,     0x40000000, -0x40000000};
    static const int32_t ms[] = {0, 0x40000000, 0x7FFFFFFF, 0x40000001, 0x5A82799A};
    for (int i = 0; i < 400000; i++) {
        int32_t x = i < 8 * 5 * 62 ? xs[i % 8] : (int32_t)rnd();
        if (i >= 8 * 5 * 62 && (i & 1))
            x >>= rnd() % 31;
        int32_t m = i < 8 * 5 * 62 ? ms[(i / 8) % 5]
                    : i % 7 == 0   ? 0
                                   : (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu));
        int32_t s = i < 8 * 5 * 62 ? -31 + (i / 40) % 62 : rnd_in(-31, 30);
        int32_t zp = rnd_in(-128, 127);
        int32_t total = 31 - s;
        int64_t r = ((int64_t)x * m + ((int64_t)1 << (total - 1))) >> total;
        r = r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : r;
        int64_t v = r + zp;
        int8_t want = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        assert_int_equal(kdm_requant_single_fast_(x, m, s, zp), want);
    }
}

/* ---- ops without weights --------------------------------------------------------------------- */

static int8_t clamp8(int64_t v, int32_t lo, int32_t hi)
{
    return (int8_t)(v < lo ? lo : v > hi ? hi : v);
}

/* Both ADD kernels against kdm_requantize, element by element: TFLite's usual parameters
 * (input shifts 0 .. -4, the larger scale's input at shift 0), and in a quarter of the cases a
 * multiplier of 0 or a left shift somewhere (the DSP kernel's portable fallback). */
static void test_add(void **state)
{
    for (int rep = 0; rep < 200; rep++) {
        kdm_add_params p = {rnd_in(-128, 127),
                            rnd_in(-128, 127),
                            rnd_in(-30, 30),
                            rnd_in(0, 1) ? 20 : rnd_in(0, 19),
                            (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu)),
                            rnd_in(-4, 0),
                            (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu)),
                            rnd_in(-4, 0),
                            (int32_t)(0x40000000u + (rnd() & 0x3FFFFFFFu)),
                            rnd_in(-22, -17),
                            -128,
                            127,
                            (uint32_t)(rep & 1)};
        if (rnd_in(0, 4) == 0) { /* the ends of the admitted ranges */
            p.m1 = rnd_in(0, 1) ? 1 << 30 : INT32_MAX;
            p.m2 = rnd_in(0, 1) ? 1 << 30 : INT32_MAX;
            p.zp1 = rnd_in(0, 1) ? -128 : 127;
            p.zp2 = rnd_in(0, 1) ? -128 : 127;
            p.out_zp = rnd_in(-128, 127);
        }
        if (rnd_in(0, 3) == 0) {
            switch (rnd_in(0, 4)) {
            case 0: p.m1 = 0; break;
            case 1: p.m_out = 0; break;
            case 2: p.s2 = rnd_in(1, 3); break;
            case 3: p.s_out = 0; break;
            default: p.s1 = -rnd_in(5, 31); break;
            }
        }
        if (p.left_shift < 20 && p.s_out < 0) /* outputs of about the inputs' size: every unit
                                                 of the inputs' rescales shows */
            p.s_out = -p.left_shift + rnd_in(-3, 3) < -1 ? -p.left_shift + rnd_in(-3, 3) : -1;
        p.act_min = rnd_in(-128, 0);
        p.act_max = rnd_in(p.act_min, 127);
        int8_t a[300], b[300], got[2][300];
        int32_t n = rnd_in(1, 300);
        for (int32_t i = 0; i < n; i++) {
            a[i] = (int8_t)rnd_in(-128, 127);
            b[i] = (int8_t)rnd_in(-128, 127);
        }
        kdm_add_s8_ref(&p, a, b, got[0], n);
        kdm_add_s8_dsp(&p, a, b, got[1], n);
        for (int32_t i = 0; i < n; i++) {
            int32_t sa = kdm_requantize((a[i] - p.zp1) * (1 << p.left_shift), p.m1, p.s1, p.flags);
            int32_t sb = kdm_requantize((b[i] - p.zp2) * (1 << p.left_shift), p.m2, p.s2, p.flags);
            uint32_t sum = (uint32_t)sa + (uint32_t)sb;
            int64_t v = p.out_zp + (int64_t)kdm_requantize((int32_t)sum, p.m_out, p.s_out, p.flags);
            assert_int_equal(got[0][i], clamp8(v, p.act_min, p.act_max));
            assert_int_equal(got[1][i], got[0][i]);
        }
    }
    /* a hand case: scales 1, 1 -> 1 as TFLite sets them up (twice_max = 2): with left_shift 20,
     * inputs scaled by 0.5 each, output by 2 / 2^20: 3 + 4 = 7, zero-points 1, 2 -> out 5 + 7 */
    kdm_add_params p = {1, 2, 5, 20, 1 << 30, 0, 1 << 30, 0, 1 << 30, -18, -128, 127, 0};
    int8_t a = 4, b = 6, out[2];
    kdm_add_s8_ref(&p, &a, &b, &out[0], 1);
    kdm_add_s8_dsp(&p, &a, &b, &out[1], 1);
    assert_int_equal(out[0], 12);
    assert_int_equal(out[1], 12);
}

static void test_pools(void **state)
{
    /* a 4x4 single-channel ramp, 2x2 windows stride 2 */
    int8_t in[16], out[4];
    for (int i = 0; i < 16; i++)
        in[i] = (int8_t)(i * 9 - 70); /* -70 .. 65 */
    kdm_conv_params p = {1, 4, 4, 1, 2, 2, 2, 2, 2, 0, 0, 0};
    kdm_maxpool_s8(&p, -128, 127, in, out);
    int8_t want_max[4] = {(int8_t)(5 * 9 - 70), (int8_t)(7 * 9 - 70), (int8_t)(13 * 9 - 70),
                          (int8_t)(15 * 9 - 70)};
    assert_memory_equal(out, want_max, 4);
    kdm_maxpool_s8(&p, -128, 0, in, out); /* clamp */
    assert_int_equal(out[3], 0);
    /* averages: window 0 = {-70, -61, -34, -25}: -190 / 4 = -47.5 -> -48 (away from zero) */
    kdm_avgpool_s8(&p, -128, 127, in, out);
    assert_int_equal(out[0], -48);
    /* window 3 = {20, 29, 56, 65}: 170 / 4 = 42.5 -> 43 */
    assert_int_equal(out[3], 43);
    /* max pool with padding: 3x3 stride 1 pad 1 over the ramp, corner = max of 4 real values */
    int8_t out9[16];
    kdm_conv_params pp = {1, 4, 4, 1, 4, 4, 3, 3, 1, 1, 0, 0};
    kdm_maxpool_s8(&pp, -128, 127, in, out9);
    assert_int_equal(out9[0], (int8_t)(5 * 9 - 70));
    assert_int_equal(out9[15], (int8_t)(15 * 9 - 70));
    /* all-negative input: padding is skipped, not read as 0 or the zero-point */
    int8_t neg[16];
    memset(neg, -100, sizeof neg);
    kdm_maxpool_s8(&pp, -128, 127, neg, out9);
    assert_int_equal(out9[0], -100);

    /* random: NHWC with channels, against long-hand loops */
    for (int rep = 0; rep < 30; rep++) {
        int32_t c = rnd_in(1, 9), h = rnd_in(3, 9), w = rnd_in(3, 9), k = rnd_in(2, 3);
        int32_t s = rnd_in(1, 2), pad = rnd_in(0, 1);
        kdm_conv_params q = {
            c, h, w, c, (h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1, k, k, s, pad, 0, 0};
        int8_t x[9 * 9 * 9], y[9 * 9 * 9];
        for (int32_t i = 0; i < c * h * w; i++)
            x[i] = (int8_t)rnd_in(-128, 127);
        kdm_maxpool_s8(&q, -120, 120, x, y);
        for (int32_t oy = 0; oy < q.out_h; oy++)
            for (int32_t ox = 0; ox < q.out_w; ox++)
                for (int32_t ch = 0; ch < c; ch++) {
                    int m = -1000;
                    for (int32_t ky = 0; ky < k; ky++)
                        for (int32_t kx = 0; kx < k; kx++) {
                            int32_t iy = oy * s - pad + ky, ix = ox * s - pad + kx;
                            if (iy >= 0 && iy < h && ix >= 0 && ix < w &&
                                x[(iy * w + ix) * c + ch] > m)
                                m = x[(iy * w + ix) * c + ch];
                        }
                    assert_int_equal(y[(oy * q.out_w + ox) * c + ch], clamp8(m, -120, 120));
                }
        q.pad = 0;
        q.out_h = (h - k) / s + 1;
        q.out_w = (w - k) / s + 1;
        kdm_avgpool_s8(&q, -128, 127, x, y);
        for (int32_t oy = 0; oy < q.out_h; oy++)
            for (int32_t ox = 0; ox < q.out_w; ox++)
                for (int32_t ch = 0; ch < c; ch++) {
                    int sum = 0;
                    for (int32_t ky = 0; ky < k; ky++)
                        for (int32_t kx = 0; kx < k; kx++)
                            sum += x[((oy * s + ky) * w + ox * s + kx) * c + ch];
                    /* half away from zero, by doubling: floor((2|sum| + n) / 2n) */
                    int n = k * k, mag = ((sum < 0 ? -sum : sum) * 2 + n) / (2 * n);
                    assert_int_equal(y[(oy * q.out_w + ox) * c + ch], sum < 0 ? -mag : mag);
                }
        for (int dsp = 0; dsp < 2; dsp++) {
            (dsp ? kdm_global_avgpool_s8_dsp : kdm_global_avgpool_s8_ref)(c, h * w, -128, 127, x,
                                                                          y);
            for (int32_t ch = 0; ch < c; ch++) {
                int sum = 0;
                for (int32_t i = 0; i < h * w; i++)
                    sum += x[i * c + ch];
                int n = h * w, mag = ((sum < 0 ? -sum : sum) * 2 + n) / (2 * n);
                assert_int_equal(y[ch], sum < 0 ? -mag : mag);
            }
        }
    }
}

/* Global average pooling, both kernels, around the DSP kernel's 256-pixel limit for its 16-bit
 * lane sums (255, 256, 257 pixels and more), with a channel count that leaves a tail after the
 * groups of four: constant inputs at both ends of the range (256 x -128 is the most a lane
 * holds), and random ones skewed positive or negative against a long-hand sum with a random
 * clamp (so both bounds bite); and a map of 2^24 - 1 pixels of -128, whose rounding overflowed
 * int32 before kdm_div_round_ worked on the magnitude in unsigned bits. */
static void test_global_avgpool_long(void **state)
{
    (void)state;
    enum { C = 7, HW = 600 };
    static int8_t x[C * HW];
    int8_t y[C];
    const int32_t sizes[] = {1, 3, 255, 256, 257, 300, HW};
    const int8_t ends[2] = {-128, 127};
    for (int dsp = 0; dsp < 2; dsp++) {
        void (*gap)(int32_t, int32_t, int32_t, int32_t, const int8_t *, int8_t *) =
            dsp ? kdm_global_avgpool_s8_dsp : kdm_global_avgpool_s8_ref;
        for (int s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); s++)
            for (int e = 0; e < 2; e++) {
                memset(x, ends[e], sizeof x);
                gap(C, sizes[s], -128, 127, x, y);
                for (int32_t ch = 0; ch < C; ch++)
                    assert_int_equal(y[ch], ends[e]);
            }
        for (int rep = 0; rep < 40; rep++) {
            const int32_t hw = rep < 20 ? rnd_in(1, 256) : rnd_in(257, HW);
            const int32_t lo = rnd_in(-100, 0), hi = rnd_in(0, 100), sign = rep & 1 ? -1 : 1;
            for (int32_t i = 0; i < C * hw; i++) /* every third value far from 0: |mean| > 20 */
                x[i] = (int8_t)(i % 3 ? rnd_in(-128, 127) : sign * rnd_in(60, 127));
            gap(C, hw, lo, hi, x, y);
            for (int32_t ch = 0; ch < C; ch++) {
                int64_t sum = 0;
                for (int32_t i = 0; i < hw; i++)
                    sum += x[i * C + ch];
                const int64_t mag = ((sum < 0 ? -sum : sum) * 2 + hw) / (2 * hw);
                assert_int_equal(y[ch], clamp8(sum < 0 ? -mag : mag, lo, hi));
            }
        }
        const int32_t big = (1 << 24) - 1;
        int8_t *m = xmalloc((size_t)big);
        memset(m, -128, (size_t)big);
        gap(1, big, -128, 127, m, y);
        assert_int_equal(y[0], -128);
        free(m);
    }
}

static void test_softmax(void **state)
{
    int32_t lut[256];
    for (int d = 0; d < 256; d++) /* exp(-d / 16) in Q16, computed without libm */
        lut[d] = d == 0 ? 65536 : (int32_t)(((int64_t)lut[d - 1] * 61565 + 32768) >> 16);
    /* ten equal values: 256 / 10 = 25.6 -> 26 - 128 = -102 */
    int8_t in[10], out[10];
    memset(in, 7, sizeof in);
    kdm_softmax_s8(lut, -128, 127, in, out, 10);
    for (int i = 0; i < 10; i++)
        assert_int_equal(out[i], -102);
    /* one dominant value: 256 * 65536 / (65536 + 0) would be 256 -> clamped to 127 */
    int32_t zero_lut[256] = {65536};
    kdm_softmax_s8(zero_lut, -128, 127, in, out, 1);
    assert_int_equal(out[0], 127);
    /* random vectors against a long-hand computation */
    for (int rep = 0; rep < 100; rep++) {
        int32_t n = rnd_in(1, 40);
        int8_t x[40], y[40];
        for (int32_t i = 0; i < n; i++)
            x[i] = (int8_t)rnd_in(-128, 127);
        int32_t lo = rnd_in(-128, -100), hi = rnd_in(100, 127);
        kdm_softmax_s8(lut, lo, hi, x, y, n);
        int mx = -128;
        for (int32_t i = 0; i < n; i++)
            mx = x[i] > mx ? x[i] : mx;
        int64_t sum = 0;
        for (int32_t i = 0; i < n; i++)
            sum += lut[mx - x[i]];
        for (int32_t i = 0; i < n; i++) {
            int64_t num = 256 * (int64_t)lut[mx - x[i]];
            int64_t r = (2 * num + sum) / (2 * sum); /* half up */
            assert_int_equal(y[i], clamp8(r - 128, lo, hi));
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_requantize_tflite),
        cmocka_unit_test(test_requantize_random),
        cmocka_unit_test(test_requantize_single_fast),
        cmocka_unit_test(test_ref_vs_naive),
        cmocka_unit_test(test_ref_vs_dsp),
        cmocka_unit_test(test_ref_vs_dsp_fast_paths),
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_pools),
        cmocka_unit_test(test_global_avgpool_long),
        cmocka_unit_test(test_softmax),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
