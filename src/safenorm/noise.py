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

__all__ = ["gaussian_noise", "uniform_integers"]


def _os_standard_normal(numel: int) -> np.ndarray:
    # 53 random bits per uniform, offset by half a step so that log(0) cannot occur.
    raw = np.frombuffer(os.urandom(16 * numel), dtype=np.uint64).reshape(2, numel)
    u1, u2 = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _secure_standard_normal(numel: int) -> np.ndarray:
    return sum(_os_standard_normal(numel) for _ in range(4)) / 2.0


def _refuse_seeded(generator: torch.Generator | None) -> None:
    if generator is not None:
        raise ValueError(
            "secure_mode draws noise from the OS CSPRNG and cannot use a seeded generator; "
            "pass generator=None or secure_mode=False"
        )


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None):
    """Where a draw happens: the generator's device, else the requested one, else CPU."""
    return generator.device if generator is not None else (device or "cpu")


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
        _refuse_seeded(generator)
        numel = math.prod(shape)
        values = torch.from_numpy(_secure_standard_normal(numel)).reshape(shape)
        return values.to(device=device or "cpu", dtype=torch.float32)
    draw_device = _draw_device(generator, device)
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
    return noise.to(device) if device is not None else noise


def _os_uniform_integers(high: int, numel: int) -> np.ndarray:
    # Rejection sampling over 64-bit words: no modulo bias (a word is redrawn with probability
    # below high / 2^64).
    limit = (2**64 // high) * high
    out = np.empty(numel, dtype=np.uint64)
    todo = np.arange(numel)
    while todo.size:
        words = np.frombuffer(os.urandom(8 * todo.size), dtype=np.uint64)
        keep = words < np.uint64(limit) if limit < 2**64 else np.ones(todo.size, dtype=bool)
        out[todo[keep]] = words[keep] % np.uint64(high)
        todo = todo[~keep]
    return out.astype(np.int64)


def uniform_integers(
    high: int,
    numel: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> Tensor:
    """``numel`` independent uniform integers in ``[0, high)``, int64 on ``device``.

    The DP layers' ghost-group draw: with ``secure_mode`` the draw comes from the OS CSPRNG, as
    the noise does (predictable groups would void the argument that one sample touches one group
    whatever the others); otherwise from ``generator`` (torch's global one by default).
    """
    if high < 1:
        raise ValueError(f"uniform_integers needs high >= 1, got {high}")
    if secure_mode:
        _refuse_seeded(generator)
        values = torch.from_numpy(_os_uniform_integers(high, numel))
        return values.to(device=device or "cpu")
    draw_device = _draw_device(generator, device)
    draw = torch.randint(high, (numel,), generator=generator, device=draw_device)
    return draw.to(device) if device is not None else draw
