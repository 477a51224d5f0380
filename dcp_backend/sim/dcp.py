"""DCP plans as simulator programs: the compiled per-device instruction lists, one op per instruction.

Every instruction of ``plan.fwd_programs[r]`` / ``plan.bwd_programs[r]`` becomes what the executor does
with it (:mod:`dcp_backend.dcp.executor`), in the same order:

* ``Comm``: gather the segments that need a buffer (partial results converted to the model dtype; inputs
  go straight from the stores, :func:`~dcp_backend.dcp.instructions.segment_in_place`) on the compute
  stream, then launch one message per (peer, dtype class) (its segments' ops travel together);
* ``Wait``: wait for the launch's messages, then scatter the buffered received segments into their stores
  (one ``index_copy_`` each; in-place ones need nothing);
* ``Attention``: gather q/k/v (and out, dout, lse backward), run the block kernel over the stage's
  ``AttnWork`` (``heads`` = the head block's query heads), merge (out, lse) or accumulate dq/dk/dv;
* ``Fill`` / ``Reduce``: memory operations on the rows they name.

So the overlap is the compiled schedule's: stage s+1's inputs (launched before stage s's attention)
travel while stage s computes, the intra-node second phase goes after the first phase arrives, result
returns of stage s travel during later stages, and the final reductions run after the last wait.
A pass starts with the executor's prologue (copy the local q/k/v into the stores, reset results).
"""
from __future__ import annotations

from dcp_backend.dcp.instructions import (Attention, Comm, Fill, Reduce, Wait, message_segments, segment_in_place,
                                          segment_members, segment_wire_nbytes)
from dcp_backend.sim.op_costs import Costs
from dcp_backend.sim.engine import Compute, Launch
from dcp_backend.sim.engine import Wait as SimWait


def _part_bytes(prog, name: str, rows, c: Costs) -> float:
    return float(prog.stores[name].nbytes(rows.size, c.head_dim, c.element_size))


def _wire_bytes(prog, name: str, rows, c: Costs) -> float:
    return float(prog.stores[name].wire_nbytes(rows.size, c.head_dim, c.element_size))


def _forward_result_copy(nq: int, fresh: int, hb: int, c: Costs) -> tuple[float, int]:
    """(bytes, ops) of putting a forward attention's (out, lse) into the stores (the executor's ``attn``
    step): rows merged cost ``merge_into_`` (gather, two scales, add, scatter: five passes over fp32 rows,
    ten ops), fresh rows a cast and an ``index_copy_`` of out and lse (two passes, three ops), and a call
    with both first splits the kernel's rows (one more pass over them, four ops)."""
    merged = nq - fresh
    nbytes, ops = 0.0, 0
    if merged:
        nbytes, ops = 5 * c.rows_bytes(merged, hb, acc=True), 10
    if fresh:
        nbytes, ops = nbytes + 2 * c.rows_bytes(fresh, hb, acc=True), ops + 3
    if merged and fresh:
        nbytes, ops = nbytes + c.rows_bytes(nq, hb), ops + 4
    return nbytes, ops


def device_program(plan, rank: int, backward: bool, c: Costs) -> list:
    prog = (plan.bwd_programs if backward else plan.fwd_programs)[rank]
    h = plan.blocks.heads
    tag = "b" if backward else "f"
    ops: list = []
    # prologue: local q/k/v (and out, dout, lse backward) into the stores, result stores reset
    n = prog.num_local_tokens
    pro = c.rows_bytes(n * h.n_q_blocks, h.hb) * (3 if backward else 1) + c.rows_bytes(n * h.n_kv_blocks, h.khb) * 2
    reset = sum(float(s.nbytes(s.rows, c.head_dim, c.element_size))
                for nm, s in prog.stores.items() if nm in (("dq", "dk", "dv") if backward else ("o", "lse")))
    ops.append(Compute(c.copy(pro + reset, 5), "prologue"))
    for ins in prog.instructions:
        if isinstance(ins, Comm):
            sends, recvs, pack, parts = [], [], 0.0, 0
            for op in ins.sends:
                by_cls: dict = {}
                for name, rows in op.parts:
                    cls = prog.stores[name].wire_class
                    by_cls[cls] = by_cls.get(cls, 0.0) + _wire_bytes(prog, name, rows, c)
                for name, rows in message_segments(prog.stores, op.parts):  # one gather per buffered segment
                    if not segment_in_place(prog.stores, name, rows):
                        pack += segment_wire_nbytes(prog.stores, name, rows, c.head_dim, c.element_size)
                        parts += 1
                for cls, nbytes in sorted(by_cls.items()):
                    sends.append(((tag, ins.key, rank, op.peer, cls), op.peer, nbytes))
            for op in ins.recvs:
                for cls in sorted({prog.stores[name].wire_class for name, _ in op.parts}):
                    recvs.append(((tag, ins.key, op.peer, rank, cls), op.peer))
            if pack:
                ops.append(Compute(c.copy(pack, parts), f"pack {ins.key}"))
            ops.append(Launch(ins.key, sends, recvs))
            buffered = [(nm, r) for o in ins.recvs for nm, r in message_segments(prog.stores, o.parts)
                        if not segment_in_place(prog.stores, nm, r)]
            ops.append(("unpack", ins.key, sum(_part_bytes(prog, m, r, c) for nm, r in buffered
                                               for m in segment_members(prog.stores, nm)), len(buffered)))
        elif isinstance(ins, Wait):
            ops.append(SimWait(ins.key, f"wait {ins.key}"))
            ops.append(("unpacked", ins.key))
        elif isinstance(ins, Attention):
            nq, nkv = ins.q_rows.size, ins.kv_rows.size
            if backward:
                gather = c.rows_bytes(nq, h.hb) * 3 + c.rows_bytes(nq, h.hb, acc=True, with_dim=False)
                after = c.rows_bytes(nq, h.hb, acc=True) + 2 * c.rows_bytes(nkv, h.khb, acc=True)
                after_ops = 3
            else:
                gather = c.rows_bytes(nq, h.hb)
                after, after_ops = _forward_result_copy(nq, ins.fresh.size, h.hb, c)
            gather += 2 * c.rows_bytes(nkv, h.khb)
            ops.append(Compute(c.copy(gather, 5 if backward else 3), f"gather s{ins.stage}"))
            ops.append(Compute(c.attention(ins.work, h.hb, backward), f"attention s{ins.stage}"))
            ops.append(Compute(c.copy(after, after_ops), f"{'accumulate' if backward else 'merge'} "
                                                         f"s{ins.stage}"))
        elif isinstance(ins, Fill):
            nbytes = sum(_part_bytes(prog, nm, ins.rows, c) for nm in ins.stores)
            ops.append(Compute(c.copy(nbytes, len(ins.stores)), "fill"))
        elif isinstance(ins, Reduce):
            nbytes = sum(_part_bytes(prog, nm, ins.src_rows, c) for nm in ins.src)
            nbytes += sum(_part_bytes(prog, nm, ins.dst_rows, c) for nm in ins.dst)
            ops.append(Compute(c.copy(nbytes, 2 * len(ins.src) + (4 if ins.op == "merge" else 0)), f"reduce {ins.op}"))
        else:  # pragma: no cover - the compiler emits only these
            raise TypeError(f"unknown instruction {type(ins).__name__}")
    # resolve unpack markers: the scatter after the matching wait
    pending = {}
    out = []
    for op in ops:
        if isinstance(op, tuple) and op[0] == "unpack":
            pending[op[1]] = (op[2], op[3])
        elif isinstance(op, tuple) and op[0] == "unpacked":
            nbytes, parts = pending.pop(op[1], (0.0, 0))
            if parts:
                out.append(Compute(c.copy(nbytes, parts), f"unpack {op[1]}"))
        else:
            out.append(op)
    out.append(Compute(c.copy(c.rows_bytes(n * h.n_q_blocks, h.hb)
                              + (2 * c.rows_bytes(n * h.n_kv_blocks, h.khb) if backward else 0), 2), "epilogue"))
    return out


def programs(plan, backward: bool, c: Costs) -> list[list]:
    return [device_program(plan, r, backward, c) for r in range(plan.world_size)]
