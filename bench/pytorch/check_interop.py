"""check_interop.py - load distill checkpoints into the mirrored PyTorch models and evaluate them.

    /usr/bin/python3 bench/pytorch/check_interop.py MODEL_YAML CHECKPOINT [MODEL_YAML CHECKPOINT ...]

Builds each nn.Sequential mirror from the model YAML (kd_models.py), loads the safetensors
checkpoint with strict=True (so every name and shape must match), and prints the Fashion-MNIST
test accuracy PyTorch computes with it; it should equal what `distill eval` prints. Needs the
safetensors Python package (pip install safetensors).
"""
import gzip
import sys

import os

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kd_models import build_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"


def idx(path):
    """An IDX file (gzip) as a numpy array."""
    with gzip.open(path) as f:
        raw = f.read()
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


x = torch.tensor((idx(f"{DATA}/t10k-images-idx3-ubyte.gz") / 255.0 - 0.2860) / 0.3530,
                 dtype=torch.float32).unsqueeze(1)
y = torch.tensor(idx(f"{DATA}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
if len(sys.argv) < 3 or len(sys.argv) % 2 == 0:
    sys.exit(__doc__)
for yaml, ck in zip(sys.argv[1::2], sys.argv[2::2]):
    built = build_model(yaml)
    m = built[0] if isinstance(built, tuple) else built
    sd = {k: v for k, v in load_file(ck).items() if not k.startswith("__optim__")}
    m.load_state_dict(sd, strict=True)
    m.eval()
    with torch.no_grad():
        hits = sum((m(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item()
                   for i in range(0, len(y), 1000))
    print(f"{ck} in PyTorch ({yaml}): test accuracy {100 * hits / len(y):.2f}%")
