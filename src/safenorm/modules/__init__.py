"""The safenorm layers: thin modules over :mod:`safenorm.functional`."""

from safenorm.modules._base import SafeBatchNormBase
from safenorm.modules.clipped import (
    ClippedBatchNorm,
    ClippedBatchNorm1d,
    ClippedBatchNorm2d,
    ClippedBatchNorm3d,
)
from safenorm.modules.dp import DPBatchNorm, DPBatchNorm1d, DPBatchNorm2d, DPBatchNorm3d
from safenorm.modules.ghost import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)

__all__ = [
    "ClippedBatchNorm",
    "ClippedBatchNorm1d",
    "ClippedBatchNorm2d",
    "ClippedBatchNorm3d",
    "DPBatchNorm",
    "DPBatchNorm1d",
    "DPBatchNorm2d",
    "DPBatchNorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SafeBatchNormBase",
]
