"""Batch normalization with differentially private (clipped and noised) statistics."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from safenorm import functional as SF
from safenorm.modules._base import SafeBatchNormBase, check_ghost_batch_size, resolve_bound
from safenorm.modules._ranks import ANY_RANK, COMMON_ARGS_DOC, RANK_1D, RANK_2D, RANK_3D, SHAPE_DOC
from safenorm.modules.clipped import (
    ClipReferenceName,
    check_reference,
    check_sync,
    clip_reference_of,
)
from safenorm.warnings import PrivacyWarning

__all__ = ["DPBatchNorm", "DPBatchNorm1d", "DPBatchNorm2d", "DPBatchNorm3d"]

# Bounds in units of the running statistics (RMS 1 per channel), the best recipe measured in
# DESIGN.md §3.1; the noise multiplier of each of the two releases per training forward.
DEFAULT_MEAN_CLIP_PER_CHANNEL = 1.0
DEFAULT_VAR_CLIP_PER_CHANNEL = 1.0
DEFAULT_NOISE_MULTIPLIER = 8.0
DEFAULT_VAR_FLOOR = 0.25

#: Gaussian releases made by one training-mode forward of one DP layer (mean, then variance).
RELEASES_PER_FORWARD = 2

ReleaseHook = Callable[["DPBatchNorm", int], None]


def _warn_unaccounted(message: str) -> None:
    if torch.compiler.is_compiling() and _trace_time_warn is not None:
        _trace_time_warn(message)
    else:
        warnings.warn(message, PrivacyWarning, stacklevel=7)


#: ``warnings.warn`` for compiled code (set at the first DP layer's construction, not at import:
#: torch._dynamo takes a second to load). torch.compile(fullgraph=True) cannot trace
#: ``warnings.warn`` but runs an ``assume_constant_result`` function once while tracing, so the
#: warning is issued when the graph of an unaccounted layer is built (attaching an accountant
#: changes the hooks, which recompiles).
_trace_time_warn: Callable[[str], bool] | None = None


def _prepare_trace_time_warning() -> None:
    global _trace_time_warn
    if _trace_time_warn is not None:
        return
    import torch._dynamo

    @torch._dynamo.assume_constant_result
    def warn(message: str) -> bool:
        warnings.warn(message, PrivacyWarning, stacklevel=2)
        return True

    _trace_time_warn = warn


class DPBatchNorm(SafeBatchNormBase):
    __doc__ = (
        r"""Batch normalization with differentially private batch statistics.

    Each training-mode forward makes two Gaussian releases about the batch, in units of the
    clipping reference ``(c, s)`` (the running statistics, which are themselves released values,
    or raw units)::

        S_mu  = sum_i clip((m_i - c) / s, R1) + N(0, sigma^2 R1^2 I)       mu~  = c + s S_mu / D
        S_var = sum_i clip((w_i + (m_i - mu~)^2) / s^2, R2) + N(0, sigma^2 R2^2 I)
        var~  = max(s^2 S_var / D, var_floor * s^2)

    ``D`` is public: ``expected_batch_size`` (under Poisson sampling the actual batch size is
    private; ``safenorm.opacus.PrivacyEngine`` sets it from the optimizer). Under add/remove
    neighbours each release has sensitivity ``R`` and noise ``sigma R``: a Gaussian mechanism with
    noise multiplier ``sigma``. The released ``mu~, var~`` are **detached**, so each sample's
    output depends only on its own input and on released numbers: per-sample gradients are exact
    and DP-SGD's clipping bound holds. Running statistics are an EMA of the released values only
    (post-processing). In training the output is normalized with the running statistics
    (``normalize_with="running"``, default when they are tracked, a free post-processing that
    averages the noise over steps) or with this batch's release (``"batch"``).

    With ``ghost_batch_size``, each sample draws its group independently and uniformly among
    ``G = round(D / ghost_batch_size)`` groups (never by position), so one sample changes one
    group's sums and the cost does not grow with ``G``.

    An empty batch (Poisson sampling) still makes a noise-only release when ``D`` is public:
    skipping it would reveal that the batch was empty. See docs/PRIVACY.md for the proof sketch
    and what is and is not protected.
"""
        + COMMON_ARGS_DOC
        + """        clip_norm: ``R1`` in reference units. Default: ``sqrt(num_features)``
        var_clip_norm: ``R2`` in reference units. Default: ``sqrt(num_features)``
        noise_multiplier: ``sigma`` of each release. Default: 8.0
        ghost_batch_size: target size of the independently drawn ghost groups. Default: ``None``
        expected_batch_size: the public denominator ``D``. Default: ``None``: the actual batch
            size is used, with a warning, which is DP only if batch sizes are public (fixed).
        clip_reference: ``"running"`` or ``"none"``. Default: ``"running"``
        normalize_with: ``"running"`` or ``"batch"``. Default: ``"running"`` when
            ``track_running_stats`` else ``"batch"``
        var_floor: lower bound of ``var~`` in units of ``s^2``: relative to the running
            variance with ``clip_reference="running"``, in raw activation units (``s = 1``)
            with ``"none"``. Default: 0.25
        generator: ``torch.Generator`` for the noise and the group draw (seed it to reproduce a
            run). Default: torch's global generator
        secure_mode: draw the noise from the OS CSPRNG (no generator allowed). Default: ``False``
        frozen_statistics: normalize with the (public, e.g. pre-trained) running statistics in
            training too: nothing is released, the buffers are never updated, the privacy cost
            is zero, and the affine parameters train with exact per-sample gradients.
            Default: ``False``
        process_group: sync the clipped sums over this ``torch.distributed`` group, noise added
            once (by the group's rank 0); ``expected_batch_size`` is then the global batch size.
            Default: ``None``
        var_release: ``"linear"`` (above) or ``"log"``: release the mean of each sample's
            clamped log second-moment ratio, so the variance can grow (or shrink) by up to
            ``exp(R2 / sqrt(C))`` per release and follows activations that grow; the same
            Gaussian mechanism with sensitivity ``R2`` (see
            :func:`safenorm.functional.private_statistics`). Needs spatial dimensions.
            Default: ``"linear"``
        project_gradient: in training, project each sample's input gradient (per channel)
            off ``span{1, x_i - mean(x_i)}``, InstanceNorm's backward direction
            (:func:`safenorm.functional.project_gradient_per_sample`); the forward is unchanged
            and per-sample gradients stay exact. Needs spatial dimensions. Default: ``False``
"""
        + SHAPE_DOC
    )

    _input_ranks = ANY_RANK
    # Class-level defaults: a layer pickled before these options existed loads with them off.
    var_release: str = "linear"
    project_gradient: bool = False
    _warned_log_noise: bool = False
    _variant_args: ClassVar[tuple[str, ...]] = (
        "clip_norm",
        "var_clip_norm",
        "noise_multiplier",
        "ghost_batch_size",
        "expected_batch_size",
        "clip_reference",
        "normalize_with",
        "var_floor",
        "secure_mode",
        "frozen_statistics",
        "var_release",
        "project_gradient",
    )

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
        clip_norm: float | None = None,
        var_clip_norm: float | None = None,
        noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
        ghost_batch_size: int | None = None,
        expected_batch_size: int | None = None,
        clip_reference: ClipReferenceName = "running",
        normalize_with: Literal["running", "batch"] | None = None,
        var_floor: float = DEFAULT_VAR_FLOOR,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        frozen_statistics: bool = False,
        process_group: Any = None,
        var_release: Literal["linear", "log"] = "linear",
        project_gradient: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        name = type(self).__name__
        check_reference(name, clip_reference)
        normalize_with = normalize_with or ("running" if track_running_stats else "batch")
        if normalize_with not in ("running", "batch"):
            raise ValueError(f"{name}: normalize_with must be 'running' or 'batch'")
        if normalize_with == "running" and not track_running_stats:
            raise ValueError(
                f"{name}: normalize_with='running' needs track_running_stats=True; "
                "use normalize_with='batch'"
            )
        if noise_multiplier < 0 or var_floor < 0:
            raise ValueError(f"{name}: noise_multiplier and var_floor must be >= 0")
        if secure_mode and generator is not None:
            raise ValueError(f"{name}: secure_mode cannot use a seeded generator")
        self.clip_norm = resolve_bound(clip_norm, DEFAULT_MEAN_CLIP_PER_CHANNEL, num_features)
        self.var_clip_norm = resolve_bound(
            var_clip_norm, DEFAULT_VAR_CLIP_PER_CHANNEL, num_features
        )
        self.noise_multiplier = float(noise_multiplier)
        check_ghost_batch_size(name, ghost_batch_size, optional=True)
        self.ghost_batch_size = ghost_batch_size
        self.expected_batch_size = expected_batch_size
        self.clip_reference = clip_reference
        self.normalize_with = normalize_with
        self.var_floor = float(var_floor)
        if var_release not in SF.VAR_RELEASES:
            raise ValueError(f"{name}: var_release must be one of {SF.VAR_RELEASES}")
        self.var_release = var_release
        self.project_gradient = bool(project_gradient)
        if var_release == "linear":  # the log release grows by exp(R2 / sqrt(C)) per release
            _warn_if_variance_cannot_grow(name, clip_reference, self.var_clip_norm, num_features)
        self.generator = generator
        self.secure_mode = secure_mode
        if frozen_statistics and not track_running_stats:
            raise ValueError(
                f"{name}: frozen_statistics=True needs running statistics "
                "(track_running_stats=True, loaded from public pre-training)"
            )
        self.frozen_statistics = frozen_statistics
        check_sync(name, process_group, ghost_batch_size)
        self.process_group = process_group
        #: Gaussian releases made so far (two per training-mode forward with batch statistics).
        self.release_count = 0
        self._release_hooks: OrderedDict[int, ReleaseHook] = OrderedDict()  # weakref-able
        self._warned_public_size = False
        self._warned_unaccounted = False
        self._warned_log_noise = False
        _prepare_trace_time_warning()
        #: ``(mean, var)`` this layer normalized with in its last forward, ``(C,)`` or ``(N, C)``
        #: (per-sample with DP ghost groups); released values, used by the per-sample gradients.
        self.last_statistics: tuple[Tensor, Tensor] | None = None

    # -- accounting ------------------------------------------------------------------------------

    def register_release_hook(self, hook: ReleaseHook) -> RemovableHandle:
        """Call ``hook(layer, num_releases)`` after every forward that releases statistics."""
        handle = RemovableHandle(self._release_hooks)
        self._release_hooks[handle.id] = hook
        return handle

    def _record_release(self) -> None:
        self.release_count += RELEASES_PER_FORWARD
        if not self._release_hooks and not self._warned_unaccounted:
            _warn_unaccounted(
                f"UNACCOUNTED PRIVACY COST: {self._describe()} released noised batch statistics "
                "(2 Gaussian releases per training forward) but no privacy accountant is "
                "attached to it, so no reported epsilon includes this cost. Train with "
                "safenorm.opacus.PrivacyEngine, or count the releases with "
                "safenorm.privacy.ReleaseLedger. (Copies and pickles of a layer, e.g. an "
                "AveragedModel / EMA copy, start unaccounted.)"
            )
            self._warned_unaccounted = True
        for hook in list(self._release_hooks.values()):
            hook(self, RELEASES_PER_FORWARD)

    # -- copies and pickles ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save(layer)`` carry: not the accounting.

        A copy (an ``AveragedModel`` / EMA copy, a pickled model) starts **unaccounted**: no
        release hooks (they would report to a copy of the ledger that nobody reads, silently),
        so its first releasing forward warns until an engine or ledger watches it. It carries no
        ``generator`` (from a seeded generator's state the noise, hence the exact clipped sums,
        can be regenerated; a copy draws from torch's global generator, or the CSPRNG in
        ``secure_mode``), no ``last_statistics`` and no inputs Opacus captured for a pending
        backward. Parameters, buffers and settings are kept. (Other layers of a model made
        private by Opacus hold such inputs and per-sample gradients too: save ``state_dict()``,
        or pickle a whole model only after ``optimizer.zero_grad()`` with no forward pending.)
        """
        state = self.__dict__.copy()
        state["_release_hooks"] = OrderedDict()
        state["generator"] = None
        state["last_statistics"] = None
        state["_warned_unaccounted"] = False
        # Opacus keeps each captured forward's inputs on the layer until the backward: raw data.
        for key in ("activations", "_safenorm_activation_count"):
            state.pop(key, None)
        return state

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        # Identity forward: on input without spatial dimensions, _check_input refuses next.
        if self.project_gradient and self.training and SF.spatial_size(input) >= 2:
            input = SF.project_gradient_per_sample(input)
        return super().forward(input)

    def _check_input(self, input: Tensor) -> None:
        super()._check_input(input)
        if self.training and SF.spatial_size(input) < 2:
            self._refuse_options_needing_space(input)

    def _checks_in_kernel(self, input: Tensor) -> bool:
        # The combine kernel fuses (and checks) the linear release only.
        return self.var_release == "linear" and super()._checks_in_kernel(input)

    def _warn_if_log_noise_is_heavy_tailed(self, denominator: float) -> None:
        # tau = sigma R2 / (D / G), public: the noise factor exp(N(0, tau^2)) of each release.
        groups = SF.dp_group_count(denominator, self.ghost_batch_size)
        tau = self.noise_multiplier * self.var_clip_norm * groups / max(denominator, 1e-30)
        if tau > MAX_LOG_NOISE_STD:
            warnings.warn(
                f"{self._describe()}: var_release='log' with noise std tau = sigma * "
                f"var_clip_norm / (D / groups) = {tau:.3g} in log units per release: the noise "
                "factor exp(N(0, tau^2)) is mean-one but heavy-tailed (most releases at the "
                "floor, rare ones many times the variance). Lower tau (a larger batch, fewer ghost "
                "groups, a smaller var_clip_norm, more budget for the statistics) or use "
                "var_release='linear'.",
                UserWarning,
                stacklevel=4,
            )
        self._warned_log_noise = True

    def _refuse_options_needing_space(self, input: Tensor) -> None:
        releases = self._uses_batch_statistics()
        for option, active in (
            ("var_release='log'", self.var_release == "log" and releases),
            ("project_gradient=True", self.project_gradient),
        ):
            if active:
                raise ValueError(
                    f"{self._describe()}: {option} needs input with spatial dimensions "
                    f"(N, C, *S), prod(S) >= 2, got shape {tuple(input.shape)}; on one value per "
                    "sample and channel use the defaults (var_release='linear', "
                    "project_gradient=False)"
                )

    def _denominator(self, input: Tensor, all_reduce: SF.AllReduce | None) -> float:
        if self.expected_batch_size is not None:
            return float(self.expected_batch_size)
        batch_size = torch.tensor(float(input.shape[0]), device=input.device)
        if all_reduce is not None:
            batch_size = all_reduce(batch_size)
        if not self._warned_public_size:
            warnings.warn(
                f"{self._describe()} has no expected_batch_size: it divides by the actual batch "
                "size, which is differentially private only if batch sizes are public (fixed-size "
                "batches, not Poisson sampling). Pass expected_batch_size=... or train with "
                "safenorm.opacus.PrivacyEngine, which sets it.",
                PrivacyWarning,
                stacklevel=4,
            )
            self._warned_public_size = True
        return float(batch_size)

    def _handles_empty_batch(self) -> bool:
        return self.expected_batch_size is not None or self.process_group is not None

    def _uses_batch_statistics(self) -> bool:
        return super()._uses_batch_statistics() and not self.frozen_statistics

    def _check_batch(self, input: Tensor) -> None:
        """One value per channel is fine: the denominator and the noise do not depend on it."""

    def _reference(self) -> SF.ClipReference:
        return clip_reference_of(self)

    def _batch_forward(self, input: Tensor) -> Tensor:
        all_reduce, add_noise = self._all_reduce()
        denominator = self._denominator(input, all_reduce)
        reference = self._reference()
        momentum = self._momentum_factor()
        running_mean, running_var = self._running_buffers()
        normalize_with = self.normalize_with if running_mean is not None else "batch"
        mean, var = SF.dp_release(
            input,
            running_mean,
            running_var,
            momentum,
            clip_norm=self.clip_norm,
            var_clip_norm=self.var_clip_norm,
            noise_multiplier=self.noise_multiplier,
            denominator=denominator,
            ghost_batch_size=self.ghost_batch_size,
            reference=reference,
            var_floor=self.var_floor,
            normalize_with=normalize_with,
            generator=self.generator,
            secure_mode=self.secure_mode,
            all_reduce=all_reduce,
            add_noise=add_noise,
            var_release=self.var_release,
        )
        self._record_release()
        # A utility warning, from eager code only.
        if self.var_release == "log" and not (
            self._warned_log_noise or torch.compiler.is_compiling()
        ):
            self._warn_if_log_noise_is_heavy_tailed(denominator)
        self.last_statistics = (mean, var)
        return SF.frozen_normalize(input, mean, var, self.weight, self.bias, self.eps)


#: Above this noise std (log units) per release the log variance release warns: its noise
#: factor exp(N(0, tau^2)) is then heavy-tailed (at tau = 4, 95% of releases sat at the floor
#: and one in 200 was 4e4 times the variance, measured).
MAX_LOG_NOISE_STD = 1.0

#: Below this many running-variance units per channel (RMS), the variance release cannot follow
#: activations that grow: training on digits diverged at 1/16, 1/4 and 1/2 of the default
#: ``var_clip_norm`` and stayed finite at 1x and 16x (examples/results/tight_bounds.md).
MIN_VAR_CLIP_PER_CHANNEL = 1.0


def _warn_if_variance_cannot_grow(
    name: str, clip_reference: str, var_clip_norm: float, num_features: int
) -> None:
    # Each release's variance is at most about R2 / sqrt(C) running-variance units per channel
    # (its public denominator cannot adapt, unlike the clipped layer's self-normalized one), so
    # a smaller bound keeps shrinking the running variance while the activations stay put.
    if clip_reference != "running":
        return
    if var_clip_norm < MIN_VAR_CLIP_PER_CHANNEL * math.sqrt(num_features):
        warnings.warn(
            f"{name}: var_clip_norm={var_clip_norm:g} is below "
            f"{MIN_VAR_CLIP_PER_CHANNEL} * sqrt(num_features): a released variance can then "
            "barely exceed the running one, the running variance shrinks whenever the bound "
            "binds, and training has been measured to diverge. Use var_clip_norm >= "
            f"{MIN_VAR_CLIP_PER_CHANNEL * math.sqrt(num_features):.3g} (default "
            f"{DEFAULT_VAR_CLIP_PER_CHANNEL:g} * sqrt(C)).",
            UserWarning,
            stacklevel=4,
        )


class DPBatchNorm1d(DPBatchNorm):
    __doc__ = DPBatchNorm.__doc__
    _input_ranks = RANK_1D


class DPBatchNorm2d(DPBatchNorm):
    __doc__ = DPBatchNorm.__doc__
    _input_ranks = RANK_2D


class DPBatchNorm3d(DPBatchNorm):
    __doc__ = DPBatchNorm.__doc__
    _input_ranks = RANK_3D
