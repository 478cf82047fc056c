/*
 * kdm_writer.c - lay out a .kdm blob (format: mcu_runtime/include/kdm.h).
 *
 * Layout: header | constant data | tensor table | op table. Constant data is appended as the
 * exporter goes, each piece zero-padded to 4 bytes, so its offsets are final at once; the two
 * tables are copied behind it by finish(), which also fills the counts and offsets and stamps
 * the CRC over everything after the first 16 bytes. All fields are written little-endian byte
 * by byte, whatever the host's order.
 */
#include "kdm_writer.h"

#include <stdlib.h>
#include <string.h>

struct kdm_builder {
    uint8_t *data;
    size_t data_len, data_cap;
    int32_t *tensors, *ops;
    uint32_t n_tensors, n_ops, cap_tensors, cap_ops;
};

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

kd_status kdm_builder_new(kdm_builder **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out)
        return KD_FAIL(KD_ERR_NOMEM, "kdm writer: out of memory");
    return KD_OK;
}

void kdm_builder_free(kdm_builder *b)
{
    if (!b)
        return;
    free(b->data);
    free(b->tensors);
    free(b->ops);
    free(b);
}

kd_status kdm_builder_data(kdm_builder *b, const void *p, size_t n, uint32_t *off)
{
    size_t padded = (n + 3) & ~(size_t)3;
    if (b->data_len + padded > (size_t)UINT32_MAX / 2)
        return KD_FAIL(KD_ERR_INVALID, "kdm writer: constant data past 2 GiB");
    if (b->data_len + padded > b->data_cap) {
        size_t cap = b->data_cap ? b->data_cap : 4096;
        while (cap < b->data_len + padded)
            cap *= 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d)
            return KD_FAIL(KD_ERR_NOMEM, "kdm writer: out of memory");
        b->data = d;
        b->data_cap = cap;
    }
    if (n)
        memcpy(b->data + b->data_len, p, n);
    memset(b->data + b->data_len + n, 0, padded - n);
    *off = (uint32_t)(KDM_HEADER_SIZE + b->data_len);
    b->data_len += padded;
    return KD_OK;
}

/* Append one record of `words` int32 to a growing table; the index, or -1. */
static int table_add(int32_t **tab, uint32_t *n, uint32_t *cap, uint32_t max, size_t words,
                     const int32_t *rec, const char *what)
{
    if (*n >= max) {
        KD_FAIL(KD_ERR_INVALID, "kdm writer: more than %u %s", (unsigned)max, what);
        return -1;
    }
    if (*n == *cap) {
        uint32_t c = *cap ? *cap * 2 : 16;
        int32_t *t = realloc(*tab, (size_t)c * words * sizeof(int32_t));
        if (!t) {
            KD_FAIL(KD_ERR_NOMEM, "kdm writer: out of memory");
            return -1;
        }
        *tab = t;
        *cap = c;
    }
    memcpy(*tab + (size_t)*n * words, rec, words * sizeof(int32_t));
    return (int)(*n)++;
}

int kdm_builder_tensor(kdm_builder *b, const int32_t rec[KDM_TENSOR_WORDS])
{
    return table_add(&b->tensors, &b->n_tensors, &b->cap_tensors, KDM_MAX_TENSORS, KDM_TENSOR_WORDS,
                     rec, "tensors");
}

int kdm_builder_op(kdm_builder *b, const int32_t rec[KDM_OP_WORDS])
{
    return table_add(&b->ops, &b->n_ops, &b->cap_ops, KDM_MAX_OPS, KDM_OP_WORDS, rec, "ops");
}

kd_status kdm_builder_finish(const kdm_builder *b, const kdm_header_fields *h, uint8_t **blob,
                             size_t *len)
{
    *blob = NULL;
    *len = 0;
    size_t toff = KDM_HEADER_SIZE + b->data_len;
    size_t ooff = toff + (size_t)b->n_tensors * KDM_TENSOR_WORDS * 4;
    size_t total = ooff + (size_t)b->n_ops * KDM_OP_WORDS * 4;
    if (total > UINT32_MAX)
        return KD_FAIL(KD_ERR_INVALID, "kdm writer: blob of %zu bytes is too large", total);
    uint8_t *p = calloc(1, total);
    if (!p)
        return KD_FAIL(KD_ERR_NOMEM, "kdm writer: out of memory");
    const uint32_t hdr[16] = {
        KDM_MAGIC,      KDM_VERSION,     (uint32_t)total, 0, /* crc, below */
        h->flags,       b->n_tensors,    b->n_ops,        h->arena_size,
        h->scratch_off, h->scratch_size, h->input,        h->output,
        (uint32_t)toff, (uint32_t)ooff,  KDM_HEADER_SIZE, (uint32_t)b->data_len};
    for (int i = 0; i < 16; i++)
        put_u32(p + 4 * i, hdr[i]);
    if (b->data_len)
        memcpy(p + KDM_HEADER_SIZE, b->data, b->data_len);
    for (size_t i = 0; i < (size_t)b->n_tensors * KDM_TENSOR_WORDS; i++)
        put_u32(p + toff + 4 * i, (uint32_t)b->tensors[i]);
    for (size_t i = 0; i < (size_t)b->n_ops * KDM_OP_WORDS; i++)
        put_u32(p + ooff + 4 * i, (uint32_t)b->ops[i]);
    put_u32(p + 12, kdm_crc32(p + 16, total - 16));
    *blob = p;
    *len = total;
    return KD_OK;
}
