/*
 * cli.c - the distill command. The only place a status becomes an exit code:
 * 0 success, 1 a failure (the message names the file and what is wrong),
 * 2 a usage error, 130 stopped by a signal after saving a checkpoint.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "compare.h"
#include "export.h"
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
    "  export CONFIG    quantize a trained checkpoint to INT8/INT4 for the microcontroller\n"
    "                   runtime: a .kdm blob and/or C source, with a report\n"
    "  report SPEC      the side-by-side table: teacher and students, float and INT8/INT4,\n"
    "                   with accuracy, flash, RAM and Cortex-M4 instructions per inference\n"
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
    "usage: distill eval CONFIG --checkpoint FILE [--set KEY=VALUE ...] "
    "[--progress|--no-progress]\n"
    "\n"
    "Evaluate FILE (a safetensors checkpoint of the job's model) on the test split of the job's\n"
    "data set and print the loss and accuracy.\n"
    "\n"
    "options:\n"
    "  --progress, --no-progress\n"
    "                      force the progress line on or off (default: on for a terminal)\n"
    "  --set KEY=VALUE     override a config key (repeatable)\n";

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

static const char *const usage_export =
    "usage: distill export CONFIG --checkpoint FILE --quant int8|int4 --format kdm|c|both\n"
    "                      --out DIR [--calib N] [--samples N] [--rounding double|single]\n"
    "                      [--json FILE] [--int8-layers NAMES] [--softmax] [--no-eval]\n"
    "                      [--set KEY=VALUE ...]\n"
    "\n"
    "Quantize FILE (a checkpoint of the job's model) for mcu_runtime: batchnorms are folded into\n"
    "the conv/linear before them, relu/relu6 fused into its output clamp, activations calibrated\n"
    "on N training samples (int8 per tensor, asymmetric; the input over the exact pixel range),\n"
    "weights quantized per output channel (int4: a clipping search per channel; a job trained\n"
    "with quant: {qat: true} keeps the max-abs scales it learnt; without QAT the biases are\n"
    "corrected for the mean shift of the rounding), the arena planned once.\n"
    "Writes into DIR (created when missing; the files are replaced together or not at all, and\n"
    "outputs of an earlier export that this one does not write are removed):\n"
    "  model.kdm           the blob (--format kdm or both)\n"
    "  model.c, model.h    the blob as a const array in flash, KDM_MODEL_ARENA_SIZE,\n"
    "                      KDM_MODEL_OP_MASK and the input quantization (--format c or both)\n"
    "  samples.bin         the first N test samples: quantized inputs, labels and the host\n"
    "                      runtime's outputs, to compare a device with (--samples N)\n"
    "  report.json         per op: blocks, type, shapes, MACs, bytes, calibration; totals; test\n"
    "                      accuracy of the float and the integer model (also printed)\n"
    "\n"
    "options:\n"
    "  --calib N           calibration samples from the training split (default 1000)\n"
    "  --samples N         write samples.bin with the first N test samples (default 0: none)\n"
    "  --rounding MODE     requantization rounding: double (TFLite's two steps, default) or\n"
    "                      single\n"
    "  --json FILE         write the report to FILE instead of DIR/report.json\n"
    "  --int8-layers NAMES with --quant int4: these conv2d / linear layers (engine names, comma\n"
    "                      separated, e.g. 0 for the first) keep int8 weights\n"
    "  --softmax           end the model with a SOFTMAX op (default: the logits, use argmax)\n"
    "  --no-eval           skip the test-set accuracies\n"
    "  --progress, --no-progress\n"
    "                      force progress on stderr on or off (default: on for a terminal)\n";

static const char *const usage_report =
    "usage: distill report SPEC [--out DIR] [--mcu | --no-mcu] [--source DIR] [--set KEY=VALUE]\n"
    "\n"
    "Evaluate or export every row of SPEC (a YAML list of {label, config, checkpoint[, quant:\n"
    "int8|int4][, int8_layers: NAMES]}, e.g. configs/fashion-mnist/report.yaml) and print one\n"
    "table: parameters, test accuracy, flash, RAM and Cortex-M4 instructions per inference.\n"
    "Float rows are evaluated as `distill eval` does; quantized rows are exported as\n"
    "`distill export` does into DIR/<row>-<quant>/ and their accuracy is the integer model's.\n"
    "With arm-none-eabi-gcc and qemu-system-arm installed, every export is built into\n"
    "Cortex-M4 firmware and run under QEMU (bench/mcu/run.sh): its outputs must equal the host\n"
    "runtime's byte for byte, and flash, RAM and the instruction count come from that firmware.\n"
    "Writes DIR/report.md and DIR/report.json; the earlier report in DIR is replaced only once\n"
    "every row has run (the rows are written under DIR/.new until then).\n"
    "\n"
    "options:\n"
    "  --out DIR        where exports and the report go (default: the spec's out_dir)\n"
    "  --mcu            require the Cortex-M4 measurement (fail without the tools)\n"
    "  --no-mcu         skip it (default: run it when the tools are installed)\n"
    "  --source DIR     the distill source tree holding bench/mcu (default: .)\n"
    "  --set KEY=VALUE  override a key of every row's job config (repeatable)\n"
    "  --no-progress    no progress lines on stderr\n";

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    if (stop_flag) {
        signal(sig, SIG_DFL);
        raise(sig);
    }
    stop_flag = 1;
}

/* the job's ranks while a train or cache command runs (NULL otherwise) */
static kd_comm *g_comm;

/* on_signal for sig, unless the process was started with sig ignored */
static void catch_unless_ignored(int sig)
{
    struct sigaction old;
    if (sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN)
        return;
    signal(sig, on_signal);
}

/* rank of size: the process that failed (named when size > 1) */
static int fail_as(kd_status st, int rank, int size)
{
    /* a stop the user asked for (a signal) is no error */
    const char *what = st == KD_ERR_INTERRUPTED ? "stopped" : "error";
    if (size > 1)
        fprintf(stderr, "distill: %s (rank %d of %d): %s\n", what, rank, size, kd_last_error());
    else
        fprintf(stderr, "distill: %s: %s\n", what, kd_last_error());
    if (st == KD_ERR_INTERRUPTED)
        return 130;
    return 1;
}

static int fail(kd_status st)
{
    return g_comm ? fail_as(st, g_comm->rank, g_comm->size) : fail_as(st, 0, 1);
}

static int usage_error(const char *usage, const char *fmt, const char *arg)
{
    fprintf(stderr, "distill: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n\n%s", usage);
    return 2;
}

static void export_progress(void *ctx, const char *phase, int64_t done, int64_t total)
{
    (void)ctx;
    fprintf(stderr, "\r%-14s %lld / %lld", phase, (long long)done, (long long)total);
    if (done >= total)
        fputc('\n', stderr);
}

/* A whole non-negative decimal integer, or -1. */
static long long parse_count(const char *s)
{
    char *end = NULL;
    errno = 0;
    long long v = s && *s ? strtoll(s, &end, 10) : -1;
    return !s || !*s || *end || errno || v < 0 ? -1 : v;
}

static int cmd_export(int argc, char **argv)
{
    kd_export_opts o;
    kd_export_opts_default(&o);
    o.formats = 0;
    o.bits = 0;
    const char *config = NULL, *checkpoint = NULL;
    int progress = isatty(STDERR_FILENO);
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets)
        return 1;
    int nsets = 0, rc = 0;
    const char *bad = NULL, *badarg = NULL;
    /* the first usage problem: a printf format with one %s, and its argument */
#define BAD(fmt, arg) (bad = (fmt), badarg = (arg))
    for (int i = 2; i < argc && !bad; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage_export, stdout);
            free(sets);
            return 0;
        }
        int takes = !strcmp(a, "--set") || !strcmp(a, "--checkpoint") || !strcmp(a, "--quant") ||
                    !strcmp(a, "--format") || !strcmp(a, "--out") || !strcmp(a, "--calib") ||
                    !strcmp(a, "--samples") || !strcmp(a, "--rounding") || !strcmp(a, "--json") ||
                    !strcmp(a, "--int8-layers");
        if (!strncmp(a, "--set=", 6)) {
            sets[nsets++] = a + 6;
            continue;
        }
        if (takes && !v) {
            BAD("%s needs a value", a);
            break;
        }
        if (takes && strcmp(a, "--set") != 0) /* a second one would silently replace the first */
            for (int j = 2; j < i; j++)
                if (!strcmp(argv[j], a)) {
                    BAD("%s is given twice", a);
                    break;
                }
        if (takes)
            i++;
        if (!strcmp(a, "--set"))
            sets[nsets++] = v;
        else if (!strcmp(a, "--checkpoint"))
            checkpoint = v;
        else if (!strcmp(a, "--out"))
            o.out_dir = v;
        else if (!strcmp(a, "--json"))
            o.json_path = v;
        else if (!strcmp(a, "--int8-layers"))
            o.int8_layers = v;
        else if (!strcmp(a, "--quant")) {
            o.bits = !strcmp(v, "int8") ? 8 : !strcmp(v, "int4") ? 4 : 0;
            if (!o.bits)
                BAD("--quant must be int8 or int4, got '%s'", v);
        } else if (!strcmp(a, "--format")) {
            o.formats = !strcmp(v, "kdm")    ? KD_EXPORT_KDM
                        : !strcmp(v, "c")    ? KD_EXPORT_C
                        : !strcmp(v, "both") ? KD_EXPORT_KDM | KD_EXPORT_C
                                             : 0;
            if (!o.formats)
                BAD("--format must be kdm, c or both, got '%s'", v);
        } else if (!strcmp(a, "--rounding")) {
            if (!strcmp(v, "single") || !strcmp(v, "double"))
                o.single_rounding = !strcmp(v, "single");
            else
                BAD("--rounding must be double or single, got '%s'", v);
        } else if (!strcmp(a, "--calib")) {
            long long n = parse_count(v);
            if (n < 1 || n > 100000000)
                BAD("--calib must be a count in [1, 100000000], got '%s'", v);
            o.calib_samples = n;
        } else if (!strcmp(a, "--samples")) {
            long long n = parse_count(v);
            if (n < 0 || n > 100000000)
                BAD("--samples must be a count in [0, 100000000], got '%s'", v);
            o.n_samples = n;
        } else if (!strcmp(a, "--softmax"))
            o.softmax = 1;
        else if (!strcmp(a, "--no-eval"))
            o.evaluate = 0;
        else if (!strcmp(a, "--progress"))
            progress = 1;
        else if (!strcmp(a, "--no-progress"))
            progress = 0;
        else if (a[0] == '-')
            BAD("unknown option '%s'", a);
        else if (!config)
            config = a;
        else
            BAD("unexpected argument '%s'", a);
    }
    if (!bad && !config)
        BAD("%s", "missing CONFIG");
    else if (!bad && !checkpoint)
        BAD("%s", "export needs --checkpoint FILE");
    else if (!bad && !o.bits)
        BAD("%s", "export needs --quant int8|int4");
    else if (!bad && !o.formats)
        BAD("%s", "export needs --format kdm|c|both");
    else if (!bad && !o.out_dir)
        BAD("%s", "export needs --out DIR");
#undef BAD
    if (bad) {
        free(sets);
        return usage_error(usage_export, bad, badarg);
    }
    if (progress)
        o.progress = export_progress;
    kd_job job;
    kd_status st = kd_job_load(config, sets, &job);
    free(sets);
    if (st != KD_OK)
        return fail(st);
    kd_export_report *r = NULL;
    st = kd_export_run(&job, checkpoint, &o, &r);
    if (st == KD_OK) {
        kd_export_report_print(r, stdout);
        kd_export_report_free(r);
    } else {
        rc = fail(st);
    }
    kd_job_free(&job);
    return rc;
}

static int cmd_report(int argc, char **argv)
{
    kd_report_opts o = {NULL, -1, NULL, NULL, 1};
    const char *spec = NULL;
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets)
        return 1;
    int nsets = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage_report, stdout);
            free(sets);
            return 0;
        }
        int takes = !strcmp(a, "--out") || !strcmp(a, "--source") || !strcmp(a, "--set");
        if (takes && !v) {
            free(sets);
            return usage_error(usage_report, "%s needs a value", a);
        }
        if (!strcmp(a, "--out"))
            o.out_dir = v;
        else if (!strcmp(a, "--source"))
            o.source_dir = v;
        else if (!strcmp(a, "--set"))
            sets[nsets++] = v;
        else if (!strncmp(a, "--set=", 6))
            sets[nsets++] = a + 6;
        else if (!strcmp(a, "--mcu"))
            o.mcu = 1;
        else if (!strcmp(a, "--no-mcu"))
            o.mcu = 0;
        else if (!strcmp(a, "--no-progress"))
            o.progress = 0;
        else if (!strcmp(a, "--progress"))
            o.progress = 1;
        else if (a[0] == '-' || spec) {
            free(sets);
            return usage_error(usage_report, "unexpected argument '%s'", a);
        } else
            spec = a;
        if (takes)
            i++;
    }
    if (!spec) {
        free(sets);
        return usage_error(usage_report, "%s", "report needs SPEC (a YAML file)");
    }
    o.overrides = nsets ? sets : NULL;
    kd_status st = kd_report_run(spec, &o, stdout);
    free(sets);
    return st == KD_OK ? 0 : fail(st);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage_error(usage_main, "%s", "missing command");
    /* a write past a file size limit fails with EFBIG (and is reported, the previous file
     * kept) instead of killing the process half-way through it */
    signal(SIGXFSZ, SIG_IGN);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "train") || !strcmp(cmd, "cache") || !strcmp(cmd, "eval") ||
        !strcmp(cmd, "export") || !strcmp(cmd, "report"))
        kd_openmp_short_spin(argv);
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
        fputs(usage_main, stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        printf("distill %s\n", KD_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "export"))
        return cmd_export(argc, argv);
    if (!strcmp(cmd, "report"))
        return cmd_report(argc, argv);
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
        const char *text = !strcmp(t, "train")         ? usage_train
                           : !strcmp(t, "cache")       ? usage_cache
                           : !strcmp(t, "eval")        ? usage_eval
                           : !strcmp(t, "summary")     ? usage_summary
                           : !strcmp(t, "export")      ? usage_export
                           : !strcmp(t, "report")      ? usage_report
                           : !*t || !strcmp(t, "help") ? usage_main
                                                       : NULL;
        if (!text)
            return usage_error(usage_main, "no help for unknown command '%s'", t);
        fputs(text, stdout);
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
            if (i + 1 >= argc || checkpoint) {
                free(sets);
                return usage_error(usage, checkpoint ? "%s is given twice" : "%s needs a file",
                                   "--checkpoint");
            }
            checkpoint = argv[++i];
        } else if (!strcmp(a, "--resume") && usage == usage_train) {
            if (resume) {
                free(sets);
                return usage_error(usage, "%s is given twice", "--resume");
            }
            /* the checkpoint is optional: a following word is taken as it when CONFIG was
             * already given or the word names a .safetensors file */
            resume = "auto";
            if (i + 1 < argc && argv[i + 1][0] != '-') {
                const char *nx = argv[i + 1];
                size_t len = strlen(nx);
                if (config || (len > 12 && !strcmp(nx + len - 12, ".safetensors")))
                    resume = argv[++i];
            }
        } else if (!strcmp(a, "--progress") && usage != usage_summary) {
            progress = 1;
        } else if (!strcmp(a, "--no-progress") && usage != usage_summary) {
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
    if (usage == usage_train || usage == usage_cache) {
        /* one process per device: under mpirun/srun the ranks share the work */
        if ((st = kd_comm_open(job.comm, &g_comm)) != KD_OK) {
            rc = fail(st);
            kd_job_free(&job);
            return rc;
        }
        if (g_comm->size > 1 && !job.threads_given) {
            /* the host's cores are shared among its ranks */
            int per = job.threads / (g_comm->size < job.threads ? g_comm->size : job.threads);
            job.threads = per > 0 ? per : 1;
        }
        /* a signal the process was started with ignored stays ignored: nohup's SIGHUP, and
         * SIGINT for a job a shell started in the background */
        catch_unless_ignored(SIGINT);
        catch_unless_ignored(SIGTERM);
        catch_unless_ignored(SIGHUP); /* the terminal closed: stop at a checkpoint too */
        /* a reader of the log that went away (`distill train ... | head`) does not end the run */
        signal(SIGPIPE, SIG_IGN);
        int stopped_together = 0;
        kd_train_opts opts = {.resume = resume,
                              .progress = progress && g_comm->rank == 0,
                              .stop = &stop_flag,
                              .comm = g_comm,
                              .stopped_together = &stopped_together};
        if (usage == usage_cache)
            opts.resume = NULL;
        st = usage == usage_train ? kd_train(&job, &opts) : kd_cache_build(&job, &opts);
        rc = st == KD_OK ? 0 : fail(st);
        if (rc != 0 && g_comm->size > 1 && !stopped_together) {
            /* the other ranks may be waiting in a collective: end the job (a stop every rank
             * took together ends each rank by itself, with its exit code) */
            fflush(stderr);
            kd_comm_abort(g_comm, rc);
        }
        const int rank = g_comm->rank, size = g_comm->size;
        kd_status cs = kd_comm_close(g_comm); /* MPI_Finalize */
        g_comm = NULL;
        if (cs != KD_OK) {
            int rc2 = fail_as(cs, rank, size);
            rc = rc ? rc : rc2;
        }
    } else if (usage == usage_eval) {
        kd_eval_result r;
        st = kd_eval(&job, checkpoint, progress, &r);
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
