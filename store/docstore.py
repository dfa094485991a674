"""The document store: one row per URL with what extraction found, and the topic model's results.

Two backends share one schema and one contract: SQLite (``sqlite:///PATH``, the default, one file in WAL mode)
and PostgreSQL (``postgresql://…`` or ``postgres://…``, via psycopg 3). `open_docstore` picks one from a URL.

Schema changes are numbered migrations (`MIGRATIONS`), applied in order inside one transaction when a store is
opened and recorded in ``schema_migrations(version, applied_at)``; opening an up-to-date store applies nothing, and
a store migrated by newer code than this raises SchemaError. PostgreSQL migrations hold a transaction-scoped
advisory lock, so agents opening the same database at once migrate it exactly once.

`upsert` is keyed by URL: a row whose content hash and state did not change is left alone ('unchanged'); any other
change replaces the row's content (its id is kept) and clears the topic-model columns (embedding_id, duplicate_of,
topic, novelty), which the topic model then fills again (`pending_topic`, `set_topic_fields`).
Timestamps are unix seconds as floats in both backends (REAL / double precision), so they round-trip exactly.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from store.sql import connect_sqlite, mask_url

STATES = ("extracted", "failed")
CONNECT_TIMEOUT_S = 10  # PostgreSQL connect_timeout when the URL does not set one


@dataclass
class Document:
    """A page after extraction (state 'extracted'), or the record of why extraction failed (state 'failed')."""

    url: str
    final_url: str
    content_hash: str
    fetched_at: float            # unix seconds
    http_status: int
    content_type: str
    state: str                   # 'extracted' | 'failed'
    error: str | None = None     # why extraction failed (state 'failed')
    canonical_url: str | None = None
    title: str | None = None
    language: str | None = None
    published: str | None = None  # date as found (ISO string)
    text: str | None = None
    outlinks: list[dict] = field(default_factory=list)   # [{"url": ..., "anchor": ...}]
    depth: int = 0
    fetch_id: str | None = None
    extracted_at: float | None = None
    # filled later by the topic model
    embedding_id: int | None = None
    duplicate_of: str | None = None
    topic: int | None = None
    novelty: float | None = None       # Jensen-Shannon divergence from its topic's running distribution (bits, 0..1)
    novelty_kl: float | None = None    # Kullback-Leibler divergence, smoothed (bits)
    topic_label: str | None = None
    topic_weights: list[float] | None = None   # the document's topic distribution
    scored_at: float | None = None
    id: int | None = None        # assigned by the store


@dataclass
class Scores:
    """What the topic model writes back for one document (DocStore.save_scores)."""

    document_id: int
    embedding_id: int | None
    duplicate_of: str | None = None
    topic: int | None = None
    novelty: float | None = None
    novelty_kl: float | None = None
    topic_label: str | None = None
    topic_weights: list[float] | None = None


class StoreUnavailable(Exception):
    """The document store cannot be reached or opened (the message names it, password masked)."""


class SchemaError(Exception):
    """The store's schema cannot be used by this code (migrated by a newer version, or a migration failed)."""


# Columns written by upsert, the topic-model columns, and everything read back (Document field order aside).
CONTENT_COLUMNS = ("url", "final_url", "canonical_url", "content_hash", "fetched_at", "http_status", "content_type",
                   "state", "error", "title", "language", "published", "text", "outlinks", "depth", "fetch_id",
                   "extracted_at")
TOPIC_COLUMNS = ("embedding_id", "duplicate_of", "topic", "novelty", "novelty_kl", "topic_label", "topic_weights",
                 "scored_at")
SELECT_COLUMNS = ("id", *CONTENT_COLUMNS, *TOPIC_COLUMNS)
_SELECT = f"SELECT {', '.join(SELECT_COLUMNS)} FROM documents"
_WRITE_COLUMNS = (*CONTENT_COLUMNS, "updated_at")
_INSERT = (f"INSERT INTO documents ({', '.join(_WRITE_COLUMNS)}) VALUES ({', '.join('?' * len(_WRITE_COLUMNS))}) "
           "ON CONFLICT (url) DO NOTHING RETURNING id")
# params: every written column but url, then url, content_hash, state
_UPDATE = (f"UPDATE documents SET {', '.join(f'{c} = ?' for c in _WRITE_COLUMNS[1:])}, "
           f"{', '.join(f'{c} = NULL' for c in TOPIC_COLUMNS)} WHERE url = ? AND (content_hash <> ? OR state <> ?) "
           "RETURNING id")
assert set(SELECT_COLUMNS) == {f.name for f in fields(Document)}
_PENDING = "state = 'extracted' AND embedding_id IS NULL"   # the topic model's queue; its partial index's condition


@dataclass(frozen=True)
class Migration:
    """One schema step; the same logical change written for each backend."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "documents table",
        sqlite=(
            """CREATE TABLE documents (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                url           TEXT NOT NULL,
                final_url     TEXT NOT NULL,
                canonical_url TEXT,
                content_hash  TEXT NOT NULL,
                fetched_at    REAL NOT NULL,
                http_status   INTEGER NOT NULL,
                content_type  TEXT NOT NULL,
                state         TEXT NOT NULL CHECK (state IN ('extracted', 'failed')),
                error         TEXT,
                title         TEXT,
                language      TEXT,
                published     TEXT,
                text          TEXT,
                outlinks      TEXT NOT NULL DEFAULT '[]',
                depth         INTEGER NOT NULL DEFAULT 0,
                fetch_id      TEXT,
                extracted_at  REAL,
                embedding_id  INTEGER,
                duplicate_of  TEXT,
                topic         INTEGER,
                novelty       REAL,
                updated_at    REAL NOT NULL)""",
            "CREATE UNIQUE INDEX documents_url ON documents (url)",
            "CREATE INDEX documents_state_id ON documents (state, id)",
            "CREATE INDEX documents_pending_topic ON documents (id) WHERE state = 'extracted' AND embedding_id IS NULL",
        ),
        postgres=(
            """CREATE TABLE documents (
                id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                url           TEXT NOT NULL,
                final_url     TEXT NOT NULL,
                canonical_url TEXT,
                content_hash  TEXT NOT NULL,
                fetched_at    DOUBLE PRECISION NOT NULL,
                http_status   INTEGER NOT NULL,
                content_type  TEXT NOT NULL,
                state         TEXT NOT NULL CHECK (state IN ('extracted', 'failed')),
                error         TEXT,
                title         TEXT,
                language      TEXT,
                published     TEXT,
                text          TEXT,
                outlinks      JSONB NOT NULL DEFAULT '[]',
                depth         INTEGER NOT NULL DEFAULT 0,
                fetch_id      TEXT,
                extracted_at  DOUBLE PRECISION,
                embedding_id  BIGINT,
                duplicate_of  TEXT,
                topic         INTEGER,
                novelty       DOUBLE PRECISION,
                updated_at    DOUBLE PRECISION NOT NULL)""",
            "CREATE UNIQUE INDEX documents_url ON documents (url)",
            "CREATE INDEX documents_state_id ON documents (state, id)",
            "CREATE INDEX documents_pending_topic ON documents (id) WHERE state = 'extracted' AND embedding_id IS NULL",
        ),
    ),
)
MIGRATIONS += (
    Migration(
        2, "topic model scores: KL novelty, topic label and distribution, scored_at",
        sqlite=("ALTER TABLE documents ADD COLUMN novelty_kl REAL",
                "ALTER TABLE documents ADD COLUMN topic_label TEXT",
                "ALTER TABLE documents ADD COLUMN topic_weights TEXT",
                "ALTER TABLE documents ADD COLUMN scored_at REAL",
                "CREATE INDEX documents_topic ON documents (topic) WHERE topic IS NOT NULL"),
        postgres=("ALTER TABLE documents ADD COLUMN novelty_kl DOUBLE PRECISION",
                  "ALTER TABLE documents ADD COLUMN topic_label TEXT",
                  "ALTER TABLE documents ADD COLUMN topic_weights TEXT",
                  "ALTER TABLE documents ADD COLUMN scored_at DOUBLE PRECISION",
                  "CREATE INDEX documents_topic ON documents (topic) WHERE topic IS NOT NULL"),
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1)), "migrations must be numbered 1..N"

_UNSET: Any = object()


def _clean(value: Any) -> Any:
    """Strings without NUL characters (PostgreSQL text and JSONB cannot hold them; both backends drop them)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    return value


def _outlinks(links: list[dict]) -> list[dict]:
    """Outlinks normalised to {"url": str, "anchor": str | None} (other keys are dropped)."""
    out = []
    for link in links or ():
        url = link.get("url") if isinstance(link, dict) else None
        if not isinstance(url, str) or not url:
            raise ValueError(f"every outlink needs a non-empty 'url' string, got {link!r}")
        anchor = link.get("anchor")
        out.append({"url": _clean(url), "anchor": None if anchor is None else _clean(str(anchor))})
    return out


class DocStore(ABC):
    """The document store contract. An instance is used by one thread; open one per thread or process."""

    @abstractmethod
    def upsert(self, doc: Document) -> str:
        """Stores `doc` keyed by its URL: 'inserted', 'updated' (content hash or state changed: the row is replaced,
        id kept, topic-model columns cleared) or 'unchanged' (nothing written). Sets `doc.id`."""

    @abstractmethod
    def get(self, url: str) -> Document | None:
        """The document stored for `url`, or None."""

    @abstractmethod
    def count(self, state: str | None = None) -> int:
        """How many documents (in `state`, when given)."""

    @abstractmethod
    def documents(self, *, batch: int = 500, after_id: int = 0, state: str | None = None) -> Iterator[Document]:
        """Documents with id > `after_id` (in `state`, when given) by id, read `batch` rows per query."""

    @abstractmethod
    def set_topic_fields(self, url: str, *, embedding_id: int | None = _UNSET, duplicate_of: str | None = _UNSET,
                         topic: int | None = _UNSET, novelty: float | None = _UNSET) -> bool:
        """Sets the given topic-model columns (others untouched; None stores NULL); False if `url` is unknown."""

    @abstractmethod
    def embedded_since(self, embedding_id: int, *, limit: int = 1000) -> list[Document]:
        """Documents whose embedding_id is at least `embedding_id`, by embedding_id then id (the topic model
        replays them after a restart)."""

    @abstractmethod
    def embedded_originals(self) -> list[tuple[str, str, int, int | None, str | None]]:
        """(url, content_hash, embedding_id, topic, topic_label) of every embedded document that duplicates no
        other, by embedding_id: what the topic model rebuilds its maps from when it starts."""

    @abstractmethod
    def save_scores(self, scores: Iterable[Scores]) -> int:
        """The topic model's results for many documents, in one transaction; returns rows updated."""

    @abstractmethod
    def score_counts(self) -> dict[str, int]:
        """The topic model's counters as the stored scores have them: `documents` scored, near-`duplicates` (an
        embedding of their own) and `exact_duplicates` (their original's embedding)."""

    @abstractmethod
    def pending_topic(self, limit: int) -> list[Document]:
        """Up to `limit` extracted documents without an embedding yet, by id: the topic model's work queue."""

    @abstractmethod
    def topic_backlog(self, head: int = 1000) -> tuple[int, float | None]:
        """How far the topic model is behind: the documents `pending_topic` would still return (all of them, counted
        on that queue's partial index rather than by reading the table) and the earliest fetched_at among the first
        `head` of them in queue order (None when none waits). Only the head is read so the call stays cheap however
        long the queue: the queue is in id order, so its head holds the documents stored first, the ones that waited
        longest."""

    @abstractmethod
    def timeline(self) -> list[tuple[float, str, bool, int | None, float | None, bool]]:
        """(fetched_at, state, scored, topic, novelty, duplicate) of every document, by fetched_at: what the crawl
        report is made of (no texts are read)."""

    @abstractmethod
    def schema_version(self) -> int:
        """The latest migration applied to this store."""

    @abstractmethod
    def close(self) -> None:
        """Closes the connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SQLDocStore(DocStore):
    """The SQL shared by both backends, written with ``?`` placeholders (`_q` adapts them)."""

    name: str  # what to call this store in messages (path, or URL with the password masked)

    # --- what each backend provides
    @abstractmethod
    def _tx(self) -> Any:
        """A context manager: one write transaction, yielding an object with .execute(sql, params) -> cursor."""

    @abstractmethod
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a read-only statement."""

    @abstractmethod
    def _dump_outlinks(self, links: list[dict]) -> Any: ...

    @abstractmethod
    def _load_outlinks(self, value: Any) -> list[dict]: ...

    @abstractmethod
    def _migration_sql(self, m: Migration) -> tuple[str, ...]: ...

    def _q(self, sql: str) -> str:
        return sql

    # --- shared
    def _migrate(self, tx: Any) -> None:
        """Applies the missing migrations on `tx` (the caller holds the transaction, and any lock)."""
        tx.execute(self._q("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                           "applied_at DOUBLE PRECISION NOT NULL)"))
        current = tx.execute(self._q("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")).fetchone()[0]
        if current > LATEST_VERSION:
            raise SchemaError(f"document store {self.name} has schema version {current}, newer than this code "
                              f"(knows up to {LATEST_VERSION}); run the newer code, or restore a matching backup")
        for m in MIGRATIONS:
            if m.version <= current:
                continue
            try:
                for stmt in self._migration_sql(m):
                    tx.execute(self._q(stmt))
            except Exception as exc:
                raise SchemaError(f"document store {self.name}: migration {m.version} ({m.description}) failed: "
                                  f"{exc}") from exc
            tx.execute(self._q("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                       (m.version, time.time()))

    def _doc(self, row: tuple) -> Document:
        d = dict(zip(SELECT_COLUMNS, row))
        d["outlinks"] = self._load_outlinks(d["outlinks"])
        if d["topic_weights"] is not None:
            d["topic_weights"] = json.loads(d["topic_weights"])
        return Document(**d)

    def embedded_since(self, embedding_id: int, *, limit: int = 1000) -> list[Document]:
        rows = self._query(self._q(f"{_SELECT} WHERE embedding_id >= ? ORDER BY embedding_id, id LIMIT ?"),
                           (int(embedding_id), int(limit)))
        return [self._doc(r) for r in rows]

    def embedded_originals(self) -> list[tuple[str, str, int, int | None, str | None]]:
        return [tuple(r) for r in self._query("SELECT url, content_hash, embedding_id, topic, topic_label FROM documents "
                                              "WHERE embedding_id IS NOT NULL AND duplicate_of IS NULL "
                                              "ORDER BY embedding_id")]

    def save_scores(self, scores: Iterable[Scores]) -> int:
        """Writes the topic model's results for many documents in one transaction; returns rows updated."""
        sql = self._q("UPDATE documents SET embedding_id = ?, duplicate_of = ?, topic = ?, novelty = ?, novelty_kl = ?, "
                      "topic_label = ?, topic_weights = ?, scored_at = ?, updated_at = ? WHERE id = ?")
        now = time.time()
        n = 0
        with self._tx() as tx:
            for sc in scores:
                weights = None if sc.topic_weights is None else json.dumps([round(w, 6) for w in sc.topic_weights])
                n += tx.execute(sql, (sc.embedding_id, sc.duplicate_of, sc.topic, sc.novelty, sc.novelty_kl,
                                      sc.topic_label, weights, now, now, sc.document_id)).rowcount
        return n

    def score_counts(self) -> dict[str, int]:
        scored, near, exact = self._query(
            "SELECT COUNT(*), "
            "SUM(CASE WHEN d.duplicate_of IS NULL OR o.embedding_id = d.embedding_id THEN 0 ELSE 1 END), "
            "SUM(CASE WHEN d.duplicate_of IS NOT NULL AND o.embedding_id = d.embedding_id THEN 1 ELSE 0 END) "
            "FROM documents d LEFT JOIN documents o ON o.url = d.duplicate_of WHERE d.embedding_id IS NOT NULL")[0]
        return {"documents": int(scored), "duplicates": int(near or 0), "exact_duplicates": int(exact or 0)}

    def upsert(self, doc: Document) -> str:
        if doc.state not in STATES:
            raise ValueError(f"document state must be one of {STATES}, got {doc.state!r} for {doc.url}")
        if not doc.url:
            raise ValueError("a document needs a URL")
        values = {c: _clean(getattr(doc, c)) for c in CONTENT_COLUMNS}
        values["outlinks"] = self._dump_outlinks(_outlinks(doc.outlinks))
        params = (*values.values(), time.time())
        with self._tx() as tx:
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same URL, then yields to the UPDATE below
            rows = tx.execute(self._q(_INSERT), params).fetchall()
            if rows:
                doc.id = rows[0][0]
                return "inserted"
            rows = tx.execute(self._q(_UPDATE),
                              (*params[1:], values["url"], values["content_hash"], values["state"])).fetchall()
            if rows:
                doc.id = rows[0][0]
                return "updated"
            doc.id = tx.execute(self._q("SELECT id FROM documents WHERE url = ?"), (values["url"],)).fetchone()[0]
            return "unchanged"

    def get(self, url: str) -> Document | None:
        rows = self._query(self._q(f"{_SELECT} WHERE url = ?"), (url,))
        return self._doc(rows[0]) if rows else None

    def timeline(self) -> list[tuple[float, str, bool, int | None, float | None, bool]]:
        rows = self._query("SELECT fetched_at, state, embedding_id IS NOT NULL, topic, novelty, duplicate_of IS NOT NULL "
                           "FROM documents ORDER BY fetched_at, id")
        return [(float(t), st, bool(sc), topic, novelty, bool(dup)) for t, st, sc, topic, novelty, dup in rows]

    def count(self, state: str | None = None) -> int:
        if state is None:
            return self._query("SELECT COUNT(*) FROM documents")[0][0]
        return self._query(self._q("SELECT COUNT(*) FROM documents WHERE state = ?"), (state,))[0][0]

    def documents(self, *, batch: int = 500, after_id: int = 0, state: str | None = None) -> Iterator[Document]:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        where = "id > ?" + ("" if state is None else " AND state = ?")
        sql = self._q(f"{_SELECT} WHERE {where} ORDER BY id LIMIT ?")
        last = after_id
        while True:
            rows = self._query(sql, (last, batch) if state is None else (last, state, batch))
            for row in rows:
                yield self._doc(row)
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def set_topic_fields(self, url: str, *, embedding_id: int | None = _UNSET, duplicate_of: str | None = _UNSET,
                         topic: int | None = _UNSET, novelty: float | None = _UNSET) -> bool:
        given = {k: v for k, v in (("embedding_id", embedding_id), ("duplicate_of", duplicate_of), ("topic", topic),
                                   ("novelty", novelty)) if v is not _UNSET}
        if not given:
            raise ValueError("set_topic_fields needs at least one of embedding_id, duplicate_of, topic, novelty")
        sets = ", ".join(f"{k} = ?" for k in given)
        with self._tx() as tx:
            cur = tx.execute(self._q(f"UPDATE documents SET {sets}, updated_at = ? WHERE url = ?"),
                             (*given.values(), time.time(), url))
            return cur.rowcount == 1

    def pending_topic(self, limit: int) -> list[Document]:
        columns = ", ".join(SELECT_COLUMNS)
        rows = self._query(self._q(f"SELECT {columns} FROM {self._pending_from} WHERE {_PENDING} ORDER BY id LIMIT ?"),
                           (int(limit),))
        return [self._doc(r) for r in rows]

    # FROM clause of the topic model's queue (pending_topic, topic_backlog): a backend whose planner may pass over the
    # partial index documents_pending_topic (migration 1) names it here
    _pending_from = "documents"

    def topic_backlog(self, head: int = 1000) -> tuple[int, float | None]:
        # on the partial index of the queue: the count reads only the index, the earliest fetch time `head` rows
        count = self._query(f"SELECT COUNT(*) FROM {self._pending_from} WHERE {_PENDING}")[0][0]
        if not count:
            return 0, None
        oldest = self._query(self._q(f"SELECT MIN(fetched_at) FROM (SELECT fetched_at FROM {self._pending_from} "
                                     f"WHERE {_PENDING} ORDER BY id LIMIT ?) head"), (int(head),))[0][0]
        return int(count), None if oldest is None else float(oldest)

    def schema_version(self) -> int:
        return self._query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0]


class SQLiteDocStore(_SQLDocStore):
    """The document store in one SQLite file (WAL mode). Writers are serialised by SQLite (BEGIN IMMEDIATE)."""

    # without ANALYZE statistics SQLite's planner prefers documents_state_id (state = ?) and reads every extracted
    # row to test embedding_id (112 ms per call at 52k documents): the queue's queries name the partial index instead
    _pending_from = "documents INDEXED BY documents_pending_topic"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.name = self.path
        try:
            self._db = connect_sqlite(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite document store {self.path}: {exc}") from exc
        try:
            with self._tx() as tx:
                self._migrate(tx)
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def _dump_outlinks(self, links: list[dict]) -> str:
        return json.dumps(links, ensure_ascii=False)

    def _load_outlinks(self, value: str) -> list[dict]:
        return json.loads(value)

    def _migration_sql(self, m: Migration) -> tuple[str, ...]:
        return m.sqlite

    def close(self) -> None:
        self._db.close()


class PostgresDocStore(_SQLDocStore):
    """The document store in PostgreSQL (psycopg 3, autocommit between explicit transactions).

    A connection found broken is replaced on the next call; failures to connect raise StoreUnavailable.
    """

    MIGRATION_LOCK = 0x70697065_646F6373  # pg_advisory_xact_lock key for migrations ("pipedocs")

    def __init__(self, url: str, *, connect_timeout: int = CONNECT_TIMEOUT_S):
        self.url = url
        self.name = mask_url(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"invalid PostgreSQL URL {self.name}: {exc}") from exc
        self._connect_kwargs: dict[str, Any] = {} if "connect_timeout" in params else {
            "connect_timeout": connect_timeout}
        self._c: psycopg.Connection | None = None
        try:
            with self._tx() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
                self._migrate(tx)
        except BaseException:
            self.close()
            raise

    def _conn(self) -> psycopg.Connection:
        if self._c is None or self._c.closed or self._c.broken:
            if self._c is not None:
                self._c.close()
            try:
                self._c = psycopg.connect(self.url, autocommit=True, **self._connect_kwargs)
            except psycopg.OperationalError as exc:
                self._c = None
                raise StoreUnavailable(f"cannot connect to PostgreSQL document store {self.name}: "
                                       f"{str(exc).strip()}") from exc
        return self._c

    @contextmanager
    def _lost(self) -> Iterator[None]:
        """Turns errors that broke the connection into StoreUnavailable (others pass through)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            if self._c is not None and (self._c.closed or self._c.broken):
                raise StoreUnavailable(f"lost the connection to PostgreSQL document store {self.name}: "
                                       f"{str(exc).strip()}") from exc
            raise

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        conn = self._conn()
        with self._lost(), conn.transaction():
            yield conn

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self._conn()
        with self._lost():
            return conn.execute(sql, params).fetchall()

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _dump_outlinks(self, links: list[dict]) -> Jsonb:
        return Jsonb(links)

    def _load_outlinks(self, value: Any) -> list[dict]:
        return json.loads(value) if isinstance(value, str) else value

    def _migration_sql(self, m: Migration) -> tuple[str, ...]:
        return m.postgres

    def close(self) -> None:
        if self._c is not None:
            self._c.close()


def open_docstore(url: str) -> DocStore:
    """The document store at `url`: ``sqlite:///PATH`` (parent directories created), ``postgresql://…`` or
    ``postgres://…`` (any libpq URL; connect_timeout defaults to 10 s)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"document store URL {url!r} has no path; use sqlite:///PATH")
        return SQLiteDocStore(path)
    if re.match(r"postgres(ql)?://", url):
        return PostgresDocStore(url)
    raise ValueError(f"unsupported document store URL {mask_url(url)!r}: use sqlite:///PATH, postgresql://… "
                     "or postgres://…")
