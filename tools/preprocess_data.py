#!/usr/bin/env python
"""Tokenize documents into a megatron.core indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model data/spm.model \\
        --output-prefix data/corpus --append-eod
    python tools/preprocess_data.py --input src/ --pattern '*.py' --tokenizer-model data/spm.model \\
        --output-prefix data/corpus --append-eod

One document per entry (a JSONL line, or a file of the folder, in sorted path order). A document with
fewer than 2 tokens can train nothing; such documents are not written and their number is reported.
The dataset is built under temporary names and renamed into place at the end: a failed run leaves an
existing dataset of the same prefix as it was, and no partial files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def preprocess(input_path: str, tokenizer_model: str, output_prefix: str, json_key: str = "text",
               pattern: str = "*", append_eod: bool = False, encoding_errors: str = "strict",
               progress: bool = True) -> dict:
    """Build ``<output_prefix>.bin/.idx``. Both are written under temporary names and renamed into place only
    when the whole corpus is done (the .idx last), so a failed run leaves an existing dataset untouched and
    no partial files behind."""
    import torch
    from tqdm import tqdm

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from megatron.training.corpus import iter_documents
    from megatron.training.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(tokenizer_model)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tok.vocab_size)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)
    written = skipped = tokens = 0
    lengths = []
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        docs = iter_documents(input_path, json_key, pattern, encoding_errors=encoding_errors)
        for text in tqdm(docs, desc="tokenizing", unit=" docs", disable=not progress or None, file=sys.stderr):
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
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, get_bin_path(output_prefix))
        os.replace(tmp_idx, get_idx_path(output_prefix))
    finally:
        for leftover in (tmp_bin, tmp_idx):
            if os.path.exists(leftover):
                os.remove(leftover)
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
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                   help="bytes that are not UTF-8: an error naming file:line (strict) or U+FFFD (replace)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = preprocess(a.input, a.tokenizer_model, a.output_prefix, a.json_key, a.pattern, a.append_eod,
                       a.encoding_errors, not a.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.output_prefix}.bin/.idx: {s['documents']} documents, {s['tokens']} tokens "
          f"(lengths {s['min_len']}..{s['max_len']}, median {s['median_len']}); "
          f"{s['skipped_short']} documents with fewer than 2 tokens not written; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
