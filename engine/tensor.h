/*
 * tensor.h - element types and the tensor view.
 *
 * A kd_tensor is a view: it never owns memory. Shapes are NCHW with up to
 * four dimensions; unused trailing dimensions are 1 and ndim says how many
 * are meaningful.
 */
#ifndef KD_TENSOR_H
#define KD_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#define KD_MAX_DIMS 4

typedef enum {
    KD_DTYPE_F32,
    KD_DTYPE_F16,
    KD_DTYPE_BF16,
    KD_DTYPE_F64,
    KD_DTYPE_I8,
    KD_DTYPE_U8,
    KD_DTYPE_I32,
    KD_DTYPE_I64,
    KD_DTYPE_COUNT_
} kd_dtype;

typedef enum { KD_DEVICE_CPU, KD_DEVICE_CUDA } kd_device;

typedef struct {
    void *data;
    kd_dtype dtype;
    kd_device device;
    int ndim;
    int64_t shape[KD_MAX_DIMS];
} kd_tensor;

/* Bytes per element; 0 for an unknown dtype. */
size_t kd_dtype_size(kd_dtype dt);
/* safetensors spelling ("F32", "BF16", ...) and back; -1 when unknown. */
const char *kd_dtype_name(kd_dtype dt);
int kd_dtype_from_name(const char *name);
/* Product of the meaningful dimensions. */
int64_t kd_tensor_numel(const kd_tensor *t);
/* "[128, 16, 28, 28]" into buf; returns buf. */
char *kd_shape_str(const int64_t *shape, int ndim, char *buf, size_t len);

#endif
