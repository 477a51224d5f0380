"""What the simulator charges for one kernel call or one memory operation (wraps a CostModel).

Attention calls go to :meth:`CostModel.work_seconds`; gathers, scatters, packing, log-sum-exp merges and
gradient sums are memory operations charged by bytes moved plus a per-operation overhead
(:meth:`CostModel.copy_seconds`). Byte sizes follow the executors: model tensors at the run's element
size, accumulators (outputs, log-sum-exp, gradient partials) in fp32.

Operation counts follow the executors as built (DCP packs a message with one gather per store group per
dtype class, usually one: its executor holds k/v, q/o/do, dk/dv and an fp32 output with its lse in one
tensor each). ``fused_copies=True`` charges at most one operation per instruction instead: a what-if for
an executor whose every memory instruction is one fused kernel (a message of two dtype classes, a
merge's gather, scale, add and scatter), used to separate the algorithm from launch overheads.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from dcp_backend.cost_model import CostModel
from dcp_backend.dtypes import acc_element_size, dtype_name
from dcp_backend.dtypes import element_size as dtype_bytes


_SECONDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # AttnWork -> {(model, ...): seconds}


@dataclass
class Costs:
    model: CostModel
    dtype: str  # "bf16", "fp32", ...
    head_dim: int
    fused_copies: bool = False  # one memory operation per instruction (fused packing) instead of per part

    @classmethod
    def make(cls, model: CostModel, dtype, head_dim: int, fused_copies: bool = False) -> "Costs":
        return cls(model, dtype_name(dtype), int(head_dim), fused_copies)

    @property
    def element_size(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def acc_size(self) -> int:
        return acc_element_size(self.element_size)

    def attention(self, work, heads: int, backward: bool) -> float:
        if work.num_segments == 0 or work.total_q == 0:
            return 0.0
        # memoised per work (plans are simulated under several settings), dropped with the work
        memo = _SECONDS.setdefault(work, {})
        key = (self.model, heads, self.head_dim, self.dtype, backward)
        if key not in memo:
            memo[key] = self.model.work_seconds(work, heads, self.head_dim, self.dtype, backward)
        return memo[key]

    def copy(self, nbytes: float, ops: int = 1) -> float:
        return self.model.copy_seconds(nbytes, min(ops, 1) if self.fused_copies else ops)

    def rows_bytes(self, rows: int, heads: int, acc: bool = False, with_dim: bool = True) -> float:
        return float(rows) * heads * (self.head_dim if with_dim else 1) * (self.acc_size if acc else self.element_size)
