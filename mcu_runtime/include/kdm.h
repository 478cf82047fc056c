/*
 * kdm.h - the distill microcontroller runtime: run an INT8 / INT4 student
 * exported by `distill export` from a `.kdm` blob, in a caller-owned arena.
 *
 * Life of a model on a device:
 *
 *     #include "kdm.h"
 *     #include "model.h"                  // from `distill export --format c`
 *     static uint8_t arena[KDM_MODEL_ARENA_SIZE] __attribute__((aligned(4)));
 *     kdm_model m;
 *     if (kdm_load(&m, kdm_model_blob, sizeof kdm_model_blob) != KDM_OK) ...;
 *     int8_t in[28 * 28], out[10];        // quantized with kdm_input_quant(&m)
 *     if (kdm_invoke(&m, arena, sizeof arena, in, out) != KDM_OK) ...;
 *
 * Contract. The library never allocates, never prints, and its integer path
 * uses no floating point and no libm. kdm_load validates everything the blob
 * says (magic, version, CRC32, every table entry, offset, size, shape and
 * arena range) once; kdm_invoke then trusts the model and only checks the
 * arena it is given. A blob is read in place (flash), never copied.
 *
 * Arithmetic (TFLite-compatible). Activations are int8, asymmetric per
 * tensor (real = scale * (q - zero_point)); weights are symmetric per output
 * channel, int8 in [-127, 127] or int4 in [-7, 7]; biases int32 at scale
 * s_in * s_w[c] with the input zero-point term already folded in by the
 * exporter (bias[c] - zp_in * sum(w[c])), so kernels accumulate raw int8
 * inputs and padding positions read the input zero-point. An accumulator is
 * brought to the output scale by kdm_requantize (see below), offset by the
 * output zero-point and clamped to [act_min, act_max], which also applies a
 * fused ReLU / ReLU6.
 *
 * Requantization rounding. Default (KDM_FLAG_SINGLE_ROUNDING clear): TFLite's
 * two-step scheme - x * 2^left, then the saturating rounding doubling high
 * multiply by the Q31 multiplier (ties rounded up, toward +infinity, as
 * gemmlowp's nudge-and-truncate does), then a rounding right shift by
 * `right` (round half away from zero), where
 * left = max(shift, 0) and right = max(-shift, 0). This is bit-identical to
 * TFLite Micro's reference MultiplyByQuantizedMultiplier, so outputs can be
 * cross-checked against it. With the flag set: one rounding,
 * (x * mult + 2^(30 - shift)) >> (31 - shift) in 64 bits.
 *
 * Layout. Activations are NHWC with N = 1 (a [C] vector is H = W = 1).
 *
 * Kernels. Every op has a portable reference kernel; conv, depthwise, fully-connected, add and
 * global average pooling also have kernels for the Cortex-M DSP extension (SMLAD and friends),
 * chosen when __ARM_FEATURE_DSP is defined unless the build sets -DKDM_FORCE_REF=1; without
 * them, convolutions, depthwise convolutions and fully-connected layers run kernels for cores
 * without DSP (Cortex-M0+). All produce bit-identical outputs (integer sums).
 */
#ifndef KDM_H
#define KDM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- the .kdm blob (all fields little-endian; every table and array 4-byte aligned) ----------
 *
 * offset  size  field
 *      0     4  magic        KDM_MAGIC ("KDM1")
 *      4     4  version      KDM_VERSION
 *      8     4  total_len    bytes in the blob, header included
 *     12     4  crc32        CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320, init and final
 *                            xor 0xFFFFFFFF) of bytes [16, total_len)
 *     16     4  flags        KDM_FLAG_*; unknown bits are an error
 *     20     4  n_tensors    activation tensors (1 .. KDM_MAX_TENSORS)
 *     24     4  n_ops        operations in execution order (1 .. KDM_MAX_OPS)
 *     28     4  arena_size   bytes of arena the model needs (tensors + scratch)
 *     32     4  scratch_off  arena offset of the kernels' scratch area (4-aligned)
 *     36     4  scratch_size bytes of scratch (>= every op's kdm_op_scratch_size)
 *     40     4  input        tensor index fed by kdm_invoke's input
 *     44     4  output       tensor index copied to kdm_invoke's output
 *     48     4  tensors_off  byte offset of the tensor table (n_tensors x KDM_TENSOR_WORDS i32)
 *     52     4  ops_off      byte offset of the op table (n_ops x KDM_OP_WORDS i32)
 *     56     4  data_off     byte offset of the constant data (weights, biases, multipliers)
 *     60     4  data_len     bytes of constant data; every op array lies inside it
 *     64        (end of header, KDM_HEADER_SIZE)
 *
 * Tensor record, KDM_TENSOR_WORDS int32:
 *   [0] arena_off  byte offset in the arena; c*h*w int8 bytes from there lie inside the arena
 *                  and do not overlap the scratch area
 *   [1] c  [2] h  [3] w   (each 1 .. 65535)
 *   [4] zero_point        -128 .. 127
 *   [5] scale             IEEE-754 float32 bits; informational (host-side dequantization of
 *                          outputs), never read on the integer path
 *
 * Op record, KDM_OP_WORDS int32 (unused fields are 0; tensor fields unused are -1):
 *   [0]  type            KDM_OP_*
 *   [1]  in0             input tensor
 *   [2]  in1             second input (ADD) or -1
 *   [3]  out             output tensor; an op's output never overlaps its inputs in the arena
 *                        (RESHAPE may alias its input exactly)
 *   [4]  kernel_h  [5] kernel_w  [6] stride  [7] pad    (conv and pooling; pad is applied
 *                        symmetrically on all four sides, padded inputs read the input
 *                        zero-point for convolutions and are skipped by max pooling)
 *   [8]  wbits           8 or 4 for CONV2D / DEPTHWISE_CONV2D / FULLY_CONNECTED, else 0
 *   [9]  act_min [10] act_max   output clamp, -128 <= act_min <= act_max <= 127
 *   [11] weights_off     byte offset in the blob of the weights (see layouts below)
 *   [12] row_stride      bytes between weight rows; a multiple of 4, >= the packed row length
 *   [13] bias_off        byte offset of int32 bias[out_c] (4-aligned)
 *   [14] quant_off       byte offset of int32 multiplier[out_c] followed by int8 shift[out_c]
 *                        (4-aligned); multiplier in [2^30, 2^31) or 0, shift in [-31, 30]
 *   [15] params_off      byte offset of op-specific int32 parameters, or 0:
 *                        ADD: 7 words {left_shift, m1, s1, m2, s2, m_out, s_out} as in
 *                        TFLite's quantized add (left_shift 0..20; each m/s as for quant_off)
 *                        SOFTMAX: 256 words, lut[d] = round(65536 * exp(-d * s_in)), d = 0..255
 *
 * Weight layouts (int8: one byte per weight; int4: two per byte, low nibble first, in [-7, 7]):
 *   CONV2D           row o (0 .. out_c-1) = w[o][kh][kw][in_c], i.e. OHWI, K = kh*kw*in_c
 *   DEPTHWISE_CONV2D row p (0 .. kh*kw-1, p = ky*kw + kx) = w[ky][kx][c] for c in 0 .. C-1
 *                    (channel multiplier 1: out_c = in_c)
 *   FULLY_CONNECTED  row o = w[o][i] with i running over the input in NHWC order
 *   Row padding bytes (up to row_stride) are zero.
 *
 * Op semantics:
 *   CONV2D / DEPTHWISE_CONV2D: out_h = (in_h + 2*pad - kernel_h) / stride + 1 (same for w),
 *     acc = bias[o] + sum w * x (x the raw int8 input, the input zero-point where padded),
 *     out = clamp(zp_out + kdm_requantize(acc, mult[o], shift[o]), act_min, act_max)
 *   FULLY_CONNECTED: the same with the whole input tensor (c*h*w values) as one row; out is [C]
 *   ADD: TFLite quantized add of two same-shape tensors, then clamp
 *   MAXPOOL2D: max over the window (padding skipped); output quantization = input's
 *   AVGPOOL2D (pad 0) / GLOBAL_AVGPOOL: sum / count, rounded half away from zero; output
 *     quantization = input's
 *   RESHAPE: same bytes, new shape (copy when the arena offsets differ)
 *   SOFTMAX: over a [C] vector; d = max - x, e = lut[d], out = clamp(round(256 * e / sum) - 128)
 *     with output scale 1/256 and zero-point -128
 */
#define KDM_MAGIC        0x314D444Bu /* bytes 'K' 'D' 'M' '1' */
#define KDM_VERSION      3u          /* 2: the DSP kernels' scratch sizes grew; 3: int8 shifts */
#define KDM_HEADER_SIZE  64u
#define KDM_TENSOR_WORDS 6u
#define KDM_OP_WORDS     16u
/* bytes of a weighted op's quant record (op word 14): int32 multiplier[n], then int8 shift[n] */
#define KDM_QUANT_BYTES(n) (5u * (n))
#define KDM_MAX_TENSORS    4096u
#define KDM_MAX_OPS        4096u

#define KDM_FLAG_SINGLE_ROUNDING 1u

typedef enum {
    KDM_OP_CONV2D = 1,
    KDM_OP_DEPTHWISE_CONV2D = 2,
    KDM_OP_FULLY_CONNECTED = 3,
    KDM_OP_ADD = 4,
    KDM_OP_MAXPOOL2D = 5,
    KDM_OP_AVGPOOL2D = 6,
    KDM_OP_GLOBAL_AVGPOOL = 7,
    KDM_OP_RESHAPE = 8,
    KDM_OP_SOFTMAX = 9,
    KDM_OP_COUNT_
} kdm_op_type;

/* A firmware may compile the runtime with -DKDM_OP_MASK=<bits> to link only the ops its model
 * uses (bit 1 << KDM_OP_x); kdm_load refuses a model with an op outside the mask. The
 * exported model.h defines KDM_MODEL_OP_MASK for this. */
#define KDM_OP_BIT(op) (1u << (op))
#ifndef KDM_OP_MASK
#define KDM_OP_MASK 0x3FEu /* all of KDM_OP_CONV2D .. KDM_OP_SOFTMAX */
#endif

/* Likewise -DKDM_WBITS_MASK=<bits> links only the weight widths a model uses (bit 1 << wbits:
 * 0x100 INT8, 0x010 INT4); kdm_load refuses a weighted op of another width with KDM_ERR_OP. The
 * exported model.h defines KDM_MODEL_WBITS_MASK for this. */
#define KDM_WBITS_BIT(bits) (1u << (bits))
#ifndef KDM_WBITS_MASK
#define KDM_WBITS_MASK 0x110u /* INT8 and INT4 */
#endif

/* And -DKDM_ROUNDING_MASK=<bits> links only the requantization rounding a model uses (bit 1 <<
 * single: 0x1 double rounding, the exporter's default; 0x2 single, KDM_FLAG_SINGLE_ROUNDING);
 * kdm_load refuses a model of the other rounding with KDM_ERR_OP. The exported model.h defines
 * KDM_MODEL_ROUNDING_MASK for this. */
#define KDM_ROUNDING_BIT(single) (1u << ((single) ? 1 : 0))
#ifndef KDM_ROUNDING_MASK
#define KDM_ROUNDING_MASK 0x3u /* both */
#endif

typedef enum {
    KDM_OK = 0,
    KDM_ERR_ARG,       /* a NULL pointer, a length that cannot be right, or an input or output
                          buffer inside the arena */
    KDM_ERR_MAGIC,     /* not a .kdm blob */
    KDM_ERR_VERSION,   /* a .kdm version this runtime does not read */
    KDM_ERR_TRUNCATED, /* the blob is shorter than its header or its total_len says */
    KDM_ERR_CRC,       /* the CRC-32 does not match: the blob is damaged */
    KDM_ERR_RANGE,     /* an offset, size, index or count points outside where it must */
    KDM_ERR_ALIGN,     /* the blob pointer, or an offset in it, is not 4-byte aligned */
    KDM_ERR_OP,        /* an op type, weight width or rounding this runtime (or its masks) lacks */
    KDM_ERR_SHAPE,     /* tensor shapes do not fit the op */
    KDM_ERR_PARAM,     /* an op parameter out of its range (wbits, clamp, shift, ...) */
    KDM_ERR_ARENA,     /* the arena given to kdm_invoke is too small or misaligned */
    KDM_STATUS_COUNT_
} kdm_status;

/* A short constant English description of a status ("CRC mismatch"). */
const char *kdm_status_str(kdm_status st);

/* A loaded model: views into the caller's blob, filled by kdm_load. Treat as opaque. */
typedef struct {
    const uint8_t *blob;
    uint32_t len, flags;
    uint32_t n_tensors, n_ops;
    uint32_t arena_size, scratch_off, scratch_size;
    uint32_t input, output;
    const uint8_t *tensors; /* n_tensors x KDM_TENSOR_WORDS little-endian int32 */
    const uint8_t *ops;     /* n_ops x KDM_OP_WORDS little-endian int32 */
} kdm_model;

/*
 * Validate `blob` (len bytes, 4-byte aligned, kept alive and unchanged while the model is
 * used) and fill *m. Never reads outside [blob, blob + len); bytes past total_len are
 * ignored. On any error *m is zeroed and the status says which check failed. Beyond the
 * format, this runtime refuses: a blob or arena of 2^31 bytes or more, pad or stride above
 * 65535, an AVGPOOL2D window or GLOBAL_AVGPOOL input of 2^24 values or more, and a
 * MAXPOOL2D pad >= its kernel size (a window entirely in the padding).
 */
kdm_status kdm_load(kdm_model *m, const void *blob, size_t len);

/* Bytes of arena kdm_invoke needs (4-byte aligned). */
uint32_t kdm_arena_size(const kdm_model *m);

/* Input and output element counts (int8 values). */
uint32_t kdm_input_size(const kdm_model *m);
uint32_t kdm_output_size(const kdm_model *m);

/* Quantization of the input and output tensors: scale as float32 bits and zero-point.
 * A caller quantizes input x as clamp(round(x / scale) + zero_point, -128, 127). */
void kdm_input_quant(const kdm_model *m, uint32_t *scale_bits, int32_t *zero_point);
void kdm_output_quant(const kdm_model *m, uint32_t *scale_bits, int32_t *zero_point);

/*
 * Run the model: copy `input` (kdm_input_size bytes, NHWC) into the arena, run every op,
 * copy the output tensor to `output` (kdm_output_size bytes). `arena` must be 4-byte
 * aligned and at least kdm_arena_size bytes, else KDM_ERR_ARENA and nothing is run.
 * `input` and `output` (which may be the same buffer) must lie outside the arena's first
 * kdm_arena_size bytes, else KDM_ERR_ARG and nothing is run.
 */
kdm_status kdm_invoke(const kdm_model *m, void *arena, size_t arena_len, const int8_t *input,
                      int8_t *output);

/* Run op i alone on the arena's current contents (per-layer profiling: kdm_invoke once, then
 * time each op). Same arena rules as kdm_invoke; i >= n_ops is KDM_ERR_RANGE. */
kdm_status kdm_invoke_op(const kdm_model *m, void *arena, size_t arena_len, uint32_t i);

/* Multiply-accumulates of op i (conv, depthwise, fully-connected; 0 for the others). */
uint32_t kdm_op_macs(const kdm_model *m, uint32_t i);

/* Index of the largest of x[0 .. n-1] (the first on ties): the predicted class; n >= 1 (0
 * for n = 0). */
uint32_t kdm_argmax_s8(const int8_t *x, uint32_t n);

/* Requantize an int32 accumulator by (multiplier, shift) with the model's rounding
 * (flags & KDM_FLAG_SINGLE_ROUNDING); exposed so the exporter and tests use the same code.
 * Models carry multipliers 0 or in [2^30, 2^31) and shifts in [-31, 30]; any other int32
 * multiplier gives TFLite's result too (a shift outside the range is pinned to it). */
int32_t kdm_requantize(int32_t acc, int32_t multiplier, int32_t shift, uint32_t flags);

/* CRC-32 as the blob header uses it (exposed for the exporter). */
uint32_t kdm_crc32(const uint8_t *p, size_t n);

/* Scratch bytes one op needs: the largest over every implementation of the op (reference and
 * DSP), so a blob exported on the host runs on any build. The exporter calls it with the op
 * record to size the header's scratch_size, and kdm_load checks scratch_size against it. `op`
 * is a KDM_OP_WORDS record, (in_c, in_h, in_w) its input tensor's shape. 0 for ops that need
 * none. */
uint32_t kdm_op_scratch_size(const int32_t *op, uint32_t in_c, uint32_t in_h, uint32_t in_w);

#ifdef __cplusplus
}
#endif

#endif
