"""The compiled per-device program of a DCP plan: stores, and the instructions the executor runs.

Stores are row tables that one pass of one device uses (all rows of a store have the same shape):

* q-side stores (``q``, ``o``, ``do``, ``lse``, ``dq``) have one row per (token, query head block):
  the device's own tokens first (row ``t * n_q + k``), then received blocks in ``block_size``-row slots;
* kv-side stores (``k``, ``v``, ``dk``, ``dv``) likewise per (token, KV head block);
* ``ro``/``rlse``/``rdq``/``rdk``/``rdv`` receive partial results from other devices before they are
  merged (forward, log-sum-exp) or summed (backward) into the owner's rows.

Instructions (one list per pass and device; every device runs the same sequence of communication keys,
so point-to-point messages between any two ranks are posted in the same order on both sides):

* ``Comm(key, sends, recvs)`` launches a batch of point-to-point transfers; an op is a peer and the
  (store, rows) parts packed into one message per dtype class (a store's ``wire`` class: partial
  results may travel in the model dtype while held in fp32, ``DCPOptions.partial_dtype``);
* ``Wait(key)`` waits for it and unpacks received rows into their stores;
* ``Attention(stage, q_rows, kv_rows, work, comps, backward)`` runs the block kernel once over all
  computation blocks of a stage (forward: merges (out, lse) into ``o``/``lse`` at ``q_rows``; backward:
  accumulates ``dq`` at ``q_rows`` and ``dk``/``dv`` at ``kv_rows``);
* ``Fill(stores, rows)`` resets the result rows of a freshly received block (out 0 / lse -inf, or
  gradients 0), since slots are reused;
* ``Reduce(op, src, dst, src_rows, dst_rows)`` merges or sums received partials (right after the wait
  that received them) into owned rows, or into a reducer's slot rows before it sends one partial on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dcp_backend.dtypes import acc_element_size
from dcp_backend.kernels.work import AttnWork

MODEL, ACC = "model", "acc"  # dtype classes: the input dtype, and the fp32 (fp64) accumulation dtype


@dataclass(frozen=True)
class StoreSpec:
    name: str
    rows: int
    heads: int  # heads per row
    with_dim: bool  # rows are [heads, head_dim] (else [heads], e.g. lse)
    dtype: str  # MODEL or ACC: how the rows are held
    wire: str | None = None  # MODEL or ACC: how its rows travel (None: as held)

    @property
    def wire_class(self) -> str:
        return self.wire or self.dtype

    def row_elements(self, head_dim: int) -> int:
        return self.heads * (head_dim if self.with_dim else 1)

    def nbytes(self, rows: int, head_dim: int, element_size: int) -> int:
        """Bytes of ``rows`` rows of this store when model tensors have ``element_size`` bytes."""
        return _bytes(self.dtype, rows * self.row_elements(head_dim), element_size)

    def wire_nbytes(self, rows: int, head_dim: int, element_size: int) -> int:
        """Bytes of ``rows`` rows of this store in a message."""
        return _bytes(self.wire_class, rows * self.row_elements(head_dim), element_size)


def _bytes(cls: str, elements: int, element_size: int) -> int:
    return int(elements) * (acc_element_size(element_size) if cls == ACC else element_size)


@dataclass(eq=False)
class CommOp:
    peer: int
    parts: list  # [(store name, rows ndarray)], packed in this order


@dataclass(eq=False)
class Comm:
    key: str
    sends: list
    recvs: list


@dataclass(eq=False)
class Wait:
    key: str


@dataclass(eq=False)
class Attention:
    stage: int
    q_rows: np.ndarray
    kv_rows: np.ndarray
    work: AttnWork
    comps: np.ndarray
    backward: bool


@dataclass(eq=False)
class Fill:
    stores: tuple  # result stores to reset: "o"/"dq"/"dk"/"dv" -> 0, "lse" -> -inf
    rows: np.ndarray


@dataclass(eq=False)
class Reduce:
    op: str  # "merge" (out, lse) or "sum"
    src: tuple
    dst: tuple
    src_rows: np.ndarray
    dst_rows: np.ndarray  # unique within one merge instruction


@dataclass(eq=False)
class DeviceProgram:
    device: int
    num_local_tokens: int
    stores: dict = field(default_factory=dict)  # name -> StoreSpec
    instructions: list = field(default_factory=list)

    def comm_keys(self) -> list[str]:
        return [i.key for i in self.instructions if isinstance(i, Comm)]
