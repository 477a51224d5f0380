"""The host side of a compiled DCP program: its instructions turned into executor steps, with every index
array packed into one :class:`~dcp_backend.host_tables.HostTables` buffer (built once per plan, in the
planning worker; the executor uploads it once per device)."""
from __future__ import annotations

import numpy as np

from dcp_backend.dcp.instructions import (Attention, Comm, DeviceProgram, Fill, Reduce, Wait, message_parts,
                                          store_groups)
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels import BlockKernel


class Message:
    """One peer's parts, split by the dtype class they travel in: [(store, rows, numel)] per class (rows: a
    table handle, resolved to a device tensor by the runner)."""

    def __init__(self, peer: int, by_class: dict):
        self.peer = peer
        self.by_class = by_class


class PreparedProgram:
    """The host side of one :class:`DeviceProgram`: its steps, with every index array packed into one
    :class:`~dcp_backend.host_tables.HostTables` (built once per plan, in the planning worker)."""

    def __init__(self, program: DeviceProgram, head_dim: int):
        self.program = program
        self.head_dim = head_dim
        self.tables = HostTables(np.int64)
        self.steps = [self._prepare(ins) for ins in program.instructions]
        self.tables.host  # pack now

    def prepare_kernel(self, kernel: BlockKernel) -> None:
        for ins in self.program.instructions:
            if isinstance(ins, Attention):
                kernel.prepare(ins.work)

    def _message(self, op) -> Message:
        """A peer's parts as the executor moves them (:func:`message_parts`): per dtype class, one gather
        per store or store group straight into the send buffer (one per class when a whole group travels),
        and one ``index_copy_`` each when unpacking. Both sides group identically, so the layouts match."""
        by_class: dict = {}
        stores = self.program.stores
        for cls, parts in message_parts(stores, op.parts).items():
            by_class[cls] = [(name, self.tables.add(rows), int(rows.size) * self._row_elements(name))
                             for name, rows in parts]
        return Message(op.peer, by_class)

    def _row_elements(self, name: str) -> int:
        groups = store_groups(self.program.stores)
        members = groups[name][1] if name in groups else (name,)
        return sum(self.program.stores[m].row_elements(self.head_dim) for m in members)

    def _prepare(self, ins):
        t = self.tables.add
        if isinstance(ins, Comm):
            return ("comm", ins.key, [self._message(o) for o in ins.sends], [self._message(o) for o in ins.recvs])
        if isinstance(ins, Wait):
            return ("wait", ins.key)
        if isinstance(ins, Attention):
            return ("attn", ins.backward, t(ins.q_rows), t(ins.kv_rows), ins.work)
        if isinstance(ins, Fill):
            return ("fill", ins.stores, t(ins.rows))
        if isinstance(ins, Reduce):
            return ("reduce", ins.op, ins.src, ins.dst, t(ins.src_rows), t(ins.dst_rows))
        raise TypeError(f"unknown instruction {type(ins).__name__}")
