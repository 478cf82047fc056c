/*
 * comm_nccl.c - the NCCL communicator (engine/comm.h): gradient sums and parameter
 * broadcasts on device memory, bootstrapped through (and sitting on) the MPI communicator.
 *
 * Device collectives run on a stream of their own (comm stream), so the sum of one
 * gradient bucket overlaps with the backward pass still computing the next on the CUDA
 * backend's stream (compute stream, kd_backend_cuda_stream). The two streams are ordered
 * by events only; the host never waits for a collective here:
 *
 *   sum_start(b)   record `ready` on compute -> comm waits on `ready` -> ncclAllReduce(b) on comm
 *                  (the bucket's gradients, and everything queued before them, are written
 *                  before NCCL reads them; compute goes on with the next layers at once)
 *   sum_finish     record `done` on comm -> compute waits on `done`
 *                  (whatever is queued on compute afterwards - the optimizer step, the next
 *                  step's zero_grad, a download - sees every sum; sum_finish returns without
 *                  blocking, and the trainer's be->sync() is what waits)
 *   bcast_f32      the same pair around one ncclBroadcast: queued after the compute stream's
 *                  work (the uploaded parameters), and before anything queued after it
 *
 * Reusing one `ready` and one `done` event is sound: cudaStreamWaitEvent waits for the
 * work the event captured at its latest cudaEventRecord before the wait was queued.
 * Buckets are summed in the order sum_start queued them, on every rank the same (NCCL
 * requires the same sequence of collectives on every rank of a communicator).
 *
 * sum_progress has nothing to do: NCCL's kernels and proxy thread move the transfers
 * along without host calls. The host-side operations (bytes, statistics, barrier) go to
 * the MPI communicator beneath, which this one does not own.
 *
 * Errors: every CUDA and NCCL call is checked (engine/cuda_check.h). A collective that
 * fails after it was queued (a peer died, the network failed) is reported by NCCL
 * asynchronously; sum_finish asks for it (ncclCommGetAsyncError). A peer that simply never
 * joins leaves the compute stream waiting, and be->sync() with it: the CLI's MPI_Abort on
 * the failing rank is what ends such a job.
 */
#include "comm.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(KD_HAVE_CUDA) && defined(KD_HAVE_MPI)

#include <cuda_runtime.h>
#include <nccl.h>

#include "backend.h"
#include "cuda_check.h"

int kd_comm_have_nccl(void) { return 1; }

typedef struct {
    ncclComm_t nccl;      /* NULL once aborted */
    cudaStream_t compute; /* the CUDA backend's stream (not ours) */
    cudaStream_t stream;  /* ours: NCCL work */
    cudaEvent_t ready;    /* compute -> comm: the work queued so far on compute */
    cudaEvent_t done;     /* comm -> compute: the collectives queued so far on comm */
    int pending;          /* gradient sums queued since the last sum_finish */
} nccl_impl;

/* Make `waiter` wait for the work queued so far on `signaller`, through event ev. */
static kd_status stream_after(cudaStream_t waiter, cudaStream_t signaller, cudaEvent_t ev)
{
    KD_TRY(KD_CUDA_CHECK(cudaEventRecord(ev, signaller), "cudaEventRecord"));
    return KD_CUDA_CHECK(cudaStreamWaitEvent(waiter, ev, 0), "cudaStreamWaitEvent");
}

/* A collective's failure that NCCL noticed after the call had returned, if any. */
static kd_status async_error(nccl_impl *im, const char *what)
{
    ncclResult_t ar = ncclSuccess;
    KD_TRY(KD_NCCL_CHECK(ncclCommGetAsyncError(im->nccl, &ar), im->nccl, "ncclCommGetAsyncError"));
    if (ar == ncclInProgress) /* only non-blocking communicators report it; this one is not */
        return KD_OK;
    return KD_NCCL_CHECK(ar, im->nccl, what);
}

static kd_status nccl_sum_start(kd_comm *c, float *buf, size_t n)
{
    nccl_impl *im = c->impl;
    if (n == 0)
        return KD_OK;
    if (!im->nccl)
        return KD_FAIL(KD_ERR_INTERNAL, "NCCL sum after the communicator was aborted");
    KD_TRY(stream_after(im->stream, im->compute, im->ready));
    KD_TRY(KD_NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, im->nccl, im->stream),
                         im->nccl, "ncclAllReduce of a gradient bucket"));
    im->pending = 1;
    return KD_OK;
}

static kd_status nccl_sum_progress(kd_comm *c) { return KD_OK; }

static kd_status nccl_sum_finish(kd_comm *c)
{
    nccl_impl *im = c->impl;
    if (!im->pending)
        return KD_OK;
    im->pending = 0;
    KD_TRY(stream_after(im->compute, im->stream, im->done));
    return async_error(im, "a queued NCCL gradient sum");
}

static kd_status nccl_bcast_f32(kd_comm *c, float *buf, size_t n, int root)
{
    nccl_impl *im = c->impl;
    if (n == 0)
        return KD_OK;
    if (!im->nccl)
        return KD_FAIL(KD_ERR_INTERNAL, "NCCL broadcast after the communicator was aborted");
    KD_TRY(stream_after(im->stream, im->compute, im->ready));
    KD_TRY(KD_NCCL_CHECK(ncclBroadcast(buf, buf, n, ncclFloat, root, im->nccl, im->stream),
                         im->nccl, "ncclBroadcast"));
    KD_TRY(stream_after(im->compute, im->stream, im->done));
    return async_error(im, "a queued NCCL broadcast");
}

static kd_status nccl_bcast_bytes(kd_comm *c, void *buf, size_t bytes, int root)
{
    return c->host->ops->bcast_bytes(c->host, buf, bytes, root);
}

static kd_status nccl_sum_f64(kd_comm *c, double *buf, int n)
{
    return c->host->ops->sum_f64(c->host, buf, n);
}

static kd_status nccl_max_u64(kd_comm *c, uint64_t *buf, int n)
{
    return c->host->ops->max_u64(c->host, buf, n);
}

static kd_status nccl_barrier(kd_comm *c) { return c->host->ops->barrier(c->host); }

/* The communicator aborted: its queued collectives stop without their peers (a failing rank's
 * teardown would otherwise wait for them). */
static kd_status nccl_drop(kd_comm *c)
{
    nccl_impl *im = c->impl;
    kd_status st = KD_OK;
    if (im && im->nccl) {
        st = KD_NCCL_CHECK(ncclCommAbort(im->nccl), NULL, "ncclCommAbort");
        im->nccl = NULL; /* aborted or not, the handle is not used again */
    }
    return st;
}

static void nccl_abort(kd_comm *c, int code)
{
    (void)nccl_drop(c); /* the job ends with `code` whatever NCCL says: MPI_Abort follows */
    c->host->ops->abort(c->host, code);
}

/* A teardown's first failure and its message (a later failure's message would replace it). */
typedef struct {
    kd_status st;
    int later; /* failures after the first */
    char msg[KD_ERRMSG_MAX];
} teardown;

static void first_failure(teardown *t, kd_status now)
{
    if (now == KD_OK)
        return;
    if (t->st != KD_OK) {
        t->later++;
        return;
    }
    t->st = now;
    snprintf(t->msg, sizeof t->msg, "%s", kd_last_error());
}

/*
 * Free what nccl_attach made, everything whatever fails; the first failure is returned. A
 * communicator whose queued work failed is aborted, not destroyed (destroy would wait for peers
 * that may be gone).
 */
static kd_status nccl_free(nccl_impl *im)
{
    teardown t = {KD_OK, 0, ""};
    if (!im)
        return KD_OK;
    if (im->nccl) {
        ncclResult_t ar = ncclSuccess;
        kd_status q = KD_OK;
        /* wait for the queued work while watching the communicator: work whose peer failed
         * never completes (a stream synchronize would wait forever) but sets its async error */
        for (;;) {
            cudaError_t e = im->stream ? cudaStreamQuery(im->stream) : cudaSuccess;
            if (e != cudaSuccess && e != cudaErrorNotReady) {
                q = KD_CUDA_CHECK(e, "cudaStreamQuery (closing NCCL)");
                break;
            }
            q = KD_NCCL_CHECK(ncclCommGetAsyncError(im->nccl, &ar), im->nccl,
                              "ncclCommGetAsyncError");
            if (q == KD_OK && ar != ncclSuccess && ar != ncclInProgress)
                q = KD_NCCL_CHECK(ar, im->nccl, "the communicator's queued work");
            if (q != KD_OK || e == cudaSuccess)
                break;
            sched_yield();
        }
        if (q == KD_OK) { /* a failed destroy leaves no handle to abort */
            q = KD_NCCL_CHECK(ncclCommDestroy(im->nccl), NULL, "ncclCommDestroy");
            im->nccl = NULL;
        }
        first_failure(&t, q);
        if (im->nccl) /* frees without waiting for peers */
            first_failure(&t, KD_NCCL_CHECK(ncclCommAbort(im->nccl), NULL, "ncclCommAbort"));
    }
    if (im->done)
        first_failure(&t, KD_CUDA_CHECK(cudaEventDestroy(im->done), "cudaEventDestroy"));
    if (im->ready)
        first_failure(&t, KD_CUDA_CHECK(cudaEventDestroy(im->ready), "cudaEventDestroy"));
    if (im->stream)
        first_failure(&t, KD_CUDA_CHECK(cudaStreamDestroy(im->stream), "cudaStreamDestroy"));
    free(im);
    if (t.later)
        return KD_FAIL(t.st, "%s, and %d more call(s) failed after it", t.msg, t.later);
    return t.st;
}

static kd_status nccl_close(kd_comm *c)
{
    kd_status st = nccl_free(c->impl); /* c->host stays: the caller owns it */
    free(c);
    return st;
}

static const kd_comm_ops nccl_ops = {nccl_sum_start, nccl_sum_progress, nccl_sum_finish,
                                     nccl_bcast_f32, nccl_bcast_bytes,  nccl_sum_f64,
                                     nccl_max_u64,   nccl_barrier,      nccl_abort,
                                     nccl_close,     nccl_drop};

/* The streams, the events and the communicator; on failure im holds what was made. */
static kd_status nccl_setup(kd_comm *host, nccl_impl *im)
{
    const char *why = NULL;
    if (!kd_backend_cuda(&why)) /* sets the rank's device (kd_backend_cuda_prefer_device) */
        return KD_FAIL(KD_ERR_DEVICE, "NCCL needs the CUDA backend, but %s", why);
    im->compute = (cudaStream_t)kd_backend_cuda_stream();
    int dev = -1;
    KD_TRY(KD_CUDA_CHECK(cudaGetDevice(&dev), "cudaGetDevice"));
    KD_TRY(KD_CUDA_CHECK(cudaStreamCreateWithFlags(&im->stream, cudaStreamNonBlocking),
                         "cudaStreamCreateWithFlags (NCCL stream)"));
    KD_TRY(KD_CUDA_CHECK(cudaEventCreateWithFlags(&im->ready, cudaEventDisableTiming),
                         "cudaEventCreateWithFlags"));
    KD_TRY(KD_CUDA_CHECK(cudaEventCreateWithFlags(&im->done, cudaEventDisableTiming),
                         "cudaEventCreateWithFlags"));

    ncclUniqueId id = {{0}};
    if (host->rank == 0)
        KD_TRY(KD_NCCL_CHECK(ncclGetUniqueId(&id), NULL, "ncclGetUniqueId"));
    kd_status st = host->ops->bcast_bytes(host, &id, sizeof id, 0);
    if (st != KD_OK)
        return kd_fail_context(st, "sending the NCCL unique id from rank 0: ");
    ncclComm_t comm = NULL;
    st = KD_NCCL_CHECK(ncclCommInitRank(&comm, host->size, id, host->rank), NULL,
                       "ncclCommInitRank");
    if (st != KD_OK)
        return kd_fail_context(st, "rank %d of %d on CUDA device %d: ", host->rank, host->size,
                               dev);
    im->nccl = comm;
    return KD_OK;
}

kd_status kd_comm_nccl_attach(kd_comm *host, kd_comm **out)
{
    *out = NULL;
    if (!host || host->device_buffers)
        return KD_FAIL(KD_ERR_INVALID, "kd_comm_nccl_attach needs the host (MPI) communicator");
    kd_comm *c = calloc(1, sizeof *c);
    nccl_impl *im = calloc(1, sizeof *im);
    if (!c || !im) {
        free(c);
        free(im);
        return KD_FAIL(KD_ERR_NOMEM, "out of memory");
    }
    kd_status st = nccl_setup(host, im);
    if (st != KD_OK) {
        /* the setup's failure is the one reported; one of the teardown is added to it */
        char why[KD_ERRMSG_MAX];
        snprintf(why, sizeof why, "%s", kd_last_error());
        kd_status ft = nccl_free(im);
        free(c);
        if (ft != KD_OK)
            return KD_FAIL(st, "%s; then, winding down, %s", why, kd_last_error());
        return st;
    }
    c->name = "nccl";
    c->rank = host->rank;
    c->size = host->size;
    c->local_rank = host->local_rank;
    c->device_buffers = 1;
    c->ops = &nccl_ops;
    c->host = host;
    c->impl = im;
    *out = c;
    return KD_OK;
}

#else /* no CUDA or no MPI */

int kd_comm_have_nccl(void) { return 0; }

kd_status kd_comm_nccl_attach(kd_comm *host, kd_comm **out)
{
    *out = NULL;
#if !defined(KD_HAVE_CUDA) && !defined(KD_HAVE_MPI)
    const char *missing = "CUDA and MPI (install the CUDA toolkit with NCCL and libopenmpi-dev, "
                          "and rebuild)";
#elif !defined(KD_HAVE_CUDA)
    const char *missing = "CUDA (install the CUDA toolkit with NCCL and rebuild)";
#else
    const char *missing = "MPI, which bootstraps NCCL (install libopenmpi-dev and rebuild)";
#endif
    return KD_FAIL(KD_ERR_UNSUPPORTED,
                   "the NCCL communicator is not available: distill was built "
                   "without %s",
                   missing);
}

#endif
