"""Triton kernels of safenorm (installed as ``safenorm.kernels``; needs ``triton``).

* :mod:`safenorm.kernels.moments`: stage 1, per-(sample, channel) moments (split reduction).
* :mod:`safenorm.kernels.normalize`: stage 3, normalize + affine and its backward with the fused
  per-sample affine gradients.
* :mod:`safenorm.kernels.combine`: stage 2 of every variant (clipping, ghost and random groups,
  noise, floors, running update with the finite check, coefficients) in one kernel each way.
* :mod:`safenorm.kernels.batch_norm`: ghost batch norm without clipping in five launches (what
  ``torch.compile`` runs on the kernels: ``safenorm::fused_batch_norm``).

They are dispatched from :mod:`safenorm.ops`; nothing here imports ``torch.nn``. Importing this
package does not import triton; its submodules do.
"""
