/*
 * config_yaml.c - YAML text <-> kd_node tree, typed getters, --set overrides.
 *
 * Parsing walks libyaml's event stream recursively (depth capped so hostile
 * input cannot exhaust the stack) and builds nodes that own copies of every
 * string, including the file name, so a subtree can move between trees (as
 * --set does) without any shared lifetime to track. Scalars stay text;
 * conversion happens in the getters so messages can quote what was written.
 * Invariants: MAP keys are unique; SCALAR nodes have a non-NULL value and
 * collections a NULL one; line 0 marks nodes made from a --set override.
 */
#include "config_yaml.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

/* Deeper nesting than any sane config; bounds the recursion of the loader. */
#define KD_YAML_MAX_DEPTH 200

#define KD_STR_TAG "tag:yaml.org,2002:str"

/* ---- nodes ---------------------------------------------------------------------------------- */

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static kd_node *node_new(kd_node_kind kind, const char *file, int line, int col)
{
    kd_node *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->file = dup_str(file);
    if (!n->file) {
        free(n);
        return NULL;
    }
    n->kind = kind;
    n->line = line;
    n->col = col;
    return n;
}

void kd_node_free(kd_node *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->len; i++) {
        kd_node_free(n->items[i]);
        if (n->keys)
            free(n->keys[i]);
    }
    free(n->items);
    free(n->keys);
    free(n->key_line);
    free(n->key_col);
    free(n->value);
    free((char *)n->file);
    free(n);
}

/*
 * Append child (and, for a MAP, key) to parent. Ownership of key and child
 * passes in even on failure, which keeps every caller's error path a single
 * return. Arrays grow one slot at a time: configs are small, and a partial
 * failure leaves only an oversized array, never an inconsistent node.
 */
static kd_status node_append(kd_node *parent, char *key, int key_line, int key_col, kd_node *child)
{
    size_t n = parent->len + 1;
    kd_node **items = realloc(parent->items, n * sizeof *items);
    if (items)
        parent->items = items;
    if (items && parent->kind == KD_NODE_MAP) {
        char **keys = realloc(parent->keys, n * sizeof *keys);
        if (keys)
            parent->keys = keys;
        int *kl = keys ? realloc(parent->key_line, n * sizeof *kl) : NULL;
        if (kl)
            parent->key_line = kl;
        int *kc = kl ? realloc(parent->key_col, n * sizeof *kc) : NULL;
        if (kc)
            parent->key_col = kc;
        items = kc ? items : NULL;
    }
    if (!items) {
        free(key);
        kd_node_free(child);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory building the config tree");
    }
    parent->items[parent->len] = child;
    if (parent->kind == KD_NODE_MAP) {
        parent->keys[parent->len] = key;
        parent->key_line[parent->len] = key_line;
        parent->key_col[parent->len] = key_col;
    }
    parent->len = n;
    return KD_OK;
}

static long map_find(const kd_node *map, const char *key)
{
    if (!map || map->kind != KD_NODE_MAP)
        return -1;
    for (size_t i = 0; i < map->len; i++)
        if (strcmp(map->keys[i], key) == 0)
            return (long)i;
    return -1;
}

kd_node *kd_node_child(const kd_node *map, const char *key)
{
    long i = map_find(map, key);
    return i < 0 ? NULL : map->items[i];
}

static const char *format_pos(const char *file, int line, int col, char *buf, size_t len)
{
    if (line <= 0)
        snprintf(buf, len, "%s", file);
    else
        snprintf(buf, len, "%s:%d:%d", file, line, col);
    return buf;
}

const char *kd_node_where(const kd_node *n, char *buf, size_t len)
{
    if (!n) {
        snprintf(buf, len, "<unknown>");
        return buf;
    }
    return format_pos(n->file, n->line, n->col, buf, len);
}

/* ---- loading -------------------------------------------------------------------------------- */

typedef struct {
    yaml_parser_t parser;
    const char *name;
    int set_mode; /* parsing a --set value: its positions mean nothing to the user */
} kd_loader;

static int mark_line(const kd_loader *ld, yaml_mark_t m)
{
    return ld->set_mode ? 0 : (int)m.line + 1;
}

static int mark_col(const kd_loader *ld, yaml_mark_t m)
{
    return ld->set_mode ? 0 : (int)m.column + 1;
}

static const char *mark_where(const kd_loader *ld, yaml_mark_t m, char *buf, size_t len)
{
    return format_pos(ld->name, mark_line(ld, m), mark_col(ld, m), buf, len);
}

static kd_status syntax_error(const kd_loader *ld)
{
    const yaml_parser_t *p = &ld->parser;
    char pos[512];
    const char *problem = p->problem ? p->problem : "unknown problem";
    if (p->error == YAML_MEMORY_ERROR)
        return KD_FAIL(KD_ERR_NOMEM, "%s: out of memory parsing YAML", ld->name);
    if (p->error == YAML_READER_ERROR)
        return KD_FAIL(KD_ERR_CONFIG, "%s: YAML syntax error: %s at byte %zu", ld->name, problem,
                       p->problem_offset);
    mark_where(ld, p->problem_mark, pos, sizeof pos);
    if (!p->context)
        return KD_FAIL(KD_ERR_CONFIG, "%s: YAML syntax error: %s", pos, problem);
    if (ld->set_mode)
        return KD_FAIL(KD_ERR_CONFIG, "%s: YAML syntax error: %s %s", pos, problem, p->context);
    return KD_FAIL(KD_ERR_CONFIG, "%s: YAML syntax error: %s %s at line %d, column %d", pos,
                   problem, p->context, (int)p->context_mark.line + 1,
                   (int)p->context_mark.column + 1);
}

static kd_status next_event(kd_loader *ld, yaml_event_t *ev)
{
    if (yaml_parser_parse(&ld->parser, ev))
        return KD_OK;
    return syntax_error(ld);
}

/*
 * Refuse what the tree cannot represent faithfully: aliases would need
 * shared or copied subtrees, and a custom tag's meaning would be silently
 * dropped. !!str is kept because it is just another way to quote.
 */
static kd_status check_props(const kd_loader *ld, const yaml_event_t *ev)
{
    const yaml_char_t *anchor = NULL, *tag = NULL;
    const char *plain_tag = NULL;
    char pos[512];
    switch (ev->type) {
    case YAML_ALIAS_EVENT:
        return KD_FAIL(
            KD_ERR_CONFIG, "%s: YAML aliases (*%s) are not supported; write the value out",
            mark_where(ld, ev->start_mark, pos, sizeof pos), (const char *)ev->data.alias.anchor);
    case YAML_SCALAR_EVENT:
        anchor = ev->data.scalar.anchor;
        tag = ev->data.scalar.tag;
        plain_tag = KD_STR_TAG;
        break;
    case YAML_SEQUENCE_START_EVENT:
        anchor = ev->data.sequence_start.anchor;
        tag = ev->data.sequence_start.tag;
        plain_tag = "tag:yaml.org,2002:seq";
        break;
    case YAML_MAPPING_START_EVENT:
        anchor = ev->data.mapping_start.anchor;
        tag = ev->data.mapping_start.tag;
        plain_tag = "tag:yaml.org,2002:map";
        break;
    default:
        return KD_FAIL(KD_ERR_INTERNAL, "%s: unexpected YAML event %d",
                       mark_where(ld, ev->start_mark, pos, sizeof pos), (int)ev->type);
    }
    if (anchor)
        return KD_FAIL(KD_ERR_CONFIG, "%s: YAML anchors (&%s) are not supported",
                       mark_where(ld, ev->start_mark, pos, sizeof pos), (const char *)anchor);
    if (tag && strcmp((const char *)tag, plain_tag) != 0)
        return KD_FAIL(KD_ERR_CONFIG, "%s: YAML tag '%s' is not supported",
                       mark_where(ld, ev->start_mark, pos, sizeof pos), (const char *)tag);
    return KD_OK;
}

static kd_status parse_node(kd_loader *ld, yaml_event_t *ev, int depth, kd_node **out);

static kd_status scalar_text(const yaml_event_t *ev, char **out)
{
    size_t n = ev->data.scalar.length;
    *out = malloc(n + 1);
    if (!*out)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory building the config tree");
    memcpy(*out, ev->data.scalar.value, n);
    (*out)[n] = '\0';
    return KD_OK;
}

static kd_status parse_seq_items(kd_loader *ld, kd_node *seq, int depth)
{
    for (;;) {
        yaml_event_t ev;
        KD_TRY(next_event(ld, &ev));
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            return KD_OK;
        }
        kd_node *child;
        KD_TRY(parse_node(ld, &ev, depth + 1, &child));
        KD_TRY(node_append(seq, NULL, 0, 0, child));
    }
}

static kd_status parse_map_items(kd_loader *ld, kd_node *map, int depth)
{
    char pos[512], first[512];
    for (;;) {
        yaml_event_t ev;
        KD_TRY(next_event(ld, &ev));
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            return KD_OK;
        }
        kd_status st = check_props(ld, &ev);
        if (st == KD_OK && ev.type != YAML_SCALAR_EVENT)
            st = KD_FAIL(KD_ERR_CONFIG, "%s: mapping keys must be plain text, not a %s",
                         mark_where(ld, ev.start_mark, pos, sizeof pos),
                         ev.type == YAML_MAPPING_START_EVENT ? "mapping" : "list");
        char *key = NULL;
        if (st == KD_OK)
            st = scalar_text(&ev, &key);
        int kl = mark_line(ld, ev.start_mark), kc = mark_col(ld, ev.start_mark);
        yaml_event_delete(&ev);
        if (st != KD_OK)
            return st;
        long dup = map_find(map, key);
        if (dup >= 0) {
            format_pos(ld->name, kl, kc, pos, sizeof pos);
            format_pos(ld->name, map->key_line[dup], map->key_col[dup], first, sizeof first);
            st = KD_FAIL(KD_ERR_CONFIG, "%s: duplicate key '%s' (first defined at %s)", pos, key,
                         first);
            free(key);
            return st;
        }
        st = next_event(ld, &ev);
        if (st != KD_OK) {
            free(key);
            return st;
        }
        kd_node *child;
        st = parse_node(ld, &ev, depth + 1, &child);
        if (st != KD_OK) {
            free(key);
            return st;
        }
        KD_TRY(node_append(map, key, kl, kc, child));
    }
}

/* Build the node that starts with *ev; the event is consumed (deleted) either way. */
static kd_status parse_node(kd_loader *ld, yaml_event_t *ev, int depth, kd_node **out)
{
    char pos[512];
    *out = NULL;
    kd_status st = check_props(ld, ev);
    if (st == KD_OK && depth > KD_YAML_MAX_DEPTH)
        st = KD_FAIL(KD_ERR_CONFIG, "%s: nesting deeper than %d levels",
                     mark_where(ld, ev->start_mark, pos, sizeof pos), KD_YAML_MAX_DEPTH);
    if (st != KD_OK) {
        yaml_event_delete(ev);
        return st;
    }
    kd_node_kind kind = ev->type == YAML_SCALAR_EVENT           ? KD_NODE_SCALAR
                        : ev->type == YAML_SEQUENCE_START_EVENT ? KD_NODE_SEQ
                                                                : KD_NODE_MAP;
    kd_node *n =
        node_new(kind, ld->name, mark_line(ld, ev->start_mark), mark_col(ld, ev->start_mark));
    if (!n) {
        yaml_event_delete(ev);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory building the config tree");
    }
    if (kind == KD_NODE_SCALAR) {
        /* Block scalars (| and >) count as quoted: YAML never resolves them to numbers. */
        n->quoted = ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE || ev->data.scalar.tag;
        st = scalar_text(ev, &n->value);
        yaml_event_delete(ev);
    } else {
        yaml_event_delete(ev);
        st = kind == KD_NODE_SEQ ? parse_seq_items(ld, n, depth) : parse_map_items(ld, n, depth);
    }
    if (st != KD_OK) {
        kd_node_free(n);
        return st;
    }
    *out = n;
    return KD_OK;
}

static int is_null(const kd_node *n)
{
    return n->kind == KD_NODE_SCALAR && !n->quoted &&
           (!n->value[0] || !strcmp(n->value, "~") || !strcmp(n->value, "null") ||
            !strcmp(n->value, "Null") || !strcmp(n->value, "NULL"));
}

int kd_node_is_null(const kd_node *n) { return !n || is_null(n); }

/*
 * Parse one stream holding at most one document. A config file with no
 * document or a null one means "no settings", hence an empty MAP; a --set
 * value keeps its null scalar so "key=" can clear a setting.
 */
static kd_status load_text(const char *text, size_t len, const char *name, int set_mode,
                           kd_node **out)
{
    kd_loader ld = {.name = name, .set_mode = set_mode};
    kd_node *root = NULL;
    yaml_event_t ev;
    char pos[512];
    *out = NULL;
    if (!yaml_parser_initialize(&ld.parser))
        return KD_FAIL(KD_ERR_NOMEM, "%s: out of memory starting the YAML parser", name);
    yaml_parser_set_input_string(&ld.parser, (const unsigned char *)text, len);
    kd_status st = next_event(&ld, &ev); /* stream start */
    if (st == KD_OK) {
        yaml_event_delete(&ev);
        st = next_event(&ld, &ev);
    }
    if (st == KD_OK && ev.type == YAML_DOCUMENT_START_EVENT) {
        yaml_event_delete(&ev);
        st = next_event(&ld, &ev);
        if (st == KD_OK)
            st = parse_node(&ld, &ev, 0, &root);
        if (st == KD_OK)
            st = next_event(&ld, &ev); /* document end */
        if (st == KD_OK) {
            yaml_event_delete(&ev);
            st = next_event(&ld, &ev);
        }
        if (st == KD_OK && ev.type == YAML_DOCUMENT_START_EVENT) {
            st =
                KD_FAIL(KD_ERR_CONFIG, "%s: a second YAML document starts here; a config holds one",
                        mark_where(&ld, ev.start_mark, pos, sizeof pos));
            yaml_event_delete(&ev);
        }
    }
    if (st == KD_OK)
        yaml_event_delete(&ev); /* stream end */
    yaml_parser_delete(&ld.parser);
    if (st != KD_OK) {
        kd_node_free(root);
        return st;
    }
    if (root && (set_mode || !is_null(root))) {
        *out = root;
        return KD_OK;
    }
    kd_node_free(root);
    root =
        node_new(set_mode ? KD_NODE_SCALAR : KD_NODE_MAP, name, set_mode ? 0 : 1, set_mode ? 0 : 1);
    if (root && set_mode && !(root->value = dup_str(""))) {
        kd_node_free(root);
        root = NULL;
    }
    if (!root)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory building the config tree");
    *out = root;
    return KD_OK;
}

kd_status kd_yaml_load_string(const char *text, const char *name, kd_node **out)
{
    if (!out)
        return KD_FAIL(KD_ERR_INVALID, "kd_yaml_load_string: out is NULL");
    *out = NULL;
    if (!text || !name)
        return KD_FAIL(KD_ERR_INVALID, "kd_yaml_load_string: text and name are required");
    return load_text(text, strlen(text), name, 0, out);
}

#define KD_YAML_MAX_BYTES (16 << 20)

kd_status kd_yaml_load_file(const char *path, kd_node **out)
{
    if (!out)
        return KD_FAIL(KD_ERR_INVALID, "kd_yaml_load_file: out is NULL");
    *out = NULL;
    if (!path)
        return KD_FAIL(KD_ERR_INVALID, "kd_yaml_load_file: path is NULL");
    FILE *f = fopen(path, "rb");
    if (!f)
        return KD_FAIL(KD_ERR_NOT_FOUND, "cannot open config '%s': %s", path, strerror(errno));
    /* Read it all first so a read error (a directory, say) is told apart from bad YAML; a job
     * file is a few kilobytes, so past KD_YAML_MAX_BYTES (/dev/zero, a data file named by
     * mistake) reading stops instead of filling memory. */
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    int err = 0, too_big = 0;
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (ferror(f)) {
            err = errno ? errno : EIO;
            break;
        }
        if (len < cap)
            break;
        if (cap >= KD_YAML_MAX_BYTES) {
            too_big = 1;
            break;
        }
        char *grown = realloc(buf, cap * 2);
        if (!grown)
            free(buf);
        buf = grown;
        cap *= 2;
    }
    fclose(f);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory reading config '%s'", path);
    kd_status st;
    if (err)
        st = KD_FAIL(KD_ERR_NOT_FOUND, "cannot open config '%s': %s", path, strerror(err));
    else if (too_big)
        st = KD_FAIL(KD_ERR_CONFIG, "config '%s' is larger than %d MiB: not a YAML job file", path,
                     KD_YAML_MAX_BYTES >> 20);
    else
        st = load_text(buf, len, path, 0, out);
    free(buf);
    return st;
}

/* ---- checks and getters --------------------------------------------------------------------- */

kd_status kd_node_check_keys(const kd_node *map, const char *const *allowed, const char *what)
{
    char pos[512];
    if (!map)
        return KD_OK;
    if (map->kind != KD_NODE_MAP)
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be a mapping",
                       kd_node_where(map, pos, sizeof pos), what);
    for (size_t i = 0; i < map->len; i++) {
        int ok = 0;
        for (size_t k = 0; allowed && allowed[k]; k++)
            ok |= strcmp(allowed[k], map->keys[i]) == 0;
        if (ok)
            continue;
        char list[1024];
        size_t used = 0;
        list[0] = '\0';
        for (size_t k = 0; allowed && allowed[k] && used < sizeof list; k++) {
            int w = snprintf(list + used, sizeof list - used, "%s%s", k ? ", " : "", allowed[k]);
            used += w > 0 ? (size_t)w : 0;
        }
        /* Point at the key itself; a key made by --set has no position, so name the override. */
        if (map->key_line && map->key_line[i] > 0)
            format_pos(map->file, map->key_line[i], map->key_col[i], pos, sizeof pos);
        else
            kd_node_where(map->items[i], pos, sizeof pos);
        return KD_FAIL(KD_ERR_CONFIG, "%s: unknown key '%s' in %s (allowed: %s)", pos, map->keys[i],
                       what, list[0] ? list : "none");
    }
    return KD_OK;
}

/* Decimal integer: optional sign then digits only, so "1.5", "1e3" and " 5" are refused. */
static int parse_int(const char *s, int64_t *out, int *overflow)
{
    const char *p = s + (*s == '+' || *s == '-');
    *overflow = 0;
    if (!*p)
        return 0;
    for (; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno == ERANGE) {
        *overflow = 1;
        return 0;
    }
    *out = (int64_t)v;
    return 1;
}

static int ieq(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a >= 'A' && *a <= 'Z' ? (char)(*a - 'A' + 'a') : *a;
        if (x != *b)
            return 0;
    }
    return *a == *b;
}

/*
 * Check the decimal-float grammar before calling strtod, which would also
 * take hex, "inf", "nan" and leading blanks. Returns 0 for malformed text;
 * *nonfinite is set for YAML's .inf/.nan spellings and for overflow.
 */
static int parse_float(const char *s, double *out, int *nonfinite)
{
    const char *p = s + (*s == '+' || *s == '-');
    *nonfinite = 0;
    const char *word = p + (*p == '.');
    if (ieq(word, "inf") || ieq(word, "infinity") || ieq(word, "nan")) {
        *nonfinite = 1;
        return 0;
    }
    int digits = 0;
    while (*p >= '0' && *p <= '9')
        p++, digits++;
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9')
            p++, digits++;
    }
    if (!digits)
        return 0;
    if (*p == 'e' || *p == 'E') {
        p++;
        p += *p == '+' || *p == '-';
        if (*p < '0' || *p > '9')
            return 0;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p)
        return 0;
    double v = strtod(s, NULL);
    if (!isfinite(v)) {
        *nonfinite = 1;
        return 0;
    }
    *out = v;
    return 1;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = {"true", "yes", "on"};
    static const char *const no[] = {"false", "no", "off"};
    for (int i = 0; i < 3; i++) {
        if (ieq(s, yes[i])) {
            *out = 1;
            return 1;
        }
        if (ieq(s, no[i])) {
            *out = 0;
            return 1;
        }
    }
    return 0;
}

/*
 * The "wrong type" message. hint explains near misses: a quoted "5" is a
 * string by YAML's rules, which surprises people more than a plain typo.
 */
static kd_status type_error(const kd_node *n, const char *what, const char *want, const char *hint)
{
    char pos[512];
    kd_node_where(n, pos, sizeof pos);
    if (n->kind == KD_NODE_MAP)
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be %s, got a mapping", pos, what, want);
    if (n->kind == KD_NODE_SEQ)
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be %s, got a list", pos, what, want);
    if (is_null(n))
        return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be %s, got null", pos, what, want);
    return KD_FAIL(KD_ERR_CONFIG, "%s: %s must be %s, got '%s'%s", pos, what, want, n->value,
                   hint ? hint : "");
}

#define QUOTED_HINT " (quoted, so a string)"

kd_status kd_node_as_int(const kd_node *n, const char *what, int64_t *out)
{
    int64_t v;
    int overflow;
    if (!n)
        return KD_FAIL(KD_ERR_INVALID, "%s: no value", what);
    if (n->kind != KD_NODE_SCALAR || is_null(n))
        return type_error(n, what, "an integer", NULL);
    int ok = parse_int(n->value, &v, &overflow);
    if (overflow)
        return type_error(n, what, "an integer", " (out of range)");
    if (!ok || n->quoted)
        return type_error(n, what, "an integer", ok ? QUOTED_HINT : NULL);
    *out = v;
    return KD_OK;
}

kd_status kd_node_as_float(const kd_node *n, const char *what, double *out)
{
    double v;
    int nonfinite;
    if (!n)
        return KD_FAIL(KD_ERR_INVALID, "%s: no value", what);
    if (n->kind != KD_NODE_SCALAR || is_null(n))
        return type_error(n, what, "a number", NULL);
    int ok = parse_float(n->value, &v, &nonfinite);
    if (nonfinite)
        return type_error(n, what, "a finite number", NULL);
    if (!ok || n->quoted)
        return type_error(n, what, "a number", ok ? QUOTED_HINT : NULL);
    *out = v;
    return KD_OK;
}

kd_status kd_node_as_bool(const kd_node *n, const char *what, int *out)
{
    int v;
    if (!n)
        return KD_FAIL(KD_ERR_INVALID, "%s: no value", what);
    if (n->kind != KD_NODE_SCALAR || is_null(n))
        return type_error(n, what, "true or false", NULL);
    int ok = parse_bool(n->value, &v);
    if (!ok || n->quoted)
        return type_error(n, what, "true or false", ok ? QUOTED_HINT : NULL);
    *out = v;
    return KD_OK;
}

kd_status kd_node_as_str(const kd_node *n, const char *what, const char **out)
{
    if (!n)
        return KD_FAIL(KD_ERR_INVALID, "%s: no value", what);
    if (n->kind != KD_NODE_SCALAR || is_null(n))
        return type_error(n, what, "a string", NULL);
    *out = n->value;
    return KD_OK;
}

/* Find map[key] for a getter; *child stays NULL when the getter should leave *out alone. */
static kd_status get_entry(const kd_node *map, const char *key, int required, const kd_node **child,
                           char *what, size_t what_len)
{
    char pos[512];
    *child = NULL;
    snprintf(what, what_len, "'%s'", key);
    if (map && map->kind != KD_NODE_MAP)
        return KD_FAIL(KD_ERR_CONFIG, "%s: expected a mapping holding '%s'",
                       kd_node_where(map, pos, sizeof pos), key);
    const kd_node *c = kd_node_child(map, key);
    if (c && !is_null(c)) {
        *child = c;
        return KD_OK;
    }
    if (required)
        return KD_FAIL(KD_ERR_CONFIG, "%s: missing required key '%s'",
                       kd_node_where(map, pos, sizeof pos), key);
    return KD_OK;
}

kd_status kd_node_get_int(const kd_node *map, const char *key, int required, int64_t *out)
{
    const kd_node *c;
    char what[256];
    KD_TRY(get_entry(map, key, required, &c, what, sizeof what));
    return c ? kd_node_as_int(c, what, out) : KD_OK;
}

kd_status kd_node_get_float(const kd_node *map, const char *key, int required, double *out)
{
    const kd_node *c;
    char what[256];
    KD_TRY(get_entry(map, key, required, &c, what, sizeof what));
    return c ? kd_node_as_float(c, what, out) : KD_OK;
}

kd_status kd_node_get_bool(const kd_node *map, const char *key, int required, int *out)
{
    const kd_node *c;
    char what[256];
    KD_TRY(get_entry(map, key, required, &c, what, sizeof what));
    return c ? kd_node_as_bool(c, what, out) : KD_OK;
}

kd_status kd_node_get_str(const kd_node *map, const char *key, int required, const char **out)
{
    const kd_node *c;
    char what[256];
    KD_TRY(get_entry(map, key, required, &c, what, sizeof what));
    return c ? kd_node_as_str(c, what, out) : KD_OK;
}

/* ---- --set overrides ------------------------------------------------------------------------ */

/*
 * Walk the path, creating what is missing, then hang val at the end. Every
 * check that can fail happens before the first change to the tree (once a map
 * is created or a null converted, the rest of the path is all new), so a
 * failed override leaves the tree as it was. val is consumed either way.
 */
static kd_status set_walk(kd_node *root, char *path, const char *label, kd_node *val)
{
    char pos[512];
    kd_status st;
    kd_node *cur = root;
    char *comp = path;
    for (;;) {
        char *dot = strchr(comp, '.');
        if (dot)
            *dot = '\0';
        /* comp[-1] is the separator we cut, so path now reads as the prefix walked so far. */
        const char *prefix = comp == path ? "the root" : path;
        if (cur->kind == KD_NODE_SCALAR) {
            if (!is_null(cur)) {
                if (comp != path)
                    comp[-1] = '\0';
                st = KD_FAIL(KD_ERR_CONFIG,
                             "%s: cannot set '%s': %s at %s is a scalar ('%s'), "
                             "not a mapping",
                             label, comp, prefix, kd_node_where(cur, pos, sizeof pos), cur->value);
                goto fail;
            }
            free(cur->value);
            cur->value = NULL;
            cur->kind = KD_NODE_MAP;
            cur->quoted = 0;
        }
        kd_node **slot = NULL;
        if (cur->kind == KD_NODE_SEQ) {
            char *end;
            errno = 0;
            unsigned long long idx = strtoull(comp, &end, 10);
            if (comp[0] < '0' || comp[0] > '9' || *end || errno) {
                if (comp != path)
                    comp[-1] = '\0';
                st = KD_FAIL(KD_ERR_CONFIG, "%s: '%s' is not a list index; %s at %s is a list",
                             label, comp, prefix, kd_node_where(cur, pos, sizeof pos));
                goto fail;
            }
            if (idx >= cur->len) {
                if (comp != path)
                    comp[-1] = '\0';
                st = KD_FAIL(KD_ERR_CONFIG,
                             "%s: index %llu is out of range; %s at %s has %zu item%s", label, idx,
                             prefix, kd_node_where(cur, pos, sizeof pos), cur->len,
                             cur->len == 1 ? "" : "s");
                goto fail;
            }
            slot = &cur->items[idx];
        } else {
            long i = map_find(cur, comp);
            if (i >= 0) {
                slot = &cur->items[i];
            } else {
                char *key = dup_str(comp);
                kd_node *fresh = dot ? node_new(KD_NODE_MAP, label, 0, 0) : val;
                if (!key || !fresh) {
                    free(key);
                    if (fresh != val)
                        kd_node_free(fresh);
                    kd_node_free(val);
                    return KD_FAIL(KD_ERR_NOMEM, "%s: out of memory", label);
                }
                if (!dot)
                    return node_append(cur, key, 0, 0, val);
                st = node_append(cur, key, 0, 0, fresh);
                if (st != KD_OK) {
                    kd_node_free(val);
                    return st;
                }
                slot = &cur->items[cur->len - 1];
            }
        }
        if (!dot) {
            kd_node_free(*slot);
            *slot = val;
            return KD_OK;
        }
        *dot = '.';
        cur = *slot;
        comp = dot + 1;
    }
fail:
    kd_node_free(val);
    return st;
}

kd_status kd_node_set_path(kd_node *root, const char *assignment)
{
    if (!root || !assignment)
        return KD_FAIL(KD_ERR_INVALID, "kd_node_set_path: root and assignment are required");
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return KD_FAIL(KD_ERR_INVALID, "--set expects key.path=value, got '%s'", assignment);
    size_t plen = (size_t)(eq - assignment);
    size_t llen = strlen("--set ") + strlen(assignment) + 1;
    char *label = malloc(llen);
    char *path = malloc(plen + 1);
    if (!label || !path) {
        free(label);
        free(path);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory applying --set");
    }
    snprintf(label, llen, "--set %s", assignment);
    memcpy(path, assignment, plen);
    path[plen] = '\0';
    kd_status st = KD_OK;
    for (size_t i = 0; i <= plen; i++) {
        int at_end = i == plen || path[i] == '.';
        int empty = at_end && (i == 0 || path[i - 1] == '.');
        if (empty) {
            st = KD_FAIL(KD_ERR_INVALID, "%s: empty component in key path '%s'", label, path);
            break;
        }
    }
    kd_node *val = NULL;
    if (st == KD_OK)
        st = load_text(eq + 1, strlen(eq + 1), label, 1, &val);
    if (st == KD_OK)
        st = set_walk(root, path, label, val);
    free(path);
    free(label);
    return st;
}

/* ---- writing and comparing ------------------------------------------------------------------ */

/* Unicode characters YAML treats as line breaks or a byte-order mark; never written raw. */
static int special_utf8(const unsigned char *p)
{
    if (p[0] == 0xC2 && p[1] == 0x85)
        return 2;
    if (p[0] == 0xE2 && p[1] == 0x80 && (p[2] == 0xA8 || p[2] == 0xA9))
        return 3;
    if (p[0] == 0xEF && p[1] == 0xBB && p[2] == 0xBF)
        return 3;
    return 0;
}

/*
 * Whether s reads back as the same plain scalar in block context. Deliberately
 * conservative: a false "no" only costs quotes (for keys) or the quoted flag
 * (for values, which only nodes not made by the loader can hit).
 */
static int plain_safe(const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s);
    if (n == 0 || n > 1000)
        return 0;
    if (strchr("#&*!|>'\"%@`,[]{}", s[0]))
        return 0;
    if ((s[0] == '-' || s[0] == '?' || s[0] == ':') && (n == 1 || s[1] == ' ' || s[1] == '\t'))
        return 0;
    if (!strncmp(s, "---", 3) || !strncmp(s, "...", 3))
        return 0;
    if (s[0] == ' ' || s[0] == '\t' || s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == ':')
        return 0;
    for (size_t i = 0; i < n; i++) {
        int blank_next = s[i + 1] == ' ' || s[i + 1] == '\t';
        if ((u[i] < 0x20 && u[i] != '\t') || u[i] == 0x7F || special_utf8(u + i))
            return 0;
        if (s[i] == ':' && blank_next)
            return 0;
        if ((s[i] == ' ' || s[i] == '\t') && s[i + 1] == '#')
            return 0;
    }
    return 1;
}

static void write_quoted(const char *s, FILE *f)
{
    const unsigned char *u = (const unsigned char *)s;
    fputc('"', f);
    for (size_t i = 0; u[i]; i++) {
        int sp = special_utf8(u + i);
        if (sp) {
            fputs(u[i] == 0xC2       ? "\\N"
                  : u[i] == 0xEF     ? "\\uFEFF"
                  : u[i + 2] == 0xA8 ? "\\L"
                                     : "\\P",
                  f);
            i += (size_t)sp - 1;
        } else if (u[i] == '"' || u[i] == '\\') {
            fputc('\\', f);
            fputc(u[i], f);
        } else if (u[i] == '\n') {
            fputs("\\n", f);
        } else if (u[i] == '\t') {
            fputs("\\t", f);
        } else if (u[i] == '\r') {
            fputs("\\r", f);
        } else if (u[i] < 0x20 || u[i] == 0x7F) {
            fprintf(f, "\\x%02X", u[i]);
        } else {
            fputc(u[i], f);
        }
    }
    fputc('"', f);
}

static int is_inline(const kd_node *n) { return n->kind == KD_NODE_SCALAR || n->len == 0; }

static void write_inline(const kd_node *n, FILE *f)
{
    if (n->kind == KD_NODE_MAP)
        fputs("{}", f);
    else if (n->kind == KD_NODE_SEQ)
        fputs("[]", f);
    else if (!n->quoted && plain_safe(n->value))
        fputs(n->value, f);
    else
        write_quoted(n->value, f);
}

/* first_inline: the caller already wrote "- " so the first entry continues that line. */
static void write_block(const kd_node *n, FILE *f, int indent, int first_inline)
{
    for (size_t i = 0; i < n->len; i++) {
        if (i > 0 || !first_inline)
            fprintf(f, "%*s", indent, "");
        if (n->kind == KD_NODE_MAP) {
            if (plain_safe(n->keys[i]))
                fputs(n->keys[i], f);
            else
                write_quoted(n->keys[i], f);
            fputc(':', f);
        } else {
            fputc('-', f);
        }
        const kd_node *c = n->items[i];
        if (is_inline(c)) {
            /* An unquoted empty scalar is written as nothing at all, which reads back as one. */
            if (!(c->kind == KD_NODE_SCALAR && !c->quoted && !c->value[0])) {
                fputc(' ', f);
                write_inline(c, f);
            }
            fputc('\n', f);
        } else if (n->kind == KD_NODE_MAP) {
            fputc('\n', f);
            write_block(c, f, indent + 2, 0);
        } else {
            fputc(' ', f);
            write_block(c, f, indent + 2, 1);
        }
    }
}

kd_status kd_node_write_yaml(const kd_node *n, FILE *f)
{
    if (!n || !f)
        return KD_FAIL(KD_ERR_INVALID, "kd_node_write_yaml: node and stream are required");
    errno = 0;
    if (is_inline(n)) {
        write_inline(n, f);
        fputc('\n', f);
    } else {
        write_block(n, f, 0, 0);
    }
    if (ferror(f) || fflush(f) != 0)
        return KD_FAIL(KD_ERR_IO, "writing YAML config: %s", strerror(errno ? errno : EIO));
    return KD_OK;
}

int kd_node_equal(const kd_node *a, const kd_node *b)
{
    if (!a || !b)
        return a == b;
    if (a->kind != b->kind)
        return 0;
    if (a->kind == KD_NODE_SCALAR)
        return a->quoted == b->quoted && strcmp(a->value, b->value) == 0;
    if (a->len != b->len)
        return 0;
    for (size_t i = 0; i < a->len; i++) {
        if (a->kind == KD_NODE_MAP && strcmp(a->keys[i], b->keys[i]) != 0)
            return 0;
        if (!kd_node_equal(a->items[i], b->items[i]))
            return 0;
    }
    return 1;
}
