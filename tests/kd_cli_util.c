/*
 * kd_cli_util.c - fork/exec of the distill binary and file helpers for the CLI tests.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kd_cli_util.h"
#include "kd_fake_data.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KD_RUN_TIMEOUT_S 300

const char *kd_distill_path(void)
{
    const char *p = getenv("DISTILL");
    return p && p[0] ? p : NULL;
}

/* Build the exec argument vector: distill, argv..., NULL. Caller frees. */
static char **exec_args(const char *bin, const char *const *argv)
{
    size_t n = 0;
    while (argv && argv[n])
        n++;
    char **a = calloc(n + 2, sizeof *a);
    if (!a)
        return NULL;
    a[0] = (char *)bin;
    for (size_t i = 0; i < n; i++)
        a[i + 1] = (char *)argv[i];
    return a;
}

static void exec_child(const char *bin, char **args, long long fsize_limit)
{
    if (fsize_limit > 0) {
        struct rlimit rl = {.rlim_cur = (rlim_t)fsize_limit, .rlim_max = (rlim_t)fsize_limit};
        /* the default action (the process killed), so that the distill command's own
         * handling of the limit is what the tests see */
        signal(SIGXFSZ, SIG_DFL);
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0)
            _exit(125);
    }
    execv(bin, args);
    fprintf(stderr, "kd_cli_util: cannot exec '%s': %s\n", bin, strerror(errno));
    _exit(127);
}

static int decode_status(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

int kd_wait_exit(pid_t pid, int *exit_code)
{
    int status;
    pid_t r;
    do
        r = waitpid(pid, &status, 0);
    while (r < 0 && errno == EINTR);
    if (r != pid)
        return -1;
    *exit_code = decode_status(status);
    return 0;
}

int kd_wait_exit_nohang(pid_t pid, int *exit_code)
{
    int status;
    if (waitpid(pid, &status, WNOHANG) != pid)
        return 0;
    *exit_code = decode_status(status);
    return 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int run_bin(const char *bin, const char *const *argv, long long fsize_limit, char *out,
                   size_t outlen, int *exit_code)
{
    if (!bin || !out || outlen == 0 || !exit_code)
        return -1;
    out[0] = '\0';
    *exit_code = -1;
    char **args = exec_args(bin, argv);
    int fds[2];
    if (!args || pipe2(fds, O_CLOEXEC) != 0) {
        free(args);
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        free(args);
        return -1;
    }
    if (pid == 0) {
        dup2(fds[1], STDOUT_FILENO);
        dup2(fds[1], STDERR_FILENO);
        exec_child(bin, args, fsize_limit);
    }
    free(args);
    close(fds[1]);
    size_t used = 0;
    char sink[4096];
    double deadline = now_s() + KD_RUN_TIMEOUT_S;
    int timed_out = 0;
    for (;;) {
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int left_ms = (int)((deadline - now_s()) * 1000);
        if (left_ms <= 0) {
            timed_out = 1;
            break;
        }
        int pr = poll(&pfd, 1, left_ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            timed_out = pr == 0;
            break;
        }
        char *dst = used + 1 < outlen ? out + used : sink;
        size_t room = used + 1 < outlen ? outlen - 1 - used : sizeof sink;
        ssize_t n = read(fds[0], dst, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (dst != sink)
            used += (size_t)n;
    }
    out[used] = '\0';
    close(fds[0]);
    if (timed_out) {
        fprintf(stderr, "kd_cli_util: %s ran past %d s; killing it\n", bin, KD_RUN_TIMEOUT_S);
        kill(pid, SIGKILL);
    }
    if (kd_wait_exit(pid, exit_code) != 0)
        return -1;
    return timed_out ? -1 : 0;
}

int kd_run_distill_fsize(const char *const *argv, long long fsize_limit, char *out, size_t outlen,
                         int *exit_code)
{
    return run_bin(kd_distill_path(), argv, fsize_limit, out, outlen, exit_code);
}

int kd_run_program(const char *bin, const char *const *argv, char *out, size_t outlen,
                   int *exit_code)
{
    return run_bin(bin, argv, 0, out, outlen, exit_code);
}

int kd_run_distill_ranks(int ranks, const char *const *argv, char *out, size_t outlen,
                         int *exit_code)
{
    if (ranks <= 0)
        return kd_run_distill(argv, out, outlen, exit_code);
    const char *mpirun = getenv("MPIRUN");
    size_t n = 0;
    while (argv && argv[n])
        n++;
    const char **a = calloc(n + 6, sizeof *a);
    if (!mpirun || !*mpirun || !a) {
        free(a);
        return -1;
    }
    char np[16];
    snprintf(np, sizeof np, "%d", ranks);
    a[0] = "--allow-run-as-root";
    a[1] = "--oversubscribe";
    a[2] = "-np";
    a[3] = np;
    a[4] = kd_distill_path();
    for (size_t i = 0; i < n; i++)
        a[5 + i] = argv[i];
    int rc = run_bin(mpirun, a, 0, out, outlen, exit_code);
    free(a);
    return rc;
}

int kd_run_distill(const char *const *argv, char *out, size_t outlen, int *exit_code)
{
    return kd_run_distill_fsize(argv, 0, out, outlen, exit_code);
}

pid_t kd_spawn_distill(const char *const *argv, const char *log_path)
{
    const char *bin = kd_distill_path();
    if (!bin)
        return -1;
    char **args = exec_args(bin, argv);
    if (!args)
        return -1;
    int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        free(args);
        return -1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        exec_child(bin, args, 0);
    }
    close(fd);
    free(args);
    return pid;
}

int kd_make_tmpdir(const char *prefix, char *buf, size_t len)
{
    int k = snprintf(buf, len, "/tmp/%sXXXXXX", prefix);
    if (k < 0 || (size_t)k >= len)
        return -1;
    return mkdtemp(buf) ? 0 : -1;
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

void kd_rm_rf(const char *path)
{
    if (path && path[0] && strcmp(path, "/") != 0)
        nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int kd_write_bytes(const char *path, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(buf, 1, len, f) == len;
    if (fclose(f) != 0)
        ok = 0;
    return ok ? 0 : -1;
}

int kd_write_text(const char *path, const char *text)
{
    return kd_write_bytes(path, (const uint8_t *)text, strlen(text));
}

int kd_file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

int kd_read_file(const char *path, uint8_t **buf, size_t *len)
{
    *buf = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    size_t cap = 1 << 16, n = 0;
    uint8_t *p = malloc(cap + 1);
    while (p) {
        size_t r = fread(p + n, 1, cap - n, f);
        n += r;
        if (n < cap)
            break;
        uint8_t *q = realloc(p, cap * 2 + 1);
        if (!q) {
            free(p);
            p = NULL;
            break;
        }
        p = q;
        cap *= 2;
    }
    int err = !p || ferror(f);
    fclose(f);
    if (err) {
        free(p);
        return -1;
    }
    p[n] = 0;
    *buf = p;
    *len = n;
    return 0;
}

char *kd_read_text(const char *path)
{
    uint8_t *b = NULL;
    size_t n = 0;
    return kd_read_file(path, &b, &n) == 0 ? (char *)b : NULL;
}

struct cJSON *kd_read_json(const char *path)
{
    char *text = kd_read_text(path);
    cJSON *j = text ? cJSON_Parse(text) : NULL;
    free(text);
    return j;
}

int kd_files_equal(const char *a, const char *b)
{
    uint8_t *pa = NULL, *pb = NULL;
    size_t la = 0, lb = 0;
    int eq = kd_read_file(a, &pa, &la) == 0 && kd_read_file(b, &pb, &lb) == 0 && la == lb &&
             memcmp(pa, pb, la) == 0;
    free(pa);
    free(pb);
    return eq;
}

int kd_file_holds(const char *path, const uint8_t *bytes, size_t len)
{
    uint8_t *p = NULL;
    size_t n = 0;
    int eq = kd_read_file(path, &p, &n) == 0 && n == len && memcmp(p, bytes, len) == 0;
    free(p);
    return eq;
}

int kd_cli_workspace(const char *prefix, int n_train, int n_test, unsigned seed, char *tmp,
                     size_t tmp_len, char *data, size_t data_len)
{
    if (!kd_distill_path()) {
        fprintf(stderr, "DISTILL is not set (run through ctest)\n");
        return -1;
    }
    if (kd_make_tmpdir(prefix, tmp, tmp_len))
        return -1;
    int k = snprintf(data, data_len, "%s/data", tmp);
    if (k < 0 || (size_t)k >= data_len || mkdir(data, 0755) ||
        kd_fake_fmnist_write(data, n_train, n_test, seed)) {
        fprintf(stderr, "cannot write the fake data set under %s\n", tmp);
        return -1;
    }
    return 0;
}

int kd_json_number(const char *text, const char *key, double *out)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(text, pat);
    if (!p)
        return -1;
    p += strlen(pat);
    while (*p == ' ' || *p == '"')
        p++;
    char *end;
    *out = strtod(p, &end);
    return end == p ? -1 : 0;
}
