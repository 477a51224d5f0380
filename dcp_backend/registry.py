"""Name -> backend registry (``get_backend``), with typed, validated options.

Built-in backends are registered by module path and imported on first use, so ``import dcp_backend``
stays light and an unavailable backend (Transformer Engine on CPU) fails only when it is asked for.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from dcp_backend.backend import CPBackend
from dcp_backend.errors import BackendUnavailableError, CPError

_BUILTIN = {
    "ring": "dcp_backend.baselines.ring:RingBackend",
    "zigzag": "dcp_backend.baselines.zigzag:ZigzagBackend",
    "loongtrain": "dcp_backend.baselines.loongtrain:LoongTrainBackend",
    "te": "dcp_backend.baselines.te:TEBackend",
    "dcp": "dcp_backend.dcp.backend:DCPBackend",
}
_REGISTRY: dict[str, type[CPBackend] | Callable[[], type[CPBackend]]] = {}


def register_backend(name: str, cls: type[CPBackend], *, overwrite: bool = False) -> None:
    """Register a :class:`CPBackend` subclass under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, CPBackend)):
        raise CPError(f"register_backend({name!r}): expected a CPBackend subclass, got {cls!r}")
    if (name in _REGISTRY or name in _BUILTIN) and not overwrite:
        raise CPError(f"backend {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = cls


def available_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def backend_class(name: str) -> type[CPBackend]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _BUILTIN:
        raise CPError(f"unknown CP backend {name!r}; available: {', '.join(available_backends())}")
    module, attr = _BUILTIN[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # The backend's own module (or its package) is absent from this build: say so clearly. A missing
        # dependency *inside* an existing module is a different problem and propagates unchanged.
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        raise BackendUnavailableError(
            f"CP backend {name!r} is not available in this build (module {module} is missing); "
            f"other backends: {', '.join(n for n in available_backends() if n != name)}"
        ) from exc
    cls = getattr(mod, attr)
    _REGISTRY[name] = cls
    return cls


def make_options(name: str, **options):
    """Build and validate the options dataclass of backend ``name`` (no process group needed)."""
    cls = backend_class(name)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CPError(f"backend {name!r} got unknown option(s) {unknown}; it accepts {sorted(known)}")
    opts = cls.Options(**options)
    opts.validate()
    return opts


def get_backend(name: str, group=None, **options) -> CPBackend:
    """The backend ``name`` over process group ``group`` (None = WORLD) with keyword ``options``."""
    cls = backend_class(name)
    cls.check_available()
    return cls(group=group, options=make_options(name, **options))
