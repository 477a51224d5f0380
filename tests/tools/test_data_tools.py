"""tools/train_tokenizer.py and tools/preprocess_data.py: text (JSONL or a folder) -> indexed dataset."""
import json

import numpy as np

from megatron.training.data import IndexedDocuments
from megatron.training.tokenizer import SentencePieceTokenizer
from tools import preprocess_data, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "",  # an empty document: reported, not written
    "import os\nprint(os.getcwd())\n" * 20,
] + [f"x{i} = {i} * {i + 1}  # value {i}\n" * (i % 7 + 1) for i in range(60)]


def test_jsonl_and_folder_give_the_same_dataset(tmp_path, capsys):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    folder = tmp_path / "src"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"f{i:03d}.py").write_text(t)
    (folder / "README.txt").write_text("not matched by the pattern")

    assert train_tokenizer.main(["--input", str(jsonl), "--model-prefix", str(tmp_path / "spm"),
                                 "--vocab-size", "400"]) == 0
    tok = SentencePieceTokenizer(str(tmp_path / "spm.model"))
    assert tok.vocab_size == 400
    assert tok.detokenize(tok.tokenize(TEXTS[1])) == TEXTS[1]  # whitespace and newlines survive

    assert preprocess_data.main(["--input", str(jsonl), "--tokenizer-model", str(tmp_path / "spm.model"),
                                 "--output-prefix", str(tmp_path / "a"), "--append-eod"]) == 0
    assert "1 documents with fewer than 2 tokens not written" in capsys.readouterr().out
    assert preprocess_data.main(["--input", str(folder), "--pattern", "*.py", "--tokenizer-model",
                                 str(tmp_path / "spm.model"), "--output-prefix", str(tmp_path / "b"),
                                 "--append-eod"]) == 0
    a, b = IndexedDocuments(str(tmp_path / "a")), IndexedDocuments(str(tmp_path / "b"))
    assert len(a.lengths) == len(TEXTS) - 1 and np.array_equal(a.lengths, b.lengths)
    doc = a.tokens(0, 0, int(a.lengths[0]))
    assert doc[-1] == tok.eod and tok.detokenize(doc[:-1]) == TEXTS[0]
    assert np.array_equal(b.tokens(3, 2, 9), b.tokens(3, 0, int(b.lengths[3]))[2:9])


def test_bad_input_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    assert train_tokenizer.main(["--input", str(bad), "--model-prefix", str(tmp_path / "s")]) == 2
    assert "no key 'text'" in capsys.readouterr().err
    assert preprocess_data.main(["--input", str(tmp_path / "missing"), "--tokenizer-model", "x.model",
                                 "--output-prefix", str(tmp_path / "o")]) == 2


def test_non_utf8_is_handled_alike_in_jsonl_and_folders(tmp_path, capsys):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine\n")
    (folder / "b.txt").write_bytes(b"one\ncaf\xe9 au lait\n")
    for source, where in ((jsonl, f"{jsonl}:2:"), (folder, f"{folder / 'b.txt'}:2:")):
        assert train_tokenizer.main(["--input", str(source), "--model-prefix", str(tmp_path / "s"),
                                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{where} not valid UTF-8 (byte 0xe9 at column" in err and "--encoding-errors replace" in err
    from megatron.training.corpus import iter_documents

    assert list(iter_documents(str(jsonl), encoding_errors="replace"))[1] == "caf\ufffd au lait"
    assert list(iter_documents(str(folder), encoding_errors="replace"))[1] == "one\ncaf\ufffd au lait\n"


def test_empty_corpus_and_oversized_vocabulary(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert train_tokenizer.main(["--input", str(empty), "--model-prefix", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "the corpus is empty" in capsys.readouterr().err
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:6]) + "\n")
    assert train_tokenizer.main(["--input", str(small), "--model-prefix", str(tmp_path / "s"), "--vocab-size",
                                 "8192", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--vocab-size 8192 is more than this corpus supports; the vocabulary is capped at" in out
    capped = SentencePieceTokenizer(str(tmp_path / "s.model")).vocab_size
    assert capped < 8192 and f"(vocab {capped})" in out


def test_a_failed_preprocessing_run_keeps_the_old_dataset(tmp_path, capsys):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    assert train_tokenizer.main(["--input", str(jsonl), "--model-prefix", str(tmp_path / "spm"), "--vocab-size",
                                 "400", "--no-progress"]) == 0
    args = ["--tokenizer-model", str(tmp_path / "spm.model"), "--output-prefix", str(tmp_path / "data" / "d"),
            "--no-progress"]
    assert preprocess_data.main(["--input", str(jsonl), *args]) == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "data").iterdir()}
    assert sorted(before) == ["d.bin", "d.idx"]
    broken = tmp_path / "broken.jsonl"  # fails half-way, after many documents were tokenized
    broken.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS * 3) + "\n{not json}\n")
    assert preprocess_data.main(["--input", str(broken), *args]) == 2
    assert "broken.jsonl:" in capsys.readouterr().err
    after = {f.name: f.read_bytes() for f in (tmp_path / "data").iterdir()}
    assert after == before  # untouched, and no temporary files left behind
