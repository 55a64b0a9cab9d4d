"""Shortlist vectors and the FAISS indexes over them: what picks a query's candidates before the full score.

A search index keeps, for each side (images, captions), its pair-independent shortlist vectors (N, D) float32: in
RAM (a tensor) or on disk (`tvrn.fileio.NpyRows`, read by row with pread). `_Vectors.top` finds a query's
`m` best by cosine, with the side's FAISS index when the index folder has one, else exactly
(`tvrn.search.shortlist.topk_exact_scored`, the gallery a block at a time).

FAISS indexes are made from a factory string (`tvrn index --faiss`: `Flat`, `IVF1024,Flat`, `HNSW32`, ...):
`check_faiss` refuses a string FAISS cannot build (or an IVF with more lists than the gallery has vectors) before
anything is encoded, `build_faiss` trains and fills one over a side's vectors, `write_faiss` / `read_faiss`
store and open it (with the search breadth `nprobe` of an IVF / HNSW index).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import SearchIndexError
from .shortlist import topk_exact_scored

EXACT_BLOCK = 65536  # gallery vectors read at a time by an exact (no FAISS) shortlist


class FaissSpecError(SearchIndexError):
    """A FAISS factory string (`tvrn index --faiss`) that FAISS cannot build, or not for this gallery."""


FAISS_ACCEPTED = ("Flat (exact)", "IVF<lists>,Flat (e.g. IVF1024,Flat; at most one list per gallery image)",
                  "IVF<lists>,SQ8", "IVF<lists>,PQ<m>", "HNSW<links> (e.g. HNSW32)", "PQ<m>",
                  "or another FAISS index_factory string")


def _faiss_reason(e: BaseException) -> str:
    """FAISS's message without its C++ location: 'could not parse index string Bogus99'."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.search(r"\.(?:cpp|h|hpp):\d+: (.*)$", text)
    return (m.group(1) if m else text)[:300]


def check_faiss(spec: str, n_train: int, what: str = "images") -> None:
    """Refuse (FaissSpecError, naming --faiss) a factory string FAISS cannot build, or an IVF with more inverted
    lists than the `n_train` vectors (`what`) it would be trained on; cheap: built on tiny dimensions, untrained.
    A string that builds here may still fail on the real dimension or data (PQ sizes): `build_faiss` refuses
    that the same way, and the index folder's writer (`tvrn.search.formats._IndexWriter`) leaves no temporary
    folder."""
    import faiss

    accepted = "; accepted: " + ", ".join(FAISS_ACCEPTED)
    if not isinstance(spec, str) or not spec.strip():
        raise FaissSpecError("--faiss: an empty factory string" + accepted)
    ivf = re.search(r"IVF([0-9]+)", spec)
    if ivf is not None:
        nlist = int(ivf.group(1))
        if nlist < 1:
            raise FaissSpecError(f"--faiss {spec!r}: an IVF needs at least 1 inverted list" + accepted)
        if nlist > n_train:  # checked before FAISS allocates the lists (IVF99999999 takes it half a minute)
            raise FaissSpecError(
                f"--faiss {spec!r}: an IVF of {nlist} inverted lists is trained on the gallery's vectors, and the "
                f"gallery has {n_train} {what}: use at most IVF{n_train} (FAISS advises 39 vectors per list: "
                f"IVF{max(1, n_train // 39)}), or Flat / HNSW32 for a gallery this small")
    hnsw = re.search(r"HNSW([0-9]+)", spec)
    if hnsw is not None and int(hnsw.group(1)) < 2:  # FAISS aborts the process on HNSW0 / HNSW1 when adding
        raise FaissSpecError(f"--faiss {spec!r}: an HNSW graph needs at least 2 links per vector (HNSW32 is usual)"
                             + accepted)
    first = None
    for dim in (8, 16, 32, 64, 128, 256, 512, 1024):  # PQ<m> needs a dimension divisible by m
        try:
            faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            return
        except Exception as e:  # FAISS raises RuntimeError (parse errors, failed assertions)
            first = first or e
    raise FaissSpecError(f"--faiss {spec!r} is not a factory string FAISS can build ({_faiss_reason(first)})"
                         + accepted)


def _train_count(n_images: int, n_captions: int) -> tuple[int, str]:
    """The fewest vectors a FAISS index of the gallery is trained on (both sides get one), and what they are."""
    return (n_images, "images") if n_images <= n_captions else (n_captions, "captions")


def _ivf_lists(index) -> int:
    """The number of inverted lists of a FAISS IVF index (0 for other kinds)."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def build_faiss(vec, spec: str, side: str):
    """A FAISS index (inner product) from factory string `spec` over one side's shortlist vectors `vec` (N, D)
    float32 rows (`NpyRows`), trained when it needs training (IVF / PQ: on a sample, 64 vectors per list) and
    filled a block at a time. FaissSpecError when FAISS cannot build it for these vectors."""
    import faiss

    try:
        index = faiss.index_factory(vec.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:  # IVF / PQ: train on a sample, 64 vectors per list (FAISS asks 39+)
            step = max(1, vec.shape[0] // max(100_000, 64 * _ivf_lists(index)))
            index.train(np.ascontiguousarray(vec[np.arange(0, vec.shape[0], step)], dtype=np.float32))
        for s0 in range(0, vec.shape[0], EXACT_BLOCK):
            index.add(np.ascontiguousarray(vec[s0:s0 + EXACT_BLOCK], dtype=np.float32))
    except RuntimeError as e:  # what check_faiss cannot see: the real dimension, the training data
        raise FaissSpecError(f"--faiss {spec!r}: FAISS cannot build it for the {vec.shape[0]} "
                             f"{side} vectors of dimension {vec.shape[1]} ({_faiss_reason(e)}); "
                             f"accepted: " + ", ".join(FAISS_ACCEPTED)) from None
    return index


def write_faiss(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_faiss(path: Path, spec: str, nprobe: Optional[int] = None):
    """Open a FAISS index written by `write_faiss`; nprobe: the search breadth of an IVF (nprobe) or HNSW
    (efSearch) index made from factory string `spec` (a Flat index is exact and takes none)."""
    import faiss

    index = faiss.read_index(str(path))
    if nprobe is not None and ("IVF" in spec or "HNSW" in spec):  # Flat: exact
        faiss.ParameterSpace().set_index_parameter(index, "nprobe" if "IVF" in spec else "efSearch", nprobe)
    return index


class _Vectors:
    """Shortlist vectors (N, D): in RAM (a tensor) or on disk (`NpyRows`, read by row with pread), with an
    optional FAISS index over them."""

    def __init__(self, vectors, faiss_index=None):
        self.vectors, self.faiss = vectors, faiss_index

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def row(self, i: int) -> torch.Tensor:
        """(1, D) float32: row i, from RAM (a tensor) or from disk (NpyRows gives a fresh ndarray)."""
        rows = self.vectors[i : i + 1]
        return (rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)).to(torch.float32)

    def top(self, queries: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (indices (Q, m), cosines (Q, m)), best first: FAISS when the index has one, else exact
        (the gallery EXACT_BLOCK rows at a time: one on disk is never read whole)."""
        if self.faiss is not None:
            cos, idx = self.faiss.search(queries.float().contiguous().numpy(), m)
            return torch.from_numpy(idx).long(), torch.from_numpy(cos).float()
        return topk_exact_scored(queries.float(), self.vectors, m, chunk=None, gallery_chunk=EXACT_BLOCK)

    def cosines(self, queries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(Q, D) against the gallery rows idx (m,) -> (Q, m)."""
        rows = np.asarray(self.vectors[np.sort(idx.numpy())], dtype=np.float32)
        order = torch.as_tensor(np.argsort(np.argsort(idx.numpy(), kind="stable"), kind="stable"))
        return queries.float() @ torch.as_tensor(rows)[order].t()


__all__ = ["FAISS_ACCEPTED", "FaissSpecError", "build_faiss", "check_faiss", "read_faiss", "write_faiss"]
