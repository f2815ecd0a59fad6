"""Turn a gpu_run.json of benchmarks/gpu_run.py into markdown tables.

Usage: python benchmarks/summarize_gpu.py benchmarks/results/h200/gpu_run_1.json > out.md
"""

from __future__ import annotations

import json
import statistics
import sys

PROVIDERS = ["safenorm_bn", "ghost32", "clipped", "dp", "dp_default", "clipped_compiled"]


def _rows(report: dict) -> dict[tuple, dict[str, float]]:
    """(shape, dtype, format, mode) -> provider -> median ms."""
    table: dict[tuple, dict[str, float]] = {}
    for r in report["results"]:
        if "ms" in r:
            key = (r["shape_name"], r["dtype"], r["format"], r["mode"])
            table.setdefault(key, {})[r["provider"]] = r["ms"]
    return table


def summarize(report: dict) -> str:
    table = _rows(report)
    machine = report["machine"]
    lines = [
        f"# GPU layer benchmark: {machine.get('gpu')}",
        "",
        f"torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}, Python "
        f"{machine['python']}. Times are medians of `triton.testing.do_bench`; ratios are "
        "safenorm / cuDNN (`nn.BatchNorm2d`) measured side by side in one run (below 1 is faster).",
        "",
        "## Median ratio to cuDNN over all shapes, dtypes and formats",
        "",
        "| provider | forward | backward | forward + backward | the same from a CUDA graph |",
        "|---|---|---|---|---|",
    ]
    for provider in PROVIDERS:
        cells = []
        for mode in ("forward", "backward", "full", "full_graph"):
            ratios = [
                v[provider] / v["cudnn"]
                for k, v in table.items()
                if k[3] == mode and provider in v and "cudnn" in v
            ]
            cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        lines.append(f"| {provider} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Forward + backward per shape",
        "",
        "| shape | dtype | format | cuDNN (ms) | " + " | ".join(PROVIDERS) + " |",
        "|---|---|---|---|" + "---|" * len(PROVIDERS),
    ]
    for (shape, dtype, fmt, mode), v in table.items():
        if mode != "full" or "cudnn" not in v:
            continue
        ratios = [f"{v[p] / v['cudnn']:.2f}" if p in v else "-" for p in PROVIDERS]
        lines.append(
            f"| {shape} | {dtype} | {fmt} | {v['cudnn']:.3f} | " + " | ".join(ratios) + " |"
        )
    fused = [
        v["affine_grads_separate"] / v["affine_grads_fused"]
        for k, v in table.items()
        if k[3] == "affine_grads" and "affine_grads_fused" in v
    ]
    summary = report.get("summary", {})
    lines += [
        "",
        "## Other measurements",
        "",
        f"- Per-sample affine gradients, fused pass vs the separate pass from activations: median "
        f"speedup {statistics.median(fused):.2f}x (range {min(fused):.2f}-{max(fused):.2f}x).",
        f"- Best fraction of the 4.8 TB/s HBM bandwidth under the byte model: "
        f"{summary.get('best_roofline', 0):.0%} (above 100% means the model over-counts bytes "
        "that stayed in L2).",
    ]
    peaks = summary.get("peak_memory_vs_cudnn_median", {})
    if peaks:
        lines.append(
            "- Peak extra memory of forward + backward relative to cuDNN (median): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in peaks.items())
            + "."
        )
    tests = report.get("gpu_tests")
    if tests:
        lines.append(f"- GPU test step: exit `{tests['rc']}` after {tests['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(summarize(json.load(handle)), end="")
