"""uvicorn's HTTP protocols, extended: the parts of the search server that override uvicorn internals.

`make_config` gives uvicorn a protocol class made here from uvicorn's own (`HttpToolsProtocol` when httptools is
installed, else `H11Protocol`), with:
- a header timeout: a connection that has not sent a complete request head within `header_timeout` seconds of
  connecting or of its last answer (idle, or half a header) is closed (`_HeadTimeout`);
- a bound on the request head, MAX_HEAD_BYTES (16 KB): above it, 400 (uvicorn's h11 setting
  h11_max_incomplete_event_size for h11; counted here for httptools, which has no bound of its own);
- JSON for the 400s uvicorn itself sends for a bad request ({"error": message}, as every answer of the server).

These subclasses override methods and read attributes that are not uvicorn's public API (connection_made,
data_received, handle_events, on_url, on_header, on_headers_complete, on_response_complete, send_400_response;
self.cycle, self.conn, self.transport, self.loop), so the `serve` extra pins uvicorn to the versions they are
tested with (pyproject.toml, constraints.txt): a new uvicorn is taken after tests/test_serve.py and
tests/test_hostile_search.py pass on it.
"""
from __future__ import annotations

import json
from typing import Optional

try:
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # the serve extra is not installed
    _MISSING = e
else:
    _MISSING = None

MAX_HEAD_BYTES = 16 * 1024  # request line + headers


def require_serve_extra(missing: Optional[BaseException] = None) -> None:
    """ImportError saying how to install the serve extra when `missing` (an import of it that failed, FastAPI's
    in `tvrn.search.server`) is given, or uvicorn could not be imported."""
    missing = missing or _MISSING
    if missing is not None:
        raise ImportError(f"tvrn serve needs FastAPI and uvicorn: pip install 'tvrn[serve]' ({missing})")


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
    require_serve_extra()
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


__all__ = ["MAX_HEAD_BYTES", "make_config", "require_serve_extra"]
