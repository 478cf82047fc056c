/*
 * fuzz_file.h - a fuzz input written to a file, for the readers that take a path. Included by
 * one target each (static state); the file is under $FUZZ_TMP (default /tmp), one per process,
 * rewritten for every input, and the target unlinks it once the reader is done.
 */
#ifndef KD_FUZZ_FILE_H
#define KD_FUZZ_FILE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* The path holding data[0, size); name ends it ("config.yaml"). Aborts when it cannot write. */
static const char *fuzz_input_file(const char *name, const uint8_t *data, size_t size)
{
    static char path[4096];
    if (!path[0]) {
        const char *dir = getenv("FUZZ_TMP");
        snprintf(path, sizeof path, "%s/fuzz_%ld_%s", dir ? dir : "/tmp", (long)getpid(), name);
    }
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
        abort();
    return path;
}

#endif
