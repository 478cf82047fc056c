/*
 * kernel_check.h - the cases the kernel_check firmware runs: small .kdm models of randomized
 * shapes, each with one input and the host runtime's output for it, generated as C data by
 * tests/mcu/kdm_random_model (`kcheck`). kc_arena is sized for the largest case.
 */
#ifndef KERNEL_CHECK_H
#define KERNEL_CHECK_H

#include <stdint.h>

typedef struct {
    const uint8_t *blob; /* 4-byte aligned */
    uint32_t blob_len;
    const int8_t *input;  /* in_size bytes */
    const int8_t *expect; /* out_size bytes: the host runtime's output */
    uint32_t in_size, out_size;
    const char *desc; /* op, weight bits and shapes, for the log */
} kc_case;

extern const kc_case kc_cases[];
extern const uint32_t kc_n_cases;
extern uint8_t kc_arena[];
extern const uint32_t kc_arena_size;

#endif
