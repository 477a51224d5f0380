"""Block attention kernels: one interface, chosen by device.

``get_kernel("auto", device)`` gives the ATen CPU flash kernel on CPU and FlexAttention on CUDA;
``"reference"`` is the pure-torch kernel for cross-checks. Users can register their own with
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


def get_kernel(name: str = "auto", device: torch.device | str = "cpu") -> BlockKernel:
    """The kernel called ``name`` (``"auto"`` picks by device)."""
    device = torch.device(device)
    if name == "auto":
        name = "cpu_flash" if device.type == "cpu" else "flex"
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


register_kernel("cpu_flash", _cpu)
register_kernel("reference", _ref)
register_kernel("flex", _flex)

__all__ = [
    "AttnWork", "BlockKernel", "acc_dtype", "available_kernels", "get_kernel", "register_kernel",
    "merge_into_", "merge_many", "merge_partial",
]
