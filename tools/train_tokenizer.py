#!/usr/bin/env python
"""Train a SentencePiece tokenizer on a JSONL file or a folder of text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/spm --vocab-size 4096
    python tools/train_tokenizer.py --input src/ --pattern '*.py' --model-prefix data/spm --vocab-size 2048

Writes ``<prefix>.model`` and ``<prefix>.vocab``. A corpus too small for ``--vocab-size`` distinct pieces
gets the largest vocabulary it supports, with a message. Whitespace is kept as is (identity normalisation, no
whitespace collapsing) so source code and other formatted text round-trip; unknown characters fall back
to bytes. Lines are the training sentences; ``--max-sentences`` bounds the work (the first lines of the
documents, in file order, so training is deterministic).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def sentences(path: str, json_key: str, pattern: str, max_sentences: int, max_bytes: int,
              encoding_errors: str = "strict", progress: bool = True):
    from tqdm import tqdm

    from megatron.training.corpus import iter_documents

    n = 0
    with tqdm(total=max_sentences, desc="reading sentences", unit=" lines", disable=not progress or None,
              file=sys.stderr) as bar:
        for doc in iter_documents(path, json_key, pattern, encoding_errors=encoding_errors):
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                n += 1
                bar.update()
                if n >= max_sentences:
                    return


VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def train(input_path: str, model_prefix: str, vocab_size: int, json_key: str = "text", pattern: str = "*",
          model_type: str = "bpe", max_sentences: int = 200_000, threads: int = 2, encoding_errors: str = "strict",
          progress: bool = True, log=print) -> tuple[str, int]:
    """Train and write ``<model_prefix>.model``; returns (path, vocabulary size). A corpus too small for
    ``vocab_size`` distinct pieces gets the largest vocabulary it supports, with a message."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)

    def run(size: int) -> None:
        failure: list = []  # an error inside the iterator reaches us wrapped by sentencepiece: keep the original

        def feed():
            try:
                yield from sentences(input_path, json_key, pattern, max_sentences, 4000, encoding_errors, progress)
            except (FileNotFoundError, ValueError) as exc:
                failure.append(exc)
                raise

        try:
            _train(spm, feed(), size)
        except RuntimeError:
            if failure:
                raise failure[0] from None
            raise

    def _train(spm, sentence_iterator, size: int) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentence_iterator,
            model_prefix=model_prefix, vocab_size=size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            shuffle_input_sentence=False, num_threads=threads, minloglevel=2,
        )

    try:
        run(vocab_size)
    except RuntimeError as exc:
        m = VOCAB_TOO_HIGH.search(str(exc))
        if not m:
            raise
        capped = int(m.group(2))
        log(f"train_tokenizer.py: --vocab-size {vocab_size} is more than this corpus supports; the vocabulary is "
            f"capped at {capped} (a bigger corpus allows a bigger vocabulary)")
        vocab_size = capped
        run(vocab_size)
    return model_prefix + ".model", vocab_size


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
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                   help="bytes that are not UTF-8: an error naming file:line (strict) or U+FFFD (replace)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path, vocab = train(a.input, a.model_prefix, a.vocab_size, a.json_key, a.pattern, a.model_type,
                            a.max_sentences, a.threads, a.encoding_errors, not a.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab {vocab}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
