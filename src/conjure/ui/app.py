"""The web app: `create_app(workspace, ...)` builds the FastAPI application that `conjure ui` serves.

Security (the issue's rules, enforced here for every request before any router sees it):
- Host: only the host names the server was started for (127.0.0.1 / localhost and the --host given) are
  answered, which stops DNS-rebinding pages from talking to it. A server on all interfaces (0.0.0.0, ::)
  answers any Host: its token is what guards it then.
- Origin: a request that carries an Origin from anywhere but this server, or a Sec-Fetch-Site of cross-site or
  same-site (another port of localhost is same-site), is refused, so other web pages cannot drive the API from
  the user's browser; answers carry Cross-Origin-Resource-Policy: same-origin, so other pages cannot even embed
  its images.
- Token: required when the server listens on anything but 127.0.0.1 / localhost: create_app refuses to build
  such a server without one, and refuses any token shorter than MIN_TOKEN_LENGTH (an empty `--token "$UNSET"`
  would otherwise be a token everyone knows). Given as `Authorization: Bearer <token>`, the `conjure_token`
  cookie (set when the page is opened with `?token=...`), or `?token=` itself, compared in constant time. A
  server without a token answers only connections that arrived on a loopback address, however it is served
  (an app built for 127.0.0.1 but bound to all interfaces by hand stays local: the Host header alone can be
  forged by a client that is not a browser).
- Files: routers pass every user path through `Workspace.resolve` (conjure.ui.workspace); no user string ever
  reaches a shell (runs are started with an argument list).
Errors, one form for every route (docs/ui.md): ConjureError and malformed requests -> 400 {"error": message};
PathRefused -> 403 {"error": "path refused"}; NotFound and unknown URLs -> 404.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from conjure.errors import ConjureError
from conjure.ui import captioning, datasets, monitor, training
from conjure.ui.workspace import NotFound, PathRefused, Workspace

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
ALL_INTERFACES = ("0.0.0.0", "::", "")
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body but an upload's (a config is kilobytes; a bulk edit of 10,000 names well under 1 MB):
refused with 413 from its Content-Length, before it is read."""
MIN_TOKEN_LENGTH = 16
"""Shortest token accepted: `secrets.token_urlsafe(18)`, what `conjure ui` makes up, is 24 characters."""


def create_app(workspace: Workspace | Path, *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
               start_runner: bool = True) -> FastAPI:
    """`token`: required from clients when set (always set it when `host` is not 127.0.0.1/localhost).
    `start_runner`: start the job runner thread (tests of the API alone may leave it off)."""
    check_token(token, host)
    ws = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    app = FastAPI(title="conjure", version="1", description="conjure's local web app: data sets, training, jobs.")
    app.state.workspace = ws
    app.state.access = Access.serving(host, port, token)
    app.middleware("http")(guard)
    for error_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error_type, handler)
    app.state.captioning = captioning.Captioning()
    app.include_router(captioning.router)
    app.include_router(datasets.router)
    app.include_router(training.router)
    app.include_router(monitor.router)
    app.add_api_route("/", index, include_in_schema=False)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if start_runner:
        training.start_runner(app)
    return app


@dataclass(frozen=True)
class Access:
    """Who a server answers (module docstring): the Host headers and Origins it knows, whether it answers any
    Host (all interfaces: the token guards it then), and its token."""

    hosts: frozenset[str]
    origins: frozenset[str]
    any_host: bool
    token: str | None

    @classmethod
    def serving(cls, host: str, port: int, token: str | None) -> Access:
        names = {_host_name(h) for h in (*LOCAL_HOSTS, host) if h not in ALL_INTERFACES}
        return cls(hosts=frozenset({f"{h}:{port}" for h in names} | names),
                   origins=frozenset(f"http://{h}:{port}" for h in names),
                   any_host=host in ALL_INTERFACES, token=token)


async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """The middleware every request passes first: refused unless `refusal` finds nothing; the answer gets the
    token cookie (opened with ?token=) and the headers that keep other pages from framing or embedding it."""
    access: Access = request.app.state.access
    refused = refusal(request, access)
    if refused is not None:
        status, message = refused
        return JSONResponse({"error": message}, status_code=status)
    response = await call_next(request)
    if access.token is not None and _token_matches(request.query_params.get("token"), access.token):
        response.set_cookie("conjure_token", access.token, httponly=True, samesite="strict")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    response.headers.setdefault("Referrer-Policy", "no-referrer")  # a ?token= URL never leaves in a Referer
    return response


def refusal(request: Request, access: Access) -> tuple[int, str] | None:
    """(status, message) when the request's host, origin, token or body size is refused; None when it may pass."""
    host_header = request.headers.get("host", "")
    if not access.any_host and host_header not in access.hosts:
        return 403, "unknown host"
    origin = request.headers.get("origin")
    if origin is not None and origin not in access.origins and origin != f"http://{host_header}":
        return 403, "cross-origin request refused"
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return 403, "cross-origin request refused"
    if access.token is None and not _loopback(request.scope.get("server")):
        return 401, "token required"
    if access.token is not None and not _token_given(request, access.token):
        return 401, "token required"
    return _body_too_large(request.url.path, request.headers)


def _token_given(request: Request, token: str) -> bool:
    """The request carries `token` as a Bearer credential, the `conjure_token` cookie or `?token=`."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" else ""
    given = (bearer, request.cookies.get("conjure_token"), request.query_params.get("token"))
    return any(_token_matches(candidate, token) for candidate in given)


async def path_refused(request: Request, exc: PathRefused) -> Response:
    return JSONResponse({"error": "path refused"}, status_code=403)


async def not_found(request: Request, exc: NotFound) -> Response:
    return JSONResponse({"error": str(exc.args[0]) if exc.args else "not found"}, status_code=404)


async def bad_request(request: Request, exc: RequestValidationError) -> Response:
    return JSONResponse({"error": request_error(exc)}, status_code=400)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def user_error(request: Request, exc: ConjureError) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=400)


ERROR_HANDLERS: dict[type[Exception], Callable[..., Awaitable[Response]]] = {
    PathRefused: path_refused,  # a ConjureError too: Starlette picks the handler of the nearest class
    NotFound: not_found,
    RequestValidationError: bad_request,
    StarletteHTTPException: http_error,
    ConjureError: user_error,
}
"""Every error's answer (module docstring): one form, {"error": message}."""


async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def check_token(token: str | None, host: str) -> None:
    """Refuse a server on `host` that would answer other machines without a token, and any token too short to
    guess-proof it (module docstring)."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConjureError(f"--token must be at least {MIN_TOKEN_LENGTH} characters, not {len(token)}; leave it "
                           "out and conjure ui makes up a random one")
    if token is None and host not in LOCAL_HOSTS:
        raise ConjureError(f"a server on {host or 'all interfaces'} must require a token (--token)")


def _token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison in which nothing empty ever matches."""
    return bool(given) and bool(token) and secrets.compare_digest(given.encode(), token.encode())


def _body_too_large(path: str, headers: Any) -> tuple[int, str] | None:
    """(status, message) for a request body over MAX_BODY_BYTES (uploads: MAX_UPLOAD_REQUEST_BYTES), or one
    whose length is not given up front (chunked), which could be any size; None when it may be read."""
    limit = datasets.MAX_UPLOAD_REQUEST_BYTES if path == datasets.UPLOAD_PATH else MAX_BODY_BYTES
    length = headers.get("content-length")
    if length is None:
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        return (411, "send the request body with a Content-Length") if chunked else None
    if not length.isdigit() or int(length) > limit:
        return 413, f"request too large (at most {limit // 2**20} MB)"
    return None


def _loopback(server: Any) -> bool:
    """The connection arrived on a loopback address (ASGI's `scope["server"]`: the local end of it)."""
    host = server[0] if isinstance(server, (tuple, list)) and server else None
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    """A host as the Host header spells it: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def request_error(exc: Any) -> str:
    """A malformed request (FastAPI's RequestValidationError) as one line: "field: message; ..."."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        loc = tuple(err.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]  # where the value came from, not a field name (a body field may be called "path")
        where = ".".join(str(p) for p in loc)
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"
