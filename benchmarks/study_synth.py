"""Multi-seed study on the synthetic benchmark: do TVRN's modules help where context is needed?

Two suites, each a grid of (configuration, seed) runs; every finished run is appended to --out as one JSON line
(with the command), and runs already in the file are skipped, so the study can run in pieces and be resumed.

- probe: does the benchmark need what it claims? VSE, SCAN t2i and TVRN on the merged-evidence variant
  (`tvrn synth --merge-evidence`: each object's colour also in its category region, so binding needs no
  geometry), to compare with the same models in the study on the benchmark itself (where VSE is a
  bag-of-regions dual encoder: a mean of per-region embeddings, each region contributing on its own).
- study: TVRN (SGR); TVRN with each of spatial context, relational context, module 1, module 2 and module 3's
  gates switched off alone; SGRAF (SGR); SCAN t2i; VSE.
- published: TVRN as the authors' released code computes it (A-D, captions refined per pair), the same with
  their first-image refinement (E; evaluated as their script does, in blocks of 100 images), and TVRN (designed)
  and SGRAF trained with the authors' loss (G: clamped cross-entropy over all negatives, batch mean).
- twins: the training signal. A uniform shuffle rarely puts both twins of a pair in one batch, so the loss
  rarely asks for binding; here `train.partner_file` (the twins of the train split) keeps them together.

Each run: `demo_synth` widths (D=64, S=32), the sum-over-negatives loss without the demo's first-epoch shortlist
loss, lr --lr for --epochs epochs with a drop
to a fifth at --milestone, early stop after --patience epochs without dev RSUM gain, the best-dev checkpoint
evaluated on the test split: RSUM, twin accuracy (all twins, colour-swap twins, relation-flip twins), and
text-to-image R@1 / R@5 per caption group from SPLIT_scenes.jsonl (captions that need attribute binding,
a relation, or only categories), and the pointing game (`tvrn.grounding.pointing_game`: the share of object words
whose most attended region is one of their object's; rows from before it was added lack the key). Runs go to --runs/<suite>/<config>_s<seed> and run two at a time (--jobs) with
one thread each.

    python benchmarks/study_synth.py --suite probe study [--seeds 0 1 2] [--jobs 2]
    python benchmarks/study_synth.py --summary          # tables (mean +- std over seeds) and the curve plot
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

TVRN = ["model.name=tvrn_sgr"]
# TVRN as the authors' code computes it (docs/published-tvrn.md A-D), on the benchmark's 12 regions (BatchNorm pooling
# over 24 slots), word dropout as in the other runs (0); and the authors' loss (G) on the designed models
PUBLISHED = ["model.name=tvrn_sgr_published", "model.image_pool_tokens=24", "model.word_dropout=0.0"]
PUBLISHED_LOSS = ["train.loss_mode=published", "train.loss_exclude_same_image=false", "train.loss_reduction=mean"]
SUITES = {
    "probe": {  # next to the study's VSE, SCAN t2i, TVRN and TVRN w/o spatial context on the benchmark itself
        "VSE, merged evidence": ["model.name=vse", "@merged"],
        "SCAN t2i, merged evidence": ["model.name=scan_t2i", "@merged"],
        "TVRN, merged evidence": TVRN + ["@merged"],
    },
    "twins": {  # the training signal: the same models with both twins of a pair in every batch
        "TVRN, twin batches": TVRN + ["@partners"],
        "TVRN w/o spatial context, twin batches": TVRN + ["model.spatial_context=false", "@partners"],
        "SGRAF (SGR), twin batches": ["model.name=sgraf_sgr", "@partners"],
        "SCAN t2i, twin batches": ["model.name=scan_t2i", "@partners"],
        "VSE, twin batches": ["model.name=vse", "@partners"],
    },
    "published": {  # does the computation or the loss that produced the published numbers change the verdict?
        "TVRN as published": PUBLISHED,
        "TVRN as published, first-image refinement": PUBLISHED + ["model.refine_against=first_image"],
        "TVRN, published loss": TVRN + PUBLISHED_LOSS,
        "SGRAF (SGR), published loss": ["model.name=sgraf_sgr"] + PUBLISHED_LOSS,
        "TVRN as published, published loss": PUBLISHED + PUBLISHED_LOSS,  # the authors' computation and loss
    },
    "study": {
        "TVRN": TVRN,
        "TVRN w/o spatial context": TVRN + ["model.spatial_context=false"],
        "TVRN w/o relational context": TVRN + ["model.relational_context=false"],
        "TVRN w/o module 1": TVRN + ["model.unify=false"],
        "TVRN w/o module 2": TVRN + ["model.refine_text=false"],
        "TVRN w/o module 3 gates": TVRN + ["model.global_gates=false"],
        "SGRAF (SGR)": ["model.name=sgraf_sgr"],
        "SCAN t2i": ["model.name=scan_t2i"],
        "VSE": ["model.name=vse"],
    },
}
GROUPS = {"binding": lambda c: "attribute_binding" in c["cues"], "relation": lambda c: "relation" in c["cues"],
          "categories only": lambda c: c["type"] == "categories_only"}


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def ensure_data(root: Path, merged: bool) -> Path:
    """The default benchmark at root, or its merged-evidence variant next to it (generated when missing)."""
    from tvrn.data.synth import SynthConfig, write_dataset

    path = root.parent / (root.name + "_merged") if merged else root
    if not (path / "manifest.json").exists():
        write_dataset(path, SynthConfig(merge_evidence=merged, render_images=False))
    return path


def partner_file(root: Path) -> Path:
    """root/train_partners.json: each training image's twin or -1 (written once)."""
    from tvrn.data.synth import twin_partners

    path = root / "train_partners.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(twin_partners(root, "train")))
        tmp.replace(path)
    return path


def caption_groups(root: Path, split: str) -> dict[str, np.ndarray]:
    """Caption indices of each group, from the scene file (5 captions per image, in order)."""
    caps = [c for line in (root / f"{split}_scenes.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    return {g: np.array([i for i, c in enumerate(caps) if f(c)]) for g, f in GROUPS.items()}


def twin_pairs(root: Path, split: str) -> dict[str, np.ndarray]:
    """twin_of (N_img,) per twin kind (-1 elsewhere), and for all twins."""
    scenes = [json.loads(x) for x in (root / f"{split}_scenes.jsonl").read_text().splitlines()]
    out = {}
    for kind in ("all", "colour_swap", "relation_flip"):
        t = np.full(len(scenes), -1)
        for i, s in enumerate(scenes):
            if s.get("twin") is not None and (kind == "all" or s.get("twin_kind") == kind):
                t[i] = s["twin"]
                t[s["twin"]] = i  # both members of the pair count
        out[kind] = t
    return out


def one_run(a, suite: str, name: str, seed: int) -> dict:
    from tvrn.data import load_split
    from tvrn.demo import read_curve, twin_accuracy
    from tvrn.evaluation import evaluate
    from tvrn.metrics import rank_metrics, t2i_ranks
    from tvrn.checkpoint import load_trained
    from tvrn.evaluation import score_split
    from tvrn.pipeline import resolve_config, run_config, run_environment, train_from_config

    torch.set_num_threads(a.threads)
    overrides = SUITES[suite][name]
    root = ensure_data(Path(a.data), "@merged" in overrides)
    sets = [o for o in overrides if not o.startswith("@")]
    if "@partners" in overrides:
        sets.append(f"train.partner_file={partner_file(root)}")
    cfg = resolve_config("demo_synth", [f"data.root={root}", *sets, f"train.seed={seed}", f"train.epochs={a.epochs}",
                                        f"train.lr={a.lr}", f"train.lr_milestones=[{a.milestone}]", "train.lr_gamma=0.2",
                                        f"train.patience={a.patience}",
                                        "train.shortlist_loss_weight=0", "train.shortlist_loss_epochs=0"])
    run_dir = Path(a.runs) / suite / f"{slug(name)}_s{seed}"
    t0 = time.time()
    summary = train_from_config(cfg, run_dir, resume=True)
    seconds = time.time() - t0
    run_train = run_config(cfg, run_dir)["train"]  # every TrainConfig field, defaults filled in
    model, tokenizer, _ = load_trained(run_dir / "best.pt")
    test = load_split(root, "test")
    c2i = torch.as_tensor(test.caption_to_image)
    scores = score_split(model, test, tokenizer, cfg["data"])
    ranks = t2i_ranks(scores, c2i)
    twins = twin_pairs(root, "test")
    grounding = run_pointing(model, tokenizer, root, cfg["data"])
    return {
        "suite": suite, "config": name, "seed": seed, "overrides": overrides, "data": str(root),
        "command": " ".join(["python", *sys.argv]), "threads": a.threads, "seconds": seconds,
        "env": run_environment(),  # torch, threads, CPU model and kernels: a run repeats exactly only on the same
        "epochs_run": summary["epochs_completed"], "best_epoch": summary["best_epoch"],
        "dev_rsum_per_epoch": [round(r, 2) for _, r in read_curve(run_dir)],
        "test": evaluate(scores, c2i),
        "twin_acc": {k: twin_accuracy(scores, c2i, t) for k, t in twins.items()},
        "t2i_by_group": {g: {**rank_metrics(ranks[torch.as_tensor(idx)], "t2i"), "captions": len(idx)}
                         for g, idx in caption_groups(root, "test").items()},
        "train": {k: run_train[k] for k in ("epochs", "lr", "lr_milestones", "lr_gamma", "patience", "batch_size",
                                               "loss_mode", "loss_reduction", "loss_exclude_same_image")},
        # rows written before it have no "pointing_game"; None for models without word-to-region attention (VSE)
        "pointing_game": grounding,
    }


def run_pointing(model, tokenizer, root: Path, data: dict) -> dict:
    """The pointing game of a trained model on the test split (`tvrn.grounding.pointing_game`)."""
    from tvrn.grounding import pointing_game  # grounding: object words whose top region is their object's

    return pointing_game(model, tokenizer, root, "test", adjacency_threshold=data.get("adjacency_threshold", 0.2))


def rewrite_rows(out: Path, rows: list[dict]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)


def add_pointing(a) -> None:
    """Rows without a pointing game whose best-dev checkpoint is still in --runs gain `pointing_game`, computed
    as `one_run` computes it for new runs. Rewrites --out in place."""
    from tvrn.checkpoint import load_trained
    from tvrn.pipeline import resolve_config

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r in rows:
        ckpt = Path(a.runs) / r["suite"] / f"{slug(r['config'])}_s{r['seed']}" / "best.pt"
        if "pointing_game" in r or not ckpt.exists():
            continue
        model, tokenizer, _ = load_trained(ckpt)
        root = Path(r["data"])
        r["pointing_game"] = run_pointing(model, tokenizer, root,
                                          resolve_config("demo_synth", [f"data.root={root}"])["data"])
        acc = (r["pointing_game"] or {}).get("accuracy")
        print(f"{r['config']} seed {r['seed']}: pointing game {acc}", file=sys.stderr)
    rewrite_rows(out, rows)


def adopt_pointing(a, path: Path) -> None:
    """Rows of a rerun (PATH, same command) whose test metrics equal the row of --out for the same suite, config
    and seed to the digit lend it their pointing game: the rerun trained the same weights again (bit-identical
    per thread count and CPU kernels). Rows that differ are reported and left as they are."""
    out = Path(a.out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    reruns = {(r["suite"], r["config"], r["seed"]): r for r in map(json.loads, path.read_text().splitlines())}
    for r in rows:
        new = reruns.get((r["suite"], r["config"], r["seed"]))
        if new is None or "pointing_game" in r:
            continue
        same = new["test"] == r["test"] and new["twin_acc"] == r["twin_acc"]
        print(f"{r['config']} seed {r['seed']}: rerun {'identical' if same else 'DIFFERENT'} "
              f"(RSUM {r['test']['rsum']:.2f} -> {new['test']['rsum']:.2f})", file=sys.stderr)
        if same:
            r["pointing_game"] = new["pointing_game"]
            r["pointing_game_from"] = "rerun, identical test metrics"
    rewrite_rows(out, rows)


def rescore_per_pair(a) -> None:
    """Rows of models trained with first-image refinement (evaluated, like the authors' script, in blocks of 100
    images refined against each block's first image) gain `test_per_pair` and `twin_acc_per_pair`: the same
    best-dev weights evaluated with per-pair refinement (the correct evaluation). Rewrites --out in place."""
    from tvrn.data import load_split
    from tvrn.demo import twin_accuracy
    from tvrn.evaluation import evaluate
    from tvrn.checkpoint import load_trained
    from tvrn.evaluation import score_split
    from tvrn.pipeline import model_variant, resolve_config

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r in rows:
        if "model.refine_against=first_image" not in r["overrides"] or "test_per_pair" in r:
            continue
        run_dir = Path(a.runs) / r["suite"] / f"{slug(r['config'])}_s{r['seed']}"
        model, tokenizer, _ = load_trained(run_dir / "best.pt")
        twin = model_variant(model, refine_against="pair")
        root = Path(r["data"])
        test = load_split(root, "test")
        c2i = torch.as_tensor(test.caption_to_image)
        scores = score_split(twin, test, tokenizer, resolve_config("demo_synth", [f"data.root={root}"])["data"])
        r["test_per_pair"] = evaluate(scores, c2i)
        r["twin_acc_per_pair"] = {k: twin_accuracy(scores, c2i, t) for k, t in twin_pairs(root, "test").items()}
        print(f"{r['config']} seed {r['seed']}: RSUM {r['test']['rsum']:.1f} (first image) -> "
              f"{r['test_per_pair']['rsum']:.1f} per pair", file=sys.stderr)
    rewrite_rows(out, rows)


def done_runs(path: Path) -> set:
    if not path.exists():
        return set()
    return {(r["suite"], r["config"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def run_grid(a) -> None:
    out = Path(a.out)
    # seed-major: after each round of seeds every configuration has as many runs as the others
    unknown = sorted(set(a.configs or []) - {n for s in a.suite for n in SUITES[s]})
    if unknown:
        raise SystemExit(f"unknown configurations for suites {a.suite}: {unknown}")
    order = lambda s: [n for n in a.configs if n in SUITES[s]] if a.configs else list(SUITES[s])  # noqa: E731
    todo = [(s, n, seed) for seed in a.seeds for s in a.suite for n in order(s) if (s, n, seed) not in done_runs(out)]
    for merged in sorted({"@merged" in SUITES[s][n] for s, n, _ in todo}):  # before two jobs race to write them
        ensure_data(Path(a.data), merged)
    if any("@partners" in SUITES[s][n] for s, n, _ in todo):
        partner_file(Path(a.data))
    print(f"{len(todo)} runs to do", file=sys.stderr, flush=True)
    running: list[tuple[subprocess.Popen, tuple]] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    while todo or running:
        while todo and len(running) < a.jobs:
            job = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", job[0], job[1], str(job[2]), *passthrough(a)]
            running.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True), job))
        time.sleep(2)
        for proc, job in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, job))
            text = proc.stdout.read()
            if proc.returncode != 0:
                print(f"{job}: failed with exit code {proc.returncode}", file=sys.stderr, flush=True)
                continue
            line = text.strip().splitlines()[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(line + "\n")
            r = json.loads(line)
            print(f"{job}: test RSUM {r['test']['rsum']:.1f}, twins {r['twin_acc']['all']:.1f}%, "
                  f"{r['seconds']:.0f} s, dev {r['dev_rsum_per_epoch']}", file=sys.stderr, flush=True)


def passthrough(a) -> list[str]:
    return ["--data", a.data, "--runs", a.runs, "--epochs", str(a.epochs), "--lr", str(a.lr), "--milestone",
            str(a.milestone), "--patience", str(a.patience), "--threads", str(a.threads)]


def mean_sd(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)):.1f}"


PER_PAIR = ", evaluated per pair"  # rows of first-image runs re-scored with per-pair refinement


def pointing(group: list[dict]) -> str:
    """Pointing-game accuracy mean +- sd over the rows that have it, with their count when not all do; "n/a"
    for models without word-to-region attention (VSE)."""
    have = [r for r in group if "pointing_game" in r]
    if not have:
        return ""
    if all(r["pointing_game"] is None for r in have):
        return "n/a"
    text = mean_sd(r["pointing_game"]["accuracy"] for r in have if r["pointing_game"] is not None)
    return text if len(have) == len(group) else f"{text} [{len(have)}]"


def summary_tables(rows: list[dict]) -> str:
    out = []
    for suite in SUITES:
        rs = [r for r in rows if r["suite"] == suite]
        rs += [dict({k: v for k, v in r.items() if k != "pointing_game"}, config=r["config"] + PER_PAIR,
                    test=r["test_per_pair"], twin_acc=r["twin_acc_per_pair"], t2i_by_group=None)
               for r in rs if "test_per_pair" in r]
        if not rs:
            continue
        names = [n for name in SUITES[suite] for n in (name, name + PER_PAIR)]
        out += [f"\n{suite} (mean ± sd over seeds; seeds per row in brackets)\n",
                "| configuration | test RSUM | twin acc % | colour-swap twins % | relation-flip twins % | "
                "t2i R@1 binding | t2i R@1 relation | t2i R@1 categories only | best epoch | pointing game % |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            g = [r for r in rs if r["config"] == name]
            if not g:
                continue
            out.append(f"| {name} [{len(g)}] | {mean_sd(r['test']['rsum'] for r in g)} | "
                       f"{mean_sd(r['twin_acc']['all'] for r in g)} | {mean_sd(r['twin_acc']['colour_swap'] for r in g)} | "
                       f"{mean_sd(r['twin_acc']['relation_flip'] for r in g)} | "
                       + " | ".join(mean_sd(r["t2i_by_group"][k]["t2i/R@1"] if r["t2i_by_group"] else None
                                            for r in g) for k in GROUPS)
                       + f" | {mean_sd(r['best_epoch'] + 1 for r in g)} | {pointing(g)} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in ("study", "published", "probe", "twins") if any(r["suite"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(suites), figsize=(6.5 * len(suites), 4.6), dpi=110, squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for k, name in enumerate(SUITES[suite]):
            g = [r["dev_rsum_per_epoch"] for r in rows if r["suite"] == suite and r["config"] == name]
            if not g:
                continue
            colour = f"C{k}"
            for curve in g:
                ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.25, lw=1)
            n = min(len(c) for c in g)
            ax.plot(range(1, n + 1), np.mean([c[:n] for c in g], 0), color=colour, lw=2, label=f"{name} ({len(g)})")
        ax.set_title(f"{suite}: dev RSUM per epoch (thin: seeds, thick: mean over the seeds' common epochs)",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev RSUM")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", nargs="*", default=["study", "published", "probe", "twins"], choices=list(SUITES))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each by default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--milestone", type=int, default=6, help="epoch (0-based) at which the lr drops to a fifth")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--runs", default="runs/study")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "study_synth.jsonl"))
    ap.add_argument("--configs", nargs="*", default=None,
                    help="only these configurations, in this order within each seed (default: all, as listed)")
    ap.add_argument("--summary", action="store_true", help="print the tables and write the plot from --out")
    ap.add_argument("--rescore-per-pair", action="store_true",
                    help="add the per-pair evaluation to the rows of first-image-refinement runs (after they ran)")
    ap.add_argument("--add-pointing", action="store_true",
                    help="add the pointing game to rows whose best-dev checkpoint is still under --runs")
    ap.add_argument("--adopt-pointing", metavar="RERUN_JSONL",
                    help="take the pointing game from a rerun's rows where its test metrics are identical")
    ap.add_argument("--one", nargs=3, metavar=("SUITE", "CONFIG", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_run(a, a.one[0], a.one[1], int(a.one[2]))))
        return
    if a.rescore_per_pair:
        rescore_per_pair(a)
    elif a.add_pointing:
        add_pointing(a)
    elif a.adopt_pointing:
        adopt_pointing(a, Path(a.adopt_pointing))
    elif not a.summary:
        run_grid(a)
    rows = [json.loads(x) for x in Path(a.out).read_text().splitlines()] if Path(a.out).exists() else []
    print(summary_tables(rows))
    if rows:
        png = Path(a.out).with_suffix(".png")
        plot(rows, png)
        print(f"\ncurves: {png}")


if __name__ == "__main__":
    main()
