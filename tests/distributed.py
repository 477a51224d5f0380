"""Multi-process test harness: run a function on N gloo ranks (spawned processes) and collect results.

Every rank runs ``fn(rank, world_size, *args)`` with a gloo process group whose timeout is short, so a
hang becomes an error; the parent enforces an overall deadline, kills stragglers, and re-raises the
first failing rank's traceback. ``fn`` must be a module-level function (spawn pickles it by name).
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, pg_timeout, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors: the child may exit before the parent reads
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


class RankFailure(AssertionError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        super().__init__(f"rank {first} failed:\n{errors[first]}")


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0, pg_timeout: float = 60.0,
              allow_failures: bool = False):
    """Run ``fn`` on ``world_size`` ranks; returns the per-rank results (list indexed by rank).

    With ``allow_failures`` the per-rank outcome is returned as ``("ok", value)`` / ``("error", text)``
    instead of raising (for tests of failure handling).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, pg_timeout, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
                outcome[rank] = (status, value)
            except queue.Empty:
                # A rank that died without reporting (killed, segfault) counts as a failure.
                for r, p in enumerate(procs):
                    if r not in outcome and not p.is_alive() and p.exitcode not in (0, None):
                        outcome[r] = ("error", f"process exited with code {p.exitcode} without reporting")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world_size) if r not in outcome]
    for r in missing:
        outcome[r] = ("error", f"no result within {timeout:.0f}s (hung or too slow)")
    if allow_failures:
        return [(s, _load(v) if s == "ok" else v) for s, v in (outcome[r] for r in range(world_size))]
    errors = {r: v for r, (s, v) in outcome.items() if s != "ok"}
    if errors:
        raise RankFailure(errors)
    return [_load(outcome[r][1]) for r in range(world_size)]


def _load(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)
