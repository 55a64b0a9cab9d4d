"""A search index larger than RAM would hold: build, size, serving memory, latency, shortlist recall.

Part A, the re-rank store: a TVRN model at the demo's widths (D=64, S=32, R=12, Dv=256; random weights) encodes
--images random galleries images batch by batch into an index folder (`tvrn.search.formats._IndexWriter`, the
writer `tvrn index` uses), in float32 and in float16. Reported: build seconds, index size, peak RSS of the build
(flat in the gallery size: only a batch is in memory), and, in a fresh process that opens the index, RSS after
opening and after --queries text queries (shortlist 100, re-ranked by the full model), with the latency p50 / p99.

Part B, the shortlist: --vectors unit vectors (D=64, drawn around --centres centres, as trained embeddings
cluster, or uniform on the sphere with --centres 0)
in FAISS indexes built from factory strings (Flat, IVF, HNSW): build seconds, one-query latency p50 / p99, and
recall@100 of each against the exact top 100.

Part C, what 16-bit storage costs in retrieval: a trained checkpoint's test split (--checkpoint, --data) scored
from its float32 and float16 / bfloat16 indexes: RSUM of each.

    python benchmarks/bench_index.py [--images 200000] [--vectors 1000000] [--out benchmarks/results/index.json]
        [--checkpoint runs/study/study/tvrn_s0/best.pt --data data/synth]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tvrn.data.batch import ImageBatch, TextBatch
from tvrn.models import create_model
from tvrn.search.formats import _IndexWriter
from tvrn.search.vectors import _ivf_lists

WIDTH = dict(img_dim=256, embed_size=64, sim_dim=32, word_dim=64, vocab_size=60)
R = 12


def rss(field: str = "VmRSS") -> int:
    """This process's resident bytes (VmRSS; RssAnon: heap and tensors only; RssFile: mapped file pages, which
    the kernel can drop: the memory-mapped index shows up there)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def random_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.relu(torch.randn(n, R, 256, generator=g))
    adj = torch.rand(n, R, R, generator=g) > 0.7
    return ImageBatch(features=feats, mask=torch.ones(n, R, dtype=torch.bool), adjacency=adj | adj.transpose(1, 2))


def random_texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 13, (n,), generator=g)
    mask = torch.arange(12)[None] < lens[:, None]
    return TextBatch(tokens=torch.randint(4, 60, (n, 12), generator=g) * mask, mask=mask)


def build(out: Path, ckpt: dict, model, n_images: int, n_captions: int, dtype: str, batch: int = 2048,
          faiss_spec=None) -> dict:
    t0 = time.perf_counter()
    writer = _IndexWriter(out, n_images, n_captions, dtype, max_words=12)
    with torch.no_grad():
        for s in range(0, n_images, batch):
            enc = model.encode_image(random_images(min(batch, n_images - s), s))
            writer.add_images(s, enc, model.shortlist_embed_image(enc).float())
        for s in range(0, n_captions, batch):
            enc = model.encode_text(random_texts(min(batch, n_captions - s), 10**9 + s))
            writer.add_texts(s, enc, model.shortlist_embed_text(enc).float())
    writer.finish(ckpt, [f"sim-{i}" for i in range(n_images)], [f"caption {c}" for c in range(n_captions)],
                  torch.arange(n_captions) % n_images, "", "sim", None, faiss_spec)
    return {"seconds": time.perf_counter() - t0, "bytes": size_of(out)}


SERVE = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(2)
from tvrn.search.index import SearchIndex
def rss(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = rss()
t = time.perf_counter()
index = SearchIndex.load(sys.argv[1], verify=sys.argv[3] == "1", nprobe=int(sys.argv[4]) or None)
opened, open_s = rss(), time.perf_counter() - t
words = ["a", "red", "cat", "on", "blue", "box", "small", "dog", "ball", "green"]
lat = []
for q in range(int(sys.argv[2])):
    text = " ".join(words[(q * 7 + j * 3) % len(words)] for j in range(6))
    t = time.perf_counter()
    index.search_text(text, k=10, shortlist=100)
    lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"rss_before": before, "rss_open": opened, "rss_after": rss(), "open_s": open_s,
                  "rss_anon_after": rss("RssAnon"), "rss_file_after": rss("RssFile"),
                  "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def part_a(a, root: Path) -> list:
    torch.manual_seed(0)
    model = create_model("tvrn_sgr", **WIDTH).eval()
    ckpt = {"config": {"model_name": "tvrn_sgr", "model": asdict(model.config)}, "model": model.state_dict(),
            "vocab": {"word2idx": {f"w{i}": i for i in range(60)}, "idx2word": {str(i): f"w{i}" for i in range(60)},
                      "idx": 60}}
    ckpt["vocab"]["word2idx"].update({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3})
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "cat", "on", "blue", "box", "small", "dog", "ball",
             "green"] + [f"w{i}" for i in range(14, 60)]
    ckpt["vocab"] = {"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": {str(i): w for i, w in enumerate(words)},
                     "idx": len(words)}
    rows = []
    for dtype in a.dtypes:
        out = root / f"index_{dtype}"
        if out.exists():
            shutil.rmtree(out)
        peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        spec, param = a.index_faiss
        r = {"dtype": dtype, "images": a.images, "captions": a.captions, "faiss": spec, "faiss_param": param,
             **build(out, ckpt, model, a.images, a.captions, dtype, faiss_spec=spec or None)}
        r["build_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        r["build_peak_rss_before"] = peak0
        r["build_rss_anon_end"], r["build_rss_file_end"] = rss("RssAnon"), rss("RssFile")
        for verify in (1, 0):
            proc = subprocess.run([sys.executable, "-c", SERVE, str(out), str(a.queries), str(verify), str(param)],
                                  capture_output=True, text=True, check=True)
            r["serve_verify" if verify else "serve"] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        if not a.keep:
            shutil.rmtree(out)
    return rows


def part_b(a) -> list:
    import faiss

    g = np.random.default_rng(0)
    if a.centres:  # clustered, as trained embeddings are (flatters an IVF with as many lists as centres)
        centres = g.standard_normal((a.centres, 64)).astype(np.float32)
        vec = centres[g.integers(0, a.centres, a.vectors)] + 0.5 * g.standard_normal((a.vectors, 64)).astype(np.float32)
    else:  # uniform on the sphere: no structure, the hardest case for approximate search
        vec = g.standard_normal((a.vectors, 64)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    queries = vec[g.integers(0, a.vectors, 200)] + 0.1 * g.standard_normal((200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(64)
    exact.add(vec)
    _, truth = exact.search(queries, 100)
    rows = []
    for spec, nprobe in a.faiss:
        t0 = time.perf_counter()
        index = faiss.index_factory(64, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vec[:: max(1, a.vectors // max(100_000, 64 * _ivf_lists(index)))])
        index.add(vec)
        build_s = time.perf_counter() - t0
        if nprobe:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe" if "IVF" in spec else "efSearch", nprobe)
        lat, hits = [], 0
        for q in range(len(queries)):
            t = time.perf_counter()
            _, idx = index.search(queries[q : q + 1], 100)
            lat.append(time.perf_counter() - t)
            hits += len(set(idx[0].tolist()) & set(truth[q].tolist()))
        lat.sort()
        rows.append({"factory": spec, "nprobe": nprobe, "vectors": a.vectors, "centres": a.centres, "build_s": build_s,
                     "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
                     "recall@100": hits / (100 * len(queries))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def part_c(a, root: Path) -> list:
    from tvrn.data import load_split
    from tvrn.evaluation import evaluate
    from tvrn.scoring import score_all
    from tvrn.search import SearchIndex

    test = load_split(a.data, "test")
    c2i = torch.as_tensor(test.caption_to_image)
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        out = root / f"trained_{dtype}"
        index = SearchIndex.build_to(out, a.checkpoint, a.data, "test", dtype=dtype)
        enc_i = index.images.get(torch.arange(index.num_images))
        enc_t = index.texts.get(torch.arange(index.num_captions))
        r = evaluate(score_all(index.model, enc_i, enc_t), c2i)
        rows.append({"dtype": dtype, "rsum": r["rsum"], "bytes": size_of(out)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        shutil.rmtree(out)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--captions", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16"])
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--faiss", nargs="*", default=["Flat:0", "IVF4096,Flat:16", "IVF4096,Flat:64", "HNSW32:64",
                                                   "HNSW32:256", "HNSW32:512"],
                    help="part B: FACTORY:PARAM pairs, PARAM nprobe (IVF) or efSearch (HNSW; k=100 needs efSearch >= "
                         "k, 2-5 k for recall), 0: none")
    ap.add_argument("--centres", type=int, default=4096,
                    help="part B: the vectors are drawn around this many centres (0: uniform on the sphere)")
    ap.add_argument("--index-faiss", default="Flat:0",
                    help="part A: the FAISS shortlist the served index is built with, FACTORY:PARAM (':0' no "
                         "parameter; an empty FACTORY: exact search over the stored vectors)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["store", "shortlist", "precision"])
    ap.add_argument("--checkpoint", default="runs/study/study/tvrn_s0/best.pt")
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--root", default="runs/bench_index")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index.json"))
    a = ap.parse_args()
    a.faiss = [(s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in a.faiss]
    a.index_faiss = (a.index_faiss.rsplit(":", 1)[0], int(a.index_faiss.rsplit(":", 1)[1]))
    torch.set_num_threads(2)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    res = {"command": " ".join(["python", *sys.argv]),
           "store": part_a(a, root) if "store" not in a.skip else [],
           "shortlist": part_b(a) if "shortlist" not in a.skip else []}
    if Path(a.checkpoint).exists() and "precision" not in a.skip:
        res["precision"] = part_c(a, root)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("| storage | images | build s | index GB | build peak RSS GB | open + 200 queries RSS GB | p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in res["store"]:
        s = r["serve"]
        print(f"| {r['dtype']} | {r['images']:,} | {r['seconds']:.0f} | {r['bytes'] / 2**30:.2f} | "
              f"{r['build_peak_rss'] / 2**30:.2f} | {s['rss_after'] / 2**30:.2f} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} |")
    print("\n| shortlist | vectors | build s | p50 / p99 ms | recall@100 |\n|---|---|---|---|---|")
    for r in res["shortlist"]:
        print(f"| {r['factory']} (nprobe {r['nprobe']}) | {r['vectors']:,} | {r['build_s']:.1f} | "
              f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['recall@100']:.3f} |")
    for r in res.get("precision", []):
        print(f"{r['dtype']}: test RSUM {r['rsum']:.2f}, {r['bytes'] / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
