"""The GPT model: megatron-core's ``GPTModel`` from a layer spec whose core attention is our CP module.

``build_layer_spec`` takes megatron-core's local spec (CPU, or GPUs without Transformer Engine) or the
TE spec (GPUs with TE) and replaces only ``self_attention.submodules.core_attention`` with
:class:`~megatron.training.cp_attention.CPCoreAttention`. The layers are megatron's tensor-parallel ones
(``--tensor-model-parallel-size``): a rank holds ``heads / tp`` query heads and ``groups / tp`` KV groups,
so the CP backend plans and runs attention on those local heads (:func:`attention_spec`). Positions enter
through RoPE inside the CP module (``--position-embedding-type rope``) or megatron's learned position
embedding indexed by each token's position in its document (``learned_absolute``); megatron's own RoPE
is never used. With ``--bf16`` / ``--fp16`` the model is megatron's ``Float16Module`` (16-bit parameters
and activations; the optimizer keeps fp32 main parameters).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import dcp_backend as cp
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.training import cpu_compat
from megatron.training.cp_attention import CPContext, RopeSettings, core_attention_spec


def attention_spec(args) -> cp.AttentionSpec:
    """The attention one tensor-parallel rank computes: its local query heads and KV groups."""
    tp = args.tensor_model_parallel_size
    return cp.AttentionSpec(num_heads=args.num_attention_heads // tp, num_kv_heads=args.num_query_groups // tp,
                            head_dim=args.kv_channels, mask=args.attention_mask, mask_args=args.mask_args)


def use_transformer_engine(args) -> bool:
    have_te = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    if args.transformer_impl == "transformer_engine" and not have_te:
        raise RuntimeError("--transformer-impl transformer_engine needs CUDA and Transformer Engine installed")
    return have_te if args.transformer_impl == "auto" else args.transformer_impl == "transformer_engine"


def transformer_config(args) -> TransformerConfig:
    kw = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout, attention_dropout=0.0, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=bool(args.swiglu), activation_func=F.silu if args.swiglu else F.gelu,
        init_method_std=args.init_method_std, rotary_interleaved=args.rotary_interleaved,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, fp16=args.fp16, params_dtype=args.params_dtype, pipeline_dtype=args.params_dtype,
        use_cpu_initialization=args.use_cpu_initialization,
        # The loss of a micro-batch is the sum over its tokens; finalize_model_grads divides the reduced
        # gradients by the token count of the whole global batch (the mean over every token).
        calculate_per_token_loss=True,
    )
    kw.update(cpu_compat.transformer_config_overrides())
    return TransformerConfig(**kw)


def build_layer_spec(args, context: CPContext):
    if use_transformer_engine(args):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=args.normalization)
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(context)
    return spec


def build_model(args, backend: cp.CPBackend, device: torch.device) -> tuple[torch.nn.Module, CPContext]:
    """This rank's GPT model on ``device`` (wrapped in ``Float16Module`` for 16-bit training) and the CP
    context its layers read."""
    rope = None
    if args.position_embedding_type == "rope":
        rope = RopeSettings(kv_channels=args.kv_channels, rotary_percent=args.rotary_percent,
                            rotary_base=args.rotary_base, rotary_interleaved=args.rotary_interleaved,
                            max_positions=args.max_position_embeddings)
    context = CPContext(backend, rope)
    config = transformer_config(args)
    model = GPTModel(
        config=config, transformer_layer_spec=build_layer_spec(args, context),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="learned_absolute" if args.position_embedding_type == "learned_absolute" else "none",
        parallel_output=True,
    )
    model = model.to(device)
    if args.bf16 or args.fp16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model, context


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside DDP / LocalGradSync / Float16Module wrappers."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model
