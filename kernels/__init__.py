"""Triton kernels of safenorm (installed as ``safenorm.kernels``; needs ``triton``).

* :mod:`safenorm.kernels.moments`: stage 1, per-(sample, channel) moments (split reduction).
* :mod:`safenorm.kernels.normalize`: stage 3, normalize + affine and its backward with the fused
  per-sample affine gradients.
* :mod:`safenorm.kernels.batch_norm`: standard batch norm (one group) in five launches: the
  above plus one kernel each way for the per-channel combine.

They are dispatched from :mod:`safenorm.ops`; nothing here imports ``torch.nn``. Importing this
package does not import triton; its submodules do.
"""
