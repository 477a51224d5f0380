"""Packing schedule and per-rank planned batches (tokens, labels, positions) for every backend layout."""
import numpy as np
import pytest
import torch

import dcp_backend as cp
from dcp_backend.batch import PackedBatch
from megatron.training.data import (DocumentTooLongError, IndexedDocuments, MockDocuments, Packs, PlannedBatches,
                                    PlannerConfig, build_loader, build_schedule, micro_batch_indices)
from tests.megatron.training.synthetic import documents, write_indexed


def test_schedule_rejects_long_documents_unless_split():
    with pytest.raises(DocumentTooLongError, match="--split-long-documents"):
        build_schedule(np.array([5, 40, 8]), seq_length=16, seed=0, split_long=False, num_micro_batches=1)


def test_split_pieces_train_every_label_exactly_once():
    lengths = np.array([5, 40, 1, 17, 33, 2])
    s = build_schedule(lengths, seq_length=16, seed=0, split_long=True, num_micro_batches=1)
    assert s.skipped_short_docs == 1 and s.split_docs == 2
    assert s.piece_inputs.max() <= 16 and s.piece_inputs.min() >= 1
    for d, n in enumerate(lengths):
        labels = np.concatenate([np.arange(a + 1, b) for a, b in
                                 zip(s.piece_start[s.piece_doc == d], s.piece_end[s.piece_doc == d])] or [[]])
        assert sorted(labels.tolist()) == (list(range(1, n)) if n >= 2 else [])


def test_epochs_cover_every_piece_once_and_respect_the_budget():
    lengths = np.random.default_rng(0).integers(2, 60, size=50)
    s = build_schedule(lengths, seq_length=64, seed=9, split_long=False, num_micro_batches=100)
    assert len(s.batches) >= 100
    flat = np.concatenate(s.batches)
    per_epoch = s.piece_doc.size
    whole = flat[: (flat.size // per_epoch) * per_epoch].reshape(-1, per_epoch)
    assert whole.shape[0] >= 2
    for epoch in whole:
        assert sorted(epoch.tolist()) == list(range(per_epoch))
    assert not np.array_equal(whole[0], whole[1])  # reshuffled per epoch
    assert all(s.seqlens(g).sum() <= 64 for g in range(len(s.batches)))
    again = build_schedule(lengths, seq_length=64, seed=9, split_long=False, num_micro_batches=100)
    assert all(np.array_equal(a, b) for a, b in zip(s.batches, again.batches))


def test_micro_batch_indices_split_the_global_batch_between_dp_ranks():
    a = micro_batch_indices(2, 4, global_batch=4, dp_rank=0, num_micro=2)
    b = micro_batch_indices(2, 4, global_batch=4, dp_rank=1, num_micro=2)
    assert a == [8, 9, 12, 13] and b == [10, 11, 14, 15]


@pytest.mark.parametrize("backend,options,world", [
    ("ring", {}, 3), ("zigzag", {}, 4), ("loongtrain", {"head_parallel": 2}, 4),
])
def test_each_rank_gets_exactly_its_planned_tokens(tmp_path, backend, options, world):
    docs = documents(30, 2, 90, seed=5)
    source = IndexedDocuments(write_indexed(str(tmp_path / "d"), docs))
    sched = build_schedule(source.lengths, seq_length=128, seed=1, split_long=True, num_micro_batches=3)
    spec = cp.AttentionSpec(4, 2, 8, mask="lambda", mask_args={"sink": 2, "window": 8})
    for g in range(3):
        seqlens = sched.seqlens(g)
        pieces = sched.batches[g]
        full_in = np.concatenate([docs[d][a:b - 1] for d, a, b in zip(sched.piece_doc[pieces],
                                                                     sched.piece_start[pieces], sched.piece_end[pieces])])
        full_lab = np.concatenate([docs[d][a + 1:b] for d, a, b in zip(sched.piece_doc[pieces],
                                                                      sched.piece_start[pieces], sched.piece_end[pieces])])
        positions = PackedBatch.from_seqlens(seqlens).positions
        seen = []
        for rank in range(world):
            mb = PlannedBatches(Packs(source, sched), PlannerConfig(backend, options, spec, rank, cp.Topology(world)))[g]
            idx = mb.plan.local_indices(rank).numpy()
            seen.append(idx)
            assert torch.equal(mb.tokens, torch.from_numpy(full_in[idx]))
            assert torch.equal(mb.labels, torch.from_numpy(full_lab[idx]))
            assert torch.equal(mb.position_ids, torch.from_numpy(positions[idx]))
            assert mb.loss_mask.sum().item() == idx.size
            assert np.array_equal(mb.seqlens, seqlens) and mb.plan_seconds >= 0
        assert sorted(np.concatenate(seen).tolist()) == list(range(int(seqlens.sum())))


def test_worker_processes_deliver_the_same_batches(tmp_path):
    source = MockDocuments("ldc", 200, seed=3, max_len=200, vocab_size=50, scale=0.01)
    sched = build_schedule(source.lengths, seq_length=200, seed=2, split_long=False, num_micro_batches=6)
    spec = cp.AttentionSpec(4, 2, 8)
    ds = PlannedBatches(Packs(source, sched), PlannerConfig("zigzag", {}, spec, 1, cp.Topology(2)), with_stats=True)
    inline = [ds[g] for g in range(6)]
    loaded = list(build_loader(ds, list(range(6)), num_workers=2, prefetch=2, timeout=120))
    assert [mb.index for mb in loaded] == list(range(6))
    for a, b in zip(inline, loaded):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.position_ids, b.position_ids)
        assert a.plan.fingerprint == b.plan.fingerprint
        assert np.array_equal(a.plan.local_indices(1).numpy(), b.plan.local_indices(1).numpy())
        assert a.attention_pairs == b.attention_pairs and b.plan_stats["comm_bytes_planned"] > 0


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_planning_worker_ends_the_loader_with_a_message(signal_name):
    """A killed worker is reported at the next batch; a stopped one by the loader's timeout (never a hang)."""
    import multiprocessing
    import os
    import signal
    import time

    source = MockDocuments("uniform", 60, seed=3, max_len=100, vocab_size=50)
    sched = build_schedule(source.lengths, seq_length=100, seed=2, split_long=False, num_micro_batches=8)
    ds = PlannedBatches(Packs(source, sched), PlannerConfig("ring", {}, cp.AttentionSpec(2, 1, 8), 0, cp.Topology(2)))
    it = iter(build_loader(ds, list(range(8)), num_workers=1, prefetch=1, timeout=15))
    next(it)
    workers = multiprocessing.active_children()
    assert workers
    for w in workers:
        os.kill(w.pid, getattr(signal, signal_name))
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as info:
            for _ in range(7):
                next(it)
    finally:
        # Unregister the workers from torch's SIGCHLD check before killing any: a killed worker left registered
        # (the iterator lives on in the exception's traceback) makes any later child exit raise "DataLoader
        # worker ... is killed by signal" in whatever test runs then.
        from torch.utils.data._utils import signal_handling

        try:
            signal_handling._remove_worker_pids(id(it))
        except RuntimeError:  # torch already removed them while reporting the dead worker
            pass
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
            w.join(timeout=10)
    assert time.monotonic() - t0 < 40
    text = str(info.value)
    assert ("worker" in text and "exited unexpectedly" in text) if signal_name == "SIGKILL" else "timed out" in text


def test_padding_for_sequence_parallelism_is_masked(tmp_path):
    """Local rows padded to a multiple of the TP size: the plan's tokens first, then zeros with loss mask 0."""
    source = MockDocuments("uniform", 40, seed=1, max_len=60, vocab_size=50)
    sched = build_schedule(source.lengths, seq_length=64, seed=0, split_long=False, num_micro_batches=2)
    spec = cp.AttentionSpec(2, 1, 8)
    plain = PlannedBatches(Packs(source, sched), PlannerConfig("ring", {}, spec, 0, cp.Topology(3)))[0]
    padded = PlannedBatches(Packs(source, sched), PlannerConfig("ring", {}, spec, 0, cp.Topology(3),
                                                                pad_to_multiple=4))[0]
    n = plain.num_real
    assert padded.num_real == n and padded.tokens.numel() % 4 == 0 and padded.tokens.numel() - n < 4
    assert torch.equal(padded.tokens[:n], plain.tokens) and torch.equal(padded.labels[:n], plain.labels)
    assert padded.loss_mask[:n].sum() == n and padded.loss_mask[n:].sum() == 0


def test_megatron_dataset_builder_splits_and_blends(tmp_path):
    """--split divides each prefix's documents; a weighted --data-path mixes packs by weight; packs hold
    whole documents within the budget; multi-sequence documents are read whole."""
    from types import SimpleNamespace

    from megatron.training.datasets import build_datasets

    a_docs = [np.full(n, 7) for n in np.random.default_rng(0).integers(2, 40, size=200)]
    b_docs = [np.full(n, 9) for n in np.random.default_rng(1).integers(2, 40, size=100)]
    a = write_indexed(str(tmp_path / "a"), a_docs)
    b = write_indexed(str(tmp_path / "b"), b_docs)
    args = SimpleNamespace(mock_data=None, data_path=["0.25", a, "0.75", b], seed=3, seq_length=64, split="80,10,10",
                           split_long_documents=False, mock_num_documents=0, mock_length_scale=1.0, train_iters=100,
                           global_batch_size=4, eval_interval=50, eval_iters=2)
    ds = build_datasets(args, vocab_size=16)
    assert len(ds["train"]) >= 400 and len(ds["valid"]) >= 12 and len(ds["test"]) >= 8
    picks = [ds["train"][i] for i in range(400)]
    from_b = sum(int(p["inputs"][0] == 9) for p in picks)
    assert 0.65 < from_b / 400 < 0.85  # weight 0.75
    assert all(p["seqlens"].sum() <= 64 and p["inputs"].size == p["seqlens"].sum() for p in picks)
    assert all(len(set(p["inputs"].tolist())) == 1 for p in picks)  # a pack comes from one prefix
    # The splits hold different documents: the first 80% of a's documents train, the last 10% test.
    train_lengths = {int(n) for p in picks if p["inputs"][0] == 7 for n in p["seqlens"]}
    assert train_lengths <= {int(n) - 1 for n in map(len, a_docs[:160])}
    # A document of several sequences (sentence-split data) is one document.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    builder = IndexedDatasetBuilder(get_bin_path(str(tmp_path / "s")), dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    builder.add_document(torch.tensor([6, 7]), [2])
    builder.finalize(get_idx_path(str(tmp_path / "s")))
    src = IndexedDocuments(str(tmp_path / "s"))
    assert src.lengths.tolist() == [5, 2] and src.tokens(0, 1, 5).tolist() == [2, 3, 4, 5]
