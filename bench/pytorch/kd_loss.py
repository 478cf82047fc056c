"""kd_loss.py - the PyTorch peer of bench/kd_loss.c.

For each N x C shape: random student and teacher logits (normal * 3, float32), then the
distillation loss as PyTorch users write it,
    F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction='batchmean') * T * T,
forward and backward to the student logits, timed over `iters` iterations after `warmup`
(median per-iteration time). Prints one JSON line:
{"torch", "threads", "device", "shapes": [{"n", "c", "ms", "ms_all", "loss"}]}.
"""
import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="65536x10,8192x1000,1024x32768")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T = a.temperature
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": a.device,
           "shapes": []}
    for shape in a.shapes.split(","):
        n, c = (int(x) for x in shape.split("x"))
        s = (torch.randn(n, c, device=a.device) * 3).requires_grad_(True)
        t = torch.randn(n, c, device=a.device) * 3

        def step():
            s.grad = None
            loss = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1),
                            reduction="batchmean") * T * T
            loss.backward()
            return loss

        for _ in range(a.warmup):
            step()
        times = []
        for _ in range(a.iters):
            if a.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step()
            if a.device != "cpu":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        out["shapes"].append({"n": n, "c": c, "ms": statistics.median(times), "ms_all": times,
                              "loss": float(loss)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
