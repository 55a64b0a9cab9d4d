"""Search commands: `tvrn index` (encode a split once), `tvrn search` (query it), `tvrn serve` (HTTP + web page).

    tvrn index runs/tvrn/best.pt --data data/synth --split test --out runs/tvrn/test.index
    tvrn search runs/tvrn/test.index "a black cat on top of a small ball" -k 5
    tvrn search runs/tvrn/test.index --image 3 -k 5
    tvrn search runs/mine/test.index --image-file photo.jpg -k 5     # index of a `tvrn extract` data folder
    tvrn serve runs/tvrn/test.index --port 8000
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ._args import (IntermixedArgumentParser, non_empty_token, non_negative_int, port, positive_float,
                    positive_int)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="encode a split with a trained checkpoint into a search index",
        description="Encode every image and caption of a precomp split with a trained checkpoint, batch by batch, "
                    "into an index folder (memory-mapped encodings, shortlist vectors, optional FAISS indexes, the "
                    "model weights, sha256 of every file): `tvrn search` / `tvrn serve` need nothing else.")
    p.add_argument("checkpoint", help="trained checkpoint (.pt)")
    p.add_argument("--data", required=True, help="precomp data folder")
    p.add_argument("--split", default="test", help="split to index (default %(default)s)")
    p.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage of the encodings (default %(default)s; half the disk and RAM at 16 bits)")
    p.add_argument("--faiss", metavar="FACTORY",
                   help="FAISS index for the shortlist, by factory string: Flat, IVF1024,Flat, HNSW32, ... "
                        "(default: exact chunked matrix products)")
    p.add_argument("--images", help="folder of <image id>.png|.jpg for the web page "
                                    "(default DATA/images/SPLIT when it exists)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images / captions per encode batch")
    p.add_argument("--adjacency-threshold", type=float, default=0.2)
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_index)

    p = subparsers.add_parser(
        "search", help="query a search index: text -> images, or a gallery image -> captions",
        description="Answer a query from an index built by `tvrn index`: a caption finds images; --image N ranks "
                    "the index's captions for gallery image N. Two stages: the shortlist vectors pick "
                    "--shortlist candidates, the full model re-ranks them (--shortlist 0: score everything). "
                    "Options may come before or after the query.")
    p.__class__ = IntermixedArgumentParser  # `tvrn search INDEX -k 2 "a red ball"` as well as `INDEX "..." -k 2`
    p.add_argument("index", help="index from `tvrn index`")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files on opening")
    p.add_argument("--nprobe", type=positive_int,
                   help="FAISS search breadth (IVF lists / HNSW efSearch) of the shortlist")
    p.add_argument("query", nargs="?", help="caption to search for")
    p.add_argument("--image", type=non_negative_int, help="rank captions for this gallery image instead")
    p.add_argument("--image-file", help="rank captions for this photo, extracted with the gallery's recorded recipe "
                                        "(indexes of `tvrn extract` data folders)")
    p.add_argument("-k", type=positive_int, default=10, help="results to show (default %(default)s)")
    p.add_argument("--shortlist", type=non_negative_int, default=None,
                   help="candidates re-ranked with the full score (default 100 images / 500 captions; 0: all)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=run_search)

    p = subparsers.add_parser(
        "serve", help="serve a search index over HTTP, with a web page",
        description="HTTP JSON API (/api/search, /api/image/N, /api/info) and a web page at / that shows the "
                    "retrieved images and captions (FastAPI on uvicorn: pip install 'tvrn[serve]').")
    p.add_argument("index", help="index file from `tvrn index`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=port, default=8000, help="port (default %(default)s; 0: any free port)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    p.add_argument("--token", type=non_empty_token, help="bearer token every /api route requires (or env TVRN_SERVE_TOKEN)")
    p.add_argument("--workers", type=positive_int, default=1, help="model calls at a time (default %(default)s)")
    p.add_argument("--queue", type=non_negative_int, default=8, help="searches that may wait; more get 503 (default %(default)s)")
    p.add_argument("--header-timeout", type=positive_float, default=10.0,
                   help="seconds a connection may take to send its request head (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for model calls (default: CPU cores - 1, so the event loop that answers "
                        "the page, /api/info, image files and 503s always has a core)")
    p.add_argument("--model-nice", type=int, default=10,
                   help="nice value added to the model workers, so cheap requests win the CPU (default %(default)s)")
    p.add_argument("--pool", choices=["process", "thread"], default="process",
                   help="run model calls in worker processes that each open the index (default: model work never "
                        "holds the server's GIL) or in threads of the server process (one copy of the index in RAM)")
    p.add_argument("--nprobe", type=positive_int,
                   help="FAISS search breadth (IVF lists / HNSW efSearch) of the shortlist")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking every index file's sha256 on opening (it reads every byte: 13 s for 12 GB)")
    p.add_argument("--body-timeout", type=positive_float, default=30.0,
                   help="seconds an upload (POST /api/query-image) may take to send its body (default %(default)s)")
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto",
                   help="uvicorn's HTTP parser: httptools (C, the default when installed) or h11 (pure Python)")
    p.set_defaults(func=run_serve)


def _load(path: str, args=None):
    from tvrn.search.index import SearchIndex

    return SearchIndex.load(path, verify=not getattr(args, "no_verify", False), nprobe=getattr(args, "nprobe", None))


class _Terminated(SystemExit):
    """SIGTERM / SIGHUP during `tvrn index`, raised where the build is, so it unwinds and removes its temporary
    folder."""


@contextlib.contextmanager
def _unwind_on_terminate():
    """SIGTERM and SIGHUP end the build through the normal unwinding (its temporary folder removed) instead of
    killing it where it stands; SIGKILL cannot be caught: the next build of the same output removes what it
    left (`tvrn.search.index.stale_temporaries`)."""
    import signal

    def stop(signum, frame):
        raise _Terminated(128 + signum)

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            old[sig] = signal.signal(sig, stop)
        except (ValueError, OSError):  # not the main thread: leave the signal alone
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_index(args: argparse.Namespace) -> int:
    from tvrn.data import TvrnDataError
    from tvrn.search.index import SearchIndex

    try:
        with _unwind_on_terminate():
            index = SearchIndex.build_to(args.out, args.checkpoint, args.data, args.split, image_dir=args.images,
                                         batch_size=args.batch_size, adjacency_threshold=args.adjacency_threshold,
                                         dtype=args.dtype, faiss=args.faiss, device=args.device)
    except _Terminated as e:
        print(f"tvrn index: stopped by signal {e.code - 128}; its temporary folder was removed", file=sys.stderr)
        return e.code
    except ImportError as e:
        print(f"tvrn index: {e} (--faiss needs faiss-cpu: pip install 'tvrn[search]')", file=sys.stderr)
        return 2
    except (TvrnDataError, ValueError, FileNotFoundError) as e:
        print(f"tvrn index: {e}", file=sys.stderr)
        return 2
    print(f"tvrn index: {args.out}: {index.model_name}, {index.num_images} images, {index.num_captions} captions "
          f"of {args.data} {args.split}" + (f", image files in {index.image_dir}" if index.image_dir else ""))
    return 0


def run_search(args: argparse.Namespace) -> int:
    from tvrn.search.index import SearchIndexError

    image_file = getattr(args, "image_file", None)
    if sum(x is not None for x in (args.query, args.image, image_file)) != 1:
        print("tvrn search: give either a query text or --image N (or --image-file PATH)", file=sys.stderr)
        return 2
    try:
        index = _load(args.index, args)
        if image_file is not None:
            short = 500 if args.shortlist is None else (args.shortlist or None)
            hits = index.search_image_file(image_file, k=args.k, shortlist=short)
        elif args.image is not None:
            short = 500 if args.shortlist is None else (args.shortlist or None)
            hits = index.search_image(args.image, k=args.k, shortlist=short)
        else:
            short = 100 if args.shortlist is None else (args.shortlist or None)
            hits = index.search_text(args.query, k=args.k, shortlist=short)
    except (SearchIndexError, FileNotFoundError) as e:
        print(f"tvrn search: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=1))
        return 0
    for h in hits:
        if h.text is None:
            print(f"{h.rank:3d}. image {h.index} ({h.image_id})  score {h.score:.4f}")
            for cap in index.captions_of(h.index)[:2]:
                print(f"       {cap}")
        else:
            mark = "*" if h.image_index == args.image else " "
            print(f"{h.rank:3d}.{mark} {h.text}  (image {h.image_index}, score {h.score:.4f})")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import os

    from tvrn.search.index import SearchIndexError

    from tvrn.search.server import _require, is_loopback, serve
    from tvrn.search.service import Limits

    try:
        _require()
    except ImportError as e:
        print(f"tvrn serve: {e}", file=sys.stderr)
        return 2
    try:
        index = _load(args.index, args)
    except (SearchIndexError, FileNotFoundError) as e:
        print(f"tvrn serve: {e}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"tvrn serve: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("TVRN_SERVE_TOKEN") or None
    if not is_loopback(args.host):
        print(f"tvrn serve: WARNING: listening on {args.host}, reachable from other machines"
              + ("" if token else " without a token (set --token or TVRN_SERVE_TOKEN)"), file=sys.stderr)

    def ready(url):
        page = f"{url}/" + (f"#token={token}" if token else "")
        print(f"tvrn serve: {index.model_name} on {index.num_images} images; open {page}", flush=True)

    try:
        serve(index, args.host, args.port, quiet=args.quiet, token=token, workers=args.workers, queue=args.queue,
              header_timeout=args.header_timeout, ready=ready, threads=args.threads,
              model_nice=args.model_nice, processes=args.pool == "process", http=args.http,
              limits=Limits(body_timeout_s=args.body_timeout))
    except SystemExit as e:  # uvicorn exits when it cannot bind
        if e.code:
            print(f"tvrn serve: cannot listen on {args.host}:{args.port}", file=sys.stderr)
            return 2
    return 0
