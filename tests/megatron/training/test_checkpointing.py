"""Checkpoint safety (megatron/training/checkpointing.py): a rank killed while it writes a checkpoint loses
nothing (the next launch resumes from the newest complete checkpoint with identical losses); a damaged newest
checkpoint or tracker falls back to an older complete one with a message; a checkpoint rewritten to run code
runs nothing and stops the launcher with exit code 2 and one line."""
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from megatron.training import checkpointing
from megatron.training.checkpointing import TRACKER, CheckpointError, latest_iteration, saved_iterations
from megatron.training.training import pretrain
from tests.distributed import run_ranks
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _argv(prefix, *extra):
    return ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 256 "
            f"--train-iters 6 --lr-warmup-iters 2 --vocab-size {VOCAB} --lr 3e-3 --seed 5 --log-interval 1000 "
            f"--eval-iters 0 --data-path {prefix} --cp-backend zigzag --context-parallel-size 2 --num-workers 0 "
            "--hidden-dropout 0.1").split() + list(extra)


def _train(argv):
    lines = []
    history = pretrain(argv, printer=lambda line, **_: lines.append(str(line)))
    return [(m["consumed_samples"], m["lm_loss"], m["grad_norm"]) for m in history], lines


def interrupted_save(rank, world_size, prefix, ckpt):
    """The uninterrupted run, then the same run saving every 2 iterations, whose rank 1 is SIGKILLed while it
    writes the checkpoint of iteration 4 (half a shard file on disk)."""
    full, _ = _train(_argv(prefix))
    original = checkpointing._save_torch_dist_on_cpu

    def dying_writer(state, path, r):
        if r == 1 and path.endswith("iter_0000004" + checkpointing.PARTIAL):
            with open(os.path.join(path, "__1_0.distcp"), "wb") as f:
                f.write(b"\x80half a shard")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(state, path, r)

    checkpointing._save_torch_dist_on_cpu = dying_writer
    try:
        _train(_argv(prefix, "--save", ckpt, "--save-interval", "2"))
    except Exception as exc:  # noqa: BLE001 - rank 0 sees its peer die
        return full, f"{type(exc).__name__}: {exc}"
    return full, "no error"


def resume(rank, world_size, prefix, ckpt, save):
    return _train(_argv(prefix, "--load", ckpt, *(["--save", ckpt, "--save-interval", "2"] if save else [])))


def test_a_rank_killed_while_saving_loses_nothing(tmp_path):
    prefix = write_indexed(str(tmp_path / "docs"), documents(80, 2, 200, seed=1))
    ckpt = str(tmp_path / "ckpt")
    out = run_ranks(interrupted_save, 2, prefix, ckpt, allow_failures=True, pg_timeout=20, timeout=300)
    assert out[1][0] == "error" and "without reporting" in out[1][1]  # SIGKILL: no result
    assert out[0][0] == "ok", out[0]
    full, died = out[0][1]
    assert died != "no error"
    # What the dead save left: iteration 2 complete and tracked, iteration 4 only as a .partial directory.
    assert latest_iteration(ckpt) == 2 and saved_iterations(ckpt) == [2]
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004" + checkpointing.PARTIAL))

    # The next launch resumes from the newest complete checkpoint; the losses are the uninterrupted run's.
    (resumed, lines), _ = run_ranks(resume, 2, prefix, ckpt, True, timeout=300)
    assert resumed == full[2:], (resumed, full)
    assert any("resumed from" in line and "iteration 2" in line for line in lines), lines
    assert saved_iterations(ckpt) == [6, 4, 2] and latest_iteration(ckpt) == 6
    assert not [n for n in os.listdir(ckpt) if n.endswith(checkpointing.PARTIAL)]  # the debris was replaced

    # A damaged newest checkpoint (a shard cut short) and an unreadable tracker: back to iteration 4, with
    # a message naming the file; the losses again continue the uninterrupted run.
    newest = os.path.join(ckpt, "iter_0000006")
    shard = max((n for n in os.listdir(newest) if n.endswith(".distcp")),
                key=lambda n: os.path.getsize(os.path.join(newest, n)))
    os.truncate(os.path.join(newest, shard), os.path.getsize(os.path.join(newest, shard)) // 2)
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("six\n")
    (again, lines), _ = run_ranks(resume, 2, prefix, ckpt, False, timeout=300)
    assert again == full[4:], (again, full)
    text = "\n".join(lines)
    assert f"{os.path.join(ckpt, TRACKER)} holds 'six', not an iteration number" in text
    assert f"{os.path.join(newest, shard)} is truncated" in text and "trying an older complete checkpoint" in text


def test_an_unreadable_tracker_names_the_file(tmp_path):
    (tmp_path / TRACKER).write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=f"{tmp_path / TRACKER}: unreadable"):
        latest_iteration(str(tmp_path))
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / ("iter_0000005" + checkpointing.PARTIAL)).mkdir()
    assert saved_iterations(str(tmp_path)) == [3]  # a .partial directory is never a checkpoint


class _Payload:
    """Unpickling this would run code (create a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _launch(prefix, load):
    argv = _argv(prefix, "--load", load)
    argv[argv.index("--context-parallel-size") + 1] = "1"
    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_a_checkpoint_rewritten_to_run_code_runs_nothing(tmp_path):
    """Both pickles of a torch_dist checkpoint: torch's .metadata (vetted by our unpickler before torch reads
    it) and megatron's common.pt (torch.load with weights_only=True)."""
    prefix = write_indexed(str(tmp_path / "docs"), documents(40, 2, 200, seed=2))
    marker = tmp_path / "executed"
    good = tmp_path / "good"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
                        *_argv(prefix, "--save", str(good), "--train-iters", "3", "--context-parallel-size", "1")],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]

    metadata_attack = tmp_path / "metadata_attack"
    shutil.copytree(good, metadata_attack)
    (metadata_attack / "iter_0000003" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    p = _launch(prefix, str(metadata_attack))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error (rank 0): " in p.stderr and "names io.open" in p.stderr and "refusing to load" in p.stderr
    assert "Traceback" not in p.stderr

    common_attack = tmp_path / "common_attack"
    shutil.copytree(good, common_attack)
    torch.save({"x": _Payload(str(marker))}, str(common_attack / "iter_0000003" / "common.pt"))
    p = _launch(prefix, str(common_attack))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "holds pickled objects other than tensors and plain data" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()
