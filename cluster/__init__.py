"""A model-serving cluster for PyTorch over a ZeroMQ bus.

Programs use `Client` (blocking) or `AsyncClient` (asyncio); everything else runs as processes started by the
`cluster` command (manager, broker, agents, edge).
"""

from cluster.client import AsyncClient, Client, InferResult
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
