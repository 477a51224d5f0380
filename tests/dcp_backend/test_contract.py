"""The backend contract: every bad input raises a clear CPError (single process and on 2 gloo ranks),
ranks that disagree (on the inputs, or on a DCP placement) fail instead of hanging, a crashed peer
surfaces as a CommunicationError within the process-group timeout, and plans are deterministic (in one
process and across spawned processes) and partition the tokens for any lengths and world sizes (planned
without a process group)."""
import importlib.util
import os
import time

import numpy as np
import pytest
import torch

import dcp_backend as cp
from tests.cp_check import random_seqlens
from tests.distributed import run_ranks

SPEC = cp.AttentionSpec(4, 2, 8, mask="causal")


# ------------------------------------------------------------------------------- single process

@pytest.mark.parametrize("call,exc,match", [
    (lambda: cp.get_backend("nope"), cp.CPError, "unknown CP backend 'nope'; available: .*ring"),
    (lambda: cp.get_backend("ring", world_size=2, head_parallel=2), cp.CPError, r"unknown option\(s\) \['head_parallel'\]"),
    (lambda: cp.get_backend("ring", world_size=0), cp.CPError, "world_size must be a positive int"),
    (lambda: cp.get_backend("ring", world_size="2"), cp.CPError, "world_size must be a positive int"),
    (lambda: cp.get_backend("zigzag", world_size=2, kernel="cuda_magic"), cp.CPError, "unknown kernel 'cuda_magic'"),
    (lambda: cp.get_backend("loongtrain", world_size=2, window=0), cp.CPError, "window must be a positive int"),
    (lambda: cp.AttentionSpec(5, 2, 8), cp.CPError, r"num_heads \(5\) must be a multiple of num_kv_heads \(2\)"),
    (lambda: cp.AttentionSpec(0, 1, 8), cp.CPError, "num_heads must be a positive int"),
    (lambda: cp.AttentionSpec(4, 2, 8, softmax_scale=-1.0), cp.CPError, "softmax_scale"),
    (lambda: cp.get_backend("loongtrain", world_size=4, head_parallel=4).plan([8], cp.AttentionSpec(6, 6, 8)),
     cp.CPError, r"num_heads \(6\) must be divisible by the head-parallel degree \(4\)"),
    (lambda: cp.get_backend("loongtrain", world_size=4, head_parallel=3).plan([8], SPEC), cp.CPError,
     "must divide the world size"),
    (lambda: cp.get_backend("ring", world_size=3, devices_per_node=2).plan([8], SPEC), cp.CPError,
     "not a multiple of devices_per_node"),
    (lambda: cp.get_backend("ring", world_size=2).plan([], SPEC), cp.CPError, "seqlens is empty"),
    (lambda: cp.get_backend("ring", world_size=2).plan([3, 0], SPEC), cp.CPError, "document 1 has length 0"),
    (lambda: cp.get_backend("ring", world_size=2).plan([-4], SPEC), cp.CPError, "must be positive"),
    (lambda: cp.get_backend("ring", world_size=2).plan([2.5, 3], SPEC), cp.CPError, "whole numbers"),
    (lambda: cp.get_backend("ring", world_size=2).plan([float("nan")], SPEC), cp.CPError, "whole numbers"),
    (lambda: cp.get_backend("ring", world_size=2).plan([[3, 4]], SPEC), cp.CPError, "one-dimensional"),
    (lambda: cp.get_backend("ring", world_size=2).plan("34", SPEC), cp.CPError, "sequence of positive ints"),
    (lambda: cp.get_backend("ring", world_size=2).plan([True, False], SPEC), cp.CPError, "must be integers"),
    (lambda: cp.get_backend("ring", world_size=2).plan([3], {"num_heads": 4}), cp.CPError, "must be an AttentionSpec"),
    (lambda: cp.get_backend("ring").plan([3], SPEC), cp.CPError, "no process group is initialised; pass world_size"),
    (lambda: cp.get_backend("ring", world_size=2).plan([3], SPEC).local_indices(2), cp.CPError, r"rank must be in \[0, 2\)"),
    (lambda: _attend_without_group(), cp.CPError, "needs an initialised torch.distributed process group"),
])
def test_errors_without_process_group(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _attend_without_group():
    be = cp.get_backend("ring", world_size=1)
    plan = be.plan([3], SPEC)
    q = torch.zeros(3, 4, 8)
    kv = torch.zeros(3, 2, 8)
    be.attention(q, kv, kv, plan)


def test_builtin_backend_with_missing_module(monkeypatch, tmp_path):
    from dcp_backend import registry

    monkeypatch.setitem(registry._BUILTIN, "ghost", "dcp_backend.no_such_package.backend:GhostBackend")
    with pytest.raises(cp.BackendUnavailableError, match="'ghost' is not available in this build"):
        cp.get_backend("ghost", world_size=2)
    # A module that exists but misses one of *its* dependencies is a different error and propagates.
    (tmp_path / "ghost_dep_backend.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._BUILTIN, "ghost2", "ghost_dep_backend:GhostBackend")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cp.get_backend("ghost2", world_size=2)


def test_whole_float_lengths_are_accepted():
    plan = cp.get_backend("ring", world_size=2).plan(np.array([3.0, 4.0]), SPEC)
    assert plan.seqlens.dtype == np.int64 and plan.seqlens.tolist() == [3, 4]


# --------------------------------------------------------------------------- on 2 gloo ranks

def _expect(results, name, fn, exc_type, match):
    try:
        fn()
    except exc_type as e:
        import re

        results[name] = "ok" if re.search(match, str(e)) else f"wrong message: {e}"
        return
    except Exception as e:  # noqa: BLE001
        results[name] = f"wrong exception {type(e).__name__}: {e}"
        return
    results[name] = "no exception"


def _contract_worker(rank, world_size):
    res = {}
    be = cp.get_backend("ring")
    plan = be.plan([5, 3, 1], SPEC)
    n = plan.num_local_tokens(rank)
    q, k = torch.randn(n, 4, 8), torch.randn(n, 2, 8)
    _expect(res, "q tokens", lambda: be.attention(torch.randn(n + 1, 4, 8), k, k, plan), cp.CPError,
            rf"q must be \[{n}, 4, 8\]")
    _expect(res, "k heads", lambda: be.attention(q, torch.randn(n, 4, 8), k, plan), cp.CPError,
            rf"k must be \[{n}, 2, 8\]")
    _expect(res, "2-D q", lambda: be.attention(q.flatten(1), k, k, plan), cp.CPError, r"\[tokens, heads, head_dim\]")
    _expect(res, "int dtype", lambda: be.attention(q.long(), k.long(), k.long(), plan), cp.CPError, "dtype torch.int64")
    _expect(res, "mixed dtype", lambda: be.attention(q, k.double(), k, plan), cp.CPError, "must share a dtype")
    _expect(res, "device", lambda: be.attention(q, k.to("meta"), k, plan), cp.CPError, "must be on one device")
    _expect(res, "not a tensor", lambda: be.attention(q.numpy(), k, k, plan), cp.CPError, "must be a torch.Tensor")
    _expect(res, "world_size option", lambda: cp.get_backend("ring", world_size=3).plan([4], SPEC), cp.CPError,
            "world_size=3 does not match the process group size 2")
    other = cp.get_backend("loongtrain", head_parallel=2).plan([5, 3, 1], SPEC)
    _expect(res, "foreign plan", lambda: be.attention(q, k, k, other), cp.CPError,
            "plan made by 'loongtrain'; pass a plan made by this backend")
    _expect(res, "plan for 3 ranks", lambda: be.attention(q, k, k, _plan_for(3)), cp.CPError,
            "plan was made for 3 ranks but the group has 2")
    # Ranks that disagree on the batch: the fingerprint check fails on every rank, nobody hangs.
    lens = [5, 3, 1] if rank == 0 else [4, 4, 1]
    p2 = be.plan(lens, SPEC)
    m = p2.num_local_tokens(rank)
    _expect(res, "different seqlens", lambda: be.attention(torch.randn(m, 4, 8), torch.randn(m, 2, 8),
                                                           torch.randn(m, 2, 8), p2), cp.CPError, "ranks disagree")
    spec = SPEC if rank == 0 else cp.AttentionSpec(4, 2, 8, mask="full")
    p3 = be.plan([5, 3, 1], spec)
    _expect(res, "different mask", lambda: be.attention(q, k, k, p3), cp.CPError, "ranks disagree")
    # Same inputs, but rank 1's DCP planner placed differently (a nondeterministic placement): the
    # placement is in the fingerprint, so both ranks fail the check at once instead of waiting on
    # transfers that never match.
    res["different dcp placement"] = _dcp_placement_disagrees(rank)
    # The group is still usable afterwards.
    out = be.attention(q, k, k, plan)
    res["after errors"] = "ok" if out.shape == q.shape and torch.isfinite(out).all() else "bad output"
    return {"checks": res, "dcp_plan": _dcp_plan_digest()}


def _dcp_placement_disagrees(rank) -> str:
    from dcp_backend.dcp import planner
    from dcp_backend.dcp.partition import Placement

    be = cp.get_backend("dcp", block_size=16, num_stages=2)
    place = planner.place
    if rank == 1:
        def rotated(*args, **kwargs):  # a valid placement, but not the one rank 0 computed
            pl = place(*args, **kwargs)
            n = pl.num_devices
            return Placement((pl.owner + 1) % n, (pl.comp_device + 1) % n, n, pl.devices_per_node)

        planner.place = rotated
    try:
        plan = be.plan([90, 40, 7], SPEC)
    finally:
        planner.place = place
    n = plan.num_local_tokens(rank)
    q, kv = torch.randn(n, 4, 8), torch.randn(n, 2, 8)
    t0 = time.monotonic()
    res = {}
    _expect(res, "x", lambda: be.attention(q, kv, kv, plan), cp.CPError, "ranks disagree on the dcp plan")
    elapsed = time.monotonic() - t0
    return res["x"] if elapsed < 10 else f"{res['x']} after {elapsed:.0f}s"


def _dcp_plan_digest() -> str:
    """A DCP plan for 8 devices on 2 nodes, made in this process (Mt-KaHyPar at both levels)."""
    import hashlib

    from dcp_backend.batch import PackedBatch
    from dcp_backend.dcp.config import DCPOptions
    from dcp_backend.dcp.planner import make_plan
    from dcp_backend.dcp.serialize import serialize

    plan = make_plan(PackedBatch.from_seqlens(DCP_DET_LENS), cp.AttentionSpec(8, 2, 8, mask="lambda"),
                     cp.Topology(8, 4), DCPOptions(block_size=32), compile_all=True)
    return hashlib.sha256(serialize(plan, with_timings=False)).hexdigest()


DCP_DET_LENS = [300, 33, 1, 150, 260, 64, 90]


def _plan_for(world_size):
    """A ring plan for another world size (plan() itself refuses one under a 2-rank group)."""
    return cp.get_planner("ring").plan([5, 3, 1], SPEC, cp.Topology(world_size))


def test_input_errors_on_two_ranks():
    per_rank = run_ranks(_contract_worker, 2, pg_timeout=30)
    for rank, out in enumerate(per_rank):
        res = out["checks"]
        bad = {k: v for k, v in res.items() if v != "ok"}
        assert not bad, f"rank {rank}: {bad}"
        assert len(res) == 14
    # Determinism across processes: both spawned ranks and this process make the same DCP plan, byte for
    # byte (placement, schedules, programs).
    assert per_rank[0]["dcp_plan"] == per_rank[1]["dcp_plan"] == _dcp_plan_digest()


def _crash_worker(rank, world_size, when):
    be = cp.get_backend("zigzag")
    plan = be.plan([9, 4], SPEC)
    n = plan.num_local_tokens(rank)
    q, k = torch.randn(n, 4, 8, requires_grad=True), torch.randn(n, 2, 8)
    if when == "after_first":
        be.attention(q, k, k, plan).sum().backward()  # plan verified; the next call goes straight to the ring
    if rank == 1:
        if when == "before":
            raise RuntimeError("rank 1 fails before attention")
        os._exit(3)
    t0 = time.monotonic()
    try:
        be.attention(q, k, k, plan)
        if when == "after_first":
            be.attention(q, k, k, plan)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


@pytest.mark.parametrize("when", ["before", "after_first"])
def test_crashed_rank_fails_the_others(when):
    pg_timeout = 8.0
    t0 = time.monotonic()
    out = run_ranks(_crash_worker, 2, when, pg_timeout=pg_timeout, timeout=90, allow_failures=True)
    status, value = out[0]
    assert status == "ok", value
    name, msg, elapsed = value
    assert name == "CommunicationError", (name, msg)
    assert "rank 0" in msg and "failed" in msg
    assert elapsed < pg_timeout + 15
    assert out[1][0] == "error"
    assert time.monotonic() - t0 < 80


# ------------------------------------------------------------------- determinism and partition

PLANNERS = [
    ("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 1}), ("loongtrain", {"head_parallel": 2}),
    ("loongtrain", {"head_parallel": 2, "window": 1}), ("te", {}), ("te", {"cp_comm_type": "a2a+p2p"}),
    ("dcp", {"block_size": 16}),  # every other trial (planning is the slow part); 2 nodes: the spawned check
]
TIMINGS = ("planning_seconds", "rank_planning_seconds", "planning_seconds_by_phase")


class _planner:
    """Every backend, te included, plans through the planner layer: no process group, no TE."""

    def __init__(self, name, world_size, options):
        self.planner = cp.get_planner(name, **options)
        self.topology = cp.Topology(world_size)

    def plan(self, seqlens, spec):
        return self.planner.plan(seqlens, spec, self.topology)


def test_plans_are_deterministic_and_partition_tokens():
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(60):
        n = int(rng.choice([1, 2, 3, 4, 6, 8]))
        lens = random_seqlens(rng, int(rng.integers(1, 7)), int(rng.choice([3, 20, 200])), n)
        for name, opts in PLANNERS:
            if opts.get("head_parallel", 1) > 1 and n % 2:
                continue
            if opts.get("window") and (n // opts["head_parallel"]) % opts["window"]:
                continue
            if name == "dcp" and trial % 2:
                continue
            a = _planner(name, n, opts).plan(lens, SPEC)
            b = _planner(name, n, opts).plan(list(lens), SPEC)
            assert a.fingerprint == b.fingerprint  # dcp: includes the placement
            parts = [a.local_indices(r) for r in range(n)]
            for r in range(n):
                assert parts[r].dtype == torch.int64 and parts[r].dim() == 1
                assert torch.equal(parts[r], b.local_indices(r)), (name, opts, lens, n, r)
            assert torch.equal(torch.cat(parts).sort().values, torch.arange(sum(lens))), (name, opts, lens, n)
            sa, sb = ({k: v for k, v in x.stats().as_dict().items() if k not in TIMINGS} for x in (a, b))
            assert sa == sb
            checked += 1
    assert checked > 330
    # Different inputs or options give different fingerprints.
    p = cp.get_backend("zigzag", world_size=2).plan([4, 5], SPEC)
    assert p.fingerprint != cp.get_backend("zigzag", world_size=2).plan([5, 4], SPEC).fingerprint
    assert p.fingerprint != cp.get_backend("zigzag", world_size=2, devices_per_node=1).plan([4, 5], SPEC).fingerprint
    assert p.fingerprint != cp.get_backend("ring", world_size=2).plan([4, 5], SPEC).fingerprint
    # A DCP plan's fingerprint covers its placement, not only its inputs.
    from dcp_backend.dcp.partition import Placement

    d = cp.get_backend("dcp", world_size=2, block_size=16).plan([40, 30], SPEC)
    pl = d.placement
    d2 = cp.get_backend("dcp", world_size=2, block_size=16).plan([40, 30], SPEC)
    assert d2.fingerprint == d.fingerprint
    d2.placement = Placement(1 - pl.owner, pl.comp_device, 2, pl.devices_per_node)
    d2.__dict__.pop("fingerprint", None)
    assert d2.fingerprint != d.fingerprint


def test_every_backend_plans_without_a_group_or_its_runtime():
    import torch.distributed as dist

    assert not dist.is_initialized()
    topo = cp.Topology(4, devices_per_node=2)
    for name in cp.available_backends():
        plan = cp.get_planner(name).plan([40, 3, 17], SPEC, topo)
        assert plan.backend_name == name and plan.topology == topo
        assert np.array_equal(np.sort(np.concatenate([plan.local_indices(r).numpy() for r in range(4)])),
                              np.arange(60))
        assert plan.stats().devices_per_node == 2
    if importlib.util.find_spec("transformer_engine") is None:  # running te needs TE; planning did not
        with pytest.raises(cp.BackendUnavailableError, match="Transformer Engine is not installed.*get_planner"):
            cp.get_backend("te", world_size=4)


def test_options_validate_themselves_and_cannot_be_changed_in_place():
    import dataclasses

    for name in cp.available_backends():
        opts = cp.make_options(name)
        assert all(f.metadata.get("help") for f in dataclasses.fields(opts)), f"{name}: an option without help"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(opts, dataclasses.fields(opts)[0].name, None)
    from dcp_backend.dcp.config import DCPOptions

    with pytest.raises(cp.CPError, match="num_stages must be a positive int"):
        DCPOptions(num_stages=0)  # direct construction validates
    with pytest.raises(cp.CPError, match="num_stages must be a positive int"):
        dataclasses.replace(DCPOptions(), num_stages=-1)  # and so does replace
    with pytest.raises(cp.CPError, match="window must be a positive int"):
        dataclasses.replace(cp.make_options("loongtrain"), window=0)
    with pytest.raises(cp.CPError, match="unknown option.*topology"):
        cp.make_options("dcp", devices_per_node=8)  # the topology is not an option
