"""Are the synthetic benchmark's relations readable from its region features? A probe with the true structure.

The study's models see relation-flip twins ("a cat on a box" / "a cat under a box", same objects, the pair
mirrored) at chance. This asks whether that is the benchmark or the models. The probe is given what a model
would have to find itself: which two regions are the relation's subject and object (each object's category
region, the region whose box overlaps the object's box most). A multinomial logistic regression on the two
regions' features, concatenated (subject first), is trained on the train split's relations and read on the
test split: relation accuracy, and the relation-flip twins, where the probe must say which of the two images
has the caption's relation (it picks the image whose probe probability for that relation is higher).

The same probe on the two regions' features summed (order lost: a bag of regions) cannot tell "A on B" from
"B on A" by construction; it is the control.

    python benchmarks/probe_relations.py [--data data/synth] [--out benchmarks/results/probe_relations.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

FLIP = {"on": "under", "under": "on", "left of": "right of", "right of": "left of"}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (4,), b (R, 4) x1 y1 x2 y2 -> (R,)."""
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def relation_pairs(root: Path, split: str):
    """Per relation of every scene: (image, subject region, object region, relation name); and per image the
    row of its main relation (objects 0 and 1, the scene's first)."""
    boxes = np.load(root / f"{split}_ims_bbx.npy")
    scenes = [json.loads(x) for x in (root / f"{split}_scenes.jsonl").read_text().splitlines()]
    rows, main = [], {}
    for i, s in enumerate(scenes):
        region = [int(np.argmax(iou(np.asarray(o["box"]), boxes[i]))) for o in s["objects"]]
        main[i] = len(rows)
        for a, rel, b in s["relations"]:
            rows.append((i, region[a], region[b], rel))
    return scenes, rows, main


def inputs(feats: np.ndarray, rows, ordered: bool) -> torch.Tensor:
    a = torch.as_tensor(np.stack([feats[i, ra] for i, ra, _, _ in rows]), dtype=torch.float32)
    b = torch.as_tensor(np.stack([feats[i, rb] for i, _, rb, _ in rows]), dtype=torch.float32)
    return torch.cat([a, b], 1) if ordered else a + b


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_relations.json"))
    a = ap.parse_args(argv)
    root = Path(a.data)
    t0 = time.perf_counter()
    _, train_rows, _ = relation_pairs(root, "train")
    test_scenes, test_rows, main = relation_pairs(root, "test")
    names = sorted({r[3] for r in train_rows})
    y_train = torch.tensor([names.index(r[3]) for r in train_rows])
    y_test = torch.tensor([names.index(r[3]) for r in test_rows])
    f_train, f_test = np.load(root / "train_ims.npy"), np.load(root / "test_ims.npy")
    out = {"command": "python " + " ".join(sys.argv), "data": str(root), "relations": names,
           "train_relations": len(train_rows), "test_relations": len(test_rows)}
    for label, ordered in (("ordered pair (subject, object)", True), ("summed pair (bag of regions)", False)):
        lin = fit(inputs(f_train, train_rows, ordered), y_train, len(names))
        with torch.no_grad():
            logp = torch.log_softmax(lin(inputs(f_test, test_rows, ordered)), 1)
        acc = float((logp.argmax(1) == y_test).float().mean())
        # relation-flip twins: the main relation of each image against its twin's
        right = total = 0
        for i, s in enumerate(test_scenes):
            if s.get("twin_kind") != "relation_flip" or s["twin"] is None:
                continue
            rel = test_rows[main[i]][3]
            if rel not in FLIP:
                continue
            j = s["twin"]
            c = names.index(rel)  # the caption says image i's relation; the probe must prefer image i
            right += int(logp[main[i], c] > logp[main[j], c])
            total += 1
        out[label] = {"test_accuracy": acc, "relation_flip_twin_accuracy": right / max(total, 1),
                      "relation_flip_images": total}
        print(f"{label}: relation accuracy {100 * acc:.1f}% (chance {100 / len(names):.1f}%), "
              f"relation-flip twins {100 * right / max(total, 1):.1f}% of {total} (chance 50%)")
    out["seconds"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {a.out} ({out['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
