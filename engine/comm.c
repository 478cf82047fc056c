/*
 * comm.c - the single-rank and MPI communicators (engine/comm.h).
 */
#include "comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KD_HAVE_MPI
#include <mpi.h>
#endif

/* ---- single --------------------------------------------------------------------------- */

static kd_status one_sum_start(kd_comm *c, float *buf, size_t n) { return KD_OK; }
static kd_status one_nop(kd_comm *c) { return KD_OK; }
static kd_status one_bcast_f32(kd_comm *c, float *buf, size_t n, int root) { return KD_OK; }
static kd_status one_bcast_bytes(kd_comm *c, void *buf, size_t n, int root) { return KD_OK; }
static kd_status one_sum_f64(kd_comm *c, double *buf, int n) { return KD_OK; }
static kd_status one_max_u64(kd_comm *c, uint64_t *buf, int n) { return KD_OK; }
static void one_abort(kd_comm *c, int code) {}
static kd_status one_close(kd_comm *c)
{
    free(c);
    return KD_OK;
}

static const kd_comm_ops single_ops = {one_sum_start,   one_nop,     one_nop,     one_bcast_f32,
                                       one_bcast_bytes, one_sum_f64, one_max_u64, one_nop,
                                       one_abort,       one_close,   NULL};

static kd_status open_single(kd_comm **out)
{
    kd_comm *c = calloc(1, sizeof *c);
    if (!c)
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    c->name = "single";
    c->size = 1;
    c->ops = &single_ops;
    *out = c;
    return KD_OK;
}

/* ---- launch detection ------------------------------------------------------------------ */

static int env_int(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? atoi(v) : -1;
}

int kd_comm_launched(void)
{
    /* Open MPI's mpirun, MPICH/Hydra and other PMI launchers, Slurm's srun (a step's task
     * count: SLURM_NTASKS is also set in an sbatch script itself, which runs one process) */
    static const char *const sizes[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                                        "SLURM_STEP_NUM_TASKS"};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        if (env_int(sizes[i]) > 1)
            return 1;
    return getenv("PMIX_RANK") != NULL && getenv("OMPI_COMM_WORLD_SIZE") == NULL &&
           env_int("PMIX_SIZE") != 1;
}

#ifdef KD_HAVE_MPI

int kd_comm_have_mpi(void) { return 1; }

typedef struct {
    MPI_Request *req;
    int nreq, cap;
    int finalize; /* we called MPI_Init */
} mpi_impl;

static kd_status mpi_fail(int rc, const char *what)
{
    char msg[MPI_MAX_ERROR_STRING + 1];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        len = 0;
    msg[len] = '\0';
    return KD_FAIL(KD_ERR_IO, "MPI %s failed: %s (code %d)", what, len ? msg : "unknown error", rc);
}

#define MPI_CHECK(call, what)                                                                      \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_ != MPI_SUCCESS)                                                                    \
            return mpi_fail(rc_, what);                                                            \
    } while (0)

/* MPI counts are int: long buffers go in pieces of at most 1 Gi elements */
#define KD_MPI_PIECE ((size_t)1 << 30)

static kd_status mpi_sum_start(kd_comm *c, float *buf, size_t n)
{
    mpi_impl *im = c->impl;
    for (size_t off = 0; off < n; off += KD_MPI_PIECE) {
        size_t k = n - off < KD_MPI_PIECE ? n - off : KD_MPI_PIECE;
        if (im->nreq == im->cap) {
            int cap = im->cap ? 2 * im->cap : 16;
            MPI_Request *r = realloc(im->req, (size_t)cap * sizeof *r);
            if (!r)
                return KD_FAIL(KD_ERR_NOMEM, "out of memory for MPI requests");
            im->req = r;
            im->cap = cap;
        }
        MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf + off, (int)k, MPI_FLOAT, MPI_SUM,
                                 MPI_COMM_WORLD, &im->req[im->nreq]),
                  "Iallreduce of a gradient bucket");
        im->nreq++;
    }
    return KD_OK;
}

static kd_status mpi_sum_progress(kd_comm *c)
{
    mpi_impl *im = c->impl;
    int flag = 0;
    if (im->nreq)
        MPI_CHECK(MPI_Testall(im->nreq, im->req, &flag, MPI_STATUSES_IGNORE),
                  "Testall on the gradient buckets");
    return KD_OK;
}

static kd_status mpi_sum_finish(kd_comm *c)
{
    mpi_impl *im = c->impl;
    int n = im->nreq;
    im->nreq = 0;
    if (n)
        MPI_CHECK(MPI_Waitall(n, im->req, MPI_STATUSES_IGNORE), "Waitall on the gradient buckets");
    return KD_OK;
}

static kd_status mpi_bcast_bytes(kd_comm *c, void *buf, size_t n, int root)
{
    for (size_t off = 0; off < n; off += KD_MPI_PIECE) {
        size_t k = n - off < KD_MPI_PIECE ? n - off : KD_MPI_PIECE;
        MPI_CHECK(MPI_Bcast((char *)buf + off, (int)k, MPI_BYTE, root, MPI_COMM_WORLD), "Bcast");
    }
    return KD_OK;
}

static kd_status mpi_bcast_f32(kd_comm *c, float *buf, size_t n, int root)
{
    return mpi_bcast_bytes(c, buf, n * sizeof(float), root);
}

static kd_status mpi_sum_f64(kd_comm *c, double *buf, int n)
{
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD),
              "Allreduce (sum)");
    return KD_OK;
}

static kd_status mpi_max_u64(kd_comm *c, uint64_t *buf, int n)
{
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD),
              "Allreduce (max)");
    return KD_OK;
}

static kd_status mpi_barrier(kd_comm *c)
{
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD), "Barrier");
    return KD_OK;
}

static void mpi_abort(kd_comm *c, int code)
{
    if (c->size > 1)
        MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
}

static kd_status mpi_close(kd_comm *c)
{
    mpi_impl *im = c->impl;
    kd_status st = KD_OK;
    if (im) {
        int rc = MPI_SUCCESS, fin = 0;
        if (im->nreq && (rc = MPI_Waitall(im->nreq, im->req, MPI_STATUSES_IGNORE)) != MPI_SUCCESS)
            st = mpi_fail(rc, "MPI_Waitall (closing)");
        if (im->finalize) {
            if ((rc = MPI_Finalized(&fin)) != MPI_SUCCESS) {
                if (st == KD_OK)
                    st = mpi_fail(rc, "MPI_Finalized");
            } else if (!fin && (rc = MPI_Finalize()) != MPI_SUCCESS && st == KD_OK) {
                st = mpi_fail(rc, "MPI_Finalize");
            }
        }
        free(im->req);
        free(im);
    }
    free(c);
    return st;
}

static const kd_comm_ops mpi_ops = {
    mpi_sum_start, mpi_sum_progress, mpi_sum_finish, mpi_bcast_f32, mpi_bcast_bytes,
    mpi_sum_f64,   mpi_max_u64,      mpi_barrier,    mpi_abort,     mpi_close,
    NULL};

static kd_status open_mpi(kd_comm **out)
{
    kd_comm *c = calloc(1, sizeof *c);
    mpi_impl *im = calloc(1, sizeof *im);
    if (!c || !im) {
        free(c);
        free(im);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    }
    c->name = "mpi";
    c->ops = &mpi_ops;
    c->impl = im;
    kd_status st = KD_OK;
    int inited = 0, provided = 0, rc;
    if ((rc = MPI_Initialized(&inited)) != MPI_SUCCESS) {
        st = mpi_fail(rc, "Initialized");
        goto fail;
    }
    /* (MPI_Initialized and MPI_Init_thread run before the error handler below can be set: an
     * MPI whose default handler aborts stops the process there instead of returning) */
    if (!inited) {
        /* only the main thread calls MPI (the cache prefetch thread and OpenMP do not) */
        if ((rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided)) != MPI_SUCCESS) {
            st = mpi_fail(rc, "Init_thread");
            goto fail;
        }
        im->finalize = 1;
        if (provided < MPI_THREAD_FUNNELED) {
            st = KD_FAIL(KD_ERR_UNSUPPORTED,
                         "MPI gives thread level %d, below MPI_THREAD_FUNNELED (%d): distill runs "
                         "other threads beside the one that calls MPI (OpenMP, the cache "
                         "prefetch); use an MPI built with thread support",
                         provided, MPI_THREAD_FUNNELED);
            goto fail;
        }
    }
    /* errors come back as return codes, which every call checks */
    if ((rc = MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN)) != MPI_SUCCESS ||
        (rc = MPI_Comm_rank(MPI_COMM_WORLD, &c->rank)) != MPI_SUCCESS ||
        (rc = MPI_Comm_size(MPI_COMM_WORLD, &c->size)) != MPI_SUCCESS) {
        st = mpi_fail(rc, "communicator setup");
        goto fail;
    }
    MPI_Comm node;
    if ((rc = MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL,
                                  &node)) != MPI_SUCCESS ||
        (rc = MPI_Comm_rank(node, &c->local_rank)) != MPI_SUCCESS ||
        (rc = MPI_Comm_free(&node)) != MPI_SUCCESS) {
        st = mpi_fail(rc, "the per-host communicator");
        goto fail;
    }
    *out = c;
    return KD_OK;
fail:
    return kd_comm_close_after(st, c); /* the setup's failure stays the one reported */
}

#else /* !KD_HAVE_MPI */

int kd_comm_have_mpi(void) { return 0; }

static kd_status open_mpi(kd_comm **out)
{
    return KD_FAIL(KD_ERR_UNSUPPORTED,
                   "this distill was built without MPI (install libopenmpi-dev and rebuild)");
}

#endif

kd_status kd_comm_open(const char *kind, kd_comm **out)
{
    *out = NULL;
    if (!kind || !strcmp(kind, "auto")) {
        if (!kd_comm_launched())
            return open_single(out);
        kd_status st = open_mpi(out);
        if (st != KD_OK)
            kd_fail_context(st, "started as one of several ranks, but ");
        return st;
    }
    if (!strcmp(kind, "single")) {
        if (kd_comm_launched())
            return KD_FAIL(KD_ERR_CONFIG,
                           "run.comm is single but the job was started as one of several ranks "
                           "(every rank would train alone and write the same files)");
        return open_single(out);
    }
    if (!strcmp(kind, "mpi") || !strcmp(kind, "nccl"))
        return open_mpi(out);
    return KD_FAIL(KD_ERR_CONFIG, "run.comm must be auto, single, mpi or nccl, got '%s'", kind);
}

kd_status kd_comm_close(kd_comm *c) { return c ? c->ops->close(c) : KD_OK; }

/* op(c) after work that failed with st: st stays the result, with its message (a failure of op
 * after it is not reported). */
static kd_status after_failure(kd_status st, kd_comm *c, kd_status (*op)(kd_comm *))
{
    char why[KD_ERRMSG_MAX];
    snprintf(why, sizeof why, "%s", kd_last_error());
    return op(c) == KD_OK ? st : kd_fail_restore(st, why);
}

kd_status kd_comm_close_after(kd_status st, kd_comm *c)
{
    return st == KD_OK ? kd_comm_close(c) : after_failure(st, c, kd_comm_close);
}

kd_status kd_comm_drop_after(kd_status st, kd_comm *c)
{
    if (st == KD_OK || !c || !c->ops->drop)
        return st;
    return after_failure(st, c, c->ops->drop);
}

void kd_comm_abort(kd_comm *c, int code)
{
    if (c && c->size > 1)
        c->ops->abort(c, code);
}

static uint64_t hash_bytes(const void *p, size_t n)
{
    /* FNV-1a over 8-byte words, then the tail; enough to see two ranks drift apart */
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 0x100000001b3ULL;
    }
    for (; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

kd_status kd_comm_all_same(kd_comm *c, const void *p, size_t n, int *same)
{
    *same = 1;
    if (!c || c->size == 1)
        return KD_OK;
    kd_comm *h = c->host ? c->host : c;
    uint64_t mine = hash_bytes(p, n), v[2] = {mine, ~mine};
    KD_TRY(h->ops->max_u64(h, v, 2));
    *same = v[0] == mine && ~v[1] == mine;
    return KD_OK;
}

kd_status kd_comm_check_same(kd_comm *c, const void *p, size_t n, const char *what)
{
    int same = 1;
    KD_TRY(kd_comm_all_same(c, p, n, &same));
    if (!same)
        return KD_FAIL(KD_ERR_INTERNAL,
                       "the ranks disagree on %s (rank %d of %d holds other values than another "
                       "rank): the data-parallel run is no longer one run",
                       what, c->rank, c->size);
    return KD_OK;
}
