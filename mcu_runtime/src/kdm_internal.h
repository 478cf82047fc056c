/*
 * kdm_internal.h - what the loader and the dispatcher share: field names of the op record and
 * readers of the blob. Header fields are assembled from bytes (read before anything is known
 * about the blob); tensor and op records are read in place as int32 words once kdm_load has
 * checked that their tables are 4-byte aligned inside the 4-byte aligned blob (the target is
 * little-endian, kdm_kernels.h checks). The dispatcher runs for every op of every inference, so
 * it must not spend hundreds of instructions assembling bytes.
 */
#ifndef KDM_INTERNAL_H
#define KDM_INTERNAL_H

#include <stdint.h>

#include "kdm.h"

/* Word indices of an op record (kdm.h). */
enum {
    KDM_F_TYPE = 0,
    KDM_F_IN0,
    KDM_F_IN1,
    KDM_F_OUT,
    KDM_F_KH,
    KDM_F_KW,
    KDM_F_STRIDE,
    KDM_F_PAD,
    KDM_F_WBITS,
    KDM_F_ACT_MIN,
    KDM_F_ACT_MAX,
    KDM_F_WEIGHTS,
    KDM_F_ROW_STRIDE,
    KDM_F_BIAS,
    KDM_F_QUANT,
    KDM_F_PARAMS
};

/* Words of ADD's parameters (kdm.h). */
enum {
    KDM_ADD_LEFT_SHIFT = 0,
    KDM_ADD_M1,
    KDM_ADD_S1,
    KDM_ADD_M2,
    KDM_ADD_S2,
    KDM_ADD_MOUT,
    KDM_ADD_SOUT,
    KDM_ADD_WORDS
};

#define KDM_SOFTMAX_LUT 256

/* A tensor record, decoded. */
typedef struct {
    uint32_t off;        /* arena offset */
    int32_t c, h, w;     /* shape, each 1 .. 65535 */
    int32_t zp;          /* zero-point */
    uint32_t scale_bits; /* float32 bits, never used as a float here */
} kdm_tensor_;

static inline uint32_t kdm_rd32_(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Tensor record i of a validated table. */
static inline void kdm_tensor_get_(const uint8_t *table, uint32_t i, kdm_tensor_ *t)
{
    const int32_t *r = (const int32_t *)(const void *)(table + (size_t)i * KDM_TENSOR_WORDS * 4);
    t->off = (uint32_t)r[0];
    t->c = r[1];
    t->h = r[2];
    t->w = r[3];
    t->zp = r[4];
    t->scale_bits = (uint32_t)r[5];
}

/* Op record i of a validated table, KDM_OP_WORDS int32 in place. */
static inline const int32_t *kdm_op_rec_(const uint8_t *table, uint32_t i)
{
    return (const int32_t *)(const void *)(table + (size_t)i * KDM_OP_WORDS * 4);
}

#endif
