"""Synthetic LongAlign-/LDC-shaped lengths and greedy packing."""
import numpy as np
import pytest

from megatron.training.length_datasets import available_length_datasets, pack_batches, sample_lengths


@pytest.mark.parametrize("name", available_length_datasets())
def test_lengths_are_seeded_bounded_and_complete(name):
    a = sample_lengths(name, 3000, seed=1, max_len=32768)
    assert a.dtype == np.int64 and a.shape == (3000,)
    assert a.min() >= 1 and a.max() <= 32768
    assert np.array_equal(a, sample_lengths(name, 3000, seed=1, max_len=32768))
    assert not np.array_equal(a, sample_lengths(name, 3000, seed=2, max_len=32768))


def test_shapes_differ_as_documented():
    la = sample_lengths("longalign", 5000, 0, 131072)
    ldc = sample_lengths("ldc", 5000, 0, 131072)
    # LongAlign: mostly long samples; LDC: many short documents and a heavier tail.
    assert 8000 < np.median(la) < 16000
    assert np.median(ldc) < 4000
    assert np.mean(ldc < 1000) > 3 * np.mean(la < 1000)
    assert ldc.max() > la.max()
    scaled = sample_lengths("longalign", 5000, 0, 262144, scale=2.0)
    assert 1.8 < np.median(scaled) / np.median(la) < 2.2


def test_lengths_above_max_len_are_redrawn_not_clipped():
    a = sample_lengths("longalign", 500, 0, max_len=8192)
    assert a.max() <= 8192 and np.sum(a == 8192) < 5
    with pytest.raises(ValueError, match="raise max_len"):
        sample_lengths("longalign", 100, 0, max_len=10, scale=4.0)
    with pytest.raises(ValueError, match="unknown length dataset"):
        sample_lengths("pile", 10, 0, 100)


def test_pack_batches_keeps_order_budget_and_every_document():
    lens = sample_lengths("ldc", 400, 3, max_len=16384)
    batches = pack_batches(lens, 16384)
    assert [i for b in batches for i in b] == list(range(400))
    assert all(lens[b].sum() <= 16384 for b in batches)
    # Greedy: the first document of each batch did not fit into the previous one.
    for prev, nxt in zip(batches, batches[1:]):
        assert lens[prev].sum() + lens[nxt[0]] > 16384
    assert pack_batches([], 10) == []


def test_pack_batches_rejects_a_too_long_document():
    with pytest.raises(ValueError, match="document 1 has 11 tokens, more than the batch budget of 10"):
        pack_batches([3, 11, 2], 10)
