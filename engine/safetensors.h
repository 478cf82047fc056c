/*
 * safetensors.h - reading and writing the safetensors format.
 *
 * Layout: 8-byte little-endian header length N, N bytes of JSON header
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value", ...}}
 * then the byte buffer; offsets are relative to the start of the buffer.
 * Names are PyTorch state_dict names, so files interoperate with
 * safetensors.torch.save_file / load_file. Tensor bytes are little-endian.
 */
#ifndef KD_SAFETENSORS_H
#define KD_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *name;
    kd_dtype dtype;
    int ndim;                   /* 0..KD_MAX_DIMS (0 = scalar) */
    int64_t shape[KD_MAX_DIMS]; /* read entries: unused trailing dims are 1 */
    const void *data;           /* host memory, numel * dtype size bytes */
} kd_st_entry;

/*
 * Write entries (in the order given) and string metadata to path, atomically
 * (kd_file_write_atomic). meta_kv = {k0, v0, k1, v1, ...} holds n_meta_pairs
 * pairs and may be NULL when there are none. The header is padded with spaces
 * so the byte buffer starts 8-byte aligned. Names must be unique and not
 * "__metadata__".
 */
kd_status kd_safetensors_save(const char *path, const kd_st_entry *entries, size_t n,
                              const char *const *meta_kv, size_t n_meta_pairs);

/* An opened file: its header and all tensor data, held in memory. */
typedef struct kd_safetensors kd_safetensors;

/*
 * Read and validate path. Every entry's data is copied into a 64-byte aligned
 * place, whatever the alignment in the file, so it can be used in place as
 * float *, int64_t *, ... until kd_safetensors_close. Malformed files fail
 * with KD_ERR_FORMAT, a missing file with KD_ERR_NOT_FOUND.
 */
kd_status kd_safetensors_open(const char *path, kd_safetensors **out);
/* kd_safetensors_open without reading the tensors: the same checks of the header (names, types,
 * shapes, spans inside the file), every entry's data NULL; for the metadata alone. */
kd_status kd_safetensors_open_header(const char *path, kd_safetensors **out);

/* Entries in header order. */
size_t kd_safetensors_count(const kd_safetensors *st);
const kd_st_entry *kd_safetensors_entry(const kd_safetensors *st, size_t i);
/* NULL when no entry has that name. */
const kd_st_entry *kd_safetensors_find(const kd_safetensors *st, const char *name);
/* A "__metadata__" value; NULL if absent. */
const char *kd_safetensors_meta(const kd_safetensors *st, const char *key);
/* Frees everything, including the data of all entries; NULL is fine. */
void kd_safetensors_close(kd_safetensors *st);

#ifdef __cplusplus
}
#endif
#endif
