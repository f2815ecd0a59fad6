"""The harness's DP variants spend the same epsilon."""

from __future__ import annotations

import pytest
from safenorm.evaluation.config import DPConfig
from safenorm.evaluation.models import digits_dp_cnn
from safenorm.evaluation.training import _noise_arguments
from torch import nn

import safenorm
from safenorm.privacy import sigma_eff


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_dp_variant_noise_gives_the_same_sigma_eff_as_the_gradient_only_baseline(share):
    config = DPConfig(noise_multiplier=1.3, statistics_share=share)
    plain = _noise_arguments(nn.Sequential(nn.Linear(3, 3)), config)
    assert plain == {"noise_multiplier": 1.3}
    model = safenorm.convert_batchnorm(digits_dp_cnn(), "dp")
    split = _noise_arguments(model, config)
    releases = [split["statistics_noise_multiplier"]] * 4  # 2 layers x 2 releases per forward
    assert split["noise_multiplier"] > 1.3
    assert sigma_eff(split["noise_multiplier"], releases) == pytest.approx(1.3, rel=1e-12)
