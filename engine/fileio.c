/*
 * fileio.c - durable whole-file writes, whole-file reads, mkdir -p.
 *
 * Invariants of kd_file_write_atomic: the temporary file lives in the same
 * directory as the target (rename is only atomic within one filesystem); it
 * is renamed only after every write, fflush, fsync and fclose succeeded; on
 * every failure path it is unlinked. One writer per target path at a time:
 * the temporary name is unique per process, not per thread.
 */
#include "fileio.h"

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

kd_status kd_fwrite_all(FILE *f, const void *p, size_t n, const char *what)
{
    if (n == 0)
        return KD_OK;
    errno = 0;
    size_t done = fwrite(p, 1, n, f);
    if (done != n) {
        /* A short count with errno 0 is still a failure: never trust a partial file. */
        return KD_FAIL(KD_ERR_IO, "%s: short write (%zu of %zu bytes): %s", what, done, n,
                       errno ? strerror(errno) : "unknown error");
    }
    return KD_OK;
}

void kd_path_dir(const char *path, char *buf, size_t len)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(buf, len, ".");
    else if (slash == path)
        snprintf(buf, len, "/");
    else
        snprintf(buf, len, "%.*s", (int)(slash - path), path);
}

kd_status kd_fsync_dir_of(const char *path)
{
    char dir[PATH_MAX];
    kd_path_dir(path, dir, sizeof dir);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return KD_FAIL(KD_ERR_IO, "opening directory '%s' to fsync it: %s", dir, strerror(errno));
    /* Some filesystems cannot fsync a directory (EINVAL); the data is already safe there. */
    if (fsync(fd) != 0 && errno != EINVAL) {
        const int e = errno;
        close(fd);
        return KD_FAIL(KD_ERR_IO, "fsync of directory '%s' failed: %s", dir, strerror(e));
    }
    close(fd);
    return KD_OK;
}

kd_status kd_file_write_atomic(const char *path, kd_write_fn fn, void *ctx)
{
    if (!path || !*path || !fn)
        return KD_FAIL(KD_ERR_INVALID, "kd_file_write_atomic: empty path or no writer");

    kd_status st = KD_OK;
    const char *step = NULL;
    int err = 0;
    FILE *f = NULL;
    int tmp_exists = 0, rc;
    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    if (!tmp)
        return KD_FAIL(KD_ERR_NOMEM, "writing '%s': out of memory", path);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());

    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        step = "creating temporary file";
        err = errno;
        goto fail;
    }
    tmp_exists = 1;
    f = fdopen(fd, "wb");
    if (!f) {
        step = "fdopen";
        err = errno;
        close(fd);
        goto fail;
    }

    st = fn(f, ctx);
    if (st != KD_OK) {
        kd_fail_context(st, "writing '%s': ", path);
        goto fail;
    }
    /* Catches writers that used fprintf & co. without checking each call. */
    if (ferror(f)) {
        step = "write";
        err = errno ? errno : EIO;
        goto fail;
    }
    if (fflush(f) != 0) {
        step = "fflush";
        err = errno;
        goto fail;
    }
    if (fsync(fileno(f)) != 0) {
        step = "fsync";
        err = errno;
        goto fail;
    }
    /* fclose releases the stream even when it fails, so never close it twice. */
    rc = fclose(f);
    f = NULL;
    if (rc != 0) {
        step = "fclose";
        err = errno;
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        step = "rename";
        err = errno;
        goto fail;
    }
    tmp_exists = 0;

    /* Without this the rename itself may be lost on power failure. */
    if ((st = kd_fsync_dir_of(path)) != KD_OK) {
        kd_fail_context(st, "writing '%s': ", path);
        goto fail;
    }
    free(tmp);
    return KD_OK;

fail:
    if (step)
        st = KD_FAIL(KD_ERR_IO, "writing '%s': %s failed: %s", path, step,
                     err ? strerror(err) : "unknown error");
    if (f)
        fclose(f);
    if (tmp_exists)
        unlink(tmp);
    free(tmp);
    return st;
}

kd_status kd_file_read_all(const char *path, void **buf, size_t *len)
{
    if (!path || !buf || !len)
        return KD_FAIL(KD_ERR_INVALID, "kd_file_read_all: NULL argument");
    *buf = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return KD_FAIL(e == ENOENT ? KD_ERR_NOT_FOUND : KD_ERR_IO, "cannot open '%s': %s", path,
                       strerror(e));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return KD_FAIL(KD_ERR_IO, "cannot stat '%s': %s", path, strerror(e));
    }
    /* The size is only a hint: pipes report 0 and files may grow, so read to EOF. */
    size_t cap = (S_ISREG(sb.st_mode) && sb.st_size > 0) ? (size_t)sb.st_size + 1 : 4096;
    size_t n = 0;
    char *p = malloc(cap);
    if (!p) {
        close(fd);
        return KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory (%zu bytes)", path, cap);
    }
    for (;;) {
        if (n + 1 >= cap) {
            size_t ncap = cap * 2;
            char *np = realloc(p, ncap);
            if (!np) {
                free(p);
                close(fd);
                return KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory (%zu bytes)", path, ncap);
            }
            p = np;
            cap = ncap;
        }
        ssize_t r = read(fd, p + n, cap - 1 - n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            free(p);
            close(fd);
            return KD_FAIL(KD_ERR_IO, "reading '%s': %s", path, strerror(e));
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    p[n] = '\0';
    *buf = p;
    *len = n;
    return KD_OK;
}

/* mkdir one component; an existing directory counts as success, anything else in the way not. */
/* mkdir dir (a prefix of full) unless it is a directory already; the first directory made is
 * recorded in made (when given and still empty). */
static kd_status mkdir_one(const char *dir, const char *full, char *made, size_t len)
{
    if (mkdir(dir, 0755) == 0) {
        if (made && len && !made[0])
            snprintf(made, len, "%s", dir);
        return KD_OK;
    }
    int e = errno;
    struct stat sb;
    if (e == EEXIST || e == EISDIR) {
        if (stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode))
            return KD_OK;
        return KD_FAIL(KD_ERR_IO,
                       "cannot create directory '%s': '%s' exists and is not a directory", full,
                       dir);
    }
    return KD_FAIL(KD_ERR_IO, "cannot create directory '%s': mkdir '%s': %s", full, dir,
                   strerror(e));
}

kd_status kd_mkdir_p(const char *dir) { return kd_mkdir_p_made(dir, NULL, 0); }

kd_status kd_mkdir_p_made(const char *dir, char *made, size_t len)
{
    if (made && len)
        made[0] = '\0';
    if (!dir || !*dir)
        return KD_FAIL(KD_ERR_INVALID, "kd_mkdir_p: empty directory name");
    char *buf = strdup(dir);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "cannot create directory '%s': out of memory", dir);
    kd_status st = KD_OK;
    /* Create each prefix ending before a '/', skipping the root and repeated slashes. */
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/' || p[-1] == '/')
            continue;
        *p = '\0';
        st = mkdir_one(buf, dir, made, len);
        *p = '/';
        if (st != KD_OK)
            goto done;
    }
    st = mkdir_one(buf, dir, made, len);
done:
    free(buf);
    return st;
}

typedef struct {
    const void *p;
    size_t n;
    const char *path;
} kd_bytes_ctx;

static kd_status write_bytes_fn(FILE *f, void *ctx)
{
    const kd_bytes_ctx *c = ctx;
    return kd_fwrite_all(f, c->p, c->n, c->path);
}

kd_status kd_file_write_bytes(const char *path, const void *p, size_t n)
{
    kd_bytes_ctx c = {p, n, path};
    return kd_file_write_atomic(path, write_bytes_fn, &c);
}

/* 1 when path has a ".." component: walking up such a path by its text is not walking up the
 * directories it names. */
static int has_dotdot(const char *path)
{
    for (const char *p = strstr(path, ".."); p; p = strstr(p + 2, ".."))
        if ((p == path || p[-1] == '/') && (p[2] == '\0' || p[2] == '/'))
            return 1;
    return 0;
}

void kd_remove_made_dirs(const char *dir, const char *top)
{
    if (has_dotdot(dir)) /* left as they are, rather than removing one not made here */
        return;
    char cur[PATH_MAX], up[PATH_MAX];
    snprintf(cur, sizeof cur, "%s", dir);
    while (top[0] && (rmdir(cur) == 0 || errno == ENOENT) && strcmp(cur, top) != 0) {
        kd_path_dir(cur, up, sizeof up);
        if (!strcmp(up, cur))
            break;
        snprintf(cur, sizeof cur, "%s", up);
    }
}

kd_status kd_dir_lock_take(const char *dir, const char *what, kd_dir_lock *l, FILE *log)
{
    l->fd = -1;
    l->unlocked = 0;
    l->made[0] = '\0';
    snprintf(l->dir, sizeof l->dir, "%s", dir);
    if (snprintf(l->path, sizeof l->path, "%s/.distill.lock", dir) >= (int)sizeof l->path)
        return KD_FAIL(KD_ERR_INVALID, "%s '%s': the path is too long", what, dir);
    KD_TRY(kd_mkdir_p_made(dir, l->made, sizeof l->made));
    kd_status st = KD_OK;
    /* the file is removed when a run ends: one locked after its holder removed it is not the
     * lock any more, and the open starts again; so does one whose directory a run that failed
     * at the same moment removed (it made it, and found it empty) */
    for (int tries = 0; tries < 8; tries++) {
        const int fd = open(l->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0 && errno == ENOENT) {
            char made[PATH_MAX];
            KD_TRY(kd_mkdir_p_made(dir, made, sizeof made));
            if (!l->made[0])
                snprintf(l->made, sizeof l->made, "%s", made);
            continue;
        }
        if (fd < 0) {
            st = KD_FAIL(KD_ERR_IO, "cannot create the lock file '%s': %s", l->path,
                         strerror(errno));
            goto fail;
        }
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            const int e = errno;
            if (e == EWOULDBLOCK) {
                char who[128] = "";
                const ssize_t n = pread(fd, who, sizeof who - 1, 0);
                who[n > 0 ? n : 0] = '\0';
                who[strcspn(who, "\n")] = '\0';
                close(fd);
                st = KD_FAIL(KD_ERR_CONFIG,
                             "%s '%s' is in use: another distill process%s%s%s is writing there "
                             "(it holds %s); wait for it to end, or choose another %s",
                             what, dir, who[0] ? " (" : "", who, who[0] ? ")" : "", l->path, what);
                goto fail;
            }
            /* no locks on this filesystem: the file goes again when the run ends */
            close(fd);
            l->unlocked = 1;
            if (log)
                fprintf(log,
                        "note: cannot lock '%s' (%s): nothing stops another process from writing "
                        "into %s at the same time\n",
                        l->path, strerror(e), dir);
            return KD_OK;
        }
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(l->path, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino) {
            char host[64] = "?", me[128];
            if (gethostname(host, sizeof host) != 0)
                snprintf(host, sizeof host, "?");
            host[sizeof host - 1] = '\0';
            const int n = snprintf(me, sizeof me, "pid %ld on %s\n", (long)getpid(), host);
            /* who holds it, for the message above: a file that cannot say so still locks */
            if ((ftruncate(fd, 0) != 0 || pwrite(fd, me, (size_t)n, 0) != (ssize_t)n) && log)
                fprintf(log, "note: cannot write to the lock file '%s': %s\n", l->path,
                        strerror(errno));
            l->fd = fd;
            return KD_OK;
        }
        close(fd);
    }
    st = KD_FAIL(KD_ERR_IO, "cannot lock '%s': the file keeps being removed", l->path);
fail:
    kd_remove_made_dirs(dir, l->made);
    return st;
}

void kd_dir_lock_drop(kd_dir_lock *l, int failed)
{
    if (l->fd >= 0 || l->unlocked) {
        /* before the lock goes: a process that opened the file meanwhile finds, once it has
         * locked it, that it is not the lock any more */
        unlink(l->path);
        if (l->fd >= 0)
            close(l->fd);
        l->fd = -1;
        l->unlocked = 0;
    }
    if (failed)
        kd_remove_made_dirs(l->dir, l->made);
}
