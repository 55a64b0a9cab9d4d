#!/bin/bash
# How far the demo's table moves (issue 21): `tvrn demo --fresh` with train.seed 0-3 at one thread (two demos at a
# time: other initial weights and data orders), seed 0 at one thread on AVX2 kernels and on none (as other CPUs
# would pick), then seed 0 with two threads (what `make demo` runs) and with two threads on AVX2 kernels. Each row's test
# RSUM (the mean of the test split's five folds) and twin accuracy per run, their range, how far each run is from
# what `make demo` prints, and the wall time of each demo. A demo whose results are in OUT already is not run again
# (delete OUT/NAME to rerun it).
#   bash benchmarks/demo_spread.sh [OUT=runs/demo_spread]   -> OUT/*/results.json, benchmarks/results/demo_spread.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo_spread}
# the demo's benchmark, generated once before two demos start at the same time
[ -f data/synth_demo/manifest.json ] || .venv/bin/python -c \
  "from tvrn.data.synth import write_dataset; from tvrn.demo import DEMO_SYNTH; write_dataset('data/synth_demo', DEMO_SYNTH)"
mkdir -p "$OUT"
demo() {  # name threads [env...] -- [tvrn demo args]
  local name=$1 threads=$2; shift 2
  [ -f "$OUT/$name.seconds" ] && [ -f "$OUT/$name/results.json" ] && return 0
  local t0=$SECONDS
  # two 1-thread demos share the two cores: passive OpenMP waits keep them from spinning on each other's core;
  # a 2-thread demo runs alone and as `make demo` does (passive waits would make it 2-3x slower)
  local wait=(); [ "$threads" = 1 ] && wait=(OMP_WAIT_POLICY=PASSIVE)
  env OMP_NUM_THREADS="$threads" "${wait[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - t0))" > "$OUT/$name.seconds"
}
for pair in "0 1" "2 3"; do
  for s in $pair; do demo "seed$s" 1 .venv/bin/tvrn demo --fresh --set train.seed="$s" & done
  wait
done
# the other kernel sets at one thread: AVX2, and none (ATen's scalar kernels, MKL at SSE4.2, oneDNN at SSE4.1)
demo threads1_avx2 1 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/tvrn demo --fresh &
demo threads1_nosimd 1 ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
  .venv/bin/tvrn demo --fresh &
wait
demo threads2 2 .venv/bin/tvrn demo --fresh
demo threads2_avx2 2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/tvrn demo --fresh
.venv/bin/python - "$OUT" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path

import torch

from tvrn.pipeline import cpu_model

out = Path(sys.argv[1])
runs = {"seed0": "seed 0, 1 thread", "seed1": "seed 1, 1 thread", "seed2": "seed 2, 1 thread",
        "seed3": "seed 3, 1 thread", "threads1_avx2": "seed 0, 1 thread, AVX2 kernels",
        "threads1_nosimd": "seed 0, 1 thread, no SIMD kernels", "threads2": "seed 0, 2 threads (make demo)",
        "threads2_avx2": "seed 0, 2 threads, AVX2 kernels"}
table, seconds, eval_seconds, env, test = {}, {}, {}, {}, None
for name in runs:
    res = json.loads((out / name / "results.json").read_text())
    for row in res["rows"]:
        table.setdefault(row["label"], {})[name] = {"rsum": round(row["rsum"], 1), "twin_acc": round(row["twin_acc"], 1),
                                                   "best_epoch": row["best_epoch"],
                                                   "rsum_folds": [round(f["rsum"], 1) for f in row["folds"]]}
        eval_seconds.setdefault(name, {})[row["label"]] = round(row["eval_seconds"], 1)
    seconds[name] = int((out / f"{name}.seconds").read_text())
    env[name] = {k: res["env"].get(k) for k in ("threads", "cpu_capability")}
    test = res["test"]  # the same test split and folds for every run


def largest_distance(values, shown):
    return round(max(abs(x - shown) for x in values), 1)


spread = {}
for label, per in table.items():
    shown = per["threads2"]  # what `make demo` prints on this machine (the README's table)
    seed0 = ("seed0", "threads1_avx2", "threads1_nosimd", "threads2", "threads2_avx2")  # thread counts and kernels only
    out_row = {}
    for key, short in (("rsum", "rsum"), ("twin_acc", "twin")):
        vals = [v[key] for v in per.values()]
        out_row.update({f"{short}_min": min(vals), f"{short}_max": max(vals), f"{short}_range": round(max(vals) - min(vals), 1),
                        f"{short}_max_from_make_demo": largest_distance(vals, shown[key]),
                        f"{short}_max_from_make_demo_seed0": largest_distance([per[k][key] for k in seed0], shown[key])})
    spread[label] = out_row
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
res = {"command": f"bash benchmarks/demo_spread.sh {out}", "code_commit": commit, "runs": runs, "test": test,
       "table": table, "seconds": seconds, "eval_seconds": eval_seconds, "env": env, "spread": spread,
       "torch": torch.__version__, "cpu_model": cpu_model(), "machine": platform.machine()}
Path("benchmarks/results/demo_spread.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(spread, indent=1))
PY
