"""DCP planning properties without running anything: the seeded placement never crosses the network more
than the structured placements repaired under the same limits (and its predicted inter-node bytes are
exactly the compiled plan's); the within-node partitioner context is Mt-KaHyPar's deterministic preset but
for its initial runs; hierarchical routing crosses each input once per node and reduces partials
inside a node; the memory estimate equals the compiled stores and transfer buffers; an explicit memory limit
is met or refused."""
import numpy as np
import pytest

import dcp_backend as cp
from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.candidates import structured_placements
from dcp_backend.dcp.compile import own_memory_bytes, pass_buffer_bytes, pass_memory_bytes
from dcp_backend.dcp.config import DCPOptions
from dcp_backend.dcp.partition import Placement, build_hypergraph, mtkahypar_context, placement_costs, rebalance
from dcp_backend.dcp.plan import pair_cost, partial_wire, plan_from_placement
from dcp_backend.dcp.planner import make_plan
from dcp_backend.dcp.stats import program_buffer_bytes, program_memory_bytes
from dcp_backend.dcp.verify import verify_plan
from tests.cp_check import random_seqlens

SPEC = cp.AttentionSpec(4, 2, 8, mask="causal")


def _inter(plan) -> int:
    st = plan.stats()
    return st.fwd_inter_node_bytes + st.bwd_inter_node_bytes


@pytest.mark.parametrize("nodes,dpn", [(2, 2), (4, 2), (2, 4)])
def test_seeded_placement_never_crosses_more_than_a_structured_one(nodes, dpn):
    rng = np.random.default_rng(nodes * 10 + dpn)
    topo = cp.Topology(nodes * dpn, dpn)
    for trial in range(4):
        # a few long documents (longer than a node's share) and some short ones
        seqlens = random_seqlens(rng, int(rng.integers(1, 4)), 900, 1) + random_seqlens(rng, 5, 120, 1)
        partial = ("fp32", "model")[trial % 2]
        opts = DCPOptions(block_size=32, num_stages=2, partial_dtype=partial)
        batch = PackedBatch.from_seqlens(seqlens)
        plan = make_plan(batch, SPEC, topo, opts)
        verify_plan(plan)
        bs, pl = plan.blocks, plan.placement
        cost = pair_cost(bs)
        hg = build_hypergraph(bs, 2, partial)
        mem = bs.tb_tokens.astype(np.float64)
        # the predicted bytes across nodes are exactly those of the compiled programs
        assert pl.candidates["chosen"] == pl.source
        assert _inter(plan) == pytest.approx(placement_costs(hg, pl.comp_device, pl.owner, cost, mem, topo.world_size,
                                                              dpn)["inter"])
        limits = (1 + opts.compute_imbalance + 1e-9, 1 + opts.memory_imbalance + 1e-9)
        mine = plan.stats()
        within = mine.compute_imbalance <= limits[0] and mine.memory_imbalance <= limits[1]
        for name, seed in structured_placements(bs, cost, SPEC, topo, opts).items():
            c, o = rebalance(hg, seed.comp_device.copy(), seed.owner.copy(), cost, mem, topo.world_size, dpn,
                             opts.compute_imbalance, opts.memory_imbalance)
            other = plan_from_placement(batch, SPEC, topo, opts, bs, cost, Placement(o, c, topo.world_size, dpn), {})
            st = other.stats()
            if st.compute_imbalance <= limits[0] and st.memory_imbalance <= limits[1]:
                assert within, (seqlens, name)
                assert _inter(plan) <= _inter(other), (seqlens, name, _inter(plan), _inter(other))


def _printed_configuration(ctx, capfd) -> list[str]:
    """The lines Mt-KaHyPar prints for a context (from C++, hence capfd), with k and epsilon set as a call does."""
    import mtkahypar

    ctx.set_partitioning_parameters(8, 0.1, mtkahypar.Objective.KM1)
    capfd.readouterr()
    ctx.print_configuration()
    return capfd.readouterr().out.splitlines()


def test_within_node_context_is_the_deterministic_preset_but_for_its_initial_runs(capfd):
    """The shipped .ini reproduces Mt-KaHyPar's deterministic preset (as the library prints it) except the
    number of initial-partitioning runs; k and epsilon are set per call on both."""
    preset, ours = (_printed_configuration(mtkahypar_context(within_node), capfd) for within_node in (False, True))
    assert len(preset) == len(ours) > 40 and any("deterministic" in line for line in ours)
    differ = [(a.split(), b.split()) for a, b in zip(preset, ours) if a != b]
    assert differ == [(["Number", "of", "Runs:", "20"], ["Number", "of", "Runs:", "5"])]


def test_an_unreadable_within_node_context_falls_back_to_the_preset(tmp_path, monkeypatch, capfd):
    """Another Mt-KaHyPar's option names: a warning naming the file, then the deterministic preset."""
    from dcp_backend.dcp import partition

    bad = tmp_path / "other_version.ini"
    bad.write_text("preset-type=deterministic\nan-option-this-version-lacks=3\n")
    monkeypatch.setattr(partition, "WITHIN_NODE_CONTEXT", str(bad))
    with pytest.warns(UserWarning, match="other_version.ini"):
        ctx = mtkahypar_context(within_node=True)
    assert ["Number", "of", "Runs:", "20"] in [line.split() for line in _printed_configuration(ctx, capfd)]


def test_one_long_document_crosses_no_more_than_its_zigzag_placement():
    """The issue's case: one causal document much longer than a node's share."""
    topo = cp.Topology(8, 4)
    plan = make_plan(PackedBatch.from_seqlens([4096]), SPEC, topo, DCPOptions(block_size=128, num_stages=2))
    zig = make_plan(PackedBatch.from_seqlens([4096]), SPEC, topo, DCPOptions(block_size=128, num_stages=2),
                    strategy="zigzag")
    assert zig.block_size == 128
    assert plan.stats().fwd_inter_node_bytes + plan.stats().bwd_inter_node_bytes <= _inter(zig)


def test_hierarchical_routing_crosses_once_per_node_and_reduces_inside_nodes():
    topo = cp.Topology(8, 2)
    batch = PackedBatch.from_seqlens([1, 300, 17, 640, 2])
    for seeds in ("none", "structured"):
        opts = {c: DCPOptions(block_size=16, num_stages=4, communication=c, placement_seeds=seeds)
                for c in ("direct", "hierarchical")}
        direct, hier = (make_plan(batch, SPEC, topo, opts[c]) for c in ("direct", "hierarchical"))
        verify_plan(hier)
        assert np.array_equal(direct.placement.owner, hier.placement.owner)
        for sched in (hier.fwd, hier.bwd):
            i = sched.inputs
            inter = i.src // 2 != i.dst // 2
            keys = np.stack([i.kind[inter], i.block[inter], i.dst[inter] // 2], 1)
            assert np.unique(keys, axis=0).shape[0] == inter.sum()  # one crossing per (input, node)
            o = sched.outputs
            inter = o.src // 2 != o.dst // 2
            keys = np.stack([o.kind[inter], o.block[inter], o.src[inter] // 2], 1)
            assert np.unique(keys, axis=0).shape[0] == inter.sum()  # one partial per (block, node)
        d, h = direct.stats(), hier.stats()
        assert h.bwd_inter_node_bytes < d.bwd_inter_node_bytes
        assert h.fwd_inter_node_bytes <= d.fwd_inter_node_bytes
        # spreading: the busiest sender across nodes sends no more than with every block sent by its owner
        assert max(h.extra["fwd_inter_node_bytes_per_rank"]) <= max(d.extra["fwd_inter_node_bytes_per_rank"])


def test_memory_estimate_equals_the_compiled_stores_and_buffers():
    rng = np.random.default_rng(5)
    for trial in range(8):
        world, dpn = [(4, 2), (8, 4), (8, 2), (3, 3)][trial % 4]
        opts = dict(block_size=int(rng.choice([16, 32])), num_stages=int(rng.choice([1, 3])),
                    partial_dtype=str(rng.choice(["fp32", "model"])),
                    communication=str(rng.choice(["direct", "hierarchical"])))
        # the ring, and slot budgets with blocks received again (several receipts of a block on a device)
        opts.update([{}, {"schedule": "ring"}, {"memory_limit": "1.5x", "refetch": True}][trial % 3])
        plan = cp.get_backend("dcp", world_size=world, devices_per_node=dpn, **opts).plan(
            random_seqlens(rng, 6, 400, world), SPEC)
        for backward, sched, progs in ((False, plan.fwd, plan.fwd_programs), (True, plan.bwd, plan.bwd_programs)):
            for esize in (2, 4):
                est = pass_memory_bytes(plan.blocks, plan.placement, sched, backward, esize,
                                        partial_wire(plan.options))
                assert np.array_equal(est, [program_memory_bytes(p, SPEC.head_dim, esize) for p in progs])
                buf = pass_buffer_bytes(plan.blocks, plan.placement, sched, backward, esize,
                                        plan.options.partial_dtype)
                assert np.array_equal(buf, [program_buffer_bytes(p, SPEC.head_dim, esize) for p in progs])
                # inputs travel in place; only partials converted to the model dtype use buffers
                assert (buf.max() > 0) == (plan.options.partial_dtype == "model" and len(sched.outputs) > 0)


@pytest.mark.parametrize("seqlens", [[3000], [1500, 900, 700, 300]])
def test_memory_limit_is_met_or_refused(seqlens):
    spec = cp.AttentionSpec(4, 2, 16, mask="causal")
    opts = dict(world_size=8, devices_per_node=4, block_size=64, num_stages=2)
    plan = cp.get_backend("dcp", **opts).plan(seqlens, spec)
    free = max(plan.stats().memory_bytes)
    own = max(own_memory_bytes(plan.blocks, plan.placement, True))
    limit = (own + 0.6 * (free - own)) / 1e6  # well below what the unlimited plan needs
    limited = cp.get_backend("dcp", memory_limit=limit, **opts).plan(seqlens, spec)
    verify_plan(limited)
    assert max(limited.stats().memory_bytes) <= limit * 1e6
    assert limited.bwd.num_stages > plan.bwd.num_stages  # met by streaming over more stages
    with pytest.raises(cp.CPError, match="memory_limit=.* cannot be met"):
        cp.get_backend("dcp", memory_limit=own / 1e6, **opts).plan(seqlens, spec)
    with pytest.raises(cp.CPError, match="memory_limit must be"):
        cp.get_backend("dcp", memory_limit=-3, **opts)
