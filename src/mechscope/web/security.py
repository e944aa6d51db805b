"""Who may talk to the app: loopback by default, a token for anything else, and headers that keep pages inert.

* **Bind address.** :func:`check_bind` refuses a non-loopback host without a token (``mechscope serve
  --host 0.0.0.0`` alone is an error).
* **Token.** With a token, every request must carry it: header ``X-Mechscope-Token: T`` or
  ``Authorization: Bearer T``, query ``?token=T``, or the cookie ``mechscope_token`` (set, HttpOnly and
  SameSite=Strict, when a page is opened with ``?token=T``, so links and the pages' own requests work).
  Compared in constant time. Missing or wrong: 401 with a message, nothing else runs.
* **Host header.** Without a token the app only answers requests whose ``Host`` is a loopback name, so a
  web page elsewhere cannot reach it through DNS rebinding (a name that resolves to 127.0.0.1).
* **Headers.** A content security policy allows only this origin (scripts and styles inline ones too:
  the dashboards and attention views are self-contained), no framing by other sites, no referrer (a
  token in a URL never leaks), ``nosniff``.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from mechscope.models.errors import MechscopeError

COOKIE = "mechscope_token"
HEADER = "x-mechscope-token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
)


class WebSecurityError(MechscopeError, ValueError):
    """A server set-up that would expose the app: a non-loopback host without a token, an empty token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``::1``."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback ``host`` without a token (or with a trivially short one)."""
    if token is not None and len(token) < 8:
        raise WebSecurityError(
            "the token must be at least 8 characters; e.g. --token $(openssl rand -hex 16)"
        )
    if not is_loopback(host) and token is None:
        raise WebSecurityError(
            f"binding {host!r} exposes the app beyond this machine: also give --token SECRET "
            "(every request must then carry it), or bind 127.0.0.1"
        )


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:8000
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class GuardMiddleware(BaseHTTPMiddleware):
    """Checks the token (or, without one, the Host header) on every request; adds the security headers."""

    def __init__(self, app, token: str | None):
        super().__init__(app)
        self.token = token

    def _presented(self, request: Request) -> tuple[str | None, bool]:
        auth = request.headers.get("authorization", "")
        for value, from_query in (
            (request.headers.get(HEADER), False),
            (auth[7:] if auth.lower().startswith("bearer ") else None, False),
            (request.query_params.get("token"), True),
            (request.cookies.get(COOKIE), False),
        ):
            if value:
                return value, from_query
        return None, False

    async def dispatch(self, request: Request, call_next) -> Response:
        from_query = False
        if self.token is not None:
            given, from_query = self._presented(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return self._headers(
                    PlainTextResponse(
                        "401: this server needs its token: open the URL printed by `mechscope serve` "
                        "(?token=...) or send the header X-Mechscope-Token",
                        status_code=401,
                    )
                )
        elif not is_loopback(_host_name(request.headers.get("host", ""))):
            return self._headers(
                PlainTextResponse(
                    "403: this server answers only requests addressed to localhost / 127.0.0.1",
                    status_code=403,
                )
            )
        response = await call_next(request)
        if from_query:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return self._headers(response)

    @staticmethod
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "SAMEORIGIN"
        return response
