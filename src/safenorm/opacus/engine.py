"""``safenorm.opacus.PrivacyEngine``: Opacus' PrivacyEngine, aware of DP statistics layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import opacus
import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks, get_gsm_class
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from torch import nn, optim
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from safenorm.convert import convert_batchnorm
from safenorm.opacus.grad_samplers import record_statistics
from safenorm.opacus.step_batch import StepBatchTracker, track_loader_batches
from safenorm.opacus.validation import (
    BufferWriteGuard,
    check_distributed_sync,
    check_functorch_coverage,
    validate_model,
)
from safenorm.privacy import (
    DEFAULT_STATISTICS_SHARE,
    NoisePlan,
    ReleaseLedger,
    calibrate_noise,
    dp_layers,
    planned_releases,
    releasing_layers,
    sigma_eff,
)
from safenorm.warnings import PrivacyWarning

__all__ = ["PrivacyEngine", "VirtualStepError"]

_DP_MODES = ("hooks", "ghost")


class VirtualStepError(RuntimeError):
    """Virtual steps (BatchMemoryManager) with DP layers that release statistics."""


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus' ``PrivacyEngine`` for models with safenorm DP statistics layers.

    Change one import (``from safenorm.opacus import PrivacyEngine``) and train a model whose
    BatchNorms were converted with ``safenorm.convert_batchnorm(model, "dp")``. Everything
    Opacus' engine does is kept (``make_private``, ``make_private_with_epsilon``,
    ``get_epsilon``, accountants ``"prv"``/``"rdp"``/``"gdp"``, ``secure_mode``, checkpoints);
    in addition:

    * **validation**: DP layers are accepted (their buffers hold released values only; their
      state_dict keys are those of ``nn.BatchNorm*d``); every layer that couples samples is
      rejected before training with the conversion to apply, including what Opacus misses
      (``affine=False`` BatchNorm, frozen BatchNorm in train mode, BatchNorm subclasses, ghost
      and clipped layers); normalization layers are never left to Opacus' functorch fallback;
    * **public denominator**: each DP layer's ``expected_batch_size`` is set from the
      optimizer's (times the world size for layers synced over a ``process_group``);
    * **accounting**: every optimizer step is one Poisson-subsampled Gaussian mechanism with
      ``sigma_eff = (1/sigma_g^2 + sum_r 1/sigma_r^2)^(-1/2)`` over the statistics releases
      actually made since the previous step (counted by release hooks: two forwards per step
      cost twice), so ``get_epsilon`` includes the statistics' cost;
    * **calibration**: ``make_private_with_epsilon`` splits the budget between gradient and
      statistics noise (``statistics_share``);
    * **virtual steps**: ``BatchMemoryManager`` splitting a logical batch is refused while DP
      layers release statistics (position-based physical batches are not a DP partition);
    * grad samplers and ghost-clipping norm samplers of the DP layers are registered on import.

    See docs/OPACUS.md for the accounting argument and what is assumed.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        super().__init__(accountant=accountant, secure_mode=secure_mode)
        self._ledgers: list[ReleaseLedger] = []
        self._trackers: list[StepBatchTracker] = []
        self._flushes: list[Callable[[], None]] = []
        self._handles: list[RemovableHandle] = []
        #: The noise split chosen by the last :meth:`make_private_with_epsilon` (else ``None``).
        self.noise_plan: NoisePlan | None = None

    # -- validation ------------------------------------------------------------------------------

    def validate(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer | None,
        data_loader: DataLoader | None,
    ) -> None:
        """Raise :class:`~safenorm.opacus.validation.CouplingLayerError` (an Opacus
        ``UnsupportedModuleError``) naming every layer unusable for DP-SGD and its fix."""
        validate_model(module)

    def is_compatible(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer | None,
        data_loader: DataLoader | None,
    ) -> bool:
        try:
            self.validate(module=module, optimizer=optimizer, data_loader=data_loader)
        except opacus.validators.errors.UnsupportedModuleError:
            return False
        return True

    @classmethod
    def get_compatible_module(cls, module: nn.Module, **dp_kwargs: Any) -> nn.Module:
        """Convert every BatchNorm to a DP layer (instead of Opacus' GroupNorm), apply Opacus'
        other fixes, and validate. ``dp_kwargs`` go to the DP layers."""
        module = convert_batchnorm(module, "dp", **dp_kwargs)
        module = opacus.validators.ModuleValidator.fix(module)
        validate_model(module)
        return module

    def _prepare_model(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        max_grad_norm: float | list[float] = 1.0,
        loss_reduction: str = "mean",
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
    ) -> AbstractGradSampleModule | GradSampleHooks:
        inner = module._module if isinstance(module, AbstractGradSampleModule) else module
        self.validate(module=inner, optimizer=None, data_loader=None)
        if dp_layers(inner):
            if grad_sample_mode not in _DP_MODES:
                raise ValueError(
                    f"grad_sample_mode={grad_sample_mode!r} is not supported with DP statistics "
                    f"layers; use one of {_DP_MODES}"
                )
            if not batch_first:
                raise ValueError("DP statistics layers need batch_first=True")
        check_functorch_coverage(inner, force_functorch=grad_sample_mode == "functorch")
        if grad_sample_mode not in (*_DP_MODES, "functorch"):
            return super()._prepare_model(
                module,
                batch_first=batch_first,
                max_grad_norm=max_grad_norm,
                loss_reduction=loss_reduction,
                grad_sample_mode=grad_sample_mode,
                wrap_model=wrap_model,
            )
        if wrap_model and isinstance(module, AbstractGradSampleModule):
            if (
                module.batch_first != batch_first
                or module.loss_reduction != loss_reduction
                or type(module) is not get_gsm_class(grad_sample_mode)
            ):
                raise ValueError(
                    "Pre-existing GradSampleModule doesn't match new arguments; pass the plain "
                    "nn.Module instead"
                )
            prepared = module
        else:
            extra: dict[str, Any] = (
                {"max_grad_norm": max_grad_norm} if "ghost" in (grad_sample_mode) else {}
            )
            # strict=False: the strict checks already ran above (validate_model reproduces
            # Opacus' buffer check, exempting only the DP layers).
            prepared = prepare_module(
                module,
                grad_sample_mode=grad_sample_mode,
                batch_first=batch_first,
                loss_reduction=loss_reduction,
                wrap_model=wrap_model,
                strict=False,
                **extra,
            )
        self._handles.extend(record_statistics(inner))
        return prepared

    # -- make_private ----------------------------------------------------------------------------

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion: Callable = nn.CrossEntropyLoss(),  # noqa: B008 (Opacus' signature)
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        statistics_noise_multiplier: float | None = None,
        **kwargs: Any,
    ):
        """Opacus' ``make_private``, plus DP-layer set-up and sigma_eff accounting.

        Args:
            statistics_noise_multiplier: if given, the noise multiplier of every DP layer's
                releases (else each layer keeps its own ``noise_multiplier``).
            Other arguments: as ``opacus.PrivacyEngine.make_private``.

        Returns:
            As Opacus: ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion,
            data_loader)`` in ``"ghost"`` mode.
        """
        inner = module._module if isinstance(module, AbstractGradSampleModule) else module
        if statistics_noise_multiplier is not None:
            if statistics_noise_multiplier <= 0:
                raise ValueError("statistics_noise_multiplier must be > 0")
            for _, layer in releasing_layers(inner):
                layer.noise_multiplier = float(statistics_noise_multiplier)
        self._configure_noise_source(inner)
        out = super().make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            rand_on_empty=rand_on_empty,
            **kwargs,
        )
        dp_optimizer, dp_loader = out[1], out[-1]
        self._attach(inner, dp_optimizer, dp_loader, sample_rate=1 / len(dp_loader))
        return out

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion: Callable = nn.CrossEntropyLoss(),  # noqa: B008 (Opacus' signature)
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | list[float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        statistics_share: float = DEFAULT_STATISTICS_SHARE,
        forwards_per_step: int = 1,
        **kwargs: Any,
    ):
        """Opacus' ``make_private_with_epsilon``, calibrating gradient AND statistics noise.

        The per-step ``sigma_eff`` that reaches ``(target_epsilon, target_delta)`` after
        ``epochs`` epochs is found with this engine's accountant (to 0.1% relative); the gradient
        gets ``1 - statistics_share`` of ``1 / sigma_eff^2`` and the statistics releases of one
        step (``2 x forwards_per_step x`` releasing DP layers) share the rest equally
        (:func:`safenorm.privacy.split_noise`). The split is kept in :attr:`noise_plan`. If
        training makes more releases per step than planned, epsilon exceeds the target (the
        accountant still reports it correctly) and a warning says so.

        Args:
            statistics_share: share of the budget for the statistics, in ``(0, 1)`` (ignored
                without releasing DP layers). Default: 0.1
            forwards_per_step: training forwards of the model per optimizer step. Default: 1
            Other arguments: as ``opacus.PrivacyEngine.make_private_with_epsilon``.
        """
        inner = module._module if isinstance(module, AbstractGradSampleModule) else module
        sample_rate = 1 / len(data_loader)
        steps = int(epochs / sample_rate)
        if len(self.accountant) > 0:
            warnings.warn(
                "You're calling make_private_with_epsilon with non-zero privacy budget already "
                "spent. Returned noise_multiplier assumes zero starting point, so your overall "
                "privacy budget will be higher.",
                stacklevel=2,
            )
        mechanism = self.accountant.mechanism()

        def epsilon_fn(sigma: float, q: float, n_steps: int, delta: float) -> float:
            accountant = create_accountant(mechanism=mechanism)
            accountant.history = [(sigma, q, n_steps)]
            return float(accountant.get_epsilon(delta=delta))

        plan = calibrate_noise(
            target_epsilon,
            target_delta,
            sample_rate,
            steps,
            planned_releases(inner, forwards_per_step),
            statistics_share,
            epsilon_fn,
        )
        self.noise_plan = plan
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=plan.gradient_noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            statistics_noise_multiplier=plan.statistics_noise_multiplier,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far: every step taken and every release off the steps' batches.

        Releases made on the current step's batch before its optimizer step are not in it yet
        (they compose with that step's gradient release); a warning says so.
        """
        for flush in self._flushes:
            flush()
        pending = sum(len(ledger.pending) for ledger in self._ledgers)
        if pending:
            warnings.warn(
                f"{pending} statistics releases were made on the current batch since the last "
                "optimizer step and are not yet accounted (they will be at the next step); the "
                "epsilon returned does not include them",
                PrivacyWarning,
                stacklevel=2,
            )
        return super().get_epsilon(delta)

    def declare_step_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """Declare ``tensor`` an input computed sample by sample from the current batch of the
        DP data loader only (e.g. augmented on the device), so that the releases of a forward on
        it are charged with the step. Returns ``tensor``.

        Without the declaration, a forward on anything other than the loader's batch (or a
        device / dtype copy of it) is accounted as a release on the whole dataset.
        """
        if not self._trackers:
            raise RuntimeError("declare_step_input: no model was made private by this engine")
        # The models whose loader has a batch open (each model made private has its own).
        trackers = [t for t in self._trackers if t.has_open_batch] or self._trackers[:1]
        for tracker in trackers:
            tracker.declare(tensor)  # raises when no batch is open
        return tensor

    # -- internals -------------------------------------------------------------------------------

    def _configure_noise_source(self, model: nn.Module) -> None:
        if not self.secure_mode:
            return
        for name, layer in dp_layers(model):
            if layer.generator is not None:
                raise ValueError(
                    f"DP layer '{name}' has a seeded generator; seeds are prohibited in "
                    "secure_mode (pass generator=None)"
                )
            layer.secure_mode = True

    def _attach(
        self,
        model: nn.Module,
        optimizer: DPOptimizer,
        data_loader: DataLoader,
        sample_rate: float,
    ) -> None:
        check_distributed_sync(model, optimizer)
        self._set_denominators(model, optimizer)
        guard = BufferWriteGuard(model)
        accountant, plan = self.accountant, self.noise_plan
        warned = [False]

        def account(sigma: float, rate: float) -> None:
            if accountant.mechanism() == "gdp" and accountant.history:
                last_sigma, last_rate, _ = accountant.history[-1]
                if (last_sigma, last_rate) != (sigma, rate):
                    raise ValueError(
                        "the gdp accountant composes only identical steps, but this training "
                        "made statistics releases that differ from the steps (off the step's "
                        "batch, or a varying number per step); use accountant='rdp' or 'prv'"
                    )
            accountant.step(noise_multiplier=sigma, sample_rate=rate)

        def flush_unsampled() -> None:
            # Off the step's batch: no subsampling, and the batch's membership may shift when one
            # sample is added or removed (it can enter a batch and push another out), so each
            # release has sensitivity 2R: a Gaussian with noise multiplier sigma_r / 2, q = 1.
            releases = ledger.consume_unsampled()
            if releases:
                account(sigma_eff(None, [s / 2 for s in releases]), 1.0)

        tracker = StepBatchTracker(model)
        track_loader_batches(data_loader, tracker)
        ledger = ReleaseLedger(model, classify=tracker.release_is_on_step_batch)
        self._ledgers.append(ledger)
        self._trackers.append(tracker)
        self._flushes.append(flush_unsampled)

        def step_hook(optim: DPOptimizer) -> None:
            guard.check()
            flush_unsampled()
            releases = ledger.consume()
            tracker.close()
            if plan is not None and len(releases) > plan.num_releases and not warned[0]:
                warnings.warn(
                    f"{len(releases)} statistics releases in one step, but "
                    f"make_private_with_epsilon planned {plan.num_releases}: epsilon will exceed "
                    "the target (get_epsilon reports the true value); pass forwards_per_step",
                    PrivacyWarning,
                    stacklevel=2,
                )
                warned[0] = True
            account(
                sigma_eff(optim.noise_multiplier, releases),
                sample_rate * optim.accumulated_iterations,
            )

        # Replaces Opacus' own accounting hook (attach_step_hook keeps one hook).
        optimizer.attach_step_hook(step_hook)

        original_signal = optimizer.signal_skip_step

        def signal_skip_step(do_skip: bool = True) -> None:
            # Only BatchMemoryManager signals; its batches come from its own loader, which the
            # engine cannot tie to the step's Poisson batch (and a split is cut by position).
            if releasing_layers(model):
                names = ", ".join(name for name, _ in releasing_layers(model))
                raise VirtualStepError(
                    f"BatchMemoryManager with DP layers that release statistics ({names}): "
                    "physical batches are cut by position, so one sample changes every later "
                    "one and the releases' privacy cost is not bounded, and even unsplit "
                    "batches come from BatchMemoryManager's own loader, which the engine cannot "
                    "tie to the step's Poisson batch. Iterate the data loader returned by "
                    "make_private directly, or use frozen_statistics=True layers."
                )
            original_signal(do_skip)

        optimizer.signal_skip_step = signal_skip_step

    def _set_denominators(self, model: nn.Module, optimizer: DPOptimizer) -> None:
        expected = optimizer.expected_batch_size
        world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )
        for name, layer in dp_layers(model):
            denominator = expected * world if layer.process_group is not None else expected
            denominator = float(denominator)
            if (
                layer.expected_batch_size is not None
                and float(layer.expected_batch_size) != denominator
            ):
                warnings.warn(
                    f"DP layer '{name}': expected_batch_size {layer.expected_batch_size} replaced "
                    f"by the optimizer's expected batch size {denominator:g}",
                    PrivacyWarning,
                    stacklevel=4,
                )
            layer.expected_batch_size = denominator

    def release_ledgers(self) -> tuple[ReleaseLedger, ...]:
        """The release counters of the models made private by this engine."""
        return tuple(self._ledgers)
