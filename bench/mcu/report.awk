# report.awk - the Cortex-M benchmark's table and JSON, from the facts run.sh collected
# (build/mcu/results.txt). Prints the per-layer table (DSP kernels beside the plain-C reference
# on the Cortex-M4), the flash and RAM figures and the targets; writes JSON to the file named by
# -v json=PATH. Targets are reported (table, JSON), not enforced: the exit status is 1 only when
# some build's outputs did not match the host's.
#
# Input lines (space-separated; layer lines carry key=value fields from bench_layers.c):
#   runtime_sha H | export_dir D | model TEXT (model.h's first comment) | qemu V | gcc V |
#   calib INSTR
#   invoke VARIANT INSTR_MEAN HOST_MATCH SAMPLES
#   stack USED RESERVED ARENA
#   size VARIANT TEXT DATA BSS RUNTIME_BYTES BLOB_BYTES LIBC_LIBGCC_BYTES STACK_RESERVED STACK_USED
#   dsp|ref|m7|m0 op=I type=T wbits=B in=CxHxW out=CxHxW k=KxK s=S macs=M instr=N reps=R
#       ipm_milli=X   (m0: the Cortex-M0+ build on QEMU's microbit: matmul_fast.c's blocked
#       kernels for 1x1 convolutions and fully-connected layers, the reference ones otherwise)
#
# Targets (instructions per MAC, DSP kernels, layers with >= 16 input channels): INT8
# fully-connected <= 1.9 (a 1x1 convolution is the same matrix product and is held to it too),
# INT8 3x3 convolution or depthwise <= 2.3, INT4 any <= 3.0. Sizes on the Cortex-M4 at -Os:
# runtime code <= 8 KB, total flash <= 40 KB (INT8) / 24 KB (INT4), arena + stack <= 16 KB.

function kv(line, key, n, f, i) {
    n = split(line, f, " ")
    for (i = 1; i <= n; i++)
        if (index(f[i], key "=") == 1)
            return substr(f[i], length(key) + 2)
    return ""
}
function q(s) { return "\"" s "\"" }
function ratio(a, b) { return b > 0 ? sprintf("%.3f", a / b) : "null" }
function verdict(ok) { return ok ? "PASS" : "FAIL" }

$1 == "runtime_sha" { sha = $2 }
$1 == "export_dir" { export_dir = $2 }
$1 == "model" { model = substr($0, 7); gsub(/^ +| +$/, "", model) }
$1 == "qemu" { qemu = $2 }
$1 == "gcc" { gcc = $2 }
$1 == "calib" { calib = $2 }
$1 == "weights" { export_weights = $2 }
$1 == "invoke" { inv[$2] = $3; match_[$2] = $4; samples[$2] = $5 }
$1 == "stack" { stack_used = $2; stack_size = $3; arena = $4 }
$1 == "size" {
    v = $2; variants[++nv] = v
    text[v] = $3; data[v] = $4; bss[v] = $5; rt[v] = $6; blob[v] = $7; libc[v] = $8; stk[v] = $9
    stk_used[v] = $10
}
$1 == "dsp" || $1 == "ref" || $1 == "m7" || $1 == "m0" {
    i = kv($0, "op") + 0
    if (i + 1 > nops) nops = i + 1
    L[$1, i] = $0
}

END {
    fail = 0
    # model quantization: the export's (its report.json's "weights", an INT4 export with some
    # layers kept at 8 bits included), else INT4 when every weighted layer is 4-bit
    weighted = 0; four = 0
    for (i = 0; i < nops; i++) {
        b = kv(L["dsp", i], "wbits") + 0
        if (b > 0) { weighted++; if (b == 4) four++ }
    }
    quant = weighted > 0 && four == weighted ? "int4" : "int8"
    if (export_weights == "int4" || export_weights == "int8") quant = export_weights
    flash_target = quant == "int4" ? 24576 : 40960

    printf "\nCortex-M4 per layer (QEMU mps2-an386, -icount shift=0: 1 ns/instruction, 40 " \
        "instructions per 25 MHz tick; calibration loop 2000000 -> %s)\n", calib
    printf "%3s %-8s %2s %-20s %-5s %1s %8s | %10s %6s | %10s %6s | %7s | %6s | %s\n", "op",
        "type", "wb", "in -> out", "k", "s", "MACs", "DSP instr", "i/MAC", "ref instr", "i/MAC",
        "ref/dsp", "M0+", "target (DSP i/MAC)"
    layers_json = ""
    for (i = 0; i < nops; i++) {
        d = L["dsp", i]; r = L["ref", i]; m7 = L["m7", i]; m0 = L["m0", i]
        m0i = kv(m0, "instr") + 0
        type = kv(d, "type"); wb = kv(d, "wbits") + 0; k = kv(d, "k")
        macs = kv(d, "macs") + 0; di = kv(d, "instr") + 0; ri = kv(r, "instr") + 0
        split(kv(d, "in"), ishape, "x"); in_c = ishape[1] * (type == "fc" ? ishape[2] * ishape[3] : 1)
        target = 0; tname = ""
        if (in_c >= 16 && macs > 0) {
            if (wb == 4) { target = 3.0; tname = "int4" }
            else if (wb == 8 && (type == "fc" || (type == "conv2d" && k == "1x1"))) {
                target = 1.9; tname = type == "fc" ? "int8 fc" : "int8 1x1 (as fc)"
            } else if (wb == 8 && k == "3x3") { target = 2.3; tname = "int8 3x3" }
        }
        tcell = "-"
        if (target > 0) {
            pass = di / macs <= target
            if (!pass) missed = 1
            tcell = sprintf("<= %.1f %s: %s", target, tname, verdict(pass))
        }
        printf "%3d %-8s %2s %-20s %-5s %1s %8d | %10d %6s | %10d %6s | %7s | %6s | %s\n", i,
            type, wb ? wb : "-", kv(d, "in") "->" kv(d, "out"), k == "0x0" ? "-" : k,
            kv(d, "s") + 0 ? kv(d, "s") : "-", macs, di,
            macs ? ratio(di, macs) : "-", ri, macs ? ratio(ri, macs) : "-", ratio(ri, di),
            macs && m0i ? sprintf("%.1f", m0i / macs) : "-", tcell
        sum_d += di; sum_r += ri; sum_m0 += m0i
        layers_json = layers_json (i ? ",\n" : "") sprintf("    {\"op\": %d, \"type\": %s, " \
            "\"wbits\": %d, \"in\": %s, \"out\": %s, \"kernel\": %s, \"stride\": %s, " \
            "\"macs\": %d, \"dsp_instr\": %d, \"dsp_instr_per_mac\": %s, \"ref_instr\": %d, " \
            "\"ref_instr_per_mac\": %s, \"m7_instr\": %d, \"m0plus_instr\": %s, " \
            "\"target_instr_per_mac\": %s}", i,
            q(type), wb, q(kv(d, "in")), q(kv(d, "out")), q(k), kv(d, "s") + 0, macs, di,
            ratio(di, macs), ri, ratio(ri, macs), kv(m7, "instr") + 0, m0i ? m0i : "null",
            target > 0 ? sprintf("%.1f", target) : "null")
    }
    printf "%3s %-8s %2s %-20s %-5s %1s %8s | %10d %6s | %10d %6s | %7s |\n", "", "sum", "", "",
        "", "", "", sum_d, "", sum_r, "", ratio(sum_r, sum_d)
    # (the M0+ column is per MAC; its sum is printed below). No "invoke m0plus" line: the model
    # did not fit the microbit (run.sh), and the M0+ figures are absent (null in the JSON).
    has_m0 = ("m0plus" in inv)
    if (has_m0)
        printf "(M0+: instructions per MAC of the Cortex-M0+ build, its no-DSP kernels, on QEMU's " \
            "microbit: SysTick at 16 MHz, 62.5 instructions per tick; %d in all)\n", sum_m0
    else
        printf "(M0+: none, the model does not fit QEMU's microbit)\n"
    printf "\nwhole kdm_invoke, instructions per inference: M4 DSP %s, M4 reference %s " \
        "(x%s), M7 (mps2-an500) %s, M0+ (microbit) %s\n", inv["m4-dsp"], inv["m4-ref"],
        ratio(inv["m4-ref"], inv["m4-dsp"]), inv["m7"], has_m0 ? inv["m0plus"] : "-"
    split("m4-dsp m4-ref m7 m0plus", order, " ")
    for (j = 1; j <= 3 + has_m0; j++) {
        v = order[j]
        printf "host vs QEMU outputs (%s): %s/%s samples byte-identical\n", v, match_[v], samples[v]
        if (match_[v] != samples[v] || samples[v] == 0) fail = 1
    }

    printf "\nSizes: footprint firmware (startup, semihosting output, the runtime built with " \
        "KDM_OP_MASK = the model's ops, the blob), -Os, --gc-sections\n"
    printf "%-8s %12s %12s %10s %12s %10s %11s\n", "build", "runtime code", "libgcc+libc",
        "model blob", "total flash", "static RAM", "stack used"
    sizes_json = ""
    for (j = 1; j <= nv; j++) {
        v = variants[j]
        flash = text[v] + data[v]
        printf "%-8s %12d %12d %10d %12d %10d %11d\n", v, rt[v], libc[v], blob[v], flash,
            data[v] + bss[v] - stk[v], stk_used[v]
        sizes_json = sizes_json (j > 1 ? ",\n" : "") sprintf("    %s: {\"runtime_code\": %d, " \
            "\"libgcc_libc\": %d, \"model_blob\": %d, \"total_flash\": %d, \"text\": %d, " \
            "\"data\": %d, \"bss\": %d, \"static_ram\": %d, \"stack_used\": %d}", q(v), rt[v],
            libc[v], blob[v], flash, text[v], data[v], bss[v], data[v] + bss[v] - stk[v],
            stk_used[v])
    }
    ram = arena + stack_used
    printf "RAM: arena %d + stack high-water %d = %d bytes (stack reserved %d; the static RAM " \
        "above adds the input/output buffers and the 256-byte print buffer)\n", arena,
        stack_used, ram, stack_size

    t_rt = rt["m4-dsp"] <= 8192
    t_flash = text["m4-dsp"] + data["m4-dsp"] <= flash_target
    t_ram = ram <= 16384
    missed = missed || !t_rt || !t_flash || !t_ram
    printf "\nTargets (Cortex-M4, DSP kernels, -Os):\n"
    printf "  runtime code %6d <= 8192          %s\n", rt["m4-dsp"], verdict(t_rt)
    printf "  total flash  %6d <= %d (%s) %s\n", text["m4-dsp"] + data["m4-dsp"], flash_target,
        quant, verdict(t_flash)
    printf "  arena+stack  %6d <= 16384         %s\n", ram, verdict(t_ram)

    out = sprintf("{\n  \"benchmark\": \"mcu\",\n  \"runtime_sources_sha256_16\": %s,\n" \
        "  \"export_dir\": %s,\n  \"model\": %s,\n  \"quant\": %s,\n  \"qemu\": %s,\n  \"arm_none_eabi_gcc\": %s,\n" \
        "  \"instr_per_tick\": 40,\n  \"m0plus_instr_per_tick\": 62.5,\n  \"calibration_loop\": {\"expected\": 2000000, " \
        "\"measured\": %d},\n" \
        "  \"instr_per_inference\": {\"m4_dsp\": %d, \"m4_ref\": %d, \"m7\": %d, \"m0plus\": %s},\n" \
        "  \"host_match\": {\"m4_dsp\": \"%s/%s\", \"m4_ref\": \"%s/%s\", \"m7\": \"%s/%s\", " \
        "\"m0plus\": %s},\n" \
        "  \"layers\": [\n%s\n  ],\n  \"sizes\": {\n%s\n  },\n" \
        "  \"ram\": {\"arena\": %d, \"stack_used\": %d, \"stack_reserved\": %d, " \
        "\"arena_plus_stack\": %d},\n" \
        "  \"targets\": {\"runtime_code_le_8192\": %s, \"total_flash_le_%d\": %s, " \
        "\"arena_plus_stack_le_16384\": %s, \"all_met\": %s}\n}\n", q(sha), q(export_dir), q(model), q(quant), q(qemu),
        q(gcc), calib, inv["m4-dsp"], inv["m4-ref"], inv["m7"], has_m0 ? inv["m0plus"] + 0 : "null",
        match_["m4-dsp"], samples["m4-dsp"], match_["m4-ref"], samples["m4-ref"], match_["m7"],
        samples["m7"], has_m0 ? q(match_["m0plus"] "/" samples["m0plus"]) : "null",
        layers_json, sizes_json, arena, stack_used, stack_size, ram,
        t_rt ? "true" : "false", flash_target, t_flash ? "true" : "false",
        t_ram ? "true" : "false", missed ? "false" : "true")
    printf "%s", out > json
    close(json)
    printf "  every target: %s\n", missed ? "NOT met" : "met"
    exit fail
}
