"""A model-serving cluster for PyTorch over a ZeroMQ bus.

Programs use `Client` (blocking) or `AsyncClient` (asyncio); everything else runs as processes started by the
`cluster` command (manager, broker, agents, edge).

The client classes are imported on first use (PEP 562), not with the package: every role and CLI command imports
`cluster`, and most of them never make a client (the client pulls in numpy and asyncio, ~0.1 s per process start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceFailedError,
    InferenceTimeoutError,
    ModelNotFoundError,
    NoAgentAvailableError,
    OverloadedError,
    PermissionDeniedError,
)

if TYPE_CHECKING:
    from cluster.client import AsyncClient, Client, InferResult

__all__ = [
    "Client",
    "AsyncClient",
    "InferResult",
    "ClusterError",
    "ModelNotFoundError",
    "NoAgentAvailableError",
    "InferenceTimeoutError",
    "BadRequestError",
    "InferenceFailedError",
    "OverloadedError",
    "AuthenticationError",
    "PermissionDeniedError",
]

_CLIENT_NAMES = ("Client", "AsyncClient", "InferResult")


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        from cluster import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
