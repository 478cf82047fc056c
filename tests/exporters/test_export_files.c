/*
 * test_export_files.c - the files of `distill export` as one set: an export that fails while
 * writing (RLIMIT_FSIZE stands in for a full disk) leaves every file of the earlier export byte
 * for byte and no temporary file; a successful one removes the outputs of an earlier export it
 * does not write and says so; --json FILE replaces an existing report, refuses a directory and
 * refuses any of the export's own output files, however the path is spelt.
 *
 * The student is built and saved by the library (no training): only the files matter here.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "job.h"
#include "kd_cli_util.h"
#include "model.h"

static char dir[128], data[300], job[300], ck[300];
static char out[1 << 16];

#define MODEL                                                                                      \
    "{input: [1, 28, 28], layers: [{conv2d: {out: 4, kernel: 3, stride: 2, pad: 1}}, relu,"        \
    " {maxpool2d: {kernel: 2}}, flatten, {linear: {out: 10}}]}"

static const char *tp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", dir, name);
    return buf;
}

static int setup(void **state)
{
    (void)state;
    if (kd_cli_workspace("kd_export_files_", 200, 40, 5, dir, sizeof dir, data, sizeof data))
        return -1;
    char text[2048], od[300];
    snprintf(text, sizeof text,
             "run: {name: f, out_dir: %s, seed: 3, threads: 1}\n"
             "data: {dataset: fashion-mnist, root: %s, batch_size: 32, val_size: 20}\n"
             "model: %s\n"
             "optim: {name: adamw, lr: 0.01, epochs: 1}\n",
             tp(od, sizeof od, "run"), data, MODEL);
    if (kd_write_text(tp(job, sizeof job, "f.yaml"), text))
        return -1;
    kd_job j;
    kd_model *m = NULL;
    if (kd_job_load(job, NULL, &j) != KD_OK)
        return -1;
    kd_status st = kd_model_build(j.model_input, j.model_layers, kd_backend_cpu(), 1, 3, &m);
    kd_job_free(&j);
    if (st != KD_OK)
        return -1;
    kd_ckpt_info info = {0};
    info.optimizer = "adamw";
    st = kd_checkpoint_save(tp(ck, sizeof ck, "f.safetensors"), m, NULL, 0, &info);
    kd_model_free(m);
    return st == KD_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    kd_rm_rf(dir);
    return 0;
}

/* Export with quant, format, samples ("0": none) and --json (NULL: none) into odir. */
static int export_to(const char *odir, const char *quant, const char *format, const char *samples,
                     const char *json, long long fsize_limit)
{
    const char *argv[] = {"export",   job,    "--checkpoint", ck,       "--quant", quant,
                          "--format", format, "--samples",    samples,  "--out",   odir,
                          "--calib",  "50",   "--no-eval",    "--json", json,      NULL};
    if (!json)
        argv[15] = NULL;
    int code = -1;
    assert_int_equal(kd_run_distill_fsize(argv, fsize_limit, out, sizeof out, &code), 0);
    return code;
}

/* Every entry of a directory with its bytes, sorted by name. */
typedef struct {
    int n;
    char name[16][64];
    uint8_t *bytes[16];
    size_t len[16];
} snapshot;

static int by_name(const void *a, const void *b) { return strcmp(a, b); }

static void snap(const char *d, snapshot *s)
{
    memset(s, 0, sizeof *s);
    DIR *dd = opendir(d);
    assert_non_null(dd);
    for (struct dirent *e; (e = readdir(dd));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        assert_true(s->n < 16);
        if (snprintf(s->name[s->n++], sizeof s->name[0], "%s", e->d_name) >= (int)sizeof s->name[0])
            fail_msg("name too long: %s", e->d_name);
    }
    closedir(dd);
    qsort(s->name, (size_t)s->n, sizeof s->name[0], by_name);
    for (int i = 0; i < s->n; i++) {
        char p[400];
        snprintf(p, sizeof p, "%s/%s", d, s->name[i]);
        if (kd_read_file(p, &s->bytes[i], &s->len[i]))
            fail_msg("cannot read %s", p);
    }
}

static void snap_free(snapshot *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->bytes[i]);
}

/* d holds exactly the entries of s, byte for byte. */
static void assert_unchanged(const char *d, const snapshot *s)
{
    snapshot now;
    snap(d, &now);
    for (int i = 0; i < now.n || i < s->n; i++) {
        if (i >= now.n || i >= s->n || strcmp(now.name[i], s->name[i]))
            fail_msg("%s: entry %d is '%s', was '%s'", d, i, i < now.n ? now.name[i] : "(none)",
                     i < s->n ? s->name[i] : "(none)");
        if (now.len[i] != s->len[i] || memcmp(now.bytes[i], s->bytes[i], s->len[i]))
            fail_msg("%s/%s changed", d, s->name[i]);
    }
    snap_free(&now);
}

static int has(const char *d, const char *name)
{
    char p[400];
    snprintf(p, sizeof p, "%s/%s", d, name);
    return kd_file_exists(p);
}

static long long file_size(const char *d, const char *name)
{
    char p[400];
    struct stat s;
    snprintf(p, sizeof p, "%s/%s", d, name);
    return stat(p, &s) == 0 ? (long long)s.st_size : -1;
}

/* An INT4 export that cannot write model.c (files are limited to one byte less than it needs)
 * leaves the INT8 export in the folder as it was: no new model.kdm or model.h beside the old
 * model.c, no temporary file. */
static void test_failed_export_keeps_old_set(void **state)
{
    (void)state;
    char odir[300], scratch[300];
    tp(odir, sizeof odir, "set");
    tp(scratch, sizeof scratch, "set4");
    if (export_to(odir, "int8", "both", "4", NULL, 0) != 0)
        fail_msg("int8 export failed:\n%s", out);
    if (export_to(scratch, "int4", "both", "4", NULL, 0) != 0)
        fail_msg("int4 export failed:\n%s", out);
    long long c4 = file_size(scratch, "model.c");
    assert_true(c4 > 2 * file_size(scratch, "model.kdm"));
    assert_true(c4 > file_size(scratch, "model.h"));
    snapshot before, before_again;
    snap(odir, &before);
    snap(odir, &before_again);
    assert_int_equal(before.n, 5);
    int code = export_to(odir, "int4", "both", "4", NULL, c4 - 1);
    if (code != 1 || !strstr(out, "model.c") || !strstr(out, "File too large"))
        fail_msg("want exit 1 naming model.c and the cause, got %d:\n%s", code, out);
    assert_unchanged(odir, &before);
    snap_free(&before);
    /* the directories it made for its files are gone again; those that were there stay */
    char fresh[300], jdir[300], json[320];
    tp(fresh, sizeof fresh, "new/a/b");
    tp(jdir, sizeof jdir, "set/j/k");
    snprintf(json, sizeof json, "%s/r.json", jdir);
    code = export_to(fresh, "int4", "both", "4", json, c4 - 1);
    if (code != 1 || !strstr(out, "File too large"))
        fail_msg("want exit 1 with the cause, got %d:\n%s", code, out);
    assert_false(kd_file_exists(tp(fresh, sizeof fresh, "new")));
    assert_false(kd_file_exists(tp(jdir, sizeof jdir, "set/j")));
    assert_unchanged(odir, &before_again);
    /* without the limit the same export replaces the whole set */
    if (export_to(odir, "int4", "both", "4", NULL, 0) != 0)
        fail_msg("int4 export failed:\n%s", out);
    snap_free(&before_again);
    assert_null(strstr(out, "removed stale"));
    const char *const names[] = {"model.kdm", "model.c", "model.h", "samples.bin"};
    for (int i = 0; i < 4; i++) {
        char a[400], b[400];
        snprintf(a, sizeof a, "%s/%s", odir, names[i]);
        snprintf(b, sizeof b, "%s/%s", scratch, names[i]);
        if (!kd_files_equal(a, b))
            fail_msg("%s differs from %s", a, b);
    }
}

/* A kdm-only export into a folder of a both + samples export removes model.c, model.h and
 * samples.bin (and says so), and nothing else. */
static void test_stale_outputs_removed(void **state)
{
    (void)state;
    char odir[300], p[400];
    tp(odir, sizeof odir, "stale");
    if (export_to(odir, "int8", "both", "4", NULL, 0) != 0)
        fail_msg("export failed:\n%s", out);
    snprintf(p, sizeof p, "%s/notes.txt", odir);
    assert_int_equal(kd_write_text(p, "mine"), 0);
    snprintf(p, sizeof p, "%s/model.bin", odir);
    assert_int_equal(kd_write_text(p, "mine too"), 0);
    if (export_to(odir, "int8", "kdm", "0", NULL, 0) != 0)
        fail_msg("export failed:\n%s", out);
    char *line = strstr(out, "removed stale");
    if (!line)
        fail_msg("no line about the stale files:\n%s", out);
    char *eol = strchr(line, '\n');
    assert_non_null(eol);
    *eol = '\0';
    assert_non_null(strstr(line, "/model.c"));
    assert_non_null(strstr(line, "/model.h"));
    assert_non_null(strstr(line, "/samples.bin"));
    assert_null(strstr(line, "model.kdm"));
    assert_false(has(odir, "model.c"));
    assert_false(has(odir, "model.h"));
    assert_false(has(odir, "samples.bin"));
    assert_true(has(odir, "model.kdm"));
    assert_true(has(odir, "report.json"));
    assert_true(has(odir, "notes.txt"));
    assert_true(has(odir, "model.bin"));
    snprintf(p, sizeof p, "%s/report.json", odir);
    cJSON *rep = kd_read_json(p);
    assert_non_null(rep);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(rep, "removed")), 3);
    cJSON_Delete(rep);
    /* the report moved elsewhere: the folder's report.json is an earlier export's */
    char json[300];
    if (export_to(odir, "int8", "kdm", "0", tp(json, sizeof json, "stale.json"), 0) != 0)
        fail_msg("export failed:\n%s", out);
    assert_non_null(strstr(out, "removed stale"));
    assert_false(has(odir, "report.json"));
    assert_true(kd_file_exists(json));
}

static const char *weights_of(const char *path, char *buf, size_t len)
{
    cJSON *rep = kd_read_json(path);
    assert_non_null(rep);
    snprintf(buf, len, "%s", cJSON_GetStringValue(cJSON_GetObjectItem(rep, "weights")));
    cJSON_Delete(rep);
    return buf;
}

/* --json FILE: an existing report is replaced; a directory is refused. */
static void test_json_replaced(void **state)
{
    (void)state;
    char odir[300], json[300], w[16];
    tp(odir, sizeof odir, "ej");
    tp(json, sizeof json, "reports/rep1.json");
    if (export_to(odir, "int8", "kdm", "0", json, 0) != 0)
        fail_msg("first export failed:\n%s", out);
    assert_string_equal(weights_of(json, w, sizeof w), "int8");
    if (export_to(odir, "int4", "kdm", "0", json, 0) != 0)
        fail_msg("second export failed:\n%s", out);
    assert_string_equal(weights_of(json, w, sizeof w), "int4");
    /* the folder's own report.json named explicitly is simply the report */
    char own[400];
    snprintf(own, sizeof own, "%s/report.json", odir);
    if (export_to(odir, "int8", "kdm", "0", own, 0) != 0)
        fail_msg("export failed:\n%s", out);
    assert_null(strstr(out, "removed stale"));
    assert_string_equal(weights_of(own, w, sizeof w), "int8");

    char rdir[300], odir2[300];
    tp(rdir, sizeof rdir, "reports");
    tp(odir2, sizeof odir2, "ej_new");
    int code = export_to(odir2, "int8", "kdm", "0", rdir, 0);
    if (code != 1 || !strstr(out, rdir) || !strstr(out, "is a directory"))
        fail_msg("want exit 1 for a directory as --json, got %d:\n%s", code, out);
    assert_false(kd_file_exists(odir2));
}

/* --json naming one of the export's own outputs is refused before anything is written, also
 * through a symbolic link, "." and "..", or for a file this export would not write itself. */
static void test_json_is_an_output(void **state)
{
    (void)state;
    char odir[300], lnk[300], json[400];
    tp(odir, sizeof odir, "ejo");
    if (export_to(odir, "int8", "both", "4", NULL, 0) != 0)
        fail_msg("export failed:\n%s", out);
    assert_int_equal(symlink(odir, tp(lnk, sizeof lnk, "ejo_link")), 0);
    snapshot before;
    snap(odir, &before);
    const char *const spellings[] = {"%s/model.kdm", "%s/./sub/../model.c", "%s/model.h",
                                     "%s/samples.bin", NULL};
    for (int i = 0; spellings[i]; i++)
        for (int l = 0; l < 2; l++) {
            snprintf(json, sizeof json, spellings[i], l ? lnk : odir);
            int code = export_to(odir, "int4", i == 1 ? "kdm" : "both", "4", json, 0);
            if (code != 1 || !strstr(out, json) || !strstr(out, "own output"))
                fail_msg("want exit 1 refusing --json %s, got %d:\n%s", json, code, out);
            assert_unchanged(odir, &before);
        }
    snap_free(&before);
    /* a folder not there yet: refused all the same, nothing created */
    char odir2[300];
    tp(odir2, sizeof odir2, "ejo_new");
    snprintf(json, sizeof json, "%s/model.kdm", odir2);
    int code = export_to(odir2, "int8", "kdm", "0", json, 0);
    if (code != 1 || !strstr(out, "own output"))
        fail_msg("want exit 1 refusing --json %s, got %d:\n%s", json, code, out);
    assert_false(kd_file_exists(odir2));
    /* the output directory itself, not there yet */
    snprintf(json, sizeof json, "%s/../ejo_new", odir2);
    code = export_to(odir2, "int8", "kdm", "0", json, 0);
    if (code != 1 || !strstr(out, "output directory"))
        fail_msg("want exit 1 refusing the output directory as --json, got %d:\n%s", code, out);
    assert_false(kd_file_exists(odir2));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_failed_export_keeps_old_set),
        cmocka_unit_test(test_stale_outputs_removed),
        cmocka_unit_test(test_json_replaced),
        cmocka_unit_test(test_json_is_an_output),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
