"""Privacy accounting of DP-SGD with DP statistics: sigma_eff, release counting, calibration.

Pure math and bookkeeping; no Opacus import (``safenorm.opacus`` builds on this module).

Within one DP-SGD step, the gradient release (noise multiplier ``sigma_g``) and every statistics
release made on the same Poisson sample are Gaussian mechanisms on the same data. Gaussian
mechanisms compose adaptively to one Gaussian mechanism with ``mu = sqrt(sum_r mu_r^2)``
(``mu_r = 1 / sigma_r``; Dong, Roth, Su 2019, Cor. 3.3), so the step is ONE Poisson-subsampled
Gaussian mechanism with noise multiplier

    sigma_eff = (1 / sigma_g^2 + sum_r 1 / sigma_r^2) ^ (-1/2)

and it is fed to the accountant as ``accountant.step(noise_multiplier=sigma_eff,
sample_rate=q)``. Adding the releases as separate accountant entries would model independent
subsamples and under-report epsilon (docs/OPACUS.md).

The RDP functions here (integer orders, Mironov, Talwar, Zhang 2019) give a self-contained
epsilon for :func:`calibrate_noise` when Opacus is not installed; they use integer orders only,
which can only over-estimate epsilon relative to an accountant that also uses fractional orders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.hooks import RemovableHandle

from safenorm.modules.dp import RELEASES_PER_FORWARD, DPBatchNorm

__all__ = [
    "DEFAULT_ORDERS",
    "DEFAULT_STATISTICS_SHARE",
    "EpsilonFn",
    "NoisePlan",
    "ReleaseLedger",
    "calibrate_noise",
    "calibrate_sigma",
    "dp_layers",
    "epsilon_from_rdp",
    "planned_releases",
    "rdp_epsilon",
    "rdp_subsampled_gaussian",
    "releasing_layers",
    "sigma_eff",
    "split_noise",
]

#: Integer RDP orders of the self-contained accountant.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 64), 80, 96, 128, 160, 192, 256, 384, 512)

#: Share of the per-step privacy "budget" ``1 / sigma_eff^2`` given to the statistics releases
#: by :func:`calibrate_noise` (the gradient gets the rest). 0.1 gives, for 2 DP layers
#: (4 releases per step), ``sigma_r ~ 6.3 sigma_eff`` and ``sigma_g ~ 1.05 sigma_eff``: the
#: regime measured best in DESIGN.md §3.1 (sigma_bn 4-8 beside sigma_g ~ 1).
DEFAULT_STATISTICS_SHARE = 0.1

#: ``epsilon_fn(noise_multiplier, sample_rate, steps, delta) -> epsilon``.
EpsilonFn = Callable[[float, float, int, float], float]


# ----------------------------------------------------------------------------------------------
# sigma_eff
# ----------------------------------------------------------------------------------------------


def sigma_eff(
    gradient_noise_multiplier: float | None, release_noise_multipliers: Iterable[float] = ()
) -> float:
    """Noise multiplier of the single Gaussian mechanism that a DP-SGD step amounts to.

    .. math:: \\sigma_{eff} = (1/\\sigma_g^2 + \\sum_r 1/\\sigma_r^2)^{-1/2}

    Args:
        gradient_noise_multiplier: ``sigma_g`` of the gradient release, or ``None`` when there is
            no gradient release (e.g. a statistics-only checkpoint release).
        release_noise_multipliers: ``sigma_r`` of every statistics release made on the same
            sample (one entry per release: a DP layer's training forward makes two).

    Returns:
        ``sigma_eff``; ``0.0`` if any release has noise multiplier 0 (no privacy, infinite
        epsilon, as Opacus' accountants treat ``noise_multiplier=0``); ``math.inf`` if every
        release has infinite noise.
    """
    sigmas = list(release_noise_multipliers)
    if gradient_noise_multiplier is not None:
        sigmas.append(gradient_noise_multiplier)
    if not sigmas:
        raise ValueError("sigma_eff needs at least one release")
    total = 0.0
    for sigma in sigmas:
        sigma = float(sigma)
        if math.isnan(sigma) or sigma < 0:
            raise ValueError(f"noise multipliers must be >= 0, got {sigma}")
        if sigma == 0:
            return 0.0
        total += 1.0 / sigma**2
    return math.inf if total == 0 else total**-0.5


# ----------------------------------------------------------------------------------------------
# Release counting
# ----------------------------------------------------------------------------------------------


def dp_layers(model: nn.Module) -> list[tuple[str, DPBatchNorm]]:
    """Every DP statistics layer of ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DPBatchNorm)]


def releasing_layers(model: nn.Module) -> list[tuple[str, DPBatchNorm]]:
    """The DP layers that release statistics in training (not in ``frozen_statistics`` mode)."""
    return [(name, m) for name, m in dp_layers(model) if not m.frozen_statistics]


def planned_releases(model: nn.Module, forwards_per_step: int = 1) -> int:
    """Statistics releases per optimizer step if each releasing layer runs ``forwards_per_step``
    training forwards per step (two Gaussian releases per forward)."""
    if forwards_per_step < 1:
        raise ValueError(f"forwards_per_step must be >= 1, got {forwards_per_step}")
    return RELEASES_PER_FORWARD * forwards_per_step * len(releasing_layers(model))


class ReleaseLedger:
    """Counts the statistics releases actually made by the DP layers of a model.

    Watches every DP layer through its release hook and records the noise multiplier of each
    release at the time it was made. :meth:`consume` returns (and forgets) the releases made
    since the last call: one optimizer step's worth.

    With a ``classify`` function (``safenorm.opacus.PrivacyEngine`` sets one), each release is
    filed when it is made: on the step's own Poisson batch (``classify() is True``: returned by
    :meth:`consume`, composed with the step's gradient release) or not (returned by
    :meth:`consume_unsampled`, accounted as an unsubsampled Gaussian). Without one, every
    release is filed as a step release.

    Copies of a model (``copy.deepcopy``, pickling, ``AveragedModel``) do not carry the ledger's
    hooks: a copy is unaccounted until a ledger watches it.

    Example::

        >>> ledger = ReleaseLedger(model)
        >>> loss = criterion(model(x), y); loss.backward()
        >>> sigma = sigma_eff(1.0, ledger.consume())
    """

    def __init__(
        self, model: nn.Module | None = None, classify: Callable[[], bool] | None = None
    ) -> None:
        self._pending: list[float] = []
        self._unsampled: list[float] = []
        self._handles: list[RemovableHandle] = []
        #: ``classify() -> bool``: whether a release made now is on the step's own batch.
        self.classify = classify
        #: Releases recorded since construction.
        self.total_releases = 0
        if model is not None:
            self.watch(model)

    def watch(self, model: nn.Module) -> int:
        """Start counting the releases of every DP layer of ``model``; returns how many."""
        layers = dp_layers(model)
        for _, layer in layers:
            self._handles.append(layer.register_release_hook(self._on_release))
        return len(layers)

    def _on_release(self, layer: DPBatchNorm, num_releases: int) -> None:
        on_step_batch = self.classify is None or self.classify()
        target = self._pending if on_step_batch else self._unsampled
        target.extend([float(layer.noise_multiplier)] * num_releases)
        self.total_releases += num_releases

    @property
    def pending(self) -> tuple[float, ...]:
        """Noise multipliers of the step releases not yet consumed."""
        return tuple(self._pending)

    @property
    def unsampled(self) -> tuple[float, ...]:
        """Noise multipliers of the releases made off the step's batch, not yet consumed."""
        return tuple(self._unsampled)

    def consume(self) -> tuple[float, ...]:
        """The step releases made since the last call, then forget them."""
        released, self._pending = tuple(self._pending), []
        return released

    def consume_unsampled(self) -> tuple[float, ...]:
        """The releases made off the step's batch since the last call, then forget them."""
        released, self._unsampled = tuple(self._unsampled), []
        return released

    def close(self) -> None:
        """Stop counting (removes the hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------------
# RDP of the Poisson-subsampled Gaussian (self-contained)
# ----------------------------------------------------------------------------------------------


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _rdp_integer_order(q: float, sigma: float, alpha: int) -> float:
    # log A_alpha, A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))
    log_a = -math.inf
    for k in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = (
            log_coef
            + (alpha - k) * math.log1p(-q)
            + (k * math.log(q) if k else 0.0)
            + (k * k - k) / (2 * sigma**2)
        )
        log_a = _log_add(log_a, term)
    return log_a / (alpha - 1)


def rdp_subsampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: Sequence[int] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at integer ``orders``.

    Exact for integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3), computed in log space.
    """
    q, sigma = float(sample_rate), float(noise_multiplier)
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {q}")
    if any(int(a) != a or a < 2 for a in orders):
        raise ValueError("orders must be integers >= 2")
    if q == 0 or math.isinf(sigma):
        return np.zeros(len(orders))
    if sigma == 0:
        return np.full(len(orders), np.inf)
    if q == 1:
        return np.array([a / (2 * sigma**2) for a in orders])
    return np.array([_rdp_integer_order(q, sigma, int(a)) for a in orders])


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """Convert RDP to (epsilon, delta)-DP (Balle et al. 2020, Thm. 21; as Opacus 1.6)."""
    a, r = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf
    return float(max(np.nanmin(eps), 0.0))


def rdp_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps (self-contained RDP)."""
    rdp = steps * rdp_subsampled_gaussian(sample_rate, noise_multiplier, orders)
    return epsilon_from_rdp(orders, rdp, delta)


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def calibrate_sigma(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    epsilon_fn: EpsilonFn | None = None,
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to ``rtol``) whose epsilon after ``steps`` is <= target.

    Bisection in log space; the result's epsilon lies in ``[target (1 - rtol), target]``.

    Args:
        target_epsilon, delta: the target budget.
        sample_rate: Poisson sampling rate ``q``.
        steps: number of optimizer steps.
        epsilon_fn: ``(sigma, q, steps, delta) -> epsilon``. Default: :func:`rdp_epsilon`.
        rtol: relative tolerance on epsilon.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    epsilon_fn = epsilon_fn or rdp_epsilon
    lo, hi = 1e-2, 1.0
    while epsilon_fn(hi, sample_rate, steps, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("the privacy budget is too low (noise multiplier > 1e6 needed)")
    while epsilon_fn(lo, sample_rate, steps, delta) <= target_epsilon and lo > 1e-6:
        hi, lo = lo, lo / 2
    for _ in range(200):
        eps_hi = epsilon_fn(hi, sample_rate, steps, delta)
        if eps_hi >= target_epsilon * (1 - rtol) or hi / lo < 1 + 1e-12:
            break
        mid = math.sqrt(lo * hi)
        if epsilon_fn(mid, sample_rate, steps, delta) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers that together meet a privacy target.

    Attributes:
        sigma_eff: noise multiplier of the whole step (what the accountant sees).
        gradient_noise_multiplier: ``sigma_g`` for the optimizer.
        statistics_noise_multiplier: ``sigma_r`` of every statistics release (``None`` when
            there are no releases).
        num_releases: statistics releases per step the plan assumes.
        statistics_share: share of ``1 / sigma_eff^2`` given to the statistics.
    """

    sigma_eff: float
    gradient_noise_multiplier: float
    statistics_noise_multiplier: float | None
    num_releases: int
    statistics_share: float


def split_noise(
    sigma_eff_value: float, num_releases: int, statistics_share: float = DEFAULT_STATISTICS_SHARE
) -> NoisePlan:
    """Split a per-step ``sigma_eff`` between the gradient and ``num_releases`` equal releases.

    ``1/sigma_g^2 = (1 - s) / sigma_eff^2`` and ``1/sigma_r^2 = s / (R sigma_eff^2)``, so that
    :func:`sigma_eff` of the result is ``sigma_eff_value`` again.
    """
    if num_releases < 0:
        raise ValueError("num_releases must be >= 0")
    if num_releases == 0:
        return NoisePlan(sigma_eff_value, sigma_eff_value, None, 0, 0.0)
    if not 0 < statistics_share < 1:
        raise ValueError(
            f"statistics_share must be in (0, 1) when DP layers release statistics, got "
            f"{statistics_share}"
        )
    return NoisePlan(
        sigma_eff=sigma_eff_value,
        gradient_noise_multiplier=sigma_eff_value / math.sqrt(1 - statistics_share),
        statistics_noise_multiplier=sigma_eff_value * math.sqrt(num_releases / statistics_share),
        num_releases=num_releases,
        statistics_share=statistics_share,
    )


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    num_releases: int,
    statistics_share: float = DEFAULT_STATISTICS_SHARE,
    epsilon_fn: EpsilonFn | None = None,
    rtol: float = 1e-3,
) -> NoisePlan:
    """Gradient and statistics noise multipliers that meet ``(target_epsilon, delta)``.

    Finds ``sigma_eff`` for the target (:func:`calibrate_sigma`), then gives the gradient the
    share ``1 - statistics_share`` of ``1 / sigma_eff^2`` and splits the rest equally over the
    ``num_releases`` statistics releases of each step (:func:`split_noise`).

    Args:
        target_epsilon, delta: the target budget after ``steps`` steps.
        sample_rate: Poisson sampling rate.
        steps: number of optimizer steps.
        num_releases: statistics releases per step (:func:`planned_releases`).
        statistics_share: share of the budget for the statistics.
            Default: :data:`DEFAULT_STATISTICS_SHARE`
        epsilon_fn: epsilon of a subsampled Gaussian. Default: :func:`rdp_epsilon`.
        rtol: relative tolerance of the calibration.
    """
    sigma = calibrate_sigma(target_epsilon, delta, sample_rate, steps, epsilon_fn, rtol)
    return split_noise(sigma, num_releases, statistics_share)
