/*
 * kd.h - the distill engine, as a library.
 *
 * A job's life:
 *
 *     kd_job job;
 *     kd_status st = kd_job_load("configs/fashion-mnist/teacher.yaml", overrides, &job);
 *     if (st != KD_OK) { fprintf(stderr, "%s\n", kd_last_error()); return 1; }
 *     kd_train_opts opts = {.resume = NULL, .progress = 1, .stop = NULL};
 *     st = kd_train(&job, &opts);        // checkpoints, metrics.jsonl, result.json in out_dir
 *     kd_eval_result r;
 *     st = kd_eval(&job, "runs/fmnist-teacher/best.safetensors", 0, &r);
 *     kd_job_free(&job);
 *
 * Lower down, a model can be built and run directly: kd_yaml_load_file() reads a model
 * file, kd_model_build() lays out its parameters (one buffer each for parameters,
 * gradients and running statistics, one activation arena) on a backend (kd_backend_cpu(),
 * or kd_backend_cuda() when a device answers), and kd_model_forward()/kd_model_backward()
 * run it on device memory; kd_checkpoint_save()/kd_checkpoint_load() move its state to and
 * from safetensors files with PyTorch names.
 *
 * Conventions everywhere: a function that can fail returns kd_status and records a
 * message (kd_last_error()) naming the file and the problem; nothing in the library
 * exits, prints to stdout or allocates inside a training step. Who owns what is said at
 * each declaration.
 */
#ifndef KD_H
#define KD_H

#include "checkpoint.h"
#include "config_yaml.h"
#include "job.h"
#include "model.h"
#include "status.h"
#include "tensor.h"
#include "train.h"

#endif
