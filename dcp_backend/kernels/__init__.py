"""Block attention kernels: one interface, chosen by device.

``get_kernel("auto", device)`` gives the ATen CPU flash kernel on CPU and, on CUDA, ``flash`` (flash-attn's
varlen kernels for full and causal segments, FlexAttention for the rest) where flash-attn is installed, else
FlexAttention (``flex``); ``"reference"`` is the pure-torch kernel for cross-checks. Users can register their own with
:func:`register_kernel`. See :mod:`dcp_backend.kernels.base` for the contract.
"""
from __future__ import annotations

from typing import Callable

import torch

from dcp_backend.kernels.base import BlockKernel, acc_dtype
from dcp_backend.kernels.merge import merge_into_, merge_many, merge_partial
from dcp_backend.kernels.work import AttnWork
from dcp_backend.errors import CPError

_FACTORIES: dict[str, Callable[[], BlockKernel]] = {}
_INSTANCES: dict[str, BlockKernel] = {}


def register_kernel(name: str, factory: Callable[[], BlockKernel], *, overwrite: bool = False) -> None:
    if name in _FACTORIES and not overwrite:
        raise CPError(f"kernel {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def available_kernels() -> list[str]:
    return sorted(_FACTORIES)


def auto_kernel(device_type: str, flash_installed: bool | None = None) -> str:
    """What ``"auto"`` means on a device type: ``cpu_flash`` on CPU; on GPUs ``flash`` where flash-attn is
    installed (``flash_installed=None``: look), else ``flex``."""
    if device_type == "cpu":
        return "cpu_flash"
    if flash_installed is None:
        from dcp_backend.kernels.flash import flash_attn_installed

        flash_installed = flash_attn_installed()
    return "flash" if flash_installed else "flex"


def get_kernel(name: str = "auto", device: torch.device | str = "cpu") -> BlockKernel:
    """The kernel called ``name`` (``"auto"`` picks by device: :func:`auto_kernel`)."""
    device = torch.device(device)
    if name == "auto":
        name = auto_kernel(device.type)
    if name not in _FACTORIES:
        raise CPError(f"unknown kernel {name!r}; available: {', '.join(available_kernels())} or 'auto'")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def _cpu():
    from dcp_backend.kernels.cpu import CPUFlashKernel

    return CPUFlashKernel()


def _ref():
    from dcp_backend.kernels.reference import ReferenceKernel

    return ReferenceKernel()


def _flex():
    from dcp_backend.kernels.flex import FlexKernel

    return FlexKernel()


def _flash():
    from dcp_backend.kernels.flash import FlashKernel

    return FlashKernel(general=get_kernel("flex"))  # raises CPError naming flash-attn where it is not installed


register_kernel("cpu_flash", _cpu)
register_kernel("reference", _ref)
register_kernel("flex", _flex)
register_kernel("flash", _flash)

__all__ = [
    "AttnWork", "BlockKernel", "acc_dtype", "auto_kernel", "available_kernels", "get_kernel", "register_kernel",
    "merge_into_", "merge_many", "merge_partial",
]
