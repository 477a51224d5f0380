"""dcp_backend.workloads: seeded dataset-shaped lengths, whole-document packing (nothing dropped or
cut, a clear error for a document over the budget) and dataset batches (exact count, prefix-stable)."""
import numpy as np
import pytest

from dcp_backend.workloads import dataset_batches, pack_batches, sample_lengths


def test_sample_lengths_seeded_and_shaped():
    a = sample_lengths("longalign", 4000, 3, 1 << 20)
    assert np.array_equal(a, sample_lengths("longalign", 4000, 3, 1 << 20, 1.0))
    assert not np.array_equal(a, sample_lengths("longalign", 4000, 4, 1 << 20))
    assert 0.8 < np.mean((a >= 8192) & (a <= 65536)) < 0.9 and a.min() >= 256
    b = sample_lengths("ldc", 4000, 3, 1 << 20)
    assert 0.75 < np.mean(b < 4096) < 0.85 and b.max() > 32768 and b.max() <= 131072
    small = sample_lengths("ldc", 1000, 0, 500, 0.05)
    assert small.dtype == np.int64 and small.min() >= 1 and small.max() <= 500
    with pytest.raises(ValueError, match="unknown length dataset"):
        sample_lengths("wiki", 3, 0, 10)
    with pytest.raises(ValueError, match="scale"):
        sample_lengths("ldc", 3, 0, 10, scale=0)


def test_pack_batches_keeps_every_document_whole_and_in_order():
    lengths = [5, 3, 8, 1, 1, 10, 2, 9, 4]
    batches = pack_batches(lengths, 10)
    assert batches == [[5, 3], [8, 1, 1], [10], [2], [9], [4]]
    assert sum(batches, []) == lengths
    assert all(sum(b) <= 10 for b in batches)
    assert pack_batches([], 10) == []
    assert pack_batches(np.array([4, 4], dtype=np.int64), 8) == [[4, 4]]


def test_pack_batches_errors_name_the_document_and_budget():
    with pytest.raises(ValueError, match=r"document 2 has 11 tokens, more than the batch budget of 10"):
        pack_batches([3, 4, 11, 2], 10)
    with pytest.raises(ValueError, match="document 1: length must be at least 1"):
        pack_batches([3, 0], 10)
    with pytest.raises(ValueError, match="tokens_per_batch"):
        pack_batches([3], 0)


@pytest.mark.parametrize("dataset", ["longalign", "ldc"])
def test_dataset_batches_exact_count_budget_and_prefix_stable(dataset):
    budget = 16384
    batches = dataset_batches(dataset, 12, budget, seed=5)
    assert len(batches) == 12
    assert all(1 <= sum(b) <= budget and min(b) >= 1 for b in batches)
    assert batches == dataset_batches(dataset, 12, budget, seed=5)
    assert batches[:4] == dataset_batches(dataset, 4, budget, seed=5)
    assert batches != dataset_batches(dataset, 12, budget, seed=6)
    # in-order packing: a batch closed only because its successor's first document did not fit
    for cur, nxt in zip(batches, batches[1:]):
        assert sum(cur) + nxt[0] > budget
    assert dataset_batches(dataset, 0, budget, seed=0) == []


def test_dataset_batches_scale_and_shapes():
    la = sum(dataset_batches("longalign", 8, 65536, seed=0), [])
    ldc = sum(dataset_batches("ldc", 8, 65536, seed=0), [])
    assert np.median(la) > 8192 > np.median(ldc)  # LongAlign: long documents; LDC: mostly short
    tiny = dataset_batches("longalign", 3, 3000, seed=1, scale=0.05)
    assert len(tiny) == 3 and all(sum(b) <= 3000 for b in tiny)


def test_uniform_and_pack_indices():
    from dcp_backend.workloads import pack_batches, pack_indices, sample_lengths

    u = sample_lengths("uniform", 2000, 0, 50)
    assert u.min() >= 1 and u.max() <= 50 and abs(u.mean() - 25.5) < 2
    lens = [5, 3, 9, 1, 7, 2]
    idx = pack_indices(lens, 10)
    assert [list(map(int, b)) for b in idx] == [[0, 1], [2, 3], [4, 5]]
    assert [[lens[i] for i in b] for b in idx] == pack_batches(lens, 10)
    assert pack_indices([], 10) == []
