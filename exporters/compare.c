/*
 * compare.c - `distill report` (see compare.h): evaluate or export every row of a report spec,
 * measure the exports on the Cortex-M4 under QEMU when the tools exist, print one table.
 *
 * The Cortex-M measurement is bench/mcu/run.sh, run as a child process with its output in
 * <row dir>/mcu.log and its figures in <row dir>/mcu.json (read back with cJSON); a firmware
 * whose outputs differ from the host runtime's makes run.sh fail, and so the report.
 */
#include "compare.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "export.h"
#include "export_internal.h"
#include "fileio.h"
#include "job.h"
#include "model.h"
#include "train.h"

#define MAX_ROWS 32

typedef struct {
    char label[96];
    char config[512], checkpoint[512];
    int bits;              /* 0 float */
    char int8_layers[256]; /* int4 exports: layers kept at 8 bits ("" none) */
    /* results */
    double acc;
    int64_t params;
    int64_t flash, ram, instr; /* -1 unknown */
    int mcu_measured;
    int too_big;      /* the firmware does not fit the Cortex-M4 board: host figures only */
    char dir[1024];   /* out_dir/NN-intX, where the row ends up */
    char stage[1024]; /* out_dir/.new/NN-intX, where it is written (kd_report_run) */
    char old[1024];   /* out_dir/.old/NN-intX, an earlier report's row while the rows swap */
    int swapped, kept_old;
} row_t;

static kd_status spec_str(const kd_node *row, const char *key, int required, char *buf, size_t len,
                          const char *spec)
{
    const char *s = NULL;
    KD_TRY(kd_node_get_str(row, key, required, &s));
    if (!s)
        return KD_OK;
    if (strlen(s) >= len) {
        char pos[160];
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s is longer than %zu characters",
                       kd_node_where(kd_node_child(row, key), pos, sizeof pos), key, len - 1);
    }
    snprintf(buf, len, "%s", s);
    (void)spec;
    return KD_OK;
}

static kd_status parse_spec(const char *path, char *out_dir, size_t out_len, row_t *rows,
                            int *nrows)
{
    kd_node *doc = NULL;
    kd_status st = kd_yaml_load_file(path, &doc);
    if (st != KD_OK)
        return st;
    static const char *const keys[] = {"out_dir", "rows", NULL};
    static const char *const row_keys[] = {"label", "config",      "checkpoint",
                                           "quant", "int8_layers", NULL};
    char pos[160];
    const kd_node *seq = NULL;
    *nrows = 0;
    if ((st = kd_node_check_keys(doc, keys, "the report spec")) != KD_OK ||
        (st = spec_str(doc, "out_dir", 0, out_dir, out_len, path)) != KD_OK)
        goto done;
    seq = kd_node_child(doc, "rows");
    if (!seq || seq->kind != KD_NODE_SEQ || seq->len == 0) {
        st = KD_FAIL(KD_ERR_CONFIG,
                     "%s: 'rows' must be a non-empty list of {label, config, "
                     "checkpoint[, quant]}",
                     seq ? kd_node_where(seq, pos, sizeof pos) : path);
        goto done;
    }
    if (seq->len > MAX_ROWS) {
        st = KD_FAIL(KD_ERR_CONFIG, "%s: at most %d rows", kd_node_where(seq, pos, sizeof pos),
                     MAX_ROWS);
        goto done;
    }
    for (size_t i = 0; i < seq->len; i++) {
        const kd_node *r = seq->items[i];
        row_t *w = &rows[i];
        memset(w, 0, sizeof *w);
        w->flash = w->ram = w->instr = -1;
        char quant[16] = "";
        if (r->kind != KD_NODE_MAP) {
            st = KD_FAIL(KD_ERR_CONFIG, "%s: a row is a map {label, config, checkpoint[, quant]}",
                         kd_node_where(r, pos, sizeof pos));
            goto done;
        }
        if ((st = kd_node_check_keys(r, row_keys, "a report row")) != KD_OK ||
            (st = spec_str(r, "label", 1, w->label, sizeof w->label, path)) != KD_OK ||
            (st = spec_str(r, "config", 1, w->config, sizeof w->config, path)) != KD_OK ||
            (st = spec_str(r, "checkpoint", 1, w->checkpoint, sizeof w->checkpoint, path)) !=
                KD_OK ||
            (st = spec_str(r, "quant", 0, quant, sizeof quant, path)) != KD_OK ||
            (st = spec_str(r, "int8_layers", 0, w->int8_layers, sizeof w->int8_layers, path)) !=
                KD_OK)
            goto done;
        if (!quant[0] || !strcmp(quant, "fp32"))
            w->bits = 0;
        else if (!strcmp(quant, "int8"))
            w->bits = 8;
        else if (!strcmp(quant, "int4"))
            w->bits = 4;
        else {
            st = KD_FAIL(KD_ERR_CONFIG, "%s: quant must be fp32, int8 or int4, got '%s'",
                         kd_node_where(kd_node_child(r, "quant"), pos, sizeof pos), quant);
            goto done;
        }
        if (w->bits != 4 && kd_node_child(r, "int8_layers")) { /* it would be ignored */
            st = KD_FAIL(KD_ERR_CONFIG,
                         "%s: int8_layers keeps layers of an int4 export at 8 bits; this row is "
                         "%s",
                         kd_node_where(kd_node_child(r, "int8_layers"), pos, sizeof pos),
                         w->bits ? "int8" : "fp32");
            goto done;
        }
        (*nrows)++;
    }
done:
    kd_node_free(doc);
    return st;
}

static int have_tool(const char *name)
{
    const char *path = getenv("PATH");
    if (!path)
        return 0;
    char buf[4096];
    const char *p = path;
    while (*p) {
        const char *e = strchr(p, ':');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        snprintf(buf, sizeof buf, "%.*s/%s", (int)n, p, name);
        if (access(buf, X_OK) == 0)
            return 1;
        if (!e)
            break;
        p = e + 1;
    }
    return 0;
}

/* bash <src>/bench/mcu/run.sh bench <dir>, output to <dir>/mcu.log, figures to <dir>/mcu.json */
static kd_status run_mcu(const char *src, const char *dir, const char *build_root)
{
    char script[1200], log[1100], json[1100];
    snprintf(script, sizeof script, "%s/bench/mcu/run.sh", src);
    snprintf(log, sizeof log, "%s/mcu.log", dir);
    snprintf(json, sizeof json, "%s/mcu.json", dir);
    if (access(script, R_OK) != 0)
        return KD_FAIL(KD_ERR_NOT_FOUND,
                       "'%s' not found: run distill report from the source tree or pass --source",
                       script);
    pid_t pid = fork();
    if (pid < 0)
        return KD_FAIL(KD_ERR_IO, "fork failed: %s", strerror(errno));
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        setenv("KDM_MCU_JSON", json, 1);
        setenv("KDM_MCU_BUILD", build_root, 1);
        execlp("bash", "bash", script, "bench", dir, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return KD_FAIL(KD_ERR_IO, "waitpid failed: %s", strerror(errno));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3) /* run.sh: too big for the board */
        return KD_FAIL(KD_ERR_UNSUPPORTED,
                       "'%s' does not fit the Cortex-M4 board's memory (QEMU mps2-an386): see "
                       "'%s'",
                       dir, log);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return KD_FAIL(KD_ERR_INTERNAL,
                       "the Cortex-M4 run of '%s' failed (exit %d): see '%s' (a firmware whose "
                       "outputs differ from the host runtime's fails it)",
                       dir, WIFEXITED(status) ? WEXITSTATUS(status) : -1, log);
    return KD_OK;
}

static int64_t json_int(const cJSON *o, const char *a, const char *b)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, a);
    if (b)
        x = cJSON_GetObjectItemCaseSensitive(x, b);
    return cJSON_IsNumber(x) ? (int64_t)x->valuedouble : -1;
}

static kd_status read_mcu(row_t *w)
{
    char json[1100];
    snprintf(json, sizeof json, "%s/mcu.json", w->stage);
    void *text = NULL;
    size_t len = 0;
    KD_TRY(kd_file_read_all(json, &text, &len));
    cJSON *j = cJSON_ParseWithLength((const char *)text, len);
    free(text);
    if (!j)
        return KD_FAIL(KD_ERR_FORMAT, "'%s' is not JSON", json);
    const cJSON *sizes = cJSON_GetObjectItemCaseSensitive(j, "sizes");
    w->instr = json_int(j, "instr_per_inference", "m4_dsp");
    w->flash = json_int(sizes, "m4-dsp", "total_flash");
    w->ram = json_int(j, "ram", "arena_plus_stack");
    cJSON_Delete(j);
    if (w->instr < 0 || w->flash < 0 || w->ram < 0)
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' lacks instr_per_inference.m4_dsp, "
                       "sizes.m4-dsp.total_flash or ram.arena_plus_stack",
                       json);
    w->mcu_measured = 1;
    return KD_OK;
}

static kd_status run_row(row_t *w, int idx, const char *out_dir, const kd_report_opts *o, int mcu)
{
    kd_job job;
    kd_status st = kd_job_load(w->config, o->overrides, &job);
    if (st != KD_OK)
        return kd_fail_context(st, "report row %d (%s): ", idx + 1, w->label);
    kd_model *m = NULL;
    if ((st = kd_model_build(job.model_input, job.model_layers, kd_backend_cpu(), 1, 0, &m)) !=
        KD_OK)
        goto done;
    w->params = (int64_t)kd_model_num_params(m);
    if (!w->bits) {
        kd_eval_result r;
        if ((st = kd_eval(&job, w->checkpoint, 0, &r)) != KD_OK)
            goto done;
        w->acc = r.acc;
        w->flash = 4 * w->params;
        goto done;
    }
    kd_export_opts eo;
    kd_export_opts_default(&eo);
    eo.bits = w->bits;
    eo.formats = KD_EXPORT_KDM | KD_EXPORT_C;
    eo.out_dir = w->stage;
    eo.n_samples = 16;
    eo.int8_layers = w->int8_layers[0] ? w->int8_layers : NULL;
    kd_export_report *rep = NULL;
    if ((st = kd_export_run(&job, w->checkpoint, &eo, &rep)) != KD_OK)
        goto done;
    w->acc = kd_export_report_int_acc(rep);
    w->flash = (int64_t)rep->blob_len;
    w->ram = rep->g->arena_size;
    kd_export_report_free(rep);
    if (mcu) {
        char build_root[1100];
        snprintf(build_root, sizeof build_root, "%s/mcu-build", out_dir);
        st = run_mcu(o->source_dir ? o->source_dir : ".", w->stage, build_root);
        if (st == KD_ERR_UNSUPPORTED) { /* the row stays, with its blob and arena and a mark */
            fprintf(stderr,
                    "report: row %d (%s): the firmware does not fit the Cortex-M4 board's memory "
                    "(QEMU mps2-an386): see '%s/mcu.log' once the report is written\n",
                    idx + 1, w->label, w->dir);
            w->too_big = 1;
            st = KD_OK;
        } else if (st != KD_OK || (st = read_mcu(w)) != KD_OK) {
            goto done;
        }
    }
done:
    kd_model_free(m);
    kd_job_free(&job);
    if (st != KD_OK)
        kd_fail_context(st, "report row %d (%s): ", idx + 1, w->label);
    return st;
}

static void fmt_bytes(int64_t b, char *buf, size_t len)
{
    if (b < 0)
        snprintf(buf, len, "-");
    else if (b >= 1 << 20)
        snprintf(buf, len, "%.2f MB", b / 1048576.0);
    else
        snprintf(buf, len, "%.1f KB", b / 1024.0);
}

static void print_table(FILE *f, const row_t *rows, int n, int md, int mcu)
{
    /* the terminal table's first column as wide as its longest label (34 at least) */
    int width = 34;
    for (int i = 0; i < n; i++)
        if ((int)strlen(rows[i].label) > width)
            width = (int)strlen(rows[i].label);
    const char *md_row = "| %s | %s | %s | %s | %s | %s |\n",
               *tty_row = "%-*s %8s %9s %10s %10s %14s\n";
    if (md)
        fprintf(f, md_row, "model", "params", "accuracy", "flash", "RAM", "M4 instr/inf");
    else
        fprintf(f, tty_row, width, "model", "params", "accuracy", "flash", "RAM", "M4 instr/inf");
    if (md)
        fprintf(f, "|---|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const row_t *w = &rows[i];
        char p[32], a[32], fl[32], ram[32], ins[32];
        snprintf(p, sizeof p, "%lld", (long long)w->params);
        snprintf(a, sizeof a, "%.2f%%", 100 * w->acc);
        fmt_bytes(w->flash, fl, sizeof fl);
        fmt_bytes(w->ram, ram, sizeof ram);
        if (w->instr >= 0)
            snprintf(ins, sizeof ins, "%lld", (long long)w->instr);
        else
            snprintf(ins, sizeof ins, "-");
        if (!w->bits && !md)
            snprintf(fl + strlen(fl), sizeof fl - strlen(fl), "*");
        if (w->too_big)
            snprintf(fl + strlen(fl), sizeof fl - strlen(fl), " (too big)");
        char label[2 * sizeof w->label];
        size_t k = 0;
        for (const char *c = w->label; *c && k + 2 < sizeof label; c++) {
            if (md && *c == '|') /* a cell of a markdown table: an escaped bar */
                label[k++] = '\\';
            label[k++] = *c;
        }
        label[k] = 0;
        if (md)
            fprintf(f, md_row, label, p, a, fl, ram, ins);
        else
            fprintf(f, tty_row, width, label, p, a, fl, ram, ins);
    }
    fprintf(f,
            "%sfloat rows: flash = float32 weights (4 bytes a parameter), not deployable "
            "as such.\n",
            md ? "\n" : "* ");
    fprintf(f, "%s\n",
            mcu ? "Quantized rows: flash and RAM of the Cortex-M4 firmware (runtime code + model "
                  "+ startup; arena + measured stack), instructions of one inference on QEMU "
                  "mps2-an386 with -icount shift=0; accuracy of the integer model on the "
                  "whole test set (host build of the same runtime)."
                : "Quantized rows: flash = the .kdm blob, RAM = the planned arena (the Cortex-M "
                  "tools were not used); accuracy of the integer model on the test images.");
    for (int i = 0; i < n; i++)
        if (rows[i].too_big) {
            fprintf(f, "(too big): the firmware does not fit the Cortex-M4 board's memory; flash = "
                       "the .kdm blob, RAM = the planned arena, no instruction count.\n");
            break;
        }
}

/* report.md and report.json written beside the earlier ones as <name>.new (kd_report_run renames
 * them in place once the rows are) */
static kd_status write_outputs(const char *out_dir, const row_t *rows, int n, int mcu)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    print_table(f, rows, n, 1, mcu);
    fclose(f);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    cJSON *j = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(j, "rows");
    for (int i = 0; i < n; i++) {
        const row_t *w = &rows[i];
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "label", w->label);
        cJSON_AddStringToObject(r, "config", w->config);
        cJSON_AddStringToObject(r, "checkpoint", w->checkpoint);
        cJSON_AddStringToObject(r, "quant", w->bits == 8 ? "int8" : w->bits == 4 ? "int4" : "fp32");
        cJSON_AddNumberToObject(r, "params", (double)w->params);
        cJSON_AddNumberToObject(r, "test_acc", w->acc);
        cJSON_AddNumberToObject(r, "flash_bytes", (double)w->flash);
        if (w->ram >= 0)
            cJSON_AddNumberToObject(r, "ram_bytes", (double)w->ram);
        if (w->instr >= 0)
            cJSON_AddNumberToObject(r, "m4_instructions_per_inference", (double)w->instr);
        cJSON_AddBoolToObject(r, "measured_on_cortex_m4", w->mcu_measured);
        if (w->too_big)
            cJSON_AddBoolToObject(r, "fits_cortex_m4", 0);
        if (w->bits)
            cJSON_AddStringToObject(r, "export_dir", w->dir);
        cJSON_AddItemToArray(arr, r);
    }
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text) {
        free(buf);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    }
    char md[1100], js[1100];
    snprintf(md, sizeof md, "%s/report.md.new", out_dir);
    snprintf(js, sizeof js, "%s/report.json.new", out_dir);
    kd_status st = kd_file_write_bytes(md, buf, len);
    if (st == KD_OK && (st = kd_file_write_bytes(js, text, strlen(text))) != KD_OK)
        remove(md);
    free(buf);
    free(text);
    return st;
}

/* What a report row's directory holds: an export's files and the Cortex-M log and figures. */
static const char *const row_files[] = {"model.kdm",   "model.c", "model.h", "samples.bin",
                                        "report.json", "mcu.log", "mcu.json"};

/* name is one of row_files. */
static int is_row_file(const char *name)
{
    for (size_t k = 0; k < sizeof row_files / sizeof row_files[0]; k++)
        if (!strcmp(name, row_files[k]))
            return 1;
    return 0;
}

/* The row directory under out_dir/.new, which the report owns: every file in it removed (an
 * interrupted export's temporary files too), then the directory. 0 when it is gone. */
static int remove_stage_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? 0 : -1;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char f[1400];
        snprintf(f, sizeof f, "%s/%s", dir, e->d_name);
        unlink(f);
    }
    closedir(d);
    return rmdir(dir) == 0 ? 0 : -1;
}

/* An earlier row directory moved aside to old (out_dir/.old) while its replacement went to dir:
 * the files a report writes are removed, any other file (the user's) moves into dir, and old is
 * removed. 0 when old is gone; -1 when something stays in it (a name dir already has). */
static int merge_back(const char *old, const char *dir)
{
    DIR *d = opendir(old);
    if (!d)
        return errno == ENOENT ? 0 : -1;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char f[1400], t[1400];
        struct stat sb;
        snprintf(f, sizeof f, "%s/%s", old, e->d_name);
        snprintf(t, sizeof t, "%s/%s", dir, e->d_name);
        if (is_row_file(e->d_name))
            unlink(f);
        else if (lstat(t, &sb) != 0 && errno == ENOENT)
            rename(f, t);
    }
    closedir(d);
    return rmdir(old) == 0 ? 0 : -1;
}

/* Removes dir when it holds nothing but row_files: 0 when it is gone (or never was), -1 when it
 * holds another file or a removal failed. */
static int remove_row_dir(const char *dir)
{
    const int nnames = (int)(sizeof row_files / sizeof row_files[0]);
    struct stat sb;
    if (lstat(dir, &sb) != 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(sb.st_mode))
        return -1;
    DIR *d = opendir(dir);
    int only_ours = d != NULL;
    for (struct dirent *e; d && only_ours && (e = readdir(d));)
        only_ours = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || is_row_file(e->d_name);
    if (d)
        closedir(d);
    for (int k = 0; k < nnames && only_ours; k++) {
        char f[1200];
        snprintf(f, sizeof f, "%s/%s", dir, row_files[k]);
        if (remove(f) != 0 && errno != ENOENT)
            only_ours = 0;
    }
    return only_ours && rmdir(dir) == 0 ? 0 : -1;
}

/* Row directories of an earlier report in out_dir ("NN-int4", "NN-int8") that this one did not
 * write: removed once the new report is in place, unless they hold a file a report row does not
 * write (named in a note). */
static void remove_stale_rows(const char *out_dir, const row_t *rows, int n, FILE *out)
{
    for (int i = 1; i <= MAX_ROWS; i++)
        for (int bits = 4; bits <= 8; bits += 4) {
            char dir[1100];
            snprintf(dir, sizeof dir, "%s/%02d-int%d", out_dir, i, bits);
            int current = 0;
            for (int r = 0; r < n; r++)
                current |= rows[r].bits && !strcmp(rows[r].dir, dir);
            if (!current && remove_row_dir(dir) != 0)
                fprintf(out,
                        "note: %s is from an earlier report and was left in place (it holds "
                        "other files)\n",
                        dir);
        }
}

/* Every occurrence of from in the file at path replaced by to (a missing file is left alone). */
static kd_status replace_in_file(const char *path, const char *from, const char *to)
{
    void *text = NULL;
    size_t len = 0, nf = strlen(from), nt = strlen(to);
    kd_status st = kd_file_read_all(path, &text, &len);
    if (st == KD_ERR_NOT_FOUND)
        return KD_OK;
    KD_TRY(st);
    const char *t = text;
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    if (!f) {
        free(text);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < len;) {
        if (nf && len - i >= nf && !memcmp(t + i, from, nf)) {
            fwrite(to, 1, nt, f);
            i += nf;
        } else {
            fputc(t[i++], f);
        }
    }
    fclose(f);
    free(text);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    st = kd_file_write_bytes(path, buf, blen);
    free(buf);
    return st;
}

/* text as a JSON string's contents (escaped, without the quotes) into buf; 0 when out of memory */
static int json_inner(const char *text, char *buf, size_t len)
{
    cJSON *j = cJSON_CreateString(text);
    char *e = j ? cJSON_PrintUnformatted(j) : NULL;
    if (e)
        snprintf(buf, len, "%.*s", (int)strlen(e) - 2, e + 1);
    cJSON_free(e);
    cJSON_Delete(j);
    return e != NULL;
}

/*
 * The files of a row written under out_dir/.new name it there: they are made to name the place
 * it moves to (the export's report.json, the Cortex-M run's mcu.json and mcu.log), both as
 * written and in the absolute form bench/mcu/run.sh records (its realpath, with the realpath of
 * out_dir for the destination); JSON-escaped in the JSON files.
 */
static kd_status rename_in_row(const row_t *w, const char *out_dir)
{
    static const char *const names[] = {"report.json", "mcu.json", "mcu.log"};
    char stage_abs[4096], out_abs[4096], dir_abs[4200];
    const int have_abs = realpath(w->stage, stage_abs) && realpath(out_dir, out_abs);
    if (have_abs)
        snprintf(dir_abs, sizeof dir_abs, "%s/%s", out_abs, strrchr(w->dir, '/') + 1);
    for (int k = 0; k < 3; k++)
        for (int form = 0; form < 2; form++) {
            const char *from = form ? stage_abs : w->stage, *to = form ? dir_abs : w->dir;
            if (form && (!have_abs || !strcmp(stage_abs, w->stage)))
                continue;
            char path[1100], f[8400], t[8400];
            snprintf(path, sizeof path, "%s/%s", w->stage, names[k]);
            snprintf(f, sizeof f, "%s", from);
            snprintf(t, sizeof t, "%s", to);
            if (k < 2 && (!json_inner(from, f, sizeof f) || !json_inner(to, t, sizeof t)))
                return KD_FAIL(KD_ERR_NOMEM, "out of memory");
            KD_TRY(replace_in_file(path, f, t));
        }
    return KD_OK;
}

/* The swap of the rows' directories undone, last first: each new one back to its stage, the
 * earlier one back in place. */
static void unswap_rows(row_t *rows, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        row_t *w = &rows[i];
        if (w->swapped && rename(w->dir, w->stage) == 0)
            w->swapped = 0;
        if (w->kept_old && !w->swapped && rename(w->old, w->dir) == 0)
            w->kept_old = 0;
    }
}

/*
 * The new report put in place of the earlier one. Every row was written under out_dir/.new, so a
 * report that fails part way leaves the earlier rows and report.md as they were. Here each earlier
 * row directory moves to out_dir/.old and the new one into its place (renames: undone if one
 * fails), then report.md and report.json are renamed over the earlier ones, and only then is
 * out_dir/.old removed.
 */
static kd_status commit_rows(const char *out_dir, row_t *rows, int n, int mcu)
{
    for (int i = 0; i < n; i++)
        if (rows[i].bits)
            KD_TRY(rename_in_row(&rows[i], out_dir));
    KD_TRY(write_outputs(out_dir, rows, n, mcu));
    char md[1100], js[1100], md_new[1110], js_new[1110];
    snprintf(md, sizeof md, "%s/report.md", out_dir);
    snprintf(js, sizeof js, "%s/report.json", out_dir);
    snprintf(md_new, sizeof md_new, "%s.new", md);
    snprintf(js_new, sizeof js_new, "%s.new", js);
    kd_status st = KD_OK;
    for (int i = 0; i < n && st == KD_OK; i++) {
        row_t *w = &rows[i];
        if (!w->bits)
            continue;
        if (rename(w->dir, w->old) == 0)
            w->kept_old = 1;
        else if (errno != ENOENT)
            st = KD_FAIL(KD_ERR_IO, "moving the earlier '%s' aside to '%s': %s", w->dir, w->old,
                         strerror(errno));
        if (st == KD_OK && rename(w->stage, w->dir) != 0)
            st = KD_FAIL(KD_ERR_IO, "moving '%s' to '%s': %s", w->stage, w->dir, strerror(errno));
        w->swapped = st == KD_OK;
    }
    if (st != KD_OK) {
        unswap_rows(rows, n);
        remove(js_new);
        remove(md_new);
        return st;
    }
    /* from here the rows are the new ones: a failure is reported, not undone (report.md.new,
     * renamed last, tells the next report that this one did not finish) */
    const int js_done = rename(js_new, js) == 0;
    if (!js_done || rename(md_new, md) != 0)
        st = KD_FAIL(KD_ERR_IO,
                     "the new rows are in place but renaming '%s' to '%s' failed: %s (%s)",
                     js_done ? md_new : js_new, js_done ? md : js, strerror(errno),
                     js_done ? "report.json is the new one; the new report.md is report.md.new"
                             : "the new report is in report.md.new and report.json.new");
    if (st == KD_OK)
        st = kd_fsync_dir_of(md);
    for (int i = 0; i < n; i++)
        if (rows[i].kept_old && merge_back(rows[i].old, rows[i].dir) != 0)
            fprintf(stderr,
                    "report: '%s' (the earlier '%s') holds files of yours that '%s' has too: "
                    "left there\n",
                    rows[i].old, rows[i].dir, rows[i].dir);
    return st;
}

/*
 * What an earlier report left under out_dir/.new and .old, for every row number and width:
 * .new rows are removed. A .old row means that report stopped while it swapped the rows in
 * (commit_rows). While its report.md.new is still there, report.md is the earlier one: each
 * swapped row is undone (the new one removed, the earlier one back in place) and the .new
 * report files removed. Otherwise the swap was complete: a .old row's files of the user's join
 * the row (merge_back), or the row goes back in place where its directory is missing.
 */
static kd_status recover_rows(const char *out_dir, const char *stage_root, const char *old_root)
{
    char md_new[700], js_new[700];
    snprintf(md_new, sizeof md_new, "%s/report.md.new", out_dir);
    snprintf(js_new, sizeof js_new, "%s/report.json.new", out_dir);
    struct stat sb;
    const int unfinished = stat(md_new, &sb) == 0;
    for (int i = 1; i <= MAX_ROWS; i++)
        for (int bits = 4; bits <= 8; bits += 4) {
            char dir[1100], stage[1100], old[1100];
            snprintf(dir, sizeof dir, "%s/%02d-int%d", out_dir, i, bits);
            snprintf(stage, sizeof stage, "%s/%02d-int%d", stage_root, i, bits);
            snprintf(old, sizeof old, "%s/%02d-int%d", old_root, i, bits);
            int bad = remove_stage_dir(stage) != 0;
            if (!bad && stat(old, &sb) == 0) {
                if (unfinished || (stat(dir, &sb) != 0 && errno == ENOENT))
                    bad = remove_stage_dir(dir) != 0 || rename(old, dir) != 0;
                else
                    bad = merge_back(old, dir) != 0;
            }
            if (bad)
                return KD_FAIL(KD_ERR_IO,
                               "'%s' or '%s' is left from an earlier report and cannot be put "
                               "back or removed (a directory in it, or files of yours that "
                               "'%s' has too): move it away",
                               stage, old, dir);
        }
    if (unfinished) {
        remove(md_new);
        remove(js_new);
    }
    return KD_OK;
}

kd_status kd_report_run(const char *spec_path, const kd_report_opts *o, FILE *out)
{
    static row_t rows[MAX_ROWS];
    char out_dir[512] = "runs/report";
    int n = 0;
    KD_TRY(parse_spec(spec_path, out_dir, sizeof out_dir, rows, &n));
    if (o->out_dir)
        snprintf(out_dir, sizeof out_dir, "%s", o->out_dir);
    int tools =
        have_tool("arm-none-eabi-gcc") && have_tool("qemu-system-arm") && have_tool("cmake");
    if (o->mcu == 1 && !tools)
        return KD_FAIL(KD_ERR_NOT_FOUND,
                       "--mcu needs arm-none-eabi-gcc, qemu-system-arm and cmake on PATH "
                       "(Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)");
    int mcu = o->mcu < 0 ? tools : o->mcu;
    /* every row's job and checkpoint, and the Cortex-M script, before any row runs (a row that
     * cannot start would otherwise stop the report after minutes of earlier rows) */
    for (int i = 0; i < n; i++) {
        kd_job job;
        kd_status st = kd_job_load(rows[i].config, o->overrides, &job);
        if (st != KD_OK)
            return kd_fail_context(st, "report row %d (%s): ", i + 1, rows[i].label);
        kd_job_free(&job);
        if (access(rows[i].checkpoint, R_OK) != 0)
            return KD_FAIL(KD_ERR_NOT_FOUND, "report row %d (%s): checkpoint '%s': %s", i + 1,
                           rows[i].label, rows[i].checkpoint, strerror(errno));
    }
    char script[1100];
    snprintf(script, sizeof script, "%s/bench/mcu/run.sh", o->source_dir ? o->source_dir : ".");
    if (mcu && access(script, R_OK) != 0)
        return KD_FAIL(KD_ERR_NOT_FOUND,
                       "report: the Cortex-M runs need '%s' (%s): run distill report from the "
                       "source tree, point --source at it, or pass --no-mcu",
                       script, strerror(errno));
    /* each quantized row is written under out_dir/.new and put in place by commit_rows; what an
     * interrupted or failed report left there (or in .old) goes first, whatever rows it had */
    char stage_root[600], old_root[600];
    snprintf(stage_root, sizeof stage_root, "%s/.new", out_dir);
    snprintf(old_root, sizeof old_root, "%s/.old", out_dir);
    KD_TRY(kd_mkdir_p(stage_root));
    KD_TRY(kd_mkdir_p(old_root));
    KD_TRY(recover_rows(out_dir, stage_root, old_root));
    for (int i = 0; i < n; i++) {
        row_t *w = &rows[i];
        if (!w->bits)
            continue;
        snprintf(w->dir, sizeof w->dir, "%s/%02d-int%d", out_dir, i + 1, w->bits);
        snprintf(w->stage, sizeof w->stage, "%s/%02d-int%d", stage_root, i + 1, w->bits);
        snprintf(w->old, sizeof w->old, "%s/%02d-int%d", old_root, i + 1, w->bits);
    }
    for (int i = 0; i < n; i++) {
        if (o->progress)
            fprintf(stderr, "report: row %d/%d: %s%s\n", i + 1, n, rows[i].label,
                    rows[i].bits && mcu ? " (export, then the Cortex-M4 under QEMU)" : "");
        KD_TRY(run_row(&rows[i], i, out_dir, o, mcu));
    }
    const kd_status st = commit_rows(out_dir, rows, n, mcu);
    rmdir(stage_root); /* kept when something else is in them */
    rmdir(old_root);
    KD_TRY(st);
    print_table(out, rows, n, 0, mcu);
    remove_stale_rows(out_dir, rows, n, out);
    fprintf(out, "written: %s/report.md, %s/report.json\n", out_dir, out_dir);
    return KD_OK;
}
