"""The wheel maps kernels/ and evaluation/ into the package (DESIGN.md §2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_provides_kernels_and_evaluation(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("safenorm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import safenorm, safenorm.kernels, safenorm.evaluation, safenorm.functional;"
        "print(safenorm.__file__); print(safenorm.kernels.__file__);"
        "print(safenorm.evaluation.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env,
        cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert len(out) == 3 and all(path.startswith(str(target)) for path in out), out
