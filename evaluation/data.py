"""Datasets of the harness: scikit-learn's ``digits``, CIFAR-10 from local pickles, synthetic.

Every loader returns an :class:`ImageDataset` of raw images in ``[0, 1]``; the harness splits
it, normalizes it and adds canaries. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safenorm.evaluation.config import DataConfig
from safenorm.evaluation.registry import Registry
from torch import Tensor

__all__ = [
    "DATASETS",
    "ImageDataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "make_synthetic",
    "write_cifar10_batches",
]

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


@dataclass
class ImageDataset:
    """Images in ``[0, 1]`` with integer labels.

    Attributes:
        x: ``(N, C, H, W)`` float32 in ``[0, 1]``.
        y: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
        name: a short name (used in reports and cache keys).
        test_x, test_y: an official test split, if the dataset has one; otherwise the harness
            carves its test set out of ``x``.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    test_x: Tensor | None = None
    test_y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(
                f"ImageDataset.x must be (N, C, H, W), got shape {tuple(self.x.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")
        if (self.test_x is None) != (self.test_y is None):
            raise ValueError("give both test_x and test_y, or neither")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


def load_digits(config: DataConfig, seed: int) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; ships with sklearn)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return ImageDataset(x=x, y=y, num_classes=10, name="digits")


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / CIFAR10_TEST_BATCH).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 python batches under {root} (expected {CIFAR10_TEST_BATCH} and "
        "data_batch_1..5, e.g. the extracted cifar-10-python.tar.gz); set data.root or --data-root"
    )


def _read_batches(root: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        batch = _unpickle(path)
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = batch.get(b"labels", batch.get(b"fine_labels"))
        xs.append(torch.from_numpy(data.copy()))
        ys.append(torch.tensor(labels, dtype=torch.int64))
    if not xs:
        raise FileNotFoundError(f"none of {list(names)} found in {root}")
    return torch.cat(xs).float() / 255.0, torch.cat(ys)


def load_cifar10(config: DataConfig, seed: int) -> ImageDataset:
    """CIFAR-10 from a local directory in the python-pickle format (``data_batch_*``,
    ``test_batch``); missing training batches are skipped, so a partial copy works too."""
    if config.root is None:
        raise FileNotFoundError("CIFAR-10 needs data.root (the cifar-10-batches-py directory)")
    root = _cifar_root(config.root)
    x, y = _read_batches(root, CIFAR10_TRAIN_BATCHES)
    tx, ty = _read_batches(root, (CIFAR10_TEST_BATCH,))
    return ImageDataset(x=x, y=y, num_classes=10, name="cifar10", test_x=tx, test_y=ty)


def write_cifar10_batches(
    root: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    batches: int = 5,
) -> Path:
    """Write arrays in CIFAR-10's python-pickle layout (for tests and small local copies).

    Args:
        root: directory to create.
        x, test_x: ``(N, 3, 32, 32)`` uint8 images.
        y, test_y: ``(N,)`` integer labels.
        batches: number of ``data_batch_*`` files to split ``x`` into.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(x)), batches), start=1):
        blob = {
            b"data": x[idx].reshape(len(idx), -1),
            b"labels": [int(v) for v in y[idx]],
            b"batch_label": f"training batch {i} of {batches}".encode(),
        }
        with (root / f"data_batch_{i}").open("wb") as f:
            pickle.dump(blob, f)
    blob = {
        b"data": test_x.reshape(len(test_x), -1),
        b"labels": [int(v) for v in test_y],
        b"batch_label": b"testing batch 1 of 1",
    }
    with (root / CIFAR10_TEST_BATCH).open("wb") as f:
        pickle.dump(blob, f)
    return root


def make_synthetic(config: DataConfig, seed: int) -> ImageDataset:
    """Class templates plus pixel noise: learnable in a few epochs, any size and shape."""
    g = torch.Generator().manual_seed(10_000 + seed)
    c, h, w = config.synthetic_shape
    k = config.synthetic_classes
    templates = torch.rand(k, c, h, w, generator=g)
    y = torch.randint(0, k, (config.synthetic_size,), generator=g)
    noise = 0.25 * torch.randn(config.synthetic_size, c, h, w, generator=g)
    x = (templates[y] + noise).clamp(0, 1)
    return ImageDataset(x=x, y=y, num_classes=k, name="synthetic")


DatasetLoader = Callable[[DataConfig, int], ImageDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")
DATASETS.register("digits", load_digits, aliases=("sklearn-digits",))
DATASETS.register("cifar10", load_cifar10, aliases=("cifar-10", "cifar"))
DATASETS.register("synthetic", make_synthetic, aliases=("synth",))


def load_dataset(config: DataConfig, seed: int = 0) -> ImageDataset:
    """Load the registered dataset ``config.dataset``."""
    return DATASETS.get(config.dataset)(config, seed)
