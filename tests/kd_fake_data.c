/*
 * kd_fake_data.c - writes the fake Fashion-MNIST-like data set (see kd_fake_data.h).
 */
#include "kd_fake_data.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <zlib.h>

/* splitmix64: tiny, seedable, identical on every platform. */
static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static unsigned below(uint64_t *s, unsigned n) { return (unsigned)(next_u64(s) % n); }

int kd_fake_idx_write_gz(const char *path, int ndim, const uint32_t *dims, const uint8_t *payload,
                         size_t payload_len)
{
    uint8_t head[4 + 4 * 4];
    if (ndim < 1 || ndim > 4)
        return -1;
    size_t k = 0;
    head[k++] = 0;
    head[k++] = 0;
    head[k++] = 0x08;
    head[k++] = (uint8_t)ndim;
    for (int i = 0; i < ndim; i++) {
        head[k++] = (uint8_t)(dims[i] >> 24);
        head[k++] = (uint8_t)(dims[i] >> 16);
        head[k++] = (uint8_t)(dims[i] >> 8);
        head[k++] = (uint8_t)dims[i];
    }
    gzFile g = gzopen(path, "wb6");
    if (!g)
        return -1;
    int ok = gzwrite(g, head, (unsigned)k) == (int)k;
    if (ok && payload_len)
        ok = gzwrite(g, payload, (unsigned)payload_len) == (int)payload_len;
    if (gzclose(g) != Z_OK)
        ok = 0;
    return ok ? 0 : -1;
}

/* One sample of class c: a ring of radius 3 + c, thickness ~1.6, centre jittered by +-1. */
static void draw(uint8_t *img, int c, uint64_t *rng)
{
    double cy = 13.5 + (int)below(rng, 3) - 1, cx = 13.5 + (int)below(rng, 3) - 1;
    double r = 3.0 + c;
    for (int y = 0; y < KD_FAKE_HW; y++) {
        for (int x = 0; x < KD_FAKE_HW; x++) {
            double d = sqrt((y - cy) * (y - cy) + (x - cx) * (x - cx));
            double v = fabs(d - r) < 0.8 ? 190.0 : 0.0;
            v += below(rng, 60);
            img[y * KD_FAKE_HW + x] = (uint8_t)(v > 255 ? 255 : v);
        }
    }
}

static int write_split(const char *dir, const char *split, int n, uint64_t *rng)
{
    const size_t per = KD_FAKE_HW * KD_FAKE_HW;
    uint8_t *img = malloc((size_t)n * per + 1);
    uint8_t *lbl = malloc((size_t)n + 1);
    int rc = -1;
    if (!img || !lbl)
        goto done;
    for (int i = 0; i < n; i++) {
        lbl[i] = (uint8_t)below(rng, 10);
        draw(img + (size_t)i * per, lbl[i], rng);
    }
    char path[4096];
    uint32_t idims[3] = {(uint32_t)n, KD_FAKE_HW, KD_FAKE_HW};
    uint32_t ldims[1] = {(uint32_t)n};
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte.gz", dir, split);
    if (kd_fake_idx_write_gz(path, 3, idims, img, (size_t)n * per))
        goto done;
    snprintf(path, sizeof path, "%s/%s-labels-idx1-ubyte.gz", dir, split);
    if (kd_fake_idx_write_gz(path, 1, ldims, lbl, (size_t)n))
        goto done;
    rc = 0;
done:
    free(img);
    free(lbl);
    return rc;
}

int kd_fake_fmnist_write(const char *dir, int n_train, int n_test, unsigned seed)
{
    if (!dir || n_train < 1 || n_test < 1)
        return -1;
    uint64_t rng = 0x6b64u ^ ((uint64_t)seed << 17);
    if (write_split(dir, "train", n_train, &rng))
        return -1;
    return write_split(dir, "t10k", n_test, &rng);
}
