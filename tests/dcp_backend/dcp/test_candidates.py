"""Placement candidates: the static zigzag layout in DCP terms verifies and runs correctly on gloo ranks;
"auto" keeps the candidate with the smaller simulated time."""
import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend.dcp.candidates import snake_devices, zigzag_block_size
from dcp_backend.placement_search import simulated_seconds
from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.verify import verify_plan
from tests.cp_check import Case, check_results, random_seqlens, worker
from tests.dcp_backend.baselines.test_ring_family import MASKS
from tests.distributed import run_ranks


def test_snake_deal():
    assert snake_devices(10, 3).tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    assert snake_devices(4, 3, start=2).tolist() == [2, 2, 1, 0]
    assert zigzag_block_size(PackedBatch.from_seqlens([65536, 10]), 8, 8192, 16) == 4096
    assert zigzag_block_size(PackedBatch.from_seqlens([100]), 8, 8192, 16) == 16


@pytest.mark.parametrize("world,dpn", [(1, 1), (3, 3), (4, 2), (8, 4)])
def test_zigzag_plans_verify(world, dpn):
    rng = np.random.default_rng(world)
    for mask, args in MASKS:
        seqlens = random_seqlens(rng, int(rng.integers(1, 7)), 300, world)
        spec = cp.AttentionSpec(4, 2, 8, mask=mask, mask_args=args)
        plan = cp.get_backend("dcp", world_size=world, devices_per_node=dpn, placement="zigzag",
                              num_stages=int(rng.choice([1, 3]))).plan(seqlens, spec)
        verify_plan(plan)
        if world % 2 == 0 and dpn % 2 == 0:  # the 2D zigzag (head slots) with a head block per query head
            from dcp_backend.dcp.config import DCPOptions
            from dcp_backend.dcp.planner import make_plan

            two_d = make_plan(PackedBatch.from_seqlens(seqlens), spec, cp.Topology(world, dpn),
                              DCPOptions(head_block_size=1), strategy="zigzag2d")
            verify_plan(two_d)
        if world > 1:  # queries never move: every computation runs on its query block's owner
            bs, pl = plan.blocks, plan.placement
            np.testing.assert_array_equal(pl.comp_device, pl.owner[bs.pair_q[bs.comp_pair(np.arange(bs.n_comp))]])


def test_zigzag_layout_balances_one_long_document():
    spec = cp.AttentionSpec(4, 2, 8, mask="causal")
    plan = cp.get_backend("dcp", world_size=4, devices_per_node=2, placement="zigzag").plan([4096], spec)
    assert plan.block_size <= 512  # at least 2N blocks of the longest document
    assert plan.stats().compute_imbalance < 1.01


def test_auto_keeps_the_faster_candidate():
    spec = cp.AttentionSpec(8, 2, 128, mask="causal")
    for seqlens in ([16384], [3000, 200, 90, 5000, 64, 7]):
        backend = cp.get_backend("dcp", world_size=8, devices_per_node=4, placement="auto", cost_model="h100")
        plan = backend.plan(seqlens, spec)
        c = plan.candidates
        names = ("hypergraph", "hypergraph_loose", "hypergraph_ring", "zigzag", "zigzag2d", "zigzag2d_ring")
        assert set(c) == {"chosen", *names}
        assert not any(c[k]["over_memory_limit"] for k in names)  # no memory limit
        total = {k: c[k]["fwd_s"] + c[k]["bwd_s"] for k in names}
        assert c["chosen"] == min(total, key=total.get)
        assert plan.options.schedule == ("ring" if c["chosen"].endswith("_ring") else "stages")
        # the loose candidate is the hypergraph plan at twice the compute tolerance
        assert plan.options.compute_imbalance == (0.2 if c["chosen"] == "hypergraph_loose" else 0.1)
        verify_plan(plan)
        f, b = simulated_seconds(plan, "h100", 2)
        assert f + b == pytest.approx(total[c["chosen"]])
        assert "select" in plan.timings and plan.options.placement == "auto"


def test_auto_prefers_a_plan_within_the_memory_limit():
    spec = cp.AttentionSpec(8, 2, 128, mask="causal")
    backend = cp.get_backend("dcp", world_size=8, devices_per_node=4, placement="auto", cost_model="h100",
                             memory_limit="2x")
    plan = backend.plan([3000, 200, 90, 5000, 64, 7], spec)
    c = plan.candidates
    names = [k for k in c if k != "chosen"]
    within = [k for k in names if not c[k]["over_memory_limit"]]
    assert within and set(within) != set(names)  # some candidates fit twice their own rows, some do not
    total = {k: c[k]["fwd_s"] + c[k]["bwd_s"] for k in within}
    assert c["chosen"] == min(total, key=total.get)


def test_zigzag_and_auto_run_correctly_on_four_ranks():
    rng = np.random.default_rng(11)
    cases = []
    for placement in ("zigzag", "auto"):
        for mask, args in MASKS[:4]:
            cases.append(Case("dcp", random_seqlens(rng, 5, 120, 4), mask=mask, mask_args=args,
                              options={"devices_per_node": 2, "placement": placement, "num_stages": 2},
                              seed=int(rng.integers(1 << 30))))
    check_results(cases, run_ranks(worker, 4, cases))
