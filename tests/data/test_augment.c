/*
 * test_augment.c - augmentation parameters and their application, and batch
 * gathering: flips, shifts with fill, identity cases, determinism and range
 * of the draws, and order independence of the gathered views.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "augment.h"

#define C   2
#define H   5
#define W   7
#define PER (C * H * W)

static void fill_image(float *img)
{
    for (int i = 0; i < PER; i++)
        img[i] = 1.0f + (float)i; /* all distinct and never equal to the fill */
}

static float at(const float *img, int ch, int y, int x) { return img[(ch * H + y) * W + x]; }

static void test_identity_params(void **state)
{
    (void)state;
    float src[PER], dst[PER];
    fill_image(src);
    memset(dst, 0, sizeof dst);
    const float p[KD_AUG_NPARAMS] = {0.0f, 0.0f, 0.0f};
    kd_augment_apply(p, src, dst, C, H, W, -9.0f);
    assert_memory_equal(src, dst, sizeof src);

    /* With both augmentations off, every draw is the identity. */
    kd_augment_cfg off = {0, 0};
    for (uint64_t i = 0; i < 200; i++) {
        float q[KD_AUG_NPARAMS] = {5.0f, 5.0f, 5.0f};
        kd_augment_draw(&off, 1, 2, i, q);
        assert_true(q[0] == 0.0f && q[1] == 0.0f && q[2] == 0.0f);
        kd_augment_apply(q, src, dst, C, H, W, -9.0f);
        assert_memory_equal(src, dst, sizeof src);
    }
}

static void test_flip(void **state)
{
    (void)state;
    float src[PER], once[PER], twice[PER];
    fill_image(src);
    const float p[KD_AUG_NPARAMS] = {0.0f, 0.0f, 1.0f};
    kd_augment_apply(p, src, once, C, H, W, -9.0f);
    for (int ch = 0; ch < C; ch++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++)
                assert_true(at(once, ch, y, x) == at(src, ch, y, W - 1 - x));
    kd_augment_apply(p, once, twice, C, H, W, -9.0f);
    assert_memory_equal(src, twice, sizeof src);
}

static void test_shift(void **state)
{
    (void)state;
    float src[PER], dst[PER];
    const float fill = -0.8102f;
    fill_image(src);
    /* Right by 2, up by 1: content at (y, x) moves to (y - 1, x + 2). */
    const float p[KD_AUG_NPARAMS] = {2.0f, -1.0f, 0.0f};
    kd_augment_apply(p, src, dst, C, H, W, fill);
    assert_true(at(dst, 1, 2, 3) == at(src, 1, 3, 1));
    assert_true(at(dst, 0, 0, 6) == at(src, 0, 1, 4));
    for (int ch = 0; ch < C; ch++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int sy = y + 1, sx = x - 2;
                float want = (sy < H && sx >= 0) ? at(src, ch, sy, sx) : fill;
                assert_true(at(dst, ch, y, x) == want);
            }

    /* Shift then flip: dst(y, x) = src(y - dy, (W-1-x) - dx). */
    const float q[KD_AUG_NPARAMS] = {-1.0f, 2.0f, 1.0f};
    kd_augment_apply(q, src, dst, C, H, W, fill);
    for (int ch = 0; ch < C; ch++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int sy = y - 2, sx = (W - 1 - x) + 1;
                float want = (sy >= 0 && sx < W) ? at(src, ch, sy, sx) : fill;
                assert_true(at(dst, ch, y, x) == want);
            }

    /* A shift past the whole image leaves only fill. */
    const float r[KD_AUG_NPARAMS] = {(float)W, 0.0f, 0.0f};
    kd_augment_apply(r, src, dst, C, H, W, fill);
    for (int i = 0; i < PER; i++)
        assert_true(dst[i] == fill);
}

static void test_draw(void **state)
{
    (void)state;
    enum { P = 3, DRAWS = 20000 };
    kd_augment_cfg cfg = {P, 1};
    int hits_x[2 * P + 1] = {0}, hits_y[2 * P + 1] = {0};
    int flips = 0, differs = 0;
    for (uint64_t i = 0; i < DRAWS; i++) {
        float a[KD_AUG_NPARAMS], b[KD_AUG_NPARAMS], c[KD_AUG_NPARAMS];
        kd_augment_draw(&cfg, 11, 4, i, a);
        kd_augment_draw(&cfg, 11, 5, i, c); /* an unrelated draw in between */
        kd_augment_draw(&cfg, 11, 4, i, b);
        assert_memory_equal(a, b, sizeof a);
        differs += memcmp(a, c, sizeof a) != 0;
        int dx = (int)a[0], dy = (int)a[1];
        assert_true((float)dx == a[0] && (float)dy == a[1]);
        assert_in_range(dx + P, 0, 2 * P);
        assert_in_range(dy + P, 0, 2 * P);
        hits_x[dx + P]++;
        hits_y[dy + P]++;
        assert_true(a[2] == 0.0f || a[2] == 1.0f);
        flips += a[2] == 1.0f;
    }
    /* Every shift value occurs, roughly uniformly, and flips are near one half. */
    for (int k = 0; k <= 2 * P; k++) {
        assert_in_range(hits_x[k], DRAWS / 7 - 400, DRAWS / 7 + 400);
        assert_in_range(hits_y[k], DRAWS / 7 - 400, DRAWS / 7 + 400);
    }
    assert_in_range(flips, DRAWS / 2 - 500, DRAWS / 2 + 500);
    assert_true(differs > DRAWS * 9 / 10);

    /* hflip off: never flips; crop off: never shifts. */
    kd_augment_cfg only_crop = {P, 0}, only_flip = {0, 1};
    for (uint64_t i = 0; i < 500; i++) {
        float a[KD_AUG_NPARAMS];
        kd_augment_draw(&only_crop, 3, 0, i, a);
        assert_true(a[2] == 0.0f);
        kd_augment_draw(&only_flip, 3, 0, i, a);
        assert_true(a[0] == 0.0f && a[1] == 0.0f);
    }
}

static void make_dataset(kd_dataset *d, int n)
{
    memset(d, 0, sizeof *d);
    d->n = n;
    d->c = C;
    d->h = H;
    d->w = W;
    d->num_classes = 10;
    d->mean = 0.25f;
    d->std = 0.5f;
    d->x = malloc((size_t)n * PER * sizeof *d->x);
    d->y = malloc((size_t)n * sizeof *d->y);
    assert_non_null(d->x);
    assert_non_null(d->y);
    for (int i = 0; i < n * PER; i++)
        d->x[i] = 1.0f + (float)i;
    for (int i = 0; i < n; i++)
        d->y[i] = (i * 3) % 10;
}

static void test_gather(void **state)
{
    (void)state;
    kd_dataset d;
    make_dataset(&d, 9);
    kd_augment_cfg cfg = {2, 1};
    const uint32_t i1[4] = {7, 2, 5, 0}, i2[4] = {0, 5, 7, 2};
    float x1[4 * PER], x2[4 * PER], p1[4 * KD_AUG_NPARAMS], p2[4 * KD_AUG_NPARAMS];
    int32_t y1[4], y2[4];
    kd_batch_gather(&d, i1, 4, &cfg, 21, 6, x1, y1, p1);
    kd_batch_gather(&d, i2, 4, &cfg, 21, 6, x2, y2, p2);

    const float fill = (0.0f - d.mean) / d.std;
    int any_aug = 0;
    for (int a = 0; a < 4; a++) {
        int b = 0;
        while (i2[b] != i1[a])
            b++;
        /* Same sample, same view and parameters, wherever it sits in the batch. */
        assert_memory_equal(x1 + a * PER, x2 + b * PER, PER * sizeof(float));
        assert_memory_equal(p1 + a * KD_AUG_NPARAMS, p2 + b * KD_AUG_NPARAMS,
                            KD_AUG_NPARAMS * sizeof(float));
        assert_int_equal(y1[a], d.y[i1[a]]);
        assert_int_equal(y2[b], d.y[i1[a]]);

        /* The recorded parameters are the per-sample draw and reproduce the view. */
        float want_p[KD_AUG_NPARAMS], want_x[PER];
        kd_augment_draw(&cfg, 21, 6, i1[a], want_p);
        assert_memory_equal(p1 + a * KD_AUG_NPARAMS, want_p, sizeof want_p);
        kd_augment_apply(want_p, d.x + i1[a] * PER, want_x, C, H, W, fill);
        assert_memory_equal(x1 + a * PER, want_x, sizeof want_x);
        any_aug |= want_p[0] != 0.0f || want_p[1] != 0.0f || want_p[2] != 0.0f;
    }
    assert_true(any_aug);

    /* A different epoch gives different views of the same batch. */
    float x3[4 * PER];
    kd_batch_gather(&d, i1, 4, &cfg, 21, 7, x3, NULL, NULL);
    assert_true(memcmp(x1, x3, sizeof x1) != 0);

    /* No augmentation: plain copies and zero parameters. */
    memset(p1, 0x7f, sizeof p1);
    kd_batch_gather(&d, i1, 4, NULL, 21, 6, x1, y1, p1);
    for (int a = 0; a < 4; a++) {
        assert_memory_equal(x1 + a * PER, d.x + i1[a] * PER, PER * sizeof(float));
        assert_int_equal(y1[a], d.y[i1[a]]);
    }
    for (int k = 0; k < 4 * KD_AUG_NPARAMS; k++)
        assert_true(p1[k] == 0.0f);
    free(d.x);
    free(d.y);
}

/* The trainer's two steps, draw then assemble (kd_augment_draw_batch + kd_augment_gather, the
 * CPU backend's gather_augment), give kd_batch_gather's batch. */
static void test_draw_then_gather(void **state)
{
    (void)state;
    kd_dataset d;
    make_dataset(&d, 9);
    kd_augment_cfg cfg = {2, 1};
    const uint32_t idx[5] = {8, 1, 1, 4, 0};
    float x1[5 * PER], x2[5 * PER], p1[5 * KD_AUG_NPARAMS], p2[5 * KD_AUG_NPARAMS];
    int32_t y1[5], y2[5];
    const float fill = (0.0f - d.mean) / d.std;
    for (int pass = 0; pass < 2; pass++) {
        const kd_augment_cfg *a = pass ? &cfg : NULL;
        kd_batch_gather(&d, idx, 5, a, 3, 11, x1, y1, p1);
        kd_augment_draw_batch(a, 3, 11, idx, 5, p2);
        kd_augment_gather(5, C, H, W, d.x, d.y, idx, p2, fill, x2, y2);
        assert_memory_equal(p1, p2, sizeof p1);
        assert_memory_equal(x1, x2, sizeof x1);
        assert_memory_equal(y1, y2, sizeof y1);
    }
    /* labels are optional */
    kd_augment_gather(5, C, H, W, d.x, d.y, idx, p2, fill, x2, NULL);
    assert_memory_equal(x1, x2, sizeof x1);
    free(d.x);
    free(d.y);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identity_params), cmocka_unit_test(test_flip),
        cmocka_unit_test(test_shift),           cmocka_unit_test(test_draw),
        cmocka_unit_test(test_gather),          cmocka_unit_test(test_draw_then_gather),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
