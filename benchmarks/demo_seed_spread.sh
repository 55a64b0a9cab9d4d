#!/bin/bash
# How far TVRN's demo row moves with the seed (issue 21): the demo's TVRN recipe (preset demo_synth, gradient not
# clipped) for seeds 0-3, as the demo runs it (r0: 6 epochs, lr x0.2 at epoch 4) and two epochs longer (r1: 8
# epochs, lr x0.2 at epoch 5); one thread each, two at a time; test RSUM of best.pt and last.pt, the dev curves.
#   bash benchmarks/demo_seed_spread.sh [OUT=runs/demo_seeds]   -> OUT/*.json, then benchmarks/results/demo_seed_spread.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo_seeds}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
TVRN=(.venv/bin/python -c "import sys, torch; torch.set_num_threads(1); sys.argv = ['tvrn'] + sys.argv[1:]; from tvrn.cli import main; sys.exit(main())")
[ -d data/synth ] || .venv/bin/tvrn synth data/synth
mkdir -p "$OUT"
one() {  # recipe seed [--set ...]
  local r=$1 s=$2; shift 2
  local run="$OUT/${r}_s$s"
  "${TVRN[@]}" train --config demo_synth --set data.root=data/synth --set model.name=tvrn_sgr --set train.grad_clip=0 \
    --set train.seed="$s" "$@" --out "$run" --no-progress > "$run.log" 2>&1
  for c in best last; do
    "${TVRN[@]}" eval "$run/$c.pt" --data data/synth --split test --protocol all --no-progress --no-pointing-game \
      --out "$run.$c.json" >> "$run.log" 2>&1
  done
}
for s in 0 1 2 3; do
  one r0 "$s" &
  one r1 "$s" --set train.epochs=8 --set "train.lr_milestones=[5]" &
  wait
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys, platform, torch
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for r in ("r0", "r1"):
    for s in range(4):
        run = out / f"{r}_s{s}"
        dev = [round(d["rsum"], 1) for d in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if d.get("kind") == "epoch"]
        rows.append({"recipe": r, "seed": s, "test_rsum_best": round(json.loads((out / f"{r}_s{s}.best.json").read_text())["rsum"], 1),
                     "test_rsum_last": round(json.loads((out / f"{r}_s{s}.last.json").read_text())["rsum"], 1),
                     "dev_rsum_per_epoch": dev})
res = {"command": "bash benchmarks/demo_seed_spread.sh " + str(out), "threads": 1, "torch": torch.__version__,
       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
       "recipes": {"r0": "demo_synth, model.name=tvrn_sgr, train.grad_clip=0 (the demo's TVRN row)",
                   "r1": "r0 with train.epochs=8, train.lr_milestones=[5]"}, "rows": rows}
Path("benchmarks/results/demo_seed_spread.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(rows, indent=1))
PY
