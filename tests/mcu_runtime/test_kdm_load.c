/*
 * test_kdm_load.c - kdm_load / kdm_invoke on valid and damaged .kdm blobs.
 *
 * One small model uses every op type (conv s8, depthwise s4, average and max pooling, add,
 * global pooling, reshape, fully-connected s8 and s4, softmax), serialized with the host
 * writer (exporters/kdm_writer.h). It must load, and kdm_invoke (and kdm_invoke_op op by op)
 * must give what the reference and the DSP kernels give when called directly in the model's
 * order with parameters written down here, not read back from the blob - so the loader's and
 * the dispatcher's decoding is checked, the kernels themselves being test_kdm_kernels' job.
 *
 * Then damaged blobs: every field the loader checks is broken once, through the writer (so the
 * CRC stays valid and the check itself is reached) or by patching the header and re-stamping
 * the CRC, and each must give its own status; any flipped bit after the CRC field gives
 * KDM_ERR_CRC; every truncation 0 .. len-1, copied into an exactly-sized buffer (ASan catches
 * an overread under DISTILL_SANITIZE), gives KDM_ERR_TRUNCATED; a short or misaligned arena
 * gives KDM_ERR_ARENA with nothing written.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kdm.h"
#include "kdm_kernels.h"
#include "kdm_writer.h"

/* ---- the model --------------------------------------------------------------------------------
 */

enum { T_IN, T_CONV, T_DW, T_AVG, T_MAX, T_ADD, T_GAP, T_FLAT, T_FC8, T_FC4, T_SUM, T_OUT, NT };
enum {
    OP_CONV,
    OP_DW,
    OP_AVG,
    OP_MAX,
    OP_ADD,
    OP_GAP,
    OP_FLAT,
    OP_FC8,
    OP_FC4,
    OP_SUM,
    OP_SOFT,
    NOP
};

/* c, h, w, zero-point of each tensor */
static const int32_t shapes[NT][4] = {
    [T_IN] = {3, 5, 5, -3},  [T_CONV] = {8, 5, 5, 4},  [T_DW] = {8, 3, 3, -6},
    [T_AVG] = {8, 2, 2, -6}, [T_MAX] = {8, 3, 3, -6},  [T_ADD] = {8, 3, 3, 2},
    [T_GAP] = {8, 1, 1, 2},  [T_FLAT] = {72, 1, 1, 2}, [T_FC8] = {6, 1, 1, -1},
    [T_FC4] = {6, 1, 1, 5},  [T_SUM] = {6, 1, 1, 0},   [T_OUT] = {6, 1, 1, -128},
};

/* Everything the blob holds, as plain arrays the tests can damage before serializing. */
typedef struct {
    int32_t t[NT][KDM_TENSOR_WORDS];
    int32_t op[NOP][KDM_OP_WORDS];
    kdm_header_fields h;
    /* the constant data, kept for the direct kernel calls */
    int8_t conv_w[8][28]; /* 8 rows, K = 27 padded to 28 */
    uint8_t dw_w[9][4];   /* 9 taps x 8 nibbles */
    int8_t fc8_w[6][72];
    uint8_t fc4_w[6][4];              /* 8 nibbles per row */
    int32_t bias[4][8], quant[4][16]; /* conv, dw, fc8, fc4: multipliers, then shifts at 8 */
    int8_t shift8[4][8];              /* the shifts as the blob stores them (serialize) */
    int32_t add_p[2][7];              /* ADD(avg-max path), ADD(fc8, fc4) */
    int32_t lut[256];
    uint32_t woff[NOP][4]; /* blob offsets of weights, bias, quant, params of each op */
    uint32_t spare_quant;  /* a copy of fc4's quant record, the data's last piece (unused) */
} model;

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static int32_t rnd_in(int32_t lo, int32_t hi)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return lo + (int32_t)((uint32_t)(rng >> 20) % (uint32_t)(hi - lo + 1));
}

static void set_op(int32_t *r, int type, int in0, int in1, int out, int k, int stride, int pad)
{
    memset(r, 0, sizeof(int32_t) * KDM_OP_WORDS);
    r[0] = type;
    r[1] = in0;
    r[2] = in1;
    r[3] = out;
    r[4] = r[5] = k;
    r[6] = stride;
    r[7] = pad;
    r[9] = -128;
    r[10] = 127;
}

/* Fill the model's records and data (offsets are filled by serialize). */
static void model_init(model *md)
{
    memset(md, 0, sizeof *md);
    uint32_t off = 0;
    for (int i = 0; i < NT; i++) {
        int32_t *t = md->t[i];
        t[0] = (int32_t)off;
        t[1] = shapes[i][0];
        t[2] = shapes[i][1];
        t[3] = shapes[i][2];
        t[4] = shapes[i][3];
        float scale = i == T_OUT ? 1.0f / 256.0f : 0.05f + 0.01f * (float)i;
        memcpy(&t[5], &scale, 4);
        off += ((uint32_t)(shapes[i][0] * shapes[i][1] * shapes[i][2]) + 3u) & ~3u;
    }
    for (int o = 0; o < 8; o++)
        for (int k = 0; k < 27; k++)
            md->conv_w[o][k] = (int8_t)rnd_in(-127, 127);
    for (int t = 0; t < 9; t++)
        for (int b = 0; b < 4; b++)
            md->dw_w[t][b] = (uint8_t)rnd_in(0, 255);
    for (int o = 0; o < 6; o++) {
        for (int k = 0; k < 72; k++)
            md->fc8_w[o][k] = (int8_t)rnd_in(-127, 127);
        for (int b = 0; b < 4; b++)
            md->fc4_w[o][b] = (uint8_t)rnd_in(0, 255);
    }
    /* accumulator spreads ~ sqrt(K) * |w| * |x|, brought to ~40 output steps */
    static const int32_t spread[4] = {28000, 550, 24800, 390}, shift[4] = {-9, -3, -9, -3};
    for (int l = 0; l < 4; l++)
        for (int c = 0; c < 8; c++) {
            md->bias[l][c] = rnd_in(-spread[l] / 2, spread[l] / 2);
            md->quant[l][c] = (int32_t)(0x40000000u + (uint32_t)rnd_in(0, 0x3FFFFFFF));
            md->quant[l][8 + c] = shift[l] + rnd_in(-1, 1);
        }
    for (int a = 0; a < 2; a++) {
        int32_t p[7] = {20, 0x55555555, -1, 0x60000000, -1, 0x50000000, -19};
        memcpy(md->add_p[a], p, sizeof p);
    }
    for (int d = 0; d < 256; d++) /* exp(-d / 16) in Q16 */
        md->lut[d] = d == 0 ? 65536 : (int32_t)(((int64_t)md->lut[d - 1] * 61565 + 32768) >> 16);

    /* constant data offsets, in serialize's order (the writer starts the data right after the
     * header and pads each piece to 4 bytes; serialize checks these) */
    uint32_t d = KDM_HEADER_SIZE;
    const size_t wbytes[4] = {sizeof md->conv_w, sizeof md->dw_w, sizeof md->fc8_w,
                              sizeof md->fc4_w};
    const int wop[4] = {OP_CONV, OP_DW, OP_FC8, OP_FC4}, nch[4] = {8, 8, 6, 6};
    for (int l = 0; l < 4; l++) {
        md->woff[wop[l]][0] = d;
        d += (uint32_t)wbytes[l];
        md->woff[wop[l]][1] = d;
        d += 4u * (uint32_t)nch[l];
        md->woff[wop[l]][2] = d;
        d += (5u * (uint32_t)nch[l] + 3u) & ~3u; /* int32 multipliers, int8 shifts */
    }
    md->woff[OP_ADD][3] = d;
    md->woff[OP_SUM][3] = d + 28;
    md->woff[OP_SOFT][3] = d + 56;
    md->spare_quant = d + 56 + 1024; /* 6 channels: 30 bytes, padded to 32, ending the data */

    set_op(md->op[OP_CONV], KDM_OP_CONV2D, T_IN, -1, T_CONV, 3, 1, 1);
    md->op[OP_CONV][8] = 8;
    md->op[OP_CONV][12] = 28;
    set_op(md->op[OP_DW], KDM_OP_DEPTHWISE_CONV2D, T_CONV, -1, T_DW, 3, 2, 1);
    md->op[OP_DW][8] = 4;
    md->op[OP_DW][12] = 4;
    set_op(md->op[OP_AVG], KDM_OP_AVGPOOL2D, T_DW, -1, T_AVG, 2, 1, 0);
    set_op(md->op[OP_MAX], KDM_OP_MAXPOOL2D, T_AVG, -1, T_MAX, 2, 1, 1);
    set_op(md->op[OP_ADD], KDM_OP_ADD, T_MAX, T_DW, T_ADD, 0, 0, 0);
    md->op[OP_ADD][9] = 2; /* a ReLU at the output zero-point */
    set_op(md->op[OP_GAP], KDM_OP_GLOBAL_AVGPOOL, T_ADD, -1, T_GAP, 0, 0, 0);
    set_op(md->op[OP_FLAT], KDM_OP_RESHAPE, T_ADD, -1, T_FLAT, 0, 0, 0);
    set_op(md->op[OP_FC8], KDM_OP_FULLY_CONNECTED, T_FLAT, -1, T_FC8, 0, 0, 0);
    md->op[OP_FC8][8] = 8;
    md->op[OP_FC8][12] = 72;
    set_op(md->op[OP_FC4], KDM_OP_FULLY_CONNECTED, T_GAP, -1, T_FC4, 0, 0, 0);
    md->op[OP_FC4][8] = 4;
    md->op[OP_FC4][12] = 4;
    set_op(md->op[OP_SUM], KDM_OP_ADD, T_FC8, T_FC4, T_SUM, 0, 0, 0);
    set_op(md->op[OP_SOFT], KDM_OP_SOFTMAX, T_SUM, -1, T_OUT, 0, 0, 0);

    for (int i = 0; i < NOP; i++) {
        md->op[i][11] = (int32_t)md->woff[i][0];
        md->op[i][13] = (int32_t)md->woff[i][1];
        md->op[i][14] = (int32_t)md->woff[i][2];
        md->op[i][15] = (int32_t)md->woff[i][3];
    }
    uint32_t scratch = 0;
    for (int i = 0; i < NOP; i++) {
        const int32_t *x = md->t[md->op[i][1]];
        uint32_t s = kdm_op_scratch_size(md->op[i], (uint32_t)x[1], (uint32_t)x[2], (uint32_t)x[3]);
        scratch = s > scratch ? s : scratch;
    }
    kdm_header_fields h = {0, off + scratch, off, scratch, T_IN, T_OUT};
    md->h = h;
}

/* Append the constant data (at the offsets model_init planned), the records (as a test may
 * have damaged them), and lay out the blob. */
static uint8_t *serialize(model *md, size_t *len)
{
    kdm_builder *b;
    assert_int_equal(kdm_builder_new(&b), KD_OK);
    uint32_t off;
    const void *weights[4] = {md->conv_w, md->dw_w, md->fc8_w, md->fc4_w};
    const size_t wbytes[4] = {sizeof md->conv_w, sizeof md->dw_w, sizeof md->fc8_w,
                              sizeof md->fc4_w};
    const int wop[4] = {OP_CONV, OP_DW, OP_FC8, OP_FC4}, nch[4] = {8, 8, 6, 6};
    for (int l = 0; l < 4; l++) {
        int n = nch[l];
        assert_int_equal(kdm_builder_data(b, weights[l], wbytes[l], &off), KD_OK);
        assert_int_equal(off, md->woff[wop[l]][0]);
        assert_int_equal(kdm_builder_data(b, md->bias[l], 4 * (size_t)n, &off), KD_OK);
        assert_int_equal(off, md->woff[wop[l]][1]);
        uint8_t q[5 * 8];
        memcpy(q, md->quant[l], 4 * (size_t)n);
        for (int c = 0; c < n; c++) {
            md->shift8[l][c] = (int8_t)md->quant[l][8 + c];
            q[4 * n + c] = (uint8_t)md->shift8[l][c];
        }
        assert_int_equal(kdm_builder_data(b, q, 5 * (size_t)n, &off), KD_OK);
        assert_int_equal(off, md->woff[wop[l]][2]);
    }
    assert_int_equal(kdm_builder_data(b, md->add_p[0], sizeof md->add_p[0], &off), KD_OK);
    assert_int_equal(off, md->woff[OP_ADD][3]);
    assert_int_equal(kdm_builder_data(b, md->add_p[1], sizeof md->add_p[1], &off), KD_OK);
    assert_int_equal(off, md->woff[OP_SUM][3]);
    assert_int_equal(kdm_builder_data(b, md->lut, sizeof md->lut, &off), KD_OK);
    assert_int_equal(off, md->woff[OP_SOFT][3]);
    uint8_t spare[5 * 6];
    memcpy(spare, md->quant[3], 4 * 6);
    for (int c = 0; c < 6; c++)
        spare[4 * 6 + c] = (uint8_t)(int8_t)md->quant[3][8 + c];
    assert_int_equal(kdm_builder_data(b, spare, sizeof spare, &off), KD_OK);
    assert_int_equal(off, md->spare_quant);
    for (int i = 0; i < NT; i++)
        assert_int_equal(kdm_builder_tensor(b, md->t[i]), i);
    for (int i = 0; i < NOP; i++)
        assert_int_equal(kdm_builder_op(b, md->op[i]), i);
    uint8_t *blob;
    assert_int_equal(kdm_builder_finish(b, &md->h, &blob, len), KD_OK);
    kdm_builder_free(b);
    return blob;
}

/* ---- the expected output, from the kernels called directly ------------------------------------
 */

static kdm_requant_params rq(const model *md, int l, int32_t zp, int32_t lo)
{
    kdm_requant_params q = {md->bias[l], md->quant[l], md->shift8[l], zp, lo, 127, 0};
    return q;
}

static kdm_add_params addp(const int32_t *p, int32_t zp1, int32_t zp2, int32_t zp, int32_t lo)
{
    kdm_add_params a = {zp1, zp2, zp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], lo, 127, 0};
    return a;
}

/* The model's output for `in`, through the reference (dsp = 0) or the DSP kernels. */
static void expected(const model *md, const int8_t *in, int dsp, int8_t *out)
{
    int8_t conv[200], dw[72], avg[32], mx[72], add[72], gap[8], fc8[6], fc4[6], sum[6];
    uint8_t scratch[4096] __attribute__((aligned(4)));
    kdm_conv_params pc = {3, 5, 5, 8, 5, 5, 3, 3, 1, 1, -3, 28};
    kdm_requant_params qc = rq(md, 0, 4, -128);
    (dsp ? kdm_conv2d_s8_dsp : kdm_conv2d_s8_ref)(&pc, &qc, in, &md->conv_w[0][0], conv, scratch);
    kdm_conv_params pd = {8, 5, 5, 8, 3, 3, 3, 3, 2, 1, 4, 4};
    kdm_requant_params qd = rq(md, 1, -6, -128);
    (dsp ? kdm_depthwise_s4_dsp : kdm_depthwise_s4_ref)(&pd, &qd, conv, &md->dw_w[0][0], dw,
                                                        scratch);
    kdm_conv_params pa = {8, 3, 3, 8, 2, 2, 2, 2, 1, 0, 0, 0};
    kdm_avgpool_s8(&pa, -128, 127, dw, avg);
    kdm_conv_params pm = {8, 2, 2, 8, 3, 3, 2, 2, 1, 1, 0, 0};
    kdm_maxpool_s8(&pm, -128, 127, avg, mx);
    kdm_add_params a1 = addp(md->add_p[0], -6, -6, 2, 2);
    kdm_add_s8_ref(&a1, mx, dw, add, 72);
    kdm_global_avgpool_s8_ref(8, 9, -128, 127, add, gap);
    kdm_fc_params p8 = {72, 6, 72}, p4 = {8, 6, 4};
    kdm_requant_params q8 = rq(md, 2, -1, -128), q4 = rq(md, 3, 5, -128);
    (dsp ? kdm_fully_connected_s8_dsp : kdm_fully_connected_s8_ref)(&p8, &q8, add, &md->fc8_w[0][0],
                                                                    fc8, scratch);
    (dsp ? kdm_fully_connected_s4_dsp : kdm_fully_connected_s4_ref)(&p4, &q4, gap, &md->fc4_w[0][0],
                                                                    fc4, scratch);
    kdm_add_params a2 = addp(md->add_p[1], -1, 5, 0, -128);
    kdm_add_s8_ref(&a2, fc8, fc4, sum, 6);
    kdm_softmax_s8(md->lut, -128, 127, sum, out, 6);
}

static void random_input(int8_t *in, size_t n)
{
    for (size_t i = 0; i < n; i++)
        in[i] = (int8_t)rnd_in(-128, 127);
}

/* ---- valid model --------------------------------------------------------------------------------
 */

static void test_valid_model(void **state)
{
    model md;
    model_init(&md);
    size_t len;
    uint8_t *blob = serialize(&md, &len);
    kdm_model m;
    assert_int_equal(kdm_load(&m, blob, len), KDM_OK);
    assert_int_equal(kdm_input_size(&m), 75);
    assert_int_equal(kdm_output_size(&m), 6);
    assert_int_equal(kdm_arena_size(&m), md.h.arena_size);
    uint32_t bits;
    int32_t zp;
    kdm_input_quant(&m, &bits, &zp);
    assert_int_equal(zp, -3);
    assert_int_equal(bits, (uint32_t)md.t[T_IN][5]);
    kdm_output_quant(&m, &bits, &zp);
    assert_int_equal(zp, -128);
    assert_int_equal(kdm_op_macs(&m, OP_CONV), 25 * 8 * 27);
    assert_int_equal(kdm_op_macs(&m, OP_DW), 9 * 8 * 9);
    assert_int_equal(kdm_op_macs(&m, OP_FC8), 72 * 6);
    assert_int_equal(kdm_op_macs(&m, OP_ADD), 0);
    assert_int_equal(kdm_op_macs(&m, NOP), 0);

    uint8_t *arena = aligned_alloc(4, (md.h.arena_size + 3) & ~3u);
    assert_non_null(arena);
    int distinct = 0, seen[256] = {0};
    for (int rep = 0; rep < 20; rep++) {
        int8_t in[75], out[6], want[6], want_dsp[6];
        random_input(in, sizeof in);
        assert_int_equal(kdm_invoke(&m, arena, md.h.arena_size, in, out), KDM_OK);
        expected(&md, in, 0, want);
        expected(&md, in, 1, want_dsp);
        assert_memory_equal(out, want, 6);
        assert_memory_equal(out, want_dsp, 6);
        for (int i = 0; i < 6; i++)
            distinct += !seen[out[i] + 128]++;
        /* op by op on the arena as kdm_invoke left it: the same output again */
        for (uint32_t i = 0; i < NOP; i++)
            assert_int_equal(kdm_invoke_op(&m, arena, md.h.arena_size, i), KDM_OK);
        assert_memory_equal(arena + md.t[T_OUT][0], want, 6);
    }
    assert_true(distinct > 8); /* the softmax outputs vary with the input */
    assert_int_equal(kdm_invoke_op(&m, arena, md.h.arena_size, NOP), KDM_ERR_RANGE);
    free(arena);
    free(blob);
}

/* A reshape that aliases its input (same arena offset) loads and runs the same. */
static void test_reshape_alias(void **state)
{
    model md;
    model_init(&md);
    md.t[T_FLAT][0] = md.t[T_ADD][0];
    size_t len;
    uint8_t *blob = serialize(&md, &len);
    kdm_model m;
    assert_int_equal(kdm_load(&m, blob, len), KDM_OK);
    uint8_t *arena = aligned_alloc(4, (md.h.arena_size + 3) & ~3u);
    int8_t in[75], out[6], want[6];
    random_input(in, sizeof in);
    assert_int_equal(kdm_invoke(&m, arena, md.h.arena_size, in, out), KDM_OK);
    expected(&md, in, 0, want);
    assert_memory_equal(out, want, 6);
    free(arena);
    free(blob);
}

/* ---- damaged blobs through the writer -------------------------------------------------------- */

typedef void (*mutation)(model *md);

static kdm_status load_mutated(mutation mut)
{
    model md;
    model_init(&md);
    mut(&md);
    size_t len;
    uint8_t *blob = serialize(&md, &len);
    kdm_model m;
    memset(&m, 0xAB, sizeof m);
    kdm_status st = kdm_load(&m, blob, len);
    if (st != KDM_OK) { /* a failed load leaves the model zeroed */
        kdm_model zero;
        memset(&zero, 0, sizeof zero);
        assert_memory_equal(&m, &zero, sizeof m);
        assert_int_equal(kdm_arena_size(&m), 0);
    }
    free(blob);
    return st;
}

#define MUT(name, body)                                                                            \
    static void name(model *md) { body; }

MUT(m_none, (void)md)
MUT(m_flags, md->h.flags = 2)
MUT(m_input_index, md->h.input = NT)
MUT(m_output_index, md->h.output = 0x80000000u)
MUT(m_tensor_outside, md->t[T_SUM][0] = (int32_t)md->h.scratch_off - 2)
MUT(m_tensor_past_arena, md->t[T_IN][0] = (int32_t)md->h.arena_size)
MUT(m_tensor_zero_dim, md->t[T_GAP][2] = 0)
MUT(m_tensor_big_dim, md->t[T_GAP][3] = 65536)
MUT(m_tensor_zp, md->t[T_GAP][4] = 128)
MUT(m_op_index, md->op[OP_FC8][1] = NT)
MUT(m_op_negative_index, md->op[OP_CONV][3] = -1)
MUT(m_add_in1, md->op[OP_SUM][2] = -1)
MUT(m_unknown_op, md->op[OP_GAP][0] = KDM_OP_COUNT_)
MUT(m_op_zero, md->op[OP_GAP][0] = 0)
MUT(m_wbits, md->op[OP_CONV][8] = 2)
MUT(m_act_order, {
    md->op[OP_FC8][9] = 10;
    md->op[OP_FC8][10] = 9;
})
MUT(m_act_range, md->op[OP_SOFT][10] = 128)
MUT(m_weights_past_end, md->op[OP_FC8][11] = 1 << 20)
MUT(m_weights_misaligned, md->op[OP_FC8][11] += 2)
MUT(m_weights_before_data, md->op[OP_CONV][11] = 32)
MUT(m_bias_past_end, md->op[OP_FC4][13] = 1 << 24)
MUT(m_quant_negative, md->op[OP_DW][14] = -4)
MUT(m_row_stride_short, md->op[OP_CONV][12] = 24)
MUT(m_row_stride_misaligned, md->op[OP_FC8][12] = 74)
MUT(m_multiplier, md->quant[2][3] = 1 << 29)
MUT(m_shift, md->quant[0][8 + 5] = 31)
MUT(m_overlap, md->t[T_DW][0] = md->t[T_CONV][0] + 4)
MUT(m_overlap_in1, md->t[T_SUM][0] = md->t[T_FC4][0])
MUT(m_conv_shape, md->t[T_CONV][2] = 4)
MUT(m_dw_channels, md->t[T_DW][1] = 7)
MUT(m_fc_not_vector, {
    md->t[T_FC8][1] = 3;
    md->t[T_FC8][2] = 2;
})
MUT(m_add_shapes, md->op[OP_SUM][2] = T_GAP)
MUT(m_reshape_count, md->t[T_FLAT][1] = 71)
MUT(m_softmax_shape, {
    md->t[T_OUT][1] = 3;
    md->t[T_OUT][3] = 2;
})
MUT(m_kernel_zero, md->op[OP_CONV][4] = 0)
MUT(m_stride_zero, md->op[OP_DW][6] = 0)
/* the depthwise op (3x3, pad 1, 5x5 -> 3x3 at stride 2) with another stride: 1 would give 5x5
 * (the output is smaller than the formula), 3 would give 2x2 (larger); no tensor changes, so
 * only that op's window check can refuse these */
MUT(m_dw_stride_1, md->op[OP_DW][6] = 1)
MUT(m_dw_stride_3, md->op[OP_DW][6] = 3)
MUT(m_pad_negative, md->op[OP_CONV][7] = -1)
MUT(m_maxpool_pad, { /* the output grown to match, so only pad >= kernel is wrong */
                     md->op[OP_MAX][7] = 2;
                     md->t[T_MAX][2] = md->t[T_MAX][3] = 5;
})
MUT(m_avgpool_pad, {
    md->op[OP_AVG][7] = 1;
    md->t[T_AVG][2] = md->t[T_AVG][3] = 4;
})
MUT(m_weights_short, md->op[OP_FC4][11] = (int32_t)md->spare_quant + 32 - 20)
/* fc4's quant record (6 channels: 24 bytes of multipliers, 6 of shifts) as the data's last 32
 * bytes: loads; 4 bytes later it runs 2 bytes past the end */
MUT(m_quant_at_end, md->op[OP_FC4][14] = (int32_t)md->spare_quant)
MUT(m_quant_past_end, md->op[OP_FC4][14] = (int32_t)md->spare_quant + 4)
MUT(m_add_left_shift, md->add_p[0][0] = 21)
MUT(m_add_multiplier, md->add_p[1][5] = -5)
MUT(m_lut_range, md->lut[9] = 65537)
MUT(m_lut_zero, md->lut[0] = 0)
MUT(m_scratch_small, md->h.scratch_size -= 4)
MUT(m_scratch_outside, md->h.scratch_off = md->h.arena_size)
MUT(m_scratch_misaligned, {
    md->h.scratch_off += 2;
    md->h.arena_size += 4;
})
MUT(m_arena_huge, md->h.arena_size = 0x80000000u)

static void test_damaged_fields(void **state)
{
    static const struct {
        mutation mut;
        kdm_status want;
        const char *what;
    } cases[] = {
        {m_none, KDM_OK, "none"},
        {m_flags, KDM_ERR_PARAM, "unknown flag"},
        {m_input_index, KDM_ERR_RANGE, "input index"},
        {m_output_index, KDM_ERR_RANGE, "output index"},
        {m_tensor_outside, KDM_ERR_RANGE, "tensor over the scratch area"},
        {m_tensor_past_arena, KDM_ERR_RANGE, "tensor past the arena"},
        {m_tensor_zero_dim, KDM_ERR_SHAPE, "tensor h = 0"},
        {m_tensor_big_dim, KDM_ERR_SHAPE, "tensor w = 65536"},
        {m_tensor_zp, KDM_ERR_PARAM, "zero-point 128"},
        {m_op_index, KDM_ERR_RANGE, "op input index"},
        {m_op_negative_index, KDM_ERR_RANGE, "op output -1"},
        {m_add_in1, KDM_ERR_RANGE, "ADD without second input"},
        {m_unknown_op, KDM_ERR_OP, "op type past the last"},
        {m_op_zero, KDM_ERR_OP, "op type 0"},
        {m_wbits, KDM_ERR_PARAM, "wbits 2"},
        {m_act_order, KDM_ERR_PARAM, "act_min > act_max"},
        {m_act_range, KDM_ERR_PARAM, "act_max 128"},
        {m_weights_past_end, KDM_ERR_RANGE, "weights past the blob"},
        {m_weights_misaligned, KDM_ERR_ALIGN, "weights misaligned"},
        {m_weights_before_data, KDM_ERR_RANGE, "weights in the header"},
        {m_bias_past_end, KDM_ERR_RANGE, "bias past the blob"},
        {m_weights_short, KDM_ERR_RANGE, "weights running past the data region's end"},
        {m_quant_negative, KDM_ERR_RANGE, "quant offset negative"},
        {m_row_stride_short, KDM_ERR_PARAM, "row stride < K"},
        {m_row_stride_misaligned, KDM_ERR_ALIGN, "row stride not a multiple of 4"},
        {m_multiplier, KDM_ERR_PARAM, "multiplier below 2^30"},
        {m_shift, KDM_ERR_PARAM, "shift 31"},
        {m_overlap, KDM_ERR_RANGE, "output overlaps input"},
        {m_overlap_in1, KDM_ERR_RANGE, "output overlaps second input"},
        {m_conv_shape, KDM_ERR_SHAPE, "conv output height"},
        {m_dw_channels, KDM_ERR_SHAPE, "depthwise in_c != out_c"},
        {m_fc_not_vector, KDM_ERR_SHAPE, "fully-connected output not [C]"},
        {m_add_shapes, KDM_ERR_SHAPE, "ADD shapes differ"},
        {m_reshape_count, KDM_ERR_SHAPE, "reshape element count"},
        {m_softmax_shape, KDM_ERR_SHAPE, "softmax over a map"},
        {m_kernel_zero, KDM_ERR_PARAM, "kernel 0"},
        {m_stride_zero, KDM_ERR_PARAM, "stride 0"},
        {m_dw_stride_1, KDM_ERR_SHAPE, "depthwise output smaller than its window formula"},
        {m_dw_stride_3, KDM_ERR_SHAPE, "depthwise output larger than its window formula"},
        {m_pad_negative, KDM_ERR_PARAM, "pad -1"},
        {m_maxpool_pad, KDM_ERR_PARAM, "max pool pad >= kernel"},
        {m_avgpool_pad, KDM_ERR_PARAM, "average pool with pad"},
        {m_add_left_shift, KDM_ERR_PARAM, "ADD left shift 21"},
        {m_add_multiplier, KDM_ERR_PARAM, "ADD multiplier negative"},
        {m_lut_range, KDM_ERR_PARAM, "softmax table entry > 65536"},
        {m_lut_zero, KDM_ERR_PARAM, "softmax table lut[0] = 0"},
        {m_scratch_small, KDM_ERR_RANGE, "scratch smaller than an op needs"},
        {m_scratch_outside, KDM_ERR_RANGE, "scratch past the arena"},
        {m_scratch_misaligned, KDM_ERR_ALIGN, "scratch misaligned"},
        {m_arena_huge, KDM_ERR_RANGE, "arena of 2 GiB"},
        {m_quant_at_end, KDM_OK, "quant record ending the data (5 bytes a channel)"},
        {m_quant_past_end, KDM_ERR_RANGE, "quant record 2 bytes past the data"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kdm_status st = load_mutated(cases[i].mut);
        if (st != cases[i].want)
            fail_msg("%s: got %s, want %s", cases[i].what, kdm_status_str(st),
                     kdm_status_str(cases[i].want));
    }
}

/* ---- damaged bytes ------------------------------------------------------------------------------
 */

static uint8_t *valid_blob(size_t *len)
{
    model md;
    model_init(&md);
    return serialize(&md, len);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Patch header word `at` and re-stamp the CRC, so the check behind the CRC is reached. */
static kdm_status load_patched(const uint8_t *blob, size_t len, size_t at, uint32_t v)
{
    uint8_t *b = malloc(len);
    memcpy(b, blob, len);
    put32(b + at, v);
    put32(b + 12, kdm_crc32(b + 16, len - 16));
    kdm_model m;
    kdm_status st = kdm_load(&m, b, len);
    free(b);
    return st;
}

static void test_damaged_header(void **state)
{
    size_t len;
    uint8_t *blob = valid_blob(&len);
    kdm_model m;
    assert_int_equal(load_patched(blob, len, 0, 0x324D444Bu), KDM_ERR_MAGIC); /* "KDM2" */
    assert_int_equal(load_patched(blob, len, 4, KDM_VERSION + 1), KDM_ERR_VERSION);
    assert_int_equal(load_patched(blob, len, 4, 2), KDM_ERR_VERSION); /* int32 shifts */
    assert_int_equal(load_patched(blob, len, 8, (uint32_t)len + 4), KDM_ERR_TRUNCATED);
    assert_int_equal(load_patched(blob, len, 8, 60), KDM_ERR_RANGE);
    assert_int_equal(load_patched(blob, len, 20, 0), KDM_ERR_RANGE);    /* no tensors */
    assert_int_equal(load_patched(blob, len, 20, 4097), KDM_ERR_RANGE); /* too many */
    assert_int_equal(load_patched(blob, len, 24, 0), KDM_ERR_RANGE);    /* no ops */
    assert_int_equal(load_patched(blob, len, 48, (uint32_t)len - 8), KDM_ERR_RANGE);
    assert_int_equal(load_patched(blob, len, 48, 66), KDM_ERR_ALIGN);
    assert_int_equal(load_patched(blob, len, 52, 0xFFFFFFF0u), KDM_ERR_RANGE);
    assert_int_equal(load_patched(blob, len, 52, 16), KDM_ERR_RANGE); /* over the header */
    assert_int_equal(load_patched(blob, len, 60, (uint32_t)len), KDM_ERR_RANGE); /* data_len */
    assert_int_equal(load_patched(blob, len, 56, 62), KDM_ERR_RANGE);
    /* the CRC field itself */
    uint8_t *b = malloc(len);
    memcpy(b, blob, len);
    b[12] ^= 1;
    assert_int_equal(kdm_load(&m, b, len), KDM_ERR_CRC);
    /* every bit after the CRC field: a CRC error (the check comes before anything it covers) */
    for (size_t i = 16; i < len; i++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(b, blob, len);
            b[i] ^= (uint8_t)(1u << bit);
            kdm_status st = kdm_load(&m, b, len);
            if (st != KDM_ERR_CRC)
                fail_msg("bit %d of byte %zu: %s", bit, i, kdm_status_str(st));
        }
    }
    /* trailing bytes past total_len are not part of the model */
    uint8_t *longer = malloc(len + 8);
    memcpy(longer, blob, len);
    memset(longer + len, 0xEE, 8);
    assert_int_equal(kdm_load(&m, longer, len + 8), KDM_OK);
    assert_int_equal(m.len, len);
    free(longer);
    free(b);
    free(blob);
}

static void test_truncated(void **state)
{
    size_t len;
    uint8_t *blob = valid_blob(&len);
    for (size_t n = 0; n < len; n++) {
        uint8_t *p = malloc(n ? n : 1); /* exactly n bytes: ASan sees any read past them */
        memcpy(p, blob, n);
        kdm_model m;
        kdm_status st = kdm_load(&m, p, n);
        if (st != KDM_ERR_TRUNCATED)
            fail_msg("prefix of %zu bytes: %s", n, kdm_status_str(st));
        free(p);
    }
    free(blob);
}

static void test_bad_arguments(void **state)
{
    size_t len;
    uint8_t *blob = valid_blob(&len);
    kdm_model m;
    assert_int_equal(kdm_load(NULL, blob, len), KDM_ERR_ARG);
    assert_int_equal(kdm_load(&m, NULL, len), KDM_ERR_ARG);
    uint8_t *shifted = malloc(len + 4);
    memcpy(shifted + 1, blob, len);
    assert_int_equal(kdm_load(&m, shifted + 1, len), KDM_ERR_ALIGN);
    free(shifted);

    assert_int_equal(kdm_load(&m, blob, len), KDM_OK);
    uint32_t need = kdm_arena_size(&m);
    uint8_t *arena = aligned_alloc(4, need + 8);
    int8_t in[75], out[6];
    random_input(in, sizeof in);
    /* too short by one byte, or misaligned: KDM_ERR_ARENA and nothing written anywhere */
    memset(arena, 0x5C, need + 8);
    memset(out, 0x3D, sizeof out);
    assert_int_equal(kdm_invoke(&m, arena, need - 1, in, out), KDM_ERR_ARENA);
    assert_int_equal(kdm_invoke(&m, arena + 2, need + 4, in, out), KDM_ERR_ARENA);
    assert_int_equal(kdm_invoke_op(&m, arena, need - 1, 0), KDM_ERR_ARENA);
    for (uint32_t i = 0; i < need + 8; i++)
        assert_int_equal(arena[i], 0x5C);
    for (int i = 0; i < 6; i++)
        assert_int_equal(out[i], 0x3D);
    assert_int_equal(kdm_invoke(&m, NULL, need, in, out), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(&m, arena, need, NULL, out), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(NULL, arena, need, in, out), KDM_ERR_ARG);
    /* an input or output buffer that overlaps the arena (its first or last byte, or inside) is
     * refused with nothing run; the byte past the arena's end is outside it */
    uint8_t *big = aligned_alloc(4, need + 4 + 256);
    memset(big, 0, need + 4 + 256);
    memcpy(big + need, in, sizeof in);
    assert_int_equal(kdm_invoke(&m, big, need, (const int8_t *)big + need - 1, out), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(&m, big, need, (const int8_t *)big, out), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(&m, big, need, in, (int8_t *)big + need - 1), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(&m, big + 4, need, in, (int8_t *)big + 1), KDM_ERR_ARG);
    assert_int_equal(kdm_invoke(&m, big, need, (const int8_t *)big + need, out), KDM_OK);
    int8_t out2[6];
    assert_int_equal(kdm_invoke(&m, arena, need, in, out2), KDM_OK);
    assert_memory_equal(out, out2, sizeof out);
    free(big);
    assert_int_equal(kdm_invoke(&m, arena, need, in, out), KDM_OK);
    /* a model whose load failed is refused, not run */
    kdm_model bad;
    assert_int_equal(kdm_load(&bad, blob, 10), KDM_ERR_TRUNCATED);
    assert_int_equal(kdm_invoke(&bad, arena, need, in, out), KDM_ERR_ARG);
    assert_int_equal(kdm_input_size(&bad), 0);
    free(arena);
    free(blob);
}

static void test_status_and_helpers(void **state)
{
    for (int i = 0; i < KDM_STATUS_COUNT_; i++) {
        const char *s = kdm_status_str((kdm_status)i);
        assert_true(s && *s);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(s, kdm_status_str((kdm_status)j));
    }
    assert_string_equal(kdm_status_str(KDM_ERR_CRC), "CRC mismatch");
    assert_true(*kdm_status_str(KDM_STATUS_COUNT_));
    const uint8_t check[] = "123456789"; /* the CRC-32 check value */
    assert_int_equal(kdm_crc32(check, 9), 0xCBF43926u);
    assert_int_equal(kdm_crc32(check, 0), 0);
    const int8_t x[] = {-5, 7, 3, 7, -128};
    assert_int_equal(kdm_argmax_s8(x, 5), 1); /* the first of the ties */
    assert_int_equal(kdm_argmax_s8(x, 1), 0);
}

/* A model's rounding against the runtime's KDM_ROUNDING_MASK. This file builds twice: against
 * the runtime as it is (both roundings: the single-rounding model loads) and, as
 * test_kdm_load_double, against the runtime's sources compiled with KDM_ROUNDING_MASK=0x1
 * (double rounding only), which must refuse it with KDM_ERR_OP while the double-rounding model
 * runs as before (test_valid_model, the same outputs as the kernels called directly). */
static void test_rounding_mask(void **state)
{
    (void)state;
    model md;
    model_init(&md);
    md.h.flags = KDM_FLAG_SINGLE_ROUNDING;
    size_t len;
    uint8_t *blob = serialize(&md, &len);
    kdm_model m;
    assert_int_equal(kdm_load(&m, blob, len), (KDM_ROUNDING_MASK & 2u) ? KDM_OK : KDM_ERR_OP);
    md.h.flags = 0;
    free(blob);
    blob = serialize(&md, &len);
    assert_int_equal(kdm_load(&m, blob, len), (KDM_ROUNDING_MASK & 1u) ? KDM_OK : KDM_ERR_OP);
    free(blob);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_and_helpers), cmocka_unit_test(test_valid_model),
        cmocka_unit_test(test_reshape_alias),      cmocka_unit_test(test_damaged_fields),
        cmocka_unit_test(test_damaged_header),     cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_bad_arguments),      cmocka_unit_test(test_rounding_mask),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
