"""The engine accounts every release on the path it really takes, or refuses it: releases off the
step's batch, distributed training without synced layers, layers that write data into buffers,
copies of a private model."""

from __future__ import annotations

import io
import os
import socket
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
import safenorm.distributed
from safenorm import privacy

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP  # noqa: N817

from safenorm.opacus import PrivacyEngine
from safenorm.opacus.validation import CouplingLayerError

DELTA = 1e-5
N_DATA, BATCH, SIGMA_G, SIGMA_R = 48, 12, 1.1, 6.0


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N_DATA, 6, generator=g), torch.randint(0, 3, (N_DATA,)))


def _model(track_running_stats: bool = True) -> nn.Module:
    layer = safenorm.DPBatchNorm1d(
        8, noise_multiplier=SIGMA_R, track_running_stats=track_running_stats
    )
    return nn.Sequential(nn.Linear(6, 8), layer, nn.ReLU(), nn.Linear(8, 3))


def _private(model: nn.Module, engine: PrivacyEngine):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=SIGMA_G,
        max_grad_norm=1.0,
    )


def _epoch(gs_model, opt, loader) -> int:
    steps = 0
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(gs_model(x), y).backward()
        opt.step()
        steps += 1
    return steps


def _rdp_epsilon(history) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(DELTA)


# -- releases off the step's batch --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eval pass with batch statistics", "train-mode recalibration"])
def test_releases_off_the_step_batch_are_accounted_as_unsubsampled_gaussians(kind):
    """Before: they were added to the next step's sigma_eff at rate q (under-reported)."""
    engine = PrivacyEngine(accountant="rdp")
    model = _model(track_running_stats=kind.startswith("train"))
    gs_model, opt, dp_loader = _private(model, engine)
    steps = _epoch(gs_model, opt, dp_loader)
    plain = DataLoader(_data(), batch_size=BATCH)  # every sample once, in a fixed order
    model.train(kind.startswith("train"))
    with pytest.warns(safenorm.PrivacyWarning, match="sensitivity 2R"), torch.no_grad():
        for x, _ in plain:
            model(x)
    model.train()
    steps += _epoch(gs_model, opt, dp_loader)
    off_batch = 2 * len(plain)  # two releases per forward of the one DP layer
    q = BATCH / N_DATA
    expected = [
        (privacy.sigma_eff(SIGMA_G, [SIGMA_R] * 2), q, steps),
        (privacy.sigma_eff(None, [SIGMA_R / 2] * off_batch), 1.0, 1),
    ]
    assert engine.get_epsilon(DELTA) == pytest.approx(_rdp_epsilon(expected), rel=1e-9)
    charged_at_q = [(privacy.sigma_eff(SIGMA_G, [SIGMA_R] * 2), q, steps - 1)]
    charged_at_q.append((privacy.sigma_eff(SIGMA_G, [SIGMA_R] * (2 + off_batch)), q, 1))
    assert engine.get_epsilon(DELTA) > 1.2 * _rdp_epsilon(charged_at_q)  # the old accounting


def test_a_forward_on_other_data_inside_a_step_is_off_batch_unless_declared():
    engine = PrivacyEngine(accountant="rdp")
    model = _model()
    gs_model, opt, dp_loader = _private(model, engine)
    (ledger,) = engine.release_ledgers()
    x, y = next(iter(dp_loader))
    with pytest.warns(safenorm.PrivacyWarning, match="declare_step_input"), torch.no_grad():
        gs_model(torch.randn(7, 6))  # other data, same step
    assert len(ledger.unsampled) == 2 and not ledger.pending
    with torch.no_grad():
        gs_model(x.clone())  # a copy of the batch is the batch
    augmented = engine.declare_step_input(x + 0.01 * torch.randn_like(x))
    opt.zero_grad()
    nn.functional.cross_entropy(gs_model(augmented), y).backward()
    assert len(ledger.pending) == 4
    opt.step()
    history = engine.accountant.history
    assert (history[0][1], history[0][2]) == (1.0, 1)  # the other-data forward, unsubsampled
    assert history[1][0] == pytest.approx(privacy.sigma_eff(SIGMA_G, [SIGMA_R] * 4))


def test_releases_on_a_batch_that_no_step_consumed_compose_into_the_next_step():
    """With gradient accumulation the next step's gradient depends on the earlier batch too, so
    its releases must compose with that step, not be booked as an independent mechanism."""
    engine = PrivacyEngine(accountant="rdp")
    model = _model()
    gs_model, opt, dp_loader = _private(model, engine)
    batches = iter(dp_loader)
    with torch.no_grad():
        gs_model(next(batches)[0])  # forward, no step
    x, y = next(batches)
    opt.zero_grad()
    nn.functional.cross_entropy(gs_model(x), y).backward()
    opt.step()
    q = BATCH / N_DATA
    assert engine.accountant.history == [
        (pytest.approx(privacy.sigma_eff(SIGMA_G, [SIGMA_R] * 4)), q, 1),
    ]


def test_a_prefetched_batch_still_ties_its_forward_to_the_step():
    engine = PrivacyEngine(accountant="rdp")
    model = _model()
    gs_model, opt, dp_loader = _private(model, engine)
    batches = iter(dp_loader)
    ahead = [next(batches), next(batches)]  # an input pipeline one batch ahead
    for _ in range(3):
        x, y = ahead.pop(0)
        ahead.append(next(batches, None) or next(iter(dp_loader)))
        opt.zero_grad()
        nn.functional.cross_entropy(gs_model(x), y).backward()
        opt.step()
    q = BATCH / N_DATA
    assert engine.accountant.history == [
        (pytest.approx(privacy.sigma_eff(SIGMA_G, [SIGMA_R] * 2)), q, 3)
    ]


def test_a_forward_with_any_input_off_the_batch_is_off_batch():
    """Before the review fix, one matching input was enough: a stored reference batch of
    training samples, passed beside the batch, was charged at rate q at every step."""

    class WithReference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _model()

        def forward(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            return self.body(torch.cat([x, reference]))[: len(x)]

    engine = PrivacyEngine(accountant="rdp")
    model = WithReference()
    gs_model, _, dp_loader = _private(model, engine)
    reference = _data().tensors[0][:4]
    x, _ = next(iter(dp_loader))
    with pytest.warns(safenorm.PrivacyWarning, match="sensitivity 2R"), torch.no_grad():
        gs_model(x, reference)
    (ledger,) = engine.release_ledgers()
    assert len(ledger.unsampled) == 2 and not ledger.pending


def test_a_declared_input_must_hold_one_row_per_sample():
    engine = PrivacyEngine(accountant="rdp")
    _, _, dp_loader = _private(_model(), engine)
    x, _ = next(iter(dp_loader))
    with pytest.raises(ValueError, match="one row per sample"):
        engine.declare_step_input(torch.cat([x, x]))  # two views per sample in one forward
    with pytest.raises(ValueError, match="one row per sample"):
        engine.declare_step_input(x[: len(x) // 2])  # a chunk cut by position


def test_gdp_accountant_refuses_releases_off_the_step_batch():
    engine = PrivacyEngine(accountant="gdp")
    model = _model()
    gs_model, opt, dp_loader = _private(model, engine)
    _epoch(gs_model, opt, dp_loader)
    with pytest.warns(safenorm.PrivacyWarning):
        model(torch.randn(4, 6))
    with pytest.raises(ValueError, match="use accountant='rdp' or 'prv'"):
        engine.get_epsilon(DELTA)


# -- distributed --------------------------------------------------------------------------------


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unsynced_dp_layers_are_refused_under_distributed_dp_sgd(one_process_group):
    """Before: accepted, although a per-rank release has unbounded sensitivity."""
    engine = PrivacyEngine(accountant="rdp")
    model = DPDDP(_model())
    with pytest.raises(CouplingLayerError, match="convert_sync_statistics"):
        _private(model, engine)
    synced = DPDDP(safenorm.distributed.convert_sync_statistics(_model()))
    _private(synced, PrivacyEngine(accountant="rdp"))  # accepted


# -- layers that write data into buffers --------------------------------------------------------


def test_instancenorm_with_running_statistics_is_refused():
    """Before: accepted, and its raw running statistics shipped in the checkpoint."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=False, track_running_stats=True)
    )
    with pytest.raises(CouplingLayerError, match="track_running_stats=False"):
        _private(nn.Sequential(model, nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), PrivacyEngine())


class _RunningInputMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.lerp_(x.detach().mean(0), 0.1)  # a raw summary of the private data
        return x


class _WritesThroughData(_RunningInputMean):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.data.copy_(x.detach().amax(0))  # .data has its own version counter
        return x


class _CountsLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(6, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.counts += torch.bincount(x.argmax(1), minlength=6)
        return x


class _RegistersLazily(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not hasattr(self, "first"):
            self.register_buffer("first", x[:1].detach().clone())
        return x


@pytest.mark.parametrize(
    "writer",
    [_RunningInputMean, _WritesThroughData, _CountsLabels, _RegistersLazily],
    ids=["in-place", "through-data", "integer-buffer", "registered-late"],
)
def test_a_custom_layer_writing_a_buffer_from_its_input_is_refused_at_the_step(writer):
    engine = PrivacyEngine(accountant="rdp")
    model = nn.Sequential(writer(), _model())
    gs_model, opt, dp_loader = _private(model, engine)
    with pytest.raises(CouplingLayerError, match=r"0\.(seen|counts|first)"):
        _epoch(gs_model, opt, dp_loader)


def test_constant_buffers_moved_with_the_model_are_not_flagged():
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.full((6,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    engine = PrivacyEngine(accountant="rdp")
    model = nn.Sequential(Constant(), _model())
    gs_model, opt, dp_loader = _private(model, engine)
    model.double().float()  # a move (dtype here; device on a GPU) replaces the buffer
    assert _epoch(gs_model, opt, dp_loader) == N_DATA // BATCH


# -- copies of a private model ------------------------------------------------------------------


def test_an_averaged_copy_of_a_private_model_is_unaccounted_and_warns():
    engine = PrivacyEngine(accountant="rdp")
    model = _model()
    gs_model, opt, dp_loader = _private(model, engine)
    _epoch(gs_model, opt, dp_loader)
    (ledger,) = engine.release_ledgers()
    before = ledger.total_releases
    averaged = torch.optim.swa_utils.AveragedModel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():  # Opacus' hooks, copied too, need grad-free copies
            averaged.train()(torch.randn(8, 6))
    assert any("UNACCOUNTED" in str(w.message) for w in caught)
    assert ledger.total_releases == before


def test_a_pickled_private_model_carries_inert_hooks_and_no_batch():
    engine = PrivacyEngine(accountant="rdp")
    model = _model()
    gs_model, _, dp_loader = _private(model, engine)
    x, _ = next(iter(dp_loader))
    with torch.no_grad():
        gs_model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert x.numpy().tobytes() not in buffer.getvalue()  # the open batch does not travel
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            loaded(torch.randn(4, 6))
    assert any("UNACCOUNTED" in str(w.message) for w in caught)


def test_declaring_an_input_with_two_private_models_uses_the_one_with_an_open_batch():
    """Before: the declaration went to every model's tracker and raised for the model whose
    loader had no batch open."""
    engine = PrivacyEngine(accountant="rdp")
    _private(_model(), engine)  # no batch drawn from this one
    gs_model, opt, dp_loader = _private(_model(), engine)
    x, y = next(iter(dp_loader))
    augmented = engine.declare_step_input(x + 0.01)
    opt.zero_grad()
    nn.functional.cross_entropy(gs_model(augmented), y).backward()
    opt.step()
    ledgers = engine.release_ledgers()
    assert engine.accountant.history[-1][1] == BATCH / N_DATA
    assert not any(ledger.unsampled for ledger in ledgers)
