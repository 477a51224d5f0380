"""Save and resume in megatron-core's distributed checkpoint format (``torch_dist``).

Layout (Megatron-LM's)::

    <dir>/latest_checkpointed_iteration.txt      the newest complete checkpoint (written last, atomically)
    <dir>/iter_0000100/                           megatron.core.dist_checkpointing.save (torch_dist):
        metadata.json, common.pt, .metadata,      model and optimizer as ShardedTensors (each rank writes
        __<rank>_<n>.distcp                       its shards), progress in the common state
    <dir>/iter_0000100/rng/rank_00003.pt          RNG states of rank 3 (tensors and numbers only)

The model's and the optimizer's state are ``ShardedTensor``s from megatron-core's
``sharded_state_dict()`` (the optimizer's mirror the parameters'), so a checkpoint saved at one layout
loads at another: tensor-parallel shards are cut and joined by megatron-core, data- and
context-parallel replicas are written once. The common state (``common.pt``) holds only numbers, strings
and lists: the iteration, consumed samples, the LR schedule, the data arguments (compared on load) and
the layout (RNG states are restored only at the same layout).

Loading never executes code from the checkpoint: ``common.pt`` and the tensors are read by
``torch.load`` with ``weights_only=True`` (torch's default since 2.6, which megatron-core relies on);
the state contains no ``ShardedObject`` (whose bytes megatron-core would unpickle freely; transformer
engine's ``_extra_state`` entries are left out); and the ``.metadata`` file, which torch's
``FileSystemReader`` unpickles, is first read by :func:`check_metadata` with an unpickler that admits
only the metadata classes of ``torch.distributed.checkpoint`` and refuses anything else before torch
reads it. The RNG files are ``torch.load(weights_only=True)`` too.

A save never damages what is already there: every rank writes into ``iter_XXXXXXX.partial``, files are
fsynced, and only then does rank 0 rename the directory to its final name and, last, rewrite the tracker
(temporary file, fsync, rename). A complete checkpoint is never rewritten (saving an iteration that is
already complete is skipped), so a rank killed during a save leaves at most a ``.partial`` directory, which
the next save of that iteration replaces. Loading takes the tracker's iteration, or the newest
``iter_*`` directory when the tracker is missing or unreadable, checks it (the files the metadata lists
exist and are long enough, no pickled code) and falls back to the next older complete checkpoint with a
message when it is damaged; when none is usable it stops with :class:`CheckpointError` (exit code 2)
naming the damaged file.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
DATA_KEYS = ("seq_length", "seed", "data_path", "split", "mock_data", "mock_num_documents", "mock_length_scale",
             "split_long_documents", "global_batch_size", "data_parallel_size")
LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")


from megatron.training.arguments import ConfigError

PARTIAL = ".partial"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ConfigError):
    """No usable checkpoint where one was asked for (damaged or unreadable files); the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than plain data; it is not loaded."""


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _cuda_rng_tracker():
    """megatron-core's CUDA RNG tracker (named generator states for model-parallel dropout), if in use."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


# ------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG of this process as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_rng_tracker"] = dict(_cuda_rng_tracker().get_states())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        if state.get("cuda_rng_tracker"):
            _cuda_rng_tracker().set_states(state["cuda_rng_tracker"])


# ------------------------------------------------------------------------------ sharded state dicts
def _without_sharded_objects(sharded_state_dict: dict) -> dict:
    """Drop ``ShardedObject`` entries (TE's ``_extra_state``: fp8 metadata, unused here), whose loading
    would unpickle arbitrary bytes."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items() if not isinstance(v, ShardedObject)}
        if isinstance(x, list):
            return [walk(v) for v in x if not isinstance(v, ShardedObject)]
        return x

    return walk(sharded_state_dict)


_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state(model, optimizer, scheduler, args, env, iteration: int, consumed: int, *, loading: bool,
                   with_optimizer: bool = True) -> dict:
    model_sd = _without_sharded_objects(model.sharded_state_dict())
    state = {"model": model_sd,
             "progress": {"iteration": int(iteration), "consumed_samples": int(consumed),
                          "scheduler": scheduler.state_dict(), "cp_backend": args.cp_backend,
                          "data": {k: _plain(getattr(args, k, None)) for k in DATA_KEYS},
                          "layout": {k: int(getattr(args, k)) for k in LAYOUT_KEYS}}}
    if with_optimizer:
        from megatron.training import cpu_compat

        with cpu_compat.cuda_placements_on_cpu():
            state["optimizer"] = _without_sharded_objects(
                optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIM_METADATA))
    return state


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# -------------------------------------------------------------------------------------------- save
def save_checkpoint(root: str, iteration: int, consumed_samples: int, model, optimizer, scheduler, args,
                    env, log=print) -> str:
    """Every rank writes its shards into ``iter_XXXXXXX.partial``; once all are written and fsynced, rank 0
    renames it to ``iter_XXXXXXX`` and then rewrites the tracker (module docstring). An iteration that is
    already saved completely is left as it is."""
    from megatron.core import dist_checkpointing

    path = _iter_dir(root, iteration)
    if os.path.isdir(path):  # complete by construction: only a finished save is renamed to this name
        if env.rank == 0:
            log(f"> {path} is already saved; a complete checkpoint is never rewritten")
        dist.barrier()
        return path
    partial = path + PARTIAL
    if env.rank == 0:
        if os.path.exists(partial):  # left by a save that was interrupted
            shutil.rmtree(partial)
        os.makedirs(partial)
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, args, env, iteration, consumed_samples, loading=False)
    if torch.cuda.is_available():
        dist_checkpointing.save(state, partial)
    else:
        _save_torch_dist_on_cpu(state, partial, env.rank)
    rng_dir = os.path.join(partial, "rng")
    os.makedirs(rng_dir, exist_ok=True)
    rng_file = os.path.join(rng_dir, f"rank_{env.rank:05d}.pt")
    torch.save(rng_state(), rng_file)
    _fsync_file(rng_file)
    dist.barrier()
    if env.rank == 0:
        _fsync_tree(partial)
        os.replace(partial, path)
        _fsync_file(root)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
        _fsync_file(root)
    dist.barrier()
    return path


def _fsync_file(path: str) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        _fsync_file(folder)


def _save_torch_dist_on_cpu(state: dict, path: str, rank: int) -> None:
    """The torch_dist format written without CUDA. megatron-core 0.16.1's torch_dist save strategy needs
    CUDA (its writer calls ``torch.cuda.synchronize()`` and its finalisation broadcasts a tensor on
    ``torch.cuda.current_device()``); on CPU the same steps run with torch's synchronous
    ``FileSystemWriter``: megatron's common-state save, its key translation and save planner, and its
    ``metadata.json``. megatron-core's ``dist_checkpointing.load`` reads the result (tests load it at other
    layouts)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)

    sharded, common = save_preprocess(state, validate_access_integrity=True)
    get_default_save_common_strategy().save_common(common, path)
    sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    dcp.save(mcore_to_pyt_state_dict(sharded, False), storage_writer=dcp.FileSystemWriter(path),
             planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
    if rank == 0:
        save_config(CheckpointingConfig("torch_dist", 1), path)
    dist.barrier()


# -------------------------------------------------------------------------------------------- load
def latest_iteration(root: str) -> int | None:
    """The tracker's iteration; None when there is no tracker. An unreadable tracker is a
    :class:`CheckpointError` naming it."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker, "rb") as f:
            text = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{tracker}: unreadable ({exc})") from None
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text[:20]!r}, not an iteration number")
    return int(text)


def saved_iterations(root: str) -> list[int]:
    """The iterations of ``root``'s complete checkpoint directories (``iter_XXXXXXX``, never ``.partial``),
    newest first."""
    found = [int(m.group(1)) for name in os.listdir(root) if (m := _ITER_DIR.match(name))
             and os.path.isdir(os.path.join(root, name))]
    return sorted(found, reverse=True)


# Classes the .metadata pickle of torch_dist may name (torch.distributed.checkpoint's metadata types,
# torch sizes and dtypes, plain containers); anything else is refused before torch unpickles it.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("pathlib", "PosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"the checkpoint metadata names {module}.{name}, which is not checkpoint "
                                    "metadata; refusing to load it")


def check_metadata(path: str):
    """Read ``<path>/.metadata`` with :class:`_MetadataUnpickler` (no code runs) and refuse a checkpoint
    that stores pickled objects (``BytesStorageMetadata``) rather than tensors; returns the metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete torch_dist checkpoint")
    with open(meta_path, "rb") as f:
        raw = f.read()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{meta_path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{meta_path}: damaged ({type(exc).__name__}: {exc})") from None
    objects = [k for k, v in getattr(metadata, "state_dict_metadata", {}).items()
               if isinstance(v, BytesStorageMetadata)]
    if objects:
        raise UnsafeCheckpointError(f"{path} stores pickled objects ({objects[:3]}...); refusing to load them")
    return metadata


def checkpoint_problem(path: str, world_size: int | None = None) -> str | None:
    """What makes the checkpoint directory ``path`` unusable (naming the file), or None. Checks that the
    files megatron and torch read exist, and that every shard file the metadata lists is long enough for
    the bytes it is said to hold (a truncated write). Raises :class:`UnsafeCheckpointError` for code."""
    for name in ("metadata.json", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{os.path.join(path, name)} is missing"
    try:
        metadata = check_metadata(path)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:
        return str(exc)
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = str(info.relative_path)
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) < size:
            return f"{file} is truncated ({os.path.getsize(file):,} of at least {size:,} bytes)"
    return None


def load_checkpoint(root: str, model, optimizer, scheduler, args, env, log=print) -> tuple[int, int] | None:
    """Restore the newest usable checkpoint of ``root`` into ``model`` (the unwrapped GPTModel), the
    optimizer and the schedule; returns (iteration, consumed samples), or None when ``root`` has no
    checkpoint. A damaged newest checkpoint is skipped with a message for the next older complete one; a
    checkpoint holding code stops the run (:class:`UnsafeCheckpointError`), as does having no usable one."""
    if not os.path.isdir(root):
        return None
    try:
        tracked = latest_iteration(root)
    except CheckpointError as exc:
        tracked = None
        if env.rank == 0:
            log(f"WARNING: {exc}; looking for the newest complete checkpoint in {root} instead")
    found = saved_iterations(root)
    if tracked is None and not found:
        return None
    candidates = [i for i in found if tracked is None or i <= tracked]
    if tracked is not None and tracked not in found and env.rank == 0:
        log(f"WARNING: {os.path.join(root, TRACKER)} names iteration {tracked} but {_iter_dir(root, tracked)} "
            "does not exist; looking for an older complete checkpoint")
    problems = []
    for iteration in candidates:
        path = _iter_dir(root, iteration)
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                return _load(path, model, optimizer, scheduler, args, env, log)
            except UnsafeCheckpointError:
                raise
            except _DamagedCheckpoint as exc:
                problem = str(exc)
        problems.append(problem)
        if env.rank == 0:
            log(f"WARNING: checkpoint {path} is damaged: {problem}; trying an older complete checkpoint")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {root}: {problems[0]}"
                              + (f" (and {len(problems) - 1} older damaged)" if len(problems) > 1 else "")
                              + "; restore the file, or point --load at another directory")
    raise CheckpointError(f"{os.path.join(root, TRACKER)} names iteration {tracked} but {root} holds no complete "
                          "checkpoint; point --load at the directory --save wrote")


class _DamagedCheckpoint(Exception):
    """Reading a checkpoint that passed the file checks failed (its message names the checkpoint)."""


def _load(path: str, model, optimizer, scheduler, args, env, log) -> tuple[int, int]:
    from megatron.core import dist_checkpointing

    with_optimizer = not args.no_load_optim
    state = _sharded_state(model, optimizer, scheduler, args, env, 0, 0, loading=True, with_optimizer=with_optimizer)
    try:  # nothing is modified until this returns; torch's reader raises on every rank alike
        loaded = dist_checkpointing.load(state, path)
    except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Weights only load failed" in str(exc):  # torch.load(weights_only=True) refused a global: code
            raise UnsafeCheckpointError(f"{path} holds pickled objects other than tensors and plain data "
                                        f"(torch refused them: {first[:200]}); refusing to load it") from None
        raise _DamagedCheckpoint(f"{path} cannot be read ({type(exc).__name__}: {first[:300]})") from None
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # left out on purpose (see above)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    progress = loaded["progress"]
    if with_optimizer:
        from megatron.training import cpu_compat

        with cpu_compat.cuda_placements_on_cpu():
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(progress["scheduler"])
    mismatched = {k: (v, _plain(getattr(args, k, None))) for k, v in progress["data"].items()
                  if _plain(getattr(args, k, None)) != v}
    if mismatched and env.rank == 0:
        log(f"WARNING: data arguments differ from the checkpoint {path} ({mismatched}): "
            "the resumed run will not see the batches the original run would have seen")
    same_layout = all(progress["layout"].get(k) == int(getattr(args, k)) for k in LAYOUT_KEYS)
    rng_file = os.path.join(path, "rng", f"rank_{env.rank:05d}.pt")
    if not args.no_load_rng and same_layout and os.path.isfile(rng_file):
        try:
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - refused (code) or damaged: either way, one line naming it
            raise CheckpointError(f"{rng_file}: not loadable as plain tensors ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:200]}); pass --no-load-rng to skip it") from None
        set_rng_state(rng)
    elif not args.no_load_rng and env.rank == 0:
        log(f"> {path} was saved at layout {progress['layout']}; RNG states are not restored at a different layout")
    if args.finetune:
        return 0, 0
    return int(progress["iteration"]), int(progress["consumed_samples"])
