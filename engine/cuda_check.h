/*
 * cuda_check.h - CUDA runtime and NCCL return codes as kd_status (internal; CUDA builds only).
 *
 * Each macro is an expression: it evaluates the call's result once and gives KD_OK, or
 * records "what failed: the library's message (file:line)" with the line of the call
 * site, not of this header, and gives KD_ERR_DEVICE. Use it under KD_TRY to return on
 * failure, or assign it where a cleanup label must run:
 *
 *     KD_TRY(KD_CUDA_CHECK(cudaEventRecord(ev, stream), "cudaEventRecord"));
 *     st = KD_NCCL_CHECK(ncclAllReduce(...), comm, "ncclAllReduce of a gradient bucket");
 *
 * KD_NCCL_CHECK takes the communicator the call used (NULL when there is none yet, as for
 * ncclGetUniqueId): NCCL keeps a more specific message per communicator (ncclGetLastError),
 * which is appended to the generic text of the result code.
 */
#ifndef KD_CUDA_CHECK_H
#define KD_CUDA_CHECK_H

#include <cuda_runtime.h>
#include <nccl.h>

#include "status.h"

static inline kd_status kd_cuda_check_at(cudaError_t e, const char *what, const char *file,
                                         int line)
{
    if (e == cudaSuccess)
        return KD_OK;
    /* The runtime also keeps e as its last error: cleared, so that the next launch's check
     * (kd_launch_status) does not report it again as that launch's failure. A sticky error (the
     * context is lost) comes back from every later call anyway. */
    (void)cudaGetLastError();
    return kd_fail_at(KD_ERR_DEVICE, file, line, "%s failed: %s (%s)", what, cudaGetErrorString(e),
                      cudaGetErrorName(e));
}

static inline kd_status kd_nccl_check_at(ncclResult_t r, ncclComm_t comm, const char *what,
                                         const char *file, int line)
{
    if (r == ncclSuccess)
        return KD_OK;
    const char *detail = NULL;
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    detail = ncclGetLastError(comm);
#endif
    return kd_fail_at(KD_ERR_DEVICE, file, line, "%s failed: %s (NCCL result %d)%s%s", what,
                      ncclGetErrorString(r), (int)r, detail && *detail ? ": " : "",
                      detail && *detail ? detail : "");
}

#define KD_CUDA_CHECK(call, what)       kd_cuda_check_at((call), (what), __FILE__, __LINE__)
#define KD_NCCL_CHECK(call, comm, what) kd_nccl_check_at((call), (comm), (what), __FILE__, __LINE__)

#endif
