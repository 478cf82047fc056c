/*
 * kd_cli_util.h - running the distill binary from tests, and small file helpers.
 *
 * The binary is $DISTILL (set by kd_add_test). argv lists the arguments after
 * the program name and ends with NULL. Exit codes follow the shell: a normal
 * exit gives its status, death by signal s gives 128 + s.
 */
#ifndef KD_CLI_UTIL_H
#define KD_CLI_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* The JSON file at path parsed (free with cJSON_Delete), or NULL when it cannot be read or
 * parsed. */
struct cJSON *kd_read_json(const char *path);

/* $DISTILL, or NULL when it is not set. */
const char *kd_distill_path(void);

/*
 * Run distill with argv and wait for it (killed after 300 s). Combined stdout
 * and stderr go to out (NUL-terminated, cut to outlen - 1 bytes). 0 when it ran.
 */
int kd_run_distill(const char *const *argv, char *out, size_t outlen, int *exit_code);

/* kd_run_distill with RLIMIT_FSIZE set to fsize_limit bytes and SIGXFSZ ignored in the child. */
int kd_run_distill_fsize(const char *const *argv, long long fsize_limit, char *out, size_t outlen,
                         int *exit_code);

/* kd_run_distill for another program: bin is its path, argv its arguments after argv[0]. */
int kd_run_program(const char *bin, const char *const *argv, char *out, size_t outlen,
                   int *exit_code);

/*
 * kd_run_distill on `ranks` processes under $MPIRUN (ranks 0: a plain run). As root in a
 * container Open MPI needs --allow-run-as-root and, for more ranks than cores,
 * --oversubscribe; both are passed. -1 when $MPIRUN is unset.
 */
int kd_run_distill_ranks(int ranks, const char *const *argv, char *out, size_t outlen,
                         int *exit_code);

/* Start distill in the background, stdout and stderr appended to log_path; the pid, or -1. */
pid_t kd_spawn_distill(const char *const *argv, const char *log_path);

/* Wait for pid; 0 with *exit_code set (128 + signal when killed), -1 on error. */
int kd_wait_exit(pid_t pid, int *exit_code);

/* Like kd_wait_exit without blocking: 1 with *exit_code set when pid has ended, else 0. */
int kd_wait_exit_nohang(pid_t pid, int *exit_code);

/* Create a fresh directory /tmp/<prefix>XXXXXX into buf; 0 on success. */
int kd_make_tmpdir(const char *prefix, char *buf, size_t len);

/*
 * The usual fixture of a CLI test: checks that $DISTILL is set, makes a temporary directory
 * /tmp/<prefix>XXXXXX into tmp and writes a fake Fashion-MNIST of n_train/n_test samples into
 * <tmp>/data (its path into data). 0 on success, -1 (with a message on stderr) on failure.
 */
int kd_cli_workspace(const char *prefix, int n_train, int n_test, unsigned seed, char *tmp,
                     size_t tmp_len, char *data, size_t data_len);

/* Remove a directory tree (like rm -rf); quietly ignores what is not there. */
void kd_rm_rf(const char *path);

int kd_write_text(const char *path, const char *text);
int kd_file_exists(const char *path);
/* Whole file into a malloc'd buffer (NUL-terminated; caller frees); 0 on success. */
int kd_read_file(const char *path, uint8_t **buf, size_t *len);
/* A whole file as a malloc'd NUL-terminated string, or NULL. */
char *kd_read_text(const char *path);
int kd_write_bytes(const char *path, const uint8_t *buf, size_t len);
/* 1 when both files can be read and have identical bytes. */
int kd_files_equal(const char *a, const char *b);
/* 1 when path reads back as exactly the len bytes given. */
int kd_file_holds(const char *path, const uint8_t *bytes, size_t len);
/* The number after "key": in a JSON text (values may be quoted, as in safetensors metadata);
 * 0 with *out set, -1 when the key is missing or not followed by a number. */
int kd_json_number(const char *text, const char *key, double *out);

#endif
