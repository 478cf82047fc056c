/*
 * fw_board.c - startup, semihosting output, exit, instruction counter and stack painting for
 * the bench/mcu firmware (interface and the tick-to-instruction rule: fw.h).
 *
 * Startup. The vector table (section .vectors, placed at address 0 by fw_common.ld, where
 * QEMU's M-profile reset reads the initial SP and PC) holds the top of the stack and
 * fw_reset. fw_reset enables the FPU when the build uses hardware floating point (the runtime
 * itself is integer-only, but libgcc and the firmware may not be), starts SysTick on the
 * microbit (the board's instruction counter, fw.h), copies .data from its load address in
 * flash, zeroes .bss, paints the stack, runs main and exits with its status.
 *
 * Semihosting. ARM's semihosting calls are `bkpt 0xab` on M-profile with the operation in r0
 * and its argument in r1; QEMU serves them with -semihosting-config enable=on,target=native.
 * Used: SYS_WRITE0 (0x04, write a NUL-terminated string to QEMU's stdout) and SYS_EXIT_EXTENDED
 * (0x20, a two-word block {ADP_Stopped_ApplicationExit, status}: QEMU exits with `status`).
 *
 * Faults. Every exception but reset lands in fw_fault, which prints the exception number,
 * the stacked PC and the configurable fault status registers, then exits with status 99.
 */
#include <stdint.h>

#include "fw.h"

#define SYS_WRITE0                   0x04u
#define SYS_EXIT_EXTENDED            0x20u
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u

#define FPGAIO_COUNTER (*(volatile uint32_t *)0x40028018u)
#define SYST_CSR       (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR       (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR       (*(volatile uint32_t *)0xE000E018u)
#define SCB_CPACR      (*(volatile uint32_t *)0xE000ED88u)
#define SCB_CFSR       (*(volatile uint32_t *)0xE000ED28u)
#define SCB_HFSR       (*(volatile uint32_t *)0xE000ED2Cu)
#define SCB_ICSR       (*(volatile uint32_t *)0xE000ED04u)

/* linker-script symbols (fw_common.ld) */
extern uint32_t __stack_limit[], __stack_top[];
extern uint32_t __data_start[], __data_end[], __data_load[];
extern uint32_t __bss_start[], __bss_end[];

void fw_reset(void) __attribute__((noreturn));
void fw_fault_entry(void);

typedef void (*fw_vector)(void);

/* 16 system vectors; no device interrupt is enabled, so none of the IRQ slots is needed. */
__attribute__((section(".vectors"), used)) static const fw_vector fw_vectors[16] = {
    (fw_vector)(uintptr_t)__stack_top,
    fw_reset,
    fw_fault_entry, /* NMI */
    fw_fault_entry, /* HardFault */
    fw_fault_entry, /* MemManage */
    fw_fault_entry, /* BusFault */
    fw_fault_entry, /* UsageFault */
    0,
    0,
    0,
    0,
    fw_fault_entry, /* SVCall */
    fw_fault_entry, /* DebugMonitor */
    0,
    fw_fault_entry, /* PendSV */
    fw_fault_entry, /* SysTick */
};

static uint32_t semihost(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

/* ---- output ---------------------------------------------------------------------------- */

static char line_buf[256];
static uint32_t line_len;

void fw_flush(void)
{
    if (line_len == 0)
        return;
    line_buf[line_len] = '\0';
    semihost(SYS_WRITE0, line_buf);
    line_len = 0;
}

void fw_putc(char c)
{
    line_buf[line_len++] = c;
    if (c == '\n' || line_len == sizeof line_buf - 1)
        fw_flush();
}

void fw_puts(const char *s)
{
    while (*s)
        fw_putc(*s++);
}

void fw_put_u64(uint64_t v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + (int)(v % 10u));
        v /= 10u;
    } while (v != 0);
    while (n > 0)
        fw_putc(digits[--n]);
}

void fw_put_u32(uint32_t v)
{
    char digits[10];
    int n = 0;
    do {
        digits[n++] = (char)('0' + (int)(v % 10u));
        v /= 10u;
    } while (v != 0);
    while (n > 0)
        fw_putc(digits[--n]);
}

void fw_put_i32(int32_t v)
{
    if (v < 0) {
        fw_putc('-');
        fw_put_u32(0u - (uint32_t)v);
    } else {
        fw_put_u32((uint32_t)v);
    }
}

void fw_put_hex8(uint8_t v)
{
    static const char hex[] = "0123456789abcdef";
    fw_putc(hex[v >> 4]);
    fw_putc(hex[v & 15u]);
}

void fw_put_kv(const char *key, uint32_t v)
{
    fw_putc(' ');
    fw_puts(key);
    fw_putc('=');
    fw_put_u32(v);
}

void fw_exit(int status)
{
    uint32_t block[2];
    fw_flush();
    block[0] = ADP_STOPPED_APPLICATION_EXIT;
    block[1] = (uint32_t)status;
    for (;;)
        semihost(SYS_EXIT_EXTENDED, block);
}

/* ---- timing and stack ------------------------------------------------------------------ */

#if defined(FW_BOARD_MICROBIT)
/* SysTick counts down from FW_TICK_MASK: its complement counts up */
uint32_t fw_ticks(void) { return FW_TICK_MASK - SYST_CVR; }
#else
uint32_t fw_ticks(void) { return FPGAIO_COUNTER; }
#endif

uint64_t fw_calibrate(void)
{
    /* two instructions per iteration (subs, bne) */
    uint32_t n = FW_CALIB_INSTR / 2u;
    uint32_t t0 = fw_ticks();
#if __ARM_ARCH_ISA_THUMB == 1 /* ARMv6-M: GCC reads its inline assembly in divided syntax */
    __asm__ volatile("1: sub %0, #1\n\tbne 1b" : "+l"(n) : : "cc");
#else
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+l"(n) : : "cc");
#endif
    uint32_t t1 = fw_ticks();
    return fw_ticks_to_instr(fw_tick_span(t0, t1));
}

void fw_put_calib(void)
{
    fw_puts("calib");
    fw_put_kv("instr", (uint32_t)fw_calibrate());
    fw_put_kv("expect", FW_CALIB_INSTR);
    fw_putc('\n');
}

uint32_t fw_stack_size(void) { return (uint32_t)((__stack_top - __stack_limit) * 4); }

uint32_t fw_stack_used(void)
{
    const uint32_t *p = __stack_limit;
    while (p < __stack_top && *p == FW_STACK_PAINT)
        p++;
    return (uint32_t)((__stack_top - p) * 4);
}

/* ---- reset and faults ------------------------------------------------------------------ */

void fw_reset(void)
{
#if defined(__ARM_FP)
    SCB_CPACR |= 0xFu << 20; /* CP10 and CP11: full access */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
#endif
#if defined(FW_BOARD_MICROBIT)
    SYST_RVR = FW_TICK_MASK;
    SYST_CVR = 0; /* any write clears it: the count restarts from the reload value */
    SYST_CSR = 5; /* ENABLE, CLKSOURCE = processor clock, no interrupt */
#endif
    for (uint32_t *src = __data_load, *dst = __data_start; dst < __data_end;)
        *dst++ = *src++;
    for (uint32_t *dst = __bss_start; dst < __bss_end;)
        *dst++ = 0;
    /* paint below this frame, leaving a margin for the words the loop itself may push */
    uint32_t *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (uint32_t *p = __stack_limit; p < sp - 16;)
        *p++ = FW_STACK_PAINT;
    fw_exit(main());
}

void fw_fault(const uint32_t *frame)
{
    fw_puts("\nFAULT exception=");
    fw_put_u32(SCB_ICSR & 0x1FFu);
    fw_puts(" pc=0x");
    for (int i = 3; i >= 0; i--)
        fw_put_hex8((uint8_t)(frame[6] >> (8 * i)));
#if __ARM_ARCH_7M__ || __ARM_ARCH_7EM__ /* ARMv6-M has no fault status registers */
    fw_put_kv("cfsr", SCB_CFSR);
    fw_put_kv("hfsr", SCB_HFSR);
#endif
    fw_putc('\n');
    fw_exit(99);
}

/* Hand fw_fault the exception frame (r0-r3, r12, lr, pc, xpsr) pushed on the main stack. */
__attribute__((naked)) void fw_fault_entry(void)
{
    __asm__ volatile("mrs r0, msp\n\t"
                     "ldr r1, =fw_fault\n\t"
                     "bx r1\n\t"
                     ".ltorg");
}
