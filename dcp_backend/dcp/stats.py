"""Statistics of a compiled DCP plan: bytes moved (forward/backward, inter/intra node, per device),
compute and its imbalance, memory per device, stages, instructions and planning time per phase.

Bytes are counted from the compiled send instructions, exactly as the executor sends them (model
tensors at ``element_size`` bytes per element, log-sum-exp at 4, partial results at 4 or, with
``partial_dtype="model"``, at ``element_size``).
"""
from __future__ import annotations

import numpy as np

from dcp_backend.contract import PlanStats
from dcp_backend.dcp.instructions import Attention, Comm


def program_send_bytes(prog, head_dim: int, element_size: int, devices_per_node: int) -> tuple[int, int]:
    """(intra-node, inter-node) bytes one device program sends."""
    intra = inter = 0
    for ins in prog.instructions:
        if not isinstance(ins, Comm):
            continue
        for op in ins.sends:
            nbytes = sum(prog.stores[name].wire_nbytes(rows.size, head_dim, element_size) for name, rows in op.parts)
            if op.peer // devices_per_node == prog.device // devices_per_node:
                intra += nbytes
            else:
                inter += nbytes
    return intra, inter


def program_memory_bytes(prog, head_dim: int, element_size: int) -> int:
    return sum(spec.nbytes(spec.rows, head_dim, element_size) for spec in prog.stores.values())


def plan_stats(plan, element_size: int = 2) -> PlanStats:
    n, dpn, d = plan.world_size, plan.devices_per_node, plan.spec.head_dim
    fwd = np.array([program_send_bytes(p, d, element_size, dpn) for p in plan.fwd_programs])
    bwd = np.array([program_send_bytes(p, d, element_size, dpn) for p in plan.bwd_programs])
    compute = np.bincount(plan.placement.comp_device, weights=plan.comp_cost, minlength=n)
    tokens = [plan.layouts[r].num_tokens for r in range(n)]
    fwd_mem = [program_memory_bytes(f, d, element_size) for f in plan.fwd_programs]
    bwd_mem = [program_memory_bytes(b, d, element_size) for b in plan.bwd_programs]
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
        "fwd_memory_bytes_per_rank": fwd_mem,
        "bwd_memory_bytes_per_rank": bwd_mem,
        "placement": plan.placement.source,
        "fwd_inter_node_bytes_per_rank": fwd[:, 1].tolist(),
        "bwd_inter_node_bytes_per_rank": bwd[:, 1].tolist(),
    }
    return PlanStats.from_traffic("dcp", n, dpn, fwd, bwd, compute, tokens, memory, extra=extra)
