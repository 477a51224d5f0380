"""The CP core attention: RoPE from per-token document positions, documents attended in isolation, and
the world-size-1 path equal to megatron-core's own core attention (DotProductAttention)."""
import pytest
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
                       "--cp-backend", "zigzag", "--attention-mask", "causal", "--position-embedding-type", "rope"])
    validate_args(args, world_size)
    args.padded_vocab_size = 128
    env = build_groups(1, 1, 1, 1.0, owns=False)
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
    mcore = _ours_vs_megatron_core(env, n=40)
    parallel_state.destroy_model_parallel()
    return out, mcore


def _ours_vs_megatron_core(env, n):
    """The world-size-1 path (our GPT layers, CP core attention on the ring backend at one rank) against
    megatron-core's own local layer (``DotProductAttention`` with an explicit causal mask) on one causal
    document: the core attention modules on O(1) q/k/v, and whole models with the same weights."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.training.model import attention_spec, build_model, transformer_config

    # No RoPE: megatron's own RoPE path needs CUDA (cpu_compat item 3); ours is tested above.
    args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                       "--num-query-groups", "2", "--seq-length", "64", "--train-iters", "1", "--mock-data",
                       "uniform", "--vocab-size", "50", "--cp-backend", "ring", "--attention-mask", "causal",
                       "--position-embedding-type", "none"])
    validate_args(args, 1)
    args.padded_vocab_size = 64
    backend = cp.get_backend("ring", group=env.cp_group)
    torch.manual_seed(0)
    ours, ctx = build_model(args, backend, env.device)
    config = transformer_config(args)
    theirs = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
                      vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                      share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                      position_embedding_type="none", parallel_output=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    core = theirs.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, DotProductAttention)
    # On CPU, megatron's DotProductAttention forks the CUDA RNG tracker around its dropout and takes its
    # score buffer from the global memory buffer, which allocates on CUDA: the inference tracker (a no-op
    # fork) and a CPU buffer, allocated ahead, keep it on CPU. Nothing is patched.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True)
    parallel_state.get_global_memory_buffer().buffer[("mpu", torch.float32)] = torch.empty(4 * n * n)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    plan = backend.plan([n], attention_spec(args))
    ctx.set_batch(plan, torch.arange(n))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, 1, 4, 16, generator=g)
    k, v = torch.randn(n, 1, 2, 16, generator=g), torch.randn(n, 1, 2, 16, generator=g)
    with torch.no_grad():
        core_ours = ours.decoder.layers[0].self_attention.core_attention(q, k, v, None)
        core_theirs = core(q, k, v, causal)
        tokens = torch.randint(0, 50, (1, n), generator=g)
        pos, labels = torch.arange(n)[None], torch.roll(tokens, -1, 1)
        loss_ours = ours(tokens, pos, None, labels=labels)
        loss_theirs = theirs(tokens, pos, causal, labels=labels)
    return {"core": (core_ours, core_theirs), "loss": (loss_ours, loss_theirs)}


@pytest.fixture(scope="module")
def world_one():
    seqlens = (7, 20, 1, 13)
    tokens = torch.randint(0, 50, (sum(seqlens),), generator=torch.Generator().manual_seed(1))
    out, mcore = run_ranks(_per_token_losses, 1, seqlens, tokens)[0]
    return seqlens, out, mcore


def test_packed_documents_equal_separate_runs(world_one):
    seqlens, (packed, *alone), _ = world_one
    # Labels of the last token of each document are arbitrary here: compare all other positions.
    starts = [0, 7, 27, 28]
    for s, n, single in zip(starts, seqlens, alone):
        assert torch.allclose(packed[s:s + n - 1], single[:n - 1], atol=1e-5)


def test_world_size_one_matches_megatron_core_attention(world_one):
    mcore = world_one[2]
    ours, theirs = mcore["core"]
    assert ours.shape == theirs.shape == (40, 1, 64)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
    ours, theirs = mcore["loss"]
    assert ours.shape == theirs.shape == (1, 40)
    assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
