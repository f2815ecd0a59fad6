"""Train a small CNN on digits with clipped or DP statistics at tight and loose clip bounds.

Each layer's bounds are the defaults times a mean factor and a variance factor. Plain SGD on
the layer (no DP-SGD), 3 epochs, one seed: this checks that training stays finite, not utility.

    python examples/tight_bounds.py clipped
    python examples/tight_bounds.py dp
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn

import safenorm

FACTORS = [(1, 1), (1 / 16, 1), (1, 1 / 16), (1 / 16, 1 / 16), (16, 1 / 16), (1 / 16, 16),
           (16, 16), (0.5, 0.25), (2, 0.25), (1, 0.5)]  # fmt: skip


def norm(kind: str, channels: int, mean_factor: float, var_factor: float) -> nn.Module:
    root = math.sqrt(channels)
    if kind == "clipped":  # defaults 2 sqrt(C), 4 sqrt(C)
        return safenorm.ClippedBatchNorm2d(
            channels, clip_norm=mean_factor * 2 * root, var_clip_norm=var_factor * 4 * root
        )
    return safenorm.DPBatchNorm2d(  # defaults sqrt(C), sqrt(C)
        channels,
        clip_norm=mean_factor * root,
        var_clip_norm=var_factor * root,
        expected_batch_size=64,
    )


def model(kind: str, mean_factor: float, var_factor: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        norm(kind, 16, mean_factor, var_factor),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        norm(kind, 32, mean_factor, var_factor),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def run(kind: str, mean_factor: float, var_factor: float) -> tuple[str, float]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = model(kind, mean_factor, var_factor)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    status = "trains"
    try:
        for _ in range(3):
            order = torch.randperm(len(x))
            for start in range(0, len(x) - 63, 64):
                idx = order[start : start + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                if not math.isfinite(loss.item()):
                    raise ValueError("non-finite loss")
                loss.backward()
                opt.step()
    except ValueError as error:
        status = f"diverged ({str(error)[:40]})"
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x).argmax(1) == y).float().mean())
    return status, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["clipped", "dp"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| mean factor | variance factor | result | train accuracy |")
    print("|---|---|---|---|")
    for mean_factor, var_factor in FACTORS:
        status, accuracy = run(args.kind, mean_factor, var_factor)
        print(f"| {mean_factor:g} | {var_factor:g} | {status} | {accuracy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
