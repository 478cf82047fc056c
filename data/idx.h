/*
 * idx.h - reader for the IDX format used by MNIST-style data sets.
 *
 * An IDX file is a 4-byte magic (0, 0, element type, number of dimensions),
 * one big-endian uint32 per dimension, then the elements in row-major order.
 * Only unsigned-byte files (type 0x08, what MNIST and Fashion-MNIST ship) are
 * accepted. The file may be gzip-compressed or raw; zlib reads both. A loaded
 * kd_idx owns its data buffer; dims beyond ndim are zero.
 */
#ifndef KD_IDX_H
#define KD_IDX_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define KD_IDX_MAX_DIMS 4

typedef struct {
    int ndim;
    int64_t dims[KD_IDX_MAX_DIMS];
    uint8_t *data; /* size bytes, product of dims; NULL only when size is 0 */
    size_t size;
} kd_idx;

/*
 * Load the IDX file at path (gzip or raw). On failure *out is zeroed and the
 * message names the path: KD_ERR_NOT_FOUND for a missing file, KD_ERR_FORMAT
 * for a bad header, truncation, trailing bytes or a corrupt gzip stream.
 */
kd_status kd_idx_load(const char *path, kd_idx *out);

/* Release the data and zero the struct; safe on a zeroed struct. */
void kd_idx_free(kd_idx *idx);

#endif
