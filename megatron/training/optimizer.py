"""megatron-core's optimizer and learning-rate schedule, built from Megatron-LM's flags.

``get_megatron_optimizer`` picks the class: ``FP32Optimizer`` (fp32 parameters), ``Float16Optimizer
WithFloat16Params`` (``--bf16`` / ``--fp16``: fp32 main parameters and gradients beside the 16-bit
model) or ``DistributedOptimizer`` (``--use-distributed-optimizer``: main parameters and Adam state
sharded over the data x context parallel ranks); Adam with decoupled weight decay (AdamW), no decay on
biases and 1-D parameters; the grad norm is megatron's (tensor-parallel duplicates counted once).
:func:`optimizer_step` runs megatron's steps (``prepare_grads``, ``get_grad_norm``,
``step_with_ready_grads``) with the clipping in between done here (megatron's clip function asserts
CUDA tensor types), and skips the step on a non-finite norm.
"""
from __future__ import annotations

import math

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.training import cpu_compat


def optimizer_config(args) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, params_dtype=args.params_dtype, loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer)


def build_optimizer(args, model_chunks: list):
    with cpu_compat.cuda_placements_on_cpu():
        optimizer = get_megatron_optimizer(optimizer_config(args), model_chunks, use_gloo_process_groups=False)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return optimizer, scheduler


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, float]:
    """One optimizer step on reduced gradients: (stepped, grad norm). Not stepped when fp16 found an
    overflow or the norm is not finite."""
    with cpu_compat.cuda_placements_on_cpu():
        if optimizer.prepare_grads():  # fp16 overflow (the loss scale was lowered)
            return False, float("nan")
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, grad_norm
        if clip_grad > 0:
            coeff = clip_grad / (grad_norm + 1.0e-6)  # megatron's clip_grad_by_total_norm_fp32
            if coeff < 1.0:
                for p in optimizer.get_parameters():
                    if p.grad is not None:
                        p.grad.mul_(coeff)
        optimizer.step_with_ready_grads()
    return True, grad_norm
