"""2-process gloo (CPU): synced DP statistics equal single-process ones; DPDDP training runs."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm.distributed import convert_sync_statistics
from safenorm.privacy import sigma_eff

pytestmark = pytest.mark.distributed

WORLD = 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        safenorm.DPBatchNorm2d(4, expected_batch_size=12, noise_multiplier=2.0),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
    )


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 2, 4, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def worker(rank: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = convert_sync_statistics(make_model())
        model[1].generator = torch.Generator().manual_seed(7)
        x, _ = batch()
        local = x[rank * 6 : (rank + 1) * 6]
        model(local)
        mean, var = model[1].last_statistics
        if rank == 0:
            torch.save({"mean": mean, "var": var}, os.path.join(out_dir, "stats.pt"))

        # DP-SGD with Opacus' distributed data parallel and safenorm's engine
        from opacus.distributed import (
            DifferentiallyPrivateDistributedDataParallel as DPDDP,  # noqa: N817
        )

        from safenorm.opacus import PrivacyEngine

        model = convert_sync_statistics(make_model())
        ddp = DPDDP(model)
        engine = PrivacyEngine(accountant="rdp")
        data = DataLoader(TensorDataset(*batch()), batch_size=6)
        gs_model, opt, loader = engine.make_private(
            module=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
            data_loader=data,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(gs_model(xb), yb).backward()
            opt.step()
        if rank == 0:
            torch.save(
                {
                    "history": engine.accountant.history,
                    "expected": model[1].expected_batch_size,
                    "weight": model[1].weight.detach().clone(),
                },
                os.path.join(out_dir, "train.pt"),
            )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_synced_statistics_equal_single_process_and_dpddp_trains(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    synced = torch.load(tmp_path / "stats.pt")

    reference = make_model()
    reference[1].generator = torch.Generator().manual_seed(7)  # the same noise, drawn once
    x, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference(x)
    mean, var = reference[1].last_statistics
    torch.testing.assert_close(synced["mean"], mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(synced["var"], var, atol=1e-6, rtol=1e-5)

    trained = torch.load(tmp_path / "train.pt", weights_only=False)
    assert trained["history"], "the accountant stepped"
    sigma, q, _ = trained["history"][0]
    assert q == pytest.approx(0.5)
    assert sigma == pytest.approx(sigma_eff(1.0, [2.0, 2.0]))
    assert trained["expected"] == pytest.approx(0.5 * 12)  # global: q x dataset size


def test_converter_refuses_ghost_groups():
    model = nn.Sequential(safenorm.DPBatchNorm1d(3, ghost_batch_size=2))
    with pytest.raises((ValueError, RuntimeError)):
        convert_sync_statistics(model, process_group=object())
