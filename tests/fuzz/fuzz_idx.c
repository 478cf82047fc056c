/*
 * fuzz_idx.c - the data set reader (data/idx.c: IDX files, raw or gzip) under libFuzzer.
 *
 * Data files come from wherever a user points the data directory, so their bytes are
 * untrusted. Each input is written to a file and loaded with kd_idx_load; an accepted file is
 * read back whole (its dims must multiply to its size), a refusal must come with a message.
 * Built and run by run_fuzz.sh.
 *
 * Built with -DFUZZ_SEEDS, the file is instead the seed writer: `prog DIR` writes small IDX
 * files into DIR, raw and gzip-compressed.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "idx.h"

#ifndef FUZZ_SEEDS

#include "fuzz_file.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_file("data.idx", data, size);
    kd_idx idx;
    kd_status rc = kd_idx_load(path, &idx);
    unlink(path);
    if (rc != KD_OK) {
        if (!kd_last_error()[0] || idx.data || idx.size) /* refused: says why, holds nothing */
            abort();
        return 0;
    }
    size_t n = idx.ndim > 0 ? 1 : 0;
    for (int d = 0; d < idx.ndim; d++)
        n *= (size_t)idx.dims[d];
    if (idx.ndim < 1 || idx.ndim > KD_IDX_MAX_DIMS || n != idx.size)
        abort();
    volatile unsigned sum = 0;
    for (size_t i = 0; i < idx.size; i++)
        sum += idx.data[i];
    kd_idx_free(&idx);
    return 0;
}

#else

#include <zlib.h>

/* an IDX file of unsigned bytes: 4-byte magic, big-endian dims, the elements */
static size_t idx_bytes(uint8_t *out, int ndim, const uint32_t *dims)
{
    size_t n = 0, count = 1;
    out[n++] = 0, out[n++] = 0, out[n++] = 0x08, out[n++] = (uint8_t)ndim;
    for (int d = 0; d < ndim; d++) {
        for (int b = 3; b >= 0; b--)
            out[n++] = (uint8_t)(dims[d] >> (8 * b));
        count *= dims[d];
    }
    for (size_t i = 0; i < count; i++)
        out[n++] = (uint8_t)(i * 37 + 11);
    return n;
}

static int put(const char *dir, const char *name, const uint8_t *b, size_t n, int gz)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (gz) {
        gzFile g = gzopen(path, "wb");
        return g && gzwrite(g, b, (unsigned)n) == (int)n && gzclose(g) == Z_OK ? 0 : 1;
    }
    FILE *f = fopen(path, "wb");
    return f && fwrite(b, 1, n, f) == n && fclose(f) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    uint8_t b[512];
    const uint32_t images[3] = {2, 5, 4}, labels[1] = {7};
    size_t n = idx_bytes(b, 3, images);
    int bad = put(argv[1], "images.idx", b, n, 0) | put(argv[1], "images.idx.gz", b, n, 1);
    n = idx_bytes(b, 1, labels);
    bad |= put(argv[1], "labels.idx", b, n, 0) | put(argv[1], "labels.idx.gz", b, n, 1);
    if (bad)
        fprintf(stderr, "%s: cannot write the seeds into %s\n", argv[0], argv[1]);
    return bad;
}

#endif
