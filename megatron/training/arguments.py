"""Megatron-LM style command line of ``pretrain_gpt.py`` and the checks that run before any training.

Argument names follow Megatron-LM where it has one (``--num-layers``, ``--num-query-groups``,
``--seq-length``, ``--lr-decay-style``, ``--save``/``--load``, ...). Differences, all deliberate:

* ``--seq-length`` is the *token budget of one micro-batch*: whole documents are packed into it (see
  :mod:`megatron.training.data`); a micro-batch is one packed sequence, so there is no
  ``--micro-batch-size``. ``--global-batch-size`` counts micro-batches (packs) per iteration across
  data-parallel replicas.
* Context parallelism is ours: ``--cp-backend`` picks a ``dcp_backend`` backend and
  ``--context-parallel-size`` (default: the whole world) its group size, ``--cp-devices-per-node`` its
  topology (default: torchrun's ``LOCAL_WORLD_SIZE``). Every option of every backend is a flag prefixed
  with the backend name (``--dcp-block-size``, ``--loongtrain-head-parallel``, ...), generated from the
  option's field (its type and help text), or ``--cp-option KEY=VALUE``; mask arguments are
  ``--mask-<arg>`` flags or ``--mask-arg KEY=VALUE``.

Everything that can be checked without training is checked by :func:`validate_args` (and by
``training.setup``, which also checks the data and the backend) and raises :class:`ConfigError`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os

import torch

import dcp_backend as cp
from dcp_backend import masks as cp_masks
from dcp_backend.registry import available_backends, make_options, options_class
from dcp_backend.workloads import DATASETS as LENGTH_DATASETS


class ConfigError(ValueError):
    """A bad command line or input, found before training starts."""


def _int_or_auto(text: str):
    return text if text == "auto" else int(text)


def _float_or_word(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _str_or_none(text: str):
    return None if text.lower() == "none" else text


# Flag value types from the annotations of option fields (string annotations: the option modules use
# ``from __future__ import annotations``).
_FIELD_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": _str_or_none,
                "int | str": _int_or_auto, "float | str": _float_or_word}


def _field_parser(annotation: str):
    parser = _FIELD_TYPES.get(str(annotation).replace("Optional[", "").rstrip("]"))
    if parser is None:
        raise TypeError(f"no command-line type for an option annotated {annotation!r}")
    return parser


def backend_flags() -> dict[str, list[tuple[str, object, str]]]:
    """Every option of every backend as a ``--<backend>-<option>`` flag: (option, type, help), generated
    from the options dataclass fields (their type annotation and ``metadata["help"]``)."""
    out = {}
    for backend in available_backends():
        cls = options_class(backend)
        out[backend] = [(f.name, _field_parser(f.type), f"{f.metadata.get('help', '')} (default: {f.default})")
                        for f in dataclasses.fields(cls)]
    return out


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}-{name.replace('_', '-')}"


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}_{name}"


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), _parse_value(value.strip())


def _mask_arg_types() -> dict[str, type]:
    types: dict[str, type] = {}
    for name in cp_masks.available_masks():
        for arg, default in cp_masks.resolve_mask_args(name, {}).items():
            types.setdefault(arg, type(default))
    return types


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain a megatron-core GPT with a pluggable context-parallel attention backend.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="KV heads (grouped-query attention); default: --num-attention-heads")
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM compatibility")
    g.add_argument("--kv-channels", type=int, default=None, help="head dim; default hidden/heads")
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="RoPE positions covered; default --seq-length")
    g.add_argument("--position-embedding-type", choices=["rope", "none"], default="rope")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-interleaved", action="store_true")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0, help="must be 0 (CP backends have no dropout)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="layer spec: local megatron-core modules or Transformer Engine (auto: TE on CUDA if installed)")

    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True, help="token budget of one packed micro-batch")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="micro-batches (packs) per iteration over all data-parallel replicas; default: DP size")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--deterministic-mode", action="store_true",
                   help="torch.use_deterministic_algorithms(True): run-to-run identical results on GPUs too (the "
                        "gradient scatter-adds of the CP backends take torch's deterministic CUDA path); slower")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast with fp32 weights and optimizer (CUDA only)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the AdamW state over all ranks (ZeRO-1, torch's ZeroRedundancyOptimizer)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="prefix of a megatron.core indexed dataset (.bin/.idx)")
    g.add_argument("--mock-data", choices=LENGTH_DATASETS, default=None,
                   help="random tokens with synthetic document lengths instead of --data-path (benchmarks)")
    g.add_argument("--mock-num-documents", type=int, default=2000)
    g.add_argument("--mock-length-scale", type=float, default=1.0)
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece model (sets the vocabulary)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size without a tokenizer (mock data)")
    g.add_argument("--split-long-documents", action="store_true",
                   help="split documents longer than --seq-length into budget-sized pieces (default: error)")
    g.add_argument("--num-workers", type=int, default=1,
                   help="data-loader workers per rank that load and plan batches ahead (0: in the training loop)")
    g.add_argument("--plan-prefetch", type=int, default=2, help="batches each worker plans ahead (depth)")
    g.add_argument("--dataloader-timeout", type=float, default=600.0, help="seconds to wait for a planned batch")

    g = p.add_argument_group("context parallelism")
    g.add_argument("--cp-backend", required=True, choices=available_backends())
    g.add_argument("--context-parallel-size", type=int, default=None, help="default: the world size")
    g.add_argument("--attention-mask", default="causal", choices=cp_masks.available_masks())
    for arg, typ in sorted(_mask_arg_types().items()):
        g.add_argument(f"--mask-{arg.replace('_', '-')}", dest=f"mask_{arg}", type=typ, default=None,
                       help=f"mask argument {arg}")
    g.add_argument("--mask-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--cp-devices-per-node", type=int, default=None,
                   help="ranks per node of the CP topology (CP groups are consecutive ranks; default: torchrun's "
                        "LOCAL_WORLD_SIZE, so a group larger than a node spans whole nodes)")
    for backend, flags in backend_flags().items():
        for name, typ, help_text in flags:
            g.add_argument(_flag(backend, name), dest=_dest(backend, name), type=typ, default=None, help=help_text)
    g.add_argument("--cp-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the chosen backend by name (the same as its --<backend>-<option> flag)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-dir", default=None, help="JSONL sidecar (train_log.jsonl) and args.json go here")
    g.add_argument("--log-plan-stats", action="store_true",
                   help="also log each plan's statistics (planned bytes, compute imbalance); computed in the "
                        "planning workers, which costs them time (DCP compiles every rank's program for it)")
    g.add_argument("--tensorboard-dir", default=None, help="default: <log-dir>/tensorboard")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    g.add_argument("--load", default=None)

    g = p.add_argument_group("distributed")
    g.add_argument("--distributed-backend", choices=["auto", "gloo", "nccl"], default="auto")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="timeout of every process group and collective (a dead rank ends the job)")
    return p


def backend_options(args) -> dict:
    """Options for ``dcp_backend.get_backend`` from the flags of the chosen backend (others are errors)."""
    opts: dict = {}
    for backend, flags in backend_flags().items():
        for name, _, _ in flags:
            value = getattr(args, _dest(backend, name))
            if value is None:
                continue
            if backend != args.cp_backend:
                raise ConfigError(f"{_flag(backend, name)} is an option of --cp-backend {backend}, "
                                  f"but --cp-backend is {args.cp_backend}")
            opts[name] = value
    for key, value in args.cp_option:
        opts[key] = value
    return opts


def mask_args(args) -> dict:
    """Arguments of the chosen mask from --mask-* flags and --mask-arg (others are errors)."""
    accepted = set(cp_masks.mask_arg_names(args.attention_mask))
    out = {}
    for arg in _mask_arg_types():
        value = getattr(args, f"mask_{arg}")
        if value is None:
            continue
        if arg not in accepted:
            raise ConfigError(f"--mask-{arg.replace('_', '-')} is not an argument of mask {args.attention_mask!r} "
                              f"(it takes {sorted(accepted) or 'none'})")
        out[arg] = value
    for key, value in args.mask_arg:
        if key not in accepted:
            raise ConfigError(f"--mask-arg {key}: mask {args.attention_mask!r} takes {sorted(accepted) or 'none'}")
        out[key] = value
    return out


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _need(cond, msg) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_args(args, world_size: int) -> None:
    """Resolve defaults and check everything that needs neither data nor a process group."""
    _check_model(args)
    _check_parallel(args, world_size)
    _check_schedule(args)
    _check_data(args)
    _check_context_parallel(args)
    args.padded_vocab_size = None  # set once the tokenizer is known


def _check_model(args) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters"):
        _need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    _need(args.num_query_groups > 0 and args.num_attention_heads % args.num_query_groups == 0,
          f"--num-attention-heads ({args.num_attention_heads}) must be a multiple of --num-query-groups "
          f"({args.num_query_groups})")
    if args.kv_channels is None:
        _need(args.hidden_size % args.num_attention_heads == 0,
              f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
              f"({args.num_attention_heads}), or give --kv-channels")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (int(4 * args.hidden_size * 2 / 3 / 64) * 64 or 64) if args.swiglu \
            else 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _need(not args.bf16 or torch.cuda.is_available(),
          "--bf16 needs CUDA: it is bf16 autocast, and megatron-core's linear layers restore autocast in their "
          "backward for CUDA only; train in fp32 on CPU")
    _need(args.cp_backend != "te" or args.bf16,
          "--cp-backend te needs --bf16: Transformer Engine's context-parallel attention runs in bf16/fp16 only")
    _need(args.transformer_impl != "transformer_engine" or torch.cuda.is_available(),
          "--transformer-impl transformer_engine needs CUDA (and Transformer Engine installed)")
    _need(args.attention_dropout == 0.0, "--attention-dropout must be 0: the CP attention backends have no dropout")
    _need(0.0 <= args.hidden_dropout < 1.0, f"--hidden-dropout must be in [0, 1), got {args.hidden_dropout}")


def _check_parallel(args, world_size: int) -> None:
    cp_size = args.context_parallel_size or world_size
    _need(cp_size >= 1 and world_size % cp_size == 0,
          f"--context-parallel-size {cp_size} must divide the world size {world_size}")
    args.context_parallel_size = cp_size
    args.data_parallel_size = world_size // cp_size
    args.world_size = world_size
    if args.global_batch_size is None:
        args.global_batch_size = args.data_parallel_size
    _need(args.global_batch_size > 0 and args.global_batch_size % args.data_parallel_size == 0,
          f"--global-batch-size {args.global_batch_size} must be a positive multiple of the data-parallel size "
          f"{args.data_parallel_size}")
    args.num_micro_batches = args.global_batch_size // args.data_parallel_size
    _need(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive")


def _check_schedule(args) -> None:
    _need(args.lr >= 0 and args.min_lr >= 0 and args.min_lr <= args.lr, "need 0 <= --min-lr <= --lr")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _need(0 <= args.lr_warmup_iters < args.lr_decay_iters,
          f"--lr-warmup-iters ({args.lr_warmup_iters}) must be below --lr-decay-iters ({args.lr_decay_iters})")
    _need(args.log_interval > 0, "--log-interval must be positive")
    _need(args.save_interval is None or args.save_interval > 0, "--save-interval must be positive")


def _check_data(args) -> None:
    _need(args.num_workers >= 0 and args.plan_prefetch >= 1, "need --num-workers >= 0 and --plan-prefetch >= 1")
    _need((args.data_path is None) != (args.mock_data is None), "give exactly one of --data-path and --mock-data")
    args.dataset_name = (os.path.basename(args.data_path.rstrip("/")) if args.data_path is not None
                         else f"mock-{args.mock_data}")
    if args.data_path is not None:
        for suffix in (".bin", ".idx"):
            _need(os.path.isfile(args.data_path + suffix),
                  f"--data-path {args.data_path}: {args.data_path + suffix} does not exist (run tools/preprocess_data.py)")
    if args.tokenizer_model is not None:
        _need(os.path.isfile(args.tokenizer_model), f"--tokenizer-model {args.tokenizer_model} does not exist")
    else:
        _need(args.vocab_size is not None and args.vocab_size > 0, "give --tokenizer-model or --vocab-size")
    _need(args.load is None or os.path.isdir(args.load), f"--load {args.load} is not a directory")


def _check_context_parallel(args) -> None:
    """The backend's options (they validate themselves), the mask's arguments and the CP topology."""
    args.backend_options = backend_options(args)
    args.mask_args = mask_args(args)
    try:
        make_options(args.cp_backend, **args.backend_options)
        args.cp_topology = cp.Topology.of_ranks(args.context_parallel_size, args.cp_devices_per_node)
    except cp.CPError as exc:
        raise ConfigError(f"--cp-backend {args.cp_backend}: {exc}") from exc


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)
