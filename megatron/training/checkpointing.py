"""Save and resume: model, optimizer, LR scheduler, iteration / data position, and every rank's RNG.

Layout (Megatron-like)::

    <dir>/latest_checkpointed_iteration.txt      the newest complete checkpoint
    <dir>/iter_0000100/model_optim.pt            model, optimizer, scheduler, progress (rank 0 writes it)
    <dir>/iter_0000100/rng_rank0003.pt           RNG states of rank 3 (python, numpy, torch, cuda, and
                                                 megatron-core's CUDA RNG tracker)

The model and optimizer are replicated on every rank (no tensor or pipeline parallelism), so one copy is
saved and every rank loads it; a sharded optimizer (``--use-distributed-optimizer``) is gathered on rank 0
first and every rank keeps its shard when loading. A checkpoint does not depend on the CP backend or size. The data position
is the iteration number: the micro-batch schedule is a deterministic function of the data arguments,
which are stored and compared on load. ``latest_checkpointed_iteration.txt`` is written last (atomically),
so an interrupted save never becomes the one that is resumed.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
DATA_KEYS = ("seq_length", "seed", "data_path", "mock_data", "mock_num_documents", "mock_length_scale",
             "split_long_documents", "global_batch_size", "data_parallel_size")


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _cuda_rng_tracker():
    """megatron-core's CUDA RNG tracker (named generator states for model-parallel dropout), if in use."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_rng_tracker"] = _cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        if state.get("cuda_rng_tracker"):
            _cuda_rng_tracker().set_states(state["cuda_rng_tracker"])


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model, optimizer, scheduler, args,
                    rank: int) -> str:
    path = _iter_dir(root, iteration)
    os.makedirs(path, exist_ok=True)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{rank:04d}.pt"))
    if hasattr(optimizer, "consolidate_state_dict"):  # sharded (ZeRO) optimizer: gather on rank 0
        optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": {k: getattr(args, k, None) for k in DATA_KEYS},
            "cp_backend": args.cp_backend,
        }, os.path.join(path, "model_optim.pt"))
    dist.barrier()
    if rank == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return path


def latest_iteration(root: str) -> int | None:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return int(f.read().strip())


def load_checkpoint(root: str, model, optimizer, scheduler, args, rank: int, log=print) -> tuple[int, int]:
    """Restore everything saved by :func:`save_checkpoint`; returns (iteration, consumed samples)."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"--load {root}: no {TRACKER} (nothing has been saved there)")
    path = _iter_dir(root, iteration)
    state = torch.load(os.path.join(path, "model_optim.pt"), map_location="cpu", weights_only=False)
    mismatched = {k: (v, getattr(args, k, None)) for k, v in state["data"].items() if getattr(args, k, None) != v}
    if mismatched and rank == 0:
        log(f"WARNING: data arguments differ from the checkpoint {path} ({mismatched}): "
            "the resumed run will not see the batches the original run would have seen")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{rank:04d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        log(f"WARNING: {path} has no RNG state for rank {rank} (different world size); RNG not restored")
    return int(state["iteration"]), int(state["consumed_samples"])
