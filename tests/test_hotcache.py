"""The hot cache on both backends (in-process and a real Redis): never over budget, the lowest value goes first,
evictions counted by reason (and kept in Redis across a reopen), never a write to the document store, bad input
refused without a change, and a Redis outage as HotCacheUnavailable."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agents.curiosity.hotcache import (
    ENTRY_OVERHEAD,
    CachedDoc,
    Eviction,
    HotCache,
    HotCacheUnavailable,
    MemoryHotCache,
    RedisHotCache,
    open_hotcache,
)
from store.docstore import Document, open_docstore
from testing.system import missing, reason
from tests.services import _start_redis, free_port

T0 = 1_700_000_000.0


class Clock:
    """Time that the test moves by hand: the caches read it through their `clock` setting."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    return "memory" if request.param == "memory" else request.getfixturevalue("redis_url")


@pytest.fixture
def open_cache(cache_url: str):
    """open_cache(**settings) -> a cache at this test's backend, closed at the end."""
    opened: list[HotCache] = []

    def open_(**settings) -> HotCache:
        cache = open_hotcache(cache_url, **settings)
        opened.append(cache)
        return cache

    yield open_
    for cache in opened:
        cache.close()


def u(name: str) -> str:
    return f"https://docs.example/{name}"


def cdoc(name: str, novelty: float = 0.5, *, text: str = "some text", dim: int | None = 4, uses: int = 0,
         document_id: int | None = None, seed: int = 0) -> CachedDoc:
    emb = None if dim is None else np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return CachedDoc(url=u(name), document_id=document_id, title=name.title(), text=text, embedding=emb,
                     novelty=novelty, uses=uses)


def size_of(doc: CachedDoc) -> int:
    emb = 0 if doc.embedding is None else 4 * doc.embedding.size
    return len(doc.url.encode()) + len(doc.title.encode()) + len(doc.text.encode()) + emb + ENTRY_OVERHEAD


def value(novelty: float, uses: int, last_used: float, tau: float = 600.0) -> float:
    return 1.0 * novelty + 1.0 * math.log(1 + uses) + last_used / tau


def evicted(evictions: list[Eviction]) -> list[tuple[str, str]]:
    return [(e.url, e.reason) for e in evictions]


# ------------------------------------------------------------------------------------------------ the basics

def test_round_trip_hits_misses_and_peek(open_cache):
    clock = Clock()
    cache = open_cache(max_items=10, clock=clock)
    doc = cdoc("a", 0.25, text="Grüße, 世界 " * 20, dim=384, document_id=7)
    assert cache.put(doc) == []
    clock.t += 5
    got = cache.get(doc.url)
    assert (got.url, got.document_id, got.title, got.text, got.novelty) == (doc.url, 7, "A", doc.text, 0.25)
    assert got.embedding.dtype == np.float32 and np.array_equal(got.embedding, doc.embedding)
    assert not got.embedding.flags.writeable
    assert (got.uses, got.last_used, got.size_bytes) == (1, T0 + 5, size_of(doc))
    assert cache.peek(doc.url).uses == 1                     # peek counts no use
    assert cache.get(u("nope")) is None and cache.peek(u("nope")) is None
    no_embedding = cdoc("b", dim=None)
    cache.put(no_embedding)
    assert cache.peek(no_embedding.url).embedding is None
    s = cache.stats()
    assert (s.backend, s.items, s.bytes, s.hits, s.misses) == (cache.backend, 2, size_of(doc) + size_of(no_embedding),
                                                               1, 1)
    assert (s.max_items, s.max_bytes, s.evictions) == (10, None, {})


def test_put_replaces_and_keeps_the_larger_use_count(open_cache):
    cache = open_cache(max_items=10, clock=Clock())
    cache.put(cdoc("a", text="old"))
    cache.get(u("a"))
    cache.get(u("a"))
    assert cache.put(cdoc("a", 0.9, text="new text")) == []
    now = cache.peek(u("a"))
    assert (now.text, now.novelty, now.uses, now.size_bytes) == ("new text", 0.9, 2, size_of(cdoc("a", text="new text")))
    cache.put(cdoc("a", uses=5))
    assert cache.peek(u("a")).uses == 5
    assert cache.stats().items == 1 and cache.stats().bytes == size_of(cdoc("a"))


# ------------------------------------------------------------------------------------------- eviction order

@pytest.mark.parametrize("hit", [False, True])
def test_lowest_value_goes_first_and_a_hit_protects(open_cache, hit: bool):
    clock = Clock()
    cache = open_cache(max_items=3, clock=clock)
    for name, novelty in (("a", 0.2), ("b", 0.6), ("c", 0.4)):
        cache.put(cdoc(name, novelty))
    assert cache.urls() == [u("a"), u("c"), u("b")]
    if hit:                                               # a: 0.2 + log 2 = 0.893 > b's 0.6
        cache.get(u("a"))
        assert cache.urls() == [u("c"), u("b"), u("a")]
        assert cache.put(cdoc("d", 0.9)) == [Eviction(u("c"), "items", pytest.approx(value(0.4, 0, T0), abs=1e-9))]
    else:
        assert cache.put(cdoc("d", 0.9)) == [Eviction(u("a"), "items", pytest.approx(value(0.2, 0, T0), abs=1e-9))]
    clock.t += 600                                        # 10 minutes later outranks one unit of anything else
    assert evicted(cache.put(cdoc("e", 0.0))) == [(u("b") if hit else u("c"), "items")]
    clock.t += 60                                         # f (0 + 1.1 units of recency) beats a's hit and d's novelty
    assert evicted(cache.put(cdoc("f", 0.0))) == [(u("a") if hit else u("b"), "items")]
    assert cache.urls() == [u("d"), u("e"), u("f")]


def test_the_new_item_goes_itself_when_it_is_worth_least(open_cache):
    clock = Clock()
    cache = open_cache(max_items=2, clock=clock)
    cache.put(cdoc("a", 1.0))
    cache.put(cdoc("b", 1.0))
    for _ in range(3):
        cache.get(u("a"))
        cache.get(u("b"))
    clock.t += 60                                         # 0.1 units newer, but 1 + log 4 units behind
    assert evicted(cache.put(cdoc("c", 0.0))) == [(u("c"), "items")]
    assert cache.urls() == [u("a"), u("b")]               # equal values: the smaller URL first


def test_byte_budget_and_too_large(open_cache):
    clock = Clock()
    small = size_of(cdoc("a", text="x" * 100))
    cache = open_cache(max_bytes=3 * small + 10, clock=clock)
    for i, name in enumerate("abc"):
        cache.put(cdoc(name, 0.1 * i, text="x" * 100))
    # d is twice as big: a and b (lowest values) make room for it
    assert evicted(cache.put(cdoc("d", 0.5, text="x" * (100 + small)))) == [(u("a"), "bytes"), (u("b"), "bytes")]
    huge = cdoc("huge", 1.0, text="x" * (3 * small))
    assert evicted(cache.put(huge)) == [(huge.url, "too_large")]
    assert cache.urls() == [u("c"), u("d")] and cache.peek(huge.url) is None
    cache.put(cdoc("c", 0.1, text="x" * 10))
    assert evicted(cache.put(cdoc("c", 0.1, text="x" * (3 * small)))) == [(u("c"), "too_large")]
    assert cache.urls() == [u("d")]                       # the older, now stale version went with it
    assert cache.delete(u("d")) and not cache.delete(u("d"))
    s = cache.stats()
    assert (s.items, s.bytes, s.evictions) == (0, 0, {"bytes": 2, "too_large": 2, "deleted": 1})


# ------------------------------------------------------------------------------ budgets under random traffic

class Model:
    """What the cache must hold: the value function and the eviction rule, written out plainly."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.docs: dict[str, tuple[CachedDoc, int, float]] = {}   # url -> (doc, uses, last_used)
        self.evictions: Counter[str] = Counter()
        self.hits = self.misses = 0

    def value(self, url: str) -> float:
        doc, uses, last = self.docs[url]
        return value(doc.novelty, uses, last)

    def bytes(self) -> int:
        return sum(size_of(d) for d, _, _ in self.docs.values())

    def put(self, doc: CachedDoc, now: float) -> list[tuple[str, str]]:
        uses = max(doc.uses, self.docs.pop(doc.url, (None, 0, 0))[1])
        if size_of(doc) > self.max_bytes:
            self.evictions["too_large"] += 1
            return [(doc.url, "too_large")]
        self.docs[doc.url] = (doc, uses, now)
        out = []
        while len(self.docs) > self.max_items or self.bytes() > self.max_bytes:
            reason = "items" if len(self.docs) > self.max_items else "bytes"
            url = min(self.docs, key=lambda k: (self.value(k), k))
            del self.docs[url]
            self.evictions[reason] += 1
            out.append((url, reason))
        return out

    def get(self, url: str, now: float) -> CachedDoc | None:
        if url not in self.docs:
            self.misses += 1
            return None
        self.hits += 1
        doc, uses, _ = self.docs[url]
        self.docs[url] = (doc, uses + 1, now)
        return doc


def random_doc(rng: random.Random, i: int) -> CachedDoc:
    length = rng.randrange(0, 200) if rng.random() < 0.85 else rng.randrange(1000, 5000)
    if rng.random() < 0.01:
        length = 50_000                                    # larger than the whole byte budget
    dim = rng.choice([None, 8, 16, 64])
    return cdoc(f"p{i}", rng.random(), text="".join(rng.choices("abcdé ", k=length)), dim=dim,
                uses=rng.choice([0, 0, 0, 1, 3]), document_id=i, seed=rng.randrange(1000))


def test_never_over_budget_and_exactly_the_model_under_random_traffic(open_cache):
    rng, clock = random.Random(7), Clock()
    cache, model = open_cache(max_items=40, max_bytes=40_000, clock=clock), Model(40, 40_000)
    for step in range(3000):
        clock.t += rng.expovariate(1 / 30)
        i, op = rng.randrange(200), rng.random()
        where = f"step {step}"
        if op < 0.5:
            doc = random_doc(rng, i)
            assert evicted(cache.put(doc)) == model.put(doc, clock.t), where
        elif op < 0.9:
            got, want = cache.get(u(f"p{i}")), model.get(u(f"p{i}"), clock.t)
            assert (got and (got.text, got.novelty, got.uses)) == (want and (want.text, want.novelty,
                                                                             model.docs[want.url][1])), where
        elif op < 0.97:
            got, want = cache.peek(u(f"p{i}")), model.docs.get(u(f"p{i}"))
            assert (got and got.text) == (want and want[0].text), where
        else:
            cached = model.docs.pop(u(f"p{i}"), None) is not None
            model.evictions["deleted"] += cached
            assert cache.delete(u(f"p{i}")) == cached, where
        s = cache.stats()
        assert s.items <= 40 and s.bytes <= 40_000, where
        assert (s.items, s.bytes, s.hits, s.misses) == (len(model.docs), model.bytes(), model.hits, model.misses), where
        assert s.evictions == {k: n for k, n in model.evictions.items() if n}, where
        assert cache.urls() == sorted(model.docs, key=lambda k: (model.value(k), k)), where
    assert all(s.evictions.get(r, 0) > 5 for r in ("items", "bytes", "too_large", "deleted")), s.evictions


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_two_clients_from_two_threads_stay_within_budget_together(request: pytest.FixtureRequest, backend: str):
    if backend == "memory":
        one = MemoryHotCache(max_items=25, max_bytes=30_000)
        clients = [one, one]                              # threads share the object
    else:
        url = request.getfixturevalue("redis_url")
        clients = [RedisHotCache(url, max_items=25, max_bytes=30_000), RedisHotCache(url, max_items=25,
                                                                                     max_bytes=30_000)]
    watcher, stop, errors, seen = clients[0], threading.Event(), [], []

    def work(n: int) -> None:
        rng = random.Random(n)
        try:
            for i in range(400):
                clients[n].put(random_doc(rng, 1000 * n + i))
                clients[n].get(u(f"p{1000 * n + rng.randrange(i + 1)}"))
                s = clients[n].stats()
                seen.append((s.items, s.bytes))
        except Exception as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    def watch() -> None:
        while not stop.is_set():
            s = watcher.stats()
            seen.append((s.items, s.bytes))

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    spy = threading.Thread(target=watch)
    for t in [*threads, spy]:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    spy.join(10)
    try:
        assert not errors, errors
        assert len(seen) > 800
        assert max(i for i, _ in seen) <= 25 and max(b for _, b in seen) <= 30_000
        s, urls = watcher.stats(), watcher.urls()
        assert s.items == len(urls) and s.bytes == sum(watcher.peek(x).size_bytes for x in urls)
        assert sum(s.evictions.values()) == 800 - s.items  # every put either stays or was counted going
    finally:
        for c in set(clients):
            c.close()


# ------------------------------------------------------------------------------------ the document store

def test_evicted_documents_stay_in_the_document_store(open_cache, tmp_path: Path):
    store = open_docstore(f"sqlite:///{tmp_path}/documents.db")
    rng = random.Random(3)
    texts = {u(f"d{i}"): f"Document {i}. " + " ".join(rng.choices(["alpha", "beta", "γάμμα", "delta"], k=50 + 20 * i))
             for i in range(60)}
    for url, text in texts.items():
        store.upsert(Document(url=url, final_url=url, content_hash=hashlib.sha256(text.encode()).hexdigest(),
                              fetched_at=T0, http_status=200, content_type="text/html", state="extracted",
                              text=text, title=url.rsplit("/", 1)[-1]))
    before = [dataclasses.asdict(d) for d in store.documents()]
    cache = open_cache(max_items=8, max_bytes=12_000, clock=Clock())
    gone: list[Eviction] = []
    for d in store.documents():
        gone += cache.put(CachedDoc(url=d.url, document_id=d.id, title=d.title, text=d.text, novelty=rng.random(),
                                    embedding=np.ones(32, dtype=np.float32)))
        cache.get(rng.choice(list(texts)))
    assert len(gone) > 40 and {e.reason for e in gone} == {"items", "bytes"}
    assert len(gone) + cache.stats().items == 60
    for e in gone:
        assert cache.peek(e.url) is None
        assert store.get(e.url).text == texts[e.url]      # the source of truth still has it, unchanged
    assert [dataclasses.asdict(d) for d in store.documents()] == before   # the cache wrote nothing there
    store.close()


# --------------------------------------------------------------------------------------- Redis specifics

def test_redis_stats_and_documents_survive_a_reopen(redis_url: str):
    settings = {"max_items": 3, "max_bytes": 5000, "clock": Clock()}
    with open_hotcache(redis_url, **settings) as cache:
        for name in "abcde":
            cache.put(cdoc(name, dim=16))
        cache.put(cdoc("big", text="x" * 6000))
        cache.get(u("e"))
        cache.get(u("a"))
        cache.delete(u("d"))
        before, urls, e = cache.stats(), cache.urls(), cache.peek(u("e"))
    assert before.evictions == {"items": 2, "too_large": 1, "deleted": 1} and (before.hits, before.misses) == (1, 1)
    with open_hotcache(redis_url, **settings) as again:
        assert again.stats() == before and again.urls() == urls
        e2 = again.peek(u("e"))
        assert np.array_equal(e2.embedding, e.embedding) and dataclasses.replace(e2, embedding=None) == \
            dataclasses.replace(e, embedding=None)
    with open_hotcache(redis_url, prefix="other", max_items=3) as other:  # prefixes are independent
        assert other.urls() == [] and other.stats().evictions == {}


def test_redis_outage_is_hotcacheunavailable():
    binary = shutil.which("redis-server")
    if binary is None:
        missing(reason("redis-server"))
    server = _start_redis(binary)
    try:
        cache = open_hotcache(server.url(0), max_items=5)
        cache.put(cdoc("a"))
        assert cache.get(u("a")) is not None
        server.proc.terminate()
        server.proc.wait(10)
        for call in (lambda: cache.get(u("a")), lambda: cache.put(cdoc("b")), cache.stats, cache.urls,
                     lambda: cache.peek(u("a")), lambda: cache.delete(u("a"))):
            with pytest.raises(HotCacheUnavailable, match=r"(?s)Redis hot cache at redis://127\.0\.0\.1:\d+/0 is "
                                                          r"unreachable.*read the document store"):
                call()
        cache.close()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(server.dir, ignore_errors=True)


def test_unreachable_redis_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(HotCacheUnavailable, match=r"cannot reach Redis hot cache at redis://127\.0\.0\.1:1\b"):
        open_hotcache("redis://127.0.0.1:1", max_items=10)
    with pytest.raises(HotCacheUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1") as info:
        open_hotcache(f"redis://:hunter2@127.0.0.1:{free_port()}/0", max_items=10)
    assert "hunter2" not in str(info.value)
    assert time.monotonic() - start < 5


# -------------------------------------------------------------------------------------------- bad input

BAD_DOCS = {
    "NaN novelty": lambda d: dataclasses.replace(d, novelty=float("nan")),
    "infinite novelty": lambda d: dataclasses.replace(d, novelty=float("inf")),
    "novelty above 1": lambda d: dataclasses.replace(d, novelty=1.5),
    "novelty not a number": lambda d: dataclasses.replace(d, novelty="0.5"),
    "float64 embedding": lambda d: dataclasses.replace(d, embedding=np.zeros(4)),
    "2-D embedding": lambda d: dataclasses.replace(d, embedding=np.zeros((2, 2), dtype=np.float32)),
    "empty embedding": lambda d: dataclasses.replace(d, embedding=np.zeros(0, dtype=np.float32)),
    "NaN in embedding": lambda d: dataclasses.replace(d, embedding=np.array([1, np.nan], dtype=np.float32)),
    "list embedding": lambda d: dataclasses.replace(d, embedding=[0.0, 1.0]),
    "empty url": lambda d: dataclasses.replace(d, url=""),
    "text None": lambda d: dataclasses.replace(d, text=None),
    "document_id str": lambda d: dataclasses.replace(d, document_id="7"),
    "negative uses": lambda d: dataclasses.replace(d, uses=-1),
}


@pytest.mark.parametrize("bad", list(BAD_DOCS))
def test_bad_input_changes_nothing(open_cache, bad: str):
    cache = open_cache(max_items=2, clock=Clock())
    cache.put(cdoc("a", 0.1))
    cache.put(cdoc("b", 0.2))
    before, a = cache.stats(), cache.peek(u("a"))
    for target in ("a", "new"):                           # replacing a cached URL, and a new one that would evict
        with pytest.raises(ValueError, match="cached document|URL"):
            cache.put(BAD_DOCS[bad](cdoc(target, 0.9)))
    assert cache.stats() == before and cache.urls() == [u("a"), u("b")]
    got = cache.peek(u("a"))
    assert np.array_equal(got.embedding, a.embedding) and dataclasses.replace(got, embedding=None) == \
        dataclasses.replace(a, embedding=None)


def test_the_caller_cannot_change_a_cached_embedding(open_cache):
    cache = open_cache(max_items=2)
    doc = cdoc("a")
    cache.put(doc)
    doc.embedding[:] = 0
    assert not np.array_equal(cache.peek(doc.url).embedding, doc.embedding)


@pytest.mark.parametrize("settings, message", [
    ({}, "needs a budget"),
    ({"max_items": 0}, "max_items must be a positive integer"),
    ({"max_items": -3}, "max_items must be a positive integer"),
    ({"max_items": True}, "max_items must be a positive integer"),
    ({"max_bytes": 1.5}, "max_bytes must be a positive integer"),
    ({"max_items": 5, "tau_s": 0}, "tau_s must be"),
    ({"max_items": 5, "w_novelty": float("nan")}, "w_novelty must be"),
    ({"max_items": 5, "w_use": -1}, "w_use must be"),
])
def test_bad_settings(settings: dict, message: str):
    with pytest.raises(ValueError, match=message):
        open_hotcache(None, **settings)


def test_bad_urls():
    assert isinstance(open_hotcache(None, max_items=1), MemoryHotCache)
    assert isinstance(open_hotcache("memory", max_items=1), MemoryHotCache)
    for url in ("sqlite:///tmp/cache.db", "http://localhost:6379", "redis:/no-slashes", ""):
        with pytest.raises(ValueError, match=r"unsupported hot cache URL .*redis://host:port/db"):
            open_hotcache(url, max_items=1)
    with pytest.raises(ValueError) as info:
        open_hotcache("memcached://user:secret@localhost", max_items=1)
    assert "secret" not in str(info.value)
