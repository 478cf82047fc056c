/*
 * sha256.h - SHA-256 (FIPS 180-4), streaming.
 *
 * Used to identify what a teacher cache was computed from: the teacher's
 * weights file and the data set. kd_sha256_init, any number of
 * kd_sha256_update calls, then kd_sha256_final; the context holds no heap
 * memory and may be copied. Hex digests are 64 lowercase characters + NUL.
 */
#ifndef KD_SHA256_H
#define KD_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define KD_SHA256_BYTES   32
#define KD_SHA256_HEX_LEN 64 /* characters, without the NUL */

typedef struct {
    uint32_t h[8];   /* chaining state */
    uint64_t nbytes; /* message length so far */
    uint8_t buf[64]; /* partial block */
    size_t nbuf;     /* bytes in buf, < 64 */
} kd_sha256;

void kd_sha256_init(kd_sha256 *s);
void kd_sha256_update(kd_sha256 *s, const void *data, size_t len);
/* Write the digest; s must be re-initialised before further use. */
void kd_sha256_final(kd_sha256 *s, uint8_t digest[KD_SHA256_BYTES]);

/* Lowercase hex of a digest into hex[65] (NUL-terminated). */
void kd_sha256_to_hex(const uint8_t digest[KD_SHA256_BYTES], char hex[KD_SHA256_HEX_LEN + 1]);

/* One-shot: hex digest of len bytes at data. */
void kd_sha256_hex(const void *data, size_t len, char hex[KD_SHA256_HEX_LEN + 1]);

/*
 * Hex digest of the contents of the file at path. KD_ERR_NOT_FOUND when it
 * does not exist, KD_ERR_IO on a read error; both name the path.
 */
kd_status kd_sha256_file_hex(const char *path, char hex[KD_SHA256_HEX_LEN + 1]);

#endif
