"""The host side of a compiled DCP program: its instructions turned into executor steps, with every index
array packed into one :class:`~dcp_backend.host_tables.HostTables` buffer (built once per plan, in the
planning worker; the executor uploads it once per device)."""
from __future__ import annotations

import numpy as np

from dcp_backend.dcp.instructions import (Attention, Comm, DeviceProgram, Fill, Reduce, Wait, message_segments,
                                          segment_in_place, segment_row_elements, segment_wire_class)
from dcp_backend.host_tables import HostTables
from dcp_backend.kernels import BlockKernel


class Message:
    """One peer's segments, one point-to-point op each, in order: ``(wire class, store, start, rows, numel)``:
    ``start`` is the first row of a segment moved straight from or into its store (``rows`` then its row
    count), or None for one moved through a buffer (``rows``: a table handle of its rows, resolved to a
    device tensor by the runner)."""

    def __init__(self, peer: int, segments: list):
        self.peer = peer
        self.segments = segments


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
        """A peer's parts as the executor moves them: one op per segment (:func:`message_segments`), straight
        from / into the store where :func:`segment_in_place` allows, else gathered into / copied out of a
        buffer of its own. Both sides segment identically, so the ops match one to one."""
        stores = self.program.stores
        segments = []
        for name, rows in message_segments(stores, op.parts):
            cls = segment_wire_class(stores, name)
            numel = int(rows.size) * segment_row_elements(stores, name, self.head_dim)
            if segment_in_place(stores, name, rows):
                segments.append((cls, name, int(rows[0]), int(rows.size), numel))
            else:
                segments.append((cls, name, None, self.tables.add(rows), numel))
        return Message(op.peer, segments)

    def _fresh(self, ins: Attention):
        """How a forward attention's (out, lse) reaches the stores: None (merged into every row), () (written
        to every row: all are fresh), or table handles (positions written, their rows, positions merged,
        their rows)."""
        n, fresh = ins.q_rows.size, ins.fresh
        if ins.backward or fresh.size == 0:
            return None
        if fresh.size == n:
            return ()
        merged = np.setdiff1d(np.arange(n), fresh)
        t = self.tables.add
        return t(fresh), t(ins.q_out_rows[fresh]), t(merged), t(ins.q_out_rows[merged])

    def _prepare(self, ins):
        t = self.tables.add
        if isinstance(ins, Comm):
            return ("comm", ins.key, [self._message(o) for o in ins.sends], [self._message(o) for o in ins.recvs])
        if isinstance(ins, Wait):
            return ("wait", ins.key)
        if isinstance(ins, Attention):
            q, kv = t(ins.q_rows), t(ins.kv_rows)
            # result rows: the input rows' table where they are the same rows (blocks the device owns)
            q_out = q if np.array_equal(ins.q_out_rows, ins.q_rows) else t(ins.q_out_rows)
            kv_out = kv if np.array_equal(ins.kv_out_rows, ins.kv_rows) else t(ins.kv_out_rows)
            return ("attn", ins.backward, q, kv, ins.work, self._fresh(ins), q_out, kv_out)
        if isinstance(ins, Fill):
            return ("fill", ins.stores, t(ins.rows))
        if isinstance(ins, Reduce):
            return ("reduce", ins.op, ins.src, ins.dst, t(ins.src_rows), t(ins.dst_rows))
        raise TypeError(f"unknown instruction {type(ins).__name__}")
