"""Export of the document store to Parquet, for analysis outside the mesh (pandas, DuckDB, Spark…)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from store.docstore import DocStore, Document

BATCH_ROWS = 1000  # documents read from the store and written as one Parquet row group

_TIMESTAMP = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("final_url", pa.string()),
    pa.field("canonical_url", pa.string()),
    pa.field("content_hash", pa.string()),
    pa.field("fetched_at", _TIMESTAMP),
    pa.field("http_status", pa.int32()),
    pa.field("content_type", pa.string()),
    pa.field("state", pa.string()),
    pa.field("error", pa.string()),
    pa.field("title", pa.string()),
    pa.field("language", pa.string()),
    pa.field("published", pa.string()),
    pa.field("text", pa.string()),
    pa.field("outlinks", pa.list_(pa.struct([pa.field("url", pa.string()), pa.field("anchor", pa.string())]))),
    pa.field("depth", pa.int32()),
    pa.field("fetch_id", pa.string()),
    pa.field("extracted_at", _TIMESTAMP),
    pa.field("embedding_id", pa.int64()),
    pa.field("duplicate_of", pa.string()),
    pa.field("topic", pa.int64()),
    pa.field("novelty", pa.float64()),
    pa.field("novelty_kl", pa.float64()),
    pa.field("topic_label", pa.string()),
    pa.field("topic_weights", pa.list_(pa.float32())),
    pa.field("scored_at", _TIMESTAMP),
])


def _ms(ts: float | None) -> int | None:
    return None if ts is None else round(ts * 1000)


def _batch(docs: list[Document]) -> pa.RecordBatch:
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for d in docs:
        for name in SCHEMA.names:
            columns[name].append(getattr(d, name))
    for name in ("fetched_at", "extracted_at", "scored_at"):
        columns[name] = [_ms(v) for v in columns[name]]
    columns["outlinks"] = [[{"url": link.get("url"), "anchor": link.get("anchor")} for link in links or ()]
                           for links in columns["outlinks"]]
    return pa.RecordBatch.from_pydict(columns, schema=SCHEMA)


def _chunks(docs: Iterable[Document], size: int) -> Iterable[list[Document]]:
    chunk: list[Document] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def export_parquet(store: DocStore, out_dir: Path, *, state: str | None = "extracted") -> tuple[Path, int]:
    """Writes the store's documents (in `state`; every state when None) to
    ``out_dir/documents-YYYYmmddTHHMMSSZ.parquet`` and returns (path, rows).

    Documents are streamed in batches (one row group each), so memory stays bounded. The file is written under a
    temporary name and renamed when complete: a reader never sees a partial export. An empty selection still gives a
    valid file with the schema and no rows. Timestamps are UTC milliseconds; outlinks a list of {url, anchor}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    final = out_dir / f"documents-{stamp}.parquet"
    n = 1
    while final.exists():  # two exports within one second keep both files
        final = out_dir / f"documents-{stamp}-{n}.parquet"
        n += 1
    tmp = out_dir / f".{final.name}.{os.getpid()}.tmp"
    rows = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for chunk in _chunks(store.documents(batch=BATCH_ROWS, state=state), BATCH_ROWS):
                writer.write_batch(_batch(chunk))
                rows += len(chunk)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, rows
