"""The CPU adaptations of megatron-core 0.16.1, applied only where CUDA is absent. Nothing is patched.

megatron-core assumes CUDA in a few places. Measured on torch 2.13 CPU (docs/research/cpu_feasibility.md
in the shared docs) and re-checked for the model this launcher builds, every one of them is *avoided by
configuration*; no megatron function or class is replaced:

1. Weight initialisation. Without ``use_cpu_initialization`` the parallel linear and embedding layers
   allocate on ``torch.cuda.current_device()`` and draw from the CUDA RNG tracker. On CPU we set
   ``use_cpu_initialization=True`` (megatron's own CPU path, seeded by ``torch.manual_seed``; it draws
   each full weight and keeps this tensor-parallel rank's slice, so every TP size starts from the same
   weights).
2. The CUDA RNG tracker (``model_parallel_cuda_manual_seed``) is only read by dropout inside
   megatron's core attention, sequence parallelism and activation recomputation. The core attention
   is ours and the other two are not used on CPU, so on CPU we do not create the tracker (its
   constructor calls ``torch.cuda.get_rng_state``); hidden dropout uses torch's CPU generator.
3. RoPE: megatron's ``RotaryEmbedding.get_emb`` moves its frequencies to ``torch.cuda.current_device()``
   and its CP slicing pins memory. The model is built with ``position_embedding_type="none"`` and our
   core attention applies RoPE from per-token positions (``cp_attention``), so neither runs.
4. Fusions that need CUDA kernels (gradient-accumulation fusion, fused RoPE, fused softmax and
   cross entropy, persistent layer norm) are switched off; in 0.16.1 they are off by default, we set
   them explicitly so a default change cannot turn them on.
5. The local layer spec (``get_gpt_layer_local_spec``) is used instead of the Transformer Engine spec.
6. ``torch.zeros(..., device="cuda")`` inside megatron-core's schedules (``get_forward_backward_func``:
   the token counter) and optimizer (the loss-scale constant, the grad-norm buffers): on CPU these
   calls run inside :func:`cuda_placements_on_cpu`, a ``torch.overrides.TorchFunctionMode`` (torch's
   public mechanism for intercepting its own functions) that turns an explicit ``device="cuda"``
   argument into ``device="cpu"``. It changes nothing else (no attribute of torch or megatron is
   replaced) and is entered only where CUDA is absent.

What configuration cannot reach: megatron-core code that calls ``torch.cuda.current_device()`` itself
(a CUDA-only function, not a placement argument). That rules out, on CPU, megatron's
``DistributedDataParallel`` (its gradient buffers), its pipeline-parallel point-to-point communication
and sequence parallelism's gathers. On CPU the gradient reduction is therefore
:class:`megatron.training.grad_sync.LocalGradSync` (the same interface: ``main_grad``,
``finish_grad_sync``, ``scale_gradients``), pipeline parallelism is refused and so is sequence
parallelism (docs/DECISIONS.md).

On a CUDA machine none of this applies: weights are initialised on the GPU (unless
``--use-cpu-initialization``), the tracker is seeded, the TE spec is used when Transformer Engine is
installed, and the mode is never entered.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_config_overrides() -> dict:
    """``TransformerConfig`` fields that keep megatron-core off its CUDA-only code paths."""
    fusions_off = dict(gradient_accumulation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                       bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
                       cross_entropy_loss_fusion=False)
    if cuda_available():
        return {}
    return dict(use_cpu_initialization=True, **fusions_off)


def seed_model_parallel_rng(seed: int) -> None:
    """Seed megatron's CUDA RNG tracker on GPUs; on CPU there is no tracker to seed (see item 2)."""
    if cuda_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


class _CudaPlacementsOnCpu(TorchFunctionMode):
    """``device="cuda"`` (or ``cuda:N``) in a torch function call becomes ``device="cpu"`` (item 6)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_placements_on_cpu():
    """Context for megatron-core calls that place small tensors with ``device="cuda"``: on CPU they land
    on the CPU (item 6); with CUDA this is a no-op context."""
    if cuda_available():
        return contextlib.nullcontext()
    return _CudaPlacementsOnCpu()
