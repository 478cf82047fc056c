/*
 * kd_fake_data.h - a small, deterministic stand-in for Fashion-MNIST.
 *
 * kd_fake_fmnist_write puts the four gzip'd IDX files of the real data set
 * (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and the t10k pair)
 * into a directory. Every image is 28x28; class c (0..9) is a bright ring of
 * radius 3 + c around a jittered centre plus uniform noise, so the classes are
 * learnable and survive flips and small shifts. The bytes depend only on the
 * sizes and the seed.
 */
#ifndef KD_FAKE_DATA_H
#define KD_FAKE_DATA_H

#include <stddef.h>
#include <stdint.h>

#define KD_FAKE_HW 28

/* Write the four files into dir (which must exist). 0 on success, -1 on failure. */
int kd_fake_fmnist_write(const char *dir, int n_train, int n_test, unsigned seed);

/*
 * Write one gzip'd IDX file of unsigned bytes: the header declares ndim dims,
 * then payload_len bytes of payload follow (fewer than the dims declare makes
 * a truncated file). 0 on success, -1 on failure.
 */
int kd_fake_idx_write_gz(const char *path, int ndim, const uint32_t *dims, const uint8_t *payload,
                         size_t payload_len);

#endif
