/*
 * test_mpi_train.c - data-parallel training across MPI ranks on the CPU.
 *
 * The same batchnorm-free job (augmentation, SGD with momentum and weight decay, a
 * global batch that does not split evenly, gradient buckets small enough that the
 * backward pass sends several) trained on 1 rank and on 2 ranks under mpirun must end
 * with the same weights up to float rounding (the ranks sum partial gradients in another
 * order than one process does). A run stopped after one epoch on 2 ranks and resumed on
 * 1 rank must land on the same weights too, and a global batch smaller than the number
 * of ranks is a clear error. Offline distillation from a streamed teacher cache agrees on 1 and
 * 2 ranks as well. Skipped (77) when mpirun or the MPI build is missing.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "kd_cli_util.h"
#include "safetensors.h"

#define N_TRAIN 1000
#define N_TEST  200

static char tmp[256];
static char data[512];

static int setup(void **state)
{
    (void)state;
    return kd_cli_workspace("kd_mpi_", N_TRAIN, N_TEST, 5, tmp, sizeof tmp, data, sizeof data);
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(tmp);
    return 0;
}

/* 810 training samples in batches of 63: 12 full batches split 31/32 and a last one of 54. */
static void write_job(const char *path, int epochs, int batch)
{
    char text[2048];
    snprintf(text, sizeof text,
             "run: {seed: 5, threads: 1, log_every: 1000, bucket_kb: 4}\n"
             "data:\n"
             "  dataset: fashion-mnist\n"
             "  root: %s\n"
             "  batch_size: %d\n"
             "  val_size: 190\n"
             "  augment: {crop_pad: 2, hflip: true}\n"
             "model:\n"
             "  input: [1, 28, 28]\n"
             "  layers:\n"
             "    - conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}\n"
             "    - relu\n"
             "    - conv2d: {out: 16, kernel: 3, stride: 2, pad: 1}\n"
             "    - relu\n"
             "    - global_avgpool\n"
             "    - linear: {out: 10}\n"
             "optim: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 1.0e-4, epochs: %d}\n",
             data, batch, epochs);
    assert_int_equal(kd_write_text(path, text), 0);
}

/* distill train JOB --set run.out_dir=OUT [extra], on `ranks` processes (0: no mpirun). */
static int train(const char *job, const char *out, int ranks, const char *extra, char *log,
                 size_t loglen)
{
    char set_out[640];
    snprintf(set_out, sizeof set_out, "run.out_dir=%s", out);
    int code = -1;
    const char *argv[] = {"train", job, "--no-progress", "--set", set_out, extra, NULL};
    assert_int_equal(kd_run_distill_ranks(ranks, argv, log, loglen, &code), 0);
    return code;
}

/* Largest |a - b| / (1 + |a|) over every parameter of two checkpoints with the same entries. */
static double max_rel_diff(const char *a_path, const char *b_path, size_t *compared)
{
    kd_safetensors *a = NULL, *b = NULL;
    assert_int_equal(kd_safetensors_open(a_path, &a), KD_OK);
    assert_int_equal(kd_safetensors_open(b_path, &b), KD_OK);
    assert_int_equal(kd_safetensors_count(a), kd_safetensors_count(b));
    double worst = 0;
    *compared = 0;
    for (size_t i = 0; i < kd_safetensors_count(a); i++) {
        const kd_st_entry *ea = kd_safetensors_entry(a, i);
        if (ea->dtype != KD_DTYPE_F32)
            continue;
        const kd_st_entry *eb = kd_safetensors_find(b, ea->name);
        assert_non_null(eb);
        size_t n = 1;
        for (int d = 0; d < ea->ndim; d++) {
            assert_int_equal(ea->shape[d], eb->shape[d]);
            n *= (size_t)ea->shape[d];
        }
        const float *x = ea->data, *y = eb->data;
        for (size_t k = 0; k < n; k++) {
            double r = fabs((double)x[k] - y[k]) / (1 + fabs((double)x[k]));
            worst = r > worst ? r : worst;
        }
        *compared += n;
    }
    kd_safetensors_close(a);
    kd_safetensors_close(b);
    return worst;
}

static void check_same_weights(const char *dir_a, const char *dir_b)
{
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/last.safetensors", dir_a);
    snprintf(b, sizeof b, "%s/last.safetensors", dir_b);
    size_t n = 0;
    double d = max_rel_diff(a, b, &n);
    printf("  %s vs %s: %zu parameters, largest relative difference %.3g\n", dir_a, dir_b, n, d);
    assert_true(n > 300); /* parameters and optimizer state were compared */
    assert_true(d < 2e-5);
}

static void test_two_ranks_match_one(void **state)
{
    (void)state;
    char job[600], one[600], two[600], log[16384];
    snprintf(job, sizeof job, "%s/job.yaml", tmp);
    snprintf(one, sizeof one, "%s/one", tmp);
    snprintf(two, sizeof two, "%s/two", tmp);
    write_job(job, 2, 63);
    int code = train(job, one, 0, NULL, log, sizeof log);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    code = train(job, two, 2, NULL, log, sizeof log);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    /* rank 0 speaks for the job: one log, saying how the work was shared */
    assert_non_null(strstr(log, "2 ranks (mpi, gradient buckets of 4 KiB)"));
    const char *first = strstr(log, "test: loss");
    assert_non_null(first);
    assert_null(strstr(first + 1, "test: loss"));
    check_same_weights(one, two);

    /* the same first epoch on 2 ranks, then the second on 1 rank from its checkpoint */
    char mixed[600], job1[600];
    snprintf(mixed, sizeof mixed, "%s/mixed", tmp);
    snprintf(job1, sizeof job1, "%s/job1.yaml", tmp);
    write_job(job1, 1, 63);
    code = train(job1, mixed, 2, NULL, log, sizeof log);
    assert_int_equal(code, 0);
    char resume_out[640];
    snprintf(resume_out, sizeof resume_out, "run.out_dir=%s", mixed);
    const char *argv[] = {"train",    job1,    "--no-progress",  "--resume", "--set",
                          resume_out, "--set", "optim.epochs=2", NULL};
    assert_int_equal(kd_run_distill(argv, log, sizeof log, &code), 0);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    assert_non_null(strstr(log, "resumed from"));
    check_same_weights(one, mixed);
}

/*
 * Offline distillation from a teacher cache streamed by the prefetch thread: each rank
 * announces only its own slices of the epoch's order, and the kd term's gradient is scaled
 * by the rank's share like the cross-entropy's. 1 and 2 ranks must agree.
 */
static void test_offline_two_ranks_match_one(void **state)
{
    (void)state;
    char job[600], text[4096], log[16384];
    snprintf(job, sizeof job, "%s/kd.yaml", tmp);
    snprintf(text, sizeof text,
             "run: {seed: 7, threads: 1, log_every: 1000}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 63, val_size: 190,\n"
             "       augment: {crop_pad: 2, hflip: true}}\n"
             "model: {input: [1, 28, 28], layers: [{conv2d: {out: 8, kernel: 3, stride: 2, pad: "
             "1}},\n"
             "        relu, global_avgpool, {linear: {out: 10}}]}\n"
             "teacher: {model: {input: [1, 28, 28], layers: [{conv2d: {out: 16, kernel: 3, "
             "stride: 2,\n"
             "          pad: 1}}, relu, global_avgpool, {linear: {out: 10}}]},\n"
             "          checkpoint: %s/teacher/last.safetensors, cache: %s/teacher/logits.h5,\n"
             "          views: 2, dtype: float32, chunk_rows: 100, cache_memory: stream}\n"
             "distill: {mode: offline, losses: [{type: ce, weight: 0.3},\n"
             "          {type: kd, weight: 0.7, temperature: 3.0}]}\n"
             "optim: {name: sgd, lr: 0.05, momentum: 0.9, epochs: 2}\n",
             data, tmp, tmp);
    assert_int_equal(kd_write_text(job, text), 0);
    /* the teacher: the same job trained supervised for one epoch, then its cache */
    char teacher[600], set_t[640];
    snprintf(teacher, sizeof teacher, "%s/teacher", tmp);
    snprintf(set_t, sizeof set_t, "run.out_dir=%s", teacher);
    const char *targv[] = {"train",
                           job,
                           "--no-progress",
                           "--set",
                           set_t,
                           "--set",
                           "distill.mode=none",
                           "--set",
                           "distill.losses=[{type: ce, weight: 1.0}]",
                           "--set",
                           "model.layers.0.conv2d.out=16",
                           "--set",
                           "optim.epochs=1",
                           NULL};
    int code = -1;
    assert_int_equal(kd_run_distill(targv, log, sizeof log, &code), 0);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    /* the teacher section this supervised run does not read is named, not silently ignored */
    assert_non_null(strstr(log, "note: "));
    assert_non_null(strstr(log, "the job has a teacher, but distill.mode is none"));
    const char *cargv[] = {"cache", job, "--no-progress", NULL};
    assert_int_equal(kd_run_distill(cargv, log, sizeof log, &code), 0);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);

    char one[600], two[600];
    snprintf(one, sizeof one, "%s/kd_one", tmp);
    snprintf(two, sizeof two, "%s/kd_two", tmp);
    code = train(job, one, 0, NULL, log, sizeof log);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    code = train(job, two, 2, NULL, log, sizeof log);
    if (code != 0)
        fprintf(stderr, "%s", log);
    assert_int_equal(code, 0);
    assert_non_null(strstr(log, "2 ranks"));
    check_same_weights(one, two);
}

static void test_batch_smaller_than_ranks(void **state)
{
    (void)state;
    char job[600], out[600], log[16384];
    snprintf(job, sizeof job, "%s/job_b1.yaml", tmp);
    snprintf(out, sizeof out, "%s/b1", tmp);
    write_job(job, 1, 1);
    int code = train(job, out, 2, NULL, log, sizeof log);
    assert_int_not_equal(code, 0);
    assert_non_null(strstr(log, "2 ranks share each batch"));
    assert_non_null(strstr(log, "data.batch_size"));
}

/* <tmp>/<name>.yaml of `epochs` epochs in batches of 63, its out_dir <tmp>/<name> and the
 * --set value naming it. */
static void named_job(const char *name, int epochs, char job[600], char out[600], char set[640])
{
    snprintf(job, 600, "%s/%s.yaml", tmp, name);
    snprintf(out, 600, "%s/%s", tmp, name);
    snprintf(set, 640, "run.out_dir=%s", out);
    write_job(job, epochs, 63);
}

/* Two ranks of different jobs (MPMD: `-np 1 A : -np 1 B`), their output in log. */
static int run_two(const char *const *a, const char *const *b, char *log, size_t loglen)
{
    const char *argv[64];
    int n = 0, code = -1;
    argv[n++] = "--allow-run-as-root";
    argv[n++] = "--oversubscribe";
    for (int side = 0; side < 2; side++) {
        if (side)
            argv[n++] = ":";
        argv[n++] = "-np";
        argv[n++] = "1";
        argv[n++] = kd_distill_path();
        for (const char *const *x = side ? b : a; *x; x++)
            argv[n++] = *x;
    }
    argv[n] = NULL;
    assert_int_equal(kd_run_program(getenv("MPIRUN"), argv, log, loglen, &code), 0);
    return code;
}

/*
 * Ranks that were not started with the same job, or that resume from different checkpoints,
 * would wait for one another in collectives that never match: both are refused on every rank
 * before the first step.
 */
static void test_ranks_must_agree(void **state)
{
    (void)state;
    char job[600], out[600], set_out[640], log[16384];
    named_job("agree", 1, job, out, set_out);
    const char *a[] = {"train", job, "--no-progress", "--set", set_out, NULL};
    const char *b[] = {"train", job,     "--no-progress",   "--set",
                       set_out, "--set", "run.log_every=3", NULL};
    int code = run_two(a, b, log, sizeof log);
    if (code == 0 || !strstr(log, "were not started with the same job") ||
        !strstr(log, "rank 1 of 2"))
        fail_msg("exit %d:\n%s", code, log);
    /* refused before rank 0 took its out_dir: no run directory was made */
    if (kd_file_exists(out))
        fail_msg("the refused job left %s", out);
    /* run.threads may differ (a host's cores are its own), and so may the order of the --set
     * options that make the same job */
    const char *c[] = {"train",      job,     "--no-progress",  "--set",
                       set_out,      "--set", "run.threads=2",  "--set",
                       "run.name=x", "--set", "run.device=cpu", NULL};
    const char *c2[] = {"train",          job,     "--no-progress", "--set", set_out, "--set",
                        "run.device=cpu", "--set", "run.name=x",    NULL};
    code = run_two(c2, c, log, sizeof log);
    if (code != 0)
        fail_msg("exit %d:\n%s", code, log);
    /* a per-host key given to one rank only, where the file does not have it (rank 1 writes
     * nothing, so its out_dir does not matter) */
    const char *d[] = {"train", job, "--no-progress", NULL};
    snprintf(out, sizeof out, "%s/agree_d", tmp);
    snprintf(set_out, sizeof set_out, "run.out_dir=%s", out);
    code = run_two(a, d, log, sizeof log);
    if (code != 0)
        fail_msg("exit %d:\n%s", code, log);
    /* one rank resuming and the other not */
    const char *res[] = {"train", job, "--no-progress", "--resume", "--set", set_out, NULL};
    code = run_two(res, a, log, sizeof log);
    if (code == 0 || !strstr(log, "were not started with the same job"))
        fail_msg("exit %d:\n%s", code, log);
    /* each rank its own out_dir holding another run's checkpoint: one epoch and two */
    char o1[600], o2[600], s1[640], s2[640];
    snprintf(o1, sizeof o1, "%s/agree1", tmp);
    snprintf(o2, sizeof o2, "%s/agree2", tmp);
    snprintf(s1, sizeof s1, "run.out_dir=%s", o1);
    snprintf(s2, sizeof s2, "run.out_dir=%s", o2);
    char job2[600];
    snprintf(job2, sizeof job2, "%s/job_agree2.yaml", tmp);
    write_job(job2, 2, 63);
    assert_int_equal(train(job, o1, 0, NULL, log, sizeof log), 0);
    assert_int_equal(train(job2, o2, 0, NULL, log, sizeof log), 0);
    const char *r1[] = {"train", job,     "--no-progress",  "--resume", "--set",
                        s1,      "--set", "optim.epochs=3", NULL};
    const char *r2[] = {"train", job,     "--no-progress",  "--resume", "--set",
                        s2,      "--set", "optim.epochs=3", NULL};
    code = run_two(r1, r2, log, sizeof log);
    if (code == 0 || !strstr(log, "the ranks resumed from different checkpoints"))
        fail_msg("exit %d:\n%s", code, log);
}

/* The pids whose parent is ppid (from /proc), at most max. */
static int children_of(pid_t ppid, pid_t *out, int max)
{
    DIR *d = opendir("/proc");
    int n = 0;
    for (struct dirent *e; d && n < max && (e = readdir(d));) {
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t len = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[len] = 0;
        const char *rp = strrchr(buf, ')'); /* after the command name: " S ppid" */
        int pp = 0;
        if (rp && sscanf(rp + 1, " %*c %d", &pp) == 1 && pp == ppid)
            out[n++] = (pid_t)atoi(e->d_name);
    }
    if (d)
        closedir(d);
    return n;
}

/*
 * Ctrl-C reaching the ranks of a running job: every rank stops at the same step, rank 0 writes
 * its checkpoint, and all end by themselves with exit 130, none ending the job for the others
 * (an MPI_Abort from a rank that returned first would kill rank 0 while it writes).
 */
static void test_stop_together(void **state)
{
    (void)state;
    char job[600], out[600], set_out[640], logp[600];
    named_job("stop", 200, job, out, set_out);
    snprintf(logp, sizeof logp, "%s/stop.log", tmp);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(logp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0)
            _exit(127);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp(getenv("MPIRUN"), getenv("MPIRUN"), "--allow-run-as-root", "--oversubscribe", "-np",
               "2", kd_distill_path(), "train", job, "--no-progress", "--set", set_out,
               (char *)NULL);
        _exit(127);
    }
    /* once the first epoch has ended (its line in the log), both ranks get SIGINT */
    char *log = NULL;
    for (int t = 0; t < 1200 && !(log && strstr(log, "epoch 1/200:")); t++) {
        free(log);
        usleep(100000);
        log = kd_read_text(logp);
    }
    assert_non_null(log);
    if (!strstr(log, "epoch 1/200:"))
        fail_msg("the run never finished its first epoch:\n%s", log);
    free(log);
    pid_t ranks[4];
    int n = children_of(pid, ranks, 4);
    assert_int_equal(n, 2);
    for (int i = 0; i < n; i++)
        assert_int_equal(kill(ranks[i], SIGINT), 0);
    int code = -1;
    assert_int_equal(kd_wait_exit(pid, &code), 0);
    log = kd_read_text(logp);
    assert_non_null(log);
    if (code != 130 || strstr(log, "MPI_ABORT") || !strstr(log, "stopped (rank 0 of 2)") ||
        !strstr(log, "stopped (rank 1 of 2)"))
        fail_msg("exit %d:\n%s", code, log);
    free(log);
    char ckpt[700];
    snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", out);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(ckpt, &st), KD_OK);
    assert_true(kd_safetensors_count(st) > 4);
    kd_safetensors_close(st);
}

int main(void)
{
    const char *mpirun = getenv("MPIRUN");
    if (!mpirun || !*mpirun || !kd_comm_have_mpi()) {
        printf("skipped: no mpirun, or distill built without MPI\n");
        return 77;
    }
    /* Open MPI refuses root without these, even with --allow-run-as-root on some versions */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_ranks_match_one),
        cmocka_unit_test(test_offline_two_ranks_match_one),
        cmocka_unit_test(test_batch_smaller_than_ranks),
        cmocka_unit_test(test_ranks_must_agree),
        cmocka_unit_test(test_stop_together),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
