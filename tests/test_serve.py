"""`tvrn serve` over real HTTP (uvicorn on an ephemeral loopback port): API, page, limits, hostile input, slow
clients, the model pool's 503s, the bearer token; and a real browser (headless Chromium) rendering the page.
No tight wall-clock bounds (a loaded 2-core machine must not flake): "does not delay others" is checked by order
(the other client is answered while the slow one is still held), "fast" and "within" by generous bounds."""
from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from tvrn.cli import main  # noqa: E402
from tvrn.search.server import ServerThread, create_app, is_loopback  # noqa: E402


def request(base, path, method="GET", headers=None, timeout=30, data=None):
    req = urllib.request.Request(base + path, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def raw(base, data: bytes, timeout=30.0) -> bytes:
    """Send raw bytes on a new connection, return everything the server answers before it closes."""
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def unanswered(sock) -> bool:
    """True while the server has neither answered on `sock` nor closed it (nothing to read there yet)."""
    return not select.select([sock], [], [], 0)[0]


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(setup, request):
    """The server on both of uvicorn's HTTP parsers (httptools: the default when installed; h11: the fallback),
    each with tvrn's header timeout, head bound and JSON 400s."""
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="the serve extra's httptools is not installed")
    index = setup[4]
    with ServerThread(create_app(index), header_timeout=3.0, keepalive_timeout=1.0, http=request.param) as base:
        yield base, index


def test_api_and_page(server):
    base, index = server
    status, headers, body = request(base, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/api/search" in body
    assert json.loads(request(base, "/api/info")[2])["images"] == 12
    res = json.loads(request(base, "/api/search?q=a+black+cat&k=4&shortlist=6")[2])
    want = index.search_text("a black cat", k=4, shortlist=6)
    assert [h["index"] for h in res["hits"]] == [h.index for h in want] and res["unknown_words"] == []
    assert res["hits"][0]["image_url"] == f"/images/{want[0].index}"
    assert res["hits"][0]["captions"] == index.captions_of(want[0].index)
    res = json.loads(request(base, "/api/image/3?k=5&shortlist=0")[2])
    assert [h["index"] for h in res["hits"]] == [h.index for h in index.search_image(3, k=5, shortlist=None)]
    assert [h["relevant"] for h in res["hits"]] == [h["image_index"] == 3 for h in res["hits"]]
    status, headers, body = request(base, "/images/3")
    assert status == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_and_shortlist_are_clamped_to_the_gallery(server):
    """The page's defaults (shortlist 100, image view 500) on a 12-image, 60-caption gallery."""
    base, index = server
    status, _, body = request(base, "/api/search?q=a+red+ball&k=50&shortlist=100")
    res = json.loads(body)
    assert status == 200 and len(res["hits"]) == 12 and res["k"] == 12 and res["shortlist"] == 12
    assert res["clamped"] == {"k": {"asked": 50, "used": 12}, "shortlist": {"asked": 100, "used": 12}}
    res = json.loads(request(base, "/api/image/0?k=10&shortlist=500")[2])
    assert res["shortlist"] == 60 and len(res["hits"]) == 10 and res["clamped"]["shortlist"]["used"] == 60


@pytest.mark.parametrize("path,status,words", [
    ("/api/search?q=cat&k=zero", 400, "k must be an integer"),
    ("/api/search?q=cat&k=0", 400, "k must be at least 1"),
    ("/api/search?q=cat&shortlist=-1", 400, "shortlist must be at least 0"),
    ("/api/search?k=3", 400, "q (the query text) is missing"),
    ("/api/image/12", 404, "no gallery image"),
    ("/api/image/%C2%B2", 404, "no gallery image"),  # '²': str.isdigit() is true, int() refuses it
    ("/images/%C2%B2", 404, "no gallery image"),
    ("/images/" + "9" * 5000, 404, "no gallery image"),
    ("/images/..%2F..%2Fetc%2Fpasswd", 404, "no"),
    ("/api/nothing", 404, "no such path"),
    ("/nothing/at/all", 404, "no such path"),
])
def test_bad_requests_get_json_errors(server, path, status, words):
    got, headers, body = request(server[0], path)
    assert got == status and headers["content-type"] == "application/json", (path, body[:200])
    assert words in json.loads(body)["error"], path


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_json_405(server, method):
    status, headers, body = request(server[0], "/api/search?q=cat", method=method)
    assert status == 405 and headers["content-type"] == "application/json"
    assert "not allowed" in json.loads(body)["error"]


def test_head_requests(server):
    status, headers, body = request(server[0], "/", method="HEAD")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/html")
    assert request(server[0], "/api/image/99", method="HEAD")[0] == 404


def test_traversal_in_the_raw_request_line(server):
    """A request line the client does not normalise: still a JSON 404, never a file outside the index."""
    out = raw(server[0], b"GET /images/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404") and b"root:" not in out and b'"error"' in out


def test_long_query_is_refused_fast_and_memory_stays_flat(server):
    base, _ = server
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    status, _, body = request(base, "/api/search?q=" + "cat+" * 16000)  # 64 KB of query: above the head limit
    assert status == 400 and "at most 16384" in json.loads(body)["error"] and time.perf_counter() - t0 < 10.0
    t0 = time.perf_counter()
    status, _, body = request(base, "/api/search?q=" + "cat+" * 3000)  # 12 KB: above the query's character limit
    assert status == 400 and "query too long: 12000 characters" in json.loads(body)["error"]
    assert time.perf_counter() - t0 < 10.0  # generous: catches a hang or a runaway, not a busy machine
    # under the character limit but far above the model's useful length: cut, and the answer says so
    t0 = time.perf_counter()
    status, _, body = request(base, "/api/search?q=" + "a+red+cat+" * 66)  # 198 words
    res = json.loads(body)
    assert status == 200 and res["truncated"] == {"words": 198, "kept": 64} and len(res["hits"]) == 10
    assert time.perf_counter() - t0 < 10.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KB: < 200 MB


def test_request_head_above_16_kb_gets_json_400(server):
    out = raw(server[0], b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"at most 16384" in out and b'"error"' in out
    # the same, arriving in pieces (h11 refuses it before it is complete)
    host, port = server[0].split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(5):
            s.sendall(b"a" * 5000)
            time.sleep(0.05)
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 400") and b"at most 16384" in out


def test_a_large_request_body_is_not_taken_for_a_large_head(server):
    """A 40 KB upload (in one piece and in pieces) reaches the route: the head bound counts head bytes only."""
    base = server[0]
    status, _, body = request(base, "/api/query-image", method="POST", data=b"x" * 40_000)
    assert status == 409 and "tvrn extract" in json.loads(body)["error"]  # this index takes no image files
    head = b"POST /api/query-image HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\nConnection: close\r\n\r\n"
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        for _ in range(8):
            s.sendall(b"x" * 5000)
            time.sleep(0.02)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 409"), out[:200]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_trickling_upload_body_gets_408_and_does_not_delay_others(setup, http):
    """Head sent, then 100 of the 40,000 declared body bytes: 408 JSON after the body timeout (not before), the
    connection closed; meanwhile another client is answered: its answer comes while the upload is still held."""
    from tvrn.search.service import Limits

    if http == "httptools":
        pytest.importorskip("httptools")
    timeout = 2.0
    app = create_app(setup[4], limits=Limits(body_timeout_s=timeout))
    with ServerThread(app, http=http) as base:
        host, port = base.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            t0 = time.perf_counter()  # before the bytes leave: the server's clock starts after this
            s.sendall(b"POST /api/query-image HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n" + b"x" * 100)
            assert request(base, "/api/info")[0] == 200
            assert unanswered(s), "the other client was answered only after the stalled upload's 408"
            out = b""
            while chunk := s.recv(65536):  # the server closes after its answer
                out += chunk
            waited = time.perf_counter() - t0
    assert out.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in out and b"100 bytes" in out
    assert 0.9 * timeout < waited < 30  # not before the body timeout; the upper bound only catches a hang


def test_unknown_words_are_listed_and_a_query_of_none_gets_no_hits(server):
    base, _ = server
    res = json.loads(request(base, "/api/search?q=zebra+giraffe")[2])
    assert res["hits"] == [] and res["unknown_words"] == ["zebra", "giraffe"] and "vocabulary" in res["notice"]
    res = json.loads(request(base, "/api/search?q=%21%21%21")[2])  # "!!!"
    assert res["hits"] == [] and "notice" in res
    res = json.loads(request(base, "/api/search?q=a+zebra+cat&k=3")[2])
    assert res["unknown_words"] == ["zebra"] and len(res["hits"]) == 3 and "notice" not in res


def test_idle_and_half_header_clients_do_not_delay_others_and_are_closed(server):
    base, _ = server
    host, port = base.split("//")[1].split(":")
    idle = socket.create_connection((host, int(port)))
    half = socket.create_connection((host, int(port)))
    half.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        assert request(base, "/api/info")[0] == 200
        # answered while both are still open: the answer did not wait for their header timeout
        assert unanswered(idle) and unanswered(half), "answered only after the idle clients were closed"
        for s in (idle, half):  # closed by the header timeout (3 s here), no answer
            s.settimeout(30)
            assert s.recv(100) == b""
    finally:
        idle.close()
        half.close()


def test_model_pool_full_gives_503_while_cheap_requests_stay_fast(setup):
    """workers=1, queue=1 and six searches, each held in the model until the test lets them go: one running, one
    waiting, four refused at once; the page, info and an image are answered while both places are held (before
    any search is let go: they do not wait for the model)."""
    index = setup[4]
    app = create_app(index, workers=1, queue=1)
    slow = app.state.service.search
    go = threading.Event()

    def search(*a):
        go.wait(120)  # held until the cheap requests below have been answered
        return slow(*a)

    app.state.service.search = search
    results = []
    with ServerThread(app) as base:
        threads = [threading.Thread(target=lambda: results.append(request(base, "/api/search?q=a+cat", timeout=300)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while len(results) < 4 and time.monotonic() < deadline:  # the refusals come at once
                time.sleep(0.01)
            assert sorted(r[0] for r in results) == [503] * 4, results
            for path in ("/api/info", "/", "/images/1"):
                assert request(base, path)[0] == 200
            assert len(results) == 4  # the two searches in the pool are still held: the cheap answers came first
        finally:
            go.set()
            for t in threads:
                t.join()
    codes = sorted(r[0] for r in results)
    assert codes.count(200) == 2 and codes.count(503) == 4  # one running, one waiting, the rest refused
    busy = [r for r in results if r[0] == 503]
    assert all(r[1]["retry-after"] == "1" and "busy" in json.loads(r[2])["error"] for r in busy)


def test_bearer_token_guards_every_api_route(setup):
    with ServerThread(create_app(setup[4], token="s3cret")) as base:
        for path in ("/api/info", "/api/search?q=cat", "/api/image/1", "/api/openapi.json"):
            status, headers, body = request(base, path)
            assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in json.loads(body)["error"]
            assert request(base, path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert request(base, path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(base, "/")[0] == 200  # the page itself is public; it asks for the token
        # images are behind the token too: the page's <img> tags send it as ?token= (no header possible there)
        assert request(base, "/images/1")[0] == 401 and request(base, "/images/1?token=wrong")[0] == 401
        assert request(base, "/images/1?token=s3cret")[0] == 200
        assert request(base, "/images/1", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_non_loopback_host_warns(setup, monkeypatch, capsys):
    import tvrn.search.server as srv

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    monkeypatch.setattr(srv, "serve", lambda *a, **k: None)
    assert main(["serve", str(setup[3]), "--host", "0.0.0.0"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert main(["serve", str(setup[3])]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_model_threads_run_below_the_event_loop_priority():
    """Linux schedules threads: the pool's thread gets nice + 5, the calling thread keeps its own."""
    import asyncio
    import threading

    from tvrn.search.server import ModelPool

    class Probe:
        def nice(self):
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own = os.getpriority(os.PRIO_PROCESS, 0)
    pool = ModelPool(Probe(), workers=1, queue=0, nice=5)
    try:
        seen = asyncio.run(pool.run("nice"))
    finally:
        pool.shutdown()
    assert seen == min(19, own + 5) and os.getpriority(os.PRIO_PROCESS, 0) == own


@pytest.mark.slow  # starts model worker processes
def test_worker_processes_answer_as_threads_do_and_a_dead_worker_is_replaced(setup):
    """The process pool (tvrn serve's default): each worker opens the index itself and runs below the server's
    priority; answers equal the thread pool's to the byte (scores and all), a refusal raised in a worker arrives
    as its JSON error; a worker killed with SIGKILL costs its request a 503 with Retry-After, and the next
    request is answered by a new worker."""
    import signal

    from tvrn.search import SearchIndex

    index = SearchIndex.load(setup[3])
    queries = ["/api/search?q=a+black+cat&k=5&shortlist=8", "/api/image/3?k=6", "/api/search?q=zebra+giraffe"]

    def answers(base):
        out = []
        for q in queries:
            status, _, body = request(base, q)
            body = json.loads(body)
            body.pop("seconds", None)
            out.append((status, body))
        return out

    with ServerThread(create_app(index)) as base:
        want = answers(base)
    app = create_app(index, processes=True, model_nice=3)
    with ServerThread(app) as base:
        pool = app.state.pool
        pids = asyncio_run(pool.start())
        assert pool.processes and pids and os.getpid() not in pids
        assert os.getpriority(os.PRIO_PROCESS, pids[0]) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
        assert answers(base) == want
        status, _, body = request(base, "/api/search?q=a+cat&k=-1")  # ServiceError from the worker
        assert status == 400 and "at least 1" in json.loads(body)["error"]
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.time() + 60  # generous: a loaded machine may be slow to reap the killed worker
        while time.time() < deadline:  # the pool notices the death on its next call
            status, headers, body = request(base, queries[0])
            if status != 200:
                break
            time.sleep(0.1)
        assert status == 503 and headers["retry-after"] == "1" and "restarted" in json.loads(body)["error"]
        assert answers(base) == want  # a fresh worker answers
        assert pids[0] not in asyncio_run(pool.start())


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
@pytest.mark.slow  # a `tvrn serve` process with its workers
def test_model_workers_end_with_the_server(setup, sig):
    """`tvrn serve` with worker processes: when the server ends, by SIGTERM (graceful) or SIGKILL (no chance to
    clean up), its workers end too, within seconds; none is left holding the model in RAM."""
    import signal
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tvrn.cli", "serve", str(setup[3]), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "open http" in proc.stdout.readline()  # printed once the workers are up and the socket listens
        workers = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) == 1
        proc.send_signal(getattr(signal, sig))
        proc.wait(60)
        deadline = time.time() + 60  # generous (a loaded machine); a worker left behind never ends
        while time.time() < deadline and not all(_gone(w) for w in workers):
            time.sleep(0.1)
        assert all(_gone(w) for w in workers), sig
    finally:
        proc.kill()


def asyncio_run(coro):
    """Run a coroutine on a loop of its own (the server's loop runs in another thread)."""
    import asyncio

    return asyncio.run(coro)


def test_serve_threads_option(setup, monkeypatch, capsys):
    import tvrn.search.server as srv

    seen = {}
    monkeypatch.setattr(srv, "serve", lambda *a, **k: seen.update(k, index=a[0]))
    assert main(["serve", str(setup[3]), "--threads", "3"]) == 0 and seen["threads"] == 3
    assert seen["processes"] is True and seen["http"] == "auto"  # the defaults: worker processes, httptools
    assert main(["serve", str(setup[3]), "--pool", "thread", "--http", "h11", "--nprobe", "7", "--no-verify"]) == 0
    assert seen["processes"] is False and seen["http"] == "h11" and seen["index"].source["nprobe"] == 7
    assert main(["serve", str(setup[3]), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- a real browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(url: str, *how: str, window=(1000, 1000)):
    exe = _chromium()
    if exe is None:
        message = "headless Chromium is not installed: apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("TVRN_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--window-size={window[0]},{window[1]}", "--force-device-scale-factor=1",
           "--user-data-dir=" + str(__import__("tempfile").mkdtemp()), "--virtual-time-budget=15000", *how, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran."""
    return _browser(url, "--dump-dom")


@pytest.mark.slow  # headless Chromium
def test_browser_renders_results_and_the_image_view(server):
    """Chromium loads the page with a query in its URL, the page's script calls the API and draws the results:
    the rendered DOM has a card per image (the page asks for 12, the gallery has 12) with its picture and its
    captions; the image view lists ranked captions with the image's own ones marked."""
    base, index = server
    query = index.captions[7]
    dom = rendered(base + "/?q=" + urllib.parse.quote(query))
    results = dom.split('<div id="results">', 1)[1].split("<script>")[0]  # rendered (the script holds templates)
    cards = results.split('<div class="card">')[1:]
    assert len(cards) == 12, dom[:3000]
    assert all('<img src="/images/' in c and "<li>" in c for c in cards)  # picture and captions on every card
    top = index.search_text(query, k=1)[0].index  # the page's first card is the API's first hit
    assert f'src="/images/{top}"' in cards[0]
    assert "12 images for" in dom and "12 images · 60 captions" in dom  # status line, /api/info header
    dom = rendered(base + "/?image=3")
    assert 'alt="image 3"' in dom
    items = re.findall(r'<li class="(relevant)?">', dom.split('<div id="results">', 1)[1].split("<script>")[0])
    want = index.search_image(3, k=12, shortlist=60)
    assert len(items) == 12 and [bool(x) for x in items] == [h.image_index == 3 for h in want]


# ------------------------------------------------------------------------------- why this image (/api/explain)
def test_explain_api(server):
    """/api/explain answers SearchIndex.explain as JSON (score, words, boxes, attention); errors as elsewhere."""
    base, index = server
    q = "a red ball on a blue box"
    status, headers, body = request(base, "/api/explain?" + urllib.parse.urlencode({"q": q, "image": 5}))
    res = json.loads(body)
    ex = index.explain(q, 5)
    assert status == 200 and headers["content-type"] == "application/json"
    assert res["image"] == 5 and res["image_url"] == "/images/5" and res["words"] == ex.words
    assert abs(res["score"] - ex.score) < 1e-6 and res["direction"] == "word_to_region"
    assert len(res["attention"]) == len(ex.words) and len(res["attention"][0]) == len(res["boxes"]) == 8
    assert res["regions"] == list(range(8)) and set(res["context"]) == {"relational", "spatial", "refine"}
    for path, code, words in [("/api/explain?image=3", 400, "q (the query text) is missing"),
                              ("/api/explain?q=cat", 400, "parameter image"),
                              ("/api/explain?q=cat&image=12", 404, "no gallery image"),
                              ("/api/explain?q=cat&image=-1", 404, "no gallery image"),
                              ("/api/explain?q=cat&image=x", 404, "no gallery image"),
                              ("/api/explain?image=1&q=" + "cat+" * 300, 400, "query too long")]:
        got, headers, body = request(base, path)
        assert got == code and headers["content-type"] == "application/json", path
        assert words in json.loads(body)["error"], path


def _pixels_of(png, rect, colour, tol=12):
    """Screen pixels inside `rect` (the picture on the page) within `tol` of `colour` -> their bounding box
    (x0, y0, x1, y1) in page pixels, and their count."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    x0, y0 = int(rect["x"]), int(rect["y"])
    crop = img[y0:y0 + int(rect["height"]), x0:x0 + int(rect["width"])]
    ys, xs = np.nonzero((np.abs(crop - np.array(colour)) <= tol).all(-1))
    if not len(xs):
        return None, 0
    return (x0 + xs.min(), y0 + ys.min(), x0 + xs.max(), y0 + ys.max()), len(xs)


def _on_screen(box, rect):
    """A region box (x1, y1, x2, y2 in the image's pixels) -> where it is drawn on the page (clipped to it)."""
    sx, sy = rect["width"] / rect["frame"][0], rect["height"] / rect["frame"][1]
    x1, y1 = max(0.0, float(box[0])) * sx + rect["x"], max(0.0, float(box[1])) * sy + rect["y"]
    x2 = min(float(box[2]) * sx, rect["width"] - 1) + rect["x"]
    y2 = min(float(box[3]) * sy, rect["height"] - 1) + rect["y"]
    return x1, y1, x2, y2


@pytest.mark.slow  # headless Chromium
def test_browser_draws_region_boxes_and_highlights_a_words_regions(server, tmp_path):
    """The explain view in Chromium (screenshots): with no word selected every region box is drawn (cyan pixels
    span the boxes' extent); selecting a word draws its most attended region in magenta, where that region's box
    is; selecting another word whose top region differs moves the magenta box there."""
    import html

    base, index = server
    q = index.captions[7]
    for hit in index.search_text(q, k=12):  # the best hit where two of the query's words differ in their top region
        image, ex = hit.index, index.explain(q, hit.index)
        tops = [int(ex.attention[l].argmax()) for l in range(len(ex.words))]
        if len(set(tops)) > 1:
            break
    first = 1
    second = next(l for l in range(len(tops)) if tops[l] != tops[first])
    url = base + "/?" + urllib.parse.urlencode({"q": q, "explain": image})
    dom = _browser(url, "--dump-dom")
    view = dom.split('<div id="results">', 1)[1].split("<script>")[0]  # rendered (the script holds templates)
    assert f'alt="image {image}"' in view and view.count('<rect class="region"') == len(ex.regions)
    assert all(f'data-token="{l}"' in view for l in range(len(ex.words)))  # every token of the query, selectable
    rect = json.loads(html.unescape(re.search(r'data-rect="([^"]*)"', view).group(1)))
    assert rect["frame"] == [64, 64] and rect["width"] == 384

    shot = tmp_path / "none.png"
    _browser(url, f"--screenshot={shot}")
    found, n = _pixels_of(shot, rect, (0, 229, 255))  # no word: every box in the plain colour
    assert n > 200, "no region boxes drawn"
    union = (min(b[0] for b in ex.boxes), min(b[1] for b in ex.boxes), max(b[2] for b in ex.boxes),
             max(b[3] for b in ex.boxes))
    assert all(abs(a - b) <= 3 for a, b in zip(found, _on_screen(union, rect))), (found, union)
    assert _pixels_of(shot, rect, (255, 0, 255))[1] == 0  # nothing highlighted yet

    where = {}
    for word in (first, second):
        shot = tmp_path / f"word{word}.png"
        _browser(url + f"&word={word}", f"--screenshot={shot}")
        found, n = _pixels_of(shot, rect, (255, 0, 255))
        assert n > 50, f"word {word}: no highlighted box"
        want = _on_screen(ex.boxes[tops[word]], rect)
        assert all(abs(a - b) <= 4 for a, b in zip(found, want)), (word, found, want)
        where[word] = found
    assert where[first] != where[second]
