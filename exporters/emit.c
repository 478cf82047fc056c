/*
 * emit.c - a quantized, planned graph as a .kdm blob (through kdm_writer) and as C source.
 *
 * Constant data per op, each piece 4-aligned by the builder: packed weight rows (row_stride
 * bytes each, padding zero), int32 bias[out_c], int32 multiplier[out_c] then int8 shift[out_c],
 * then op parameters (ADD's 7 words, SOFTMAX's 256-entry table). int4 weights go two per byte,
 * low nibble first, as 4-bit two's complement. Every int32 is written little-endian byte by
 * byte. The finished blob is loaded back with kdm_load before anyone sees it, so a blob the
 * runtime would refuse is an exporter bug reported here, not on the device.
 *
 * The C export is the same bytes: model.c holds `const uint8_t kdm_model_blob[N]` (4-aligned,
 * const so it stays in flash and kdm_load reads it in place) and model.h the sizes a firmware
 * needs at compile time.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"
#include "kdm_writer.h"

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static int has_weights(const kd_export_op *o)
{
    return o->type == KDM_OP_CONV2D || o->type == KDM_OP_DEPTHWISE_CONV2D ||
           o->type == KDM_OP_FULLY_CONNECTED;
}

uint32_t kd_export_row_stride(const kd_export_op *o, uint32_t *rows)
{
    if (!has_weights(o)) {
        *rows = 0;
        return 0;
    }
    int dw = o->type == KDM_OP_DEPTHWISE_CONV2D;
    uint32_t n = dw ? (uint32_t)o->out_c : (uint32_t)o->row_len;
    *rows = dw ? (uint32_t)(o->kernel * o->kernel) : (uint32_t)o->out_c;
    uint32_t bytes = o->wbits == 4 ? (n + 1) / 2 : n;
    /* int8 convolution rows padded to 8 bytes, so that the Cortex-M4's assembly channel loop,
     * which takes K in eights, runs them whatever K is (int4 rows of 4 bytes hold 8 nibbles) */
    if (o->type == KDM_OP_CONV2D && o->wbits == 8)
        return (bytes + 7u) & ~7u;
    return (bytes + 3u) & ~3u;
}

void kd_export_op_record(const kd_export_graph *g, int i, const uint32_t data_off[4],
                         int32_t rec[KDM_OP_WORDS])
{
    const kd_export_op *o = &g->op[i];
    memset(rec, 0, sizeof(int32_t) * KDM_OP_WORDS);
    uint32_t rows;
    rec[0] = (int32_t)o->type;
    rec[1] = o->in0;
    rec[2] = o->in1 >= 0 ? o->in1 : -1;
    rec[3] = o->out;
    if (o->type != KDM_OP_FULLY_CONNECTED && o->type != KDM_OP_GLOBAL_AVGPOOL && o->kernel) {
        rec[4] = rec[5] = o->kernel;
        rec[6] = o->stride;
        rec[7] = o->pad;
    }
    rec[9] = o->act_min;
    rec[10] = o->act_max;
    if (has_weights(o)) {
        rec[8] = o->wbits;
        rec[11] = (int32_t)data_off[0];
        rec[12] = (int32_t)kd_export_row_stride(o, &rows);
        rec[13] = (int32_t)data_off[1];
        rec[14] = (int32_t)data_off[2];
    }
    if (o->nparams)
        rec[15] = (int32_t)data_off[3];
}

/* The op's weight rows in the runtime's layout, packed. */
static uint8_t *pack_weights(const kd_export_op *o, size_t *len)
{
    uint32_t rows, stride = kd_export_row_stride(o, &rows);
    *len = (size_t)rows * stride;
    uint8_t *p = calloc(*len ? *len : 1, 1);
    if (!p)
        return NULL;
    int dw = o->type == KDM_OP_DEPTHWISE_CONV2D;
    uint32_t n = dw ? (uint32_t)o->out_c : (uint32_t)o->row_len;
    for (uint32_t r = 0; r < rows; r++) {
        uint8_t *row = p + (size_t)r * stride;
        for (uint32_t j = 0; j < n; j++) {
            int8_t v = dw ? o->q[(size_t)j * o->row_len + r] : o->q[(size_t)r * o->row_len + j];
            if (o->wbits == 8)
                row[j] = (uint8_t)v;
            else
                row[j / 2] |= (uint8_t)(((uint8_t)v & 0xFu) << (4 * (j & 1)));
        }
    }
    return p;
}

static kd_status add_words(kdm_builder *b, const int32_t *w, size_t n, uint32_t *off)
{
    uint8_t *p = malloc(4 * (n ? n : 1));
    if (!p)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    for (size_t i = 0; i < n; i++)
        put_u32(p + 4 * i, (uint32_t)w[i]);
    kd_status st = kdm_builder_data(b, p, 4 * n, off);
    free(p);
    return st;
}

static kd_status build(const kd_export_graph *g, kdm_builder *b, uint8_t **blob, size_t *len)
{
    for (int i = 0; i < g->nt; i++) {
        const kd_export_tensor *t = &g->t[i];
        uint32_t bits;
        memcpy(&bits, &t->scale, 4);
        int32_t rec[KDM_TENSOR_WORDS] = {(int32_t)t->arena_off, t->c,         t->h, t->w,
                                         t->zero_point,         (int32_t)bits};
        if (kdm_builder_tensor(b, rec) < 0)
            return KD_ERR_INVALID;
    }
    for (int i = 0; i < g->nop; i++) {
        const kd_export_op *o = &g->op[i];
        uint32_t off[4] = {0, 0, 0, 0};
        if (has_weights(o)) {
            size_t wl;
            uint8_t *w = pack_weights(o, &wl);
            if (!w)
                return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
            kd_status st = kdm_builder_data(b, w, wl, &off[0]);
            free(w);
            KD_TRY(st);
            KD_TRY(add_words(b, o->bias_q, (size_t)o->out_c, &off[1]));
            /* int32 multipliers, then one int8 shift a channel (in [-31, 30]) */
            const size_t n = (size_t)o->out_c;
            uint8_t *mq = malloc(KDM_QUANT_BYTES(n));
            if (!mq)
                return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
            for (size_t c = 0; c < n; c++) {
                if (o->shift[c] < -31 || o->shift[c] > 30) { /* kd_quant_multiplier's range */
                    free(mq);
                    return KD_FAIL(KD_ERR_INVALID,
                                   "export: op %d channel %zu: shift %d outside [-31, 30]", i, c,
                                   (int)o->shift[c]);
                }
                put_u32(mq + 4 * c, (uint32_t)o->mult[c]);
                mq[4 * n + c] = (uint8_t)(int8_t)o->shift[c];
            }
            st = kdm_builder_data(b, mq, KDM_QUANT_BYTES(n), &off[2]);
            free(mq);
            KD_TRY(st);
        }
        if (o->nparams)
            KD_TRY(add_words(b, o->params, (size_t)o->nparams, &off[3]));
        int32_t rec[KDM_OP_WORDS];
        kd_export_op_record(g, i, off, rec);
        if (kdm_builder_op(b, rec) < 0)
            return KD_ERR_INVALID;
    }
    kdm_header_fields h = {.flags = g->flags,
                           .arena_size = g->arena_size,
                           .scratch_off = g->scratch_off,
                           .scratch_size = g->scratch_size,
                           .input = (uint32_t)g->input,
                           .output = (uint32_t)g->output};
    return kdm_builder_finish(b, &h, blob, len);
}

kd_status kd_export_blob(const kd_export_graph *g, uint8_t **blob, size_t *len)
{
    *blob = NULL;
    *len = 0;
    kdm_builder *b;
    KD_TRY(kdm_builder_new(&b));
    kd_status st = build(g, b, blob, len);
    kdm_builder_free(b);
    if (st != KD_OK)
        return st;
    kdm_model m;
    kdm_status ks = kdm_load(&m, *blob, *len);
    if (ks != KDM_OK) {
        free(*blob);
        *blob = NULL;
        *len = 0;
        return KD_FAIL(KD_ERR_INTERNAL,
                       "export: the runtime refuses the blob just written (kdm_load: %s): the "
                       "exporter and mcu_runtime/include/kdm.h disagree",
                       kdm_status_str(ks));
    }
    return KD_OK;
}

uint32_t kd_export_op_mask(const kd_export_graph *g)
{
    uint32_t m = 0;
    for (int i = 0; i < g->nop; i++)
        m |= KDM_OP_BIT(g->op[i].type);
    return m;
}

kd_status kd_export_c_source(const kd_export_graph *g, const uint8_t *blob, size_t len,
                             kd_export_text *h, kd_export_text *c)
{
    const kd_export_tensor *ti = &g->t[g->input], *to = &g->t[g->output];
    uint32_t sbits, obits;
    int bits = 8;
    unsigned wmask = 0; /* weight widths used, bit 1 << wbits (the runtime's KDM_WBITS_MASK) */
    for (int i = 0; i < g->nop; i++)
        if (g->op[i].wbits) {
            bits = g->op[i].wbits;
            wmask |= 1u << g->op[i].wbits;
        }
    memcpy(&sbits, &ti->scale, 4);
    memcpy(&obits, &to->scale, 4);
    h->text = c->text = NULL;
    h->len = c->len = 0;

    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    if (!f)
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    fprintf(f,
            "/*\n"
            " * model.h - an INT%d student exported by `distill export` (generated; do not edit).\n"
            " *\n"
            " * kdm_model_blob is the .kdm blob (mcu_runtime/include/kdm.h) in flash; run it with\n"
            " * an arena of KDM_MODEL_ARENA_SIZE bytes. Quantize inputs (NHWC, [%d, %d, %d]) as\n"
            " * q = clamp(round(x / KDM_MODEL_INPUT_SCALE) + KDM_MODEL_INPUT_ZERO_POINT, -128, "
            "127),\n"
            " * x the engine's normalised pixel; KDM_MODEL_INPUT_SCALE_BITS is the exact float32.\n"
            " * Build the runtime with -DKDM_OP_MASK=KDM_MODEL_OP_MASK, -DKDM_WBITS_MASK=\n"
            " * KDM_MODEL_WBITS_MASK and -DKDM_ROUNDING_MASK=KDM_MODEL_ROUNDING_MASK to link only\n"
            " * the ops, weight widths and requantization rounding the model uses.\n"
            " */\n"
            "#ifndef KDM_MODEL_H\n#define KDM_MODEL_H\n\n#include <stdint.h>\n\n"
            "#define KDM_MODEL_BLOB_LEN %zuu\n"
            "#define KDM_MODEL_ARENA_SIZE %uu\n"
            "#define KDM_MODEL_OP_MASK 0x%Xu\n"
            "#define KDM_MODEL_WBITS_MASK 0x%Xu\n"
            "#define KDM_MODEL_ROUNDING_MASK 0x%Xu\n"
            "#define KDM_MODEL_INPUT_SIZE %uu\n"
            "#define KDM_MODEL_OUTPUT_SIZE %uu\n"
            "#define KDM_MODEL_INPUT_SCALE %.9gf /* float32 bits below */\n"
            "#define KDM_MODEL_INPUT_SCALE_BITS 0x%08Xu\n"
            "#define KDM_MODEL_INPUT_ZERO_POINT (%d)\n"
            "#define KDM_MODEL_OUTPUT_SCALE %.9gf /* float32 bits 0x%08X */\n"
            "#define KDM_MODEL_OUTPUT_ZERO_POINT (%d)\n\n"
            "extern const uint8_t kdm_model_blob[KDM_MODEL_BLOB_LEN];\n"
            "extern const uint32_t kdm_model_blob_len;\n\n#endif\n",
            bits, ti->h, ti->w, ti->c, len, g->arena_size, kd_export_op_mask(g),
            wmask ? wmask : 0x110u, KDM_ROUNDING_BIT(g->flags & KDM_FLAG_SINGLE_ROUNDING),
            ti->bytes, to->bytes, (double)ti->scale, sbits, ti->zero_point, (double)to->scale,
            obits, to->zero_point);
    if (fclose(f) != 0) {
        free(buf);
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    h->text = buf;
    h->len = blen;

    buf = NULL;
    blen = 0;
    f = open_memstream(&buf, &blen);
    if (!f) {
        free(h->text);
        h->text = NULL;
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    fprintf(f,
            "/* model.c - the .kdm blob of model.h (generated by `distill export`; do not edit). "
            "*/\n"
            "#include \"model.h\"\n\n"
            "const uint32_t kdm_model_blob_len = %zuu;\n\n"
            "const uint8_t kdm_model_blob[KDM_MODEL_BLOB_LEN] __attribute__((aligned(4))) = {\n",
            len);
    for (size_t i = 0; i < len; i++)
        fprintf(f, "%s0x%02x,%s", i % 16 ? " " : "    ", blob[i],
                i % 16 == 15 || i + 1 == len ? "\n" : "");
    fprintf(f, "};\n");
    if (fclose(f) != 0) {
        free(buf);
        free(h->text);
        h->text = NULL;
        return KD_FAIL(KD_ERR_NOMEM, "export: out of memory");
    }
    c->text = buf;
    c->len = blen;
    return KD_OK;
}

void kd_export_quantize_input(const kd_export_graph *g, const float *x, float scale, int32_t zp,
                              int8_t *q)
{
    int C = g->in_c, HW = g->in_h * g->in_w;
    for (int c = 0; c < C; c++)
        for (int p = 0; p < HW; p++) {
            float v = roundf(x[(size_t)c * HW + p] / scale) + (float)zp;
            q[(size_t)p * C + c] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        }
}
