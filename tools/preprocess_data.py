#!/usr/bin/env python
"""Tokenize documents into a megatron.core indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model data/spm.model \\
        --output-prefix data/corpus --append-eod
    python tools/preprocess_data.py --input src/ --pattern '*.py' --tokenizer-model data/spm.model \\
        --output-prefix data/corpus --append-eod

One document per entry (a JSONL line, or a file of the folder, in sorted path order). A document with
fewer than 2 tokens can train nothing; such documents are not written and their number is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def preprocess(input_path: str, tokenizer_model: str, output_prefix: str, json_key: str = "text",
               pattern: str = "*", append_eod: bool = False) -> dict:
    import torch

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from megatron.training.corpus import iter_documents
    from megatron.training.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(tokenizer_model)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype)
    written = skipped = tokens = 0
    lengths = []
    for text in iter_documents(input_path, json_key, pattern):
        ids = tok.tokenize(text)
        if append_eod:
            ids.append(tok.eod)
        if len(ids) < 2:
            skipped += 1
            continue
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        written += 1
        tokens += len(ids)
        lengths.append(len(ids))
    if written == 0:
        raise ValueError(f"{input_path}: no document has 2 or more tokens")
    builder.finalize(get_idx_path(output_prefix))
    lens = np.asarray(lengths)
    return {"documents": written, "skipped_short": skipped, "tokens": tokens, "min_len": int(lens.min()),
            "median_len": int(np.median(lens)), "max_len": int(lens.max()), "vocab_size": tok.vocab_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file or folder of text files")
    p.add_argument("--json-key", default="text")
    p.add_argument("--pattern", default="*", help="file name pattern inside a folder (e.g. '*.py')")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece model (tools/train_tokenizer.py)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = preprocess(a.input, a.tokenizer_model, a.output_prefix, a.json_key, a.pattern, a.append_eod)
    except (FileNotFoundError, ValueError) as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.output_prefix}.bin/.idx: {s['documents']} documents, {s['tokens']} tokens "
          f"(lengths {s['min_len']}..{s['max_len']}, median {s['median_len']}); "
          f"{s['skipped_short']} documents with fewer than 2 tokens not written; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
