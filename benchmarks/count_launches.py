"""Kernel launches per training step of each layer on the GPU path, counted on CPU.

The H200 run (benchmarks/results/h200) showed the layers CPU-bound at small shapes: each
PyTorch operation and Triton launch costs a few microseconds of host time, more than the kernel
itself. This script counts them without a GPU: it runs one forward + backward of each layer with
the Triton backend under the interpreter and counts

* Triton launches (every ``kernel[grid](...)`` of ``safenorm.kernels``), and
* PyTorch operations that launch a kernel on a GPU (aten calls other than views, metadata and
  allocation; seen by a ``TorchDispatchMode``),

against ``nn.BatchNorm2d`` (whose CPU kernel stands in for cuDNN's: one operation each way).
Every layer runs in its default configuration with the finite-statistics check on, deferred as
on CUDA (its device-to-host copy of the flag counts; reading the pinned host copy does not).
Gradient accumulation into existing ``.grad`` tensors counts for every layer alike.

    python benchmarks/count_launches.py            # writes benchmarks/results/launches.{json,md}
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import safenorm
from safenorm import ops

RESULTS = Path(__file__).parent / "results"
# aten operations that launch nothing on a GPU: views, metadata, allocation without a fill.
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "unsqueeze", "squeeze", "select",
    "slice", "t", "transpose", "permute", "alias", "detach", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias",
    "is_same_size", "_has_compatible_shallow_copy_type", "set_", "unbind",
    # Reading a host tensor: the deferred finite check's flag, in pinned host memory on CUDA.
    "_local_scalar_dense",
}  # fmt: skip


# Inside a launch the interpreter copies arguments with torch operations of its own: not counted.
_IN_LAUNCH = [False]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH and not _IN_LAUNCH[0]:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountLaunches:
    """Wrap every Triton kernel of ``safenorm.kernels`` and count its launches."""

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> _CountLaunches:
        for module in _kernel_modules():
            for name in dir(module):
                kernel = getattr(module, name)
                if name.endswith("_kernel") and hasattr(kernel, "__getitem__"):
                    self._saved.append((module, name, kernel))
                    setattr(module, name, _Counted(kernel, name, self.launches))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, kernel in self._saved:
            setattr(module, name, kernel)


def _kernel_modules() -> list:
    modules = []
    for name in ("moments", "normalize", "batch_norm", "combine"):  # some: newer versions only
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"safenorm.kernels.{name}"))
    return modules


class _Counted:
    def __init__(self, kernel, name: str, counter: Counter) -> None:
        self._kernel, self._name, self._counter = kernel, name, counter

    def __getitem__(self, grid):
        self._counter[self._name] += 1
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            _IN_LAUNCH[0] = True
            try:
                return launch(*args, **kwargs)
            finally:
                _IN_LAUNCH[0] = False

        return run


def _layers(c: int, n: int) -> dict[str, nn.Module]:
    def quiet(layer):
        # The finite-statistics check stays on (the default), deferred as on CUDA.
        layer._defers_check = lambda x: True
        if isinstance(layer, safenorm.DPBatchNorm):
            layer.register_release_hook(lambda *_: None)
        return layer

    return {
        "nn.BatchNorm2d (reference)": nn.BatchNorm2d(c),
        "GhostBatchNorm2d (one group)": quiet(safenorm.GhostBatchNorm2d(c)),
        "GhostBatchNorm2d (ghost 4)": quiet(safenorm.GhostBatchNorm2d(c, ghost_batch_size=4)),
        "ClippedBatchNorm2d": quiet(safenorm.ClippedBatchNorm2d(c)),
        "DPBatchNorm2d": quiet(safenorm.DPBatchNorm2d(c, expected_batch_size=n)),
    }


def count(n: int = 8, c: int = 16) -> list[dict]:
    rows = []
    for name, layer in _layers(c, n).items():
        x = torch.randn(n, c, 4, 4, requires_grad=True)
        dy = torch.randn_like(x)
        with ops.use_backend("triton"):
            layer(x).backward(dy)  # warm-up: caches, one-time warnings
            counts, names = {}, {}
            for phase in ("forward", "backward"):
                with _CountOps() as aten, _CountLaunches() as triton_launches:
                    if phase == "forward":
                        y = layer(x)
                    else:
                        y.backward(dy)
                counts[phase] = (sum(aten.ops.values()), sum(triton_launches.launches.values()))
                names[phase] = dict(aten.ops) | dict(triton_launches.launches)
        rows.append(
            {
                "layer": name,
                "forward_torch_ops": counts["forward"][0],
                "forward_triton_launches": counts["forward"][1],
                "backward_torch_ops": counts["backward"][0],
                "backward_triton_launches": counts["backward"][1],
                "total": sum(sum(v) for v in counts.values()),
                "operations": names,
            }
        )
    return rows


def main() -> None:
    torch.manual_seed(0)
    rows = count()
    if "--print" in sys.argv:  # e.g. to count an older checkout: PYTHONPATH=old/src ... --print
        print(json.dumps(rows, indent=1))
        return
    record = {
        "benchmark": "kernel launches per training step (forward + backward), GPU code path, "
        "default configurations, finite-statistics check on",
        "input": [8, 16, 4, 4],
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "launches.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Kernel launches per training step (GPU code path, counted on CPU)",
        "",
        "One forward + backward at input 8x16x4x4 with the Triton backend (interpreter): PyTorch",
        "operations that launch a GPU kernel, and Triton launches. Each costs a few microseconds",
        "of host time, which bounds the step time at small shapes. Every layer in its default",
        "configuration, the finite-statistics check on (deferred, as on CUDA). Written by",
        "`python benchmarks/count_launches.py`; `operations` in launches.json names each one.",
        "",
        "| layer | forward: torch ops + Triton | backward: torch ops + Triton | total |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['forward_torch_ops']} + {r['forward_triton_launches']} | "
            f"{r['backward_torch_ops']} + {r['backward_triton_launches']} | {r['total']} |"
        )
    lines += ["", f"torch {torch.__version__}, Python {platform.python_version()}", ""]
    (RESULTS / "launches.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
