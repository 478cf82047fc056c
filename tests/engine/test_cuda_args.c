/*
 * test_cuda_args.c - the CUDA launchers' argument checks, which run before anything touches a
 * device, so this test runs on every machine with a CUDA build (no GPU needed): a negative size,
 * a missing buffer or a temperature <= 0 is KD_ERR_INVALID with a message naming the launcher,
 * and an empty launch (a size of 0) is KD_OK with nothing queued. Exits 77 (CTest: skipped) when
 * distill was built without CUDA.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "status.h"

#ifdef KD_HAVE_CUDA
#include "cross_entropy.h"
#include "elementwise.h"
#include "pool.h"
#include "softmax_kl.h"

/* no launch reaches a device here: the stream is never used */
#define NO_STREAM NULL

static void expect_invalid(kd_status st, const char *what)
{
    assert_int_equal(st, KD_ERR_INVALID);
    if (!strstr(kd_last_error(), what))
        fail_msg("expected a message naming '%s', got '%s'", what, kd_last_error());
}

static void test_negative_sizes(void **state)
{
    (void)state;
    static float f[4];
    static uint32_t idx[4];
    static int32_t lab[4];
    static double d[4];
    expect_invalid(kd_cuda_gather_rows(NO_STREAM, -1, 4, f, idx, f), "gather_rows");
    expect_invalid(kd_cuda_gather_rows(NO_STREAM, 4, -1, f, idx, f), "gather_rows");
    expect_invalid(kd_cuda_bias_rows(NO_STREAM, -2, 3, f, f), "bias_rows");
    expect_invalid(kd_cuda_bias_rows(NO_STREAM, 2, -3, f, f), "bias_rows");
    expect_invalid(kd_cuda_bias_grad_rows(NO_STREAM, -1, 3, f, f), "bias_grad_rows");
    expect_invalid(kd_cuda_bias_nchw(NO_STREAM, 1, -1, 4, f, f), "bias_nchw");
    expect_invalid(kd_cuda_bias_grad_nchw(NO_STREAM, -1, 1, 4, f, f), "bias_grad_nchw");
    expect_invalid(kd_cuda_gather_augment(NO_STREAM, 2, 1, -28, 28, f, lab, idx, f, 0.f, f, lab),
                   "gather_augment");
    expect_invalid(kd_cuda_add_f64(NO_STREAM, -5, d, d), "add_f64");
    expect_invalid(kd_cuda_gap_fwd(NO_STREAM, -1, 2, 4, f, f), "gap_fwd");
    expect_invalid(kd_cuda_sum_f64(NO_STREAM, -1, d, d), "sum_f64");
    expect_invalid(kd_cuda_ce(NO_STREAM, -1, 10, f, lab, 0, f, 1, d, d), "cross-entropy");
}

static void test_loss_arguments(void **state)
{
    (void)state;
    static float f[40];
    static int32_t lab[4];
    static double d[4];
    /* dkd: no classes, a temperature <= 0 or NaN, a missing buffer */
    expect_invalid(kd_cuda_dkd(NO_STREAM, -1, 10, f, f, lab, 1, 1, 8, 1, f, 1, d), "dkd");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 0, f, f, lab, 1, 1, 8, 1, f, 1, d), "dkd");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 10, f, f, lab, 0, 1, 8, 1, f, 1, d), "dkd");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 10, f, f, lab, NAN, 1, 8, 1, f, 1, d), "dkd");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 10, f, NULL, lab, 1, 1, 8, 1, f, 1, d), "NULL");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 10, f, f, NULL, 1, 1, 8, 1, f, 1, d), "NULL");
    expect_invalid(kd_cuda_dkd(NO_STREAM, 4, 10, f, f, lab, 1, 1, 8, 1, f, 1, NULL), "NULL");
    expect_invalid(kd_cuda_softmax_kl(NO_STREAM, 4, 10, KD_SKL_F32, f, f, -1, 0, 1, f, KD_SKL_F32,
                                      1, d, KD_SKL_AUTO),
                   "softmax_kl");
    expect_invalid(kd_cuda_kd_topk(NO_STREAM, 4, 10, -1, f, f, lab, f, 1, 0, 1, f, 1, d),
                   "kd_topk");
}

/* nothing to do is success, and queues nothing (there is no device to queue it on) */
static void test_empty_launches(void **state)
{
    (void)state;
    static float f[4];
    static uint32_t idx[4];
    static int32_t lab[4];
    static double d[4];
    assert_int_equal(kd_cuda_gather_rows(NO_STREAM, 0, 4, f, idx, f), KD_OK);
    assert_int_equal(kd_cuda_gather_rows(NO_STREAM, 4, 0, f, idx, f), KD_OK);
    assert_int_equal(kd_cuda_bias_rows(NO_STREAM, 0, 3, f, f), KD_OK);
    assert_int_equal(kd_cuda_bias_rows(NO_STREAM, 3, 0, f, f), KD_OK);
    assert_int_equal(kd_cuda_bias_grad_rows(NO_STREAM, 3, 0, f, f), KD_OK);
    assert_int_equal(kd_cuda_bias_grad_rows(NO_STREAM, 0, 3, f, f), KD_OK);
    assert_int_equal(kd_cuda_bias_nchw(NO_STREAM, 0, 2, 4, f, f), KD_OK);
    assert_int_equal(kd_cuda_bias_grad_nchw(NO_STREAM, 2, 0, 4, f, f), KD_OK);
    assert_int_equal(kd_cuda_gather_augment(NO_STREAM, 0, 1, 28, 28, f, lab, idx, f, 0.f, f, lab),
                     KD_OK);
    assert_int_equal(kd_cuda_add_f64(NO_STREAM, 0, d, d), KD_OK);
    assert_int_equal(kd_cuda_round_bf16(NO_STREAM, 0, f), KD_OK);
    /* dkd with no rows: the loss alone (ds NULL) and with a gradient */
    assert_int_equal(kd_cuda_dkd(NO_STREAM, 0, 10, f, f, lab, 4, 1, 8, 1, NULL, 1, d), KD_OK);
    assert_int_equal(kd_cuda_dkd(NO_STREAM, 0, 10, NULL, NULL, NULL, 4, 1, 8, 1, NULL, 1, NULL),
                     KD_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_negative_sizes),
        cmocka_unit_test(test_loss_arguments),
        cmocka_unit_test(test_empty_launches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
#else
int main(void) { return 77; /* built without CUDA */ }
#endif
