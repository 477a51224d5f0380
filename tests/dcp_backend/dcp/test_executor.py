"""The dcp backend end to end on gloo ranks: out, dq, dk, dv against the float64 reference for many
masks, topologies, block and head-block sizes, stage counts; bytes counted by the executor equal the
plan's statistics; a batch that fits on its devices moves nothing; a dead rank ends the others."""
import os

import numpy as np
import pytest
import torch

import dcp_backend as cp
from dcp_backend import CommunicationError
from tests.cp_check import Case, check_results, random_seqlens, worker
from tests.dcp_backend.baselines.test_ring_family import MASKS
from tests.distributed import run_ranks


def _dcp_cases(world, dpn, seed, n_cases=None):
    rng = np.random.default_rng(seed)
    cases = []
    for mask, args in MASKS:
        for heads, hbs in (((4, 2), None), ((4, 4), 1), ((4, 2), 1), ((8, 4), 2)):
            seqlens = random_seqlens(rng, int(rng.integers(2, 8)), 90, world)
            cases.append(Case("dcp", seqlens, num_heads=heads[0], num_kv_heads=heads[1], mask=mask, mask_args=args,
                              options={"devices_per_node": dpn, "block_size": int(rng.choice([16, 32, 64])),
                                       "head_block_size": hbs, "num_stages": int(rng.choice([1, 4]))},
                              seed=int(rng.integers(1 << 30))))
    if n_cases:
        cases = [cases[i] for i in rng.choice(len(cases), n_cases, replace=False)]
    return cases


@pytest.mark.parametrize("world,dpn", [(2, 2), (3, 3), (4, 2)])
def test_dcp_matches_reference(world, dpn):
    cases = _dcp_cases(world, dpn, seed=world)
    check_results(cases, run_ranks(worker, world, cases))


def test_dcp_eight_ranks_four_nodes():
    cases = _dcp_cases(8, 2, seed=8, n_cases=6)
    cases.append(Case("dcp", [1, 300, 17, 64, 2], mask="causal", options={"devices_per_node": 2, "block_size": 16,
                                                                          "num_stages": 4}, seed=3))
    check_results(cases, run_ranks(worker, 8, cases))


def test_dcp_bf16_and_one_device():
    cases = [Case("dcp", [70, 3, 41], dtype="bf16", mask="lambda", mask_args={"sink": 2, "window": 16},
                  options={"block_size": 16}, seed=1)]
    check_results(cases, run_ranks(worker, 2, cases))
    single = [Case("dcp", [33, 1, 90], mask=m, mask_args=a, options={"block_size": 16}, seed=i)
              for i, (m, a) in enumerate(MASKS)]
    check_results(single, run_ranks(worker, 1, single))


def _count_worker(rank, world, seqlens, options):
    spec = cp.AttentionSpec(4, 2, 8, mask="causal")
    backend = cp.get_backend("dcp", **options)
    plan = backend.plan(seqlens, spec)
    n = plan.num_local_tokens(rank)
    q = torch.randn(n, 4, 8, requires_grad=True)
    k = torch.randn(n, 2, 8, requires_grad=True)
    v = torch.randn(n, 2, 8, requires_grad=True)
    backend.counters.reset()
    out = backend.attention(q, k, v, plan)
    fwd = dict(backend.counters.sent_bytes)
    out.sum().backward()
    total = dict(backend.counters.sent_bytes)
    st = plan.stats(element_size=4)
    return {"fwd": sum(fwd.values()), "total": sum(total.values()),
            "split": backend.counters.split(rank, options["devices_per_node"]),
            "plan_fwd": st.extra["fwd_bytes_per_rank"][rank], "plan_bwd": st.extra["bwd_bytes_per_rank"][rank],
            "plan_fwd_inter": st.extra["fwd_inter_node_bytes_per_rank"][rank],
            "plan_bwd_inter": st.extra["bwd_inter_node_bytes_per_rank"][rank]}


def test_counted_bytes_equal_plan_statistics():
    opts = {"devices_per_node": 2, "block_size": 16, "num_stages": 3}
    res = run_ranks(_count_worker, 4, [5, 200, 64, 90, 1, 33], opts)
    assert sum(r["total"] for r in res) > 0
    for r in res:
        assert r["fwd"] == r["plan_fwd"]
        assert r["total"] == r["plan_fwd"] + r["plan_bwd"]
        assert r["split"][1] == r["plan_fwd_inter"] + r["plan_bwd_inter"]


def test_batch_that_fits_moves_nothing():
    opts = {"devices_per_node": 2, "block_size": 64, "num_stages": 2}
    seqlens = [40, 40, 40, 40]  # one short document per device
    st = cp.get_backend("dcp", world_size=4, **opts).plan(seqlens, cp.AttentionSpec(4, 2, 8)).stats()
    assert st.fwd_inter_node_bytes == st.fwd_intra_node_bytes == st.bwd_inter_node_bytes == 0
    res = run_ranks(_count_worker, 4, seqlens, opts)
    assert all(r["total"] == 0 for r in res)


def _dying_worker(rank, world):
    spec = cp.AttentionSpec(4, 2, 8)
    backend = cp.get_backend("dcp", block_size=16)
    plan = backend.plan([600], spec)
    n = plan.num_local_tokens(rank)
    q, k, v = torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    backend.attention(q, k, v, plan)  # fingerprint check and one pass together
    if rank == 1:
        os._exit(3)  # dies without a word
    try:
        for _ in range(3):
            backend.attention(q, k, v, plan)
    except CommunicationError as exc:
        return f"CommunicationError: {exc}"
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    return "no error"


def test_dead_rank_ends_the_others_with_an_error():
    out = run_ranks(_dying_worker, 3, allow_failures=True, timeout=90, pg_timeout=15)
    assert out[1][0] == "error"
    for r in (0, 2):
        status, value = out[r]
        assert status == "ok" and value.startswith("CommunicationError"), out[r]


def _layers_worker(rank, world, backend_name, options, seqlens):
    """Two attention layers sharing one plan (as a model does): out = attn(attn(x) * w) ."""
    from dcp_backend.dense_reference import dense_attention

    spec = cp.AttentionSpec(4, 2, 8, mask="lambda", mask_args={"sink": 2, "window": 24})
    g = torch.Generator().manual_seed(0)
    t = sum(seqlens)
    x = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    kv = torch.randn(t, 2, 8, generator=g, dtype=torch.float64)

    def model(attend, x, kv):
        h = attend(x, kv[:, :, :], kv)
        return attend(h * 0.5 + x, kv * 2.0, kv)

    xr, kvr = x.clone().requires_grad_(True), kv.clone().requires_grad_(True)
    ref = model(lambda a, b, c: dense_attention(a, b, c, seqlens, spec), xr, kvr)
    ref.square().sum().backward()
    backend = cp.get_backend(backend_name, **options)
    plan = backend.plan(seqlens, spec)
    idx = plan.local_indices(rank)
    xl, kvl = x[idx].float().requires_grad_(True), kv[idx].float().requires_grad_(True)
    out = model(lambda a, b, c: backend.attention(a, b, c, plan), xl, kvl)
    out.square().sum().backward()
    # every rank's loss contribution is its own tokens' sum, so local grads are partial; reduce them
    gx = torch.zeros(t, 4, 8, dtype=torch.float64)
    gkv = torch.zeros(t, 2, 8, dtype=torch.float64)
    gx[idx] = xl.grad.double()
    gkv[idx] = kvl.grad.double()
    return {"out": (out.double() - ref[idx]).abs().max().item(), "idx": idx, "gx": gx, "gkv": gkv,
            "ref_gx": xr.grad, "ref_gkv": kvr.grad}


def test_plan_reused_by_several_layers():
    res = run_ranks(_layers_worker, 2, "dcp", {"block_size": 16, "num_stages": 2}, [70, 3, 41, 1])
    assert max(r["out"] for r in res) < 1e-4
    gx = sum(r["gx"] for r in res)
    gkv = sum(r["gkv"] for r in res)
    assert (gx - res[0]["ref_gx"]).abs().max() < 1e-3 * max(1.0, res[0]["ref_gx"].abs().max().item())
    assert (gkv - res[0]["ref_gkv"]).abs().max() < 1e-3 * max(1.0, res[0]["ref_gkv"].abs().max().item())
