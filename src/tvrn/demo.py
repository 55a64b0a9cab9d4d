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
from .data import load_split
from .evaluation import evaluate, score_split
from .fileio import write_json
from .pipeline import can_resume, resolve_config, run_environment, train_from_config


@dataclass
class DemoEntry:
    label: str  # row name in the table
    overrides: list[str] = field(default_factory=list)  # section.key=value over the demo preset


DEMO_ENTRIES = (  # the first entry's run is indexed for `tvrn serve`
    # The preset's first epoch adds the shortlist loss (train.shortlist_loss_epochs=1): from a random start the
    # similarity head scores every pair alike, and SGRAF and TVRN then sit on the sum loss's plateau for one to
    # three epochs, for as long as the seed or float rounding decides (TVRN's test RSUM after six epochs: 370-481 over seeds
    # 0-3); the shortlist cosines give the encoders a signal from the first step. docs/demo.md.
    DemoEntry("TVRN", ["model.name=tvrn_sgr"]),
    DemoEntry("SGRAF (SGR)", ["model.name=sgraf_sgr"]),
    # VSE scores pairs by its shortlist cosines: the shortlist loss would be its own loss counted twice
    DemoEntry("VSE", ["model.name=vse", "train.shortlist_loss_weight=0"]),
)

# printed under the table by `tvrn demo`: what the numbers mean and how far they move between machines
# (measured: docs/demo.md)
TABLE_NOTE = (
    "Six epochs of each model (the first with the shortlist loss as a warm-up), train.seed 0, best dev checkpoint.\n"
    "Identical to the digit for the same code, thread count and CPU kernels (run.json: env.threads,\n"
    "env.cpu_capability). Measured with another thread count and other kernels: TVRN's row moves by up to 0.8 RSUM\n"
    "and 1.6 points of twin accuracy, SGRAF's by up to 4.6 and 3.4, VSE's not at all; over seeds 0-3 TVRN ends at\n"
    "485-490 (docs/demo.md). Which model is better, and whether TVRN's modules bind attributes: docs/study.md\n"
    "(ten epochs, three seeds).")


def twin_accuracy(scores: torch.Tensor, caption_to_image: torch.Tensor, twin_of: np.ndarray) -> Optional[float]:
    """scores (N_img, N_caps); twin_of (N_img,) image index of each image's twin or -1.

    Fraction of captions of twinned images with s(own image, c) > s(twin, c), in percent (None if no twins).
    """
    c2i = torch.as_tensor(caption_to_image).long()
    twin = torch.as_tensor(twin_of).long()[c2i]  # (N_caps,) twin image of each caption's image, or -1
    keep = twin >= 0
    if not bool(keep.any()):
        return None
    caps = torch.nonzero(keep).reshape(-1)
    own = scores[c2i[caps], caps]
    other = scores[twin[caps], caps]
    return float((own > other).float().mean() * 100)


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


def run_demo(data_root: str | Path, out_dir: str | Path, preset: str = "demo_synth", entries=DEMO_ENTRIES,
             extra_overrides: tuple[str, ...] = (), resume: bool = True, progress: bool = False,
             on_event: Callable[[str], None] = lambda msg: None, build_index: bool = True) -> dict:
    """Train and evaluate every entry on the synthetic benchmark at data_root; results under out_dir.

    Returns {"rows": [{label, model, metrics..., twin_acc, train_seconds, parameters}], "plot": path|None,
    "index": path|None, "env": run_environment()}. With resume=True an entry whose run already finished with the
    same config is not retrained, and one that was killed continues from its last checkpoint. With build_index,
    the test split's search index of the first entry (TVRN) goes to OUT/test.index (`demo_index`).
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    test = load_split(data_root, "test")
    c2i = torch.as_tensor(test.caption_to_image)
    twins = read_twins(data_root, "test", test.num_images)
    rows, curves = [], {}
    for entry in entries:
        run_dir = out_dir / run_folder(entry)
        cfg = resolve_config(preset, [f"data.root={data_root}", *entry.overrides, *extra_overrides])
        result_path = run_dir / "result.json"
        done = json.loads(result_path.read_text()) if result_path.exists() else None
        if resume and done and done.get("config") == cfg and (run_dir / "best.pt").exists():
            on_event(f"{entry.label}: already trained ({run_dir})")
            row = done
        else:
            on_event(f"{entry.label}: training {cfg['model']['name']} for {cfg['train']['epochs']} epochs -> {run_dir}")
            t0 = time.time()
            # continue a killed run of this config; a run of another config is replaced
            summary = train_from_config(cfg, run_dir, resume=resume and can_resume(cfg, run_dir), progress=progress)
            seconds = time.time() - t0
            model, tokenizer, _ = load_trained(run_dir / "best.pt")
            scores = score_split(model, test, tokenizer, cfg["data"])
            row = {"label": entry.label, "model": cfg["model"]["name"], "overrides": entry.overrides,
                   **evaluate(scores, c2i), "twin_acc": twin_accuracy(scores, c2i, twins),
                   "train_seconds": seconds, "parameters": summary["parameters"],
                   "best_epoch": summary["best_epoch"], "best_dev_rsum": summary["best_rsum"], "config": cfg}
            write_json(result_path, row)
            on_event(f"{entry.label}: test RSUM {row['rsum']:.1f}, twin accuracy {row['twin_acc']:.1f}% "
                     f"({seconds:.0f} s)")
        rows.append(row)
        curves[entry.label] = read_curve(run_dir)
    plot = plot_curves(curves, out_dir / "dev_rsum.png")
    index = None
    if build_index and entries and (out_dir / run_folder(entries[0]) / "best.pt").exists():
        index = demo_index(out_dir / run_folder(entries[0]) / "best.pt", data_root, out_dir / "test.index",
                           reuse=resume, on_event=on_event)
    summary = {"data": str(data_root), "preset": preset, "rows": rows, "plot": str(plot) if plot else None,
               "index": str(index) if index else None, "env": run_environment()}
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
