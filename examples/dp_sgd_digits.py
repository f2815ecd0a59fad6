"""DP-SGD on scikit-learn's digits: DPBatchNorm (safenorm) vs Opacus' GroupNorm fix.

Both models start from the same BatchNorm CNN and train with the same optimizer, schedule and
Poisson sampling. The GroupNorm model has only gradient noise; the DPBatchNorm model pays for
its statistics too, and ``make_private_with_epsilon`` calibrates both to the SAME epsilon.

    python examples/dp_sgd_digits.py --epochs 15 --epsilon 3
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine as OpacusPrivacyEngine
from opacus.validators import ModuleValidator
from safenorm.evaluation.models import digits_dp_cnn as bn_cnn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm.opacus import PrivacyEngine

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook")


def digits(seed: int = 0):
    """(train, test) TensorDatasets of 1x8x8 images scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()
    return TensorDataset((x_tr - mean) / std, y_tr), TensorDataset((x_te - mean) / std, y_te)


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, engine, train_set, *, epochs, epsilon, delta, batch_size, lr, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # no momentum, as in the study
    gs_model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train_set, batch_size=batch_size),
        target_epsilon=epsilon,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
        **kwargs,
    )
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(gs_model(x), y).backward()
            optimizer.step()
    return optimizer.noise_multiplier, engine.get_epsilon(delta)


def run(
    epochs: int = 15,
    epsilon: float = 3.0,
    delta: float = 1e-5,
    batch_size: int = 128,
    lr: float = 0.25,
    seed: int = 0,
    statistics_share: float = 0.1,
) -> dict[str, dict[str, float]]:
    train_set, test_set = digits(seed)
    methods = {
        # Opacus' fix (BatchNorm -> GroupNorm), gradient noise only
        "groupnorm (Opacus fix)": (ModuleValidator.fix, OpacusPrivacyEngine, {}),
        # safenorm: keep BatchNorm with DP statistics; the budget covers both
        "dpbatchnorm (safenorm)": (
            lambda model: safenorm.convert_batchnorm(model, "dp"),
            PrivacyEngine,
            {"statistics_share": statistics_share},
        ),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (convert, engine_class, extra) in methods.items():
        torch.manual_seed(seed)
        model = convert(bn_cnn())
        engine = engine_class(accountant="rdp")
        start = time.perf_counter()
        sigma, eps = train(
            model, engine, train_set, epochs=epochs, epsilon=epsilon, delta=delta,
            batch_size=batch_size, lr=lr, **extra,
        )  # fmt: skip
        results[name] = {
            "test_accuracy": accuracy(model, test_set),
            "epsilon": eps,
            "gradient_sigma": sigma,
            "seconds": time.perf_counter() - start,
        }
        plan = getattr(engine, "noise_plan", None)
        if plan is not None and plan.statistics_noise_multiplier is not None:
            results[name]["statistics_sigma"] = plan.statistics_noise_multiplier
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--statistics-share", type=float, default=0.1)
    args = parser.parse_args()
    results = run(
        args.epochs,
        args.epsilon,
        args.delta,
        args.batch_size,
        args.lr,
        args.seed,
        args.statistics_share,
    )
    print(
        f"DP-SGD on digits, {args.epochs} epochs, target epsilon {args.epsilon}, delta {args.delta}"
    )
    for name, r in results.items():
        extra = f", statistics sigma {r['statistics_sigma']:.2f}" if "statistics_sigma" in r else ""
        print(
            f"  {name:26s} test accuracy {r['test_accuracy']:.1%}  epsilon {r['epsilon']:.3f}  "
            f"gradient sigma {r['gradient_sigma']:.3f}{extra}  ({r['seconds']:.1f} s)"
        )


if __name__ == "__main__":
    main()
