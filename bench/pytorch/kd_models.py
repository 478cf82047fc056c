"""kd_models.py - PyTorch mirrors of distill's YAML model definitions.

build_model(path) reads a model file (input: [C, H, W] or [F]; layers: a list of one-key maps)
and returns (nn.Sequential, input_shape). Layer indices, nesting and defaults follow
engine/model.c, so the state_dict names match distill's ("3.weight", "5.body.1.bias",
"5.proj.0.weight") and a checkpoint can be compared tensor for tensor.
"""
import torch.nn as nn
import yaml

KNOWN = ("linear", "conv2d", "batchnorm", "relu", "relu6", "maxpool2d", "avgpool2d",
         "global_avgpool", "flatten", "dropout", "residual")


class GlobalAvgPool(nn.Module):
    """[N, C, H, W] -> [N, C]: distill's global_avgpool."""

    def forward(self, x):
        return x.mean((2, 3))


class Residual(nn.Module):
    """y = body(x) + (proj(x) if proj else x)."""

    def __init__(self, body, proj=None):
        super().__init__()
        self.body = body
        if proj is not None:
            self.proj = proj
        else:
            self.proj = None

    def forward(self, x):
        return self.body(x) + (self.proj(x) if self.proj is not None else x)


def _split(item, where):
    """A block is a bare name or a one-key map {name: {options}}."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, opts = next(iter(item.items()))
        return name, dict(opts or {})
    raise ValueError(f"{where}: a layer must be a name or a one-key mapping, got {item!r}")


def _pool_out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _trunk(items, shape, where):
    """Build an nn.Sequential from a list of block definitions; returns it and the out shape."""
    mods = []
    for i, item in enumerate(items):
        kind, o = _split(item, f"{where}[{i}]")
        o.pop("tap", None)
        what = f"{where}[{i}] ({kind})"
        if kind not in KNOWN:
            raise ValueError(f"{what}: unknown layer type")
        if kind == "linear":
            if len(shape) != 1:
                raise ValueError(f"{what}: needs a flat input, got {shape}")
            out = int(o["out"])
            mods.append(nn.Linear(shape[0], out, bias=bool(o.get("bias", True))))
            shape = [out]
        elif kind == "conv2d":
            if len(shape) != 3:
                raise ValueError(f"{what}: needs [C, H, W], got {shape}")
            c, h, w = shape
            out, k = int(o["out"]), int(o["kernel"])
            stride, pad = int(o.get("stride", 1)), int(o.get("pad", 0))
            groups = int(o.get("groups", 1))
            mods.append(nn.Conv2d(c, out, k, stride=stride, padding=pad, groups=groups,
                                  bias=bool(o.get("bias", True))))
            shape = [out, _pool_out(h, k, stride, pad), _pool_out(w, k, stride, pad)]
        elif kind == "batchnorm":
            eps, mom = float(o.get("eps", 1e-5)), float(o.get("momentum", 0.1))
            bn = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            mods.append(bn(shape[0], eps=eps, momentum=mom))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "relu6":
            mods.append(nn.ReLU6())
        elif kind in ("maxpool2d", "avgpool2d"):
            k = int(o["kernel"])
            stride, pad = int(o.get("stride", k)), int(o.get("pad", 0))
            cls = nn.MaxPool2d if kind == "maxpool2d" else nn.AvgPool2d
            mods.append(cls(k, stride=stride, padding=pad))
            shape = [shape[0], _pool_out(shape[1], k, stride, pad),
                     _pool_out(shape[2], k, stride, pad)]
        elif kind == "global_avgpool":
            mods.append(GlobalAvgPool())
            shape = [shape[0]]
        elif kind == "flatten":
            mods.append(nn.Flatten())
            n = 1
            for s in shape:
                n *= s
            shape = [n]
        elif kind == "dropout":
            mods.append(nn.Dropout(float(o.get("p", 0.5))))
        elif kind == "residual":
            body, bshape = _trunk(o["body"], shape, f"{what}.body")
            proj, pshape = None, shape
            if o.get("proj"):
                proj, pshape = _trunk(o["proj"], shape, f"{what}.proj")
            if bshape != pshape:
                raise ValueError(f"{what}: body gives {bshape} but the shortcut {pshape}")
            mods.append(Residual(body, proj))
            shape = bshape
    return nn.Sequential(*mods), shape


def build_model(path):
    """Return (model, input_shape) for the YAML model file at path."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    shape = [int(v) for v in doc["input"]]
    model, out = _trunk(doc["layers"], shape, path)
    if len(out) != 1:
        raise ValueError(f"{path}: the last layer must give flat logits, got {out}")
    return model, shape


if __name__ == "__main__":
    import sys
    m, s = build_model(sys.argv[1])
    print(m)
    for k, v in m.state_dict().items():
        print(k, tuple(v.shape))
    print("params", sum(p.numel() for p in m.parameters()))
