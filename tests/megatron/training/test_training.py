"""Setup checks of megatron/training/training.py: damaged data and unusable output paths stop the run at setup
(ConfigError, exit code 2) with one line naming the file and the fix, before any iteration runs."""
import os
import subprocess
import sys

import pytest

from megatron.training.arguments import ConfigError
from megatron.training.training import pretrain
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _argv(prefix, *extra):
    return ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 256 --train-iters 2 "
            f"--vocab-size {VOCAB} --data-path {prefix} --cp-backend ring --num-workers 0 --eval-iters 0"
            ).split() + list(extra)


def _setup_error(argv) -> str:
    with pytest.raises(ConfigError) as info:
        pretrain(argv, printer=lambda *a, **k: None)
    return str(info.value)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return write_indexed(str(tmp_path_factory.mktemp("d") / "docs"), documents(40, 2, 200, seed=3))


def _copy(prefix, dest):
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as src, open(str(dest) + ext, "wb") as out:
            out.write(src.read())
    return str(dest)


def test_a_truncated_bin_is_refused_at_setup(tmp_path, prefix):
    bad = _copy(prefix, tmp_path / "cut")
    size = os.path.getsize(bad + ".bin")
    os.truncate(bad + ".bin", size - size // 50)  # 2% shorter, as an interrupted copy leaves it
    msg = _setup_error(_argv(bad))
    assert f"{bad}.bin is {size - size // 50:,} bytes but {bad}.idx describes {size:,}" in msg and "truncated" in msg
    with open(bad + ".bin", "ab") as f:  # longer than the index: a .bin and .idx of different runs
        f.write(b"\0" * (size // 50 + 8))
    assert "longer than its index describes" in _setup_error(_argv(bad))


def test_token_ids_beyond_the_vocabulary_are_refused_at_setup(prefix):
    # the data holds ids up to VOCAB - 1; a smaller tokenizer would crash inside the embedding
    msg = _setup_error(_argv(prefix, "--vocab-size", "64"))  # the last --vocab-size counts
    # (megatron's NullTokenizer adds the end-of-document id to --vocab-size: 65 entries)
    assert f"{prefix}.bin holds token id {VOCAB - 1} but the tokenizer's vocabulary has 65 entries" in msg


def test_a_corrupt_index_is_one_line_naming_it(tmp_path, prefix):
    bad = _copy(prefix, tmp_path / "idx")
    with open(bad + ".idx", "r+b") as f:
        f.write(b"garbage!")
    msg = _setup_error(_argv(bad))
    assert f"{bad}.idx: not a readable megatron-core index" in msg and "\n" not in msg


@pytest.mark.parametrize("flag", ["--save", "--log-dir", "--tensorboard-dir"])
def test_output_paths_that_cannot_be_written_are_refused_at_setup(tmp_path, prefix, flag):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert f"{flag} {a_file} is a file, not a directory" in _setup_error(_argv(prefix, flag, str(a_file)))
    below = a_file / "sub" / "dir"
    assert f"{flag} {below} is under {a_file}, which is a file" in _setup_error(_argv(prefix, flag, str(below)))


def test_load_pointing_at_a_file_is_refused(tmp_path, prefix):
    a_file = tmp_path / "ckpt.pt"
    a_file.write_bytes(b"x")
    assert f"--load {a_file} is a file, not a directory" in _setup_error(_argv(prefix, "--load", str(a_file)))


def test_damaged_data_exits_2_before_training(tmp_path, prefix):
    bad = _copy(prefix, tmp_path / "cut")
    os.truncate(bad + ".bin", os.path.getsize(bad + ".bin") // 2)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *_argv(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error (rank 0): --data-path" in p.stderr and "truncated" in p.stderr
    assert "Traceback" not in p.stderr and "iteration" not in p.stdout
