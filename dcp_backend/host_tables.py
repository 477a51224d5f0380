"""Index tables of a plan packed into one host buffer and uploaded to a device once per plan.

Every backend runs attention from integer tables (rows to gather, tile lists, key ranges) that depend only
on the plan. They are built on the host, in the planning workers (``Plan.prepare``), as numpy arrays, and
packed into one contiguous buffer per dtype; the first attention call on a device copies that buffer once
(pinned and non-blocking on CUDA) and hands out views. No layer ever copies an index table again, and no
copy is pageable or synchronous on the hot path.
"""
from __future__ import annotations

import numpy as np
import torch


class HostTables:
    """Append arrays with :meth:`add` (returns a handle), then read them on a device with :meth:`on`."""

    def __init__(self, dtype=np.int64):
        self.dtype = np.dtype(dtype)
        self._parts: list[np.ndarray] = []
        self._shapes: list[tuple] = []
        self._host: np.ndarray | None = None
        self._bounds: np.ndarray | None = None
        self._device: dict[str, tuple] = {}

    def add(self, array) -> int:
        if self._host is not None:
            raise RuntimeError("HostTables: add() after the buffer was packed")
        a = np.ascontiguousarray(array, dtype=self.dtype)
        self._parts.append(a.reshape(-1))
        self._shapes.append(a.shape)
        return len(self._parts) - 1

    def __len__(self) -> int:
        return len(self._shapes)

    @property
    def host(self) -> np.ndarray:
        """The packed host buffer (packing happens once, on first access)."""
        if self._host is None:
            sizes = np.array([p.size for p in self._parts], dtype=np.int64)
            self._bounds = np.concatenate([[0], np.cumsum(sizes)])
            self._host = np.concatenate(self._parts) if self._parts else np.zeros(0, self.dtype)
            self._parts = []
        return self._host

    @property
    def nbytes(self) -> int:
        return int(self.host.nbytes)

    def on(self, device: torch.device | str) -> list[torch.Tensor]:
        """Views of every added array on ``device`` (one upload per device, cached)."""
        device = torch.device(device)
        key = str(device)
        if key not in self._device:
            buf = torch.from_numpy(self.host)
            keep = None
            if device.type != "cpu":
                if device.type == "cuda":
                    buf = buf.pin_memory()
                    keep = buf  # the pinned source must outlive the asynchronous copy
                buf = buf.to(device, non_blocking=True)
            b = self._bounds
            views = [buf[int(b[i]):int(b[i + 1])].view(shape) for i, shape in enumerate(self._shapes)]
            self._device[key] = (views, keep)
        return self._device[key][0]
