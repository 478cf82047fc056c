/*
 * idx.c - IDX loading through zlib.
 *
 * gzopen/gzread read a gzip file and pass a raw file through unchanged, so a
 * single code path serves both. The header is validated before anything is
 * allocated, and the data buffer grows geometrically as bytes actually arrive
 * instead of being sized from the header up front: a corrupt header that
 * claims terabytes then fails as "truncated" rather than as out-of-memory.
 * After the payload one more read must hit end of file; it also makes zlib
 * check the gzip trailer (CRC and length), which is where most corruption
 * in the middle of a stream is caught.
 */
#include "idx.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

/* Cap per gzread call: it takes an unsigned length and returns an int. */
#define KD_IDX_CHUNK       (1u << 24)
#define KD_IDX_FIRST_ALLOC ((size_t)1 << 20)

static const char *idx_type_name(int type)
{
    switch (type) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "int16";
    case 0x0C: return "int32";
    case 0x0D: return "float32";
    case 0x0E: return "float64";
    default: return "unknown type";
    }
}

static void idx_dims_text(const kd_idx *idx, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < idx->ndim && used < len; i++) {
        int k = snprintf(buf + used, len - used, "%s%lld", i ? "x" : "", (long long)idx->dims[i]);
        if (k < 0)
            break;
        used += (size_t)k;
    }
}

/*
 * Read up to len bytes, looping over short reads. Returns the count read
 * (less than len only at end of file) or -1 on a zlib/stream error.
 */
static int64_t idx_read(gzFile gz, uint8_t *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        size_t want = len - got;
        if (want > KD_IDX_CHUNK)
            want = KD_IDX_CHUNK;
        int n = gzread(gz, buf + got, (unsigned)want);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (int64_t)got;
}

/*
 * Text of the pending zlib error, or NULL when the stream is healthy. zlib
 * prefixes its text with "path: "; that is dropped since our message names
 * the path already.
 */
static const char *idx_gz_error(const char *path, gzFile gz)
{
    int errnum = Z_OK;
    const char *msg = gzerror(gz, &errnum);
    if (errnum == Z_OK || errnum == Z_STREAM_END)
        return NULL;
    if (!msg || !msg[0])
        return "unknown zlib error";
    size_t len = strlen(path);
    if (strncmp(msg, path, len) == 0 && msg[len] == ':' && msg[len + 1] == ' ')
        msg += len + 2;
    return msg;
}

static kd_status idx_stream_fail(const char *path, gzFile gz)
{
    const char *msg = idx_gz_error(path, gz);
    return KD_FAIL(KD_ERR_FORMAT, "'%s': corrupt gzip stream: %s", path, msg ? msg : "read failed");
}

static kd_status idx_parse_header(const char *path, gzFile gz, kd_idx *out)
{
    uint8_t magic[4];
    int64_t n = idx_read(gz, magic, sizeof magic);
    if (n < 0)
        return idx_stream_fail(path, gz);
    if (n < (int64_t)sizeof magic)
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' is truncated: %lld bytes, shorter than the 4-byte IDX magic", path,
                       (long long)n);
    if (magic[0] != 0 || magic[1] != 0)
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' is not an IDX file: magic starts 0x%02x 0x%02x, expected two zero "
                       "bytes",
                       path, magic[0], magic[1]);
    if (magic[2] != 0x08)
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s': IDX element type 0x%02x (%s) is not supported; only 0x08 (unsigned "
                       "byte) is",
                       path, magic[2], idx_type_name(magic[2]));
    if (magic[3] < 1 || magic[3] > KD_IDX_MAX_DIMS)
        return KD_FAIL(KD_ERR_FORMAT, "'%s': IDX header has %d dimensions, expected 1..%d", path,
                       magic[3], KD_IDX_MAX_DIMS);

    out->ndim = magic[3];
    uint8_t raw[4 * KD_IDX_MAX_DIMS];
    size_t dim_bytes = 4 * (size_t)out->ndim;
    n = idx_read(gz, raw, dim_bytes);
    if (n < 0)
        return idx_stream_fail(path, gz);
    if (n < (int64_t)dim_bytes)
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' is truncated: header declares %d dimensions but ends after %lld of "
                       "their %zu bytes",
                       path, out->ndim, (long long)n, dim_bytes);

    /* A total above this is nonsense for a data set and keeps the products in range. */
    const uint64_t limit = (uint64_t)1 << 48;
    uint64_t total = 1;
    for (int i = 0; i < out->ndim; i++) {
        const uint8_t *p = raw + 4 * i;
        uint32_t d = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        if (d == 0)
            return KD_FAIL(KD_ERR_FORMAT, "'%s': IDX dimension %d is 0", path, i);
        out->dims[i] = d;
        if (total > limit / d)
            return KD_FAIL(KD_ERR_FORMAT, "'%s': IDX dimensions multiply to more than 2^48 bytes",
                           path);
        total *= d;
    }
    if (total > SIZE_MAX)
        return KD_FAIL(KD_ERR_FORMAT, "'%s': IDX data does not fit in memory on this platform",
                       path);
    out->size = (size_t)total;
    return KD_OK;
}

static kd_status idx_read_payload(const char *path, gzFile gz, kd_idx *out)
{
    size_t cap = out->size < KD_IDX_FIRST_ALLOC ? out->size : KD_IDX_FIRST_ALLOC;
    size_t got = 0;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return KD_FAIL(KD_ERR_NOMEM, "'%s': cannot allocate %zu bytes", path, cap);
    out->data = buf;

    for (;;) {
        int64_t n = idx_read(gz, out->data + got, cap - got);
        if (n < 0)
            return idx_stream_fail(path, gz);
        got += (size_t)n;
        if (got < cap || cap == out->size)
            break;
        size_t next = cap > out->size / 2 ? out->size : cap * 2;
        buf = realloc(out->data, next);
        if (!buf)
            return KD_FAIL(KD_ERR_NOMEM, "'%s': cannot allocate %zu bytes", path, next);
        out->data = buf;
        cap = next;
    }

    if (got < out->size) {
        char dims[96];
        idx_dims_text(out, dims, sizeof dims);
        /* A gzip stream cut short reads as a clean short file plus a zlib error. */
        const char *zmsg = idx_gz_error(path, gz);
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' is truncated: header says %s = %zu bytes of data, file holds "
                       "%zu%s%s%s",
                       path, dims, out->size, got, zmsg ? " (gzip: " : "", zmsg ? zmsg : "",
                       zmsg ? ")" : "");
    }

    /* Count what follows the payload; this read also triggers the gzip trailer check. */
    uint8_t tail[4096];
    uint64_t extra = 0;
    for (;;) {
        int64_t n = idx_read(gz, tail, sizeof tail);
        if (n < 0)
            return idx_stream_fail(path, gz);
        extra += (uint64_t)n;
        if (n < (int64_t)sizeof tail)
            break;
    }
    if (idx_gz_error(path, gz))
        return idx_stream_fail(path, gz);
    if (extra > 0) {
        char dims[96];
        idx_dims_text(out, dims, sizeof dims);
        return KD_FAIL(KD_ERR_FORMAT,
                       "'%s' has %llu trailing bytes after the %zu bytes of data its header (%s) "
                       "declares",
                       path, (unsigned long long)extra, out->size, dims);
    }
    return KD_OK;
}

kd_status kd_idx_load(const char *path, kd_idx *out)
{
    if (!out)
        return KD_FAIL(KD_ERR_INVALID, "kd_idx_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return KD_FAIL(KD_ERR_INVALID, "kd_idx_load: path is NULL");

    struct stat st;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return KD_FAIL(KD_ERR_NOT_FOUND, "IDX file '%s' not found", path);
        return KD_FAIL(KD_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
    }
    if (S_ISDIR(st.st_mode))
        return KD_FAIL(KD_ERR_IO, "'%s' is a directory, not an IDX file", path);

    errno = 0;
    gzFile gz = gzopen(path, "rb");
    if (!gz) {
        if (errno == ENOENT)
            return KD_FAIL(KD_ERR_NOT_FOUND, "IDX file '%s' not found", path);
        return KD_FAIL(KD_ERR_IO, "cannot open '%s': %s", path,
                       errno ? strerror(errno) : "zlib could not allocate its state");
    }
    gzbuffer(gz, 1u << 17);

    kd_status st_ = idx_parse_header(path, gz, out);
    if (st_ == KD_OK)
        st_ = idx_read_payload(path, gz, out);
    int close_rc = gzclose(gz);
    if (st_ == KD_OK && close_rc != Z_OK)
        st_ = KD_FAIL(KD_ERR_IO, "error closing '%s' (zlib code %d)", path, close_rc);
    if (st_ != KD_OK)
        kd_idx_free(out);
    return st_;
}

void kd_idx_free(kd_idx *idx)
{
    if (!idx)
        return;
    free(idx->data);
    memset(idx, 0, sizeof *idx);
}
