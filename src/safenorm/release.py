"""Release a trained model's running statistics with differential privacy.

``running_mean`` / ``running_var`` of a BatchNorm trained on private data are a deterministic
summary of that data and ship in every checkpoint. :func:`release_statistics` replaces them by
statistics recomputed over a data loader with the Gaussian mechanism of ``DPBatchNorm``
(per-sample clipped sums plus Gaussian noise, public denominator) at a stated (epsilon, delta),
so the model can ship without raw batch statistics.

Mechanism, for each layer in execution order (recorded by one forward of the first batch; later
layers see inputs normalized with the already released statistics of earlier ones, so every
release depends on the data only through its own clipped sums and earlier releases; a model in
which a sample-coupling or unreleased-statistics layer runs before a released one is refused)::

    S_mu  = sum_i clip(m_i, R1) + N(0, sigma^2 R1^2 I)                mu~  = S_mu / D
    S_var = sum_i clip(w_i + (m_i - mu~)^2, R2) + N(0, sigma^2 R2^2 I)  var~ = max(S_var / D, floor)

with ``m_i, w_i`` the per-sample spatial mean and variance, ``D`` the public dataset size
(``len(data_loader.dataset)``; under add/remove neighbours it is treated as public, as Opacus
treats the expected batch size), bounds in RAW activation units. Each of the ``2 L`` releases
is a Gaussian mechanism with noise multiplier ``sigma`` on the full dataset (no subsampling);
together they are one Gaussian mechanism with ``mu = sqrt(2 L) / sigma``, whose exact
(epsilon, delta) curve (Balle and Wang 2018) calibrates ``sigma`` and is reported.

This is a separate privacy cost: add it to the training epsilon (basic composition) if the
model was trained with DP on the same data. The epsilon covers the statistics **given the
weights**: it says nothing about weights trained without DP, which are themselves a function of
the data. It assumes every sample appears at most once in the pass (loaders that sample with
replacement are refused, and a pass that yields more samples than the dataset holds raises
before anything is released).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from safenorm import functional as SF
from safenorm.audit import find_unsafe_layers
from safenorm.modules import DPBatchNorm, SafeBatchNormBase
from safenorm.noise import gaussian_noise

__all__ = [
    "StatisticsRelease",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_mu_for",
    "release_statistics",
]

DEFAULT_MEAN_CLIP_PER_CHANNEL = 2.0
DEFAULT_VAR_CLIP_PER_CHANNEL = 4.0


def _ndtr(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _bisect(f: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """Bracket ``(lo, hi)`` of width ~1e-13 around the root of a monotone ``f`` (the sign of
    ``f(lo)`` is kept at ``lo``)."""
    f_lo = f(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        if (f_mid > 0) == (f_lo > 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return lo, hi


def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a Gaussian mechanism with ``mu = sensitivity / noise std`` (exact)."""
    if mu == 0:
        return 0.0
    tail = _ndtr(-epsilon / mu - mu / 2)
    second = 0.0 if tail == 0.0 else math.exp(min(epsilon + math.log(tail), 700.0))
    return max(_ndtr(-epsilon / mu + mu / 2) - second, 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with ``gaussian_delta(mu, epsilon) <= delta``."""
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return _bisect(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi)[1]  # delta(eps) <= delta


def gaussian_mu_for(epsilon: float, delta: float) -> float:
    """The largest ``mu`` whose Gaussian mechanism is (epsilon, delta)-DP."""
    hi = 1.0
    while gaussian_delta(hi, epsilon) < delta:
        hi *= 2
    return _bisect(lambda m: gaussian_delta(m, epsilon) - delta, 0.0, hi)[0]  # delta <= target


@dataclass(frozen=True)
class StatisticsRelease:
    """What :func:`release_statistics` did and what it cost.

    Attributes:
        epsilon, delta: the privacy cost of the whole release.
        noise_multiplier: ``sigma`` of each Gaussian release.
        num_releases: ``2 x`` number of layers released.
        mu: the Gaussian-DP parameter of the composition, ``sqrt(num_releases) / sigma``.
        layers: qualified names of the layers whose statistics were replaced.
        dataset_size: the public denominator ``D``.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    num_releases: int
    mu: float
    layers: tuple[str, ...]
    dataset_size: int


class _StopForwardError(Exception):
    pass


def _model_input(batch: object) -> object:
    """The model's input in a loader batch: ``x`` or the first entry of ``(x, ...)``."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _layer_inputs(model: nn.Module, layer: nn.Module, data_loader: DataLoader):
    """Yield the inputs of ``layer`` for every batch (the model runs in eval mode)."""
    captured: list[Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach())
        raise _StopForwardError

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in data_loader:
            with contextlib.suppress(_StopForwardError):
                model(_model_input(batch))
            yield captured.pop()
    finally:
        handle.remove()


def _candidates(model: nn.Module, include_dp: bool) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (_BatchNorm, SafeBatchNormBase))
        and getattr(m, "running_mean", None) is not None
        and (include_dp or not isinstance(m, DPBatchNorm))
    ]


def _execution_order(model: nn.Module, data_loader: DataLoader) -> dict[nn.Module, list[int]]:
    """The call indices of every module in one eval-mode forward of the first batch."""
    calls: dict[nn.Module, list[int]] = {}
    counter = [0]

    def record(module: nn.Module, _args) -> None:
        calls.setdefault(module, []).append(counter[0])
        counter[0] += 1

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        batch = next(iter(data_loader))
        model(_model_input(batch))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _unreleased_influence(module: nn.Module) -> str | None:
    """Why ``module``, running before a layer being released, would make that release depend on
    other samples or on unreleased statistics (``None`` if it does not)."""
    if isinstance(module, (_BatchNorm, SafeBatchNormBase)) and module.running_mean is None:
        return "normalizes with batch statistics in eval mode (it couples samples)"
    own = [f for f in find_unsafe_layers(module) if f.name == ""]
    if own:
        return own[0].reason
    return None


def _release_order(
    model: nn.Module, layers: list[tuple[str, nn.Module]], data_loader: DataLoader
) -> list[tuple[str, nn.Module]]:
    """``layers`` in execution order; refuses a model in which a release would see raw data.

    Later releases see inputs normalized with the earlier layers' (already released) statistics,
    so every layer that runs before a released one must be released before it, be a DP layer
    with running statistics, or not depend on statistics at all.
    """
    calls = _execution_order(model, data_loader)
    names = {module: name for name, module in model.named_modules()}
    released = {module for _, module in layers}
    for name, layer in layers:
        if len(calls.get(layer, [])) > 1:
            raise ValueError(
                f"layer '{name}' runs {len(calls[layer])} times per forward: its statistics "
                "would mix inputs of different depths and each sample would count several "
                "times; give each call its own normalization layer"
            )
    ordered = sorted((pair for pair in layers if pair[1] in calls), key=lambda p: calls[p[1]][0])
    if len(ordered) < len(layers):
        unused = [name for name, layer in layers if layer not in calls]
        raise ValueError(f"layers {unused} do not run in the model's forward; nothing to release")
    last_release = calls[ordered[-1][1]][0] if ordered else 0
    for module, indices in calls.items():
        if module in released or indices[0] >= last_release:
            continue
        reason = _unreleased_influence(module)
        if reason is not None:
            later = [n for n, layer in ordered if calls[layer][0] > indices[0]]
            raise ValueError(
                f"layer '{names.get(module, '?')}' ({type(module).__name__}) runs before the "
                f"released layers {later} but {reason}: their releases would depend on other "
                "samples or on unreleased statistics. Convert it (e.g. to a DP layer with "
                "running statistics) or remove it first."
            )
    return ordered


def _refuse_eval_releases(model: nn.Module) -> None:
    """DP layers without running statistics release on every eval forward (unaccounted here)."""
    releasing = [
        name
        for name, m in model.named_modules()
        if isinstance(m, DPBatchNorm) and m.running_mean is None
    ]
    if releasing:
        raise ValueError(
            f"DP layers {releasing} have no running statistics, so every eval-mode forward of "
            "the model (including the passes of release_statistics) releases their batch "
            "statistics; construct them with track_running_stats=True"
        )


def _check_each_sample_once(data_loader: DataLoader) -> None:
    """Refuse loaders that can yield a sample twice in one pass (the sensitivity assumes once)."""
    sampler = getattr(data_loader, "sampler", None)
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    with_replacement = getattr(sampler, "replacement", False) or getattr(
        batch_sampler, "replacement", False
    )
    poisson = type(batch_sampler).__name__.startswith("UniformWithReplacement")
    if with_replacement or poisson:
        raise ValueError(
            "release_statistics needs every sample at most once per pass, but the data loader "
            "samples with replacement (or draws Poisson batches); pass a loader over the "
            "dataset with a sequential or shuffled (without replacement) sampler"
        )


@torch.no_grad()
def release_statistics(
    model: nn.Module,
    data_loader: DataLoader,
    epsilon: float,
    delta: float,
    *,
    clip_norm: float | None = None,
    var_clip_norm: float | None = None,
    var_floor: float = 1e-3,
    include_dp_layers: bool = False,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> StatisticsRelease:
    """Recompute the running statistics of every BatchNorm of ``model`` with DP, in place.

    Args:
        model: a trained model (plain ``nn.BatchNorm*d``, ghost, clipped or DP layers).
        data_loader: the private data (each batch ``x`` or ``(x, ...)``); every sample once.
            ``len(data_loader.dataset)`` is the public denominator.
        epsilon, delta: the budget of the whole release.
        clip_norm: ``R1``, L2 bound over channels of a sample's mean, in raw activation units.
            Default: ``2 sqrt(C)`` (2 per channel: activations of order 1 are kept)
        var_clip_norm: ``R2`` for the centred second moment. Default: ``4 sqrt(C)``
        var_floor: lower bound of the released variance (raw units). Default: 1e-3
        include_dp_layers: also recompute DP layers (their statistics are already private, so
            by default they are kept and cost nothing). Default: ``False``
        generator, secure_mode: the noise source (see :func:`safenorm.noise.gaussian_noise`).

    Returns:
        A :class:`StatisticsRelease` with the cost. ``running_var`` stores the released
        variance times ``DM / (DM - 1)`` (``nn.BatchNorm``'s unbiased convention).
    """
    layers = _candidates(model, include_dp_layers)
    if not layers:
        raise ValueError("the model has no normalization layer with running statistics")
    _check_each_sample_once(data_loader)
    _refuse_eval_releases(model)
    dataset_size = len(data_loader.dataset)
    num_releases = 2 * len(layers)
    mu = gaussian_mu_for(epsilon, delta)
    sigma = math.sqrt(num_releases) / mu
    was_training = model.training
    model.eval()
    try:
        layers = _release_order(model, layers, data_loader)
        for _, layer in layers:
            channels = layer.num_features
            r1 = clip_norm or DEFAULT_MEAN_CLIP_PER_CHANNEL * math.sqrt(channels)
            r2 = var_clip_norm or DEFAULT_VAR_CLIP_PER_CHANNEL * math.sqrt(channels)

            def noise(
                bound: float,
                device: torch.device,
                channels: int = channels,
            ) -> Tensor:
                draw = gaussian_noise(
                    (channels,), device=device, generator=generator, secure_mode=secure_mode
                )
                return draw.double() * (sigma * bound)

            total = None
            spatial = seen = 0
            for x in _layer_inputs(model, layer, data_loader):
                m, _ = SF.per_sample_moments(x.double())
                part = SF.clip_rows(m, r1).sum(0)
                total = part if total is None else total + part
                spatial, seen = SF.spatial_size(x), seen + x.shape[0]
            if seen > dataset_size:  # checked before any noise is added: nothing released yet
                raise ValueError(
                    f"the data loader yielded {seen} samples in one pass over a dataset of "
                    f"{dataset_size}: release_statistics needs every sample at most once"
                )
            mean = (total + noise(r1, total.device)) / dataset_size
            total = None
            for x in _layer_inputs(model, layer, data_loader):
                m, w = SF.per_sample_moments(x.double())
                part = SF.clip_rows(w + (m - mean) ** 2, r2).sum(0)
                total = part if total is None else total + part
            var = torch.clamp_min((total + noise(r2, total.device)) / dataset_size, var_floor)
            n = dataset_size * spatial
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_((var * n / max(n - 1, 1)).to(layer.running_var.dtype))
    finally:
        model.train(was_training)
    return StatisticsRelease(
        epsilon=gaussian_epsilon(mu, delta),
        delta=delta,
        noise_multiplier=sigma,
        num_releases=num_releases,
        mu=mu,
        layers=tuple(name for name, _ in layers),
        dataset_size=dataset_size,
    )
