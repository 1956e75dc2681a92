"""Who may talk to the edge: bearer tokens, the Host allow-list, where browsers' requests may come from (CORS and
Origin), and which bodies an inference POST may carry.

Tokens are off until one is configured (`cluster edge --token/--token-file/--admin-token`); then every route but the
public ones (health live/ready and the page, on `routes.public`) needs `Authorization: Bearer <token>`, and a route
that changes the cluster (declared with `dependencies=[ADMIN]`) needs an admin token. Tokens are compared in constant
time, against every configured token.

Two checks are on by default, both against browsers being turned on a loopback edge by a foreign page:
- the Host header must name this machine (localhost, 127.0.0.1, [::1], any port) or an `--allowed-host` (a DNS
  rebinding page sends its own name), else 400;
- a POST that a browser sends from another origin (its `Origin` is neither the edge's own nor a `--cors-origin`) is
  refused with 403, and an inference POST must be JSON or application/octet-stream (or carry no Content-Type, as
  tritonclient sends it), else 415.
A CORS preflight (OPTIONS) is answered 204 either way: with Access-Control-Allow-* only for a `--cors-origin`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.errors import HTTPError, error_response
from edge.tokens import read_token_file as read_token_file  # re-exported: edge.app and the tests use it here

log = logging.getLogger("edge")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BIND = ("", "0.0.0.0", "::")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
INFER_CONTENT_TYPES = ("application/json", "application/octet-stream")
# what a browser page on a --cors-origin may send and read
CORS_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Inference-Header-Content-Length"]
CORS_EXPOSED = ["Inference-Header-Content-Length", "Retry-After"]
BEARER_SCHEME = "bearerAuth"  # its name in the OpenAPI document


def split_tokens(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Tokens given as options or an environment variable: each value may hold several, comma- or space-separated."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(token for value in values for token in value.replace(",", " ").split())


def host_name(host: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


@dataclass(frozen=True)
class EdgeSecurity:
    """The edge's access settings (the app's `state.edge.security`).

    tokens: bearer tokens that may use every route; admin_tokens: those that may also change the cluster (a route
    with `dependencies=[ADMIN]`). No token at all: every route is open, as before tokens existed.
    allowed_hosts: Host names accepted besides the loopback ones ('*': any; '*.example.com': its subdomains).
    cors_origins: browser origins (scheme://host[:port]) whose pages may call the edge.
    """

    tokens: tuple[str, ...] = field(default=(), repr=False)  # repr: never in a log
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("tokens", "admin_tokens", "allowed_hosts", "cors_origins"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for token in self.tokens + self.admin_tokens:
            if not token or token != token.strip() or not (token.isascii() and token.isprintable()):
                raise ValueError("a token must be printable ASCII without leading or trailing spaces")
        object.__setattr__(self, "cors_origins", tuple(o.rstrip("/") for o in self.cors_origins))
        names = tuple(host_name(h) if not h.startswith("*") else h.lower() for h in self.allowed_hosts)
        object.__setattr__(self, "_hosts", LOOPBACK_HOSTS + names)
        object.__setattr__(self, "_token_bytes", tuple(t.encode() for t in self.tokens))
        object.__setattr__(self, "_admin_bytes", tuple(t.encode() for t in self.admin_tokens))

    @property
    def auth(self) -> bool:
        """Whether the edge asks for tokens."""
        return bool(self.tokens or self.admin_tokens)

    # ---- tokens ------------------------------------------------------------------------------------------------

    def check(self, authorization: str | None, *, admin: bool) -> None:
        """Raise HTTPError 401 unless `authorization` (the header) carries a configured token, 403 if `admin` and the
        token is not an admin one. Every configured token is compared, in constant time, whatever matches first."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPError(
                401,
                "this edge needs a token: send the header 'Authorization: Bearer <token>'",
                "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            )
        candidate = given.strip().encode()
        is_admin = _any_equal(candidate, self._admin_bytes)
        is_user = _any_equal(candidate, self._token_bytes)
        if not (is_admin or is_user):
            raise HTTPError(
                401,
                "the token is not valid for this edge",
                "unauthorized",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if admin and not is_admin:
            why = "" if self.admin_tokens else " (this edge has none configured: cluster edge --admin-token)"
            raise HTTPError(403, f"this route changes the cluster and needs an admin token{why}", "forbidden")

    # ---- where requests come from ------------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        for allowed in self._hosts:
            if allowed == "*" or allowed == name or (allowed.startswith("*.") and name.endswith(allowed[1:])):
                return True
        return False

    def origin_allowed(self, origin: str, host: str) -> bool:
        """A browser request's Origin is the edge's own (same host and port as the Host header) or a CORS origin."""
        if origin.rstrip("/") in self.cors_origins:
            return True
        try:
            return urlsplit(origin).netloc.lower() == host.strip().lower() != ""
        except ValueError:
            return False


def _any_equal(candidate: bytes, tokens: tuple[bytes, ...]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time does not say which token (or whether any) matched
        found |= hmac.compare_digest(candidate, token)
    return found


# ---- route dependencies: the token checks ----------------------------------------------------------------------

# FastAPI's own bearer scheme, for the OpenAPI document only (the app drops it there when the edge has no tokens):
# the checks below read the header themselves, so that every refusal is our 401 with {"error"}
BEARER = HTTPBearer(auto_error=False, scheme_name=BEARER_SCHEME, description="cluster edge --token (or --admin-token)")
_Bearer = HTTPAuthorizationCredentials | None


async def require_token(request: Request, _: _Bearer = Depends(BEARER)) -> None:
    """Any configured token (plain or admin), when the edge has tokens."""
    security: EdgeSecurity = request.app.state.edge.security
    if security.auth:
        security.check(request.headers.get("authorization"), admin=False)


async def require_admin(request: Request, _: _Bearer = Depends(BEARER)) -> None:
    """An admin token, when the edge has tokens. A route that changes the cluster declares
    `dependencies=[ADMIN], responses=error_responses(403)`."""
    security: EdgeSecurity = request.app.state.edge.security
    if security.auth:
        security.check(request.headers.get("authorization"), admin=True)


TOKEN = Depends(require_token)
ADMIN = Depends(require_admin)


def check_infer_content_type(headers) -> None:
    """415 unless an inference body is JSON (any charset) or the binary extension's application/octet-stream. No
    Content-Type is accepted: tritonclient.http sends none, and a browser's cross-origin POST is refused by Origin.
    headers: the request's (Starlette's Headers, or a dict of lower-case names)."""
    value = headers.get("content-type")
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media not in INFER_CONTENT_TYPES:
        raise HTTPError(
            415,
            f"Content-Type {value[:60]!r} is not accepted for inference; send application/json, or "
            "application/octet-stream with the binary tensor extension",
            "bad_request",
        )


# ---- the middleware: Host, Origin, preflights -------------------------------------------------------------------


class RequestGuard:
    """Outermost ASGI middleware: refuses a Host that is not allowed (400), a cross-origin browser POST (403), and
    answers a preflight from an origin that is not a CORS origin with 204 and no Access-Control-Allow-* (the browser
    then refuses the request). Preflights from CORS origins go on to Starlette's CORSMiddleware, inside this one."""

    def __init__(self, app: ASGIApp, security: EdgeSecurity) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        origin = headers.get("origin")
        method = scope["method"]
        response = None
        if not self.security.host_allowed(host):
            response = error_response(
                400,
                f"Host {host[:80]!r} is not one of this edge's names (loopback names, or cluster edge --allowed-host)",
            )
        elif method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            if origin.rstrip("/") not in self.security.cors_origins:
                response = Response(status_code=204, headers={"Vary": "Origin"})
        elif method not in SAFE_METHODS and origin is not None and not self.security.origin_allowed(origin, host):
            response = error_response(
                403, f"requests from the page at {origin[:80]!r} are not allowed (cluster edge --cors-origin)"
            )
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)


def hosts_for_bind(host: str, allowed_hosts: Iterable[str]) -> tuple[str, ...]:
    """The allowed hosts of an edge listening on `host`: a specific non-loopback address is added (clients that
    connect by it send it as Host); listening on every address without --allowed-host logs a warning."""
    allowed = tuple(allowed_hosts)
    if host_name(host) in LOOPBACK_HOSTS:
        return allowed
    if host in WILDCARD_BIND:
        if not allowed:
            log.warning(
                "the edge listens on every address, but serves only requests whose Host is localhost, 127.0.0.1 or "
                "[::1]: give the names remote clients use with --allowed-host NAME ('*' behind a proxy that checks)"
            )
        return allowed
    log.info("requests whose Host is %s are accepted (the address the edge listens on)", host)
    return (*allowed, host)
