/*
 * kd_test.h - small helpers shared by the CMocka tests.
 */
#ifndef KD_TEST_H
#define KD_TEST_H

#include <math.h>

/* |a - b| <= tol, printing both values on failure (cmocka 1.1 has no double assert). */
#define kd_assert_close(a, b, tol)                                                                 \
    do {                                                                                           \
        double kd_a_ = (double)(a), kd_b_ = (double)(b);                                           \
        if (!(fabs(kd_a_ - kd_b_) <= (tol)))                                                       \
            fail_msg("%s = %.17g, expected %.17g (tolerance %g)", #a, kd_a_, kd_b_,                \
                     (double)(tol));                                                               \
    } while (0)

#endif
