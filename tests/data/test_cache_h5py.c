/*
 * test_cache_h5py.c - a cache written by data/write_cache_h5py.py (h5py's own
 * types: variable-length string attributes, numpy float16) opens with
 * kd_cache_open and holds the logits the script computed. Exits 77 (skipped)
 * when no python3 with h5py and numpy is found ($KD_PYTHON, python3,
 * /usr/bin/python3 are tried).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

static char tmpdir[256];
static char python[256];

static int find_python(void)
{
    const char *cands[] = {getenv("KD_PYTHON"), "python3", "/usr/bin/python3"};
    for (size_t i = 0; i < sizeof cands / sizeof cands[0]; i++) {
        if (!cands[i] || !*cands[i])
            continue;
        char cmd[512];
        snprintf(cmd, sizeof cmd, "%s -c 'import h5py, numpy' >/dev/null 2>&1", cands[i]);
        if (system(cmd) == 0) {
            snprintf(python, sizeof python, "%s", cands[i]);
            return 1;
        }
    }
    return 0;
}

/* The script's --pattern arange logit of (row, view, class). */
static float pattern(int64_t i, int v, int k)
{
    return (float)(((i * 7 + v * 3 + k * 5) % 17) - 8) * 0.5f;
}

static void run_script(const char *out, const char *args)
{
    const char *src = getenv("KD_SOURCE_DIR") ? getenv("KD_SOURCE_DIR") : ".";
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s %s/data/write_cache_h5py.py --out %s %s", python, src, out, args);
    if (system(cmd) != 0)
        fail_msg("failed: %s", cmd);
}

static void check(const char *name, int views, int topk, kd_dtype dt, const char *args)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    run_script(path, args);
    kd_cache_expect e;
    kd_cache_expect_init(&e);
    e.num_samples = 1500;
    e.num_classes = 10;
    e.views = views;
    e.topk = topk;
    e.dtype = (int)dt;
    e.aug_nparams = 3;
    strcpy(e.teacher_sha256, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    strcpy(e.augment, "none"); /* identity views: h5py's variable-length string */
    kd_cache *c = NULL;
    if (kd_cache_open(path, &e, &c) != KD_OK)
        fail_msg("%s", kd_last_error());
    assert_string_equal(kd_cache_meta_of(c)->augment, "none");
    uint32_t rows[1500];
    for (int i = 0; i < 1500; i++)
        rows[i] = (uint32_t)(1499 - i);
    float *lo = malloc(sizeof(float) * 1500 * 10), tv[1500 * 4], lse[1500], aug[1500 * 3];
    int32_t ti[1500 * 4], lab[1500];
    for (int v = 0; v < views; v++) {
        if (kd_cache_get_rows(c, rows, 1500, v, topk ? NULL : lo, topk ? tv : NULL,
                              topk ? ti : NULL, lse, aug, lab) != KD_OK)
            fail_msg("%s", kd_last_error());
        for (int i = 0; i < 1500; i++) {
            int64_t g = rows[i];
            assert_int_equal(lab[i], g % 10);
            assert_true(aug[i * 3] == 0.0f);
            for (int k = 0; k < (topk ? topk : 10); k++) {
                if (!topk) {
                    assert_true(lo[i * 10 + k] == pattern(g, v, k));
                } else {
                    float want[10], vals[4], l;
                    int32_t idx[4];
                    for (int j = 0; j < 10; j++)
                        want[j] = pattern(g, v, j);
                    kd_topk_rows(want, 1, 10, topk, vals, idx, &l);
                    /* numpy's stable argsort and kd_topk_rows agree on ties. */
                    assert_int_equal(ti[i * topk + k], idx[k]);
                    assert_true(tv[i * topk + k] == vals[k]);
                    assert_true(fabsf(lse[i] - l) < 1e-5f);
                }
            }
        }
    }
    free(lo);
    kd_cache_close(c);
}

static void test_full_f16(void **state)
{
    check("h5py_full16.h5", 2, 0, KD_DTYPE_F16,
          "--samples 1500 --classes 10 --views 2 --pattern arange --dtype float16 --chunk-rows 256 "
          "--teacher-sha256 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
}

static void test_topk_gzip(void **state)
{
    check("h5py_topk.h5", 1, 4, KD_DTYPE_F32,
          "--samples 1500 --classes 10 --views 1 --pattern arange --topk 4 --compress gzip "
          "--teacher-sha256 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
}

/* The hashes are compared only when both sides have one (data/README.md): a cache written
 * without a teacher hash opens for a job that knows its teacher's; a different hash does not. */
static void test_hash_rules(void **state)
{
    (void)state;
    const char *want = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    char path[512];
    kd_cache_expect e;
    kd_cache_expect_init(&e);
    e.num_samples = 1500;
    e.num_classes = 10;
    strcpy(e.teacher_sha256, want);
    kd_cache *c = NULL;
    snprintf(path, sizeof path, "%s/nohash.h5", tmpdir);
    run_script(path, "--samples 1500 --classes 10 --views 1 --pattern arange");
    if (kd_cache_open(path, &e, &c) != KD_OK)
        fail_msg("a cache without a teacher hash was refused: %s", kd_last_error());
    kd_cache_close(c);
    c = NULL;
    snprintf(path, sizeof path, "%s/otherhash.h5", tmpdir);
    run_script(path, "--samples 1500 --classes 10 --views 1 --pattern arange --teacher-sha256 "
                     "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210");
    assert_int_equal(kd_cache_open(path, &e, &c), KD_ERR_CONFIG);
    assert_null(c);
    assert_non_null(strstr(kd_last_error(), want));
    assert_non_null(strstr(kd_last_error(), "fedcba9876543210"));
}

int main(void)
{
    if (!find_python()) {
        printf("SKIP: no python3 with h5py and numpy (apt-get install python3-h5py)\n");
        return 77;
    }
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/kd_h5py_XXXXXX", base);
    if (!mkdtemp(tmpdir))
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_f16),
        cmocka_unit_test(test_topk_gzip),
        cmocka_unit_test(test_hash_rules),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}
