"""Canaries and the evaluation set ("universe") every model is scored on.

The universe is, in this order: the candidate pool (each model trains on a random half), the
inserted canaries (each in a random half of the models), the reference canaries (never
inserted; exposure ranks a canary among them) and the test set (never inserted). All images are
normalized with the per-channel mean and standard deviation of the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safenorm.evaluation.config import CanaryConfig, DataConfig
from safenorm.evaluation.data import ImageDataset
from safenorm.evaluation.registry import Registry
from torch import Tensor

__all__ = ["CANARIES", "Universe", "build_universe", "membership_masks"]

# (n, rng, source images, source labels, (C, H, W), num_classes) -> (images in [0, 1], labels)
CanaryMaker = Callable[
    [int, np.random.Generator, Tensor, Tensor, tuple[int, int, int], int], tuple[Tensor, Tensor]
]
CANARIES: Registry[CanaryMaker] = Registry("canary type")


def _random_labels(n: int, rng: np.random.Generator, k: int) -> Tensor:
    return torch.from_numpy(rng.integers(0, k, n)).long()


def _mislabeled(n, rng, source_x, source_y, shape, k):
    """Real held-out images with a wrong label (uniform over the other classes)."""
    if len(source_x) < n:
        raise ValueError(f"{n} mislabeled canaries need {n} held-out images, have {len(source_x)}")
    idx = rng.choice(len(source_x), n, replace=False)
    shift = torch.from_numpy(rng.integers(1, k, n)).long()
    return source_x[idx].clone(), (source_y[idx] + shift) % k


def _noise(n, rng, source_x, source_y, shape, k):
    """Uniform pixel noise with a random label."""
    return torch.from_numpy(rng.random((n, *shape))).float(), _random_labels(n, rng, k)


def _blank(n, rng, source_x, source_y, shape, k):
    """A constant image (random level per canary, per channel) with a random label."""
    levels = rng.random((n, shape[0], 1, 1))
    x = np.broadcast_to(levels, (n, *shape)).copy()
    return torch.from_numpy(x).float(), _random_labels(n, rng, k)


def _ood(n, rng, source_x, source_y, shape, k):
    """Out-of-distribution images: random rectangles, ellipses and lines on a random background."""
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, c, h, w))
    for i in range(n):
        img = np.broadcast_to(rng.random((c, 1, 1)) * 0.3, (c, h, w)).copy()
        for _ in range(int(rng.integers(2, 5))):
            color = rng.random((c, 1))
            cy, cx = rng.random(2) * (h - 1, w - 1)
            ry, rx = 1 + rng.random(2) * (h / 3, w / 3)
            shape_kind = rng.integers(0, 3)
            if shape_kind == 0:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            elif shape_kind == 1:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                angle = rng.random() * np.pi
                dist = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
                mask = dist <= max(0.5, 0.08 * min(h, w))
            img[:, mask] = color
        out[i] = img
    return torch.from_numpy(out).float(), _random_labels(n, rng, k)


CANARIES.register("mislabeled", _mislabeled, aliases=("label-flip", "mislabelled"))
CANARIES.register("noise", _noise, aliases=("uniform", "uniform-noise"))
CANARIES.register("blank", _blank, aliases=("constant",))
CANARIES.register("ood", _ood, aliases=("shapes", "out-of-distribution"))

GROUPS = ("pool", "canary", "reference", "test")


@dataclass
class Universe:
    """The examples every model is scored on.

    Attributes:
        x: ``(U, C, H, W)`` normalized images.
        y: ``(U,)`` labels (a canary's label is the one it is inserted with).
        group: ``(U,)`` index into :data:`GROUPS` (pool, canary, reference, test).
        canary_type: ``(U,)`` canary type name (``""`` for pool and test).
        num_classes, name: from the dataset.
        mean, std: per-channel normalization (computed on the pool).
    """

    x: Tensor
    y: Tensor
    group: np.ndarray
    canary_type: np.ndarray
    num_classes: int
    name: str
    mean: Tensor
    std: Tensor

    def indices(self, group: str) -> np.ndarray:
        """Universe indices of a group (``pool``, ``canary``, ``reference``, ``test``)."""
        return np.flatnonzero(self.group == GROUPS.index(group))

    @property
    def num_candidates(self) -> int:
        """Pool plus inserted canaries: the examples with random membership (they come first)."""
        return len(self.indices("pool")) + len(self.indices("canary"))

    @property
    def canary_types(self) -> list[str]:
        """Canary types present, in order."""
        seen = dict.fromkeys(t for t in self.canary_type if t)
        return list(seen)


def build_universe(
    data: ImageDataset, data_config: DataConfig, canaries: CanaryConfig, seed: int
) -> Universe:
    """Split ``data`` into pool / held-out / test and add canaries; deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 7])
    n = len(data.x)
    perm = torch.from_numpy(rng.permutation(n))
    pool_n = data_config.pool_size
    need_mislabeled = (canaries.per_type + canaries.references_per_type) * (
        "mislabeled" in [CANARIES.canonical(t) for t in canaries.types]
    )
    if data.test_x is not None:
        test_x, test_y = data.test_x[: data_config.test_size], data.test_y[: data_config.test_size]
        rest = perm[pool_n:]
    else:
        test_idx = perm[pool_n : pool_n + data_config.test_size]
        test_x, test_y = data.x[test_idx], data.y[test_idx]
        rest = perm[pool_n + data_config.test_size :]
    if pool_n + (0 if data.test_x is not None else len(test_x)) > n:
        raise ValueError(f"pool_size {pool_n} + test_size exceed the {n} examples of {data.name}")
    if len(rest) < need_mislabeled:
        raise ValueError(
            f"{need_mislabeled} mislabeled canaries and references need that many held-out "
            f"examples; {data.name} leaves {len(rest)} after the pool and test split"
        )
    pool = perm[:pool_n]
    source_x, source_y = data.x[rest], data.y[rest]
    shape = data.image_shape
    cx, cy, rx, ry, ctype, rtype = [], [], [], [], [], []
    for name in canaries.types:
        canonical = CANARIES.canonical(name)
        total = canaries.per_type + canaries.references_per_type
        x, y = CANARIES.get(canonical)(total, rng, source_x, source_y, shape, data.num_classes)
        cx.append(x[: canaries.per_type])
        cy.append(y[: canaries.per_type])
        rx.append(x[canaries.per_type :])
        ry.append(y[canaries.per_type :])
        ctype += [canonical] * canaries.per_type
        rtype += [canonical] * canaries.references_per_type
    empty_x = data.x[:0]
    empty_y = data.y[:0]
    parts_x = [data.x[pool], *cx, *rx, test_x] if cx else [data.x[pool], empty_x, test_x]
    parts_y = [data.y[pool], *cy, *ry, test_y] if cy else [data.y[pool], empty_y, test_y]
    x = torch.cat(parts_x).float()
    y = torch.cat(parts_y).long()
    group = np.concatenate(
        [
            np.full(pool_n, 0),
            np.full(len(ctype), 1),
            np.full(len(rtype), 2),
            np.full(len(test_x), 3),
        ]
    ).astype(np.int64)
    canary_type = np.array([""] * pool_n + ctype + rtype + [""] * len(test_x), dtype=object)
    pool_x = data.x[pool]
    mean = pool_x.mean(dim=(0, 2, 3))
    std = pool_x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return Universe(
        x=x.contiguous(),
        y=y,
        group=group,
        canary_type=canary_type,
        num_classes=data.num_classes,
        name=data.name,
        mean=mean,
        std=std,
    )


def membership_masks(num_models: int, num_candidates: int, seed: int) -> np.ndarray:
    """``(num_models, num_candidates)`` booleans: independent fair coins per model and example.

    Row ``m`` depends only on ``(seed, m)``, so adding models or sharding keeps earlier rows.
    Independence across models (rather than exactly half the models per example) keeps the
    one-run audit valid when other models are used to calibrate the target's scores.
    """
    return (
        np.stack(
            [
                np.random.default_rng([seed, 1, m]).random(num_candidates) < 0.5
                for m in range(num_models)
            ]
        )
        if num_models
        else np.zeros((0, num_candidates), dtype=bool)
    )
