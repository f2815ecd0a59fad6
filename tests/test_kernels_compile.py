"""Every Triton kernel compiles to PTX for sm_90 (H100/H200), checked without a GPU.

The interpreter runs kernels as Python and cannot see what only the compiler rejects (e.g. a
global that is not ``tl.constexpr``); ``benchmarks/compile_kernels.py`` compiles them, in a
process without ``TRITON_INTERPRET``. The default run compiles one variant of each kernel; the
slow test compiles every configuration the launchers use, in fp32/fp16/bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_kernels.py"


def _compile(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip


def test_one_variant_of_each_kernel_compiles():
    out = _compile("--quick")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


@pytest.mark.slow
def test_every_kernel_variant_compiles():
    out = _compile()
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout
