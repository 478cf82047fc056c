/*
 * kdm_fuzz_seeds.c - writes the seed corpus of the .kdm loader fuzz target: two small valid
 * blobs built with the host serializer (exporters/kdm_writer.h) that between them use every op
 * type and both weight widths, so mutations start from deep inside the format.
 *
 *   kdm_fuzz_seeds DIR     writes DIR/seed_a.kdm and DIR/seed_b.kdm; exit 0, or 1 on error
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdm_writer.h"

typedef struct {
    kdm_builder *b;
    int32_t t[8][KDM_TENSOR_WORDS];
    int nt;
    uint32_t arena, flags;
} seed;

static int tensor(seed *s, int32_t c, int32_t h, int32_t w, int32_t zp)
{
    int32_t *t = s->t[s->nt];
    t[0] = (int32_t)s->arena;
    t[1] = c;
    t[2] = h;
    t[3] = w;
    t[4] = zp;
    t[5] = 0x3D4CCCCD; /* 0.05f */
    s->arena += ((uint32_t)(c * h * w) + 3u) & ~3u;
    return s->nt++;
}

static int32_t data(seed *s, const void *p, size_t n)
{
    uint32_t off = 0;
    if (kdm_builder_data(s->b, p, n, &off) != KD_OK)
        return -1;
    return (int32_t)off;
}

/* An op record with its weighted-op arrays: rows x stride weight bytes, out_c channels. */
static void weighted(seed *s, int32_t *r, int wbits, int rows, int stride, int out_c)
{
    uint8_t w[2048];
    int32_t bias[64];
    uint8_t quant[5 * 64]; /* int32 multipliers (little-endian), then one int8 shift each */
    for (int i = 0; i < rows * stride; i++)
        w[i] = (uint8_t)(i * 37 + 11);
    for (int c = 0; c < out_c; c++) {
        bias[c] = c * 100 - 300;
        const uint32_t m = 0x50000000u + (uint32_t)c * 0x01000000u;
        for (int b = 0; b < 4; b++)
            quant[4 * c + b] = (uint8_t)(m >> (8 * b));
        quant[4 * out_c + c] = (uint8_t)(int8_t)-8;
    }
    r[8] = wbits;
    r[11] = data(s, w, (size_t)rows * stride);
    r[12] = stride;
    r[13] = data(s, bias, 4 * (size_t)out_c);
    r[14] = data(s, quant, KDM_QUANT_BYTES((size_t)out_c));
}

static void op(int32_t *r, int type, int in0, int in1, int out, int k, int stride, int pad)
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

static int finish(seed *s, int32_t (*ops)[KDM_OP_WORDS], int nops, const char *path)
{
    uint32_t scratch = 0;
    for (int i = 0; i < nops; i++) {
        const int32_t *x = s->t[ops[i][1]];
        uint32_t n = kdm_op_scratch_size(ops[i], (uint32_t)x[1], (uint32_t)x[2], (uint32_t)x[3]);
        scratch = n > scratch ? n : scratch;
    }
    kdm_header_fields h = {s->flags, s->arena + scratch, s->arena, scratch, 0, (uint32_t)s->nt - 1};
    for (int i = 0; i < s->nt; i++)
        if (kdm_builder_tensor(s->b, s->t[i]) < 0)
            return 1;
    for (int i = 0; i < nops; i++)
        if (kdm_builder_op(s->b, ops[i]) < 0)
            return 1;
    uint8_t *blob;
    size_t len;
    if (kdm_builder_finish(s->b, &h, &blob, &len) != KD_OK)
        return 1;
    kdm_model m;
    FILE *f = fopen(path, "wb");
    int bad = kdm_load(&m, blob, len) != KDM_OK || !f || fwrite(blob, 1, len, f) != len;
    if (f && fclose(f) != 0)
        bad = 1;
    kdm_builder_free(s->b);
    free(blob);
    if (bad)
        fprintf(stderr, "kdm_fuzz_seeds: cannot write a valid %s\n", path);
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: kdm_fuzz_seeds DIR\n");
        return 1;
    }
    char path[4096];
    int32_t lut[256];
    for (int d = 0; d < 256; d++)
        lut[d] = 65536 >> (d / 16);
    int32_t add_p[7] = {20, 0x55555555, -1, 0x60000000, -1, 0x50000000, -19};

    /* A: conv s8 3x3 -> depthwise s4 -> max pool -> add -> global pool -> fc s8 -> softmax */
    seed a = {0};
    int32_t oa[7][KDM_OP_WORDS];
    if (kdm_builder_new(&a.b) != KD_OK)
        return 1;
    int x = tensor(&a, 4, 6, 6, -3), c1 = tensor(&a, 8, 6, 6, 1), d1 = tensor(&a, 8, 6, 6, 0);
    int p1 = tensor(&a, 8, 6, 6, 0), s1 = tensor(&a, 8, 6, 6, 2), g1 = tensor(&a, 8, 1, 1, 2);
    int f1 = tensor(&a, 5, 1, 1, 0), o1 = tensor(&a, 5, 1, 1, -128);
    op(oa[0], KDM_OP_CONV2D, x, -1, c1, 3, 1, 1);
    weighted(&a, oa[0], 8, 8, 36, 8);
    op(oa[1], KDM_OP_DEPTHWISE_CONV2D, c1, -1, d1, 3, 1, 1);
    weighted(&a, oa[1], 4, 9, 4, 8);
    op(oa[2], KDM_OP_MAXPOOL2D, d1, -1, p1, 3, 1, 1);
    op(oa[3], KDM_OP_ADD, p1, c1, s1, 0, 0, 0);
    oa[3][15] = data(&a, add_p, sizeof add_p);
    op(oa[4], KDM_OP_GLOBAL_AVGPOOL, s1, -1, g1, 0, 0, 0);
    op(oa[5], KDM_OP_FULLY_CONNECTED, g1, -1, f1, 0, 0, 0);
    weighted(&a, oa[5], 8, 5, 8, 5);
    op(oa[6], KDM_OP_SOFTMAX, f1, -1, o1, 0, 0, 0);
    oa[6][15] = data(&a, lut, sizeof lut);
    snprintf(path, sizeof path, "%s/seed_a.kdm", argv[1]);
    if (finish(&a, oa, 7, path))
        return 1;

    /* B: conv s4 1x1 stride 2 -> average pool -> reshape -> fc s4, single rounding */
    seed b = {0};
    b.flags = KDM_FLAG_SINGLE_ROUNDING;
    int32_t ob[4][KDM_OP_WORDS];
    if (kdm_builder_new(&b.b) != KD_OK)
        return 1;
    x = tensor(&b, 5, 8, 8, 7);
    c1 = tensor(&b, 6, 4, 4, -2);
    p1 = tensor(&b, 6, 2, 2, -2);
    g1 = tensor(&b, 24, 1, 1, -2);
    f1 = tensor(&b, 3, 1, 1, 0);
    op(ob[0], KDM_OP_CONV2D, x, -1, c1, 1, 2, 0);
    weighted(&b, ob[0], 4, 6, 4, 6);
    op(ob[1], KDM_OP_AVGPOOL2D, c1, -1, p1, 2, 2, 0);
    op(ob[2], KDM_OP_RESHAPE, p1, -1, g1, 0, 0, 0);
    op(ob[3], KDM_OP_FULLY_CONNECTED, g1, -1, f1, 0, 0, 0);
    weighted(&b, ob[3], 4, 3, 12, 3);
    snprintf(path, sizeof path, "%s/seed_b.kdm", argv[1]);
    return finish(&b, ob, 4, path);
}
