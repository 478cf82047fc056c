/*
 * test_sha256.c - SHA-256 against the FIPS 180-4 / NIST example vectors,
 * streamed in awkward piece sizes to exercise the block buffering, plus the
 * file helper.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sha256.h"

static void check_streamed(const char *msg, size_t len, const char *want)
{
    char hex[KD_SHA256_HEX_LEN + 1];
    kd_sha256_hex(msg, len, hex);
    assert_string_equal(hex, want);
    /* Every piece size from 1 to 130 bytes gives the same digest. */
    for (size_t piece = 1; piece <= 130; piece++) {
        kd_sha256 s;
        uint8_t d[KD_SHA256_BYTES];
        kd_sha256_init(&s);
        for (size_t off = 0; off < len; off += piece)
            kd_sha256_update(&s, msg + off, len - off < piece ? len - off : piece);
        kd_sha256_final(&s, d);
        kd_sha256_to_hex(d, hex);
        assert_string_equal(hex, want);
    }
}

static void test_abc(void **state)
{
    check_streamed("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

static void test_empty(void **state)
{
    check_streamed("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

static void test_448_bits(void **state)
{
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_int_equal(strlen(m), 56);
    check_streamed(m, 56, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_896_bits(void **state)
{
    const char *m = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
                    "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
    check_streamed(m, strlen(m),
                   "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

static void test_million_a(void **state)
{
    kd_sha256 s;
    uint8_t d[KD_SHA256_BYTES];
    char hex[KD_SHA256_HEX_LEN + 1];
    char chunk[1000];
    memset(chunk, 'a', sizeof chunk);
    kd_sha256_init(&s);
    for (int i = 0; i < 1000; i++)
        kd_sha256_update(&s, chunk, sizeof chunk);
    kd_sha256_final(&s, d);
    kd_sha256_to_hex(d, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static void test_file(void **state)
{
    char path[] = "/tmp/kd_sha256_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "abc", 3), 3);
    close(fd);
    char hex[KD_SHA256_HEX_LEN + 1];
    assert_int_equal(kd_sha256_file_hex(path, hex), KD_OK);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    unlink(path);
    assert_int_equal(kd_sha256_file_hex(path, hex), KD_ERR_NOT_FOUND);
    assert_non_null(strstr(kd_last_error(), path));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_abc),       cmocka_unit_test(test_empty),
        cmocka_unit_test(test_448_bits),  cmocka_unit_test(test_896_bits),
        cmocka_unit_test(test_million_a), cmocka_unit_test(test_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
