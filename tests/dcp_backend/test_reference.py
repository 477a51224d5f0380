"""The softmax scale is pinned to DESIGN.md (``None`` means ``1/sqrt(head_dim)``), and the library's dense
reference agrees with the independent oracle (tests/reference_oracle.py) on every mask, GQA and an
explicit scale."""
import math

import pytest
import torch

import dcp_backend as cp
from dcp_backend.dense_reference import dense_attention
from tests import reference_oracle
from tests.dcp_backend.baselines.test_ring_family import MASKS


@pytest.mark.parametrize("head_dim", [1, 3, 8, 64, 128])
def test_default_softmax_scale_is_inverse_sqrt_head_dim(head_dim):
    assert cp.AttentionSpec(4, 2, head_dim).scale == 1 / math.sqrt(head_dim)
    assert cp.AttentionSpec(4, 2, head_dim, softmax_scale=0.3).scale == 0.3
    assert reference_oracle.softmax_scale(head_dim) == 1 / math.sqrt(head_dim)


def _inputs(seqlens, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(seqlens)
    return (torch.randn(t, h, d, generator=g, dtype=torch.float64),
            torch.randn(t, hkv, d, generator=g, dtype=torch.float64),
            torch.randn(t, hkv, d, generator=g, dtype=torch.float64))


def test_reference_default_scale_equals_explicit_inverse_sqrt():
    seqlens, d = [9, 1, 14], 8
    q, k, v = _inputs(seqlens, 4, 2, d)
    default = dense_attention(q, k, v, seqlens, cp.AttentionSpec(4, 2, d))
    explicit = dense_attention(q, k, v, seqlens, cp.AttentionSpec(4, 2, d, softmax_scale=1 / math.sqrt(d)))
    assert torch.equal(default, explicit)
    assert torch.equal(reference_oracle.attention(q, k, v, seqlens, "causal"),
                       reference_oracle.attention(q, k, v, seqlens, "causal", scale=1 / math.sqrt(d)))
    # the scale matters: 1/head_dim is a different attention
    other = dense_attention(q, k, v, seqlens, cp.AttentionSpec(4, 2, d, softmax_scale=1 / d))
    assert (other - default).abs().max() > 1e-3


@pytest.mark.parametrize("mask,args", MASKS)
def test_library_reference_matches_oracle(mask, args):
    seqlens = [1, 23, 40, 2, 17]
    for (h, hkv), scale in (((4, 2), None), ((4, 4), 0.61), ((6, 2), 2.0)):
        q, k, v = _inputs(seqlens, h, hkv, 8, seed=h + hkv)
        spec = cp.AttentionSpec(h, hkv, 8, mask=mask, mask_args=args, softmax_scale=scale)
        got = dense_attention(q, k, v, seqlens, spec)
        want = reference_oracle.attention(q, k, v, seqlens, mask, args, scale)
        assert (got - want).abs().max() < 1e-12, (mask, args, h, hkv, scale)
