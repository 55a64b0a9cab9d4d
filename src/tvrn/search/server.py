"""HTTP search over a `SearchIndex`: FastAPI on uvicorn, with a web page for looking at results.

    tvrn serve runs/tvrn/test.index --port 8000        # then open http://127.0.0.1:8000/

Endpoints (GET or HEAD; JSON answers; every error, whatever its status, method or path, is {"error": message}):
    /                                     the web page (search box; results as images with their captions)
    /api/info                             model, split, gallery sizes, limits
    /api/search?q=TEXT&k=10&shortlist=100 text -> images (shortlist=0: exact, every image scored)
    /api/image/N?k=10&shortlist=500       gallery image N -> captions (its own captions marked relevant)
    /images/N                             the image file of gallery image N
    POST /api/query-image?k=10&shortlist=500  body: an image file -> captions (indexes of `tvrn extract` data;
                                          refused with 409 when the gallery or the model has another recipe)

Model calls run in a bounded pool (`workers` threads, `queue` waiting); when it is full a search gets 503 with
Retry-After at once instead of piling up. The page, /api/info and image files never touch the pool, so they
never wait behind model work. uvicorn's HTTP protocol is extended with a header timeout: a connection that has
not sent a complete request head within `header_timeout` seconds (idle, or half a header) is closed; idle
keep-alive connections close after `keepalive_timeout`; a request head above 16 KB is refused (400, JSON).
With a token (`--token` or TVRN_SERVE_TOKEN), every /api route needs `Authorization: Bearer TOKEN` (the page
reads it from its URL: /#token=TOKEN).

Needs the `serve` extra: pip install "tvrn[serve]" (fastapi, uvicorn).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import mimetypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Callable, Optional

from .index import SearchIndex
from .service import Limits, SearchService, ServiceError, parse_index

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # the serve extra is not installed
    _MISSING = e
else:
    _MISSING = None

MAX_HEAD_BYTES = 16 * 1024  # request line + headers


def _require():
    if _MISSING is not None:
        raise ImportError(f"tvrn serve needs FastAPI and uvicorn: pip install 'tvrn[serve]' ({_MISSING})")


def page_html() -> bytes:
    return resources.files("tvrn.search").joinpath("page.html").read_bytes()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux schedules threads, so only the model thread yields the CPU)."""
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:
            pass


class ModelPool:
    """At most `workers` model calls at a time and `queue` waiting; beyond that ServiceError(503)."""

    def __init__(self, workers: int = 1, queue: int = 8, nice: int = 0):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tvrn-model",
                                           initializer=_lower_priority, initargs=(nice,))
        self.capacity, self.pending = workers + queue, 0

    async def run(self, fn: Callable[[], dict]) -> dict:
        if self.pending >= self.capacity:
            raise ServiceError(503, f"busy: {self.pending} searches running or waiting; try again shortly",
                               retry_after=1)
        self.pending += 1  # only the event loop thread changes it
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str, headers: Optional[dict] = None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(index: SearchIndex, token: Optional[str] = None, workers: int = 1, queue: int = 8,
               limits: Limits = Limits(), model_nice: int = 10):
    """The ASGI app for `index` (see the module doc). app.state.pool is the model pool; its threads run
    `model_nice` steps below the event loop's priority (cheap requests first when the CPU is short)."""
    _require()
    from contextlib import asynccontextmanager

    service = SearchService(index, limits)
    pool = ModelPool(workers, queue, model_nice)

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown()

    app = FastAPI(title="tvrn search", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.pool, app.state.service = pool, service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown paths (404), wrong methods (405), ...
        message = {404: f"no such path {request.url.path[:200]!r}",
                   405: f"method {request.method} is not allowed here (GET or HEAD; POST on /api/query-image)"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, f"bad request: {exc.errors()[:1]}")

    @app.exception_handler(ServiceError)
    async def service_error(request, exc: ServiceError):
        return _error(exc.status, exc.message, {"Retry-After": str(exc.retry_after)} if exc.retry_after else None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def auth_and_headers(request: Request, call_next):
        head = len(request.scope.get("raw_path", b"")) + len(request.scope.get("query_string", b"")) + \
            sum(len(k) + len(v) + 4 for k, v in request.scope["headers"])
        if head > MAX_HEAD_BYTES:  # h11 bounds only heads that arrive in pieces
            return _error(400, f"request head of {head} bytes, at most {MAX_HEAD_BYTES}", {"Connection": "close"})
        if token is not None and request.url.path.startswith("/api/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                              {"WWW-Authenticate": "Bearer"})
        head_only = request.method == "HEAD"
        if head_only:
            request.scope["method"] = "GET"
        response = await call_next(request)
        if head_only:
            async for _ in response.body_iterator:  # drained, not sent; Content-Length stays the GET's
                pass
            response = Response(status_code=response.status_code, headers=dict(response.headers))
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    get = app.get  # HEAD is answered by the middleware above, as GET without the body

    @get("/")
    async def page():
        return Response(page_html(), media_type="text/html; charset=utf-8")

    @get("/index.html")
    async def page_alias():
        return await page()

    @get("/api/info")
    async def info():
        return service.info()

    @get("/api/search")
    async def search(q: Optional[str] = None, k: Optional[str] = None, shortlist: Optional[str] = None):
        service.check_query(q)  # cheap refusals never queue
        return await pool.run(lambda: service.search(q, k, shortlist))

    @get("/api/image/{raw}")
    async def image(raw: str, k: Optional[str] = None, shortlist: Optional[str] = None):
        parse_index(raw, index.num_images, "gallery image")
        return await pool.run(lambda: service.image(raw, k, shortlist))

    @app.post("/api/query-image")
    async def query_image(request: Request, k: Optional[str] = None, shortlist: Optional[str] = None):
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ServiceError(413, f"image of {declared} bytes, at most {limits.max_upload_bytes}")
        body = bytearray()
        async for chunk in request.stream():  # bounded read: stop at the limit
            body += chunk
            if len(body) > limits.max_upload_bytes:
                raise ServiceError(413, f"image above {limits.max_upload_bytes} bytes")
        return await pool.run(lambda: service.image_file(bytes(body), k, shortlist))

    @get("/images/{raw}")
    async def image_file(raw: str):
        file = index.image_path(parse_index(raw, index.num_images, "gallery image"))
        if file is None:
            raise ServiceError(404, f"gallery image {raw} has no image file in this index")
        data = await asyncio.get_running_loop().run_in_executor(None, file.read_bytes)
        return Response(data, media_type=mimetypes.guess_type(file.name)[0] or "application/octet-stream")

    return app


def _protocol_class(header_timeout: float):
    """uvicorn's h11 protocol with a header timeout and JSON for its own 400s."""
    _require()

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time: an idle or stalled client

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request head arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            import h11

            body = json.dumps({"error": f"bad HTTP request: {msg} (request head at most {MAX_HEAD_BYTES} bytes)"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def make_config(app, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, header_timeout: float = 10.0,
                keepalive_timeout: float = 5.0, backlog: int = 2048):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=_protocol_class(header_timeout),
                          timeout_keep_alive=keepalive_timeout, backlog=backlog, log_level="warning",
                          access_log=not quiet, h11_max_incomplete_event_size=MAX_HEAD_BYTES, lifespan="on")


class ServerThread:
    """uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as url: ...`; port 0 picks a
    free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **config):
        import uvicorn

        self.server = uvicorn.Server(make_config(app, host, port, quiet=True, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started listening")
            threading.Event().wait(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
          token: Optional[str] = None, workers: int = 1, queue: int = 8, header_timeout: float = 10.0,
          ready: Optional[Callable[[str], None]] = None, threads: Optional[int] = None,
          model_nice: int = 10) -> None:
    """Serve until interrupted. ready(url) is called once the socket listens. Model calls get `threads` torch
    threads (default: CPU cores - 1, so the event loop answering cheap requests and 503s keeps a core)."""
    import os

    import torch
    import uvicorn

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
    app = create_app(index, token, workers, queue, model_nice=model_nice)
    server = uvicorn.Server(make_config(app, host, port, quiet, header_timeout))
    if ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                h, p = server.servers[0].sockets[0].getsockname()[:2]
                ready(f"http://{h}:{p}")

        server.startup = startup
    server.run()
