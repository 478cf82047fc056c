/*
 * safetensors.c - the safetensors format, written atomically, read with full validation.
 *
 * Writing: tensors go into the byte buffer back to back in the order given
 * (the format forbids holes, so no per-tensor padding); the JSON header is
 * padded with spaces to a multiple of 8 bytes so the buffer starts 8-byte
 * aligned. Reading: nothing from the file is trusted until checked. Every
 * entry must be well formed, lie inside the buffer, be exactly as large as
 * its shape says and not overlap another. Each tensor is then copied to its
 * own 64-byte aligned slot of one arena, so entry data is aligned even for
 * files from other writers (whose header length need not be a multiple of 8,
 * and whose tensors may start at odd offsets). Holes between tensors are
 * tolerated on read. Names and metadata strings live in the parsed cJSON
 * tree, which the handle keeps until close.
 */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"

/* Tensor bytes are copied verbatim between memory and file; the format is little-endian. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

#define KD_ST_MAX_HEADER (100u * 1024u * 1024u)
#define KD_ST_ALIGN      64
/* Largest integer a JSON number (a double in cJSON) holds exactly. */
#define KD_ST_MAX_JSON_INT 9007199254740992.0

struct kd_safetensors {
    cJSON *root;          /* owns every name and metadata string */
    const cJSON *meta;    /* the "__metadata__" object inside root, or NULL */
    kd_st_entry *entries; /* header order */
    size_t n;
    const kd_st_entry **by_name; /* entries sorted by name, for bsearch */
    unsigned char *arena;        /* all tensor data, each tensor KD_ST_ALIGN aligned */
};

/* ---- writing ------------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} strbuf;

static void sb_put(strbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 256;
        while (ncap < b->len + n + 1)
            ncap *= 2;
        char *np = realloc(b->p, ncap);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(strbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_printf(strbuf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void sb_printf(strbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        b->oom = 1; /* only used for short numeric fragments; cannot happen */
        return;
    }
    sb_put(b, tmp, (size_t)n);
}

/* A JSON string literal; bytes >= 0x80 pass through, since names are UTF-8. */
static void sb_json_str(strbuf *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            sb_put(b, esc, 2);
        } else if (*p < 0x20) {
            sb_printf(b, "\\u%04x", *p);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

/* numel * itemsize of a shape, or -1 on overflow or a negative dimension. */
static int checked_nbytes(const int64_t *shape, int ndim, size_t itemsize, uint64_t *out)
{
    uint64_t n = itemsize;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return -1;
        uint64_t dim = (uint64_t)shape[d];
        if (dim != 0 && n > UINT64_MAX / dim)
            return -1;
        n *= dim;
    }
    *out = n;
    return 0;
}

static int cmp_cstr_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

typedef struct {
    const strbuf *header;
    const kd_st_entry *entries;
    const uint64_t *nbytes;
    size_t n;
} save_ctx;

static kd_status write_body(FILE *f, void *vctx)
{
    const save_ctx *c = vctx;
    unsigned char len8[8];
    uint64_t hlen = c->header->len;
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(hlen >> (8 * i));
    KD_TRY(kd_fwrite_all(f, len8, sizeof len8, "header length"));
    KD_TRY(kd_fwrite_all(f, c->header->p, c->header->len, "header"));
    for (size_t i = 0; i < c->n; i++) {
        kd_status st = kd_fwrite_all(f, c->entries[i].data, (size_t)c->nbytes[i], "tensor data");
        if (st != KD_OK)
            return kd_fail_context(st, "tensor '%s': ", c->entries[i].name);
    }
    return KD_OK;
}

kd_status kd_safetensors_save(const char *path, const kd_st_entry *entries, size_t n,
                              const char *const *meta_kv, size_t n_meta_pairs)
{
    if (!path || (n && !entries) || (n_meta_pairs && !meta_kv))
        return KD_FAIL(KD_ERR_INVALID, "saving '%s': NULL path, entries or metadata",
                       path ? path : "(null)");
    kd_status st = KD_OK;
    strbuf hb = {0};
    uint64_t *nbytes = calloc(n + 1, sizeof *nbytes);
    const char **names = calloc(n + 1, sizeof *names);
    if (!nbytes || !names) {
        st = KD_FAIL(KD_ERR_NOMEM, "saving '%s': out of memory", path);
        goto done;
    }

    for (size_t i = 0; i < n; i++) {
        const kd_st_entry *e = &entries[i];
        if (!e->name || !strcmp(e->name, "__metadata__")) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': entry %zu has %s name", path, i,
                         e->name ? "the reserved" : "a NULL");
            goto done;
        }
        size_t isz = kd_dtype_size(e->dtype);
        if (isz == 0) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': tensor '%s' has unknown dtype %d", path,
                         e->name, (int)e->dtype);
            goto done;
        }
        if (e->ndim < 0 || e->ndim > KD_MAX_DIMS) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': tensor '%s' has ndim %d (0..%d allowed)",
                         path, e->name, e->ndim, KD_MAX_DIMS);
            goto done;
        }
        if (checked_nbytes(e->shape, e->ndim, isz, &nbytes[i]) != 0 || nbytes[i] > SIZE_MAX) {
            char sh[128];
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': tensor '%s' has invalid shape %s", path,
                         e->name, kd_shape_str(e->shape, e->ndim, sh, sizeof sh));
            goto done;
        }
        if (nbytes[i] && !e->data) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': tensor '%s' has no data", path, e->name);
            goto done;
        }
        names[i] = e->name;
    }
    /* Duplicate names would silently shadow each other on load. */
    qsort(names, n, sizeof *names, cmp_cstr_ptr);
    for (size_t i = 1; i < n; i++) {
        if (!strcmp(names[i - 1], names[i])) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': duplicate tensor name '%s'", path, names[i]);
            goto done;
        }
    }
    for (size_t i = 0; i < n_meta_pairs; i++) {
        if (!meta_kv[2 * i] || !meta_kv[2 * i + 1]) {
            st = KD_FAIL(KD_ERR_INVALID, "saving '%s': metadata pair %zu has a NULL key or value",
                         path, i);
            goto done;
        }
    }

    sb_puts(&hb, "{");
    if (n_meta_pairs) {
        sb_puts(&hb, "\"__metadata__\":{");
        for (size_t i = 0; i < n_meta_pairs; i++) {
            if (i)
                sb_puts(&hb, ",");
            sb_json_str(&hb, meta_kv[2 * i]);
            sb_puts(&hb, ":");
            sb_json_str(&hb, meta_kv[2 * i + 1]);
        }
        sb_puts(&hb, "}");
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const kd_st_entry *e = &entries[i];
        if (i || n_meta_pairs)
            sb_puts(&hb, ",");
        sb_json_str(&hb, e->name);
        sb_printf(&hb, ":{\"dtype\":\"%s\",\"shape\":[", kd_dtype_name(e->dtype));
        for (int d = 0; d < e->ndim; d++)
            sb_printf(&hb, d ? ",%lld" : "%lld", (long long)e->shape[d]);
        sb_printf(&hb, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                  (unsigned long long)(off + nbytes[i]));
        off += nbytes[i];
    }
    sb_puts(&hb, "}");
    while (!hb.oom && hb.len % 8 != 0)
        sb_puts(&hb, " ");
    if (hb.oom) {
        st = KD_FAIL(KD_ERR_NOMEM, "saving '%s': out of memory building the header", path);
        goto done;
    }

    save_ctx ctx = {.header = &hb, .entries = entries, .nbytes = nbytes, .n = n};
    st = kd_file_write_atomic(path, write_body, &ctx);
done:
    free(hb.p);
    free(nbytes);
    free(names);
    return st;
}

/* ---- reading ------------------------------------------------------------------------------ */

/* pread all n bytes at off; 0 on success, else errno (EIO for a file that shrank). */
static int pread_all(int fd, void *buf, size_t n, uint64_t off)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return EIO;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* A JSON number that is a non-negative integer a double represents exactly. */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return 0;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= KD_ST_MAX_JSON_INT) || (double)(uint64_t)d != d)
        return 0;
    *out = (uint64_t)d;
    return 1;
}

typedef struct {
    uint64_t begin, end;
    size_t idx;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int cmp_entry_name(const void *a, const void *b)
{
    return strcmp((*(const kd_st_entry *const *)a)->name, (*(const kd_st_entry *const *)b)->name);
}

static int cmp_key_entry(const void *key, const void *elem)
{
    return strcmp(key, (*(const kd_st_entry *const *)elem)->name);
}

/* Validate one tensor object of the header; fills e (all but data) and its byte span. */
static kd_status parse_entry(const char *path, const cJSON *item, uint64_t bufsize, kd_st_entry *e,
                             span *sp)
{
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': entry is not a JSON object", path,
                       name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!dt)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': missing 'dtype'", path, name);
    if (!cJSON_IsString(dt))
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': 'dtype' is not a string", path,
                       name);
    int dtype = kd_dtype_from_name(dt->valuestring);
    if (dtype < 0)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': unknown dtype '%s'", path, name,
                       dt->valuestring);
    if (!shape)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': missing 'shape'", path, name);
    if (!cJSON_IsArray(shape))
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': 'shape' is not an array", path,
                       name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > KD_MAX_DIMS)
        return KD_FAIL(KD_ERR_FORMAT,
                       "reading '%s': tensor '%s': %d dimensions, at most %d are supported", path,
                       name, nd, KD_MAX_DIMS);
    e->name = name;
    e->dtype = (kd_dtype)dtype;
    e->ndim = nd;
    for (int d = 0; d < KD_MAX_DIMS; d++)
        e->shape[d] = 1;
    int d = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, shape)
    {
        uint64_t u;
        if (cJSON_IsNumber(v) && v->valuedouble < 0)
            return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': negative dimension %g", path,
                           name, v->valuedouble);
        if (!json_uint(v, &u))
            return KD_FAIL(KD_ERR_FORMAT,
                           "reading '%s': tensor '%s': 'shape' element %d is not an integer", path,
                           name, d);
        e->shape[d++] = (int64_t)u;
    }
    if (!offs)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': missing 'data_offsets'", path,
                       name);
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(cJSON_GetArrayItem(offs, 0), &sp->begin) ||
        !json_uint(cJSON_GetArrayItem(offs, 1), &sp->end))
        return KD_FAIL(KD_ERR_FORMAT,
                       "reading '%s': tensor '%s': 'data_offsets' is not an array of two "
                       "non-negative integers",
                       path, name);
    if (sp->begin > sp->end)
        return KD_FAIL(KD_ERR_FORMAT,
                       "reading '%s': tensor '%s': data_offsets begin %llu > end %llu", path, name,
                       (unsigned long long)sp->begin, (unsigned long long)sp->end);
    if (sp->end > bufsize)
        return KD_FAIL(KD_ERR_FORMAT,
                       "reading '%s': tensor '%s': data_offsets end %llu is beyond the end of the "
                       "%llu-byte data buffer",
                       path, name, (unsigned long long)sp->end, (unsigned long long)bufsize);
    char sh[128];
    kd_shape_str(e->shape, e->ndim, sh, sizeof sh);
    uint64_t need;
    if (checked_nbytes(e->shape, e->ndim, kd_dtype_size(e->dtype), &need) != 0)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': tensor '%s': shape %s is too large", path,
                       name, sh);
    if (sp->end - sp->begin != need)
        return KD_FAIL(KD_ERR_FORMAT,
                       "reading '%s': tensor '%s': data_offsets span %llu bytes but shape %s of "
                       "%s needs %llu bytes",
                       path, name, (unsigned long long)(sp->end - sp->begin), sh,
                       kd_dtype_name(e->dtype), (unsigned long long)need);
    return KD_OK;
}

static kd_status parse_metadata(const char *path, kd_safetensors *s, const cJSON *item)
{
    if (s->meta)
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': '__metadata__' appears twice", path);
    /* serde (Python's writer) spells an absent optional map as null. */
    if (cJSON_IsNull(item))
        return KD_OK;
    if (!cJSON_IsObject(item))
        return KD_FAIL(KD_ERR_FORMAT, "reading '%s': '__metadata__' is not a JSON object", path);
    const cJSON *v;
    cJSON_ArrayForEach(v, item)
    {
        if (!cJSON_IsString(v))
            return KD_FAIL(KD_ERR_FORMAT, "reading '%s': metadata value of '%s' is not a string",
                           path, v->string);
    }
    s->meta = item;
    return KD_OK;
}

/* kd_safetensors_open, or with data 0 kd_safetensors_open_header */
static kd_status st_open(const char *path, int data, kd_safetensors **out)
{
    if (!path || !out)
        return KD_FAIL(KD_ERR_INVALID, "kd_safetensors_open: NULL argument");
    *out = NULL;
    kd_status st = KD_OK;
    char *header = NULL;
    span *spans = NULL;
    int fd = -1, err;
    kd_safetensors *s = calloc(1, sizeof *s);
    if (!s)
        return KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory", path);

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        err = errno;
        st = KD_FAIL(err == ENOENT ? KD_ERR_NOT_FOUND : KD_ERR_IO, "cannot open '%s': %s", path,
                     strerror(err));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = KD_FAIL(KD_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
        goto fail;
    }
    uint64_t fsize = (uint64_t)sb.st_size;
    if (fsize < 8) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "reading '%s': file is %llu bytes, shorter than 8 bytes (the header length)",
                     path, (unsigned long long)fsize);
        goto fail;
    }
    unsigned char len8[8];
    if ((err = pread_all(fd, len8, sizeof len8, 0))) {
        st = KD_FAIL(KD_ERR_IO, "reading '%s': %s", path, strerror(err));
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | len8[i];
    if (hlen > KD_ST_MAX_HEADER) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "reading '%s': header length %llu is absurd (more than 100 MB); not a "
                     "safetensors file?",
                     path, (unsigned long long)hlen);
        goto fail;
    }
    if (hlen > fsize - 8) {
        st = KD_FAIL(KD_ERR_FORMAT,
                     "reading '%s': header length %llu is larger than the file (%llu bytes)", path,
                     (unsigned long long)hlen, (unsigned long long)fsize);
        goto fail;
    }
    header = malloc((size_t)hlen + 1);
    if (!header) {
        st = KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory for the header", path);
        goto fail;
    }
    if ((err = pread_all(fd, header, (size_t)hlen, 8))) {
        st = KD_FAIL(KD_ERR_IO, "reading '%s': %s", path, strerror(err));
        goto fail;
    }
    header[hlen] = '\0';

    const char *end = NULL;
    s->root = cJSON_ParseWithOpts(header, &end, 0);
    if (!s->root) {
        st = KD_FAIL(KD_ERR_FORMAT, "reading '%s': header is not valid JSON (error near byte %lld)",
                     path, (long long)(end ? end - header : 0));
        goto fail;
    }
    /* Writers pad with spaces; anything else after the JSON (an embedded NUL, too) is corrupt. */
    for (const char *p = end; p < header + hlen; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "reading '%s': header is not valid JSON (trailing bytes at byte %lld)",
                         path, (long long)(p - header));
            goto fail;
        }
    }
    if (!cJSON_IsObject(s->root)) {
        st = KD_FAIL(KD_ERR_FORMAT, "reading '%s': header is not a JSON object", path);
        goto fail;
    }

    size_t count = (size_t)cJSON_GetArraySize(s->root);
    s->entries = calloc(count + 1, sizeof *s->entries);
    spans = calloc(count + 1, sizeof *spans);
    s->by_name = calloc(count + 1, sizeof *s->by_name);
    if (!s->entries || !spans || !s->by_name) {
        st = KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory", path);
        goto fail;
    }
    uint64_t bufsize = fsize - 8 - hlen;
    const cJSON *item;
    cJSON_ArrayForEach(item, s->root)
    {
        if (!strcmp(item->string, "__metadata__")) {
            if ((st = parse_metadata(path, s, item)))
                goto fail;
            continue;
        }
        if ((st = parse_entry(path, item, bufsize, &s->entries[s->n], &spans[s->n])))
            goto fail;
        spans[s->n].idx = s->n;
        s->by_name[s->n] = &s->entries[s->n];
        s->n++;
    }

    qsort(s->by_name, s->n, sizeof *s->by_name, cmp_entry_name);
    for (size_t i = 1; i < s->n; i++) {
        if (!strcmp(s->by_name[i - 1]->name, s->by_name[i]->name)) {
            st = KD_FAIL(KD_ERR_FORMAT, "reading '%s': duplicate tensor name '%s'", path,
                         s->by_name[i]->name);
            goto fail;
        }
    }

    /* In begin order, a tensor overlaps an earlier one iff it starts before the furthest end. */
    qsort(spans, s->n, sizeof *spans, cmp_span);
    uint64_t far_end = 0, total = 0;
    size_t far_idx = SIZE_MAX;
    for (size_t i = 0; i < s->n; i++) {
        const span *sp = &spans[i];
        if (sp->begin == sp->end)
            continue;
        if (far_idx != SIZE_MAX && sp->begin < far_end) {
            st = KD_FAIL(KD_ERR_FORMAT,
                         "reading '%s': tensors '%s' and '%s' overlap in the data buffer "
                         "(bytes %llu..%llu)",
                         path, s->entries[far_idx].name, s->entries[sp->idx].name,
                         (unsigned long long)sp->begin, (unsigned long long)far_end);
            goto fail;
        }
        far_end = sp->end;
        far_idx = sp->idx;
        total += (sp->end - sp->begin + KD_ST_ALIGN - 1) / KD_ST_ALIGN * KD_ST_ALIGN;
    }

    if (!data) /* the header checked, no tensor read */
        goto done;
    /* Non-overlapping spans inside the file bound total, so a hostile header cannot inflate it. */
    s->arena = aligned_alloc(KD_ST_ALIGN, total ? (size_t)total : KD_ST_ALIGN);
    if (!s->arena) {
        st = KD_FAIL(KD_ERR_NOMEM, "reading '%s': out of memory for %llu bytes of tensor data",
                     path, (unsigned long long)total);
        goto fail;
    }
    /* Reading in file order keeps the reads sequential. */
    size_t pos = 0;
    for (size_t i = 0; i < s->n; i++) {
        const span *sp = &spans[i];
        size_t len = (size_t)(sp->end - sp->begin);
        s->entries[sp->idx].data = s->arena + pos;
        if (len && (err = pread_all(fd, s->arena + pos, len, 8 + hlen + sp->begin))) {
            st = KD_FAIL(KD_ERR_IO, "reading '%s': tensor '%s': %s", path, s->entries[sp->idx].name,
                         strerror(err));
            goto fail;
        }
        pos += (len + KD_ST_ALIGN - 1) / KD_ST_ALIGN * KD_ST_ALIGN;
    }
done:
    close(fd);
    free(header);
    free(spans);
    *out = s;
    return KD_OK;

fail:
    if (fd >= 0)
        close(fd);
    free(header);
    free(spans);
    kd_safetensors_close(s);
    return st;
}

kd_status kd_safetensors_open(const char *path, kd_safetensors **out)
{
    return st_open(path, 1, out);
}

kd_status kd_safetensors_open_header(const char *path, kd_safetensors **out)
{
    return st_open(path, 0, out);
}

size_t kd_safetensors_count(const kd_safetensors *st) { return st ? st->n : 0; }

const kd_st_entry *kd_safetensors_entry(const kd_safetensors *st, size_t i)
{
    return st && i < st->n ? &st->entries[i] : NULL;
}

const kd_st_entry *kd_safetensors_find(const kd_safetensors *st, const char *name)
{
    if (!st || !name || !st->n)
        return NULL;
    const kd_st_entry *const *hit =
        bsearch(name, st->by_name, st->n, sizeof *st->by_name, cmp_key_entry);
    return hit ? *hit : NULL;
}

const char *kd_safetensors_meta(const kd_safetensors *st, const char *key)
{
    if (!st || !st->meta || !key)
        return NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(st->meta, key);
    return v ? v->valuestring : NULL;
}

void kd_safetensors_close(kd_safetensors *st)
{
    if (!st)
        return;
    cJSON_Delete(st->root);
    free(st->entries);
    free(st->by_name);
    free(st->arena);
    free(st);
}
