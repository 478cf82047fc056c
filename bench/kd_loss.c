/*
 * kd_loss.c - the fused distillation loss against PyTorch.
 *
 *   ./build/bench_kd_loss [--threads N] [--rounds N] [--iters N] [--python PATH] [--root DIR]
 *                         [--no-peer] [--gpu]
 *
 * CPU (default): for N x C in {65536 x 10, 8192 x 1000, 1024 x 32768}, the dense kd loss at
 * T = 4, forward KL, T^2 on, forward and backward (kd_cpu_kd_dense_f32 with ds), against
 * the PyTorch peer (bench/pytorch/kd_loss.py: F.kl_div(F.log_softmax(s/T), F.softmax(t/T),
 * 'batchmean') * T^2 and backward, torch.set_num_threads(threads)) run in the same
 * invocation. Before anything is timed the float result is checked against a plain two-pass
 * double reference written here (loss and gradient of the first rows). Distill and PyTorch
 * alternate for `rounds` rounds (the host is shared); the table shows medians: ms per call,
 * PyTorch ms, the speed-up, and GB/s against the minimal traffic (read s and t, write ds).
 * Writes bench/results/kd_loss.json. Exits 1 when a check fails, 2 when the peer is missing
 * (unless --no-peer).
 *
 * --gpu (built with CUDA, a device present): the same shapes through kernels/softmax_kl.cu,
 * every variant that fits (warp, block), float32 in/out and bfloat16 in/out, against a
 * device-to-device copy moving the same number of bytes, timed with CUDA events; the
 * gradient is checked against the CPU op first. Writes bench/results/kd_loss_gpu.json.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cpu_ops.h"
#include "rng.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef KD_HAVE_CUDA
#include <cuda_runtime.h>

#include "softmax_kl.h"
#endif

#ifndef KD_SOURCE_DIR
#define KD_SOURCE_DIR "."
#endif

#define TEMP       4.0
#define MAX_ROUNDS 9
#define CHECK_ROWS 256

typedef struct {
    int n, c;
} shape;

static const shape shapes[] = {{65536, 10}, {8192, 1000}, {1024, 32768}};
#define NSHAPES (int)(sizeof shapes / sizeof shapes[0])

typedef struct {
    int threads, rounds, iters, peer, gpu;
    const char *python, *root;
} opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
    double t[64];
    memcpy(t, v, sizeof(double) * n);
    qsort(t, n, sizeof(double), cmp_d);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static float *rand_logits(size_t nc, uint64_t seed)
{
    float *p = aligned_alloc(64, (nc * 4 + 63) / 64 * 64);
    if (!p)
        return NULL;
    kd_rng r;
    kd_rng_seed(&r, seed, 3);
    for (size_t i = 0; i < nc; i++)
        p[i] = 3.0f * kd_rng_normal(&r);
    return p;
}

/*
 * The plain reference: two-pass softmax in double, forward KL times T^2 summed over `rows`
 * rows, gradient T (p_s - p_t) / n (n the full batch, as the op scales it).
 */
static double reference(int rows, int n, int c, const float *s, const float *t, double *g)
{
    double total = 0;
    for (int i = 0; i < rows; i++) {
        const float *sr = s + (size_t)i * c, *tr = t + (size_t)i * c;
        double ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
        for (int j = 0; j < c; j++) {
            ms = fmax(ms, sr[j] / TEMP);
            mt = fmax(mt, tr[j] / TEMP);
        }
        for (int j = 0; j < c; j++) {
            zs += exp(sr[j] / TEMP - ms);
            zt += exp(tr[j] / TEMP - mt);
        }
        double kl = 0;
        for (int j = 0; j < c; j++) {
            double lps = sr[j] / TEMP - ms - log(zs), lpt = tr[j] / TEMP - mt - log(zt);
            kl += exp(lpt) * (lpt - lps);
            g[(size_t)i * c + j] = TEMP * (exp(lps) - exp(lpt)) / n;
        }
        total += TEMP * TEMP * kl;
    }
    return total;
}

/* max |a - b| / max |b| over the first rows, and the loss's relative error */
static int validate(const shape *sh, const float *s, const float *t, const float *ds,
                    double *loss_err, double *grad_err)
{
    const int rows = sh->n < CHECK_ROWS ? sh->n : CHECK_ROWS;
    double *g = malloc(sizeof(double) * rows * sh->c);
    if (!g)
        return 0;
    double want = reference(rows, sh->n, sh->c, s, t, g);
    /* the op on the same rows alone (its ds scaled for the full batch) */
    float *part = malloc(sizeof(float) * rows * sh->c);
    if (!part) {
        free(g);
        return 0;
    }
    double got = kd_cpu_kd_dense_f32(rows, sh->c, s, t, TEMP, 0, 1, part, (double)rows / sh->n);
    double e = 0, m = 0, e2 = 0;
    for (size_t i = 0; i < (size_t)rows * sh->c; i++) {
        e = fmax(e, fabs(ds[i] - g[i]));
        e2 = fmax(e2, fabs(part[i] - g[i]));
        m = fmax(m, fabs(g[i]));
    }
    *loss_err = fabs(got - want) / fabs(want);
    *grad_err = fmax(e, e2) / m;
    free(g);
    free(part);
    return *loss_err < 1e-5 && *grad_err < 1e-5;
}

/* ---- the PyTorch peer ---- */

static cJSON *run_peer(const opts *o, const char *device)
{
    if (access(o->python, X_OK) != 0) {
        fprintf(stderr, "bench_kd_loss: PyTorch peer unavailable: %s: %s\n", o->python,
                strerror(errno));
        return NULL;
    }
    char cmd[4096], list[256] = "";
    for (int k = 0; k < NSHAPES; k++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%dx%d", k ? "," : "",
                 shapes[k].n, shapes[k].c);
    snprintf(cmd, sizeof cmd,
             "'%s' '%s/bench/pytorch/kd_loss.py' --shapes %s --temperature %g --threads %d "
             "--iters %d --device %s",
             o->python, o->root, list, TEMP, o->threads, o->iters, device);
    FILE *p = popen(cmd, "r");
    if (!p) {
        fprintf(stderr, "bench_kd_loss: cannot run %s: %s\n", o->python, strerror(errno));
        return NULL;
    }
    char line[65536], last[65536] = "";
    while (fgets(line, sizeof line, p))
        if (line[0] == '{')
            snprintf(last, sizeof last, "%s", line);
    int rc = pclose(p);
    cJSON *j = last[0] ? cJSON_Parse(last) : NULL;
    cJSON *arr = j ? cJSON_GetObjectItem(j, "shapes") : NULL;
    if (rc != 0 || !cJSON_IsArray(arr) || cJSON_GetArraySize(arr) != NSHAPES) {
        fprintf(stderr,
                "bench_kd_loss: PyTorch peer failed (%s exited with status %d%s); it needs "
                "PyTorch for that interpreter\n",
                o->python, WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, j ? "" : ", no JSON");
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

static double peer_ms(cJSON *j, int k)
{
    cJSON *e = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "shapes"), k);
    return cJSON_GetObjectItem(e, "ms")->valuedouble;
}

static cJSON *numbers(const double *v, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

static int write_json(const opts *o, const char *name, cJSON *j)
{
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/bench/results", o->root);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "bench_kd_loss: cannot create %s: %s\n", dir, strerror(errno));
        return 0;
    }
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *text = cJSON_Print(j);
    FILE *f = fopen(path, "w");
    int ok = f && text && fputs(text, f) >= 0;
    if (f)
        ok = (fclose(f) == 0) && ok;
    free(text);
    if (!ok)
        fprintf(stderr, "bench_kd_loss: cannot write %s\n", path);
    else
        printf("wrote %s\n", path);
    return ok;
}

/* ---- CPU ---- */

static double time_cpu(const shape *sh, const float *s, const float *t, float *ds, int iters)
{
    double v[64];
    for (int i = 0; i < iters; i++) {
        double t0 = now_s();
        volatile double l = kd_cpu_kd_dense_f32(sh->n, sh->c, s, t, TEMP, 0, 1, ds, 1.0);
        (void)l;
        v[i] = (now_s() - t0) * 1e3;
    }
    return median(v, iters);
}

static int run_cpu(const opts *o)
{
    float *s[NSHAPES], *t[NSHAPES], *ds[NSHAPES];
    double lerr[NSHAPES], gerr[NSHAPES], dms[NSHAPES][MAX_ROUNDS], pms[NSHAPES][MAX_ROUNDS];
    cJSON *peers[MAX_ROUNDS] = {0};
    int ok = 1;
    for (int k = 0; k < NSHAPES; k++) {
        size_t nc = (size_t)shapes[k].n * shapes[k].c;
        s[k] = rand_logits(nc, 11 + k), t[k] = rand_logits(nc, 23 + k);
        ds[k] = aligned_alloc(64, (nc * 4 + 63) / 64 * 64);
        if (!s[k] || !t[k] || !ds[k]) {
            fprintf(stderr, "bench_kd_loss: out of memory\n");
            return 1;
        }
        kd_cpu_kd_dense_f32(shapes[k].n, shapes[k].c, s[k], t[k], TEMP, 0, 1, ds[k], 1.0);
        if (!validate(&shapes[k], s[k], t[k], ds[k], &lerr[k], &gerr[k])) {
            fprintf(stderr,
                    "bench_kd_loss: %dx%d: the result does not match the double reference "
                    "(loss rel err %.3g, gradient %.3g)\n",
                    shapes[k].n, shapes[k].c, lerr[k], gerr[k]);
            ok = 0;
        }
    }
    if (!ok)
        return 1;
    for (int r = 0; r < o->rounds; r++) {
        for (int k = 0; k < NSHAPES; k++) {
            time_cpu(&shapes[k], s[k], t[k], ds[k], 2); /* warm-up */
            dms[k][r] = time_cpu(&shapes[k], s[k], t[k], ds[k], o->iters);
        }
        if (o->peer) {
            peers[r] = run_peer(o, "cpu");
            if (!peers[r])
                return 2;
            for (int k = 0; k < NSHAPES; k++)
                pms[k][r] = peer_ms(peers[r], k);
        }
    }
    printf("kd loss, dense, T = %g, forward KL, T^2 on, forward + backward; CPU, %d threads, "
           "median of %d rounds\n",
           TEMP, o->threads, o->rounds);
    printf("%-14s %12s %12s %8s %9s %12s\n", "N x C", "distill ms", "PyTorch ms", "ratio", "GB/s",
           "check");
    cJSON *root = cJSON_CreateObject(), *arr = cJSON_CreateArray(), *pr = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "bench", "kd_loss");
    cJSON_AddStringToObject(root, "device", "cpu");
    cJSON_AddNumberToObject(root, "temperature", TEMP);
    cJSON_AddNumberToObject(root, "threads", o->threads);
    cJSON_AddNumberToObject(root, "rounds", o->rounds);
    cJSON_AddNumberToObject(root, "target_ratio", 2.0);
    int met = 1;
    for (int k = 0; k < NSHAPES; k++) {
        const double d = median(dms[k], o->rounds);
        const double p = o->peer ? median(pms[k], o->rounds) : NAN;
        const double bytes = 3.0 * shapes[k].n * shapes[k].c * sizeof(float);
        char name[32];
        snprintf(name, sizeof name, "%dx%d", shapes[k].n, shapes[k].c);
        printf("%-14s %12.3f %12.3f %8.2f %9.2f %12.1e\n", name, d, p, p / d, bytes / d * 1e-6,
               fmax(lerr[k], gerr[k]));
        met &= !o->peer || p / d >= 2.0;
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "n", shapes[k].n);
        cJSON_AddNumberToObject(e, "c", shapes[k].c);
        cJSON_AddNumberToObject(e, "distill_ms", d);
        cJSON_AddItemToObject(e, "distill_ms_rounds", numbers(dms[k], o->rounds));
        if (o->peer) {
            cJSON_AddNumberToObject(e, "pytorch_ms", p);
            cJSON_AddItemToObject(e, "pytorch_ms_rounds", numbers(pms[k], o->rounds));
            cJSON_AddNumberToObject(e, "ratio", p / d);
        }
        cJSON_AddNumberToObject(e, "min_bytes", bytes);
        cJSON_AddNumberToObject(e, "gb_per_s", bytes / d * 1e-6);
        cJSON_AddNumberToObject(e, "check_loss_rel_err", lerr[k]);
        cJSON_AddNumberToObject(e, "check_grad_rel_err", gerr[k]);
        cJSON_AddItemToArray(arr, e);
    }
    cJSON_AddItemToObject(root, "shapes", arr);
    cJSON_AddBoolToObject(root, "target_met", met);
    for (int r = 0; r < o->rounds && o->peer; r++)
        cJSON_AddItemToArray(pr, peers[r]);
    cJSON_AddItemToObject(root, "pytorch_runs", pr);
    int wrote = write_json(o, "kd_loss.json", root);
    cJSON_Delete(root);
    for (int k = 0; k < NSHAPES; k++)
        free(s[k]), free(t[k]), free(ds[k]);
    return wrote ? 0 : 1;
}

/* ---- GPU ---- */

#ifdef KD_HAVE_CUDA
static int cu_ok(cudaError_t e, const char *what)
{
    if (e != cudaSuccess)
        fprintf(stderr, "bench_kd_loss: %s: %s\n", what, cudaGetErrorString(e));
    return e == cudaSuccess;
}

/* median ms of `iters` launches of the kernel (variant) or, with variant < 0, of the copy; NAN
 * (the failing call printed) when a CUDA call or the kernel fails */
static double time_gpu(const shape *sh, int dtype, const void *s, const void *t, void *ds,
                       double *rows, int variant, void *copy_dst, size_t copy_bytes, int iters)
{
    cudaEvent_t a = NULL, b = NULL;
    double v[64], r = NAN;
    if (!cu_ok(cudaEventCreate(&a), "cudaEventCreate") ||
        !cu_ok(cudaEventCreate(&b), "cudaEventCreate"))
        goto done;
    for (int i = -2; i < iters; i++) {
        if (!cu_ok(cudaEventRecord(a, 0), "cudaEventRecord"))
            goto done;
        if (variant < 0) {
            if (!cu_ok(cudaMemcpyAsync(copy_dst, s, copy_bytes, cudaMemcpyDeviceToDevice, 0),
                       "cudaMemcpyAsync"))
                goto done;
        } else if (kd_cuda_softmax_kl(NULL, sh->n, sh->c, dtype, s, t, TEMP, 0, 1, ds, dtype, 1.0,
                                      rows, variant) != KD_OK) {
            fprintf(stderr, "bench_kd_loss: %s\n", kd_last_error());
            goto done;
        }
        float ms = 0;
        if (!cu_ok(cudaEventRecord(b, 0), "cudaEventRecord") ||
            !cu_ok(cudaEventSynchronize(b), "cudaEventSynchronize") ||
            !cu_ok(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime"))
            goto done;
        if (i >= 0)
            v[i] = ms;
    }
    r = median(v, iters);
done:
    if (a && !cu_ok(cudaEventDestroy(a), "cudaEventDestroy"))
        r = NAN;
    if (b && !cu_ok(cudaEventDestroy(b), "cudaEventDestroy"))
        r = NAN;
    return r;
}

static int run_gpu(const opts *o)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        fprintf(stderr, "bench_kd_loss: --gpu: no CUDA device answered\n");
        return 2;
    }
    printf("kd loss, dense, T = %g, forward KL, T^2 on, forward + backward; GPU kernel vs a "
           "device-to-device copy of the same bytes\n",
           TEMP);
    printf("%-14s %-6s %-6s %10s %10s %8s %9s\n", "N x C", "dtype", "var", "kernel ms", "copy ms",
           "copy/k", "GB/s");
    cJSON *root = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "bench", "kd_loss");
    cJSON_AddStringToObject(root, "device", "cuda");
    int ok = 1;
    for (int k = 0; k < NSHAPES && ok; k++) {
        const shape *sh = &shapes[k];
        size_t nc = (size_t)sh->n * sh->c;
        float *s = rand_logits(nc, 11 + k), *t = rand_logits(nc, 23 + k);
        float *ds = malloc(nc * 4), *ref = malloc(nc * 4);
        void *s_d, *t_d, *g_d, *cp_d;
        double *rows_d;
        ok = s && t && ds && ref && cu_ok(cudaMalloc(&s_d, nc * 4), "cudaMalloc") &&
             cu_ok(cudaMalloc(&t_d, nc * 4), "cudaMalloc") &&
             cu_ok(cudaMalloc(&g_d, nc * 4), "cudaMalloc") &&
             cu_ok(cudaMalloc(&cp_d, nc * 6), "cudaMalloc") &&
             cu_ok(cudaMalloc((void **)&rows_d, sizeof(double) * sh->n), "cudaMalloc") &&
             cu_ok(cudaMemcpy(s_d, s, nc * 4, cudaMemcpyHostToDevice), "upload") &&
             cu_ok(cudaMemcpy(t_d, t, nc * 4, cudaMemcpyHostToDevice), "upload");
        if (!ok)
            break;
        kd_cpu_kd_dense_f32(sh->n, sh->c, s, t, TEMP, 0, 1, ref, 1.0);
        for (int variant = KD_SKL_WARP; variant <= KD_SKL_BLOCK && ok; variant++) {
            if (variant == KD_SKL_WARP && sh->c > 1024)
                continue;
            /* check first */
            if (kd_cuda_softmax_kl(NULL, sh->n, sh->c, KD_SKL_F32, s_d, t_d, TEMP, 0, 1, g_d,
                                   KD_SKL_F32, 1.0, rows_d, variant) != KD_OK) {
                fprintf(stderr, "bench_kd_loss: %s\n", kd_last_error());
                ok = 0;
                break;
            }
            ok = cu_ok(cudaMemcpy(ds, g_d, nc * 4, cudaMemcpyDeviceToHost), "download");
            double e = 0, m = 0;
            for (size_t i = 0; ok && i < nc; i++) {
                e = fmax(e, fabs(ds[i] - ref[i]));
                m = fmax(m, fabs(ref[i]));
            }
            if (!(e <= 1e-5 * m)) {
                fprintf(stderr, "bench_kd_loss: GPU %dx%d variant %d: gradient err %.3g\n", sh->n,
                        sh->c, variant, e / m);
                ok = 0;
                break;
            }
            for (int dt = KD_SKL_F32; dt <= KD_SKL_BF16; dt++) {
                size_t esz = dt == KD_SKL_F32 ? 4 : 2, bytes = 3 * nc * esz;
                /* bf16 timing reuses the float buffers as 2-byte data: values do not matter */
                double kms = time_gpu(sh, dt, s_d, t_d, g_d, rows_d, variant, NULL, 0, o->iters);
                double cms = time_gpu(sh, dt, s_d, NULL, NULL, NULL, -1, cp_d, bytes / 2, o->iters);
                if (isnan(kms) || isnan(cms)) {
                    ok = 0;
                    break;
                }
                char name[32];
                snprintf(name, sizeof name, "%dx%d", sh->n, sh->c);
                printf("%-14s %-6s %-6s %10.4f %10.4f %8.2f %9.1f\n", name,
                       dt == KD_SKL_F32 ? "f32" : "bf16", variant == KD_SKL_WARP ? "warp" : "block",
                       kms, cms, cms / kms, bytes / kms * 1e-6);
                cJSON *j = cJSON_CreateObject();
                cJSON_AddNumberToObject(j, "n", sh->n);
                cJSON_AddNumberToObject(j, "c", sh->c);
                cJSON_AddStringToObject(j, "dtype", dt == KD_SKL_F32 ? "f32" : "bf16");
                cJSON_AddStringToObject(j, "variant", variant == KD_SKL_WARP ? "warp" : "block");
                cJSON_AddNumberToObject(j, "kernel_ms", kms);
                cJSON_AddNumberToObject(j, "copy_ms", cms);
                cJSON_AddNumberToObject(j, "copy_over_kernel", cms / kms);
                cJSON_AddNumberToObject(j, "gb_per_s", bytes / kms * 1e-6);
                cJSON_AddItemToArray(arr, j);
            }
        }
        const int freed = cu_ok(cudaFree(s_d), "cudaFree") & cu_ok(cudaFree(t_d), "cudaFree") &
                          cu_ok(cudaFree(g_d), "cudaFree") & cu_ok(cudaFree(cp_d), "cudaFree") &
                          cu_ok(cudaFree(rows_d), "cudaFree");
        ok = ok && freed;
        free(s), free(t), free(ds), free(ref);
    }
    cJSON_AddItemToObject(root, "shapes", arr);
    if (ok)
        ok = write_json(o, "kd_loss_gpu.json", root);
    cJSON_Delete(root);
    return ok ? 0 : 1;
}
#endif

int main(int argc, char **argv)
{
    opts o = {.threads = 2,
              .rounds = 3,
              .iters = 11,
              .peer = 1,
              .python = "/usr/bin/python3",
              .root = KD_SOURCE_DIR};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--threads") && v)
            o.threads = atoi(v), i++;
        else if (!strcmp(a, "--rounds") && v)
            o.rounds = atoi(v), i++;
        else if (!strcmp(a, "--iters") && v)
            o.iters = atoi(v), i++;
        else if (!strcmp(a, "--python") && v)
            o.python = v, i++;
        else if (!strcmp(a, "--root") && v)
            o.root = v, i++;
        else if (!strcmp(a, "--no-peer"))
            o.peer = 0;
        else if (!strcmp(a, "--gpu"))
            o.gpu = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--rounds N] [--iters N] [--python PATH] "
                    "[--root DIR] [--no-peer] [--gpu]\n",
                    argv[0]);
            return 1;
        }
    }
    if (o.rounds < 1 || o.rounds > MAX_ROUNDS || o.iters < 1 || o.iters > 64 || o.threads < 1) {
        fprintf(stderr, "bench_kd_loss: rounds 1..%d, iters 1..64, threads >= 1\n", MAX_ROUNDS);
        return 1;
    }
    if (o.gpu) {
#ifdef KD_HAVE_CUDA
        return run_gpu(&o);
#else
        fprintf(stderr, "bench_kd_loss: --gpu: distill was built without CUDA\n");
        return 2;
#endif
    }
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    return run_cpu(&o);
}
