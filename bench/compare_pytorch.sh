#!/usr/bin/env bash
# compare_pytorch.sh - distill against PyTorch eager and torch.compile on one CUDA device, in one
# call: trains the tiny CNN, the MLP and the teacher CNN with the same data, batch and optimizer
# (bench_train_throughput --device cuda), times the teacher's inference as the teacher cache is
# built (--infer), and prints one table of the samples/s ratios against the targets: the tiny
# student 5x eager and 2x torch.compile, the teacher 1x both, teacher inference 1x both.
#
#   bash bench/compare_pytorch.sh [--python PATH] [--build DIR] [--out DIR] [--rounds N]
#                                 [--steps N] [--warmup N] [--threads N] [--summary FILE]
#
# --python: the interpreter whose torch is the peer, default `python3` on PATH (on the GPU
#   machine its own CUDA torch, not Debian's CPU one); it also merges the results.
# --build: where bench_train_throughput was built (default build-gpu when it holds one, else
#   build). --out: where the results go (default bench/results): compare_pytorch_gpu.json (both
#   runs' JSON under "train" and "infer" and the table's rows), the table as
#   compare_pytorch_gpu.txt, and each run's log (compare_pytorch_train.log, _infer.log).
# --rounds/--steps/--warmup: passed to both runs (defaults 3, 200, 50; inference counts batches
#   of 500). --threads: host threads for both sides (default: all cores, as `distill train`).
# --summary: also write one line per table row to FILE in bench/gpu_check.sh's summary layout.
# The data set is found as distill finds it ($DISTILL_DATA/fashion-mnist, then
# /usr/share/datasets/fashion-mnist); the peer searches the same places.
#
# Exit status: 0 everything ran (met targets or not); 2 something could not be measured (no
# CUDA device, an operation the CUDA backend lacks, no PyTorch for the interpreter) and the
# table shows what was; 1 a bench failed (a check, an error).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=python3
BUILD=
OUTDIR=bench/results
ROUNDS=3
STEPS=200
WARMUP=50
THREADS=$(nproc)
SUMMARY=
while [ $# -gt 0 ]; do
    case "$1" in
    --python | --build | --out | --rounds | --steps | --warmup | --threads | --summary)
        [ $# -ge 2 ] || { echo "compare_pytorch.sh: $1 needs a value" >&2; exit 1; }
        case "$1" in
        --python) PY=$2 ;;
        --build) BUILD=$2 ;;
        --out) OUTDIR=$2 ;;
        --rounds) ROUNDS=$2 ;;
        --steps) STEPS=$2 ;;
        --warmup) WARMUP=$2 ;;
        --threads) THREADS=$2 ;;
        --summary) SUMMARY=$2 ;;
        esac
        shift 2 ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0 ;;
    *)
        echo "compare_pytorch.sh: unknown argument '$1'" >&2
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 1 ;;
    esac
done
if [ -z "$BUILD" ]; then
    BUILD=build
    [ -x build-gpu/bench_train_throughput ] && BUILD=build-gpu
fi
BIN=$BUILD/bench_train_throughput
[ -x "$BIN" ] || { echo "compare_pytorch.sh: no $BIN (cmake --build $BUILD)" >&2; exit 1; }
PYABS=$(command -v "$PY") || { echo "compare_pytorch.sh: no python '$PY'" >&2; exit 2; }
mkdir -p "$OUTDIR" || exit 1
TMP=$(mktemp -d) || exit 1
trap 'rm -rf "$TMP"' EXIT

common=(--device cuda --python "$PYABS" --rounds "$ROUNDS" --steps "$STEPS" --warmup "$WARMUP"
        --threads "$THREADS")
echo "== training: tiny CNN, MLP, teacher CNN (distill, PyTorch eager, torch.compile)"
"$BIN" "${common[@]}" --only tiny_cnn.yaml,mlp.yaml,teacher_cnn.yaml --json "$TMP/train.json" \
    2>&1 | tee "$OUTDIR/compare_pytorch_train.log"
train_rc=${PIPESTATUS[0]}
echo "== teacher inference, as the teacher cache is built"
"$BIN" "${common[@]}" --infer --only teacher_cnn.yaml --json "$TMP/infer.json" \
    2>&1 | tee "$OUTDIR/compare_pytorch_infer.log"
infer_rc=${PIPESTATUS[0]}

# One table from both runs' JSON; a run that wrote none is shown with its log's last complaint.
"$PYABS" - "$TMP" "$OUTDIR" "$train_rc" "$infer_rc" "$PYABS" "$SUMMARY" <<'EOF'
import json, os, sys

tmp, out, train_rc, infer_rc, python, summary = sys.argv[1:7]
ROWS = [("tiny CNN", "train", "tiny_cnn.yaml"), ("MLP 784-256-10", "train", "mlp.yaml"),
        ("teacher CNN", "train", "teacher_cnn.yaml"), ("teacher CNN", "infer", "teacher_cnn.yaml")]


def load(kind):
    try:
        with open(os.path.join(tmp, kind + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def complaint(kind):
    try:
        with open(os.path.join(out, "compare_pytorch_%s.log" % kind)) as f:
            lines = [l.strip() for l in f if "bench_train_throughput:" in l]
        return lines[-1].split("bench_train_throughput: ", 1)[1] if lines else "no result"
    except OSError:
        return "no result"


runs = {"train": load("train"), "infer": load("infer")}
rows = []
for label, kind, model in ROWS:
    doc = runs[kind]
    m = next((x for x in (doc or {}).get("models", []) if x["model"] == model), None)
    row = {"label": label, "mode": "training" if kind == "train" else "inference (cache)",
           "model": model}
    if m is None or "not_measured" in m:
        row["not_measured"] = m["not_measured"] if m else complaint(kind)
    else:
        c = m.get("pytorch_compile", {})
        row.update(distill=m["distill"]["samples_per_s"], eager=m["pytorch"]["samples_per_s"],
                   compile=c.get("samples_per_s"), compile_unavailable=c.get("unavailable"),
                   vs_eager=m["ratio"], target_eager=m["target_ratio"],
                   met_eager=m["target_met"], vs_compile=m.get("ratio_compile"),
                   target_compile=m.get("target_ratio_compile"),
                   met_compile=m.get("target_met_compile"))
    rows.append(row)


def num(v):
    return "-" if v is None else "%.0f" % v


def verdict(ratio, target, met):
    if target is None:
        return "-"
    if ratio is None:
        return ">= %gx n/a" % target
    return ">= %gx %s" % (target, "met" if met else "NOT MET")


def ratio(v):
    return "-" if v is None else "%.2fx" % v


head = ("%-16s %-18s %12s %12s %12s %9s %-16s %10s %-16s"
        % ("model", "what", "distill/s", "eager/s", "compile/s", "vs eager", "target",
           "vs compile", "target"))
lines = [head, "-" * len(head)]
short = []
for r in rows:
    if "not_measured" in r:
        lines.append("%-16s %-18s not measured: %s" % (r["label"], r["mode"], r["not_measured"]))
        short.append((r, "not measured: " + r["not_measured"]))
        continue
    ve = verdict(r["vs_eager"], r["target_eager"], r["met_eager"])
    vc = verdict(r["vs_compile"], r["target_compile"], r["met_compile"])
    lines.append("%-16s %-18s %12s %12s %12s %9s %-16s %10s %-16s"
                 % (r["label"], r["mode"], num(r["distill"]), num(r["eager"]), num(r["compile"]),
                    ratio(r["vs_eager"]), ve, ratio(r["vs_compile"]), vc))
    text = "%s eager (%s)" % (ratio(r["vs_eager"]), "no target" if ve == "-" else ve)
    if r["vs_compile"] is not None:
        text += ", %s compile (%s)" % (ratio(r["vs_compile"]), "no target" if vc == "-" else vc)
    else:
        text += ", " + (r["compile_unavailable"] or "torch.compile not run")
    short.append((r, text))
notes = sorted({r["compile_unavailable"] for r in rows if r.get("compile_unavailable")})
lines += notes
src = runs["train"] or runs["infer"] or {}
lines.append("device: %s; torch %s (%s); distill / PyTorch samples/s, medians of %s rounds"
             % (src.get("device_name", "?"), src.get("torch", "?"), python,
                src.get("rounds", "?")))
table = "\n".join(l.rstrip() for l in lines)
print("\n" + table)
with open(os.path.join(out, "compare_pytorch_gpu.txt"), "w") as f:
    f.write(table + "\n")
doc = {"bench": "compare_pytorch", "python": python, "torch": src.get("torch"),
       "device_name": src.get("device_name"),
       "exit_status": {"train": int(train_rc), "infer": int(infer_rc)},
       "rows": rows, "train": runs["train"], "infer": runs["infer"]}
path = os.path.join(out, "compare_pytorch_gpu.json")
with open(path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print("wrote " + path)
if summary:
    with open(summary, "w") as f:
        for r, text in short:
            f.write("%-28s %s\n" % ("%s %s" % (r["label"], "train" if r["mode"] == "training"
                                                 else "infer"), text))
EOF
merge_rc=$?

status=0
for rc in "$train_rc" "$infer_rc" "$merge_rc"; do
    if [ "$rc" -eq 2 ] && [ $status -eq 0 ]; then
        status=2
    elif [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
        status=1
    fi
done
exit $status
