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

#include "fuzz_file.h"
#include "job.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
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
    const char *path = fuzz_input_file("config.yaml", data, size);
    kd_job job;
    memset(&job, 0, sizeof job);
    kd_status rc = kd_job_load(path, overrides, &job);
    unlink(path);
    if (rc != KD_OK && !kd_last_error()[0]) /* a refusal says why */
        abort();
    kd_job_free(&job);
    free(set);
    return 0;
}
