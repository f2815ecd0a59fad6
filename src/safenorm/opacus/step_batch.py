"""Which statistics releases are made on the optimizer step's own Poisson batch.

A DP-SGD step is one Poisson-subsampled Gaussian mechanism only for the releases made on the
batch the DP data loader drew for that step (docs/OPACUS.md). :class:`StepBatchTracker` ties a
release to that batch: the DP data loader announces each batch it yields, the optimizer step
closes it, and a forward pre-hook on the private model checks each forward's inputs. A release
is on the step's batch when it is made inside a training-mode forward of the model, after the
loader yielded the batch and before the step, and every input tensor of that forward is one of
the batch's tensors, a device or dtype copy of one (compared by value), or a tensor declared as
computed row by row from it (:meth:`StepBatchTracker.declare`). Data held inside the model (a
stored reference batch, a memory bank) cannot be seen: keep it out of DP layers' inputs.
Every other release (an eval-mode pass over training data with batch statistics, a
recalibration pass, a forward on other data, a layer called outside the model's forward) is
filed as off the step's batch. Releases on a batch that no step consumed (a forward, then the
next batch) stay pending and compose into the next step (merging releases on independent
Poisson batches into one subsampled mechanism can only over-state their cost).

The hooks do not travel with copies or pickles of the model: a copy carries inert hooks, and
never the current batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from safenorm.warnings import PrivacyWarning

__all__ = ["StepBatchTracker", "track_loader_batches"]


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]


def _same_values(candidate: Tensor, original: Tensor) -> bool:
    if candidate is original:
        return True
    if candidate.shape != original.shape:
        return False
    copied = original.to(device=candidate.device, dtype=candidate.dtype)
    return bool(torch.equal(candidate.detach(), copied))


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    return None


def _inert() -> Callable[..., None]:
    return _inert_hook


class _Hook:
    """A hook that copies and pickles of the model receive as an inert function."""

    def __init__(self, call: Callable[..., None]) -> None:
        self._call = call

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._call(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return (_inert, ())


#: Batches the loader yielded since the last optimizer step that are kept for matching (a
#: prefetching input pipeline draws a batch or two ahead of the forward that uses it).
MAX_OPEN_BATCHES = 4


class StepBatchTracker:
    """Decides, for each statistics release, whether it is on a batch of the DP data loader that
    the next optimizer step consumes.

    Args:
        model: the private model (its root forward is watched).
    """

    def __init__(self, model: nn.Module) -> None:
        self._open: list[list[Tensor]] = []
        self._used: list[list[Tensor]] = []
        self._declared: list[Tensor] = []
        self._depth = 0
        self._forward_on_batch = False
        self._warned = False
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_Hook(self._begin_forward), with_kwargs=True),
            model.register_forward_hook(_Hook(self._end_forward), always_call=True),
        ]

    # -- the loader and the optimizer ------------------------------------------------------------

    def open(self, batch: Any) -> None:
        """The DP data loader yielded ``batch``: releases on it compose with the next step."""
        self._open.append(_tensors(batch))
        del self._open[:-MAX_OPEN_BATCHES]

    def close(self) -> None:
        """The optimizer stepped: the batches its forwards used are consumed (batches drawn
        ahead by a prefetcher stay open)."""
        self._open = [b for b in self._open if not any(b is used for used in self._used)]
        self._used = []
        self._declared = []

    @property
    def has_open_batch(self) -> bool:
        """Whether the loader yielded a batch that no optimizer step has consumed yet."""
        return bool(self._open)

    def declare(self, tensor: Tensor) -> None:
        """Declare ``tensor`` an input computed sample by sample from an open batch: one row per
        sample of that batch, in its order (an augmented copy, not extra views or chunks)."""
        sizes = {len(t) for b in self._open for t in b[:1] if t.dim() > 0}
        if not sizes:
            raise RuntimeError(
                "declare_step_input: no batch of the DP data loader is open (draw a batch from "
                "the loader returned by make_private first)"
            )
        if tensor.dim() == 0 or len(tensor) not in sizes:
            raise ValueError(
                f"declare_step_input: the tensor has {len(tensor) if tensor.dim() else 0} rows "
                f"but the open batch has {sorted(sizes)}; a declared input must hold exactly one "
                "row per sample of the batch (several augmented views per sample, or chunks of "
                "the batch, change the releases' sensitivity: run one forward per view instead)"
            )
        self._declared.append(tensor)

    # -- the model -------------------------------------------------------------------------------

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._depth == 0:
            batch = self._matching_batch((args, kwargs)) if module.training else None
            self._forward_on_batch = batch is not None
            if batch is not None and not any(batch is used for used in self._used):
                self._used.append(batch)
        self._depth += 1

    def _end_forward(self, *args: Any, **kwargs: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _matching_batch(self, inputs: Any) -> list[Tensor] | None:
        """The open batch that EVERY input tensor (with a batch dimension) comes from: the
        batch's tensor, a device/dtype copy of it, or a declared tensor. One input from
        anywhere else (a reference batch, a memory bank) makes the whole forward off-batch."""
        candidates = [t for t in _tensors(inputs) if t.dim() > 0]
        if not candidates:
            return None
        declared = [d for d in self._declared if any(d is c for c in candidates)]
        for batch in reversed(self._open):
            if all(
                any(c is d for d in declared)
                or any(_same_values(c, original) for original in batch)
                for c in candidates
            ):
                return batch
        return None

    def release_is_on_step_batch(self) -> bool:
        """Whether a release made now is on an open batch (warns once when it is not)."""
        on_batch = self._depth > 0 and self._forward_on_batch
        if not on_batch and not self._warned:
            warnings.warn(
                "a DP layer released statistics outside a training-mode forward of the private "
                "model on the current batch of the DP data loader (e.g. an eval pass with batch "
                "statistics, a BatchNorm recalibration pass, a forward on other data, or a "
                "forward on an augmented copy of the batch). Such releases are not subsampled "
                "with the step: each is accounted as a Gaussian on the whole dataset with "
                "sensitivity 2R (noise multiplier sigma/2), which costs much more. If the input "
                "is computed sample by sample from the step's batch, pass it to "
                "engine.declare_step_input(x) before the forward.",
                PrivacyWarning,
                stacklevel=8,
            )
            self._warned = True
        return on_batch

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


_TRACKED_CLASSES: dict[type, type] = {}


def track_loader_batches(loader: DataLoader, tracker: StepBatchTracker) -> None:
    """Make ``loader`` announce every batch it yields to ``tracker`` (in place; the loader keeps
    its class as a base, so ``isinstance`` checks still hold)."""
    base = type(loader)
    if base in _TRACKED_CLASSES.values():  # made private again: only the tracker changes
        loader._safenorm_step_batches = tracker
        return
    if base not in _TRACKED_CLASSES:

        def __iter__(self):  # noqa: N807
            for batch in base.__iter__(self):
                self._safenorm_step_batches.open(batch)
                yield batch

        _TRACKED_CLASSES[base] = type(base.__name__, (base,), {"__iter__": __iter__})
    loader._safenorm_step_batches = tracker
    loader.__class__ = _TRACKED_CLASSES[base]
