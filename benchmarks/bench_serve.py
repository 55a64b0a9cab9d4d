"""Load on `tvrn serve` over loopback: 20 and 100 concurrent clients, mixed requests, latency, errors, memory.

The server is a real `tvrn serve` process on a 200-image index (the synthetic benchmark's test split, a TVRN
model at the demo's widths with random weights: the load, not the answers, is measured). Each client thread
keeps one HTTP/1.1 connection and sends, at random, a search (40%: a caption of the split as the query, k 10,
shortlist 100), an image query (10%), or a cheap request (50%: /api/info, the page, an image file), until the
phase has sent its requests or run 60 s. The client threads are spread over --client-processes processes (in
one process their own GIL would be part of the latency measured). Reported per phase: requests, p50 / p99 latency of cheap requests and of
model requests, statuses (503 is the pool's deliberate "busy"; a client that gets one waits its Retry-After
before its next request), errors (any other non-200), dropped connections
(a request that got no answer), and the RSS of the server with its model worker processes before and after.
Each `--pools` value (`tvrn serve --pool process`, the default, and `thread`) gets its own server and phases,
one after the other in the same run. A probe process sends one cheap request every 50 ms during each phase (its
latency is the server's answer time without the load clients' own GIL waits). First, the server's CPU per cheap
request with one client, for h11 and httptools side by side (`tvrn serve --http`).

    python benchmarks/bench_serve.py [--clients 20 100] [--requests 1500] [--client-processes 4] [--out benchmarks/results/serve.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import torch


def build_index(data: Path, out: Path) -> None:
    from tvrn.data import Vocabulary, load_split
    from tvrn.data.synth import SynthConfig, write_dataset
    from tvrn.models import create_model
    from tvrn.search import SearchIndex
    from tvrn.checkpoint import save_model

    if not (data / "manifest.json").exists():
        write_dataset(data, SynthConfig())
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", img_dim=load_split(data, "test").feature_size, embed_size=64, sim_dim=32,
                         word_dim=64, vocab_size=len(vocab))
    ckpt = out.with_suffix(".pt")
    save_model(ckpt, "tvrn_sgr", model, vocab)
    SearchIndex.build(ckpt, data, "test").save(out)


def descendants(pid: int) -> list[int]:
    """The server's child processes (its model workers) and theirs."""
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
    except FileNotFoundError:  # a process that ended meanwhile
        pass
    return out


def _own_rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def _own_cpu(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss(pid: int) -> int:
    """Resident bytes of the server and its model worker processes, summed."""
    return sum(_own_rss(p) for p in [pid, *descendants(pid)])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the server process's CPU seconds, its worker processes' CPU seconds), user + system."""
    return _own_cpu(pid), sum(_own_cpu(p) for p in descendants(pid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port, captions, n_images, stop, budget, out, seed):
    rnd = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        with budget[1]:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        u = rnd.random()
        if u < 0.4:
            kind, path = "model", f"/api/search?q={quote(rnd.choice(captions))}&k=10&shortlist=100"
        elif u < 0.5:
            kind, path = "model", f"/api/image/{rnd.randrange(n_images)}?k=10"
        else:
            kind, path = "cheap", rnd.choice(["/api/info", "/", f"/images/{rnd.randrange(n_images)}"])
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            status = r.status
            if r.getheader("connection", "").lower() == "close":
                conn.close()
            retry = float(r.getheader("retry-after") or 0) if status == 503 else 0.0
        except (OSError, http.client.HTTPException):
            status, retry = None, 0.0  # dropped: no answer
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out.append((kind, status, time.perf_counter() - t0))
        if retry:
            stop.wait(retry)  # a polite client: Retry-After before its next request
    conn.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def probe(port, n_images, stop, out):
    """The probe: one process, one thread, one connection, a cheap request every 50 ms while the clients run.
    Its latency is the server's answer time for cheap requests under load, without the client-side GIL waits of
    the load clients (25 threads per process at 100 clients)."""
    conn, lat, k = http.client.HTTPConnection("127.0.0.1", port, timeout=30), [], 0
    while not stop.is_set():
        path = ["/api/info", "/", f"/images/{k % n_images}"][k % 3]
        k += 1
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            lat.append((r.status, time.perf_counter() - t0))
        except (OSError, http.client.HTTPException):
            lat.append((None, time.perf_counter() - t0))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        time.sleep(0.05)
    out.put(lat)


def latency(answers) -> dict:
    """[(status, seconds)] -> requests, answered 200, p50 / p99 ms of those."""
    lat = [t for s, t in answers if s == 200]
    return {"n": len(answers), "ok": len(lat), "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * pct(lat, 0.99) if lat else None}


def client_group(port, captions, n_images, clients, requests, seconds, seed):
    """One client process: `clients` threads sharing a budget of `requests`; -> [(kind, status, seconds)]."""
    results, stop, budget = [], threading.Event(), [requests, threading.Lock()]
    threads = [threading.Thread(target=client, args=(port, captions, n_images, stop, budget, results, seed + k))
               for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, seconds - (time.perf_counter() - t0)))
    stop.set()
    for t in threads:
        t.join()
    return results


def start_server(index: Path, *options) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvrn.cli", "serve", str(index), "--port", str(port), "--quiet",
                               *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = server.stdout.readline()  # "tvrn serve: ... open http://..."
    if "open http" not in line:
        server.kill()
        raise RuntimeError(f"server did not start: {line}")
    return server, port


def cpu_per_request(index: Path, n_images: int, requests: int = 1000) -> list:
    """Server CPU per cheap request, one client, for each of uvicorn's HTTP parsers (side by side)."""
    rows = []
    for parser in ("h11", "httptools"):
        server, port = start_server(index, "--http", parser)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            row = {"http": parser}
            for name, path in (("info", "/api/info"), ("page", "/"), ("image", f"/images/{n_images // 2}")):
                c0 = cpu_seconds(server.pid)[0]
                for _ in range(requests):
                    conn.request("GET", path)
                    conn.getresponse().read()
                row[f"{name}_ms"] = 1000 * (cpu_seconds(server.pid)[0] - c0) / requests
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    return rows


def phase(port, pid, clients, requests, captions, n_images, seconds, processes):
    """clients threads spread over `processes` client processes (one process's GIL would time its own threads)."""
    before, cpu0 = rss(pid), cpu_seconds(pid)
    share = [clients // processes + (k < clients % processes) for k in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    stop, box = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe, args=(port, n_images, stop, box))
    prober.start()
    t0 = time.perf_counter()
    with ctx.Pool(processes) as pool:
        parts = pool.starmap(client_group, [(port, captions, n_images, c, requests * c // clients, seconds, 1000 * k)
                                            for k, c in enumerate(share) if c])
    results = [r for part in parts for r in part]
    wall = time.perf_counter() - t0
    stop.set()
    probed = box.get(timeout=60)
    prober.join(10)
    cpu1 = cpu_seconds(pid)
    out = {"clients": clients, "client_processes": processes, "requests": len(results), "seconds": wall, "rss_before_bytes": before,
           "rss_after_bytes": rss(pid), "statuses": {},
           "server_cpu_ms_per_request": 1000 * (cpu1[0] - cpu0[0]) / max(1, len(results)),
           "worker_cpu_s": cpu1[1] - cpu0[1]}
    for kind in ("cheap", "model"):
        out[kind] = latency([(s, t) for k, s, t in results if k == kind])
    out["probe"] = latency(probed)
    for _, s, _ in results:
        out["statuses"][str(s)] = out["statuses"].get(str(s), 0) + 1
    out["dropped"] = out["statuses"].get("None", 0)
    out["errors"] = sum(n for s, n in out["statuses"].items() if s not in ("200", "503", "None"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", nargs="*", type=int, default=[20, 100])
    ap.add_argument("--requests", type=int, default=1500, help="requests per phase (at most)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per phase (at most)")
    ap.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over")
    ap.add_argument("--pools", nargs="*", default=["process", "thread"], choices=["process", "thread"],
                    help="`tvrn serve --pool` values, each served and loaded in turn (side by side in one run)")
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--index", default="runs/bench_serve/test.index")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    a = ap.parse_args()
    index = Path(a.index)
    index.parent.mkdir(parents=True, exist_ok=True)
    if not index.exists():
        build_index(Path(a.data), index)
    captions = (Path(a.data) / "test_caps.txt").read_text().splitlines()
    n_images = len(captions) // 5
    res = {"command": " ".join(["python", *sys.argv]), "index_images": n_images, "phases": []}
    res["cpu_per_request"] = cpu_per_request(index, n_images)
    for pool in a.pools:
        server, port = start_server(index, "--pool", pool)
        try:
            for _ in range(3):  # warm-up: first model calls
                http.client.HTTPConnection("127.0.0.1", port).request("GET", f"/api/search?q={quote(captions[0])}")
            time.sleep(1.0)
            for c in a.clients:
                p = phase(port, server.pid, c, a.requests, captions, n_images, a.seconds, a.client_processes)
                res["phases"].append(p := {"pool": pool, **p})
                print(json.dumps(p), file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| pool | clients | requests | s | cheap p50 / p99 ms | probe p50 / p99 ms | model p50 / p99 ms | 503 | errors | "
          "dropped | RSS MB before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in res["phases"]:
        f = lambda d: "-" if d["p50_ms"] is None else f"{d['p50_ms']:.0f} / {d['p99_ms']:.0f}"  # noqa: E731
        print(f"| {p['pool']} | {p['clients']} | {p['requests']} | {p['seconds']:.0f} | {f(p['cheap'])} | {f(p['probe'])} | {f(p['model'])} | "
              f"{p['statuses'].get('503', 0)} | {p['errors']} | {p['dropped']} | "
              f"{p['rss_before_bytes'] / 2**20:.0f} -> {p['rss_after_bytes'] / 2**20:.0f} |")
    print("\n| HTTP parser | server CPU ms per request: /api/info | / | /images/N |\n|---|---|---|---|")
    for r in res["cpu_per_request"]:
        print(f"| {r['http']} | {r['info_ms']:.2f} | {r['page_ms']:.2f} | {r['image_ms']:.2f} |")


if __name__ == "__main__":
    main()
