/*
 * fw.h - the little board layer every Cortex-M firmware in bench/mcu links (fw_board.c): output
 * through semihosting, exit with a status, an instruction counter, and a painted stack.
 *
 * Boards: QEMU's mps2-an386 (Cortex-M4) and mps2-an500 (Cortex-M7), code in ZBT SSRAM1 at 0x0,
 * data and stack in ZBT SSRAM2/3 at 0x20000000 (mps2_an386.ld, mps2_an500.ld); and for the
 * Cortex-M0+ QEMU's microbit (nRF51, Cortex-M0: the same ARMv6-M instructions), 256 KB flash
 * at 0x0 and 16 KB SRAM at 0x20000000 (microbit.ld; the build defines FW_BOARD_MICROBIT).
 *
 * Output. fw_put* append to a line buffer that goes out with SYS_WRITE0 at each '\n' (one
 * semihosting trap per line, not per character). Nothing here uses newlib's stdio.
 *
 * Instruction counting. QEMU run with `-icount shift=0` advances its virtual clock by exactly
 * 2^0 = 1 ns per executed instruction, whatever the host does. On the MPS2 boards the FPGA I/O
 * block's COUNTER register (0x40028018, PRESCALE left at 0) counts the board's 25 MHz clock on
 * that virtual clock: one tick = 40 ns = 40 instructions. On the microbit the SysTick timer
 * counts the 16 MHz processor clock down through 24 bits (fw_reset starts it with the largest
 * reload and no interrupt): one tick = 62.5 instructions, and a span must stay under 2^24
 * ticks (about 10^9 instructions). instructions = fw_ticks_to_instr(fw_tick_span(t0, t1)); the
 * resolution is one tick; fw_calibrate() times a loop of a known instruction count so a run
 * can check the conversion. Without -icount the ticks follow host time and mean nothing as
 * instructions.
 *
 * Stack. The reset handler fills the stack below its own frame with FW_STACK_PAINT;
 * fw_stack_used() is the distance from the top of the stack to the lowest word no longer
 * holding the paint (a high-water mark of everything run so far).
 */
#ifndef FW_H
#define FW_H

#include <stdint.h>

#if defined(FW_BOARD_MICROBIT)
#define FW_TICK_HZ       16000000u /* SysTick on the processor clock */
#define FW_TICK_MASK     0x00FFFFFFu
#define FW_INSTR_PER_2TK 125u /* instructions per two ticks: 2e9 ns/s / 16 MHz */
#else
#define FW_TICK_HZ       25000000u /* the FPGA I/O counter */
#define FW_TICK_MASK     0xFFFFFFFFu
#define FW_INSTR_PER_2TK 80u /* 2e9 ns/s / 25 MHz */
#endif
#define FW_STACK_PAINT 0xA5C3A5C3u

/* The firmware's entry, called by the reset handler once .data and .bss are set up; its return
 * value is the exit status QEMU reports. */
int main(void);

void fw_putc(char c);
void fw_puts(const char *s);
void fw_put_u32(uint32_t v);
void fw_put_u64(uint64_t v);
void fw_put_i32(int32_t v);
/* v as two lower-case hex digits */
void fw_put_hex8(uint8_t v);
/* a key=value pair preceded by a space: " key=v" */
void fw_put_kv(const char *key, uint32_t v);
void fw_flush(void);

/* Flush and end the run: QEMU exits with `status` (SYS_EXIT_EXTENDED). */
void fw_exit(int status) __attribute__((noreturn));

/* The board's counter (FPGA I/O counter or SysTick, counting up); it wraps at FW_TICK_MASK. */
uint32_t fw_ticks(void);
/* Ticks from reading t0 to reading t1 (less than one wrap apart). */
static inline uint32_t fw_tick_span(uint32_t t0, uint32_t t1) { return (t1 - t0) & FW_TICK_MASK; }
static inline uint64_t fw_ticks_to_instr(uint32_t ticks)
{
    return (uint64_t)ticks * FW_INSTR_PER_2TK / 2u;
}
/* The ticks that cover at least `instr` (< 2^31) instructions. */
#define FW_TICKS_FOR(instr) (((instr)*2u + FW_INSTR_PER_2TK - 1u) / FW_INSTR_PER_2TK)

/* Time a loop of FW_CALIB_INSTR instructions; returns the instructions the counter saw. */
#define FW_CALIB_INSTR 2000000u
uint64_t fw_calibrate(void);
/* fw_calibrate as the line "calib instr=<measured> expect=<FW_CALIB_INSTR>" (run.sh checks it). */
void fw_put_calib(void);

/* Bytes of stack ever used (painted words overwritten) and bytes reserved. */
uint32_t fw_stack_used(void);
uint32_t fw_stack_size(void);

#endif
