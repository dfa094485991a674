"""The hot cache: recent documents and their embeddings under a memory and/or item budget.

It holds what the eviction-and-curiosity agent is working on (text, title, URL, document id, float32 embedding).
Over budget, the lowest-value items go first. Eviction touches only the cache: the document store stays the
source of truth, and a miss (or `HotCacheUnavailable`) means "read the store".

Value, in log space so that the order is fixed until an item is touched (the usual exponential-decay LRU/LFU
hybrid)::

    value = w_novelty * novelty + w_use * log(1 + uses) + last_used / tau_s

``exp(value)`` is proportional to ``exp(w_novelty*novelty) * (1 + uses)**w_use * exp(last_used/tau)``, so comparing
values at any later time `now` compares ``... * exp(-(now - last_used)/tau)``: the classic decayed score, without
rescoring anything as time passes. Defaults, and why:

* ``tau_s = 600``: one unit of value is worth 10 minutes of recency. The agent works in minutes; a document not
  touched for an hour has lost 6 units and goes before anything touched recently.
* ``w_novelty = 1``: novelty is 0..1 (Jensen-Shannon, from the topic model), so the most novel document is kept
  up to 10 minutes longer than a document with nothing new in it.
* ``w_use = 1``: the first hit is worth ~7 minutes (log 2), ten hits ~24 minutes: use protects, with diminishing
  returns, so a burst of hits cannot pin a document for ever.

Ties go to the smaller URL (first out). `put` and `get` set ``last_used`` to the cache's clock; `get` adds a use,
`peek` does not. `put` of a cached URL replaces it and keeps the larger use count.

size_bytes (what the byte budget counts) = UTF-8 bytes of url + title + text, plus ``embedding.nbytes``, plus
`ENTRY_OVERHEAD` (256) for the record, its bookkeeping and index entry. An item larger than the byte budget on
its own is refused (reason ``too_large``; a cached older version of it is dropped too). Eviction reasons:
``items`` (over max_items), ``bytes`` (over max_bytes), ``too_large``, ``deleted`` (explicit `delete`).

Two backends share this contract: `MemoryHotCache` (in-process, the default) and `RedisHotCache` (shared by
several processes; every change is one Lua script, so the cache is never over budget between two calls).
`open_hotcache` picks one from a URL.
"""

from __future__ import annotations

import heapq
import math
import numbers
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import wraps
from typing import Any, Self, TypeVar

import msgpack
import numpy as np
import redis

from store.sql import mask_url

ENTRY_OVERHEAD = 256  # bytes per item besides its strings and embedding
REASONS = ("items", "bytes", "too_large", "deleted")


class HotCacheUnavailable(Exception):
    """The cache's backend (Redis) cannot be reached; treat it as a miss and read the document store."""


@dataclass
class CachedDoc:
    """One cached document. `uses`, `last_used` and `size_bytes` are set by the cache (`uses` on put: at least)."""

    url: str
    document_id: int | None
    title: str
    text: str
    embedding: np.ndarray | None  # float32, 1-D; read-only when returned by the cache
    novelty: float                # 0..1
    uses: int = 0
    last_used: float = 0.0        # unix seconds of the last put or get
    size_bytes: int = 0


@dataclass
class Eviction:
    url: str
    reason: str   # items | bytes | too_large
    value: float  # its value when it went


@dataclass
class CacheStats:
    backend: str
    items: int
    bytes: int
    max_items: int | None
    max_bytes: int | None
    hits: int
    misses: int
    evictions: dict[str, int] = field(default_factory=dict)  # reason -> count


def _budget(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"hot cache {name} must be a positive integer or None, not {value!r}")
    return int(value)


def _checked(doc: CachedDoc) -> tuple[np.ndarray | None, int]:
    """(read-only copy of the embedding, size_bytes) of a valid `doc`; ValueError naming the problem otherwise."""
    if not isinstance(doc.url, str) or not doc.url:
        raise ValueError(f"cached document needs a non-empty URL, not {doc.url!r}")
    where = f"cached document {doc.url}"
    not_str = [name for name in ("title", "text") if not isinstance(getattr(doc, name), str)]
    if not_str:
        raise ValueError(f"{where}: {' and '.join(not_str)} must be str")
    if doc.document_id is not None and (isinstance(doc.document_id, bool)
                                        or not isinstance(doc.document_id, numbers.Integral)):
        raise ValueError(f"{where}: document_id must be an int or None, not {doc.document_id!r}")
    if isinstance(doc.novelty, bool) or not isinstance(doc.novelty, numbers.Real) or not 0 <= doc.novelty <= 1:
        raise ValueError(f"{where}: novelty must be a number in [0, 1], not {doc.novelty!r}")
    if isinstance(doc.uses, bool) or not isinstance(doc.uses, numbers.Integral) or doc.uses < 0:
        raise ValueError(f"{where}: uses must be an int >= 0, not {doc.uses!r}")
    emb = doc.embedding
    if emb is not None:
        if not isinstance(emb, np.ndarray) or emb.dtype != np.float32 or emb.ndim != 1 or emb.size == 0:
            raise ValueError(f"{where}: embedding must be a non-empty 1-D float32 numpy array, not "
                             f"{type(emb).__name__} {getattr(emb, 'dtype', '')} {getattr(emb, 'shape', '')}")
        if not np.isfinite(emb).all():
            raise ValueError(f"{where}: embedding has NaN or infinite values")
        emb = emb.copy()
        emb.setflags(write=False)
    size = (len(doc.url.encode()) + len(doc.title.encode()) + len(doc.text.encode())
            + (0 if emb is None else emb.nbytes) + ENTRY_OVERHEAD)
    return emb, size


class HotCache(ABC):
    """Documents by URL under a budget; see the module docstring for the value function and the reasons."""

    backend = ""

    def __init__(self, *, max_items: int | None = None, max_bytes: int | None = None, w_novelty: float = 1.0,
                 w_use: float = 1.0, tau_s: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self.max_items, self.max_bytes = _budget("max_items", max_items), _budget("max_bytes", max_bytes)
        if self.max_items is None and self.max_bytes is None:
            raise ValueError("hot cache needs a budget: set max_items, max_bytes or both")
        for name, w in (("w_novelty", w_novelty), ("w_use", w_use)):
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"hot cache {name} must be a finite number >= 0, not {w!r}")
        if not (math.isfinite(tau_s) and tau_s > 0):
            raise ValueError(f"hot cache tau_s must be a finite number > 0, not {tau_s!r}")
        self.w_novelty, self.w_use, self.tau_s = float(w_novelty), float(w_use), float(tau_s)
        self.clock = clock

    def value(self, novelty: float, uses: int, last_used: float) -> float:
        """The item's value; the Redis scripts compute the same expression in the same order."""
        return self.w_novelty * novelty + self.w_use * math.log(1 + uses) + last_used / self.tau_s

    @abstractmethod
    def put(self, doc: CachedDoc) -> list[Eviction]:
        """Inserts or replaces `doc`, then evicts the lowest-value items until within budget (possibly `doc`)."""

    @abstractmethod
    def get(self, url: str) -> CachedDoc | None:
        """The cached document (a hit: one more use, recency refreshed), or None (a miss)."""

    @abstractmethod
    def peek(self, url: str) -> CachedDoc | None:
        """The cached document without counting a use or a hit."""

    @abstractmethod
    def delete(self, url: str) -> bool:
        """Drops `url` from the cache (counted as ``deleted``); False if it was not cached."""

    @abstractmethod
    def stats(self) -> CacheStats:
        """Items, bytes, budgets, hits, misses and evictions by reason."""

    @abstractmethod
    def urls(self) -> list[str]:
        """The cached URLs, lowest value (next to go) first."""

    def close(self) -> None:
        """Releases the backend's resources."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryHotCache(HotCache):
    """The cache in this process: a dict plus a min-heap of (value, url, stamp) with lazy deletion; thread-safe."""

    backend = "memory"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[CachedDoc, float, int]] = {}  # url -> (doc, value, stamp)
        self._heap: list[tuple[float, str, int]] = []
        self._stamp = self._bytes = self._hits = self._misses = 0
        self._evictions: dict[str, int] = {}

    def _set(self, doc: CachedDoc) -> None:
        self._stamp += 1
        value = self.value(doc.novelty, doc.uses, doc.last_used)
        self._docs[doc.url] = (doc, value, self._stamp)
        heapq.heappush(self._heap, (value, doc.url, self._stamp))
        if len(self._heap) > 2 * len(self._docs) + 64:
            self._heap = [(v, u, s) for u, (_, v, s) in self._docs.items()]
            heapq.heapify(self._heap)

    def _drop(self, url: str, reason: str) -> None:
        doc = self._docs.pop(url)[0]
        self._bytes -= doc.size_bytes
        self._evictions[reason] = self._evictions.get(reason, 0) + 1

    def put(self, doc: CachedDoc) -> list[Eviction]:
        embedding, size = _checked(doc)
        with self._lock:
            now = self.clock()
            old = self._docs.get(doc.url)
            uses = max(int(doc.uses), old[0].uses if old else 0)
            new = replace(doc, document_id=None if doc.document_id is None else int(doc.document_id),
                          novelty=float(doc.novelty), embedding=embedding, uses=uses, last_used=now, size_bytes=size)
            if old:
                self._bytes -= old[0].size_bytes
                del self._docs[doc.url]
            if self.max_bytes is not None and size > self.max_bytes:
                self._evictions["too_large"] = self._evictions.get("too_large", 0) + 1
                return [Eviction(doc.url, "too_large", self.value(new.novelty, uses, now))]
            self._set(new)
            self._bytes += size
            evicted = []
            while True:
                if self.max_items is not None and len(self._docs) > self.max_items:
                    reason = "items"
                elif self.max_bytes is not None and self._bytes > self.max_bytes:
                    reason = "bytes"
                else:
                    return evicted
                value, url, stamp = heapq.heappop(self._heap)
                if url in self._docs and self._docs[url][2] == stamp:
                    self._drop(url, reason)
                    evicted.append(Eviction(url, reason, value))

    def get(self, url: str) -> CachedDoc | None:
        with self._lock:
            entry = self._docs.get(url)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            doc = replace(entry[0], uses=entry[0].uses + 1, last_used=self.clock())
            self._set(doc)
            return replace(doc)

    def peek(self, url: str) -> CachedDoc | None:
        with self._lock:
            entry = self._docs.get(url)
            return None if entry is None else replace(entry[0])

    def delete(self, url: str) -> bool:
        with self._lock:
            if url not in self._docs:
                return False
            self._drop(url, "deleted")
            return True

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.backend, len(self._docs), self._bytes, self.max_items, self.max_bytes,
                              self._hits, self._misses, dict(self._evictions))

    def urls(self) -> list[str]:
        with self._lock:
            return [u for _, u in sorted((v, u) for u, (_, v, _) in self._docs.items())]


# ---------------------------------------------------------------------------------------------------- Redis

# Keys, under the cache's prefix P (several caches can share one Redis database):
#   P:values     ZSET  url -> value (the eviction order)
#   P:totals     HASH  bytes, hits, misses
#   P:evictions  HASH  reason -> count
#   P:e:URL      HASH  payload (msgpack: document_id, title, text, embedding bytes), uses, last, size, novelty
# Floats travel as repr() strings and values come back as '%.17g' strings, so they round-trip exactly.
# Scripts compute entry keys from P, so this backend is for a single Redis server, not Redis Cluster.

_LUA_PRELUDE = """
local E = ARGV[1]
local VALUES, TOTALS, EVICTIONS = KEYS[1], KEYS[2], KEYS[3]

local function value_of(novelty, uses, last, w_nov, w_use, tau)
    return w_nov * novelty + w_use * math.log(1 + uses) + last / tau
end

local function fmt(x)
    return string.format('%.17g', x)
end

local function remove(url)
    local size = redis.call('HGET', E .. url, 'size')
    if size then
        redis.call('DEL', E .. url)
        redis.call('ZREM', VALUES, url)
        redis.call('HINCRBY', TOTALS, 'bytes', -tonumber(size))
    end
    return size
end
"""

_LUA_PUT = """
-- ARGV: E, url, payload, size, novelty, uses, now, w_nov, w_use, tau, max_items (0: none), max_bytes (0: none)
local url, payload, size = ARGV[2], ARGV[3], tonumber(ARGV[4])
local uses, now = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_items, max_bytes = tonumber(ARGV[11]), tonumber(ARGV[12])
local old = redis.call('HGET', E .. url, 'uses')
if old then uses = math.max(uses, tonumber(old)) end
local value = value_of(tonumber(ARGV[5]), uses, now, tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]))
remove(url)
if max_bytes > 0 and size > max_bytes then
    redis.call('HINCRBY', EVICTIONS, 'too_large', 1)
    return {{url, 'too_large', fmt(value)}}
end
redis.call('HSET', E .. url, 'payload', payload, 'uses', string.format('%d', uses), 'last', ARGV[7],
           'size', ARGV[4], 'novelty', ARGV[5])
redis.call('ZADD', VALUES, fmt(value), url)
redis.call('HINCRBY', TOTALS, 'bytes', size)
local evicted = {}
while true do
    local reason
    if max_items > 0 and redis.call('ZCARD', VALUES) > max_items then
        reason = 'items'
    elseif max_bytes > 0 and tonumber(redis.call('HGET', TOTALS, 'bytes')) > max_bytes then
        reason = 'bytes'
    else
        return evicted
    end
    local low = redis.call('ZRANGE', VALUES, 0, 0, 'WITHSCORES')
    if #low == 0 then return evicted end
    remove(low[1])
    redis.call('HINCRBY', EVICTIONS, reason, 1)
    evicted[#evicted + 1] = {low[1], reason, low[2]}
end
"""

_LUA_GET = """
-- ARGV: E, url, now, w_nov, w_use, tau
local url, key = ARGV[2], E .. ARGV[2]
local f = redis.call('HMGET', key, 'payload', 'uses', 'novelty', 'size')
if not f[1] then
    redis.call('HINCRBY', TOTALS, 'misses', 1)
    return false
end
local uses = tonumber(f[2]) + 1
redis.call('HSET', key, 'uses', string.format('%d', uses), 'last', ARGV[3])
redis.call('ZADD', VALUES, fmt(value_of(tonumber(f[3]), uses, tonumber(ARGV[3]), tonumber(ARGV[4]),
                                        tonumber(ARGV[5]), tonumber(ARGV[6]))), url)
redis.call('HINCRBY', TOTALS, 'hits', 1)
return {f[1], string.format('%d', uses), ARGV[3], f[4], f[3]}
"""

_LUA_DELETE = """
-- ARGV: E, url
if remove(ARGV[2]) then
    redis.call('HINCRBY', EVICTIONS, 'deleted', 1)
    return 1
end
return 0
"""

_F = TypeVar("_F", bound=Callable[..., Any])
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                redis.exceptions.ReadOnlyError)


def _redis_errors(method: _F) -> _F:
    """Turns connection errors (and a full or read-only server) into HotCacheUnavailable naming the server."""

    @wraps(method)
    def wrapper(self: RedisHotCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _UNAVAILABLE as exc:
            raise HotCacheUnavailable(f"Redis hot cache at {mask_url(self.url)} is unreachable: {exc}; "
                                      "treat it as a miss and read the document store") from exc

    return wrapper  # type: ignore[return-value]


class RedisHotCache(HotCache):
    """The cache in Redis under keys ``{prefix}:…``, shareable by processes on several hosts. Each put enforces
    the putting client's budget and weights: give every client of one prefix the same settings."""

    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "hotcache", timeout_s: float = 2.0, **settings: Any) -> None:
        super().__init__(**settings)
        if not prefix:
            raise ValueError("Redis hot cache prefix must not be empty")
        self.url, self.prefix = url, prefix
        self._r = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._keys = [f"{prefix}:values", f"{prefix}:totals", f"{prefix}:evictions"]
        self._e = f"{prefix}:e:"
        self._put, self._get, self._delete = (self._r.register_script(_LUA_PRELUDE + body)
                                              for body in (_LUA_PUT, _LUA_GET, _LUA_DELETE))
        try:
            self._r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._r.close()
            raise HotCacheUnavailable(f"cannot reach Redis hot cache at {mask_url(url)}: {exc}") from exc

    def _weights(self) -> list[str]:
        return [repr(self.w_novelty), repr(self.w_use), repr(self.tau_s)]

    @staticmethod
    def _doc(url: str, payload: bytes, uses: bytes, last: bytes, size: bytes, novelty: bytes) -> CachedDoc:
        p = msgpack.unpackb(payload)
        emb = None if p["e"] is None else np.frombuffer(p["e"], dtype=np.float32)
        return CachedDoc(url=url, document_id=p["i"], title=p["t"], text=p["x"], embedding=emb,
                         novelty=float(novelty), uses=int(uses), last_used=float(last), size_bytes=int(size))

    @_redis_errors
    def put(self, doc: CachedDoc) -> list[Eviction]:
        embedding, size = _checked(doc)
        payload = msgpack.packb({"i": None if doc.document_id is None else int(doc.document_id), "t": doc.title,
                                 "x": doc.text, "e": None if embedding is None else embedding.tobytes()})
        rows = self._put(keys=self._keys, args=[
            self._e, doc.url, payload, size, repr(float(doc.novelty)), int(doc.uses), repr(float(self.clock())),
            *self._weights(), self.max_items or 0, self.max_bytes or 0])
        return [Eviction(url.decode(), reason.decode(), float(value)) for url, reason, value in rows]

    @_redis_errors
    def get(self, url: str) -> CachedDoc | None:
        row = self._get(keys=self._keys, args=[self._e, url, repr(float(self.clock())), *self._weights()])
        return None if row is None else self._doc(url, *row)

    @_redis_errors
    def peek(self, url: str) -> CachedDoc | None:
        row = self._r.hmget(self._e + url, "payload", "uses", "last", "size", "novelty")
        return None if row[0] is None else self._doc(url, *row)

    @_redis_errors
    def delete(self, url: str) -> bool:
        return self._delete(keys=self._keys, args=[self._e, url]) == 1

    @_redis_errors
    def stats(self) -> CacheStats:
        pipe = self._r.pipeline(transaction=True)  # one consistent snapshot
        pipe.zcard(self._keys[0]).hgetall(self._keys[1]).hgetall(self._keys[2])
        items, totals, evictions = pipe.execute()
        return CacheStats(self.backend, items, int(totals.get(b"bytes", 0)), self.max_items, self.max_bytes,
                          int(totals.get(b"hits", 0)), int(totals.get(b"misses", 0)),
                          {k.decode(): int(v) for k, v in evictions.items()})

    @_redis_errors
    def urls(self) -> list[str]:
        return [u.decode() for u in self._r.zrange(self._keys[0], 0, -1)]

    def close(self) -> None:
        self._r.close()


def open_hotcache(url: str | None = None, *, max_items: int | None = None, max_bytes: int | None = None,
                  w_novelty: float = 1.0, w_use: float = 1.0, tau_s: float = 600.0, prefix: str = "hotcache",
                  clock: Callable[[], float] = time.time) -> HotCache:
    """The hot cache at `url`: None or ``memory`` (in-process), or ``redis://host:port/db``, ``rediss://…``,
    ``unix://PATH`` (keys under ``{prefix}:``). At least one of max_items and max_bytes must be set."""
    settings: dict[str, Any] = {"max_items": max_items, "max_bytes": max_bytes, "w_novelty": w_novelty,
                                "w_use": w_use, "tau_s": tau_s, "clock": clock}
    if url is None or url in ("memory", "memory://"):
        return MemoryHotCache(**settings)
    if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHotCache(url, prefix=prefix, **settings)
    raise ValueError(f"unsupported hot cache URL {mask_url(str(url))!r}: use memory (or none) for an in-process "
                     "cache, or redis://host:port/db, rediss://… or unix://PATH")
