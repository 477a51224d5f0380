"""The dcp backend end to end on gloo ranks: out, dq, dk, dv against the float64 reference for many
masks, topologies, block and head-block sizes, stage counts and an explicit softmax scale; bytes counted
by the executor equal the plan's statistics in fp32 and bf16, and a tiny plan's bytes computed by hand;
a batch that fits on its devices moves nothing; a dead rank ends the others."""
import os

import numpy as np
import pytest
import torch

import dcp_backend as cp
from dcp_backend import CommunicationError
from dcp_backend.dcp.compile import own_memory_bytes
from dcp_backend.dcp.schedule import repeated_receipts
from tests.cp_check import Case, case_errors, check_results, random_seqlens, rel_err, rms_err, worker
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
                                       "head_block_size": hbs, "num_stages": int(rng.choice([1, 4])),
                                       "communication": str(rng.choice(["hierarchical", "direct"])),
                                       "partial_dtype": str(rng.choice(["fp32", "model"]))},
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
    # long documents over 4 nodes: relays, gateways and in-node reducers, each communication and partial dtype,
    # fp32 and bf16 (the bf16 cases check that partials sent in bf16 stay within the bf16 tolerance)
    for comm in ("hierarchical", "direct"):
        for partial in ("fp32", "model"):
            for dtype in ("fp32", "bf16"):
                cases.append(Case("dcp", [1, 300, 17, 64, 2], mask="causal", dtype=dtype,
                                  options={"devices_per_node": 2, "block_size": 16, "num_stages": 4,
                                           "communication": comm, "partial_dtype": partial}, seed=3))
    # a memory limit well below what the unlimited plan needs: more stages, partials spread over more keys
    opts = {"devices_per_node": 2, "block_size": 16, "num_stages": 2}
    free = cp.get_backend("dcp", world_size=8, **opts).plan([900], cp.AttentionSpec(4, 2, 8))
    own = max(own_memory_bytes(free.blocks, free.placement, True))
    limit = (own + 0.75 * (max(free.stats().memory_bytes) - own)) / 1e6
    limited = cp.get_backend("dcp", world_size=8, memory_limit=limit, **opts).plan([900], cp.AttentionSpec(4, 2, 8))
    assert limited.bwd.num_stages > free.bwd.num_stages
    cases.append(Case("dcp", [900], options={**opts, "memory_limit": limit}, seed=4))
    # a best-effort limit of twice a device's own rows over 4 nodes: slot budgets, blocks fetched in the order
    # that finishes one before the next, partials sent to the owner where an in-node reducer would hold long
    cases.append(Case("dcp", [1, 300, 17, 64, 2, 700], mask="causal", seed=6,
                      options={**opts, "memory_limit": "2x"}))
    # 1.5x: blocks received again for every group of the held side (a partial result per receipt)
    again = Case("dcp", [1, 300, 17, 64, 2, 700], mask="causal", seed=7, options={**opts, "memory_limit": "1.5x"})
    assert repeated_receipts(cp.get_backend("dcp", world_size=8, **again.options).plan(
        again.seqlens, again.spec()).bwd.inputs).any()
    cases.append(again)
    # bf16 partials against fp32 partials on a long document (many partials per block, reduced in nodes)
    pair = [Case("dcp", [1500, 200], mask="causal", dtype="bf16", seed=5,
                 options={"devices_per_node": 2, "block_size": 32, "num_stages": 3, "partial_dtype": p,
                          "placement_seeds": "none"}) for p in ("fp32", "model")]
    cases += pair
    per_rank = run_ranks(worker, 8, cases)
    check_results(cases, per_rank)
    for metric in (rel_err, rms_err):
        errs = [case_errors(c, per_rank, len(cases) - 2 + i, metric=metric) for i, c in enumerate(pair)]
        print(f"bf16 run, {metric.__name__} with fp32 / bf16 partials:", errs)
        for key in errs[0]:  # bf16 partials cost at most a few bf16 roundings more than fp32 partials
            assert errs[1][key] <= 3 * errs[0][key] + 1e-3, (metric.__name__, key, errs)


def _write_modes(plan) -> set:
    """How the forward attention steps of a plan put their results into the stores (the executor's three
    paths): merged everywhere, written everywhere (fresh rows), or split."""
    modes = set()
    for rank in range(plan.world_size):
        for step in plan.prepared_programs(rank)[0].steps:
            if step[0] == "attn":
                modes.add("merge" if step[5] is None else "write" if step[5] == () else "split")
    return modes


def test_exactness_cases_run_every_forward_write_path():
    """The eight-rank exactness case above (a 300-token causal document over 4 nodes, 4 stages) runs the
    executor's three forward paths: rows written where nothing was yet, merged where something was, and
    both in one call; so the reference comparison covers each."""
    case = Case("dcp", [1, 300, 17, 64, 2], mask="causal",
                options={"devices_per_node": 2, "block_size": 16, "num_stages": 4, "communication": "hierarchical",
                         "partial_dtype": "fp32"}, seed=3)
    plan = cp.get_backend("dcp", world_size=8, **case.options).plan(case.seqlens, case.spec())
    assert _write_modes(plan) == {"merge", "write", "split"}


# A tiny plan whose bytes are computed by hand. One causal document of 64 tokens, 2 query heads and 1 KV
# head of dimension 4, on 2 devices with the static zigzag placement (documented in dcp/candidates.py):
# block size 16 (the largest power of two giving the document two blocks per device, at least 16), token
# blocks b0..b3 dealt in snake order to devices 0, 1, 1, 0, and every computation block (q block i, kv
# block j <= i) on its query block's owner. So queries, outputs, lse and dq never move; only keys and
# values do, and their gradients come back:
#   device 1 (q blocks 1, 2) reads kv block b0 from device 0; device 0 (q block 3) reads b1 and b2 from 1.
# One kv block = 16 tokens x (k + v) x 1 KV head x 4 dims = 128 elements.
#   forward:  device 0 sends kv(b0) at the model size: 128 x 2 bytes (bf16) = 256
#             device 1 sends kv(b1), kv(b2):          2 x 128 x 2          = 512
#   backward: device 0 sends kv(b0) again (256) and the dk/dv of b1 and b2 it accumulated, in the fp32
#             accumulation dtype whatever the model dtype: 2 x 128 x 4 = 1024; in all 256 + 1024 = 1280
#             device 1 sends kv(b1), kv(b2) again (512) and dk/dv of b0 (128 x 4 = 512); in all 1024
TINY = Case("dcp", [64], num_heads=2, num_kv_heads=1, head_dim=4, dtype="bf16",
            options={"placement": "zigzag", "num_stages": 1, "partial_dtype": "fp32"}, seed=9)
TINY_FWD_BYTES, TINY_BWD_BYTES = [256, 512], [1280, 1024]


def test_tiny_plan_bytes_by_hand():
    plan = cp.get_backend("dcp", world_size=2, **TINY.options).plan(TINY.seqlens, TINY.spec())
    assert plan.block_size == 16 and plan.placement.owner.tolist() == [0, 1, 1, 0]
    st = plan.stats(element_size=2)
    assert st.extra["fwd_bytes_per_rank"] == TINY_FWD_BYTES
    assert st.extra["bwd_bytes_per_rank"] == TINY_BWD_BYTES
    assert st.fwd_intra_node_bytes == 768 and st.bwd_intra_node_bytes == 2304 and st.fwd_inter_node_bytes == 0


def test_dcp_bf16_explicit_scale_and_one_device():
    cases = [Case("dcp", [70, 3, 41], dtype="bf16", mask="lambda", mask_args={"sink": 2, "window": 16},
                  options={"block_size": 16}, seed=1),
             Case("dcp", [45, 1, 30], mask="sliding_window", mask_args={"window": 9}, softmax_scale=0.45,
                  options={"block_size": 16, "num_stages": 2}, seed=2),
             TINY]
    per_rank = run_ranks(worker, 2, cases)
    check_results(cases, per_rank)
    # the executor sent exactly the hand-computed bytes of the tiny plan (bf16 model tensors, fp32 dk/dv)
    assert [per_rank[r][2]["sent_fwd"] for r in range(2)] == TINY_FWD_BYTES
    assert [per_rank[r][2]["sent_bwd"] for r in range(2)] == TINY_BWD_BYTES
    single = [Case("dcp", [33, 1, 90], mask=m, mask_args=a, options={"block_size": 16}, seed=i)
              for i, (m, a) in enumerate(MASKS)]
    check_results(single, run_ranks(worker, 1, single))


def _count_worker(rank, world, seqlens, options, dtypes=(torch.float32,)):
    spec = cp.AttentionSpec(4, 2, 8, mask="causal")
    backend = cp.get_backend("dcp", **options)
    plan = backend.plan(seqlens, spec)
    n = plan.num_local_tokens(rank)
    res = {}
    for dtype in dtypes:
        q = torch.randn(n, 4, 8, dtype=dtype, requires_grad=True)
        k = torch.randn(n, 2, 8, dtype=dtype, requires_grad=True)
        v = torch.randn(n, 2, 8, dtype=dtype, requires_grad=True)
        backend.counters.reset()
        out = backend.attention(q, k, v, plan)
        fwd = dict(backend.counters.sent_bytes)
        out.sum().backward()
        total = dict(backend.counters.sent_bytes)
        st = plan.stats(element_size=q.element_size())
        res[str(dtype)] = {
            "fwd": sum(fwd.values()), "total": sum(total.values()),
            "split": backend.counters.split(rank, options["devices_per_node"]),
            "plan_fwd": st.extra["fwd_bytes_per_rank"][rank], "plan_bwd": st.extra["bwd_bytes_per_rank"][rank],
            "plan_fwd_inter": st.extra["fwd_inter_node_bytes_per_rank"][rank],
            "plan_bwd_inter": st.extra["bwd_inter_node_bytes_per_rank"][rank]}
    return res if len(dtypes) > 1 else res[str(dtypes[0])]


def test_counted_bytes_equal_plan_statistics():
    """fp32 and bf16: in bf16 the model tensors travel at 2 bytes but lse and the partial out/dq/dk/dv
    accumulators at 4, so only bf16 tells a wrong element size of those apart."""
    totals = {}
    for partial in ("fp32", "model"):
        opts = {"devices_per_node": 2, "block_size": 16, "num_stages": 3, "partial_dtype": partial}
        res = run_ranks(_count_worker, 4, [5, 200, 64, 90, 1, 33], opts, (torch.float32, torch.bfloat16))
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert sum(r[dtype]["total"] for r in res) > 0
            for rank, per_dtype in enumerate(res):
                r = per_dtype[dtype]
                assert r["fwd"] == r["plan_fwd"], (partial, dtype, rank)
                assert r["total"] == r["plan_fwd"] + r["plan_bwd"], (partial, dtype, rank)
                assert r["split"][1] == r["plan_fwd_inter"] + r["plan_bwd_inter"], (partial, dtype, rank)
            totals[partial, dtype] = sum(r[dtype]["total"] for r in res)
    # bf16 moves fewer bytes than fp32 but more than half of them when partials (and lse) stay fp32; with
    # partials in the model dtype only lse stays fp32
    f32, b16 = totals["fp32", "torch.float32"], totals["fp32", "torch.bfloat16"]
    assert f32 / 2 < b16 < f32
    assert totals["model", "torch.float32"] == f32  # fp32 runs: the model dtype is fp32
    assert f32 / 2 < totals["model", "torch.bfloat16"] < b16


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
