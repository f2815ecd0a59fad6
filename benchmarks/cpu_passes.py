"""Full-size memory traffic of each layer's CPU training step, counted (not timed).

The layers are bandwidth-bound: a step's cost on CPU follows how many times it reads and writes
tensors of the input's size. This counts it exactly, whatever the machine's load: every aten
operation of one forward + backward on the CPU path (the default backend), with the tensors
larger than the per-sample statistics it reads and writes (each temporary is a write), in units
of the input's size. ``nn.BatchNorm2d`` is the reference: its fused CPU kernels read ``x`` (twice
inside) and write ``y`` forward, read ``dy`` and ``x`` and write ``dx`` backward.

    python benchmarks/cpu_passes.py          # writes benchmarks/results/cpu_passes.{json,md}
"""

from __future__ import annotations

import json
import platform
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import safenorm

RESULTS = Path(__file__).parent / "results"
SHAPE = (32, 64, 8, 8)
# Operations that move no data: views and metadata.
VIEWS = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "unsqueeze", "squeeze", "select",
    "slice", "t", "transpose", "permute", "alias", "detach", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "unbind",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "_local_scalar_dense", "split",
    "split_with_sizes", "chunk",
}  # fmt: skip


class _Traffic(TorchDispatchMode):
    """Input-sized reads and writes of every operation, by operation name."""

    def __init__(self, numel: int, small: int) -> None:
        super().__init__()
        self.numel, self.small = numel, small
        self.reads: Counter[str] = Counter()
        self.writes: Counter[str] = Counter()

    def _full(self, tensors) -> float:
        # Tensors larger than the per-(sample, channel) statistics, in units of the input.
        sizes = [t.numel() for t in tensors if isinstance(t, torch.Tensor)]
        return sum(size / self.numel for size in sizes if size > self.small)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            inputs, _ = tree_flatten((args, kwargs or {}))
            outputs, _ = tree_flatten(out)
            self.reads[name] += self._full(inputs)
            self.writes[name] += self._full(outputs)
        return out


def _layers(c: int, n: int) -> dict[str, nn.Module]:
    return {
        "nn.BatchNorm2d": nn.BatchNorm2d(c),
        "GhostBatchNorm2d (ghost 16)": safenorm.GhostBatchNorm2d(c, ghost_batch_size=16),
        "ClippedBatchNorm2d": safenorm.ClippedBatchNorm2d(c),
        "DPBatchNorm2d": safenorm.DPBatchNorm2d(c, expected_batch_size=n),
    }


def count() -> list[dict]:
    warnings.simplefilter("ignore", safenorm.PrivacyWarning)
    rows = []
    for fmt, memory_format in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        for name, layer in _layers(SHAPE[1], SHAPE[0]).items():
            x = torch.randn(SHAPE).contiguous(memory_format=memory_format).requires_grad_()
            dy = torch.randn(SHAPE).contiguous(memory_format=memory_format)
            layer(x).backward(dy)  # warm-up
            x.grad = None  # as the timed benchmark: no accumulation into an existing gradient
            layer.zero_grad(set_to_none=True)
            row = {"layer": name, "format": fmt}
            for phase in ("forward", "backward"):
                with _Traffic(x.numel(), 2 * SHAPE[0] * SHAPE[1]) as traffic:
                    if phase == "forward":
                        y = layer(x)
                    else:
                        y.backward(dy)
                ops = {
                    k: (round(traffic.reads[k], 3), round(traffic.writes[k], 3))
                    for k in traffic.reads
                    if traffic.reads[k] or traffic.writes[k]
                }
                row[phase] = {
                    "reads": round(sum(traffic.reads.values()), 3),
                    "writes": round(sum(traffic.writes.values()), 3),
                    "operations": ops,
                }
            rows.append(row)
    return rows


def main() -> None:
    rows = count()
    record = {
        "benchmark": "input-sized reads and writes per CPU training step (forward + backward)",
        "input": list(SHAPE),
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_passes.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Input-sized memory traffic per CPU training step (counted)",
        "",
        f"One forward + backward at input {'x'.join(map(str, SHAPE))}, default backend (CPU):",
        "input-sized tensors read + written by aten operations, in units of the input's size",
        "(one read per tensor argument: a fused kernel such as BatchNorm's may read it twice).",
        "The layers are bandwidth-bound, so this is what their CPU time follows, independent of",
        "the machine's load. Written by `python benchmarks/cpu_passes.py`; the operations",
        "behind each number are in cpu_passes.json.",
        "",
        "| layer | format | forward reads + writes | backward reads + writes | total |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        f, b = r["forward"], r["backward"]
        total = f["reads"] + f["writes"] + b["reads"] + b["writes"]
        lines.append(
            f"| {r['layer']} | {r['format']} | {f['reads']} + {f['writes']} | "
            f"{b['reads']} + {b['writes']} | {total} |"
        )
    lines += ["", "Where the traffic goes (operation: reads + writes), NCHW:", ""]
    for r in rows:
        if r["format"] != "nchw":
            continue
        for phase in ("forward", "backward"):
            ops = ", ".join(
                f"{name} {reads:g} + {writes:g}"
                for name, (reads, writes) in r[phase]["operations"].items()
            )
            lines.append(f"- {r['layer']}, {phase}: {ops or 'none'}")
    lines += ["", f"torch {torch.__version__}, Python {platform.python_version()}", ""]
    (RESULTS / "cpu_passes.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
