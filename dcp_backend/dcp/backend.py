"""The ``dcp`` backend: the contract of DESIGN.md over the DCP planner and executor."""
from __future__ import annotations

from dcp_backend.contract import CPBackend
from dcp_backend.dcp.executor import DCPExecutor
from dcp_backend.dcp.planner import DCPPlanner


class DCPBackend(CPBackend):
    name = "dcp"
    Planner = DCPPlanner
    Executor = DCPExecutor
