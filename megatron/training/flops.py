"""Model FLOPs of one training iteration, counting attention from the real unmasked (query, key) pairs.

Convention (Megatron's ``num_floating_point_operations``): 2 FLOPs per multiply-add, and 3x the forward
for forward + backward (input gradient + weight gradient). With L layers, hidden h, n query heads,
g KV heads (query groups), head dim d, FFN hidden f, padded vocab V, T real tokens in the iteration and
P unmasked (query, key) pairs in the iteration (summed over all documents, per head):

    token-linear  = T * [ L * 6 * (h*(n*d + 2*g*d) + n*d*h)      # QKV and output projections (GQA via g)
                        + L * 6 * h * f * (3 if gated else 2)      # MLP: fc1 (x2 with SwiGLU) and fc2
                        + 6 * h * V ]                              # logits
    attention     = L * 12 * n * d * P                             # QK^T and PV: 4*d per pair per head, x3

P comes from the batch's per-token key ranges (``dcp_backend.masks.build_ranges`` / ``range_lengths``),
so padding, cross-document pairs and masked-out pairs are never credited (unlike ``B * s^2``). Throughput
per device is ``flops / (seconds * 1e12 * world_size)``.
"""
from __future__ import annotations

from dataclasses import dataclass


from dcp_backend.batch import PackedBatch
from dcp_backend.masks import count_pairs


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # padded
    gated_mlp: bool = False

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        return cls(args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups,
                   args.kv_channels, args.ffn_hidden_size, args.padded_vocab_size, bool(args.swiglu))

    def flops_per_token(self) -> float:
        """Token-linear FLOPs (forward + backward) per token."""
        h, n, g, d = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn_proj = 6 * (h * (n * d + 2 * g * d) + n * d * h)
        mlp = 6 * h * self.ffn_hidden_size * (3 if self.gated_mlp else 2)
        return float(self.num_layers * (attn_proj + mlp) + 6 * h * self.vocab_size)

    def flops_per_pair(self) -> float:
        """Attention FLOPs (forward + backward) per unmasked (query, key) pair, all heads and layers."""
        return float(self.num_layers * 12 * self.num_heads * self.head_dim)

    def flops(self, tokens: int, attention_pairs: int) -> float:
        return tokens * self.flops_per_token() + attention_pairs * self.flops_per_pair()


def attention_pairs(seqlens, mask: str, mask_args=None) -> int:
    """Unmasked (query, key) pairs of one packed batch (per head), from the mask's key ranges."""
    return count_pairs(PackedBatch.from_seqlens(seqlens), mask, mask_args)
