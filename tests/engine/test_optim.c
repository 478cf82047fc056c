/*
 * test_optim.c - optimizers, schedules and clipping against hand-computed
 * values and against reference numbers from PyTorch.
 *
 * The hand cases use a few parameters with simple numbers so the expected
 * value can be checked on paper (derivations in the comments); the torch
 * cases pin the exact update order over several steps with uneven values.
 * Every comparison is relative (1e-6) with a small absolute floor for values
 * near zero.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "optim.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static void assert_close(double got, double want, double rel, const char *what, size_t i)
{
    double tol = rel * fabs(want) + 1e-9;
    if (fabs(got - want) > tol)
        fail_msg("%s[%zu]: got %.9g, want %.9g (tol %.3g)", what, i, got, want, tol);
}

static void assert_all_close(const float *got, const float *want, size_t n, double rel,
                             const char *what)
{
    for (size_t i = 0; i < n; i++)
        assert_close(got[i], want[i], rel, what, i);
}

static void assert_error_mentions(const char *needle)
{
    if (strstr(kd_last_error(), needle) == NULL)
        fail_msg("error \"%s\" does not mention \"%s\"", kd_last_error(), needle);
}

static kd_optim_cfg sgd_cfg(double lr, double momentum, int nesterov, double wd)
{
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_SGD);
    c.lr = lr;
    c.momentum = momentum;
    c.nesterov = nesterov;
    c.weight_decay = wd;
    return c;
}

/* ---- SGD, by hand: p0 = [1, -2, 0.5], g = [0.5, 1, -2] every step, lr 0.1 ---- */

static void test_sgd_plain(void **st)
{
    (void)st;
    kd_optim_cfg c = sgd_cfg(0.1, 0.0, 0, 0.0);
    float p[] = {1.0f, -2.0f, 0.5f};
    const float g[] = {0.5f, 1.0f, -2.0f};
    assert_int_equal(kd_optim_state_floats(&c, 3), 0);

    /* p - 0.1 g = [0.95, -2.1, 0.7] */
    assert_int_equal(kd_optim_step(&c, p, g, NULL, NULL, 3, 0.1, 1), KD_OK);
    const float want1[] = {0.95f, -2.1f, 0.7f};
    assert_all_close(p, want1, 3, 1e-6, "sgd step 1");

    /* and again: [0.9, -2.2, 0.9] */
    assert_int_equal(kd_optim_step(&c, p, g, NULL, NULL, 3, 0.1, 2), KD_OK);
    const float want2[] = {0.9f, -2.2f, 0.9f};
    assert_all_close(p, want2, 3, 1e-6, "sgd step 2");
}

static void test_sgd_momentum(void **st)
{
    (void)st;
    kd_optim_cfg c = sgd_cfg(0.1, 0.9, 0, 0.0);
    float p[] = {1.0f, -2.0f, 0.5f};
    const float g[] = {0.5f, 1.0f, -2.0f};
    float buf[3] = {0};
    assert_int_equal(kd_optim_state_floats(&c, 3), 3);

    /* step 1: b = g (torch's first-step init), p -= 0.1 g -> [0.95, -2.1, 0.7] */
    assert_int_equal(kd_optim_step(&c, p, g, buf, NULL, 3, 0.1, 1), KD_OK);
    const float want_b1[] = {0.5f, 1.0f, -2.0f};
    const float want_p1[] = {0.95f, -2.1f, 0.7f};
    assert_all_close(buf, want_b1, 3, 1e-6, "momentum buffer 1");
    assert_all_close(p, want_p1, 3, 1e-6, "momentum step 1");

    /* step 2: b = 0.9 g + g = 1.9 g, p -= 0.19 g -> [0.855, -2.29, 1.08] */
    assert_int_equal(kd_optim_step(&c, p, g, buf, NULL, 3, 0.1, 2), KD_OK);
    const float want_b2[] = {0.95f, 1.9f, -3.8f};
    const float want_p2[] = {0.855f, -2.29f, 1.08f};
    assert_all_close(buf, want_b2, 3, 1e-6, "momentum buffer 2");
    assert_all_close(p, want_p2, 3, 1e-6, "momentum step 2");
}

static void test_sgd_nesterov(void **st)
{
    (void)st;
    kd_optim_cfg c = sgd_cfg(0.1, 0.9, 1, 0.0);
    float p[] = {1.0f, -2.0f, 0.5f};
    const float g[] = {0.5f, 1.0f, -2.0f};
    float buf[3] = {0};

    /* step 1: b = g, d = g + 0.9 b = 1.9 g, p -= 0.19 g -> [0.905, -2.19, 0.88] */
    assert_int_equal(kd_optim_step(&c, p, g, buf, NULL, 3, 0.1, 1), KD_OK);
    const float want1[] = {0.905f, -2.19f, 0.88f};
    assert_all_close(p, want1, 3, 1e-6, "nesterov step 1");

    /* step 2: b = 1.9 g, d = g + 0.9 * 1.9 g = 2.71 g, p -= 0.271 g -> [0.7695, -2.461, 1.422] */
    assert_int_equal(kd_optim_step(&c, p, g, buf, NULL, 3, 0.1, 2), KD_OK);
    const float want2[] = {0.7695f, -2.461f, 1.422f};
    assert_all_close(p, want2, 3, 1e-6, "nesterov step 2");
}

static void test_sgd_weight_decay_mask(void **st)
{
    (void)st;
    kd_optim_cfg c = sgd_cfg(0.1, 0.0, 0, 0.5);
    const float g[] = {0.5f, 1.0f, -2.0f};
    const uint8_t mask[] = {1, 0, 1};

    /*
     * Decoupled: p *= 1 - 0.1 * 0.5 = 0.95 where masked, then p -= 0.1 g.
     * [1*0.95 - 0.05, -2 - 0.1, 0.5*0.95 + 0.2] = [0.9, -2.1, 0.675]
     */
    float p[] = {1.0f, -2.0f, 0.5f};
    assert_int_equal(kd_optim_step(&c, p, g, NULL, mask, 3, 0.1, 1), KD_OK);
    const float want_masked[] = {0.9f, -2.1f, 0.675f};
    assert_all_close(p, want_masked, 3, 1e-6, "sgd wd masked");

    /* NULL mask decays the middle one too: -2 * 0.95 - 0.1 = -2.0 */
    float q[] = {1.0f, -2.0f, 0.5f};
    assert_int_equal(kd_optim_step(&c, q, g, NULL, NULL, 3, 0.1, 1), KD_OK);
    const float want_all[] = {0.9f, -2.0f, 0.675f};
    assert_all_close(q, want_all, 3, 1e-6, "sgd wd unmasked");

    /* Decay uses the lr passed in (the scheduled one), not c.lr: lr 0.2 -> keep 0.9 */
    float r[] = {1.0f, -2.0f, 0.5f};
    assert_int_equal(kd_optim_step(&c, r, g, NULL, mask, 3, 0.2, 1), KD_OK);
    const float want_lr[] = {0.8f, -2.2f, 0.85f};
    assert_all_close(r, want_lr, 3, 1e-6, "sgd wd scheduled lr");
}

/*
 * ---- Torch references ----
 * Computed once with torch 1.13 (CPU, float32) by this script; decoupled
 * masked weight decay for SGD is emulated by scaling p before opt.step():
 *
 *   import torch
 *   p0 = [0.8, -1.5, 0.25, 2.0, -0.3, 1.2]
 *   G = [[0.1, -0.4, 0.9, -1.3, 0.05, 2.0],
 *        [-0.2, 0.3, 0.7, -0.6, -0.15, 1.1],
 *        [0.4, -0.1, -0.5, 0.2, 0.25, -0.8]]
 *   mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
 *   def sgd(mom, nest, wd, lr=0.05):
 *       p = torch.nn.Parameter(torch.tensor(p0))
 *       opt = torch.optim.SGD([p], lr=lr, momentum=mom, nesterov=nest, weight_decay=0.0)
 *       for g in G:
 *           with torch.no_grad():
 *               p[mask] *= (1 - lr * wd)
 *           p.grad = torch.tensor(g)
 *           opt.step()
 *       return p.detach()
 *   def adamw(lr=0.01, wd=0.1, betas=(0.9, 0.999)):
 *       pd = torch.nn.Parameter(torch.tensor(p0)[mask])
 *       pn = torch.nn.Parameter(torch.tensor(p0)[~mask])
 *       opt = torch.optim.AdamW([{'params': [pd], 'weight_decay': wd},
 *                                {'params': [pn], 'weight_decay': 0.0}],
 *                               lr=lr, betas=betas, eps=1e-8)
 *       for g in G:
 *           gt = torch.tensor(g)
 *           pd.grad = gt[mask].clone(); pn.grad = gt[~mask].clone()
 *           opt.step()
 *       out = torch.empty(6); out[mask] = pd.detach(); out[~mask] = pn.detach()
 *       return out
 *   # printed with "%.9g": sgd(0, False, 0.01), sgd(0.9, False, 0.01),
 *   # sgd(0.9, True, 0.01), adamw(), adamw(betas=(0.3, 0.99))
 */
static const float ref_p0[6] = {0.8f, -1.5f, 0.25f, 2.0f, -0.3f, 1.2f};
static const float ref_g[3][6] = {{0.1f, -0.4f, 0.9f, -1.3f, 0.05f, 2.0f},
                                  {-0.2f, 0.3f, 0.7f, -0.6f, -0.15f, 1.1f},
                                  {0.4f, -0.1f, -0.5f, 0.2f, 0.25f, -0.8f}};
static const uint8_t ref_mask[6] = {1, 0, 1, 1, 0, 1};
static const float ref_sgd_plain[6] = {0.783800602f, -1.49000001f,  0.194687665f,
                                       2.08192134f,  -0.307500005f, 1.08332849f};
static const float ref_sgd_mom[6] = {0.784252822f, -1.46930003f,  0.0862579122f,
                                     2.22004199f,  -0.305025011f, 0.862873435f};
static const float ref_sgd_nest[6] = {0.770707548f, -1.46237004f,  0.047657121f,
                                      2.2826581f,   -0.312022537f, 0.781533539f};
static const float ref_adamw[6] = {0.787083209f, -1.48717594f,  0.225011915f,
                                   2.01934075f,  -0.308416784f, 1.17219102f};
static const float ref_adamw_b1[6] = {0.786416292f, -1.49279165f,  0.232115015f,
                                      2.01235247f,  -0.309525311f, 1.17981708f};

static void run_ref(const kd_optim_cfg *c, double lr, float *p)
{
    float state[12] = {0};
    assert_true(kd_optim_state_floats(c, 6) <= NELEM(state));
    memcpy(p, ref_p0, sizeof ref_p0);
    for (int t = 0; t < 3; t++)
        assert_int_equal(kd_optim_step(c, p, ref_g[t], state, ref_mask, 6, lr, t + 1), KD_OK);
}

static void test_sgd_vs_torch(void **st)
{
    (void)st;
    float p[6];
    kd_optim_cfg plain = sgd_cfg(0.05, 0.0, 0, 0.01);
    run_ref(&plain, 0.05, p);
    assert_all_close(p, ref_sgd_plain, 6, 1e-6, "torch sgd");

    kd_optim_cfg mom = sgd_cfg(0.05, 0.9, 0, 0.01);
    run_ref(&mom, 0.05, p);
    assert_all_close(p, ref_sgd_mom, 6, 1e-6, "torch sgd momentum");

    kd_optim_cfg nest = sgd_cfg(0.05, 0.9, 1, 0.01);
    run_ref(&nest, 0.05, p);
    assert_all_close(p, ref_sgd_nest, 6, 1e-6, "torch sgd nesterov");
}

static void test_adamw_vs_torch(void **st)
{
    (void)st;
    float p[6];
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    c.lr = 0.01;
    c.weight_decay = 0.1;
    run_ref(&c, 0.01, p);
    assert_all_close(p, ref_adamw, 6, 1e-6, "torch adamw");

    c.beta1 = 0.3;
    c.beta2 = 0.99;
    run_ref(&c, 0.01, p);
    assert_all_close(p, ref_adamw_b1, 6, 1e-6, "torch adamw betas");
}

/*
 * ---- AdamW, by hand: lr 0.01, betas (0.9, 0.999), eps 1e-8, wd 0.1 ----
 * p0 = [1, -0.5], mask = [0, 1]; g0 = 1, -1, 2 over the steps; g1 = 0.5 always.
 *
 * Param 0 (no decay):
 *   t1: m = 0.1, v = 0.001; m^ = 1, v^ = 1            -> p = 1 - 0.01 = 0.99
 *   t2: m = 0.09 - 0.1 = -0.01, v = 0.000999 + 0.001 = 0.001999
 *       m^ = -0.01 / 0.19, v^ = 0.001999 / 0.001999 = 1
 *                                                     -> p = 0.99 + 0.01/19 = 0.990526316
 *   t3: m = -0.009 + 0.2 = 0.191, v = 0.001997001 + 0.004 = 0.005997001
 *       m^ = 0.191 / 0.271 = 0.704797048, v^ = 0.005997001 / 0.002997001 = 2.001000667
 *       m^ / sqrt(v^) = 0.704797048 / 1.414567307 = 0.498242144
 *                                                     -> p = 0.990526316 - 0.00498242144
 *                                                        = 0.985543894
 * Param 1 (decayed, constant gradient so m^ = g, v^ = g^2 and the step is lr):
 *   p = p * (1 - 0.01 * 0.1) - 0.01 each step:
 *   t1: -0.4995 - 0.01 = -0.5095; t2: -0.5089905 - 0.01 = -0.5189905;
 *   t3: -0.5184715095 - 0.01 = -0.5284715095
 */
static void test_adamw_by_hand(void **st)
{
    (void)st;
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    c.lr = 0.01;
    c.weight_decay = 0.1;
    assert_int_equal(kd_optim_state_floats(&c, 2), 4);

    float p[2] = {1.0f, -0.5f};
    float state[4] = {0};
    const uint8_t mask[2] = {0, 1};
    const float g[3][2] = {{1.0f, 0.5f}, {-1.0f, 0.5f}, {2.0f, 0.5f}};
    const float want[3][2] = {
        {0.99f, -0.5095f}, {0.990526316f, -0.5189905f}, {0.985543894f, -0.5284715095f}};
    for (int t = 0; t < 3; t++) {
        assert_int_equal(kd_optim_step(&c, p, g[t], state, mask, 2, 0.01, t + 1), KD_OK);
        assert_all_close(p, want[t], 2, 1e-6, "adamw by hand");
    }
    /* state layout [m | v]: after t3, m0 = 0.191, v0 = 0.005997001 */
    assert_close(state[0], 0.191, 1e-6, "adamw m", 0);
    assert_close(state[2], 0.005997001, 1e-6, "adamw v", 0);
}

/* Large buffers take the threaded path; each element must still get the small-case result. */
static void test_large_matches_small(void **st)
{
    (void)st;
    const size_t n = 200003;
    float *p = malloc(n * sizeof *p);
    float *g = malloc(n * sizeof *g);
    float *state = calloc(2 * n, sizeof *state);
    uint8_t *mask = malloc(n);
    assert_non_null(p);
    assert_non_null(g);
    assert_non_null(state);
    assert_non_null(mask);
    for (size_t i = 0; i < n; i++) {
        p[i] = ref_p0[i % 6];
        mask[i] = ref_mask[i % 6];
    }
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    c.lr = 0.01;
    c.weight_decay = 0.1;
    for (int t = 0; t < 3; t++) {
        for (size_t i = 0; i < n; i++)
            g[i] = ref_g[t][i % 6];
        assert_int_equal(kd_optim_step(&c, p, g, state, mask, n, 0.01, t + 1), KD_OK);
    }
    for (size_t i = 0; i < n; i++)
        if (p[i] != p[i % 6])
            fail_msg("element %zu differs from element %zu", i, i % 6);
    assert_all_close(p, ref_adamw, 6, 1e-6, "large adamw");
    free(p);
    free(g);
    free(state);
    free(mask);
}

static void test_step_argument_errors(void **st)
{
    (void)st;
    kd_optim_cfg adam = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    kd_optim_cfg sgd = sgd_cfg(0.1, 0.9, 0, 0.0);
    float p[2] = {1.0f, 2.0f};
    const float g[2] = {0.1f, 0.2f};
    float state[4] = {0};

    kd_clear_error();
    assert_int_equal(kd_optim_step(&adam, p, g, state, NULL, 2, 0.01, 0), KD_ERR_INVALID);
    assert_error_mentions("1-based");
    assert_int_equal(kd_optim_step(&sgd, p, g, NULL, NULL, 2, 0.1, 1), KD_ERR_INVALID);
    assert_error_mentions("state");
    assert_int_equal(kd_optim_step(&sgd, NULL, g, state, NULL, 2, 0.1, 1), KD_ERR_INVALID);
    assert_error_mentions("params");
    assert_int_equal(kd_optim_step(&sgd, p, g, state, NULL, 2, -0.1, 1), KD_ERR_INVALID);
    assert_error_mentions("lr");
    assert_int_equal(kd_optim_step(&sgd, p, g, state, NULL, 2, NAN, 1), KD_ERR_INVALID);

    /* A bad config is caught at the step too, and nothing was touched by any failure. */
    sgd.momentum = 1.5;
    assert_int_equal(kd_optim_step(&sgd, p, g, state, NULL, 2, 0.1, 1), KD_ERR_CONFIG);
    assert_true(p[0] == 1.0f && p[1] == 2.0f);
    assert_true(state[0] == 0.0f && state[1] == 0.0f);

    /* lr 0 (a cosine schedule's last step with min_lr 0) is a valid no-op update. */
    assert_int_equal(kd_optim_step(&adam, p, g, state, NULL, 2, 0.0, 1), KD_OK);
    assert_true(p[0] == 1.0f && p[1] == 2.0f);
}

/* ---- schedules, base lr 0.1 ---- */

static void test_sched_constant(void **st)
{
    (void)st;
    kd_sched_cfg s = kd_sched_cfg_default(KD_SCHED_CONSTANT);
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_OK);
    assert_close(kd_sched_lr(&s, 0.1, 0), 0.1, 1e-12, "constant", 0);
    assert_close(kd_sched_lr(&s, 0.1, 12345), 0.1, 1e-12, "constant", 12345);

    /* warm-up 4: 0.1 * (step + 1) / 4 */
    s.warmup_steps = 4;
    assert_close(kd_sched_lr(&s, 0.1, 0), 0.025, 1e-12, "warmup", 0);
    assert_close(kd_sched_lr(&s, 0.1, 1), 0.05, 1e-12, "warmup", 1);
    assert_close(kd_sched_lr(&s, 0.1, 3), 0.1, 1e-12, "warmup end", 3);
    assert_close(kd_sched_lr(&s, 0.1, 4), 0.1, 1e-12, "after warmup", 4);
    assert_close(kd_sched_lr(&s, 0.1, -5), 0.025, 1e-12, "negative step", 0);
}

static void test_sched_step(void **st)
{
    (void)st;
    /* warm-up 2, then x0.5 every 3 steps: steps 2-4 at 0.1, 5-7 at 0.05, 8-10 at 0.025 */
    kd_sched_cfg s = kd_sched_cfg_default(KD_SCHED_STEP);
    s.warmup_steps = 2;
    s.step_size = 3;
    s.gamma = 0.5;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_OK);
    const int64_t steps[] = {0, 1, 2, 4, 5, 7, 8, 11};
    const double want[] = {0.05, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.0125};
    for (size_t i = 0; i < NELEM(steps); i++)
        assert_close(kd_sched_lr(&s, 0.1, steps[i]), want[i], 1e-12, "step sched",
                     (size_t)steps[i]);
}

static void test_sched_cosine(void **st)
{
    (void)st;
    /*
     * warm-up 10, total 110, min 0.01: cosine over t = step - 10 in [0, 100].
     * step 0: 0.1/10 = 0.01; step 9: 0.1 (end of warm-up); step 10: 0.1;
     * step 35 (t = 25): 0.01 + 0.09 (1 + cos(pi/4)) / 2 = 0.0868198052;
     * step 60 (middle): 0.01 + 0.09 / 2 = 0.055; step 110 and later: 0.01.
     */
    kd_sched_cfg s = kd_sched_cfg_default(KD_SCHED_COSINE);
    s.warmup_steps = 10;
    s.total_steps = 110;
    s.min_lr = 0.01;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_OK);
    const int64_t steps[] = {0, 9, 10, 35, 60, 109, 110, 500};
    const double cos_end = 0.01 + 0.09 * (1.0 + cos(3.14159265358979323846 * 99.0 / 100.0)) / 2.0;
    const double want[] = {0.01, 0.1, 0.1, 0.0868198052, 0.055, cos_end, 0.01, 0.01};
    for (size_t i = 0; i < NELEM(steps); i++)
        assert_close(kd_sched_lr(&s, 0.1, steps[i]), want[i], 1e-9, "cosine", (size_t)steps[i]);
    /* one step before the end is still above the floor, but barely */
    assert_true(cos_end > 0.01 && cos_end < 0.0101);
}

static void test_sched_cfg_check(void **st)
{
    (void)st;
    kd_sched_cfg s = kd_sched_cfg_default(KD_SCHED_STEP);
    s.step_size = 0;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_ERR_CONFIG);
    assert_error_mentions("step_size");
    s.step_size = 5;
    s.gamma = 0.0;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_ERR_CONFIG);
    assert_error_mentions("gamma");

    s = kd_sched_cfg_default(KD_SCHED_COSINE);
    s.warmup_steps = 10;
    s.total_steps = 10;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_ERR_CONFIG);
    assert_error_mentions("total_steps");
    s.total_steps = 100;
    s.min_lr = 0.2;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_ERR_CONFIG);
    assert_error_mentions("min_lr");

    s = kd_sched_cfg_default(KD_SCHED_CONSTANT);
    s.warmup_steps = -1;
    assert_int_equal(kd_sched_cfg_check(&s, 0.1), KD_ERR_CONFIG);
    assert_error_mentions("warmup_steps");
}

/* ---- clipping ---- */

static void test_grad_norm(void **st)
{
    (void)st;
    const float g[] = {3.0f, -4.0f};
    assert_close(kd_grad_global_norm(g, 2), 5.0, 1e-12, "norm", 0);
    assert_close(kd_grad_global_norm(g, 0), 0.0, 0.0, "norm empty", 0);

    /* 10^6 elements of 0.5: sqrt(10^6 * 0.25) = 500; large enough for the threaded path */
    const size_t n = 1000000;
    float *big = malloc(n * sizeof *big);
    assert_non_null(big);
    for (size_t i = 0; i < n; i++)
        big[i] = 0.5f;
    big[n - 1] = 0.0f;
    /* one element fewer: sqrt(999999 * 0.25) */
    assert_close(kd_grad_global_norm(big, n), sqrt(999999.0 * 0.25), 1e-12, "big norm", 0);
    free(big);
}

static void test_clip(void **st)
{
    (void)st;
    /* below the limit: untouched, returns 5 */
    float a[] = {3.0f, -4.0f};
    assert_close(kd_clip_grad_norm(a, 2, 10.0), 5.0, 1e-12, "clip below", 0);
    assert_true(a[0] == 3.0f && a[1] == -4.0f);

    /* disabled with max_norm 0 */
    assert_close(kd_clip_grad_norm(a, 2, 0.0), 5.0, 1e-12, "clip off", 0);
    assert_true(a[0] == 3.0f && a[1] == -4.0f);

    /* above: scaled by 1 / (5 + 1e-6) -> [0.6, -0.8] up to 2e-7; returns the pre-clip 5 */
    assert_close(kd_clip_grad_norm(a, 2, 1.0), 5.0, 1e-12, "clip above", 0);
    const float want[] = {0.6f, -0.8f};
    assert_all_close(a, want, 2, 1e-6, "clipped");
    assert_true(fabsf(a[0]) < 0.6f); /* strictly below: torch's +1e-6 is applied */
    assert_close(kd_grad_global_norm(a, 2), 1.0, 1e-6, "norm after clip", 0);

    /* a non-finite norm leaves the gradients alone for the caller to skip the step */
    float b[] = {INFINITY, 1.0f};
    assert_true(isinf(kd_clip_grad_norm(b, 2, 1.0)));
    assert_true(b[1] == 1.0f);
}

/* ---- optimizer config checks ---- */

static void test_cfg_check(void **st)
{
    (void)st;
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_SGD);
    assert_int_equal(kd_optim_cfg_check(&c), KD_OK);
    c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    assert_int_equal(kd_optim_cfg_check(&c), KD_OK);
    assert_int_equal(kd_optim_cfg_check(NULL), KD_ERR_INVALID);

    struct {
        kd_optim_kind kind;
        const char *field;
        double value;
        const char *needle;
    } bad[] = {
        {KD_OPTIM_SGD, "lr", 0.0, "lr must be"},
        {KD_OPTIM_ADAMW, "lr", -1.0, "lr must be"},
        {KD_OPTIM_SGD, "momentum", 1.0, "momentum must be in [0, 1)"},
        {KD_OPTIM_SGD, "momentum", -0.1, "momentum must be in [0, 1)"},
        {KD_OPTIM_ADAMW, "beta1", 1.0, "beta1 must be in [0, 1)"},
        {KD_OPTIM_ADAMW, "beta2", -0.5, "beta2 must be in [0, 1)"},
        {KD_OPTIM_ADAMW, "eps", 0.0, "eps must be"},
        {KD_OPTIM_SGD, "weight_decay", -0.01, "weight_decay must be"},
        {KD_OPTIM_ADAMW, "clip_norm", -1.0, "clip_norm must be"},
        {KD_OPTIM_SGD, "nesterov", 0.0, "nesterov requires momentum"},
    };
    for (size_t i = 0; i < NELEM(bad); i++) {
        c = kd_optim_cfg_default(bad[i].kind);
        if (strcmp(bad[i].field, "lr") == 0)
            c.lr = bad[i].value;
        else if (strcmp(bad[i].field, "momentum") == 0)
            c.momentum = bad[i].value;
        else if (strcmp(bad[i].field, "beta1") == 0)
            c.beta1 = bad[i].value;
        else if (strcmp(bad[i].field, "beta2") == 0)
            c.beta2 = bad[i].value;
        else if (strcmp(bad[i].field, "eps") == 0)
            c.eps = bad[i].value;
        else if (strcmp(bad[i].field, "weight_decay") == 0)
            c.weight_decay = bad[i].value;
        else if (strcmp(bad[i].field, "clip_norm") == 0)
            c.clip_norm = bad[i].value;
        else {
            c.momentum = bad[i].value;
            c.nesterov = 1;
        }
        kd_clear_error();
        if (kd_optim_cfg_check(&c) != KD_ERR_CONFIG)
            fail_msg("case %zu (%s = %g) was accepted", i, bad[i].field, bad[i].value);
        assert_error_mentions(bad[i].needle);
    }

    /* the message carries the offending value */
    c = kd_optim_cfg_default(KD_OPTIM_SGD);
    c.momentum = 1.25;
    assert_int_equal(kd_optim_cfg_check(&c), KD_ERR_CONFIG);
    assert_error_mentions("1.25");

    /* fields of the other optimizer are not checked: an SGD config with eps 0 is fine */
    c = kd_optim_cfg_default(KD_OPTIM_SGD);
    c.eps = 0.0;
    c.beta1 = 2.0;
    assert_int_equal(kd_optim_cfg_check(&c), KD_OK);

    /* state sizes */
    c = sgd_cfg(0.1, 0.0, 0, 0.0);
    assert_int_equal(kd_optim_state_floats(&c, 10), 0);
    c.momentum = 0.5;
    assert_int_equal(kd_optim_state_floats(&c, 10), 10);
    c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    assert_int_equal(kd_optim_state_floats(&c, 10), 20);
}

/*
 * The CPU backend's optim_step slot, the trainer's only update call: clip, then the step, as
 * kd_clip_grad_norm + kd_optim_step do by hand (equal bit for bit: the same functions); a bad
 * configuration is refused before the gradients are touched.
 */
static void test_backend_slot(void **state)
{
    (void)state;
    const kd_backend *cpu = kd_backend_cpu();
    assert_non_null(cpu->optim_step);
    assert_null(kd_backend_missing(cpu, "optim_step"));
    enum { N = 37 };
    float p1[N], g1[N], s1[2 * N] = {0}, p2[N], g2[N], s2[2 * N] = {0};
    uint8_t mask[N];
    for (int i = 0; i < N; i++) {
        p1[i] = p2[i] = (float)(0.1 * (i % 7) - 0.3);
        g1[i] = g2[i] = (float)(2.0 - 0.11 * i); /* norm about 7.3: clip 1.5 always applies */
        mask[i] = (uint8_t)(i % 3 != 0);
    }
    kd_optim_cfg c = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    c.weight_decay = 0.01;
    c.clip_norm = 1.5;
    for (int step = 1; step <= 3; step++) {
        assert_int_equal(cpu->optim_step(&c, p1, g1, s1, mask, N, 0.01, step), KD_OK);
        kd_clip_grad_norm(g2, N, c.clip_norm);
        assert_int_equal(kd_optim_step(&c, p2, g2, s2, mask, N, 0.01, step), KD_OK);
        assert_memory_equal(g1, g2, sizeof g1);
        assert_memory_equal(p1, p2, sizeof p1);
        assert_memory_equal(s1, s2, sizeof s1);
    }
    double norm = 0;
    for (int i = 0; i < N; i++)
        norm += (double)g1[i] * g1[i];
    assert_close(sqrt(norm), 1.5, 1e-6, "clipped norm", 0);

    /* a negative clip_norm: refused, gradients and parameters untouched */
    float before[N];
    memcpy(before, g1, sizeof before);
    c.clip_norm = -1.0;
    assert_int_equal(cpu->optim_step(&c, p1, g1, s1, mask, N, 0.01, 4), KD_ERR_CONFIG);
    assert_memory_equal(g1, before, sizeof before);
    assert_memory_equal(p1, p2, sizeof p1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sgd_plain),
        cmocka_unit_test(test_sgd_momentum),
        cmocka_unit_test(test_sgd_nesterov),
        cmocka_unit_test(test_sgd_weight_decay_mask),
        cmocka_unit_test(test_sgd_vs_torch),
        cmocka_unit_test(test_adamw_vs_torch),
        cmocka_unit_test(test_adamw_by_hand),
        cmocka_unit_test(test_large_matches_small),
        cmocka_unit_test(test_step_argument_errors),
        cmocka_unit_test(test_sched_constant),
        cmocka_unit_test(test_sched_step),
        cmocka_unit_test(test_sched_cosine),
        cmocka_unit_test(test_sched_cfg_check),
        cmocka_unit_test(test_grad_norm),
        cmocka_unit_test(test_clip),
        cmocka_unit_test(test_cfg_check),
        cmocka_unit_test(test_backend_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
