"""Shared test set-up.

Without a CUDA device the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which
must be set before triton is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
