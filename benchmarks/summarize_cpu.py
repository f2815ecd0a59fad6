"""Turn a pytest-benchmark JSON of test_bench_layers_cpu.py into a markdown table of ratios.

Usage: python benchmarks/summarize_cpu.py benchmarks/results/cpu_layers.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    with open(path) as handle:
        data = json.load(handle)
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = f"{'x'.join(map(str, info['shape']))} {info['memory_format']}"
        medians[key][info["provider"]] = bench["stats"]["median"]
    providers = ["batchnorm", "groupnorm", "ghost", "clipped", "dp"]
    machine = data["machine_info"]
    lines = [
        f"CPU: {machine.get('cpu', {}).get('brand_raw', 'unknown')}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical cores, Python "
        f"{machine.get('python_version')}, torch {data.get('torch_version', '?')}, "
        f"{data.get('torch_threads', '?')} torch threads; forward + backward, median of 40 "
        "rounds after 5 warm-up rounds, time relative to nn.BatchNorm2d (lower is faster).",
        "",
        "| shape (N,C,H,W) format | BatchNorm2d ms | " + " | ".join(providers[1:]) + " |",
        "|---|---|" + "---|" * (len(providers) - 1),
    ]
    for key, row in medians.items():
        base = row["batchnorm"]
        ratios = " | ".join(f"{row[p] / base:.2f}x" for p in providers[1:])
        lines.append(f"| {key} | {base * 1e3:.2f} | {ratios} |")
    worst = {p: max(row[p] / row["batchnorm"] for row in medians.values()) for p in providers[2:]}
    lines += ["", "Worst ratio per safenorm variant: "
              + ", ".join(f"{p} {r:.2f}x" for p, r in worst.items())]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
