/*
 * job.c - reading and checking a job file. Every section has its list of
 * allowed keys; defaults live here and are documented in README.md.
 */
#include "job.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache.h"
#include "dataset.h"

static kd_status copy_str(const kd_node *map, const char *key, int required, char *dst, size_t len)
{
    const char *v = NULL;
    KD_TRY(kd_node_get_str(map, key, required, &v));
    if (!v)
        return KD_OK;
    if (strlen(v) >= len) {
        char pos[160];
        return KD_FAIL(KD_ERR_CONFIG, "%s: '%s' is longer than %zu characters",
                       kd_node_where(kd_node_child(map, key), pos, sizeof pos), key, len - 1);
    }
    snprintf(dst, len, "%s", v);
    return KD_OK;
}

static kd_status get_int_range(const kd_node *map, const char *key, int required, int64_t lo,
                               int64_t hi, int64_t *out)
{
    int64_t v = *out;
    KD_TRY(kd_node_get_int(map, key, required, &v));
    if (v < lo || v > hi) {
        char pos[160];
        return KD_FAIL(KD_ERR_CONFIG, "%s: '%s' must be in [%lld, %lld], got %lld",
                       kd_node_where(kd_node_child(map, key), pos, sizeof pos), key, (long long)lo,
                       (long long)hi, (long long)v);
    }
    *out = v;
    return KD_OK;
}

static kd_status get_i32(const kd_node *map, const char *key, int required, int lo, int hi,
                         int *out)
{
    int64_t v = *out;
    KD_TRY(get_int_range(map, key, required, lo, hi, &v));
    *out = (int)v;
    return KD_OK;
}

static kd_status section(const kd_node *root, const char *key, int required,
                         const char *const *allowed, const kd_node **out)
{
    char pos[160];
    *out = kd_node_child(root, key);
    if (!*out) {
        if (required)
            return KD_FAIL(KD_ERR_CONFIG, "%s: missing required section '%s'",
                           kd_node_where(root, pos, sizeof pos), key);
        return KD_OK;
    }
    if ((*out)->kind == KD_NODE_SCALAR && !(*out)->quoted &&
        (!(*out)->value[0] || !strcmp((*out)->value, "null") || !strcmp((*out)->value, "~"))) {
        if (required)
            return KD_FAIL(KD_ERR_CONFIG, "%s: section '%s' is empty, and it is required",
                           kd_node_where(*out, pos, sizeof pos), key);
        *out = NULL;
        return KD_OK;
    }
    return kd_node_check_keys(*out, allowed, key);
}

static kd_status parse_run(kd_job *j)
{
    static const char *const keys[] = {
        "name", "out_dir",   "seed",      "device",     "threads", "log_every", "checkpoint_every",
        "comm", "bucket_kb", "precision", "cuda_graph", NULL};
    const kd_node *s;
    KD_TRY(section(j->root, "run", 0, keys, &s));
    snprintf(j->name, sizeof j->name, "run");
    snprintf(j->device, sizeof j->device, "auto");
    long nproc = sysconf(_SC_NPROCESSORS_ONLN);
    j->threads = nproc > 0 ? (int)nproc : 1;
    j->log_every = 100;
    snprintf(j->comm, sizeof j->comm, "auto");
    j->bucket_kb = 1024;
    j->cuda_graph = 1;
    int64_t seed = 1;
    if (s) {
        KD_TRY(copy_str(s, "name", 0, j->name, sizeof j->name));
        KD_TRY(copy_str(s, "out_dir", 0, j->out_dir, sizeof j->out_dir));
        KD_TRY(get_int_range(s, "seed", 0, 0, INT64_MAX, &seed));
        KD_TRY(copy_str(s, "device", 0, j->device, sizeof j->device));
        KD_TRY(get_i32(s, "threads", 0, 1, 1024, &j->threads));
        j->threads_given = kd_node_child(s, "threads") != NULL;
        KD_TRY(copy_str(s, "comm", 0, j->comm, sizeof j->comm));
        KD_TRY(get_i32(s, "bucket_kb", 0, 4, 1 << 22, &j->bucket_kb));
        KD_TRY(get_i32(s, "log_every", 0, 1, 1 << 30, &j->log_every));
        KD_TRY(get_i32(s, "checkpoint_every", 0, 0, 1 << 30, &j->checkpoint_every));
        KD_TRY(kd_node_get_bool(s, "cuda_graph", 0, &j->cuda_graph));
        char prec[16] = "float32";
        KD_TRY(copy_str(s, "precision", 0, prec, sizeof prec));
        if (!strcmp(prec, "bf16") || !strcmp(prec, "bfloat16")) {
            j->bf16 = 1;
        } else if (strcmp(prec, "float32") && strcmp(prec, "fp32")) {
            char pos[160];
            return KD_FAIL(KD_ERR_CONFIG, "%s: precision must be float32 or bf16, got '%s'",
                           kd_node_where(kd_node_child(s, "precision"), pos, sizeof pos), prec);
        }
        if (strcmp(j->device, "auto") && strcmp(j->device, "cpu") && strcmp(j->device, "cuda")) {
            char pos[160];
            return KD_FAIL(KD_ERR_CONFIG, "%s: device must be auto, cpu or cuda, got '%s'",
                           kd_node_where(kd_node_child(s, "device"), pos, sizeof pos), j->device);
        }
        if (strcmp(j->comm, "auto") && strcmp(j->comm, "single") && strcmp(j->comm, "mpi") &&
            strcmp(j->comm, "nccl")) {
            char pos[160];
            return KD_FAIL(KD_ERR_CONFIG, "%s: comm must be auto, single, mpi or nccl, got '%s'",
                           kd_node_where(kd_node_child(s, "comm"), pos, sizeof pos), j->comm);
        }
    }
    j->seed = (uint64_t)seed;
    if (!j->out_dir[0])
        snprintf(j->out_dir, sizeof j->out_dir, "runs/%s", j->name);
    return KD_OK;
}

static kd_status parse_data(kd_job *j)
{
    static const char *const keys[] = {"dataset",         "root",       "batch_size",
                                       "eval_batch_size", "val_size",   "augment",
                                       "train_limit",     "split_seed", NULL};
    static const char *const aug_keys[] = {"crop_pad", "hflip", NULL};
    const kd_node *s;
    KD_TRY(section(j->root, "data", 1, keys, &s));
    KD_TRY(copy_str(s, "dataset", 1, j->dataset, sizeof j->dataset));
    kd_status st = kd_dataset_check_name(j->dataset);
    if (st != KD_OK) {
        char pos[160];
        return kd_fail_context(st,
                               "%s: ", kd_node_where(kd_node_child(s, "dataset"), pos, sizeof pos));
    }
    KD_TRY(copy_str(s, "root", 0, j->data_root, sizeof j->data_root));
    j->batch_size = 128;
    j->eval_batch_size = 500;
    j->val_size = 5000;
    KD_TRY(get_i32(s, "batch_size", 0, 1, 1 << 20, &j->batch_size));
    KD_TRY(get_i32(s, "eval_batch_size", 0, 1, 1 << 20, &j->eval_batch_size));
    KD_TRY(get_int_range(s, "val_size", 0, 0, INT64_MAX, &j->val_size));
    KD_TRY(get_int_range(s, "train_limit", 0, 0, INT64_MAX, &j->train_limit));
    int64_t split_seed = 1;
    KD_TRY(get_int_range(s, "split_seed", 0, 0, INT64_MAX, &split_seed));
    j->split_seed = (uint64_t)split_seed;
    const kd_node *a;
    KD_TRY(section(s, "augment", 0, aug_keys, &a));
    if (a) {
        KD_TRY(get_i32(a, "crop_pad", 0, 0, 64, &j->augment.crop_pad));
        KD_TRY(kd_node_get_bool(a, "hflip", 0, &j->augment.hflip));
    }
    return KD_OK;
}

/* A model definition: a file path (loaded into *doc) or an inline {input:, layers:}. */
static kd_status load_model_def(const kd_job *j, const kd_node *mnode, const char *what,
                                kd_node **doc, char *desc, size_t desc_len, const kd_node **input,
                                const kd_node **layers)
{
    char pos[160];
    const kd_node *def = mnode;
    if (mnode->kind == KD_NODE_SCALAR) {
        kd_status st = kd_yaml_load_file(mnode->value, doc);
        if (st != KD_OK)
            return kd_fail_context(st, "%s: %s: ", kd_node_where(mnode, pos, sizeof pos), what);
        def = *doc;
        snprintf(desc, desc_len, "%s", mnode->value);
    } else {
        snprintf(desc, desc_len, "%s (inline %s)", j->path, what);
    }
    static const char *const keys[] = {"input", "layers", "name", NULL};
    KD_TRY(kd_node_check_keys(def, keys, what));
    *input = kd_node_child(def, "input");
    *layers = kd_node_child(def, "layers");
    if (!*input || !*layers)
        return KD_FAIL(KD_ERR_CONFIG, "%s: the %s needs both 'input' and 'layers'",
                       kd_node_where(def, pos, sizeof pos), what);
    return KD_OK;
}

static kd_status parse_model(kd_job *j)
{
    char pos[160];
    const kd_node *mnode = kd_node_child(j->root, "model");
    if (kd_node_is_null(mnode))
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: missing required section 'model' (a model file path, or a mapping "
                       "with 'input' and 'layers')",
                       kd_node_where(j->root, pos, sizeof pos));
    return load_model_def(j, mnode, "model", &j->model_doc, j->model_desc, sizeof j->model_desc,
                          &j->model_input, &j->model_layers);
}

static kd_status parse_teacher(kd_job *j)
{
    static const char *const keys[] = {"model",        "checkpoint",   "cache",    "views",
                                       "topk",         "dtype",        "compress", "chunk_rows",
                                       "cache_memory", "view_targets", NULL};
    const kd_node *s;
    char pos[160];
    KD_TRY(section(j->root, "teacher", 0, keys, &s));
    j->cache_views = 1;
    snprintf(j->cache_dtype, sizeof j->cache_dtype, "float16");
    snprintf(j->cache_compress, sizeof j->cache_compress, "none");
    if (!s)
        return KD_OK;
    j->have_teacher = 1;
    const kd_node *mnode = kd_node_child(s, "model");
    if (kd_node_is_null(mnode))
        return KD_FAIL(KD_ERR_CONFIG, "%s: teacher needs 'model' (its model file)",
                       kd_node_where(s, pos, sizeof pos));
    KD_TRY(load_model_def(j, mnode, "teacher model", &j->teacher_doc, j->teacher_desc,
                          sizeof j->teacher_desc, &j->teacher_input, &j->teacher_layers));
    KD_TRY(copy_str(s, "checkpoint", 1, j->teacher_ckpt, sizeof j->teacher_ckpt));
    KD_TRY(copy_str(s, "cache", 0, j->teacher_cache, sizeof j->teacher_cache));
    KD_TRY(get_i32(s, "views", 0, 1, 1024, &j->cache_views));
    KD_TRY(get_i32(s, "topk", 0, 0, 1 << 24, &j->cache_topk));
    KD_TRY(get_i32(s, "chunk_rows", 0, 0, 1 << 24, &j->cache_chunk_rows));
    KD_TRY(copy_str(s, "dtype", 0, j->cache_dtype, sizeof j->cache_dtype));
    KD_TRY(copy_str(s, "compress", 0, j->cache_compress, sizeof j->cache_compress));
    if (kd_cache_compress_from_name(j->cache_compress) < 0)
        return KD_FAIL(
            KD_ERR_CONFIG, "%s: teacher.compress must be none, deflate, lz4 or zstd, got '%s'",
            kd_node_where(kd_node_child(s, "compress"), pos, sizeof pos), j->cache_compress);
    char mem[16] = "auto";
    KD_TRY(copy_str(s, "cache_memory", 0, mem, sizeof mem));
    if (!strcmp(mem, "auto"))
        j->cache_stream = 0;
    else if (!strcmp(mem, "stream"))
        j->cache_stream = 1;
    else
        return KD_FAIL(KD_ERR_CONFIG, "%s: teacher.cache_memory must be auto or stream, got '%s'",
                       kd_node_where(kd_node_child(s, "cache_memory"), pos, sizeof pos), mem);
    char vt[16] = "each";
    KD_TRY(copy_str(s, "view_targets", 0, vt, sizeof vt));
    if (!strcmp(vt, "mean"))
        j->view_mean = 1;
    else if (strcmp(vt, "each"))
        return KD_FAIL(KD_ERR_CONFIG, "%s: teacher.view_targets must be each or mean, got '%s'",
                       kd_node_where(kd_node_child(s, "view_targets"), pos, sizeof pos), vt);
    if (j->view_mean && !j->teacher_cache[0])
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: teacher.view_targets: mean averages the views of a cache; set "
                       "teacher.cache",
                       kd_node_where(kd_node_child(s, "view_targets"), pos, sizeof pos));
    if (j->view_mean && j->cache_topk > 0)
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: teacher.view_targets: mean needs full teacher logits; teacher.topk "
                       "is %d",
                       kd_node_where(kd_node_child(s, "view_targets"), pos, sizeof pos),
                       j->cache_topk);
    if (j->view_mean && kd_augment_on(&j->augment))
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: with teacher.view_targets: mean the student trains on the "
                       "unaugmented image; remove data.augment (the views' augmentation is the "
                       "cache's, written by a job that has it)",
                       kd_node_where(kd_node_child(s, "view_targets"), pos, sizeof pos));
    if (strcmp(j->cache_dtype, "float16") && strcmp(j->cache_dtype, "float32"))
        return KD_FAIL(KD_ERR_CONFIG, "%s: teacher.dtype must be float16 or float32, got '%s'",
                       kd_node_where(kd_node_child(s, "dtype"), pos, sizeof pos), j->cache_dtype);
    return KD_OK;
}

/* Loss weights and the KD temperature as the float32 losses use them: a weight in
 * (0, KD_LOSS_WEIGHT_MAX] that float32 does not round to 0; temperatures from 0.01 (logits
 * scaled by 100) to 100 (a nearly flat teacher), past which the scaled logits or their
 * gradients leave float32's range or carry nothing. */
#define KD_LOSS_WEIGHT_MAX 1e6
#define KD_TEMPERATURE_MIN 0.01
#define KD_TEMPERATURE_MAX 100.0

static int weight_ok(double w) { return w <= KD_LOSS_WEIGHT_MAX && (float)w > 0.0f; }

/* The node of l's key (where a message should point: the file, or the --set that gave it), or l
 * itself when the key is absent or NULL. */
static const kd_node *key_or(const kd_node *l, const char *key)
{
    const kd_node *c = key ? kd_node_child(l, key) : NULL;
    return c ? c : l;
}

static kd_status parse_distill(kd_job *j)
{
    static const char *const keys[] = {"mode", "losses", NULL};
    static const char *const loss_keys[] = {"type",        "weight",    "label_smoothing",
                                            "temperature", "direction", "t2_scale",
                                            "alpha",       "beta",      NULL};
    const kd_node *s;
    char pos[160];
    KD_TRY(section(j->root, "distill", 0, keys, &s));
    snprintf(j->mode, sizeof j->mode, "none");
    j->ce_weight = 1.0;
    if (!s)
        return KD_OK;
    KD_TRY(copy_str(s, "mode", 0, j->mode, sizeof j->mode));
    if (strcmp(j->mode, "none") != 0 && strcmp(j->mode, "offline") != 0) {
        if (!strcmp(j->mode, "online") || !strcmp(j->mode, "self"))
            return KD_FAIL(KD_ERR_UNSUPPORTED,
                           "%s: distill.mode '%s' is not available in this version (none and "
                           "offline are)",
                           kd_node_where(kd_node_child(s, "mode"), pos, sizeof pos), j->mode);
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: distill.mode must be none, offline, online or self, got '%s'",
                       kd_node_where(kd_node_child(s, "mode"), pos, sizeof pos), j->mode);
    }
    const kd_node *losses = kd_node_child(s, "losses");
    if (!losses)
        return KD_OK;
    if (losses->kind != KD_NODE_SEQ)
        return KD_FAIL(KD_ERR_CONFIG, "%s: distill.losses must be a list",
                       kd_node_where(losses, pos, sizeof pos));
    int have_ce = 0;
    j->ce_weight = 0; /* with a losses list, only the terms listed count */
    for (size_t i = 0; i < losses->len; i++) {
        const kd_node *l = losses->items[i];
        KD_TRY(kd_node_check_keys(l, loss_keys, "a loss term"));
        const char *type = NULL;
        KD_TRY(kd_node_get_str(l, "type", 1, &type));
        if (!strcmp(type, "ce")) {
            if (have_ce++)
                return KD_FAIL(KD_ERR_CONFIG, "%s: 'ce' is listed twice",
                               kd_node_where(l, pos, sizeof pos));
            static const char *const not_ce[] = {"temperature", "direction", "t2_scale",
                                                 "alpha",       "beta",      NULL};
            for (int k = 0; not_ce[k]; k++)
                if (kd_node_child(l, not_ce[k]))
                    return KD_FAIL(KD_ERR_CONFIG, "%s: '%s' belongs to a kd or dkd term, not ce",
                                   kd_node_where(kd_node_child(l, not_ce[k]), pos, sizeof pos),
                                   not_ce[k]);
            j->ce_weight = 1.0;
            KD_TRY(kd_node_get_float(l, "weight", 0, &j->ce_weight));
            KD_TRY(kd_node_get_float(l, "label_smoothing", 0, &j->label_smoothing));
            const int ls_ok = j->label_smoothing >= 0 && j->label_smoothing < 1;
            if (!ls_ok || !weight_ok(j->ce_weight))
                return KD_FAIL(
                    KD_ERR_CONFIG,
                    "%s: ce needs weight in (0, %g] (and not 0 in float32) and "
                    "label_smoothing in [0, 1)",
                    kd_node_where(key_or(l, ls_ok ? "weight" : "label_smoothing"), pos, sizeof pos),
                    KD_LOSS_WEIGHT_MAX);
        } else if (!strcmp(type, "kd") || !strcmp(type, "dkd")) {
            if (strcmp(j->mode, "offline") != 0)
                return KD_FAIL(KD_ERR_CONFIG,
                               "%s: a '%s' term needs a teacher: set distill.mode: offline",
                               kd_node_where(l, pos, sizeof pos), type);
            if (j->have_kd++)
                return KD_FAIL(KD_ERR_CONFIG,
                               "%s: one distillation term per job: 'kd' or 'dkd' is listed twice",
                               kd_node_where(l, pos, sizeof pos));
            if (kd_node_child(l, "label_smoothing"))
                return KD_FAIL(KD_ERR_CONFIG, "%s: 'label_smoothing' belongs to the ce term",
                               kd_node_where(kd_node_child(l, "label_smoothing"), pos, sizeof pos));
            j->kd_weight = 1.0;
            j->kd_temperature = 4.0;
            j->kd_t2 = 1;
            const char *dir = "forward";
            KD_TRY(kd_node_get_float(l, "weight", 0, &j->kd_weight));
            KD_TRY(kd_node_get_float(l, "temperature", 0, &j->kd_temperature));
            KD_TRY(kd_node_get_str(l, "direction", 0, &dir));
            KD_TRY(kd_node_get_bool(l, "t2_scale", 0, &j->kd_t2));
            if (strcmp(dir, "forward") && strcmp(dir, "reverse"))
                return KD_FAIL(KD_ERR_CONFIG,
                               "%s: kd direction must be forward (KL(teacher || student)) or "
                               "reverse (KL(student || teacher)), got '%s'",
                               kd_node_where(kd_node_child(l, "direction"), pos, sizeof pos), dir);
            j->kd_reverse = !strcmp(dir, "reverse");
            const int w_ok = weight_ok(j->kd_weight);
            if (!w_ok || !(j->kd_temperature >= KD_TEMPERATURE_MIN &&
                           j->kd_temperature <= KD_TEMPERATURE_MAX))
                return KD_FAIL(
                    KD_ERR_CONFIG,
                    "%s: %s needs weight in (0, %g] (and not 0 in float32) and "
                    "temperature in [%g, %g]",
                    kd_node_where(key_or(l, w_ok ? "temperature" : "weight"), pos, sizeof pos),
                    type, KD_LOSS_WEIGHT_MAX, KD_TEMPERATURE_MIN, KD_TEMPERATURE_MAX);
            j->kd_dkd = !strcmp(type, "dkd");
            j->kd_alpha = 1.0;
            j->kd_beta = 8.0;
            KD_TRY(kd_node_get_float(l, "alpha", 0, &j->kd_alpha));
            KD_TRY(kd_node_get_float(l, "beta", 0, &j->kd_beta));
            if (!j->kd_dkd && (kd_node_child(l, "alpha") || kd_node_child(l, "beta")))
                return KD_FAIL(
                    KD_ERR_CONFIG,
                    "%s: alpha and beta weigh the two parts of a 'dkd' term; a 'kd' "
                    "term has only its weight",
                    kd_node_where(key_or(l, kd_node_child(l, "alpha") ? "alpha" : "beta"), pos,
                                  sizeof pos));
            const int a_ok = j->kd_alpha >= 0 && j->kd_alpha <= KD_LOSS_WEIGHT_MAX,
                      b_ok = j->kd_beta >= 0 && j->kd_beta <= KD_LOSS_WEIGHT_MAX;
            if (j->kd_dkd &&
                (j->kd_reverse || !a_ok || !b_ok || !((float)j->kd_alpha + (float)j->kd_beta > 0)))
                return KD_FAIL(KD_ERR_CONFIG,
                               "%s: dkd needs direction forward, alpha and beta in [0, %g] and "
                               "alpha + beta > 0 (in float32)",
                               kd_node_where(key_or(l, j->kd_reverse ? "direction"
                                                       : !a_ok       ? "alpha"
                                                       : !b_ok       ? "beta"
                                                                     : NULL),
                                             pos, sizeof pos),
                               KD_LOSS_WEIGHT_MAX);
        } else {
            return KD_FAIL(KD_ERR_CONFIG, "%s: unknown loss type '%s' (known: ce, kd, dkd)",
                           kd_node_where(l, pos, sizeof pos), type);
        }
    }
    if (!have_ce && !j->have_kd)
        return KD_FAIL(KD_ERR_CONFIG, "%s: distill.losses lists no term",
                       kd_node_where(losses, pos, sizeof pos));
    return KD_OK;
}

static kd_status parse_quant(kd_job *j)
{
    static const char *const keys[] = {"bits", "qat", "activations", NULL};
    const kd_node *s;
    char pos[160];
    KD_TRY(section(j->root, "quant", 0, keys, &s));
    if (!s)
        return KD_OK;
    KD_TRY(get_i32(s, "bits", 1, 4, 8, &j->quant_bits));
    if (j->quant_bits != 4 && j->quant_bits != 8)
        return KD_FAIL(KD_ERR_CONFIG, "%s: quant.bits must be 8 or 4, got %d",
                       kd_node_where(kd_node_child(s, "bits"), pos, sizeof pos), j->quant_bits);
    KD_TRY(kd_node_get_bool(s, "qat", 0, &j->quant_qat));
    KD_TRY(kd_node_get_bool(s, "activations", 0, &j->quant_act));
    if (j->quant_qat && j->bf16)
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: quant.qat trains against the int8/int4 grid, which bf16 rounding "
                       "would move; use run.precision: float32 with it",
                       kd_node_where(kd_node_child(s, "qat"), pos, sizeof pos));
    if (j->quant_act && !j->quant_qat)
        return KD_FAIL(KD_ERR_CONFIG,
                       "%s: quant.activations fake-quantizes during training: it "
                       "needs quant.qat: true",
                       kd_node_where(kd_node_child(s, "activations"), pos, sizeof pos));
    return KD_OK;
}

/* A refusal of the first of `keys` present in map: it belongs to `owner`, not `chosen`. */
static kd_status not_for(const kd_node *map, const char *const *keys, const char *owner,
                         const char *chosen)
{
    char pos[160];
    for (int k = 0; keys[k]; k++) {
        const kd_node *n = kd_node_child(map, keys[k]);
        if (n)
            return KD_FAIL(KD_ERR_CONFIG, "%s: '%s' belongs to %s, not %s: remove it",
                           kd_node_where(n, pos, sizeof pos), keys[k], owner, chosen);
    }
    return KD_OK;
}

static kd_status parse_optim(kd_job *j)
{
    static const char *const keys[] = {"name",      "lr",     "momentum", "nesterov",
                                       "beta1",     "beta2",  "eps",      "weight_decay",
                                       "clip_norm", "epochs", "schedule", NULL};
    static const char *const sched_keys[] = {"type",      "warmup_steps", "min_lr",
                                             "step_size", "gamma",        NULL};
    const kd_node *s;
    char pos[160];
    KD_TRY(section(j->root, "optim", 1, keys, &s));
    KD_TRY(copy_str(s, "name", 1, j->optim_name, sizeof j->optim_name));
    kd_optim_cfg *o = &j->optim;
    memset(o, 0, sizeof *o);
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    if (!strcmp(j->optim_name, "sgd"))
        o->kind = KD_OPTIM_SGD;
    else if (!strcmp(j->optim_name, "adamw"))
        o->kind = KD_OPTIM_ADAMW;
    else
        return KD_FAIL(KD_ERR_CONFIG, "%s: optim.name must be sgd or adamw, got '%s'",
                       kd_node_where(kd_node_child(s, "name"), pos, sizeof pos), j->optim_name);
    /* a key the chosen optimizer does not read would be silently ignored: refused instead */
    static const char *const sgd_only[] = {"momentum", "nesterov", NULL}, *const adamw_only[] = {
                                                                              "beta1", "beta2",
                                                                              "eps", NULL};
    const int sgd = o->kind == KD_OPTIM_SGD;
    KD_TRY(not_for(s, sgd ? adamw_only : sgd_only, sgd ? "adamw" : "sgd", sgd ? "sgd" : "adamw"));
    KD_TRY(kd_node_get_float(s, "lr", 1, &o->lr));
    KD_TRY(kd_node_get_float(s, "momentum", 0, &o->momentum));
    KD_TRY(kd_node_get_bool(s, "nesterov", 0, &o->nesterov));
    KD_TRY(kd_node_get_float(s, "beta1", 0, &o->beta1));
    KD_TRY(kd_node_get_float(s, "beta2", 0, &o->beta2));
    KD_TRY(kd_node_get_float(s, "eps", 0, &o->eps));
    KD_TRY(kd_node_get_float(s, "weight_decay", 0, &o->weight_decay));
    KD_TRY(kd_node_get_float(s, "clip_norm", 0, &o->clip_norm));
    j->epochs = 10;
    KD_TRY(get_i32(s, "epochs", 0, 1, 1 << 20, &j->epochs));
    const char *bad = NULL;
    kd_status st = kd_optim_cfg_check_key(o, &bad);
    if (st != KD_OK) {
        const kd_node *at = bad ? kd_node_child(s, bad) : NULL;
        return kd_fail_context(st, "%s: ", kd_node_where(at ? at : s, pos, sizeof pos));
    }
    kd_sched_cfg *c = &j->sched;
    memset(c, 0, sizeof *c);
    c->kind = KD_SCHED_CONSTANT;
    c->gamma = 0.1;
    const kd_node *sc;
    KD_TRY(section(s, "schedule", 0, sched_keys, &sc));
    if (sc) {
        char type[16] = "constant";
        KD_TRY(copy_str(sc, "type", 0, type, sizeof type));
        if (!strcmp(type, "constant"))
            c->kind = KD_SCHED_CONSTANT;
        else if (!strcmp(type, "step"))
            c->kind = KD_SCHED_STEP;
        else if (!strcmp(type, "cosine"))
            c->kind = KD_SCHED_COSINE;
        else
            return KD_FAIL(KD_ERR_CONFIG,
                           "%s: schedule type must be constant, step or cosine, got '%s'",
                           kd_node_where(kd_node_child(sc, "type"), pos, sizeof pos), type);
        static const char *const step_only[] = {"step_size", "gamma", NULL}, *const cosine_only[] =
                                                                                 {"min_lr", NULL};
        const char *chosen = c->kind == KD_SCHED_CONSTANT ? "a constant one"
                             : c->kind == KD_SCHED_STEP   ? "a step one"
                                                          : "a cosine one";
        if (c->kind != KD_SCHED_STEP)
            KD_TRY(not_for(sc, step_only, "a step schedule", chosen));
        if (c->kind != KD_SCHED_COSINE)
            KD_TRY(not_for(sc, cosine_only, "a cosine schedule", chosen));
        KD_TRY(get_int_range(sc, "warmup_steps", 0, 0, INT64_MAX, &c->warmup_steps));
        KD_TRY(get_int_range(sc, "step_size", 0, 0, INT64_MAX, &c->step_size));
        KD_TRY(kd_node_get_float(sc, "min_lr", 0, &c->min_lr));
        KD_TRY(kd_node_get_float(sc, "gamma", 0, &c->gamma));
        /* the total is known only once the data set is loaded; the trainer checks it then */
        kd_sched_cfg probe = *c;
        probe.total_steps = INT64_MAX;
        kd_status sst = kd_sched_cfg_check(&probe, o->lr);
        if (sst != KD_OK)
            return kd_fail_context(sst, "%s: ", kd_node_where(sc, pos, sizeof pos));
    }
    return KD_OK;
}

kd_status kd_job_load(const char *path, const char *const *overrides, kd_job *job)
{
    memset(job, 0, sizeof *job);
    snprintf(job->path, sizeof job->path, "%s", path);
    kd_status st = kd_yaml_load_file(path, &job->root);
    for (int i = 0; st == KD_OK && overrides && overrides[i]; i++)
        st = kd_node_set_path(job->root, overrides[i]);
    if (st == KD_OK) {
        static const char *const keys[] = {"run",     "data",  "model", "teacher",
                                           "distill", "quant", "optim", NULL};
        st = kd_node_check_keys(job->root, keys, "the job file");
    }
    if (st == KD_OK)
        st = parse_run(job);
    if (st == KD_OK)
        st = parse_data(job);
    if (st == KD_OK)
        st = parse_model(job);
    if (st == KD_OK)
        st = parse_teacher(job);
    if (st == KD_OK)
        st = parse_distill(job);
    if (st == KD_OK && !strcmp(job->mode, "offline") && !job->have_teacher)
        st =
            KD_FAIL(KD_ERR_CONFIG, "%s: distill.mode offline needs a 'teacher' section", job->path);
    if (st == KD_OK && !strcmp(job->mode, "offline") && !job->have_kd)
        st = KD_FAIL(KD_ERR_CONFIG, "%s: distill.mode offline needs a 'kd' loss term", job->path);
    if (st == KD_OK)
        st = parse_quant(job);
    if (st == KD_OK)
        st = parse_optim(job);
    if (st != KD_OK) {
        kd_job_free(job);
        return st;
    }
    return KD_OK;
}

void kd_job_free(kd_job *job)
{
    kd_node_free(job->root);
    kd_node_free(job->model_doc);
    kd_node_free(job->teacher_doc);
    job->root = job->model_doc = job->teacher_doc = NULL;
}
