"""Planner + verifier on many random batches, masks and topologies; the verifier catches broken plans;
plans are deterministic and serialise losslessly."""
import copy

import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend import CPError
from dcp_backend.dcp.instructions import Attention, Comm, Fill, Reduce
from dcp_backend.dcp.serialize import deserialize, serialize
from dcp_backend.dcp.verify import PlanVerificationError, verify_plan
from tests.cp_check import random_seqlens
from tests.dcp_backend.baselines.test_ring_family import MASKS

TOPOLOGIES = [(1, 1), (1, 3), (2, 2), (4, 2)]


def _plan(seqlens, world, dpn, mask="causal", args=None, heads=(4, 2), **opts):
    spec = cp.AttentionSpec(heads[0], heads[1], 8, mask=mask, mask_args=args or {})
    backend = cp.get_backend("dcp", world_size=world, devices_per_node=dpn, **opts)
    return backend.plan(seqlens, spec)


@pytest.mark.parametrize("nodes,dpn", TOPOLOGIES)
def test_random_plans_verify(nodes, dpn):
    rng = np.random.default_rng(nodes * 10 + dpn)
    world = nodes * dpn
    for mask, args in MASKS:
        for heads, hbs in (((4, 2), None), ((4, 4), 1), ((8, 2), 1)):
            seqlens = random_seqlens(rng, int(rng.integers(1, 9)), 150, world)
            plan = _plan(seqlens, world, dpn, mask, args, heads, block_size=int(rng.choice([8, 16, 32])),
                         head_block_size=hbs, num_stages=int(rng.choice([1, 2, 4])))
            verify_plan(plan)


def test_auto_block_size_and_greedy_partitioner_verify():
    rng = np.random.default_rng(7)
    for partitioner in ("mtkahypar", "greedy"):
        seqlens = random_seqlens(rng, 10, 400, 8)
        verify_plan(_plan(seqlens, 8, 4, "lambda", {"sink": 4, "window": 32}, partitioner=partitioner))


def _mutants(plan):
    def drop(kind, which):
        def f(p):
            progs = p.bwd_programs if which == "bwd" else p.fwd_programs
            for prog in progs:
                idx = [j for j, x in enumerate(prog.instructions) if isinstance(x, kind)]
                if idx:
                    del prog.instructions[idx[-1]]
                    return True
            return False
        return f

    def corrupt_kv(p):
        for prog in p.fwd_programs:
            for ins in prog.instructions:
                if isinstance(ins, Attention) and ins.kv_rows.size > 1:
                    ins.kv_rows = np.roll(ins.kv_rows, 1)
                    return True
        return False

    def shrink_range(p):
        for prog in p.bwd_programs:
            for ins in prog.instructions:
                if isinstance(ins, Attention):
                    r = ins.work.ranges
                    live = np.argwhere(r[..., 1] > r[..., 0])
                    if live.size:
                        i, j = live[0]
                        r[i, j, 1] -= 1
                        return True
        return False

    def drop_send(p):
        for prog in p.fwd_programs:
            for ins in prog.instructions:
                if isinstance(ins, Comm) and ins.sends:
                    ins.sends.pop()
                    return True
        return False

    def write_over_results(p):  # a forward attention writes (not merges) rows that already hold results
        for prog in p.fwd_programs:
            for ins in prog.instructions:
                if isinstance(ins, Attention) and ins.fresh.size < ins.q_rows.size:
                    ins.fresh = np.arange(ins.q_rows.size)
                    return True
        return False

    return {"write_over_results": write_over_results, "drop_attention": drop(Attention, "fwd"), "drop_reduce": drop(Reduce, "fwd"),
            "drop_bwd_reduce": drop(Reduce, "bwd"), "drop_fill": drop(Fill, "fwd"), "corrupt_kv": corrupt_kv,
            "shrink_range": shrink_range, "drop_send": drop_send}


def test_verifier_catches_broken_plans():
    # the hypergraph placement alone (not a seed that computes every block on its query owner): forward
    # partial results then travel and are merged, so every mutant applies
    plan = _plan([100, 37, 64, 5, 1, 80, 200], 4, 2, block_size=16, num_stages=2, placement_seeds="none")
    verify_plan(plan)
    applied = []
    for name, mutate in _mutants(plan).items():
        bad = copy.deepcopy(plan)
        if not mutate(bad):
            continue
        applied.append(name)
        with pytest.raises(PlanVerificationError):
            verify_plan(bad)
    assert len(applied) >= 7 and "write_over_results" in applied


def _remap_head_block(plan) -> bool:
    """Point one forward attention call's keys/values at the same tokens' *other* KV head block. Every
    count and checksum of keys per query stays the same (same key tokens), so only the check that pairs
    a query head block with its own KV head block can see it."""
    h = plan.blocks.heads
    assert h.n_kv_blocks >= 2
    for prog in plan.fwd_programs:
        n = prog.num_local_tokens
        local_rows = n * h.n_kv_blocks  # own tokens first, head block by head block: row = kv head block * n + token
        for ins in prog.instructions:
            if isinstance(ins, Attention) and ins.kv_rows.size and (ins.kv_rows < local_rows).all():
                hb, tok = np.divmod(ins.kv_rows, n)
                ins.kv_rows = (hb + 1) % h.n_kv_blocks * n + tok
                return True
    return False


def _write_rows_in_flight(plan) -> bool:
    """Right after a launch that sends k/v rows straight from the store, write those rows (before the wait)."""
    for prog in plan.fwd_programs:
        for j, ins in enumerate(prog.instructions):
            if isinstance(ins, Comm):
                for op in ins.sends:
                    for name, rows in op.parts:
                        if name == "k":
                            prog.instructions.insert(j + 1, Fill(("k",), rows))
                            return True
    return False


def _split_received_group(plan) -> bool:
    """A receiver takes one block's v rows at other rows than its k rows: k/v is no longer one op there,
    while the sender still sends it as one."""
    for prog in plan.fwd_programs:
        for ins in prog.instructions:
            if isinstance(ins, Comm):
                for op in ins.recvs:
                    for i, (name, rows) in enumerate(op.parts):
                        if name == "v" and rows.size > 1:
                            op.parts[i] = (name, rows[::-1].copy())
                            return True
    return False


@pytest.mark.parametrize("mutate,message", [(_write_rows_in_flight, "sends straight from the store"),
                                            (_split_received_group, "segments")])
def test_verifier_catches_in_place_transfer_errors(mutate, message):
    plan = _plan([100, 37, 64, 5, 1, 80, 200], 4, 2, block_size=16, num_stages=2, placement_seeds="none")
    verify_plan(plan)
    bad = copy.deepcopy(plan)
    assert mutate(bad)
    with pytest.raises(PlanVerificationError, match=message):
        verify_plan(bad)


def test_verifier_catches_remapped_head_block():
    plan = _plan([100, 37, 64, 5, 1, 80, 200], 4, 2, heads=(4, 2), block_size=16, num_stages=2)
    assert plan.blocks.heads.n_kv_blocks == 2
    verify_plan(plan)
    bad = copy.deepcopy(plan)
    assert _remap_head_block(bad)
    with pytest.raises(PlanVerificationError, match="pairs a query head block with another KV head block"):
        verify_plan(bad)


def test_plans_are_deterministic_and_serialise():
    seqlens = [598, 4423, 995, 491, 1548, 69, 1273]
    a = _plan(seqlens, 8, 4, "shared_question", block_size=128, seed=3)
    b = _plan(seqlens, 8, 4, "shared_question", block_size=128, seed=3)
    assert serialize(a, with_timings=False) == serialize(b, with_timings=False)
    for r in range(8):
        assert np.array_equal(a.local_indices(r).numpy(), b.local_indices(r).numpy())
    c = deserialize(serialize(a))
    verify_plan(c)
    assert serialize(c) == serialize(a)
    timing = ("planning_seconds", "rank_planning_seconds", "planning_seconds_by_phase")
    assert {k: v for k, v in c.stats().as_dict().items() if k not in timing} == {
        k: v for k, v in a.stats().as_dict().items() if k not in timing}
    one = deserialize(serialize(a, ranks=[5]))
    assert one.fwd_programs.compiled() == [5]  # only rank 5's programs travelled; others compile on demand
    assert np.array_equal(one.local_indices(2).numpy(), a.local_indices(2).numpy())
    with pytest.raises(CPError, match="magic"):
        deserialize(b"not a plan")
    blob = bytearray(serialize(a))
    blob[8] = 99
    with pytest.raises(CPError, match="version"):
        deserialize(bytes(blob))


def _late_result_fill(plan) -> bool:
    """Move the reset of a received key block's dK/dV rows after the first attention that accumulates into them."""
    for prog in plan.bwd_programs:
        ins = prog.instructions
        for j, x in enumerate(ins):
            if isinstance(x, Fill) and "dk" in x.stores:
                for k in range(j + 1, len(ins)):
                    if isinstance(ins[k], Attention) and np.isin(x.rows, ins[k].kv_out_rows).any():
                        ins.insert(k, ins.pop(j))
                        return True
    return False


def _early_result_slot_reuse(plan) -> bool:
    """Reset a reused dK/dV result slot for its next block just before the launch that sends its previous
    block's partial from it: the slot is taken while the previous block's result is still in it."""
    for prog in plan.bwd_programs:
        ins = prog.instructions
        fills = [(j, x) for j, x in enumerate(ins) if isinstance(x, Fill) and "dk" in x.stores]
        for a, (j1, f1) in enumerate(fills):
            for j2, f2 in fills[a + 1:]:
                reused = np.intersect1d(f2.rows, f1.rows)
                if not reused.size:
                    continue
                sends = [j for j in range(j1 + 1, j2) if isinstance(ins[j], Comm) and any(
                    name == "dk" and np.isin(rows, reused).any() for op in ins[j].sends for name, rows in op.parts)]
                if sends:
                    ins.insert(sends[-1], ins.pop(j2))
                    return True
    return False


@pytest.mark.parametrize("mutate,message", [(_late_result_fill, "rows do not belong to the key block"),
                                            (_early_result_slot_reuse, "combines rows of different blocks")])
def test_verifier_catches_result_slot_errors(mutate, message):
    # the ring: a received key block is prefetched a stage before its use, so its result rows (a slot of their own)
    # start later than its input rows, and result slots are reused from stage to stage
    plan = _plan([300, 17, 1, 90], 4, 2, block_size=16, schedule="ring")
    verify_plan(plan)
    bad = copy.deepcopy(plan)
    assert mutate(bad)
    with pytest.raises(PlanVerificationError, match=message):
        verify_plan(bad)
