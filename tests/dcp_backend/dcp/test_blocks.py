"""Blocks: exact pair counts against a dense brute force, head blocks, automatic block size."""
import numpy as np
import pytest

from dcp_backend import AttentionSpec, CPError
from dcp_backend.batch import PackedBatch
from dcp_backend.dcp.blocks import HeadBlocks, auto_block_size, build_blocks
from dcp_backend.dense_reference import dense_visibility
from tests.dcp_backend.baselines.test_ring_family import MASKS


@pytest.mark.parametrize("mask,args", MASKS)
@pytest.mark.parametrize("block", [1, 4, 16])
def test_pair_counts_match_dense_mask(mask, args, block):
    rng = np.random.default_rng(block)
    for _ in range(3):
        seqlens = rng.integers(1, 60, size=int(rng.integers(1, 6)))
        spec = AttentionSpec(4, 2, 8, mask=mask, mask_args=args)
        bs = build_blocks(PackedBatch.from_seqlens(seqlens), spec, block, None)
        vis = dense_visibility(seqlens, spec)
        tb = bs.token_block
        dense = np.zeros((bs.n_tb, bs.n_tb), dtype=np.int64)
        rows, cols = np.nonzero(vis)
        np.add.at(dense, (tb[rows], tb[cols]), 1)
        got = np.zeros_like(dense)
        got[bs.pair_q, bs.pair_kv] = bs.pair_count
        assert np.array_equal(dense, got)
        assert (bs.pair_count > 0).all()
        # token blocks tile every document exactly
        assert bs.tb_tokens.sum() == seqlens.sum() and (bs.tb_tokens <= block).all()


def test_head_blocks_gqa():
    spec = AttentionSpec(8, 2, 16)
    hb = HeadBlocks.make(spec, None)
    assert (hb.hb, hb.khb, hb.n_q_blocks, hb.n_kv_blocks, hb.q_per_kv) == (4, 1, 2, 2, 1)
    hb = HeadBlocks.make(spec, 1)
    assert (hb.n_q_blocks, hb.n_kv_blocks, hb.q_per_kv) == (8, 2, 4)
    assert list(hb.kv_of_q(np.arange(8))) == [0, 0, 0, 0, 1, 1, 1, 1]
    hb = HeadBlocks.make(spec, 8)
    assert (hb.n_q_blocks, hb.khb, hb.n_kv_blocks) == (1, 2, 1)
    with pytest.raises(CPError, match="head_block_size"):
        HeadBlocks.make(spec, 3)
    with pytest.raises(CPError, match="head_block_size"):
        HeadBlocks.make(AttentionSpec(12, 2, 16), 4)


def test_auto_block_size_balances_blocks():
    batch = PackedBatch.from_seqlens([598, 4423, 9965, 4919, 11548, 694, 12738, 555, 6187])
    b = auto_block_size(batch, 8, 0.2)
    assert b & (b - 1) == 0 and 16 <= b <= 8192
    nb = (-(-batch.seqlens // b)).sum()
    assert nb >= 2 * 8 and b >= 128
    # a larger power of two would not have been balanced enough (or too few blocks)
    assert auto_block_size(batch, 1, 0.2) >= b
    tiny = PackedBatch.from_seqlens([3, 1])
    assert auto_block_size(tiny, 4, 0.2) == 16
