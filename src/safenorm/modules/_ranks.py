"""Input ranks of the 1d/2d/3d variants (as ``nn.BatchNorm1d/2d/3d``)."""

RANK_1D = (2, 3)
RANK_2D = (4,)
RANK_3D = (5,)
ANY_RANK = (2, 3, 4, 5)

COMMON_ARGS_DOC = """
    Args:
        num_features: ``C`` from an expected input of size ``(N, C, *S)``.
        eps: a value added to the denominator for numerical stability. Default: 1e-5
        momentum: the value used for the running_mean and running_var computation. Can be set to
            ``None`` for cumulative moving average (i.e. simple average). Default: 0.1
        affine: learnable affine parameters. Default: ``True``
        track_running_stats: track running mean and variance; if ``False`` batch statistics are
            used in eval mode too. Default: ``True``
        device, dtype: factory kwargs of the parameters and buffers.
        bias: learnable bias (keyword-only, as in ``nn.BatchNorm``). Default: ``True``
"""

SHAPE_DOC = """
    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d);
          the family's base class accepts any of these (used for converted ``SyncBatchNorm``).
        - Output: same shape, dtype and memory format as the input.

    In eval mode (with running statistics) every layer computes exactly what ``nn.BatchNorm*d``
    computes with the same buffers. Its state_dict has the same keys as ``nn.BatchNorm*d``.
"""
