/*
 * cli.c - the distill command. The only place a status becomes an exit code:
 * 0 success, 1 a failure (the message names the file and what is wrong),
 * 2 a usage error, 130 stopped by a signal after saving a checkpoint.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd.h"
#include "teacher.h"

#define KD_VERSION "0.1.0"

static const char *const usage_main =
    "usage: distill <command> [options]\n"
    "\n"
    "Knowledge distillation for tiny students: train, evaluate and inspect models from YAML job\n"
    "files.\n"
    "\n"
    "commands:\n"
    "  train CONFIG     train the job's model (distill.mode none: supervised; offline: from a\n"
    "                   teacher's cache or live teacher)\n"
    "  cache CONFIG     run the job's teacher over the training split and write its logits\n"
    "                   to teacher.cache (HDF5); an interrupted cache resumes\n"
    "  eval CONFIG      evaluate a checkpoint of the job's model on the test split\n"
    "  summary CONFIG   print the job's model: layers, output shapes, parameters\n"
    "  help [COMMAND]   show help for a command\n"
    "\n"
    "options for every command:\n"
    "  --set KEY=VALUE  override a config key, e.g. --set optim.lr=0.01 (repeatable)\n"
    "  -h, --help       show help\n"
    "  --version        print the version\n";

static const char *const usage_train =
    "usage: distill train CONFIG [--set KEY=VALUE ...] [--resume [CHECKPOINT]]\n"
    "\n"
    "Train the model of the job file CONFIG. Writes into run.out_dir (default runs/<name>):\n"
    "  config.yaml         the resolved config that ran\n"
    "  last.safetensors    checkpoint after every epoch (and every run.checkpoint_every steps)\n"
    "  best.safetensors    the checkpoint with the best validation accuracy\n"
    "  metrics.jsonl       one JSON line per epoch\n"
    "  result.json         final test accuracy and timing\n"
    "\n"
    "options:\n"
    "  --resume [FILE]     continue from FILE (default <out_dir>/last.safetensors); the result\n"
    "                      is bit-identical to a run that never stopped (CPU)\n"
    "  --progress, --no-progress\n"
    "                      force the progress bar on or off (default: on for a terminal)\n"
    "  --set KEY=VALUE     override a config key (repeatable)\n"
    "\n"
    "Ctrl-C saves a checkpoint and stops; run again with --resume to continue.\n";

static const char *const usage_eval =
    "usage: distill eval CONFIG --checkpoint FILE [--set KEY=VALUE ...]\n"
    "\n"
    "Evaluate FILE (a safetensors checkpoint of the job's model) on the test split of the job's\n"
    "data set and print the loss and accuracy.\n";

static const char *const usage_cache =
    "usage: distill cache CONFIG [--set KEY=VALUE ...] [--progress|--no-progress]\n"
    "\n"
    "Run the teacher (teacher.model with teacher.checkpoint) over the training split, with\n"
    "teacher.views augmented views per sample, and write raw logits (teacher.topk > 0: the top\n"
    "k and the row's log-sum-exp), the augmentation of each view and the labels to the HDF5\n"
    "file teacher.cache (schema: data/README.md). Running it again on a partial file resumes\n"
    "it; a file written for another teacher or data set is refused.\n";

static const char *const usage_summary =
    "usage: distill summary CONFIG [--set KEY=VALUE ...]\n"
    "\n"
    "Build the job's model and print each layer with its parameter name, output shape and\n"
    "parameter count.\n";

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    if (stop_flag) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
    stop_flag = 1;
}

static int fail(kd_status st)
{
    fprintf(stderr, "distill: error: %s\n", kd_last_error());
    if (st == KD_ERR_INTERRUPTED)
        return 130;
    return 1;
}

static int usage_error(const char *usage, const char *fmt, const char *arg)
{
    fprintf(stderr, "distill: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n\n%s", usage);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage_error(usage_main, "%s", "missing command");
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
        fputs(usage_main, stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        printf("distill %s\n", KD_VERSION);
        return 0;
    }
    const char *usage = NULL;
    if (!strcmp(cmd, "train"))
        usage = usage_train;
    else if (!strcmp(cmd, "eval"))
        usage = usage_eval;
    else if (!strcmp(cmd, "summary"))
        usage = usage_summary;
    else if (!strcmp(cmd, "cache"))
        usage = usage_cache;
    else if (!strcmp(cmd, "help")) {
        const char *t = argc > 2 ? argv[2] : "";
        fputs(!strcmp(t, "train")     ? usage_train
              : !strcmp(t, "cache")   ? usage_cache
              : !strcmp(t, "eval")    ? usage_eval
              : !strcmp(t, "summary") ? usage_summary
                                      : usage_main,
              stdout);
        return 0;
    } else
        return usage_error(usage_main, "unknown command '%s'", cmd);

    const char *config = NULL, *checkpoint = NULL, *resume = NULL;
    int progress = isatty(STDERR_FILENO);
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets)
        return 1;
    int nsets = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            free(sets);
            return 0;
        } else if (!strcmp(a, "--set") || !strncmp(a, "--set=", 6)) {
            const char *v = a[5] == '=' ? a + 6 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v) {
                free(sets);
                return usage_error(usage, "%s needs KEY=VALUE", "--set");
            }
            sets[nsets++] = v;
        } else if (!strcmp(a, "--checkpoint") && usage == usage_eval) {
            if (i + 1 >= argc) {
                free(sets);
                return usage_error(usage, "%s needs a file", "--checkpoint");
            }
            checkpoint = argv[++i];
        } else if (!strcmp(a, "--resume") && usage == usage_train) {
            /* the checkpoint is optional: a following word is taken as it when CONFIG was
             * already given or the word names a .safetensors file */
            resume = "auto";
            if (i + 1 < argc && argv[i + 1][0] != '-') {
                const char *nx = argv[i + 1];
                size_t len = strlen(nx);
                if (config || (len > 12 && !strcmp(nx + len - 12, ".safetensors")))
                    resume = argv[++i];
            }
        } else if (!strcmp(a, "--progress") && (usage == usage_train || usage == usage_cache)) {
            progress = 1;
        } else if (!strcmp(a, "--no-progress") && (usage == usage_train || usage == usage_cache)) {
            progress = 0;
        } else if (a[0] == '-') {
            free(sets);
            return usage_error(usage, "unknown option '%s'", a);
        } else if (!config) {
            config = a;
        } else {
            free(sets);
            return usage_error(usage, "unexpected argument '%s'", a);
        }
    }
    if (!config) {
        free(sets);
        return usage_error(usage, "%s", "missing CONFIG");
    }
    if (usage == usage_eval && !checkpoint) {
        free(sets);
        return usage_error(usage, "%s", "eval needs --checkpoint FILE");
    }
    kd_job job;
    kd_status st = kd_job_load(config, sets, &job);
    free(sets);
    if (st != KD_OK)
        return fail(st);
    int rc = 0;
    if (usage == usage_train) {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        kd_train_opts opts = {.resume = resume, .progress = progress, .stop = &stop_flag};
        st = kd_train(&job, &opts);
        rc = st == KD_OK ? 0 : fail(st);
    } else if (usage == usage_cache) {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
        kd_train_opts opts = {.progress = progress, .stop = &stop_flag};
        st = kd_cache_build(&job, &opts);
        rc = st == KD_OK ? 0 : fail(st);
    } else if (usage == usage_eval) {
        kd_eval_result r;
        st = kd_eval(&job, checkpoint, &r);
        if (st == KD_OK)
            printf("%s: test loss %.4f accuracy %.2f%% (%lld samples)\n", checkpoint, r.loss,
                   100 * r.acc, (long long)r.n);
        rc = st == KD_OK ? 0 : fail(st);
    } else {
        kd_model *m = NULL;
        st = kd_model_build(job.model_input, job.model_layers, kd_backend_cpu(), 1, job.seed, &m);
        if (st == KD_OK) {
            printf("model %s\n", job.model_desc);
            kd_model_summary(m, stdout);
            kd_model_free(m);
        }
        rc = st == KD_OK ? 0 : fail(st);
    }
    kd_job_free(&job);
    return rc;
}
