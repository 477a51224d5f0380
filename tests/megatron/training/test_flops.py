"""FLOPs accounting from real unmasked pairs."""
import pytest

from megatron.training.flops import ModelShape, attention_pairs


def test_attention_pairs_count_real_pairs():
    lens = [5, 1, 12]
    assert attention_pairs(lens, "causal") == sum(n * (n + 1) // 2 for n in lens)
    assert attention_pairs(lens, "full") == sum(n * n for n in lens)
    w = 4
    expected = sum(min(i + 1, w) for n in lens for i in range(n))
    assert attention_pairs(lens, "sliding_window", {"window": w}) == expected


def test_flops_formula():
    s = ModelShape(num_layers=2, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, ffn_hidden_size=16,
                   vocab_size=32, gated_mlp=False)
    # QKV: 8*(4*2 + 2*2*2) = 128 MACs, out proj 4*2*8 = 64, MLP 2*8*16 = 256, logits 8*32 = 256 per token.
    per_token = 6 * (2 * (128 + 64 + 256) + 256)
    assert s.flops_per_token() == per_token
    assert s.flops_per_pair() == 2 * 12 * 4 * 2
    assert s.flops(10, 55) == 10 * per_token + 55 * 2 * 12 * 4 * 2
    gated = ModelShape(2, 8, 4, 2, 2, 16, 32, gated_mlp=True)
    assert gated.flops_per_token() - s.flops_per_token() == pytest.approx(6 * 2 * 8 * 16 * 2 / 2)
