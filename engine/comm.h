/*
 * comm.h - collectives between the ranks of a data-parallel job.
 *
 * One process per device. A job started as `mpirun -np W distill train CFG` (or
 * under Slurm's srun) has W ranks; each computes the gradient of its slice of
 * every global batch and the ranks sum the slices' gradients. Three
 * implementations share this interface:
 *
 *   single  one rank, every operation a no-op (what a plain `distill train` gets);
 *   mpi     host buffers through MPI (the CPU backend);
 *   nccl    device buffers through NCCL, bootstrapped through MPI (the CUDA backend):
 *           the gradient sums and the parameter broadcast run on the device, while the
 *           small host-side operations (statistics, flags, bytes) still go through MPI.
 *
 * Gradient sums are bucketed: sum_start queues an in-place sum of one bucket
 * and returns at once, so the buckets of the last layers travel while the
 * backward pass is still computing the first ones; sum_progress lets the
 * library move queued work along (MPI progresses non-blocking collectives
 * only inside MPI calls); sum_finish waits for every queued bucket. The
 * buffers handed to sum_start must not be touched until sum_finish returns.
 *
 * Every rank sees the same sums: the MPI and NCCL reductions return one
 * result to all ranks, and the trainer checks this at each epoch's end by
 * comparing a hash of the parameters across ranks (kd_comm_check_same).
 *
 * Errors: every MPI and NCCL return code is checked and turned into a status
 * with the library's message. A rank that fails cannot leave the others
 * waiting in a collective: the CLI calls kd_comm_abort, which ends the whole
 * job (MPI_Abort) with the exit code; before that, the trainer's teardown
 * lets go of the device's queued collectives (kd_comm_drop_after), so that
 * freeing its buffers cannot wait on a peer that will never join.
 */
#ifndef KD_COMM_H
#define KD_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct kd_comm kd_comm;

typedef struct {
    /* in-place sum over ranks of n float32s in buf (device memory when device_buffers) */
    kd_status (*sum_start)(kd_comm *c, float *buf, size_t n);
    kd_status (*sum_progress)(kd_comm *c);
    kd_status (*sum_finish)(kd_comm *c);
    /* broadcast n float32s from rank root (device memory when device_buffers) */
    kd_status (*bcast_f32)(kd_comm *c, float *buf, size_t n, int root);
    /* host memory: broadcast bytes; in-place sum of doubles; in-place max of uint64s */
    kd_status (*bcast_bytes)(kd_comm *c, void *buf, size_t bytes, int root);
    kd_status (*sum_f64)(kd_comm *c, double *buf, int n);
    kd_status (*max_u64)(kd_comm *c, uint64_t *buf, int n);
    kd_status (*barrier)(kd_comm *c);
    void (*abort)(kd_comm *c, int code);
    kd_status (*close)(kd_comm *c); /* frees c whatever it returns */
    kd_status (*drop)(kd_comm *c);  /* kd_comm_drop_after; NULL: nothing to do */
} kd_comm_ops;

struct kd_comm {
    const char *name;   /* "single", "mpi", "nccl" */
    int rank, size;     /* this process, the number of processes */
    int local_rank;     /* rank among the processes on this host (device index) */
    int device_buffers; /* 1: sum_start and bcast_f32 take device pointers */
    const kd_comm_ops *ops;
    kd_comm *host; /* nccl: the MPI communicator beneath it; else NULL */
    void *impl;
};

/* 1 when this build has MPI (and NCCL) support compiled in. */
int kd_comm_have_mpi(void);
int kd_comm_have_nccl(void);

/*
 * 1 when the process was started by a launcher that made it one of several ranks
 * (Open MPI's mpirun, a PMI/PMIx launcher, Slurm's srun with more than one task).
 */
int kd_comm_launched(void);

/*
 * Open the job's communicator. kind: "auto" (mpi when kd_comm_launched(), else single),
 * "single" or "mpi". A launched process without MPI support in this build, or kind "mpi"
 * without it, is KD_ERR_UNSUPPORTED. The communicator is upgraded to NCCL later, by
 * kd_comm_nccl_attach, once the job knows it runs on the CUDA backend.
 */
kd_status kd_comm_open(const char *kind, kd_comm **out);

/*
 * On the CUDA backend with more than one rank: a NCCL communicator over the same ranks,
 * its unique id broadcast from rank 0 through `host` (which stays owned by the caller and
 * must outlive the result). Builds without CUDA or without MPI return KD_ERR_UNSUPPORTED.
 */
kd_status kd_comm_nccl_attach(kd_comm *host, kd_comm **out);

/* Close (NULL is fine) and free c. For MPI this finalizes MPI: call it once, at the end. The
 * first failure of the calls that wind the communicator down, or KD_OK; c is freed either way. */
kd_status kd_comm_close(kd_comm *c);

/* kd_comm_close(c) at the end of work that returned st: a failed st stays the result, with its
 * message (a teardown failure after it is not reported), else the close's own result. */
kd_status kd_comm_close_after(kd_status st, kd_comm *c);

/* At the end of work that returned st, on a failure: the rank stops waiting for its peers before
 * it frees anything. NCCL aborts the communicator, so that no collective the device still has
 * queued (one a peer will never join) holds up the frees and synchronizations that follow, and
 * the CLI's kd_comm_abort is reached. Nothing for the single and MPI communicators (their
 * collectives run inside the calls) or when st is KD_OK. Returns st with its message (a failure
 * of the abort itself is not reported, as in kd_comm_close_after). c may be NULL. */
kd_status kd_comm_drop_after(kd_status st, kd_comm *c);

/* End every rank of the job with this exit code (MPI_Abort); a no-op for one rank. */
void kd_comm_abort(kd_comm *c, int code);

/*
 * *same = 1 when every rank holds the same n bytes at p (host memory), else 0 on every rank:
 * compares a 64-bit hash through max and min (a collective: every rank calls it).
 */
kd_status kd_comm_all_same(kd_comm *c, const void *p, size_t n, int *same);

/* KD_ERR_INTERNAL naming `what` unless kd_comm_all_same finds the ranks the same. */
kd_status kd_comm_check_same(kd_comm *c, const void *p, size_t n, const char *what);

/* Rows [*lo, *hi) of n that rank r of w takes: contiguous, sizes differing by at most 1. */
static inline void kd_comm_slice(int64_t n, int r, int w, int64_t *lo, int64_t *hi)
{
    *lo = n * r / w;
    *hi = n * (r + 1) / w;
}

#endif
