/*
 * dataset.h - image classification data sets held in memory.
 *
 * A kd_dataset owns n samples as normalised float images (NCHW, one sample
 * after another) and int32 labels. The normalisation is fixed per data set so
 * that a model trained here sees the same inputs at export and deployment:
 * x = ((float)pixel / 255.0f - mean) / std, evaluated in float.
 * Known data sets: "fashion-mnist" and "mnist", both 1x28x28 with 10 classes,
 * read from the four standard IDX files (gzip or raw).
 */
#ifndef KD_DATASET_H
#define KD_DATASET_H

#include <stdint.h>

#include "status.h"

typedef struct {
    char name[64];
    int64_t n;   /* samples */
    int c, h, w; /* NCHW per sample */
    int num_classes;
    float *x;        /* n*c*h*w, normalised: (pixel/255 - mean) / std */
    int32_t *y;      /* n labels in [0, num_classes) */
    float mean, std; /* normalisation used */
} kd_dataset;

/*
 * Load the train (train != 0) or test split of data set `name`. root is the
 * directory holding the IDX files (root/<name> is also tried); NULL searches
 * $DISTILL_DATA/<name>, then /usr/share/datasets/<name>. Both
 * "<split>-images-idx3-ubyte.gz" and the un-gzipped name are accepted.
 * KD_ERR_CONFIG for an unknown name, KD_ERR_NOT_FOUND (with install advice)
 * when the files are nowhere, KD_ERR_FORMAT for inconsistent files.
 * On failure *out is zeroed.
 */
kd_status kd_dataset_load(const char *name, const char *root, int train, kd_dataset *out);

/*
 * KD_OK when `name` is a known data set; otherwise KD_ERR_CONFIG with a message
 * naming it and listing the known ones (job files check it while they are read).
 */
kd_status kd_dataset_check_name(const char *name);

/* Release the arrays and zero the struct; safe on a zeroed struct. */
void kd_dataset_free(kd_dataset *d);

/*
 * Hold out val_count samples of full as a validation set. Which samples go
 * where depends only on (seed, full->n, val_count); both outputs keep the
 * original sample order and own their memory. val_count 0 gives an empty val
 * (n 0, NULL arrays, other fields copied) and a train that copies full.
 * train and val must be distinct from full and from each other.
 */
kd_status kd_dataset_split(const kd_dataset *full, int64_t val_count, uint64_t seed,
                           kd_dataset *train, kd_dataset *val);

#endif
