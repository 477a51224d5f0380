"""Megatron-LM's command line for ``pretrain_gpt.py``, and the checks that run before any training.

A Megatron-LM launch script runs here with ``--cp-backend`` added: the flags have Megatron-LM's names and
meaning, and the parallel ones its defaults (``--tensor-model-parallel-size``,
``--pipeline-model-parallel-size``, ``--context-parallel-size`` all 1; world = tp x pp x cp x dp, TP
innermost). What differs, and why:

* A **micro-batch is one packed sequence** of whole documents of at most ``--seq-length`` tokens (batch
  dimension 1: one CP plan per micro-batch). ``--micro-batch-size`` must be 1 (raise ``--seq-length`` for
  more tokens per micro-batch); ``--global-batch-size`` counts packs over the data-parallel replicas, and
  a "sample" in ``consumed samples`` is a pack. Documents are never cut (``--split-long-documents`` to
  cut those longer than the budget).
* ``--pipeline-model-parallel-size`` > 1 is refused (docs/DECISIONS.md); so are ``--bf16``/``--fp16``,
  ``--use-distributed-optimizer``, ``--overlap-grad-reduce`` and ``--sequence-parallel`` without CUDA.
* Defaults that are ours, not Megatron-LM's: ``--attention-dropout 0`` (the CP backends have no
  attention dropout; a non-zero value is an error), ``--hidden-dropout 0``, ``--lr-decay-style cosine``,
  ``--adam-beta2 0.95``, ``--log-interval 10``, ``--num-workers 1`` (planning workers per rank).
* Context parallelism is ours: ``--cp-backend`` picks a ``dcp_backend`` backend, run by each TP rank over
  megatron's CP group of that rank on its local heads; ``--cp-devices-per-node`` overrides its topology
  (default: from the group's global ranks and torchrun's ``LOCAL_WORLD_SIZE``). Every option of every
  backend is a flag prefixed with the backend name (``--dcp-block-size``, ``--loongtrain-head-parallel``,
  ...), generated from the option's field (its type and help text), or ``--cp-option KEY=VALUE``; mask
  arguments are ``--mask-<arg>`` flags or ``--mask-arg KEY=VALUE``.
* Megatron-LM flags that are not implemented are listed below: an IGNORED one prints one line with the
  reason and training goes on, an UNSUPPORTED one stops the run with one line; any other unknown flag is
  argparse's one-line error (no usage dump).

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


TOKENIZER_TYPES = ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer"]


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


def _bool_word(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


# Flag value types from the annotations of option fields (string annotations: the option modules use
# ``from __future__ import annotations``).
_FIELD_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": _str_or_none,
                "int | str": _int_or_auto, "float | str": _float_or_word,
                "bool": _bool_word}


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


class _Parser(argparse.ArgumentParser):
    """argparse with Megatron-LM's flags: a bad flag is one line (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every option)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_gpt.py",
        description="Pretrain a megatron-core GPT with a pluggable context-parallel attention backend. Flags follow "
                    "Megatron-LM (see the module docstring of megatron/training/arguments.py for the differences).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="KV heads (grouped-query attention); default: --num-attention-heads")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron-LM compatibility (GQA follows from --num-query-groups)")
    g.add_argument("--kv-channels", type=int, default=None, help="head dim; default hidden/heads")
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="positions covered (RoPE table or learned embeddings); default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute",
                   help="learned_absolute (Megatron-LM's default): megatron's learned position embedding of each "
                        "token's position in its document; rope: rotary embedding of that position, applied in "
                        "the CP attention")
    g.add_argument("--use-rotary-position-embeddings", dest="position_embedding_type", action="store_const",
                   const="rope", help="Megatron-LM's older spelling of --position-embedding-type rope")
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
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialise weights on the CPU with torch's generator (always on without CUDA): every "
                        "full weight is drawn and each tensor-parallel rank keeps its slice, so a run starts from "
                        "the same weights at every tensor-parallel size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times --tensor-model-parallel-size")
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="layer spec: local megatron-core modules or Transformer Engine (auto: TE on CUDA if installed)")

    g = p.add_argument_group("parallelism (megatron-core parallel_state, rank order tp-cp-ep-dp-pp)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="only 1 (see docs/DECISIONS.md)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="ranks of a context-parallel group; the data-parallel size is world / (tp x pp x cp)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron's sequence parallelism inside tensor-parallel groups (CUDA only)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="megatron-core's DistributedOptimizer: optimizer state and fp32 main parameters sharded "
                        "over the data x context parallel ranks, gradients reduce-scattered (CUDA only)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the gradient reduction with the backward pass (megatron-core DDP, CUDA only)")
    g.add_argument("--distributed-backend", choices=["auto", "gloo", "nccl"], default="auto")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="timeout of every process group and collective (a dead rank ends the job)")

    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True,
                   help="token budget of one micro-batch: whole documents are packed into at most this many tokens")
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="must be 1: a micro-batch is one packed sequence of whole documents (<= --seq-length tokens)")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="micro-batches (packs) per iteration over all data-parallel replicas; default: the "
                        "data-parallel size (x --micro-batch-size)")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--optimizer", choices=["adam"], default="adam", help="Adam with decoupled weight decay (AdamW)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--deterministic-mode", action="store_true",
                   help="torch.use_deterministic_algorithms(True): run-to-run identical results on GPUs too (the "
                        "gradient scatter-adds of the CP backends take torch's deterministic CUDA path); slower")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations, fp32 main parameters and gradients in the optimizer")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 parameters with a dynamic loss scale, fp32 main parameters and gradients")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a constant loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every this many iterations")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="iterations (of --global-batch-size packs) per validation; 0 = no validation or test")

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="megatron.core indexed dataset prefixes (<prefix>.bin/.idx), optionally weighted: "
                        "'0.3 data/a_text_document 0.7 data/b_text_document' (a blend)")
    g.add_argument("--split", default=None,
                   help="train,valid,test shares of every prefix's documents (Megatron-LM's default 969,30,1)")
    g.add_argument("--mock-data", nargs="?", const="uniform", choices=LENGTH_DATASETS, default=None,
                   help="random tokens with synthetic document lengths instead of --data-path (benchmarks); "
                        "the value picks the length distribution (default uniform)")
    g.add_argument("--mock-num-documents", type=int, default=2000)
    g.add_argument("--mock-length-scale", type=float, default=1.0)
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: SentencePieceTokenizer with --tokenizer-model, NullTokenizer with --vocab-size")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece model or HuggingFace tokenizer path")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: vocabulary size (ids 0..V-1; EOD = V)")
    g.add_argument("--split-long-documents", action="store_true",
                   help="split documents longer than --seq-length into budget-sized pieces (default: error)")
    g.add_argument("--num-workers", type=int, default=1,
                   help="data-loader workers per rank that load and plan batches ahead (0: in the training loop)")
    g.add_argument("--plan-prefetch", type=int, default=2, help="batches each worker plans ahead (depth)")
    g.add_argument("--dataloader-timeout", type=float, default=600.0, help="seconds to wait for a planned batch")

    g = p.add_argument_group("context parallelism")
    g.add_argument("--cp-backend", required=True, choices=available_backends())
    g.add_argument("--attention-mask", default="causal", choices=cp_masks.available_masks())
    for arg, typ in sorted(_mask_arg_types().items()):
        g.add_argument(f"--mask-{arg.replace('_', '-')}", dest=f"mask_{arg}", type=typ, default=None,
                       help=f"mask argument {arg}")
    g.add_argument("--mask-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--cp-devices-per-node", type=int, default=None,
                   help="ranks per node of the CP topology (default: the nodes of a CP group's members, from its "
                        "global ranks and torchrun's LOCAL_WORLD_SIZE)")
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
    g.add_argument("--save", default=None, help="checkpoint directory (megatron-core torch_dist format)")
    g.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, with --save) when the iteration is a multiple of this")
    g.add_argument("--load", default=None,
                   help="resume from the newest checkpoint here; an empty or missing directory starts fresh")
    g.add_argument("--no-load-optim", action="store_true", help="load the model only (fresh optimizer)")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load the model only and start at iteration 0 (implies --no-load-optim --no-load-rng)")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="megatron-core's distributed checkpoint format (the only one)")
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


# Megatron-LM flags this launcher does not implement. IGNORED ones have no effect here (one line says why,
# and training goes on); UNSUPPORTED ones would change what the user asked for, so they stop the run with
# one line. The number is how many values the flag takes ("+": one or more).
IGNORED = {
    "--use-mcore-models": (0, "the model is always megatron-core's GPTModel"),
    "--use-legacy-models": (0, "the model is always megatron-core's GPTModel"),
    "--use-flash-attn": (0, "attention runs in the --cp-backend's block kernel"),
    "--attention-backend": (1, "attention runs in the --cp-backend's block kernel"),
    "--no-masked-softmax-fusion": (0, "attention runs in the --cp-backend's block kernel"),
    "--attention-softmax-in-fp32": (0, "the CP block kernels accumulate the softmax in fp32"),
    "--apply-query-key-layer-scaling": (0, "the CP block kernels scale by 1/sqrt(head dim) in fp32"),
    "--no-gradient-accumulation-fusion": (0, "gradient-accumulation fusion is always off"),
    "--accumulate-allreduce-grads-in-fp32": (0, "gradients are always accumulated and reduced in fp32"),
    "--calculate-per-token-loss": (0, "the loss is always the mean over every token of the global batch"),
    "--log-throughput": (0, "throughput is always in the iteration line"),
    "--log-timers-to-tensorboard": (0, "TensorBoard gets the iteration time and the planning wait"),
    "--log-validation-ppl-to-tensorboard": (0, "TensorBoard gets the validation loss and perplexity"),
    "--log-memory-to-tensorboard": (0, "TensorBoard gets the peak memory once"),
    "--log-params-norm": (0, "not logged"),
    "--log-num-zeros-in-grad": (0, "not logged"),
    "--timing-log-level": (1, "no timers beyond the iteration line"),
    "--timing-log-option": (1, "no timers beyond the iteration line"),
    "--no-create-attention-mask-in-dataloader": (0, "no mask is built: document boundaries travel in the plan"),
    "--reset-position-ids": (0, "positions always restart at 0 in every document"),
    "--reset-attention-mask": (0, "a document always attends to itself only"),
    "--eod-mask-loss": (0, "an end-of-document token is never an input of a packed whole document"),
    "--no-position-embedding": (0, "positions come from --position-embedding-type"),
    "--no-bias-swiglu-fusion": (0, "CUDA fusions are off"),
    "--no-bias-gelu-fusion": (0, "CUDA fusions are off"),
    "--no-bias-dropout-fusion": (0, "CUDA fusions are off"),
    "--no-rope-fusion": (0, "RoPE is applied in the CP attention, unfused"),
    "--no-persist-layer-norm": (0, "CUDA fusions are off"),
    "--cross-entropy-loss-fusion": (0, "CUDA fusions are off"),
    "--manual-gc": (0, "Python's collector runs as usual"),
    "--data-cache-path": (1, "pack indices are built in memory at start (no cache)"),
    "--num-dataset-builder-threads": (1, "pack indices are built in memory at start"),
    "--dist-ckpt-strictness": (1, "every key of the model is loaded, strictly"),
    "--auto-detect-ckpt-format": (0, "the format is always torch_dist"),
    "--wandb-project": (1, "no Weights & Biases logging; use --tensorboard-dir"),
    "--wandb-exp-name": (1, "no Weights & Biases logging; use --tensorboard-dir"),
    "--wandb-save-dir": (1, "no Weights & Biases logging; use --tensorboard-dir"),
    "--exit-duration-in-mins": (1, "no time limit is enforced"),
    "--async-save": (0, "checkpoints are saved synchronously"),
}
UNSUPPORTED = {
    "--num-experts": (1, "mixture of experts is not implemented"),
    "--expert-model-parallel-size": (1, "mixture of experts is not implemented"),
    "--moe-router-topk": (1, "mixture of experts is not implemented"),
    "--virtual-pipeline-model-parallel-size": (1, "pipeline parallelism is not supported (docs/DECISIONS.md)"),
    "--num-layers-per-virtual-pipeline-stage": (1, "pipeline parallelism is not supported (docs/DECISIONS.md)"),
    "--rampup-batch-size": (3, "batch-size ramp-up is not implemented"),
    "--train-samples": (1, "give --train-iters (a sample here is one packed micro-batch)"),
    "--lr-warmup-samples": (1, "give --lr-warmup-iters or --lr-warmup-fraction"),
    "--lr-decay-samples": (1, "give --lr-decay-iters"),
    "--recompute-activations": (0, "activation recomputation would re-run the CP attention's communication; not "
                                   "implemented"),
    "--recompute-granularity": (1, "activation recomputation would re-run the CP attention's communication; not "
                                   "implemented"),
    "--recompute-method": (1, "activation recomputation is not implemented"),
    "--recompute-num-layers": (1, "activation recomputation is not implemented"),
    "--fp8-format": (1, "fp8 training is not implemented (the CP block kernels run in bf16/fp16/fp32)"),
    "--fp8": (1, "fp8 training is not implemented (the CP block kernels run in bf16/fp16/fp32)"),
    "--cp-comm-type": ("+", "context parallelism is the --cp-backend's (te: --te-cp-comm-type)"),
    "--hierarchical-context-parallel-sizes": ("+", "context parallelism is the --cp-backend's (its topology: "
                                                   "--cp-devices-per-node)"),
    "--overlap-param-gather": (0, "not wired to the schedule here; use --overlap-grad-reduce"),
    "--use-torch-fsdp2": (0, "use --use-distributed-optimizer"),
    "--use-megatron-fsdp": (0, "use --use-distributed-optimizer"),
    "--mtp-num-layers": (1, "multi-token prediction is not implemented"),
    "--spec": ("+", "the layer spec is megatron-core's GPT spec with the CP attention"),
    "--train-data-path": ("+", "give --data-path with --split"),
    "--valid-data-path": ("+", "give --data-path with --split"),
    "--test-data-path": ("+", "give --data-path with --split"),
    "--use-checkpoint-args": (0, "give the model flags explicitly"),
}


def _scan_megatron_flags(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Remove the flags of IGNORED / UNSUPPORTED (and their values) from ``argv``; returns the rest and one
    line per ignored and per unsupported flag."""
    rest, ignored, unsupported = [], [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        flag, has_inline_value = word.split("=", 1)[0], "=" in word
        table = IGNORED if flag in IGNORED else UNSUPPORTED if flag in UNSUPPORTED else None
        if table is None:
            rest.append(word)
            i += 1
            continue
        nargs, reason = table[flag]
        i += 1
        if not has_inline_value:
            if nargs == "+":
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += nargs
        (ignored if table is IGNORED else unsupported).append(f"{flag}: {reason}")
    return rest, ignored, unsupported


def parse_args(argv=None):
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, ignored, unsupported = _scan_megatron_flags(argv)
    args = build_parser().parse_args(rest)
    args.ignored_flags = ignored
    args.unsupported_flags = unsupported
    return args


def _need(cond, msg) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_args(args, world_size: int, cuda: bool | None = None) -> None:
    """Resolve defaults and check everything that needs neither data nor a process group. ``cuda``: whether
    the job runs on GPUs (default: whether this machine has CUDA; tools that describe a GPU job pass True)."""
    args.cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    _need(not getattr(args, "unsupported_flags", None),
          "; ".join(f"{line.split(':', 1)[0]} is not supported:{line.split(':', 1)[1]}"
                    for line in getattr(args, "unsupported_flags", [])))
    _check_model(args)
    _check_parallel(args, world_size)
    _check_precision(args)
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
    _need(args.transformer_impl != "transformer_engine" or args.cuda,
          "--transformer-impl transformer_engine needs CUDA (and Transformer Engine installed)")
    _need(args.attention_dropout == 0.0, "--attention-dropout must be 0: the CP attention backends have no dropout")
    _need(0.0 <= args.hidden_dropout < 1.0, f"--hidden-dropout must be in [0, 1), got {args.hidden_dropout}")


def _check_parallel(args, world_size: int) -> None:
    """Megatron-LM's layout: world = tensor x pipeline x context x data parallel."""
    tp, pp, cp_size = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    _need(min(tp, pp, cp_size) >= 1, "parallel sizes must be positive")
    _need(pp == 1, f"--pipeline-model-parallel-size {pp} is not supported: megatron-core's pipeline transfers "
                   "allocate on torch.cuda.current_device(), so the pipeline schedule could not be verified with "
                   "per-batch CP plans on the CPU machines this project is tested on (docs/DECISIONS.md)")
    _need(world_size % (tp * pp * cp_size) == 0,
          f"the world size {world_size} is not a multiple of --tensor-model-parallel-size {tp} x "
          f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp_size}")
    _need(args.num_attention_heads % tp == 0 and args.num_query_groups % tp == 0,
          f"--tensor-model-parallel-size {tp} must divide --num-attention-heads ({args.num_attention_heads}) and "
          f"--num-query-groups ({args.num_query_groups}): each tensor-parallel rank holds whole heads and KV groups")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as in Megatron-LM: nothing to split
    _need(not args.sequence_parallel or args.cuda,
          "--sequence-parallel needs CUDA: megatron-core's sequence-parallel gathers allocate on "
          "torch.cuda.current_device()")
    args.data_parallel_size = world_size // (tp * pp * cp_size)
    args.world_size = world_size
    _need(args.micro_batch_size == 1,
          f"--micro-batch-size {args.micro_batch_size}: a micro-batch here is one packed sequence of whole documents "
          "of at most --seq-length tokens (batch dimension 1, one CP plan); raise --seq-length for more tokens per "
          "micro-batch or --global-batch-size for more micro-batches per iteration")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    _need(args.global_batch_size > 0 and args.global_batch_size % args.data_parallel_size == 0,
          f"--global-batch-size {args.global_batch_size} must be a positive multiple of the data-parallel size "
          f"{args.data_parallel_size} (world {world_size} / (tp {tp} x pp {pp} x cp {cp_size}))")
    args.num_micro_batches = args.global_batch_size // args.data_parallel_size
    _need(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive")
    cuda_only = [flag for flag, on in (("--use-distributed-optimizer", args.use_distributed_optimizer),
                                       ("--overlap-grad-reduce", args.overlap_grad_reduce)) if on]
    _need(not cuda_only or args.cuda,
          f"{' and '.join(cuda_only)} need CUDA: megatron-core's DistributedDataParallel allocates its gradient "
          "buffers on torch.cuda.current_device() (on CPU gradients are reduced by our LocalGradSync, "
          "docs/DECISIONS.md)")


def _check_precision(args) -> None:
    _need(not (args.bf16 and args.fp16), "give at most one of --bf16 and --fp16")
    _need(args.cp_backend != "te" or args.bf16 or args.fp16,
          "--cp-backend te needs --bf16 (or --fp16): Transformer Engine's context-parallel attention runs in "
          "bf16/fp16 only")
    _need(not (args.bf16 or args.fp16) or args.cuda,
          f"--{'bf16' if args.bf16 else 'fp16'} needs CUDA: megatron-core's 16-bit optimizer (fp32 main parameters) "
          "accepts CUDA parameters only; train in fp32 on CPU")
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _check_schedule(args) -> None:
    _need(args.lr >= 0 and args.min_lr >= 0 and args.min_lr <= args.lr, "need 0 <= --min-lr <= --lr")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        _need(args.lr_warmup_iters == 0, "give one of --lr-warmup-fraction and --lr-warmup-iters")
        _need(0.0 <= args.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must be in [0, 1)")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    _need(0 <= args.lr_warmup_iters < args.lr_decay_iters,
          f"--lr-warmup-iters ({args.lr_warmup_iters}) must be below --lr-decay-iters ({args.lr_decay_iters})")
    _need(0.0 <= args.adam_beta1 < 1.0 and 0.0 <= args.adam_beta2 < 1.0, "--adam-beta1/2 must be in [0, 1)")
    _need(args.init_method_std > 0, "--init-method-std must be positive")
    _need(args.log_interval > 0, "--log-interval must be positive")
    _need(args.save_interval is None or args.save_interval > 0, "--save-interval must be positive")
    _need(args.exit_interval is None or args.exit_interval > 0, "--exit-interval must be positive")
    _need(args.eval_interval > 0 and args.eval_iters >= 0, "need --eval-interval > 0 and --eval-iters >= 0")
    if args.finetune:
        args.no_load_optim = args.no_load_rng = True


def _check_data(args) -> None:
    _need(args.num_workers >= 0 and args.plan_prefetch >= 1, "need --num-workers >= 0 and --plan-prefetch >= 1")
    _need((not args.data_path) != (args.mock_data is None), "give exactly one of --data-path and --mock-data")
    if args.data_path:
        from megatron.training.datasets import parse_data_path

        try:
            prefixes, weights = parse_data_path(args.data_path)
        except (ValueError, AssertionError) as exc:
            raise ConfigError(f"--data-path {' '.join(args.data_path)}: {exc} (give prefixes, or weight prefix pairs)")
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                _need(os.path.isfile(prefix + suffix),
                      f"--data-path {prefix}: {prefix + suffix} does not exist (write it with tools/preprocess_data.py, "
                      "Megatron-LM's tools/preprocess_data.py or megatron.core's IndexedDatasetBuilder)")
        _need(weights is None or all(w >= 0 for w in weights) and sum(weights) > 0,
              f"--data-path weights must be non-negative and not all zero, got {weights}")
        args.dataset_name = "+".join(os.path.basename(p.rstrip("/")) for p in prefixes)
        if args.split is None:
            args.split = "969,30,1"  # Megatron-LM's default
    else:
        args.dataset_name = f"mock-{args.mock_data}"
        if args.split is None:
            args.split = "969,30,1"
    try:
        shares = [float(x) for x in args.split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        shares = []
    _need(1 <= len(shares) <= 3 and all(x >= 0 for x in shares) and shares[0] > 0,
          f"--split {args.split}: give up to three non-negative train,valid,test shares with a positive train share")
    if args.tokenizer_type is None:
        args.tokenizer_type = ("SentencePieceTokenizer" if args.tokenizer_model else
                               "GPT2BPETokenizer" if args.vocab_file and args.merge_file else "NullTokenizer")
    t = args.tokenizer_type
    if t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer"):
        _need(args.tokenizer_model is not None, f"--tokenizer-type {t} needs --tokenizer-model")
        _need(t == "HuggingFaceTokenizer" or os.path.isfile(args.tokenizer_model),
              f"--tokenizer-model {args.tokenizer_model} does not exist")
    elif t == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
            _need(path is not None and os.path.isfile(path), f"--tokenizer-type GPT2BPETokenizer needs {flag} (an "
                  f"existing file), got {path}")
    else:
        _need(args.vocab_size is not None and args.vocab_size > 0,
              "--tokenizer-type NullTokenizer needs --vocab-size (or give --tokenizer-model)")
    _need(args.load is None or not os.path.isfile(args.load), f"--load {args.load} is a file, not a directory")


def _check_context_parallel(args) -> None:
    """The backend's options (they validate themselves), the mask's arguments and the CP topology."""
    from megatron.training.initialize import cp_topology

    args.backend_options = backend_options(args)
    args.mask_args = mask_args(args)
    try:
        make_options(args.cp_backend, **args.backend_options)
        args.cp_topology = cp_topology(args.world_size, args.tensor_model_parallel_size,
                                       args.pipeline_model_parallel_size, args.context_parallel_size,
                                       args.cp_devices_per_node)
    except cp.CPError as exc:
        raise ConfigError(f"--cp-backend {args.cp_backend}: {exc}") from exc


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Megatron-LM's padding: a multiple of ``divisible_by x tensor_parallel`` (every TP rank gets an equal
    vocabulary shard)."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)
