"""train_throughput.py - the PyTorch peer of bench/train_throughput.c.

Trains the mirror of a distill YAML model on Fashion-MNIST with the same schedule as the C
bench: the training set pre-loaded as one normalised float tensor, a random permutation per
epoch, batches sliced by index (no augmentation), AdamW (lr 1e-3, weight_decay 1e-4) and mean
cross-entropy. Only the training steps are timed, batch gather included; the losses are read
back after the timed block, not per step.

--device cuda: the training set, its labels and each epoch's permutation live on the GPU, and
the clock is read after torch.cuda.synchronize(). --compile: the model runs as
torch.compile(model); it compiles in the first warm-up step (timed apart as first_step_s), so
the timed steps exclude compilation. --infer: inference instead of training, as a teacher cache
is built: the model in eval mode under torch.inference_mode() forwards the set in order in
batches of --eval-batch (full batches, wrapping at the end of the set), its logits gathered in
one tensor on the device that is copied to the host at the end of the timed block; --warmup and
--steps then count batches.

The data set is read from --data, by default $DISTILL_DATA/fashion-mnist when that exists, else
/usr/share/datasets/fashion-mnist (distill's own search order). Prints one JSON line:
{"model", "samples_per_s", "step_ms", "torch", "threads", ...}. On failure the line is
{"error": "..."} and the exit status says why: 2 when --device cuda finds no CUDA device, 3 when
torch.compile is unavailable or fails (the C bench then reports it and carries on with eager
alone), 1 otherwise.
"""
import argparse
import gzip
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MEAN, STD = 0.2860, 0.3530  # distill's Fashion-MNIST normalisation


def read_idx(path):
    import numpy as np
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_train(root):
    import numpy as np
    import torch
    x = read_idx(os.path.join(root, "train-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"))
    xf = (x.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(xf).unsqueeze(1).contiguous(), torch.from_numpy(y.astype(np.int64))


def default_data():
    env = os.environ.get("DISTILL_DATA")
    if env and os.path.isdir(os.path.join(env, "fashion-mnist")):
        return os.path.join(env, "fashion-mnist")
    return "/usr/share/datasets/fashion-mnist"


def fail(code, message, torch=None):
    out = {"error": message}
    if torch is not None:
        out["torch"] = torch.__version__
    print(json.dumps(out))
    return code


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def time_train(a, torch, run, model, x_all, y_all, sync):
    """Warm-up and timed training steps; (first losses, last loss, first step s, timed s)."""
    import torch.nn.functional as F
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = x_all.shape[0]
    gen = torch.Generator().manual_seed(a.seed)
    dev = x_all.device
    state = {"perm": torch.randperm(n, generator=gen).to(dev), "pos": 0}

    def indices():
        if state["pos"] + a.batch > n:  # drop the ragged tail: every timed step is a full batch
            state["perm"] = torch.randperm(n, generator=gen).to(dev)
            state["pos"] = 0
        idx = state["perm"][state["pos"]:state["pos"] + a.batch]
        state["pos"] += a.batch
        return idx

    def step():
        idx = indices()
        xb = x_all.index_select(0, idx)
        yb = y_all.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(run(xb), yb)
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    losses = [step()]  # compiles the model under --compile
    sync()
    first_s = time.perf_counter() - t0
    losses += [step() for _ in range(a.warmup - 1)]
    losses = [float(v) for v in losses]
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        last = step()
    sync()
    el = time.perf_counter() - t0
    return losses, float(last), first_s, el


def time_infer(a, torch, run, x_all, sync):
    """Warm-up and timed inference batches; (logits of the timed block, first batch s, timed s)."""
    n, eb = x_all.shape[0], a.eval_batch
    rows = min(a.steps, n // eb) * eb  # the rows the timed block writes, from row 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        first = run(x_all[:eb])  # compiles the model under --compile
        sync()
        first_s = time.perf_counter() - t0
        logits = torch.empty((n, first.shape[1]), device=x_all.device)
        state = {"pos": 0}

        def batch():
            pos = state["pos"] if state["pos"] + eb <= n else 0
            logits[pos:pos + eb] = run(x_all[pos:pos + eb])
            state["pos"] = pos + eb

        for _ in range(a.warmup - 1):
            batch()
        sync()
        state["pos"] = 0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            batch()
        host = logits.cpu()  # a cache needs the logits on the host
        sync()
        el = time.perf_counter() - t0
    return host[:rows], first_s, el


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="distill model YAML")
    ap.add_argument("--data", default=default_data())
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OPENBLAS_NUM_THREADS for torch's BLAS (default 1, see below)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compile", action="store_true", help="run torch.compile(model)")
    ap.add_argument("--infer", action="store_true", help="time inference, not training")
    ap.add_argument("--eval-batch", type=int, default=500, help="--infer's batch size")
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 1 or a.batch < 1 or a.eval_batch < 1:
        return fail(1, "--warmup, --steps, --batch and --eval-batch must be positive")
    # numpy and torch are imported only after this, as OpenBLAS reads it when it loads.
    # Debian's torch calls the pthread OpenBLAS, whose own thread pool fights torch's OpenMP
    # threads for the 2 cores: with both at 2 the MLP step varies from 2 ms to over 100 ms.
    # One BLAS thread (torch's OpenMP ops still use --threads) is its fastest stable setting.
    if a.blas_threads > 0:
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.blas_threads)
    import torch
    from kd_models import build_model

    if a.device == "cuda" and not torch.cuda.is_available():
        cuda = torch.version.cuda
        built = "built for CUDA %s" % cuda if cuda else "a CPU-only build"
        return fail(2, "--device cuda: torch %s sees no CUDA device (%s)"
                    % (torch.__version__, built), torch)
    if a.compile and not hasattr(torch, "compile"):
        return fail(3, "torch.compile unavailable (torch %s)" % torch.__version__, torch)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    model, in_shape = build_model(a.model)
    model.to(dev)
    if a.infer:
        model.eval()
    else:
        model.train()
    run = torch.compile(model) if a.compile else model
    x_all, y_all = load_train(a.data)
    x_all = x_all.reshape(x_all.shape[0], *in_shape).to(dev)
    y_all = y_all.to(dev)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    out = {"model": os.path.basename(a.model),
           "params": sum(p.numel() for p in model.parameters())}
    try:
        if a.infer:
            logits, first_s, el = time_infer(a, torch, run, x_all, sync)
            if not bool(torch.isfinite(logits).all()):
                return fail(1, "non-finite logits", torch)
            out.update(mode="infer", samples_per_s=a.steps * a.eval_batch / el,
                       batch_ms=1e3 * el / a.steps, eval_batch=a.eval_batch)
        else:
            losses, last, first_s, el = time_train(a, torch, run, model, x_all, y_all, sync)
            if not all(math.isfinite(v) for v in losses):
                return fail(1, "non-finite loss in warm-up", torch)
            out.update(mode="train", samples_per_s=a.steps * a.batch / el,
                       step_ms=1e3 * el / a.steps, batch=a.batch, first_loss=losses[0],
                       last_loss=last)
    except Exception as e:  # torch.compile's backends fail at the first call (no Triton, ...)
        if not a.compile:
            raise
        return fail(3, "torch.compile failed (torch %s): %s" % (torch.__version__, first_line(e)),
                    torch)
    out.update(steps=a.steps, warmup=a.warmup, first_step_s=first_s, device=a.device,
               compile=a.compile, torch=torch.__version__, threads=torch.get_num_threads(),
               openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "default"))
    if a.device == "cuda":
        out.update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
