/*
 * export.h - the distill exporter: a trained float student becomes an INT8 / INT4 `.kdm` blob
 * (format: mcu_runtime/include/kdm.h) or a C source embedding it, with a report.
 *
 * What `distill export` does, step by step (kd_export_run does all of it):
 *
 *     kd_job job;                                  // the training job's YAML
 *     kd_job_load("configs/fashion-mnist/tiny_scratch.yaml", NULL, &job);
 *     kd_export_opts o;
 *     kd_export_opts_default(&o);                  // int8, .kdm, 1000 calibration samples
 *     o.out_dir = "export/tiny";
 *     kd_export_report *r = NULL;
 *     if (kd_export_run(&job, "runs/x/best.safetensors", &o, &r) != KD_OK) ... kd_last_error()
 *     kd_export_report_print(r, stdout);           // the per-op table and the accuracies
 *     kd_export_report_free(r);
 *
 *  1. Build. The job's `model:` is built on the CPU and the checkpoint loaded into it; a
 *     checkpoint of another architecture is refused (parameter shapes, and the architecture
 *     hash the file records).
 *  2. Lower (kd_export_lower). The block list becomes runtime ops in execution order:
 *       conv2d groups 1 -> CONV2D, groups == in == out -> DEPTHWISE_CONV2D,
 *       linear -> FULLY_CONNECTED, maxpool2d / avgpool2d (pad 0) / global_avgpool -> the pools,
 *       residual -> its body's ops, its projection's ops, then ADD (body + skip),
 *       flatten, dropout -> nothing (a flatten only changes how the next linear reads),
 *     with a batchnorm folded into the conv / linear right before it,
 *       w' = w * g / sqrt(var + eps),  b' = beta + (b - mean) * g / sqrt(var + eps),
 *     and a relu / relu6 right after a conv, linear or ADD fused into that op's output clamp
 *     (one after an op whose output is already in range, e.g. after a max pool of a relu, is
 *     dropped). Activations are NHWC in the runtime and CHW in the engine: a linear fed by a
 *     flattened [C, H, W] tensor gets its weight columns permuted from the engine's CHW order
 *     to NHWC, so no op moves bytes. Whatever the runtime lacks is refused with
 *     KD_ERR_UNSUPPORTED naming the block ("file:line:col: layer 3 (conv2d): groups 2 ...").
 *  3. Calibrate (kd_export_calibrate). The folded float model runs over N training samples
 *     (no augmentation, the engine's normalisation). Each tensor with its own quantization
 *     (every op output except a pool's, which keeps its input's as kdm.h requires) gets the
 *     range with the smallest estimated quantization MSE on those values among: min/max, the
 *     99.9 / 99.99 / 99.999 / 99.9999 % central intervals of the distribution and the same
 *     percentiles of |x| (see kd_export_range_choice; a clipped range must win by 1 %). The
 *     model input is the exception: it is quantized over the exact range of the pixels the
 *     engine normalises, [(0 - mean) / std, (1 - mean) / std], so scale = 1 / (255 std) and the
 *     256 pixel values land on 256 distinct codes (up to one code of rounding). Ranges always
 *     contain 0; asymmetric int8: scale = (max - min) / 255, zero_point = round(-128 - min /
 *     scale) clamped to int8.
 *  4. Quantize (kd_export_quantize). Weights per output channel, symmetric, with the shared
 *     quantizer (engine/quant.h): int8 in [-127, 127], int4 in [-7, 7]. INT4 post-training
 *     quantization also searches a clipping ratio r in [0.5, 1] per channel (scale =
 *     r max|w| / 7) for the smallest error of the row, each weight's squared error weighted by
 *     the mean square of the input channel it multiplies. A job trained with
 *     `quant: {bits: 4, qat: true}` (or bits 8) learnt against plain max-abs scales, so then
 *     exactly those are used; exported at the other width, its float model is still its
 *     fake-quantized weights (what it trained and `distill eval` runs), quantized as usual. A
 *     channel whose weights are tiny beside its bias (a batchnorm scale near 0 folded in) has
 *     its weight scale raised until the bias is 2^24 codes, as TFLite does, rather than a
 *     bias beyond int32. Bias int32 = round(b' / (s_in s_w[o])) - zp_in sum(q_w[o]);
 *     requantization multiplier / shift per channel from s_in s_w[o] / s_out
 *     (kd_quant_multiplier), ADD parameters as TFLite's quantized add (left shift 20), an
 *     optional SOFTMAX with its exp table. Post-training (not QAT) exports then correct each
 *     bias for the mean shift rounding causes (kd_export_bias_correct, on 256 calibration
 *     samples): on the tiny Fashion-MNIST student it lifts INT4 from 76.0 % to 86.8 % and INT8
 *     from 90.02 % to 90.13 % (float 90.33 %). `int8_layers` keeps named layers at 8 bits in an
 *     INT4 export (the first conv, whose rows hold only 9 weights, is the usual candidate).
 *  5. Plan the arena (kd_export_plan_arena): every activation tensor lives from the op that
 *     writes it to the last op that reads it (the input from before the first op, the output
 *     to the end); tensors are placed greedily, largest first, each at the lowest 4-aligned
 *     offset that overlaps no placed tensor alive at the same time. A second placement (in
 *     execution order, alternating tensors between the bottom and the top of the bound) is
 *     also tried and the smaller plan kept; for a chain it meets the bound max(size of two
 *     adjacent tensors). The kernels' scratch area (the largest kdm_op_scratch_size of any op)
 *     follows the tensors.
 *  6. Write DIR/model.kdm (format kdm), DIR/model.c + DIR/model.h (format c: the blob as a
 *     const, 4-aligned array in flash, KDM_MODEL_ARENA_SIZE, KDM_MODEL_OP_MASK, sizes and the
 *     input quantization), DIR/samples.bin (--samples, below) and the report DIR/report.json
 *     (or --json FILE, a new or regular file, never one of the other outputs), DIR created if
 *     missing. The files form one set, replaced all together or not at all: each is written to
 *     a temporary name beside it, flushed and closed, and only when all are complete are they
 *     renamed into place; any failure removes the temporary files and leaves every earlier file
 *     as it was. Then the outputs of an earlier export that this one does not write (these
 *     five names in DIR, nothing else) are removed and listed in the report.
 *  7. Report: per op its engine block(s), type, shapes, MACs, constant bytes (packed weights,
 *     bias, multipliers, parameters), arena bytes of its output and the calibration choice;
 *     totals; and test-set accuracy of the engine's unfolded model, the folded float model and
 *     the integer model run by the real runtime (kdm_load, kdm_invoke per sample, argmax of the
 *     int8 outputs, inputs quantized as kdm_input_quant says).
 *
 * Integer arithmetic is the runtime's: kdm_requantize with TFLite's two-step rounding by
 * default (bit-identical to TFLite Micro), or one rounding with KDM_FLAG_SINGLE_ROUNDING.
 *
 * samples.bin (little-endian): "KDMS", u32 n, u32 in_size, u32 out_size, then n records of
 * { int8 input[in_size] (NHWC), int32 label, int8 output[out_size] } for the first n test
 * samples, the outputs computed by the host build of the runtime, so a device build can be
 * compared with them byte for byte.
 *
 * Errors: every function returns a kd_status with a message (kd_last_error) naming the file,
 * block or op; nothing is written unless every check passed, and the library never prints
 * except to the FILE * it is handed.
 */
#ifndef KD_EXPORT_H
#define KD_EXPORT_H

#include <stdint.h>
#include <stdio.h>

#include "job.h"
#include "kdm.h"
#include "model.h"
#include "status.h"

/* ---- options and the whole run ---------------------------------------------------------- */

enum { KD_EXPORT_KDM = 1, KD_EXPORT_C = 2 };

/* Progress callback: phase ("calibrate", "float eval", "int eval"), done of total. */
typedef void (*kd_export_progress_fn)(void *ctx, const char *phase, int64_t done, int64_t total);

typedef struct {
    int bits;                       /* weight bits: 8 or 4 */
    int formats;                    /* KD_EXPORT_KDM | KD_EXPORT_C */
    const char *out_dir;            /* created (with parents) when missing */
    const char *json_path;          /* report; NULL = <out_dir>/report.json */
    int64_t calib_samples;          /* training samples for calibration (>= 1) */
    int64_t n_samples;              /* records in <out_dir>/samples.bin; 0 = no file */
    const char *int8_layers;        /* bits 4: conv / linear block names ("0,22") kept int8 */
    int single_rounding;            /* KDM_FLAG_SINGLE_ROUNDING */
    int softmax;                    /* append a SOFTMAX op (default off: argmax of the logits) */
    int evaluate;                   /* measure test-set accuracies (default on) */
    kd_export_progress_fn progress; /* may be NULL */
    void *progress_ctx;
} kd_export_opts;

void kd_export_opts_default(kd_export_opts *o);

typedef struct kd_export_report kd_export_report;

/*
 * Export the job's model with the weights of `checkpoint` as the options say (steps 1-7
 * above). On success *report (caller frees with kd_export_report_free) describes what was
 * written and removed. On failure no file is created, replaced or removed (missing
 * directories of out_dir or the report may have been created).
 */
kd_status kd_export_run(const kd_job *job, const char *checkpoint, const kd_export_opts *o,
                        kd_export_report **report);

/* The report as a table: ops, totals, accuracies, the files written. */
void kd_export_report_print(const kd_export_report *r, FILE *f);
void kd_export_report_free(kd_export_report *r);

/* Accessors for tests and scripts. */
double kd_export_report_float_acc(const kd_export_report *r); /* folded float model */
double kd_export_report_int_acc(const kd_export_report *r);   /* the runtime's integers */
double kd_export_report_agreement(const kd_export_report *r); /* int vs float argmax, [0, 1] */

/* ---- the lowered graph -------------------------------------------------------------------- */

enum { KD_EXPORT_ACT_NONE = 0, KD_EXPORT_ACT_RELU = 1, KD_EXPORT_ACT_RELU6 = 6 };

/* One activation tensor: an int8 NHWC array in the arena (a vector [F] is F x 1 x 1). */
typedef struct {
    int c, h, w;
    uint32_t bytes; /* c * h * w */
    int producer;   /* op writing it; -1 for the model input */
    int last_use;   /* last op reading it; n_ops for the model output */
    int qsrc;       /* tensor whose quantization it uses (itself, or a pool's input's) */
    double lo, hi;  /* bounds known from the graph (a fused relu6 gives [0, 6]) */
    /* calibration: the observed range, the chosen one and why */
    float seen_min, seen_max;
    float *ch_mean, *ch_msq; /* [c]: mean and mean square per channel over the samples */
    float rmin, rmax;
    char choice[16]; /* "minmax", "p99.99", "abs99.999", ..., "pixels", "input's", "fixed" */
    /* quantization: real = scale * (q - zero_point) */
    float scale;
    int32_t zero_point;
    uint32_t arena_off;
} kd_export_tensor;

/* One runtime op, float weights folded, then (after kd_export_quantize) their integers. */
typedef struct {
    kdm_op_type type;
    char name[64];     /* engine block of the op ("3", "5.body.0"; "5" for a residual's ADD) */
    char fused[96];    /* blocks folded into it: "1,2" (a batchnorm and a relu) or "" */
    char where[192];   /* file:line:col of the block */
    int in0, in1, out; /* tensor indices; in1 = -1 except for ADD */
    int kernel, stride, pad;
    int act; /* KD_EXPORT_ACT_* fused into the output clamp */
    /* CONV2D / DEPTHWISE_CONV2D / FULLY_CONNECTED: out_c rows of row_len float weights,
     * CONV2D OHWI [out_c][k][k][in_c], DEPTHWISE [c][k][k], FC [out][in] with in in NHWC order */
    int out_c, row_len;
    float *w, *b; /* b: [out_c] folded bias (zeros when the layer had none) */
    int64_t macs;
    /* filled by kd_export_quantize */
    int wbits;
    int8_t *q;                      /* [out_c][row_len] weight integers */
    float *wscale;                  /* [out_c] */
    float *bcorr;                   /* [out_c] bias correction added to b, or NULL */
    int32_t *bias_q, *mult, *shift; /* [out_c] */
    int32_t params[256];            /* ADD: 7 words; SOFTMAX: the 256-entry table */
    int nparams;
    int32_t act_min, act_max;
    char wchoice[16]; /* "maxabs" or "clip" (int4 PTQ) */
} kd_export_op;

typedef struct {
    kd_export_tensor *t;
    int nt, cap_t;
    kd_export_op *op;
    int nop, cap_op;
    int input, output;    /* tensor indices */
    int in_c, in_h, in_w; /* engine input [C, H, W] (the runtime input is its NHWC copy) */
    int classes;          /* output features of the model (before any softmax) */
    /* filled by kd_export_plan: arena layout and header fields */
    uint32_t tensors_end, scratch_off, scratch_size, arena_size, arena_bound;
    char plan_method[16]; /* "greedy-size" or "two-ended" */
    uint32_t flags;       /* KDM_FLAG_* */
} kd_export_graph;

/*
 * Lower m (built on the CPU backend, weights loaded) into a new graph (free with
 * kd_export_graph_free): BN folding, activation fusion, layout permutation as described at
 * the top. KD_ERR_UNSUPPORTED names the block and the op the runtime lacks.
 */
kd_status kd_export_lower(const kd_model *m, kd_export_graph **out);
void kd_export_graph_free(kd_export_graph *g);

/* "CONV2D", "ADD", ... */
const char *kd_export_op_type_name(kdm_op_type t);

/* Append a SOFTMAX op over the logits (call before calibration). */
kd_status kd_export_add_softmax(kd_export_graph *g);

/* Float scratch for kd_export_forward: one buffer per tensor, for one sample. */
typedef struct {
    float **v; /* v[t]: tensor t's values, NHWC */
    int nt;
} kd_export_acts;

kd_status kd_export_acts_new(const kd_export_graph *g, kd_export_acts *a);
void kd_export_acts_free(kd_export_acts *a);

/*
 * Run the folded float graph on one sample x (the engine's layout: [C, H, W] normalised
 * floats, or [F]); every tensor's values land in a->v, the output in a->v[g->output].
 */
void kd_export_forward(const kd_export_graph *g, const float *x, kd_export_acts *a);

/* Variations of the forward (bias correction measures with them): ops 0 .. quant_upto with
 * w[i] != NULL compute with weights w[i] and biases b[i] instead of their own; op raw_op (or
 * -1) skips its activation; nothing after op stop_after (-1: the last) runs. */
typedef struct {
    int quant_upto, raw_op, stop_after;
    float *const *w, *const *b; /* [nop] each */
} kd_export_fwd_opts;

void kd_export_forward_ex(const kd_export_graph *g, const float *x, kd_export_acts *a,
                          const kd_export_fwd_opts *f);

/* ---- calibration ---------------------------------------------------------------------------- */

/*
 * Choose every tensor's range from the float activations of n samples x (each g->in_c *
 * g->in_h * g->in_w floats, engine layout), then its scale and zero-point. pixel_lo/hi: the
 * exact range of the normalised input ((0 - mean) / std and (1 - mean) / std); pass
 * pixel_lo >= pixel_hi to calibrate the input like any other tensor.
 */
kd_status kd_export_calibrate(kd_export_graph *g, const float *x, int64_t n, float pixel_lo,
                              float pixel_hi, kd_export_progress_fn progress, void *progress_ctx);

/*
 * The range choice on a histogram (exposed for tests): nbins counts over [lo, hi] of the
 * values, abs_counts nbins counts of |x| over [0, max(|lo|, |hi|)]. Writes the chosen range
 * (containing 0) and its name, and returns the estimated MSE of the choice.
 */
double kd_export_range_choice(const double *counts, const double *abs_counts, int nbins, float lo,
                              float hi, float *rmin, float *rmax, char choice[16]);

/* Asymmetric int8 parameters of a range [rmin, rmax] that contains 0. */
void kd_export_range_qparams(float rmin, float rmax, float *scale, int32_t *zero_point);

/* ---- quantization --------------------------------------------------------------------------- */

/*
 * Quantize weights (bits 8 or 4, or an op's own wbits when set beforehand; plain max-abs scales
 * when qat or 8 bits, a clipping search for int4 otherwise), fold biases, derive multipliers, ADD
 * and SOFTMAX parameters and clamps. Needs calibrated tensors. Fails (naming the op) when a bias
 * or a scale ratio does not fit.
 */
kd_status kd_export_quantize(kd_export_graph *g, int bits, int qat, int single_rounding);

/*
 * Bias correction (for post-training int4): for each weighted op in order, the mean of its
 * output (before the activation) over n samples x with the quantized weights of it and every op
 * before it (biases already corrected) is compared with the float model's, and the difference
 * per channel added to its bias (op->bcorr), which then re-enters the int32 bias. Rounding
 * errors of 4-bit weights do not average out over a 3x3 depthwise row; this removes the mean
 * shift they and the layers before them cause.
 */
kd_status kd_export_bias_correct(kd_export_graph *g, const float *x, int64_t n,
                                 kd_export_progress_fn progress, void *progress_ctx);

/*
 * Requantization multiplier of a real factor (>= 0): real ~= mult * 2^(shift - 31), mult in
 * [2^30, 2^31) and shift in [-31, 30], or mult = shift = 0 when real is 0 or below 2^-32
 * (the product rounds to 0 anyway). KD_ERR_UNSUPPORTED when real >= 2^30 or not finite.
 */
kd_status kd_quant_multiplier(double real, int32_t *mult, int32_t *shift);

/*
 * Bias folding: round(b / (s_in * s_w)) - zp_in * sum_q, where sum_q is the sum of the row's
 * weight integers. KD_ERR_UNSUPPORTED when it does not fit in int32.
 */
kd_status kd_quant_bias(double b, double s_in, double s_w, int32_t zp_in, int64_t sum_q,
                        int32_t *out);

/*
 * The accumulator of a channel, bias_q + sum_j q[j] x_j over raw int8 inputs x_j, shifted left
 * by `left` (the positive shift of double rounding, else 0), stays inside int32 for every
 * input: KD_OK, else KD_ERR_UNSUPPORTED naming the range it can reach (the runtime's sums wrap
 * modulo 2^32, so such a channel's outputs would be silently wrong).
 */
kd_status kd_quant_acc_fits(int32_t bias_q, const int8_t *q, int k, int left);

/* Per-row clipping search: the scale in {r * max|w| / qmax, r = 0.50, 0.52, .., 1.00} with the
 * smallest error sum imp[j] * (w[j] - s * q(w[j]))^2 (imp NULL: all 1; max-abs on ties). */
float kd_quant_clip_scale(const float *w, const float *imp, int64_t k, int bits);

/* ---- arena planning ------------------------------------------------------------------------- */

/*
 * Place n tensors of size[i] bytes (rounded up to 4) living from op first[i] to op last[i]
 * (inclusive; two tensors conflict when their intervals meet). off[i] receives each offset,
 * *total the bytes the tensors need (a multiple of 4), *bound the lower bound (the largest
 * sum of sizes alive at one op) and method (may be NULL) which placement won.
 */
kd_status kd_export_plan_arena(int n, const uint32_t *size, const int *first, const int *last,
                               uint32_t *off, uint32_t *total, uint32_t *bound, char method[16]);

/* Plan g's arena and scratch area (needs quantized ops, for the scratch sizes). */
kd_status kd_export_plan(kd_export_graph *g);

/* ---- writers -------------------------------------------------------------------------------- */

/* Bytes between weight rows of op o (a multiple of 4) and the number of rows: CONV2D and
 * FULLY_CONNECTED one row per output channel, DEPTHWISE_CONV2D one per kernel tap; 0 for ops
 * without weights. */
uint32_t kd_export_row_stride(const kd_export_op *o, uint32_t *rows);

/* Op i's KDM_OP_WORDS record; data_off = {weights, bias, quant, params} offsets in the blob. */
void kd_export_op_record(const kd_export_graph *g, int i, const uint32_t data_off[4],
                         int32_t rec[KDM_OP_WORDS]);

/* Serialize a quantized, planned graph into a new .kdm blob (caller frees *blob). */
kd_status kd_export_blob(const kd_export_graph *g, uint8_t **blob, size_t *len);

/* Bit mask of the op types g uses (KDM_OP_BIT), for KDM_MODEL_OP_MASK. */
uint32_t kd_export_op_mask(const kd_export_graph *g);

/* A malloc'd text and its length (no terminating NUL counted). */
typedef struct {
    char *text;
    size_t len;
} kd_export_text;

/* The contents of model.h and model.c embedding blob (the caller frees h->text and c->text;
 * both NULL on failure). kd_export_run writes them with the other files of the export. */
kd_status kd_export_c_source(const kd_export_graph *g, const uint8_t *blob, size_t len,
                             kd_export_text *h, kd_export_text *c);

/* Quantize one normalised input (engine layout) into int8 NHWC as kdm_input_quant says. */
void kd_export_quantize_input(const kd_export_graph *g, const float *x, float scale, int32_t zp,
                              int8_t *q);

#endif
