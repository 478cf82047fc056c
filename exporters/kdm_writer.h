/*
 * kdm_writer.h - host-side serializer of .kdm blobs (format: mcu_runtime/include/kdm.h).
 *
 * The builder knows nothing of networks: the exporter (or a test) appends constant data,
 * tensor records and op records, and finish() lays the blob out as
 *     header (64 bytes) | constant data | tensor table | op table
 * and stamps total_len and the CRC. Constant data offsets are final when appended
 * (data_off is always KDM_HEADER_SIZE), so op records can name them right away.
 *
 *     kdm_builder *b;
 *     KD_TRY(kdm_builder_new(&b));
 *     uint32_t woff;
 *     KD_TRY(kdm_builder_data(b, weights, nbytes, &woff));      // 4-aligned
 *     int t0 = kdm_builder_tensor(b, rec0), t1 = kdm_builder_tensor(b, rec1);
 *     kdm_builder_op(b, op_rec);
 *     uint8_t *blob; size_t len;
 *     KD_TRY(kdm_builder_finish(b, &hdr, &blob, &len));       // caller frees blob
 *     kdm_builder_free(b);
 */
#ifndef KDM_WRITER_H
#define KDM_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "../engine/status.h"
#include "kdm.h"

typedef struct kdm_builder kdm_builder;

/* Header fields the caller decides; the rest (counts, offsets, lengths, CRC) are computed. */
typedef struct {
    uint32_t flags;
    uint32_t arena_size, scratch_off, scratch_size;
    uint32_t input, output;
} kdm_header_fields;

kd_status kdm_builder_new(kdm_builder **out);
void kdm_builder_free(kdm_builder *b);

/* Append n bytes of constant data (zero-padded to a multiple of 4); *off = its byte offset in
 * the finished blob. */
kd_status kdm_builder_data(kdm_builder *b, const void *p, size_t n, uint32_t *off);

/* Append a tensor / op record; return its index, or -1 when out of memory or past
 * KDM_MAX_TENSORS / KDM_MAX_OPS (with the error recorded). */
int kdm_builder_tensor(kdm_builder *b, const int32_t rec[KDM_TENSOR_WORDS]);
int kdm_builder_op(kdm_builder *b, const int32_t rec[KDM_OP_WORDS]);

/* Lay out the blob into a new malloc'd buffer (*blob, *len). The builder stays usable. */
kd_status kdm_builder_finish(const kdm_builder *b, const kdm_header_fields *h, uint8_t **blob,
                             size_t *len);

#endif
