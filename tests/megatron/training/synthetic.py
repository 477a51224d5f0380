"""A tiny learnable corpus for training tests: documents are arithmetic progressions modulo the vocabulary
(varied lengths, starts and steps), written as a megatron.core indexed dataset."""
from __future__ import annotations

import numpy as np
import torch

VOCAB = 96


def documents(num_docs: int, min_len: int, max_len: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len + 1))
        start, step = int(rng.integers(0, VOCAB)), int(rng.integers(1, 7))
        docs.append((start + step * np.arange(n)) % VOCAB)
    return docs


def write_indexed(prefix: str, docs) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.as_tensor(np.asarray(d, dtype=np.int64)))
        builder.end_document()
    builder.finalize(get_idx_path(prefix))
    return prefix
