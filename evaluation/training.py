"""Training loops: plain SGD, and DP-SGD through an Opacus-compatible privacy engine.

Trainers are registered by name; a variant names the trainer it uses. Every loop is seeded
(model initialisation, data order, augmentation, DP noise through torch's global generator).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safenorm.evaluation.config import EvalConfig
from safenorm.evaluation.registry import Registry
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "TRAINERS",
    "DivergenceError",
    "TrainResult",
    "augment_batch",
    "first_nonfinite_module",
    "seed_everything",
    "unwrap_model",
]

# How safenorm's layers word a refused non-finite batch statistic (a ValueError naming the layer).
_NONFINITE_MESSAGES = ("NaN or infinite",)


class DivergenceError(RuntimeError):
    """Training produced non-finite values: a loss, an output or a layer's statistics.

    Attributes:
        step: the optimizer step (0-based) whose forward or backward failed; ``-1`` when found
            after training (non-finite parameters or scores).
        layer: the first module with a non-finite output (its qualified name), or the layer a
            safenorm error names; ``""`` when unknown.
        reason: what was non-finite.
    """

    def __init__(self, step: int, layer: str, reason: str) -> None:
        where = f" at layer {layer!r}" if layer else ""
        super().__init__(f"training diverged at step {step}{where}: {reason}")
        self.step, self.layer, self.reason = step, layer, reason


def first_nonfinite_module(model: nn.Module, x: Tensor) -> str:
    """Qualified name of the first module (in execution order) whose output is not finite.

    Runs one extra forward without gradients; ``""`` if every output is finite. A layer that
    refuses its own non-finite statistics (safenorm's) is named from its error.
    """
    found: list[str] = []
    # an Opacus GradSampleModule prefixes the user's names with "_module."
    names = {m: n.replace("_module.", "") for n, m in model.named_modules()}

    def hook(module: nn.Module, args: object, output: object) -> None:
        if not found and isinstance(output, Tensor) and not bool(torch.isfinite(output).all()):
            found.append(names.get(module, type(module).__name__))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    except ValueError as err:
        if not found:
            found.append(_layer_of(err))
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else ""


def _is_nonfinite_error(err: BaseException) -> bool:
    return isinstance(err, ValueError) and any(m in str(err) for m in _NONFINITE_MESSAGES)


def _layer_of(err: BaseException) -> str:
    # safenorm layers describe themselves as "<Class> '<qualified name>'"
    match = re.search(r"'([^']+)'", str(err))
    return match.group(1) if match else ""


@contextlib.contextmanager
def _diverges_at(step: int) -> Iterator[None]:
    """Turn a safenorm layer's non-finite-statistics error at ``step`` into DivergenceError."""
    try:
        yield
    except ValueError as err:
        if not _is_nonfinite_error(err):
            raise
        raise DivergenceError(step, _layer_of(err), str(err).split(";")[0]) from err


def _check_loss(loss: Tensor, model: nn.Module, x: Tensor, step: int) -> None:
    if not bool(torch.isfinite(loss)):
        layer = first_nonfinite_module(model, x)
        raise DivergenceError(step, layer, f"the training loss is {float(loss.detach())}")


def check_parameters_finite(model: nn.Module, steps: int) -> None:
    """Raise :class:`DivergenceError` if a parameter or buffer left training non-finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            layer = name.rsplit(".", 1)[0] if "." in name else name
            raise DivergenceError(steps, layer, f"{name} is non-finite after training")


@dataclass
class TrainResult:
    """A trained model and what training reported.

    Attributes:
        model: the trained, unwrapped ``nn.Module`` (in eval mode).
        epsilon: the accountant's epsilon at ``config.dp.delta`` (``None`` for non-DP training).
        steps: optimizer steps taken.
        seconds: wall time of training.
        final_loss: mean training loss of the last epoch.
    """

    model: nn.Module
    epsilon: float | None
    steps: int
    seconds: float
    final_loss: float


Trainer = Callable[[nn.Module, Tensor, Tensor, EvalConfig, int, torch.device], TrainResult]
TRAINERS: Registry[Trainer] = Registry("trainer")


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crops (zero padding ``pad``) and horizontal flips, per sample."""
    n, _, h, w = x.shape
    if n == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _cosine(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )


def _train_sgd(
    model: nn.Module, x: Tensor, y: Tensor, config: EvalConfig, seed: int, device: torch.device
) -> TrainResult:
    """Mini-batch SGD with momentum, weight decay and cosine decay; batches of one are skipped
    (batch statistics need two samples)."""
    tc = config.train
    start = time.perf_counter()
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
    )
    per_epoch = max(1, math.ceil(len(x) / tc.batch_size))
    sched = _cosine(opt, tc.epochs * per_epoch)
    steps, last = 0, float("nan")
    for _ in range(tc.epochs):
        perm = torch.randperm(len(x), generator=g).to(device)
        losses = []
        for i in range(0, len(x), tc.batch_size):
            idx = perm[i : i + tc.batch_size]
            if len(idx) < 2:
                continue
            xb = augment_batch(x[idx], g) if tc.augment else x[idx]
            with _diverges_at(steps):
                loss = F.cross_entropy(model(xb), y[idx])
                _check_loss(loss, model, xb, steps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            steps += 1
            losses.append(loss.detach())
        if losses:
            last = float(torch.stack(losses).mean())
    check_parameters_finite(model, steps)
    model.eval()
    return TrainResult(model, None, steps, time.perf_counter() - start, last)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus ``GradSampleModule`` (hooks removed)."""
    inner = model
    while hasattr(inner, "_module") and isinstance(inner._module, nn.Module):
        if hasattr(inner, "remove_hooks"):
            with contextlib.suppress(ValueError, RuntimeError):
                inner.remove_hooks()
        inner = inner._module
    return inner


def _make_dp_trainer(engine_factory: Callable[[], Any]) -> Trainer:
    def train_dp(
        model: nn.Module, x: Tensor, y: Tensor, config: EvalConfig, seed: int, device: torch.device
    ) -> TrainResult:
        """DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise; epsilon at delta."""
        with warnings.catch_warnings():
            # expected here: the harness seeds the noise on purpose (not secure_mode), and the
            # first layer's input does not require gradients
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _train_dp(model, x, y, config, seed, device)

    def _train_dp(
        model: nn.Module, x: Tensor, y: Tensor, config: EvalConfig, seed: int, device: torch.device
    ) -> TrainResult:
        """DP-SGD: Poisson sampling, per-sample clipping, Gaussian noise; epsilon at delta."""
        tc, dc = config.train, config.dp
        start = time.perf_counter()
        model.to(device).train()
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            TensorDataset(x.to(device), y.to(device)),
            batch_size=tc.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed + 1),
        )
        opt = torch.optim.SGD(model.parameters(), lr=dc.lr, momentum=dc.momentum)
        engine = engine_factory()
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            max_grad_norm=dc.max_grad_norm,
            poisson_sampling=True,
            **_noise_arguments(model, dc),
        )
        epochs = dc.epochs if dc.epochs is not None else tc.epochs
        sched = _cosine(
            dp_opt.original_optimizer if hasattr(dp_opt, "original_optimizer") else dp_opt,
            epochs * max(1, len(dp_loader)),
        )
        steps, last = 0, float("nan")
        for _ in range(epochs):
            losses = []
            for xb, yb in dp_loader:
                if tc.augment:
                    xb = augment_batch(xb, g)
                with _diverges_at(steps):
                    dp_opt.zero_grad(set_to_none=True)
                    out = dp_model(xb)
                    loss = F.cross_entropy(out, yb) if len(yb) else out.sum() * 0.0
                    if len(yb):
                        _check_loss(loss, dp_model, xb, steps)
                    loss.backward()
                    dp_opt.step()
                sched.step()
                steps += 1
                if len(yb):
                    losses.append(loss.detach())
            if losses:
                last = float(torch.stack(losses).mean())
        epsilon = float(engine.get_epsilon(dc.delta))
        inner = unwrap_model(dp_model)
        check_parameters_finite(inner, steps)
        inner.eval()
        return TrainResult(inner, epsilon, steps, time.perf_counter() - start, last)

    return train_dp


def _noise_arguments(model: nn.Module, dc: Any) -> dict[str, float]:
    """Noise multipliers making every step one Gaussian with ``sigma_eff = dc.noise_multiplier``.

    Without DP statistics layers that is the gradient's; with them, the budget is split by
    ``dc.statistics_share`` (:func:`safenorm.privacy.split_noise`), so every DP variant with the
    same ``noise_multiplier`` spends the same epsilon.
    """
    from safenorm.privacy import planned_releases, split_noise

    releases = planned_releases(model)
    if releases == 0:
        return {"noise_multiplier": dc.noise_multiplier}
    plan = split_noise(dc.noise_multiplier, releases, dc.statistics_share)
    return {
        "noise_multiplier": plan.gradient_noise_multiplier,
        "statistics_noise_multiplier": plan.statistics_noise_multiplier,
    }


def _opacus_engine() -> Any:
    from opacus import PrivacyEngine

    return PrivacyEngine()


def _safenorm_engine() -> Any:
    from safenorm.opacus import PrivacyEngine

    return PrivacyEngine()


TRAINERS.register("sgd", _train_sgd)
TRAINERS.register("dpsgd-opacus", _make_dp_trainer(_opacus_engine), aliases=("opacus",))
TRAINERS.register(
    "dpsgd-safenorm", _make_dp_trainer(_safenorm_engine), aliases=("safenorm-opacus",)
)
