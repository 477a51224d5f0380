"""The error types every part of the library raises, so callers catch one family of exceptions.

A leaf module: it imports nothing from the package, so any module may import it.
"""
from __future__ import annotations


class CPError(ValueError):
    """Bad input to a context-parallel backend (wrong option, shape, dtype, lengths, ...)."""


class BackendUnavailableError(RuntimeError):
    """The backend exists but cannot run here (for example Transformer Engine is not installed)."""


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer failed or timed out (a peer died or diverged)."""
