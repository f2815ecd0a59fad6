"""Opacus DP-SGD with safenorm's DP statistics layers (needs ``pip install safenorm[opacus]``).

* :class:`PrivacyEngine`: a drop-in for ``opacus.PrivacyEngine`` that accepts DP layers,
  rejects sample-coupling layers, and accounts the statistics releases (sigma_eff).
* Grad samplers and ghost-clipping norm samplers of every DP class are registered on import.
* :func:`record_statistics`: the forward hooks the per-sample gradients need (installed by the
  engine).

See docs/OPACUS.md.
"""

from safenorm.opacus.engine import PrivacyEngine, VirtualStepError
from safenorm.opacus.grad_samplers import (
    DP_CLASSES,
    compute_dp_batch_norm_grad_sample,
    compute_dp_batch_norm_norm_sample,
    record_statistics,
)
from safenorm.opacus.validation import CouplingLayerError, check_functorch_coverage, validate_model

__all__ = [
    "DP_CLASSES",
    "CouplingLayerError",
    "PrivacyEngine",
    "VirtualStepError",
    "check_functorch_coverage",
    "compute_dp_batch_norm_grad_sample",
    "compute_dp_batch_norm_norm_sample",
    "record_statistics",
    "validate_model",
]
