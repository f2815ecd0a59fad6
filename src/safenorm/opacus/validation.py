"""What safenorm's PrivacyEngine refuses before training, and why.

Opacus' own validator matches exact types and checks "trainable layer with buffers"; it rejects
the DP layers (they have running buffers, which hold only released values) and misses several
batch-coupling cases (``BatchNorm2d(affine=False)``, frozen BatchNorm left in train mode,
subclasses of BatchNorm). Here every layer that couples samples is rejected with the conversion
to apply (via :func:`safenorm.find_unsafe_layers`), every plain BatchNorm is rejected as Opacus
does, and the buffer check is kept for every other layer.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from safenorm.audit import find_unsafe_layers
from safenorm.modules import DPBatchNorm, SafeBatchNormBase

__all__ = ["BufferWriteGuard", "CouplingLayerError", "check_functorch_coverage", "validate_model"]

_CONVERT = (
    'safenorm.convert_batchnorm(model, "dp") (DPBatchNorm: noised statistics, accounted by this '
    "engine)"
)
_FROZEN = (
    'safenorm.convert_batchnorm(model, "dp", frozen_statistics=True) (normalize with the '
    "pre-trained running statistics; no privacy cost)"
)


class CouplingLayerError(UnsupportedModuleError):
    """The model has layers that couple samples (or are otherwise unusable for DP-SGD)."""


def _coupling_messages(module: nn.Module) -> list[str]:
    findings = find_unsafe_layers(module)
    messages = [
        f"{f.name or '<root>'} ({f.layer}): {f.reason} Convert it with {f.fix}."
        for f in findings
        if f.kind == "couples-samples"
    ]
    flagged = {m.split(" (", 1)[0] for m in messages}
    for name, layer in module.named_modules():
        if isinstance(layer, _BatchNorm) and (name or "<root>") not in flagged:
            flagged.add(name or "<root>")
            messages.append(
                f"{name or '<root>'} ({type(layer).__name__}): a BatchNorm in eval mode still "
                "ships running statistics of unknown provenance and becomes sample-coupling as "
                f"soon as it is put in train mode. Convert it with {_FROZEN} if its statistics "
                f"come from public pre-training, or {_CONVERT}."
            )
    # Layers that do not couple samples but whose training forward writes a raw summary of the
    # data into buffers that ship in the checkpoint (InstanceNorm with running statistics).
    messages += [
        f"{f.name or '<root>'} ({f.layer}): {f.reason} Its training forward writes them from the "
        f"private data with no accounting. Fix: {f.fix}."
        for f in findings
        if f.kind == "releases-statistics" and (f.name or "<root>") not in flagged
    ]
    return messages


def _buffer_messages(module: nn.Module) -> list[str]:
    # Opacus' GradSampleHooks.validate, except that DP layers' buffers hold released values only.
    return [
        f"{name} ({type(layer).__name__}): a trainable layer with buffers, which Opacus does not "
        "support (its buffers are not private)"
        for name, layer in trainable_modules(module)
        if not isinstance(layer, DPBatchNorm)
        and any(
            True
            for sub in layer.modules()
            if not isinstance(sub, DPBatchNorm)
            for _ in sub.buffers(recurse=False)
        )
    ]


def validate_model(module: nn.Module) -> None:
    """Raise :class:`CouplingLayerError` listing every layer unusable for DP-SGD.

    Runs safenorm's coupling checks, Opacus' registered validators (``ModuleValidator``) and
    Opacus' buffer check with DP layers exempted.
    """
    messages = _coupling_messages(module)
    opacus_errors = [
        e
        for e in ModuleValidator.validate(module, strict=False)
        if "BatchNorm cannot support" not in str(e)  # reported above, with the conversion
    ]
    messages += [str(e) for e in opacus_errors]
    messages += _buffer_messages(module)
    if messages:
        raise CouplingLayerError(
            "safenorm.opacus.PrivacyEngine cannot train this model with DP-SGD:\n  - "
            + "\n  - ".join(messages)
        )


def check_functorch_coverage(module: nn.Module, force_functorch: bool = False) -> None:
    """Refuse normalization layers that Opacus would hand to its functorch fallback.

    Opacus computes per-sample gradients of a module without a registered grad sampler (and of
    everything inside it) by re-running it one sample at a time with functorch; for a DP or
    BatchNorm layer inside such a module that re-run would make extra, unaccounted releases (or
    compute batch statistics of one sample), so it is never allowed silently.
    """
    problems = []
    for name, layer in module.named_modules():
        if not any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        if type(layer) in (DPRNN, DPLSTM, DPGRU):
            continue
        if not force_functorch and type(layer) in GradSampleHooks.GRAD_SAMPLERS:
            continue
        inner = [
            f"{name}.{sub}" if name else sub
            for sub, m in layer.named_modules()
            if isinstance(m, (SafeBatchNormBase, _BatchNorm)) and (sub or force_functorch)
        ]
        if inner:
            problems.append(
                f"{name or '<root>'} ({type(layer).__name__}) has no registered grad sampler, so "
                f"Opacus would compute it with functorch, including its normalization layers "
                f"{inner}; move its own parameters into a submodule or register a grad sampler"
            )
    if problems:
        raise CouplingLayerError(
            "per-sample gradients of these layers would silently go through functorch:\n  - "
            + "\n  - ".join(problems)
        )


class BufferWriteGuard:
    """Refuses training that writes data into the buffers of a layer other than a DP layer.

    Registered layer types that write statistics (BatchNorm, InstanceNorm with running
    statistics) are refused before training by :func:`validate_model`; a custom layer that writes
    a buffer from its input would ship a raw summary of the private data in every checkpoint,
    unaccounted. The guard snapshots every buffer of every non-DP layer (any dtype) when the model
    is made private; :meth:`check` (run by the engine at every optimizer step, before the step is
    accounted) raises if a buffer's value changed, a buffer was replaced by a different value, or
    a buffer was registered since. Values are compared (not version counters, which writes
    through ``.data`` bypass), on the buffer's device, so a model moved with ``.to()`` after
    ``make_private`` is not flagged for the move alone.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if not isinstance(m, DPBatchNorm)]
        self._names = {id(m): name for name, m in model.named_modules()}
        self._snapshots: dict[tuple[int, str], Tensor | None] = {
            (id(layer), key): None if buffer is None else buffer.detach().clone()
            for layer in self._layers
            for key, buffer in layer._buffers.items()
        }

    def _change(self, layer: nn.Module, key: str, buffer: Tensor | None) -> bool | Tensor:
        """Whether the buffer was written: a host bool when its presence or shape tells, else a
        0-d bool tensor on the buffer's device (read for all buffers at once, one sync)."""
        marker = (id(layer), key)
        if marker not in self._snapshots:
            return True  # registered after make_private
        snapshot = self._snapshots[marker]
        if buffer is None or snapshot is None:
            return (buffer is None) != (snapshot is None)
        if buffer.shape != snapshot.shape:
            return True
        return (buffer.detach() != snapshot.to(buffer.device, buffer.dtype)).any()

    def check(self) -> None:
        """Raise :class:`CouplingLayerError` naming every buffer that was written."""
        written: list[str] = []
        by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for layer in self._layers:
            name = self._names.get(id(layer), "")
            for key, buffer in layer._buffers.items():
                label = f"{name}.{key}" if name else key
                change = self._change(layer, key, buffer)
                if isinstance(change, Tensor):
                    by_device.setdefault(change.device, []).append((label, change))
                elif change:
                    written.append(label)
        for flags in by_device.values():
            changed = torch.stack([flag for _, flag in flags]).cpu().tolist()
            written += [label for (label, _), hit in zip(flags, changed, strict=True) if hit]
        if written:
            raise CouplingLayerError(
                "these buffers were written during DP training: "
                + ", ".join(written)
                + ". A layer that stores values computed from its input ships a raw summary of "
                "the private data in every checkpoint, with no privacy accounting. Stop the layer "
                "from writing them in training (e.g. track_running_stats=False), or use a "
                "safenorm DP layer for running statistics."
            )


def _is_distributed(model: nn.Module, optimizer: object) -> bool:
    from opacus.optimizers import DistributedDPOptimizer

    from_wrapper = isinstance(model, nn.parallel.DistributedDataParallel)
    return from_wrapper or isinstance(optimizer, DistributedDPOptimizer)


def check_distributed_sync(model: nn.Module, optimizer: object) -> None:
    """Refuse DP layers that release per rank under distributed DP-SGD.

    Opacus' distributed sampler assigns samples to ranks by a public, seeded permutation of the
    whole dataset: adding one sample reassigns most of the others, so a release computed on one
    rank's share has unbounded sensitivity. Only releases synced over every rank (clipped sums
    all-reduced, noise added once: ``safenorm.distributed.convert_sync_statistics``) are the
    single-process mechanism on the global batch.
    """
    if not _is_distributed(model, optimizer):
        return
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    unsynced = [
        name or "<root>"
        for name, layer in model.named_modules()
        if isinstance(layer, DPBatchNorm)
        and not layer.frozen_statistics
        and (layer.process_group is None or dist.get_world_size(layer.process_group) != world)
    ]
    if unsynced:
        raise CouplingLayerError(
            f"distributed DP-SGD with DP layers that are not synced over all {world} ranks: "
            f"{', '.join(unsynced)}. Each rank's share of a batch comes from a public "
            "permutation of the whole dataset, so one added or removed sample moves most others "
            "to another rank and a per-rank release has unbounded sensitivity. Sync them first: "
            "model = safenorm.distributed.convert_sync_statistics(model) (clipped sums "
            "all-reduced over the default group, noise added once)."
        )
