/*
 * test_dataset.c - data set loading from a fake root, the search order and
 * not-found advice, validation failures, the real Fashion-MNIST test split
 * when installed, train/val splitting and the epoch permutation.
 * Fake data sets are tiny 28x28 IDX files written into a mkdtemp directory.
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
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "dataset.h"
#include "sampler.h"

#define FAKE_N 12
#define HW     28

static char tmpdir[256];

static void write_file(const char *path, const uint8_t *bytes, size_t len, int gz)
{
    if (gz) {
        gzFile g = gzopen(path, "wb");
        assert_non_null(g);
        assert_int_equal(gzwrite(g, bytes, (unsigned)len), (int)len);
        assert_int_equal(gzclose(g), Z_OK);
    } else {
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(bytes, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
    }
}

static size_t put_header(uint8_t *buf, int ndim, const uint32_t *dims)
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
    return k;
}

static uint8_t fake_pixel(int64_t i) { return (uint8_t)((i * 37 + 11) % 256); }
static uint8_t fake_label(int64_t s) { return (uint8_t)((s * 3 + 1) % 10); }

/*
 * Write a fake split into dir: n images of h x w and n_labels labels; label
 * `bad_label_at` (if >= 0) is set to 10. Files are gzip'd when gz.
 */
static void write_fake(const char *dir, const char *split, int n, int h, int w, int n_labels,
                       int bad_label_at, int gz)
{
    size_t img_len = 16 + (size_t)n * h * w;
    uint8_t *img = malloc(img_len);
    uint8_t lbl[8 + 256];
    assert_non_null(img);
    uint32_t idims[3] = {(uint32_t)n, (uint32_t)h, (uint32_t)w};
    size_t k = put_header(img, 3, idims);
    for (size_t i = 0; i < (size_t)n * h * w; i++)
        img[k + i] = fake_pixel((int64_t)i);
    uint32_t ldims[1] = {(uint32_t)n_labels};
    size_t kl = put_header(lbl, 1, ldims);
    for (int s = 0; s < n_labels; s++)
        lbl[kl + s] = s == bad_label_at ? 10 : fake_label(s);

    char path[512];
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte%s", dir, split, gz ? ".gz" : "");
    write_file(path, img, img_len, gz);
    snprintf(path, sizeof path, "%s/%s-labels-idx1-ubyte%s", dir, split, gz ? ".gz" : "");
    write_file(path, lbl, kl + (size_t)n_labels, gz);
    free(img);
}

static void make_subdir(char *out, size_t len, const char *name)
{
    snprintf(out, len, "%s/%s", tmpdir, name);
    assert_int_equal(mkdir(out, 0755), 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kd_test_dataset_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void check_fake(const kd_dataset *d, float mean, float std)
{
    assert_int_equal(d->n, FAKE_N);
    assert_int_equal(d->c, 1);
    assert_int_equal(d->h, HW);
    assert_int_equal(d->w, HW);
    assert_int_equal(d->num_classes, 10);
    assert_true(d->mean == mean);
    assert_true(d->std == std);
    for (int64_t i = 0; i < d->n * HW * HW; i++) {
        float want = ((float)fake_pixel(i) / 255.0f - mean) / std;
        if (d->x[i] != want)
            fail_msg("x[%lld] = %.9g, want %.9g", (long long)i, d->x[i], want);
    }
    for (int64_t s = 0; s < d->n; s++)
        assert_int_equal(d->y[s], fake_label(s));
}

static void test_load_fake_gz(void **state)
{
    (void)state;
    char dir[300];
    make_subdir(dir, sizeof dir, "gzroot");
    write_fake(dir, "train", FAKE_N, HW, HW, FAKE_N, -1, 1);
    kd_dataset d;
    assert_int_equal(kd_dataset_load("fashion-mnist", dir, 1, &d), KD_OK);
    assert_string_equal(d.name, "fashion-mnist");
    check_fake(&d, 0.2860f, 0.3530f);
    /* The first fake pixel is 11; also check the value against a hand-computed literal. */
    assert_true(d.x[0] == (11.0f / 255.0f - 0.2860f) / 0.3530f);
    assert_true(fabsf(d.x[0] - (-0.68799645f)) < 1e-6f);
    kd_dataset_free(&d);
    assert_null(d.x);
    assert_int_equal(d.n, 0);
}

static void test_load_fake_raw_test_split(void **state)
{
    (void)state;
    char dir[300];
    make_subdir(dir, sizeof dir, "rawroot");
    write_fake(dir, "t10k", FAKE_N, HW, HW, FAKE_N, -1, 0);
    kd_dataset d;
    assert_int_equal(kd_dataset_load("mnist", dir, 0, &d), KD_OK);
    check_fake(&d, 0.1307f, 0.3081f);
    kd_dataset_free(&d);
    /* Only the test split exists there. */
    assert_int_equal(kd_dataset_load("mnist", dir, 1, &d), KD_ERR_NOT_FOUND);
    assert_null(d.x);
}

static void test_env_search(void **state)
{
    (void)state;
    char base[300], dir[400];
    make_subdir(base, sizeof base, "envroot");
    snprintf(dir, sizeof dir, "%s/fashion-mnist", base);
    assert_int_equal(mkdir(dir, 0755), 0);
    write_fake(dir, "t10k", FAKE_N, HW, HW, FAKE_N, -1, 1);
    /* $DISTILL_DATA/<name> comes before /usr/share/datasets/<name>. */
    assert_int_equal(setenv("DISTILL_DATA", base, 1), 0);
    kd_dataset d;
    kd_status st = kd_dataset_load("fashion-mnist", NULL, 0, &d);
    unsetenv("DISTILL_DATA");
    assert_int_equal(st, KD_OK);
    check_fake(&d, 0.2860f, 0.3530f);
    kd_dataset_free(&d);

    /* root/<name> is accepted when root is given. */
    assert_int_equal(kd_dataset_load("fashion-mnist", base, 0, &d), KD_OK);
    assert_int_equal(d.n, FAKE_N);
    kd_dataset_free(&d);
}

static void test_not_found(void **state)
{
    (void)state;
    char dir[300];
    make_subdir(dir, sizeof dir, "emptyroot");
    kd_dataset d;
    kd_clear_error();
    assert_int_equal(kd_dataset_load("fashion-mnist", dir, 1, &d), KD_ERR_NOT_FOUND);
    const char *msg = kd_last_error();
    assert_non_null(strstr(msg, "data set 'fashion-mnist' not found"));
    assert_non_null(strstr(msg, "apt-get install dataset-fashion-mnist"));
    assert_non_null(strstr(msg, "data/get_datasets.sh"));
    assert_non_null(strstr(msg, dir));

    /* Through the environment search, the message lists both places. */
    assert_int_equal(setenv("DISTILL_DATA", dir, 1), 0);
    kd_clear_error();
    kd_status st = kd_dataset_load("mnist", NULL, 1, &d);
    unsetenv("DISTILL_DATA");
    assert_int_equal(st, KD_ERR_NOT_FOUND);
    msg = kd_last_error();
    assert_non_null(strstr(msg, "data set 'mnist' not found"));
    assert_non_null(strstr(msg, "/usr/share/datasets/mnist"));
    assert_non_null(strstr(msg, "emptyroot/mnist"));
}

static void test_unknown_name(void **state)
{
    (void)state;
    kd_dataset d;
    kd_clear_error();
    assert_int_equal(kd_dataset_load("cifar10", tmpdir, 1, &d), KD_ERR_CONFIG);
    const char *msg = kd_last_error();
    assert_non_null(strstr(msg, "cifar10"));
    assert_non_null(strstr(msg, "fashion-mnist"));
    assert_non_null(strstr(msg, "mnist"));
}

static void expect_load_error(const char *subdir, const char *needle)
{
    char dir[400];
    snprintf(dir, sizeof dir, "%s/%s", tmpdir, subdir);
    kd_dataset d;
    kd_clear_error();
    assert_int_equal(kd_dataset_load("fashion-mnist", dir, 1, &d), KD_ERR_FORMAT);
    if (!strstr(kd_last_error(), needle))
        fail_msg("message '%s' lacks '%s'", kd_last_error(), needle);
    assert_null(d.x);
    assert_null(d.y);
}

static void test_validation(void **state)
{
    (void)state;
    char dir[300];
    make_subdir(dir, sizeof dir, "badlabel");
    write_fake(dir, "train", FAKE_N, HW, HW, FAKE_N, 5, 1);
    expect_load_error("badlabel", "label 5 is 10, outside [0, 10)");

    make_subdir(dir, sizeof dir, "badcount");
    write_fake(dir, "train", FAKE_N, HW, HW, FAKE_N - 2, -1, 1);
    expect_load_error("badcount", "holds 12 images but");

    make_subdir(dir, sizeof dir, "baddims");
    write_fake(dir, "train", 2, 32, 32, 2, -1, 0);
    expect_load_error("baddims", "images are 32x32");

    /* A broken IDX file surfaces the reader's message under the data set context. */
    make_subdir(dir, sizeof dir, "badidx");
    write_fake(dir, "train", FAKE_N, HW, HW, FAKE_N, -1, 0);
    char path[400];
    snprintf(path, sizeof path, "%s/train-images-idx3-ubyte", dir);
    assert_int_equal(truncate(path, 100), 0);
    expect_load_error("badidx", "loading data set 'fashion-mnist': ");
    expect_load_error("badidx", "is truncated");
}

static void test_real_fashion_mnist(void **state)
{
    (void)state;
    struct stat st;
    if (stat("/usr/share/datasets/fashion-mnist", &st) != 0) {
        skip();
        return;
    }
    unsetenv("DISTILL_DATA");
    kd_dataset d;
    assert_int_equal(kd_dataset_load("fashion-mnist", NULL, 0, &d), KD_OK);
    assert_int_equal(d.n, 10000);
    assert_int_equal(d.c, 1);
    assert_int_equal(d.h, 28);
    assert_int_equal(d.w, 28);
    int64_t hist[10] = {0};
    for (int64_t i = 0; i < d.n; i++) {
        assert_in_range(d.y[i], 0, 9);
        hist[d.y[i]]++;
    }
    for (int k = 0; k < 10; k++)
        assert_int_equal(hist[k], 1000);
    /* Every value is one of the 256 normalised pixel levels, black included. */
    float lo = (0.0f - d.mean) / d.std, hi = (1.0f - d.mean) / d.std;
    double sum = 0.0;
    for (int64_t i = 0; i < d.n * 784; i++) {
        assert_true(d.x[i] >= lo && d.x[i] <= hi);
        sum += d.x[i];
    }
    /* Normalised with the data set's own statistics, the mean is near zero. */
    assert_true(fabs(sum / (double)(d.n * 784)) < 0.05);
    kd_dataset_free(&d);
}

/* In-memory data set whose sample i has x[i*per] = i, so samples can be identified. */
static void make_mem_dataset(kd_dataset *d, int64_t n)
{
    memset(d, 0, sizeof *d);
    snprintf(d->name, sizeof d->name, "mem");
    d->n = n;
    d->c = 1;
    d->h = 2;
    d->w = 3;
    d->num_classes = 10;
    d->mean = 0.5f;
    d->std = 0.25f;
    d->x = malloc((size_t)n * 6 * sizeof *d->x);
    d->y = malloc((size_t)n * sizeof *d->y);
    assert_non_null(d->x);
    assert_non_null(d->y);
    for (int64_t i = 0; i < n; i++) {
        for (int k = 0; k < 6; k++)
            d->x[i * 6 + k] = (float)i + 0.125f * (float)k;
        d->y[i] = (int32_t)(i % 10);
    }
}

static void test_split(void **state)
{
    (void)state;
    enum { N = 200, V = 37 };
    kd_dataset full, tr, va, tr2, va2, tr3, va3;
    make_mem_dataset(&full, N);
    assert_int_equal(kd_dataset_split(&full, V, 42, &tr, &va), KD_OK);
    assert_int_equal(tr.n, N - V);
    assert_int_equal(va.n, V);
    assert_string_equal(va.name, "mem");
    assert_true(va.mean == 0.5f && va.std == 0.25f && va.h == 2 && va.w == 3);

    /* Disjoint and covering, each sample intact and with its label, original order kept. */
    int seen[N] = {0};
    const kd_dataset *parts[2] = {&tr, &va};
    for (int p = 0; p < 2; p++) {
        int64_t prev = -1;
        for (int64_t i = 0; i < parts[p]->n; i++) {
            int64_t id = (int64_t)parts[p]->x[i * 6];
            assert_in_range(id, 0, N - 1);
            assert_true(id > prev);
            prev = id;
            seen[id]++;
            assert_memory_equal(parts[p]->x + i * 6, full.x + id * 6, 6 * sizeof(float));
            assert_int_equal(parts[p]->y[i], full.y[id]);
        }
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);

    /* Same seed, same split; another seed, another split. */
    assert_int_equal(kd_dataset_split(&full, V, 42, &tr2, &va2), KD_OK);
    assert_memory_equal(va.x, va2.x, V * 6 * sizeof(float));
    assert_memory_equal(tr.x, tr2.x, (N - V) * 6 * sizeof(float));
    assert_int_equal(kd_dataset_split(&full, V, 43, &tr3, &va3), KD_OK);
    assert_true(memcmp(va.x, va3.x, V * 6 * sizeof(float)) != 0);

    /* Outputs own their memory: freeing the input leaves them readable. */
    kd_dataset_free(&full);
    assert_true(va.x[0] >= 0.0f);
    kd_dataset_free(&tr);
    kd_dataset_free(&va);
    kd_dataset_free(&tr2);
    kd_dataset_free(&va2);
    kd_dataset_free(&tr3);
    kd_dataset_free(&va3);
}

static void test_split_edges(void **state)
{
    (void)state;
    kd_dataset full, tr, va;
    make_mem_dataset(&full, 20);
    assert_int_equal(kd_dataset_split(&full, 0, 7, &tr, &va), KD_OK);
    assert_int_equal(va.n, 0);
    assert_null(va.x);
    assert_null(va.y);
    assert_int_equal(va.h, 2);
    assert_int_equal(tr.n, 20);
    assert_ptr_not_equal(tr.x, full.x);
    assert_memory_equal(tr.x, full.x, 20 * 6 * sizeof(float));
    assert_memory_equal(tr.y, full.y, 20 * sizeof(int32_t));
    kd_dataset_free(&tr);
    kd_dataset_free(&va);

    assert_int_equal(kd_dataset_split(&full, 20, 7, &tr, &va), KD_OK);
    assert_int_equal(tr.n, 0);
    assert_int_equal(va.n, 20);
    kd_dataset_free(&tr);
    kd_dataset_free(&va);

    assert_int_equal(kd_dataset_split(&full, 21, 7, &tr, &va), KD_ERR_INVALID);
    assert_int_equal(kd_dataset_split(&full, -1, 7, &tr, &va), KD_ERR_INVALID);
    assert_int_equal(kd_dataset_split(&full, 3, 7, &tr, &tr), KD_ERR_INVALID);
    kd_dataset_free(&full);
}

static void test_permutation(void **state)
{
    (void)state;
    enum { N = 1000 };
    static uint32_t a[N], b[N], c[N];
    kd_epoch_permutation(a, N, 99, 3);
    int seen[N] = {0};
    int fixed = 0;
    for (int i = 0; i < N; i++) {
        assert_in_range(a[i], 0, N - 1);
        seen[a[i]]++;
        fixed += a[i] == (uint32_t)i;
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    /* A shuffle of 1000 leaves about one element in place, never most of them. */
    assert_true(fixed < 20);

    /* History-free: other calls in between do not change epoch 3's order. */
    kd_epoch_permutation(c, N, 99, 4);
    kd_epoch_permutation(b, N, 99, 3);
    assert_memory_equal(a, b, sizeof a);
    assert_true(memcmp(a, c, sizeof a) != 0);
    kd_epoch_permutation(c, N, 100, 3);
    assert_true(memcmp(a, c, sizeof a) != 0);

    uint32_t one = 77;
    kd_epoch_permutation(&one, 1, 1, 1);
    assert_int_equal(one, 0);
    kd_epoch_permutation(NULL, 0, 1, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_fake_gz),       cmocka_unit_test(test_load_fake_raw_test_split),
        cmocka_unit_test(test_env_search),         cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_unknown_name),       cmocka_unit_test(test_validation),
        cmocka_unit_test(test_real_fashion_mnist), cmocka_unit_test(test_split),
        cmocka_unit_test(test_split_edges),        cmocka_unit_test(test_permutation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
