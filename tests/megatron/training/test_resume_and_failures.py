"""Checkpoints (megatron-core's torch_dist format): resume gives identical losses, also at another
tensor x context parallel layout; an empty --load directory starts fresh; loading runs no code from the
checkpoint. A rank that dies ends the job with a message; training learns."""
import os
import pickle
import time

import pytest

from megatron.training.checkpointing import UnsafeCheckpointError, check_metadata, latest_iteration
from megatron.training.training import TrainHooks, pretrain
from tests.distributed import run_ranks
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed

TOL = 1e-5


def _quiet(*args, **kwargs):
    pass


def _args(prefix, iters, extra=()):
    return ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 256 "
            f"--train-iters {iters} --lr-decay-iters 6 --lr-warmup-iters 2 --vocab-size {VOCAB} --lr 3e-3 "
            f"--make-vocab-size-divisible-by 64 --seed 5 --log-interval 1000 --eval-iters 0 --data-path {prefix} "
            "--cp-backend zigzag --num-workers 0 "
            ).split() + list(extra)


TP2_CP2 = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2"]
TP1_CP4 = ["--context-parallel-size", "4"]


def losses(argv):
    return [(m["consumed_samples"], m["lm_loss"], m["grad_norm"]) for m in pretrain(argv, printer=_quiet)]


def resume_runs(rank, world_size, prefix, ckpt):
    a, b, c = (os.path.join(ckpt, x) for x in "abc")
    out = {"full_tp2": losses(_args(prefix, 6, TP2_CP2)), "full_tp1": losses(_args(prefix, 6, TP1_CP4))}
    # Save at iteration 3 at one layout, resume at the other (and at the same one, with dropout).
    out["first_tp2"] = losses(_args(prefix, 3, TP2_CP2 + ["--save", a]))
    out["tp2_to_tp1"] = losses(_args(prefix, 6, TP1_CP4 + ["--load", a]))
    out["first_tp1"] = losses(_args(prefix, 3, TP1_CP4 + ["--save", b]))
    out["tp1_to_tp2"] = losses(_args(prefix, 6, TP2_CP2 + ["--load", b]))
    dropout = ["--hidden-dropout", "0.1"]
    out["full_dropout"] = losses(_args(prefix, 6, TP2_CP2 + dropout))
    # --save and --load the same, empty directory: starts fresh, saves at 3, then resumes from it.
    out["fresh_dropout"] = losses(_args(prefix, 3, TP2_CP2 + dropout + ["--save", c, "--load", c]))
    out["resumed_dropout"] = losses(_args(prefix, 6, TP2_CP2 + dropout + ["--save", c, "--load", c]))
    return out


def _close(got, ref, what):
    assert len(got) == len(ref), what
    for (c, loss, norm), (rc, rloss, rnorm) in zip(got, ref):
        assert c == rc, what
        assert abs(loss - rloss) <= TOL * abs(rloss) and abs(norm - rnorm) <= TOL * abs(rnorm), (what, got, ref)


def test_resume_across_layouts_gives_identical_losses(tmp_path):
    prefix = write_indexed(str(tmp_path / "docs"), documents(80, 2, 200, seed=1))
    ckpt = str(tmp_path / "ckpt")
    for out in run_ranks(resume_runs, 4, prefix, ckpt, timeout=600):
        _close(out["full_tp1"], out["full_tp2"], "TP1 x CP4 vs TP2 x CP2")
        assert out["first_tp2"] == out["full_tp2"][:3] and out["first_tp1"] == out["full_tp1"][:3]
        _close(out["tp2_to_tp1"], out["full_tp2"][3:], "saved at TP2 x CP2, resumed at TP1 x CP4")
        _close(out["tp1_to_tp2"], out["full_tp1"][3:], "saved at TP1 x CP4, resumed at TP2 x CP2")
        # Same layout: bit-identical (weights, optimizer, LR schedule, data position and dropout RNG).
        assert out["fresh_dropout"] == out["full_dropout"][:3]
        assert out["resumed_dropout"] == out["full_dropout"][3:]
        assert [c for c, _, _ in out["resumed_dropout"]] == [4, 5, 6]  # consumed samples continue
    assert latest_iteration(os.path.join(ckpt, "c")) == 6
    assert sorted(os.listdir(os.path.join(ckpt, "a", "iter_0000003", "rng"))) == [f"rank_{r:05d}.pt" for r in range(4)]
    check_metadata(os.path.join(ckpt, "a", "iter_0000003"))  # a checkpoint we wrote passes the safety check


class _Payload:
    """Unpickling this would run code (write a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_executes_code_from_a_checkpoint(tmp_path):
    """The two pickles of a torch_dist checkpoint: .metadata (torch's) is vetted by our unpickler, common.pt
    is read by torch.load(weights_only=True) (megatron-core's load on torch >= 2.6)."""
    import torch

    marker = tmp_path / "executed"
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="names .*open.*refusing to load"):
        check_metadata(str(ckpt))
    torch.save({"x": _Payload(str(marker))}, str(ckpt / "common.pt"))
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    with pytest.raises(Exception):
        TorchCommonLoadStrategy().load_common(str(ckpt))
    assert not marker.exists()


def die_at_iteration_two(rank, world_size, prefix):
    def hook(iteration, metrics):
        if rank == 1 and iteration == 2:
            os._exit(17)  # a crash: no cleanup, no message

    t0 = time.monotonic()
    try:
        pretrain(_args(prefix, 50, ["--context-parallel-size", "2"]), hooks=TrainHooks(on_iteration=hook),
                 printer=_quiet)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return type(exc).__name__, str(exc), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def test_dead_rank_ends_the_job_with_a_message(tmp_path):
    prefix = write_indexed(str(tmp_path / "docs"), documents(60, 2, 200, seed=2))
    out = run_ranks(die_at_iteration_two, 2, prefix, allow_failures=True, pg_timeout=30, timeout=120)
    assert out[1][0] == "error" and "exited with code 17" in out[1][1]
    status, (kind, message, seconds) = out[0]
    assert status == "ok"
    assert kind == "CommunicationError", (kind, message)
    assert "rank 0" in message and "peer" in message and "died" in message
    assert seconds < 60


def learn(rank, world_size, prefix):
    return [m["lm_loss"] for m in pretrain(
        ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 512 --train-iters 40 "
         f"--vocab-size {VOCAB} --lr 1e-2 --lr-warmup-iters 5 --seed 3 --log-interval 1000 --data-path {prefix} "
         "--cp-backend ring --num-workers 0 --eval-iters 0").split(), printer=_quiet)]


def test_training_reduces_the_loss(tmp_path):
    prefix = write_indexed(str(tmp_path / "docs"), documents(200, 100, 500, seed=4))
    losses = run_ranks(learn, 1, prefix)[0]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses



def stop_at_iteration_two(rank, world_size, prefix, pid_file):
    import signal

    def hook(iteration, metrics):
        if iteration == 2 and rank == 1:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)  # a hung rank: alive, never answers

    t0 = time.monotonic()
    try:
        pretrain(_args(prefix, 50, ["--context-parallel-size", "2"]), hooks=TrainHooks(on_iteration=hook),
                 printer=_quiet)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = type(exc).__name__, str(exc), time.monotonic() - t0
    else:
        result = "no error", "", time.monotonic() - t0
    if os.path.exists(pid_file):  # what torchrun does once a rank has failed: take the job down
        os.kill(int(open(pid_file).read()), signal.SIGKILL)
    return result


def test_a_stopped_rank_ends_the_job_with_a_message(tmp_path):
    """SIGSTOP: the live rank times out in a collective and says so, within the process-group timeout.
    Data-loader workers: tests/megatron/training/test_data.py."""
    prefix = write_indexed(str(tmp_path / "docs"), documents(60, 2, 200, seed=2))
    out = run_ranks(stop_at_iteration_two, 2, prefix, str(tmp_path / "stopped.pid"), allow_failures=True,
                    pg_timeout=15, timeout=120)
    status, (kind, message, seconds) = out[0]
    assert status == "ok" and kind == "CommunicationError", (kind, message)
    assert "rank 0" in message and seconds < 60
    assert out[1][0] == "error"  # stopped, never reported, then killed
