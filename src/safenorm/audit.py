"""Find the layers of a model that couple samples or release unprotected statistics.

Checks are registered per class (``@register_check(SomeNorm)``) and looked up along the MRO, so a
subclass of ``nn.BatchNorm2d`` is checked as a BatchNorm even though Opacus' validator, which
matches exact types, lets it through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from safenorm.modules import ClippedBatchNorm, DPBatchNorm, GhostBatchNorm

__all__ = ["Finding", "find_unsafe_layers", "register_check"]

CONVERT_DP = 'safenorm.convert_batchnorm(model, "dp") for DP training'
CONVERT_BOUNDED = 'safenorm.convert_batchnorm(model, "clipped") (or "ghost") to bound the coupling'


@dataclass(frozen=True)
class Finding:
    """One problem of one layer.

    Attributes:
        name: the layer's qualified name in the model (``""`` for the root).
        layer: the layer's class name.
        kind: ``"couples-samples"`` (its output or gradient for one sample depends on other
            samples without a DP bound) or ``"releases-statistics"`` (it stores or ships a summary
            of training data without protection).
        reason: why, in a sentence.
        fix: what to do instead.
    """

    name: str
    layer: str
    kind: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.name or '<root>'} ({self.layer}): {self.reason} Fix: {self.fix}."


Check = Callable[[str, nn.Module], Iterator[Finding]]
_CHECKS: dict[type[nn.Module], Check] = {}


def register_check(*classes: type[nn.Module]) -> Callable[[Check], Check]:
    """Register ``check(name, module) -> Iterator[Finding]`` for ``classes`` and subclasses."""

    def decorator(check: Check) -> Check:
        for cls in classes:
            _CHECKS[cls] = check
        return check

    return decorator


def _check_for(module: nn.Module) -> Check | None:
    return next((_CHECKS[c] for c in type(module).__mro__ if c in _CHECKS), None)


def _finding(name: str, module: nn.Module, kind: str, reason: str, fix: str) -> Finding:
    return Finding(name=name, layer=type(module).__name__, kind=kind, reason=reason, fix=fix)


_FIX_BATCHNORM_STATISTICS = (
    "train with DPBatchNorm, or recompute them with the DP mechanism before release"
)


def _releases_running_stats(
    name: str, module: nn.Module, what: str, fix: str = _FIX_BATCHNORM_STATISTICS
) -> Iterator[Finding]:
    if getattr(module, "running_mean", None) is not None:
        yield _finding(
            name,
            module,
            "releases-statistics",
            f"its running_mean/running_var are {what} of the training data and ship in every "
            "checkpoint.",
            fix,
        )


@register_check(_BatchNorm)
def _check_batchnorm(name: str, module: nn.Module) -> Iterator[Finding]:
    frozen = all(not p.requires_grad for p in module.parameters())
    notes = []
    if not module.affine:
        notes.append("it has no affine parameters (Opacus' validator does not look at it)")
    elif frozen:
        notes.append(
            "its parameters are frozen but it is in train mode (batch statistics still "
            "mix samples and update the buffers)"
        )
    if type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        notes.append("it is a BatchNorm subclass (Opacus matches exact types and misses it)")
    if module.training or module.running_mean is None:
        extra = f" Note: {'; '.join(notes)}." if notes else ""
        yield _finding(
            name,
            module,
            "couples-samples",
            "batch statistics make every sample's output and gradient depend on the whole batch, "
            "so per-sample clipping no longer bounds one sample's influence." + extra,
            f"{CONVERT_DP}; {CONVERT_BOUNDED}; or call .eval() on it to freeze its statistics",
        )
    yield from _releases_running_stats(name, module, "an unprotected summary")


@register_check(GhostBatchNorm)
def _check_ghost(name: str, module: nn.Module) -> Iterator[Finding]:
    if module.training or module.running_mean is None:
        yield _finding(
            name,
            module,
            "couples-samples",
            f"each sample's output depends on its {module.ghost_batch_size - 1} ghost-group mates "
            "without bound; ghost batching is not DP.",
            CONVERT_DP,
        )
    yield from _releases_running_stats(name, module, "an unprotected summary")


@register_check(ClippedBatchNorm)
def _check_clipped(name: str, module: nn.Module) -> Iterator[Finding]:
    if module.training or module.running_mean is None:
        yield _finding(
            name,
            module,
            "couples-samples",
            "clipping bounds each sample's influence on the batch statistics but adds no noise; "
            "it is not DP.",
            CONVERT_DP,
        )
    yield from _releases_running_stats(name, module, "a clipped but un-noised summary")


@register_check(DPBatchNorm)
def _check_dp(name: str, module: nn.Module) -> Iterator[Finding]:
    if (module.training or module.running_mean is None) and module.noise_multiplier == 0:
        yield _finding(
            name,
            module,
            "couples-samples",
            "noise_multiplier is 0, so its released statistics are not private.",
            "set noise_multiplier > 0 (or let safenorm.opacus.PrivacyEngine calibrate it)",
        )


@register_check(_InstanceNorm)
def _check_instancenorm(name: str, module: nn.Module) -> Iterator[Finding]:
    yield from _releases_running_stats(
        name,
        module,
        "an unprotected summary",
        "construct it with track_running_stats=False (InstanceNorm normalizes each sample with "
        "its own statistics and needs no running ones)",
    )


def find_unsafe_layers(model: nn.Module) -> list[Finding]:
    """List every layer of ``model`` that couples samples or releases unprotected statistics.

    Covers plain BatchNorm (including ``affine=False``, frozen-but-training and subclasses,
    which Opacus' validator misses), SyncBatchNorm, ghost and clipped layers (bounded but not DP),
    DP layers with zero noise, and InstanceNorm with running statistics. Layers in eval mode with
    running statistics do not couple samples, but their statistics are still reported.

    Args:
        model: any ``nn.Module``.

    Returns:
        One :class:`Finding` per problem, in module order; empty if there is none.
    """
    findings: list[Finding] = []
    for name, module in model.named_modules():
        check = _check_for(module)
        if check is not None:
            findings.extend(check(name, module))
    return findings
