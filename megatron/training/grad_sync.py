"""Gradient reduction over the data x context parallel ranks: megatron-core's ``DistributedDataParallel``
on GPUs, :class:`LocalGradSync` (the same interface, a flat fp32 buffer and one all-reduce) on CPU.

megatron-core's DDP keeps every gradient in fp32 buffers (``param.main_grad``), reduces them in buckets
(overlapped with the backward pass by ``--overlap-grad-reduce``, reduce-scattered for the
``DistributedOptimizer``), and megatron's ``finalize_model_grads`` then scales them by 1 / (tokens of the
global batch). Its buffers are allocated on ``torch.cuda.current_device()``, which cannot run without
CUDA (megatron/training/cpu_compat.py), so on CPU the model is wrapped in :class:`LocalGradSync`: a
subclass of megatron-core's own DDP template (``_BaseDataParallel``) with the methods megatron's schedule,
``finalize_model_grads`` and optimizers call (``main_grad``, ``no_sync``, ``finish_grad_sync``,
``scale_gradients``, ``zero_grad_buffer``, ``ddp_config``). Gradients are summed over the data x context
parallel group; tensor-parallel ranks hold different shards and are never reduced together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.distributed.data_parallel_base import _BaseDataParallel

import dcp_backend as cp


class LocalGradSync(_BaseDataParallel):
    """All gradients in one fp32 buffer (``param.main_grad`` views), all-reduced (SUM) in one call."""

    def __init__(self, config, ddp_config: DistributedDataParallelConfig, module: torch.nn.Module, group,
                 device: torch.device):
        super().__init__(config=config, module=module)
        self.ddp_config = ddp_config
        self.group = group
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.grad_data = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            p.main_grad = self.grad_data[offset:offset + p.numel()].view(p.shape)
            p.register_post_accumulate_grad_hook(_move_grad_to_main_grad)
            offset += p.numel()

    def finish_grad_sync(self, force_all_reduce: bool | None = False):
        if dist.get_world_size(self.group) > 1:
            try:
                dist.all_reduce(self.grad_data, group=self.group)
            except RuntimeError as exc:
                raise cp.CommunicationError(
                    f"rank {dist.get_rank()}: gradient all-reduce failed: a peer rank died, hung or diverged "
                    f"(--distributed-timeout-minutes bounds every wait). Original error: {exc}") from exc

    def scale_gradients(self, scaling_factor) -> None:
        self.grad_data.mul_(scaling_factor)

    def zero_grad_buffer(self) -> None:
        self.grad_data.zero_()


def _move_grad_to_main_grad(param: torch.Tensor) -> None:
    """Like megatron's DDP backward hook: accumulate ``.grad`` into the fp32 ``main_grad`` and free it."""
    param.main_grad.add_(param.grad)
    param.grad = None


def wrap_model(args, model: torch.nn.Module, env):
    """The model in megatron-core's DDP (CUDA) or :class:`LocalGradSync` (CPU), with the schedule hooks set
    on its config (``no_sync_func``, ``grad_sync_func``, ``finalize_model_grads_func``)."""
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer, check_for_nan_in_grad=False)
    if env.device.type == "cuda":
        from megatron.core.distributed import DistributedDataParallel

        wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        if args.overlap_grad_reduce:
            config.grad_sync_func = wrapped.start_grad_sync
    else:
        wrapped = LocalGradSync(config, ddp_config, model, env.dp_cp_group, env.device)
    config.no_sync_func = wrapped.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped
