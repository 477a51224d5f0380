"""The compiled per-device program of a DCP plan: stores, and the instructions the executor runs.

Stores are row tables that one pass of one device uses (all rows of a store have the same shape):

* q-side stores (``q``, ``o``, ``do``, ``lse``, ``dq``) have one row per (token, query head block):
  the device's own tokens first, head block by head block (row ``k * n_tokens + t``, so every block is a
  run of rows), then received blocks in ``block_size``-row slots; input stores and result stores (forward
  ``o``/``lse``; backward ``dq``, ``dk``/``dv``) have slots of their own, so a received block's result rows
  exist only while it is computed into and until its partial is sent, not while its inputs wait for use;
* kv-side stores (``k``, ``v``, ``dk``, ``dv``) likewise per (token, KV head block);
* ``ro``/``rlse``/``rdq``/``rdk``/``rdv`` receive partial results from other devices before they are
  merged (forward, log-sum-exp) or summed (backward) into the owner's rows.

Instructions (one list per pass and device; every device runs the same sequence of communication keys,
so point-to-point messages between any two ranks are posted in the same order on both sides):

* ``Comm(key, sends, recvs)`` launches a batch of point-to-point transfers; an op is a peer and its
  (store, rows) parts, one block at a time; each block of a store group travels as one segment
  (:func:`message_segments`), straight from and into the stores where it can (:func:`segment_in_place`),
  else through a buffer (partial results held in fp32 may travel in the model dtype,
  ``DCPOptions.partial_dtype``);
* ``Wait(key)`` waits for it (and copies buffered segments into their stores);
* ``Attention(stage, q_rows, kv_rows, work, comps, backward, fresh, q_out_rows, kv_out_rows)`` runs the
  block kernel once over all computation blocks of a stage, reading inputs at ``q_rows``/``kv_rows``
  (forward: merges (out, lse) into ``o``/``lse`` at ``q_out_rows``, or writes it at the positions ``fresh``,
  rows nothing has written since their reset; backward: accumulates ``dq`` at ``q_out_rows`` and
  ``dk``/``dv`` at ``kv_out_rows``: the same blocks' rows in the result stores);
* ``Fill(stores, rows, of_rows)`` resets the result rows of a received block before they are first written
  (out 0 / lse -inf, or gradients 0), since slots are reused; ``of_rows`` are the block's input rows (the
  verifier follows which block the result rows belong to through them);
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


# Stores held together in one tensor by the executor, so that one block of all of them travels as one
# segment (a run of the group tensor's rows, sent and received in place): "stack" groups (same dtype class and
# row shape) are [rows, members, heads, head_dim]; the "column" group is an fp32 output with its lse as one
# more column, [rows, heads, head_dim + 1].
STACK_GROUPS = (("q", "o", "do"), ("k", "v"), ("dk", "dv"), ("rdk", "rdv"))
COLUMN_GROUPS = (("o", "lse"), ("ro", "rlse"))


def store_groups(stores: dict) -> dict:
    """{group name: (kind "stack" | "column", members)} of the groups a program's stores form (every member
    present, one dtype class, matching rows)."""
    out = {}
    for members in STACK_GROUPS:
        specs = [stores.get(m) for m in members]
        if all(specs) and len({(s.rows, s.heads, s.with_dim, s.dtype) for s in specs}) == 1 and specs[0].with_dim:
            out["+".join(members)] = ("stack", members)
    for o, lse in COLUMN_GROUPS:
        a, b = stores.get(o), stores.get(lse)
        if (a and b and a.with_dim and not b.with_dim and a.rows == b.rows and a.heads == b.heads
                and a.dtype == b.dtype and not any(o in m for _, m in out.values())):
            out[f"{o}+{lse}"] = ("column", (o, lse))
    return out


def message_segments(stores: dict, parts: list) -> list:
    """How the executor moves one peer's parts [(store, rows)] of a ``Comm``: segments (store or group, rows),
    one point-to-point op each, in part order. Consecutive parts with the same rows that make up a whole group
    (in group order, one wire class) are one segment. The compiler lists parts per block (one block's rows of
    each input or result store), so a segment is one block of one store group on both sides; both sides fuse
    alike (k/v -> k/v, q/o/do -> q/o/do, o/lse -> ro/rlse, dk/dv -> rdk/rdv) and the verifier checks it."""
    groups = store_groups(stores)
    member_of = {m: g for g, (_, ms) in groups.items() for m in ms}
    out, i = [], 0
    while i < len(parts):
        name, rows = parts[i]
        g = member_of.get(name)
        if g is not None:
            members = groups[g][1]
            span = parts[i:i + len(members)]
            if (tuple(n for n, _ in span) == members and all(np.array_equal(r, rows) for _, r in span)
                    and len({stores[m].wire_class for m in members}) == 1):
                out.append((g, rows))
                i += len(members)
                continue
        out.append((name, rows))
        i += 1
    return out


def segment_members(stores: dict, name: str) -> tuple:
    """The stores a segment (a store, or a group of them by its group name) moves."""
    groups = store_groups(stores)
    return groups[name][1] if name in groups else (name,)


def segment_wire_class(stores: dict, name: str) -> str:
    """The dtype class a segment (a store or a group of them) travels in."""
    return stores[segment_members(stores, name)[0]].wire_class


def segment_in_place(stores: dict, name: str, rows: np.ndarray) -> bool:
    """Whether the executor sends a segment straight from its store, or receives it straight into it, with no
    buffer: its rows are one ascending run, the store (or group) is a tensor of its own (not a member of a
    group's tensor) and it travels in the dtype it is held in. Inputs always are (own rows are kept head
    block by head block, so a block's rows are a run; received blocks fill slots); partial results held in
    fp32 and sent in the model dtype are converted through a buffer."""
    if rows.size == 0 or np.any(np.diff(rows) != 1):
        return False
    groups = store_groups(stores)
    if name in groups:
        members = groups[name][1]
    elif any(name in ms for _, ms in groups.values()):
        return False
    else:
        members = (name,)
    return all(stores[m].wire_class == stores[m].dtype for m in members)


def segment_wire_nbytes(stores: dict, name: str, rows: np.ndarray, head_dim: int, element_size: int) -> int:
    """Bytes of a segment on the wire (and in its buffer, when it has one)."""
    return _bytes(segment_wire_class(stores, name), rows.size * segment_row_elements(stores, name, head_dim),
                  element_size)


def segment_row_elements(stores: dict, name: str, head_dim: int) -> int:
    """Elements of one row of a segment's store or group."""
    return sum(stores[m].row_elements(head_dim) for m in segment_members(stores, name))


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
    # forward: positions in q_rows whose output rows nothing has written since their reset (the pass start or
    # the block's Fill): the kernel's (out, lse) is written there, not merged (a merge with nothing)
    fresh: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    q_out_rows: np.ndarray | None = None  # the query blocks' rows in the result stores (None: q_rows)
    kv_out_rows: np.ndarray | None = None  # the key blocks' rows in dk/dv (backward; None: kv_rows)

    def __post_init__(self):
        if self.q_out_rows is None:
            self.q_out_rows = self.q_rows
        if self.kv_out_rows is None:
            self.kv_out_rows = self.kv_rows


@dataclass(eq=False)
class Fill:
    stores: tuple  # result stores to reset: "o"/"dq"/"dk"/"dv" -> 0, "lse" -> -inf
    rows: np.ndarray
    of_rows: np.ndarray | None = None  # the same blocks' rows in the input stores (None: rows)

    def __post_init__(self):
        if self.of_rows is None:
            self.of_rows = self.rows


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
