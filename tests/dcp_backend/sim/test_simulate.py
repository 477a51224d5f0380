"""Simulator sanity on real plans: one device is pure compute, a plan that moves nothing waits for
nothing, more bandwidth never slows anything down, ring's causal imbalance is longer than zigzag's."""
import dataclasses

import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend.cost_model import load_cost_model
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.registry import get_planner
from dcp_backend.sim.benchmark_batches import paper_batches
from dcp_backend.sim.compare import candidate_plans, compare_batch
from dcp_backend.sim.simulator import compute_only_seconds, simulate_plan
from dcp_backend.topology import Topology

SPEC = cp.AttentionSpec(8, 2, 128, mask="causal")


def _plan(name, seqlens, world, dpn, spec=SPEC, **opts):
    if name.startswith("te"):
        opts = {"cp_comm_type": "p2p" if name == "te" else "a2a+p2p"}
        name = "te"
    return cp.get_planner(name, **opts).plan(seqlens, spec, cp.Topology(world, dpn))


def test_one_device_plan_time_is_its_compute():
    for name in ("dcp", "ring", "zigzag"):
        plan = _plan(name, [3000, 700, 5], 1, 1, **({"block_size": 512} if name == "dcp" else {}))
        rep = simulate_plan(plan, "h100", "h100-p5", "bf16")
        for backward, res in ((False, rep.fwd), (True, rep.bwd)):
            comp = compute_only_seconds(plan, "h100", "bf16", backward)
            assert res.time == pytest.approx(comp[0], rel=1e-9)
            assert res.waited[0] == 0 and res.bytes_sent.sum() == 0


def test_plan_that_moves_nothing_waits_for_nothing():
    # two documents that each fit one device's share: dcp keeps each on its own device
    spec = cp.AttentionSpec(4, 2, 64, mask="causal")
    plan = _plan("dcp", [512, 512], 2, 2, spec, block_size=512)
    st = plan.stats()
    assert st.fwd_inter_node_bytes + st.fwd_intra_node_bytes + st.bwd_intra_node_bytes == 0
    rep = simulate_plan(plan, "h100", "h100-p5", "bf16")
    for res in (rep.fwd, rep.bwd):
        assert res.bytes_sent.sum() == 0 and res.waited.max() == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(res.finish, res.compute)


@pytest.mark.parametrize("name", ["ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp"])
def test_more_bandwidth_never_slows_anything(name):
    seqlens = paper_batches("ldc", 1, 16384, 0.25, seed=3)[0]
    plan = _plan(name, seqlens, 8, 4, **({"block_size": 512} if name == "dcp" else {}))
    base = simulate_plan(plan, "h100", "a100-p4d", "bf16")
    fast = simulate_plan(plan, "h100", "a100-p4d", "bf16", bandwidth_scale=2.0)
    assert fast.fwd.time <= base.fwd.time * (1 + 1e-9) and fast.bwd.time <= base.bwd.time * (1 + 1e-9)
    # and the bytes the simulator moved are the plan's statistics
    st = base.stats
    assert base.fwd.bytes_sent.sum() == pytest.approx(st.fwd_inter_node_bytes + st.fwd_intra_node_bytes, rel=1e-6)


def test_ring_causal_imbalance_shows_on_the_critical_path():
    plans = {n: _plan(n, [65536], 8, 8) for n in ("ring", "zigzag")}
    # the FlexAttention table's costs: compute-bound enough for the imbalance to dominate (flash's faster
    # kernels leave the 8-step ring closer to its transfers)
    reps = {n: simulate_plan(p, "h100", "h100-p5", "bf16", kernel="table") for n, p in plans.items()}
    ring, zz = reps["ring"].fwd, reps["zigzag"].fwd
    assert ring.time > 1.3 * zz.time
    # ring: the last rank computes every step; rank 0 only its own block
    assert ring.compute.max() > 4 * ring.compute.min()
    assert zz.compute.max() < 1.2 * zz.compute.min()
    assert ring.critical_summary()["compute"] > 0.9 * ring.time


def test_compare_batch_keeps_best_configurations():
    seqlens = paper_batches("longalign", 1, 16384, 0.25, seed=1)[0]
    res = compare_batch(seqlens, SPEC, Topology.grid(2, 4), "h100", "a100-p4d", "bf16",
                        dcp_block_sizes=(512, 1024))
    assert set(res) == {"ring", "zigzag", "loongtrain", "te", "te-a2a", "hybrid", "dcp", "dcp-hypergraph"}
    assert res["dcp"].total_ms <= res["dcp-hypergraph"].total_ms
    assert all(e.fwd_ms > 0 and e.bwd_ms > 0 for e in res.values())


def test_dcp_is_planned_at_the_shares_hybrid_gets_and_two_compute_tolerances():
    # hybrid runs at 1x and 2x a rank's token share; DCP's hypergraph plans at the same two shares, the 2x
    # one allowed to hold up to twice the mean tokens on a device (memory_imbalance 1.0), each at the default
    # compute tolerance and a looser one
    seqlens = [5000, 3000, 2000, 1500, 600]
    cands = candidate_plans(seqlens, SPEC, Topology.grid(2, 4), backends=("hybrid", "dcp"), dcp_block_sizes=(512,),
                            dcp_candidates=("hypergraph",))
    assert sorted(c.config.split(" (")[1] for c in cands if c.label == "hybrid") == ["1x share)", "2x share)"]
    dcp = {c.config: c.plan for c in cands if c.label == "dcp"}
    assert set(dcp) == {"hypergraph block=512", "hypergraph block=512 (2x share)",
                        "hypergraph block=512 (compute 0.2)", "hypergraph block=512 (2x share, compute 0.2)"}
    one, two = dcp["hypergraph block=512"], dcp["hypergraph block=512 (2x share)"]
    assert one.options.memory_imbalance == 0.2 and two.options.memory_imbalance == 1.0
    assert one.options.compute_imbalance == 0.1 and dcp["hypergraph block=512 (2x share, compute 0.2)"].options \
        == dataclasses.replace(two.options, compute_imbalance=0.2)
    mean = sum(seqlens) / 8
    assert max(one.stats().tokens) <= 1.2 * mean + 512 and max(two.stats().tokens) <= 2.0 * mean + 512
    compute = {k: np.bincount(p.placement.comp_device, weights=p.comp_cost, minlength=8) for k, p in dcp.items()}
    assert compute["hypergraph block=512"].max() <= 1.1 * compute["hypergraph block=512"].mean() * (1 + 1e-9)
    only = candidate_plans(seqlens, SPEC, Topology.grid(2, 4), backends=("dcp",), dcp_block_sizes=(512,),
                           dcp_candidates=("hypergraph",), dcp_shares=(1,), dcp_compute_tolerances=(0.1,))
    assert [c.config for c in only] == ["hypergraph block=512"]


def test_dcp_memory_cap_against_zigzag():
    # --dcp-memory-vs-zigzag F: DCP plans under that memory limit and keeps its fastest plan within F x zigzag's
    # largest device, else (none fits) the fastest, marked over the limit. Both token shares, as simulate.py
    # plans: the 2x share is the faster and the larger here, so a cap between the two changes the pick.
    seqlens, topo = [5000, 3000, 2000, 1500, 600], Topology.grid(2, 4)
    kw = dict(backends=("zigzag", "dcp"), dcp_block_sizes=(256, 512), dcp_candidates=("hypergraph", "ring"),
              dcp_shares=(1, 2), dcp_compute_tolerances=(0.1,))
    zig = float(max(get_planner("zigzag").plan(seqlens, SPEC, topo).stats(2).memory_bytes))
    free = compare_batch(seqlens, SPEC, topo, "h100", "a100-p4d", "bf16", **kw)
    assert free["zigzag"].memory_bytes == zig and not free["dcp"].over_memory_limit
    opts = DCPOptions(cost_model=load_cost_model("h100").spec)  # what compare_batch plans with
    mems = [float(max(c.plan.stats(2).memory_bytes))
            for c in candidate_plans(seqlens, SPEC, topo, dcp_options=opts, **kw) if c.label == "dcp"]
    assert min(mems) < free["dcp"].memory_bytes  # a leaner plan exists, so a cap between the two changes the pick
    factor = (min(mems) + free["dcp"].memory_bytes) / 2 / zig
    capped = compare_batch(seqlens, SPEC, topo, "h100", "a100-p4d", "bf16", dcp_memory_vs_zigzag=factor, **kw)
    assert capped["dcp"].memory_bytes <= factor * zig and not capped["dcp"].over_memory_limit
    none_fits = compare_batch(seqlens, SPEC, topo, "h100", "a100-p4d", "bf16", dcp_memory_vs_zigzag=0.01, **kw)
    assert none_fits["dcp"].over_memory_limit and none_fits["dcp"].total_ms == free["dcp"].total_ms
