/*
 * test_step_graph.c - the trainer's recorded step (engine/train.h, kd_step_run) on the CPU,
 * against a backend that records the way CUDA stream capture does: between graph_begin and
 * graph_end every operation is kept with its arguments taken by value (pointers included;
 * what they point to is read when the record runs) and nothing runs; graph_launch runs the
 * kept operations in order; a transfer or a wait while recording breaks the recording, which
 * graph_end then reports. Training with kd_step_run on that backend must end with the same
 * weights, batchnorm statistics and num_batches_tracked, bit for bit, as eager steps on the
 * plain CPU backend: with full and smaller batches mixed, dropout (whose seeds the replays
 * must read anew), batchnorm (whose host counter the replays must keep), bf16 rounding, and a
 * recording that fails (the step and all later ones then run eagerly).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_yaml.h"
#include "model.h"
#include "optim.h"
#include "rng.h"
#include "train.h"

/* ---- a recording backend over the CPU backend ---- */

typedef struct {
    void (*run)(const void *args);
    unsigned char args[160];
} rec_op;

typedef struct {
    rec_op *ops;
    int n;
} rec_graph;

static const kd_backend *cpu;
static kd_backend recb;
static rec_op *rec_ops;
static int rec_n, rec_cap, recording, rec_broken, fail_next_end;
static int n_records, n_launches;
static char rec_why[128];

static void rec_push(void (*run)(const void *), const void *args, size_t len)
{
    assert_true(len <= sizeof rec_ops[0].args);
    if (rec_n == rec_cap) {
        rec_cap = rec_cap ? 2 * rec_cap : 64;
        rec_ops = realloc(rec_ops, sizeof *rec_ops * (size_t)rec_cap);
        assert_non_null(rec_ops);
    }
    rec_ops[rec_n].run = run;
    memcpy(rec_ops[rec_n].args, args, len);
    rec_n++;
}

/* an operation: kept while recording, else run at once */
#define OP(name, ...)                                                                              \
    do {                                                                                           \
        a_##name a_ = {__VA_ARGS__};                                                               \
        if (recording)                                                                             \
            rec_push(r_##name, &a_, sizeof a_);                                                    \
        else                                                                                       \
            r_##name(&a_);                                                                         \
    } while (0)

/* a transfer or wait: breaks a recording, as it does a CUDA stream capture */
static int breaks(const char *what)
{
    if (!recording)
        return 0;
    if (!rec_broken)
        snprintf(rec_why, sizeof rec_why, "%s while recording", what);
    rec_broken = 1;
    return 1;
}

static kd_status p_upload(void *dst, const void *src, size_t bytes)
{
    if (breaks("upload"))
        return KD_FAIL(KD_ERR_DEVICE, "%s", rec_why);
    return cpu->upload(dst, src, bytes);
}

static kd_status p_download(void *dst, const void *src, size_t bytes)
{
    if (breaks("download"))
        return KD_FAIL(KD_ERR_DEVICE, "%s", rec_why);
    return cpu->download(dst, src, bytes);
}

static kd_status p_sync(void)
{
    if (breaks("sync"))
        return KD_FAIL(KD_ERR_DEVICE, "%s", rec_why);
    return cpu->sync();
}

typedef struct {
    void *dst;
    size_t bytes;
} a_zero;
static void r_zero(const void *p)
{
    const a_zero *a = p;
    (void)cpu->zero(a->dst, a->bytes);
}
static kd_status p_zero(void *dst, size_t bytes)
{
    OP(zero, dst, bytes);
    return KD_OK;
}

typedef struct {
    int n, in, out;
    const float *x, *w, *b;
    float *y;
} a_linear_fwd;
static void r_linear_fwd(const void *p)
{
    const a_linear_fwd *a = p;
    cpu->linear_fwd(a->n, a->in, a->out, a->x, a->w, a->b, a->y);
}
static void p_linear_fwd(int n, int in, int out, const float *x, const float *w, const float *b,
                         float *y)
{
    OP(linear_fwd, n, in, out, x, w, b, y);
}

typedef struct {
    int n, in, out;
    const float *x, *w, *dy;
    float *dx, *dw, *db;
} a_linear_bwd;
static void r_linear_bwd(const void *p)
{
    const a_linear_bwd *a = p;
    cpu->linear_bwd(a->n, a->in, a->out, a->x, a->w, a->dy, a->dx, a->dw, a->db);
}
static void p_linear_bwd(int n, int in, int out, const float *x, const float *w, const float *dy,
                         float *dx, float *dw, float *db)
{
    OP(linear_bwd, n, in, out, x, w, dy, dx, dw, db);
}

typedef struct {
    kd_conv_shape s; /* by value, as a kernel's arguments are */
    const float *x, *w, *b;
    float *y, *ws;
} a_conv2d_fwd;
static void r_conv2d_fwd(const void *p)
{
    const a_conv2d_fwd *a = p;
    cpu->conv2d_fwd(&a->s, a->x, a->w, a->b, a->y, a->ws);
}
static void p_conv2d_fwd(const kd_conv_shape *s, const float *x, const float *w, const float *b,
                         float *y, float *ws)
{
    OP(conv2d_fwd, *s, x, w, b, y, ws);
}

typedef struct {
    kd_conv_shape s;
    const float *x, *w, *dy;
    float *dx, *dw, *db, *ws;
} a_conv2d_bwd;
static void r_conv2d_bwd(const void *p)
{
    const a_conv2d_bwd *a = p;
    cpu->conv2d_bwd(&a->s, a->x, a->w, a->dy, a->dx, a->dw, a->db, a->ws);
}
static void p_conv2d_bwd(const kd_conv_shape *s, const float *x, const float *w, const float *dy,
                         float *dx, float *dw, float *db, float *ws)
{
    OP(conv2d_bwd, *s, x, w, dy, dx, dw, db, ws);
}

typedef struct {
    int n, c, hw;
    const float *x, *gamma, *beta;
    float *y, *save_mean, *save_invstd, *run_mean, *run_var;
    double momentum, eps, cap;
} a_bn_fwd_train;
static void r_bn_fwd_train(const void *p)
{
    const a_bn_fwd_train *a = p;
    cpu->bn_fwd_train(a->n, a->c, a->hw, a->x, a->gamma, a->beta, a->y, a->save_mean,
                      a->save_invstd, a->run_mean, a->run_var, a->momentum, a->eps, a->cap);
}
static void p_bn_fwd_train(int n, int c, int hw, const float *x, const float *gamma,
                           const float *beta, float *y, float *save_mean, float *save_invstd,
                           float *run_mean, float *run_var, double momentum, double eps, double cap)
{
    OP(bn_fwd_train, n, c, hw, x, gamma, beta, y, save_mean, save_invstd, run_mean, run_var,
       momentum, eps, cap);
}

typedef struct {
    int n, c, hw;
    const float *x, *dy, *gamma, *save_mean, *save_invstd, *y;
    double cap;
    float *dx, *dgamma, *dbeta;
} a_bn_bwd;
static void r_bn_bwd(const void *p)
{
    const a_bn_bwd *a = p;
    cpu->bn_bwd(a->n, a->c, a->hw, a->x, a->dy, a->gamma, a->save_mean, a->save_invstd, a->y,
                a->cap, a->dx, a->dgamma, a->dbeta);
}
static void p_bn_bwd(int n, int c, int hw, const float *x, const float *dy, const float *gamma,
                     const float *save_mean, const float *save_invstd, const float *y, double cap,
                     float *dx, float *dgamma, float *dbeta)
{
    OP(bn_bwd, n, c, hw, x, dy, gamma, save_mean, save_invstd, y, cap, dx, dgamma, dbeta);
}

typedef struct {
    size_t n;
    const float *x;
    float *y;
    double cap;
} a_act_fwd;
static void r_act_fwd(const void *p)
{
    const a_act_fwd *a = p;
    cpu->act_fwd(a->n, a->x, a->y, a->cap);
}
static void p_act_fwd(size_t n, const float *x, float *y, double cap) { OP(act_fwd, n, x, y, cap); }

typedef struct {
    size_t n;
    const float *x, *dy;
    float *dx;
    double cap;
} a_act_bwd;
static void r_act_bwd(const void *p)
{
    const a_act_bwd *a = p;
    cpu->act_bwd(a->n, a->x, a->dy, a->dx, a->cap);
}
static void p_act_bwd(size_t n, const float *x, const float *dy, float *dx, double cap)
{
    OP(act_bwd, n, x, dy, dx, cap);
}

typedef struct {
    kd_pool_shape s;
    const float *x;
    float *y;
    int32_t *arg;
} a_maxpool_fwd;
static void r_maxpool_fwd(const void *p)
{
    const a_maxpool_fwd *a = p;
    cpu->maxpool_fwd(&a->s, a->x, a->y, a->arg);
}
static void p_maxpool_fwd(const kd_pool_shape *s, const float *x, float *y, int32_t *arg)
{
    OP(maxpool_fwd, *s, x, y, arg);
}

typedef struct {
    kd_pool_shape s;
    const float *dy;
    const int32_t *arg;
    float *dx;
} a_maxpool_bwd;
static void r_maxpool_bwd(const void *p)
{
    const a_maxpool_bwd *a = p;
    cpu->maxpool_bwd(&a->s, a->dy, a->arg, a->dx);
}
static void p_maxpool_bwd(const kd_pool_shape *s, const float *dy, const int32_t *arg, float *dx)
{
    OP(maxpool_bwd, *s, dy, arg, dx);
}

typedef struct {
    kd_pool_shape s;
    const float *x;
    float *y;
} a_avgpool_fwd;
static void r_avgpool_fwd(const void *p)
{
    const a_avgpool_fwd *a = p;
    cpu->avgpool_fwd(&a->s, a->x, a->y);
}
static void p_avgpool_fwd(const kd_pool_shape *s, const float *x, float *y)
{
    OP(avgpool_fwd, *s, x, y);
}

typedef struct {
    kd_pool_shape s;
    const float *dy;
    float *dx;
} a_avgpool_bwd;
static void r_avgpool_bwd(const void *p)
{
    const a_avgpool_bwd *a = p;
    cpu->avgpool_bwd(&a->s, a->dy, a->dx);
}
static void p_avgpool_bwd(const kd_pool_shape *s, const float *dy, float *dx)
{
    OP(avgpool_bwd, *s, dy, dx);
}

typedef struct {
    size_t n;
    const float *x;
    float *y, *mask;
    double p;
    const uint64_t *seed; /* read when the operation runs */
} a_dropout_fwd;
static void r_dropout_fwd(const void *p)
{
    const a_dropout_fwd *a = p;
    cpu->dropout_fwd(a->n, a->x, a->y, a->mask, a->p, a->seed);
}
static void p_dropout_fwd(size_t n, const float *x, float *y, float *mask, double p,
                          const uint64_t *seed)
{
    OP(dropout_fwd, n, x, y, mask, p, seed);
}

typedef struct {
    size_t n;
    const float *a, *b;
    float *y;
    int add;
} a_binary;
static void r_binary(const void *p)
{
    const a_binary *a = p;
    (a->add ? cpu->add : cpu->mul)(a->n, a->a, a->b, a->y);
}
#define a_mul a_binary
#define r_mul r_binary
#define a_add a_binary
#define r_add r_binary
static void p_mul(size_t n, const float *a, const float *b, float *y) { OP(mul, n, a, b, y, 0); }
static void p_add(size_t n, const float *a, const float *b, float *y) { OP(add, n, a, b, y, 1); }

typedef struct {
    size_t n;
    const float *src;
    float *dst;
} a_copy;
static void r_copy(const void *p)
{
    const a_copy *a = p;
    cpu->copy(a->n, a->src, a->dst);
}
static void p_copy(size_t n, const float *src, float *dst) { OP(copy, n, src, dst); }

typedef struct {
    size_t n;
    float *x;
} a_round_bf16;
static void r_round_bf16(const void *p)
{
    const a_round_bf16 *a = p;
    cpu->round_bf16(a->n, a->x);
}
static void p_round_bf16(size_t n, float *x) { OP(round_bf16, n, x); }

typedef struct {
    int n, c;
    const float *logits;
    const int32_t *labels;
    double smoothing;
    float *dlogits;
    double scale;
    double *acc;
} a_ce;
static void r_ce(const void *p)
{
    const a_ce *a = p;
    cpu->ce(a->n, a->c, a->logits, a->labels, a->smoothing, a->dlogits, a->scale, NULL, a->acc);
}
static double p_ce(int n, int c, const float *logits, const int32_t *labels, double smoothing,
                   float *dlogits, double scale, int64_t *correct, double *acc)
{
    if (!acc) { /* the sum comes back to the host: a wait */
        if (breaks("a loss read back"))
            return 0;
        return cpu->ce(n, c, logits, labels, smoothing, dlogits, scale, correct, acc);
    }
    OP(ce, n, c, logits, labels, smoothing, dlogits, scale, acc);
    return 0;
}

static kd_status p_graph_begin(void)
{
    if (recording)
        return KD_FAIL(KD_ERR_INVALID, "already recording");
    recording = 1;
    rec_broken = 0;
    rec_n = 0;
    return KD_OK;
}

static kd_status p_graph_end(void **g)
{
    *g = NULL;
    recording = 0;
    if (fail_next_end) {
        fail_next_end = 0;
        return KD_FAIL(KD_ERR_DEVICE, "recording refused by the test");
    }
    if (rec_broken)
        return KD_FAIL(KD_ERR_DEVICE, "recording failed: %s", rec_why);
    rec_graph *r = malloc(sizeof *r);
    assert_non_null(r);
    r->ops = malloc(sizeof *r->ops * (size_t)(rec_n ? rec_n : 1));
    assert_non_null(r->ops);
    memcpy(r->ops, rec_ops, sizeof *r->ops * (size_t)rec_n);
    r->n = rec_n;
    n_records++;
    *g = r;
    return KD_OK;
}

static kd_status p_graph_launch(void *g)
{
    const rec_graph *r = g;
    for (int i = 0; i < r->n; i++)
        r->ops[i].run(r->ops[i].args);
    n_launches++;
    return KD_OK;
}

static void p_graph_free(void *g)
{
    rec_graph *r = g;
    if (r)
        free(r->ops);
    free(r);
}

/* the recording backend: every operation the test model needs, the rest left out (a model
 * needing one is refused at build) */
static const kd_backend *recording_backend(void)
{
    cpu = kd_backend_cpu();
    recb = (kd_backend){
        .name = "cpu-recording",
        .device = KD_DEVICE_CPU,
        .alloc = cpu->alloc,
        .release = cpu->release,
        .upload = p_upload,
        .download = p_download,
        .zero = p_zero,
        .sync = p_sync,
        .linear_fwd = p_linear_fwd,
        .linear_bwd = p_linear_bwd,
        .conv2d_ws = cpu->conv2d_ws, /* asked at build only */
        .conv2d_fwd = p_conv2d_fwd,
        .conv2d_bwd = p_conv2d_bwd,
        .bn_fwd_train = p_bn_fwd_train,
        .bn_fwd_eval = cpu->bn_fwd_eval, /* evaluation is never recorded here */
        .bn_bwd = p_bn_bwd,
        .act_fwd = p_act_fwd,
        .act_bwd = p_act_bwd,
        .maxpool_fwd = p_maxpool_fwd,
        .maxpool_bwd = p_maxpool_bwd,
        .avgpool_fwd = p_avgpool_fwd,
        .avgpool_bwd = p_avgpool_bwd,
        .dropout_fwd = p_dropout_fwd,
        .mul = p_mul,
        .add = p_add,
        .copy = p_copy,
        .round_bf16 = p_round_bf16,
        .ce = p_ce,
        .optim_step = cpu->optim_step,
        .graph_begin = p_graph_begin,
        .graph_end = p_graph_end,
        .graph_launch = p_graph_launch,
        .graph_free = p_graph_free,
    };
    return &recb;
}

/* ---- the test ---- */

/* conv, batchnorm, relu6, residual blocks (depthwise, projection), pooling, dropout and a
 * batchnorm after a linear layer */
static const char *const model_yaml = "input: [2, 8, 8]\n"
                                      "layers:\n"
                                      "  - conv2d: {out: 6, kernel: 3, pad: 1}\n"
                                      "  - batchnorm: {}\n"
                                      "  - relu6: {}\n"
                                      "  - residual:\n"
                                      "      body:\n"
                                      "        - conv2d: {out: 6, kernel: 3, pad: 1, groups: 6}\n"
                                      "        - batchnorm: {}\n"
                                      "        - relu: {}\n"
                                      "        - conv2d: {out: 6, kernel: 1}\n"
                                      "  - maxpool2d: {kernel: 2}\n"
                                      "  - residual:\n"
                                      "      body:\n"
                                      "        - conv2d: {out: 8, kernel: 3, stride: 2, pad: 1}\n"
                                      "      proj:\n"
                                      "        - conv2d: {out: 8, kernel: 1, stride: 2}\n"
                                      "        - batchnorm: {}\n"
                                      "  - avgpool2d: {kernel: 2}\n"
                                      "  - flatten: {}\n"
                                      "  - dropout: {p: 0.3}\n"
                                      "  - linear: {out: 5}\n"
                                      "  - batchnorm: {}\n"
                                      "  - relu: {}\n"
                                      "  - linear: {out: 4}\n";

#define BATCH 6
#define STEPS 14

static kd_model *build_model(const kd_backend *be)
{
    kd_node *doc = NULL;
    assert_int_equal(kd_yaml_load_string(model_yaml, "model.yaml", &doc), KD_OK);
    kd_model *m = NULL;
    kd_status st =
        kd_model_build(kd_node_child(doc, "input"), kd_node_child(doc, "layers"), be, BATCH, 5, &m);
    kd_node_free(doc);
    if (st != KD_OK)
        fail_msg("building the model on %s: %s", be->name, kd_last_error());
    return m;
}

typedef struct {
    float *x, *state;
    int32_t *y;
    double *acc;
} losses_ctx;

static void losses(void *ctx, kd_model *m, int n, double share)
{
    losses_ctx *l = ctx;
    m->be->ce(n, m->out_features, kd_model_output(m), l->y, 0.1, kd_model_output_grad(m), share,
              NULL, l->acc);
}

typedef struct {
    float *params, *buffers;
    size_t nparams, nbuffers;
    int64_t counters[8];
    double acc[3];
} outcome;

/* STEPS steps on be, recorded (use) or not; the batch size follows a pattern with smaller
 * batches among the full ones; fail_at: the step whose recording is refused (-1: none) */
static void train(const kd_backend *be, int use, int bf16, int fail_at, outcome *o)
{
    kd_model *m = build_model(be);
    if (bf16)
        assert_int_equal(kd_model_set_bf16(m, 1), KD_OK);
    kd_optim_cfg oc = kd_optim_cfg_default(KD_OPTIM_ADAMW);
    oc.lr = 0.01;
    losses_ctx l;
    size_t per = m->in_numel;
    l.x = calloc((size_t)BATCH * per, sizeof(float));
    l.y = calloc(BATCH, sizeof(int32_t));
    l.acc = calloc(3, sizeof(double));
    l.state = calloc(kd_optim_state_floats(&oc, m->nparams), sizeof(float));
    assert_true(l.x && l.y && l.acc && l.state);
    kd_step st = {.m = m, .x = l.x, .losses = losses, .ctx = &l, .use = use};
    static const int sizes[STEPS] = {6, 6, 6, 4, 6, 6, 6, 6, 3, 6, 6, 6, 6, 6};
    kd_rng r;
    kd_rng_seed(&r, 11, 0);
    char logbuf[4096] = "";
    FILE *log = fmemopen(logbuf, sizeof logbuf, "w");
    assert_non_null(log);
    for (int s = 0; s < STEPS; s++) {
        const int n = sizes[s];
        /* the batch changes in place, as the trainer's does */
        for (size_t i = 0; i < (size_t)n * per; i++)
            l.x[i] = 2.0f * kd_rng_uniform(&r) - 1.0f;
        for (int i = 0; i < n; i++)
            l.y[i] = (int32_t)kd_rng_below(&r, 4);
        if (s == fail_at)
            fail_next_end = 1;
        if (bf16)
            kd_model_bf16_weights(m, 1);
        assert_int_equal(kd_step_run(&st, n, n == BATCH, kd_mix64(3, (uint64_t)s, 0xd0), log),
                         KD_OK);
        if (bf16)
            kd_model_bf16_weights(m, 0);
        assert_int_equal(be->optim_step(&oc, m->params, m->grads, l.state, m->decay_mask,
                                        m->nparams, oc.lr, s + 1),
                         KD_OK);
    }
    fclose(log);
    if (use && fail_at >= 0 && !strstr(logbuf, "no CUDA graph (recording refused by the test"))
        fail_msg("a refused recording is not reported:\n%s", logbuf);
    kd_step_release(&st);
    o->nparams = m->nparams;
    o->nbuffers = m->nbuffers;
    o->params = malloc(m->nparams * sizeof(float));
    o->buffers = malloc(m->nbuffers * sizeof(float));
    assert_true(o->params && o->buffers);
    memcpy(o->params, m->params, m->nparams * sizeof(float));
    memcpy(o->buffers, m->buffers, m->nbuffers * sizeof(float));
    memcpy(o->acc, l.acc, sizeof o->acc);
    int k = 0;
    for (int i = 0; i < m->nentries; i++)
        if (m->entries[i].kind == KD_ENTRY_COUNTER && k < 8)
            o->counters[k++] = *m->entries[i].counter;
    assert_int_equal(k, 4); /* the model's four batchnorms */
    free(l.x), free(l.y), free(l.acc), free(l.state);
    kd_model_free(m);
}

static void expect_same(const outcome *a, const outcome *b)
{
    assert_int_equal(a->nparams, b->nparams);
    if (memcmp(a->params, b->params, a->nparams * sizeof(float)))
        fail_msg("the weights differ");
    if (memcmp(a->buffers, b->buffers, a->nbuffers * sizeof(float)))
        fail_msg("the batchnorm running statistics differ");
    for (int i = 0; i < 4; i++)
        assert_int_equal(a->counters[i], b->counters[i]);
    if (memcmp(a->acc, b->acc, sizeof a->acc))
        fail_msg("the loss sums differ: %.17g against %.17g", a->acc[0], b->acc[0]);
}

static void free_outcome(outcome *o)
{
    free(o->params);
    free(o->buffers);
}

static void run_case(int bf16, int fail_at, int want_records, int want_launches)
{
    outcome eager, rec;
    train(kd_backend_cpu(), 0, bf16, -1, &eager);
    n_records = n_launches = 0;
    train(recording_backend(), 1, bf16, fail_at, &rec);
    assert_int_equal(n_records, want_records);
    assert_int_equal(n_launches, want_launches);
    assert_int_equal(eager.counters[0], STEPS); /* every forward counted once */
    expect_same(&eager, &rec);
    free_outcome(&eager);
    free_outcome(&rec);
}

/* steps 0 (eager, warms), 1 (recorded and launched), then every later full batch replays:
 * 12 full batches, the first eager, so 11 launches from one record */
static void test_replay_equals_eager(void **state)
{
    (void)state;
    run_case(0, -1, 1, 11);
}

static void test_replay_equals_eager_bf16(void **state)
{
    (void)state;
    run_case(1, -1, 1, 11);
}

/* the recording at step 1 is refused: that step and all later ones run eagerly */
static void test_failed_recording_runs_eagerly(void **state)
{
    (void)state;
    run_case(0, 1, 0, 0);
}

/* a loss that reads its sum back (acc NULL) cannot be recorded: the recording breaks, and the
 * result is still the eager one */
static void losses_readback(void *ctx, kd_model *m, int n, double share)
{
    losses_ctx *l = ctx;
    int64_t correct;
    l->acc[0] += m->be->ce(n, m->out_features, kd_model_output(m), l->y, 0.1,
                           kd_model_output_grad(m), share, &correct, NULL);
}

static void test_read_back_breaks_recording(void **state)
{
    (void)state;
    kd_model *m = build_model(recording_backend());
    losses_ctx l = {calloc((size_t)BATCH * m->in_numel, sizeof(float)), NULL,
                    calloc(BATCH, sizeof(int32_t)), calloc(3, sizeof(double))};
    kd_step st = {.m = m, .x = l.x, .losses = losses_readback, .ctx = &l, .use = 1};
    char logbuf[2048] = "";
    FILE *log = fmemopen(logbuf, sizeof logbuf, "w");
    n_records = n_launches = 0;
    for (int s = 0; s < 3; s++)
        assert_int_equal(kd_step_run(&st, BATCH, 1, (uint64_t)s, log), KD_OK);
    fclose(log);
    assert_int_equal(n_records, 0);
    assert_null(st.rec);
    assert_int_equal(st.use, 0);
    if (!strstr(logbuf, "a loss read back while recording"))
        fail_msg("the broken recording is not reported:\n%s", logbuf);
    for (int i = 0; i < m->nentries; i++) /* three forwards ran, each counted once */
        if (m->entries[i].kind == KD_ENTRY_COUNTER)
            assert_int_equal(*m->entries[i].counter, 3);
    kd_step_release(&st);
    free(l.x), free(l.y), free(l.acc);
    kd_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replay_equals_eager),
        cmocka_unit_test(test_replay_equals_eager_bf16),
        cmocka_unit_test(test_failed_recording_runs_eagerly),
        cmocka_unit_test(test_read_back_breaks_recording),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    free(rec_ops);
    return rc;
}
