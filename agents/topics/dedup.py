"""Near-duplicate search over document vectors (cosine similarity in faiss), exact while small, HNSW when large.

Vectors are L2-normalised (agents.embedding gives them so), so the inner product is the cosine similarity. Ids are int64
values chosen by the caller (a document id, say); `search` names the most similar stored document when its similarity
reaches the threshold. The index starts exact (IndexFlatIP) and is rebuilt once as HNSW (approximate, logarithmic
search) when an add takes it to `hnsw_above` vectors; `save` writes it atomically, with its settings beside it in JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from store.files import atomic_write


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")



class DuplicateIndex:
    """Near-duplicate search by cosine similarity on L2-normalised vectors in faiss (inner product).

    `threshold`: the similarity from which a stored vector counts as a duplicate. The index is an exact
    IndexIDMap2(IndexFlatIP) while it holds fewer than `hnsw_above` vectors; the add that takes it there rebuilds it
    as IndexIDMap2(IndexHNSWFlat(dim, hnsw_m, METRIC_INNER_PRODUCT)) searched with `ef_search`.
    """

    def __init__(self, dim: int, *, threshold: float = 0.85, hnsw_above: int = 20000, hnsw_m: int = 32,
                 ef_search: int = 128):
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError("threshold is a cosine similarity, between -1 and 1")
        self.dim = dim
        self.threshold = float(threshold)
        self.hnsw_above = int(hnsw_above)
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self._index: faiss.IndexIDMap2 = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._kind = "flat"

    # --- state ------------------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """Vectors stored."""
        return int(self._index.ntotal)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {np.asarray(vectors).shape}")
        return x

    def _new_hnsw(self) -> faiss.IndexIDMap2:
        hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = self.ef_search
        hnsw.hnsw.efConstruction = max(hnsw.hnsw.efConstruction, 2 * self.hnsw_m)
        return faiss.IndexIDMap2(hnsw)

    def _to_hnsw(self) -> None:
        """Rebuilds the flat index as HNSW (the vectors reconstructed from the flat storage, same ids)."""
        n = self.ntotal
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), dtype=np.float32)
        index = self._new_hnsw()
        if n:
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self._index = index
        self._kind = "hnsw"

    # --- search and add ---------------------------------------------------------------------------------------------

    def _best(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarity and id of the nearest stored vector per row (-inf and -1 where there is none)."""
        n = x.shape[0]
        if self.ntotal == 0 or n == 0:
            return np.full(n, -np.inf, dtype=np.float32), np.full(n, -1, dtype=np.int64)
        sims, ids = self._index.search(x, 1)
        sims, ids = sims[:, 0].copy(), ids[:, 0].copy()
        sims[ids < 0] = -np.inf
        return sims, ids

    def _result(self, sim: float, ident: int) -> tuple[int | None, float]:
        if ident >= 0 and sim >= self.threshold:
            return int(ident), float(sim)
        return None, float(sim) if np.isfinite(sim) else 0.0

    def search(self, vectors: np.ndarray) -> list[tuple[int | None, float]]:
        """Per row: (id of the most similar stored vector, similarity) when the similarity reaches the threshold,
        else (None, the best similarity, 0.0 when the index is empty)."""
        x = self._prepare(vectors)
        sims, ids = self._best(x)
        return [self._result(s, i) for s, i in zip(sims.tolist(), ids.tolist())]

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Stores `vectors` under `ids` (int64, chosen by the caller, one per row); switches to HNSW when the index
        reaches `hnsw_above` vectors."""
        x = self._prepare(vectors)
        id_arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if id_arr.shape[0] != x.shape[0]:
            raise ValueError(f"{id_arr.shape[0]} ids for {x.shape[0]} vectors")
        if x.shape[0] == 0:
            return
        if self._kind == "flat" and self.ntotal + x.shape[0] >= self.hnsw_above:
            self._to_hnsw()
        self._index.add_with_ids(x, id_arr)

    def check_and_add(self, ids: Sequence[int], vectors: np.ndarray) -> list[tuple[int | None, float]]:
        """`search` and `add` row by row, vectorised: each row is compared with the stored vectors and with the rows
        of this batch added before it. A duplicate is reported (id of the best match, similarity) and not added; the
        other rows are added and reported as (None, best similarity). The batch-against-batch similarity matrix is
        n x n float32: keep batches to a few thousand rows."""
        x = self._prepare(vectors)
        id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = x.shape[0]
        if id_arr.shape[0] != n:
            raise ValueError(f"{id_arr.shape[0]} ids for {n} vectors")
        stored_sim, stored_id = self._best(x)
        batch = x @ x.T                                          # the batch against itself
        batch[np.triu_indices(n)] = -np.inf                      # only earlier rows count (row j < i)
        added = np.zeros(n, dtype=bool)
        out: list[tuple[int | None, float]] = []
        for i in range(n):
            sim, ident = float(stored_sim[i]), int(stored_id[i])
            earlier = np.flatnonzero(added[:i])                  # earlier rows that were kept, not the duplicates
            if earlier.size:
                j = int(earlier[np.argmax(batch[i, earlier])])
                if batch[i, j] > sim:
                    sim, ident = float(batch[i, j]), int(id_arr[j])
            result = self._result(sim, ident)
            added[i] = result[0] is None
            out.append(result)
        if added.any():
            self.add(id_arr[added], x[added])
        return out

    # --- persistence ------------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Writes the faiss index to `path` (temp file + rename) and its settings to `path`.json beside it."""
        path = Path(path)
        meta = {"dim": self.dim, "threshold": self.threshold, "kind": self._kind, "hnsw_above": self.hnsw_above,
                "hnsw_m": self.hnsw_m, "ef_search": self.ef_search, "ntotal": self.ntotal}
        atomic_write(path, lambda tmp: faiss.write_index(self._index, tmp))
        atomic_write(_meta_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))

    @classmethod
    def load(cls, path: Path, *, threshold: float | None = None) -> DuplicateIndex:
        """The index saved at `path`; `threshold` overrides the saved one (default 0.85 without the JSON)."""
        path = Path(path)
        index = faiss.read_index(str(path))
        meta_file = _meta_path(path)
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if not isinstance(index, faiss.IndexIDMap2):
            raise TypeError(f"{path} is not a DuplicateIndex (faiss {type(index).__name__})")
        inner = faiss.downcast_index(index.index)
        kind = "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"
        out = cls(index.d, threshold=threshold if threshold is not None else meta.get("threshold", 0.85),
                   hnsw_above=meta.get("hnsw_above", 20000), hnsw_m=meta.get("hnsw_m", 32),
                   ef_search=meta.get("ef_search", 128))
        if kind == "hnsw":
            inner.hnsw.efSearch = out.ef_search
        out._index = index
        out._kind = kind
        return out
