"""Gaussian noise for the released statistics.

Two sources:

* a ``torch.Generator`` (or torch's default one), so that a seed reproduces a run;
* ``secure_mode``: standard normals from the operating system's CSPRNG (``os.urandom``) by the
  Box-Muller transform in float64, summed four at a time and halved as Opacus does in its own
  ``secure_mode`` to blunt floating-point attacks on the sampler. Only ``2 * C`` numbers per
  release are drawn, so host-side generation costs nothing measurable. This is a mitigation in
  the spirit of Opacus' secure mode, not a formally verified discrete Gaussian sampler.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["gaussian_noise"]


def _os_standard_normal(numel: int) -> np.ndarray:
    # 53 random bits per uniform, offset by half a step so that log(0) cannot occur.
    raw = np.frombuffer(os.urandom(16 * numel), dtype=np.uint64).reshape(2, numel)
    u1, u2 = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _secure_standard_normal(numel: int) -> np.ndarray:
    return sum(_os_standard_normal(numel) for _ in range(4)) / 2.0


def gaussian_noise(
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> Tensor:
    """Standard normal noise of ``shape`` in float32 on ``device``.

    Args:
        shape: shape of the noise tensor.
        device: device of the result. Default: the generator's device, else CPU.
        generator: the ``torch.Generator`` to draw from (its device decides where the draw
            happens). Default: torch's global generator. Must be ``None`` in secure mode.
        secure_mode: draw from the OS CSPRNG instead of a (seedable) torch generator.
    """
    if secure_mode:
        if generator is not None:
            raise ValueError(
                "secure_mode draws noise from the OS CSPRNG and cannot use a seeded generator; "
                "pass generator=None or secure_mode=False"
            )
        numel = math.prod(shape)
        values = torch.from_numpy(_secure_standard_normal(numel)).reshape(shape)
        return values.to(device=device or "cpu", dtype=torch.float32)
    draw_device = generator.device if generator is not None else (device or "cpu")
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(device) if device is not None else noise
