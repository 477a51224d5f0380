"""Checkpoint resume gives identical losses; a rank that dies ends the job with a message; training learns."""
import os
import time

import pytest

from megatron.training.checkpointing import latest_iteration
from megatron.training.training import TrainHooks, pretrain
from tests.distributed import run_ranks
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed


def _quiet(*args, **kwargs):
    pass


def _args(prefix, iters, extra=()):
    return ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 256 "
            f"--train-iters {iters} --lr-decay-iters 6 --lr-warmup-iters 2 --vocab-size {VOCAB} --lr 3e-3 "
            f"--seed 5 --log-interval 1000 --hidden-dropout 0.1 --data-path {prefix} --cp-backend zigzag "
            "--num-workers 0 "
            ).split() + list(extra)


def resume_runs(rank, world_size, prefix, ckpt, extra):
    full = [m["lm_loss"] for m in pretrain(_args(prefix, 6, extra), printer=_quiet)]
    # Save at iteration 3, then resume from it in a new run.
    first = [m["lm_loss"] for m in pretrain(_args(prefix, 3, ["--save", ckpt, *extra]), printer=_quiet)]
    resumed = pretrain(_args(prefix, 6, ["--load", ckpt, *extra]), printer=_quiet)
    return full, first, [(m["consumed_samples"], m["lm_loss"]) for m in resumed]


@pytest.mark.parametrize("optimizer", ["adamw", "distributed"])
def test_resume_gives_identical_losses(tmp_path, optimizer):
    prefix = write_indexed(str(tmp_path / "docs"), documents(60, 2, 200, seed=1))
    ckpt = str(tmp_path / "ckpt")
    extra = ["--use-distributed-optimizer"] if optimizer == "distributed" else []
    for full, first, resumed in run_ranks(resume_runs, 2, prefix, ckpt, extra):
        assert first == full[:3]
        assert [c for c, _ in resumed] == [4, 5, 6]  # consumed samples continue
        # Bit-identical: same data position, weights, optimizer, LR schedule and dropout RNG.
        assert [loss for _, loss in resumed] == full[3:]
    assert latest_iteration(ckpt) == 3
    assert os.path.isfile(os.path.join(ckpt, "iter_0000003", "rng_rank0001.pt"))


def die_at_iteration_two(rank, world_size, prefix):
    def hook(iteration, metrics):
        if rank == 1 and iteration == 2:
            os._exit(17)  # a crash: no cleanup, no message

    t0 = time.monotonic()
    try:
        pretrain(_args(prefix, 50), hooks=TrainHooks(on_iteration=hook), printer=_quiet)
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
    assert "rank 0" in message and "peer rank died" in message
    assert seconds < 60


def learn(rank, world_size, prefix):
    return [m["lm_loss"] for m in pretrain(
        ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 512 --train-iters 40 "
         f"--vocab-size {VOCAB} --lr 1e-2 --lr-warmup-iters 5 --seed 3 --log-interval 1000 --data-path {prefix} "
         "--cp-backend ring --num-workers 0").split(), printer=_quiet)]


def test_training_reduces_the_loss(tmp_path):
    prefix = write_indexed(str(tmp_path / "docs"), documents(200, 100, 500, seed=4))
    losses = run_ranks(learn, 1, prefix)[0]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
