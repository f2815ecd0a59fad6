"""State shared by every safenorm layer: parameters, buffers, state_dict compatibility, checks.

Mirrors ``torch.nn.modules.batchnorm._NormBase`` so that each layer has exactly the attributes and
state_dict keys of ``nn.BatchNorm*d``, without subclassing torch's private base class: code that
tests ``isinstance(m, nn.modules.batchnorm._BatchNorm)`` (Opacus' ``ModuleValidator.fix``,
batch-norm freezing helpers) must not mistake a safenorm layer for a plain BatchNorm.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from safenorm import functional as SF
from safenorm import ops
from safenorm.functional import normalize

__all__ = ["SafeBatchNormBase"]


class SafeBatchNormBase(nn.Module):
    """Base class of the safenorm layers (not used directly).

    Subclasses set ``_input_ranks`` and implement :meth:`_batch_forward`.
    """

    # version 2: num_batches_tracked buffer (as nn.BatchNorm); older dicts get it filled with 0.
    _version = 2
    _input_ranks: ClassVar[tuple[int, ...]] = (2, 3, 4, 5)
    _variant_args: ClassVar[tuple[str, ...]] = ()
    #: Verify after each training forward that the running statistics are finite; on failure
    #: they are restored and a ValueError names the layer.
    check_statistics: ClassVar[bool] = True
    #: On CUDA, restore the buffers on the device and raise at the layer's next forward, so the
    #: check never makes the host wait for the GPU (the step in between may already have applied
    #: non-finite gradients). ``False``: check at once, with one host sync per forward. Inside
    #: ``torch.compile`` or a CUDA graph capture the buffers are restored on the device and nothing
    #: is raised.
    defer_statistics_check: ClassVar[bool] = True

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}"
            )
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.layer_name: str | None = None
        self._pending_check: _DeferredCheck | None = None
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- state -----------------------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        base = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        variant = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._variant_args)
        return f"{base}, {variant}" if variant else base

    # -- checks ----------------------------------------------------------------------------------

    def _describe(self) -> str:
        name = type(self).__name__
        return f"{name} '{self.layer_name}'" if self.layer_name else name

    def _check_input(self, input: Tensor) -> None:
        if input.dim() not in self._input_ranks:
            expected = " or ".join(f"{r}D" for r in self._input_ranks)
            raise ValueError(
                f"{self._describe()}: expected {expected} input (got {input.dim()}D input)"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._describe()}: input has {input.shape[1]} channels (shape "
                f"{tuple(input.shape)}) but the layer was built with num_features="
                f"{self.num_features}; construct it with num_features={input.shape[1]} or fix "
                "the layer before it"
            )
        if not input.is_floating_point():
            raise ValueError(
                f"{self._describe()}: expected floating-point input, got {input.dtype}"
            )

    # -- forward ---------------------------------------------------------------------------------

    def _momentum_factor(self) -> float:
        """The running-update weight of this forward; increments ``num_batches_tracked``."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _running_buffers(self) -> tuple[Tensor | None, Tensor | None]:
        """Buffers to update (training and tracking) or ``None`` (not updated)."""
        if self.training and self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _all_reduce(self) -> tuple[SF.AllReduce | None, bool]:
        """``(all_reduce, add_noise)`` for this process: sums over ``self.process_group``.

        Without a process group, ``(None, True)``. With one, the sums are reduced with the
        differentiable ``torch.distributed.nn.functional.all_reduce`` and only its rank 0 adds
        noise, so the global sum carries the noise exactly once (as ``nn.SyncBatchNorm`` syncs
        plain statistics).
        """
        group = getattr(self, "process_group", None)
        if group is None:
            return None, True
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{self._describe()} has a process_group but torch.distributed is not "
                "initialized; call torch.distributed.init_process_group first or pass "
                "process_group=None"
            )
        return (lambda t: all_reduce(t, group=group)), dist.get_rank(group) == 0

    def _uses_batch_statistics(self) -> bool:
        return self.training or self.running_mean is None

    def _empty_forward(self, input: Tensor) -> Tensor:
        """Empty output connected to the affine parameters; buffers untouched."""
        zeros = input.new_zeros(self.num_features, dtype=torch.float32)
        return normalize(input, zeros, zeros + 1, self.weight, self.bias, self.eps)

    def _handles_empty_batch(self) -> bool:
        """Whether :meth:`_batch_forward` runs on ``N = 0`` (the DP layers' noise-only release)."""
        return False

    def _check_batch(self, input: Tensor) -> None:
        """Batch statistics need more than one value per channel (as in ``nn.BatchNorm``)."""
        if input.numel() == self.num_features:
            raise ValueError(
                f"{self._describe()}: expected more than 1 value per channel when training, got "
                f"input of shape {tuple(input.shape)}; use a batch of at least 2 samples or "
                "eval mode"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        self._raise_if_earlier_statistics_failed()
        if not self._uses_batch_statistics():
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        if input.shape[0] == 0 and not self._handles_empty_batch():
            return self._empty_forward(input)
        self._check_batch(input)
        if not (self.check_statistics and self.training and self.track_running_stats):
            return self._batch_forward(input)
        if self._checks_in_kernel(input):
            return self._forward_checked_in_kernel(input)
        buffers = (self.running_mean, self.running_var, self.num_batches_tracked)
        before = [b.clone() for b in buffers]
        output = self._batch_forward(input)
        finite = torch.isfinite(self.running_mean).all() & torch.isfinite(self.running_var).all()
        # Compiled graphs and CUDA graph replays have no host side to report from.
        in_graph = torch.compiler.is_compiling() or (
            input.is_cuda and torch.cuda.is_current_stream_capturing()
        )
        if in_graph or self._defers_check(input):
            for buffer, saved in zip(buffers, before, strict=True):
                # Eager: through .data, so the restore does not bump the version counter of
                # buffers the native batch norm saved for its backward (it reads them there).
                target = buffer if torch.compiler.is_compiling() else buffer.data
                target.copy_(torch.where(finite, buffer, saved))
            if not in_graph:
                self._pending_check = _DeferredCheck(finite)
            return output
        if not bool(finite):
            for buffer, saved in zip(buffers, before, strict=True):
                buffer.copy_(saved)
            raise ValueError(self._nonfinite_message("are"))
        return output

    def _checks_in_kernel(self, input: Tensor) -> bool:
        """Whether this forward's running update runs in the combine kernel, with the check."""
        return getattr(self, "process_group", None) is None and ops.checks_in_kernel(input)

    def _forward_checked_in_kernel(self, input: Tensor) -> Tensor:
        """The check folded into the combine kernel: it writes the running statistics only if
        they are finite (else keeps them and undoes the counter's increment) and sets a flag."""
        with ops.statistics_check(self.num_batches_tracked) as check:
            output = self._batch_forward(input)
        if check.finite is None:  # a path without the kernel (an input without values)
            running = (self.running_mean, self.running_var)
            check.finite = torch.isfinite(torch.cat(running)).all()
        if input.is_cuda and torch.cuda.is_current_stream_capturing():
            return output  # a graph replay has no host side to report from; buffers are kept
        if self._defers_check(input):
            self._pending_check = _DeferredCheck(check.finite)
        elif not bool(check.finite):
            raise ValueError(self._nonfinite_message("are"))
        return output

    def _defers_check(self, input: Tensor) -> bool:
        """Check the statistics one forward late (CUDA: a host sync would stall the GPU)."""
        return self.defer_statistics_check and input.is_cuda

    def _raise_if_earlier_statistics_failed(self) -> None:
        pending, self._pending_check = getattr(self, "_pending_check", None), None
        if pending is not None and pending.failed():
            raise ValueError(
                self._nonfinite_message("of the previous training forward were")
                + " (checked one forward late on CUDA: parameters may have taken a non-finite "
                "step since; set defer_statistics_check = False to check at once)"
            )

    def _nonfinite_message(self, which: str) -> str:
        return (
            f"{self._describe()}: batch statistics {which} NaN or infinite; the input (or an "
            "earlier layer) produced non-finite values. Check the data, the learning rate and "
            "the layers before this one; the running statistics were left unchanged"
        )

    def _batch_forward(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    # -- conversion ------------------------------------------------------------------------------

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kwargs: Any) -> SafeBatchNormBase:
        """Build this layer from a BatchNorm, sharing its Parameter and buffer objects.

        Keeps weights, buffers, device, dtype, ``requires_grad`` and the train/eval flag, so an
        optimizer that already holds ``bn``'s parameters keeps working.

        Args:
            bn: an ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, a subclass, or another
                safenorm layer.
            **kwargs: this class's own keyword arguments (e.g. ``clip_norm``), and ``eps`` or
                ``momentum`` to override the converted layer's.
        """
        fixed = {"num_features", "affine", "track_running_stats", "bias", "device", "dtype"}
        if fixed & set(kwargs):
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: {sorted(fixed & set(kwargs))} come from the "
                "converted layer and cannot be overridden (eps and momentum can)"
            )
        eps, momentum = kwargs.pop("eps", bn.eps), kwargs.pop("momentum", bn.momentum)
        has_bias = getattr(bn, "bias", None) is not None
        new = cls(
            bn.num_features,
            eps,
            momentum,
            bn.affine,
            bn.track_running_stats,
            device="meta",
            bias=has_bias or not bn.affine,
            **kwargs,
        )
        for name in ("weight", "bias"):
            new._parameters[name] = bn._parameters.get(name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers.get(name)
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def check_ghost_batch_size(layer: str, value: int | None, *, optional: bool) -> None:
    """Refuse a ghost batch size that is not a positive int (``None`` only if ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{layer}: ghost_batch_size must be a positive int, got {value!r}")


def resolve_bound(value: float | None, default_per_channel: float, num_features: int) -> float:
    """A clip bound: the user's value, or ``default_per_channel * sqrt(C)`` (RMS per channel)."""
    if value is None:
        return default_per_channel * math.sqrt(num_features)
    if not value > 0:
        raise ValueError(f"clip bounds must be positive (math.inf disables clipping), got {value}")
    return float(value)


class _DeferredCheck:
    """A finiteness flag on its way to the host, read (without stalling) one forward later."""

    def __init__(self, finite: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if finite.is_cuda:
            # Same dtype as the flag: one copy, no conversion on the device first.
            self._host = torch.empty((), dtype=finite.dtype, pin_memory=True)
            self._host.copy_(finite, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = finite.clone()

    def failed(self) -> bool:
        if self._event is not None:
            self._event.synchronize()  # recorded a forward ago: normally long complete
        return not bool(self._host)

    def __reduce__(self) -> tuple:
        # Copies and pickles of a layer drop a check in flight (CUDA events do not pickle).
        return (_no_check, ())


def _no_check() -> None:
    return None
