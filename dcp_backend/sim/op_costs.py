"""What the simulator charges for one kernel call or one memory operation (wraps a CostModel).

Attention calls go to :meth:`CostModel.work_seconds` of the kernel a backend would really use on the
device (``kernel``):

* ``"table"``: every segment on the cost table's own kernel, backward plus the forwards that kernel
  recomputes (:attr:`~dcp_backend.kernels.base.BlockKernel.backward_recompute`: one for our FlexAttention
  kernel, none for the CPU kernel);
* ``"flash"``: what the ``flash`` kernel (:mod:`dcp_backend.kernels.flash`) does with the work: its full
  and causal segments in one flash-attn call per kind, priced by the flash table that goes with the
  cost table (:data:`~dcp_backend.cost_model.FLASH_COMPANION`: ``h100`` -> ``h100_flash``, derived from
  the SDPA measurement), the other segments as above. This is every backend at its best GPU kernel
  (flash-attn varlen, or TE's cuDNN kernels, for dense and causal blocks), so no backend is compared
  against a slower kernel than it would use;
* ``"auto"``: ``"flash"`` where the cost table has a flash companion, else ``"table"``.

Memory operations: gathers, scatters, packing, log-sum-exp merges and
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

import functools
import weakref
from dataclasses import dataclass

from dcp_backend.cost_model import FLASH_COMPANION, CostModel, load_cost_model
from dcp_backend.dtypes import acc_element_size, dtype_name
from dcp_backend.dtypes import element_size as dtype_bytes
from dcp_backend.errors import CPError
from dcp_backend.kernels.flash import split_works

KERNEL_ROUTES = ("auto", "flash", "table")


def backward_recompute(model: CostModel) -> float:
    """Block forwards the cost table's kernel recomputes per block backward (0 for analytic models)."""
    name = (model.table or {}).get("kernel")
    if name == "flex":
        from dcp_backend.kernels.flex import FlexKernel

        return float(FlexKernel.backward_recompute)
    return 0.0


def flash_companion(model: CostModel, kernel: str) -> CostModel | None:
    """The flash-attn cost model for ``kernel`` routing (None: every segment on the table's kernel)."""
    if kernel not in KERNEL_ROUTES:
        raise CPError(f"kernel routing must be one of {list(KERNEL_ROUTES)}, got {kernel!r}")
    name = FLASH_COMPANION.get(model.name)
    if kernel == "table" or (kernel == "auto" and name is None):
        return None
    if name is None:
        raise CPError(f"no flash-attn cost table goes with cost model {model.name!r} (known: "
                      f"{sorted(FLASH_COMPANION)}); use kernel='table'")
    return _shipped(name)


@functools.lru_cache(maxsize=None)
def _shipped(name: str) -> CostModel:
    """A shipped table's model, fitted once per process (kernel-cost caches key on its identity)."""
    return load_cost_model(name)


_SECONDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # AttnWork -> {(model, ...): seconds}


@dataclass
class Costs:
    model: CostModel
    dtype: str  # "bf16", "fp32", ...
    head_dim: int
    fused_copies: bool = False  # one memory operation per instruction (fused packing) instead of per part
    flash: CostModel | None = None  # full and causal segments on flash-attn (kernel "flash"), else None
    recompute: float = 0.0  # forwards the table's kernel recomputes per backward

    @classmethod
    def make(cls, model: CostModel, dtype, head_dim: int, fused_copies: bool = False,
             kernel: str = "auto") -> "Costs":
        return cls(model, dtype_name(dtype), int(head_dim), fused_copies, flash_companion(model, kernel),
                   backward_recompute(model))

    @property
    def kernel(self) -> str:
        return "flash" if self.flash is not None else "table"

    @property
    def kernel_key(self) -> tuple:
        """What kernel costs depend on besides the work (for caches shared across simulations)."""
        return (id(self.model), id(self.flash), self.recompute, self.dtype, self.head_dim)

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
        key = (self.model, self.flash, self.recompute, heads, self.head_dim, self.dtype, backward)
        if key not in memo:
            if self.flash is None:
                memo[key] = self._table(work, heads, backward)
            else:
                parts, general = split_works(work)
                t = sum(self.flash.work_seconds(w, heads, self.head_dim, self.dtype, backward) for _, w in parts)
                memo[key] = t + (self._table(general, heads, backward) if general is not None else 0.0)
        return memo[key]

    def _table(self, work, heads: int, backward: bool) -> float:
        t = self.model.work_seconds(work, heads, self.head_dim, self.dtype, backward)
        if backward and self.recompute:
            t += self.recompute * self.model.work_seconds(work, heads, self.head_dim, self.dtype, False)
        return t

    def copy(self, nbytes: float, ops: int = 1) -> float:
        return self.model.copy_seconds(nbytes, min(ops, 1) if self.fused_copies else ops)

    def rows_bytes(self, rows: int, heads: int, acc: bool = False, with_dim: bool = True) -> float:
        return float(rows) * heads * (self.head_dim if with_dim else 1) * (self.acc_size if acc else self.element_size)
