"""Trying to break `tvrn index | search | serve`: bad FAISS strings, killed builds, damaged index folders, image
files outside the image folder or without the token, uploads against a full model pool, messages with Python
reprs, and the page's image view and token hint. Status codes and messages, never a traceback; no tight time
bounds (a loaded 2-core machine must not flake)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import assert_refused, run_cli
from tvrn.cli import main
from tvrn.search import SearchIndex, SearchIndexError

def siblings(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if name in p.name)


# ------------------------------------------------------------------------------ 1. FAISS factory strings
def test_bad_faiss_strings_are_refused_naming_the_option_and_leave_nothing(setup, tmp_path, capsys):
    pytest.importorskip("faiss")
    _, data, ckpt, _, index, _ = setup
    out = tmp_path / "out" / "bad.index"
    out.parent.mkdir()
    base = ["index", ckpt, "--data", data, "--split", "test", "--out", out, "--no-progress"]
    rc, _, err = run_cli([*base, "--faiss", "Bogus99"], capsys)
    assert_refused(rc, err, "--faiss 'Bogus99'", "could not parse", "accepted: Flat", "HNSW32", "IVF1024,Flat")
    rc, _, err = run_cli([*base, "--faiss", "IVF1024,Flat"], capsys)  # 1024 lists, 12 images
    assert_refused(rc, err, "--faiss 'IVF1024,Flat'", "1024 inverted lists", "12 images")
    rc, _, err = run_cli([*base, "--faiss", "HNSW0"], capsys)  # FAISS itself aborts the process on this one
    assert_refused(rc, err, "--faiss 'HNSW0'")
    # one that parses but FAISS cannot build for these vectors (PQ: dimension / training points): found at the
    # end of the build, refused the same way, and the temporary folder removed
    rc, _, err = run_cli([*base, "--faiss", "PQ32"], capsys)
    assert_refused(rc, err, "--faiss 'PQ32'", "FAISS cannot build it")
    assert not out.exists() and os.listdir(out.parent) == []  # no index, no .bad.index.tmp*
    with pytest.raises(SearchIndexError, match="--faiss 'Bogus99'"):  # FaissSpecError, a SearchIndexError
        index.save(out, faiss="Bogus99")
    with pytest.raises(SearchIndexError, match="--faiss 'PQ32'"):
        index.save(out, faiss="PQ32")
    assert os.listdir(out.parent) == []
    index.save(out, faiss="IVF2,Flat")  # a good one still builds
    assert SearchIndex.load(out).info()["faiss"] and siblings(out.parent, "bad.index") == ["bad.index"]


# ------------------------------------------------------------------------------ 2. stale temporaries
def test_temporaries_of_a_killed_build_are_removed_by_the_next_build(setup, tmp_path):
    import tvrn

    index = setup[4]
    out = tmp_path / "gallery.index"
    # a real writer, killed mid-build (SIGKILL: no cleanup of its own)
    code = ("import os, signal, sys\n"
            "from tvrn.search.formats import _IndexWriter\n"
            "w = _IndexWriter(sys.argv[1], 12, 60, 'float32')\n"
            "(w.tmp / 'half.bin').write_bytes(b'x' * 100000)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(tvrn.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = [p for p in tmp_path.iterdir() if p.name.startswith(".gallery.index.tmp.")]
    assert len(killed) == 1 and (killed[0] / "half.bin").exists()  # .gallery.index.tmp.PID@HOST
    host = killed[0].name.rsplit("@", 1)[1]
    legacy = tmp_path / ".gallery.index.tmp"  # the name of tvrn versions without a pid in it
    legacy.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        keep = [tmp_path / f".gallery.index.tmp.{live.pid}@{host}",  # a build still running
                tmp_path / f".gallery.index.tmp.{proc_pid_gone()}@another-host",  # not ours to judge
                tmp_path / ".gallery.index.tmpfoo", tmp_path / f".other.index.tmp.{proc_pid_gone()}@{host}"]
        for p in keep:
            p.mkdir()
        index.save(out)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["gallery.index", *(p.name for p in keep)]), left
    finally:
        live.kill()
        live.wait()
    assert SearchIndex.load(out).num_images == 12


SLOW_INDEX = """
import pathlib, sys, time
import tvrn.search.index as si
from tvrn.cli import main
build_to = si.SearchIndex.build_to.__func__

def slow(cls, *args, **kw):  # the real build, held at its first batch (the temporary folder is written)
    def on_batch(what, n):
        pathlib.Path(sys.argv[-1]).write_text("building")
        time.sleep(600)
    return build_to(cls, *args, **dict(kw, on_batch=on_batch))

si.SearchIndex.build_to = classmethod(slow)
sys.exit(main(sys.argv[1:-1]))
"""


def test_a_terminated_index_build_removes_its_temporary_folder(setup, tmp_path):
    """SIGTERM (a plain `kill`, a job scheduler's time limit) unwinds `tvrn index` instead of leaving hundreds
    of MB in a hidden .OUT.tmp.* folder."""
    import tvrn

    _, data, ckpt, _, _, _ = setup
    out, marker = tmp_path / "out" / "big.index", tmp_path / "started"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(tvrn.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INDEX, "index", str(ckpt), "--data", str(data), "--split",
                             "test", "--out", str(out), "--no-progress", str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: marker.exists() or proc.poll() is not None, 600), "the build did not start"
        assert proc.poll() is None, proc.communicate()
        assert any(p.name.startswith(".big.index.tmp.") for p in out.parent.iterdir())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "stopped by signal 15" in err and os.listdir(out.parent) == []


def proc_pid_gone() -> int:
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------ 3. damaged index folders
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_index_folders_are_refused_naming_the_file(setup, tmp_path, capsys):
    pytest.importorskip("faiss")
    index = setup[4]
    good = tmp_path / "good.index"
    index.save(good, faiss="Flat")

    bad = _copy(good, tmp_path / "flipped.index")
    man = bytearray((bad / "manifest.json").read_bytes())
    man[40] ^= 0x80  # one bit: an ASCII byte becomes a byte that starts no UTF-8 character
    (bad / "manifest.json").write_bytes(bytes(man))
    for verify in (True, False):
        with pytest.raises(SearchIndexError, match="manifest.json is not valid UTF-8 JSON"):
            SearchIndex.load(bad, verify=verify)
    rc, _, err = run_cli(["search", bad, "a red ball"], capsys)
    assert_refused(rc, err, "flipped.index", "manifest.json is not valid UTF-8 JSON")
    rc, _, err = run_cli(["serve", bad, "--pool", "thread"], capsys)
    assert_refused(rc, err, "manifest.json is not valid UTF-8 JSON")

    cut = _copy(good, tmp_path / "cut-manifest.index")
    text = (cut / "manifest.json").read_bytes()
    (cut / "manifest.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(SearchIndexError, match="manifest.json is not valid UTF-8 JSON"):
        SearchIndex.load(cut)

    lacking = _copy(good, tmp_path / "lacking.index")
    m = json.loads((lacking / "manifest.json").read_text())
    del m["fields"]
    (lacking / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SearchIndexError, match=r"manifest.json cannot be read \(no 'fields' entry\)"):
        SearchIndex.load(lacking)

    # truncated files, opened without the sha256 check (--no-verify; the server's worker processes): refused on
    # opening, by name, not by a traceback (or by the first query that reaches the missing bytes)
    field = sorted(p.name for p in (good / "images").iterdir())[0]
    for rel in ("model.pt", f"images/{field}", "text_vectors.npy", "captions.txt", "image_ids.offsets.npy",
                "image.faiss"):
        folder = _copy(good, tmp_path / ("cut-" + rel.replace("/", "-")))
        f = folder / rel
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        with pytest.raises(SearchIndexError, match=r"is corrupted"):
            SearchIndex.load(folder)  # verified: the sha256 names it
        with pytest.raises(SearchIndexError) as e:
            SearchIndex.load(folder, verify=False)
        assert Path(rel).name in str(e.value) and "Traceback" not in str(e.value), (rel, e.value)
        rc, _, err = run_cli(["search", folder, "a red ball", "--no-verify"], capsys)
        assert_refused(rc, err, Path(rel).name)


# ------------------------------------------------------------------------------ HTTP helpers
def http(base, path, method="GET", headers=None, data=None, timeout=60):
    req = urllib.request.Request(base + path, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def connect(base, timeout=60) -> socket.socket:
    host, port = base.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length (the server may keep the connection open)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf[:200]!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:n]


def upload_head(length: int, content_type: str = "image/jpeg", path: str = "/api/query-image") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def wait_for(condition, seconds=60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ------------------------------------------------------------------------------ 4. image files
def test_image_files_are_regular_files_inside_the_folder_and_behind_the_token(setup, tmp_path):
    pytest.importorskip("fastapi")
    from tvrn.search.server import ServerThread, create_app

    index = copy.copy(setup[4])  # the same index, its image folder and ids replaced here
    images = tmp_path / "images"
    shutil.copytree(setup[4].image_dir, images)
    ids = list(index.image_ids)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"root:x:0:0 SECRET")
    (images / f"{ids[0]}.png").unlink()
    (images / f"{ids[0]}.png").symlink_to(secret)  # a link out of the folder
    (images / f"{ids[1]}.png").unlink()
    (images / f"{ids[1]}.png").symlink_to(images / f"{ids[2]}.png")  # a link inside it: fine
    (images / f"{ids[4]}.png").unlink()
    (images / f"{ids[4]}.png").symlink_to("/dev/zero")  # not a regular file
    ids[5] = "../secret"  # an id that climbs out of the folder
    index.image_ids, index.image_dir = ids, str(images)

    assert index.image_path(0) is None and index.image_path(5) is None and index.image_path(4) is None
    assert index.image_path(1) is not None and index.image_path(3) is not None
    with ServerThread(create_app(index, token="s3cret")) as base:
        auth = {"Authorization": "Bearer s3cret"}
        for image in (0, 4, 5):
            status, headers, body = http(base, f"/images/{image}", headers=auth)
            assert status == 404 and b"SECRET" not in body and "error" in json.loads(body), (image, body[:200])
            assert http(base, f"/images/{image}?token=s3cret")[0] == 404
        status, headers, body = http(base, "/images/1", headers=auth)
        assert status == 200 and body == (images / f"{ids[2]}.png").read_bytes()
        # the token: header or ?token= (the page's <img>); without it, or wrong, 401 JSON
        status, headers, body = http(base, "/images/3")
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "token" in json.loads(body)["error"]
        assert "?token=TOKEN" in json.loads(body)["error"]
        assert http(base, "/images/3?token=wrong")[0] == 401
        assert http(base, "/images/3", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, headers, body = http(base, "/images/3?token=s3cret")
        assert status == 200 and headers["content-type"] == "image/png" and body[:4] == b"\x89PNG"
        assert http(base, "/images/3?size=1&token=s3cret")[0] == 200
        assert http(base, "/images/3", headers=auth)[0] == 200
        assert http(base, "/api/info?token=s3cret")[0] == 401  # the query parameter is for image files only
        res = json.loads(http(base, "/api/image/0?k=3", headers=auth)[2])
        assert res["image_url"] is None  # not offered either


# ------------------------------------------------------------------------------ 5. uploads and a full pool
def test_uploads_are_refused_before_their_body_is_read_when_the_pool_is_full(setup):
    """workers=1, queue=0: one upload whose body is still arriving holds the pool's only place; a second upload
    (10 MB declared, 1 KB sent) gets 503 without its body being waited for or read; a Content-Length above the
    limit gets 413 and a multipart form 400, neither read; the place comes back when the first client leaves."""
    pytest.importorskip("fastapi")
    from tvrn.search.server import ServerThread, create_app
    from tvrn.search.service import Limits

    app = create_app(setup[4], workers=1, queue=0, limits=Limits(body_timeout_s=120))
    pool = app.state.pool
    with ServerThread(app) as base:
        first = connect(base)
        first.sendall(upload_head(5_000_000) + b"\xff\xd8" + b"x" * 1000)
        assert wait_for(lambda: pool.pending == 1), "the upload did not take its place in the pool before its body"
        try:
            with connect(base) as s:  # the server must answer without waiting for the other 9,999,000 bytes
                s.sendall(upload_head(10_000_000) + b"x" * 1000)
                status, headers, body = read_response(s)
            assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]
            assert http(base, "/api/search?q=a+red+ball")[0] == 503  # the same pool
            with connect(base) as s:  # above the limit: 413 before anything is read
                s.sendall(upload_head(30_000_000))
                status, _, body = read_response(s)
            assert status == 413 and "at most" in json.loads(body)["error"]
            with connect(base) as s:
                s.sendall(upload_head(1_000_000, "multipart/form-data; boundary=xyz") + b"--xyz\r\n")
                status, _, body = read_response(s)
            assert status == 400 and "multipart form" in json.loads(body)["error"]
        finally:
            first.close()  # the client leaves mid-body: its place is given back
        assert wait_for(lambda: pool.pending == 0), pool.pending
        status, _, body = http(base, "/api/query-image", method="POST", data=b"\xff\xd8" + b"x" * 5000,
                               headers={"Content-Type": "image/jpeg"})
        assert status == 409 and "tvrn extract" in json.loads(body)["error"]  # this gallery takes no photos
        assert pool.pending == 0 and http(base, "/api/search?q=a+red+ball")[0] == 200


# ------------------------------------------------------------------------------ 6. messages
def test_upload_and_parameter_errors_say_what_was_wrong(setup, monkeypatch):
    pytest.importorskip("fastapi")
    import tvrn.search.image_query as iq
    from tvrn.search.server import ServerThread, create_app

    index = setup[4]
    monkeypatch.setattr(iq, "image_query_problem", lambda index: None)  # as if it took photos

    def undecodable(data, k=10, shortlist=500):  # what the decoder said for a body PIL cannot identify
        raise SearchIndexError("cannot read the uploaded file as an image: UnidentifiedImageError: cannot identify "
                               "image file <_io.BytesIO object at 0x7f3a2c1b2e30>")

    monkeypatch.setattr(index, "search_image_file", undecodable)
    form = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0 not really\r\n--xyz--\r\n")
    with ServerThread(create_app(index)) as base:
        for body, ctype, words in [
            (form, "application/octet-stream", "multipart form"),  # a form sent with another content type
            (form, "multipart/form-data; boundary=xyz", "multipart form"),
            (b"GIF? no, just text", "image/gif", "is not an image file"),
        ]:
            status, _, res = http(base, "/api/query-image", method="POST", data=body, headers={"Content-Type": ctype})
            error = json.loads(res)["error"]
            assert status == 400 and words in error, error
            assert "object at 0x" not in error and "<_io" not in error, error
        big = "9" * 20
        for path, words in [(f"/api/search?q=cat&k={big}", "k must be an integer between 1 and 12"),
                            (f"/api/image/1?k={big}", "k must be an integer between 1 and 60"),
                            ("/api/search?q=cat&shortlist=lots", "shortlist must be an integer between 0 and 12")]:
            status, _, res = http(base, path)
            assert status == 400 and words in json.loads(res)["error"], (path, res)


# ------------------------------------------------------------------------------ 7. the page
PAGE_HARNESS = r"""
// Runs the page's script against a live server with a minimal DOM: node harness.js PAGE BASE HASH SEARCH K
const fs = require("fs");
const [page, base, hash, search, k] = process.argv.slice(2);
const script = fs.readFileSync(page, "utf8").split("<script>")[1].split("</script>")[0];
const els = {};
const el = (id) => els[id] || (els[id] = {id, textContent: "", innerHTML: "", value: "", hidden: false, files: [],
                                          addEventListener() {}});
el("k").value = k; el("shortlist").value = "0";
global.document = {getElementById: el};
global.location = {hash, search, origin: base};
global.history = {replaceState() {}};
const realFetch = globalThis.fetch;
let inflight = 0;
globalThis.fetch = async (url, opts) => {  // answers read whole before the page sees them
  inflight++;
  try {
    const r = await realFetch(base + url, opts);
    const body = await r.text();
    return new Response(body, {status: r.status, statusText: r.statusText, headers: r.headers});
  } finally { setTimeout(() => inflight--, 100); }
};
new Function(script)();
let idle = 0, waited = 0;
const timer = setInterval(() => {
  waited += 100;
  idle = inflight === 0 ? idle + 1 : 0;
  if (idle >= 5 || waited > 60000) {
    clearInterval(timer);
    console.log(JSON.stringify({results: el("results").innerHTML, error: el("error").textContent,
                                status: el("status").textContent, info: el("info").textContent}));
  }
}, 100);
"""


def run_page(tmp_path, base, hash_="", search="", k=1) -> dict:
    import importlib.resources

    page = tmp_path / "page.html"
    page.write_bytes(importlib.resources.files("tvrn.search").joinpath("page.html").read_bytes())
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_HARNESS)
    out = subprocess.run(["node", str(harness), str(page), base, hash_, search, str(k)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_page_image_view_shows_its_own_captions_and_says_how_to_give_the_token(setup, tmp_path):
    pytest.importorskip("fastapi")
    if shutil.which("node") is None:
        pytest.skip("node is not installed (it runs the page's script here)")
    from tvrn.search.server import ServerThread, create_app

    index = setup[4]
    with ServerThread(create_app(index, token="s3cret")) as base:
        got = run_page(tmp_path, base)  # no #token= in the address
        assert got["error"] == f"this server needs a token: open the page as {base}/#token=YOUR_TOKEN", got
        got = run_page(tmp_path, base, "#token=nope", "?image=3")
        assert "is not this server's" in got["error"] and f"{base}/#token=YOUR_TOKEN" in got["error"], got
        # the image view with k = 1: at most one of its five captions can rank, all five are shown
        got = run_page(tmp_path, base, "#token=s3cret", "?image=3", k=1)
        assert got["error"] == "" and "12 images" in got["info"], got
        results = got["results"]
        assert 'src="/images/3?token=s3cret"' in results, results[:500]
        own = index.captions_of(3)
        assert len(own) == 5 and all(c in results for c in own), results
        ranked = index.search_image(3, k=1, shortlist=None)[0]
        assert ("1 of 5 in the top 1" if ranked.image_index == 3 else "none of the 5 in the top 1") in results
        assert http(base, "/images/3?token=s3cret")[0] == 200  # what that <img> loads
