"""Name -> backend registry: ``get_planner`` (planning only) and ``get_backend`` (planning and running),
with typed, validated options.

Built-in backends are registered by module path and imported on first use, so ``import dcp_backend``
stays light; a backend's module imports what it needs to *run* (Transformer Engine) only when it runs,
so every backend plans everywhere, and an unavailable one fails only when asked to run.
"""
from __future__ import annotations

import dataclasses
import importlib

from dcp_backend.contract import BackendOptions, CPBackend, Planner
from dcp_backend.errors import BackendUnavailableError, CPError
from dcp_backend.topology import Topology

_BUILTIN = {
    "ring": "dcp_backend.baselines.ring:RingBackend",
    "zigzag": "dcp_backend.baselines.zigzag:ZigzagBackend",
    "loongtrain": "dcp_backend.baselines.loongtrain:LoongTrainBackend",
    "te": "dcp_backend.baselines.te:TEBackend",
    "hybrid": "dcp_backend.baselines.hybrid:HybridBackend",
    "dcp": "dcp_backend.dcp.backend:DCPBackend",
}
_REGISTRY: dict[str, type[CPBackend]] = {}


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


def options_class(name: str) -> type[BackendOptions]:
    """The options dataclass of backend ``name`` (its fields are the backend's options)."""
    return backend_class(name).options_class()


def make_options(name: str, **options) -> BackendOptions:
    """Build and validate the options dataclass of backend ``name`` (no process group needed)."""
    cls = options_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        hint = ""
        if {"world_size", "devices_per_node"} & set(unknown):
            hint = " (world_size and devices_per_node describe the topology: pass them to get_backend, or a Topology)"
        raise CPError(f"backend {name!r} got unknown option(s) {unknown}; it accepts {sorted(known)}{hint}")
    return cls(**options)


def get_planner(name: str, **options) -> Planner:
    """The planner of backend ``name``: ``.plan(seqlens, spec, Topology(...))`` on CPU, without a process
    group or the backend's run-time libraries."""
    return backend_class(name).Planner(make_options(name, **options))


def get_backend(name: str, group=None, *, topology: Topology | None = None, world_size: int | None = None,
                devices_per_node: int | None = None, **options) -> CPBackend:
    """The backend ``name`` over process group ``group`` (None = WORLD) with keyword ``options``.

    The topology is ``topology``, or ``world_size`` x ``devices_per_node`` (world_size defaults to the
    group's size; devices_per_node to one node).
    """
    cls = backend_class(name)
    cls.check_available()
    return cls(group, make_options(name, **options), topology, world_size=world_size,
               devices_per_node=devices_per_node)


def plan_each(names, seqlens, spec, topology: Topology, options: dict | None = None) -> dict:
    """Plan one batch with each named backend (its options from ``options[name]``, else defaults):
    ``{name: Plan}``, or ``{name: CPError}`` for a backend that cannot plan it (a mask TE refuses, heads
    not divisible by a degree). The one place tools and the simulator plan every backend."""
    out = {}
    for name in names:
        try:
            out[name] = get_planner(name, **(options or {}).get(name, {})).plan(seqlens, spec, topology)
        except CPError as exc:
            out[name] = exc
    return out
