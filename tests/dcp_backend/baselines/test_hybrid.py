"""`hybrid` (Megatron-Core's hybrid CP, planning only): megatron-core's scheduler forms the rounds; every
document is placed once on a power-of-two group at least as large as megatron's rule asks; the bytes
and pairs are those of per-sample TE rings (independent formulas); the simulator moves exactly those
bytes, runs rounds one after another, and a round of single-rank samples moves nothing."""
import math

import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend.sim.engine import run
from dcp_backend.sim.hybrid import barrier_ops
from dcp_backend.sim.network import Links, get_network
from dcp_backend.sim.simulator import simulate_plan

SPEC = cp.AttentionSpec(8, 2, 64, mask="causal")
BATCH = [9000, 4100, 3000, 1200, 900, 700, 300, 120, 64, 17]


def _plan(seqlens=BATCH, world=8, dpn=4, spec=SPEC, **opts):
    return cp.get_planner("hybrid", **opts).plan(seqlens, spec, cp.Topology(world, dpn))


def _needed(length, m):
    return max(1, 2 ** math.ceil(math.log2(length / m)))


def test_rounds_place_every_document_once_on_a_large_enough_power_of_two_group():
    plan = _plan()
    m = plan.max_seqlen_per_rank
    assert m == -(-sum(BATCH) // 8)  # the default: megatron's suggested starting point
    seen = []
    for rnd in plan.rounds:
        ranks = [r for g in rnd for r in g.ranks]
        assert sorted(ranks) == list(range(8))  # every rank works in every round, in exactly one group
        for g in rnd:
            k = len(g.ranks)
            assert k & (k - 1) == 0 and list(g.ranks) == list(range(g.ranks[0], g.ranks[0] + k))
            for d in g.docs:
                assert k >= _needed(BATCH[d], m)
                seen.append(d)
    assert sorted(seen) == list(range(len(BATCH)))
    # the ranks partition the batch's tokens
    idx = np.concatenate([plan.local_indices(r).numpy() for r in range(8)])
    assert np.array_equal(np.sort(idx), np.arange(sum(BATCH)))


def test_stats_are_per_sample_te_rings():
    spec, e = SPEC, 2
    plan = _plan(max_seqlen_per_rank=1500)
    st = plan.stats(e)
    fwd = bwd = 0
    for _, g, d in plan.samples():
        k = len(g.ranks)
        padded = -(-BATCH[d] // (2 * k)) * 2 * k
        per_rank = 2 * (padded // k) * spec.num_kv_heads * spec.head_dim * e  # K and V of the rank's rows
        fwd += k * (k - 1) * per_rank
        bwd += 2 * k * (k - 1) * per_rank  # K/V and dK/dV (bf16) around the ring
    assert st.fwd_inter_node_bytes + st.fwd_intra_node_bytes == fwd
    assert st.bwd_inter_node_bytes + st.bwd_intra_node_bytes == bwd
    causal_pairs = sum(n * (n + 1) // 2 for n in BATCH)
    assert sum(st.compute_pair_heads) == causal_pairs * spec.num_heads
    assert st.extra["rounds"] == len(plan.rounds) >= 1


def test_simulator_moves_the_plans_bytes_and_more_bandwidth_never_hurts():
    plan = _plan(max_seqlen_per_rank=1500)
    base = simulate_plan(plan, "h100", "a100-p4d", "bf16")
    fast = simulate_plan(plan, "h100", "a100-p4d", "bf16", bandwidth_scale=4.0)
    st = base.stats
    assert base.fwd.bytes_sent.sum() == pytest.approx(st.fwd_inter_node_bytes + st.fwd_intra_node_bytes)
    assert fast.fwd.time <= base.fwd.time * (1 + 1e-9) and fast.bwd.time <= base.bwd.time * (1 + 1e-9)


def test_single_rank_samples_move_nothing_and_take_their_compute():
    # eight equal documents that each fit a rank: CP size 1 each, one per rank, one round
    plan = _plan([1000] * 8, world=8, dpn=8)
    assert len(plan.rounds) == 1 and all(len(g.ranks) == 1 and len(g.docs) == 1 for g in plan.rounds[0])
    assert plan.stats().fwd_intra_node_bytes == plan.stats().bwd_intra_node_bytes == 0
    one = simulate_plan(cp.get_planner("zigzag").plan([1000], SPEC, cp.Topology(1)), "h100", "h100-p5", "bf16")
    rep = simulate_plan(plan, "h100", "h100-p5", "bf16")
    barrier = 3 * get_network("h100-p5").intra_latency  # log2(8) zero-byte steps inside a node
    assert rep.fwd.time == pytest.approx(one.fwd.time + barrier, rel=1e-6)
    assert rep.bwd.time == pytest.approx(one.bwd.time + barrier, rel=1e-6)


def test_rounds_run_one_after_another():
    # one document needs every rank, the short ones come in a later round: the pass is at least the sum of
    # the rounds run alone
    seqlens = [6000, 500, 400, 300, 200]
    plan = _plan(seqlens, world=4, dpn=4)
    assert len(plan.rounds) >= 2
    full = simulate_plan(plan, "h100", "h100-p5", "bf16").fwd.time
    from dcp_backend.sim.hybrid import hybrid_programs
    from dcp_backend.sim.op_costs import Costs
    from dcp_backend.cost_model import load_cost_model

    c = Costs.make(load_cost_model("h100"), "bf16", SPEC.head_dim)
    links = Links(plan.topology, get_network("h100-p5"))
    alone = [run(hybrid_programs(plan, False, c, rounds=[j], barrier=False), links).time
             for j in range(len(plan.rounds))]
    assert full >= sum(alone) * (1 - 1e-9)


def test_barrier_takes_log2_latencies_on_any_world():
    for n in (2, 5, 8):
        links = Links(cp.Topology(n), get_network("h100-p5"))
        res = run([barrier_ops(r, n, 0) for r in range(n)], links)
        assert res.time == pytest.approx(math.ceil(math.log2(n)) * get_network("h100-p5").intra_latency)


def test_bad_inputs_and_running_it_fail_clearly():
    with pytest.raises(cp.CPError, match="power of two"):
        _plan(world=6, dpn=6)
    with pytest.raises(cp.CPError, match="raise max_seqlen_per_rank to at least 1125"):
        _plan(max_seqlen_per_rank=500)  # 9000 tokens over 8 ranks
    with pytest.raises(cp.CPError, match="max_seqlen_per_rank must be a positive int"):
        cp.make_options("hybrid", max_seqlen_per_rank=0)
    with pytest.raises(cp.BackendUnavailableError, match="planning-only"):
        cp.get_backend("hybrid", world_size=8)


def test_sparse_masks_plan_as_the_forked_te():
    spec = cp.AttentionSpec(8, 2, 64, mask="lambda", mask_args={"sink": 16, "window": 256})
    st = _plan(spec=spec).stats()
    from dcp_backend.masks import count_pairs
    from dcp_backend.batch import PackedBatch

    assert sum(st.compute_pair_heads) == count_pairs(PackedBatch.from_seqlens(BATCH), "lambda",
                                                     spec.mask_args) * spec.num_heads
