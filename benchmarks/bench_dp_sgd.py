"""DP-SGD step time: DPBatchNorm vs Opacus' GroupNorm fix, same ResNet-style CNN and batch.

    python benchmarks/bench_dp_sgd.py --batch 64 --steps 10                  # CPU
    python benchmarks/bench_dp_sgd.py --device cuda --batch 256 --out $OUT   # GPU

Writes dp_sgd_<device>.json and dp_sgd_<device>.md under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import opacus
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine as OpacusPrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm.opacus import PrivacyEngine

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, engine, x, y, steps: int, warmup: int = 2) -> list[float]:
    gs_model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(gs_model(x), y).backward()
        opt.step()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    torch.manual_seed(0)
    groupnorm = ModuleValidator.fix(resnet()).to(device)
    torch.manual_seed(0)
    dp = safenorm.convert_batchnorm(resnet(), "dp", expected_batch_size=args.batch).to(device)
    results = {}
    gn_times = time_steps(groupnorm, OpacusPrivacyEngine(), x, y, args.steps)
    dp_times = time_steps(dp, PrivacyEngine(), x, y, args.steps)
    for name, times in (("groupnorm_fix", gn_times), ("dpbatchnorm", dp_times)):
        results[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "steps": len(times),
        }
    ratio = results["dpbatchnorm"]["median_s"] / results["groupnorm_fix"]["median_s"]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    record = {
        "benchmark": f"dp_sgd_step_{device.type}",
        "model": "ResNet-style CNN (3 blocks, 7 norm layers)",
        "batch": args.batch,
        "input": [3, args.size, args.size],
        "grad_sample_mode": "hooks",
        "results": results,
        "ratio_dp_over_groupnorm": ratio,
        "machine": machine,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dp_sgd_{device.type}.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# DP-SGD step on {device.type.upper()}: DPBatchNorm vs Opacus' GroupNorm fix",
        "",
        f"ResNet-style CNN, batch {args.batch}, input 3x{args.size}x{args.size}, hooks mode, "
        f"median of {args.steps} steps after 2 warm-up steps, same batch for both.",
        "",
        "| normalization | median step (s) | min step (s) |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_s']:.4f} | {r['min_s']:.4f} |")
    lines += [
        "",
        f"Ratio DPBatchNorm / GroupNorm: **{ratio:.2f}x** (goal: <= 1.0x).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
    ]
    (args.out / f"dp_sgd_{device.type}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
