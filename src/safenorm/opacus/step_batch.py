"""Which statistics releases are made on the optimizer step's own Poisson batch.

A DP-SGD step is one Poisson-subsampled Gaussian mechanism only for the releases made on the
batch the DP data loader drew for that step (docs/OPACUS.md). :class:`StepBatchTracker` ties a
release to that batch: the DP data loader announces each batch it yields, the optimizer step
closes it, and a forward pre-hook on the private model checks each forward's inputs. A release
is on the step's batch when it is made inside a training-mode forward of the model, after the
loader yielded the batch and before the step, on an input that is one of the batch's tensors, a
device or dtype copy of one (compared by value), or a tensor declared as derived from it
(:meth:`StepBatchTracker.declare`). Every other release (an eval-mode pass over training data
with batch statistics, a recalibration pass, a forward on other data, a layer called outside the
model's forward) is filed as off the step's batch.

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


class StepBatchTracker:
    """Decides, for each statistics release, whether it is on the current step's batch.

    Args:
        model: the private model (its root forward is watched).
        on_new_batch: called when the loader yields a new batch, before it is tracked (the
            engine accounts releases of a batch that no optimizer step consumed).
    """

    def __init__(self, model: nn.Module, on_new_batch: Callable[[], None]) -> None:
        self._batch: list[Tensor] | None = None
        self._declared: list[Tensor] = []
        self._depth = 0
        self._forward_on_batch = False
        self._warned = False
        self._on_new_batch = on_new_batch
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_Hook(self._begin_forward), with_kwargs=True),
            model.register_forward_hook(_Hook(self._end_forward), always_call=True),
        ]

    # -- the loader and the optimizer ------------------------------------------------------------

    def open(self, batch: Any) -> None:
        """The DP data loader yielded ``batch``: the next step's releases are made on it."""
        self._on_new_batch()
        self._batch = _tensors(batch)
        self._declared = []

    def close(self) -> None:
        """The optimizer stepped: the batch is consumed."""
        self._batch = None
        self._declared = []

    def declare(self, tensor: Tensor) -> None:
        """Declare ``tensor`` an input computed sample by sample from the step's batch only."""
        if self._batch is None:
            raise RuntimeError(
                "declare_step_input: no batch of the DP data loader is open (draw a batch from "
                "the loader returned by make_private first)"
            )
        self._declared.append(tensor)

    # -- the model -------------------------------------------------------------------------------

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._depth == 0:
            self._forward_on_batch = (
                module.training and self._batch is not None and self._matches((args, kwargs))
            )
        self._depth += 1

    def _end_forward(self, *args: Any, **kwargs: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _matches(self, inputs: Any) -> bool:
        batch = self._batch or []
        for candidate in _tensors(inputs):
            if any(candidate is declared for declared in self._declared):
                return True
            if any(_same_values(candidate, original) for original in batch):
                return True
        return False

    def release_is_on_step_batch(self) -> bool:
        """Whether a release made now is on the step's batch (warns once when it is not)."""
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
