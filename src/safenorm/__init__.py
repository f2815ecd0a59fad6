"""safenorm: privacy-aware drop-in replacements for ``nn.BatchNorm{1,2,3}d``.

* :class:`GhostBatchNorm2d` (and 1d/3d): ghost-batch normalization (bounded coupling, not DP).
* :class:`ClippedBatchNorm2d`: statistics from per-sample-clipped contributions (bounded
  influence, not DP).
* :class:`DPBatchNorm2d`: differentially private (clipped and noised) statistics.
* :func:`convert_batchnorm`: swap every BatchNorm of a model in one call.
* :func:`find_unsafe_layers`: list the layers that couple samples or release statistics.

The math lives in :mod:`safenorm.functional`.
"""

from safenorm import functional
from safenorm.audit import Finding, find_unsafe_layers
from safenorm.convert import convert_batchnorm
from safenorm.modules import (
    ClippedBatchNorm,
    ClippedBatchNorm1d,
    ClippedBatchNorm2d,
    ClippedBatchNorm3d,
    DPBatchNorm,
    DPBatchNorm1d,
    DPBatchNorm2d,
    DPBatchNorm3d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SafeBatchNormBase,
)
from safenorm.warnings import ConversionWarning, PrivacyWarning, SafenormWarning

__version__ = "0.1.0"

__all__ = [
    "ClippedBatchNorm",
    "ClippedBatchNorm1d",
    "ClippedBatchNorm2d",
    "ClippedBatchNorm3d",
    "ConversionWarning",
    "DPBatchNorm",
    "DPBatchNorm1d",
    "DPBatchNorm2d",
    "DPBatchNorm3d",
    "Finding",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "PrivacyWarning",
    "SafeBatchNormBase",
    "SafenormWarning",
    "convert_batchnorm",
    "find_unsafe_layers",
    "functional",
]
