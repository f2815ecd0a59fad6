"""Compile every safenorm Triton kernel to PTX for a CUDA target, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels as Python, so it cannot see what
only the compiler rejects: globals that are not ``tl.constexpr``, loop-carried values that change
type, unsupported constructs in a branch a test never takes. This compiles each kernel for each
combination of its ``tl.constexpr`` flags that the launchers use, for ``sm_90`` (H100/H200), in
fp32 and, for the streaming kernels, fp16/bf16 tensors.

    python benchmarks/compile_kernels.py           # exit status 1 if a variant fails
    python benchmarks/compile_kernels.py --quick   # the first variant of each kernel only

It must run without ``TRITON_INTERPRET`` (under it ``@triton.jit`` makes interpreted functions).
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton
from safenorm.kernels import combine, moments, normalize
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# Scalar arguments that are integers (sizes, strides, group sizes); the others are fp32.
INTEGERS = {"N", "C", "G", "M", "SPLITS", "M_PER_SPLIT", "GROUP_SIZE", "stat_group", "term_group"}
POINTERS = {"index_ptr": "*i64", "num_batches_ptr": "*i64", "flag_ptr": "*i32"}
STREAMED = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")


def _jit(kernel) -> triton.runtime.jit.JITFunction:
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # autotuned kernels wrap the JITFunction
    return kernel


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}" if name in STREAMED else "*fp32"
        elif name in INTEGERS or "stride" in name:
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    return signature


def _each(base: dict, **alternatives) -> list[dict]:
    """``base``, and ``base`` with each flag changed alone (the branches each flag selects;
    a full product of the flags would be hundreds of compilations)."""
    variants = [base]
    for key, values in alternatives.items():
        variants += [{**base, key: value} for value in values if value != base[key]]
    return variants


FORWARD = dict(
    FROM_PARTIALS=True, RANDOM_GROUPS=False, HAS_REFERENCE=True, REFERENCE_RUNNING=True,
    CLIP_MEAN=True, CLIP_VAR=True, NORMALIZED_MEAN=True, NORMALIZED_VAR=True, HAS_NOISE=True,
    HAS_WEIGHT=True, HAS_BIAS=True, UPDATE_RUNNING=True, CHECK=True, COEF_MODE=0,
    BLOCK_N=16, BLOCK_C=128,
)  # fmt: skip
# The configurations the launchers make: ghost (no clipping), clipped, DP (noise, random
# groups, per-sample or running coefficients), and each flag flipped alone.
UNCLIPPED = dict.fromkeys(
    ("CLIP_MEAN", "CLIP_VAR", "NORMALIZED_MEAN", "NORMALIZED_VAR", "HAS_REFERENCE",
     "REFERENCE_RUNNING"),
    False,
)  # fmt: skip
DP = {"NORMALIZED_MEAN": False, "NORMALIZED_VAR": False, "RANDOM_GROUPS": True, "COEF_MODE": 1}
BACKWARD = dict(
    HAS_REFERENCE=True, CLIP_MEAN=True, CLIP_VAR=True, NORMALIZED_MEAN=True, NORMALIZED_VAR=True,
    HAS_FLOOR=False, BLOCK_N=16, BLOCK_C=128,
)  # fmt: skip
FLIP = (False, True)
VARIANTS = {
    combine._combine_forward_kernel: [
        *_each(
            FORWARD,
            FROM_PARTIALS=FLIP,
            REFERENCE_RUNNING=FLIP,
            HAS_NOISE=FLIP,
            CHECK=FLIP,
            HAS_WEIGHT=FLIP,
            COEF_MODE=(0, 1, 2),
        ),
        {**FORWARD, **UNCLIPPED},
        {**FORWARD, **DP},
        {**FORWARD, **DP, "COEF_MODE": 2, "UPDATE_RUNNING": True},
    ],
    combine._combine_backward_kernel: [
        *_each(BACKWARD, HAS_REFERENCE=FLIP, HAS_FLOOR=FLIP),
        {
            **BACKWARD,
            "CLIP_MEAN": False,
            "CLIP_VAR": False,
            "NORMALIZED_MEAN": False,
            "NORMALIZED_VAR": False,
        },
        {**BACKWARD, "NORMALIZED_MEAN": False, "NORMALIZED_VAR": False, "HAS_FLOOR": True},
    ],
    moments._moments_forward_kernel: [dict(BLOCK_C=1, BLOCK_M=128), dict(BLOCK_C=32, BLOCK_M=128)],
    normalize._normalize_forward_kernel: _each(
        dict(FROM_STATS=True, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_C=32, BLOCK_M=128),
        FROM_STATS=FLIP,
        HAS_WEIGHT=FLIP,
        HAS_BIAS=FLIP,
    ),
    normalize._normalize_backward_kernel: [
        dict(
            REDUCE=r, WRITE_DX=d, STATS_TERM=t, FROM_STATS=f, HAS_WEIGHT=f, BLOCK_C=32, BLOCK_M=128
        )
        for r, d, t, f in [
            (True, False, False, False),
            (False, True, True, False),
            (True, True, False, False),
            (True, True, False, True),
        ]
    ],
}


def main() -> int:
    failures = 0
    compiled = 0
    quick = "--quick" in sys.argv
    for kernel, variants in VARIANTS.items():
        variants = variants[:1] if quick else variants
        fn = _jit(kernel)
        streamed = any(p in inspect.signature(fn.fn).parameters for p in STREAMED)
        dtypes = ("fp32", "fp16", "bf16") if streamed and not quick else ("fp32",)
        for constexprs, dtype in itertools.product(variants, dtypes):
            source = ASTSource(fn=fn, signature=_signature(fn, constexprs, dtype),
                               constexprs=constexprs)  # fmt: skip
            try:
                triton.compile(source, target=TARGET, options={"num_warps": 8})
                compiled += 1
            except Exception as error:  # report every failing variant, not just the first
                failures += 1
                print(f"FAILED {fn.__name__} {dtype} {constexprs}:\n{str(error)[-1500:]}\n")
    print(f"{compiled} kernel variants compiled for sm_90, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
