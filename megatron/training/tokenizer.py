"""SentencePiece tokenizer with the attributes megatron-style data tools expect (``vocab_size``, ``eod``)."""
from __future__ import annotations

import os


class SentencePieceTokenizer:
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
