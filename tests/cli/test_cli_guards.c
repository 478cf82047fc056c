/*
 * test_cli_guards.c - what `distill train` refuses so that nothing already
 * written is lost or silently changed: a fresh start over an existing run, a
 * resume with another optimizer, and a resume of a checkpoint written for
 * another architecture with the same parameter shapes, a resume or fresh run whose schedule
 * does not fit its length (none of them leaves a new run.out_dir behind). And the OpenMP spin the
 * command sets for itself (GOMP_SPINCOUNT=1000, see engine/train.c) unless the user set one.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_cli_util.h"
#include "kd_fake_data.h"

static char dir[256], data[300], job[300], run_dir[300];
static char out[1 << 15];

static void write_job(const char *act, const char *optim)
{
    char text[2048];
    snprintf(text, sizeof text,
             "run: {name: 'say \"hi\" \\ now', out_dir: %s, seed: 1, threads: 2}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 50, val_size: 50}\n"
             "model: {input: [1, 28, 28], layers: [flatten, {linear: {out: 16}}, %s,"
             " {linear: {out: 10}}]}\n"
             "optim: {name: %s, lr: 0.01,%s epochs: 1}\n",
             run_dir, data, act, optim, strcmp(optim, "sgd") ? "" : " momentum: 0.9,");
    assert_int_equal(kd_write_text(job, text), 0);
}

static int train(const char *extra, int *code)
{
    const char *argv[] = {"train", job, extra, NULL};
    assert_int_equal(kd_run_distill(argv, out, sizeof out, code), 0);
    return *code;
}

static void expect(int code, int want, const char *const *parts)
{
    if (code != want)
        fail_msg("want exit %d, got %d:\n%s", want, code, out);
    for (int i = 0; parts[i]; i++)
        if (!strstr(out, parts[i]))
            fail_msg("output lacks '%s':\n%s", parts[i], out);
}

static int setup(void **state)
{
    (void)state;
    if (kd_cli_workspace("kd_guards_", 300, 50, 9, dir, sizeof dir, data, sizeof data))
        return -1;
    snprintf(job, sizeof job, "%s/job.yaml", dir);
    snprintf(run_dir, sizeof run_dir, "%s/run", dir);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(dir);
    return 0;
}

static void test_guards(void **state)
{
    (void)state;
    int code;
    char ckpt[400], metrics[400], config[400];
    snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", run_dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    snprintf(config, sizeof config, "%s/config.yaml", run_dir);
    write_job("relu", "sgd");
    expect(train(NULL, &code), 0, (const char *const[]){"test:", NULL});
    uint8_t *c0, *m0, *y0;
    size_t lc, lm, ly;
    assert_int_equal(kd_read_file(ckpt, &c0, &lc), 0);
    assert_int_equal(kd_read_file(metrics, &m0, &lm), 0);
    assert_int_equal(kd_read_file(config, &y0, &ly), 0);

    /* a fresh start over the run is refused and touches nothing */
    expect(train(NULL, &code), 1, (const char *const[]){run_dir, "--resume", NULL});
    /* resuming with another optimizer */
    write_job("relu", "adamw");
    expect(train("--resume", &code), 1, (const char *const[]){ckpt, "'sgd'", "optimizer", NULL});
    /* the same refusal into a new out_dir leaves no directory behind (nor its parent) */
    char fresh_parent[400], fresh[420], set_out[440];
    snprintf(fresh_parent, sizeof fresh_parent, "%s/fresh", dir);
    snprintf(fresh, sizeof fresh, "%s/run", fresh_parent);
    snprintf(set_out, sizeof set_out, "run.out_dir=%s", fresh);
    const char *elsewhere[] = {"train", job, "--set", set_out, "--resume", ckpt, NULL};
    assert_int_equal(kd_run_distill(elsewhere, out, sizeof out, &code), 0);
    expect(code, 1, (const char *const[]){ckpt, "'sgd'", "optimizer", NULL});
    assert_false(kd_file_exists(fresh));
    assert_false(kd_file_exists(fresh_parent));
    /* resuming a checkpoint written for another architecture with equal shapes */
    write_job("relu6", "sgd");
    expect(train("--resume", &code), 1, (const char *const[]){ckpt, "another architecture", NULL});
    /* evaluating it with that job is refused too (its accuracy would be another model's) */
    const char *eval_other[] = {"eval", job, "--checkpoint", ckpt, NULL};
    assert_int_equal(kd_run_distill(eval_other, out, sizeof out, &code), 0);
    expect(code, 1, (const char *const[]){ckpt, "another architecture", "evaluate it", NULL});
    /* a schedule the run's length cannot hold: refused before config.yaml or metrics.jsonl are
     * rewritten, and a fresh run refused so leaves no out_dir */
    write_job("relu", "sgd");
    const char *cosine[] = {"train",    job,
                            "--set",    "optim.schedule={type: cosine, warmup_steps: 100}",
                            "--resume", NULL};
    assert_int_equal(kd_run_distill(cosine, out, sizeof out, &code), 0);
    expect(code, 1, (const char *const[]){"warmup_steps (100)", NULL});
    const char *cosine_fresh[] = {
        "train", job,     "--set", "optim.schedule={type: cosine, warmup_steps: 100}",
        "--set", set_out, NULL};
    assert_int_equal(kd_run_distill(cosine_fresh, out, sizeof out, &code), 0);
    expect(code, 1, (const char *const[]){"warmup_steps (100)", NULL});
    assert_false(kd_file_exists(fresh));
    /* another validation split (the same sample counts): refused, its validation samples may
     * have been trained on */
    const char *split[] = {"train", job, "--set", "data.split_seed=7", "--resume", NULL};
    assert_int_equal(kd_run_distill(split, out, sizeof out, &code), 0);
    expect(code, 1, (const char *const[]){ckpt, "another training split", NULL});

    assert_true(kd_file_holds(ckpt, c0, lc));
    assert_true(kd_file_holds(metrics, m0, lm));
    assert_true(kd_file_holds(config, y0, ly));
    free(c0), free(m0), free(y0);

    /* the same job resumed is accepted (and, finished already, trains no further) */
    write_job("relu", "sgd");
    expect(train("--resume", &code), 0,
           (const char *const[]){"resumed from", "nothing left to train", "test:", NULL});
    /* trained on to epoch 2, the checkpoint is past the 1-epoch job's end: refused, untouched */
    const char *more[] = {"train", job, "--set", "optim.epochs=2", "--resume", NULL};
    assert_int_equal(kd_run_distill(more, out, sizeof out, &code), 0);
    expect(code, 0, (const char *const[]){"epoch 2/2", NULL});
    assert_int_equal(kd_read_file(ckpt, &c0, &lc), 0);
    expect(train("--resume", &code), 1,
           (const char *const[]){ckpt,
                                 "is at step 10 (2.00 epochs), past the end of the job's 1 "
                                 "epochs (step 5, optim.epochs)",
                                 NULL});
    assert_true(kd_file_holds(ckpt, c0, lc));
    /* a checkpoint taken mid-epoch: at step 7 with 5 steps per epoch it has completed 1 epoch,
     * as many as the job has, yet it is past the job's end (step 5) and refused as well (the
     * epoch-2 checkpoint's position rewritten in place; a space keeps the header's length) */
    const char from[] = "\"step\":\"10\",\"epoch\":\"2\"", to[] = "\"step\": \"7\",\"epoch\":\"1\"";
    char *at = NULL;
    for (size_t i = 0; i + sizeof from - 1 <= lc && !at; i++)
        if (!memcmp(c0 + i, from, sizeof from - 1))
            at = (char *)c0 + i;
    assert_non_null(at);
    memcpy(at, to, sizeof to - 1);
    assert_int_equal(kd_write_bytes(ckpt, c0, lc), 0);
    expect(train("--resume", &code), 1,
           (const char *const[]){ckpt, "is at step 7 (1.40 epochs), past the end", NULL});
    assert_null(strstr(out, "nothing left"));
    assert_true(kd_file_holds(ckpt, c0, lc));
    /* metadata that does not parse is named, not read as 0 (a model_hash of 0 would skip the
     * architecture check): the hash's 16 hex digits, then the seed's first digit, made letters */
    char damaged[400];
    snprintf(damaged, sizeof damaged, "%s/damaged.safetensors", dir);
    static const char *const keys[] = {"\"model_hash\":\"", "\"seed\":\"", NULL};
    for (int k = 0; keys[k]; k++) {
        uint8_t *d = malloc(lc);
        assert_non_null(d);
        memcpy(d, c0, lc);
        char *hit = NULL;
        const size_t kl = strlen(keys[k]);
        for (size_t i = 0; i + kl + 16 <= lc && !hit; i++)
            if (!memcmp(d + i, keys[k], kl))
                hit = (char *)d + i + kl;
        assert_non_null(hit);
        memset(hit, 'z', k == 0 ? 16 : 1);
        assert_int_equal(kd_write_bytes(damaged, d, lc), 0);
        free(d);
        const char *ev[] = {"eval", job, "--checkpoint", damaged, NULL};
        assert_int_equal(kd_run_distill(ev, out, sizeof out, &code), 0);
        expect(code, 1,
               (const char *const[]){damaged, k == 0 ? "metadata 'model_hash'" : "metadata 'seed'",
                                     NULL});
    }
    free(c0);

    /* without last.safetensors (deleted, or never written on a full disk) the run's other
     * results still guard the directory: neither a fresh start nor --resume overwrites them */
    char best[400], moved[400];
    snprintf(best, sizeof best, "%s/best.safetensors", run_dir);
    snprintf(moved, sizeof moved, "%s/last.moved", dir);
    assert_int_equal(rename(ckpt, moved), 0);
    assert_int_equal(kd_read_file(metrics, &m0, &lm), 0);
    assert_int_equal(kd_read_file(best, &c0, &lc), 0);
    expect(train(NULL, &code), 1,
           (const char *const[]){run_dir, "best.safetensors", "metrics.jsonl", NULL});
    expect(train("--resume", &code), 1,
           (const char *const[]){"no last.safetensors to resume from", "best.safetensors", NULL});
    assert_false(kd_file_exists(ckpt));
    assert_true(kd_file_holds(metrics, m0, lm));
    assert_true(kd_file_holds(best, c0, lc));
    free(c0), free(m0);
    /* an empty metrics file alone (a run stopped before its first checkpoint) starts again */
    kd_rm_rf(run_dir);
    assert_int_equal(mkdir(run_dir, 0755), 0);
    assert_int_equal(kd_write_text(metrics, ""), 0);
    expect(train("--resume", &code), 0, (const char *const[]){"starting from the beginning", NULL});
    /* result.json is valid JSON whatever the run's name holds */
    char result[400];
    snprintf(result, sizeof result, "%s/result.json", run_dir);
    char *r = kd_read_text(result);
    assert_non_null(r);
    if (!strstr(r, "{\"name\": \"say \\\"hi\\\" \\\\ now\", \"model\": "))
        fail_msg("result.json does not escape the run's name:\n%s", r);
    free(r);
}

/* File dir/name holds every one of parts. */
static void expect_in_file(const char *d, const char *name, const char *const *parts)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", d, name);
    char *r = kd_read_text(path);
    assert_non_null(r);
    for (int i = 0; parts[i]; i++)
        if (!strstr(r, parts[i]))
            fail_msg("%s lacks '%s':\n%s", path, parts[i], r);
    free(r);
}

/* What a run reports that has no measure behind it is null, and a resume that reshapes a cosine
 * schedule says so: without a validation set, metrics.jsonl's val_loss / val_acc and
 * result.json's best_val_acc are null; a cosine run resumed with more epochs notes the learning
 * rate it now takes at the step it resumes from. */
static void test_reports(void **state)
{
    (void)state;
    int code;
    char od[400], set_od[420];
    write_job("relu", "sgd");
    snprintf(od, sizeof od, "%s/noval", dir);
    snprintf(set_od, sizeof set_od, "run.out_dir=%s", od);
    const char *noval[] = {"train", job, "--set", set_od, "--set", "data.val_size=0", NULL};
    assert_int_equal(kd_run_distill(noval, out, sizeof out, &code), 0);
    expect(code, 0, (const char *const[]){"test:", NULL});
    expect_in_file(od, "result.json",
                   (const char *const[]){"\"best_val_acc\": null", "\"resumed_at_step\": 0", NULL});
    expect_in_file(od, "metrics.jsonl",
                   (const char *const[]){"\"val_loss\": null, \"val_acc\": null", NULL});

    snprintf(od, sizeof od, "%s/cos", dir);
    snprintf(set_od, sizeof set_od, "run.out_dir=%s", od);
    const char *cos1[] = {"train", job, "--set", set_od, "--set", "optim.schedule={type: cosine}",
                          NULL};
    assert_int_equal(kd_run_distill(cos1, out, sizeof out, &code), 0);
    expect(code, 0, (const char *const[]){"test:", NULL});
    const char *cos2[] = {"train",    job,
                          "--set",    set_od,
                          "--set",    "optim.schedule={type: cosine}",
                          "--set",    "optim.epochs=2",
                          "--resume", NULL};
    assert_int_equal(kd_run_distill(cos2, out, sizeof out, &code), 0);
    expect(code, 0,
           (const char *const[]){"the cosine schedule now spans 10 steps (optim.epochs 2), the "
                                 "checkpoint's run 5: the learning rate at step 5 is",
                                 "epoch 2/2", NULL});
    expect_in_file(od, "result.json", (const char *const[]){"\"resumed_at_step\": 5", NULL});
}

/* The training log names the spin its OpenMP threads run under: 1000 when the environment sets
 * none (the command ran itself again with it), the user's own value otherwise. */
static void test_openmp_spin(void **state)
{
    (void)state;
    int code;
    unsetenv("OMP_WAIT_POLICY");
    unsetenv("GOMP_SPINCOUNT");
    write_job("relu", "sgd");
    kd_rm_rf(run_dir);
    expect(train(NULL, &code), 0, (const char *const[]){"2 threads, OpenMP spin 1000\n", NULL});
    kd_rm_rf(run_dir);
    assert_int_equal(setenv("GOMP_SPINCOUNT", "4000", 1), 0);
    expect(train(NULL, &code), 0, (const char *const[]){"2 threads, OpenMP spin 4000\n", NULL});
    unsetenv("GOMP_SPINCOUNT");
    kd_rm_rf(run_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_guards),
                                       cmocka_unit_test(test_reports),
                                       cmocka_unit_test(test_openmp_spin)};
    return cmocka_run_group_tests(tests, setup, teardown);
}
