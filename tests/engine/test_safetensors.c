/*
 * test_safetensors.c - safetensors round trips, validation of malformed files, and the
 * durability guarantees of kd_file_write_atomic.
 *
 * Every case runs in its own mkdtemp directory under /tmp, removed by the teardown. Malformed
 * files are written byte by byte here, so each reader check is exercised in isolation, and each
 * failure is asserted by status and by the message naming both the file and the problem.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fileio.h"
#include "safetensors.h"
#include "status.h"
#include "tensor.h"

/* ---- fixtures and helpers ----------------------------------------------------------------- */

static int setup_dir(void **state)
{
    char *dir = strdup("/tmp/kd_st_test_XXXXXX");
    if (!dir || !mkdtemp(dir)) {
        free(dir);
        return -1;
    }
    *state = dir;
    kd_clear_error();
    return 0;
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int teardown_dir(void **state)
{
    char *dir = *state;
    int rc = nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
    return rc;
}

static void join(char *out, const char *dir, const char *name)
{
    snprintf(out, PATH_MAX, "%s/%s", dir, name);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n)
        assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* A file with header length field hlen_field, the given header bytes, then ndata data bytes. */
static void write_raw_st(const char *path, uint64_t hlen_field, const char *hdr, size_t hdr_len,
                         size_t ndata)
{
    size_t total = 8 + hdr_len + ndata;
    unsigned char *buf = calloc(total, 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(hlen_field >> (8 * i));
    memcpy(buf + 8, hdr, hdr_len);
    for (size_t i = 0; i < ndata; i++)
        buf[8 + hdr_len + i] = (unsigned char)(i * 7 + 1);
    write_bytes(path, buf, total);
    free(buf);
}

/* A well-framed file whose header is json, followed by ndata data bytes. */
static void write_json_st(const char *path, const char *json, size_t ndata)
{
    write_raw_st(path, strlen(json), json, strlen(json), ndata);
}

static void expect_open_fails(const char *path, kd_status want, const char *problem)
{
    kd_safetensors *st = (kd_safetensors *)0x1;
    kd_clear_error();
    kd_status got = kd_safetensors_open(path, &st);
    if (got != want || !strstr(kd_last_error(), path) || !strstr(kd_last_error(), problem))
        print_error("open('%s'): status %d, message: %s\nexpected status %d and '%s'\n", path,
                    (int)got, kd_last_error(), (int)want, problem);
    assert_int_equal(got, want);
    assert_null(st);
    assert_non_null(strstr(kd_last_error(), path));
    assert_non_null(strstr(kd_last_error(), problem));
    /* the header alone is refused alike: every check here is of the header and the spans */
    kd_clear_error();
    assert_int_equal(kd_safetensors_open_header(path, &st), want);
    assert_null(st);
    assert_non_null(strstr(kd_last_error(), problem));
}

/* Write json (+ndata bytes) to dir/bad.safetensors and expect KD_ERR_FORMAT naming problem. */
static void expect_bad_header(const char *dir, const char *json, size_t ndata, const char *problem)
{
    char path[PATH_MAX];
    join(path, dir, "bad.safetensors");
    write_json_st(path, json, ndata);
    expect_open_fails(path, KD_ERR_FORMAT, problem);
}

static int count_temp_files(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (strstr(de->d_name, ".tmp."))
            n++;
    closedir(d);
    return n;
}

static int is_aligned(const void *p, size_t a) { return ((uintptr_t)p % a) == 0; }

/* ---- round trips -------------------------------------------------------------------------- */

static void test_round_trip(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "model.safetensors");

    float w[6] = {1.5f, -2.25f, 3.0f, 0.0f, 1e-20f, -7.0f};
    uint16_t h[4] = {0x3c00, 0xc000, 0x7bff, 0x0001};
    uint16_t bf[3] = {0x3f80, 0x4000, 0xbf80};
    double dd[4] = {3.141592653589793, -1e300, 2.5, 0.0};
    int8_t i8[5] = {-128, -1, 0, 1, 127}; /* 5 bytes: the next tensor starts unaligned */
    uint8_t u8[6] = {0, 1, 2, 253, 254, 255};
    int32_t i32[3] = {INT32_MIN, 0, INT32_MAX};
    int64_t step = 1234567890123LL;
    float empty_dummy = 0;
    kd_st_entry in[] = {
        {"conv1.weight", KD_DTYPE_F32, 2, {2, 3}, w},
        {"half", KD_DTYPE_F16, 1, {4}, h},
        {"bf", KD_DTYPE_BF16, 1, {3}, bf},
        {"dbl", KD_DTYPE_F64, 2, {2, 2}, dd},
        {"bytes.i8", KD_DTYPE_I8, 1, {5}, i8},
        {"u8.4d", KD_DTYPE_U8, 4, {1, 2, 3, 1}, u8},
        {"i32", KD_DTYPE_I32, 1, {3}, i32},
        {"bn1.num_batches_tracked", KD_DTYPE_I64, 0, {0}, &step},
        {"empty", KD_DTYPE_F32, 2, {0, 3}, &empty_dummy},
    };
    size_t n = sizeof in / sizeof in[0];
    const char *meta[] = {"format", "distill-checkpoint-v1", "tricky", "q\"b\\s\nnl\ttab \xc3\xa9"};
    assert_int_equal(kd_safetensors_save(path, in, n, meta, 2), KD_OK);
    assert_int_equal(count_temp_files(dir), 0);

    /* Frame: header length is a multiple of 8, and the file holds exactly header + data. */
    void *raw;
    size_t rlen;
    assert_int_equal(kd_file_read_all(path, &raw, &rlen), KD_OK);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | ((unsigned char *)raw)[i];
    assert_int_equal(hlen % 8, 0);
    size_t data_bytes = 24 + 8 + 6 + 32 + 5 + 6 + 12 + 8 + 0;
    assert_int_equal(rlen, 8 + hlen + data_bytes);
    assert_int_equal(((char *)raw)[8], '{');
    free(raw);

    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    assert_int_equal(kd_safetensors_count(st), n);
    for (size_t i = 0; i < n; i++) {
        const kd_st_entry *e = kd_safetensors_entry(st, i);
        assert_non_null(e);
        assert_string_equal(e->name, in[i].name); /* stored in the order given */
        assert_int_equal(e->dtype, in[i].dtype);
        assert_int_equal(e->ndim, in[i].ndim);
        int64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            assert_int_equal(e->shape[d], in[i].shape[d]);
            numel *= e->shape[d];
        }
        for (int d = e->ndim; d < KD_MAX_DIMS; d++)
            assert_int_equal(e->shape[d], 1);
        assert_non_null(e->data);
        assert_true(is_aligned(e->data, 8));
        assert_memory_equal(e->data, in[i].data, (size_t)numel * kd_dtype_size(e->dtype));
    }
    assert_null(kd_safetensors_entry(st, n));
    /* A scalar round-trips as ndim 0 with one element. */
    const kd_st_entry *sc = kd_safetensors_find(st, "bn1.num_batches_tracked");
    assert_non_null(sc);
    assert_int_equal(sc->ndim, 0);
    assert_int_equal(*(const int64_t *)sc->data, step);
    assert_string_equal(kd_safetensors_meta(st, "format"), "distill-checkpoint-v1");
    assert_string_equal(kd_safetensors_meta(st, "tricky"), meta[3]);
    assert_null(kd_safetensors_meta(st, "missing"));
    /* the header alone: the same entries and metadata, no data */
    kd_safetensors *ho = NULL;
    assert_int_equal(kd_safetensors_open_header(path, &ho), KD_OK);
    assert_int_equal(kd_safetensors_count(ho), n);
    for (size_t i = 0; i < n; i++) {
        const kd_st_entry *a = kd_safetensors_entry(st, i), *b = kd_safetensors_entry(ho, i);
        assert_string_equal(a->name, b->name);
        assert_int_equal(a->dtype, b->dtype);
        assert_int_equal(a->ndim, b->ndim);
        assert_memory_equal(a->shape, b->shape, sizeof a->shape);
        assert_null(b->data);
    }
    assert_string_equal(kd_safetensors_meta(ho, "tricky"), meta[3]);
    kd_safetensors_close(ho);
    kd_safetensors_close(st);
}

static void test_find(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "find.safetensors");
    float a[2] = {1, 2}, b[3] = {3, 4, 5}, c[1] = {6};
    kd_st_entry in[] = {
        {"layer2.0.conv1.weight", KD_DTYPE_F32, 1, {2}, a},
        {"fc.bias", KD_DTYPE_F32, 1, {3}, b},
        {"bn1.running_mean", KD_DTYPE_F32, 1, {1}, c},
    };
    assert_int_equal(kd_safetensors_save(path, in, 3, NULL, 0), KD_OK);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    const kd_st_entry *e = kd_safetensors_find(st, "fc.bias");
    assert_non_null(e);
    assert_string_equal(e->name, "fc.bias");
    assert_int_equal(e->shape[0], 3);
    assert_memory_equal(e->data, b, sizeof b);
    e = kd_safetensors_find(st, "layer2.0.conv1.weight");
    assert_non_null(e);
    assert_memory_equal(e->data, a, sizeof a);
    e = kd_safetensors_find(st, "bn1.running_mean");
    assert_non_null(e);
    assert_memory_equal(e->data, c, sizeof c);
    assert_null(kd_safetensors_find(st, "fc.weight"));
    assert_null(kd_safetensors_find(st, "fc.bias "));
    assert_null(kd_safetensors_find(st, "__metadata__"));
    assert_null(kd_safetensors_meta(st, "format")); /* saved without metadata */
    kd_safetensors_close(st);
}

static void test_empty_file_round_trip(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "empty.safetensors");
    const char *meta[] = {"k", "v"};
    assert_int_equal(kd_safetensors_save(path, NULL, 0, meta, 1), KD_OK);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    assert_int_equal(kd_safetensors_count(st), 0);
    assert_null(kd_safetensors_find(st, "k"));
    assert_string_equal(kd_safetensors_meta(st, "k"), "v");
    kd_safetensors_close(st);
}

static void test_overwrite_replaces(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "last.safetensors");
    float v1[2] = {1, 2}, v2[3] = {7, 8, 9};
    kd_st_entry e1 = {"w", KD_DTYPE_F32, 1, {2}, v1};
    kd_st_entry e2 = {"w", KD_DTYPE_F32, 1, {3}, v2};
    assert_int_equal(kd_safetensors_save(path, &e1, 1, NULL, 0), KD_OK);
    assert_int_equal(kd_safetensors_save(path, &e2, 1, NULL, 0), KD_OK);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    const kd_st_entry *e = kd_safetensors_find(st, "w");
    assert_non_null(e);
    assert_int_equal(e->shape[0], 3);
    assert_memory_equal(e->data, v2, sizeof v2);
    kd_safetensors_close(st);
    assert_int_equal(count_temp_files(dir), 0);
}

static void test_save_rejects_bad_entries(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "never.safetensors");
    float v[4] = {0};
    kd_st_entry dup[] = {{"a", KD_DTYPE_F32, 1, {2}, v}, {"a", KD_DTYPE_F32, 1, {2}, v}};
    kd_st_entry reserved = {"__metadata__", KD_DTYPE_F32, 1, {1}, v};
    kd_st_entry bad_dtype = {"a", KD_DTYPE_COUNT_, 1, {1}, v};
    kd_st_entry bad_ndim = {"a", KD_DTYPE_F32, 5, {1, 1, 1, 1}, v};
    kd_st_entry neg = {"a", KD_DTYPE_F32, 1, {-1}, v};
    kd_st_entry nodata = {"a", KD_DTYPE_F32, 1, {4}, NULL};
    const char *null_meta[] = {"k", NULL};

    assert_int_equal(kd_safetensors_save(path, dup, 2, NULL, 0), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "duplicate tensor name 'a'"));
    assert_int_equal(kd_safetensors_save(path, &reserved, 1, NULL, 0), KD_ERR_INVALID);
    assert_int_equal(kd_safetensors_save(path, &bad_dtype, 1, NULL, 0), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "unknown dtype"));
    assert_int_equal(kd_safetensors_save(path, &bad_ndim, 1, NULL, 0), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "ndim 5"));
    assert_int_equal(kd_safetensors_save(path, &neg, 1, NULL, 0), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "invalid shape"));
    assert_int_equal(kd_safetensors_save(path, &nodata, 1, NULL, 0), KD_ERR_INVALID);
    assert_int_equal(kd_safetensors_save(path, dup, 1, null_meta, 1), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), path));
    assert_int_equal(access(path, F_OK), -1); /* nothing was written */
    assert_int_equal(count_temp_files(dir), 0);
}

/* ---- files from other writers ------------------------------------------------------------- */

/* Header length 13 mod 8 and tensors at odd offsets: data must still come back aligned. */
static void test_unaligned_data_start(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "unaligned.safetensors");
    const char *json = "{\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
                       "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]},"
                       "\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[11,19]}}";
    size_t jl = strlen(json);
    assert_true(jl % 8 != 0);
    unsigned char data[19];
    float x[2] = {0.5f, -4.0f};
    double s = 42.125;
    data[0] = 9;
    data[1] = 8;
    data[2] = 7;
    memcpy(data + 3, x, sizeof x);
    memcpy(data + 11, &s, sizeof s);
    unsigned char *buf = malloc(8 + jl + sizeof data);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
    memcpy(buf + 8, json, jl);
    memcpy(buf + 8 + jl, data, sizeof data);
    write_bytes(path, buf, 8 + jl + sizeof data);
    free(buf);

    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    assert_int_equal(kd_safetensors_count(st), 3);
    const kd_st_entry *c = kd_safetensors_find(st, "c");
    const kd_st_entry *xe = kd_safetensors_find(st, "x");
    const kd_st_entry *se = kd_safetensors_find(st, "s");
    assert_non_null(c);
    assert_non_null(xe);
    assert_non_null(se);
    assert_memory_equal(c->data, data, 3);
    assert_true(is_aligned(xe->data, 8));
    assert_true(is_aligned(se->data, 8));
    /* Direct typed access, which UBSan would flag if the pointer were misaligned. */
    const float *xf = xe->data;
    assert_true(xf[0] == 0.5f && xf[1] == -4.0f);
    assert_true(*(const double *)se->data == 42.125);
    assert_int_equal(se->ndim, 0);
    kd_safetensors_close(st);
}

/* What safetensors.torch.save_file writes: compact JSON, metadata first, space padding. */
static void test_python_style_file(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "torch.safetensors");
    char json[256];
    snprintf(json, sizeof json, "%s",
             "{\"__metadata__\":{\"format\":\"pt\"},"
             "\"fc.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
             "\"fc.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}");
    while (strlen(json) % 8)
        strcat(json, " ");
    float d[6] = {1, 2, 3, 4, 5, 6};
    size_t jl = strlen(json);
    unsigned char buf[512];
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
    memcpy(buf + 8, json, jl);
    memcpy(buf + 8 + jl, d, sizeof d);
    write_bytes(path, buf, 8 + jl + sizeof d);

    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    assert_int_equal(kd_safetensors_count(st), 2);
    assert_string_equal(kd_safetensors_meta(st, "format"), "pt");
    const kd_st_entry *b = kd_safetensors_find(st, "fc.bias");
    assert_non_null(b);
    assert_memory_equal(b->data, d + 4, 8);
    assert_memory_equal(kd_safetensors_find(st, "fc.weight")->data, d, 16);
    kd_safetensors_close(st);
}

/* ---- malformed files ---------------------------------------------------------------------- */

static void test_missing_file(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "nope.safetensors");
    expect_open_fails(path, KD_ERR_NOT_FOUND, "No such file");
}

static void test_short_file(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "short.safetensors");
    write_bytes(path, "\x05\0\0\0\0", 5);
    expect_open_fails(path, KD_ERR_FORMAT, "shorter than 8 bytes");
}

static void test_header_len_beyond_file(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "trunc.safetensors");
    write_raw_st(path, 100, "{}", 2, 0);
    expect_open_fails(path, KD_ERR_FORMAT, "header length 100 is larger than the file");
}

static void test_header_len_absurd(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "absurd.safetensors");
    write_raw_st(path, 200ull * 1024 * 1024, "{}", 2, 0);
    expect_open_fails(path, KD_ERR_FORMAT, "header length 209715200 is absurd");
}

static void test_header_not_json(void **state)
{
    expect_bad_header(*state, "{\"a\": {\"dtype\": ", 0, "header is not valid JSON");
}

static void test_header_trailing_garbage(void **state)
{
    expect_bad_header(*state, "{}  xyz", 0, "header is not valid JSON (trailing bytes");
}

static void test_header_not_object(void **state)
{
    expect_bad_header(*state, "[1, 2, 3]", 0, "header is not a JSON object");
}

static void test_entry_not_object(void **state)
{
    expect_bad_header(*state, "{\"w\": [1]}", 0, "tensor 'w': entry is not a JSON object");
}

static void test_missing_dtype(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'w': missing 'dtype'");
}

static void test_dtype_wrong_type(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'w': 'dtype' is not a string");
}

static void test_unknown_dtype(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                      4, "tensor 'w': unknown dtype 'F128'");
}

static void test_missing_shape(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4,
                      "tensor 'w': missing 'shape'");
}

static void test_shape_wrong_type(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}",
                      4, "tensor 'w': 'shape' is not an array");
}

static void test_shape_element_not_integer(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}",
                      4, "tensor 'w': 'shape' element 0 is not an integer");
}

static void test_too_many_dims(void **state)
{
    expect_bad_header(*state,
                      "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'w': 5 dimensions, at most 4");
}

static void test_negative_dim(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,4]}}",
                      4, "tensor 'w': negative dimension -3");
}

static void test_missing_offsets(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4,
                      "tensor 'w': missing 'data_offsets'");
}

static void test_offsets_wrong_type(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
                      "tensor 'w': 'data_offsets' is not an array of two");
    expect_bad_header(*state,
                      "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"4\"]}}", 4,
                      "tensor 'w': 'data_offsets' is not an array of two");
}

static void test_offsets_begin_after_end(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8,
                      "tensor 'w': data_offsets begin 8 > end 4");
}

static void test_offsets_beyond_buffer(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      12, "tensor 'w': data_offsets end 16 is beyond the end of the 12-byte");
}

static void test_size_mismatch(void **state)
{
    expect_bad_header(*state, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}",
                      16,
                      "tensor 'w': data_offsets span 16 bytes but shape [2, 3] of F32 needs 24 "
                      "bytes");
}

static void test_overlap(void **state)
{
    expect_bad_header(*state,
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                      12, "tensors 'a' and 'b' overlap");
}

static void test_duplicate_name(void **state)
{
    expect_bad_header(*state,
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                      8, "duplicate tensor name 'a'");
}

static void test_metadata_not_string(void **state)
{
    expect_bad_header(*state, "{\"__metadata__\":{\"step\":12}}", 0,
                      "metadata value of 'step' is not a string");
}

static void test_metadata_not_object(void **state)
{
    expect_bad_header(*state, "{\"__metadata__\":[\"a\"]}", 0,
                      "'__metadata__' is not a JSON object");
}

/* ---- durability --------------------------------------------------------------------------- */

static void test_atomic_write_fsize_limit(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "last.safetensors");
    float good[16];
    for (int i = 0; i < 16; i++)
        good[i] = (float)i * 0.25f;
    kd_st_entry ge = {"w", KD_DTYPE_F32, 1, {16}, good};
    const char *meta[] = {"step", "1"};
    assert_int_equal(kd_safetensors_save(path, &ge, 1, meta, 1), KD_OK);
    void *before;
    size_t before_len;
    assert_int_equal(kd_file_read_all(path, &before, &before_len), KD_OK);

    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Child: a 64 KiB file-size limit makes the 4 MiB write fail with EFBIG. */
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {64 * 1024, 64 * 1024};
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0)
            _exit(10);
        size_t n = 1u << 20;
        float *big = calloc(n, sizeof *big);
        if (!big)
            _exit(11);
        kd_st_entry be = {"w", KD_DTYPE_F32, 1, {(int64_t)n}, big};
        kd_status st = kd_safetensors_save(path, &be, 1, meta, 1);
        int code = 0;
        if (st == KD_OK)
            code = 1;
        else if (st != KD_ERR_IO)
            code = 2;
        else if (!strstr(kd_last_error(), path))
            code = 3;
        else if (!strstr(kd_last_error(), "File too large"))
            code = 4;
        if (code)
            fprintf(stderr, "child: status %d: %s\n", (int)st, kd_last_error());
        free(big);
        _exit(code);
    }
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    assert_true(WIFEXITED(ws));
    assert_int_equal(WEXITSTATUS(ws), 0);

    void *after;
    size_t after_len;
    assert_int_equal(kd_file_read_all(path, &after, &after_len), KD_OK);
    assert_int_equal(after_len, before_len);
    assert_memory_equal(after, before, before_len);
    free(after);
    free(before);
    kd_safetensors *st = NULL;
    assert_int_equal(kd_safetensors_open(path, &st), KD_OK);
    const kd_st_entry *e = kd_safetensors_find(st, "w");
    assert_non_null(e);
    assert_int_equal(e->shape[0], 16);
    assert_memory_equal(e->data, good, sizeof good);
    kd_safetensors_close(st);
    assert_int_equal(count_temp_files(dir), 0);
}

static kd_status failing_writer(FILE *f, void *ctx)
{
    int *calls = ctx;
    (*calls)++;
    KD_TRY(kd_fwrite_all(f, "partial new contents", 20, "body"));
    return KD_FAIL(KD_ERR_INTERNAL, "writer exploded");
}

static void test_atomic_writer_error(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    join(path, dir, "config.yaml");
    write_bytes(path, "old contents\n", 13);
    int calls = 0;
    kd_status st = kd_file_write_atomic(path, failing_writer, &calls);
    assert_int_equal(st, KD_ERR_INTERNAL);
    assert_int_equal(calls, 1);
    assert_non_null(strstr(kd_last_error(), path));
    assert_non_null(strstr(kd_last_error(), "writer exploded"));
    void *buf;
    size_t len;
    assert_int_equal(kd_file_read_all(path, &buf, &len), KD_OK);
    assert_int_equal(len, 13);
    assert_memory_equal(buf, "old contents\n", 13);
    free(buf);
    assert_int_equal(count_temp_files(dir), 0);
}

static kd_status hello_writer(FILE *f, void *ctx)
{
    (void)ctx;
    return kd_fwrite_all(f, "hello", 5, "greeting");
}

static void test_atomic_write_bad_dir(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "no/such/dir/x.bin");
    assert_int_equal(kd_file_write_atomic(path, hello_writer, NULL), KD_ERR_IO);
    assert_non_null(strstr(kd_last_error(), path));
    assert_non_null(strstr(kd_last_error(), "creating temporary file failed"));

    join(path, *state, "ok.bin");
    assert_int_equal(kd_file_write_atomic(path, hello_writer, NULL), KD_OK);
    void *buf;
    size_t len;
    assert_int_equal(kd_file_read_all(path, &buf, &len), KD_OK);
    assert_int_equal(len, 5);
    assert_string_equal(buf, "hello"); /* read_all NUL-terminates */
    free(buf);
}

static void test_fwrite_all_reports_enospc(void **state)
{
    (void)state;
    FILE *f = fopen("/dev/full", "wb");
    if (!f)
        skip();
    setvbuf(f, NULL, _IONBF, 0);
    char buf[64] = {0};
    assert_int_equal(kd_fwrite_all(f, buf, sizeof buf, "tensor data"), KD_ERR_IO);
    assert_non_null(strstr(kd_last_error(), "tensor data: short write (0 of 64 bytes)"));
    assert_non_null(strstr(kd_last_error(), "No space left on device"));
    fclose(f);
}

static void test_read_all_missing(void **state)
{
    char path[PATH_MAX];
    join(path, *state, "missing.txt");
    void *buf = (void *)0x1;
    size_t len = 99;
    assert_int_equal(kd_file_read_all(path, &buf, &len), KD_ERR_NOT_FOUND);
    assert_null(buf);
    assert_int_equal(len, 0);
    assert_non_null(strstr(kd_last_error(), path));
}

static void test_mkdir_p(void **state)
{
    const char *dir = *state;
    char path[PATH_MAX];
    struct stat sb;
    snprintf(path, sizeof path, "%s/runs/exp1//seed_0/", dir);
    assert_int_equal(kd_mkdir_p(path), KD_OK);
    assert_int_equal(stat(path, &sb), 0);
    assert_true(S_ISDIR(sb.st_mode));
    assert_int_equal(kd_mkdir_p(path), KD_OK); /* existing is fine */

    char file[PATH_MAX];
    join(file, dir, "blocker");
    write_bytes(file, "x", 1);
    snprintf(path, sizeof path, "%s/blocker/sub", dir);
    assert_int_equal(kd_mkdir_p(path), KD_ERR_IO);
    assert_non_null(strstr(kd_last_error(), "is not a directory"));
    assert_int_equal(kd_mkdir_p(file), KD_ERR_IO);
    assert_int_equal(kd_mkdir_p(""), KD_ERR_INVALID);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup_dir, teardown_dir)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_round_trip),
        T(test_find),
        T(test_empty_file_round_trip),
        T(test_overwrite_replaces),
        T(test_save_rejects_bad_entries),
        T(test_unaligned_data_start),
        T(test_python_style_file),
        T(test_missing_file),
        T(test_short_file),
        T(test_header_len_beyond_file),
        T(test_header_len_absurd),
        T(test_header_not_json),
        T(test_header_trailing_garbage),
        T(test_header_not_object),
        T(test_entry_not_object),
        T(test_missing_dtype),
        T(test_dtype_wrong_type),
        T(test_unknown_dtype),
        T(test_missing_shape),
        T(test_shape_wrong_type),
        T(test_shape_element_not_integer),
        T(test_too_many_dims),
        T(test_negative_dim),
        T(test_missing_offsets),
        T(test_offsets_wrong_type),
        T(test_offsets_begin_after_end),
        T(test_offsets_beyond_buffer),
        T(test_size_mismatch),
        T(test_overlap),
        T(test_duplicate_name),
        T(test_metadata_not_string),
        T(test_metadata_not_object),
        T(test_atomic_write_fsize_limit),
        T(test_atomic_writer_error),
        T(test_atomic_write_bad_dir),
        T(test_fwrite_all_reports_enospc),
        T(test_read_all_missing),
        T(test_mkdir_p),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
