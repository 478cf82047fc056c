/*
 * dataset.c - locating, validating and normalising the MNIST-family data sets.
 *
 * A table row describes each known data set: file geometry, class count, the
 * fixed normalisation and the Debian package that ships it (if any). Loading
 * finds a directory holding both IDX files of the split, checks them against
 * each other and the table, then converts pixels through a 256-entry table so
 * every pixel value maps to exactly one float, the same one the formula in
 * dataset.h gives. Splitting marks held-out samples with a seeded partial
 * Fisher-Yates pass and copies both halves in original order, so the result
 * depends on the seed and sizes only.
 */
#include "dataset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "idx.h"
#include "rng.h"

#define KD_DS_PATH_MAX 4096
#define KD_DS_MAX_DIRS 4

typedef struct {
    const char *name;
    int c, h, w;
    int num_classes;
    float mean, std;
    const char *package; /* Debian package providing /usr/share/datasets/<name>, or NULL */
} kd_dataset_info;

static const kd_dataset_info kd_known_datasets[] = {
    {"fashion-mnist", 1, 28, 28, 10, 0.2860f, 0.3530f, "dataset-fashion-mnist"},
    /* Debian has no dataset-mnist package; the files must be placed by hand. */
    {"mnist", 1, 28, 28, 10, 0.1307f, 0.3081f, NULL},
};
#define KD_NUM_KNOWN (sizeof kd_known_datasets / sizeof kd_known_datasets[0])

static const kd_dataset_info *dataset_lookup(const char *name)
{
    for (size_t i = 0; i < KD_NUM_KNOWN; i++)
        if (strcmp(name, kd_known_datasets[i].name) == 0)
            return &kd_known_datasets[i];
    return NULL;
}

kd_status kd_dataset_check_name(const char *name)
{
    if (name && dataset_lookup(name))
        return KD_OK;
    char known[256];
    size_t used = 0;
    known[0] = '\0';
    for (size_t i = 0; i < KD_NUM_KNOWN && used < sizeof known; i++) {
        int k = snprintf(known + used, sizeof known - used, "%s%s", i ? ", " : "",
                         kd_known_datasets[i].name);
        if (k < 0)
            break;
        used += (size_t)k;
    }
    return KD_FAIL(KD_ERR_CONFIG, "unknown data set '%s' (known: %s)", name ? name : "(null)",
                   known);
}

static int is_regular_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Find dir/base.gz or dir/base; 1 and the path in out when found. */
static int find_idx_file(const char *dir, const char *base, char *out, size_t len)
{
    int k = snprintf(out, len, "%s/%s.gz", dir, base);
    if (k > 0 && (size_t)k < len && is_regular_file(out))
        return 1;
    k = snprintf(out, len, "%s/%s", dir, base);
    return k > 0 && (size_t)k < len && is_regular_file(out);
}

static kd_status add_dir(char dirs[][KD_DS_PATH_MAX], int *ndirs, const char *a, const char *b)
{
    int k = b ? snprintf(dirs[*ndirs], KD_DS_PATH_MAX, "%s/%s", a, b)
              : snprintf(dirs[*ndirs], KD_DS_PATH_MAX, "%s", a);
    if (k < 0 || k >= KD_DS_PATH_MAX)
        return KD_FAIL(KD_ERR_INVALID, "data directory path '%s%s%s' is too long", a, b ? "/" : "",
                       b ? b : "");
    (*ndirs)++;
    return KD_OK;
}

static kd_status not_found(const kd_dataset_info *info, char dirs[][KD_DS_PATH_MAX], int ndirs)
{
    char looked[KD_DS_MAX_DIRS * 256];
    size_t used = 0;
    looked[0] = '\0';
    for (int i = 0; i < ndirs && used < sizeof looked; i++) {
        int k = snprintf(looked + used, sizeof looked - used, "%s%s", i ? ", " : "", dirs[i]);
        if (k < 0)
            break;
        used += (size_t)k;
    }
    if (info->package)
        return KD_FAIL(KD_ERR_NOT_FOUND,
                       "data set '%s' not found (looked in: %s); install it with: apt-get install "
                       "%s (or run data/get_datasets.sh), or set DISTILL_DATA",
                       info->name, looked, info->package);
    return KD_FAIL(KD_ERR_NOT_FOUND,
                   "data set '%s' not found (looked in: %s); no Debian package provides it: put "
                   "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in $DISTILL_DATA/%s and set "
                   "DISTILL_DATA",
                   info->name, looked, info->name);
}

static kd_status check_shapes(const kd_dataset_info *info, const char *img_path,
                              const char *lbl_path, const kd_idx *img, const kd_idx *lbl)
{
    if (img->ndim != 3)
        return KD_FAIL(KD_ERR_FORMAT, "'%s': image file has %d dimensions, expected 3 (n, h, w)",
                       img_path, img->ndim);
    if (img->dims[1] != info->h || img->dims[2] != info->w)
        return KD_FAIL(KD_ERR_FORMAT, "'%s': images are %lldx%lld, data set '%s' has %dx%d",
                       img_path, (long long)img->dims[1], (long long)img->dims[2], info->name,
                       info->h, info->w);
    if (lbl->ndim != 1)
        return KD_FAIL(KD_ERR_FORMAT, "'%s': label file has %d dimensions, expected 1", lbl_path,
                       lbl->ndim);
    if (img->dims[0] != lbl->dims[0])
        return KD_FAIL(KD_ERR_FORMAT, "'%s' holds %lld images but '%s' holds %lld labels", img_path,
                       (long long)img->dims[0], lbl_path, (long long)lbl->dims[0]);
    for (size_t i = 0; i < lbl->size; i++)
        if (lbl->data[i] >= info->num_classes)
            return KD_FAIL(KD_ERR_FORMAT,
                           "'%s': label %zu is %u, outside [0, %d) for data set '%s'", lbl_path, i,
                           lbl->data[i], info->num_classes, info->name);
    return KD_OK;
}

static kd_status fill_dataset(const kd_dataset_info *info, const kd_idx *img, const kd_idx *lbl,
                              kd_dataset *out)
{
    int64_t n = img->dims[0];
    size_t per = (size_t)info->c * (size_t)info->h * (size_t)info->w;
    snprintf(out->name, sizeof out->name, "%s", info->name);
    out->n = n;
    out->c = info->c;
    out->h = info->h;
    out->w = info->w;
    out->num_classes = info->num_classes;
    out->mean = info->mean;
    out->std = info->std;
    out->x = malloc((size_t)n * per * sizeof *out->x);
    out->y = malloc((size_t)n * sizeof *out->y);
    if (!out->x || !out->y)
        return KD_FAIL(KD_ERR_NOMEM, "data set '%s': cannot allocate %lld samples", info->name,
                       (long long)n);

    float lut[256];
    for (int v = 0; v < 256; v++)
        lut[v] = ((float)v / 255.0f - info->mean) / info->std;
    /* c is 1 for every known set, so the IDX h*w bytes per sample are already NCHW. */
    for (size_t i = 0; i < img->size; i++)
        out->x[i] = lut[img->data[i]];
    for (int64_t i = 0; i < n; i++)
        out->y[i] = lbl->data[i];
    return KD_OK;
}

kd_status kd_dataset_load(const char *name, const char *root, int train, kd_dataset *out)
{
    if (!out)
        return KD_FAIL(KD_ERR_INVALID, "kd_dataset_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!name)
        return KD_FAIL(KD_ERR_INVALID, "kd_dataset_load: name is NULL");
    KD_TRY(kd_dataset_check_name(name));
    const kd_dataset_info *info = dataset_lookup(name);

    char dirs[KD_DS_MAX_DIRS][KD_DS_PATH_MAX];
    int ndirs = 0;
    if (root) {
        KD_TRY(add_dir(dirs, &ndirs, root, NULL));
        KD_TRY(add_dir(dirs, &ndirs, root, info->name));
    } else {
        const char *env = getenv("DISTILL_DATA");
        if (env && env[0])
            KD_TRY(add_dir(dirs, &ndirs, env, info->name));
        KD_TRY(add_dir(dirs, &ndirs, "/usr/share/datasets", info->name));
    }

    const char *split = train ? "train" : "t10k";
    char img_base[64], lbl_base[64];
    snprintf(img_base, sizeof img_base, "%s-images-idx3-ubyte", split);
    snprintf(lbl_base, sizeof lbl_base, "%s-labels-idx1-ubyte", split);

    char img_path[KD_DS_PATH_MAX + 64], lbl_path[KD_DS_PATH_MAX + 64];
    int found = 0;
    for (int i = 0; i < ndirs && !found; i++) {
        int has_img = find_idx_file(dirs[i], img_base, img_path, sizeof img_path);
        int has_lbl = find_idx_file(dirs[i], lbl_base, lbl_path, sizeof lbl_path);
        if (has_img && has_lbl)
            found = 1;
        else if (has_img || has_lbl)
            /* Half a split is a broken install; falling through would hide it. */
            return KD_FAIL(
                KD_ERR_NOT_FOUND, "data set '%s' is incomplete in '%s': found '%s' but not %s[.gz]",
                info->name, dirs[i], has_img ? img_path : lbl_path, has_img ? lbl_base : img_base);
    }
    if (!found) {
        /* The other split's files somewhere means a partial copy, not a missing data set. */
        const char *other = train ? "t10k" : "train";
        char o_img[64], o_lbl[64];
        snprintf(o_img, sizeof o_img, "%s-images-idx3-ubyte", other);
        snprintf(o_lbl, sizeof o_lbl, "%s-labels-idx1-ubyte", other);
        for (int i = 0; i < ndirs; i++)
            if (find_idx_file(dirs[i], o_img, img_path, sizeof img_path) &&
                find_idx_file(dirs[i], o_lbl, lbl_path, sizeof lbl_path))
                return KD_FAIL(KD_ERR_NOT_FOUND,
                               "data set '%s' is incomplete in '%s': it has the %s split but "
                               "not the %s split (%s[.gz] and %s[.gz])",
                               info->name, dirs[i], other, split, img_base, lbl_base);
        return not_found(info, dirs, ndirs);
    }

    kd_idx img = {0}, lbl = {0};
    kd_status st = kd_idx_load(img_path, &img);
    if (st == KD_OK)
        st = kd_idx_load(lbl_path, &lbl);
    if (st == KD_OK)
        st = check_shapes(info, img_path, lbl_path, &img, &lbl);
    if (st == KD_OK)
        st = fill_dataset(info, &img, &lbl, out);
    kd_idx_free(&img);
    kd_idx_free(&lbl);
    if (st != KD_OK) {
        kd_dataset_free(out);
        return kd_fail_context(st, "loading data set '%s': ", info->name);
    }
    return KD_OK;
}

void kd_dataset_free(kd_dataset *d)
{
    if (!d)
        return;
    free(d->x);
    free(d->y);
    memset(d, 0, sizeof *d);
}

/* Copy metadata from src and allocate room for n samples (NULL arrays when n is 0). */
static kd_status dataset_alloc_like(const kd_dataset *src, int64_t n, kd_dataset *out)
{
    *out = *src;
    out->n = n;
    out->x = NULL;
    out->y = NULL;
    if (n == 0)
        return KD_OK;
    size_t per = (size_t)src->c * (size_t)src->h * (size_t)src->w;
    out->x = malloc((size_t)n * per * sizeof *out->x);
    out->y = malloc((size_t)n * sizeof *out->y);
    if (!out->x || !out->y) {
        kd_dataset_free(out);
        return KD_FAIL(KD_ERR_NOMEM, "cannot allocate %lld samples of data set '%s'", (long long)n,
                       src->name);
    }
    return KD_OK;
}

kd_status kd_dataset_split(const kd_dataset *full, int64_t val_count, uint64_t seed,
                           kd_dataset *train, kd_dataset *val)
{
    if (!full || !train || !val)
        return KD_FAIL(KD_ERR_INVALID, "kd_dataset_split: NULL argument");
    if (train == full || val == full || train == val)
        return KD_FAIL(KD_ERR_INVALID, "kd_dataset_split: outputs must not alias each other or "
                                       "the input");
    memset(train, 0, sizeof *train);
    memset(val, 0, sizeof *val);
    if (val_count < 0 || val_count > full->n)
        return KD_FAIL(KD_ERR_INVALID,
                       "cannot hold out %lld validation samples from data set '%s' of %lld",
                       (long long)val_count, full->name, (long long)full->n);
    if (full->n > (int64_t)UINT32_MAX)
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "data set '%s' has %lld samples; splitting supports "
                       "at most 2^32 - 1",
                       full->name, (long long)full->n);

    uint32_t n = (uint32_t)full->n;
    uint32_t *perm = malloc((size_t)n * sizeof *perm + 1);
    uint8_t *held = calloc((size_t)n + 1, 1);
    if (!perm || !held) {
        free(perm);
        free(held);
        return KD_FAIL(KD_ERR_NOMEM, "kd_dataset_split: cannot allocate index of %u", n);
    }
    for (uint32_t i = 0; i < n; i++)
        perm[i] = i;
    kd_rng r;
    kd_rng_seed(&r, kd_mix64(seed, (uint64_t)full->n, (uint64_t)val_count), 0x5b117);
    for (uint32_t i = 0; i < (uint32_t)val_count; i++) {
        uint32_t j = i + kd_rng_below(&r, n - i);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        held[perm[i]] = 1;
    }
    free(perm);

    kd_status st = dataset_alloc_like(full, full->n - val_count, train);
    if (st == KD_OK)
        st = dataset_alloc_like(full, val_count, val);
    if (st != KD_OK) {
        free(held);
        kd_dataset_free(train);
        kd_dataset_free(val);
        return st;
    }

    size_t per = (size_t)full->c * (size_t)full->h * (size_t)full->w;
    int64_t nt = 0, nv = 0;
    for (uint32_t i = 0; i < n; i++) {
        kd_dataset *dst = held[i] ? val : train;
        int64_t k = held[i] ? nv++ : nt++;
        memcpy(dst->x + (size_t)k * per, full->x + (size_t)i * per, per * sizeof *dst->x);
        dst->y[k] = full->y[i];
    }
    free(held);
    return KD_OK;
}
