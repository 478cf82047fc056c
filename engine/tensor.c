/*
 * tensor.c - dtype table and shape helpers.
 */
#include "tensor.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} kd_dtype_table[KD_DTYPE_COUNT_] = {
    [KD_DTYPE_F32] = {"F32", 4}, [KD_DTYPE_F16] = {"F16", 2}, [KD_DTYPE_BF16] = {"BF16", 2},
    [KD_DTYPE_F64] = {"F64", 8}, [KD_DTYPE_I8] = {"I8", 1},   [KD_DTYPE_U8] = {"U8", 1},
    [KD_DTYPE_I32] = {"I32", 4}, [KD_DTYPE_I64] = {"I64", 8},
};

size_t kd_dtype_size(kd_dtype dt)
{
    return (unsigned)dt < KD_DTYPE_COUNT_ ? kd_dtype_table[dt].size : 0;
}

const char *kd_dtype_name(kd_dtype dt)
{
    return (unsigned)dt < KD_DTYPE_COUNT_ ? kd_dtype_table[dt].name : "?";
}

int kd_dtype_from_name(const char *name)
{
    for (int i = 0; i < KD_DTYPE_COUNT_; i++)
        if (strcmp(name, kd_dtype_table[i].name) == 0)
            return i;
    return -1;
}

int64_t kd_tensor_numel(const kd_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

char *kd_shape_str(const int64_t *shape, int ndim, char *buf, size_t len)
{
    size_t pos = 0;
    pos += (size_t)snprintf(buf + pos, len - pos, "[");
    for (int i = 0; i < ndim && pos < len; i++)
        pos += (size_t)snprintf(buf + pos, len - pos, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (pos < len)
        snprintf(buf + pos, len - pos, "]");
    return buf;
}
