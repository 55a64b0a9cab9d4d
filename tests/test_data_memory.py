"""Streaming a feature file much larger than the reader's memory keeps resident memory flat.

A fresh subprocess (clean RSS) writes a ~530 MB float32 SPLIT_ims.npy in 9 MB chunks, then iterates the
reader's image batches (64 images = 9.4 MB each) over it twice, sampling VmRSS after every batch. Bound:
peak RSS growth over the first batch stays below 1/8 of the file size (66 MB): room for a few batches and
allocator slack, while a reader that keeps the file's pages resident grows by the whole file. A control in
the same process touches every row of an np.load(mmap_mode="r") view and must exceed the bound, so the
measurement can tell the two apart.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    import numpy as np
    from tvrn.data import PrecompSplit, iter_image_batches

    def rss_bytes():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    root = sys.argv[1]
    n, r, dv = 3600, 36, 1024
    path = os.path.join(root, "train_ims.npy")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (n, r, dv)}
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:  # plain writes: nothing of the file stays in this process's memory
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, 64):
            f.write(rng.standard_normal((min(64, n - start), r, dv), dtype=np.float32).tobytes())
    xy = rng.uniform(0, 400, (n, r, 2)).astype(np.float32)
    np.save(os.path.join(root, "train_ims_bbx.npy"), np.concatenate([xy, xy + 50], -1))
    with open(os.path.join(root, "train_caps.txt"), "w") as f:
        f.write("".join(f"caption {i}\n" for i in range(5 * n)))
    file_size = os.path.getsize(path)

    split = PrecompSplit(root, "train")
    batches = iter_image_batches(split, batch_size=64)
    first = next(batches)
    del first
    base = peak = rss_bytes()
    seen, checksum = 0, 0.0
    for epoch in range(2):
        for batch in iter_image_batches(split, batch_size=64):
            seen += len(batch)
            checksum += float(batch.features[:, 0, 0].sum())
            peak = max(peak, rss_bytes())
            del batch

    mm = np.load(path, mmap_mode="r")  # control: a reader that lets the file's pages stay resident
    control_base = control_peak = rss_bytes()
    for start in range(0, n, 64):
        checksum += float(np.asarray(mm[start:start + 64]).sum())
        control_peak = max(control_peak, rss_bytes())
    print(json.dumps({"file_size": file_size, "growth": peak - base, "seen": seen,
                      "control_growth": control_peak - control_base}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
@pytest.mark.slow  # writes and reads a large file in a subprocess
def test_iterating_large_file_keeps_rss_flat(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = result["file_size"] // 8
    assert result["file_size"] > 500 * 2**20
    assert result["seen"] == 2 * 3600
    assert result["growth"] < bound, result
    assert result["control_growth"] > bound, result  # the measurement does see a whole-file reader
