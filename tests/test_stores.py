"""Contract tests of the pipeline's durable stores, the same tests against every backend.

Frontier: SQLite and Redis; document store: SQLite and PostgreSQL; raw store and Parquet export. The servers are real
(tests/services.py starts them); without their binaries these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from agents.crawler.frontier import Entry, Frontier, FrontierError, FrontierUnavailable, open_frontier
from agents.crawler.rawstore import FetchRecord, RawCorrupt, RawMissing, RawStore
from store.docstore import LATEST_VERSION, DocStore, Document, SchemaError, StoreUnavailable, open_docstore
from store.export import SCHEMA, export_parquet
from tests.services import free_port

T0 = 1_700_000_000.0


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(params=["sqlite", "redis"])
def frontier_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/frontier.db"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def frontier(frontier_url: str):
    f = open_frontier(frontier_url)
    yield f
    f.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def docstore_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/documents.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def docstore(docstore_url: str):
    store = open_docstore(docstore_url)
    yield store
    store.close()


def urls(entries: list[Entry]) -> list[str]:
    return [e.url for e in entries]


def add(f: Frontier, *names: str, **kw) -> list[str]:
    return f.add(Entry(url=f"https://e.org/{n}", **kw) for n in names)


def u(name: str) -> str:
    return f"https://e.org/{name}"


# ------------------------------------------------------------------------------------------------- frontier

def test_seen_set_is_forever(frontier: Frontier):
    assert add(frontier, "a", "b") == [u("a"), u("b")]
    assert add(frontier, "b", "c", "c") == [u("c")]          # known and duplicate-in-batch URLs are skipped
    assert frontier.seen(u("a")) and not frontier.seen(u("zz"))
    popped = frontier.pop(10, now=T0)
    frontier.finish(popped[0].url, ok=True, status=200)
    frontier.finish(popped[1].url, ok=False, error="gone")
    assert add(frontier, "a", "b", "c") == []                  # done, failed and leased URLs stay seen
    assert frontier.get(u("a"))["state"] == "done"
    assert frontier.stats()["seen"] == 3


def test_pop_by_priority_then_fifo(frontier: Frontier):
    frontier.add([Entry(u("low1"), priority=1), Entry(u("high1"), priority=5), Entry(u("low2"), priority=1)])
    frontier.add([Entry(u("high2"), priority=5), Entry(u("mid"), priority=3.5), Entry(u("neg"), priority=-2)])
    assert urls(frontier.pop(2, now=T0)) == [u("high1"), u("high2")]
    assert urls(frontier.pop(10, now=T0)) == [u("mid"), u("low1"), u("low2"), u("neg")]


def test_pop_leases(frontier: Frontier):
    add(frontier, "a", "b", "c")
    first = frontier.pop(1, now=T0)
    assert urls(first) == [u("a")] and frontier.get(u("a"))["state"] == "leased"
    assert urls(frontier.pop(10, now=T0)) == [u("b"), u("c")]
    assert frontier.pop(10, now=T0) == [] and frontier.pop(0, now=T0) == []
    assert frontier.stats()["leased"] == 3


def test_entry_fields_round_trip(frontier: Frontier):
    e = Entry(u("x"), depth=3, priority=0.1 + 0.2, parent=u("p"), anchor="Ünïcode ✓", attempts=2, redirects=1)
    frontier.add([e, Entry(u("y"), anchor="")])
    got = frontier.pop(10, now=T0)
    assert got[0] == e
    assert got[1].anchor == "" and got[1].parent is None
    assert frontier.get(u("x")) == {"url": u("x"), "state": "leased", "depth": 3, "priority": 0.1 + 0.2,
                                    "attempts": 2, "redirects": 1, "parent": u("p"), "anchor": "Ünïcode ✓",
                                    "status": None, "error": None, "fetch_id": None, "not_before": 0.0}
    assert frontier.get(u("nope")) is None


def test_not_before_is_respected(frontier: Frontier):
    frontier.add([Entry(u("later"), priority=9, not_before=T0 + 100), Entry(u("now"))])
    assert frontier.next_due() == 0.0
    assert urls(frontier.pop(10, now=T0)) == [u("now")]
    assert frontier.next_due() == T0 + 100
    assert frontier.pop(10, now=T0 + 99.999) == []
    assert urls(frontier.pop(10, now=T0 + 100)) == [u("later")]
    assert frontier.next_due() is None


def test_not_before_holds_when_the_clock_goes_back(frontier: Frontier):
    frontier.add([Entry(u("a"), not_before=T0), Entry(u("b"), not_before=T0)])
    assert urls(frontier.pop(1, now=T0 + 10)) == [u("a")]      # b became due at this clock
    assert frontier.pop(10, now=T0 - 10) == []                   # …but not at an earlier one
    assert frontier.next_due() == T0
    assert urls(frontier.pop(10, now=T0)) == [u("b")]


def test_retry_counts_attempts_and_keeps_the_error(frontier: Frontier):
    add(frontier, "a")
    frontier.pop(1, now=T0)
    frontier.retry(u("a"), not_before=T0 + 60, error="timeout")
    got = frontier.get(u("a"))
    assert (got["state"], got["attempts"], got["error"], got["not_before"]) == ("queued", 1, "timeout", T0 + 60)
    assert frontier.next_due() == T0 + 60
    assert frontier.pop(10, now=T0 + 59) == []
    [again] = frontier.pop(10, now=T0 + 60)
    assert (again.url, again.attempts, again.not_before) == (u("a"), 1, T0 + 60)
    frontier.retry(u("a"), not_before=T0 + 120, error="connection reset")
    assert frontier.get(u("a"))["attempts"] == 2 and frontier.get(u("a"))["error"] == "connection reset"


def test_fetched_then_finish_is_idempotent(frontier: Frontier):
    add(frontier, "a", "b", "c")
    frontier.pop(10, now=T0)
    frontier.mark_fetched(u("b"), "fid-b")
    frontier.mark_fetched(u("a"), "fid-a")
    assert [(e.url, e.fetch_id) for e in frontier.fetched()] == [(u("a"), "fid-a"), (u("b"), "fid-b")]
    assert urls(frontier.fetched(limit=1)) == [u("a")]
    frontier.finish(u("a"), ok=True, status=200)
    frontier.finish(u("a"), ok=True, status=200)                 # redelivered ack
    frontier.finish(u("a"), ok=False, error="late")             # an ack for a finished URL changes nothing
    got = frontier.get(u("a"))
    assert (got["state"], got["status"], got["error"], got["fetch_id"]) == ("done", 200, None, "fid-a")
    frontier.finish(u("c"), ok=False, status=404, error="not found")   # straight from leased
    frontier.finish(u("c"), ok=True)
    assert (frontier.get(u("c"))["state"], frontier.get(u("c"))["status"]) == ("failed", 404)
    assert urls(frontier.fetched()) == [u("b")]
    assert frontier.stats() == {"queued": 0, "leased": 0, "fetched": 1, "done": 1, "failed": 1, "seen": 3}


def test_finish_error_after_retries(frontier: Frontier):
    add(frontier, "ok", "bad")
    frontier.pop(2, now=T0)
    for url in (u("ok"), u("bad")):
        frontier.retry(url, not_before=0.0, error="timeout")
    frontier.pop(10, now=T0)
    frontier.finish(u("ok"), ok=True, status=200)
    frontier.finish(u("bad"), ok=False)
    assert frontier.get(u("ok"))["error"] is None          # success clears the last retry error
    assert frontier.get(u("bad"))["error"] == "timeout"    # a failure without its own error keeps it


def test_invalid_transitions_raise(frontier: Frontier):
    add(frontier, "q", "l")
    frontier.pop(1, now=T0)  # q leased
    with pytest.raises(FrontierError, match="unknown URL"):
        frontier.mark_fetched(u("nope"), "f")
    frontier.release([u("q")])
    with pytest.raises(FrontierError, match=r"'https://e.org/q'.*queued.*leased"):
        frontier.mark_fetched(u("q"), "f")
    with pytest.raises(FrontierError, match="queued"):
        frontier.retry(u("q"), not_before=0, error="x")
    with pytest.raises(FrontierError, match="leased or fetched"):
        frontier.finish(u("q"), ok=True)
    [leased] = frontier.pop(1, now=T0)
    frontier.mark_fetched(leased.url, "f")
    with pytest.raises(FrontierError, match="fetched"):
        frontier.mark_fetched(leased.url, "f2")
    with pytest.raises(FrontierError, match="fetched"):
        frontier.retry(leased.url, not_before=0, error="x")
    frontier.finish(leased.url, ok=True)
    with pytest.raises(FrontierError, match="done"):
        frontier.retry(leased.url, not_before=0, error="x")
    with pytest.raises(ValueError, match="priority"):
        frontier.add([Entry(u("nan"), priority=float("nan"))])
    with pytest.raises(ValueError, match="URL"):
        frontier.add([Entry("")])


def test_release_is_all_or_nothing(frontier: Frontier):
    add(frontier, "a", "b", "c", "d")
    popped = frontier.pop(3, now=T0)
    with pytest.raises(FrontierError, match="'https://e.org/d'.*queued"):
        frontier.release([u("a"), u("d")])
    assert frontier.get(u("a"))["state"] == "leased"          # nothing changed
    frontier.release([u("c"), u("a"), u("a")])
    assert frontier.get(u("a"))["attempts"] == 0
    assert frontier.stats()["queued"] == 3 and frontier.stats()["leased"] == 1
    assert urls(frontier.pop(10, now=T0)) == [u("a"), u("c"), u("d")]   # original FIFO order
    assert popped[1].url == u("b")


def test_recover_after_a_crash(frontier_url: str):
    f = open_frontier(frontier_url)
    add(f, "a", "b", "c", "d")
    f.pop(3, now=T0)
    f.mark_fetched(u("b"), "fid-b")
    f.close()                                                  # the process dies: a and c stay leased
    f = open_frontier(frontier_url)
    try:
        assert f.stats()["leased"] == 2
        assert f.recover() == 2
        assert f.recover() == 0
        assert f.stats() == {"queued": 3, "leased": 0, "fetched": 1, "done": 0, "failed": 0, "seen": 4}
        assert [(e.url, e.fetch_id) for e in f.fetched()] == [(u("b"), "fid-b")]
        assert urls(f.pop(10, now=T0)) == [u("a"), u("c"), u("d")]
    finally:
        f.close()


def test_set_priority_reorders_queued_only(frontier: Frontier):
    add(frontier, "a", "b", "c")
    frontier.add([Entry(u("w"), not_before=T0 + 50)])
    assert frontier.set_priority(u("c"), 10.0) is True
    assert frontier.set_priority(u("w"), 20.0) is True          # waiting entries too
    assert frontier.get(u("c"))["priority"] == 10.0
    assert urls(frontier.pop(1, now=T0)) == [u("c")]
    assert frontier.set_priority(u("c"), 1.0) is False          # leased
    assert frontier.set_priority(u("nope"), 1.0) is False
    assert frontier.set_priority(u("b"), -1.0) is True
    assert urls(frontier.pop(10, now=T0 + 50)) == [u("w"), u("a"), u("b")]


def test_set_priorities_many_at_once(frontier: Frontier):
    add(frontier, "a", "b", "c")
    frontier.pop(1, now=T0)                                      # a: leased
    assert frontier.set_priorities({u("a"): 5.0, u("b"): 1.0, u("c"): 2.0, u("nope"): 3.0}) == {u("b"), u("c")}
    assert frontier.get(u("c"))["priority"] == 2.0
    assert urls(frontier.pop(10, now=T0)) == [u("c"), u("b")]
    assert frontier.set_priorities({}) == set()
    with pytest.raises(ValueError, match="finite"):
        frontier.set_priorities({u("b"): float("nan")})


def test_stats_and_next_due(frontier: Frontier):
    assert frontier.stats() == {"queued": 0, "leased": 0, "fetched": 0, "done": 0, "failed": 0, "seen": 0}
    assert frontier.next_due() is None
    frontier.add([Entry(u(str(i))) for i in range(5000)])        # one call, one transaction / a few scripts
    frontier.pop(10, now=T0)
    for e in frontier.pop(3, now=T0):
        frontier.mark_fetched(e.url, "f")
    assert frontier.stats() == {"queued": 4987, "leased": 10, "fetched": 3, "done": 0, "failed": 0, "seen": 5000}


def test_persistence_across_reopen(frontier_url: str):
    with open_frontier(frontier_url) as f:
        f.add([Entry(u("a"), depth=2, priority=1.5, parent=u("root"), anchor="A"), Entry(u("b"))])
        f.pop(1, now=T0)
        f.retry(u("a"), not_before=T0 + 5, error="503")
        before = (f.get(u("a")), f.get(u("b")), f.stats())
    with open_frontier(frontier_url) as f:
        assert (f.get(u("a")), f.get(u("b")), f.stats()) == before
        assert add(f, "a") == []
        assert urls(f.pop(10, now=T0 + 5)) == [u("a"), u("b")]


def test_prefixes_are_independent(frontier_url: str):
    with open_frontier(frontier_url, prefix="one") as one, open_frontier(frontier_url, prefix="two") as two:
        add(one, "a")
        assert add(two, "a", "b") == [u("a"), u("b")]
        assert one.stats()["seen"] == 1 and two.stats()["seen"] == 2


def test_bad_urls():
    with pytest.raises(ValueError, match=r"sqlite:///PATH or redis://host:port/db"):
        open_frontier("http://localhost/frontier")
    with pytest.raises(ValueError, match=r"sqlite:///PATH, postgresql://"):
        open_docstore("mysql://user:secret@localhost/db")
    with pytest.raises(ValueError) as info:
        open_docstore("mysql://user:secret@localhost/db")
    assert "secret" not in str(info.value)


def test_unreachable_redis_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(FrontierUnavailable, match=r"redis://:\*\*\*@127.0.0.1"):
        open_frontier(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------- document store

def doc(name: str, content: str = "v1", state: str = "extracted", **kw) -> Document:
    fields = {"url": u(name), "final_url": u(name), "content_hash": hashlib.sha256(content.encode()).hexdigest(),
              "fetched_at": T0 + 0.123456, "http_status": 200, "content_type": "text/html", "state": state,
              "title": f"Title {name}", "text": f"text of {name}: {content}", "extracted_at": T0 + 1.5}
    fields.update(kw)
    return Document(**fields)


def test_upsert_insert_unchanged_updated(docstore: DocStore):
    first = doc("a")
    assert docstore.upsert(first) == "inserted" and first.id is not None
    again = doc("a", title="a new title, same content")
    assert docstore.upsert(again) == "unchanged" and again.id == first.id
    assert docstore.get(u("a")).title == "Title a"               # nothing was written
    changed = doc("a", content="v2")
    assert docstore.upsert(changed) == "updated" and changed.id == first.id
    assert docstore.get(u("a")).text == "text of a: v2"
    failed = doc("a", content="v2", state="failed", error="no text found", text=None)
    assert docstore.upsert(failed) == "updated"                  # same content, new state
    got = docstore.get(u("a"))
    assert (got.state, got.error, got.text, got.id) == ("failed", "no text found", None, first.id)
    assert docstore.get(u("missing")) is None
    with pytest.raises(ValueError, match="state"):
        docstore.upsert(doc("b", state="pending"))


def test_content_change_resets_topic_columns(docstore: DocStore):
    docstore.upsert(doc("a"))
    assert docstore.set_topic_fields(u("a"), embedding_id=7, duplicate_of=u("z"), topic=3, novelty=0.25)
    docstore.upsert(doc("a"))                                    # unchanged: topic columns stay
    got = docstore.get(u("a"))
    assert (got.embedding_id, got.duplicate_of, got.topic, got.novelty) == (7, u("z"), 3, 0.25)
    docstore.upsert(doc("a", content="v2"))
    got = docstore.get(u("a"))
    assert (got.embedding_id, got.duplicate_of, got.topic, got.novelty) == (None, None, None, None)


def test_save_scores_in_one_batch_and_reset_on_new_content(docstore: DocStore):
    from store.docstore import Scores

    a, b = doc("a"), doc("b")
    docstore.upsert(a)
    docstore.upsert(b)
    n = docstore.save_scores([
        Scores(document_id=a.id, embedding_id=0, topic=2, novelty=0.4, novelty_kl=1.5, topic_label="x y z",
               topic_weights=[0.1, 0.2, 0.7]),
        Scores(document_id=b.id, embedding_id=0, duplicate_of=u("a"), topic=2, novelty=0.0, novelty_kl=0.0),
        Scores(document_id=10**9, embedding_id=5),
    ])
    assert n == 2
    got = docstore.get(u("a"))
    assert (got.embedding_id, got.topic, got.novelty_kl, got.topic_label, got.topic_weights) == (
        0, 2, 1.5, "x y z", [0.1, 0.2, 0.7])
    assert got.scored_at is not None and docstore.get(u("b")).duplicate_of == u("a")
    assert [d.url for d in docstore.pending_topic(10)] == []
    docstore.upsert(doc("a", content="v2"))
    got = docstore.get(u("a"))
    assert (got.topic, got.novelty_kl, got.topic_weights, got.scored_at) == (None, None, None, None)
    assert docstore.schema_version() == 2


def test_score_counts_from_the_stored_scores(docstore: DocStore):
    from store.docstore import Scores

    assert docstore.score_counts() == {"documents": 0, "duplicates": 0, "exact_duplicates": 0}
    a, near, exact, pending = doc("a"), doc("near", content="v2"), doc("exact"), doc("pending", content="v3")
    for d in (a, near, exact, pending):
        docstore.upsert(d)
    docstore.save_scores([
        Scores(document_id=a.id, embedding_id=0, topic=1),
        Scores(document_id=near.id, embedding_id=1, duplicate_of=u("a"), topic=1),    # an embedding of its own
        Scores(document_id=exact.id, embedding_id=0, duplicate_of=u("a"), topic=1),   # the original's
    ])
    assert docstore.score_counts() == {"documents": 3, "duplicates": 1, "exact_duplicates": 1}


def test_set_topic_fields_sets_only_what_is_given(docstore: DocStore):
    docstore.upsert(doc("a"))
    docstore.set_topic_fields(u("a"), embedding_id=1)
    docstore.set_topic_fields(u("a"), topic=2, novelty=0.5)
    got = docstore.get(u("a"))
    assert (got.embedding_id, got.topic, got.novelty, got.duplicate_of) == (1, 2, 0.5, None)
    docstore.set_topic_fields(u("a"), topic=None)
    assert docstore.get(u("a")).topic is None and docstore.get(u("a")).embedding_id == 1
    assert docstore.set_topic_fields(u("nope"), topic=1) is False
    with pytest.raises(ValueError, match="at least one"):
        docstore.set_topic_fields(u("a"))


def test_pending_topic_and_count(docstore: DocStore):
    for name in ("a", "b", "c"):
        docstore.upsert(doc(name))
    docstore.upsert(doc("f", state="failed", error="boom"))
    docstore.set_topic_fields(u("b"), embedding_id=11)
    assert [d.url for d in docstore.pending_topic(10)] == [u("a"), u("c")]
    assert [d.url for d in docstore.pending_topic(1)] == [u("a")]
    assert (docstore.count(), docstore.count("extracted"), docstore.count("failed")) == (4, 3, 1)


def test_documents_paginates_by_id(docstore: DocStore):
    names = [f"d{i:02}" for i in range(23)]
    for i, name in enumerate(names):
        docstore.upsert(doc(name, state="failed" if i % 4 == 0 else "extracted"))
    every = list(docstore.documents(batch=5))
    assert [d.url for d in every] == [u(n) for n in names]
    ids = [d.id for d in every]
    assert ids == sorted(ids) and len(set(ids)) == 23
    assert [d.url for d in docstore.documents(batch=4, after_id=ids[19])] == [u(n) for n in names[20:]]
    assert len(list(docstore.documents(batch=3, state="failed"))) == 6
    assert len(list(docstore.documents(batch=100, state="extracted"))) == 17
    with pytest.raises(ValueError):
        list(docstore.documents(batch=0))


def test_unicode_and_outlinks_round_trip(docstore: DocStore):
    links = [{"url": u("x"), "anchor": "Zürich ✓"}, {"url": u("y"), "anchor": None}, {"url": u("z")}]
    original = doc("ü", text="Grüße aus 東京 😀 — naïve\ttabs\nlines", title="Ελληνικά", language="el",
                   published="2024-02-29T12:00:00+01:00", outlinks=links, depth=4, fetch_id="f" * 32,
                   canonical_url=u("canon"))
    docstore.upsert(original)
    got = docstore.get(u("ü"))
    assert got.outlinks == [{"url": u("x"), "anchor": "Zürich ✓"}, {"url": u("y"), "anchor": None},
                            {"url": u("z"), "anchor": None}]
    original.outlinks = got.outlinks
    assert got == original                                         # every column, floats exactly


def test_migrations_are_idempotent(docstore_url: str):
    with open_docstore(docstore_url) as store:
        assert store.schema_version() == LATEST_VERSION
        store.upsert(doc("a"))
    with open_docstore(docstore_url) as store:
        assert store.schema_version() == LATEST_VERSION and store.count() == 1
    rows = _raw_sql(docstore_url, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, LATEST_VERSION + 1))


def test_store_newer_than_code_is_refused(docstore_url: str):
    open_docstore(docstore_url).close()
    _raw_sql(docstore_url, f"INSERT INTO schema_migrations (version, applied_at) VALUES ({LATEST_VERSION + 1}, 0)")
    with pytest.raises(SchemaError, match=f"schema version {LATEST_VERSION + 1}, newer than this code"):
        open_docstore(docstore_url)


def _raw_sql(url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as db:
            return db.execute(sql).fetchall()
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_concurrent_upserts_of_one_url(docstore_url: str):
    """Four threads, each with its own store (opened at once: concurrent migrations too), upsert the same URLs."""
    barrier = threading.Barrier(4)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            with open_docstore(docstore_url) as store:
                for i in range(5):
                    barrier.wait()
                    results.append(store.upsert(doc(f"same{i}")))
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(results) == ["inserted"] * 5 + ["unchanged"] * 15
    with open_docstore(docstore_url) as store:
        assert store.count() == 5 and store.schema_version() == LATEST_VERSION


def test_unreachable_postgres_is_store_unavailable():
    url = f"postgresql://crawler:s3cret@127.0.0.1:{free_port()}/docs?connect_timeout=3"
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        open_docstore(url)
    assert time.monotonic() - start < 5
    assert "127.0.0.1" in str(info.value) and "***" in str(info.value) and "s3cret" not in str(info.value)


def test_unopenable_sqlite_is_store_unavailable(tmp_path: Path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreUnavailable, match="dir.db"):
        open_docstore(f"sqlite:///{tmp_path}/dir.db")


# ------------------------------------------------------------------------------------------------ raw store

def test_raw_put_writes_once_and_read_only(tmp_path: Path):
    with RawStore(tmp_path / "raw") as raw:
        body = b"<html>" + os.urandom(4096) + b"</html>"
        sha = raw.put(body)
        assert sha == hashlib.sha256(body).hexdigest()
        path = raw.path(sha)
        assert path == tmp_path / "raw" / "objects" / sha[:2] / f"{sha}.zst"
        first = path.stat()
        assert stat.S_IMODE(first.st_mode) == 0o444
        assert raw.put(body) == sha
        assert path.stat().st_mtime_ns == first.st_mtime_ns and path.stat().st_ino == first.st_ino
        assert [p.name for p in (tmp_path / "raw" / "objects").rglob("*")] == [sha[:2], f"{sha}.zst"]
        assert raw.get(sha) == body and raw.has(sha)
        assert raw.get(raw.put(b"")) == b""
        big = os.urandom(256) * 8192                               # 2 MiB, compressible
        assert raw.get(raw.put(big)) == big
        stats = raw.stats()
        assert stats["objects"] == 3 and 0 < stats["bytes_stored"] < len(big) and stats["fetches"] == 0


def test_raw_missing_and_corrupt(tmp_path: Path):
    raw = RawStore(tmp_path)
    absent = hashlib.sha256(b"absent").hexdigest()
    assert not raw.has(absent)
    with pytest.raises(RawMissing):
        raw.get(absent)
    with pytest.raises(ValueError, match="sha256"):
        raw.get("../../etc/passwd")
    sha = raw.put(b"original body")
    path = raw.path(sha)
    os.chmod(path, 0o644)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"tampered body"))
    with pytest.raises(RawCorrupt, match="hashes to"):
        raw.get(sha)
    path.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(ValueError, match="corrupt"):
        raw.get(sha)
    raw.close()


def test_raw_fetch_records(tmp_path: Path):
    raw = RawStore(tmp_path / "raw")
    sha = raw.put(b"body")
    recs = [FetchRecord(url=u("a"), final_url=u("a2"), status=200, headers={"content-type": "text/html; charset=ü"},
                        fetched_at=T0 + 0.25, elapsed_s=0.125, content_type="text/html", size=4, truncated=False,
                        depth=2, content_hash=sha),
            FetchRecord(url=u("b"), final_url=u("b"), status=0, headers={}, fetched_at=T0 + 1, elapsed_s=10.0,
                        content_type="", size=0, truncated=False, error="timeout"),
            FetchRecord(url=u("a"), final_url=u("a"), status=304, headers={}, fetched_at=T0 + 2, elapsed_s=0.5,
                        content_type="text/html", size=10_000_000, truncated=True)]
    ids = [raw.record(r) for r in recs]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3
    assert [r.fetch_id for r in recs] == ids
    raw.close()
    raw = RawStore(tmp_path / "raw")
    assert raw.fetch(ids[0]) == recs[0] and raw.fetch(ids[1]) == recs[1]
    assert raw.fetches(u("a")) == [recs[0], recs[2]]
    assert raw.fetches() == recs and raw.fetches(u("none")) == []
    with pytest.raises(RawMissing):
        raw.fetch("0" * 32)
    with pytest.raises(ValueError):
        raw.record(FetchRecord(url=u("c"), final_url=u("c"), status=200, headers={}, fetched_at=T0, elapsed_s=1,
                               content_type="", size=0, truncated=False, content_hash="not-a-hash"))
    assert raw.stats()["fetches"] == 3
    raw.close()


# ---------------------------------------------------------------------------------------------------- export

def test_export_parquet(docstore: DocStore, tmp_path: Path):
    for i in range(5):
        docstore.upsert(doc(f"p{i}", outlinks=[{"url": u(f"l{i}"), "anchor": f"link {i}"}, {"url": u("x")}]))
    docstore.upsert(doc("bad", state="failed", error="no text"))
    docstore.set_topic_fields(u("p1"), embedding_id=5, topic=2, novelty=0.75)
    path, rows = export_parquet(docstore, tmp_path / "exports")
    assert rows == 5 and re.fullmatch(r"documents-\d{8}T\d{6}Z\.parquet", path.name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA) and table.num_rows == 5
    first = table.to_pylist()[1]
    assert first["url"] == u("p1") and first["state"] == "extracted"
    assert (first["embedding_id"], first["topic"], first["novelty"]) == (5, 2, 0.75)
    assert first["outlinks"] == [{"url": u("l1"), "anchor": "link 1"}, {"url": u("x"), "anchor": None}]
    assert first["fetched_at"].timestamp() == pytest.approx(T0 + 0.123, abs=1e-6)
    assert str(first["fetched_at"].tzinfo) == "UTC"
    assert table.schema.field("fetched_at").type == pa.timestamp("ms", tz="UTC")
    path2, rows2 = export_parquet(docstore, tmp_path / "exports", state=None)
    assert rows2 == 6 and path2 != path and pq.read_table(path2).num_rows == 6


def test_export_empty_store(tmp_path: Path):
    with open_docstore(f"sqlite:///{tmp_path}/docs.db") as store:
        path, rows = export_parquet(store, tmp_path / "out")
    table = pq.read_table(path)
    assert rows == 0 and table.num_rows == 0 and table.schema.equals(SCHEMA)
