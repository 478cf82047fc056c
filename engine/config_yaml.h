/*
 * config_yaml.h - the YAML config tree read from job and model files.
 *
 * A loaded file becomes a tree of kd_node: scalars keep their text exactly
 * as written (conversion to numbers happens only in the typed getters, so a
 * message can quote what the user typed), and every node remembers the file
 * and 1-based line:column where it starts so errors point at the culprit.
 * Invariants: a tree owns all its strings and children; MAP keys are unique;
 * nodes made by --set overrides have line 0 and file "--set <assignment>".
 * Anchors, aliases, tags other than !!str and multiple documents are refused
 * rather than half-supported.
 */
#ifndef KD_CONFIG_YAML_H
#define KD_CONFIG_YAML_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KD_NODE_SCALAR, KD_NODE_MAP, KD_NODE_SEQ } kd_node_kind;

typedef struct kd_node kd_node;
struct kd_node {
    kd_node_kind kind;
    const char *file; /* file name for messages; "--set ..." for override nodes; owned */
    int line, col;    /* 1-based position where the node starts (0 for --set nodes) */
    char *value;      /* SCALAR: its text ("" for an empty scalar) */
    int quoted;       /* SCALAR: written quoted or as a block scalar, so never a number/bool/null */
    size_t len;       /* MAP/SEQ: number of children */
    char **keys;      /* MAP: keys[i] names items[i] */
    kd_node **items;  /* MAP and SEQ children */
    int *key_line;    /* MAP: where keys[i] starts (0 for keys made by --set) */
    int *key_col;
};

/*
 * Parse the YAML file at path into a new tree stored in *out; the caller
 * frees it with kd_node_free. An empty file (or one with only comments or a
 * null document) gives an empty MAP. On failure *out is NULL and nothing is
 * left allocated: KD_ERR_NOT_FOUND when the file cannot be opened or read,
 * KD_ERR_CONFIG for syntax errors, duplicate keys, aliases, anchors, tags and
 * multiple documents (messages start with "path:line:col:"), KD_ERR_NOMEM.
 */
kd_status kd_yaml_load_file(const char *path, kd_node **out);

/* As kd_yaml_load_file for text in memory; name stands for the file in messages. */
kd_status kd_yaml_load_string(const char *text, const char *name, kd_node **out);

/* Free a whole tree (NULL is fine). Never free a node that is still inside a tree. */
void kd_node_free(kd_node *n);

/* 1 when n is NULL or an unquoted null scalar ("", "~", "null"): what the getters take as
 * absent. */
int kd_node_is_null(const kd_node *n);

/* The value under key, or NULL when map is NULL, not a MAP, or lacks the key. */
kd_node *kd_node_child(const kd_node *map, const char *key);

/*
 * Fail with KD_ERR_CONFIG unless every key of map is in allowed (a
 * NULL-terminated list). what names the map in messages ("optim"). A map
 * that is not a MAP fails with "<where>: <what> must be a mapping"; NULL
 * passes (an absent section has no keys to check).
 */
kd_status kd_node_check_keys(const kd_node *map, const char *const *allowed, const char *what);

/*
 * Typed getters for map[key]. A key that is absent or holds an unquoted null
 * ("", "~", "null") leaves *out untouched and returns KD_OK, unless required,
 * when it fails with KD_ERR_CONFIG "<where of map>: missing required key".
 * A value of the wrong type fails with KD_ERR_CONFIG naming its position and
 * text; *out is untouched on any failure. map may be NULL (everything absent).
 *   int:   decimal integer that fits in int64_t (no 1.5, no 1e3, no 0x10)
 *   float: decimal or exponent notation; must be finite (no .inf / .nan)
 *   bool:  unquoted true/false/yes/no/on/off, any letter case
 *   str:   any scalar; *out points into the tree and lives as long as it
 */
kd_status kd_node_get_int(const kd_node *map, const char *key, int required, int64_t *out);
kd_status kd_node_get_float(const kd_node *map, const char *key, int required, double *out);
kd_status kd_node_get_bool(const kd_node *map, const char *key, int required, int *out);
kd_status kd_node_get_str(const kd_node *map, const char *key, int required, const char **out);

/*
 * The same conversions for a node itself (list items). what names it in
 * messages ("input dimension" gives "... input dimension must be an integer,
 * got 'x'"). A null node is a type error here, not "absent".
 */
kd_status kd_node_as_int(const kd_node *n, const char *what, int64_t *out);
kd_status kd_node_as_float(const kd_node *n, const char *what, double *out);
kd_status kd_node_as_bool(const kd_node *n, const char *what, int *out);
kd_status kd_node_as_str(const kd_node *n, const char *what, const char **out);

/*
 * Apply a command-line override "a.b.c=value" to root. The value is parsed as
 * a YAML flow value, so "[1,28,28]", "{hflip: true}" and "'007'" work. Path
 * components walk maps by key and lists by numeric index (which must be in
 * range). Missing map keys along the path are created as empty maps, and an
 * unquoted null met on the way is turned into an empty map; any other scalar
 * there is an error. The replaced subtree is freed. Errors: KD_ERR_INVALID
 * when there is no '=' or a path component is empty, KD_ERR_CONFIG for a bad
 * value or path; on failure root is unchanged (barring KD_ERR_NOMEM).
 */
kd_status kd_node_set_path(kd_node *root, const char *assignment);

/*
 * Write the tree as block-style YAML that kd_yaml_load_* reads back into an
 * equal tree (kd_node_equal). Scalars that could be misread are quoted, and
 * quoted scalars stay quoted. KD_ERR_IO when the stream reports an error.
 */
kd_status kd_node_write_yaml(const kd_node *n, FILE *f);

/* 1 when a and b have the same shape, keys (in order), texts and quoting; positions ignored. */
int kd_node_equal(const kd_node *a, const kd_node *b);

/*
 * Format n's position as "file:line:col", or just the file ("--set a.b=1")
 * for override nodes, into buf and return buf. NULL n gives "<unknown>".
 */
const char *kd_node_where(const kd_node *n, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
