"""Backend selection: which implementation of the primitives runs on a tensor.

:func:`set_backend` (or the environment variable ``SAFENORM_BACKEND``, read at import):

* ``"auto"`` (default): the Triton kernels on CUDA tensors when Triton is installed (float64
  stays on PyTorch), the custom ops whenever ``torch.compile`` is tracing, and otherwise
  (eager CPU) the reference math of :mod:`safenorm.functional`.
* ``"torch"``: always :mod:`safenorm.functional`.
* ``"triton"``: always the Triton kernels; on CPU only under ``TRITON_INTERPRET=1`` (the Triton
  interpreter, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "get_backend",
    "kernel_modules",
    "kernels_available",
    "routes",
    "set_backend",
    "use_backend",
    "use_kernels",
]

BACKENDS = ("auto", "torch", "triton")
#: Environment variable read at import: the initial backend.
BACKEND_ENV = "SAFENORM_BACKEND"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown safenorm backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = _check_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Select ``"auto"``, ``"torch"`` or ``"triton"`` for every safenorm layer (process-wide)."""
    global _backend
    _backend = _check_backend(name)


def get_backend() -> str:
    """The backend selected by :func:`set_backend` (or ``SAFENORM_BACKEND``)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: select a backend for the duration of a block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def kernel_modules() -> SimpleNamespace | None:
    """The modules of :mod:`safenorm.kernels`, or ``None`` without Triton."""
    if not kernels_available():
        return None
    from safenorm.kernels import batch_norm, combine, moments, normalize

    return SimpleNamespace(
        moments=moments, normalize=normalize, batch_norm=batch_norm, combine=combine
    )


@functools.cache
def kernels_available() -> bool:
    """Whether Triton and the safenorm kernels can be imported."""
    try:
        from safenorm.kernels import batch_norm, combine, moments, normalize  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_kernels(x: Tensor) -> bool:
    """Run the Triton kernels on ``x`` (inside a primitive; else its PyTorch implementation)?"""
    if _backend == "torch" or x.dtype not in _KERNEL_DTYPES or not kernels_available():
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _backend == "triton" and _interpreting()


def routes(x: Tensor) -> bool:
    """In a layer function of :mod:`safenorm.functional`: hand the work to these primitives?

    True when compiling (the custom ops, whatever the device) or when the kernels run on ``x``;
    the reference math otherwise. The ``"triton"`` backend refuses tensors it cannot run.
    """
    if _backend == "torch":
        return False
    if torch.compiler.is_compiling():
        return True
    if _backend == "triton":
        if not kernels_available():
            raise RuntimeError(
                "safenorm backend 'triton' needs Triton (pip install safenorm[triton]); "
                "use set_backend('auto') or 'torch'"
            )
        if x.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"safenorm backend 'triton' runs on CUDA tensors, got a {x.device.type} tensor; "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
            )
    return use_kernels(x)
