"""Memory per rank, estimated from the configuration and one planned batch (no GPU, no process group).

Five terms, in bytes, for the rank that holds the most (all tensor-parallel ranks hold the same amount;
context-parallel ranks differ only by their tokens and CP buffers, so the rank with the most tokens and
the largest CP buffers of the plan is taken):

* **parameters**: this rank's share (``P``: embedding and output layer split over TP, each layer's
  QKV / projection / MLP split over TP, norms and learned positions whole) x 2 bytes (bf16/fp16) or 4;
* **gradients**: ``4 P`` (megatron's ``main_grad`` buffer is fp32 in every precision);
* **optimizer**: Adam's two moments in fp32 (``8 P``), plus fp32 main parameters for 16-bit models
  (``4 P``); with ``--use-distributed-optimizer`` divided by the data x context parallel size;
* **activations** of one packed micro-batch of ``s`` local tokens (the most any rank of the plan holds),
  what autograd keeps for the backward pass, per layer with ``a`` bytes per element (2 or 4), ``h``
  hidden, ``n`` query heads and ``g`` KV groups of dimension ``d``, FFN ``f``, TP ``t``:

      a s [2 N                        the two norms: input and output (N = 2h), plus the normalised
                                      input before the weight (N = 3h) in torch's unfused RMSNorm
           + (2 n d + 2 g d) / t      q, k, v and the attention output (also the projection's input)
           + (5 if SwiGLU else 2) f/t MLP: fc1 output (2f), x_linear + offset, silu and product (SwiGLU);
                                      fc1 (+ bias) output and GeLU output (GeLU)
           + 4 d (RoPE)]              the cos/sin tables of q and k
      + 4 s n / t                     log-sum-exp (fp32)
      + 2 s h                         dropout masks (bool), when --hidden-dropout > 0

  (with ``--sequence-parallel`` the norm terms and the masks are divided by ``t``),

  (counted with saved-tensor hooks on the local spec: docs/BENCHMARKS.md), plus the final norm (``a s N``)
  and the logits: the fp32 softmax megatron's vocab-parallel cross entropy keeps (``4 s V/t``) and, for a
  16-bit model, the logits themselves until it has made that copy (``a s V/t``); and one more layer for
  the backward pass, whose gradients of a layer's tensors coexist with that layer's saved ones;
* **CP buffers**: the plan's ``PlanStats.memory_bytes`` (the backend's per-plan stores and transfer
  buffers), taken from a real plan of the batch on the CP topology.

One micro-batch is live at a time (no pipeline parallelism), so the peak is the sum. Checked against
measured peak memory on CPU in docs/BENCHMARKS.md; ``tools/memory_report.py`` prints it without launching.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import dcp_backend as cp

MB = 2**20


@dataclass(frozen=True)
class MemoryReport:
    local_parameters: int  # count, this rank
    parameters: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    cp_buffers: int
    tokens: int  # local tokens of the micro-batch the activations are for

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.cp_buffers

    def as_dict(self) -> dict:
        return {"local_parameters": self.local_parameters, "parameters_bytes": self.parameters,
                "gradients_bytes": self.gradients, "optimizer_bytes": self.optimizer,
                "activations_bytes": self.activations, "cp_buffers_bytes": self.cp_buffers,
                "tokens_per_rank": self.tokens, "total_bytes": self.total}

    def line(self, prefix: str = "memory per rank") -> str:
        return (f"{prefix} (MB) | parameters: {self.parameters / MB:.1f} ({self.local_parameters:,}) | gradients: "
                f"{self.gradients / MB:.1f} | optimizer: {self.optimizer / MB:.1f} | activations: "
                f"{self.activations / MB:.1f} ({self.tokens} tokens) | CP buffers: {self.cp_buffers / MB:.1f} | "
                f"total: {self.total / MB:.1f} |")


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def count_local_parameters(args) -> int:
    """Parameters of one tensor-parallel rank (the analytic count of megatron's GPT layers)."""
    t, h, L = args.tensor_model_parallel_size, args.hidden_size, args.num_layers
    n, g, d, f = args.num_attention_heads, args.num_query_groups, args.kv_channels, args.ffn_hidden_size
    bias = not args.disable_bias_linear
    norm = 2 * h if args.normalization == "LayerNorm" else h  # weight (+ bias)
    qkv = h * (n + 2 * g) * d // t + ((n + 2 * g) * d // t if bias else 0)
    proj = n * d * h // t + (h if bias else 0)
    fc1_out = (2 if args.swiglu else 1) * f // t
    mlp = h * fc1_out + (fc1_out if bias else 0) + f // t * h + (h if bias else 0)
    layer = 2 * norm + qkv + proj + mlp
    vocab = args.padded_vocab_size // t * h
    positions = args.max_position_embeddings * h if args.position_embedding_type == "learned_absolute" else 0
    output = vocab if args.untie_embeddings_and_output_weights else 0
    return L * layer + vocab + positions + norm + output


def activation_bytes(args, tokens: int, transformer_engine: bool | None = None) -> int:
    """What autograd keeps for one micro-batch of ``tokens`` local tokens (module docstring).
    ``transformer_engine``: fused TE norms (default: a CUDA job's)."""
    t, h, L, s = args.tensor_model_parallel_size, args.hidden_size, args.num_layers, int(tokens)
    n, g, d, f = args.num_attention_heads, args.num_query_groups, args.kv_channels, args.ffn_hidden_size
    a = 2 if (args.bf16 or args.fp16) else 4
    if transformer_engine is None:
        transformer_engine = bool(getattr(args, "cuda", False)) and args.transformer_impl != "local"
    norm = 3 * h if (args.normalization == "RMSNorm" and not transformer_engine) else 2 * h
    if args.sequence_parallel:  # norms (and the linear layers' saved inputs) hold 1/t of the tokens
        norm //= t
    per_token = 2 * norm + (2 * n * d + 2 * g * d) // t + (5 if args.swiglu else 2) * f // t
    if args.position_embedding_type == "rope":
        per_token += 4 * d
    masks = (2 * s * h // (t if args.sequence_parallel else 1)) if args.hidden_dropout > 0 else 0
    layer = a * s * per_token + 4 * s * n // t + masks
    logits = (4 + (a if a < 4 else 0)) * s * (args.padded_vocab_size // t)
    # + one layer's worth: while a layer runs backward, its saved tensors and the gradients of the same
    # shapes are alive together (the backward working set).
    return (L + 1) * layer + a * s * norm + logits


def optimizer_bytes(args, params: int) -> int:
    per_param = 12 if (args.bf16 or args.fp16) else 8
    shards = args.data_parallel_size * args.context_parallel_size if args.use_distributed_optimizer else 1
    return per_param * params // shards


def plan_memory(args, seqlens, backend_options: dict) -> tuple[int, int]:
    """(most local tokens, largest CP buffers in bytes) of a real plan of ``seqlens`` on the CP topology."""
    from megatron.training.model import attention_spec

    plan = cp.get_planner(args.cp_backend, **backend_options).plan(np.asarray(seqlens), attention_spec(args),
                                                                  args.cp_topology)
    stats = plan.stats(element_size=2 if (args.bf16 or args.fp16) else 4)
    return int(max(stats.tokens)), int(max(stats.memory_bytes))


def estimate(args, seqlens, backend_options: dict | None = None, local_parameters: int | None = None) -> MemoryReport:
    """The per-rank report for a micro-batch of documents ``seqlens`` (validated ``args``, padded vocab set);
    ``local_parameters``: the count of a built model (default: :func:`count_local_parameters`)."""
    params = int(local_parameters) if local_parameters is not None else count_local_parameters(args)
    tokens, buffers = plan_memory(args, seqlens, backend_options if backend_options is not None
                                  else args.backend_options)
    return MemoryReport(
        local_parameters=params,
        parameters=params * (2 if (args.bf16 or args.fp16) else 4),
        gradients=4 * params,
        optimizer=optimizer_bytes(args, params),
        activations=activation_bytes(args, tokens),
        cp_buffers=buffers,
        tokens=tokens,
    )
