"""HTTP search over a `SearchIndex`: FastAPI on uvicorn, with a web page for looking at results.

    tvrn serve runs/tvrn/test.index --port 8000        # then open http://127.0.0.1:8000/

Endpoints (GET or HEAD; JSON answers; every error, whatever its status, method or path, is {"error": message}):
    /                                     the web page (search box; results as images with their captions)
    /api/info                             model, split, gallery sizes, limits
    /api/search?q=TEXT&k=10&shortlist=100 text -> images (shortlist=0: exact, every image scored)
    /api/image/N?k=10&shortlist=500       gallery image N -> captions (its own captions marked relevant)
    /api/explain?q=TEXT&image=N           why image N scores what it does for TEXT: each token's attention over
                                          the image's regions (with their boxes), gates, per-word contributions,
                                          the pair's score (`SearchIndex.explain`; the page draws it)
    /images/N                             the image file of gallery image N (a regular file inside the
                                          index's image folder, links resolved; nothing else is served)
    POST /api/query-image?k=10&shortlist=500  body: an image file -> captions (indexes of `tvrn extract` data;
                                          refused with 409 when the gallery or the model has another recipe)

Model calls run in a bounded pool (`workers` at a time, `queue` waiting); when it is full a search gets 503 with
Retry-After at once instead of piling up; an upload takes its place in the pool before its body is read, so
when the pool is full it gets 503 without a byte of its body read (a Content-Length above the limit: 413, a
multipart form: 400, also unread). `tvrn serve` runs them in worker processes that each open the index
(`ModelPool`), so model work never holds the server's GIL; `create_app` uses threads unless asked. The page,
/api/info and image files never touch the pool, so they never wait behind model work. uvicorn's HTTP protocol
(httptools when installed, else h11) is extended with a header timeout: a connection that has
not sent a complete request head within `header_timeout` seconds (idle, or half a header) is closed; idle
keep-alive connections close after `keepalive_timeout`; a request head above 16 KB is refused (400, JSON); an
upload whose body has not arrived within `Limits.body_timeout_s` gets 408 and the connection is closed.
With a token (`--token` or TVRN_SERVE_TOKEN), every /api route and /images/N need `Authorization: Bearer TOKEN`
(the page reads it from its URL: /#token=TOKEN); /images/N also takes it as ?token=TOKEN, since the page's <img>
cannot send a header (compared in constant time, and removed from the query string the access log shows).

Needs the `serve` extra: pip install "tvrn[serve]" (fastapi, uvicorn).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import mimetypes
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from .index import SearchIndex, SearchIndexError, inside_folder
from .service import MULTIPART, Limits, SearchService, ServiceError, looks_multipart, parse_index

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
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


class ExplainService(SearchService):
    """SearchService plus the answer of /api/explain (what the server's model pool runs)."""

    def explain(self, q: Optional[str], image: Optional[str]) -> dict:
        """Caption and gallery image -> {"query", "image", "image_id", "image_url", "unknown_words", the
        Explanation's fields (`tvrn.models.explain.Explanation.to_dict`: words (L token strings), tokens,
        regions (R,), boxes (R, 4) or None, attention (L, R) or None, direction, gates, word_contributions,
        region_contributions, global_contribution, contribution_kind, context, score, model), "seconds"}.
        A query above max_query_words words is cut to that many (`truncated`), as a search is."""
        import time

        q = self.check_query(q)
        if image is None or image == "":
            raise ServiceError(400, "parameter image (the gallery image to explain) is missing")
        img = parse_index(image, self.index.num_images, "gallery image")
        t0 = time.perf_counter()
        words = self.index.query_words(q)
        out = {"query": q, "image": img, "image_id": self.index.image_ids[img], "image_url": self._url(img),
               "unknown_words": words["unknown"]}
        if len(words["words"]) > self.limits.max_query_words:
            out["truncated"] = {"words": len(words["words"]), "kept": self.limits.max_query_words}
            q = " ".join(words["words"][: self.limits.max_query_words])
        try:
            ex = self.index.explain(q, img)
        except SearchIndexError as e:
            raise ServiceError(400, str(e)) from None
        out.update(ex.to_dict())
        out["seconds"] = time.perf_counter() - t0
        return out


_WORKER: dict = {}  # in a model worker process: its own SearchService


def _exit_with(parent: int) -> None:
    """End this worker when the server that spawned it is gone (killed, or exited without shutting the pool
    down): an orphaned worker would otherwise wait on its task queue forever, holding the model in RAM."""
    import time

    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _worker_init(source: dict, limits: "Limits", threads: int, nice: int, parent: int) -> None:
    """A model worker process: follow the server's lifetime, lower its priority, set its torch threads, open the
    index itself (the server checked the files' sha256 already)."""
    import torch

    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="tvrn-parent-watch").start()

    if nice and hasattr(os, "nice"):
        os.nice(nice)
    torch.set_num_threads(max(1, threads))
    index = SearchIndex.load(source["path"], verify=False, nprobe=source.get("nprobe"))
    _WORKER["service"] = ExplainService(index, limits)


def _worker_call(method: str, args: tuple):
    return getattr(_WORKER["service"], method)(*args)


def _worker_ping() -> int:
    return os.getpid()


class ModelPool:
    """At most `workers` model calls at a time and `queue` waiting; beyond that ServiceError(503) at once.

    `run(method, *args)` answers `getattr(service, method)(*args)`. Two kinds of workers:
    - processes (`index_source` given, `tvrn serve`'s default): `workers` spawned processes, each opening the
      index itself (`SearchIndex.load(**index_source)`) with `threads` torch threads. Model work then never holds
      the server's GIL, so the event loop answers the page, info, image files and 503s while searches run. A
      worker that dies (killed, out of memory) is replaced, and its request gets 503 with Retry-After;
    - threads (`index_source` None): calls on `service` in this process (tests, notebooks, indexes built in memory).
    Either runs `nice` steps below the server's priority."""

    def __init__(self, service=None, workers: int = 1, queue: int = 8, nice: int = 0,
                 index_source: Optional[dict] = None, limits: Optional["Limits"] = None, threads: int = 1):
        self.service, self.workers, self.nice = service, workers, nice
        self.index_source, self.limits, self.threads = index_source, limits or Limits(), threads
        self.capacity, self.pending = workers + queue, 0
        self.executor = self._make()

    @property
    def processes(self) -> bool:
        return self.index_source is not None

    def _make(self):
        if not self.processes:
            return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tvrn-model",
                                      initializer=_lower_priority, initargs=(self.nice,))
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the server has threads (event loop, torch) that a forked child would inherit broken
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init,
                                   initargs=(self.index_source, self.limits, self.threads, self.nice, os.getpid()))

    async def start(self) -> list[int]:
        """Start every worker process now (each loads the index), not on the first search -> their pids."""
        if not self.processes:
            return []
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*[loop.run_in_executor(self.executor, _worker_ping)
                                           for _ in range(self.workers)]))

    def reserve(self) -> None:
        """Take a place in the pool now, or raise ServiceError(503) when it is full; `run(..., reserved=True)`
        then uses it (an upload reserves before reading its body), `release()` gives it back unused."""
        if self.pending >= self.capacity:
            raise ServiceError(503, f"busy: {self.pending} searches running or waiting; try again shortly",
                               retry_after=1)
        self.pending += 1  # only the event loop thread changes it

    def release(self) -> None:
        self.pending -= 1

    async def run(self, method: str, *args, reserved: bool = False) -> dict:
        from concurrent.futures.process import BrokenProcessPool

        if not reserved:
            self.reserve()
        loop = asyncio.get_running_loop()
        try:
            if not self.processes:
                return await loop.run_in_executor(self.executor, lambda: getattr(self.service, method)(*args))
            executor = self.executor
            try:
                return await loop.run_in_executor(executor, _worker_call, method, args)
            except BrokenProcessPool:
                if executor is self.executor:  # the first request to see it replaces the pool
                    executor.shutdown(wait=False, cancel_futures=True)
                    self.executor = self._make()
                raise ServiceError(503, "a model worker process died; it is being restarted, try again shortly",
                                   retry_after=1) from None
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        """Cancel what waits; worker processes finish their current call and exit (waited for, so none is left
        behind when the server exits)."""
        self.executor.shutdown(wait=self.processes, cancel_futures=True)


def _error(status: int, message: str, headers: Optional[dict] = None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_SAFE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]


class _Guard:
    """ASGI middleware in front of every route: the request head bound, the bearer token on /api routes and image
    files (there also as ?token=, removed from the query string before the route and the access log see it),
    HEAD served as GET, and no-store / nosniff on every answer. Plain ASGI, not Starlette's BaseHTTPMiddleware
    (which costs every request an extra task and a stream)."""

    def __init__(self, app, token: Optional[str] = None):
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.token = None if token is None else token.encode()

    def _authorized(self, scope, images: bool) -> bool:
        """The Authorization header, or for image files a ?token= parameter; constant-time comparisons. The
        token parameter is dropped from the scope's query string (in place: uvicorn's access log reads it)."""
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        ok = hmac.compare_digest(got, self.expected)
        if images and scope.get("query_string"):
            from urllib.parse import unquote_to_bytes

            kept = []
            for part in scope["query_string"].split(b"&"):
                name, _, value = part.partition(b"=")
                if name == b"token":
                    ok = hmac.compare_digest(unquote_to_bytes(value.replace(b"+", b" ")), self.token) or ok
                else:
                    kept.append(part)
            scope["query_string"] = b"&".join(kept)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > MAX_HEAD_BYTES:  # h11 bounds only heads that arrive in pieces
            return await _error(400, f"request head of {head} bytes, at most {MAX_HEAD_BYTES}",
                                {"Connection": "close"})(scope, receive, send)
        images = scope["path"].startswith("/images/")
        if self.expected is not None and (images or scope["path"].startswith("/api/")):
            if not self._authorized(scope, images):
                how = "Authorization: Bearer TOKEN" + (", or ?token=TOKEN on image files" if images else "")
                return await _error(401, f"missing or wrong bearer token ({how}); in a browser, open the page as "
                                         f"/#token=TOKEN", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        head_only = scope["method"] == "HEAD"
        if head_only:  # routes answer GET; the server (whose scope still says HEAD) sends no body
            scope = dict(scope, method="GET")

        async def guarded(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *_SAFE_HEADERS])
            elif head_only and message["type"] == "http.response.body":
                message = dict(message, body=b"")
            await send(message)

        await self.app(scope, receive, guarded)


def create_app(index: SearchIndex, token: Optional[str] = None, workers: int = 1, queue: int = 8,
               limits: Limits = Limits(), model_nice: int = 10, processes: bool = False, threads: int = 1):
    """The ASGI app for `index` (see the module doc). app.state.pool is the model pool (`ModelPool`): worker
    processes when `processes` (each reopens the index from `index.source`, so the index must come from
    `SearchIndex.load`; `threads` torch threads each), else threads of this process; either runs `model_nice`
    steps below the event loop's priority (cheap requests first when the CPU is short)."""
    _require()
    from contextlib import asynccontextmanager

    service = ExplainService(index, limits)
    if processes and index.source is None:
        raise ValueError("model worker processes reopen the index from its path: open it with SearchIndex.load")
    pool = ModelPool(service, workers, queue, model_nice, index_source=index.source if processes else None,
                     limits=limits, threads=threads)

    @asynccontextmanager
    async def lifespan(app):
        await pool.start()  # worker processes load the index before the first request, not during it
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

    app.add_middleware(_Guard, token=token)

    get = app.get  # HEAD is answered as GET, without the body (_Guard; uvicorn drops a HEAD's body)
    page_bytes = page_html()

    @get("/")
    async def page():
        return Response(page_bytes, media_type="text/html; charset=utf-8")

    @get("/index.html")
    async def page_alias():
        return await page()

    @get("/api/info")
    async def info():
        return JSONResponse(service.info())  # a Response: FastAPI's encoder (slow) is skipped

    @get("/api/search")
    async def search(q: Optional[str] = None, k: Optional[str] = None, shortlist: Optional[str] = None):
        service.check_query(q)  # cheap refusals never queue
        return JSONResponse(await pool.run("search", q, k, shortlist))

    @get("/api/image/{raw}")
    async def image(raw: str, k: Optional[str] = None, shortlist: Optional[str] = None):
        parse_index(raw, index.num_images, "gallery image")
        return JSONResponse(await pool.run("image", raw, k, shortlist))

    @get("/api/explain")
    async def explain(q: Optional[str] = None, image: Optional[str] = None):
        service.check_query(q)  # cheap refusals never queue
        if image is None or image == "":
            raise ServiceError(400, "parameter image (the gallery image to explain) is missing")
        parse_index(image, index.num_images, "gallery image")
        return JSONResponse(await pool.run("explain", q, image))

    @app.post("/api/query-image")
    async def query_image(request: Request, k: Optional[str] = None, shortlist: Optional[str] = None):
        # refusals that need no body come first: nothing of it is read (or buffered) for them
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ServiceError(413, f"image of {declared} bytes, at most {limits.max_upload_bytes}")
        if looks_multipart(request.headers.get("content-type")):
            raise ServiceError(400, MULTIPART)
        pool.reserve()  # 503 now when the pool is full; else the place is this upload's while its body arrives
        handed = False
        try:
            body = bytearray()
            try:
                async with asyncio.timeout(limits.body_timeout_s):  # a body trickling in holds nothing for long
                    async for chunk in request.stream():  # bounded read: stop at the limit
                        body += chunk
                        if len(body) > limits.max_upload_bytes:
                            raise ServiceError(413, f"image above {limits.max_upload_bytes} bytes")
            except TimeoutError:
                return _error(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                                   f"({len(body)} bytes came)", {"Connection": "close"})
            except ClientDisconnect:  # the client left mid-body: its place is given back, nobody to answer
                return Response(status_code=400)
            handed = True  # run() releases the place
            return JSONResponse(await pool.run("image_file", bytes(body), k, shortlist, reserved=True))
        finally:
            if not handed:
                pool.release()

    @get("/images/{raw}")
    async def image_file(raw: str):
        file = index.image_path(parse_index(raw, index.num_images, "gallery image"))
        data = None if file is None else \
            await asyncio.get_running_loop().run_in_executor(None, _read_image_file, file, index.image_dir)
        if data is None:
            raise ServiceError(404, f"gallery image {raw} has no image file in this index (only regular files "
                                    f"inside its image folder are served)")
        return Response(data, media_type=mimetypes.guess_type(file.name)[0] or "application/octet-stream")

    return app


def _read_image_file(file: Path, image_dir: str) -> Optional[bytes]:
    """The bytes of `file` when it is a regular file inside `image_dir` once links are resolved, else None. Read
    through the resolved path without following a link there, and checked again on the open file (a file
    swapped for a link or a FIFO after the check is not read)."""
    try:
        real = inside_folder(file, Path(image_dir).resolve())
        if real is None:
            return None
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (OSError, RuntimeError, ValueError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def _json_400(msg: str) -> tuple[bytes, list]:
    body = json.dumps({"error": f"bad HTTP request: {msg} (request head at most {MAX_HEAD_BYTES} bytes)"}).encode()
    return body, [(b"content-type", b"application/json"), (b"connection", b"close"),
                  (b"content-length", str(len(body)).encode())]


class _HeadTimeout:
    """Mixed into uvicorn's HTTP protocols: a connection that has not sent a complete request head within
    `header_timeout` seconds of connecting or of its last answer (idle, or half a header) is closed."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no complete request head in time: an idle or stalled client

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def _protocol_class(header_timeout: float, impl: str = "auto"):
    """uvicorn's HTTP protocol with a header timeout, a bound on the request head and JSON for its own 400s:
    httptools (C parser, half the CPU per request) when installed and `impl` is "auto" or "httptools", else
    h11."""
    _require()
    if impl in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if impl == "httptools":
                raise
        else:
            return _httptools_protocol(HttpToolsProtocol, header_timeout)

    class Protocol(_HeadTimeout, H11Protocol):
        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request head arrived

        def send_400_response(self, msg: str) -> None:
            import h11

            body, headers = _json_400(msg)
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    Protocol.header_timeout = header_timeout
    return Protocol


class _HeadTooLarge(Exception):
    pass


def _httptools_protocol(base, header_timeout: float):
    class Protocol(_HeadTimeout, base):
        def connection_made(self, transport) -> None:
            self._head_bytes, self._too_large, self._in_head, self._raw_head = 0, False, False, 0
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():  # a head begun and not complete: it got `data`
                self._raw_head += len(data)
                if self._raw_head > MAX_HEAD_BYTES:  # a head arriving in pieces: httptools only calls back
                    self._too_large = True  # once a header line is complete
                    self.send_400_response("")

        def on_message_begin(self) -> None:
            self._head_bytes, self._raw_head, self._in_head = 0, 0, True
            super().on_message_begin()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD_BYTES:  # httptools has no bound of its own: stop parsing here
                self._too_large = True
                raise _HeadTooLarge()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()  # a request head arrived
            self._in_head = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:  # the parser's errors (a callback's raise included)
            if self._too_large:
                msg = f"request head above {MAX_HEAD_BYTES} bytes"
            body, headers = _json_400(msg)
            head = b"HTTP/1.1 400 Bad Request\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            self.transport.write(head + b"\r\n" + body)
            self.transport.close()

    Protocol.header_timeout = header_timeout
    return Protocol


def make_config(app, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, header_timeout: float = 10.0,
                keepalive_timeout: float = 5.0, backlog: int = 2048, http: str = "auto"):
    """uvicorn's config for `app`; http: "auto" (httptools when installed, else h11), "httptools" or "h11"."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=_protocol_class(header_timeout, http),
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
          model_nice: int = 10, processes: bool = True, http: str = "auto", limits: Limits = Limits()) -> None:
    """Serve until interrupted. ready(url) is called once the socket listens. Model calls run in `workers`
    worker processes (`processes`, when the index was opened from a path; else threads) with `threads` torch
    threads each (default: CPU cores - 1, so the event loop answering cheap requests and 503s keeps a core).
    The workers are spawned, and a spawned process imports the main module: from a script, call serve under
    `if __name__ == "__main__":`."""
    import torch
    import uvicorn

    threads = threads or max(1, (os.cpu_count() or 1) - 1)
    processes = processes and index.source is not None
    if not processes:
        torch.set_num_threads(threads)
    app = create_app(index, token, workers, queue, limits=limits, model_nice=model_nice, processes=processes,
                     threads=threads)
    server = uvicorn.Server(make_config(app, host, port, quiet, header_timeout, http=http))
    if ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                h, p = server.servers[0].sockets[0].getsockname()[:2]
                ready(f"http://{h}:{p}")

        server.startup = startup
    server.run()
