"""Context-parallel core attention for megatron-core's GPT layers, and the per-batch context it reads.

megatron-core builds each layer's core attention from the layer spec; :func:`core_attention_spec`
returns a ``ModuleSpec`` for :class:`CPCoreAttention`, which replaces ``DotProductAttention`` (local
spec) or ``TEDotProductAttention`` (TE spec). Nothing in megatron is patched.

One :class:`CPContext` is shared by every layer. The training loop calls :meth:`CPContext.set_batch`
once per micro-batch with the backend's plan for it and the within-document position of every local
token; every layer then

1. applies rotary position embedding from those positions (the model is built with
   ``position_embedding_type="none"``, so megatron adds no position information itself). The frequency
   table comes from megatron-core's ``RotaryEmbedding`` and is gathered by position, and megatron-core's
   ``apply_rotary_pos_emb`` rotates q and k. Because each token carries its own position inside its own
   document, RoPE is the same whatever order a backend stores tokens in;
2. runs ``backend.attention(q, k, v, plan)`` on this rank's tokens (``[s, heads, head_dim]``; the batch
   dimension is 1: one packed sequence of the tokens named by ``plan.local_indices(rank)``);
3. returns ``[s, 1, heads * head_dim]`` as megatron expects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import dcp_backend as cp
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclass(frozen=True)
class RopeSettings:
    kv_channels: int
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    rotary_interleaved: bool = False
    seq_len_interpolation_factor: float | None = None
    max_positions: int = 4096


class CPContext:
    """State of the current micro-batch, shared by the core attention of every layer."""

    def __init__(self, backend: cp.CPBackend, rope: RopeSettings | None):
        self.backend = backend
        self.rope = rope
        self.plan = None
        self.position_ids: torch.Tensor | None = None
        self.num_real: int | None = None  # local tokens the plan knows; rows beyond are padding
        self._freq_table: torch.Tensor | None = None
        self._emb: torch.Tensor | None = None
        if rope is not None:
            # megatron-core's own inverse frequencies (incl. interpolation), built on CPU.
            rot = RotaryEmbedding(kv_channels=rope.kv_channels, rotary_percent=rope.rotary_percent,
                                  rotary_interleaved=rope.rotary_interleaved,
                                  seq_len_interpolation_factor=rope.seq_len_interpolation_factor,
                                  rotary_base=rope.rotary_base, use_cpu_initialization=True)
            self._freq_table = rot.get_freqs_non_repeated(rope.max_positions)  # [max_pos, rot_dim / 2]

    def set_batch(self, plan, position_ids: torch.Tensor, num_real: int | None = None) -> None:
        """Install the plan and the local tokens' in-document positions (1-D, local storage order).
        ``num_real``: the plan's local tokens come first and any rows after them are padding (sequence
        parallelism needs the local length to be a multiple of the tensor-parallel size); attention
        runs on the real rows and returns zeros for the padding."""
        if position_ids.dim() != 1:
            raise ValueError(f"position_ids must be 1-D (local tokens), got shape {tuple(position_ids.shape)}")
        if self.rope is not None and position_ids.numel() and int(position_ids.max()) >= self.rope.max_positions:
            raise ValueError(
                f"a token has position {int(position_ids.max())} but RoPE covers {self.rope.max_positions} "
                "positions; raise --max-position-embeddings"
            )
        self.plan = plan
        self.position_ids = position_ids
        self.num_real = num_real
        self._emb = None

    def clear(self) -> None:
        self.plan = None
        self.position_ids = None
        self.num_real = None
        self._emb = None

    def rope_emb(self, device: torch.device) -> torch.Tensor:
        """``[s, 1, 1, rot_dim]`` rotary angles of the local tokens, computed once per micro-batch."""
        if self._emb is None or self._emb.device != device:
            if self._freq_table.device != device:  # the constant table moves once, not per micro-batch
                self._freq_table = self._freq_table.to(device)
            freqs = self._freq_table[self.position_ids.to(device, non_blocking=True)]  # [s, rot_dim / 2]
            if self.rope.rotary_interleaved:
                emb = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
            else:
                emb = torch.cat((freqs, freqs), dim=-1)
            self._emb = emb[:, None, None, :]
        return self._emb


class CPCoreAttention(torch.nn.Module):
    """Core attention through a ``dcp_backend`` CP backend; accepts megatron's constructor arguments."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self", *,
                 context: CPContext, **kwargs):
        super().__init__()
        if attention_type != "self":
            raise ValueError(f"CPCoreAttention supports self attention only, got {attention_type!r}")
        self.config = config
        self.layer_number = layer_number
        self.context = context

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        ctx = self.context
        if ctx.plan is None:
            raise RuntimeError("CPCoreAttention: no plan installed; call CPContext.set_batch before the forward")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("CPCoreAttention takes sbhd input with b=1 and no attention bias or packed_seq_params; "
                             "document boundaries and the mask come from the plan")
        s, b, heads, dim = query.shape
        if b != 1:
            raise ValueError(f"CPCoreAttention expects batch dimension 1 (one packed sequence), got {b}")
        if ctx.rope is not None:
            emb = ctx.rope_emb(query.device)
            group = ctx.backend.group if ctx.backend.group is not None else torch.distributed.group.WORLD
            query = apply_rotary_pos_emb(query, emb, config=self.config, cp_group=group)
            key = apply_rotary_pos_emb(key, emb, config=self.config, cp_group=group)
        n = s if ctx.num_real is None else ctx.num_real
        out = ctx.backend.attention(query[:n, 0].contiguous(), key[:n, 0].contiguous(), value[:n, 0].contiguous(),
                                    ctx.plan)
        if n < s:  # padding rows (sequence parallelism): zeros, so they never reach a real token
            out = torch.cat([out, out.new_zeros((s - n,) + tuple(out.shape[1:]))])
        return out.reshape(s, 1, heads * dim)


def core_attention_spec(context: CPContext) -> ModuleSpec:
    return ModuleSpec(module=CPCoreAttention, params={"context": context})
