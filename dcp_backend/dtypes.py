"""Element sizes of the dtypes plans and statistics talk about: one table for the whole library.

Model tensors (q, k, v, out and their gradients) travel in the run's dtype; accumulators (partial outputs,
log-sum-exp, gradient partials) in fp32, or fp64 for fp64 runs (:func:`acc_element_size`, the byte-size
twin of :func:`dcp_backend.kernels.base.acc_dtype`).
"""
from __future__ import annotations

from dcp_backend.errors import CPError

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
TORCH_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float64": "fp64",
               "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
BY_SIZE = {2: "bf16", 4: "fp32", 8: "fp64"}


def dtype_name(dtype) -> str:
    """'fp32' / 'bf16' / 'fp16' / 'fp64' for a torch dtype, a name, or an element size in bytes."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in BY_SIZE:
            raise CPError(f"no dtype with element size {dtype}")
        return BY_SIZE[dtype]
    s = str(dtype)
    if s in BYTES:
        return s
    if s in TORCH_NAMES:
        return TORCH_NAMES[s]
    raise CPError(f"unknown dtype {dtype!r}; use fp32, bf16, fp16 or fp64")


def element_size(dtype) -> int:
    """Bytes per element of a dtype (name, torch dtype or size)."""
    return BYTES[dtype_name(dtype)]


def acc_element_size(element_size: int) -> int:
    """Bytes per element of the accumulators of a run whose model tensors have ``element_size`` bytes."""
    return 8 if element_size == 8 else 4
