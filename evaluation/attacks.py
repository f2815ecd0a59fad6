"""Membership-inference attacks: LOSS threshold, LiRA (offline / online, fixed variance), RMIA.

Every attack maps the per-model scores of the examples to a membership score for one target
model (higher means "member"), using the other models as shadow / reference models
(leave-one-out: each model is the target once). Scores are LiRA's logit-scaled confidence
``phi = log(p_y / (1 - p_y))``.

References: Carlini et al., "Membership Inference Attacks From First Principles" (LiRA, 2022);
Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks" (RMIA, 2024); Yeom et al.
(LOSS threshold, 2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from safenorm.evaluation.registry import Registry
from scipy import special, stats

__all__ = ["ATTACKS", "Attack", "AttackInputs", "lira_statistics", "run_attack"]


@dataclass
class AttackInputs:
    """What an attack sees.

    Attributes:
        scores: ``(M, N)`` logit-scaled confidence of the N attacked examples on each model.
        keep: ``(M, N)`` membership of those examples in each model (shadow labels).
        population: ``(M, Z)`` scores of examples no model trained on (RMIA's population).
        target: index of the target model; the others are shadows.
        gamma: RMIA's likelihood-ratio threshold.
    """

    scores: np.ndarray
    keep: np.ndarray
    population: np.ndarray
    target: int
    gamma: float = 1.0


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


def _rmia(inputs: AttackInputs) -> np.ndarray:
    """RMIA: the fraction of population examples z with ``LR(x) / LR(z) > gamma``, where
    ``LR(x) = p(x | target) / mean over reference models of p(x | reference)``."""
    others = np.arange(len(inputs.scores)) != inputs.target
    p_x = special.expit(inputs.scores)
    p_z = special.expit(inputs.population)
    ratio_x = p_x[inputs.target] / np.maximum(p_x[others].mean(0), 1e-300)
    ratio_z = np.sort(p_z[inputs.target] / np.maximum(p_z[others].mean(0), 1e-300))
    return np.searchsorted(ratio_z, ratio_x / inputs.gamma, side="left") / len(ratio_z)


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
ATTACKS.register("rmia", Attack("rmia", _rmia, True, "RMIA (reference models, gamma)"))


def run_attack(
    name: str,
    scores: np.ndarray,
    keep: np.ndarray,
    population: np.ndarray,
    gamma: float = 1.0,
) -> np.ndarray:
    """Attack every model in turn (leave-one-out); returns ``(M, N)`` membership scores."""
    attack = ATTACKS.get(name)
    if attack.shadows and len(scores) < 2:
        raise ValueError(f"attack {attack.name!r} needs at least 2 models (one target, shadows)")
    return np.stack(
        [attack.fn(AttackInputs(scores, keep, population, t, gamma)) for t in range(len(scores))]
    )
