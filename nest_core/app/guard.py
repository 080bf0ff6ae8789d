"""What ``nest serve`` checks before a request reaches a route: the ``Host`` it was sent to,
the API key, and that a POST is JSON.

A server on loopback is still reachable from every web page its user opens: a page can
send a "simple" cross-site POST (``text/plain``, a form, a typeless blob: no CORS preflight)
and, after DNS rebinding (its own name resolving to 127.0.0.1), read the answers too. So
a request is refused unless its ``Host`` is a name this server answers to, and a POST
unless it says ``Content-Type: application/json`` (which a cross-site page cannot send
without a preflight, which this server never grants).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse

from nest_core.app.openai_api import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"  # --allowed-host '*': no Host check (behind a gateway that checks it)


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names a server bound to ``bound`` answers to: that host, the loopback
    names, and ``extra`` (``--allowed-host``). IP addresses are always accepted
    (:meth:`RequestGuard.host_allowed`)."""
    return frozenset(_name(h) for h in (bound, *LOOPBACK_NAMES, *extra) if _name(h))


class RequestGuard:
    """Pure ASGI middleware (so a route can still see its client leave): refuses a foreign
    ``Host`` (400, ``host_not_allowed``), a missing or wrong API key on ``/v1/`` (401), and
    a POST whose body is not declared JSON (415), each with an OpenAI-shaped error.

    ``hosts``: the names :func:`allowed_hosts` gives; ``None`` checks no ``Host`` (an app
    served in-process). ``api_key`` is compared in constant time."""

    def __init__(self, app: Any, *, hosts: frozenset[str] | None = None,
                 api_key: str | None = None) -> None:
        self.app, self.hosts = app, hosts
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict[str, Any]) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        host = headers.get("host", b"").decode("latin-1")
        if self.hosts is not None and not self.host_allowed(host):
            return ApiError(400, f"Host {host[:100]!r} is not a name this server answers to; "
                                 f"start it with --allowed-host NAME to accept it",
                            code="host_not_allowed")
        path = str(scope.get("path", ""))
        if self.expected is not None and path.startswith("/v1/") and not hmac.compare_digest(
                headers.get("authorization", b""), self.expected):
            return ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                            type="authentication_error", code="invalid_api_key")
        media = headers.get("content-type", b"").decode("latin-1").split(";")[0]
        if scope.get("method") == "POST" and media.strip().lower() != "application/json":
            return ApiError(415, f"Content-Type {media.strip()[:100]!r} is not supported: "
                                 f"send the body as JSON with Content-Type: application/json",
                            code="unsupported_media_type")
        return None

    def host_allowed(self, header: str) -> bool:
        """Whether ``header`` (``name``, ``name:port``, ``[v6]:port``) is allowed: one of
        the names, or any IP address (DNS rebinding needs a name of the attacker's)."""
        if self.hosts is None or ANY_HOST in self.hosts:
            return True
        name = _name(header)
        if not name:
            return False
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _name(host: str) -> str:
    """The host name of a ``Host`` header or ``--host``, lower case, without port, brackets
    or a trailing dot ("" when there is none)."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:  # name:8000 (more colons: a bare IPv6 address)
        host = host.partition(":")[0]
    return host.rstrip(".")
