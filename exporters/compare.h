/*
 * compare.h - `distill report`: the side-by-side table of a teacher and its students, float and
 * quantized, with what each costs on a Cortex-M4.
 *
 * A report spec is a YAML file (configs/fashion-mnist/report.yaml):
 *
 *     out_dir: runs/report            # exports and the report files go here
 *     rows:
 *       - {label: teacher fp32, config: configs/fashion-mnist/teacher.yaml,
 *          checkpoint: runs/fmnist-teacher/best.safetensors}
 *       - {label: distilled INT4 (QAT), config: configs/fashion-mnist/tiny_distill_qat4.yaml,
 *          checkpoint: runs/fmnist-tiny-distill-qat4-s1/best.safetensors, quant: int4}
 *
 * A row without `quant` is the float model: its test accuracy (`distill eval`), and as flash
 * the float32 weights it would need (4 bytes a parameter; no runtime runs it). A row with
 * `quant: int8 | int4` is exported (`distill export`, into out_dir/<row number>-<quant>/, C
 * source and 16 samples) and its accuracy is the integer model's, run by the runtime on the
 * host. With the Cortex-M tools installed (arm-none-eabi-gcc, qemu-system-arm), each export is
 * then built into firmware and run on QEMU's Cortex-M4 (bench/mcu/run.sh): its outputs must
 * equal the host's byte for byte, and the row gets the firmware's flash (runtime code + model
 * + startup), RAM (arena + measured stack) and the exact instruction count of one inference.
 * Without the tools those columns say "-" and flash / RAM fall back to the blob and arena.
 *
 * Output: the table on `out`, out_dir/report.md (the same table) and out_dir/report.json. The
 * rows are written under out_dir/.new and moved into place with the two files only once every
 * row has run: a report that fails or is stopped part way leaves the earlier one as it was.
 */
#ifndef KD_COMPARE_H
#define KD_COMPARE_H

#include <stdio.h>

#include "status.h"

typedef struct {
    const char *out_dir;          /* overrides the spec's out_dir (NULL: keep) */
    int mcu;                      /* 1 run the Cortex-M4 firmware, 0 skip, -1 when tools exist */
    const char *const *overrides; /* --set KEY=VALUE for every row's job (NULL-terminated) */
    const char *source_dir;       /* the source tree holding bench/mcu (NULL: ".") */
    int progress;                 /* progress lines on stderr */
} kd_report_opts;

kd_status kd_report_run(const char *spec_path, const kd_report_opts *o, FILE *out);

#endif
