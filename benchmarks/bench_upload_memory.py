"""Server memory under concurrent photo uploads: N clients each POST a 19 MB body to `/api/query-image` at once.

Before tvrn took a place in the model pool before reading an upload's body, thirty such uploads were all
buffered before the pool answered 503 (server RSS 1.04 GB, issue 22). Now an upload takes its place first; when
the pool is full it gets 503 without its body being read, so at most `--workers + --queue` bodies (each at most
`Limits.max_upload_bytes`, 20 MB) are in memory at once, whatever N is.

A real `tvrn serve` process (`--pool thread`, so the whole server is one process whose peak RSS the kernel
records: VmHWM) on the 200-image synthetic test split (bench_serve's index: TVRN at demo widths, random weights;
a gallery without photo features, so a body that is read is answered 409 after reading it, which is the cost
measured). Reported per setting: answers by status, the server's RSS before and its peak (VmHWM) after, and
the peak above the start.

    python benchmarks/bench_upload_memory.py [--clients 30] [--mb 19] [--out benchmarks/results/upload_memory.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import build_index, start_server  # noqa: E402


def vm(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def upload(port: int, body: bytes, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/api/query-image", body=body, headers={"Content-Type": "image/jpeg"})
        out.append(conn.getresponse().status)
    except OSError as e:  # the server closed the connection before the whole body was sent (503 before reading)
        out.append(type(e).__name__)
    finally:
        conn.close()


def run(index: Path, clients: int, body: bytes, workers: int, queue: int) -> dict:
    server, port = start_server(index, "--pool", "thread", "--workers", str(workers), "--queue", str(queue))
    try:
        before = vm(server.pid, "VmRSS:")
        answers: list = []
        threads = [threading.Thread(target=upload, args=(port, body, answers)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = vm(server.pid, "VmHWM:")
    finally:
        server.terminate()
        server.wait(30)
    return {"clients": clients, "workers": workers, "queue": queue, "body_mb": len(body) / 2**20,
            "answers": dict(Counter(map(str, answers))), "rss_before_mb": before / 2**20, "peak_mb": peak / 2**20,
            "peak_above_start_mb": (peak - before) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--mb", type=float, default=19.0)
    ap.add_argument("--data", default="data/synth", help="synthetic benchmark folder (generated if missing)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "upload_memory.json"))
    a = ap.parse_args()
    body = b"\xff\xd8" + b"x" * int(a.mb * 2**20)  # a JPEG's first bytes; the rest is never decoded
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "test.index"
        build_index(Path(a.data), index)
        rows = [run(index, a.clients, body, 1, q) for q in (0, 8)]
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "rows": rows}
    for r in rows:
        print(f"workers {r['workers']} queue {r['queue']}: {r['clients']} uploads of {r['body_mb']:.0f} MB -> "
              f"{r['answers']}; server RSS {r['rss_before_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB "
              f"(+{r['peak_above_start_mb']:.0f} MB)")
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
