"""Train / validation / test packs through megatron-core's dataset builder.

``--data-path`` takes what Megatron-LM takes: one prefix, several prefixes, or a weighted blend
(``0.3 data/a_text_document 0.7 data/b_text_document``), each a megatron.core indexed dataset
(``<prefix>.bin/.idx``: Megatron-LM's ``tools/preprocess_data.py``, ours, or ``IndexedDatasetBuilder``).
``--split 969,30,1`` divides each prefix's documents into train, validation and test ranges, and
megatron-core's ``BlendedMegatronDatasetBuilder`` builds the splits and blends them by weight
(``BlendedDataset``). The one thing that differs from Megatron-LM's ``GPTDataset`` is the sample:

* a sample of :class:`PackedDocumentDataset` is a **pack** (one micro-batch): whole documents, shuffled
  per epoch with the seed, packed greedily into at most ``--seq-length`` training tokens (see
  :func:`megatron.training.data.build_schedule`), never cut across packs (unless
  ``--split-long-documents``), each attended on its own, with positions from 0;
* Megatron-LM's ``GPTDataset`` concatenates documents into fixed ``seq_length`` windows, cutting
  documents at window edges, which is what variable-length context parallelism exists to avoid.

A blend therefore mixes packs by weight (each pack comes from one prefix); the number of samples of
each split is counted in packs, as Megatron-LM counts sequences: ``train_iters x global_batch_size``
for training, ``(train_iters // eval_interval + 1) x eval_iters x global_batch_size`` for validation,
``eval_iters x global_batch_size`` for test. ``--mock-data`` is megatron's mock mode (``blend=None``):
random tokens with synthetic document lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron.training.data import IndexedDocuments, MockDocuments, Packs, build_schedule

SPLITS = ("train", "valid", "test")


@dataclass
class PackedDocumentDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron-core's dataset config plus what packing needs (``sequence_length`` is the pack budget)."""

    split_long_documents: bool = False
    mock_lengths: str = "uniform"  # --mock-data: the synthetic document-length distribution
    mock_num_documents: int = 2000
    mock_length_scale: float = 1.0
    vocab_size: int = 0  # the tokenizer's: mock tokens are drawn below it; indexed data is checked against it


class PackedDocumentDataset(MegatronDataset):
    """One split of one document source as packs of whole documents (one pack = one micro-batch).

    Items are ``{"inputs", "labels", "seqlens"}`` (:class:`megatron.training.data.Packs`); ``len`` is the
    number of packs built: at least ``num_samples`` (whole epochs of the split's documents, reshuffled
    each epoch), or one epoch when ``num_samples`` is None."""

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        doc_ids = np.asarray(indices, dtype=np.int64)
        if num_samples == 0:
            self.packs = None
            return
        if doc_ids.size == 0:
            raise ValueError(f"the {index_split.name} split of {dataset_path or 'the mock data'} has no documents "
                             f"(--split {config.split}); give it a share or set --eval-iters 0")
        schedule = build_schedule(dataset.lengths[doc_ids], config.sequence_length, config.random_seed,
                                  config.split_long_documents, num_samples, stream=index_split.value)
        self.packs = Packs(dataset, schedule, doc_ids)
        self.schedule = schedule

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        return int(low_level_dataset.lengths.size)

    @staticmethod
    def build_low_level_dataset(dataset_path, config: PackedDocumentDatasetConfig):
        if dataset_path is None:  # megatron's mock mode
            return MockDocuments(config.mock_lengths, config.mock_num_documents, config.random_seed,
                                 config.sequence_length, config.vocab_size, config.mock_length_scale)
        return IndexedDocuments(dataset_path, vocab_size=config.vocab_size)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split", "split_matrix", "split_long_documents"]

    def __len__(self) -> int:
        return 0 if self.packs is None else len(self.packs)

    def __getitem__(self, idx: int) -> dict:
        return self.packs[int(idx)]


def parse_data_path(words: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path``: prefixes, or weight/prefix pairs (megatron-core's parser)."""
    prefixes, weights = get_blend_from_list(list(words))
    return list(prefixes), (None if weights is None else list(weights))


def num_samples(args) -> list[int]:
    """Packs per split, as Megatron-LM counts sequences (module docstring)."""
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters if args.eval_iters else 0
    return [args.train_iters * args.global_batch_size, evals * args.global_batch_size,
            args.eval_iters * args.global_batch_size]


def build_datasets(args, vocab_size: int) -> dict:
    """``{"train": ..., "valid": ..., "test": ...}`` (a dataset or None each) from the launcher's args."""
    blend = None if args.mock_data is not None else parse_data_path(args.data_path)
    config = PackedDocumentDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        split=args.split if blend is not None else None, path_to_cache=None, mmap_bin_files=True,
        split_long_documents=args.split_long_documents, mock_lengths=args.mock_data or "uniform",
        mock_num_documents=args.mock_num_documents, mock_length_scale=args.mock_length_scale,
        vocab_size=vocab_size)
    sizes = num_samples(args)
    built = BlendedMegatronDatasetBuilder(PackedDocumentDataset, sizes, lambda: True, config).build()
    out = {}
    for name, ds, size in zip(SPLITS, built, sizes):
        out[name] = ds if ds is not None and size > 0 and len(ds) > 0 else None
    return out


def describe(datasets: dict) -> str:
    parts = []
    for name in SPLITS:
        ds = datasets.get(name)
        parts.append(f"{name} {len(ds)} packs" if ds is not None else f"{name} none")
    return ", ".join(parts)


__all__ = ["PackedDocumentDataset", "PackedDocumentDatasetConfig", "build_datasets", "num_samples",
           "parse_data_path", "Split"]
