"""The CP core attention: RoPE from per-token document positions, and documents attended in isolation."""
import torch

import dcp_backend as cp
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.training.arguments import parse_args, validate_args
from megatron.training.cp_attention import CPContext, RopeSettings
from tests.distributed import run_ranks


def test_rope_angles_are_megatrons_gathered_by_position():
    ctx = CPContext(backend=None, rope=RopeSettings(kv_channels=16, rotary_base=500, max_positions=64))
    positions = torch.tensor([5, 0, 63, 5, 17])
    ctx.set_batch(plan=object(), position_ids=positions)
    emb = ctx.rope_emb(torch.device("cpu"))
    freqs = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=500,
                            use_cpu_initialization=True).get_freqs_non_repeated(64)
    full = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # what megatron's get_emb builds for 0..63
    assert torch.equal(emb, full[positions])
    # Rotating a token stored anywhere equals rotating it at its position in a dense sequence.
    cfg = parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64",
                      "--train-iters", "1", "--mock-data", "uniform", "--vocab-size", "8", "--cp-backend", "ring"])
    validate_args(cfg, 1)
    from megatron.training.model import transformer_config

    config = transformer_config(cfg)
    x = torch.randn(64, 1, 2, 16)
    dense = apply_rotary_pos_emb(x, full, config=config, cp_group=object())
    sparse = apply_rotary_pos_emb(x[positions], emb, config=config, cp_group=object())
    assert torch.allclose(sparse, dense[positions])
    try:
        ctx.set_batch(plan=object(), position_ids=torch.tensor([64]))
    except ValueError as exc:
        assert "--max-position-embeddings" in str(exc)
    else:
        raise AssertionError("a position beyond the table must be rejected")


def _per_token_losses(rank, world_size, seqlens, tokens):
    from megatron.core import parallel_state
    from megatron.training.initialize import build_groups
    from megatron.training.model import attention_spec, build_model

    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
                       "64", "--train-iters", "1", "--mock-data", "uniform", "--vocab-size", "50",
                       "--cp-backend", "zigzag", "--attention-mask", "causal"])
    validate_args(args, world_size)
    args.padded_vocab_size = 128
    env = build_groups(1, 1.0, owns=False)
    backend = cp.get_backend("zigzag", group=env.cp_group)
    torch.manual_seed(0)
    model, ctx = build_model(args, backend, env.device)
    spec = attention_spec(args)
    out = []
    for lens, toks in ((seqlens, tokens),) + tuple(((n,), t) for n, t in zip(seqlens, tokens.split(seqlens))):
        plan = backend.plan(list(lens), spec)
        idx = plan.local_indices(rank)
        from dcp_backend.batch import PackedBatch

        pos = torch.from_numpy(PackedBatch.from_seqlens(list(lens)).positions)
        ctx.set_batch(plan, pos[idx])
        labels = torch.roll(toks, -1)
        with torch.no_grad():
            out.append(model(toks[idx][None], pos[idx][None], None, labels=labels[idx][None])[0])
    parallel_state.destroy_model_parallel()
    return out


def test_packed_documents_equal_separate_runs():
    seqlens = (7, 20, 1, 13)
    tokens = torch.randint(0, 50, (sum(seqlens),), generator=torch.Generator().manual_seed(1))
    packed, *alone = run_ranks(_per_token_losses, 1, seqlens, tokens)[0]
    # Labels of the last token of each document are arbitrary here: compare all other positions.
    starts = [0, 7, 27, 28]
    for s, n, single in zip(starts, seqlens, alone):
        assert torch.allclose(packed[s:s + n - 1], single[:n - 1], atol=1e-5)
