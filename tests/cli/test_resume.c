/*
 * test_resume.c - the resume guarantee of `distill train --resume`: a run
 * SIGKILLed at two points and resumed each time from its last checkpoint
 * ends with the same bytes in last.safetensors and best.safetensors, the
 * same per-epoch validation metrics and the same test accuracy as a run that
 * never stopped. The model exercises every piece of training state: batchnorm
 * running statistics, dropout masks, augmentation, SGD momentum and a cosine
 * schedule with warm-up. Kill delays come from a fixed seed (KD_RESUME_SEED
 * overrides it) and are printed, so a failure can be replayed. A resume that fails before its
 * first checkpoint leaves the run directory's files as they were.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kd_cli_util.h"
#include "kd_fake_data.h"

#define N_TRAIN     1500
#define N_TEST      200
#define EPOCHS      3
#define BATCH       32
#define VAL         200
#define STEPS_EPOCH ((N_TRAIN - VAL + BATCH - 1) / BATCH)
#define STEPS_TOTAL (STEPS_EPOCH * EPOCHS)

static char tmp[256];
static char data[512];

static int setup(void **state)
{
    (void)state;
    return kd_cli_workspace("kd_resume_", N_TRAIN, N_TEST, 11, tmp, sizeof tmp, data, sizeof data);
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(tmp);
    return 0;
}

static void write_job(const char *path, const char *out_dir)
{
    char text[4096];
    snprintf(text, sizeof text,
             "run: {out_dir: %s, seed: 3, threads: 2, log_every: 1000, checkpoint_every: 5}\n"
             "data:\n"
             "  dataset: fashion-mnist\n"
             "  root: %s\n"
             "  batch_size: %d\n"
             "  val_size: %d\n"
             "  augment: {crop_pad: 2, hflip: true}\n"
             "model:\n"
             "  input: [1, 28, 28]\n"
             "  layers:\n"
             /* full resolution and a pointwise conv keep each run a few seconds long, so the
                kills below land while it is still training */
             "    - conv2d: {out: 16, kernel: 3, pad: 1}\n"
             "    - batchnorm: {}\n"
             "    - relu\n"
             "    - dropout: {p: 0.1}\n"
             "    - conv2d: {out: 16, kernel: 3, pad: 1, groups: 16}\n"
             "    - conv2d: {out: 16, kernel: 1}\n"
             "    - relu\n"
             "    - global_avgpool\n"
             "    - linear: {out: 10}\n"
             "optim:\n"
             "  name: sgd\n"
             "  lr: 0.1\n"
             "  momentum: 0.9\n"
             "  weight_decay: 1.0e-4\n"
             "  epochs: %d\n"
             "  schedule: {type: cosine, warmup_steps: 20, min_lr: 1.0e-3}\n",
             out_dir, data, BATCH, VAL, EPOCHS);
    assert_int_equal(kd_write_text(path, text), 0);
}

static void print_log(const char *log)
{
    char *t = kd_read_text(log);
    if (t)
        fprintf(stderr, "--- %s ---\n%s--- end ---\n", log, t);
    free(t);
}

/* The "step" recorded in a checkpoint's safetensors metadata, or -1. */
static long ckpt_step(const char *path)
{
    uint8_t *b = NULL;
    size_t n = 0;
    double step = -1;
    if (kd_read_file(path, &b, &n) == 0 && n > 8) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--)
            hlen = hlen << 8 | b[i];
        if (hlen < n - 8) {
            b[8 + hlen] = 0;
            if (kd_json_number((const char *)b + 8, "step", &step))
                step = -1;
        }
    }
    free(b);
    return (long)step;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Inode of path, 0 when it does not exist. */
static ino_t inode_of(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? sb.st_ino : 0;
}

/*
 * Start `distill train job [--resume]`, wait until it writes a new
 * last.safetensors holding step min_step or later, let it run delay_ms more
 * and SIGKILL it. Fails unless it was killed by that signal while still
 * running. Returns the step of the checkpoint it left behind.
 */
static long kill_mid_run(const char *job, const char *dir, int resume, long min_step, long delay_ms,
                         const char *log)
{
    char ckpt[700], result[700];
    snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", dir);
    snprintf(result, sizeof result, "%s/result.json", dir);
    ino_t seen = inode_of(ckpt);
    const char *argv[] = {"train", job, resume ? "--resume" : NULL, NULL};
    pid_t pid = kd_spawn_distill(argv, log);
    assert_true(pid > 0);
    int exited = 0, reached = 0, code = -1;
    for (int i = 0; i < 60000 && !reached; i++) { /* up to about 60 s */
        ino_t now = inode_of(ckpt);
        if (now != 0 && now != seen) {
            seen = now;
            reached = ckpt_step(ckpt) >= min_step;
        } else if (kd_wait_exit_nohang(pid, &code)) {
            exited = 1;
            break;
        } else {
            sleep_ms(1);
        }
    }
    if (!exited) {
        sleep_ms(delay_ms);
        kill(pid, SIGKILL);
        assert_int_equal(kd_wait_exit(pid, &code), 0);
    }
    if (!reached || code != 128 + SIGKILL) {
        print_log(log);
        fail_msg("distill was to be SIGKILLed after a checkpoint of step >= %ld, but it %s with "
                 "code %d: make the job bigger",
                 min_step, exited ? "exited by itself" : "ended", code);
    }
    if (kd_file_exists(result)) {
        print_log(log);
        fail_msg("%s exists after the kill: the run had already finished", result);
    }
    long step = ckpt_step(ckpt);
    fprintf(stderr, "killed %ld ms after a checkpoint of step >= %ld; %s holds step %ld of %d\n",
            delay_ms, min_step, ckpt, step, STEPS_TOTAL);
    assert_true(step >= min_step && step < STEPS_TOTAL);
    return step;
}

static char *read_text(const char *path)
{
    char *t = kd_read_text(path);
    if (!t)
        fail_msg("cannot read %s", path);
    return t;
}

/* Compare val_loss/val_acc of every epoch line; both files must have exactly EPOCHS lines. */
static void compare_metrics(const char *a_path, const char *b_path)
{
    char *a = read_text(a_path), *b = read_text(b_path);
    const char *pa = a, *pb = b;
    for (int e = 1; e <= EPOCHS; e++) {
        double ea = 0, eb = 0, va = -1, vb = -2, la = -1, lb = -2;
        assert_int_equal(kd_json_number(pa, "epoch", &ea), 0);
        assert_int_equal(kd_json_number(pb, "epoch", &eb), 0);
        assert_int_equal((int)ea, e);
        assert_int_equal((int)eb, e);
        assert_int_equal(kd_json_number(pa, "val_acc", &va), 0);
        assert_int_equal(kd_json_number(pb, "val_acc", &vb), 0);
        assert_int_equal(kd_json_number(pa, "val_loss", &la), 0);
        assert_int_equal(kd_json_number(pb, "val_loss", &lb), 0);
        if (va != vb || la != lb)
            fail_msg("epoch %d: uninterrupted val_acc %.6f val_loss %.6f, resumed val_acc %.6f "
                     "val_loss %.6f",
                     e, va, la, vb, lb);
        pa = strchr(pa, '\n');
        pb = strchr(pb, '\n');
        assert_non_null(pa);
        assert_non_null(pb);
        pa++;
        pb++;
    }
    if (*pa || *pb)
        fail_msg("metrics.jsonl has more than %d lines:\n%s\n---\n%s", EPOCHS, a, b);
    free(a);
    free(b);
}

static void test_resume_is_bit_identical(void **state)
{
    (void)state;
    char dir_a[600], dir_b[600], job_a[600], job_b[600], log_a[600], log_b[600];
    snprintf(dir_a, sizeof dir_a, "%s/A", tmp);
    snprintf(dir_b, sizeof dir_b, "%s/B", tmp);
    snprintf(job_a, sizeof job_a, "%s/a.yaml", tmp);
    snprintf(job_b, sizeof job_b, "%s/b.yaml", tmp);
    snprintf(log_a, sizeof log_a, "%s/a.log", tmp);
    snprintf(log_b, sizeof log_b, "%s/b.log", tmp);
    write_job(job_a, dir_a);
    write_job(job_b, dir_b);

    const char *seed_env = getenv("KD_RESUME_SEED");
    unsigned seed = seed_env ? (unsigned)strtoul(seed_env, NULL, 10) : 20240611u;
    fprintf(stderr, "kill-delay seed %u (set KD_RESUME_SEED to replay another)\n", seed);
    long d1 = rand_r(&seed) % 101, d2 = rand_r(&seed) % 101;

    /* B: killed soon after its first checkpoint, resumed, then killed again in epoch 2 or
     * later, after an end-of-epoch validation and best checkpoint */
    long s1 = kill_mid_run(job_b, dir_b, 0, 1, d1, log_b);
    long s2 = kill_mid_run(job_b, dir_b, 1, STEPS_EPOCH + 1, d2, log_b);
    char best_b[700];
    snprintf(best_b, sizeof best_b, "%s/best.safetensors", dir_b);
    assert_true(kd_file_exists(best_b));
    if (s2 <= s1) {
        print_log(log_b);
        fail_msg("the second kill left step %ld, not later than the first (%ld)", s2, s1);
    }
    /* B runs to the end; then A, the same job never interrupted (one run at a time) */
    const char *resume_b[] = {"train", job_b, "--resume", NULL};
    pid_t pid = kd_spawn_distill(resume_b, log_b);
    assert_true(pid > 0);
    int code = -1;
    assert_int_equal(kd_wait_exit(pid, &code), 0);
    if (code != 0) {
        print_log(log_b);
        fail_msg("the final resume of B exited with %d", code);
    }
    const char *run_a[] = {"train", job_a, NULL};
    pid = kd_spawn_distill(run_a, log_a);
    assert_true(pid > 0);
    assert_int_equal(kd_wait_exit(pid, &code), 0);
    if (code != 0) {
        print_log(log_a);
        fail_msg("the uninterrupted run A exited with %d", code);
    }

    /* B's log shows both resumes, from the two checkpoints */
    char *lb = read_text(log_b);
    char want[128];
    snprintf(want, sizeof want, ", step %ld\n", s1);
    if (!strstr(lb, want))
        fail_msg("B's log lacks a resume from step %ld:\n%s", s1, lb);
    snprintf(want, sizeof want, ", step %ld\n", s2);
    if (!strstr(lb, want))
        fail_msg("B's log lacks a resume from step %ld:\n%s", s2, lb);
    free(lb);

    static const char *const files[] = {"last.safetensors", "best.safetensors", NULL};
    for (int i = 0; files[i]; i++) {
        char fa[700], fb[700];
        snprintf(fa, sizeof fa, "%s/%s", dir_a, files[i]);
        snprintf(fb, sizeof fb, "%s/%s", dir_b, files[i]);
        assert_true(kd_file_exists(fa));
        assert_true(kd_file_exists(fb));
        if (!kd_files_equal(fa, fb)) {
            print_log(log_a);
            print_log(log_b);
            fail_msg("%s differs between the uninterrupted and the resumed run", files[i]);
        }
    }
    char fa[700], fb[700];
    snprintf(fa, sizeof fa, "%s/last.safetensors", dir_a);
    assert_int_equal(ckpt_step(fa), STEPS_TOTAL);

    snprintf(fa, sizeof fa, "%s/metrics.jsonl", dir_a);
    snprintf(fb, sizeof fb, "%s/metrics.jsonl", dir_b);
    compare_metrics(fa, fb);

    snprintf(fa, sizeof fa, "%s/result.json", dir_a);
    snprintf(fb, sizeof fb, "%s/result.json", dir_b);
    char *ra = read_text(fa), *rb = read_text(fb);
    double acc_a = -1, acc_b = -2, loss_a = -1, loss_b = -2;
    assert_int_equal(kd_json_number(ra, "test_acc", &acc_a), 0);
    assert_int_equal(kd_json_number(rb, "test_acc", &acc_b), 0);
    assert_int_equal(kd_json_number(ra, "test_loss", &loss_a), 0);
    assert_int_equal(kd_json_number(rb, "test_loss", &loss_b), 0);
    fprintf(stderr, "test_acc %.6f (A) %.6f (B)\n", acc_a, acc_b);
    if (acc_a != acc_b || loss_a != loss_b)
        fail_msg("test_acc/test_loss: uninterrupted %.6f/%.6f, resumed %.6f/%.6f", acc_a, loss_a,
                 acc_b, loss_b);
    /* the fake classes are learnable: well above the 10% of guessing */
    assert_true(acc_a > 0.3);
    free(ra);
    free(rb);
}

/* distill train ARGS..., its exit code; the output goes to log */
static int train_code(const char *const *argv, const char *log)
{
    pid_t pid = kd_spawn_distill(argv, log);
    assert_true(pid > 0);
    int code = -1;
    assert_int_equal(kd_wait_exit(pid, &code), 0);
    return code;
}

/* SIGINT, SIGTERM and SIGHUP (a closed terminal) each stop a run at a checkpoint: exit 130, the
 * message says it stopped (not an error) and where the checkpoint is, and --resume finishes. */
static void test_signals_stop_at_checkpoint(void **state)
{
    (void)state;
    const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
    for (int k = 0; k < 3; k++) {
        char dir[600], job[600], log[600], ckpt[700];
        snprintf(dir, sizeof dir, "%s/S%d", tmp, k);
        snprintf(job, sizeof job, "%s/s%d.yaml", tmp, k);
        snprintf(log, sizeof log, "%s/s%d.log", tmp, k);
        snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", dir);
        write_job(job, dir);
        const char *argv[] = {"train", job, NULL};
        pid_t pid = kd_spawn_distill(argv, log);
        assert_true(pid > 0);
        int code = -1, exited = 0;
        for (int i = 0; i < 60000 && !inode_of(ckpt); i++) { /* its first checkpoint */
            if (kd_wait_exit_nohang(pid, &code)) {
                exited = 1;
                break;
            }
            sleep_ms(1);
        }
        long before = -1;
        if (!exited) {
            before = ckpt_step(ckpt);
            kill(pid, sigs[k]);
            assert_int_equal(kd_wait_exit(pid, &code), 0);
        }
        char *text = kd_read_text(log);
        assert_non_null(text);
        const char *msg = strstr(text, "distill: stopped: stopped at epoch");
        long said = -1;
        if (code != 130 || !msg || !strstr(text, "checkpoint saved") || strstr(text, "error") ||
            !strstr(msg, " step ") || (said = strtol(strstr(msg, " step ") + 6, NULL, 10)) < 1) {
            print_log(log);
            fail_msg("signal %d: want exit 130 and a stop message, got %d", sigs[k], code);
        }
        free(text);
        /* the checkpoint is the one the stop wrote, at the step it names, not an earlier one */
        const long step = ckpt_step(ckpt);
        if (step != said || step < before || step >= STEPS_TOTAL) {
            print_log(log);
            fail_msg("signal %d: checkpoint at step %ld, the message says %ld (before: %ld)",
                     sigs[k], step, said, before);
        }
        if (k == 2) { /* and the run goes on from there */
            const char *resume[] = {"train", job, "--resume", NULL};
            if (train_code(resume, log) != 0) {
                print_log(log);
                fail_msg("the resume after the stop failed");
            }
            assert_int_equal(ckpt_step(ckpt), STEPS_TOTAL);
        }
    }
}

/* A resume from an earlier epoch's checkpoint that fails before its first commit (it diverges)
 * or in writing it (a file size limit) leaves the run it would have replaced as it was:
 * last.safetensors, config.yaml and every metrics line. */
static void test_failed_resume_keeps_run(void **state)
{
    (void)state;
    char dir[600], job[600], log[600], ep1[600], path[700];
    snprintf(dir, sizeof dir, "%s/C", tmp);
    snprintf(job, sizeof job, "%s/c.yaml", tmp);
    snprintf(log, sizeof log, "%s/c.log", tmp);
    snprintf(ep1, sizeof ep1, "%s/c_epoch1.safetensors", tmp);
    write_job(job, dir);
    const char *one[] = {"train", job, "--set", "optim.epochs=1", NULL};
    if (train_code(one, log) != 0) {
        print_log(log);
        fail_msg("the one-epoch run failed");
    }
    snprintf(path, sizeof path, "%s/last.safetensors", dir);
    uint8_t *b = NULL;
    size_t n = 0;
    assert_int_equal(kd_read_file(path, &b, &n), 0);
    assert_int_equal(kd_write_bytes(ep1, b, n), 0);
    free(b);
    const char *two[] = {"train", job, "--resume", "--set", "optim.epochs=2", NULL};
    if (train_code(two, log) != 0) {
        print_log(log);
        fail_msg("the resume to epoch 2 failed");
    }
    /* the run as it stands: its three files' bytes */
    static const char *const files[] = {"last.safetensors", "config.yaml", "metrics.jsonl"};
    uint8_t *before[3];
    size_t len[3];
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        assert_int_equal(kd_read_file(path, &before[i], &len[i]), 0);
    }
    char *m = kd_read_text(path);
    assert_non_null(strstr(m, "\"epoch\": 2,"));
    free(m);
    const char *bad[] = {"train",          job,     "--resume",      ep1, "--set",
                         "optim.epochs=2", "--set", "optim.lr=1e30", NULL};
    if (train_code(bad, log) != 1) {
        print_log(log);
        fail_msg("the diverging resume did not fail with exit 1");
    }
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (!kd_file_holds(path, before[i], len[i])) {
            print_log(log);
            fail_msg("the failed resume changed %s", files[i]);
        }
    }
    /* the same resume failing at its first checkpoint itself (a file size limit below the
     * checkpoint's size): the config copy and the trimmed metrics it wrote just before are put
     * back */
    static char out[1 << 16];
    const char *full[] = {"train", job, "--resume", ep1, "--set", "optim.epochs=2", NULL};
    int code = -1;
    assert_int_equal(kd_run_distill_fsize(full, (long long)len[0] / 2, out, sizeof out, &code), 0);
    if (code != 1 || !strstr(out, "File too large")) {
        fprintf(stderr, "%s", out);
        fail_msg("want exit 1 on the file size limit, got %d", code);
    }
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (!kd_file_holds(path, before[i], len[i])) {
            fprintf(stderr, "%s", out);
            fail_msg("the resume that failed at its checkpoint changed %s", files[i]);
        }
        free(before[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_is_bit_identical),
        cmocka_unit_test(test_failed_resume_keeps_run),
        cmocka_unit_test(test_signals_stop_at_checkpoint),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
