"""Tokenizers: megatron-core's for training (``--tokenizer-type``), and a SentencePiece wrapper for the data
tools (``tools/preprocess_data.py``).

Training reads only two facts from a tokenizer, because the data is tokenized beforehand: the vocabulary
size (padded by ``--make-vocab-size-divisible-by`` x TP) and the end-of-document id. :func:`build_vocabulary`
takes them from megatron-core's tokenizers (``megatron.core.tokenizers``, built by its
``build_tokenizer`` from Megatron-LM's flags): SentencePieceTokenizer / GPTSentencePieceTokenizer /
Llama2Tokenizer (``--tokenizer-model``), NullTokenizer (``--vocab-size V``: ids 0..V-1, EOD = V) and
HuggingFaceTokenizer (``--tokenizer-model``, needs the ``transformers`` package). GPT2BPETokenizer is the
exception: megatron-core 0.16.1 builds it through HuggingFace's ``AutoTokenizer.from_pretrained("gpt2")``
(``transformers`` and network access) and passes the vocabulary file as the merges file, so here the
vocabulary is read from ``--vocab-file`` (GPT-2's ``vocab.json``: size and ``<|endoftext|>``) and
``--merge-file`` is only checked to exist; text is never tokenized by the launcher.
"""
from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class Vocabulary:
    size: int  # before padding
    eod: int
    tokenizer_type: str


# Megatron-LM's tokenizer flags that megatron-core's build_tokenizer reads, with Megatron-LM's defaults.
_MEGATRON_TOKENIZER_DEFAULTS = dict(
    tokenizer_type=None, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None,
    tokenizer_special_tokens=None, tokenizer_hf_use_fast=False, trust_remote_code=False,
    tokenizer_hf_include_special_tokens=False, tokenizer_sentencepiece_legacy=False, tiktoken_pattern=None,
    tiktoken_num_special_tokens=1000, tokenizer_metadata=None)


def build_vocabulary(args) -> Vocabulary:
    """Vocabulary size and EOD id of ``args.tokenizer_type`` (see the module docstring)."""
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
        with open(args.vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict) or "<|endoftext|>" not in vocab:
            raise ValueError(f"--vocab-file {args.vocab_file} is not a GPT-2 vocab.json (a JSON object with "
                             "<|endoftext|>)")
        return Vocabulary(len(vocab), int(vocab["<|endoftext|>"]), kind)
    if kind == "HuggingFaceTokenizer":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ImportError("--tokenizer-type HuggingFaceTokenizer needs the transformers package "
                              "(pip install transformers)")
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    ns = types.SimpleNamespace(**{k: getattr(args, k, v) for k, v in _MEGATRON_TOKENIZER_DEFAULTS.items()})
    tok = build_tokenizer(ns)
    return Vocabulary(int(tok.vocab_size), int(tok.eod), kind)


class SentencePieceTokenizer:
    """SentencePiece with the attributes the data tools expect (``vocab_size``, ``eod``, ``tokenize``)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path} does not exist")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"{model_path} has no end-of-sequence piece; train it with eos_id >= 0 "
                             "(tools/train_tokenizer.py does)")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return int(self._sp.eos_id())

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])
