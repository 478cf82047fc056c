"""train_throughput.py - the PyTorch peer of bench/train_throughput.c.

Trains the mirror of a distill YAML model on Fashion-MNIST with the same schedule as the C
bench: the training set pre-loaded as one normalised float tensor, a random permutation per
epoch, batches sliced by index (no augmentation), AdamW (lr 1e-3, weight_decay 1e-4) and mean
cross-entropy. Only the training steps are timed, batch gather included. Prints one JSON line:
{"model", "samples_per_s", "step_ms", "torch", "threads", ...}.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="distill model YAML")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OPENBLAS_NUM_THREADS for torch's BLAS (default 1, see below)")
    a = ap.parse_args()
    # numpy and torch are imported only after this, as OpenBLAS reads it when it loads.
    # Debian's torch calls the pthread OpenBLAS, whose own thread pool fights torch's OpenMP
    # threads for the 2 cores: with both at 2 the MLP step varies from 2 ms to over 100 ms.
    # One BLAS thread (torch's OpenMP ops still use --threads) is its fastest stable setting.
    if a.blas_threads > 0:
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.blas_threads)
    import torch
    import torch.nn.functional as F
    from kd_models import build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, in_shape = build_model(a.model)
    model.train()
    x_all, y_all = load_train(a.data)
    x_all = x_all.reshape(x_all.shape[0], *in_shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = x_all.shape[0]
    gen = torch.Generator().manual_seed(a.seed)
    state = {"perm": torch.randperm(n, generator=gen), "pos": 0}

    def indices():
        if state["pos"] + a.batch > n:  # drop the ragged tail: every timed step is a full batch
            state["perm"] = torch.randperm(n, generator=gen)
            state["pos"] = 0
        idx = state["perm"][state["pos"]:state["pos"] + a.batch]
        state["pos"] += a.batch
        return idx

    def step():
        idx = indices()
        xb = x_all.index_select(0, idx)
        yb = y_all.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()

    losses = [step() for _ in range(a.warmup)]
    if not all(math.isfinite(v) for v in losses):
        print(json.dumps({"error": "non-finite loss in warm-up"}))
        return 1
    t0 = time.perf_counter()
    for _ in range(a.steps):
        last = step()
    el = time.perf_counter() - t0
    print(json.dumps({
        "model": os.path.basename(a.model),
        "params": sum(p.numel() for p in model.parameters()),
        "samples_per_s": a.steps * a.batch / el,
        "step_ms": 1e3 * el / a.steps,
        "steps": a.steps,
        "warmup": a.warmup,
        "batch": a.batch,
        "first_loss": losses[0],
        "last_loss": last,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
