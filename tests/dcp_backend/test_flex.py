"""The FlexAttention block kernel on CPU at realistic sizes.

* Its BlockMask, read the way the compiled GPU kernel reads it (a tile listed as full is visible without
  ``mask_mod``, a partial tile through ``mask_mod``, an unlisted tile never; the transposed ``q`` tables of
  the backward must list the same tiles), equals a brute-force per-token visibility, on single documents of
  1K, 4K and 16K tokens and on multi-range works.
* Its eager forward (what runs on CPU) equals the reference kernel on single causal documents of 1K and 4K
  tokens, and on a sparse multi-document work.
* Its forward through ring, zigzag, LoongTrain and DCP at worlds 2 to 4 equals the float64 reference on
  batches with documents of 1 to 2,048 tokens, causal and sparse masks; its CPU backward is a clear error.
"""
import numpy as np
import pytest
import torch

import dcp_backend as cp
from dcp_backend.kernels import AttnWork, get_kernel
from dcp_backend.kernels.flex import TILE, FlexKernel, _block_mask, bucket, flex_host_tables
from tests.cp_check import Case, check_results, worker
from tests.distributed import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def causal_document(n: int) -> AttnWork:
    r = np.zeros((n, 1, 2), np.int64)
    r[:, 0, 1] = np.arange(1, n + 1)
    return AttnWork(np.array([0, n]), np.array([0, n]), r)


def sparse_work(rng) -> AttnWork:
    """Three segments, each row with up to two ranges (a sink and a sliding window), some rows empty."""
    qlens, klens, ranges = [700, 1, 333], [900, 5, 333], []
    for ql, kl in zip(qlens, klens):
        r = np.zeros((ql, 2, 2), np.int64)
        for i in range(ql):
            end = min(kl, kl - ql + i + 1)
            if i % 97 == 5 or end <= 0:
                continue  # no visible key
            sink = min(int(rng.integers(1, 40)), end)
            start = max(sink, end - int(rng.integers(1, 300)))
            r[i, 0] = (0, sink)
            if start < end:
                r[i, 1] = (start, end)
        ranges.append(r)
    cu = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    return AttnWork(cu(qlens), cu(klens), np.concatenate(ranges))


def brute_visibility(work: AttnWork, pq: int, pk: int) -> np.ndarray:
    """[pq, pk] bool from the ranges, one row at a time (padding rows and columns see nothing)."""
    vis = np.zeros((pq, pk), bool)
    seg = np.repeat(np.arange(work.num_segments), np.diff(work.cu_q))
    for t in range(work.total_q):
        base = work.cu_k[seg[t]]
        for a, b in work.ranges[t]:
            vis[t, base + a: base + b] = True
    return vis


def _dense_from_tables(num, idx, rows, cols):
    dense = np.zeros((rows, cols), bool)
    for i in range(rows):
        dense[i, idx[i, :num[i]]] = True
    return dense


def block_mask_semantics(work: AttnWork):
    """(visibility as the compiled kernel reads the BlockMask, brute-force visibility)."""
    host = flex_host_tables(work)
    bm, empty = _block_mask(host, torch.device("cpu"))
    pq, pk = host.padded_q, host.padded_k
    nq, nk = pq // TILE, pk // TILE
    assert bm.seq_lengths == (pq, pk)
    assert tuple(bm.kv_indices.shape) == (1, 1, nq, nk) and tuple(bm.q_indices.shape) == (1, 1, nk, nq)
    t = {name: getattr(bm, name)[0, 0].numpy() for name in
         ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
          "full_q_num_blocks", "full_q_indices")}
    partial = _dense_from_tables(t["kv_num_blocks"], t["kv_indices"], nq, nk)
    full = _dense_from_tables(t["full_kv_num_blocks"], t["full_kv_indices"], nq, nk)
    assert not (partial & full).any()
    # the backward's transposed tables list exactly the same tiles
    assert np.array_equal(_dense_from_tables(t["q_num_blocks"], t["q_indices"], nk, nq), partial.T)
    assert np.array_equal(_dense_from_tables(t["full_q_num_blocks"], t["full_q_indices"], nk, nq), full.T)
    # mask_mod evaluated on every (query, key) of the padded grid
    with torch.no_grad():
        mm = bm.mask_mod(torch.zeros(()), torch.zeros(()), torch.arange(pq)[:, None], torch.arange(pk)[None, :]).numpy()
    tile_full = np.kron(full, np.ones((TILE, TILE), bool))
    tile_partial = np.kron(partial, np.ones((TILE, TILE), bool))
    kernel_view = tile_full | (tile_partial & mm)
    truth = brute_visibility(work, pq, pk)
    empty_rows = np.nonzero(~truth[: work.total_q].any(1))[0]
    assert empty.tolist() == empty_rows.tolist()
    return kernel_view, truth


@pytest.mark.parametrize("n", [1024, 4096, 16384])
def test_block_mask_of_one_causal_document_is_exact(n):
    kernel_view, truth = block_mask_semantics(causal_document(n))
    assert np.array_equal(kernel_view, truth)
    assert truth.sum() == n * (n + 1) // 2


def test_block_mask_of_multi_range_segments_is_exact():
    kernel_view, truth = block_mask_semantics(sparse_work(np.random.default_rng(0)))
    assert np.array_equal(kernel_view, truth)


def _forward_vs_reference(work, h, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(work.total_q, h, d, generator=g)
    k = torch.randn(work.total_k, hkv, d, generator=g)
    v = torch.randn(work.total_k, hkv, d, generator=g)
    with torch.no_grad():
        out, lse = FlexKernel(compile=False).forward(q, k, v, work, 0.2)
        o_ref, l_ref = get_kernel("reference").forward(q, k, v, work, 0.2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l_ref))
    fin = torch.isfinite(l_ref)
    assert (out - o_ref).abs().max() <= 1e-4 * max(1.0, o_ref.abs().max().item())
    assert (lse[fin] - l_ref[fin]).abs().max() < 1e-4


@pytest.mark.parametrize("n,heads", [(1024, (4, 2)), (4096, (2, 1))])
def test_flex_forward_of_one_causal_document(n, heads):
    _forward_vs_reference(causal_document(n), *heads, 16, seed=n)


def test_flex_forward_of_sparse_segments():
    _forward_vs_reference(sparse_work(np.random.default_rng(1)), 4, 2, 16, seed=3)


def test_flex_backward_on_cpu_is_a_clear_error():
    w = causal_document(8)
    q = torch.randn(8, 2, 4)
    with pytest.raises(cp.CPError, match="no backward on CPU.*kernel='auto' or 'cpu_flash'"):
        FlexKernel(compile=False).backward(q, q, q, q, q, torch.zeros(8, 2), w, 0.5)


def test_bucket_padding():
    for n in (1, 127, 128, 129, 1000, 4096, 5000, 16384, 100_000):
        b = bucket(n)
        assert b >= n and b % TILE == 0 and (b <= TILE or b - n <= n // 4 + TILE)


# --------------------------------------------------------------------------- through every backend

FLEX_BATCH = [2048, 1, 300, 77, 513]
SPARSE = {"lambda": {"sink": 16, "window": 200}, "shared_question": {"question_fraction": 0.2, "num_answers": 3},
          "causal_blockwise": {"block": 128, "k_local": 2}}


def _flex_cases(world_size: int, masks) -> list[Case]:
    backends = [("ring", {}), ("zigzag", {}), ("loongtrain", {"head_parallel": 2 if world_size % 2 == 0 else 1}),
                ("dcp", {"block_size": 256})]
    # one seed per mask: the backends of a mask share one reference (check_results computes it once)
    return [Case(name, FLEX_BATCH, num_heads=2, num_kv_heads=1, head_dim=16, mask=mask, mask_args=SPARSE.get(mask, {}),
                 options=dict(opts, kernel="flex"), forward_only=True, seed=m)
            for m, mask in enumerate(masks) for name, opts in backends]


def _flex_worker(rank, world_size, cases):
    results = worker(rank, world_size, cases)
    # and a backward through a backend with the flex kernel: a clear error on CPU
    be = cp.get_backend("ring", kernel="flex")
    plan = be.plan([40, 9], cp.AttentionSpec(2, 1, 8))
    n = plan.num_local_tokens(rank)
    q = torch.randn(n, 2, 8, requires_grad=True)
    kv = torch.randn(n, 1, 8, requires_grad=True)
    try:
        be.attention(q, kv, kv, plan).sum().backward()
        error = None
    except cp.CPError as exc:
        error = str(exc)
    return results, error


@pytest.mark.parametrize("world_size,masks", [(2, ("causal", "lambda")), (3, ("shared_question",)),
                                              (4, ("causal_blockwise",))])
def test_flex_forward_through_every_backend(world_size, masks):
    cases = _flex_cases(world_size, masks)
    out = run_ranks(_flex_worker, world_size, cases, timeout=400)
    check_results(cases, [r[0] for r in out])
    for _, error in out:
        assert error is not None and "no backward on CPU" in error
