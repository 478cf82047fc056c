/*
 * footprint.c - the smallest useful application of an exported model, for the flash and RAM
 * figures of bench/mcu/run.sh: load the blob, quantized input in a RAM buffer, one kdm_invoke,
 * the predicted class. Its `arm-none-eabi-size` text + data is the total flash (startup,
 * semihosting output, the runtime's linked code for the model's ops, the blob), and the
 * painted stack (fw.h) gives the stack high-water mark of a real inference.
 *
 * Output: footprint pred=<class> stack_used=<bytes> stack_size=<bytes> arena=<bytes>
 *         in=<bytes> out=<bytes>
 * Exit status 0, or 2 when the model does not load or run.
 */
#include <stdint.h>

#include "fw.h"
#include "kdm.h"
#include "model.h"

static uint8_t arena[KDM_MODEL_ARENA_SIZE] __attribute__((aligned(8)));
static int8_t input[FW_IN_SIZE], output[FW_OUT_SIZE];

int main(void)
{
    kdm_model m;
    kdm_status st = kdm_load(&m, kdm_model_blob, kdm_model_blob_len);
    for (uint32_t i = 0; i < sizeof input; i++) /* stands in for a sensor frame */
        input[i] = (int8_t)(i * 7u);
    if (st == KDM_OK)
        st = kdm_invoke(&m, arena, sizeof arena, input, output);
    if (st != KDM_OK) {
        fw_puts("error ");
        fw_puts(kdm_status_str(st));
        fw_putc('\n');
        return 2;
    }
    fw_puts("footprint");
    fw_put_kv("pred", kdm_argmax_s8(output, sizeof output));
    fw_put_kv("stack_used", fw_stack_used());
    fw_put_kv("stack_size", fw_stack_size());
    fw_put_kv("arena", (uint32_t)sizeof arena);
    fw_put_kv("in", (uint32_t)sizeof input);
    fw_put_kv("out", (uint32_t)sizeof output);
    fw_putc('\n');
    return 0;
}
