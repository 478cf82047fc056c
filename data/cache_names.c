/*
 * cache_names.c - the teacher cache's compressor names (cache.h), apart from the HDF5 code so
 * that the job loader can check teacher.compress without linking HDF5.
 */
#include <string.h>

#include "cache.h"

static const char *const compress_names[] = {"none", "deflate", "lz4", "zstd"};

const char *kd_cache_compress_name(kd_cache_compress c)
{
    return (unsigned)c < 4 ? compress_names[c] : "unknown";
}

int kd_cache_compress_from_name(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, compress_names[i]) == 0)
            return i;
    if (strcmp(name, "gzip") == 0)
        return KD_CACHE_COMPRESS_DEFLATE;
    return -1;
}
