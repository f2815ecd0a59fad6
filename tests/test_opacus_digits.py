"""End to end: plain Opacus refuses a BatchNorm CNN; safenorm's engine trains it on digits."""

from __future__ import annotations

import opacus
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.validators.errors import UnsupportedModuleError
from safenorm.evaluation.models import digits_dp_cnn as bn_cnn
from sklearn import datasets
from torch.utils.data import DataLoader, TensorDataset

import safenorm
from safenorm.opacus import PrivacyEngine


def digits():
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean()) / x[:1400].std()
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def test_plain_opacus_rejects_bn_and_safenorm_trains_the_converted_model():
    train_set, test_set = digits()
    torch.manual_seed(0)
    model = bn_cnn()
    with pytest.raises(UnsupportedModuleError):
        opacus.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(train_set, batch_size=64),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )

    model = safenorm.convert_batchnorm(model, "dp")
    for layer in model.modules():
        if isinstance(layer, safenorm.DPBatchNorm):
            layer.momentum = 0.3
    engine = PrivacyEngine(accountant="rdp")
    epochs, target = 5, 3.0
    gs_model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(train_set, batch_size=64),
        target_epsilon=target,
        target_delta=1e-5,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(gs_model(x), y).backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    eps = engine.get_epsilon(1e-5)
    print(f"digits: DPBatchNorm test accuracy {accuracy:.3f} at epsilon {eps:.3f}")
    assert accuracy > 0.5  # chance is 0.1
    assert target * 0.99 <= eps <= target * 1.0001
    grad_only = RDPAccountant()
    grad_only.history = [(opt.noise_multiplier, 64 / 1400, steps)]
    assert eps > grad_only.get_epsilon(1e-5)  # the statistics' cost is in the reported epsilon
