"""examples/megatron_lm_gpt.sh, a Megatron-LM launch script (its flags, sizes scaled down for 4 CPU
processes, --cp-backend dcp added), run unmodified end to end on a dataset written by megatron-core's
IndexedDatasetBuilder with a GPT-2 BPE vocabulary: it trains at TP 2 x CP 2, prints Megatron's validation
lines, saves, and a second launch resumes where the first stopped (that a resumed run's losses equal an
uninterrupted run's is tests/megatron/training/test_resume_and_failures.py)."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "megatron_lm_gpt.sh")
ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*8 \|.*lm loss: (\S+) \|")
VALID_LINE = re.compile(r"validation loss at (.+?) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|")


def _launch(tmp_path, ckpt, data, vocab, merges, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "MASTER_PORT": str(_free_port())}
    p = subprocess.run(["bash", SCRIPT, str(ckpt), str(tmp_path / "tb"), vocab, merges, data, *extra], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-2000:] + "\n".join(line for line in p.stderr.splitlines() if "error" in line.lower())[-3000:]
    losses = {int(i): float(v) for i, v in ITER_LINE.findall(p.stdout)}
    return p.stdout, losses, VALID_LINE.findall(p.stdout)


def _free_port():
    from tests.distributed import free_port

    return free_port()


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab["<|endoftext|>"] = VOCAB
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    # Megatron-LM's preprocessing names its output <prefix>_text_document; IndexedDatasetBuilder writes it.
    data = write_indexed(str(d / "my-gpt2_text_document"), documents(2000, 2, 250, seed=6))
    return data, str(d / "vocab.json"), str(d / "merges.txt")


def test_megatron_lm_script_trains_validates_saves_and_resumes(tmp_path, gpt2_files):
    data, vocab, merges = gpt2_files
    ckpt = tmp_path / "ckpt"
    # First launch: stopped after iteration 4 (Megatron-LM's --exit-interval), with its checkpoint there.
    out, first, valid = _launch(tmp_path, ckpt, data, vocab, merges, "--exit-interval", "4")
    assert "> parallel layout: world 4 = tensor 2 x context 2 x data 1 x pipeline 1" in out
    assert "> ignoring --attention-backend" in out
    assert "no checkpoint there yet, starting from iteration 0" in out  # --load of an empty directory
    assert sorted(first) == [1, 2, 3, 4] and [v[0] for v in valid] == ["iteration 4"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    # The same command again: resumes where it stopped, validates, saves, and tests at the end.
    out, second, valid = _launch(tmp_path, ckpt, data, vocab, merges)
    assert f"resumed from {ckpt} at iteration 4" in out
    assert sorted(second) == [5, 6, 7, 8]
    assert "consumed samples:           10 |" in out  # iteration 5 of 2-pack batches
    assert [v[0] for v in valid] == ["iteration 8", "the end of training for val data",
                                     "the end of training for test data"]
    assert all(float(v[1]) < first[1] and float(v[2]) > 1.0 for v in valid)  # it learned; perplexity
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
