/*
 * depthwise_dsp.c - depthwise convolution, int8 or int4 weights and int8 activations, for the
 * Cortex-M DSP extension (bit-identical to depthwise_s8_ref.c / depthwise_s4_ref.c; see
 * kdm_kernels.h).
 *
 * A depthwise output has only kernel_h * kernel_w MACs, and in NHWC two taps of one channel are
 * in_c bytes apart, so SMLAD (two products of one channel into one sum) cannot be fed from the
 * input as it lies. For 3x3 kernels at stride 1 or 2 the kernel therefore works on four channels
 * at a time and copies the input rows their windows need into scratch, channel by channel, as
 * int16: element e of a buffered row is input column e - pad (the zero-point in the padding),
 * and elements 2j, 2j + 1 share a word. A channel's buffer holds three rows interleaved word by
 * word: word j of the row in slot s is at 3 j + s, and padded input row r (input row r - pad)
 * lives in slot r % 3, so that each input row is copied once per channel group whatever the
 * stride (a new output row overwrites the slots of the rows it no longer needs). The copy
 * (kdm_dw_put_) takes two pixels and four channels at a time: two word loads, a PKHBT and a
 * PKHTB that put the pixels' channel pairs side by side, and four SXTB16 make the four channels'
 * words. Which pairs of a row touch the padding is worked out once per layer (dw_put_plan):
 * those words take the zero-point without a test per pixel, and padding-only ones are stored
 * with no load. When in_c is not a multiple of 4 the last group overlaps the one before it.
 *
 * Each channel's output row then runs in assembly (kdm_dw3_rows_), two outputs per turn, with
 * the channel's nine weights in six registers: for each kernel row the pairs (w0, w1) and
 * (w1, w2), in slot order for the output row (a table per channel holds the three rotations;
 * with int8 weights the four channels' tables are built together, one word load per kernel tap
 * split by SXTB16 and paired by PKHBT / PKHTB).
 * Stride 1, outputs x and x + 1 from the words A = (r0, r1) and B = (r2, r3) of each kernel
 * row:
 *     out x     = SMLAD(A, (w0, w1)) + SMLABT(B, (w1, w2))      r0 w0 + r1 w1 + r2 w2
 *     out x + 1 = SMLATB(A, (w0, w1)) + SMLAD(B, (w1, w2))     r1 w0 + r2 w1 + r3 w2
 * and at stride 2 with A, B, C = (r0, r1), (r2, r3), (r4, r5):
 *     out x = SMLAD(A, (w0, w1)) + SMLABT(B, (w1, w2)),  out x + 1 = SMLAD(B, (w0, w1)) +
 *     SMLABT(C, (w1, w2)).
 * The three kernel rows' words come with one LDM each (the slot interleaving): 2 (stride 2: 3)
 * LDM and 12 multiply-accumulates for 18 MACs, then both sums are requantized in registers
 * (double rounding with a right or a left shift, or single rounding) and stored.
 *
 * Channels with a multiplier of 0 run as weights and bias 0 (every output at the zero-point);
 * a narrower activation clamp is applied to the stored rows afterwards. Other kernels and
 * strides, fewer than four channels and single rounding with shift >= 0 run the portable
 * loop dw_row_direct, which reads the input as the reference kernel does. Where there is no
 * assembly (hosts, for the tests), C versions of both routines stand in.
 */
#include "kdm_dsp.h"
#include "kdm_kernels.h"

/* What kdm_dw3_rows_ reads of one channel (offsets in its assembly). */
typedef struct {
    const uint32_t *buf; /*  0: the channel's buffer, word 0 of slot 0 */
    const uint32_t *tab; /*  4: the channel's weight table (dw_run) */
    uint32_t mac;        /*  8: the assembly's multiply block (by stride) */
    int32_t b, k;        /* 12, 16: right shift: 2 m, ~shift; left: 2 m, shift; single: m,
                            ~shift - 1 */
    int32_t bias;        /* 20 */
    uint32_t req;        /* 24: its requantization block, 0 for the C loop's channels */
    int32_t variant;     /* 28: the same as DW_S2 + DW_SINGLE and / or DW_LEFT, or DW_SKIP */
} dw_job;

/* And of the output row (offsets in the assembly). */
typedef struct {
    int32_t n;   /*  0: outputs */
    int32_t zp2; /*  4: 2 out_zp + 1 */
    int32_t ch;  /*  8: in_c, bytes between outputs */
    int8_t *out; /* 12: the first job's output x = 0 (the next job's is one byte on) */
    int32_t rot; /* 16: bytes into each weight table: the row's rotation */
} dw_row;

/* How kdm_dw_put_ buffers one input row (offsets in its assembly): the row's pairs of padded
 * columns, in order, are zl of padding only, a (padding, pixel 0) one if lead, n_mid of two
 * pixels, a (last pixel, padding) one if tail and zt of padding only. */
typedef struct {
    int32_t ch;       /*  0: in_c, bytes between pixels */
    int32_t cw_bytes; /*  4: bytes between the channels' buffers */
    int32_t zp;       /*  8: the input zero-point in each byte */
    int32_t zl;       /* 12 */
    int32_t lead;     /* 16 */
    int32_t n_mid;    /* 20 */
    int32_t tail;     /* 24 */
    int32_t zt;       /* 28 */
} dw_put_plan;

/* variant: which assembly blocks run the channel (dw_blocks), or DW_SKIP for dw_row_direct */
#define DW_S2     1 /* stride 2 (else 1) */
#define DW_SINGLE 2 /* single rounding: shift <= -2; with DW_LEFT shift = -1 */
#define DW_LEFT   4 /* double rounding, shift >= 0 */
#define DW_SKIP   8

#if KDM_ASM_JOBS
/* the offsets and sizes the assembly uses (32-bit pointers) */
typedef char
    dw_layout_[(sizeof(void *) == 4 && sizeof(dw_job) == 32 &&
                __builtin_offsetof(dw_job, mac) == 8 && __builtin_offsetof(dw_job, b) == 12 &&
                __builtin_offsetof(dw_job, req) == 24 && sizeof(dw_row) == 20 &&
                __builtin_offsetof(dw_row, out) == 12 && __builtin_offsetof(dw_row, rot) == 16 &&
                __builtin_offsetof(dw_put_plan, lead) == 16 && sizeof(dw_put_plan) == 32)
                   ? 1
                   : -1];
void kdm_dw3_rows_(const dw_job *j, int32_t n, const dw_row *row);
void kdm_dw_put_(uint32_t *d, const int8_t *px, const dw_put_plan *plan);

/* stride 1: sums r6 (x), r7 (x + 1) from the words of pairs j (A) and j + 1 (B) */
#define DW_MACS_S1                                                                                 \
    "ldm r11!, {r8, r9, r10}\n\t"                                                                  \
    "smlad r6, r8, r0, r6\n\t"                                                                     \
    "smlatb r7, r8, r0, r7\n\t"                                                                    \
    "smlad r6, r9, r2, r6\n\t"                                                                     \
    "smlatb r7, r9, r2, r7\n\t"                                                                    \
    "smlad r6, r10, r4, r6\n\t"                                                                    \
    "smlatb r7, r10, r4, r7\n\t"                                                                   \
    "ldm r11, {r8, r9, r10}\n\t"                                                                   \
    "smlabt r6, r8, r1, r6\n\t"                                                                    \
    "smlad r7, r8, r1, r7\n\t"                                                                     \
    "smlabt r6, r9, r3, r6\n\t"                                                                    \
    "smlad r7, r9, r3, r7\n\t"                                                                     \
    "smlabt r6, r10, r5, r6\n\t"                                                                   \
    "smlad r7, r10, r5, r7\n\t"

/* stride 2: pairs 2j (A), 2j + 1 (B), 2j + 2 (C) */
#define DW_MACS_S2                                                                                 \
    "ldm r11!, {r8, r9, r10}\n\t"                                                                  \
    "smlad r6, r8, r0, r6\n\t"                                                                     \
    "smlad r6, r9, r2, r6\n\t"                                                                     \
    "smlad r6, r10, r4, r6\n\t"                                                                    \
    "ldm r11!, {r8, r9, r10}\n\t"                                                                  \
    "smlabt r6, r8, r1, r6\n\t"                                                                    \
    "smlad r7, r8, r0, r7\n\t"                                                                     \
    "smlabt r6, r9, r3, r6\n\t"                                                                    \
    "smlad r7, r9, r2, r7\n\t"                                                                     \
    "smlabt r6, r10, r5, r6\n\t"                                                                   \
    "smlad r7, r10, r4, r7\n\t"                                                                    \
    "ldm r11, {r8, r9, r10}\n\t"                                                                   \
    "smlabt r7, r8, r1, r7\n\t"                                                                    \
    "smlabt r7, r9, r3, r7\n\t"                                                                    \
    "smlabt r7, r10, r5, r7\n\t"

/* Requantization of both sums up to v (kdm_dsp.h's KDM_ASM_RQ_*; the store block makes the
 * output KDM_ASM_RQ_OUT's sat8((v + zp2) / 2)): double rounding with a right shift, single
 * rounding (shift <= -2), and below double rounding with a left shift s (h = SMMLAR as in
 * KDM_ASM_RQ_DBL of x << s, v = 2 h saturated, so that (v + zp2) / 2 = h + zp) and single
 * rounding with shift -1 (SMMULR, v = 2 h). Between the two sums DW_ODD counts the outputs down
 * by two: a row's odd last output goes to .Ldw_odd with x's sum only (the flags it sets last
 * until DW_STORE's IT: nothing in between sets them). */
#define DW_ODD                                                                                     \
    "subs r12, r12, #2\n\t"                                                                        \
    "bmi .Ldw_odd\n\t"
#define DW_REQ_DBL                                                                                 \
    "ldrd r8, r9, [sp]\n\t" KDM_ASM_RQ_DBL("r6", "r8", "r9") DW_ODD KDM_ASM_RQ_DBL("r7", "r8", "r9")
#define DW_REQ_LEFT                                                                                \
    "ldrd r8, r9, [sp]\n\t"                                                                        \
    "lsl r6, r6, r9\n\t"                                                                           \
    "smmlar r6, r6, r8, r6\n\t"                                                                    \
    "qadd r6, r6, r6\n\t" DW_ODD "lsl r7, r7, r9\n\t"                                              \
    "smmlar r7, r7, r8, r7\n\t"                                                                    \
    "qadd r7, r7, r7\n\t"
/* single rounding with shift -1: SMMULR, then 2 h as above */
#define DW_REQ_SGL1                                                                                \
    "ldr r8, [sp]\n\t"                                                                             \
    "smmulr r6, r6, r8\n\t"                                                                        \
    "qadd r6, r6, r6\n\t" DW_ODD "smmulr r7, r7, r8\n\t"                                           \
    "qadd r7, r7, r7\n\t"
#define DW_REQ_SGL                                                                                 \
    "ldrd r8, r9, [sp]\n\t" KDM_ASM_RQ_SGL("r6", "r8", "r9") DW_ODD KDM_ASM_RQ_SGL("r7", "r8", "r9")

/* A block's entry, a Thumb function symbol so that dw_run can take its address. */
#define DW_ENTRY(name)                                                                             \
    ".global " name "\n\t"                                                                         \
    ".type " name ", %function\n\t"                                                                \
    ".thumb_func\n" name ":\n\t"

/* After a requantization block: (v + zp2) / 2 saturated and stored for both outputs, back to the
 * multiply block while outputs remain (DW_ODD's count). */
#define DW_STORE                                                                                   \
    "ldrd r8, r9, [sp, #8]\n\t" KDM_ASM_RQ_OUT("r6", "r8")                                         \
        KDM_ASM_RQ_OUT("r7", "r8") "strb r6, [lr]\n\t"                                             \
                                   "strb r7, [lr, r9]\n\t"                                         \
                                   "add lr, lr, r9, lsl #1\n\t"                                    \
                                   "it ne\n\t"                                                     \
                                   "ldrne pc, [sp, #44]\n\t"                                       \
                                   "b .Ldw_next\n"

/* A row's odd last output: x's value stored alone. */
#define DW_ODD_STORE "ldr r8, [sp, #8]\n\t" KDM_ASM_RQ_OUT("r6", "r8") "strb r6, [lr]\n"

/* The requantization blocks of the roundings KDM_ROUNDING_MASK admits (a job of another
 * rounding never reaches them: kdm_load refuses its model). */
#if KDM_ROUNDING_MASK & KDM_ROUNDING_BIT(0)
void kdm_dw_rd_(void);
void kdm_dw_rl_(void);
#define DW_DBL_BLOCKS                                                                              \
    ".p2align 2\n" DW_ENTRY("kdm_dw_rd_") DW_REQ_DBL DW_STORE                                      \
        ".p2align 2\n" DW_ENTRY("kdm_dw_rl_") DW_REQ_LEFT DW_STORE
#else
#define DW_DBL_BLOCKS
#endif
#if KDM_ROUNDING_MASK & KDM_ROUNDING_BIT(1)
void kdm_dw_rs_(void);
void kdm_dw_rs1_(void);
#define DW_SGL_BLOCKS                                                                              \
    ".p2align 2\n" DW_ENTRY("kdm_dw_rs_") DW_REQ_SGL DW_STORE                                      \
        ".p2align 2\n" DW_ENTRY("kdm_dw_rs1_") DW_REQ_SGL1 DW_STORE
#else
#define DW_SGL_BLOCKS
#endif
void kdm_dw_m1_(void);
void kdm_dw_m2_(void);

/*
 * r0 = the jobs, r1 = how many, r2 = the row. A turn (two outputs) is a multiply block (by
 * stride: bias, LDM, SMLAD ...) and a requantization block (by rounding and shift direction)
 * ending in the stores, joined by jumps through the frame (LDR PC): 34 instructions at stride 1
 * with a right shift. One block of each kind, instead of a loop per combination, keeps the code
 * small. Frame: [sp] b, k, zp2, in_c, bias, bias, the job, the jobs' end, outputs, the job's
 * output, the table offset, the multiply block, the requantization block. Registers: r0 - r5
 * the weight words, r6 / r7 the sums, r8 - r10 buffered words, r11 the buffer, r12 outputs
 * left, lr the output.
 */
__asm__(".section .text.kdm_dw3_rows_,\"ax\",%progbits\n\t"
        ".syntax unified\n\t"
        ".thumb\n\t"
        ".p2align 2\n\t"
        ".global kdm_dw3_rows_\n\t"
        ".type kdm_dw3_rows_, %function\n\t"
        ".thumb_func\n"
        "kdm_dw3_rows_:\n\t"
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"
        "sub sp, sp, #52\n\t"
        "ldm r2, {r2, r3, r4, r5, r6}\n\t"
        "strd r3, r4, [sp, #8]\n\t"
        "add r1, r0, r1, lsl #5\n\t"
        "str r1, [sp, #28]\n\t"
        "strd r2, r5, [sp, #32]\n\t"
        "str r6, [sp, #40]\n"
        ".Ldw_job:\n\t"
        "str r0, [sp, #24]\n\t"
        "ldrd r3, r10, [r0, #20]\n\t"
        "cmp r10, #0\n\t"
        "beq .Ldw_next\n\t"
        "ldrd r1, r2, [r0, #12]\n\t"
        "strd r1, r2, [sp]\n\t"
        "strd r3, r3, [sp, #16]\n\t"
        "ldr r1, [r0, #8]\n\t"
        "strd r1, r10, [sp, #44]\n\t"
        "ldrd r11, r1, [r0]\n\t"
        "ldrd r12, lr, [sp, #32]\n\t"
        "ldr r2, [sp, #40]\n\t"
        "add r1, r1, r2\n\t"
        "ldm r1, {r0, r1, r2, r3, r4, r5}\n\t"
        "ldr pc, [sp, #44]\n"
        ".Ldw_odd:\n\t" DW_ODD_STORE ".Ldw_next:\n\t"
        "ldr r0, [sp, #36]\n\t"
        "adds r0, r0, #1\n\t"
        "str r0, [sp, #36]\n\t"
        "ldrd r0, r1, [sp, #24]\n\t"
        "adds r0, r0, #32\n\t"
        "cmp r0, r1\n\t"
        "bne .Ldw_job\n\t"
        "add sp, sp, #52\n\t"
        "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n"
        ".p2align 2\n" DW_ENTRY(
            "kdm_dw_m1_") "ldrd r6, r7, [sp, #16]\n\t" DW_MACS_S1 "ldr pc, [sp, #48]\n"
                          ".p2align 2\n" DW_ENTRY(
                              "kdm_dw_m2_") "ldrd r6, r7, [sp, #16]\n\t" DW_MACS_S2
                                            "ldr pc, [sp, #48]\n" DW_DBL_BLOCKS DW_SGL_BLOCKS
                                            ".size kdm_dw3_rows_, . - kdm_dw3_rows_\n\t"
                                            ".text");

/* Two pixels' words of four channels in r8 (x) and r9 (x + 1) to the four channel buffers at r0
 * (r3 = bytes between them, r4 = 3 r3), r0 on to the next pair: 2 PKH, 4 SXTB16, 4 STR. */
#define DW_PUT_PAIR                                                                                \
    "pkhbt r10, r8, r9, lsl #16\n\t"                                                               \
    "pkhtb r12, r9, r8, asr #16\n\t"                                                               \
    "sxtb16 lr, r10\n\t"                                                                           \
    "sxtb16 r10, r10, ror #8\n\t"                                                                  \
    "str lr, [r0]\n\t"                                                                             \
    "str r10, [r0, r3]\n\t"                                                                        \
    "sxtb16 lr, r12\n\t"                                                                           \
    "sxtb16 r12, r12, ror #8\n\t"                                                                  \
    "str lr, [r0, r3, lsl #1]\n\t"                                                                 \
    "str r12, [r0, r4]\n\t"                                                                        \
    "adds r0, r0, #12\n\t"

/* r0 = d, r1 = the row's pixel 0 (channel c0), r2 = the row's plan (dw_put_plan): the pairs in
 * order are zl of padding only, one of (padding, pixel 0) if lead, n_mid of two pixels (17
 * instructions each), one of (last pixel, padding) if tail (through the same loop), and zt of
 * padding only (7 instructions each, no loads; r6 holds tail until the loop has run). */
__asm__(".section .text.kdm_dw_put_,\"ax\",%progbits\n\t"
        ".syntax unified\n\t"
        ".thumb\n\t"
        ".p2align 2\n\t"
        ".global kdm_dw_put_\n\t"
        ".type kdm_dw_put_, %function\n\t"
        ".thumb_func\n"
        "kdm_dw_put_:\n\t"
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"
        "mov r11, r2\n\t"
        "ldm r11, {r2, r3, r5, r7}\n\t"
        "add r4, r3, r3, lsl #1\n\t"
        "bl .Ldw_put_zp\n\t"
        "ldr r6, [r11, #24]\n\t"
        "ldrd r8, r7, [r11, #16]\n\t"
        "cmp r8, #0\n\t"
        "beq 2f\n\t"
        "mov r8, r5\n\t"
        "adds r7, r7, #1\n\t"
        "b 4f\n"
        "2:\n\t"
        "cbz r7, 5f\n"
        "3:\n\t"
        "ldr r8, [r1]\n\t"
        "add r1, r1, r2\n"
        "4:\n\t"
        "ldr r9, [r1]\n\t"
        "add r1, r1, r2\n"
        "9:\n\t" DW_PUT_PAIR "subs r7, r7, #1\n\t"
        "bne 3b\n"
        "5:\n\t"
        "cbz r6, 6f\n\t"
        "movs r6, #0\n\t"
        "ldr r8, [r1]\n\t"
        "mov r9, r5\n\t"
        "movs r7, #1\n\t"
        "b 9b\n"
        "6:\n\t"
        "ldr r7, [r11, #28]\n\t"
        "bl .Ldw_put_zp\n\t"
        "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n"
        ".Ldw_put_zp:\n\t"
        "cbz r7, 8f\n\t"
        "sxtb16 r8, r5\n"
        "7:\n\t"
        "str r8, [r0]\n\t"
        "str r8, [r0, r3]\n\t"
        "str r8, [r0, r3, lsl #1]\n\t"
        "str r8, [r0, r4]\n\t"
        "adds r0, r0, #12\n\t"
        "subs r7, r7, #1\n\t"
        "bne 7b\n"
        "8:\n\t"
        "bx lr\n\t"
        ".size kdm_dw_put_, . - kdm_dw_put_\n\t"
        ".text");

#else
/* What the assembly computes, in C (hosts: the tests run it against the reference). */
static void kdm_dw3_rows_(const dw_job *jobs, int32_t n_jobs, const dw_row *row)
{
    const int32_t zp2 = row->zp2, ch = row->ch;
    for (const dw_job *j = jobs; j < jobs + n_jobs; j++) {
        const uint32_t *a = j->buf, *w = j->tab + row->rot / 4;
        const int s2 = j->variant & DW_S2;
        for (int32_t x = 0; x < row->n && j->variant != DW_SKIP; x += 2) {
            int8_t *o = row->out + (j - jobs) + x * ch;
            int32_t v[2] = {j->bias, j->bias};
            for (int32_t s = 0; s < 3; s++) {
                const uint32_t w01 = w[2 * s], w12 = w[2 * s + 1];
                v[0] = kdm_smlabt(a[3 + s], w12, kdm_smlad(a[s], w01, v[0]));
                v[1] = s2 ? kdm_smlabt(a[6 + s], w12, kdm_smlad(a[3 + s], w01, v[1]))
                          : kdm_smlad(a[3 + s], w12, kdm_smlabt(w01, a[s], v[1]));
            }
            a += s2 ? 6 : 3;
            for (int32_t i = 0; i < 2; i++) {
                int32_t h = v[i];
                if ((j->variant & ~DW_S2) == DW_SINGLE) {
                    h = kdm_smmul(h, j->b) >> j->k;
                } else if ((j->variant & ~DW_S2) == (DW_SINGLE | DW_LEFT)) {
                    h = kdm_smmlar(h, j->b, 0);
                    h = kdm_qadd(h, h);
                } else if (j->variant & DW_LEFT) {
                    h = (int32_t)((uint32_t)h << j->k);
                    h = kdm_smmlar(h, j->b, h);
                    h = kdm_qadd(h, h);
                } else {
                    h = kdm_smmlar(h, j->b, h);
                    h = (h + (h >> 31)) >> j->k;
                }
                v[i] = kdm_ssat8_asr1(kdm_qadd(h, zp2));
            }
            o[0] = (int8_t)v[0];
            if (x + 1 < row->n)
                o[ch] = (int8_t)v[1];
        }
    }
}

/* Four channels' words of two pixels (v0: pixel x, v1: pixel x + 1, channel i in byte i). */
static uint32_t *dw_put_pair(uint32_t *d, int32_t cw, uint32_t v0, uint32_t v1)
{
    const uint32_t a0 = kdm_sxtb16(v0), a1 = kdm_sxtb16(v1);
    const uint32_t b0 = kdm_sxtb16_ror8(v0), b1 = kdm_sxtb16_ror8(v1);
    d[0] = kdm_pkhbt16(a0, a1);
    d[cw] = kdm_pkhbt16(b0, b1);
    d[2 * cw] = kdm_pkhtb16(a1, a0);
    d[3 * cw] = kdm_pkhtb16(b1, b0);
    return d + 3;
}

static void kdm_dw_put_(uint32_t *d, const int8_t *px, const dw_put_plan *p)
{
    const int32_t cw = p->cw_bytes / 4;
    const uint32_t zp = (uint32_t)p->zp;
    int32_t at = 0; /* the next pixel's byte (an offset: the row may end right after a pair) */
    for (int32_t j = 0; j < p->zl; j++)
        d = dw_put_pair(d, cw, zp, zp);
    if (p->lead) {
        d = dw_put_pair(d, cw, zp, kdm_ld32(px));
        at = p->ch;
    }
    for (int32_t j = 0; j < p->n_mid; j++, at += 2 * p->ch)
        d = dw_put_pair(d, cw, kdm_ld32(px + at), kdm_ld32(px + at + p->ch));
    if (p->tail)
        d = dw_put_pair(d, cw, kdm_ld32(px + at), zp);
    for (int32_t j = 0; j < p->zt; j++)
        d = dw_put_pair(d, cw, zp, zp);
}
#endif

/* The layer as dw_row_direct reads it. */
typedef struct {
    const kdm_conv_params *p;
    const kdm_requant_params *q;
    const uint8_t *w;
    int wbits;
} dw_geo;

/* Channel c's output row oy straight from the input, as the reference kernel computes it: any
 * kernel, stride and requantization (the layers and channels the assembly does not take). */
static void dw_row_direct(const dw_geo *g, const int8_t *in, int32_t c, int32_t oy, int8_t *o)
{
    const kdm_conv_params *p = g->p;
    const int32_t kh = p->kernel_h, kw = p->kernel_w, st = p->stride, ch = p->in_c;
    for (int32_t x = 0; x < p->out_w; x++, o += ch) {
        uint32_t acc = (uint32_t)g->q->bias[c];
        for (int32_t t = 0; t < kh * kw; t++) {
            const uint32_t iy = (uint32_t)(oy * st - p->pad + t / kw);
            const uint32_t ix = (uint32_t)(x * st - p->pad + t % kw);
            const int32_t v = iy < (uint32_t)p->in_h && ix < (uint32_t)p->in_w
                                  ? in[((int32_t)iy * p->in_w + (int32_t)ix) * ch + c]
                                  : p->in_zp;
            acc += (uint32_t)(v * kdm_dw_weight_(g->w, g->wbits, p->row_stride, t, c));
        }
        const int32_t a = (int32_t)acc;
        kdm_requant_row_(g->q, c, &a, o, 1); /* out of line: code size */
    }
}

/* The job's assembly blocks, from its variant. */
static void dw_blocks(dw_job *j)
{
#if KDM_ASM_JOBS
    const int v = j->variant;
    j->mac = (uint32_t)(uintptr_t)(v & DW_S2 ? kdm_dw_m2_ : kdm_dw_m1_);
    j->req = 0;
#if KDM_ROUNDING_MASK & KDM_ROUNDING_BIT(0)
    if (v < DW_SINGLE)
        j->req = (uint32_t)(uintptr_t)kdm_dw_rd_;
    else if ((v & ~DW_S2) == DW_LEFT)
        j->req = (uint32_t)(uintptr_t)kdm_dw_rl_;
#endif
#if KDM_ROUNDING_MASK & KDM_ROUNDING_BIT(1)
    if ((v & ~DW_S2) == DW_SINGLE)
        j->req = (uint32_t)(uintptr_t)kdm_dw_rs_;
    else if ((v & ~DW_S2) == (DW_SINGLE | DW_LEFT))
        j->req = (uint32_t)(uintptr_t)kdm_dw_rs1_;
#endif
#else
    (void)j;
#endif
}

static KDM_NOINLINE void dw_run(const kdm_conv_params *p, const kdm_requant_params *q,
                                const int8_t *in, const uint8_t *w, int wbits, int8_t *out,
                                void *scratch)
{
    const int32_t ch = p->in_c, kh = p->kernel_h, st = p->stride, rs = p->row_stride;
    /* words per buffered row: the turns read pairs up to ceil(out_w / 2) (stride 1) or twice that
     * (stride 2); at most kdm_depthwise_scratch_size_'s (in_w + 2 pad + 3) / 2 */
    const int32_t half = (p->out_w + 1) >> 1, np = st == 1 ? half + 1 : 2 * half + 1, cw = kh * np;
    const dw_geo g = {p, q, w, wbits};
    /* a row's pairs cover padded columns -pad .. 2 np - pad - 1 (dw_put_plan); a padding row's
     * are padding only */
    const int32_t zpb = (int32_t)((uint8_t)p->in_zp * 0x01010101u);
    const int32_t lead = p->pad & 1, avail = p->in_w - lead, rest = np - (p->pad >> 1) - lead;
    const int32_t mid = avail >> 1 < rest ? avail >> 1 : rest, tail = rest > mid && (avail & 1);
    const dw_put_plan plan = {ch, 4 * cw, zpb, p->pad >> 1, lead, mid, tail, rest - mid - tail},
                      pad_plan = {ch, 4 * cw, zpb, np, 0, 0, 0, 0};
    uint32_t *tab = (uint32_t *)scratch, *buf;
    const int single = KDM_SINGLE_ROUNDING_(q->flags) ? 1 : 0;
    if (!kdm_depthwise_rows_((uint32_t)kh, (uint32_t)p->kernel_w, (uint32_t)st, (uint32_t)ch)) {
        for (int32_t oy = 0; oy < p->out_h; oy++)
            for (int32_t c = 0; c < ch; c++)
                dw_row_direct(&g, in, c, oy, out + oy * p->out_w * ch + c);
        return;
    }
    buf = tab + 4 * KDM_DW_TAB_WORDS; /* the 3x3 path's scratch holds the tables and the rows */
    dw_row row = {p->out_w, 2 * q->out_zp + 1, ch, out, 0};
    dw_job job[4];
    const int32_t in_row_bytes = p->in_w * ch, out_row_bytes = p->out_w * ch;
    const int clamp = q->act_min != -128 || q->act_max != 127;
    /* four channels at a time; the last four overlap the group before when in_c % 4 != 0 */
    for (int32_t c0 = 0; c0 < ch; c0 += 4) {
        if (c0 > ch - 4)
            c0 = ch - 4;
        int skip = 0;
        const int w8 = KDM_IS_W8_(wbits);
        if (w8) /* int8: a kernel tap's four channels are one word */
            for (int32_t ky = 0, at = c0; ky < 3; ky++, at += 3 * rs) {
                const uint32_t t0 = kdm_ld32(w + at), t1 = kdm_ld32(w + at + rs),
                               t2 = kdm_ld32(w + at + 2 * rs);
                const uint32_t e0 = kdm_sxtb16(t0), e1 = kdm_sxtb16(t1), e2 = kdm_sxtb16(t2);
                const uint32_t o0 = kdm_sxtb16_ror8(t0), o1 = kdm_sxtb16_ror8(t1),
                               o2 = kdm_sxtb16_ror8(t2);
                uint32_t *tt = tab + 2 * ky; /* channel i's words at i KDM_DW_TAB_WORDS */
                tt[0] = kdm_pkhbt16(e0, e1);
                tt[1] = kdm_pkhbt16(e1, e2);
                tt[KDM_DW_TAB_WORDS] = kdm_pkhbt16(o0, o1);
                tt[KDM_DW_TAB_WORDS + 1] = kdm_pkhbt16(o1, o2);
                tt[2 * KDM_DW_TAB_WORDS] = kdm_pkhtb16(e1, e0);
                tt[2 * KDM_DW_TAB_WORDS + 1] = kdm_pkhtb16(e2, e1);
                tt[3 * KDM_DW_TAB_WORDS] = kdm_pkhtb16(o1, o0);
                tt[3 * KDM_DW_TAB_WORDS + 1] = kdm_pkhtb16(o2, o1);
            }
        for (int32_t i = 0; i < 4; i++) {
            const int32_t c = c0 + i, m = q->mult[c], s = q->shift[c];
            dw_job *j = &job[i];
            /* (w0, w1), (w1, w2) of kernel rows 0, 1, 2, 0, 1: rotation r (slot s holds kernel
             * row (s - r) mod 3) is the six words from 2 ((3 - r) mod 3); m = 0 (output zp) as
             * weights and bias 0 */
            uint32_t *tt = tab + i * KDM_DW_TAB_WORDS;
            const int32_t up = 28 - 4 * (c & 1); /* int4: the channel's nibble to the top */
            for (int32_t ky = 0, at = c >> 1; ky < 3 && !w8; ky++, at += 3 * rs) {
                const int32_t k0 = kdm_dw_tap_(w + at, w8, up),
                              k1 = kdm_dw_tap_(w + at + rs, w8, up),
                              k2 = kdm_dw_tap_(w + at + 2 * rs, w8, up);
                tt[2 * ky] = kdm_pack16(k0, k1);
                tt[2 * ky + 1] = kdm_pack16(k1, k2);
            }
            for (int32_t e = 0; e < 6 && !m; e++)
                tt[e] = 0;
            for (int32_t e = 6; e < 10; e++)
                tt[e] = tt[e - 6];
            j->buf = buf + i * cw;
            j->tab = tt;
            j->b = single ? m : (int32_t)((uint32_t)m << 1);
            j->k = !m ? 0 : single ? ~s - 1 : s < 0 ? ~s : s;
            j->bias = m ? q->bias[c] : 0;
            /* left: a shift >= 0 (double rounding), -1 (single); m = 0 runs as a right shift */
            const int left = m && s >= (single ? -1 : 0);
            j->variant = (st == 2) + (single ? DW_SINGLE : 0) + (left ? DW_LEFT : 0);
            if (single && m && s >= 0) { /* the portable loop's */
                j->variant = DW_SKIP;
                skip = 1;
            }
            dw_blocks(j);
        }
        /* padded input row r (input row r - pad) into slot r % 3; output row oy once rows
         * oy st .. oy st + 2 are in, the first of them in the slot after row r's */
        int32_t slot = 0;
        for (int32_t r = 0, oy = 0; oy < p->out_h; r++) {
            const uint32_t iy = (uint32_t)(r - p->pad);
            const int in_row = iy < (uint32_t)p->in_h;
            kdm_dw_put_(buf + slot, in + (in_row ? (int32_t)iy * in_row_bytes + c0 : 0),
                        in_row ? &plan : &pad_plan);
            slot = slot == 2 ? 0 : slot + 1;
            if (r < 2 || ((r - 2) & (st - 1))) /* stride 1 or 2 */
                continue;
            int8_t *o = out + oy * out_row_bytes + c0;
            for (int32_t i = 0; i < 4 && skip; i++)
                if (job[i].variant == DW_SKIP)
                    dw_row_direct(&g, in, c0 + i, oy, o + i);
            row.out = o;
            row.rot = slot ? 24 - 8 * slot : 0;
            kdm_dw3_rows_(job, 4, &row);
            if (clamp) /* again where dw_row_direct clamped */
                for (int32_t x = 0; x < out_row_bytes; x += ch)
                    kdm_clamp_row_(o + x, 4, q->act_min, q->act_max);
            oy++;
        }
    }
}

void kdm_depthwise_s8_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const int8_t *w, int8_t *out, void *scratch)
{
    dw_run(p, q, in, (const uint8_t *)w, 8, out, scratch);
}

void kdm_depthwise_s4_dsp(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                          const uint8_t *w, int8_t *out, void *scratch)
{
    dw_run(p, q, in, w, 4, out, scratch);
}
