"""Peak memory of reading a large image, with tvrn's pixel limit (`tvrn.extract.images.open_image`) and before it.

Images, generated into a temporary folder (low-entropy content: a few MB on disk, any size in pixels):
a normal 1024 x 768 JPEG photo (the baseline), a PNG just under the default limit (6300 x 6300, 39.7 M pixels),
a 62 M-pixel PNG (9000 x 7000, the size of the upload that took a server worker from 447 MB to 1.36 GB),
a 13000 x 13000 PNG, a 20000 x 20000 PNG and a 12000 x 9000 JPEG.

Each case runs in a fresh subprocess that imports what it needs (torch, the backbone for "prepare"), reads
VmRSS, does one read, then reads its own VmHWM (/proc/self/status): extra = peak - RSS before the read.
Paths: "open" = `read_rgb(path)` (the default limit, 40 M pixels); "prepare" = `RegionExtractor(Recipe())
.prepare_file(path)` (what `tvrn extract` does per image: read, resize to 384 x 384, boxes); "query" =
`read_query_image(bytes)` (a photo query's upload). "old_open" / "old_prepare": the same with the read_rgb of
the last commit (git HEAD, before the limit), for comparison; skipped with --no-old or outside a git checkout.

    python benchmarks/bench_image_memory.py [--no-old] [--out benchmarks/results/image_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGES = {  # name: (width, height, format)
    "normal_1024x768.jpg": (1024, 768, "JPEG"),
    "near_limit_6300x6300.png": (6300, 6300, "PNG"),
    "upload_9000x7000.png": (9000, 7000, "PNG"),
    "big_13000x13000.png": (13000, 13000, "PNG"),
    "big_20000x20000.png": (20000, 20000, "PNG"),
    "big_12000x9000.jpg": (12000, 9000, "JPEG"),
}

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MB
mode, path, old_src = sys.argv[1], sys.argv[2], sys.argv[3]
if mode.startswith("old_"):
    import types
    old = types.ModuleType("old_images")
    exec(compile(open(old_src).read(), "old_images.py", "exec"), old.__dict__)
    read = old.read_rgb
else:
    from tvrn.extract.images import read_rgb as read
if mode.endswith("prepare"):
    from tvrn.extract import Recipe, RegionExtractor
    ex = RegionExtractor(Recipe())
    ex.prepare(__import__("numpy").zeros((8, 8, 3), "uint8"))  # warm-up: first-call allocations not counted
if mode == "query":
    from tvrn.search.image_query import read_query_image
    data = open(path, "rb").read()
before, hwm_before = status("VmRSS"), status("VmHWM")
t0 = time.perf_counter()
try:
    if mode == "query":
        out = read_query_image(data).shape
    elif mode == "prepare":
        x, boxes, size = ex.prepare_file(path)
        out = (tuple(x.shape), size.tolist())
    elif mode == "old_prepare":
        x, boxes, size = ex.prepare(read(path))
        out = (tuple(x.shape), size.tolist())
    else:
        out = read(path).shape
    outcome = f"ok {out}"
except BaseException as e:
    outcome = f"{type(e).__name__}: {str(e)[:160]}"
seconds = time.perf_counter() - t0
print(json.dumps({"outcome": outcome, "rss_before_mb": before, "hwm_before_mb": hwm_before,
                  "peak_mb": status("VmHWM"), "seconds": seconds}))
"""


def write_png_solid(path: Path, width: int, height: int, rgb=(90, 140, 200)) -> None:
    """A solid-colour RGB PNG written row by row (little memory whatever its size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")

    row = b"\0" + bytes(rgb) * width
    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])))
        block = []
        for y in range(height):
            block.append(comp.compress(row))
            if len(block) >= 256:
                data = b"".join(block)
                if data:
                    f.write(chunk(b"IDAT", data))
                block = []
        data = b"".join(block) + comp.flush()
        f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IEND", b""))


def write_jpeg(path: Path, width: int, height: int) -> None:
    """A photo-like JPEG: smooth gradients per channel (PIL builds it from 256 x 256 gradients)."""
    from PIL import Image

    g = Image.linear_gradient("L")
    r = g.resize((width, height), Image.BILINEAR)
    b = g.rotate(90).resize((width, height), Image.BILINEAR)
    Image.merge("RGB", (r, Image.new("L", (width, height), 128), b)).save(path, quality=90)


def old_images_source(tmp: Path):
    """images.py of git HEAD (the read before the pixel limit) -> (file, commit), or (None, None)."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        src = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:src/tvrn/extract/images.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    if "MAX_PIXELS" in src:  # HEAD already has the limit: nothing older to compare with
        return None, None
    p = tmp / "old_images.py"
    p.write_text(src)
    return p, commit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-old", action="store_true", help="skip the reads of the code before the limit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image_memory.json"))
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvrn_bench_img_") as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        for name, (w, h, fmt) in IMAGES.items():
            (write_jpeg if fmt == "JPEG" else write_png_solid)(tmp / name, w, h)
        gen_s = time.perf_counter() - t0
        print(f"generated {len(IMAGES)} images in {gen_s:.1f} s: "
              + ", ".join(f"{n} {(tmp / n).stat().st_size / 1e6:.2f} MB" for n in IMAGES), file=sys.stderr)
        old_src, old_commit = (None, None) if args.no_old else old_images_source(tmp)
        modes = ["open", "prepare", "query"] + (["old_open", "old_prepare"] if old_src else [])
        for name, (w, h, _) in IMAGES.items():
            for mode in modes:
                res = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp / name), str(old_src or "")],
                                     capture_output=True, text=True, env=env, cwd=ROOT)
                try:
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    r = {"outcome": f"child failed (rc {res.returncode}): {res.stderr.strip()[-300:]}"}
                r["outcome"] = r["outcome"].replace(str(tmp) + os.sep, "")  # the file name, not the temp folder
                r.update(image=name, pixels=w * h, file_mb=(tmp / name).stat().st_size / 1e6, path=mode)
                if "peak_mb" in r:
                    r["extra_mb"] = r["peak_mb"] - r["rss_before_mb"]
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "old_commit": old_commit, "generate_s": gen_s,
              "default_max_pixels": 40_000_000, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'image':26} {'Mpx':>6} {'path':12} {'before MB':>9} {'peak MB':>8} {'extra MB':>8} {'s':>6}  outcome")
    for r in rows:
        if "peak_mb" in r:
            print(f"{r['image']:26} {r['pixels'] / 1e6:6.1f} {r['path']:12} {r['rss_before_mb']:9.0f} "
                  f"{r['peak_mb']:8.0f} {r['extra_mb']:8.0f} {r['seconds']:6.2f}  {r['outcome'][:90]}")
        else:
            print(f"{r['image']:26} {r['pixels'] / 1e6:6.1f} {r['path']:12} {'':9} {'':8} {'':8} {'':6}  {r['outcome'][:90]}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
