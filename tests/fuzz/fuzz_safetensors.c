/*
 * fuzz_safetensors.c - the checkpoint reader (engine/safetensors.c) under libFuzzer.
 *
 * A checkpoint is a file a user names on the command line (--checkpoint, --resume,
 * teacher.checkpoint), so its bytes are untrusted. Each input is written to a file and opened
 * with kd_safetensors_open, as the trainer and the exporter do; a file it accepts is then read
 * back whole: every entry's name, shape and all of its data bytes, and a metadata lookup, so
 * that a size or offset the validation let through wrongly shows up under AddressSanitizer.
 * A refusal must come with a message. Built and run by run_fuzz.sh.
 *
 * Built with -DFUZZ_SEEDS, the file is instead the seed writer: `prog DIR` writes small valid
 * checkpoints into DIR through kd_safetensors_save.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"

#ifndef FUZZ_SEEDS

#include "fuzz_file.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_input_file("checkpoint.safetensors", data, size);
    kd_safetensors *st = NULL;
    kd_status rc = kd_safetensors_open(path, &st);
    unlink(path); /* the reader holds what it accepted in memory */
    if (rc != KD_OK) {
        if (st || !kd_last_error()[0]) /* a refusal leaves nothing open and says why */
            abort();
        return 0;
    }
    volatile unsigned sum = 0;
    for (size_t i = 0; i < kd_safetensors_count(st); i++) {
        const kd_st_entry *e = kd_safetensors_entry(st, i);
        if (!e || !e->name || e->ndim < 0 || e->ndim > KD_MAX_DIMS)
            abort();
        size_t n = kd_dtype_size(e->dtype);
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0)
                abort();
            n *= (size_t)e->shape[d];
        }
        const unsigned char *p = e->data;
        for (size_t b = 0; b < n; b++)
            sum += p[b];
        sum += (unsigned)strlen(e->name);
        if (kd_safetensors_find(st, e->name) == NULL)
            abort();
    }
    const char *m = kd_safetensors_meta(st, "format");
    if (m)
        sum += (unsigned)strlen(m);
    kd_safetensors_close(st);
    return 0;
}

#else

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    static const float w[6] = {1, -2, 3.5f, 0, -0.25f, 8};
    static const int64_t steps = 42;
    static const uint8_t bytes[3] = {7, 8, 9};
    const kd_st_entry two[] = {
        {"0.weight", KD_DTYPE_F32, 2, {2, 3}, w},
        {"step", KD_DTYPE_I64, 0, {1}, &steps},
    };
    const kd_st_entry one[] = {{"b", KD_DTYPE_U8, 1, {3}, bytes}};
    const char *meta[] = {"format", "pt", "distill.note", "seed"};
    char path[4096];
    snprintf(path, sizeof path, "%s/two.safetensors", argv[1]);
    if (kd_safetensors_save(path, two, 2, meta, 2) != KD_OK)
        goto fail;
    snprintf(path, sizeof path, "%s/one.safetensors", argv[1]);
    if (kd_safetensors_save(path, one, 1, NULL, 0) != KD_OK)
        goto fail;
    snprintf(path, sizeof path, "%s/empty.safetensors", argv[1]);
    if (kd_safetensors_save(path, NULL, 0, meta, 1) != KD_OK)
        goto fail;
    return 0;
fail:
    fprintf(stderr, "%s: %s\n", argv[0], kd_last_error());
    return 1;
}

#endif
