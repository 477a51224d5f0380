"""The attention problem a CP backend solves: heads, head size, mask and scale (`AttentionSpec`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from dcp_backend import masks
from dcp_backend.errors import CPError


@dataclass(frozen=True)
class AttentionSpec:
    """What is attended: heads, KV heads (GQA), head size, mask and softmax scale.

    ``mask`` names a registered range mask (see :mod:`dcp_backend.masks`); ``mask_args`` override its
    defaults. ``softmax_scale=None`` means ``1/sqrt(head_dim)``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mask: str = "causal"
    mask_args: Mapping[str, Any] = field(default_factory=dict)
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CPError(f"AttentionSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CPError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) "
                "for grouped-query attention; choose num_kv_heads that divides num_heads"
            )
        if self.softmax_scale is not None and not (
            isinstance(self.softmax_scale, (int, float)) and math.isfinite(self.softmax_scale) and self.softmax_scale > 0
        ):
            raise CPError(f"softmax_scale must be a positive finite number or None, got {self.softmax_scale!r}")
        # Resolve and validate the mask arguments now, so a typo fails at construction.
        resolved = masks.resolve_mask_args(self.mask, dict(self.mask_args))
        object.__setattr__(self, "mask_args", resolved)

    @property
    def scale(self) -> float:
        return float(self.softmax_scale) if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def key(self) -> tuple:
        """A hashable identity (used in plan fingerprints and caches)."""
        return (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.mask,
            tuple(sorted(self.mask_args.items())),
            self.scale,
        )
