"""The end-to-end demo on the synthetic benchmark: generate it if missing, train TVRN and the baselines,
evaluate on the test split, compare, and plot the dev RSUM curves. `tvrn demo` prints what this returns.

Besides the standard metrics, the demo reports *twin accuracy*: the test split holds hard-negative twins
(images whose scenes differ only by swapped colours or a flipped relation, so every caption of one is false
of the other); twin accuracy is the fraction of those captions that score higher with their own image than
with its twin. Chance is 50%; a model that binds attributes to objects through geometry should beat it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import load_trained
from .data import PrecompSplit, load_split
from .data.synth import SynthConfig
from .evaluation import block_sizes, encode_split, evaluate_folds, score_folds
from .fileio import write_json
from .pipeline import can_resume, resolve_config, run_environment, train_from_config
from .scoring import score_all


@dataclass
class DemoEntry:
    label: str  # row name in the table
    overrides: list[str] = field(default_factory=list)  # section.key=value over the demo preset


DEMO_ENTRIES = (  # the first entry's run is indexed for `tvrn serve`
    # The preset's first epoch adds the shortlist loss (train.shortlist_loss_epochs=1): from a random start the
    # similarity head scores every pair alike, and SGRAF and TVRN then sit on the sum loss's plateau for one to
    # three epochs, for as long as the seed or float rounding decides (TVRN's test RSUM after six epochs on the 200-image
    # test split: 370-481 over seeds 0-3); the shortlist cosines give the encoders a signal from the first step.
    # docs/demo.md.
    DemoEntry("TVRN", ["model.name=tvrn_sgr"]),
    DemoEntry("SGRAF (SGR)", ["model.name=sgraf_sgr"]),
    # VSE scores pairs by its shortlist cosines: the shortlist loss would be its own loss counted twice
    DemoEntry("VSE", ["model.name=vse", "train.shortlist_loss_weight=0"]),
)

# The demo's benchmark: the standard synthetic one (`tvrn synth`; train and dev byte-identical to it) with a
# 1,000-image test split, scored as five folds of 200 images, each against its own 1,000 captions (COCO 1K's
# protocol at a fifth of the scale, so every query ranks among as many candidates as on the 200-image split). Over
# runs of seed 0 on other thread counts and kernels one fold's RSUM spanned up to 8.9 points, the mean of the five
# 3.8 (docs/demo.md "How far it moves").
DEMO_SYNTH = SynthConfig(test_images=1000)
DEMO_FOLD_IMAGES = 200


def table_note(rows: list[dict]) -> str:
    """What `tvrn demo` prints under the table: the recipe, what is bitwise, and how far the rows move between
    machines (measured by benchmarks/demo_spread.sh with the preset's recipe and seed 0: docs/demo.md)."""
    def values(key: str) -> str:
        return ", ".join(map(str, sorted({r["config"]["train"][key] for r in rows if "config" in r}))) or "?"

    return (
        f"{values('epochs')} epochs of each model (the first with the shortlist loss as a warm-up), train.seed "
        f"{values('seed')}, best dev checkpoint.\n"
        "Identical to the digit for the same code, thread count and CPU kernels (run.json: env.threads,\n"
        "env.cpu_capability). Seed 0 with 1 or 2 threads and AVX-512, AVX2 or no SIMD kernels: every row within 3\n"
        "RSUM and 2 points of twin accuracy of the README's (2 threads, AVX-512; measured: TVRN 1.6 and 1.0, SGRAF\n"
        "2.1 and 0.7, VSE 0). Another seed moves the rows more (TVRN 504-512 over seeds 0-3, above SGRAF in every\n"
        "run): docs/demo.md. Which model is better, and whether TVRN's modules bind attributes: docs/study.md.")


def _twin_captions(caption_to_image: torch.Tensor, twin_of: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (captions of twinned images (n,) long, in caption order; the twin image of each (n,) long)."""
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    twin = torch.as_tensor(np.asarray(twin_of)).long()[c2i]  # (N_caps,) twin image of each caption's image, or -1
    caps = torch.nonzero(twin >= 0).reshape(-1)
    return caps, twin[caps]


def twin_accuracy(scores: torch.Tensor, caption_to_image: torch.Tensor, twin_of: np.ndarray) -> Optional[float]:
    """scores (N_img, N_caps); twin_of (N_img,) image index of each image's twin or -1.

    Fraction of captions of twinned images with s(own image, c) > s(twin, c), in percent (None if no twins).
    """
    caps, twin = _twin_captions(caption_to_image, twin_of)
    if not len(caps):
        return None
    own = scores[torch.as_tensor(caption_to_image).long().reshape(-1)[caps], caps]
    return 100.0 * int((own > scores[twin, caps]).sum()) / len(caps)


def twin_accuracy_encoded(model: torch.nn.Module, enc_images, enc_texts, caption_to_image: torch.Tensor,
                          twin_of: np.ndarray, chunk_captions: int = 100, **score_kw) -> Optional[float]:
    """`twin_accuracy` without the whole score matrix: enc_images EncodedImages (N_img), enc_texts EncodedTexts
    (N_caps) of the split; only the pairs (own image, c) and (twin, c) of each twin caption c are needed, so the
    twin captions are scored in chunks of `chunk_captions` against the images they name (own and twin), which is
    a small fraction of all pairs wherever the twin sits in the split. score_kw go to `score_all`."""
    c2i = torch.as_tensor(caption_to_image).long().reshape(-1)
    caps, twin = _twin_captions(c2i, twin_of)
    if not len(caps):
        return None
    wins = 0
    for k in range(0, len(caps), chunk_captions):
        cap, tw = caps[k:k + chunk_captions], twin[k:k + chunk_captions]
        imgs, pos = torch.unique(torch.cat([c2i[cap], tw]), return_inverse=True)  # images named, row of each
        block = score_all(model, enc_images[imgs], enc_texts[cap], **score_kw)  # (n_imgs, n_cap)
        col = torch.arange(len(cap))
        wins += int((block[pos[:len(cap)], col] > block[pos[len(cap):], col]).sum())
    return 100.0 * wins / len(caps)


def read_twins(root: Path, split: str, n_images: int) -> np.ndarray:
    """twin_of (N_img,) from the synthetic benchmark's SPLIT_scenes.jsonl (-1 where none or no file)."""
    out = np.full(n_images, -1, dtype=np.int64)
    path = root / f"{split}_scenes.jsonl"
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines()):
            twin = json.loads(line).get("twin")
            if twin is not None:
                out[i] = int(twin)
    return out


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, dev RSUM) pairs from a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    curve = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "epoch" and rec.get("rsum") is not None:
                curve.append((int(rec["epoch"]) + 1, float(rec["rsum"])))
    return curve


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Optional[Path]:
    """Save the dev RSUM curves as a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev RSUM (max 600)")
    ax.set_title("tvrn demo: synthetic benchmark, dev RSUM per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def fold_count(n_images: int, fold_images: int, where: str = "the test split") -> int:
    """How many folds of `fold_images` consecutive images the demo scores a test split of n_images in: 1 (all
    pairs) when fold_images <= 0 or the split is no larger; ValueError naming `where` when it does not divide."""
    if fold_images <= 0 or n_images <= fold_images:
        return 1
    if n_images % fold_images:
        raise ValueError(f"{where} has {n_images} images, which do not make folds of {fold_images} "
                         f"(a multiple of {fold_images} images, or fold_images=0 to score all pairs)")
    return n_images // fold_images


def evaluate_test(model: torch.nn.Module, tokenizer, data: dict, split: PrecompSplit, twin_of: np.ndarray,
                  n_folds: int) -> dict:
    """The demo's test metrics of a model -> {metric: mean over folds, ..., "folds": [per fold], "twin_acc"}.

    The split (N_img images) is scored as n_folds folds of consecutive images against their own captions (COCO
    1K's protocol: `score_folds`, a 1/n_folds share of all pairs), and twin accuracy over every twin caption of
    the split, the twin in its fold or not (`twin_accuracy_encoded`). data: the run's data config (batch and
    block sizes)."""
    enc_i, enc_t = encode_split(model, split, tokenizer, data)
    kw = block_sizes(data)
    c2i = torch.as_tensor(split.caption_to_image).long()
    out = evaluate_folds(score_folds(model, enc_i, enc_t, c2i, n_folds, **kw), c2i)
    out["twin_acc"] = twin_accuracy_encoded(model, enc_i, enc_t, c2i, twin_of, **kw)
    return out


def run_demo(data_root: str | Path, out_dir: str | Path, preset: str = "demo_synth", entries=DEMO_ENTRIES,
             extra_overrides: tuple[str, ...] = (), resume: bool = True, progress: bool = False,
             on_event: Callable[[str], None] = lambda msg: None, build_index: bool = True,
             fold_images: int = DEMO_FOLD_IMAGES) -> dict:
    """Train and evaluate every entry on the synthetic benchmark at data_root; results under out_dir.

    The test split is scored in folds of `fold_images` consecutive images (`fold_count`, `evaluate_test`; 0: all
    pairs). Returns {"rows": [{label, model, metrics..., folds, twin_acc, test, train_seconds, parameters}],
    "test": {images, captions, folds, fold_images}, "plot": path|None, "index": path|None, "env":
    run_environment()}. With resume=True an entry whose run already finished with the same config is not
    retrained (only re-evaluated if its row was evaluated on another test), and one that was killed continues
    from its last checkpoint. With build_index, the test split's search index of the first entry (TVRN) goes to
    OUT/test.index (`demo_index`).
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    test = load_split(data_root, "test")
    n_folds = fold_count(test.num_images, fold_images, where=f"the test split of {data_root}")
    test_desc = {"images": test.num_images, "captions": test.num_captions, "folds": n_folds,
                 "fold_images": test.num_images // n_folds}
    twins = read_twins(data_root, "test", test.num_images)
    rows, curves = [], {}
    for entry in entries:
        run_dir = out_dir / run_folder(entry)
        cfg = resolve_config(preset, [f"data.root={data_root}", *entry.overrides, *extra_overrides])
        result_path = run_dir / "result.json"
        done = json.loads(result_path.read_text()) if result_path.exists() else None
        trained = bool(resume and done and done.get("config") == cfg and (run_dir / "best.pt").exists())
        if trained and done.get("test") == test_desc:
            on_event(f"{entry.label}: already trained ({run_dir})")
            rows.append(done)
            curves[entry.label] = read_curve(run_dir)
            continue
        if trained:
            on_event(f"{entry.label}: already trained ({run_dir}); evaluating it on this test split")
            training = {k: done[k] for k in ("train_seconds", "parameters", "best_epoch", "best_dev_rsum")}
        else:
            on_event(f"{entry.label}: training {cfg['model']['name']} for {cfg['train']['epochs']} epochs -> {run_dir}")
            t0 = time.time()
            # continue a killed run of this config; a run of another config is replaced
            summary = train_from_config(cfg, run_dir, resume=resume and can_resume(cfg, run_dir), progress=progress)
            training = {"train_seconds": time.time() - t0, "parameters": summary["parameters"],
                        "best_epoch": summary["best_epoch"], "best_dev_rsum": summary["best_rsum"]}
        t0 = time.time()
        model, tokenizer, _ = load_trained(run_dir / "best.pt")
        metrics = evaluate_test(model, tokenizer, cfg["data"], test, twins, n_folds)
        row = {"label": entry.label, "model": cfg["model"]["name"], "overrides": entry.overrides, **metrics,
               "test": test_desc, **training, "eval_seconds": time.time() - t0, "config": cfg}
        write_json(result_path, row)
        twin = "n/a" if row["twin_acc"] is None else f"{row['twin_acc']:.1f}%"
        on_event(f"{entry.label}: test RSUM {row['rsum']:.1f}, twin accuracy {twin} "
                 f"(trained {row['train_seconds']:.0f} s, evaluated {row['eval_seconds']:.0f} s)")
        rows.append(row)
        curves[entry.label] = read_curve(run_dir)
    plot = plot_curves(curves, out_dir / "dev_rsum.png")
    index = None
    if build_index and entries and (out_dir / run_folder(entries[0]) / "best.pt").exists():
        index = demo_index(out_dir / run_folder(entries[0]) / "best.pt", data_root, out_dir / "test.index",
                           reuse=resume, on_event=on_event)
    summary = {"data": str(data_root), "preset": preset, "test": test_desc, "rows": rows,
               "plot": str(plot) if plot else None, "index": str(index) if index else None, "env": run_environment()}
    write_json(out_dir / "results.json", summary)
    return summary


def run_folder(entry: DemoEntry) -> str:
    """The run folder name of a demo entry under the demo's out folder ("TVRN w/o spatial" -> tvrn_wo_spatial)."""
    return entry.label.lower().replace(" ", "_").replace("/", "").replace("(", "").replace(")", "")


def demo_index(checkpoint: Path, data_root: Path, out: Path, reuse: bool = True,
               on_event: Callable[[str], None] = lambda msg: None) -> Path:
    """The test split's search index for the first entry's checkpoint, at `out` (`tvrn index`, then `tvrn serve
    OUT`); with reuse, an index written after the checkpoint was is kept."""
    from .search.index import SearchIndex

    manifest = out / "manifest.json"
    if reuse and manifest.exists() and manifest.stat().st_mtime >= checkpoint.stat().st_mtime:
        on_event(f"search index: already built ({out})")
        return out
    t0 = time.time()
    index = SearchIndex.build_to(out, checkpoint, data_root, "test")
    on_event(f"search index: {index.num_images} images, {index.num_captions} captions of the test split -> {out} "
             f"({time.time() - t0:.0f} s)")
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table: R@1/5/10 both directions, RSUM, twin accuracy."""
    head = ("| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | twin acc % |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        vals = [r[f"{d}/R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        twin = "" if r.get("twin_acc") is None else f"{r['twin_acc']:.1f}"
        lines.append(f"| {r['label']} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {r['rsum']:.1f} | {twin} |")
    return "\n".join(lines)
