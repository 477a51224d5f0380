"""Statistics of a compiled DCP plan: bytes moved (forward/backward, inter/intra node, per device),
compute and its imbalance, memory per device (stores and transfer buffers), stages, instructions and planning
time per phase.

Bytes are counted from the compiled send instructions, exactly as the executor sends them (model
tensors at ``element_size`` bytes per element, log-sum-exp at 4, partial results at 4 or, with
``partial_dtype="model"``, at ``element_size``).
"""
from __future__ import annotations

import numpy as np

from dcp_backend.contract import PlanStats
from dcp_backend.dcp.instructions import Attention, Comm, Wait, message_segments, segment_in_place, segment_wire_nbytes


def op_bytes(prog, op, head_dim: int, element_size: int) -> int:
    """Bytes one send or receive of a device program moves (its parts, as the executor packs them)."""
    return sum(prog.stores[name].wire_nbytes(rows.size, head_dim, element_size) for name, rows in op.parts)


def program_send_bytes(prog, head_dim: int, element_size: int, devices_per_node: int) -> tuple[int, int]:
    """(intra-node, inter-node) bytes one device program sends."""
    intra = inter = 0
    for ins in prog.instructions:
        if not isinstance(ins, Comm):
            continue
        for op in ins.sends:
            nbytes = op_bytes(prog, op, head_dim, element_size)
            if op.peer // devices_per_node == prog.device // devices_per_node:
                intra += nbytes
            else:
                inter += nbytes
    return intra, inter


def program_memory_bytes(prog, head_dim: int, element_size: int) -> int:
    """Bytes of one device program's stores (own rows, slots, temp rows)."""
    return sum(spec.nbytes(spec.rows, head_dim, element_size) for spec in prog.stores.values())


def program_buffer_bytes(prog, head_dim: int, element_size: int) -> int:
    """Peak bytes of one device program's transfer buffers: the executor moves a segment through a buffer
    (alive from the ``Comm`` to its ``Wait``) unless it goes straight from or into its store
    (:func:`~dcp_backend.dcp.instructions.segment_in_place`)."""
    live, cur, peak = {}, 0, 0
    for ins in prog.instructions:
        if isinstance(ins, Comm):
            nbytes = sum(segment_wire_nbytes(prog.stores, name, rows, head_dim, element_size)
                         for op in (*ins.sends, *ins.recvs) for name, rows in message_segments(prog.stores, op.parts)
                         if not segment_in_place(prog.stores, name, rows))
            live[ins.key] = nbytes
            cur += nbytes
            peak = max(peak, cur)
        elif isinstance(ins, Wait):
            cur -= live.pop(ins.key, 0)
    return peak


def plan_stats(plan, element_size: int = 2) -> PlanStats:
    n, dpn, d = plan.world_size, plan.devices_per_node, plan.spec.head_dim
    fwd = np.array([program_send_bytes(p, d, element_size, dpn) for p in plan.fwd_programs])
    bwd = np.array([program_send_bytes(p, d, element_size, dpn) for p in plan.bwd_programs])
    compute = np.bincount(plan.placement.comp_device, weights=plan.comp_cost, minlength=n)
    tokens = [plan.layouts[r].num_tokens for r in range(n)]
    fwd_store = [program_memory_bytes(f, d, element_size) for f in plan.fwd_programs]
    bwd_store = [program_memory_bytes(b, d, element_size) for b in plan.bwd_programs]
    fwd_buf = [program_buffer_bytes(f, d, element_size) for f in plan.fwd_programs]
    bwd_buf = [program_buffer_bytes(b, d, element_size) for b in plan.bwd_programs]
    fwd_mem = [a + b for a, b in zip(fwd_store, fwd_buf)]
    bwd_mem = [a + b for a, b in zip(bwd_store, bwd_buf)]
    memory = [max(f, b) for f, b in zip(fwd_mem, bwd_mem)]
    n_instr = [len(f.instructions) + len(b.instructions) for f, b in zip(plan.fwd_programs, plan.bwd_programs)]
    attn_calls = sum(isinstance(i, Attention) for p in plan.fwd_programs for i in p.instructions)
    extra = {
        "block_size": plan.block_size,
        "head_block_size": plan.blocks.heads.hb,
        "num_stages": plan.num_stages,
        "num_token_blocks": plan.blocks.n_tb,
        "num_computation_blocks": plan.blocks.n_comp,
        "instructions_per_device": n_instr,
        "forward_attention_calls": int(attn_calls),
        "planning_seconds": plan.planning_seconds,
        "rank_planning_seconds": plan.rank_planning_seconds,
        "planning_seconds_by_phase": dict(plan.timings),
        "fwd_memory_bytes_per_rank": fwd_mem,  # stores + transfer buffers
        "bwd_memory_bytes_per_rank": bwd_mem,
        "fwd_buffer_bytes_per_rank": fwd_buf,
        "bwd_buffer_bytes_per_rank": bwd_buf,
        "placement": plan.placement.source,
        "fwd_inter_node_bytes_per_rank": fwd[:, 1].tolist(),
        "bwd_inter_node_bytes_per_rank": bwd[:, 1].tolist(),
    }
    return PlanStats.from_traffic("dcp", n, dpn, fwd, bwd, compute, tokens, memory, extra=extra)
