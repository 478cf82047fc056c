#!/usr/bin/env python3
"""write_cache_h5py.py - write a valid distill teacher cache with h5py.

An example for teachers that live in another framework (PyTorch, JAX, ...):
compute raw logits at temperature 1 for every sample and view, then write
them with `write_cache`. The schema is documented in data/README.md.

    python3 data/write_cache_h5py.py --out teacher.h5 --samples 55000 --classes 10
    python3 data/write_cache_h5py.py --out teacher.h5 --npy logits.npy --labels labels.npy \
        --topk 5 --dtype float16 --compress gzip

Row i must be the i-th sample of the student job's training split: for a
teacher outside distill, a job with data.val_size: 0, whose split is the
training file in file order (data/README.md, "Which sample each row is").

Logits come from --npy (an array [N, C] or [N, V, C]) or are random (--seed),
or follow --pattern arange (exactly representable in float16; used by the
tests). Labels come from --labels (.npy of N ints) or are row % C.
"""
import argparse
import hashlib
import os
import sys

import h5py
import numpy as np

FORMAT = "distill-teacher-cache"
VERSION = 1


def topk_rows(logits, k):
    """Top-k of the last axis: values descending, ties by lower class index; and logsumexp."""
    # A stable sort of the negated values keeps equal values in class order.
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(logits, order, axis=-1)
    x = logits.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    lse = (mx[..., 0] + np.log(np.exp(x - mx).sum(axis=-1))).astype(np.float32)
    return values, order.astype(np.int32), lse


def write_cache(path, logits, labels, aug_params=None, topk=0, dtype="float32",
                teacher_sha256="", dataset_sha256="", chunk_rows=1024, compress=None,
                level=4, augment=None):
    """Write logits [N, V, C] (raw, T = 1) and labels [N] as a complete cache at path.

    aug_params [N, V, P] float32 records the augmentation of each view (zeros:
    identity views, P = 3 as distill's dx, dy, flip). topk > 0 stores the top-k
    values, their class indices and each row's full logsumexp instead of all C
    logits. augment names the augmentation the views were drawn with as distill
    compares it with a job's data.augment ("none" or "crop_pad=N hflip=0|1");
    None leaves it out (not checked), and "none" is written when aug_params is
    None (identity views). Written to path + ".tmp" and renamed, so a crash leaves no partial
    file at path. Every /done entry is set because every chunk is written here;
    a writer that fills the file incrementally sets done[i] = 1 only after the
    rows of chunk i are written and flushed.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    n, v, c = logits.shape
    labels = np.asarray(labels, dtype=np.int32)
    assert labels.shape == (n,), "labels must be [N]"
    assert labels.min() >= 0 and labels.max() < c, "labels must be in [0, C)"
    assert np.isfinite(logits).all(), "logits must be finite"
    if aug_params is None:
        aug_params = np.zeros((n, v, 3), dtype=np.float32)
        augment = "none" if augment is None else augment
    aug_params = np.asarray(aug_params, dtype=np.float32)
    assert aug_params.shape[:2] == (n, v), "aug_params must be [N, V, P]"
    assert dtype in ("float16", "float32")
    if dtype == "float16":
        assert np.abs(logits).max() <= 65504, "logits overflow float16: use float32"
    store = np.float16 if dtype == "float16" else np.float32
    chunk_rows = int(min(chunk_rows, n))
    nchunks = (n + chunk_rows - 1) // chunk_rows

    def create(f, name, data):
        # Chunked by rows; fletcher32 on every dataset (last in the pipeline); optional
        # shuffle + gzip.
        chunks = (chunk_rows,) + data.shape[1:]
        kw = {}
        if compress == "gzip":
            kw = dict(compression="gzip", compression_opts=level, shuffle=True)
        f.create_dataset(name, data=data, chunks=chunks, fletcher32=True, **kw)

    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = np.int64(VERSION)
        f.attrs["num_samples"] = np.int64(n)
        f.attrs["num_classes"] = np.int64(c)
        f.attrs["views"] = np.int64(v)
        f.attrs["topk"] = np.int64(topk)
        f.attrs["dtype"] = dtype
        f.attrs["teacher_sha256"] = teacher_sha256
        f.attrs["dataset_sha256"] = dataset_sha256
        if augment is not None:
            f.attrs["augment"] = augment
        f.attrs["chunk_rows"] = np.int64(chunk_rows)
        f.attrs["row_begin"] = np.int64(0)
        f.attrs["row_end"] = np.int64(n)
        if topk:
            values, indices, lse = topk_rows(logits, topk)
            create(f, "topk_values", values.astype(store))
            create(f, "topk_indices", indices)
            create(f, "logsumexp", lse)
        else:
            create(f, "logits", logits.astype(store))
        create(f, "aug_params", aug_params)
        create(f, "labels", labels)
        f.create_dataset("done", data=np.ones(nchunks, dtype=np.uint8), chunks=(nchunks,),
                         fletcher32=True)
    os.replace(tmp, path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--npy", help="logits .npy [N, C] or [N, V, C]")
    ap.add_argument("--labels", help="labels .npy [N]")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--compress", choices=["gzip"], default=None)
    ap.add_argument("--level", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pattern", choices=["random", "arange"], default="random")
    ap.add_argument("--teacher-file", help="hash this file as teacher_sha256")
    ap.add_argument("--teacher-sha256", default="")
    ap.add_argument("--dataset-sha256", default="")
    a = ap.parse_args()

    if a.npy:
        logits = np.load(a.npy)
    elif a.pattern == "arange":
        n, v, c = a.samples, a.views, a.classes
        i = np.arange(n)[:, None, None]
        j = np.arange(v)[None, :, None]
        k = np.arange(c)[None, None, :]
        logits = (((i * 7 + j * 3 + k * 5) % 17) - 8).astype(np.float32) * 0.5
    else:
        rng = np.random.default_rng(a.seed)
        logits = rng.normal(0.0, 3.0, (a.samples, a.views, a.classes)).astype(np.float32)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    n = logits.shape[0]
    labels = np.load(a.labels) if a.labels else np.arange(n) % logits.shape[2]
    teacher = sha256_file(a.teacher_file) if a.teacher_file else a.teacher_sha256
    write_cache(a.out, logits, labels, topk=a.topk, dtype=a.dtype, teacher_sha256=teacher,
                dataset_sha256=a.dataset_sha256, chunk_rows=a.chunk_rows,
                compress=a.compress, level=a.level)
    print(f"wrote {a.out}: {n} samples x {logits.shape[1]} views x {logits.shape[2]} classes, "
          f"topk {a.topk}, {a.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
