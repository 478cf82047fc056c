/*
 * plan.c - the arena plan: where each activation tensor lives, and the scratch area.
 *
 * Lifetimes are closed intervals of op indices: a tensor is alive from the op that writes it
 * (-1 for the model input, written by kdm_invoke before op 0) to the last op that reads it
 * (n_ops for the model output, read by kdm_invoke after the last op). Two tensors alive at the
 * same op never share bytes; in particular an op's output never overlaps its inputs, as kdm.h
 * requires.
 *
 * Two placements are computed and the smaller kept (the first on ties):
 *   greedy-size  tensors by size, largest first, each at the lowest 4-aligned offset that
 *                overlaps no placed tensor alive at the same time;
 *   two-ended    tensors in execution order, each on the side (bottom or top of the lower bound)
 *                opposite to the most recently written tensor it conflicts with: at the lowest
 *                fitting offset, or at the highest one ending within the bound. For a chain this
 *                alternates bottom / top and meets the bound max(size[i] + size[i + 1]), which
 *                greedy-size can miss (sizes 5, 4, 6, 7 give it 17 instead of 13).
 * The lower bound is the largest total size alive at one op. Sizes here are small (tens of
 * tensors), so the quadratic placement costs nothing.
 */
#include <stdlib.h>
#include <string.h>

#include "export.h"

typedef struct {
    uint32_t lo, hi;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static int conflict(const int *first, const int *last, int i, int j)
{
    return first[i] <= last[j] && first[j] <= last[i];
}

/* Spans of the placed tensors conflicting with i, sorted by offset; their count. */
static int conflicts(int n, int i, const uint32_t *sz, const int *first, const int *last,
                     const uint32_t *off, const char *placed, span *sp)
{
    int k = 0;
    for (int j = 0; j < n; j++)
        if (j != i && placed[j] && conflict(first, last, i, j))
            sp[k++] = (span){off[j], off[j] + sz[j]};
    qsort(sp, (size_t)k, sizeof *sp, cmp_span);
    return k;
}

static uint32_t lowest_fit(const span *sp, int k, uint32_t size)
{
    uint32_t at = 0;
    for (int j = 0; j < k; j++) {
        if (sp[j].lo >= at + size)
            break; /* the gap before sp[j] holds it (spans are sorted by start) */
        if (sp[j].hi > at)
            at = sp[j].hi;
    }
    return at;
}

static int fits(const span *sp, int k, uint32_t at, uint32_t size)
{
    for (int j = 0; j < k; j++)
        if (sp[j].lo < at + size && at < sp[j].hi)
            return 0;
    return 1;
}

/* The highest offset with [at, at + size) inside [0, bound) and free; 0 with *ok = 0 if none. */
static uint32_t highest_fit(const span *sp, int k, uint32_t size, uint32_t bound, int *ok)
{
    *ok = 0;
    if (size > bound)
        return 0;
    uint32_t best = 0;
    uint32_t cand = bound - size;
    if (fits(sp, k, cand, size)) {
        *ok = 1;
        return cand;
    }
    for (int j = 0; j < k; j++) {
        if (sp[j].lo < size)
            continue;
        cand = sp[j].lo - size;
        if (cand + size <= bound && (!*ok || cand > best) && fits(sp, k, cand, size)) {
            best = cand;
            *ok = 1;
        }
    }
    return best;
}

static int by_size_desc(const void *a, const void *b, void *ctx)
{
    const uint32_t *sz = ctx;
    int x = *(const int *)a, y = *(const int *)b;
    if (sz[x] != sz[y])
        return sz[x] > sz[y] ? -1 : 1;
    return x - y;
}

static int by_first(const void *a, const void *b, void *ctx)
{
    const int *first = ctx;
    int x = *(const int *)a, y = *(const int *)b;
    if (first[x] != first[y])
        return first[x] - first[y];
    return x - y;
}

kd_status kd_export_plan_arena(int n, const uint32_t *size, const int *first, const int *last,
                               uint32_t *off, uint32_t *total, uint32_t *bound, char method[16])
{
    *total = *bound = 0;
    if (n <= 0)
        return KD_OK;
    uint32_t *sz = malloc(sizeof *sz * (size_t)n);
    uint32_t *offb = malloc(sizeof *offb * (size_t)n);
    int *order = malloc(sizeof *order * (size_t)n);
    int *side = malloc(sizeof *side * (size_t)n);
    char *placed = malloc((size_t)n);
    span *sp = malloc(sizeof *sp * (size_t)n);
    kd_status st = KD_OK;
    if (!sz || !offb || !order || !side || !placed || !sp) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory planning the arena");
        goto done;
    }
    uint64_t sum = 0;
    int tmin = first[0], tmax = last[0];
    for (int i = 0; i < n; i++) {
        if (size[i] > UINT32_MAX - 3 || last[i] < first[i]) {
            st = KD_FAIL(KD_ERR_INVALID, "export: tensor %d has size %u and lifetime [%d, %d]", i,
                         size[i], first[i], last[i]);
            goto done;
        }
        sz[i] = (size[i] + 3u) & ~3u;
        sum += sz[i];
        tmin = first[i] < tmin ? first[i] : tmin;
        tmax = last[i] > tmax ? last[i] : tmax;
    }
    if (sum > UINT32_MAX) {
        st = KD_FAIL(KD_ERR_INVALID, "export: activations of %llu bytes do not fit a 32-bit arena",
                     (unsigned long long)sum);
        goto done;
    }
    uint64_t lb = 0;
    for (int t = tmin; t <= tmax; t++) {
        uint64_t live = 0;
        for (int i = 0; i < n; i++)
            if (first[i] <= t && t <= last[i])
                live += sz[i];
        lb = live > lb ? live : lb;
    }
    *bound = (uint32_t)lb;

    /* greedy-size */
    uint32_t total_a = 0;
    for (int i = 0; i < n; i++)
        order[i] = i;
    qsort_r(order, (size_t)n, sizeof *order, by_size_desc, sz);
    memset(placed, 0, (size_t)n);
    for (int r = 0; r < n; r++) {
        int i = order[r];
        int k = conflicts(n, i, sz, first, last, off, placed, sp);
        off[i] = lowest_fit(sp, k, sz[i]);
        placed[i] = 1;
        total_a = off[i] + sz[i] > total_a ? off[i] + sz[i] : total_a;
    }

    /* two-ended */
    uint32_t total_b = 0;
    for (int i = 0; i < n; i++)
        order[i] = i;
    qsort_r(order, (size_t)n, sizeof *order, by_first, (void *)first);
    memset(placed, 0, (size_t)n);
    for (int r = 0; r < n; r++) {
        int i = order[r], recent = -1;
        for (int j = 0; j < n; j++)
            if (placed[j] && conflict(first, last, i, j) &&
                (recent < 0 || first[j] > first[recent] ||
                 (first[j] == first[recent] && j > recent)))
                recent = j;
        side[i] = recent < 0 ? 0 : !side[recent];
        int k = conflicts(n, i, sz, first, last, offb, placed, sp);
        int ok = 0;
        if (side[i])
            offb[i] = highest_fit(sp, k, sz[i], *bound, &ok);
        if (!ok)
            offb[i] = lowest_fit(sp, k, sz[i]);
        placed[i] = 1;
        total_b = offb[i] + sz[i] > total_b ? offb[i] + sz[i] : total_b;
    }
    if (total_b < total_a) {
        memcpy(off, offb, sizeof *off * (size_t)n);
        *total = total_b;
        if (method)
            snprintf(method, 16, "two-ended");
    } else {
        *total = total_a;
        if (method)
            snprintf(method, 16, "greedy-size");
    }
done:
    free(sz);
    free(offb);
    free(order);
    free(side);
    free(placed);
    free(sp);
    return st;
}

kd_status kd_export_plan(kd_export_graph *g)
{
    uint32_t *size = malloc(sizeof *size * (size_t)g->nt);
    uint32_t *off = malloc(sizeof *off * (size_t)g->nt);
    int *first = malloc(sizeof *first * (size_t)g->nt);
    int *last = malloc(sizeof *last * (size_t)g->nt);
    kd_status st = KD_OK;
    if (!size || !off || !first || !last) {
        st = KD_FAIL(KD_ERR_NOMEM, "export: out of memory planning the arena");
        goto done;
    }
    for (int i = 0; i < g->nt; i++) {
        size[i] = g->t[i].bytes;
        first[i] = g->t[i].producer;
        last[i] = g->t[i].last_use;
    }
    if ((st = kd_export_plan_arena(g->nt, size, first, last, off, &g->tensors_end, &g->arena_bound,
                                   g->plan_method)))
        goto done;
    for (int i = 0; i < g->nt; i++)
        g->t[i].arena_off = off[i];
    uint32_t scratch = 0;
    for (int i = 0; i < g->nop; i++) {
        int32_t rec[KDM_OP_WORDS];
        const uint32_t zero[4] = {0, 0, 0, 0};
        kd_export_op_record(g, i, zero, rec);
        const kd_export_tensor *ti = &g->t[g->op[i].in0];
        uint32_t s = kdm_op_scratch_size(rec, (uint32_t)ti->c, (uint32_t)ti->h, (uint32_t)ti->w);
        scratch = s > scratch ? s : scratch;
    }
    g->scratch_size = (scratch + 3u) & ~3u;
    g->scratch_off = g->tensors_end;
    if ((uint64_t)g->scratch_off + g->scratch_size > UINT32_MAX) {
        st = KD_FAIL(KD_ERR_INVALID, "export: the arena does not fit 32 bits");
        goto done;
    }
    g->arena_size = g->scratch_off + g->scratch_size;
done:
    free(size);
    free(off);
    free(first);
    free(last);
    return st;
}
