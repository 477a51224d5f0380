"""The block-kernel interface and the shared segment grouping used by the dense kernels.

A block kernel computes, for an :class:`~dcp_backend.kernels.work.AttnWork`,

* ``forward(q [Tq,H,D], k [Tk,Hkv,D], v, work, scale) -> (out [Tq,H,D] in q.dtype, lse [Tq,H] in acc_dtype)``
  where a row with no visible key has ``out = 0`` and ``lse = -inf``;
* ``backward(dout, q, k, v, out, lse, work, scale) -> (dq, dk, dv)`` where ``out``/``lse`` are the
  *final* (merged over all blocks) values of those query rows, so the result is this block's exact
  contribution to the gradient (flash-attention style: ``dS = P * (dP - rowsum(dout * out))`` with
  ``P = exp(S - lse)``). ``dk``/``dv`` come back in the accumulation dtype (fp32, or fp64 for fp64).

GQA: ``H`` is a multiple of ``Hkv``; query head ``h`` uses KV head ``h // (H // Hkv)``. Kernels never
need K/V repeated by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dcp_backend.host_tables import HostTables
from dcp_backend.kernels.work import (KIND_CAUSAL, KIND_CAUSAL_BR, KIND_FULL, KIND_GENERAL, AttnWork,
                                     dense_visibility)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for outputs, lse and gradients: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BlockKernel:
    """Base class: subclasses implement :meth:`forward` and :meth:`backward`."""

    name = "abstract"
    #: block forwards recomputed per block backward (FLOPs executed beyond the model's; bench_attention)
    backward_recompute = 0.0

    def prepare(self, work: AttnWork):
        """Build the work's host-side (device-independent) state now, in ``work.kernel_state`` under the
        kernel's own key; planning workers call this through ``Plan.prepare`` so that the first attention
        call only uploads. Default: nothing to build."""
        return None

    def forward(self, q, k, v, work: AttnWork, scale: float):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, work: AttnWork, scale: float):  # pragma: no cover
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True


@dataclass(eq=False)
class SegmentGroup:
    """Segments of one work with equal (kind, q_len, k_len), executed as one batched call (their q and kv
    rows are in the work's :class:`SegmentState` tables)."""

    kind: int
    batch: int
    q_len: int
    k_len: int
    visible: np.ndarray | None  # [batch or 1, q_len, k_len] bool; None when no mask is needed
    masks: dict  # dtype/device -> additive float mask [batch or 1, 1, q_len, k_len]

    def additive_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if self.visible is None:
            return None
        key = (dtype, str(device))
        if key not in self.masks:
            m = torch.zeros(self.visible.shape, dtype=dtype)
            m.masked_fill_(torch.from_numpy(~self.visible), float("-inf"))
            self.masks[key] = m.unsqueeze(1).to(device)
        return self.masks[key]

    def visibility(self) -> np.ndarray:
        """Boolean [batch, q_len, k_len] (broadcast for shared masks)."""
        if self.kind == KIND_FULL:
            return np.ones((self.batch, self.q_len, self.k_len), dtype=bool)
        if self.kind == KIND_CAUSAL:
            return np.broadcast_to(np.tri(self.q_len, self.k_len, dtype=bool), (self.batch, self.q_len, self.k_len))
        return np.broadcast_to(self.visible, (self.batch, self.q_len, self.k_len))


@dataclass(eq=False)
class SegmentState:
    """What the segment-grouping kernels (cpu_flash, reference) prepare for a work, once: the groups of
    equal-shaped segments and the empty rows, with their row tables on the host and, per device, one
    upload (:class:`~dcp_backend.host_tables.HostTables`)."""

    groups: list
    empty: np.ndarray
    tables: HostTables

    def rows(self, device) -> tuple[list, torch.Tensor]:
        """([(q rows, k rows)] per group, empty rows) as tensors on ``device``."""
        v = self.tables.on(device)
        return [(v[2 * i], v[2 * i + 1]) for i in range(len(self.groups))], v[-1]


def segment_state(work: AttnWork) -> SegmentState:
    """Group segments by (kind, q_len, k_len); built once per work (its ``kernel_state["segments"]``)."""
    state = work.kernel_state.get("segments")
    if state is not None:
        return state
    kinds = work.kinds()
    qlens, klens = work.q_lens, work.k_lens
    groups: list[SegmentGroup] = []
    tables = HostTables(np.int64)
    live = np.nonzero((qlens > 0) & (klens > 0))[0]
    if live.size:
        keys = np.stack([kinds[live], qlens[live], klens[live]], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        for gi, (kind, ql, kl) in enumerate(uniq.tolist()):
            segs = live[inverse.reshape(-1) == gi]
            q_rows = (work.cu_q[segs][:, None] + np.arange(ql)[None, :]).reshape(-1)
            k_rows = (work.cu_k[segs][:, None] + np.arange(kl)[None, :]).reshape(-1)
            visible = None
            if kind == KIND_GENERAL:
                visible = np.stack([dense_visibility(work, int(s)) for s in segs])
            elif kind == KIND_CAUSAL_BR:  # one mask shared by the whole group
                visible = np.tri(ql, kl, kl - ql, dtype=bool)[None]
            groups.append(SegmentGroup(int(kind), int(segs.size), int(ql), int(kl), visible, {}))
            tables.add(q_rows)
            tables.add(k_rows)
    empty = np.nonzero(work.row_visible == 0)[0]
    tables.add(empty)
    state = work.kernel_state["segments"] = SegmentState(groups, empty, tables)
    return state


def segment_groups(work: AttnWork) -> list[SegmentGroup]:
    return segment_state(work).groups


__all__ = ["BlockKernel", "acc_dtype", "SegmentGroup", "SegmentState", "segment_groups", "segment_state", "KIND_FULL",
           "KIND_CAUSAL", "KIND_CAUSAL_BR", "KIND_GENERAL"]
