"""The raw store: fetched bodies, content-addressed and compressed, plus one metadata record per fetch.

Layout under `root` (e.g. ``data/raw``)::

    objects/ab/ab12…ef.zst   a body, zstandard-compressed, named by the sha256 of the *uncompressed* body;
                             written once (temp file, fsync, rename) and read-only from then on
    fetches.db               SQLite (WAL): one row per fetch attempt (FetchRecord), and an index of the objects
                             written (sizes, for `stats`)

Identical bodies are stored once however often they are fetched. An object is never modified after it is written;
`get` checks the digest of what it decompresses, so a damaged file is reported instead of returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import zstandard

from store.files import fsync_dir
from store.sql import connect_sqlite

ZSTD_LEVEL = 3
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class FetchRecord:
    """What one fetch of a URL produced (the body itself is in the object store under `content_hash`)."""

    url: str
    final_url: str                # after redirects
    status: int                   # HTTP status (0 when no response came back)
    headers: dict[str, str]
    fetched_at: float             # unix seconds
    elapsed_s: float
    content_type: str
    size: int                     # body bytes as received (before compression)
    truncated: bool               # the body was cut at the size limit
    depth: int = 0
    content_hash: str | None = None   # sha256 hex of the body (None when there was no body)
    error: str | None = None
    fetch_id: str | None = None       # assigned by RawStore.record()


class RawMissing(KeyError):
    """No such object or fetch record, or an object that can no longer be read back."""


class RawCorrupt(ValueError):
    """An object whose decompressed bytes do not match its sha256 name (damaged on disk)."""


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest (64 lowercase hex characters): {sha!r}")
    return sha


_FETCH_COLS = ("fetch_id", "url", "final_url", "status", "headers", "fetched_at", "elapsed_s", "content_type", "size",
               "truncated", "depth", "content_hash", "error")


class RawStore:
    """Bodies and fetch records under `root`. One instance per process; safe to share between threads."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # guards the (not thread-safe) zstd contexts and the SQLite connection
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        self._dctx = zstandard.ZstdDecompressor()
        db_path = self.root / "fetches.db"
        try:
            self._db = connect_sqlite(str(db_path), check_same_thread=False)
            self._db.executescript("""
                BEGIN;
                CREATE TABLE IF NOT EXISTS fetches (
                    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
                    fetch_id     TEXT NOT NULL UNIQUE,
                    url          TEXT NOT NULL,
                    final_url    TEXT NOT NULL,
                    status       INTEGER NOT NULL,
                    headers      TEXT NOT NULL,
                    fetched_at   REAL NOT NULL,
                    elapsed_s    REAL NOT NULL,
                    content_type TEXT NOT NULL,
                    size         INTEGER NOT NULL,
                    truncated    INTEGER NOT NULL,
                    depth        INTEGER NOT NULL,
                    content_hash TEXT,
                    error        TEXT);
                CREATE INDEX IF NOT EXISTS fetches_url ON fetches (url, fetched_at);
                CREATE TABLE IF NOT EXISTS objects (
                    sha        TEXT PRIMARY KEY,
                    size       INTEGER NOT NULL,
                    stored     INTEGER NOT NULL,
                    created_at REAL NOT NULL) WITHOUT ROWID;
                COMMIT;""")
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the raw store's database {db_path}: {exc}") from exc

    # ------------------------------------------------------------------------------------------------ objects

    def path(self, sha: str) -> Path:
        """Where the object `sha` lives (whether or not it exists)."""
        _check_sha(sha)
        return self.objects_dir / sha[:2] / f"{sha}.zst"

    def put(self, body: bytes) -> str:
        """Stores `body` (once) and returns its sha256 hex digest."""
        sha = hashlib.sha256(body).hexdigest()
        final = self.path(sha)
        if final.exists():
            return sha
        with self._lock:
            data = self._cctx.compress(body)
        final.parent.mkdir(exist_ok=True)
        tmp = final.parent / f".{sha}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)  # a concurrent put of the same body wrote the same bytes: either wins
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO objects (sha, size, stored, created_at) VALUES (?, ?, ?, ?)",
                             (sha, len(body), len(data), time.time()))
        return sha

    def get(self, sha: str) -> bytes:
        """The body stored as `sha`. RawMissing if there is none; RawCorrupt if the file is damaged."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RawMissing(f"no raw object {sha} in {self.objects_dir}") from None
        try:
            with self._lock:
                body = self._dctx.decompress(data)
        except zstandard.ZstdError as exc:
            raise RawCorrupt(f"raw object {path} is corrupt: cannot decompress it ({exc})") from exc
        actual = hashlib.sha256(body).hexdigest()
        if actual != sha:
            raise RawCorrupt(f"raw object {path} is corrupt: its content hashes to {actual}")
        return body

    def has(self, sha: str) -> bool:
        """Whether the object `sha` is stored."""
        return self.path(sha).exists()

    # ------------------------------------------------------------------------------------------------ fetches

    def record(self, rec: FetchRecord) -> str:
        """Stores `rec` under a new fetch_id (uuid4 hex), which it also sets on `rec`, and returns it."""
        if rec.content_hash is not None:
            _check_sha(rec.content_hash)
        rec.fetch_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(f"INSERT INTO fetches ({', '.join(_FETCH_COLS)}) VALUES ({', '.join('?' * 13)})",
                             (rec.fetch_id, rec.url, rec.final_url, int(rec.status), json.dumps(rec.headers),
                              float(rec.fetched_at), float(rec.elapsed_s), rec.content_type, int(rec.size),
                              int(bool(rec.truncated)), int(rec.depth), rec.content_hash, rec.error))
        return rec.fetch_id

    @staticmethod
    def _record(row: tuple) -> FetchRecord:
        d = dict(zip(_FETCH_COLS, row))
        d["headers"] = json.loads(d["headers"])
        d["truncated"] = bool(d["truncated"])
        return FetchRecord(**d)

    def fetch(self, fetch_id: str) -> FetchRecord:
        """The record stored as `fetch_id`; RawMissing if there is none."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FETCH_COLS)} FROM fetches WHERE fetch_id = ?",
                                   (fetch_id,)).fetchone()
        if row is None:
            raise RawMissing(f"no fetch record {fetch_id!r} in {self.root / 'fetches.db'}")
        return self._record(row)

    def fetches(self, url: str | None = None) -> list[FetchRecord]:
        """Every fetch record (of `url` only, when given), in the order they were recorded."""
        sql = f"SELECT {', '.join(_FETCH_COLS)} FROM fetches"
        with self._lock:
            if url is None:
                rows = self._db.execute(sql + " ORDER BY seq").fetchall()
            else:
                rows = self._db.execute(sql + " WHERE url = ? ORDER BY seq", (url,)).fetchall()
        return [self._record(r) for r in rows]

    def stats(self) -> dict:
        """objects (count), bytes_stored (compressed bytes on disk), bytes_raw (uncompressed), fetches (records)."""
        with self._lock:
            objects, stored, raw = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored), 0), COALESCE(SUM(size), 0) FROM objects").fetchone()
            fetches = self._db.execute("SELECT COUNT(*) FROM fetches").fetchone()[0]
        return {"objects": objects, "bytes_stored": stored, "bytes_raw": raw, "fetches": fetches}

    def close(self) -> None:
        """Closes the metadata database; objects need no closing."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
