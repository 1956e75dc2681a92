"""The exceptions a client sees. One per ErrorCode of the wire protocol, all under ClusterError."""

from __future__ import annotations

from cluster.protocol import Error, ErrorCode


class ClusterError(Exception):
    """Base of every error the cluster reports. `.code` is the wire ErrorCode, `.model` the model if known."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class ModelNotFoundError(ClusterError):
    code = ErrorCode.MODEL_NOT_FOUND


class NoAgentAvailableError(ClusterError):
    code = ErrorCode.NO_AGENT


class InferenceTimeoutError(ClusterError, TimeoutError):
    """No answer within the request's deadline (the cluster's own timeout: the message and `model` name the model).

    Also a TimeoutError, so `except TimeoutError` catches it; on Python 3.11+ TimeoutError *is* asyncio.TimeoutError,
    so code that wraps a call in asyncio.wait_for and catches asyncio.TimeoutError catches this one too. To tell the
    two apart, catch InferenceTimeoutError first."""

    code = ErrorCode.TIMEOUT


class BadRequestError(ClusterError, ValueError):
    code = ErrorCode.BAD_REQUEST


class InferenceFailedError(ClusterError):
    code = ErrorCode.INFERENCE_FAILED


class OverloadedError(ClusterError):
    """The broker refused the request at once: its queue is full, or the wait would pass the model's bound.
    `retry_after`: seconds after which trying again is likely to be accepted (None if the broker did not say)."""

    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, model: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, model)
        self.retry_after = retry_after


class RequestCancelledError(ClusterError):
    """The request was cancelled (only the broker sees this code, from an agent; a client that cancels forgot it)."""

    code = ErrorCode.CANCELLED


class AuthenticationError(ClusterError):
    """The cluster refused our key: the CURVE handshake failed (no key, an unknown or revoked key, the wrong server
    key), or the broker no longer allows the key of a connection it accepted earlier."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(ClusterError, PermissionError):
    """Our key is allowed, but its role may not do this (a client key asking to deploy)."""

    code = ErrorCode.PERMISSION_DENIED


class AgentIdInUseError(ClusterError):
    """The broker refused an agent's READY: another live agent process already has that agent id (only agents see
    this code)."""

    code = ErrorCode.AGENT_ID_IN_USE


class AgentBusyError(ClusterError):
    """An agent had no free slot for the request (its share of its capacity changed under the broker); only brokers
    see this code: they queue the request again, a client never gets it."""

    code = ErrorCode.BUSY


ERROR_BY_CODE = {cls.code.value: cls for cls in ClusterError.__subclasses__()}
ERROR_BY_CODE[ErrorCode.INTERNAL.value] = ClusterError


def error_from_header(header: dict) -> ClusterError:
    """The exception an ERROR message stands for."""
    error = Error.from_wire(header)
    cls = ERROR_BY_CODE.get(getattr(error.code, "value", error.code), ClusterError)
    if cls is OverloadedError:
        return cls(error.message, error.model, error.retry_after)
    return cls(error.message, error.model)
