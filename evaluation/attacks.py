"""Membership-inference attacks: LOSS threshold, LiRA (offline / online, fixed variance), RMIA.

Every attack maps the per-model scores of the examples to a membership score for one target
model (higher means "member"), using the other models as shadow / reference models
(leave-one-out: each model is the target once). Scores are LiRA's logit-scaled confidence
``phi = log(p_y / (1 - p_y))``.

RMIA works with the probabilities ``p_y = expit(phi)``, which round to 1 in float64 above
``phi ~ 37`` (confident models). It is computed in log space: ``log p = log_expit(phi)``,
``1 - p = expit(-phi)``, and a mean of probabilities near 1 as ``log1p(-mean(1 - p))`` (near 0
as a ``logsumexp``), so its ranking survives any shift of ``phi`` (tested at +-50 against exact
decimal arithmetic).

References: Carlini et al., "Membership Inference Attacks From First Principles" (LiRA, 2022);
Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks" (RMIA, 2024); Yeom et al.
(LOSS threshold, 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from safenorm.evaluation.metrics import auc, roc_curve
from safenorm.evaluation.registry import Registry
from scipy import special, stats

__all__ = [
    "ATTACKS",
    "OFFLINE_A_GRID",
    "Attack",
    "AttackInputs",
    "lira_statistics",
    "log_reference_probability",
    "rmia_scores",
    "run_attack",
    "tune_offline_a",
]


@dataclass
class AttackInputs:
    """What an attack sees.

    Attributes:
        scores: ``(M, N)`` logit-scaled confidence of the N attacked examples on each model.
        keep: ``(M, N)`` membership of those examples in each model (shadow labels).
        population: ``(M, Z)`` scores of examples no model trained on (RMIA's population).
        target: index of the target model; the others are shadows.
        gamma: RMIA's likelihood-ratio threshold.
        offline_a: offline RMIA's ``a`` (``None``: tuned on the shadows, see
            :func:`tune_offline_a`).
    """

    scores: np.ndarray
    keep: np.ndarray
    population: np.ndarray
    target: int
    gamma: float = 1.0
    offline_a: float | None = None


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        name: canonical name.
        fn: ``AttackInputs -> (N,)`` membership scores for the target (higher: member).
        shadows: whether it needs shadow models.
        description: one line for reports.
    """

    name: str
    fn: Callable[[AttackInputs], np.ndarray]
    shadows: bool
    description: str


ATTACKS: Registry[Attack] = Registry("attack")


def _loo(inputs: AttackInputs) -> tuple[np.ndarray, np.ndarray]:
    others = np.arange(len(inputs.scores)) != inputs.target
    return inputs.scores[others], inputs.keep[others]


def lira_statistics(
    scores: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-example in/out means and the global (fixed) in/out standard deviations.

    Examples that no shadow holds in (or out) get the other mean shifted by the average in-out
    difference of the examples that have both.

    Returns:
        ``(mu_in, mu_out, sigma_in, sigma_out)``.
    """
    keep = keep.astype(bool)
    n_in, n_out = keep.sum(0), (~keep).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(keep, scores, 0).sum(0) / n_in
        mu_out = np.where(~keep, scores, 0).sum(0) / n_out
    both = (n_in > 0) & (n_out > 0)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)
    res_in = (scores - mu_in)[keep]
    res_out = (scores - mu_out)[~keep]
    sigma_in = float(np.sqrt(np.mean(res_in**2))) if res_in.size > 1 else 1.0
    sigma_out = float(np.sqrt(np.mean(res_out**2))) if res_out.size > 1 else 1.0
    return mu_in, mu_out, max(sigma_in, 1e-6), max(sigma_out, 1e-6)


def _loss(inputs: AttackInputs) -> np.ndarray:
    """Minus the loss: ``-CE = -softplus(-phi)``, a monotone function of ``phi``."""
    return -np.logaddexp(0.0, -inputs.scores[inputs.target])


def _lira_offline(inputs: AttackInputs) -> np.ndarray:
    """One-sided test against the OUT Gaussian: ``(phi - mu_out) / sigma_out``."""
    s, k = _loo(inputs)
    _, mu_out, _, sigma_out = lira_statistics(s, k)
    return (inputs.scores[inputs.target] - mu_out) / sigma_out


def _lira_online(inputs: AttackInputs) -> np.ndarray:
    """Likelihood ratio of the IN and OUT Gaussians (fixed, global variances)."""
    s, k = _loo(inputs)
    mu_in, mu_out, sigma_in, sigma_out = lira_statistics(s, k)
    phi = inputs.scores[inputs.target]
    return stats.norm.logpdf(phi, mu_in, sigma_in) - stats.norm.logpdf(phi, mu_out, sigma_out)


def log_reference_probability(
    phi: np.ndarray, weights: np.ndarray | None = None, a: float = 1.0
) -> np.ndarray:
    """``log Pr(x)``, ``Pr(x) = ((1 + a) P(x) + (1 - a)) / 2`` with ``P(x)`` the weighted mean of
    ``expit(phi)`` over the reference models (axis 0).

    ``a = 1`` gives the plain mean (online RMIA); ``a < 1`` is offline RMIA's approximation of
    the mean over IN and OUT models from OUT models only (Zarifzadeh et al. 2024, section 4).
    Exact at both ends: where ``P < 1/2`` through ``logsumexp(log_expit(phi))``, elsewhere as
    ``log1p(-(1 + a) / 2 * mean(expit(-phi)))``, so ``P`` within 1e-300 of 0 or 1 keeps its
    digits.

    Args:
        phi: ``(K, N)`` scores of N examples on K reference models.
        weights: ``(K, N)`` non-negative weights (e.g. OUT masks); default: all ones.
        a: offline RMIA's ``a`` in ``[0, 1]``.
    """
    return _mix(*_reference_moments(phi, weights), a)


def _reference_moments(
    phi: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(log P, 1 - P)`` of the weighted mean ``P`` of ``expit(phi)`` over axis 0, each exact
    where it is used (``log P`` where ``P`` is small, ``1 - P`` where it is near 1)."""
    w = np.ones_like(phi) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum(0)
    q_mean = (w * special.expit(-phi)).sum(0) / total
    log_p = special.logsumexp(special.log_expit(phi), axis=0, b=w) - np.log(total)
    return log_p, q_mean


def _mix(log_p: np.ndarray, q_mean: np.ndarray, a: float) -> np.ndarray:
    """``log(((1 + a) P + (1 - a)) / 2)`` from :func:`_reference_moments`."""
    # each branch is only used where it is exact; the other may hit log 0 there (a = 1: the
    # constant term of the low branch is log 0 = -inf, harmlessly)
    with np.errstate(divide="ignore"):
        low = np.logaddexp(math.log((1 + a) / 2) + log_p, np.log((1 - a) / 2))
        high = np.log1p(-(1 + a) / 2 * q_mean)
    return np.where(q_mean > 0.5, low, high)


def rmia_scores(
    target_x: np.ndarray,
    log_pr_x: np.ndarray,
    target_z: np.ndarray,
    log_pr_z: np.ndarray,
    gamma: float = 1.0,
) -> np.ndarray:
    """The fraction of population examples z with ``LR(x) / LR(z) > gamma``, in log space:
    ``log LR(x) = log_expit(phi_target(x)) - log Pr(x)``."""
    lr_x = special.log_expit(target_x) - log_pr_x
    lr_z = np.sort(special.log_expit(target_z) - log_pr_z)
    return np.searchsorted(lr_z, lr_x - math.log(gamma), side="left") / len(lr_z)


def _rmia(inputs: AttackInputs) -> np.ndarray:
    """RMIA (online): the fraction of population examples z with ``LR(x) / LR(z) > gamma``,
    ``LR(x) = p(x | target) / mean over every reference model of p(x | reference)``."""
    others = np.arange(len(inputs.scores)) != inputs.target
    t, pop = inputs.target, inputs.population
    return rmia_scores(
        inputs.scores[t],
        log_reference_probability(inputs.scores[others]),
        pop[t],
        log_reference_probability(pop[others]),
        inputs.gamma,
    )


# offline RMIA's a is searched on this grid (the paper's reference code steps 0.1 over [0, 1])
OFFLINE_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _offline_scores(
    scores: np.ndarray,
    keep: np.ndarray,
    population: np.ndarray,
    target: int,
    references: np.ndarray,
    a_values: tuple[float, ...],
    gamma: float,
) -> list[np.ndarray]:
    """Offline RMIA of model ``target`` with the OUT scores of the ``references`` models, for
    each ``a`` of ``a_values`` (the reference means are computed once)."""
    ref, out = scores[references], ~keep[references].astype(bool)
    # an example that every reference holds has no OUT model: use them all (rare, >= 8 models)
    out = np.where(out.any(0), out, True)
    moments_x = _reference_moments(ref, out)
    moments_z = _reference_moments(population[references], None)  # z is OUT everywhere
    return [
        rmia_scores(
            scores[target], _mix(*moments_x, a), population[target], _mix(*moments_z, a), gamma
        )
        for a in a_values
    ]


def tune_offline_a(inputs: AttackInputs, grid: tuple[float, ...] = OFFLINE_A_GRID) -> float:
    """Offline RMIA's ``a``, chosen as the paper describes: attack one reference model with the
    remaining ones and keep the ``a`` of the highest AUC (Zarifzadeh et al. 2024, appendix on
    offline RMIA; the target model and its membership are never used).

    The stand-in target is the next shadow after the target (cyclically); ties keep the
    smallest ``a``. With fewer than 3 models there is nothing to tune on, and ``a = 1`` (the
    plain ratio to the OUT models' mean) is used.
    """
    m = len(inputs.scores)
    if m < 3:
        return 1.0
    stand_in = (inputs.target + 1) % m
    refs = np.flatnonzero((np.arange(m) != inputs.target) & (np.arange(m) != stand_in))
    labels = inputs.keep[stand_in].astype(bool)
    if labels.all() or not labels.any():
        return 1.0
    best, best_auc = grid[0], -1.0
    attacked = _offline_scores(
        inputs.scores, inputs.keep, inputs.population, stand_in, refs, grid, inputs.gamma
    )
    for a, s in zip(grid, attacked, strict=True):
        fpr, tpr, _ = roc_curve(labels, s)
        value = auc(fpr, tpr)
        if value > best_auc + 1e-12:
            best, best_auc = a, value
    return best


def _rmia_offline(inputs: AttackInputs) -> np.ndarray:
    """Offline RMIA: ``Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2`` from the shadows that did not
    train on x, ``a`` tuned on the shadows (:func:`tune_offline_a`)."""
    a = inputs.offline_a if inputs.offline_a is not None else tune_offline_a(inputs)
    refs = np.flatnonzero(np.arange(len(inputs.scores)) != inputs.target)
    return _offline_scores(
        inputs.scores, inputs.keep, inputs.population, inputs.target, refs, (a,), inputs.gamma
    )[0]


ATTACKS.register(
    "loss", Attack("loss", _loss, False, "LOSS threshold"), aliases=("threshold", "yeom")
)
ATTACKS.register(
    "lira-offline",
    Attack("lira-offline", _lira_offline, True, "LiRA offline, fixed variance"),
    aliases=("offline-lira",),
)
ATTACKS.register(
    "lira-online",
    Attack("lira-online", _lira_online, True, "LiRA online, fixed variance"),
    aliases=("lira", "online-lira"),
)
ATTACKS.register(
    "rmia",
    Attack("rmia", _rmia, True, "RMIA online (all reference models, gamma)"),
    aliases=("rmia-online",),
)
ATTACKS.register(
    "rmia-offline",
    Attack("rmia-offline", _rmia_offline, True, "RMIA offline (OUT models, a tuned on shadows)"),
    aliases=("offline-rmia",),
)


def run_attack(
    name: str,
    scores: np.ndarray,
    keep: np.ndarray,
    population: np.ndarray,
    gamma: float = 1.0,
    offline_a: float | None = None,
) -> np.ndarray:
    """Attack every model in turn (leave-one-out); returns ``(M, N)`` membership scores."""
    attack = ATTACKS.get(name)
    if attack.shadows and len(scores) < 2:
        raise ValueError(f"attack {attack.name!r} needs at least 2 models (one target, shadows)")
    return np.stack(
        [
            attack.fn(AttackInputs(scores, keep, population, t, gamma, offline_a))
            for t in range(len(scores))
        ]
    )
