/*
 * fw_blob.h - what the benchmark firmwares read from the linked model's blob (format: kdm.h)
 * without the runtime's internals: int32 words of its header and tables, and the op names.
 * Include after model.h (kdm_model_blob).
 */
#ifndef FW_BLOB_H
#define FW_BLOB_H

#include <stdint.h>

#include "kdm.h"

/* Word i of the little-endian int32 table at byte offset `off` of the blob. */
static inline int32_t blob_word(uint32_t off, uint32_t i)
{
    const uint8_t *p = kdm_model_blob + off + 4u * i;
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                     (uint32_t)p[3] << 24);
}

/* The name of op type `type` as the benchmark tables print it. */
static inline const char *op_name(int32_t type)
{
    static const char *const names[KDM_OP_COUNT_] = {
        "?", "conv2d", "dwconv2d", "fc", "add", "maxpool", "avgpool", "gap", "reshape", "softmax",
    };
    return type > 0 && type < KDM_OP_COUNT_ ? names[type] : "?";
}

#endif
