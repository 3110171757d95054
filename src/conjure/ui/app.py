"""The web app: `create_app(workspace, ...)` builds the FastAPI application that `conjure ui` serves.

Security (the issue's rules, enforced here for every request before any router sees it):
- Host: only the host names the server was started for (127.0.0.1 / localhost and the --host given) are
  answered, which stops DNS-rebinding pages from talking to it.
- Origin: a request that carries an Origin (or a Sec-Fetch-Site: cross-site) from anywhere but this server is
  refused, so other web pages cannot drive the API from the user's browser.
- Token: when the server listens on anything but 127.0.0.1 it requires a token: `Authorization: Bearer <token>`,
  the `conjure_token` cookie (set when the page is opened with `?token=...`), or `?token=` itself.
- Files: routers pass every user path through `Workspace.resolve` (conjure.ui.workspace); no user string ever
  reaches a shell (runs are started with an argument list).
Errors: ConjureError -> 400 {"error": message}; PathRefused -> 403 {"error": "path refused"}.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from conjure.errors import ConjureError
from conjure.ui.workspace import PathRefused, Workspace

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def create_app(workspace: Workspace | Path, *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
               start_runner: bool = True) -> Any:
    """`token`: required from clients when set (always set it when `host` is not 127.0.0.1/localhost).
    `start_runner`: start the job runner thread (tests of the API alone may leave it off)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    ws = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    app = FastAPI(title="conjure", version="1", description="conjure's local web app: data sets, training, jobs.")
    app.state.workspace = ws
    app.state.token = token
    hosts = {h for h in (*LOCAL_HOSTS, host) if h not in ("0.0.0.0", "::")}
    allowed_hosts = {f"{h}:{port}" for h in hosts} | hosts
    allowed_origins = {f"http://{h}:{port}" for h in hosts}
    app.state.allowed_origins = allowed_origins

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001 - FastAPI's signature
        host_header = request.headers.get("host", "")
        if host != "0.0.0.0" and host_header not in allowed_hosts:
            return JSONResponse({"error": "unknown host"}, status_code=403)
        origin = request.headers.get("origin")
        if origin is not None and origin not in allowed_origins and origin != f"http://{host_header}":
            return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        if request.headers.get("sec-fetch-site") == "cross-site":
            return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        if token is not None:
            given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                     or request.cookies.get("conjure_token") or request.query_params.get("token") or "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "token required"}, status_code=401)
        response = await call_next(request)
        if token is not None and request.query_params.get("token") == token:
            response.set_cookie("conjure_token", token, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.exception_handler(PathRefused)
    async def refused(request: Request, exc: PathRefused):  # noqa: ANN001
        return JSONResponse({"error": "path refused"}, status_code=403)

    @app.exception_handler(ConjureError)
    async def user_error(request: Request, exc: ConjureError):  # noqa: ANN001
        return JSONResponse({"error": str(exc)}, status_code=400)

    from conjure.ui import datasets, training

    app.include_router(datasets.router)
    app.include_router(training.router)

    @app.get("/", include_in_schema=False)
    async def index():  # noqa: ANN202
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    if start_runner:
        training.start_runner(app)
    return app
