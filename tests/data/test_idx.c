/*
 * test_idx.c - IDX reader: valid raw and gzip files, and each way a file can
 * be wrong (truncation, trailing bytes, bad magic, unsupported type, bad
 * rank, corrupt gzip, missing file), checking status and message.
 * Files are written into a fresh mkdtemp directory per run.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "idx.h"

static char tmpdir[256];

static void path_in_tmp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", tmpdir, name);
}

static void write_raw(const char *path, const uint8_t *bytes, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void write_gz(const char *path, const uint8_t *bytes, size_t len)
{
    gzFile gz = gzopen(path, "wb");
    assert_non_null(gz);
    assert_int_equal(gzwrite(gz, bytes, (unsigned)len), (int)len);
    assert_int_equal(gzclose(gz), Z_OK);
}

/* Header for an unsigned-byte IDX of the given dims followed by `payload` bytes i*7+3. */
static size_t make_idx(uint8_t *buf, int ndim, const uint32_t *dims, size_t payload)
{
    size_t k = 0;
    buf[k++] = 0;
    buf[k++] = 0;
    buf[k++] = 0x08;
    buf[k++] = (uint8_t)ndim;
    for (int i = 0; i < ndim; i++) {
        buf[k++] = (uint8_t)(dims[i] >> 24);
        buf[k++] = (uint8_t)(dims[i] >> 16);
        buf[k++] = (uint8_t)(dims[i] >> 8);
        buf[k++] = (uint8_t)dims[i];
    }
    for (size_t i = 0; i < payload; i++)
        buf[k++] = (uint8_t)(i * 7 + 3);
    return k;
}

static void expect_fail(const char *path, kd_status want, const char *needle)
{
    kd_idx idx;
    memset(&idx, 0xab, sizeof idx);
    kd_clear_error();
    kd_status st = kd_idx_load(path, &idx);
    assert_int_equal(st, want);
    const char *msg = kd_last_error();
    if (!strstr(msg, needle) || !strstr(msg, path))
        fail_msg("message '%s' lacks '%s' or the path '%s'", msg, needle, path);
    /* A failed load leaves nothing to free. */
    assert_null(idx.data);
    assert_int_equal(idx.ndim, 0);
    assert_int_equal(idx.size, 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kd_test_idx_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void check_valid(int gz)
{
    uint8_t buf[256];
    uint32_t dims[3] = {2, 3, 5};
    size_t len = make_idx(buf, 3, dims, 30);
    char path[512];
    path_in_tmp(path, sizeof path, gz ? "valid.gz" : "valid.raw");
    (gz ? write_gz : write_raw)(path, buf, len);

    kd_idx idx;
    assert_int_equal(kd_idx_load(path, &idx), KD_OK);
    assert_int_equal(idx.ndim, 3);
    assert_int_equal(idx.dims[0], 2);
    assert_int_equal(idx.dims[1], 3);
    assert_int_equal(idx.dims[2], 5);
    assert_int_equal(idx.dims[3], 0);
    assert_int_equal(idx.size, 30);
    assert_memory_equal(idx.data, buf + 16, 30);
    kd_idx_free(&idx);
    assert_null(idx.data);
}

static void test_valid_raw(void **state)
{
    (void)state;
    check_valid(0);
}

static void test_valid_gz(void **state)
{
    (void)state;
    check_valid(1);
}

static void test_valid_1d_and_4d(void **state)
{
    (void)state;
    uint8_t buf[256];
    char path[512];
    uint32_t d1[1] = {7};
    path_in_tmp(path, sizeof path, "labels.raw");
    write_raw(path, buf, make_idx(buf, 1, d1, 7));
    kd_idx idx;
    assert_int_equal(kd_idx_load(path, &idx), KD_OK);
    assert_int_equal(idx.ndim, 1);
    assert_int_equal(idx.dims[0], 7);
    assert_int_equal(idx.size, 7);
    assert_int_equal(idx.data[6], (uint8_t)(6 * 7 + 3));
    kd_idx_free(&idx);

    uint32_t d4[4] = {2, 1, 3, 4};
    path_in_tmp(path, sizeof path, "four.gz");
    write_gz(path, buf, make_idx(buf, 4, d4, 24));
    assert_int_equal(kd_idx_load(path, &idx), KD_OK);
    assert_int_equal(idx.ndim, 4);
    assert_int_equal(idx.dims[3], 4);
    assert_int_equal(idx.size, 24);
    assert_memory_equal(idx.data, buf + 20, 24);
    kd_idx_free(&idx);
}

static void test_truncated(void **state)
{
    (void)state;
    uint8_t buf[256];
    uint32_t dims[3] = {2, 3, 5};
    size_t len = make_idx(buf, 3, dims, 30);
    char path[512];
    path_in_tmp(path, sizeof path, "trunc.raw");
    write_raw(path, buf, len - 20);
    expect_fail(path, KD_ERR_FORMAT,
                "is truncated: header says 2x3x5 = 30 bytes of data, file holds 10");

    path_in_tmp(path, sizeof path, "trunc.gz");
    write_gz(path, buf, len - 1);
    expect_fail(path, KD_ERR_FORMAT, "header says 2x3x5 = 30 bytes of data, file holds 29");

    /* Cut inside the dimension words. */
    path_in_tmp(path, sizeof path, "trunc_hdr.raw");
    write_raw(path, buf, 9);
    expect_fail(path, KD_ERR_FORMAT, "is truncated");

    path_in_tmp(path, sizeof path, "empty.raw");
    write_raw(path, buf, 0);
    expect_fail(path, KD_ERR_FORMAT, "is truncated");
}

static void test_trailing(void **state)
{
    (void)state;
    uint8_t buf[256];
    uint32_t dims[2] = {4, 4};
    size_t len = make_idx(buf, 2, dims, 16 + 5); /* 5 bytes past what the header declares */
    char path[512];
    path_in_tmp(path, sizeof path, "trail.raw");
    write_raw(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "5 trailing bytes");

    path_in_tmp(path, sizeof path, "trail.gz");
    write_gz(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "5 trailing bytes");
}

static void test_bad_magic(void **state)
{
    (void)state;
    uint8_t buf[256];
    uint32_t dims[1] = {4};
    size_t len = make_idx(buf, 1, dims, 4);
    buf[1] = 0x12;
    char path[512];
    path_in_tmp(path, sizeof path, "magic.raw");
    write_raw(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "is not an IDX file");
}

static void test_wrong_type(void **state)
{
    (void)state;
    uint8_t buf[256];
    uint32_t dims[1] = {4};
    size_t len = make_idx(buf, 1, dims, 16);
    buf[2] = 0x0D;
    char path[512];
    path_in_tmp(path, sizeof path, "float.gz");
    write_gz(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "element type 0x0d (float32) is not supported");
}

static void test_bad_ndim(void **state)
{
    (void)state;
    uint8_t buf[256];
    uint32_t dims[4] = {1, 1, 1, 1};
    size_t len = make_idx(buf, 4, dims, 1);
    char path[512];
    buf[3] = 0;
    path_in_tmp(path, sizeof path, "ndim0.raw");
    write_raw(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "has 0 dimensions");
    buf[3] = 5;
    path_in_tmp(path, sizeof path, "ndim5.raw");
    write_raw(path, buf, len);
    expect_fail(path, KD_ERR_FORMAT, "has 5 dimensions");
}

static void test_corrupt_gzip(void **state)
{
    (void)state;
    /* Enough varied data that the deflate stream has a real middle to damage. */
    enum { N = 64 * 1024 };
    uint32_t dims[2] = {256, 256};
    uint8_t *buf = malloc(N + 16);
    assert_non_null(buf);
    size_t len = make_idx(buf, 2, dims, 0);
    uint32_t s = 12345;
    for (size_t i = 0; i < N; i++) {
        s = s * 1103515245u + 12345u;
        buf[len + i] = (uint8_t)((s >> 16) % 17);
    }
    len += N;
    char path[512];
    path_in_tmp(path, sizeof path, "corrupt.gz");
    write_gz(path, buf, len);

    /* Sanity: the intact file loads. */
    kd_idx idx;
    assert_int_equal(kd_idx_load(path, &idx), KD_OK);
    kd_idx_free(&idx);

    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    assert_true(size > 200);
    for (long off = size / 2; off < size / 2 + 16; off++) {
        assert_int_equal(fseek(f, off, SEEK_SET), 0);
        int ch = fgetc(f);
        assert_int_equal(fseek(f, off, SEEK_SET), 0);
        fputc(ch ^ 0x5a, f);
    }
    assert_int_equal(fclose(f), 0);
    free(buf);

    expect_fail(path, KD_ERR_FORMAT, "corrupt gzip stream: ");
    /* zlib's own "path: " prefix is not repeated after ours. */
    assert_null(strstr(kd_last_error(), "stream: /"));
}

static void test_missing(void **state)
{
    (void)state;
    char path[512];
    path_in_tmp(path, sizeof path, "does-not-exist.gz");
    expect_fail(path, KD_ERR_NOT_FOUND, "not found");
    path_in_tmp(path, sizeof path, "no-dir/file");
    expect_fail(path, KD_ERR_NOT_FOUND, "not found");
}

static void test_free_zeroed(void **state)
{
    (void)state;
    kd_idx idx = {0};
    kd_idx_free(&idx);
    kd_idx_free(NULL);
    assert_null(idx.data);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_raw),       cmocka_unit_test(test_valid_gz),
        cmocka_unit_test(test_valid_1d_and_4d), cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_trailing),        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_wrong_type),      cmocka_unit_test(test_bad_ndim),
        cmocka_unit_test(test_corrupt_gzip),    cmocka_unit_test(test_missing),
        cmocka_unit_test(test_free_zeroed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
