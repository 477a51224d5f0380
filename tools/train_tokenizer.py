#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a JSONL file or a folder of text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/spm --vocab-size 4096
    python tools/train_tokenizer.py --input src/ --pattern '*.py' --model-prefix data/spm --vocab-size 2048

Writes ``<prefix>.model`` and ``<prefix>.vocab``. Whitespace is kept as is (identity normalisation, no
whitespace collapsing) so source code and other formatted text round-trip; unknown characters fall back
to bytes. Lines are the training sentences; ``--max-sentences`` bounds the work (the first lines of the
documents, in file order, so training is deterministic).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def sentences(path: str, json_key: str, pattern: str, max_sentences: int, max_bytes: int):
    from megatron.training.corpus import iter_documents

    n = 0
    for doc in iter_documents(path, json_key, pattern):
        for line in doc.split("\n"):
            if not line.strip():
                continue
            yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            n += 1
            if n >= max_sentences:
                return


def train(input_path: str, model_prefix: str, vocab_size: int, json_key: str = "text", pattern: str = "*",
          model_type: str = "bpe", max_sentences: int = 200_000, threads: int = 2) -> str:
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(input_path, json_key, pattern, max_sentences, 4000),
        model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        shuffle_input_sentence=False, num_threads=threads, minloglevel=2,
    )
    return model_prefix + ".model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file or folder of text files")
    p.add_argument("--json-key", default="text")
    p.add_argument("--pattern", default="*", help="file name pattern inside a folder (e.g. '*.py')")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--max-sentences", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = train(a.input, a.model_prefix, a.vocab_size, a.json_key, a.pattern, a.model_type, a.max_sentences,
                     a.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab {a.vocab_size}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
