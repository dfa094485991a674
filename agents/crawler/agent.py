"""The crawl coordinator agent: frontier -> polite fetches -> raw store -> acknowledged hand-off.

    seeds / crawl.enqueue / outlinks
        -> frontier (SQLite or Redis; seen-set; priorities, which crawl.prioritize changes)
        -> per-host queues: robots.txt (Protego), politeness delay (max of the setting and the
           site's Crawl-delay), per-host and global concurrency, depth limit, page budget
        -> fetch (httpx, asynchronous; size, time and content-type caps; redirects scheduled as
           new URLs so every hop passes robots.txt, politeness and the seen-set; retries with
           exponential backoff for 5xx, 429 and network errors)
        -> raw store (every body once, content-addressed) + fetch record
        -> frontier state 'fetched' -> extract.page to the extractor
        -> extract.stored (the document is in the store) -> outlinks into the frontier, page done

Pacing by the learner. The topic model's doc.scored events say how many stored documents still wait to be scored
(`backlog`). While that figure, plus the documents stored since the event, is above `max_unscored`, no new fetch
starts (fetches under way and hand-offs go on): on a CPU host, where the extractor outruns the topic model, the
crawl then runs at the learner's pace and the curiosity agent steers on signals a batch or two old, not minutes.
It never stalls the crawl on a learner that is gone: before the first doc.scored, while the twin reports the
learner dead or stopped, or when it has been silent for LEARNER_SILENT_S, fetches go on.

A page is marked done only when the extractor has acknowledged it. Pages still 'fetched' when
the coordinator stops are read back from the raw store and delivered again when it starts; the
extractor's upsert makes a repeat harmless, so every fetched page ends in the store exactly once.

Several coordinators may share one Redis frontier (a pool, on several hosts): leases carry the coordinator's name,
politeness and per_host_concurrency hold per site across all of them (the frontier's shared slot), and one fetches a
site's robots.txt for all (see agents/crawler/frontier.py and docs/OPERATIONS.md).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import zstandard
from protego import Protego
from pydantic import Field

from agents.contracts import (
    TOPIC_BATCH_DOCS,
    CrawlDiscovered,
    CrawlStatus,
    CrawlStatusRequest,
    DocScored,
    ExtractorLoad,
    Enqueue,
    EnqueueResult,
    ExtractPage,
    PageFetched,
    PageStored,
    Prioritize,
    PrioritizeResult,
)
from agents.crawler.fetch import REDIRECTS, Fetcher, FetchResult
from agents.crawler.frontier import Entry, Frontier, FrontierUnavailable, LeaseLost, open_frontier
from agents.crawler.rawstore import FetchRecord, RawMissing, RawStore
from agents.urls import BadURL, host_of, normalize, origin_of
from mesh.config import AgentRef, ConfigError, MeshConfig
from mesh.messages import HostChanged, StateChanged
from mesh.messages import HostState as LinkState
from mesh.runtime import READY_STATES, Agent, AgentSettings, handles
from network.codec import Envelope
from network.messages import AgentState, Ping
from network.reactor import Timer
from network.rpc import Deferred, MeshError, Peer

RETRY_STATUSES = (429, 500, 502, 503, 504)
POP_PAUSE_S = 1.0    # every host's buffer was full: take only what busy hosts have room for, for this long
PERMANENT_ERRORS = ("too_large", "invalid_body", "undecodable")   # delivering again cannot help
FRAME_OVERHEAD = 64 << 10
STORE_RETRY_S = 2.0
PRIORITIZE_SLICE_S = 0.05   # the most one slice of a crawl.prioritize keeps the loop; the next slice waits a turn
PRIORITIZE_CHUNK = 32       # URLs per frontier call within a slice
LEARNER_SILENT_S = 60.0     # a learner holding the crawl back that sends no doc.scored for this long no longer does
SHARED_POLL_S = 0.5         # shared frontier, nothing to do: look again this soon (other coordinators add URLs)
ROBOTS_POLL_S = 0.2         # shared frontier: look again this soon for a robots.txt another coordinator is fetching


class CrawlSettings(AgentSettings):
    seeds: list[str] = Field(default_factory=list, description="start URLs (meshctl up --seeds overrides)")
    max_depth: int = Field(3, ge=0, le=100, description="links followed from a seed; seeds are depth 0")
    max_pages: int = Field(1000, ge=1, description="page budget: URLs fetched (or refused) in all")
    politeness_s: float = Field(1.0, ge=0, le=600, description="least time between two requests to one host")
    per_host_concurrency: int = Field(2, ge=1, le=64)
    concurrency: int = Field(32, ge=1, le=1024, description="fetches under way at once, all hosts together")
    max_retries: int = Field(3, ge=0, le=20, description="retries for 5xx, 429, timeouts and connection errors")
    retry_backoff_s: float = Field(2.0, ge=0, le=3600, description="first retry delay; doubles each time")
    timeout_s: float = Field(15.0, gt=0, le=600, description="whole-fetch time cap")
    max_bytes: int = Field(2 << 20, ge=1024, le=256 << 20, description="body size cap; longer bodies are cut here")
    max_redirects: int = Field(5, ge=0, le=30)
    user_agent: str = "agent-mesh-crawler/0.1"
    content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "application/pdf", "text/plain"],
        description="media types downloaded and handed to the extractor; others are recorded as skipped")
    stay_on_seed_hosts: bool = Field(True, description="follow links only to the hosts of the seeds (and of crawl.enqueue)")
    extractor: AgentRef("extractor") = Field("extractor", description="the agent that extracts and stores fetched pages")
    handoff_window: int = Field(16, ge=1, le=1024, description="pages sent to an extractor (to each replica of a "
                                "pool) and not yet acknowledged: its credit")
    handoff_timeout_s: float = Field(60.0, gt=0, description="wait for an acknowledgement before delivering again")
    robots_retry_s: float = Field(30.0, gt=0, description="wait before asking again for an unreachable robots.txt")
    max_crawl_delay_s: float = Field(30.0, ge=0, description="ceiling on a site's Crawl-delay")
    learner: AgentRef("topic_model", auto=True) | None = Field(
        "auto", description="the topic model whose backlog paces the crawl (auto: the mesh's topic_model agent, if "
        "any; null: none)")
    max_unscored: int | None = Field(None, ge=0, le=10_000_000, description="no new fetch starts while the learner "
                                     "has more than this many stored documents not yet scored (0: never wait; null: "
                                     "the learner's batch_docs, so one full batch always waits for it)")
    lease_ttl_s: float = Field(30.0, ge=1, le=3600, description="shared (Redis) frontier: a coordinator that has not "
                               "said it is alive for this long is dead, and the others take back the URLs it leased")
    robots_cache_s: float = Field(3600.0, ge=0, le=86400, description="shared (Redis) frontier: how long a site's "
                                  "robots.txt, fetched by one coordinator, serves the others that start after it")
    host_buffer: int = Field(4, ge=1, le=1024, description="URLs taken from the frontier ahead of time per host (at "
                             "least 2 x per_host_concurrency), in priority order; the rest stay in the frontier, where "
                             "new priorities still reorder them")


def _parse_robots(r: FetchResult) -> Protego | None:
    """A robots.txt response, parsed on the fetcher's storage thread (Protego takes about a second for the 512 kB a
    robots.txt may have here, which on the reactor would hold back its heartbeats); None unless it is a 2xx."""
    if r.status is None or not 200 <= r.status < 300:
        return None
    return Protego.parse((r.body or b"").decode("utf-8", errors="replace"))


def _batch_docs(config: MeshConfig, agent: str) -> int:
    """The topic model `agent`'s documents per scoring pass, as its settings say (a bad value is its own problem)."""
    value = (config.agents[agent].settings or {}).get("batch_docs", TOPIC_BATCH_DOCS)
    return value if isinstance(value, int) and value > 0 else TOPIC_BATCH_DOCS


def _insert_by_priority(queue: collections.deque, entry: Entry) -> None:
    """Highest priority first, first come first among equals (the frontier's order)."""
    for i, e in enumerate(queue):
        if entry.priority > e.priority:
            queue.insert(i, entry)
            return
    queue.append(entry)


@dataclass
class Replica:
    """An extractor the pages go to (a replica of the pool `extractor` names, or the one extractor), as the
    coordinator sees it: the pages in its hands, and whether it gets more."""
    name: str
    host: str
    sent: dict[str, Entry] = field(default_factory=dict)   # URL -> page in its hands, not yet acknowledged
    down: str = ""                # the twin's verdict when it is not ready ("" while it is ready or unknown)
    host_down: bool = False       # the twin reports its host unreachable
    cut: bool = False             # nothing from it (mesh.ping, pages) for the twin's dead time
    backoff: float = 0.0          # after an error answer: no pages for this long (doubling, 0.5 s to 10 s)
    paused_until: float = 0.0     # monotonic
    acknowledged: int = 0
    lost: int = 0                 # times given up with pages in its hands
    lost_at: float | None = None  # unix: the last time
    lost_mono: float = 0.0
    handon_s: float | None = None     # then, seconds until every page it held was sent to another replica
    heard: float = 0.0            # monotonic: its last answer of any kind
    probing: bool = False         # a mesh.ping is out
    probe_sent: float = 0.0
    prober: Peer | None = None    # the connection the pings go on

    @property
    def usable(self) -> bool:
        return not (self.down or self.host_down or self.cut)

    def why_not(self, now: float) -> str:
        if self.down:
            return self.down
        if self.host_down:
            return f"host {self.host} unreachable"
        if self.cut:
            return "no answer"
        return f"backing off {self.paused_until - now:.1f} s" if now < self.paused_until else ""


@dataclass
class HostState:
    queue: collections.deque = field(default_factory=collections.deque)
    active: int = 0
    next_start: float = 0.0           # monotonic: politeness
    robots: Protego | None = None
    robots_state: str = "unknown"     # unknown | fetching | ready | unavailable
    robots_until: float = 0.0
    robots_failures: int = 0
    robots_error: str = ""
    robots_started: float = 0.0
    crawl_delay: float = 0.0


class CrawlCoordinator(Agent):
    kind = "crawl_coordinator"
    Settings = CrawlSettings

    def __init__(self, name: str, config: MeshConfig) -> None:
        super().__init__(name, config)
        s = self.settings
        self.seeds: list[str] = []
        problems = []
        for i, seed in enumerate(s.seeds):
            try:
                self.seeds.append(normalize(seed))
            except BadURL as exc:
                problems.append((f"agents.{name}.settings.seeds[{i}]", str(exc), "give an http:// or https:// URL"))
        if problems:
            raise ConfigError(config.source, problems)
        self.scope: set[str] = {host_of(u) for u in self.seeds}
        self.accept = {t.lower() for t in s.content_types}
        self.frontier: Frontier | None = None
        self.raw: RawStore | None = None
        self.fetcher: Fetcher | None = None
        self.hosts: dict[str, HostState] = {}
        self.buffered = 0
        self.pop_after = 0.0        # monotonic: when to take URLs from the frontier again (POP_PAUSE_S)
        self.in_flight: dict[str, Entry] = {}
        self.handoff: collections.deque[tuple[Entry, FetchResult | None]] = collections.deque()
        self.handoff_sent: dict[str, str] = {}    # URL -> the replica that holds it
        self.handoff_paused_until = 0.0           # every hand-off waits (the frontier did not take an outcome)
        # Where the pages go: the extractor, or every replica of the pool it names, each with its credit (see
        # _pick). One extractor behaves as it always did; with two or more, the twin's verdicts and the
        # coordinator's own pings decide which replicas get pages (_on_agent_state, _on_host, _probe).
        self.replicas: dict[str, Replica] = {n: Replica(n, config.host_of(n)) for n in config.replicas_of(s.extractor)}
        self.spread = len(self.replicas) > 1
        self.handing_on: dict[str, Replica] = {}   # URL -> the replica given up on that held it, until it is sent on
        self.late_answers = 0                      # answers from a replica that no longer held the page: ignored
        self._probe_timer: Timer | None = None
        self.budget_used = 0
        self.pages = 0
        self.documents = 0
        self._timer: Timer | None = None
        self._timer_at = float("inf")
        self._alive_timer: Timer | None = None
        self._local = threading.local()
        self._zstd = zstandard.ZstdCompressor(level=3)
        self._running = False
        # pacing by the learner (see the module docstring)
        learner = s.learner if s.learner != "auto" else config.agent_of_kind("topic_model")
        learner = config.replicas_of(learner)[0] if learner else None   # a pool of learners: its first, for now
        self.max_unscored: int = s.max_unscored if s.max_unscored is not None else (
            _batch_docs(config, learner) if learner else 0)
        self.learner: str | None = learner if self.max_unscored else None
        self.unscored: int | None = None      # the learner's backlog in its last doc.scored + documents stored since
        self.learner_heard = 0.0              # monotonic: the last doc.scored
        self.learner_down = False             # the twin reports it dead or stopped
        self.waiting_since: float | None = None   # monotonic: since when new fetches wait for the learner
        self.waited_s = 0.0                   # in all, since start
        # crawl.prioritize frames being applied, oldest first: what is left of each, its result so far, its reply
        self._prioritizing: collections.deque[tuple[Iterator[tuple[str, float]], PrioritizeResult, Deferred]] = \
            collections.deque()

    # --- start and stop ---------------------------------------------------------------------

    def setup(self) -> None:
        if self.uses_twin:   # the twin says when the extractor dies or restarts: the pages it held are lost then
            self.subscribe(self.config.twin, StateChanged.type_name, self._on_agent_state, StateChanged)
            if self.spread:
                self.subscribe(self.config.twin, HostChanged.type_name, self._on_host, HostChanged)
        if self.learner is not None:
            self.subscribe(self.learner, DocScored.type_name, self._on_scored, DocScored)

    def on_ready(self) -> None:
        s = self.settings
        self.frontier = open_frontier(self.config.store_url("frontier"), prefix=self.config.stores.frontier_prefix,
                                      owner=self.name)
        self.raw = RawStore(self.config.raw_dir)
        self.frontier.keepalive(s.lease_ttl_s)   # alive before taking leases: nobody may reclaim them from now on
        recovered = self.frontier.recover()      # shared: this coordinator's own leases and dead ones' only
        stats = self.frontier.stats()
        self.budget_used = stats["done"] + stats["failed"] + stats["fetched"]
        added = self.frontier.add(Entry(url=u, depth=0, priority=1.0) for u in self.seeds)
        for entry in self.frontier.fetched():
            self.handoff.append((entry, None))
        self.fetcher = Fetcher(self.reactor, user_agent=s.user_agent, timeout_s=s.timeout_s, max_bytes=s.max_bytes,
                               max_connections=max(s.concurrency, 4), postprocess=self._store_fetch)
        self.fetcher.start()
        self._running = True
        if self.frontier.shared:
            self._alive_timer = self.reactor.call_later(s.lease_ttl_s / 3, self._alive)
        if self.spread:
            now = time.monotonic()
            for rep in self.replicas.values():
                rep.heard = now
            self._probe()
        self.log.info("crawl: %d seed(s) (%d new), frontier %s, %d requeued after a stop, %d page(s) to hand off "
                      "again, budget %d/%d used", len(self.seeds), len(added), stats, recovered, len(self.handoff),
                      self.budget_used, s.max_pages)
        self.reactor.call_later(0, self._pump)

    def on_drain(self) -> None:
        self._running = False
        self._fail_prioritizing("draining", f"crawl coordinator {self.name!r} is draining")
        if self.fetcher is not None:
            self.fetcher.close()
        if self.frontier is not None:
            waiting = [e.url for hs in self.hosts.values() for e in hs.queue] + list(self.in_flight)
            self.frontier.release(waiting)  # fetched pages stay 'fetched' and are delivered again next start
            self.log.info("drained: %d URL(s) back in the frontier, %d page(s) waiting for the extractor",
                          len(waiting), len(self.handoff) + len(self.handoff_sent))

    def _alive(self) -> None:
        """Shared frontier, every third of lease_ttl_s: says this coordinator is alive (its leases stay its own)
        and takes back the leases of coordinators that stopped saying so."""
        self._alive_timer = None
        if not self._running or self.frontier is None:
            return
        try:
            self.frontier.keepalive(self.settings.lease_ttl_s)
            if n := self.frontier.reclaim():
                self.log.warning("took back %d URL(s) leased by coordinator(s) no longer alive", n)
                self.reactor.call_later(0, self._pump)
        except FrontierUnavailable as exc:
            self.degraded("frontier", exc)
        self._alive_timer = self.reactor.call_later(self.settings.lease_ttl_s / 3, self._alive)

    def close(self) -> None:
        if self._alive_timer is not None:
            self._alive_timer.cancel()
            self._alive_timer = None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for rep in self.replicas.values():
            if rep.prober is not None:
                rep.prober.close()
                rep.prober = None
        super().close()
        if self.fetcher is not None:
            self.fetcher.close()
        for store in (self.frontier, self.raw):
            if store is not None:
                store.close()
        self.frontier = self.raw = None

    # --- scheduling -------------------------------------------------------------------------

    def _wake_at(self, when: float) -> None:
        if when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.reactor.call_later(max(0.0, when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._pump()

    def _host(self, url: str) -> HostState:
        host = host_of(url)
        hs = self.hosts.get(host)
        if hs is None:
            hs = self.hosts[host] = HostState()
        return hs

    def _pump(self) -> None:
        """Fills the per-host queues from the frontier and starts every fetch politeness allows."""
        if not self._running:
            return
        s = self.settings
        self._pump_handoff()
        now = time.monotonic()
        if self._learner_holds(now):
            self._wake_at(self.learner_heard + LEARNER_SILENT_S)
            return
        backlog = len(self.handoff) + len(self.handoff_sent)
        cap = max(s.host_buffer, 2 * s.per_host_concurrency)
        room = min(max(4 * s.concurrency, 64) - self.buffered, cap * (len(self.hosts) + 1),
                   s.max_pages - self.budget_used - self.buffered - len(self.in_flight))
        if now < self.pop_after:
            # the last look found every host's buffer full: until POP_PAUSE_S is over, take only what the
            # hosts at work have room for (a look as wide as `room` finds other hosts' URLs)
            room = min(room, sum(cap - len(hs.queue) for hs in self.hosts.values() if hs.queue or hs.active))
        if room > 0 and backlog < (3 + len(self.replicas)) * s.handoff_window:   # 4 windows with one extractor
            try:
                popped = self.frontier.pop(room)
                self.recovered("frontier")
            except FrontierUnavailable as exc:
                self.log.warning("frontier unavailable (%s); trying again in %.0f s", exc, STORE_RETRY_S)
                self.degraded("frontier", exc)
                self._wake_at(now + STORE_RETRY_S)
                popped = []
            back = []
            for entry in popped:
                hs = self._host(entry.url)
                if len(hs.queue) >= cap:
                    back.append(entry.url)
                    continue
                _insert_by_priority(hs.queue, entry)
                self.buffered += 1
            if back:   # their hosts have enough waiting: they wait in the frontier, in its (changing) order
                try:
                    self.frontier.release(back)
                except FrontierUnavailable as exc:   # they stay leased; a restart requeues them
                    self.log.warning("frontier unavailable (%s): %d URL(s) stay leased", exc, len(back))
                self.pop_after = now + POP_PAUSE_S
        wake = float("inf")
        for host, hs in self.hosts.items():
            if not hs.queue:
                continue
            if hs.robots_state != "ready":
                wake = min(wake, self._robots(host, hs, now))
                continue
            delay = max(s.politeness_s, hs.crawl_delay)
            while hs.queue and hs.active < s.per_host_concurrency and len(self.in_flight) < s.concurrency:
                if now < hs.next_start:
                    wake = min(wake, hs.next_start)
                    break
                entry = hs.queue[0]
                if not hs.robots.can_fetch(entry.url, s.user_agent):
                    hs.queue.popleft()
                    self.buffered -= 1
                    try:
                        self._finish(entry, ok=False, error="disallowed by robots.txt", outcome="disallowed")
                    except LeaseLost as exc:
                        self.log.warning("%s", exc)
                    continue
                wait = self._slot(host, entry.url, delay)
                if wait > 0:   # another coordinator fetched from this site lately, or has its share under way
                    hs.next_start = now + wait
                    wake = min(wake, hs.next_start)
                    break
                hs.queue.popleft()
                self.buffered -= 1
                hs.active += 1
                hs.next_start = now + delay
                self.in_flight[entry.url] = entry
                self.fetcher.submit(entry.url, lambda r, e=entry: self._fetched(e, r), accept=self.accept.__contains__)
        if self.buffered == 0 and not self.in_flight and self.budget_used < s.max_pages:
            try:
                due = self.frontier.next_due()
            except FrontierUnavailable as exc:   # look again later, or nothing would wake the idle crawl
                self.degraded("frontier", exc)
                due = time.time() + STORE_RETRY_S
            if due is not None:
                wake = min(wake, now + max(0.0, due - time.time()) + 0.01)
            if self.frontier.shared:   # the others' pages bring links this coordinator hears nothing of
                wake = min(wake, now + SHARED_POLL_S)
        if wake < float("inf"):
            self._wake_at(wake)

    def _slot(self, host: str, url: str, delay: float) -> float:
        """The site's shared slot (a shared frontier; with SQLite always 0): 0 when a fetch of `url` may start
        now, else the seconds to wait, so politeness and per_host_concurrency hold for the site across all the
        coordinators on the frontier, not for each."""
        s = self.settings
        try:
            return self.frontier.take_slot(host, f"{self.name} {url}", delay_s=delay, cap=s.per_host_concurrency,
                                           hold_s=s.timeout_s + 5.0)
        except FrontierUnavailable as exc:
            self.degraded("frontier", exc)
            return STORE_RETRY_S

    def _free_slot(self, url: str) -> None:
        try:
            self.frontier.free_slot(host_of(url), f"{self.name} {url}")
        except FrontierUnavailable:   # the hold runs out by itself
            pass

    # --- pacing by the learner ----------------------------------------------------------------

    def _learner_holds(self, now: float) -> bool:
        """Whether new fetches wait for the learner now; logs when that starts and ends."""
        hold = (self.unscored is not None and self.unscored > self.max_unscored and not self.learner_down
                and now - self.learner_heard < LEARNER_SILENT_S)
        if hold and self.waiting_since is None:
            self.waiting_since = now
            self.log.info("new fetches wait for the learner %s: %d stored document(s) not yet scored (max_unscored "
                          "%d)", self.learner, self.unscored, self.max_unscored)
        elif not hold and self.waiting_since is not None:
            waited, self.waiting_since = now - self.waiting_since, None
            self.waited_s += waited
            why = ("it is " + ("down" if self.learner_down else f"silent for {LEARNER_SILENT_S:g} s")
                   if self.unscored is not None and self.unscored > self.max_unscored else
                   f"{self.unscored} document(s) left to score")
            self.log.info("fetches go on after %.1f s waiting for the learner %s: %s", waited, self.learner, why)
        return hold

    def _on_scored(self, event: DocScored, env: Envelope) -> None:
        if event.backlog is None:   # a topic model older than the field: nothing to pace by
            return
        self.unscored = event.backlog
        self.learner_heard = time.monotonic()
        if self.waiting_since is not None and self._running:
            self._pump()

    # --- robots.txt -------------------------------------------------------------------------

    def _robots(self, host: str, hs: HostState, now: float) -> float:
        """Starts or waits for this host's robots.txt; returns when to look again. On a shared frontier one
        coordinator fetches it for all (robots_claim) and stores the verdict (robots_store); the others wait for
        that verdict, or take it from there when they start later."""
        if hs.robots_state == "fetching":
            return float("inf")  # its answer pumps again
        if hs.robots_state == "unavailable" and now < hs.robots_until:
            return hs.robots_until
        s = self.settings
        origin = origin_of(hs.queue[0].url)
        try:
            cached = self.frontier.robots_cached(origin)
            if cached is None:
                claimed = self.frontier.robots_claim(origin, s.timeout_s * 6 + 5.0)
                wait = self._slot(host, origin + "/robots.txt", s.politeness_s) if claimed else 0.0
        except FrontierUnavailable as exc:
            self.degraded("frontier", exc)
            hs.robots_state, hs.robots_until = "unavailable", now + STORE_RETRY_S
            return hs.robots_until
        if cached is not None:
            self._robots_shared(host, hs, cached)
            return float("inf")
        if not claimed or wait > 0:   # another coordinator is fetching it, or fetched from the site just now
            hs.robots_state, hs.robots_until = "unavailable", now + (wait or ROBOTS_POLL_S)
            return hs.robots_until
        hs.robots_state = "fetching"
        hs.robots_started = now
        hs.next_start = now + max(s.politeness_s, hs.crawl_delay)
        self.fetcher.submit(origin + "/robots.txt", lambda r: self._robots_fetched(host, hs, r, 0, origin),
                            max_bytes=512 << 10, store=False, parse=_parse_robots)
        return float("inf")

    def _robots_shared(self, host: str, hs: HostState, verdict: dict[str, str]) -> None:
        """The verdict another coordinator stored: parsed off the reactor (as a fetched robots.txt is), then
        applied as if fetched here."""
        hs.robots_state = "fetching"
        if verdict.get("state") != "ready":
            self._robots_unreachable(host, hs, verdict.get("error") or "unreachable", shared=True)
            self._pump()
            return
        status = int(verdict.get("status") or 0)

        def parse() -> Protego | None:
            return Protego.parse(verdict.get("body", "")) if 200 <= status < 300 else None

        def parsed(robots: Protego | None) -> None:
            if self._running:
                self._robots_ready(host, hs, robots, status, shared=True)
                self._pump()

        self.fetcher.run(parse, parsed)

    def _robots_fetched(self, host: str, hs: HostState, r: FetchResult, hops: int, origin: str) -> None:
        if not self._running:
            return
        s = self.settings
        if hops == 0 and self.frontier.shared:
            self._free_slot(origin + "/robots.txt")
        if r.status in REDIRECTS and r.redirect_to and hops < 5:
            self.fetcher.submit(r.redirect_to, lambda r2: self._robots_fetched(host, hs, r2, hops + 1, origin),
                                max_bytes=512 << 10, store=False, parse=_parse_robots)
            return
        answered = r.error is None and r.status is not None and r.status < 500 and r.status != 429
        robots = r.parsed if isinstance(r.parsed, Protego) else None
        try:
            if answered:
                ok = 200 <= r.status < 300
                self.frontier.robots_store(origin, {
                    "state": "ready", "status": str(r.status),
                    "body": (r.body or b"").decode("utf-8", errors="replace") if ok else ""}, s.robots_cache_s)
                self._robots_ready(host, hs, robots, r.status)
            else:
                hs.robots_failures += 1
                hs.robots_error = r.error or f"HTTP {r.status}"
                if hs.robots_failures > s.max_retries:
                    # the others fail their URLs of this site too, until it may be asked again
                    self.frontier.robots_store(origin, {"state": "unreachable", "error": hs.robots_error},
                                               s.robots_retry_s)
                    self._robots_unreachable(host, hs, hs.robots_error)
                else:   # nobody else asks it meanwhile
                    self.frontier.robots_claim(origin, s.robots_retry_s * hs.robots_failures + s.timeout_s * 6 + 5.0)
                    hs.robots_state = "unavailable"
                    hs.robots_until = time.monotonic() + s.robots_retry_s * hs.robots_failures
                    self.log.info("robots.txt of %s: %s; asking again in %.0f s", host, hs.robots_error,
                                  hs.robots_until - time.monotonic())
        except FrontierUnavailable as exc:   # the verdict holds here; others ask again once the claim runs out
            self.degraded("frontier", exc)
            if answered:
                self._robots_ready(host, hs, robots, r.status)
            else:
                hs.robots_state, hs.robots_until = "unavailable", time.monotonic() + STORE_RETRY_S
        self._pump()

    def _robots_ready(self, host: str, hs: HostState, robots: Protego | None, status: int, *,
                      shared: bool = False) -> None:
        """A robots.txt answer that settles it: 2xx parsed (or a parse that failed) or 4xx, where everything is
        allowed."""
        hs.robots = robots if robots is not None else Protego.parse("")
        delay = hs.robots.crawl_delay(self.settings.user_agent)
        hs.crawl_delay = min(float(delay or 0.0), self.settings.max_crawl_delay_s)
        if not shared:
            hs.next_start = max(hs.next_start, hs.robots_started + hs.crawl_delay)  # robots.txt was a request too
        hs.robots_state, hs.robots_failures = "ready", 0
        self.log.info("robots.txt of %s: HTTP %s%s%s", host, status,
                      f", crawl-delay {hs.crawl_delay:g} s" if hs.crawl_delay else "",
                      " (fetched by another coordinator)" if shared else "")

    def _robots_unreachable(self, host: str, hs: HostState, error: str, *, shared: bool = False) -> None:
        # RFC 9309: an unreachable robots.txt means nothing may be crawled
        self.log.warning("robots.txt of %s unreachable (%s%s): its %d queued URL(s) fail", host, error,
                         ", says another coordinator" if shared else "", len(hs.queue))
        while hs.queue:
            self.buffered -= 1
            try:
                self._finish(hs.queue.popleft(), ok=False, error=f"robots.txt unreachable: {error}",
                             outcome="failed")
            except LeaseLost as exc:
                self.log.warning("%s", exc)
        hs.robots_failures = 0
        hs.robots_state = "unknown"

    # --- fetch results ----------------------------------------------------------------------

    def _store_fetch(self, r: FetchResult) -> None:
        """Storage thread: the body into the raw store (once per content), the fetch record beside it."""
        raw = getattr(self._local, "raw", None)
        if raw is None:
            raw = self._local.raw = RawStore(self.config.raw_dir)
            self._local.zstd = zstandard.ZstdCompressor(level=3)
        if r.body is not None:
            r.content_hash = raw.put(r.body)
            r.body_zstd = self._local.zstd.compress(r.body)
        entry = self.in_flight.get(r.url)
        r.fetch_id = raw.record(FetchRecord(
            url=r.url, final_url=r.final_url, status=r.status or 0, headers=r.headers, fetched_at=r.fetched_at,
            elapsed_s=r.elapsed_s, content_type=r.content_type, size=len(r.body or b""), truncated=r.truncated,
            depth=entry.depth if entry is not None else 0, content_hash=r.content_hash, error=r.skipped))

    def _fetched(self, entry: Entry, r: FetchResult) -> None:
        if self.in_flight.pop(entry.url, None) is None or not self._running:
            return  # drained meanwhile: the frontier has it back
        hs = self._host(entry.url)
        hs.active -= 1
        if r.status is not None:
            self.pages += 1
        if self.frontier.shared:
            self._free_slot(entry.url)
        try:
            self._outcome(entry, r)
        except LeaseLost as exc:   # cut off from Redis past lease_ttl_s: another coordinator has the URL now
            self.log.warning("%s: its outcome is dropped", exc)
        except FrontierUnavailable as exc:
            # the frontier did not take the outcome, so the URL is still leased there: fetch it again once the
            # frontier answers (else it would stay leased, never fetched, until the coordinator restarts)
            self.log.warning("frontier unavailable (%s): %s will be fetched again", exc, entry.url)
            self.degraded("frontier", exc)
            hs.queue.appendleft(entry)
            self.buffered += 1
            hs.next_start = max(hs.next_start, time.monotonic() + STORE_RETRY_S)
        self._pump()

    def _outcome(self, entry: Entry, r: FetchResult) -> None:
        """Records a fetch's outcome in the frontier (each case's first step is the frontier call, so a
        FrontierUnavailable leaves nothing half done) and queues a fetched page for the extractor."""
        s = self.settings
        if r.error is not None or r.status in RETRY_STATUSES:
            why = r.error or f"HTTP {r.status}"
            if entry.attempts < s.max_retries:
                delay = s.retry_backoff_s * (2 ** entry.attempts)
                self.frontier.retry(entry.url, not_before=time.time() + delay, error=why)
                self._event(entry, r, "retry", f"{why}; retry {entry.attempts + 1}/{s.max_retries} in {delay:g} s")
            else:
                self._finish(entry, ok=False, status=r.status, error=f"{why} (after {entry.attempts + 1} attempts)",
                             outcome="failed", r=r)
        elif r.status in REDIRECTS and r.redirect_to:
            self._redirect(entry, r)
        elif r.skipped:
            self._finish(entry, ok=True, status=r.status, error=f"skipped: {r.skipped}", outcome="skipped", r=r)
        elif r.status >= 300:
            self._finish(entry, ok=False, status=r.status, error=f"HTTP {r.status}", outcome="failed", r=r)
        else:
            self.frontier.mark_fetched(entry.url, r.fetch_id)
            entry.fetch_id = r.fetch_id
            self.budget_used += 1
            self._event(entry, r, "fetched", "truncated at the size cap" if r.truncated else "")
            r.body = None   # the raw store has it; the hand-off needs only the compressed copy
            self.handoff.append((entry, r))

    def _redirect(self, entry: Entry, r: FetchResult) -> None:
        try:
            target = normalize(r.redirect_to)
        except BadURL as exc:
            self._finish(entry, ok=False, status=r.status, error=f"bad redirect: {exc}", outcome="failed", r=r)
            return
        if entry.redirects >= self.settings.max_redirects:
            self._finish(entry, ok=False, status=r.status, outcome="failed", r=r,
                         error=f"too many redirects (limit {self.settings.max_redirects}), last to {target}")
            return
        if not self._in_scope(target):
            self._finish(entry, ok=True, status=r.status, error=f"redirect to {target}, out of scope", outcome="redirect", r=r)
            return
        self.frontier.add([Entry(url=target, depth=entry.depth, priority=entry.priority, parent=entry.url,
                                 anchor=entry.anchor, redirects=entry.redirects + 1)])
        self._finish(entry, ok=True, status=r.status, error=f"redirected to {target}", outcome="redirect", r=r)

    def _finish(self, entry: Entry, *, ok: bool, error: str, outcome: str, status: int | None = None,
                r: FetchResult | None = None) -> None:
        self.frontier.finish(entry.url, ok=ok, status=status, error=error)
        self.budget_used += 1
        self._event(entry, r, outcome, error)

    def _event(self, entry: Entry, r: FetchResult | None, outcome: str, detail: str) -> None:
        self.publish(PageFetched(url=entry.url, status=r.status if r else None, outcome=outcome, detail=detail[:500],
                                 elapsed_ms=round(r.elapsed_s * 1000, 1) if r else 0.0,
                                 size=len(r.body or b"") if r else 0), topic="crawl.fetched")

    def _in_scope(self, url: str) -> bool:
        return not self.settings.stay_on_seed_hosts or host_of(url) in self.scope

    # --- hand-off to the extractors ---------------------------------------------------------

    def _pick(self, now: float, *, over_window: bool = False) -> Replica | None:
        """The extractor the next page goes to: of those that get pages and are not backing off, one with credit
        (handoff_window minus its pages in flight), on this host first, then the least loaded (the ZMQ guide's
        load balancing: work goes where there is room for it). `over_window`: a page a lost replica held, which
        goes on at once, credit or not."""
        window = self.settings.handoff_window
        best, best_key = None, None
        for rep in self.replicas.values():
            if not rep.usable or now < rep.paused_until or (len(rep.sent) >= window and not over_window):
                continue
            key = (rep.host != self.host, len(rep.sent))
            if best_key is None or key < best_key:
                best, best_key = rep, key
        return best

    def _pump_handoff(self) -> None:
        s = self.settings
        now = time.monotonic()
        if now < self.handoff_paused_until:
            self._wake_at(self.handoff_paused_until)
            return
        limit = self.config.mesh.max_frame_bytes - FRAME_OVERHEAD
        while self.handoff:
            rep = self._pick(now, over_window=self.handoff[0][0].url in self.handing_on)
            if rep is None:
                paused = [r.paused_until for r in self.replicas.values() if r.usable and r.paused_until > now]
                if paused:
                    self._wake_at(min(paused))
                return
            entry, r = self.handoff.popleft()
            lost = self.handing_on.pop(entry.url, None)
            msg = self._page_message(entry, r)
            if msg is not None and len(msg.body_zstd) > limit:
                self._finish(entry, ok=False, outcome="failed", status=msg.status,
                             error=f"compressed body of {len(msg.body_zstd)} bytes does not fit a mesh frame "
                                   f"(mesh.max_frame_bytes {self.config.mesh.max_frame_bytes}): not handed off")
                msg = None
            if msg is not None:
                rep.sent[entry.url] = entry
                self.handoff_sent[entry.url] = rep.name
                self.peer(rep.name).request(
                    msg, lambda reply, e=entry, status=msg.status, rep=rep: self._stored(e, reply, status, rep),
                    lambda exc, e=entry, r=r, rep=rep: self._handoff_failed(e, r, exc, rep),
                    timeout=s.handoff_timeout_s, retries=0)
            if lost is not None and lost not in self.handing_on.values():
                lost.handon_s = round(now - lost.lost_mono, 3)
                self.log.info("handed on every page extractor %s held in %.2f s", lost.name, lost.handon_s)

    def _page_message(self, entry: Entry, r: FetchResult | None) -> ExtractPage | None:
        if r is None or r.body_zstd is None:  # delivered again after a restart: read it back
            try:
                rec = self.raw.fetch(entry.fetch_id)
                body = self.raw.get(rec.content_hash) if rec.content_hash else b""
            except (RawMissing, ValueError) as exc:
                self.log.error("cannot deliver %s again: its raw body is missing (%s)", entry.url, exc)
                self._finish(entry, ok=False, error=f"raw body lost: {exc}", outcome="failed")
                return None
            r = FetchResult(url=rec.url, final_url=rec.final_url, fetched_at=rec.fetched_at, status=rec.status,
                            content_type=rec.content_type, truncated=rec.truncated, fetch_id=entry.fetch_id,
                            content_hash=rec.content_hash or "", body_zstd=self._zstd.compress(body))
        return ExtractPage(url=entry.url, final_url=r.final_url, fetch_id=r.fetch_id, status=r.status or 0,
                           content_type=r.content_type, content_hash=r.content_hash or "", fetched_at=r.fetched_at,
                           depth=entry.depth, truncated=r.truncated, body_zstd=r.body_zstd)

    def _release(self, entry: Entry, rep: Replica) -> bool:
        """Takes the page out of `rep`'s hands; False if it is not there: an answer from a replica given up on
        (the page went to another, whose answer counts) or one already answered. Such a late answer is harmless:
        the extractor's upsert by URL stored the page once ('unchanged' the second time), and it is not counted."""
        if self.handoff_sent.get(entry.url) != rep.name:
            self.late_answers += 1
            return False
        del self.handoff_sent[entry.url]
        rep.sent.pop(entry.url, None)
        return True

    def _stored(self, entry: Entry, reply: PageStored, status: int, rep: Replica) -> None:
        rep.heard = time.monotonic()
        if not self._release(entry, rep) or self.frontier is None:
            return
        rep.acknowledged += 1
        if rep.backoff:
            self.log.info("extractor %s answers again", rep.name)
        rep.backoff = 0.0
        depth = entry.depth + 1
        try:
            if depth <= self.settings.max_depth and reply.outlinks:
                links = [link for link in reply.outlinks if self._in_scope(link.url)]
                added = set(self.frontier.add(Entry(url=link.url, depth=depth, priority=-float(depth), parent=entry.url,
                                                    anchor=link.anchor or None) for link in links))
                if added:
                    new = {link.url: link for link in reversed(links) if link.url in added}   # first anchor wins
                    self.publish(CrawlDiscovered(parent=entry.url, depth=depth, links=list(reversed(new.values()))),
                                 "crawl.discovered")
            self.frontier.finish(entry.url, ok=True, status=status,
                                 error=None if reply.state == "extracted" else reply.error)
        except FrontierUnavailable as exc:
            # the page is stored but the frontier did not take the outcome: deliver it again later (the
            # extractor's upsert makes that harmless) rather than lose its outlinks
            self.log.warning("frontier unavailable (%s): %s goes to the extractor again", exc, entry.url)
            self.degraded("frontier", exc)
            self.handoff.append((entry, None))
            self.handoff_paused_until = time.monotonic() + STORE_RETRY_S
            self._wake_at(self.handoff_paused_until)
            return
        self.documents += 1
        if self.unscored is not None and reply.state == "extracted":
            self.unscored += 1    # one more for the learner, until its next doc.scored says how many are left
        self._pump()

    def _on_agent_state(self, event: StateChanged, env: Envelope) -> None:
        """An extractor died or stopped (the twin missed its heartbeats, or it deregistered), or a new process of it
        registered before that was seen (ready -> starting): the pages the old process held went with it. They are
        delivered again now, not after handoff_timeout_s; a reply the old process still sends is ignored, and storing
        a page twice is harmless. With one extractor, unreachable is not gone (a partitioned extractor may still
        answer, and there is no other). With a pool, a replica that is anything but ready or degraded (dead,
        stopped, unreachable, starting again) gets no pages, and the pages in its hands go to the others at once;
        ready again, it gets credit again."""
        state, previous = AgentState(event.state), AgentState(event.previous)
        gone = (AgentState.DEAD, AgentState.STOPPED)
        if event.agent == self.learner:
            self.learner_down = state in gone
            if self._running:
                self._pump()
            return
        rep = self.replicas.get(event.agent)
        if rep is None or self.frontier is None:
            return
        if not self.spread:
            if state in gone or (state == AgentState.STARTING and previous not in (*gone, AgentState.DECLARED)):
                n = self.peer(rep.name).fail_pending(
                    MeshError("peer_lost", f"the extractor is {state} ({event.reason or 'reported by the twin'})"))
                if n:
                    self.log.warning("extractor %s is %s (%s) with %d page(s) in its hands: delivering them again",
                                     rep.name, state, event.reason, n)
            return
        if state in READY_STATES:
            if rep.down:
                self.log.info("extractor %s is %s again: it gets pages", rep.name, state)
                rep.down, rep.backoff, rep.paused_until = "", 0.0, 0.0
                self._pump()
            return
        rep.down = f"{state} ({event.reason})" if event.reason else str(state)
        self._lose(rep, f"{state} ({event.reason or 'reported by the twin'})")

    def _on_host(self, event: HostChanged, env: Envelope) -> None:
        """The twin's verdict on a host (pool only): the replicas of an unreachable host get no pages, and what they
        held goes to the others; reachable again, they get credit again."""
        down = event.state == LinkState.UNREACHABLE
        for rep in self.replicas.values():
            if rep.host != event.host or rep.host_down == down:
                continue
            rep.host_down = down
            if down:
                self._lose(rep, f"on host {event.host}, which the twin reports unreachable")
            else:
                self.log.info("extractor %s: its host %s is reachable again", rep.name, event.host)
                self._pump()

    def _lose(self, rep: Replica, why: str) -> None:
        """`rep` gets no pages now; the pages in its hands are failed at once (peer_lost) and go to the front of the
        queue, for the other replicas, without waiting for handoff_timeout_s. A reply it still sends is dropped."""
        if not rep.sent:
            self.log.info("extractor %s gets no pages: it is %s", rep.name, why)
            return
        rep.lost += 1
        rep.lost_at, rep.lost_mono, rep.handon_s = time.time(), time.monotonic(), None
        self.log.warning("extractor %s is %s with %d page(s) in its hands: handing them to the other replicas",
                         rep.name, why, len(rep.sent))
        self.peer(rep.name).fail_pending(MeshError("peer_lost", f"extractor {rep.name} is {why}"))
        if self._running:
            self._pump()

    def _probe(self) -> None:
        """Pool only: a mesh.ping to each replica every heartbeat interval, on a connection of its own (the
        Paranoid Pirate's heartbeat: the extractor's loop answers it at once, whatever its workers do). A replica
        heard from by nothing (ping or page) for the twin's dead time is given up: the coordinator may not hear the
        twin at all when the link to the replica's host is cut (the twin on that side), and it must not wait for
        handoff_timeout_s. The first answer after that gives it credit again."""
        self._probe_timer = None
        if not self._running:
            return
        now = time.monotonic()
        mesh = self.config.mesh
        dead_after = mesh.heartbeat_interval_s * mesh.dead_after_missed
        for rep in self.replicas.values():
            if not rep.cut and now - rep.heard > dead_after:
                rep.cut = True
                self._lose(rep, f"unreachable (no answer for {now - rep.heard:.1f} s)")
            if rep.probing or now - rep.probe_sent < mesh.heartbeat_interval_s:
                continue
            rep.probing, rep.probe_sent = True, now
            self._probe_peer(rep).request(Ping(), lambda reply, rep=rep: self._probed(rep, True),
                                          lambda exc, rep=rep: self._probed(rep, False),
                                          timeout=dead_after, retries=0)
        self._probe_timer = self.reactor.call_later(mesh.heartbeat_interval_s / 4, self._probe)

    def _probed(self, rep: Replica, answered: bool) -> None:
        rep.probing = False
        if not answered:
            return
        rep.heard = time.monotonic()
        if rep.cut:
            rep.cut = False
            self.log.info("extractor %s answers again: it gets pages", rep.name)
            if self._running:
                self._pump()

    def _probe_peer(self, rep: Replica) -> Peer:
        if rep.prober is None:
            rep.prober = Peer(self.ctx, self.reactor, self.config.endpoint(rep.name, "rpc"), sender=self.name,
                              metrics=self.metrics, guard=self.guard, server_host=rep.host, retries=0,
                              max_frame_bytes=self.config.mesh.max_frame_bytes)
        return rep.prober

    def _handoff_failed(self, entry: Entry, r: FetchResult | None, exc: MeshError, rep: Replica) -> None:
        if not self._release(entry, rep) or self.frontier is None:
            return
        if exc.code in PERMANENT_ERRORS:
            self.log.error("extractor %s refused %s for good: %s: %s", rep.name, entry.url, exc.code, exc.message)
            self._finish(entry, ok=False, outcome="failed", error=f"extractor refused it: {exc.code}: {exc.message}"[:500])
            self._pump()
            return
        self.handoff.appendleft((entry, r))
        if self.spread and exc.code == "peer_lost":   # given up on: another replica takes it now (_lose pumps)
            self.handing_on[entry.url] = rep
            return
        if not rep.backoff:
            self.log.warning("extractor %s did not store %s (%s): keeping the page(s), delivering again",
                             rep.name, entry.url, exc.message)
        rep.backoff = min(max(rep.backoff * 2, 0.5), 10.0)
        rep.paused_until = time.monotonic() + rep.backoff
        if self.spread:   # the others take it meanwhile
            self._pump()
        else:
            self._wake_at(rep.paused_until)

    def _loads(self) -> list[ExtractorLoad]:
        now, window = time.monotonic(), self.settings.handoff_window
        return [ExtractorLoad(agent=rep.name, host=rep.host, usable=rep.usable and now >= rep.paused_until,
                              why_not=rep.why_not(now), in_flight=len(rep.sent),
                              credit=max(0, window - len(rep.sent)), acknowledged=rep.acknowledged, lost=rep.lost,
                              lost_at=rep.lost_at, handon_s=rep.handon_s)
                for rep in self.replicas.values()]

    # --- requests ---------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if self.frontier is None:
            raise MeshError("unavailable", f"crawl coordinator {self.name!r} is not ready yet")

    def gauges(self) -> dict[str, float]:
        """The crawl's figures; with a pool, also each replica's pages in flight (`handoff_in_flight:NAME`)."""
        # runs while the heartbeat is built: state changes wait for the reactor's next turn
        per_replica = {f"handoff_in_flight:{rep.name}": len(rep.sent) for rep in self.replicas.values()} \
            if self.spread else {}
        try:
            st = self.frontier.stats()
        except FrontierUnavailable as exc:
            self.reactor.call_later(0, lambda e=exc: self.degraded("frontier", e))
            return {"fetched": self.pages, "documents": self.documents, "in_flight": len(self.in_flight),
                    "handoff_in_flight": len(self.handoff_sent), "hosts": len(self.hosts), **self._pacing(), **per_replica}
        if self.state == AgentState.DEGRADED:
            self.reactor.call_later(0, lambda: self.recovered("frontier"))
        return {"frontier_queued": st["queued"], "frontier_seen": st["seen"], "fetched": self.pages,
                "failed": st["failed"], "documents": self.documents, "in_flight": len(self.in_flight),
                "handoff_in_flight": len(self.handoff_sent), "hosts": len(self.hosts), **self._pacing(), **per_replica}

    def _pacing(self) -> dict[str, float]:
        """Gauges of the pacing by the learner (none without a learner)."""
        if self.learner is None:
            return {}
        waiting = self.waiting_since is not None
        return {"learner_unscored": float(self.unscored or 0), "waiting_for_learner": float(waiting),
                "learner_wait_s": round(self.waited_s + (time.monotonic() - self.waiting_since if waiting else 0.0), 1)}

    @handles(CrawlStatusRequest)
    def on_status(self, msg: CrawlStatusRequest, env: Envelope) -> CrawlStatus:
        self._require_ready()
        st = self.frontier.stats()
        s = self.settings
        budget_left = max(0, s.max_pages - self.budget_used - self.buffered - len(self.in_flight))
        busy = self.buffered or self.in_flight or self.handoff or self.handoff_sent
        idle = not busy and (st["queued"] == 0 or budget_left == 0)
        return CrawlStatus(queued=st["queued"], leased=st["leased"], fetched=st["fetched"], done=st["done"],
                           failed=st["failed"], seen=st["seen"], pages=self.pages, in_flight=len(self.in_flight),
                           handoff_in_flight=len(self.handoff_sent), documents=self.documents, budget_left=budget_left,
                           idle=bool(idle), hosts=len(self.hosts), learner=self.learner, learner_unscored=self.unscored,
                           waiting_for_learner=self.waiting_since is not None,
                           learner_wait_s=self._pacing().get("learner_wait_s", 0.0), extractors=self._loads())

    @handles(Enqueue)
    def on_enqueue(self, msg: Enqueue, env: Envelope) -> EnqueueResult:
        self._require_ready()
        result = EnqueueResult()
        entries = []
        for raw in msg.urls:
            try:
                url = normalize(raw)
            except BadURL as exc:
                result.rejected[raw] = str(exc)
                continue
            self.scope.add(host_of(url))   # asking for a host puts it in scope
            entries.append(Entry(url=url, depth=msg.depth, priority=msg.priority))
        result.added = self.frontier.add(entries)
        for e in entries:
            if e.url not in result.added:
                result.rejected.setdefault(e.url, "already seen")
        self.reactor.call_later(0, self._pump)
        return result

    def _reprioritize_buffered(self, url: str, priority: float) -> bool:
        """A URL taken from the frontier but not fetched yet: its new priority reorders its host's buffer."""
        hs = self.hosts.get(host_of(url))
        if hs is None:
            return False
        for entry in hs.queue:
            if entry.url == url:
                hs.queue.remove(entry)
                entry.priority = float(priority)
                _insert_by_priority(hs.queue, entry)
                return True
        return False

    @handles(Prioritize)
    def on_prioritize(self, msg: Prioritize, env: Envelope) -> Deferred:
        """New priorities, applied in slices of at most PRIORITIZE_SLICE_S, one slice per turn of the loop, frames in
        the order they came; the reply comes with the last slice. A frame carries up to 5 000 URLs (the curiosity agent
        rescoring everything pending) and each URL is a frontier write: applied in one go under load (~1 ms a URL on
        two busy cores) that kept the loop, and with it the heartbeats, for seconds, and the twin declared the
        coordinator dead. A retry of the frame while it is applied is answered with it (Deferred)."""
        self._require_ready()
        reply = Deferred()
        self._prioritizing.append((iter(msg.priorities.items()), PrioritizeResult(), reply))
        if len(self._prioritizing) == 1:
            self.reactor.call_later(0, self._prioritize_slice)
        return reply

    def _prioritize_slice(self) -> None:
        if not self._prioritizing:
            return
        items, result, reply = self._prioritizing[0]
        deadline = time.monotonic() + PRIORITIZE_SLICE_S
        try:
            while chunk := list(itertools.islice(items, PRIORITIZE_CHUNK)):
                self._prioritize(chunk, result)
                if time.monotonic() >= deadline:
                    break
            else:
                self._prioritizing.popleft()
                reply.resolve(result)
        except FrontierUnavailable as exc:
            self._prioritizing.popleft()
            self.degraded("frontier", exc)
            reply.fail("unavailable", f"frontier unavailable: {exc}")
        if self._prioritizing:
            self.reactor.call_later(0, self._prioritize_slice)

    def _prioritize(self, chunk: list[tuple[str, float]], result: PrioritizeResult) -> None:
        if self.frontier is None:
            raise FrontierUnavailable("the coordinator has closed its frontier")
        wanted: dict[str, tuple[str, float]] = {}
        for raw, priority in chunk:
            try:
                wanted[normalize(raw)] = (raw, priority)
            except BadURL:
                result.not_queued.append(raw)
        changed = self.frontier.set_priorities({url: priority for url, (_, priority) in wanted.items()})
        for url, (raw, priority) in wanted.items():
            if url in changed or self._reprioritize_buffered(url, priority):
                result.updated += 1
            else:
                result.not_queued.append(raw)

    def _fail_prioritizing(self, code: str, message: str) -> None:
        while self._prioritizing:
            _, _, reply = self._prioritizing.popleft()
            reply.fail(code, message)
