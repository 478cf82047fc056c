/*
 * checkpoint.c - safetensors checkpoints of a model's state table.
 *
 * The state table (model.h) is the single description of what is saved:
 * PARAM rows slice the parameter buffer, BUFFER rows the running-statistics
 * buffer, COUNTER rows are int64 scalars. Loading validates every row before
 * touching the model, so a bad file leaves the model as it was.
 */
#include "checkpoint.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h" /* kd_f16_to_f32 */
#include "safetensors.h"

#define KD_CKPT_FORMAT "distill-checkpoint-v1"

/*
 * The first value a trained model cannot hold in the host copies hp (parameters), hb (buffers)
 * and state (nstate optimizer floats): a non-finite number or, with check_var, a negative
 * running variance. 1 with *bad (the entry; NULL for the optimizer state), *at and *v set;
 * 0 when every value is valid.
 */
static int first_invalid(const kd_model *m, const float *hp, const float *hb, const float *state,
                         size_t nstate, size_t nonneg_from, int check_var,
                         const kd_state_entry **bad, size_t *at, float *v)
{
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        if (e->kind == KD_ENTRY_COUNTER)
            continue;
        const float *x = (e->kind == KD_ENTRY_PARAM ? hp : hb) + e->offset;
        const int var = check_var && strstr(e->name, "running_var") != NULL;
        for (size_t j = 0; j < e->numel; j++)
            if (!isfinite(x[j]) || (var && x[j] < 0)) {
                *bad = e, *at = j, *v = x[j];
                return 1;
            }
    }
    for (size_t j = 0; j < nstate; j++)
        if (!isfinite(state[j]) || (j >= nonneg_from && state[j] < 0)) {
            *bad = NULL, *at = j, *v = state[j];
            return 1;
        }
    return 0;
}

kd_status kd_checkpoint_save(const char *path, const kd_model *m, const float *state, size_t nstate,
                             const kd_ckpt_info *info)
{
    size_t nent = (size_t)m->nentries + (state ? 1 : 0);
    kd_st_entry *ents = calloc(nent, sizeof *ents);
    float *hp = malloc((m->nparams + 1) * sizeof(float));
    float *hb = malloc((m->nbuffers + 1) * sizeof(float));
    float *hs = state ? malloc((nstate + 1) * sizeof(float)) : NULL;
    int64_t *counters = calloc((size_t)m->nentries + 1, sizeof(int64_t));
    kd_status st = KD_OK;
    if (!ents || !hp || !hb || !counters || (state && !hs)) {
        st = KD_FAIL(KD_ERR_NOMEM, "out of memory saving '%s'", path);
        goto done;
    }
    if ((st = m->be->download(hp, m->params, m->nparams * sizeof(float))) ||
        (st = m->be->download(hb, m->buffers, m->nbuffers * sizeof(float))) ||
        (state && (st = m->be->download(hs, state, nstate * sizeof(float)))))
        goto done;
    /* a diverged model is never written over the last good checkpoint (which the loader would
     * have refused anyway) */
    const kd_state_entry *bad;
    size_t at;
    float v;
    if (first_invalid(m, hp, hb, hs, state ? nstate : 0, SIZE_MAX, 0, &bad, &at, &v)) {
        if (bad)
            st = KD_FAIL(KD_ERR_INTERNAL,
                         "'%s' not written: %s[%zu] is %g at step %" PRId64
                         ": the weights diverged (lower optim.lr or set optim.clip_norm); the "
                         "file keeps what it held",
                         path, bad->name, at, (double)v, info->step);
        else
            st = KD_FAIL(KD_ERR_INTERNAL,
                         "'%s' not written: the optimizer state holds %g at index %zu at step "
                         "%" PRId64 ": the run diverged (lower optim.lr or set optim.clip_norm); "
                         "the file keeps what it held",
                         path, (double)v, at, info->step);
        goto done;
    }
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        kd_st_entry *t = &ents[i];
        t->name = e->name;
        t->ndim = e->ndim;
        memcpy(t->shape, e->shape, sizeof t->shape);
        if (e->kind == KD_ENTRY_COUNTER) {
            counters[i] = e->counter ? *e->counter : 0;
            t->dtype = KD_DTYPE_I64;
            t->data = &counters[i];
        } else {
            t->dtype = KD_DTYPE_F32;
            t->data = (e->kind == KD_ENTRY_PARAM ? hp : hb) + e->offset;
        }
    }
    if (state) {
        kd_st_entry *t = &ents[m->nentries];
        t->name = "__optim__.state";
        t->dtype = KD_DTYPE_F32;
        t->ndim = 2;
        t->shape[0] = m->nparams ? (int64_t)(nstate / m->nparams) : 0;
        t->shape[1] = (int64_t)m->nparams;
        t->data = hs;
    }
    char hash[32], step[32], epoch[32], best[64], seed[32], bs[32], ns[32], el[64], ec[32], es[32];
    char split[32], sched[32], run[32], jid[32];
    snprintf(hash, sizeof hash, "%016" PRIx64, m->def_hash);
    snprintf(split, sizeof split, "%016" PRIx64, info->split_hash);
    snprintf(sched, sizeof sched, "%" PRId64, info->schedule_steps);
    snprintf(run, sizeof run, "%016" PRIx64, info->run_id);
    snprintf(jid, sizeof jid, "%016" PRIx64, info->job_id);
    snprintf(step, sizeof step, "%" PRId64, info->step);
    snprintf(epoch, sizeof epoch, "%" PRId64, info->epoch);
    snprintf(best, sizeof best, "%.17g", info->best_val_acc);
    snprintf(seed, sizeof seed, "%" PRIu64, info->seed);
    snprintf(bs, sizeof bs, "%" PRId64, info->batch_size);
    snprintf(ns, sizeof ns, "%" PRId64, info->train_samples);
    snprintf(el, sizeof el, "%.17g", info->epoch_loss);
    snprintf(ec, sizeof ec, "%" PRId64, info->epoch_correct);
    snprintf(es, sizeof es, "%" PRId64, info->epoch_seen);
    const char *meta[] = {"format",         KD_CKPT_FORMAT,
                          "model_hash",     hash,
                          "step",           step,
                          "epoch",          epoch,
                          "best_val_acc",   best,
                          "seed",           seed,
                          "optimizer",      info->optimizer ? info->optimizer : "none",
                          "batch_size",     bs,
                          "train_samples",  ns,
                          "epoch_loss",     el,
                          "epoch_correct",  ec,
                          "epoch_seen",     es,
                          "split_hash",     split,
                          "schedule_steps", sched,
                          "quant",          info->quant ? info->quant : "",
                          "run_id",         run,
                          "job_id",         jid};
    /* what is not recorded (info->quant NULL, run_id or job_id 0) is left out */
    const char *kept[sizeof meta / sizeof meta[0]];
    size_t npairs = 0;
    for (size_t i = 0; i < sizeof meta / sizeof meta[0]; i += 2) {
        if ((!strcmp(meta[i], "quant") && !info->quant) ||
            (!strcmp(meta[i], "run_id") && !info->run_id) ||
            (!strcmp(meta[i], "job_id") && !info->job_id))
            continue;
        kept[2 * npairs] = meta[i];
        kept[2 * npairs + 1] = meta[i + 1];
        npairs++;
    }
    st = kd_safetensors_save(path, ents, nent, kept, npairs);
done:
    free(ents);
    free(hp);
    free(hb);
    free(hs);
    free(counters);
    return st;
}

/* Metadata entry key of a checkpoint as a whole number >= 0 (0 when absent); fails on text that
 * is not one. */
static kd_status meta_count(const kd_safetensors *st, const char *path, const char *key,
                            int64_t *out)
{
    const char *v = kd_safetensors_meta(st, key);
    *out = 0;
    if (!v)
        return KD_OK;
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || errno || x < 0)
        return KD_FAIL(KD_ERR_FORMAT,
                       "checkpoint '%s': metadata '%s' is '%s', not a whole number >= 0", path, key,
                       v);
    *out = x;
    return KD_OK;
}

/* ... and as a finite number in [lo, hi]. */
static kd_status meta_real(const kd_safetensors *st, const char *path, const char *key, double lo,
                           double hi, double *out)
{
    const char *v = kd_safetensors_meta(st, key);
    *out = 0;
    if (!v)
        return KD_OK;
    char *end = NULL;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x) || x < lo || x > hi)
        return KD_FAIL(KD_ERR_FORMAT,
                       "checkpoint '%s': metadata '%s' is '%s', not a number in [%g, %g]", path,
                       key, v, lo, hi);
    *out = x;
    return KD_OK;
}

/* ... and as an unsigned 64-bit number in `base` (10 or 16), digits only. */
static kd_status meta_u64(const kd_safetensors *st, const char *path, const char *key, int base,
                          uint64_t *out)
{
    const char *v = kd_safetensors_meta(st, key);
    *out = 0;
    if (!v)
        return KD_OK;
    char *end = NULL;
    errno = 0;
    unsigned long long x = strtoull(v, &end, base);
    if (!(base == 16 ? isxdigit((unsigned char)v[0]) : isdigit((unsigned char)v[0])) || *end ||
        errno)
        return KD_FAIL(KD_ERR_FORMAT,
                       "checkpoint '%s': metadata '%s' is '%s', not an unsigned 64-bit %s number",
                       path, key, v, base == 16 ? "hexadecimal" : "decimal");
    *out = x;
    return KD_OK;
}

/* The training state a checkpoint's metadata records (kd_checkpoint_save's keys). */
static kd_status read_info(const kd_safetensors *st, const char *path, kd_ckpt_info *info)
{
    static _Thread_local char opt[16];
    const char *v;
    KD_TRY(meta_count(st, path, "step", &info->step));
    KD_TRY(meta_count(st, path, "epoch", &info->epoch));
    KD_TRY(meta_real(st, path, "best_val_acc", 0, 1, &info->best_val_acc));
    KD_TRY(meta_count(st, path, "batch_size", &info->batch_size));
    KD_TRY(meta_count(st, path, "train_samples", &info->train_samples));
    KD_TRY(meta_real(st, path, "epoch_loss", -HUGE_VAL, HUGE_VAL, &info->epoch_loss));
    KD_TRY(meta_count(st, path, "epoch_correct", &info->epoch_correct));
    KD_TRY(meta_count(st, path, "epoch_seen", &info->epoch_seen));
    KD_TRY(meta_count(st, path, "schedule_steps", &info->schedule_steps));
    KD_TRY(meta_u64(st, path, "split_hash", 16, &info->split_hash));
    /* the seed takes all 64 bits, the hash is hex */
    KD_TRY(meta_u64(st, path, "seed", 10, &info->seed));
    KD_TRY(meta_u64(st, path, "model_hash", 16, &info->model_hash));
    KD_TRY(meta_u64(st, path, "run_id", 16, &info->run_id));
    KD_TRY(meta_u64(st, path, "job_id", 16, &info->job_id));
    snprintf(opt, sizeof opt, "%s", (v = kd_safetensors_meta(st, "optimizer")) ? v : "");
    info->optimizer = opt;
    static char quant[32];
    snprintf(quant, sizeof quant, "%s", (v = kd_safetensors_meta(st, "quant")) ? v : "");
    info->quant = quant;
    return KD_OK;
}

kd_status kd_checkpoint_read_info(const char *path, kd_ckpt_info *info)
{
    kd_safetensors *st = NULL;
    KD_TRY(kd_safetensors_open_header(path, &st));
    const kd_status rc = read_info(st, path, info);
    kd_safetensors_close(st);
    return rc;
}

static int same_shape(const kd_st_entry *t, const kd_state_entry *e)
{
    if (t->ndim != e->ndim)
        return 0;
    for (int i = 0; i < e->ndim; i++)
        if (t->shape[i] != e->shape[i])
            return 0;
    return 1;
}

/* n values of t (F32, F16, BF16 or F64: a PyTorch state_dict saved in another precision) as
 * float32 into out; a float64 beyond float's range becomes inf, which the load then refuses. */
static void to_f32(const kd_st_entry *t, float *out, size_t n)
{
    const unsigned char *p = t->data;
    if (t->dtype == KD_DTYPE_F32) {
        memcpy(out, p, n * sizeof(float));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        double d;
        uint32_t u;
        switch (t->dtype) {
        case KD_DTYPE_F16:
            memcpy(&h, p + 2 * i, 2);
            out[i] = kd_f16_to_f32(h);
            break;
        case KD_DTYPE_BF16:
            memcpy(&h, p + 2 * i, 2);
            u = (uint32_t)h << 16;
            memcpy(&out[i], &u, sizeof u);
            break;
        default: /* F64 */
            memcpy(&d, p + 8 * i, 8);
            out[i] = (float)d;
            break;
        }
    }
}

kd_status kd_checkpoint_weights_only(const char *path)
{
    return KD_FAIL(KD_ERR_FORMAT,
                   "checkpoint '%s' holds weights only, no optimizer state (a state_dict saved "
                   "outside distill?): it can be evaluated, exported or used as a teacher, but a "
                   "run resumes only from a checkpoint distill wrote",
                   path);
}

kd_status kd_checkpoint_load(const char *path, kd_model *m, float *state, size_t nstate,
                             kd_ckpt_info *info)
{
    kd_safetensors *st = NULL;
    KD_TRY(kd_safetensors_open(path, &st));
    kd_status rc = KD_OK;
    char report[1536] = "";
    size_t used = 0;
    int bad = 0;
    float *hp = NULL, *hb = NULL;
#define REPORT(...)                                                                                \
    do {                                                                                           \
        if (bad++ < 12 && used < sizeof report - 1) {                                              \
            used += (size_t)snprintf(report + used, sizeof report - used, __VA_ARGS__);            \
            if (used > sizeof report - 1) /* cut: snprintf returns the untruncated size */         \
                used = sizeof report - 1;                                                          \
        }                                                                                          \
    } while (0)
    int bad_dtype = 0, missing = 0, weights = 0;
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        const kd_st_entry *t = kd_safetensors_find(st, e->name);
        const int counter = e->kind == KD_ENTRY_COUNTER;
        char a[64], b[64];
        weights += !counter;
        if (!t && counter) /* a PyTorch state_dict without num_batches_tracked: counted from 0 */
            continue;
        if (!t) {
            missing++;
            REPORT("\n  missing %s %s", e->name, kd_shape_str(e->shape, e->ndim, a, sizeof a));
            continue;
        }
        if (!same_shape(t, e)) {
            REPORT("\n  %s is %s in the checkpoint but %s in the model", e->name,
                   kd_shape_str(t->shape, t->ndim, a, sizeof a),
                   kd_shape_str(e->shape, e->ndim, b, sizeof b));
        } else if (counter ? t->dtype != KD_DTYPE_I64 && t->dtype != KD_DTYPE_I32
                           : t->dtype != KD_DTYPE_F32 && t->dtype != KD_DTYPE_F16 &&
                                 t->dtype != KD_DTYPE_BF16 && t->dtype != KD_DTYPE_F64) {
            bad_dtype++;
            REPORT("\n  %s has dtype %s, expected %s", e->name, kd_dtype_name(t->dtype),
                   counter ? "I64 or I32" : "F32, F16, BF16 or F64");
        }
    }
    for (size_t i = 0; i < kd_safetensors_count(st); i++) {
        const char *name = kd_safetensors_entry(st, i)->name;
        if (strcmp(name, "__optim__.state") == 0)
            continue;
        int known = 0;
        for (int j = 0; j < m->nentries && !known; j++)
            known = strcmp(m->entries[j].name, name) == 0;
        if (!known)
            REPORT("\n  unexpected %s (not in the model)", name);
    }
    if (bad) {
        if (bad > 12 && used < sizeof report - 1)
            snprintf(report + used, sizeof report - used, "\n  ... and %d more", bad - 12);
        char ddp[sizeof m->entries[0].name + 160] = "";
        if (missing == weights && m->nentries > 0) { /* every name missing: a prefix? */
            snprintf(ddp, sizeof ddp, "module.%s", m->entries[0].name);
            snprintf(ddp, sizeof ddp, "%s",
                     kd_safetensors_find(st, ddp)
                         ? " (its names start with 'module.', as a DistributedDataParallel "
                           "state_dict's do: save model.module.state_dict() instead)"
                         : "");
        }
        if (bad == bad_dtype)
            rc = KD_FAIL(KD_ERR_FORMAT,
                         "checkpoint '%s' holds %d tensor%s of a type distill does not read: "
                         "weights and buffers are read from F32, F16, BF16 or F64, counters from "
                         "I64 or I32%s",
                         path, bad, bad == 1 ? "" : "s", report);
        else
            rc = KD_FAIL(KD_ERR_SHAPE,
                         "checkpoint '%s' does not match the model (%d difference%s): is it from "
                         "another model definition?%s%s",
                         path, bad, bad == 1 ? "" : "s", ddp, report);
        goto done;
    }
    const kd_st_entry *os = NULL;
    if (state) {
        os = kd_safetensors_find(st, "__optim__.state");
        size_t have = 0;
        if (os && os->dtype == KD_DTYPE_F32 && os->ndim == 2)
            have = (size_t)(os->shape[0] * os->shape[1]);
        if (os && os->ndim == 2 && os->shape[1] != (int64_t)m->nparams) {
            rc = KD_FAIL(KD_ERR_FORMAT,
                         "checkpoint '%s': __optim__.state is [%lld, %lld], but its rows must "
                         "have one value per parameter of the model (%zu)",
                         path, (long long)os->shape[0], (long long)os->shape[1], m->nparams);
            goto done;
        }
        const char *opt = kd_safetensors_meta(st, "optimizer");
        if (!os && !opt) {
            rc = kd_checkpoint_weights_only(path);
            goto done;
        }
        if (!os || have != nstate) {
            rc = KD_FAIL(KD_ERR_FORMAT,
                         "checkpoint '%s' has no optimiser state for this job (it holds %zu floats "
                         "from optimizer '%s', the job needs %zu): resume with the optimizer it "
                         "was trained with",
                         path, have, opt ? opt : "?", nstate);
            goto done;
        }
    }
    hp = malloc((m->nparams + 1) * sizeof(float));
    hb = malloc((m->nbuffers + 1) * sizeof(float));
    if (!hp || !hb) {
        rc = KD_FAIL(KD_ERR_NOMEM, "out of memory loading '%s'", path);
        goto done;
    }
    for (int i = 0; i < m->nentries; i++) {
        const kd_state_entry *e = &m->entries[i];
        const kd_st_entry *t = kd_safetensors_find(st, e->name);
        if (e->kind == KD_ENTRY_COUNTER) {
            int32_t c32 = 0;
            if (e->counter && !t)
                *e->counter = 0;
            else if (e->counter && t->dtype == KD_DTYPE_I64)
                memcpy(e->counter, t->data, sizeof(int64_t));
            else if (e->counter) {
                memcpy(&c32, t->data, sizeof c32);
                *e->counter = c32;
            }
        } else {
            to_f32(t, (e->kind == KD_ENTRY_PARAM ? hp : hb) + e->offset, e->numel);
        }
    }
    /* values a trained model cannot hold: refused before anything reaches the model */
    const kd_state_entry *invalid;
    size_t at;
    float v;
    /* AdamW's second moments (the state's second half) are averages of squares */
    const char *opt = state ? kd_safetensors_meta(st, "optimizer") : NULL;
    const size_t nonneg =
        opt && !strcmp(opt, "adamw") && nstate == 2 * m->nparams ? m->nparams : SIZE_MAX;
    if (first_invalid(m, hp, hb, state ? (const float *)os->data : NULL, /* aligned */
                      state ? nstate : 0, nonneg, 1, &invalid, &at, &v)) {
        if (invalid)
            rc = KD_FAIL(KD_ERR_FORMAT,
                         "checkpoint '%s': %s[%zu] is %g, %s: the file is damaged or was saved "
                         "from a diverged run",
                         path, invalid->name, at, (double)v,
                         strstr(invalid->name, "running_var") ? "a variance must be finite and >= 0"
                                                              : "not a finite number");
        else
            rc = KD_FAIL(
                KD_ERR_FORMAT,
                "checkpoint '%s': the optimizer state (__optim__.state) holds %g at "
                "index %zu%s: the file is damaged or was saved from a diverged run",
                path, (double)v, at,
                at >= nonneg && v < 0 ? " (an AdamW second moment, which cannot be negative)" : "");
        goto done;
    }
    if (info && (rc = read_info(st, path, info)))
        goto done;
    if ((rc = m->be->upload(m->params, hp, m->nparams * sizeof(float))) ||
        (rc = m->be->upload(m->buffers, hb, m->nbuffers * sizeof(float))))
        goto done;
    if (state && (rc = m->be->upload(state, os->data, nstate * sizeof(float))))
        goto done;
done:
#undef REPORT
    free(hp);
    free(hb);
    kd_safetensors_close(st);
    return rc;
}

kd_status kd_checkpoint_check_model(const char *path, const kd_ckpt_info *info, const kd_model *m,
                                    const char *desc, const char *remedy)
{
    if (!info->model_hash || info->model_hash == m->def_hash)
        return KD_OK;
    return KD_FAIL(KD_ERR_CONFIG,
                   "checkpoint '%s' was written for another architecture than %s (same parameter "
                   "shapes, other layers or hyper-parameters): %s",
                   path, desc, remedy);
}

void kd_checkpoint_quant_tag(int bits, int qat, int act, char *buf, size_t len)
{
    if (!qat)
        snprintf(buf, len, "none");
    else
        snprintf(buf, len, "qat%d%s", bits, act ? "-act" : "");
}

/* A tag as the job file would say it. */
static void quant_words(const char *tag, char *buf, size_t len)
{
    int bits = 0, used = 0;
    if (!strcmp(tag, "none"))
        snprintf(buf, len, "no quantization-aware training");
    else if (sscanf(tag, "qat%d%n", &bits, &used) == 1)
        snprintf(buf, len, "quant: {bits: %d, qat: true%s}", bits,
                 !strcmp(tag + used, "-act") ? ", activations: true" : "");
    else
        snprintf(buf, len, "'%s'", tag);
}

kd_status kd_checkpoint_check_quant(const char *path, const kd_ckpt_info *info, const char *tag,
                                    const char *remedy)
{
    if (!info->quant || !info->quant[0] || !strcmp(info->quant, tag))
        return KD_OK;
    char was[96], is[96];
    quant_words(info->quant, was, sizeof was);
    quant_words(tag, is, sizeof is);
    return KD_FAIL(KD_ERR_CONFIG,
                   "checkpoint '%s' was trained with %s, the job has %s, so its weights are not "
                   "the model the job describes: %s",
                   path, was, is, remedy);
}
