/*
 * cmsis_nn_layers.c - firmware D: every weighted layer of an exported model run by the kdm
 * runtime and by Arm's CMSIS-NN (the kernels TensorFlow Lite Micro calls on Cortex-M), on the
 * same input bytes, with the same weights and requantization constants; the instructions each
 * takes and whether their output bytes are equal. CMSIS-NN is not part of this project: the
 * firmware is built only when CMake is given -DCMSIS_NN_DIR=<a CMSIS-NN source tree>
 * (bench/mcu/run.sh cmsis EXPORT_DIR CMSIS_NN_DIR). Written against the API of
 * arm_nnfunctions.h V.16.0.0 (April 2024, the copy TFLite Micro vendored then); later releases
 * changed some signatures (arm_convolve_s8, arm_vector_sum_s8, per-channel fully-connected).
 *
 * kdm_invoke runs once on the same pseudo-random input as firmware B, so that every tensor in
 * the arena holds a real activation. Then, for each conv2d / dwconv2d / fc op:
 *   - kdm: the op alone through kdm_invoke_op, timed as in firmware B;
 *     Ops without weights run too, untimed, so that every layer reads real activations.
 *   - CMSIS-NN: the op's arguments in CMSIS-NN's form, made once outside the timing as a
 *     TFLite Micro Prepare step would: weights copied without the blob's row padding (CMSIS-NN
 *     wants dense tensors; int4 packed two per byte, low nibble first, continuing across rows),
 *     the bias with the input zero-point unfolded (CMSIS-NN adds the input offset itself:
 *     b_cmsis[o] = b_kdm[o] + in_zp * sum_k w[o][k]), the per-channel multipliers and shifts as
 *     they are (the same Q31 / exponent convention), the activation clamp as it is. int8 layers
 *     go through the wrappers TFLite Micro calls (arm_convolve_wrapper_s8,
 *     arm_depthwise_conv_wrapper_s8, which pick the 1x1 / 3x3 / general kernel), int4 layers
 *     through the kernel the int4 wrappers pick for them (arm_convolve_1x1_s4_fast,
 *     arm_convolve_s4, arm_depthwise_conv_s4_opt). CMSIS-NN's fully-connected kernels take
 *     one multiplier per layer: a layer with one per output (the exporter's default) runs as a
 *     1x1 convolution of a 1x1 image.
 *   - the two outputs (each first filled with a different byte) compared byte for byte: both
 *     must agree, CMSIS-NN being bit-exact with TFLite's reference kernels. CMSIS-NN's rounding
 *     is fixed when it is compiled: the model's (the blob's flags) must be the one it was
 *     built for (FW_CMSIS_SINGLE_ROUNDING, from CMake's CMSIS_NN_ROUNDING), or the run stops.
 *   The kdm figure includes kdm_invoke_op's dispatch (a few dozen instructions per call).
 * Output: "model rounding=<single|double>", then one line per layer (parsed by run.sh):
 *   cmsis op=<i> type=<name> wbits=<8|4> in=<c>x<h>x<w> out=<c>x<h>x<w> k=<kh>x<kw> s=<stride>
 *         macs=<n> kdm_instr=<per run> cmsis_instr=<per run, 0: no kernel> mismatch=<bytes
 *         differing> scratch=<CMSIS-NN buffer bytes> fn=<CMSIS-NN function>
 * Exit status 0 when every layer matched, 3 on a mismatch, 2 on an error.
 */
#include <stdint.h>
#include <string.h>

#include "arm_nnfunctions.h"
#include "fw.h"
#include "kdm.h"
#include "model.h"
#include "fw_blob.h" /* after model.h */

#ifndef FW_CMSIS_SINGLE_ROUNDING
#define FW_CMSIS_SINGLE_ROUNDING 0 /* how CMSIS-NN was compiled (CMake CMSIS_NN_ROUNDING) */
#endif
#define FW_MIN_TICKS   FW_TICKS_FOR(1000000u)
#define FW_MAX_REPS    64u
#define FW_MAX_WEIGHTS 524288u /* dense weight bytes of the largest layer (QEMU gives 4 MiB) */
#define FW_MAX_CH      1024u
#define FW_MAX_BUF     32768u /* CMSIS-NN scratch */

static uint8_t arena[KDM_MODEL_ARENA_SIZE] __attribute__((aligned(8)));
static int8_t input[FW_IN_SIZE], output[FW_OUT_SIZE];
static int8_t cm_weights[FW_MAX_WEIGHTS] __attribute__((aligned(4)));
static int32_t cm_bias[FW_MAX_CH], cm_mult[FW_MAX_CH], cm_shift[FW_MAX_CH];
static int32_t cm_buf[FW_MAX_BUF / 4];
static int8_t cm_out[65536] __attribute__((aligned(4)));

typedef struct {
    uint32_t off;
    int32_t c, h, w, zp;
} tensor;

static tensor tensor_at(uint32_t tensors_off, int32_t t)
{
    uint32_t a = (uint32_t)t * KDM_TENSOR_WORDS;
    tensor r = {(uint32_t)blob_word(tensors_off, a), blob_word(tensors_off, a + 1),
                blob_word(tensors_off, a + 2), blob_word(tensors_off, a + 3),
                blob_word(tensors_off, a + 4)};
    return r;
}

static void put_shape(const char *key, const tensor *t)
{
    fw_putc(' ');
    fw_puts(key);
    fw_putc('=');
    fw_put_u32((uint32_t)t->c);
    fw_putc('x');
    fw_put_u32((uint32_t)t->h);
    fw_putc('x');
    fw_put_u32((uint32_t)t->w);
}

static int fail(const char *what, const char *why)
{
    fw_puts("error ");
    fw_puts(what);
    fw_puts(": ");
    fw_puts(why);
    fw_putc('\n');
    return 2;
}

/* Weight (r, k) of a blob layout: rows row_stride bytes apart, int8 or int4 (low nibble first). */
static int32_t weight_at(const uint8_t *w, int32_t wbits, int32_t row_stride, int32_t r, int32_t k)
{
    const uint8_t *row = w + (uint32_t)r * (uint32_t)row_stride;
    if (wbits == 8)
        return (int8_t)row[k];
    int32_t nib = (row[k >> 1] >> ((k & 1) * 4)) & 15;
    return nib >= 8 ? nib - 16 : nib;
}

/* Dense copy: n_rows x row_len values in row order; int4 two per byte, low nibble first,
 * continuing across rows. */
static void dense_weights(const uint8_t *w, int32_t wbits, int32_t row_stride, int32_t n_rows,
                          int32_t row_len)
{
    uint32_t n = (uint32_t)n_rows * (uint32_t)row_len;
    if (wbits == 4)
        memset(cm_weights, 0, (n + 1) / 2);
    for (int32_t r = 0; r < n_rows; r++)
        for (int32_t k = 0; k < row_len; k++) {
            int32_t v = weight_at(w, wbits, row_stride, r, k);
            uint32_t i = (uint32_t)r * (uint32_t)row_len + (uint32_t)k;
            if (wbits == 8)
                cm_weights[i] = (int8_t)v;
            else
                cm_weights[i >> 1] =
                    (int8_t)((uint8_t)cm_weights[i >> 1] | (uint8_t)((v & 15) << ((i & 1) * 4)));
        }
}

/* Instructions per call of fn(arg), timed like firmware B. */
typedef int (*runner)(void *arg);
static uint64_t time_it(runner fn, void *arg, int *status)
{
    uint32_t t0 = fw_ticks();
    *status = fn(arg);
    uint32_t t1 = fw_ticks(), once = fw_tick_span(t0, t1), reps = 1;
    while (reps < FW_MAX_REPS && reps * once < FW_MIN_TICKS)
        reps *= 2;
    t0 = fw_ticks();
    for (uint32_t r = 0; r < reps; r++)
        fn(arg);
    t1 = fw_ticks();
    return fw_ticks_to_instr(fw_tick_span(t0, t1)) / reps;
}

typedef struct {
    kdm_model *m;
    uint32_t i;
} kdm_call;

static int run_kdm(void *arg)
{
    kdm_call *c = (kdm_call *)arg;
    return kdm_invoke_op(c->m, arena, sizeof arena, c->i) == KDM_OK ? 0 : 1;
}

/* The CMSIS-NN function a layer runs through. int8: the wrappers TensorFlow Lite Micro calls
 * (they pick the 1x1 / 3x3 / general kernel themselves). int4: the kernel the wrapper would pick,
 * called directly (1x1 convolution with stride 1 and no padding; depthwise _opt). */
typedef enum {
    CM_NONE,       /* no CMSIS-NN kernel for this layer here */
    CM_CONV_S8,    /* arm_convolve_wrapper_s8 */
    CM_DW_S8,      /* arm_depthwise_conv_wrapper_s8 */
    CM_FC_S8,      /* arm_fully_connected_s8 (one multiplier for the layer) */
    CM_CONV1X1_S4, /* arm_convolve_1x1_s4_fast */
    CM_CONV_S4,    /* arm_convolve_s4 */
    CM_DW_S4,      /* arm_depthwise_conv_s4_opt */
    CM_FC_S4       /* arm_fully_connected_s4 (one multiplier for the layer) */
} cm_kind;

static const char *const cm_names[] = {
    "none",
    "arm_convolve_wrapper_s8",
    "arm_depthwise_conv_wrapper_s8",
    "arm_fully_connected_s8",
    "arm_convolve_1x1_s4_fast",
    "arm_convolve_s4",
    "arm_depthwise_conv_s4_opt",
    "arm_fully_connected_s4",
};

/* Everything a CMSIS-NN call takes. */
typedef struct {
    cm_kind kind;
    cmsis_nn_context ctx;
    cmsis_nn_conv_params conv;
    cmsis_nn_dw_conv_params dw;
    cmsis_nn_fc_params fc;
    cmsis_nn_per_channel_quant_params pcq;
    cmsis_nn_per_tensor_quant_params ptq;
    cmsis_nn_dims in_d, f_d, b_d, o_d;
    const int8_t *in;
} cmsis_call;

/* Only the weight widths the model uses are referenced, so the link holds only their CMSIS-NN
 * kernels (the code-size figure of run.sh). */
#if defined(KDM_MODEL_WBITS_MASK)
#define FW_W8 ((KDM_MODEL_WBITS_MASK >> 8) & 1u)
#define FW_W4 ((KDM_MODEL_WBITS_MASK >> 4) & 1u)
#else
#define FW_W8 1
#define FW_W4 1
#endif

static int run_cmsis(void *arg)
{
    cmsis_call *c = (cmsis_call *)arg;
    arm_cmsis_nn_status st = ARM_CMSIS_NN_ARG_ERROR;
    switch (c->kind) {
#if FW_W8
    case CM_CONV_S8:
        st = arm_convolve_wrapper_s8(&c->ctx, &c->conv, &c->pcq, &c->in_d, c->in, &c->f_d,
                                     cm_weights, &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
    case CM_DW_S8:
        st = arm_depthwise_conv_wrapper_s8(&c->ctx, &c->dw, &c->pcq, &c->in_d, c->in, &c->f_d,
                                           cm_weights, &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
    case CM_FC_S8:
        st = arm_fully_connected_s8(&c->ctx, &c->fc, &c->ptq, &c->in_d, c->in, &c->f_d, cm_weights,
                                    &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
#endif
#if FW_W4
    case CM_CONV1X1_S4:
        st = arm_convolve_1x1_s4_fast(&c->ctx, &c->conv, &c->pcq, &c->in_d, c->in, &c->f_d,
                                      cm_weights, &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
    case CM_CONV_S4:
        st = arm_convolve_s4(&c->ctx, &c->conv, &c->pcq, &c->in_d, c->in, &c->f_d, cm_weights,
                             &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
    case CM_DW_S4:
        st = arm_depthwise_conv_s4_opt(&c->ctx, &c->dw, &c->pcq, &c->in_d, c->in, &c->f_d,
                                       cm_weights, &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
    case CM_FC_S4:
        st = arm_fully_connected_s4(&c->ctx, &c->fc, &c->ptq, &c->in_d, c->in, &c->f_d, cm_weights,
                                    &c->b_d, cm_bias, &c->o_d, cm_out);
        break;
#endif
    default: break;
    }
    return st == ARM_CMSIS_NN_SUCCESS ? 0 : 1;
}

int main(void)
{
    fw_put_calib();

    kdm_model m;
    kdm_status st = kdm_load(&m, kdm_model_blob, kdm_model_blob_len);
    if (st != KDM_OK)
        return fail("kdm_load", kdm_status_str(st));
    uint32_t seed = 12345u; /* the input of firmware B */
    for (uint32_t i = 0; i < sizeof input; i++) {
        seed = seed * 1664525u + 1013904223u;
        input[i] = (int8_t)(seed >> 24);
    }
    st = kdm_invoke(&m, arena, sizeof arena, input, output);
    if (st != KDM_OK)
        return fail("kdm_invoke", kdm_status_str(st));

    /* CMSIS-NN rounds one way, chosen when it is compiled (CMSIS_NN_USE_SINGLE_ROUNDING) */
    const int single = ((uint32_t)blob_word(16, 0) & KDM_FLAG_SINGLE_ROUNDING) != 0;
    fw_puts(single ? "model rounding=single\n" : "model rounding=double\n");
    if (single != FW_CMSIS_SINGLE_ROUNDING)
        return fail("rounding", single ? "the model rounds once (--rounding single), CMSIS-NN was "
                                         "built for double rounding: CMSIS_NN_ROUNDING=single"
                                       : "the model uses double rounding, CMSIS-NN was built for "
                                         "single rounding: CMSIS_NN_ROUNDING=double");
    const uint32_t n_ops = (uint32_t)blob_word(24, 0), tensors_off = (uint32_t)blob_word(48, 0);
    const uint32_t ops_off = (uint32_t)blob_word(52, 0);
    int bad = 0;
    for (uint32_t i = 0; i < n_ops; i++) {
        const uint32_t a = i * KDM_OP_WORDS;
        const int32_t type = blob_word(ops_off, a);
        if (type != KDM_OP_CONV2D && type != KDM_OP_DEPTHWISE_CONV2D &&
            type != KDM_OP_FULLY_CONNECTED) {
            /* run, untimed, so that the next layer reads this op's real output (repeating the
             * layers before it may have reused its arena bytes) */
            if (kdm_invoke_op(&m, arena, sizeof arena, i) != KDM_OK)
                return fail(op_name(type), "kdm_invoke_op failed");
            continue;
        }
        const tensor tin = tensor_at(tensors_off, blob_word(ops_off, a + 1));
        const tensor tout = tensor_at(tensors_off, blob_word(ops_off, a + 3));
        const int32_t kh = blob_word(ops_off, a + 4), kw = blob_word(ops_off, a + 5);
        const int32_t stride = blob_word(ops_off, a + 6), pad = blob_word(ops_off, a + 7);
        const int32_t wbits = blob_word(ops_off, a + 8);
        const int32_t act_min = blob_word(ops_off, a + 9), act_max = blob_word(ops_off, a + 10);
        const uint8_t *w = kdm_model_blob + blob_word(ops_off, a + 11);
        const int32_t row_stride = blob_word(ops_off, a + 12);
        const uint32_t bias_off = (uint32_t)blob_word(ops_off, a + 13);
        const uint32_t quant_off = (uint32_t)blob_word(ops_off, a + 14);
        const int32_t out_c = tout.c, n_out = tout.c * tout.h * tout.w;
        if (out_c > (int32_t)FW_MAX_CH || n_out > (int32_t)sizeof cm_out)
            return fail("layer", "too large for the firmware's buffers");

        /* rows and row length in the blob's layout (kdm.h) */
        int32_t n_rows, row_len;
        if (type == KDM_OP_CONV2D) {
            n_rows = out_c;
            row_len = kh * kw * tin.c;
        } else if (type == KDM_OP_DEPTHWISE_CONV2D) {
            n_rows = kh * kw;
            row_len = tin.c;
        } else {
            n_rows = out_c;
            row_len = tin.c * tin.h * tin.w;
        }
        if ((uint32_t)n_rows * (uint32_t)row_len > FW_MAX_WEIGHTS)
            return fail("layer", "weights too large for the firmware's buffer");
        dense_weights(w, wbits, row_stride, n_rows, row_len);
        for (int32_t o = 0; o < out_c; o++) {
            int32_t sum = 0;
            if (type == KDM_OP_DEPTHWISE_CONV2D)
                for (int32_t r = 0; r < n_rows; r++)
                    sum += weight_at(w, wbits, row_stride, r, o);
            else
                for (int32_t k = 0; k < row_len; k++)
                    sum += weight_at(w, wbits, row_stride, o, k);
            cm_bias[o] =
                (int32_t)((uint32_t)blob_word(bias_off, (uint32_t)o) + (uint32_t)(tin.zp * sum));
            cm_mult[o] = blob_word(quant_off, (uint32_t)o);
            cm_shift[o] = (int8_t)kdm_model_blob[quant_off + 4u * (uint32_t)out_c + (uint32_t)o];
        }

        const char *type_shown = op_name(type);
        int per_tensor = 1;
        for (int32_t o = 1; o < out_c; o++)
            per_tensor &= cm_mult[o] == cm_mult[0] && cm_shift[o] == cm_shift[0];

        cmsis_call c;
        memset(&c, 0, sizeof c);
        c.in = (const int8_t *)(arena + tin.off);
        c.pcq.multiplier = cm_mult;
        c.pcq.shift = cm_shift;
        c.ptq.multiplier = cm_mult[0];
        c.ptq.shift = cm_shift[0];
        c.in_d = (cmsis_nn_dims){1, tin.h, tin.w, tin.c};
        c.o_d = (cmsis_nn_dims){1, tout.h, tout.w, tout.c};
        c.b_d = (cmsis_nn_dims){1, 1, 1, out_c};
        const cmsis_nn_activation act = {act_min, act_max};
        c.conv =
            (cmsis_nn_conv_params){-tin.zp, tout.zp, {stride, stride}, {pad, pad}, {1, 1}, act};
        c.dw = (cmsis_nn_dw_conv_params){-tin.zp,    tout.zp, 1,  {stride, stride},
                                         {pad, pad}, {1, 1},  act};
        c.fc = (cmsis_nn_fc_params){-tin.zp, 0, tout.zp, act};
        int32_t buf_size = 0;
        if (type == KDM_OP_FULLY_CONNECTED) {
            c.in_d = (cmsis_nn_dims){1, 1, 1, row_len};
            c.o_d = (cmsis_nn_dims){1, 1, 1, out_c};
            if (per_tensor) {
                c.f_d = (cmsis_nn_dims){row_len, 1, 1, out_c};
                c.kind = wbits == 8 ? CM_FC_S8 : CM_FC_S4;
#if FW_W8
                if (wbits == 8)
                    buf_size = arm_fully_connected_s8_get_buffer_size(&c.f_d);
#endif
            } else {
                /* CMSIS-NN's fully-connected takes one multiplier for the layer; with one per
                 * output it runs as what it is, a 1x1 convolution of a 1x1 image */
                type_shown = "fc-as-1x1";
                c.conv.stride = (cmsis_nn_tile){1, 1};
                c.conv.padding = (cmsis_nn_tile){0, 0};
                c.f_d = (cmsis_nn_dims){out_c, 1, 1, row_len};
            }
        } else if (type == KDM_OP_CONV2D) {
            c.f_d = (cmsis_nn_dims){out_c, kh, kw, tin.c};
        } else {
            c.f_d = (cmsis_nn_dims){1, kh, kw, out_c};
        }
        if (c.kind == CM_NONE && (type == KDM_OP_CONV2D || type == KDM_OP_FULLY_CONNECTED)) {
            const int pointwise =
                c.f_d.h == 1 && c.f_d.w == 1 && c.conv.stride.w == 1 && c.conv.padding.w == 0;
            c.kind = wbits == 8 ? CM_CONV_S8 : pointwise ? CM_CONV1X1_S4 : CM_CONV_S4;
#if FW_W8
            if (wbits == 8)
                buf_size =
                    arm_convolve_wrapper_s8_get_buffer_size(&c.conv, &c.in_d, &c.f_d, &c.o_d);
#endif
#if FW_W4
            if (wbits == 4)
                buf_size = pointwise ? arm_convolve_1x1_s4_fast_get_buffer_size(&c.in_d)
                                     : arm_convolve_s4_get_buffer_size(&c.in_d, &c.f_d);
#endif
        } else if (type == KDM_OP_DEPTHWISE_CONV2D) {
            c.kind = wbits == 8 ? CM_DW_S8 : CM_DW_S4;
#if FW_W8
            if (wbits == 8)
                buf_size =
                    arm_depthwise_conv_wrapper_s8_get_buffer_size(&c.dw, &c.in_d, &c.f_d, &c.o_d);
#endif
#if FW_W4
            if (wbits == 4)
                buf_size = arm_depthwise_conv_s4_opt_get_buffer_size(&c.in_d, &c.f_d);
#endif
        }
        if (buf_size < 0 || buf_size > (int32_t)FW_MAX_BUF)
            return fail("layer", "CMSIS-NN scratch too large for the firmware's buffer");
        /* a buffer even when it is 0 bytes: some kernels refuse a NULL one */
        c.ctx.buf = cm_buf;
        c.ctx.size = buf_size;

        /* both outputs start from different bytes, so equal outputs mean both wrote them */
        int8_t *ours = (int8_t *)(arena + tout.off);
        memset(ours, 0x5A, (size_t)n_out);
        memset(cm_out, 0xA5, (size_t)n_out);
        kdm_call kc = {&m, i};
        int s1 = 0, s2 = 0;
        const uint64_t kdm_instr = time_it(run_kdm, &kc, &s1);
        const uint64_t cm_instr = c.kind == CM_NONE ? 0 : time_it(run_cmsis, &c, &s2);
        if (s1 || s2)
            return fail(op_name(type), s1 ? "kdm_invoke_op failed" : "CMSIS-NN returned an error");
        const uint32_t macs = kdm_op_macs(&m, i);
        /* no Cortex-M retires more than two MACs per instruction: fewer means a kernel did not
         * run */
        if (kdm_instr * 2u < macs || (c.kind != CM_NONE && cm_instr * 2u < macs))
            return fail(op_name(type), "fewer instructions than MACs / 2: a kernel did not run");
        uint32_t mismatch = 0;
        for (int32_t j = 0; c.kind != CM_NONE && j < n_out; j++)
            mismatch += ours[j] != cm_out[j];
        bad |= mismatch != 0;

        fw_puts("cmsis");
        fw_put_kv("op", i);
        fw_puts(" type=");
        fw_puts(type_shown);
        fw_put_kv("wbits", (uint32_t)wbits);
        put_shape("in", &tin);
        put_shape("out", &tout);
        fw_put_kv("k", (uint32_t)kh);
        fw_putc('x');
        fw_put_u32((uint32_t)kw);
        fw_put_kv("s", (uint32_t)stride);
        fw_put_kv("macs", macs);
        fw_puts(" kdm_instr=");
        fw_put_u64(kdm_instr);
        fw_puts(" cmsis_instr=");
        fw_put_u64(cm_instr);
        fw_put_kv("mismatch", mismatch);
        fw_put_kv("scratch", (uint32_t)buf_size);
        fw_puts(" fn=");
        fw_puts(cm_names[c.kind]);
        fw_putc('\n');
    }
    return bad ? 3 : 0;
}
