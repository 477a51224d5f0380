"""Documents -> packed micro-batches -> this rank's planned share, loaded ahead by data-loader workers.

1. A document source gives token arrays: :class:`IndexedDocuments` (a megatron.core indexed dataset, as
   written by ``tools/preprocess_data.py``, Megatron-LM's preprocessing or ``IndexedDatasetBuilder``) or
   :class:`MockDocuments` (random tokens, lengths from :mod:`dcp_backend.workloads`).
2. :func:`build_schedule` turns documents into *pieces* (a document of n tokens trains n-1 next-token
   predictions: inputs ``doc[:-1]``, labels ``doc[1:]``). A document with more than ``seq_length``
   inputs is an error unless ``split_long`` is set, in which case it becomes consecutive pieces of at
   most ``seq_length`` inputs (overlapping by one token, so every label is trained exactly once; each
   piece is attended as its own document with positions from 0). Each epoch shuffles the pieces with a
   seeded permutation and packs them whole into micro-batches with
   :func:`~dcp_backend.workloads.pack_batches`. Nothing is dropped or repeated within an
   epoch; epochs follow each other until the run has enough micro-batches. :class:`Packs` reads a
   pack's tokens; megatron/training/datasets.py wraps this per split for megatron-core's dataset builder.
3. :class:`PlannedBatches` is a map-style dataset over pack keys (a global micro-batch index, or
   ``(split, index)`` through :class:`SplitPacks`). An item is built in a data-loader worker: it reads
   the pack's tokens, asks the CP backend for the plan (deterministic, so every rank of the CP group
   computes the same plan without talking to the others), and keeps only the tokens
   ``plan.local_indices(cp_rank)`` names, with their labels, loss mask and within-document position ids
   (tensor-parallel ranks of one CP rank get the same share; with sequence parallelism the share is
   padded to a multiple of the TP size, loss mask 0). Workers are spawned processes (no inherited
   process group), ``num_workers`` of them, each ``prefetch`` batches ahead: planning overlaps training.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import dcp_backend as cp
from dcp_backend.batch import PackedBatch

from megatron.training.flops import attention_pairs
from dcp_backend.workloads import pack_indices, sample_lengths


# ------------------------------------------------------------------------------------------ sources
class IndexedDocuments:
    """Documents of a megatron.core ``IndexedDataset`` (``<prefix>.bin/.idx``, as written by Megatron-LM's
    ``tools/preprocess_data.py``, ours, or ``IndexedDatasetBuilder``); opened lazily. A document is the
    range of sequences between two ``document_indices`` (one sequence per document unless the data was
    split into sentences), its tokens their concatenation.

    Opening checks what would otherwise fail mid-run (each a ``ValueError`` naming the file and the fix):
    the ``.idx`` must be readable, the ``.bin`` exactly as long as the index says (a truncated or
    mismatched pair is refused), and, given ``vocab_size``, every token id below it (a scan of the
    ``.bin``, about 1 GB/s)."""

    def __init__(self, path_prefix: str, vocab_size: int | None = None):
        self.path_prefix = path_prefix
        self._ds = None
        try:
            ds = self._dataset()
        except (AssertionError, OSError, ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"{path_prefix}.idx: not a readable megatron-core index ({type(exc).__name__}: "
                             f"{exc}); rebuild the dataset with tools/preprocess_data.py") from None
        seq_lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        self._check_bin_size(ds, seq_lengths)
        self.doc_bounds = np.asarray(ds.document_indices, dtype=np.int64)  # sequences of document d
        self._seq_start = np.concatenate([[0], np.cumsum(seq_lengths)])
        self.lengths = self._seq_start[self.doc_bounds[1:]] - self._seq_start[self.doc_bounds[:-1]]
        self._one_sequence_per_document = bool(np.all(np.diff(self.doc_bounds) == 1))
        if vocab_size:
            self._check_token_ids(ds, int(vocab_size))

    def _check_bin_size(self, ds, seq_lengths: np.ndarray) -> None:
        bin_path = f"{self.path_prefix}.bin"
        itemsize = np.dtype(ds.index.dtype).itemsize
        pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
        expected = int(pointers[-1] + seq_lengths[-1] * itemsize) if seq_lengths.size else 0
        actual = os.path.getsize(bin_path)
        if actual != expected:
            what = "truncated" if actual < expected else "longer than its index describes"
            raise ValueError(f"{bin_path} is {actual:,} bytes but {self.path_prefix}.idx describes {expected:,}: "
                             f"the .bin is {what} (an interrupted copy, or .bin and .idx from different runs); "
                             "rebuild the dataset with tools/preprocess_data.py")

    def _check_token_ids(self, ds, vocab_size: int, chunk: int = 1 << 26) -> None:
        tokens = np.memmap(f"{self.path_prefix}.bin", dtype=ds.index.dtype, mode="r")
        largest = -1
        for start in range(0, tokens.size, chunk):
            largest = max(largest, int(tokens[start:start + chunk].max()))
        if largest >= vocab_size:
            raise ValueError(f"{self.path_prefix}.bin holds token id {largest} but the tokenizer's vocabulary has "
                             f"{vocab_size} entries: the data was written with another tokenizer; give the one "
                             "it was preprocessed with (--tokenizer-model / --vocab-file / --vocab-size)")

    def _dataset(self):
        if self._ds is None:
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            self._ds = IndexedDataset(self.path_prefix, mmap=True)
        return self._ds

    def tokens(self, doc: int, start: int, end: int) -> np.ndarray:
        ds = self._dataset()
        if self._one_sequence_per_document:
            return np.asarray(ds.get(int(doc), offset=int(start), length=int(end - start)), dtype=np.int64)
        first, last = int(self.doc_bounds[doc]), int(self.doc_bounds[doc + 1])
        whole = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(first, last)])
        return whole[start:end]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None
        return state


class MockDocuments:
    """Random tokens (seeded per document) with lengths drawn from a synthetic length dataset."""

    def __init__(self, dataset: str, num_docs: int, seed: int, max_len: int, vocab_size: int, scale: float = 1.0):
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        # A document of n+1 tokens trains n predictions: draw input lengths, add the final label.
        self.lengths = sample_lengths(dataset, num_docs, seed, max_len, scale) + 1

    def tokens(self, doc: int, start: int, end: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0xD0C, int(doc)])
        return rng.integers(0, self.vocab_size, size=int(self.lengths[doc]), dtype=np.int64)[start:end]


# ----------------------------------------------------------------------------------------- schedule
@dataclass
class Schedule:
    """Pieces (token ranges of documents) and the pieces of every global micro-batch, in order."""

    piece_doc: np.ndarray
    piece_start: np.ndarray
    piece_end: np.ndarray  # exclusive; a piece trains (end - start - 1) predictions
    batches: list[np.ndarray] = field(default_factory=list)
    skipped_short_docs: int = 0
    split_docs: int = 0

    @property
    def piece_inputs(self) -> np.ndarray:
        return self.piece_end - self.piece_start - 1

    def seqlens(self, g: int) -> np.ndarray:
        return self.piece_inputs[self.batches[g]]


class DocumentTooLongError(ValueError):
    pass


def build_schedule(doc_lengths: np.ndarray, seq_length: int, seed: int, split_long: bool,
                   num_micro_batches: int | None, stream: int = 0) -> Schedule:
    """Pieces and at least ``num_micro_batches`` packed micro-batches (exactly one epoch when None); see
    the module docstring. ``stream`` separates the shuffles of schedules with the same seed (splits)."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    usable = np.nonzero(lengths >= 2)[0]
    if usable.size == 0:
        raise ValueError("no document has 2 or more tokens: nothing to train on")
    inputs = lengths[usable] - 1
    too_long = inputs > seq_length
    if too_long.any() and not split_long:
        worst = int(np.argmax(inputs))
        raise DocumentTooLongError(
            f"{int(too_long.sum())} document(s) have more than --seq-length={seq_length} training tokens "
            f"(the longest, document {int(usable[worst])}, has {int(inputs[worst])}); pass --split-long-documents "
            "to split them into budget-sized pieces, or raise --seq-length"
        )
    per_doc = np.maximum(1, -(-inputs // seq_length))  # pieces per document
    doc = np.repeat(usable, per_doc)
    first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    j = np.arange(doc.size) - first  # piece number inside its document
    start = j * seq_length
    end = np.minimum(start + seq_length + 1, lengths[doc])
    sched = Schedule(doc, start, end, skipped_short_docs=int(lengths.size - usable.size),
                     split_docs=int(too_long.sum()))
    piece_inputs = sched.piece_inputs
    epoch = 0
    while (len(sched.batches) < num_micro_batches) if num_micro_batches is not None else epoch < 1:
        perm = np.random.default_rng([seed, 0xE90C, stream, epoch]).permutation(doc.size)
        for b in pack_indices(piece_inputs[perm].tolist(), seq_length):
            sched.batches.append(perm[b])
        epoch += 1
    return sched


class Packs:
    """The packs of a schedule over a document source: pack ``g`` -> ``{"inputs", "labels", "seqlens"}``
    (inputs and labels int64, concatenated in pack order). ``doc_ids`` maps the schedule's document
    numbers to the source's (a split of the source); default: the identity."""

    def __init__(self, source, schedule: Schedule, doc_ids: np.ndarray | None = None):
        self.source = source
        self.schedule = schedule
        self.doc_ids = doc_ids

    def __len__(self) -> int:
        return len(self.schedule.batches)

    def __getitem__(self, g: int) -> dict:
        s = self.schedule
        pieces = s.batches[g]
        docs = s.piece_doc[pieces] if self.doc_ids is None else self.doc_ids[s.piece_doc[pieces]]
        chunks = [self.source.tokens(d, a, b) for d, a, b in zip(docs, s.piece_start[pieces], s.piece_end[pieces])]
        return {"inputs": np.concatenate([c[:-1] for c in chunks]), "labels": np.concatenate([c[1:] for c in chunks]),
                "seqlens": s.piece_inputs[pieces]}


class SplitPacks:
    """Packs of several splits under one index: key ``(split, g)`` -> pack ``g`` of that split (one loader
    plans training, validation and test packs in the order they are consumed)."""

    def __init__(self, splits: dict):
        self.splits = splits

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.splits.values())

    def __getitem__(self, key) -> dict:
        split, g = key
        return self.splits[split][int(g)]


# ------------------------------------------------------------------------------------------ batches
@dataclass
class MicroBatch:
    """This rank's share of one packed micro-batch (tensors in local storage order) and its plan."""

    index: int
    tokens: torch.Tensor  # [n_local] int64
    labels: torch.Tensor  # [n_local] int64
    loss_mask: torch.Tensor  # [n_local] float32
    position_ids: torch.Tensor  # [n_local] int64, position inside the token's own document
    seqlens: np.ndarray  # all documents (pieces) of the micro-batch
    plan: object
    plan_seconds: float  # time the worker spent planning this batch
    attention_pairs: int  # unmasked (query, key) pairs of the whole micro-batch, per head
    plan_stats: dict = field(default_factory=dict)  # with --log-plan-stats: planned bytes, compute imbalance
    num_real: int | None = None  # rows of the plan's tokens; the rest (if any) is padding with loss mask 0

    @property
    def num_tokens(self) -> int:
        return int(self.seqlens.sum())


@dataclass(frozen=True)
class PlannerConfig:
    """What a planning worker needs: the backend's name and options, the attention spec, this rank's place
    in the CP topology, and where attention runs (the block kernel whose host tables it builds)."""

    backend_name: str
    options: dict
    spec: cp.AttentionSpec
    cp_rank: int
    topology: cp.Topology
    device_type: str = "cpu"
    pad_to_multiple: int = 1  # sequence parallelism: local rows padded to a multiple of the TP size


def prepare_plan(plan, rank: int, device_type: str = "cpu") -> None:
    """Precompute a plan's per-rank execution state here (in the worker) instead of in the first layer:
    index tables and the block kernel's tables, on the host; the first layer only uploads them."""
    plan.prepare(rank, device_type)


class PlannedBatches(torch.utils.data.Dataset):
    """Global micro-batch index -> :class:`MicroBatch` for one CP rank (see the module docstring), over any
    map-style dataset of packs (:class:`Packs`, or a megatron-core ``BlendedDataset`` /
    :class:`~megatron.training.datasets.PackedDocumentDataset`, whose items carry the same keys)."""

    def __init__(self, packs, planner: PlannerConfig, with_stats: bool = False):
        self.packs = packs
        self.planner = planner
        self.with_stats = with_stats
        self._planner = None

    def __len__(self) -> int:
        return len(self.packs)

    def __getstate__(self):  # sent to spawned workers: the planner is rebuilt there
        state = dict(self.__dict__)
        state["_planner"] = None
        return state

    def cp_planner(self) -> cp.Planner:
        if self._planner is None:
            self._planner = cp.get_planner(self.planner.backend_name, **self.planner.options)
        return self._planner

    def __getitem__(self, g) -> MicroBatch:
        pack = self.packs[g]
        seqlens = np.asarray(pack["seqlens"], dtype=np.int64)
        inputs, labels = pack["inputs"], pack["labels"]
        p = self.planner
        t0 = time.perf_counter()
        plan = self.cp_planner().plan(seqlens, p.spec, p.topology)
        idx = plan.local_indices(p.cp_rank).numpy()
        prepare_plan(plan, p.cp_rank, p.device_type)
        plan_seconds = time.perf_counter() - t0
        positions = PackedBatch.from_seqlens(seqlens).positions
        stats = {}
        if self.with_stats:
            try:
                st = plan.stats()
                stats = {"comm_bytes_planned": int(st.fwd_inter_node_bytes + st.fwd_intra_node_bytes
                                                   + st.bwd_inter_node_bytes + st.bwd_intra_node_bytes),
                         "inter_node_bytes_planned": int(st.fwd_inter_node_bytes + st.bwd_inter_node_bytes),
                         "compute_imbalance": float(st.compute_imbalance),
                         "cp_buffer_bytes": int(max(st.memory_bytes))}
            except NotImplementedError:
                pass
        pad = (-idx.size) % p.pad_to_multiple
        return MicroBatch(
            index=g[1] if isinstance(g, tuple) else int(g),
            tokens=_padded(inputs[idx], pad),
            labels=_padded(labels[idx], pad),
            loss_mask=torch.cat([torch.ones(idx.size, dtype=torch.float32), torch.zeros(pad, dtype=torch.float32)]),
            position_ids=_padded(positions[idx], pad),
            num_real=int(idx.size),
            seqlens=seqlens,
            plan=plan,
            plan_seconds=plan_seconds,
            attention_pairs=attention_pairs(seqlens, p.spec.mask, p.spec.mask_args),
            plan_stats=stats,
        )


def _padded(values: np.ndarray, pad: int) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(values, dtype=np.int64), np.zeros(pad, dtype=np.int64)]))


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def micro_batch_indices(start_iteration: int, train_iters: int, global_batch: int, dp_rank: int,
                        num_micro: int) -> list[int]:
    """Global micro-batch indices this data-parallel rank consumes, iteration by iteration."""
    return [it * global_batch + dp_rank * num_micro + m
            for it in range(start_iteration, train_iters) for m in range(num_micro)]


def build_loader(dataset: PlannedBatches, indices: list[int], num_workers: int, prefetch: int,
                 timeout: float) -> torch.utils.data.DataLoader:
    # Own generator: creating the loader must not draw from the global torch RNG (dropout), or a resumed
    # run would see different random numbers than the run it continues.
    kwargs = {"generator": torch.Generator().manual_seed(0)}
    if num_workers > 0:
        kwargs.update(multiprocessing_context="spawn", prefetch_factor=prefetch, timeout=timeout,
                      worker_init_fn=_worker_init, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=indices, num_workers=num_workers,
                                       collate_fn=_identity, **kwargs)


def _identity(x):
    return x
