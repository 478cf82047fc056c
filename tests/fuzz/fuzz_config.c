/*
 * fuzz_config.c - the job loader (engine/job.c over engine/config_yaml.c) under libFuzzer.
 *
 * A config file is what a user writes by hand, and `--set key.path=value` what they type, so
 * both are untrusted text. Each input is written to a file and loaded with kd_job_load as the
 * CLI does; an input that starts with '@' gives its first line (after the '@') as one --set
 * override and the rest as the file. A refusal must come with a message; an accepted job is
 * freed. run_fuzz.sh runs it from the repository root (model files named by a config resolve
 * as they do for the CLI) with the project's configs as seeds.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "job.h"

static char g_path[4096];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_path[0]) {
        const char *dir = getenv("FUZZ_TMP");
        snprintf(g_path, sizeof g_path, "%s/fuzz_config_%ld.yaml", dir ? dir : "/tmp",
                 (long)getpid());
    }
    char *set = NULL;
    const char *overrides[2] = {NULL, NULL};
    if (size && data[0] == '@') {
        const uint8_t *nl = memchr(data, '\n', size);
        size_t len = nl ? (size_t)(nl - data) - 1 : size - 1;
        set = malloc(len + 1);
        if (!set)
            abort();
        memcpy(set, data + 1, len);
        set[len] = '\0';
        overrides[0] = set;
        size_t used = nl ? (size_t)(nl - data) + 1 : size;
        data += used;
        size -= used;
    }
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    if (size && fwrite(data, 1, size, f) != size)
        abort();
    if (fclose(f) != 0)
        abort();
    kd_job job;
    memset(&job, 0, sizeof job);
    kd_status rc = kd_job_load(g_path, overrides, &job);
    unlink(g_path);
    if (rc != KD_OK && !kd_last_error()[0]) /* a refusal says why */
        abort();
    kd_job_free(&job);
    free(set);
    return 0;
}
