/*
 * teacher.h - where a student's soft targets come from (internal).
 *
 * Offline distillation reads the teacher's logits from the HDF5 cache that
 * `distill cache` wrote (data/cache.h), together with the augmentation each
 * cached view used, so the student trains on exactly the images the teacher
 * saw; without a cache the frozen teacher runs live on the student's batch.
 * Both are checked against the job before training starts: the cache's
 * teacher hash against the teacher checkpoint, its data-set hash against the
 * training split, its shape against the models.
 */
#ifndef KD_TEACHER_H
#define KD_TEACHER_H

#include <stdio.h>

#include "comm.h"
#include "dataset.h"
#include "job.h"
#include "model.h"
#include "status.h"
#include "train.h"

typedef struct kd_teacher kd_teacher;

/* sha256 of a training split: its name, shape, normalised pixels and labels. */
void kd_dataset_sha256(const kd_dataset *d, char hex[65]);

/*
 * Open the job's teacher on backend be for batches up to max_batch: the cache
 * when teacher.cache is set (it must exist: `distill cache` writes it), else
 * the model from teacher.model + teacher.checkpoint. train is the training
 * split the student uses (the cache must cover it), classes the student's
 * output size. On failure nothing is left open.
 */
kd_status kd_teacher_open(const kd_job *job, const kd_backend *be, const kd_dataset *train,
                          int max_batch, int classes, FILE *log, kd_teacher **out);
void kd_teacher_close(kd_teacher *t);

/*
 * Copy an in-memory cache whole, as float32, to where the backend computes (max_batch: the
 * rows staged per upload, at most the max_batch given to kd_teacher_open). Call it after the
 * buffers a step cannot do without are allocated: it takes the device memory that is left,
 * and when the cache does not fit it logs that the rows keep travelling per batch and returns
 * KD_OK. A streamed cache or a live teacher: nothing to do.
 */
kd_status kd_teacher_hold(kd_teacher *t, int max_batch, FILE *log);

/* Announce an epoch's sample order (a streaming cache prefetches along it). */
kd_status kd_teacher_epoch(kd_teacher *t, const uint32_t *order, int64_t n);

/*
 * Prepare batch idx[0..n) of `epoch`: each sample's augmentation parameters into params (host,
 * n * KD_AUG_NPARAMS floats): the cached view's, or a fresh draw from aug/seed when the teacher
 * runs live (kd_augment_draw_batch); the cache's targets are staged for kd_teacher_targets(),
 * which the caller calls once the batch is assembled on the device (be->gather_augment).
 * After kd_teacher_hold, an in-memory cache that fit is held whole on the backend's device
 * (float32; the log says so): then only the parameters come from the host, and
 * kd_teacher_targets gathers the batch's targets there from idx_dev, the same indices in
 * device memory.
 */
kd_status kd_teacher_batch(kd_teacher *t, const uint32_t *idx, int n, int64_t epoch,
                           const kd_augment_cfg *aug, uint64_t seed, float *params);
kd_status kd_teacher_targets(kd_teacher *t, const float *x_dev, const uint32_t *idx_dev, int n);

/*
 * After a non-finite training loss: a teacher run live whose last batch of logits (t_dev) holds
 * a non-finite value fails naming it and its checkpoint; KD_OK otherwise, and always for a
 * cache (its values were checked when it was read). With comm of several ranks every rank
 * calls it (a collective) and fails when any rank's share held one.
 */
kd_status kd_teacher_check_live(kd_teacher *t, const kd_job *job, kd_comm *comm);

/*
 * kd (or dkd, which also reads the batch's labels y_dev) loss of student logits s_dev [n, C]
 * against the batch's targets: adds
 * grad_scale * weight * d(mean)/ds into ds_dev (the student's output gradient)
 * and returns weight * (summed row loss), or, with acc (device memory), adds
 * the unweighted summed row loss to acc[0] and returns 0 without waiting for
 * the device (backend.h). grad_scale is 1 for one process; a rank holding n
 * of a global batch of N passes n / N, so that the sum of the ranks' gradients
 * is the gradient of the global batch's mean.
 */
double kd_teacher_loss(kd_teacher *t, const kd_job *job, const float *s_dev, const int32_t *y_dev,
                       int n, float *ds_dev, double grad_scale, double *acc);

/*
 * `distill cache CONFIG`: run the teacher over the training split and write the cache,
 * resuming a partial file. Progress as kd_train's. With opts->comm of W > 1 ranks (mpirun),
 * rank r writes whole chunks [nchunks*r/W, nchunks*(r+1)/W) to its shard
 * kd_cache_shard_path(teacher.cache, r, W) and rank 0 then writes the VDS file at
 * teacher.cache over the shards (data/README.md, "Sharded caches"); only rank 0 logs.
 * Every rank makes the same collective calls and returns a failure when any rank failed. A
 * complete cache with the job's metadata already at teacher.cache, single-file or sharded by
 * any number of ranks, is accepted without computing anything; an unfinished single file
 * cannot be finished by W > 1 ranks (a clear error says to finish it with one process).
 */
kd_status kd_cache_build(const kd_job *job, const kd_train_opts *opts);

#endif
