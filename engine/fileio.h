/*
 * fileio.h - durable whole-file writes and small filesystem helpers.
 *
 * kd_file_write_atomic either leaves the complete new contents at path or
 * leaves whatever was there before: the bytes go to a temporary file in the
 * same directory, which is flushed to disk and only then renamed over path.
 * A crash or a full disk can never leave a half-written checkpoint behind.
 */
#ifndef KD_FILEIO_H
#define KD_FILEIO_H

#include <limits.h>
#include <stddef.h>
#include <stdio.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Writes the contents of a file to f. It must report every write error
 * (kd_fwrite_all does); the stream is also checked with ferror afterwards.
 */
typedef kd_status (*kd_write_fn)(FILE *f, void *ctx);

/*
 * Replace path with what fn writes: path.tmp.<pid> is written, flushed,
 * fsynced and closed, renamed over path, and the directory is fsynced. On
 * failure the temporary file is removed, the old file at path is untouched,
 * and the message names path and the step that failed.
 */
kd_status kd_file_write_atomic(const char *path, kd_write_fn fn, void *ctx);

/* kd_file_write_atomic of the n bytes at p. */
kd_status kd_file_write_bytes(const char *path, const void *p, size_t n);

/* fwrite that fails (KD_ERR_IO, naming what) unless all n bytes were written. */
kd_status kd_fwrite_all(FILE *f, const void *p, size_t n, const char *what);

/*
 * Read a whole file into a malloc'd buffer (caller frees with free()). The
 * buffer has a NUL after the last byte so text can be used as a C string;
 * *len excludes it. A missing file is KD_ERR_NOT_FOUND.
 */
kd_status kd_file_read_all(const char *path, void **buf, size_t *len);

/* The directory holding path, into buf: "." without a slash, "/" for a name in the root. */
void kd_path_dir(const char *path, char *buf, size_t len);

/* fsync the directory holding path, so that a rename or removal there is durable (a filesystem
 * that cannot fsync a directory, EINVAL, needs nothing more). */
kd_status kd_fsync_dir_of(const char *path);

/* mkdir -p: create dir and its missing parents; an existing directory is fine. */
kd_status kd_mkdir_p(const char *dir);
/* kd_mkdir_p, and into made (len bytes) the outermost directory it created ("" when it created
 * none): removing that one, once empty, undoes the call. */
kd_status kd_mkdir_p_made(const char *dir, char *made, size_t len);
/* Remove dir and its parents up to top, the outermost directory kd_mkdir_p_made made for it,
 * as long as they are empty (rmdir removes nothing else; with top "" nothing is removed, and
 * nothing either when dir has a ".." component). */
void kd_remove_made_dirs(const char *dir, const char *top);

/*
 * A directory one process writes at a time (a training run's out_dir): kd_dir_lock_take makes dir
 * (and its missing parents) and holds an flock on dir/.distill.lock, which names its holder (pid
 * and host); while it is held, a second kd_dir_lock_take on dir fails at once (KD_ERR_CONFIG,
 * naming the holder and what). On a filesystem without flock the directory is used unlocked and
 * a note says so on log. kd_dir_lock_drop removes the lock file and releases the lock; with
 * failed set it also removes the directories kd_dir_lock_take made, if they are empty.
 */
typedef struct {
    int fd;       /* -1: no lock held */
    int unlocked; /* the file was made, but the filesystem has no flock */
    char dir[PATH_MAX], path[PATH_MAX], made[PATH_MAX];
} kd_dir_lock;
kd_status kd_dir_lock_take(const char *dir, const char *what, kd_dir_lock *l, FILE *log);
void kd_dir_lock_drop(kd_dir_lock *l, int failed);

#ifdef __cplusplus
}
#endif
#endif
