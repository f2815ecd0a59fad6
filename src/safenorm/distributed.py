"""Multi-process training: sync the safenorm layers' statistics across ranks."""

from __future__ import annotations

from typing import Any

from torch import nn

from safenorm.modules import ClippedBatchNorm, DPBatchNorm

__all__ = ["convert_sync_statistics"]


def convert_sync_statistics(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every DP and clipped layer of ``module`` sync its statistics over ``process_group``.

    The analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: each layer all-reduces its
    per-sample-clipped sums (and, for the clipped layer, the batch sizes) so every rank
    normalizes with the statistics of the global batch; a DP layer's noise is added once (by the
    group's rank 0) and its ``expected_batch_size`` is the GLOBAL public batch size
    (``safenorm.opacus.PrivacyEngine`` sets it). The layers are modified in place (same
    Parameter and buffer objects), so existing optimizers keep working.

    Args:
        module: the model.
        process_group: a ``torch.distributed`` group. Default: the whole world.

    Returns:
        ``module``.

    Raises:
        ValueError: a layer uses ghost groups (they cannot be combined with syncing).
    """
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized; call init_process_group")
        process_group = dist.group.WORLD
    for name, layer in module.named_modules():
        if isinstance(layer, (DPBatchNorm, ClippedBatchNorm)):
            if layer.ghost_batch_size is not None:
                raise ValueError(
                    f"layer '{name}' uses ghost_batch_size={layer.ghost_batch_size}, which cannot "
                    "be combined with synced statistics; set ghost_batch_size=None first"
                )
            layer.process_group = process_group
    return module
