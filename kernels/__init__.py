"""Triton kernels of safenorm (installed as ``safenorm.kernels``; needs ``triton``).

* :mod:`safenorm.kernels.moments`: stage 1, per-(sample, channel) moments (split reduction).
* :mod:`safenorm.kernels.normalize`: stage 3, normalize + affine and its backward with the fused
  per-sample affine gradients.

They are dispatched from :mod:`safenorm.ops`; nothing here imports ``torch.nn``. Importing this
package does not import triton; its submodules do.
"""
