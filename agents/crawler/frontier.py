"""The crawl frontier: which URLs have been seen, which wait to be fetched, and where each one is.

Every URL ever added is *seen* forever and is never queued again. A queued entry moves through

    queued -> leased -> fetched -> done          (fetched: waiting for the next stage to acknowledge)
              leased -> done | failed            (finished straight from the fetcher)
              leased -> queued                   (retry with backoff, release on drain, recover after a crash)

`pop` hands out due entries (``not_before <= now``) by priority, highest first, ties in insertion order.
Two backends share this contract: SQLite (``sqlite:///PATH``, the default, one file) and Redis
(``redis://host:port/db``, for a frontier shared across hosts). `open_frontier` picks one from a URL.

Several coordinators on one Redis frontier (``shared``). Each opens it with its own `owner` (its agent name).
A lease, and the fetched page after it, carries the owner: only the owner changes it (another's attempt raises
`LeaseLost`), `release` gives back only the caller's own leases, and `recover` at start-up takes back the caller's
own leases and those of coordinators that are not alive. Alive means a key the coordinator renews
(`keepalive`) within its TTL; `reclaim`, called now and then by every live coordinator, takes back the leases of
one that stopped renewing it (killed, host gone, cut off from Redis for longer than the TTL). Fetched pages are not
taken back: their bodies are in the owner's raw store, on its host, and it delivers them when it starts again
(pool replica names are stable). Beside the URLs, the shared frontier holds what the coordinators must agree on
per site: the next allowed fetch and the fetches under way (`take_slot`/`free_slot`, on the Redis server's clock,
so hosts' clocks need not agree), and the site's robots.txt (`robots_cached`/`robots_claim`/`robots_store`), fetched
by one coordinator for all. SQLite is one coordinator's: those calls leave everything to it.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Self, TypeVar

import redis

from store.sql import connect_sqlite, mask_url

STATES = ("queued", "leased", "fetched", "done", "failed")
_FIELDS = ("url", "state", "depth", "priority", "attempts", "redirects", "parent", "anchor", "status", "error",
           "fetch_id", "not_before")


@dataclass
class Entry:
    """One URL of the frontier, as handed to `Frontier.add` and returned by `pop` and `fetched`."""

    url: str                      # already normalised by the caller
    depth: int = 0
    priority: float = 0.0         # higher is fetched first; ties in insertion order (FIFO)
    parent: str | None = None     # the page that linked here
    anchor: str | None = None     # link text on the parent
    attempts: int = 0             # fetch attempts so far
    redirects: int = 0            # redirect hops that led to this URL
    not_before: float = 0.0       # unix time; never popped earlier (retry backoff)
    fetch_id: str | None = None   # set once fetched (state 'fetched')


class FrontierError(Exception):
    """An invalid state transition, an unknown URL, or a frontier that cannot be used."""


class FrontierUnavailable(FrontierError):
    """The frontier's backend cannot be reached (Redis down, SQLite file not openable)."""


class LeaseLost(FrontierError):
    """The entry is no longer the caller's lease: its lease expired and another coordinator took the URL over."""


def _check_entry(entry: Entry) -> None:
    if not isinstance(entry.url, str) or not entry.url:
        raise ValueError(f"frontier entry needs a non-empty URL string, got {entry.url!r}")
    _check_priority(entry.priority)
    if not math.isfinite(entry.not_before):
        raise ValueError(f"not_before must be a finite unix time, got {entry.not_before!r} for {entry.url}")


def _check_priority(priority: float) -> None:
    if not math.isfinite(priority):
        raise ValueError(f"priority must be a finite number, got {priority!r}")


def _dedupe(entries: Iterable[Entry]) -> dict[str, Entry]:
    """Entries by URL, the first occurrence of each URL winning, in input order."""
    out: dict[str, Entry] = {}
    for entry in entries:
        _check_entry(entry)
        out.setdefault(entry.url, entry)
    return out


def _transition_error(op: str, url: str, state: str | None, allowed: str) -> FrontierError:
    if not state:
        return FrontierError(f"cannot {op} {url!r}: unknown URL (never added to the frontier)")
    return FrontierError(f"cannot {op} {url!r}: it is {state}, {op} needs {allowed}")


class Frontier(ABC):
    """The frontier contract; see the module docstring for the states. Not shared between threads."""

    shared = False    # several coordinators may use it at once (Redis); see the module docstring
    owner = ""        # the coordinator this connection leases for ("" : the only one)

    @abstractmethod
    def add(self, entries: Iterable[Entry]) -> list[str]:
        """Queues the entries whose URL was never seen; returns the URLs added, in input order."""

    @abstractmethod
    def seen(self, url: str) -> bool:
        """Whether `url` was ever added (in any state)."""

    @abstractmethod
    def pop(self, limit: int, *, now: float | None = None) -> list[Entry]:
        """Leases up to `limit` due queued entries (``not_before <= now``), highest priority first, then FIFO."""

    @abstractmethod
    def retry(self, url: str, *, not_before: float, error: str) -> None:
        """leased -> queued, not before `not_before`; counts one more attempt and keeps `error` as the last one."""

    @abstractmethod
    def mark_fetched(self, url: str, fetch_id: str) -> None:
        """leased -> fetched: the body is stored as `fetch_id` and waits for the next stage's acknowledgement."""

    @abstractmethod
    def finish(self, url: str, *, ok: bool, status: int | None = None, error: str | None = None) -> None:
        """leased|fetched -> done (`ok`) or failed, recording `status` and `error` when given.

        A successful finish clears the last retry error (unless `error` is given); a failed one keeps it unless
        `error` is given. Finishing a URL that is already done or failed does nothing (acks can be redelivered).
        """

    @abstractmethod
    def release(self, urls: Iterable[str]) -> None:
        """leased -> queued, unchanged (a draining fetcher gives back what it did not start). All or nothing; a
        named owner on a shared frontier skips what is no longer its lease (another coordinator took it over)."""

    @abstractmethod
    def recover(self) -> int:
        """At start-up: every leased entry goes back to queued (a named owner on a shared frontier: its own and
        those of coordinators not alive); returns how many. Fetched entries stay fetched."""

    @abstractmethod
    def fetched(self, limit: int | None = None) -> list[Entry]:
        """Entries in state fetched (with their fetch_id), oldest first, to redeliver to the next stage."""

    @abstractmethod
    def set_priority(self, url: str, priority: float) -> bool:
        """Changes the priority of a queued entry; False when `url` is unknown or not queued."""

    def set_priorities(self, priorities: Mapping[str, float]) -> set[str]:
        """`set_priority` for many URLs (one round trip where the backend allows it); returns the URLs changed."""
        return {url for url, priority in priorities.items() if self.set_priority(url, priority)}

    @abstractmethod
    def get(self, url: str) -> dict | None:
        """Everything known about `url` (keys: url, state, depth, priority, attempts, redirects, parent, anchor,
        status, error, fetch_id, not_before), or None if it was never added."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counts per state (queued, leased, fetched, done, failed: all present) and "seen" (all URLs ever added)."""

    @abstractmethod
    def next_due(self) -> float | None:
        """The earliest not_before among queued entries (None when nothing is queued), to sleep until then."""

    @abstractmethod
    def close(self) -> None:
        """Releases the connection; the data stays."""

    # --- coordination between coordinators (shared frontiers; one coordinator needs none) ----------------------

    def keepalive(self, ttl_s: float) -> None:
        """Says the owner is alive for `ttl_s` more seconds; its leases are safe from `reclaim` while it is."""

    def reclaim(self) -> int:
        """Requeues the leases of other coordinators that are not alive; returns how many."""
        return 0

    def take_slot(self, host: str, token: str, *, delay_s: float, cap: int, hold_s: float) -> float:
        """Asks to start a fetch from `host` now: 0.0 when it may (the site's next fetch is then `delay_s` away
        for every coordinator, and `token` counts against `cap` fetches under way there until `free_slot` or
        `hold_s`), else the seconds to wait before asking again."""
        return 0.0

    def free_slot(self, host: str, token: str) -> None:
        """The fetch `token` took a slot for at `host` is over."""

    def robots_cached(self, origin: str) -> dict[str, str] | None:
        """The robots.txt verdict another coordinator stored for `origin` (``robots_store``), or None."""
        return None

    def robots_claim(self, origin: str, hold_s: float) -> bool:
        """Whether the caller is to fetch `origin`'s robots.txt (nobody else is, or the caller already was), for
        `hold_s` seconds at most; asked again by its holder, it extends the claim."""
        return True

    def robots_store(self, origin: str, verdict: Mapping[str, str], ttl_s: float) -> None:
        """Keeps the verdict on `origin`'s robots.txt for the other coordinators, for `ttl_s`; ends the claim."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- SQLite

class SQLiteFrontier(Frontier):
    """A frontier in one SQLite table (WAL mode); every write is one transaction. For a single thread."""

    def __init__(self, path: str | Path, *, table: str = "frontier"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"SQLite frontier table name must be an identifier, got {table!r}")
        self.path = str(path)
        self._t = table
        try:
            self._db = connect_sqlite(self.path)
            with self._tx() as db:
                db.execute(f"""CREATE TABLE IF NOT EXISTS {table} (
                    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
                    url        TEXT NOT NULL UNIQUE,
                    state      TEXT NOT NULL,
                    depth      INTEGER NOT NULL,
                    priority   REAL NOT NULL,
                    parent     TEXT,
                    anchor     TEXT,
                    attempts   INTEGER NOT NULL,
                    redirects  INTEGER NOT NULL,
                    not_before REAL NOT NULL,
                    fetch_id   TEXT,
                    status     INTEGER,
                    error      TEXT,
                    updated_at REAL NOT NULL)""")
                db.execute(f"CREATE INDEX IF NOT EXISTS {table}_pop ON {table} (state, priority DESC, seq)")
                db.execute(f"CREATE INDEX IF NOT EXISTS {table}_due ON {table} (state, not_before)")
        except (sqlite3.Error, OSError) as exc:
            raise FrontierUnavailable(f"cannot open SQLite frontier {self.path}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so read-then-write steps cannot interleave."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _state(self, url: str) -> str | None:
        row = self._db.execute(f"SELECT state FROM {self._t} WHERE url = ?", (url,)).fetchone()
        return row[0] if row else None

    def add(self, entries: Iterable[Entry]) -> list[str]:
        batch = _dedupe(entries)
        if not batch:
            return []
        now = time.time()
        urls = list(batch)
        with self._tx() as db:
            known: set[str] = set()
            for i in range(0, len(urls), 500):
                chunk = urls[i:i + 500]
                marks = ",".join("?" * len(chunk))
                known.update(r[0] for r in db.execute(f"SELECT url FROM {self._t} WHERE url IN ({marks})", chunk))
            new = [e for u, e in batch.items() if u not in known]
            db.executemany(
                f"""INSERT OR IGNORE INTO {self._t}
                    (url, state, depth, priority, parent, anchor, attempts, redirects, not_before, updated_at)
                    VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)""",
                [(e.url, int(e.depth), float(e.priority), e.parent, e.anchor, int(e.attempts), int(e.redirects),
                  float(e.not_before), now) for e in new])
        return [e.url for e in new]

    def seen(self, url: str) -> bool:
        return self._db.execute(f"SELECT 1 FROM {self._t} WHERE url = ?", (url,)).fetchone() is not None

    _ENTRY_COLS = "url, depth, priority, parent, anchor, attempts, redirects, not_before, fetch_id"

    def pop(self, limit: int, *, now: float | None = None) -> list[Entry]:
        if limit <= 0:
            return []
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                # walk the pop-order index; left alone, the planner may pick the not_before index and sort
                # every due entry for each pop
                f"""SELECT seq, {self._ENTRY_COLS} FROM {self._t} INDEXED BY {self._t}_pop
                    WHERE state = 'queued' AND not_before <= ? ORDER BY priority DESC, seq LIMIT ?""",
                (now, limit)).fetchall()
            db.executemany(f"UPDATE {self._t} SET state = 'leased', updated_at = ? WHERE seq = ?",
                           [(now, r[0]) for r in rows])
        return [Entry(*r[1:]) for r in rows]

    def _update(self, op: str, url: str, allowed: str, sql: str, params: tuple) -> None:
        """Runs a guarded UPDATE (…WHERE url = ? AND state = allowed); explains why when it matched nothing."""
        with self._tx() as db:
            if db.execute(sql, params).rowcount != 1:
                raise _transition_error(op, url, self._state(url), allowed)

    def retry(self, url: str, *, not_before: float, error: str) -> None:
        self._update("retry", url, "leased",
                     f"""UPDATE {self._t} SET state = 'queued', attempts = attempts + 1, not_before = ?, error = ?,
                         updated_at = ? WHERE url = ? AND state = 'leased'""",
                     (float(not_before), error, time.time(), url))

    def mark_fetched(self, url: str, fetch_id: str) -> None:
        self._update("mark_fetched", url, "leased",
                     f"""UPDATE {self._t} SET state = 'fetched', fetch_id = ?, updated_at = ?
                         WHERE url = ? AND state = 'leased'""",
                     (fetch_id, time.time(), url))

    def finish(self, url: str, *, ok: bool, status: int | None = None, error: str | None = None) -> None:
        with self._tx() as db:
            state = self._state(url)
            if state in ("done", "failed"):
                return
            if state not in ("leased", "fetched"):
                raise _transition_error("finish", url, state, "leased or fetched")
            error_sql = "?" if ok else "COALESCE(?, error)"
            db.execute(f"""UPDATE {self._t} SET state = ?, status = COALESCE(?, status), error = {error_sql},
                           updated_at = ? WHERE url = ?""",
                       ("done" if ok else "failed", status, error, time.time(), url))

    def release(self, urls: Iterable[str]) -> None:
        todo = list(dict.fromkeys(urls))
        if not todo:
            return
        with self._tx() as db:
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                marks = ",".join("?" * len(chunk))
                states = dict(db.execute(f"SELECT url, state FROM {self._t} WHERE url IN ({marks})", chunk))
                for url in chunk:
                    if states.get(url) != "leased":
                        raise _transition_error("release", url, states.get(url), "leased")
                db.execute(f"UPDATE {self._t} SET state = 'queued', updated_at = ? WHERE url IN ({marks})",
                           (time.time(), *chunk))

    def recover(self) -> int:
        with self._tx() as db:
            return db.execute(f"UPDATE {self._t} SET state = 'queued', updated_at = ? WHERE state = 'leased'",
                              (time.time(),)).rowcount

    def fetched(self, limit: int | None = None) -> list[Entry]:
        rows = self._db.execute(f"SELECT {self._ENTRY_COLS} FROM {self._t} WHERE state = 'fetched' ORDER BY seq "
                                "LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        return [Entry(*r) for r in rows]

    def set_priority(self, url: str, priority: float) -> bool:
        _check_priority(priority)
        with self._tx() as db:
            return db.execute(f"UPDATE {self._t} SET priority = ?, updated_at = ? WHERE url = ? AND state = 'queued'",
                              (float(priority), time.time(), url)).rowcount == 1

    def get(self, url: str) -> dict | None:
        row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM {self._t} WHERE url = ?", (url,)).fetchone()
        return dict(zip(_FIELDS, row)) if row else None

    def stats(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        out.update(self._db.execute(f"SELECT state, COUNT(*) FROM {self._t} GROUP BY state"))
        out["seen"] = sum(out[s] for s in STATES)
        return out

    def next_due(self) -> float | None:
        return self._db.execute(f"SELECT MIN(not_before) FROM {self._t} WHERE state = 'queued'").fetchone()[0]

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------------------------------- Redis

# Keys, under the frontier's prefix P (several frontiers can share one Redis database):
#   P:seen     SET   every URL ever added
#   P:seq      INT   insertion counter (FIFO order among equal priorities)
#   P:queue    ZSET  due queued entries, score -priority, member "%016d" % seq + url (so ties sort FIFO)
#   P:qnb      ZSET  the same members as P:queue, scored by not_before (for next_due and clock checks)
#   P:delayed  ZSET  queued entries not yet moved to P:queue, scored by not_before
#   P:leased   SET   leased URLs (recover)
#   P:fetched  ZSET  fetched URLs, scored by seq
#   P:counts   HASH  entries per state
#   P:e:URL    HASH  the entry: url depth priority score parent anchor attempts redirects not_before fetch_id
#                    status error state seq member owner (the coordinator holding its lease or fetched page)
#   P:alive:OWNER       STRING  present while the coordinator OWNER is alive (keepalive, with a TTL)
#   P:site:HOST         STRING  the site's next allowed fetch (unix time, the Redis server's clock)
#   P:site-active:HOST  ZSET    fetches under way at the site, by token, scored by when their hold ends
#   P:robots:ORIGIN     HASH    the site's robots.txt verdict (state ready|unreachable, status, body, error), TTL
#   P:robots-lock:ORIGIN STRING the coordinator fetching it (a claim with a TTL)
# Floats travel as Python repr() strings and are stored as given (Lua's tostring would round them).
# Scripts compute entry keys from P, so this backend is for a single Redis server, not Redis Cluster.

_LUA_PRELUDE = """
local E, OWNER = ARGV[1], ARGV[2]
local ALIVE = string.sub(E, 1, -3) .. 'alive:'   -- E is P:e:, so P:alive:
local SEEN, SEQ, QUEUE, QNB, DELAYED, LEASED, FETCHED, COUNTS =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function member_url(member)
    return string.sub(member, 17)
end

local function count(from, to, n)
    if n > 0 then
        redis.call('HINCRBY', COUNTS, from, -n)
        redis.call('HINCRBY', COUNTS, to, n)
    end
end

-- whether the entry at `key` is another coordinator's (its lease or its fetched page); never for an unnamed caller
local function foreign(key)
    local o = redis.call('HGET', key, 'owner')
    return OWNER ~= '' and o and o ~= '' and o ~= OWNER
end

-- whether a named caller may change the leased-or-fetched entry at `key` in state `state`: it must be its own
local function lost(key, state)
    return OWNER ~= '' and ((state ~= 'leased' and state ~= 'fetched') or foreign(key))
end

-- puts an entry (its hash already present) back in line: due at once, or waiting for its not_before
local function requeue(url)
    local key = E .. url
    local f = redis.call('HMGET', key, 'member', 'score', 'not_before')
    redis.call('HSET', key, 'state', 'queued')
    redis.call('HDEL', key, 'owner')
    if tonumber(f[3]) > 0 then
        redis.call('ZADD', DELAYED, f[3], f[1])
    else
        redis.call('ZADD', QUEUE, f[2], f[1])
        redis.call('ZADD', QNB, f[3], f[1])
    end
end
"""

_LUA_ADD = """
-- ARGV: E, OWNER, then per entry: url, score, not_before, n, n field/value pairs
local added = {}
local i = 3
while i <= #ARGV do
    local url, score, nb, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    if redis.call('SADD', SEEN, url) == 1 then
        local seq = redis.call('INCR', SEQ)
        local member = string.format('%016d', seq) .. url
        local fields = {'state', 'queued', 'member', member, 'seq', seq, 'score', score, 'not_before', nb}
        for j = i + 4, i + 3 + 2 * n do
            fields[#fields + 1] = ARGV[j]
        end
        redis.call('HSET', E .. url, unpack(fields))
        requeue(url)
        added[#added + 1] = url
    end
    i = i + 4 + 2 * n
end
if #added > 0 then
    redis.call('HINCRBY', COUNTS, 'queued', #added)
end
return added
"""

_LUA_POP = """
-- ARGV: E, OWNER, limit, now
local limit, now = tonumber(ARGV[3]), ARGV[4]
-- entries moved to the queue by a pop with a later clock than this one wait again
local early = redis.call('ZRANGEBYSCORE', QNB, '(' .. now, '+inf', 'WITHSCORES')
for k = 1, #early, 2 do
    redis.call('ZREM', QUEUE, early[k])
    redis.call('ZREM', QNB, early[k])
    redis.call('ZADD', DELAYED, early[k + 1], early[k])
end
-- entries whose not_before has come join the queue
local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'WITHSCORES')
for k = 1, #due, 2 do
    local m = due[k]
    redis.call('ZADD', QUEUE, redis.call('HGET', E .. member_url(m), 'score'), m)
    redis.call('ZADD', QNB, due[k + 1], m)
end
if #due > 0 then
    redis.call('ZREMRANGEBYSCORE', DELAYED, '-inf', now)
end
local out = {}
if limit > 0 then
    local top = redis.call('ZPOPMIN', QUEUE, limit)
    for k = 1, #top, 2 do
        local url = member_url(top[k])
        redis.call('ZREM', QNB, top[k])
        redis.call('HSET', E .. url, 'state', 'leased', 'owner', OWNER)
        redis.call('SADD', LEASED, url)
        out[#out + 1] = redis.call('HGETALL', E .. url)
    end
    count('queued', 'leased', #out)
end
return out
"""

_LUA_RETRY = """
-- ARGV: E, OWNER, url, not_before, error
local url = ARGV[3]
local key = E .. url
local state = redis.call('HGET', key, 'state')
if state and lost(key, state) then
    return 'LOST:' .. state
elseif state ~= 'leased' then
    return state or ''
end
redis.call('SREM', LEASED, url)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'not_before', ARGV[4], 'error', ARGV[5])
requeue(url)
count('leased', 'queued', 1)
return 'OK'
"""

_LUA_MARK_FETCHED = """
-- ARGV: E, OWNER, url, fetch_id
local url = ARGV[3]
local key = E .. url
local state = redis.call('HGET', key, 'state')
if state and lost(key, state) then
    return 'LOST:' .. state
elseif state ~= 'leased' then
    return state or ''
end
redis.call('SREM', LEASED, url)
redis.call('HSET', key, 'state', 'fetched', 'fetch_id', ARGV[4])
redis.call('ZADD', FETCHED, redis.call('HGET', key, 'seq'), url)
count('leased', 'fetched', 1)
return 'OK'
"""

_LUA_FINISH = """
-- ARGV: E, OWNER, url, ok ('1'/'0'), status ('' = not given), has_error ('1'/'0'), error
local url, ok = ARGV[3], ARGV[4] == '1'
local key = E .. url
local state = redis.call('HGET', key, 'state')
if state == 'done' or state == 'failed' then
    return 'NOOP'
elseif state and lost(key, state) then
    return 'LOST:' .. state
elseif state == 'leased' then
    redis.call('SREM', LEASED, url)
elseif state == 'fetched' then
    redis.call('ZREM', FETCHED, url)
else
    return state or ''
end
local new = ok and 'done' or 'failed'
redis.call('HSET', key, 'state', new)
if ARGV[5] ~= '' then
    redis.call('HSET', key, 'status', ARGV[5])
end
if ARGV[6] == '1' then
    redis.call('HSET', key, 'error', ARGV[7])
elseif ok then
    redis.call('HDEL', key, 'error')
end
count(state, new, 1)
return 'OK'
"""

_LUA_RELEASE = """
-- ARGV: E, OWNER, url...  (all must be leased, or nothing changes; a named caller skips what is not its lease:
-- another coordinator took it over once the caller's lease expired)
local mine = {}
for i = 3, #ARGV do
    local key = E .. ARGV[i]
    local state = redis.call('HGET', key, 'state')
    if state == 'leased' and not foreign(key) then
        mine[#mine + 1] = ARGV[i]
    elseif OWNER == '' or not state then
        return {ARGV[i], state or ''}
    end
end
for _, url in ipairs(mine) do
    redis.call('SREM', LEASED, url)
    requeue(url)
end
count('leased', 'queued', #mine)
return 'OK'
"""

_LUA_RECOVER = """
-- ARGV: E, OWNER, mode: 'start' (the caller's own leases, unowned ones and those of coordinators not alive) or
-- 'dead' (only those of other coordinators not alive). An unnamed caller takes back every lease.
local start = ARGV[3] == 'start'
local n = 0
for _, url in ipairs(redis.call('SMEMBERS', LEASED)) do
    local o = redis.call('HGET', E .. url, 'owner')
    local take
    if OWNER == '' then
        take = true
    elseif not o or o == '' or o == OWNER then
        take = start
    else
        take = redis.call('EXISTS', ALIVE .. o) == 0
    end
    if take then
        redis.call('SREM', LEASED, url)
        requeue(url)
        n = n + 1
    end
end
count('leased', 'queued', n)
return n
"""

_LUA_SET_PRIORITY = """
-- ARGV: E, OWNER, url, priority, score
local key = E .. ARGV[3]
if redis.call('HGET', key, 'state') ~= 'queued' then
    return 0
end
redis.call('HSET', key, 'priority', ARGV[4], 'score', ARGV[5])
local member = redis.call('HGET', key, 'member')
if redis.call('ZSCORE', QUEUE, member) then
    redis.call('ZADD', QUEUE, ARGV[5], member)
end
return 1
"""

_LUA_TAKE_SLOT = """
-- KEYS: P:site:HOST, P:site-active:HOST; ARGV: token, delay_s, cap, hold_s. Returns '0' (go) or the seconds to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local delay, cap, hold = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < nxt then
    return string.format('%.6f', nxt - now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if cap > 0 and redis.call('ZCARD', KEYS[2]) >= cap then
    -- full: a fetch ending frees a place at any time, so look again soon (or when the oldest hold ends)
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return string.format('%.6f', math.max(0.001, math.min(tonumber(first[2]) - now, 0.05)))
end
local ttl = math.ceil((delay + hold) * 1000) + 60000
redis.call('SET', KEYS[1], string.format('%.6f', now + delay), 'PX', ttl)
if cap > 0 then
    redis.call('ZADD', KEYS[2], now + hold, ARGV[1])
    redis.call('PEXPIRE', KEYS[2], ttl)
end
return '0'
"""

_LUA_CLAIM = """
-- KEYS: the claim; ARGV: owner, ms. Taken when free, extended when the caller holds it already.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

_F = TypeVar("_F", bound=Callable[..., Any])


def _redis_errors(method: _F) -> _F:
    """Turns the Redis client's connection errors into FrontierUnavailable naming the server."""

    @wraps(method)
    def wrapper(self: RedisFrontier, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise FrontierUnavailable(f"Redis frontier at {mask_url(self.url)} is unreachable: {exc}") from exc

    return wrapper  # type: ignore[return-value]


def _score(priority: float) -> str:
    return repr(-float(priority) + 0.0)  # + 0.0 turns -0.0 into 0.0


class RedisFrontier(Frontier):
    """A frontier in Redis under keys ``{prefix}:…``; every multi-step change is one Lua script (atomic)."""

    ADD_CHUNK = 1000  # entries per add script call (each call is atomic)
    shared = True

    def __init__(self, url: str, *, prefix: str = "frontier", owner: str = ""):
        if not prefix:
            raise ValueError("Redis frontier prefix must not be empty")
        self.url = url
        self.prefix = prefix
        self.owner = owner
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=10.0)
        self._keys = [f"{prefix}:{k}" for k in ("seen", "seq", "queue", "qnb", "delayed", "leased", "fetched",
                                                "counts")]
        self._e = f"{prefix}:e:"

        def script(body: str) -> Any:
            return self._r.register_script(_LUA_PRELUDE + body)

        self._add, self._pop, self._retry = script(_LUA_ADD), script(_LUA_POP), script(_LUA_RETRY)
        self._mark_fetched, self._finish = script(_LUA_MARK_FETCHED), script(_LUA_FINISH)
        self._release, self._recover = script(_LUA_RELEASE), script(_LUA_RECOVER)
        self._set_priority = script(_LUA_SET_PRIORITY)
        self._take_slot, self._claim = self._r.register_script(_LUA_TAKE_SLOT), self._r.register_script(_LUA_CLAIM)
        try:
            self._r.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._r.close()
            raise FrontierUnavailable(f"cannot reach Redis frontier at {mask_url(url)}: {exc}") from exc

    def _run(self, script: Any, *args: Any) -> Any:
        return script(keys=self._keys, args=[self._e, self.owner, *args])

    @staticmethod
    def _entry(h: dict[str, str]) -> Entry:
        return Entry(url=h["url"], depth=int(h["depth"]), priority=float(h["priority"]), parent=h.get("parent"),
                     anchor=h.get("anchor"), attempts=int(h["attempts"]), redirects=int(h["redirects"]),
                     not_before=float(h["not_before"]), fetch_id=h.get("fetch_id"))

    def _check(self, op: str, url: str, reply: str, allowed: str) -> None:
        if reply.startswith("LOST:"):
            raise LeaseLost(f"cannot {op} {url!r}: it is {reply[5:]} and not leased by {self.owner!r} any more (its "
                            "lease expired and another coordinator took it over)")
        if reply not in ("OK", "NOOP"):
            raise _transition_error(op, url, reply, allowed)

    @_redis_errors
    def add(self, entries: Iterable[Entry]) -> list[str]:
        batch = list(_dedupe(entries).values())
        added: list[str] = []
        for i in range(0, len(batch), self.ADD_CHUNK):
            args: list[Any] = []
            for e in batch[i:i + self.ADD_CHUNK]:
                fields = ["url", e.url, "depth", int(e.depth), "priority", repr(float(e.priority)),
                          "attempts", int(e.attempts), "redirects", int(e.redirects)]
                if e.parent is not None:
                    fields += ["parent", e.parent]
                if e.anchor is not None:
                    fields += ["anchor", e.anchor]
                args += [e.url, _score(e.priority), repr(float(e.not_before)), len(fields) // 2, *fields]
            added += self._run(self._add, *args)
        return added

    @_redis_errors
    def seen(self, url: str) -> bool:
        return bool(self._r.sismember(self._keys[0], url))

    @_redis_errors
    def pop(self, limit: int, *, now: float | None = None) -> list[Entry]:
        now = time.time() if now is None else now
        rows = self._run(self._pop, max(0, int(limit)), repr(float(now)))
        return [self._entry(dict(zip(row[::2], row[1::2]))) for row in rows]

    @_redis_errors
    def retry(self, url: str, *, not_before: float, error: str) -> None:
        self._check("retry", url, self._run(self._retry, url, repr(float(not_before)), error), "leased")

    @_redis_errors
    def mark_fetched(self, url: str, fetch_id: str) -> None:
        self._check("mark_fetched", url, self._run(self._mark_fetched, url, fetch_id), "leased")

    @_redis_errors
    def finish(self, url: str, *, ok: bool, status: int | None = None, error: str | None = None) -> None:
        reply = self._run(self._finish, url, "1" if ok else "0", "" if status is None else int(status),
                          "0" if error is None else "1", error or "")
        self._check("finish", url, reply, "leased or fetched")

    @_redis_errors
    def release(self, urls: Iterable[str]) -> None:
        todo = list(dict.fromkeys(urls))
        if todo:
            reply = self._run(self._release, *todo)
            if reply != "OK":
                raise _transition_error("release", reply[0], reply[1], "leased")

    @_redis_errors
    def recover(self) -> int:
        return int(self._run(self._recover, "start"))

    @_redis_errors
    def reclaim(self) -> int:
        return int(self._run(self._recover, "dead"))

    @_redis_errors
    def keepalive(self, ttl_s: float) -> None:
        if self.owner:
            self._r.set(f"{self.prefix}:alive:{self.owner}", str(time.time()), px=max(1, int(ttl_s * 1000)))

    @_redis_errors
    def fetched(self, limit: int | None = None) -> list[Entry]:
        """A named owner gets its own fetched pages (and unowned ones): only its raw store holds their bodies."""
        if limit == 0:
            return []
        urls = self._r.zrange(self._keys[6], 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for url in urls:
            pipe.hgetall(self._e + url)
        mine = [self._entry(h) for h in pipe.execute()
                if h and (not self.owner or h.get("owner", "") in ("", self.owner))]
        return mine if limit is None else mine[:limit]

    @_redis_errors
    def set_priority(self, url: str, priority: float) -> bool:
        _check_priority(priority)
        return self._run(self._set_priority, url, repr(float(priority)), _score(priority)) == 1

    @_redis_errors
    def set_priorities(self, priorities: Mapping[str, float]) -> set[str]:
        # one pipelined round trip per chunk: a round trip per URL held the coordinator's loop for seconds when the
        # curiosity agent re-prioritised hundreds of queued URLs at once
        for priority in priorities.values():
            _check_priority(priority)
        urls = list(priorities)
        changed: set[str] = set()
        for i in range(0, len(urls), self.ADD_CHUNK):
            chunk = urls[i:i + self.ADD_CHUNK]
            pipe = self._r.pipeline(transaction=False)
            for url in chunk:
                p = float(priorities[url])
                self._set_priority(keys=self._keys, args=[self._e, self.owner, url, repr(p), _score(p)], client=pipe)
            changed.update(url for url, reply in zip(chunk, pipe.execute()) if reply == 1)
        return changed

    @_redis_errors
    def get(self, url: str) -> dict | None:
        h = self._r.hgetall(self._e + url)
        if not h:
            return None
        e = self._entry(h)
        return {"url": e.url, "state": h["state"], "depth": e.depth, "priority": e.priority, "attempts": e.attempts,
                "redirects": e.redirects, "parent": e.parent, "anchor": e.anchor,
                "status": int(h["status"]) if "status" in h else None, "error": h.get("error"),
                "fetch_id": e.fetch_id, "not_before": e.not_before}

    @_redis_errors
    def stats(self) -> dict[str, int]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self._keys[7])
        pipe.scard(self._keys[0])
        counts, seen = pipe.execute()
        out = {s: int(counts.get(s, 0)) for s in STATES}
        out["seen"] = int(seen)
        return out

    @_redis_errors
    def next_due(self) -> float | None:
        pipe = self._r.pipeline(transaction=True)
        pipe.zrange(self._keys[3], 0, 0, withscores=True)  # qnb
        pipe.zrange(self._keys[4], 0, 0, withscores=True)  # delayed
        firsts = [rows[0][1] for rows in pipe.execute() if rows]
        return min(firsts) if firsts else None

    @_redis_errors
    def take_slot(self, host: str, token: str, *, delay_s: float, cap: int, hold_s: float) -> float:
        keys = [f"{self.prefix}:site:{host}", f"{self.prefix}:site-active:{host}"]
        return float(self._take_slot(keys=keys, args=[token, repr(float(delay_s)), int(cap), repr(float(hold_s))]))

    @_redis_errors
    def free_slot(self, host: str, token: str) -> None:
        self._r.zrem(f"{self.prefix}:site-active:{host}", token)

    @_redis_errors
    def robots_cached(self, origin: str) -> dict[str, str] | None:
        return self._r.hgetall(f"{self.prefix}:robots:{origin}") or None

    @_redis_errors
    def robots_claim(self, origin: str, hold_s: float) -> bool:
        return self._claim(keys=[f"{self.prefix}:robots-lock:{origin}"],
                           args=[self.owner or "-", max(1, int(hold_s * 1000))]) == 1

    @_redis_errors
    def robots_store(self, origin: str, verdict: Mapping[str, str], ttl_s: float) -> None:
        key = f"{self.prefix}:robots:{origin}"
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=dict(verdict))
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        pipe.delete(f"{self.prefix}:robots-lock:{origin}")
        pipe.execute()

    def close(self) -> None:
        self._r.close()


# ------------------------------------------------------------------------------------------------------ open

def open_frontier(url: str, *, prefix: str = "frontier", owner: str = "") -> Frontier:
    """The frontier at `url`: ``sqlite:///PATH`` (parent directories created; `prefix` names the table) or
    ``redis://host:port/db`` / ``rediss://…`` (keys under ``{prefix}:``). `owner` names the coordinator that leases
    through this connection (Redis: several may share the frontier; see the module docstring)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"frontier URL {url!r} has no path; use sqlite:///PATH")
        return SQLiteFrontier(path, table=prefix)
    if url.startswith(("redis://", "rediss://")):
        return RedisFrontier(url, prefix=prefix, owner=owner)
    raise ValueError(f"unsupported frontier URL {mask_url(url)!r}: use sqlite:///PATH or redis://host:port/db")
