"""``schedule="ring"``: plans verify on every mask, topology and placement; blocks cross into a node once per
head slot and their dK/dV partials travel along their chain to the owner; gloo runs match the float64
reference forward and backward; memory limits are met or refused by name."""
import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend import CPError
from dcp_backend.dcp.candidates import head_parallel_degree, zigzag_placement
from dcp_backend.dcp.schedule import KIND_KV
from dcp_backend.dcp.verify import verify_plan
from tests.cp_check import Case, check_results, random_seqlens, worker
from tests.dcp_backend.baselines.test_ring_family import MASKS
from tests.distributed import run_ranks


def _plan(seqlens, world, dpn, mask="causal", args=None, heads=(4, 2), **opts):
    spec = cp.AttentionSpec(heads[0], heads[1], 8, mask=mask, mask_args=args or {})
    return cp.get_backend("dcp", world_size=world, devices_per_node=dpn, schedule="ring", **opts).plan(seqlens, spec)


def _ring_group(plan) -> int:
    if plan.placement.source != "zigzag2d":
        return 1
    return head_parallel_degree(plan.spec, plan.options, plan.topology)


def _check_ring_shape(plan):
    """What the ring promises, counted from the schedules alone."""
    pl, h = plan.placement, plan.blocks.heads
    dpn, group = pl.devices_per_node, _ring_group(plan)
    positions = pl.num_devices // group
    for backward, sched in ((False, plan.fwd), (True, plan.bwd)):
        assert sched.num_stages <= positions  # one stage per ring position (stage 0: own blocks)
        tr = sched.inputs
        kv = tr.kind == KIND_KV
        owner = pl.owner[tr.block[kv] // h.n_kv_blocks]
        assert np.all(tr.src[kv] != tr.dst[kv]) and np.all(tr.dst[kv] != owner)
        # every key/value block enters a node at most once per head slot
        cross = kv & (tr.src // dpn != tr.dst // dpn)
        keys = np.stack([tr.block[cross], tr.dst[cross] // dpn, tr.dst[cross] % group], axis=1)
        assert len(np.unique(keys, axis=0)) == len(keys)
        # a device receives a block once per pass
        got = np.stack([tr.kind, tr.block, tr.dst], axis=1)
        assert len(np.unique(got, axis=0)) == len(got)
        out = sched.outputs
        okv = out.kind == KIND_KV
        if not backward:
            assert not okv.any()
            continue
        # dK/dV: every receipt of a block sends one partial, to a later reader of it or (the last) to its owner;
        # exactly one partial per (block, head slot) chain reaches the owner
        assert okv.sum() == kv.sum()
        o_owner = pl.owner[out.block[okv] // h.n_kv_blocks]
        to_owner = out.dst[okv] == o_owner
        recv = {(int(b), int(d)): int(s) for b, d, s in zip(tr.block[kv], tr.dst[kv], tr.stage[kv])}
        for b, d, s in zip(out.block[okv][~to_owner], out.dst[okv][~to_owner], out.stage[okv][~to_owner]):
            assert (int(b), int(d)) in recv and recv[(int(b), int(d))] <= s + 2
        chains = {(int(b), int(d) % group) for b, d in zip(tr.block[kv], tr.dst[kv])}
        assert to_owner.sum() == len(chains)


@pytest.mark.parametrize("nodes,dpn", [(1, 4), (2, 2), (4, 2), (2, 4)])
def test_ring_plans_verify_and_keep_their_shape(nodes, dpn):
    rng = np.random.default_rng(nodes * 10 + dpn)
    world = nodes * dpn
    for mask, args in MASKS:
        for heads, hbs in (((4, 2), None), ((8, 2), 1)):
            for placement in ("hypergraph", "zigzag", "zigzag2d"):
                seqlens = random_seqlens(rng, int(rng.integers(1, 7)), 150, world) + [int(rng.integers(100, 300))]
                plan = _plan(seqlens, world, dpn, mask, args, heads, block_size=int(rng.choice([8, 16])),
                             head_block_size=hbs, placement=placement,
                             partial_dtype=str(rng.choice(["fp32", "model"])))
                verify_plan(plan)
                _check_ring_shape(plan)


def test_ring_groups_are_the_2d_placements_head_groups():
    plan = _plan([700, 90, 5], 8, 4, heads=(8, 2), head_block_size=1, block_size=16, placement="zigzag2d")
    group = _ring_group(plan)
    assert group == 4
    # queries move only inside their head group; keys and values cross groups
    tr = plan.bwd.inputs
    assert np.all(tr.src[tr.kind == 0] // group == tr.dst[tr.kind == 0] // group)
    assert plan.bwd.num_stages == 8 // group


def test_ring_2d_placement_repairs_owners_only():
    spec = cp.AttentionSpec(8, 2, 8, mask="causal")
    seqlens = [2000, 300, 90, 17, 5, 600, 64]  # whole blocks leave some devices a block above the mean
    opts = {"world_size": 8, "devices_per_node": 4, "head_block_size": 1, "block_size": 64, "placement": "zigzag2d"}
    staged = cp.get_backend("dcp", **opts).plan(seqlens, spec)
    ring = cp.get_backend("dcp", schedule="ring", **opts).plan(seqlens, spec)
    dealt = zigzag_placement(ring.blocks, 8, 4, 4)
    np.testing.assert_array_equal(staged.placement.owner, dealt.owner)  # the staged plan keeps the deal
    np.testing.assert_array_equal(ring.placement.comp_device, dealt.comp_device)  # computations stay put
    tokens = lambda pl: np.bincount(pl.owner, weights=ring.blocks.tb_tokens, minlength=8)  # noqa: E731
    assert tokens(dealt).max() / tokens(dealt).mean() > 1 + ring.options.memory_imbalance
    assert tokens(ring.placement).max() / tokens(ring.placement).mean() <= 1 + ring.options.memory_imbalance
    verify_plan(ring)


def test_ring_matches_reference():
    cases = [Case("dcp", [300, 17, 1, 90], mask="causal", seed=1,
                  options={"devices_per_node": 2, "block_size": 16, "schedule": "ring", "partial_dtype": "fp32"}),
             Case("dcp", [200, 64, 3], num_heads=8, num_kv_heads=2, mask="lambda", mask_args={"sink": 3, "window": 9},
                  seed=2, options={"devices_per_node": 2, "block_size": 16, "head_block_size": 1,
                                   "placement": "zigzag2d", "schedule": "ring", "partial_dtype": "model"}),
             Case("dcp", [150, 40, 2], mask="shared_question", seed=3,
                  mask_args={"question_fraction": 0.25, "num_answers": 3},
                  options={"devices_per_node": 2, "block_size": 8, "placement": "zigzag", "schedule": "ring"}),
             Case("dcp", [260, 33], mask="causal", dtype="bf16", seed=4,
                  options={"devices_per_node": 2, "block_size": 16, "schedule": "ring", "memory_limit": "auto"})]
    # the runs exercise result slots of their own: a received block's dK/dV rows are held for fewer stages than
    # its K/V rows (prefetched a stage early; with partials sent in the model dtype, which frees them at the send),
    # so some device has fewer dk rows than k rows
    for case in cases[1:]:
        plan = cp.get_backend("dcp", world_size=4, **case.options).plan(case.seqlens, case.spec())
        assert any(p.stores["dk"].rows < p.stores["k"].rows for p in plan.bwd_programs)
    check_results(cases, run_ranks(worker, 4, cases))


def test_ring_memory_limit_is_met_or_refused():
    seqlens, spec = [900, 40], cp.AttentionSpec(4, 2, 8, mask="causal")
    opts = {"world_size": 8, "devices_per_node": 2, "block_size": 16, "schedule": "ring"}
    free = cp.get_backend("dcp", **opts).plan(seqlens, spec)
    need = max(free.stats().memory_bytes) / 1e6
    with pytest.raises(CPError, match=r"memory_limit=.* cannot be met with schedule=ring: device \d+ needs"):
        cp.get_backend("dcp", memory_limit=need * 0.5, **opts).plan(seqlens, spec)
    assert max(cp.get_backend("dcp", memory_limit=need * 1.001, **opts).plan(seqlens, spec).stats().memory_bytes) \
        <= need * 1.001e6
    best_effort = cp.get_backend("dcp", memory_limit="1.1x", **opts).plan(seqlens, spec)
    assert max(best_effort.stats().memory_bytes) / 1e6 <= need
    with pytest.raises(CPError, match="schedule must be one of"):
        cp.get_backend("dcp", world_size=2, schedule="spiral")
