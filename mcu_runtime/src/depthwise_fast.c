/*
 * depthwise_fast.c - depthwise convolution for cores without the DSP extension (Cortex-M0/M0+/M3;
 * see kdm_kernels.h), int8 or int4 weights. Bit-identical to depthwise_s8_ref.c /
 * depthwise_s4_ref.c: the same int32 sums modulo 2^32 and the same requantization; only the
 * order of the additions differs.
 *
 * The reference kernel tests every tap against the padding and decodes its weight per MAC. Here
 * channels are the outer loop and a channel's taps are decoded once (an int4 nibble included)
 * into a small table. 3x3 kernels at stride 1 or 2 (the usual depthwise layers, with four or
 * more channels: kdm_depthwise_rows_) copy the channel's input rows into the scratch area with
 * the zero-point in the padding, so that every window is nine bytes at fixed offsets (dw3_rows).
 * Other kernels split each output row into the outputs whose window lies wholly inside the
 * input, read at fixed offsets from one pointer with no test, and the border outputs, which take
 * the input zero-point where the window leaves the input. Kernels of more than DW_MAX_TAPS taps
 * run the reference kernel.
 */
#include "kdm_kernels.h"

#define DW_MAX_TAPS 25

/* The first output index whose window starts at or after input 0, and the end of those whose
 * window ends inside an input of n values (window k, stride st, padding pad), clipped to
 * [0, n_out]; lo >= hi when there are none. Counted rather than divided, once per layer: the
 * ARMv6-M cores have no divide instruction, and libgcc's would add about 470 bytes of code
 * ((n_out - 1) st <= n + 2 pad - k, so nothing here overflows). */
static void dw_inner(int32_t n, int32_t n_out, int32_t k, int32_t st, int32_t pad, int32_t *lo,
                     int32_t *hi)
{
    int32_t a = 0, b = n_out;
    while (a < n_out && a * st < pad)
        a++;
    while (b > 0 && (b - 1) * st - pad + k > n)
        b--;
    *lo = a;
    *hi = b;
}

/*
 * 3x3 at stride 1 or 2 with the scratch kdm_depthwise_scratch_size_ gives (kdm_depthwise_rows_):
 * channel c's input rows are copied into scratch as bytes x + 128, with the input zero-point in
 * the padding, so that every window lies inside the buffer. Three rows interleave byte by byte:
 * padded column j of the row in slot s is byte 3 j + s, padded row r (input row r - pad) lives in
 * slot r % 3, so each input row is copied once per channel and a window is the nine bytes from
 * 3 x st. The weights go in the window's byte order for each of the three slot rotations, and
 * 128 sum(w) leaves the bias: sum (x + 128) w - 128 sum(w) = sum x w.
 */
static void dw3_rows(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                     const int32_t *k, int32_t c, int8_t *out, uint8_t *buf)
{
    const int32_t ch = p->in_c, st = p->stride, pad = p->pad, pw = p->in_w + 2 * pad;
    const uint8_t zb = (uint8_t)(p->in_zp ^ 0x80);
    int32_t kr[3][9]; /* kr[rot][3 kx + s] = k[(s - rot) mod 3][kx] */
    uint32_t ksum = 0;
    for (int32_t t = 0; t < 9; t++)
        ksum += (uint32_t)k[t];
    for (int32_t rot = 0; rot < 3; rot++)
        for (int32_t s = 0, ky = 3 - rot; s < 3; s++, ky++) /* ky = (s - rot) mod 3 */
            for (int32_t kx = 0; kx < 3; kx++)
                kr[rot][3 * kx + s] = k[3 * (ky < 3 ? ky : ky - 3) + kx];
    const uint32_t bias = (uint32_t)q->bias[c] - 128u * ksum;
    const int single = KDM_SINGLE_ROUNDING_(q->flags);
    const int32_t m = q->mult[c], sh = q->shift[c];
    const int32_t lo = q->act_min - q->out_zp, hi = q->act_max - q->out_zp, zp = q->out_zp;
    /* locals: the byte stores below could alias *p and *q for the compiler */
    const int32_t ih = p->in_h, iw = p->in_w, oh = p->out_h, ow = p->out_w, step = 3 * st;
    int32_t next = 0, slot = 0, rot = 0; /* the next padded row to copy, its slot; oy st % 3 */
    for (int32_t oy = 0; oy < oh; oy++) {
        for (; next <= oy * st + 2; next++, slot = slot == 2 ? 0 : slot + 1) {
            uint8_t *d = buf + slot, *e = d + 3 * pw;
            const uint32_t iy = (uint32_t)(next - pad);
            if (iy < (uint32_t)ih) {
                const int8_t *src = in + (int32_t)iy * iw * ch + c;
                for (uint8_t *pe = d + 3 * pad; d != pe; d += 3)
                    *d = zb;
                for (uint8_t *xe = d + 3 * iw; d != xe; d += 3, src += ch)
                    *d = (uint8_t)(*src ^ 0x80);
            }
            for (; d != e; d += 3) /* the right padding, or a whole padding row */
                *d = zb;
        }
        const int32_t *kt = kr[rot];
        rot += st;
        rot -= rot >= 3 ? 3 : 0;
        const uint8_t *a = buf;
        int8_t *o = out + oy * ow * ch + c, *oe = o + ow * ch;
        for (; o != oe; a += step, o += ch) {
            uint32_t acc = bias;
            acc += (uint32_t)(a[0] * kt[0]) + (uint32_t)(a[1] * kt[1]) + (uint32_t)(a[2] * kt[2]);
            acc += (uint32_t)(a[3] * kt[3]) + (uint32_t)(a[4] * kt[4]) + (uint32_t)(a[5] * kt[5]);
            acc += (uint32_t)(a[6] * kt[6]) + (uint32_t)(a[7] * kt[7]) + (uint32_t)(a[8] * kt[8]);
            /* kdm_requant_out_ with the channel's values held in locals for double rounding:
             * calling it for every output (reloading them) took the INT8 inference on the
             * Cortex-M0+ from 5 766 156 to 5 878 620 instructions */
            if (single) {
                *o = kdm_requant_out_(q, c, (int32_t)acc);
            } else {
                int32_t v = kdm_requant_((int32_t)acc, m, sh, 0);
                v = v < lo ? lo : v > hi ? hi : v;
                *o = (int8_t)(v + zp);
            }
        }
    }
}

static void dw_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                    const uint8_t *w, int wbits, int8_t *out, void *scratch)
{
    const int32_t kh = p->kernel_h, kw = p->kernel_w, nt = kh * kw;
    const int32_t ch = p->in_c, st = p->stride, pad = p->pad, rb = p->in_w * ch;
    int32_t off[DW_MAX_TAPS], k[DW_MAX_TAPS], y0, y1, x0, x1;
    for (int32_t ky = 0, t = 0; ky < kh; ky++)
        for (int32_t kx = 0; kx < kw; kx++, t++)
            off[t] = ky * rb + kx * ch;
    dw_inner(p->in_h, p->out_h, kh, st, pad, &y0, &y1);
    dw_inner(p->in_w, p->out_w, kw, st, pad, &x0, &x1);
    const int rows = kdm_depthwise_rows_((uint32_t)kh, (uint32_t)kw, (uint32_t)st, (uint32_t)ch);
    for (int32_t c = 0; c < ch; c++) {
        for (int32_t t = 0; t < nt; t++)
            k[t] = kdm_dw_weight_(w, wbits, p->row_stride, t, c);
        if (rows) {
            dw3_rows(p, q, in, k, c, out, (uint8_t *)scratch);
            continue;
        }
        for (int32_t oy = 0; oy < p->out_h; oy++) {
            int8_t *o = out + oy * p->out_w * ch + c;
            const int32_t iy = oy * st - pad;
            const int inner = oy >= y0 && oy < y1 && x0 < x1;
            for (int32_t ox = 0; ox < p->out_w; ox++, o += ch) {
                const int32_t ix = ox * st - pad;
                if (inner && ox == x0) { /* the interior run, then on past it */
                    const int8_t *a = in + iy * rb + ix * ch + c;
                    const int32_t n = x1 - x0;
                    for (int32_t i = 0; i < n; i++, a += st * ch) {
                        uint32_t s = (uint32_t)q->bias[c];
                        for (int32_t t = 0; t < nt; t++)
                            s += (uint32_t)(a[off[t]] * k[t]);
                        o[i * ch] = kdm_requant_out_(q, c, (int32_t)s);
                    }
                    ox = x1 - 1;
                    o += (n - 1) * ch;
                    continue;
                }
                uint32_t s = (uint32_t)q->bias[c];
                for (int32_t ky = 0, t = 0; ky < kh; ky++) {
                    const uint32_t y = (uint32_t)(iy + ky);
                    for (int32_t kx = 0; kx < kw; kx++, t++) {
                        const uint32_t x = (uint32_t)(ix + kx);
                        const int32_t v = y < (uint32_t)p->in_h && x < (uint32_t)p->in_w
                                              ? in[(int32_t)y * rb + (int32_t)x * ch + c]
                                              : p->in_zp;
                        s += (uint32_t)(v * k[t]);
                    }
                }
                *o = kdm_requant_out_(q, c, (int32_t)s);
            }
        }
    }
}

void kdm_depthwise_s8_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                           const int8_t *w, int8_t *out, void *scratch)
{
    if (p->kernel_h * p->kernel_w > DW_MAX_TAPS) {
        kdm_depthwise_s8_ref(p, q, in, w, out, scratch);
        return;
    }
    dw_fast(p, q, in, (const uint8_t *)w, 8, out, scratch);
}

void kdm_depthwise_s4_fast(const kdm_conv_params *p, const kdm_requant_params *q, const int8_t *in,
                           const uint8_t *w, int8_t *out, void *scratch)
{
    if (p->kernel_h * p->kernel_w > DW_MAX_TAPS) {
        kdm_depthwise_s4_ref(p, q, in, w, out, scratch);
        return;
    }
    dw_fast(p, q, in, w, 4, out, scratch);
}
