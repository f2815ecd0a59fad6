"""The run: train and score every (variant, model) once, cache it, then analyse the cache.

Layout of an output directory (it doubles as the cache)::

    config.json                       the EvalConfig of the last run
    log.txt                           what happened, appended
    cache/<variant>-<fingerprint>/    one model_XXXX.npz per trained model (raw scores, grads)
    scores/<variant>.npz              merged raw per-example scores (recompute any metric)
    report.md, report.json, *.png     the analysis (see :mod:`safenorm.evaluation.report`)

A model's file is written atomically when it is done, so an interrupted run resumes where it
stopped; ``--shard i/n`` trains only the models with ``index % n == i`` and
:func:`merge_outputs` copies the shards' caches together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safenorm.evaluation.attacks import run_attack
from safenorm.evaluation.audit import one_run_audit
from safenorm.evaluation.canaries import Universe, build_universe, membership_masks
from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.data import ImageDataset, load_dataset
from safenorm.evaluation.metrics import (
    exposure,
    extrapolated_exposure,
    reference_exposure,
    summarize_roc,
)
from safenorm.evaluation.models import build_model
from safenorm.evaluation.scoring import score_model
from safenorm.evaluation.training import TRAINERS, DivergenceError, seed_everything
from safenorm.evaluation.variants import VARIANTS, describe_norm_layers, ensure_variant
from torch import nn

__all__ = ["Harness", "Shard", "VariantResult", "merge_outputs", "parse_shard"]

LOGGER = logging.getLogger("safenorm.evaluation")
ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class Shard:
    """Models with ``index % count == index_of_shard``."""

    index: int = 0
    count: int = 1

    def owns(self, model_index: int) -> bool:
        return model_index % self.count == self.index


def parse_shard(text: str | None) -> Shard:
    """Parse ``"i/n"`` (0-based ``i``)."""
    if not text:
        return Shard()
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError as err:
        raise ValueError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from err
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return Shard(i, n)


@dataclass
class VariantResult:
    """Analysis of one variant: a JSON-able summary plus arrays for plots and raw scores."""

    name: str
    summary: dict[str, Any]
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    grad: dict[str, np.ndarray] = field(default_factory=dict)
    exposures: dict[str, np.ndarray] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available; pass --device cpu (or auto)"
        )
    return device


class Harness:
    """Trains, scores, caches and analyses one configuration.

    Args:
        config: the run's configuration.
        out_dir: output (and cache) directory.
        data: the user's own dataset (images in ``[0, 1]``); default: ``config.data.dataset``.
        model_fn: the user's model constructor (a model with ``nn.BatchNorm*d`` layers, swapped
            per variant); default: ``config.model`` from the registry.
        model_name: a name for ``model_fn`` in cache keys (default: its qualified name).
        progress: show progress bars.
        fail_fast: re-raise when a model diverges (non-finite loss, statistics, parameters or
            scores) instead of recording it as diverged, excluding it from the analysis and
            going on with the next model.

    Example::

        >>> cfg = get_profile("quick")
        >>> h = Harness(cfg, "out", model_fn=lambda: MyNet(), data=my_images)
        >>> h.run()
        >>> results = h.analyze()
    """

    def __init__(
        self,
        config: EvalConfig,
        out_dir: str | Path,
        *,
        data: ImageDataset | None = None,
        model_fn: ModelFn | None = None,
        model_name: str | None = None,
        progress: bool = True,
        fail_fast: bool = False,
    ) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.fail_fast = fail_fast
        self._data = data
        self._model_fn = model_fn
        self._custom_key = ""
        if data is not None:
            digest = hashlib.sha256(
                data.x.detach().cpu().numpy().tobytes() + data.y.detach().cpu().numpy().tobytes()
            )
            self._custom_key += f"data:{data.name}:{digest.hexdigest()[:12]}"
        if model_fn is not None:
            self._custom_key += f"model:{model_name or getattr(model_fn, '__qualname__', 'fn')}"
        self._universe: Universe | None = None
        self.device = _resolve_device(config.device)
        for name in config.variants:
            ensure_variant(name)  # fail early, listing the known variants

    # -- set-up ----------------------------------------------------------------------------------

    @property
    def universe(self) -> Universe:
        """The evaluation set (built on first use; deterministic in the seed)."""
        if self._universe is None:
            data = (
                self._data
                if self._data is not None
                else load_dataset(self.config.data, self.config.seed)
            )
            self._universe = build_universe(
                data, self.config.data, self.config.canaries, self.config.seed
            )
        return self._universe

    @property
    def variants(self) -> list[str]:
        """Canonical names of the configured variants (aliases and repeats collapsed)."""
        return list(dict.fromkeys(ensure_variant(v) for v in self.config.variants))

    def unavailable(self) -> dict[str, str]:
        """Variants that cannot run here, with the reason."""
        out = {}
        for name in self.variants:
            reason = VARIANTS.get(name).unavailable_reason()
            if reason:
                out[name] = reason
        return out

    def keep(self) -> np.ndarray:
        """``(num_models, num_candidates)`` membership of the pool and canaries."""
        return membership_masks(
            self.config.num_models, self.universe.num_candidates, self.config.seed
        )

    def fingerprint(self, variant: str) -> str:
        base = self.config.model_fingerprint(variant)
        if not self._custom_key:
            return base
        return hashlib.sha256((base + self._custom_key).encode()).hexdigest()[:12]

    def cache_dir(self, variant: str) -> Path:
        return self.out / "cache" / f"{variant}-{self.fingerprint(variant)}"

    def model_path(self, variant: str, index: int) -> Path:
        return self.cache_dir(variant) / f"model_{index:04d}.npz"

    def model_seed(self, index: int) -> int:
        """The seed of model ``index``, shared by all variants (paired comparisons)."""
        return (self.config.seed * 1_000_003 + index * 7919) % (2**31 - 1)

    def build_base_model(self) -> nn.Module:
        if self._model_fn is not None:
            return self._model_fn()
        u = self.universe
        return build_model(self.config.model, u.x.shape[1], u.num_classes, u.x.shape[-1])

    # -- training --------------------------------------------------------------------------------

    def pending(self, shard: Shard = Shard()) -> list[tuple[str, int]]:
        """(variant, model index) jobs of ``shard`` not in the cache, for available variants."""
        skip = self.unavailable()
        return [
            (v, i)
            for i in range(self.config.num_models)
            for v in self.variants
            if v not in skip and shard.owns(i) and not self.model_path(v, i).exists()
        ]

    def train_one(self, variant: str, index: int, keep_row: np.ndarray) -> dict[str, np.ndarray]:
        """Train model ``index`` of ``variant`` on its half, score it, write its cache file."""
        threads = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            return self._train_one(variant, index, keep_row)
        finally:
            torch.set_num_threads(threads)

    def _train_one(self, variant: str, index: int, keep_row: np.ndarray) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            arrays = self._train_and_score(variant, index, keep_row)
        except DivergenceError as err:
            if self.fail_fast:
                raise
            arrays = _diverged_arrays(err, keep_row, time.perf_counter() - start)
        path = self.model_path(variant, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = path.parent / "config.json"
        if not meta.exists():
            meta.write_text(
                json.dumps({"variant": variant, "config": self.config.to_dict()}, indent=2)
            )
        _atomic_savez(path, arrays)
        return arrays

    def _train_and_score(
        self, variant: str, index: int, keep_row: np.ndarray
    ) -> dict[str, np.ndarray]:
        spec = VARIANTS.get(variant)
        u = self.universe
        seed = self.model_seed(index)
        seed_everything(seed)
        model = spec.prepare(self.build_base_model(), self.config)
        cand = np.flatnonzero(keep_row)
        x, y = u.x[cand], u.y[cand]
        result = TRAINERS.get(spec.trainer)(model, x, y, self.config, seed, self.device)
        seed_everything(seed + 1)
        arrays = score_model(result.model, u, self.config, index)
        for key in ("score_eval", "score_train"):
            if key in arrays and not np.isfinite(arrays[key]).all():
                bad = int((~np.isfinite(arrays[key])).sum())
                raise DivergenceError(-1, "", f"{bad} non-finite {key} values after training")
        arrays.update(
            epsilon=np.array(np.nan if result.epsilon is None else result.epsilon),
            steps=np.array(result.steps),
            train_seconds=np.array(result.seconds),
            final_loss=np.array(result.final_loss),
            keep=keep_row,
        )
        return arrays

    def run(self, shard: Shard = Shard()) -> int:
        """Train and score every pending model of ``shard``; returns how many were trained."""
        for name, reason in self.unavailable().items():
            LOGGER.warning("skipping variant %s: %s", name, reason)
        if self.config.num_models < 8:
            LOGGER.warning(
                "%d models per variant: shadow-model attacks (LiRA, RMIA) need more (16 or "
                "more) to be meaningful",
                self.config.num_models,
            )
        jobs = self.pending(shard)
        keep = self.keep()
        total = self.config.num_models * len(self.variants)
        LOGGER.info(
            "%d of %d models to train (shard %d/%d) on %s",
            len(jobs),
            total,
            shard.index,
            shard.count,
            self.device,
        )
        bar = None
        if self.progress and jobs:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="models", unit="model")
        for variant, index in jobs:
            start = time.perf_counter()
            arrays = self.train_one(variant, index, keep[index])
            if "diverged" in arrays:
                LOGGER.warning(
                    "%s model %d diverged (excluded from the analysis): %s",
                    variant,
                    index,
                    str(arrays["diverged_message"]),
                )
                if bar is not None:
                    bar.update(1)
                continue
            LOGGER.info(
                "%s model %d: test acc %.3f, eps %s, %d steps, %.1fs",
                variant,
                index,
                float(arrays["test_acc"]),
                float(arrays["epsilon"]),
                int(arrays["steps"]),
                time.perf_counter() - start,
            )
            if bar is not None:
                bar.set_postfix_str(f"{variant} #{index}")
                bar.update(1)
        if bar is not None:
            bar.close()
        return len(jobs)

    # -- analysis --------------------------------------------------------------------------------

    def missing(self, variant: str) -> list[int]:
        return [
            i for i in range(self.config.num_models) if not self.model_path(variant, i).exists()
        ]

    def load(self, variant: str) -> list[dict[str, np.ndarray]]:
        """The cached arrays of every model of ``variant`` (all must exist)."""
        missing = self.missing(variant)
        if missing:
            raise FileNotFoundError(
                f"variant {variant}: models {missing[:10]}{'...' if len(missing) > 10 else ''} "
                f"are not in {self.cache_dir(variant)}; run (or merge) the remaining shards first"
            )
        out = []
        for i in range(self.config.num_models):
            with np.load(self.model_path(variant, i)) as f:
                out.append({k: f[k] for k in f.files})
        return out

    def diverged(self, variant: str) -> list[dict[str, Any]]:
        """The cached models of ``variant`` that diverged: index, step, layer, reason."""
        out = []
        for i in range(self.config.num_models):
            path = self.model_path(variant, i)
            if not path.exists():
                continue
            with np.load(path) as f:
                if "diverged" in f.files:
                    out.append(
                        {
                            "index": i,
                            "step": int(f["diverged_step"]),
                            "layer": str(f["diverged_layer"]),
                            "reason": str(f["diverged_reason"]),
                        }
                    )
        return out

    def too_few_converged(self) -> dict[str, str]:
        """Variants with fewer than two converged models (nothing to attack), with why."""
        out = {}
        for variant in self.variants:
            if variant in self.unavailable() or self.missing(variant):
                continue
            bad = self.diverged(variant)
            if self.config.num_models - len(bad) < 2:
                first = bad[0] if bad else {}
                out[variant] = (
                    f"{len(bad)} of {self.config.num_models} models diverged (first: step "
                    f"{first.get('step')}, layer {first.get('layer') or '?'}); nothing to attack"
                )
        return out

    def norm_layers(self, variant: str) -> str:
        """The variant's normalization layers on this run's model (groups x channels)."""
        model = VARIANTS.get(variant).prepare(self.build_base_model(), self.config)
        return describe_norm_layers(model)

    def analyze(self) -> dict[str, VariantResult]:
        """Analyse every available variant whose models are all cached.

        Diverged models are left out (the others are each other's shadows) and counted in the
        summary's ``diverged``; a variant with fewer than two converged models is skipped
        (:meth:`too_few_converged`).
        """
        results = {}
        failed = self.too_few_converged()
        for variant in self.variants:
            if variant in self.unavailable() or self.missing(variant) or variant in failed:
                continue
            models = [m for m in self.load(variant) if "diverged" not in m]
            result = analyze_variant(variant, models, self.universe, self.config)
            result.summary["diverged"] = {
                "count": self.config.num_models - len(models),
                "of": self.config.num_models,
                "models": self.diverged(variant),
            }
            result.summary["norm_layers"] = self.norm_layers(variant)
            results[variant] = result
        return results


def _diverged_arrays(err: DivergenceError, keep_row: np.ndarray, seconds: float) -> dict:
    """The cache entry of a diverged model: why, where, and its membership row."""
    return {
        "diverged": np.array(1),
        "diverged_step": np.array(err.step),
        "diverged_layer": np.array(err.layer),
        "diverged_reason": np.array(err.reason),
        "diverged_message": np.array(str(err)),
        "keep": keep_row,
        "train_seconds": np.array(seconds),
    }


def _roc(labels: np.ndarray, scores: np.ndarray, config: EvalConfig):
    """ROC summary of a ``(models, examples)`` matrix; the interval method resamples its rows
    and columns (whole models, whole examples), so the matrix is passed as it is."""
    a = config.attacks
    return summarize_roc(
        labels,
        scores,
        a.fprs,
        ci=a.ci,
        confidence=a.confidence,
        bootstrap=a.bootstrap,
        seed=config.seed,
    )


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else float("nan")


# extrapolated exposure: a normal fit to each model's reference scores (the skew-normal of the
# Secret Sharer paper needs the sample skewness, too noisy with tens of references); a canary
# the model never saw scores log2(e) bits on average (its tail probability is uniform)
EXPOSURE_FIT = "normal"
EXTRAPOLATED_REFERENCE = 1 / math.log(2)


def analyze_variant(
    variant: str, models: Sequence[dict[str, np.ndarray]], universe: Universe, config: EvalConfig
) -> VariantResult:
    """All statistics of one variant from its models' cached arrays."""
    u, ac = universe, config.attacks
    keep = np.stack([m["keep"] for m in models]).astype(bool)
    n_pool = len(u.indices("pool"))
    cand = np.arange(u.num_candidates)
    canary_cols = cand[n_pool:]
    test = u.indices("test")
    ctype = u.canary_type
    summary: dict[str, Any] = {
        "variant": variant,
        "description": VARIANTS.get(variant).description,
        "num_models": len(models),
    }
    result = VariantResult(variant, summary)
    acc = np.array([float(m["test_acc"]) for m in models])
    eps = np.array([float(m["epsilon"]) for m in models])
    summary["test_acc"] = {"mean": float(acc.mean()), "std": float(acc.std())}
    summary["epsilon"] = None if np.isnan(eps).all() else float(np.nanmax(eps))
    summary["delta"] = config.dp.delta if summary["epsilon"] is not None else None
    summary["train_seconds"] = float(sum(float(m["train_seconds"]) for m in models))

    threats = {"eval": np.stack([m["score_eval"] for m in models])}
    if all("score_train" in m for m in models):
        threats["train"] = np.stack([m["score_train"] for m in models])
    result.raw = {
        "keep": keep,
        "group": u.group,
        "canary_type": u.canary_type.astype(str),
        "labels": u.y.numpy(),
        "test_acc": acc,
        "epsilon": eps,
        **{f"score_{k}": v for k, v in threats.items()},
    }

    mia: dict[str, Any] = {}
    attack_scores: dict[tuple[str, str], np.ndarray] = {}
    for threat, S in threats.items():
        mia[threat] = {}
        for attack in ac.attacks:
            A = run_attack(attack, S[:, cand], keep, S[:, test], ac.rmia_gamma)
            attack_scores[(threat, attack)] = A
            entry: dict[str, Any] = {}
            for subset, cols in (("pool", cand[:n_pool]), ("canaries", canary_cols)):
                labels = keep[:, cols]
                if len(cols) == 0 or labels.all() or not labels.any():
                    continue
                roc = _roc(labels, A[:, cols], config)
                entry[subset] = roc.to_dict()
                result.curves[f"{threat}/{attack}/{subset}"] = (roc.fpr_curve, roc.tpr_curve)
            if threat == "eval" and attack == ac.headline:
                per_type = {}
                for t in u.canary_types:
                    cols = canary_cols[ctype[canary_cols] == t]
                    labels = keep[:, cols]
                    if labels.any() and not labels.all():
                        per_type[t] = _roc(labels, A[:, cols], config).auc.to_dict()
                entry["canaries_by_type"] = per_type
            mia[threat][attack] = entry
    summary["membership"] = mia
    pool_aucs = {a: e["pool"]["auc"]["value"] for a, e in mia["eval"].items() if "pool" in e}
    if pool_aucs:  # chosen after the fact: an optimistic summary, labelled as such
        best = max(pool_aucs, key=pool_aucs.get)
        summary["strongest_attack"] = {"attack": best, "auc_pool": pool_aucs[best]}
    summary["headline_attack"] = ac.headline

    # canary memorization: exposure and the in-out gap of phi
    S = threats["eval"]
    canaries: dict[str, Any] = {}
    all_in, all_out, all_xin, all_xout = [], [], [], []
    for t in u.canary_types:
        c_cols = canary_cols[ctype[canary_cols] == t]
        r_cols = u.indices("reference")[ctype[u.indices("reference")] == t]
        exp_in, exp_out, x_in, x_out = [], [], [], []
        for m in range(len(models)):
            e = exposure(S[m, c_cols], S[m, r_cols])
            # the rank-based value saturates at log2(R + 1); the extrapolated one does not
            x = extrapolated_exposure(S[m, c_cols], S[m, r_cols], EXPOSURE_FIT)
            member = keep[m, c_cols]
            exp_in.append(e[member])
            exp_out.append(e[~member])
            x_in.append(x[member])
            x_out.append(x[~member])
        ein, eout = np.concatenate(exp_in), np.concatenate(exp_out)
        xin, xout = np.concatenate(x_in), np.concatenate(x_out)
        all_in.append(ein)
        all_out.append(eout)
        all_xin.append(xin)
        all_xout.append(xout)
        k = keep[:, c_cols]
        s = S[:, c_cols]
        n_in, n_out = k.sum(0), (~k).sum(0)
        both = (n_in > 0) & (n_out > 0)
        gaps = (
            np.where(k, s, 0).sum(0) / np.maximum(n_in, 1)
            - np.where(~k, s, 0).sum(0) / np.maximum(n_out, 1)
        )[both]
        gap = float(gaps.mean()) if both.any() else float("nan")
        canaries[t] = {
            "exposure_in": float(ein.mean()) if len(ein) else None,
            "exposure_out": float(eout.mean()) if len(eout) else None,
            "exposure_reference": reference_exposure(len(r_cols)),
            "max_exposure": float(np.log2(len(r_cols) + 1)),
            "extrapolated_in": float(xin.mean()) if len(xin) else None,
            "extrapolated_out": float(xout.mean()) if len(xout) else None,
            "extrapolated_reference": EXTRAPOLATED_REFERENCE,
            "extrapolated_fit": EXPOSURE_FIT,
            "in_out_gap": float(gap),
        }
        result.exposures[t] = ein
    if all_in:
        ein, eout = np.concatenate(all_in), np.concatenate(all_out)
        xin, xout = np.concatenate(all_xin), np.concatenate(all_xout)
        refs = [c["exposure_reference"] for c in canaries.values()]
        summary["exposure"] = {
            "in": float(ein.mean()) if len(ein) else None,
            "out": float(eout.mean()) if len(eout) else None,
            "reference": float(np.mean(refs)),
            "extrapolated_in": float(xin.mean()) if len(xin) else None,
            "extrapolated_out": float(xout.mean()) if len(xout) else None,
            "extrapolated_reference": EXTRAPOLATED_REFERENCE,
            "extrapolated_fit": EXPOSURE_FIT,
            "in_out_gap": float(np.mean([c["in_out_gap"] for c in canaries.values()])),
        }
        result.exposures["_out"] = eout
    summary["canaries"] = canaries

    # influence: per-sample gradient norms and batch-statistics influence
    gm = [m for m in models if "grad_index" in m]
    if gm:
        idx = gm[0]["grad_index"]
        is_canary = u.group[idx] == 1
        member = np.concatenate([keep[i, idx] for i, m in enumerate(models) if "grad_index" in m])
        grad: dict[str, Any] = {"models": len(gm)}
        for key in ("grad_norm_train", "grad_norm_eval", "influence"):
            vals = np.concatenate([m[key] for m in gm])
            canary = np.tile(is_canary, len(gm))
            typical_med = _median(vals[~canary])
            canary_med = _median(vals[canary])
            grad[key] = {
                "typical_median": typical_med,
                "canary_median": canary_med,
                "canary_in_median": _median(vals[canary & member]),
                "canary_out_median": _median(vals[canary & ~member]),
                "ratio": canary_med / typical_med if typical_med > 0 else None,
            }
            result.grad[f"{key}/typical"] = vals[~canary]
            result.grad[f"{key}/canary"] = vals[canary]
        summary["gradients"] = grad

    # one-run audit from the headline attack's eval-mode scores, every model, Bonferroni
    A = attack_scores[("eval", ac.headline)]
    audits = [
        one_run_audit(
            A[m],
            keep[m],
            ac.audit_guess_fractions,
            config.dp.delta,
            ac.audit_confidence,
            tests=len(models),
        )
        for m in range(len(models))
    ]
    best = max(audits, key=lambda r: r.epsilon)
    summary["audit"] = {
        **best.to_dict(),
        "per_model": [r.epsilon for r in audits],
        "overall_confidence": ac.audit_confidence,
        "delta": config.dp.delta,
    }
    return result


def merge_outputs(out_dir: str | Path, shard_dirs: Sequence[str | Path]) -> int:
    """Copy the cached model files of ``shard_dirs`` into ``out_dir``; returns files copied."""
    out = Path(out_dir)
    copied = 0
    for shard in shard_dirs:
        cache = Path(shard) / "cache"
        if not cache.is_dir():
            raise FileNotFoundError(f"{shard} has no cache/ directory (not a safenorm-eval output)")
        for src in sorted(cache.glob("*/*")):
            dst = out / "cache" / src.parent.name / src.name
            if src.name.endswith(".npz") and ".tmp" in src.name:
                continue
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += src.suffix == ".npz"
        if (Path(shard) / "config.json").exists() and not (out / "config.json").exists():
            shutil.copy2(Path(shard) / "config.json", out / "config.json")
    return copied
