/*
 * test_config_yaml.c - the YAML config tree: parsing, positions, typed
 * getters and their messages, --set overrides, and write/load round trips.
 *
 * Messages are checked by substring so the exact wording can evolve, but
 * every position and offending text a user relies on is pinned down.
 */
#define _POSIX_C_SOURCE 200809L /* mkstemp, fdopen, open_memstream */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_yaml.h"

#define assert_err_has(s) assert_non_null(strstr(kd_last_error(), (s)))

static kd_node *load(const char *text)
{
    kd_node *n = NULL;
    kd_status st = kd_yaml_load_string(text, "cfg.yaml", &n);
    if (st != KD_OK)
        fail_msg("load failed: %s", kd_last_error());
    assert_non_null(n);
    return n;
}

static kd_status load_err(const char *text)
{
    kd_node *n = (kd_node *)1;
    kd_clear_error();
    kd_status st = kd_yaml_load_string(text, "cfg.yaml", &n);
    assert_int_not_equal(st, KD_OK);
    assert_null(n);
    return st;
}

/* Walk "a.b.0.c"-style paths without going through set_path's own logic. */
static const kd_node *at(const kd_node *n, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *tok = strtok(buf, "."); tok && n; tok = strtok(NULL, ".")) {
        if (n->kind == KD_NODE_SEQ) {
            size_t i = (size_t)strtoul(tok, NULL, 10);
            n = i < n->len ? n->items[i] : NULL;
        } else {
            n = kd_node_child(n, tok);
        }
    }
    return n;
}

static void assert_scalar(const kd_node *n, const char *text, int quoted)
{
    assert_non_null(n);
    assert_int_equal(n->kind, KD_NODE_SCALAR);
    assert_string_equal(n->value, text);
    assert_int_equal(n->quoted, quoted);
}

static const char *const k_job[] = {"name", "optim", "data", "student", NULL};

static const char k_job_text[] = "name: run1\n"
                                 "optim:\n"
                                 "  name: sgd\n"
                                 "  lr: 0.1\n"
                                 "data:\n"
                                 "  augment: {crop_pad: 4, hflip: true}\n"
                                 "  root: \"/tmp/x\"\n"
                                 "student:\n"
                                 "  input: [1, 28, 28]\n"
                                 "  layers:\n"
                                 "    - conv2d: {out: 16, kernel: 3}\n"
                                 "    - relu\n"
                                 "    - linear:\n"
                                 "        out: 10\n";

/* ---- structure and positions -------------------------------------------------------------- */

static void test_nested_structure(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    assert_int_equal(r->kind, KD_NODE_MAP);
    assert_int_equal(r->len, 4);
    assert_string_equal(r->keys[0], "name");
    assert_string_equal(r->keys[3], "student");
    assert_scalar(at(r, "optim.lr"), "0.1", 0);
    assert_scalar(at(r, "data.root"), "/tmp/x", 1);
    const kd_node *aug = at(r, "data.augment");
    assert_int_equal(aug->kind, KD_NODE_MAP);
    assert_int_equal(aug->len, 2);
    assert_scalar(at(r, "data.augment.hflip"), "true", 0);
    const kd_node *in = at(r, "student.input");
    assert_int_equal(in->kind, KD_NODE_SEQ);
    assert_int_equal(in->len, 3);
    assert_scalar(in->items[2], "28", 0);
    const kd_node *layers = at(r, "student.layers");
    assert_int_equal(layers->kind, KD_NODE_SEQ);
    assert_int_equal(layers->len, 3);
    assert_scalar(layers->items[1], "relu", 0);
    assert_scalar(at(r, "student.layers.0.conv2d.out"), "16", 0);
    assert_scalar(at(r, "student.layers.2.linear.out"), "10", 0);
    assert_null(kd_node_child(r, "nope"));
    assert_null(kd_node_child(in, "0")); /* not a map */
    assert_null(kd_node_child(NULL, "x"));
    kd_node_free(r);
}

static void test_positions(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    char buf[128];
    const kd_node *lr = at(r, "optim.lr");
    assert_int_equal(lr->line, 4);
    assert_int_equal(lr->col, 7);
    assert_string_equal(kd_node_where(lr, buf, sizeof buf), "cfg.yaml:4:7");
    /* Flow items: "  augment: {crop_pad: 4, hflip: true}" -> hflip's value at col 33. */
    const kd_node *hflip = at(r, "data.augment.hflip");
    assert_int_equal(hflip->line, 6);
    assert_int_equal(hflip->col, 33);
    const kd_node *layer1 = at(r, "student.layers.1");
    assert_int_equal(layer1->line, 12);
    assert_int_equal(layer1->col, 7);
    const kd_node *optim = kd_node_child(r, "optim");
    assert_int_equal(optim->key_line[1], 4); /* key "lr" */
    assert_int_equal(optim->key_col[1], 3);
    assert_string_equal(r->file, "cfg.yaml");
    assert_string_equal(kd_node_where(NULL, buf, sizeof buf), "<unknown>");
    kd_node_free(r);
}

static void test_empty_and_comment_only(void **state)
{
    (void)state;
    const char *texts[] = {"", "# nothing\n", "---\n", "~\n"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        kd_node *r = load(texts[i]);
        assert_int_equal(r->kind, KD_NODE_MAP);
        assert_int_equal(r->len, 0);
        kd_node_free(r);
    }
    kd_node_free(NULL);
}

static void test_block_scalars_and_str_tag(void **state)
{
    (void)state;
    kd_node *r = load("a: |\n  two\n  lines\nb: !!str 5\nc: 'it''s'\n");
    assert_scalar(kd_node_child(r, "a"), "two\nlines\n", 1);
    assert_scalar(kd_node_child(r, "b"), "5", 1);
    assert_scalar(kd_node_child(r, "c"), "it's", 1);
    int64_t v = 7;
    assert_int_equal(kd_node_get_int(r, "b", 1, &v), KD_ERR_CONFIG);
    assert_int_equal(v, 7);
    assert_err_has("quoted");
    kd_node_free(r);
}

/* ---- load errors -------------------------------------------------------------------------- */

static void test_syntax_error(void **state)
{
    (void)state;
    assert_int_equal(load_err("a: 1\nb: [1, 2\nc: 3\n"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:");
    assert_err_has("YAML syntax error");
    assert_err_has("flow sequence");
    /* A bad indent: the problem is reported where the scanner noticed it. */
    assert_int_equal(load_err("a:\n  b: 1\n c: 2\n"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:3:2: YAML syntax error: ");
    assert_err_has("did not find expected key");
}

static void test_duplicate_key(void **state)
{
    (void)state;
    assert_int_equal(load_err("optim:\n  lr: 1\n  momentum: 0.9\n  lr: 2\n"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:4:3: duplicate key 'lr'");
    assert_err_has("first defined at cfg.yaml:2:3");
}

static void test_refused_constructs(void **state)
{
    (void)state;
    assert_int_equal(load_err("a: &x 1\nb: *x\n"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:1:4: YAML anchors (&x)");
    assert_int_equal(load_err("a: 1\n---\nb: 2\n"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:2:1: a second YAML document");
    assert_int_equal(load_err("a: !!float 1\n"), KD_ERR_CONFIG);
    assert_err_has("tag 'tag:yaml.org,2002:float' is not supported");
    assert_int_equal(load_err("? [a, b]\n: 1\n"), KD_ERR_CONFIG);
    assert_err_has("mapping keys must be plain text");
    /* Deep nesting is refused before it can exhaust the C stack. */
    char deep[1024];
    memset(deep, '[', 500);
    memset(deep + 500, ']', 500);
    deep[1000] = '\0';
    assert_int_equal(load_err(deep), KD_ERR_CONFIG);
    assert_err_has("nesting deeper than");
}

static void test_missing_file(void **state)
{
    (void)state;
    kd_node *n = (kd_node *)1;
    assert_int_equal(kd_yaml_load_file("/nonexistent/dir/job.yaml", &n), KD_ERR_NOT_FOUND);
    assert_null(n);
    assert_err_has("cannot open config '/nonexistent/dir/job.yaml': No such file or directory");
    assert_int_equal(kd_yaml_load_file("/", &n), KD_ERR_NOT_FOUND);
    assert_err_has("cannot open config '/'");
}

static void test_load_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kd_cfg_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("optim:\n  lr: [1\n", f);
    fclose(f);
    kd_node *n = NULL;
    assert_int_equal(kd_yaml_load_file(path, &n), KD_ERR_CONFIG);
    char want[64];
    snprintf(want, sizeof want, "%s:3:1: YAML syntax error", path);
    assert_err_has(want);
    f = fopen(path, "w");
    fputs("optim:\n  lr: 0.5\n", f);
    fclose(f);
    assert_int_equal(kd_yaml_load_file(path, &n), KD_OK);
    double lr = 0;
    assert_int_equal(kd_node_get_float(kd_node_child(n, "optim"), "lr", 1, &lr), KD_OK);
    assert_true(lr == 0.5);
    assert_string_equal(n->file, path);
    kd_node_free(n);
    remove(path);
}

/* ---- checks and getters ------------------------------------------------------------------- */

static void test_check_keys(void **state)
{
    (void)state;
    kd_node *r = load("optim:\n  name: sgd\n  lrr: 0.1\nlist: [1]\n");
    static const char *const allowed[] = {"name", "lr", "momentum", NULL};
    const kd_node *optim = kd_node_child(r, "optim");
    assert_int_equal(kd_node_check_keys(optim, allowed, "optim"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:3:3: unknown key 'lrr' in optim (allowed: name, lr, momentum)");
    static const char *const top[] = {"optim", "list", NULL};
    assert_int_equal(kd_node_check_keys(r, top, "the job file"), KD_OK);
    assert_int_equal(kd_node_check_keys(kd_node_child(r, "list"), top, "list"), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:4:7: list must be a mapping");
    assert_int_equal(kd_node_check_keys(NULL, top, "x"), KD_OK);
    kd_node_free(r);
}

static const char k_types[] = "i: 42\n"
                              "neg: -7\n"
                              "f: 3e-3\n"
                              "f2: 3.0e-3\n"
                              "f3: .5\n"
                              "s: abc\n"
                              "m: {a: 1}\n"
                              "l: [1]\n"
                              "n1: ~\n"
                              "n2: null\n"
                              "n3:\n"
                              "qn: \"null\"\n"
                              "half: 1.5\n"
                              "big: 9223372036854775808\n"
                              "inf: .inf\n"
                              "nan: .nan\n"
                              "huge: 1e999\n"
                              "hex: 0x10\n"
                              "b1: yes\n"
                              "b2: Off\n"
                              "b3: true\n"
                              "qb: 'true'\n"
                              "qi: \"5\"\n";

static void test_get_int(void **state)
{
    (void)state;
    kd_node *r = load(k_types);
    int64_t v = 0;
    assert_int_equal(kd_node_get_int(r, "i", 1, &v), KD_OK);
    assert_int_equal(v, 42);
    assert_int_equal(kd_node_get_int(r, "neg", 1, &v), KD_OK);
    assert_int_equal(v, -7);
    v = 99;
    assert_int_equal(kd_node_get_int(r, "absent", 0, &v), KD_OK);
    assert_int_equal(kd_node_get_int(r, "n1", 0, &v), KD_OK);
    assert_int_equal(kd_node_get_int(r, "n3", 0, &v), KD_OK);
    assert_int_equal(v, 99);
    assert_int_equal(kd_node_get_int(r, "absent", 1, &v), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:1:1: missing required key 'absent'");
    assert_int_equal(kd_node_get_int(r, "n2", 1, &v), KD_ERR_CONFIG);
    assert_err_has("missing required key 'n2'");
    assert_int_equal(kd_node_get_int(r, "half", 0, &v), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:13:7: 'half' must be an integer, got '1.5'");
    assert_int_equal(kd_node_get_int(r, "big", 0, &v), KD_ERR_CONFIG);
    assert_err_has("out of range");
    assert_int_equal(kd_node_get_int(r, "hex", 0, &v), KD_ERR_CONFIG);
    assert_int_equal(kd_node_get_int(r, "s", 0, &v), KD_ERR_CONFIG);
    assert_err_has("got 'abc'");
    assert_int_equal(kd_node_get_int(r, "m", 0, &v), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:7:4: 'm' must be an integer, got a mapping");
    assert_int_equal(kd_node_get_int(r, "l", 0, &v), KD_ERR_CONFIG);
    assert_err_has("got a list");
    assert_int_equal(kd_node_get_int(r, "qi", 0, &v), KD_ERR_CONFIG);
    assert_err_has("got '5' (quoted");
    assert_int_equal(v, 99);
    kd_node_free(r);
}

static void test_get_float(void **state)
{
    (void)state;
    kd_node *r = load(k_types);
    double d = 0;
    assert_int_equal(kd_node_get_float(r, "f", 1, &d), KD_OK);
    assert_true(d == 3e-3);
    assert_int_equal(kd_node_get_float(r, "f2", 1, &d), KD_OK);
    assert_true(d == 3e-3);
    assert_int_equal(kd_node_get_float(r, "f3", 1, &d), KD_OK);
    assert_true(d == 0.5);
    assert_int_equal(kd_node_get_float(r, "i", 1, &d), KD_OK);
    assert_true(d == 42.0);
    d = -1;
    assert_int_equal(kd_node_get_float(r, "s", 0, &d), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:6:4: 's' must be a number, got 'abc'");
    assert_int_equal(kd_node_get_float(r, "inf", 0, &d), KD_ERR_CONFIG);
    assert_err_has("must be a finite number, got '.inf'");
    assert_int_equal(kd_node_get_float(r, "nan", 0, &d), KD_ERR_CONFIG);
    assert_err_has("finite");
    assert_int_equal(kd_node_get_float(r, "huge", 0, &d), KD_ERR_CONFIG);
    assert_err_has("finite");
    assert_int_equal(kd_node_get_float(r, "hex", 0, &d), KD_ERR_CONFIG);
    assert_int_equal(kd_node_get_float(r, "l", 0, &d), KD_ERR_CONFIG);
    assert_err_has("'l' must be a number, got a list");
    assert_int_equal(kd_node_get_float(r, "absent", 1, &d), KD_ERR_CONFIG);
    assert_true(d == -1);
    kd_node_free(r);
}

static void test_get_bool_and_str(void **state)
{
    (void)state;
    kd_node *r = load(k_types);
    int b = -1;
    assert_int_equal(kd_node_get_bool(r, "b1", 1, &b), KD_OK);
    assert_int_equal(b, 1);
    assert_int_equal(kd_node_get_bool(r, "b2", 1, &b), KD_OK);
    assert_int_equal(b, 0);
    assert_int_equal(kd_node_get_bool(r, "b3", 1, &b), KD_OK);
    assert_int_equal(b, 1);
    b = -1;
    assert_int_equal(kd_node_get_bool(r, "qb", 1, &b), KD_ERR_CONFIG);
    assert_err_has("'qb' must be true or false, got 'true' (quoted");
    assert_int_equal(kd_node_get_bool(r, "i", 1, &b), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:1:4: 'i' must be true or false, got '42'");
    assert_int_equal(b, -1);

    const char *s = "unchanged";
    assert_int_equal(kd_node_get_str(r, "s", 1, &s), KD_OK);
    assert_string_equal(s, "abc");
    assert_int_equal(kd_node_get_str(r, "qn", 1, &s), KD_OK); /* quoted "null" is text */
    assert_string_equal(s, "null");
    assert_int_equal(kd_node_get_str(r, "i", 1, &s), KD_OK);
    assert_string_equal(s, "42");
    s = "unchanged";
    assert_int_equal(kd_node_get_str(r, "n2", 0, &s), KD_OK);
    assert_string_equal(s, "unchanged");
    assert_int_equal(kd_node_get_str(r, "m", 1, &s), KD_ERR_CONFIG);
    assert_err_has("'m' must be a string, got a mapping");

    /* A getter on something that is not a map says so instead of reporting "missing". */
    assert_int_equal(kd_node_get_str(kd_node_child(r, "l"), "x", 0, &s), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:8:4: expected a mapping");
    kd_node_free(r);
}

static void test_as_conversions(void **state)
{
    (void)state;
    kd_node *r = load("input: [1, 28, x, 2.5, on, ~]\n");
    const kd_node *in = kd_node_child(r, "input");
    int64_t v = 0;
    double d = 0;
    int b = 0;
    const char *s = NULL;
    assert_int_equal(kd_node_as_int(in->items[1], "input dimension", &v), KD_OK);
    assert_int_equal(v, 28);
    assert_int_equal(kd_node_as_int(in->items[2], "input dimension", &v), KD_ERR_CONFIG);
    assert_err_has("cfg.yaml:1:16: input dimension must be an integer, got 'x'");
    assert_int_equal(kd_node_as_float(in->items[3], "scale", &d), KD_OK);
    assert_true(d == 2.5);
    assert_int_equal(kd_node_as_bool(in->items[4], "flag", &b), KD_OK);
    assert_int_equal(b, 1);
    assert_int_equal(kd_node_as_str(in->items[2], "name", &s), KD_OK);
    assert_string_equal(s, "x");
    assert_int_equal(kd_node_as_int(in->items[5], "dim", &v), KD_ERR_CONFIG);
    assert_err_has("dim must be an integer, got null");
    assert_int_equal(kd_node_as_str(in, "name", &s), KD_ERR_CONFIG);
    assert_err_has("name must be a string, got a list");
    assert_int_equal(v, 28);
    kd_node_free(r);
}

/* ---- --set overrides ---------------------------------------------------------------------- */

static void test_set_existing_and_new(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    double lr = 0;
    assert_int_equal(kd_node_set_path(r, "optim.lr=0.01"), KD_OK);
    assert_int_equal(kd_node_get_float(kd_node_child(r, "optim"), "lr", 1, &lr), KD_OK);
    assert_true(lr == 0.01);
    const kd_node *n = at(r, "optim.lr");
    assert_string_equal(n->file, "--set optim.lr=0.01");
    assert_int_equal(n->line, 0);
    char buf[128];
    assert_string_equal(kd_node_where(n, buf, sizeof buf), "--set optim.lr=0.01");

    assert_int_equal(kd_node_set_path(r, "data.augment.hflip=false"), KD_OK);
    assert_scalar(at(r, "data.augment.hflip"), "false", 0);
    assert_int_equal(at(r, "data.augment")->len, 2);

    /* New keys, including missing intermediate maps; the unknown-key check names --set. */
    assert_int_equal(kd_node_set_path(r, "optim.lrr=1"), KD_OK);
    assert_int_equal(kd_node_set_path(r, "extra.deep.key=x"), KD_OK);
    assert_scalar(at(r, "extra.deep.key"), "x", 0);
    assert_int_equal(at(r, "extra")->kind, KD_NODE_MAP);
    static const char *const optim_keys[] = {"name", "lr", NULL};
    assert_int_equal(kd_node_check_keys(kd_node_child(r, "optim"), optim_keys, "optim"),
                     KD_ERR_CONFIG);
    assert_err_has("--set optim.lrr=1: unknown key 'lrr' in optim");
    assert_null(strstr(kd_last_error(), ":0:0"));
    assert_int_equal(kd_node_check_keys(r, k_job, "the job file"), KD_ERR_CONFIG);
    assert_err_has("--set extra.deep.key=x: unknown key 'extra'");

    /* Quoted values stay strings; an empty value is a null that clears the setting. */
    assert_int_equal(kd_node_set_path(r, "name='007'"), KD_OK);
    assert_scalar(kd_node_child(r, "name"), "007", 1);
    assert_int_equal(kd_node_set_path(r, "data.root="), KD_OK);
    const char *root = "keep";
    assert_int_equal(kd_node_get_str(kd_node_child(r, "data"), "root", 0, &root), KD_OK);
    assert_string_equal(root, "keep");
    /* ... and a null section can then take keys. */
    assert_int_equal(kd_node_set_path(r, "data.root.x=1"), KD_OK);
    assert_scalar(at(r, "data.root.x"), "1", 0);
    kd_node_free(r);
}

static void test_set_seq_index_and_flow(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    assert_int_equal(kd_node_set_path(r, "student.layers.0.conv2d.out=8"), KD_OK);
    assert_scalar(at(r, "student.layers.0.conv2d.out"), "8", 0);
    assert_scalar(at(r, "student.layers.0.conv2d.kernel"), "3", 0);
    assert_int_equal(kd_node_set_path(r, "student.layers.1=relu6"), KD_OK);
    assert_scalar(at(r, "student.layers.1"), "relu6", 0);

    assert_int_equal(kd_node_set_path(r, "data.augment={crop_pad: 0, hflip: true}"), KD_OK);
    const kd_node *aug = at(r, "data.augment");
    assert_int_equal(aug->kind, KD_NODE_MAP);
    assert_int_equal(aug->len, 2);
    assert_scalar(at(r, "data.augment.crop_pad"), "0", 0);
    assert_int_equal(aug->items[1]->line, 0);
    assert_string_equal(aug->items[1]->file, "--set data.augment={crop_pad: 0, hflip: true}");

    assert_int_equal(kd_node_set_path(r, "student.input=[1,28,28]"), KD_OK);
    const kd_node *in = at(r, "student.input");
    assert_int_equal(in->kind, KD_NODE_SEQ);
    assert_int_equal(in->len, 3);
    int64_t v = 0;
    assert_int_equal(kd_node_as_int(in->items[0], "dim", &v), KD_OK);
    assert_int_equal(v, 1);
    kd_node_free(r);
}

static void test_set_errors(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    kd_node *before = load(k_job_text);
    assert_int_equal(kd_node_set_path(r, "optim.lr"), KD_ERR_INVALID);
    assert_err_has("--set expects key.path=value, got 'optim.lr'");
    assert_int_equal(kd_node_set_path(r, "=1"), KD_ERR_INVALID);
    assert_int_equal(kd_node_set_path(r, "optim..lr=1"), KD_ERR_INVALID);
    assert_err_has("empty component");
    assert_int_equal(kd_node_set_path(r, "optim.lr.x=1"), KD_ERR_CONFIG);
    assert_err_has("--set optim.lr.x=1: cannot set 'x': optim.lr at cfg.yaml:4:7 is a scalar");
    assert_int_equal(kd_node_set_path(r, "student.layers.3.relu=1"), KD_ERR_CONFIG);
    assert_err_has("index 3 is out of range; student.layers at cfg.yaml:11:5 has 3 items");
    assert_int_equal(kd_node_set_path(r, "student.input.x=1"), KD_ERR_CONFIG);
    assert_err_has("'x' is not a list index");
    assert_int_equal(kd_node_set_path(r, "student.input.-1=1"), KD_ERR_CONFIG);
    assert_int_equal(kd_node_set_path(r, "optim.lr=[1,"), KD_ERR_CONFIG);
    assert_err_has("--set optim.lr=[1,: YAML syntax error");
    assert_int_equal(kd_node_set_path(r, "optim.lr=*a"), KD_ERR_CONFIG);
    /* None of the failures changed the tree. */
    assert_true(kd_node_equal(r, before));
    kd_node_free(r);
    kd_node_free(before);
}

/* ---- writing and equality ----------------------------------------------------------------- */

static kd_node *round_trip(const kd_node *n)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    assert_int_equal(kd_node_write_yaml(n, f), KD_OK);
    fclose(f);
    kd_node *back = NULL;
    kd_status st = kd_yaml_load_string(buf, "written.yaml", &back);
    if (st != KD_OK)
        fail_msg("reload failed: %s\n---\n%s", kd_last_error(), buf);
    if (!kd_node_equal(n, back))
        fail_msg("round trip differs:\n%s", buf);
    free(buf);
    return back;
}

static void test_write_round_trip(void **state)
{
    (void)state;
    kd_node *r = load(k_job_text);
    kd_node_free(round_trip(r));
    kd_node_free(r);

    r = load("plain: yes\n"
             "q_yes: \"yes\"\n"
             "q_num: \"1e5\"\n"
             "colon: \"a: b\"\n"
             "empty_q: \"\"\n"
             "empty_plain:\n"
             "lead: \"  leading spaces\"\n"
             "trail: \"trailing \"\n"
             "hash: \"a #b\"\n"
             "dash: \"-\"\n"
             "dash_word: -x\n"
             "quote: \"say \\\"hi\\\" \\\\ back\"\n"
             "newline: \"l1\\nl2\\tt\\x01\"\n"
             "unicode: \"caf\\u00e9 \\u2028 sep\"\n"
             "tilde: \"~\"\n"
             "\"odd key: x\": 1\n"
             "\"\": empty key\n"
             "\"yes\": keyed\n"
             "brackets: \"[not, a, list]\"\n"
             "url: http://x.org/a?b=c\n"
             "e_map: {}\n"
             "e_seq: []\n"
             "nested: [[1, [2, {a: []}]], {b: [x, '']}]\n"
             "seq_of_maps:\n"
             "  - {a: 1, b: {c: 2}}\n"
             "  - ~\n"
             "  -\n"
             "block: |\n"
             "  keep\n"
             "   this\n");
    kd_node *back = round_trip(r);
    /* The loaded-back tree really holds the awkward values, not just something equal to itself. */
    assert_scalar(kd_node_child(back, "q_yes"), "yes", 1);
    assert_scalar(kd_node_child(back, "plain"), "yes", 0);
    assert_scalar(kd_node_child(back, "colon"), "a: b", 1);
    assert_scalar(kd_node_child(back, "empty_q"), "", 1);
    assert_scalar(kd_node_child(back, "empty_plain"), "", 0);
    assert_scalar(kd_node_child(back, "lead"), "  leading spaces", 1);
    assert_scalar(kd_node_child(back, "block"), "keep\n this\n", 1);
    assert_scalar(kd_node_child(back, ""), "empty key", 0);
    assert_int_equal(kd_node_child(back, "e_map")->kind, KD_NODE_MAP);
    assert_int_equal(kd_node_child(back, "e_seq")->kind, KD_NODE_SEQ);
    kd_node_free(back);
    kd_node_free(r);

    /* An empty tree and a tree changed by --set survive too. */
    r = load("");
    kd_node_free(round_trip(r));
    assert_int_equal(kd_node_set_path(r, "a.b=[1, {c: 'x y'}]"), KD_OK);
    kd_node_free(round_trip(r));
    kd_node_free(r);
}

static void test_write_format(void **state)
{
    (void)state;
    kd_node *r = load("a: {b: 1, c: [x, {d: 2}]}\ne: 'yes'\n");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_int_equal(kd_node_write_yaml(r, f), KD_OK);
    fclose(f);
    assert_string_equal(buf, "a:\n"
                             "  b: 1\n"
                             "  c:\n"
                             "    - x\n"
                             "    - d: 2\n"
                             "e: \"yes\"\n");
    free(buf);
    kd_node_free(r);
}

static void test_equal(void **state)
{
    (void)state;
    kd_node *a = load("x: [1, {y: z}]\n");
    kd_node *b = load("\n\nx:\n  - 1\n  - y: z\n"); /* different positions */
    kd_node *c = load("x: [1, {y: 'z'}]\n");        /* quoting differs */
    kd_node *d = load("x: [1, {w: z}]\n");          /* key differs */
    kd_node *e = load("x: [1]\n");                  /* length differs */
    assert_true(kd_node_equal(a, b));
    assert_false(kd_node_equal(a, c));
    assert_false(kd_node_equal(a, d));
    assert_false(kd_node_equal(a, e));
    assert_false(kd_node_equal(a, NULL));
    assert_true(kd_node_equal(NULL, NULL));
    kd_node_free(a);
    kd_node_free(b);
    kd_node_free(c);
    kd_node_free(d);
    kd_node_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nested_structure),
        cmocka_unit_test(test_positions),
        cmocka_unit_test(test_empty_and_comment_only),
        cmocka_unit_test(test_block_scalars_and_str_tag),
        cmocka_unit_test(test_syntax_error),
        cmocka_unit_test(test_duplicate_key),
        cmocka_unit_test(test_refused_constructs),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_check_keys),
        cmocka_unit_test(test_get_int),
        cmocka_unit_test(test_get_float),
        cmocka_unit_test(test_get_bool_and_str),
        cmocka_unit_test(test_as_conversions),
        cmocka_unit_test(test_set_existing_and_new),
        cmocka_unit_test(test_set_seq_index_and_flow),
        cmocka_unit_test(test_set_errors),
        cmocka_unit_test(test_write_round_trip),
        cmocka_unit_test(test_write_format),
        cmocka_unit_test(test_equal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
