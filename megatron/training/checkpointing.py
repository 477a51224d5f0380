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
"""
from __future__ import annotations

import io
import os
import pickle
import random

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
DATA_KEYS = ("seq_length", "seed", "data_path", "split", "mock_data", "mock_num_documents", "mock_length_scale",
             "split_long_documents", "global_batch_size", "data_parallel_size")
LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")


class UnsafeCheckpointError(RuntimeError):
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
                    env) -> str:
    """Every rank writes its shards; rank 0 writes the common state and, last, the tracker file."""
    from megatron.core import dist_checkpointing

    path = _iter_dir(root, iteration)
    if env.rank == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, args, env, iteration, consumed_samples, loading=False)
    if torch.cuda.is_available():
        dist_checkpointing.save(state, path)
    else:
        _save_torch_dist_on_cpu(state, path, env.rank)
    rng_dir = os.path.join(path, "rng")
    os.makedirs(rng_dir, exist_ok=True)
    torch.save(rng_state(), os.path.join(rng_dir, f"rank_{env.rank:05d}.pt"))
    dist.barrier()
    if env.rank == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return path


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
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text!r}, not an iteration number")
    return int(text)


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


def check_metadata(path: str) -> None:
    """Read ``<path>/.metadata`` with :class:`_MetadataUnpickler` (no code runs) and refuse a checkpoint
    that stores pickled objects (``BytesStorageMetadata``) rather than tensors."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a torch_dist checkpoint (no .metadata)")
    with open(meta_path, "rb") as f:
        metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    objects = [k for k, v in getattr(metadata, "state_dict_metadata", {}).items()
               if isinstance(v, BytesStorageMetadata)]
    if objects:
        raise UnsafeCheckpointError(f"{path} stores pickled objects ({objects[:3]}...); refusing to load them")


def load_checkpoint(root: str, model, optimizer, scheduler, args, env, log=print) -> tuple[int, int] | None:
    """Restore the newest checkpoint of ``root`` into ``model`` (the unwrapped GPTModel), the optimizer
    and the schedule; returns (iteration, consumed samples), or None when ``root`` has no checkpoint."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if os.path.isdir(root) else None
    if iteration is None:
        return None
    path = _iter_dir(root, iteration)
    check_metadata(path)
    with_optimizer = not args.no_load_optim
    state = _sharded_state(model, optimizer, scheduler, args, env, 0, 0, loading=True, with_optimizer=with_optimizer)
    loaded = dist_checkpointing.load(state, path)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # left out on purpose (see above)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
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
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    elif not args.no_load_rng and env.rank == 0:
        log(f"> {path} was saved at layout {progress['layout']}; RNG states are not restored at a different layout")
    if args.finetune:
        return 0, 0
    return int(progress["iteration"]), int(progress["consumed_samples"])
