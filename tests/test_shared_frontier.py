"""Several crawl coordinators on one Redis frontier: leases carry their owner (a restart takes back only its own
and dead coordinators' leases), politeness and per_host_concurrency hold for a site across all of them (a shared
per-site slot on the Redis server's clock), and a site's robots.txt is fetched once for all.

A real redis-server (tests/services.py; skipped without it, failing under CI=true), real agents on real sockets
and a real web site on loopback (tests/site.py) for the crawl; nothing mocked.
"""

from __future__ import annotations

import collections
import time

import pytest

from agents.contracts import CrawlStatusRequest
from agents.crawler.frontier import Entry, LeaseLost, open_frontier
from mesh.control import client
from store.docstore import open_docstore
from testing.harness import mesh_dict, wait_for
from tests.site import Site

T0 = 1_700_000_000.0


def u(name: str) -> str:
    return f"http://example.test/{name}"


@pytest.fixture
def two(redis_url: str):
    """Two coordinators' connections to one Redis frontier, `a` and `b`."""
    a, b = open_frontier(redis_url, owner="crawler-1"), open_frontier(redis_url, owner="crawler-2")
    a.keepalive(30.0)
    b.keepalive(30.0)
    yield a, b
    a.close()
    b.close()


# --------------------------------------------------------------------------------------------- leases

def test_a_restart_takes_back_only_its_own_leases_while_the_other_is_alive(two):
    a, b = two
    a.add([Entry(u(str(i))) for i in range(6)])
    mine, theirs = a.pop(3, now=T0), b.pop(3, now=T0)
    assert len(mine) == len(theirs) == 3
    assert {a.get(e.url)["state"] for e in mine + theirs} == {"leased"}
    assert b.recover() == 3                                   # crawler-2 restarts: its own three come back
    assert all(a.get(e.url)["state"] == "leased" for e in mine)
    assert all(a.get(e.url)["state"] == "queued" for e in theirs)
    assert b.reclaim() == 0                                   # crawler-1 is alive: nothing of it is taken
    # each pops what is queued, never what the other holds: every URL leased once
    again = b.pop(10, now=T0)
    assert {e.url for e in again} == {e.url for e in theirs}
    b.release([e.url for e in mine + again])                  # a drain gives back only its own leases
    assert all(a.get(e.url)["state"] == "leased" for e in mine)
    assert all(a.get(e.url)["state"] == "queued" for e in again)
    assert a.stats()["leased"] == 3 and a.stats()["queued"] == 3


def test_a_dead_coordinators_leases_are_taken_back_and_its_late_outcomes_refused(redis_url: str, two):
    a, b = two
    dead = open_frontier(redis_url, owner="crawler-3")
    try:
        dead.keepalive(0.2)
        dead.add([Entry(u("x")), Entry(u("y"))])
        held = dead.pop(2, now=T0)
        assert b.reclaim() == 0                                # alive for 0.2 s
        time.sleep(0.3)
        assert b.reclaim() == 2                                # its liveness ran out: both back in the queue
        got = a.pop(2, now=T0)
        assert {e.url for e in got} == {e.url for e in held}
        # the dead one comes back from a long pause: whatever it says about those URLs is refused
        with pytest.raises(LeaseLost):
            dead.mark_fetched(u("x"), "f1")
        with pytest.raises(LeaseLost):
            dead.retry(u("y"), not_before=T0, error="late")
        with pytest.raises(LeaseLost):
            dead.finish(u("y"), ok=True, status=200)
        dead.release([u("x"), u("y")])                          # not its own any more: left alone
        assert a.get(u("x"))["state"] == "leased"
        a.mark_fetched(u("x"), "f2")
        a.finish(u("y"), ok=True, status=200)
        # fetched pages stay their owner's: only its raw store holds the body, it delivers them after a restart
        assert [e.url for e in a.fetched()] == [u("x")] and b.fetched() == [] and dead.fetched() == []
        with pytest.raises(LeaseLost):
            b.finish(u("x"), ok=True)
        assert a.recover() == 0 and a.get(u("x"))["state"] == "fetched"
    finally:
        dead.close()


def test_an_unnamed_connection_keeps_the_single_coordinator_contract(redis_url: str, two):
    a, _ = two
    a.add([Entry(u("p")), Entry(u("q"))])
    a.pop(2, now=T0)
    tool = open_frontier(redis_url)
    try:
        assert tool.recover() == 2          # no owner: every lease, as before several coordinators existed
    finally:
        tool.close()


# ---------------------------------------------------------------------------------- site slot, robots

def test_the_site_slot_spaces_fetches_and_caps_those_under_way(two):
    a, b = two
    assert a.take_slot("h", "a 1", delay_s=0.3, cap=2, hold_s=5) == 0.0
    wait = b.take_slot("h", "b 1", delay_s=0.3, cap=2, hold_s=5)
    assert 0.2 < wait <= 0.3                                    # the other coordinator waits out the gap
    assert b.take_slot("other", "b 2", delay_s=0.3, cap=2, hold_s=5) == 0.0   # per site
    time.sleep(wait)
    assert b.take_slot("h", "b 1", delay_s=0.0, cap=2, hold_s=5) == 0.0
    assert 0 < a.take_slot("h", "a 2", delay_s=0.0, cap=2, hold_s=5) <= 0.05   # two under way: full
    a.free_slot("h", "a 1")
    assert a.take_slot("h", "a 2", delay_s=0.0, cap=2, hold_s=5) == 0.0
    # a coordinator that died with a fetch under way holds its place only for hold_s
    assert a.take_slot("g", "dead 1", delay_s=0.0, cap=1, hold_s=0.2) == 0.0
    assert a.take_slot("g", "a 3", delay_s=0.0, cap=1, hold_s=5) > 0
    time.sleep(0.25)
    assert a.take_slot("g", "a 3", delay_s=0.0, cap=1, hold_s=5) == 0.0


def test_robots_claim_and_verdict(two):
    a, b = two
    origin = "http://example.test"
    assert b.robots_cached(origin) is None
    assert a.robots_claim(origin, 5.0) and a.robots_claim(origin, 5.0)   # its own claim, extended
    assert not b.robots_claim(origin, 5.0)
    a.robots_store(origin, {"state": "ready", "status": "200", "body": "User-agent: *\nDisallow: /x\n"}, 60.0)
    assert b.robots_cached(origin) == {"state": "ready", "status": "200", "body": "User-agent: *\nDisallow: /x\n"}
    assert b.robots_claim(origin, 5.0)                                    # the claim ended with the verdict
    a.robots_store(origin, {"state": "unreachable", "error": "ConnectError"}, 0.1)
    time.sleep(0.2)
    assert a.robots_cached(origin) is None                                # asked again once it runs out


# ------------------------------------------------------------------------------------ two coordinators

FAST = {"timeout_s": 1.5, "retry_backoff_s": 0.1, "max_retries": 2, "max_bytes": 200_000, "handoff_timeout_s": 5.0}


def two_crawlers(site: Site, redis_url: str, **settings) -> dict:
    data = mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"], "replicas": 2,
                    "settings": {"seeds": [site.url("/")], **FAST, **settings}},
    })
    data["stores"] = {"frontier": redis_url, "frontier_prefix": "shared"}
    return data


def crawl_done(cfg, names: list[str], timeout: float = 90.0) -> list:
    """Waits until both coordinators are idle with every frontier entry settled; their statuses."""
    clients = [client(cfg, n, timeout=1.0) for n in names]
    try:
        def idle():
            sts = [c.request(CrawlStatusRequest()) for c in clients]
            settled = sts[0].queued == sts[0].leased == sts[0].fetched == 0 and sts[0].done
            return settled and all(st.idle for st in sts) and sts
        return wait_for(idle, timeout=timeout, interval=0.1, what="both coordinators idle, the frontier settled")
    finally:
        for c in clients:
            c.close()


@pytest.mark.slow   # a polite crawl by two coordinators: about 15 s on 2 cores
def test_two_coordinators_share_one_frontier_politely(redis_url, write_config, run_agents):
    politeness = 0.25
    with Site(pages=6, slow_s=3.0, big_bytes=600_000) as site:
        _, cfg = write_config(two_crawlers(site, redis_url, max_depth=1, politeness_s=politeness,
                                           per_host_concurrency=1))
        names = cfg.replicas_of("crawler")
        assert names == ["crawler-1", "crawler-2"]
        threads = run_agents(cfg, "twin", "extractor", *names)
        statuses = crawl_done(cfg, names)
        starts = sorted(h.t for h in site.requests)
        hits = collections.Counter(h.path for h in site.requests)
        pages = {n: t.agent.pages for n, t in zip(names, threads[2:])}
    # robots.txt asked once for both coordinators; every URL fetched once (the retried ones: once per attempt)
    assert hits["/robots.txt"] == 1, hits
    retried = {"/error.html", "/slow.html", "/flaky.html"}
    assert all(n == 1 for p, n in hits.items() if p not in retried), hits
    assert hits["/error.html"] == 3 and hits["/flaky.html"] == 3, hits
    assert all(pages.values()), pages           # both coordinators fetched
    print(f"\nfetches per coordinator: {pages}")
    # the site's politeness held across both: measured on the server's clock (scheduling jitter may shave a
    # little off a gap)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) >= 10 and min(gaps) >= politeness - 0.06, [round(g, 3) for g in gaps]
    docs = open_docstore(cfg.store_url("documents"))
    try:
        urls = [d.url for d in docs.documents()]
        assert len(urls) == len(set(urls))
        assert set(urls) == site.expected_html_pages(1, retries=2, timeout_s=FAST["timeout_s"], max_bytes=10**9) | {
            site.url("/doc.pdf")}
        assert sum(st.documents for st in statuses) == len(urls)
    finally:
        docs.close()


@pytest.mark.slow   # two coordinators, one stopped and started again mid-crawl: about 20 s on 2 cores
def test_a_coordinator_restarting_leaves_the_others_leases_alone(redis_url, write_config, run_agents):
    with Site(pages=20, slow_s=0.1) as site:
        _, cfg = write_config(two_crawlers(site, redis_url, max_depth=2, politeness_s=0.05, per_host_concurrency=2,
                                           host_buffer=8))
        names = cfg.replicas_of("crawler")
        _, _, first, second = run_agents(cfg, "twin", "extractor", *names)
        f = open_frontier(redis_url, prefix="shared")
        try:
            def owners():
                leased = f._r.smembers("shared:leased")
                return collections.Counter(f._r.hget(f"shared:e:{url}", "owner") for url in leased)
            held = wait_for(lambda: (o := owners())["crawler-1"] and o, timeout=30, interval=0.01,
                            what="crawler-1 holding leases")
            # fetches under way when crawler-2 drains are cut short and given back: those (only) are fetched again
            cut: set[str] = set()
            drain = second.agent.on_drain
            second.agent.on_drain = lambda: (cut.update(second.agent.in_flight), drain())[1]
            second.stop()                      # a drain gives back crawler-2's own leases only
            assert owners()["crawler-2"] == 0
            [again] = run_agents(cfg, "crawler-2")
            wait_for(lambda: again.agent.frontier is not None, timeout=20, what="crawler-2 started again")
            crawl_done(cfg, names)
        finally:
            f.close()
        hits = collections.Counter(h.path for h in site.requests)
    retried = {"/error.html", "/slow.html", "/flaky.html"}
    again_ok = {url.split(site.host, 1)[1] for url in cut}
    assert all(n == 1 for p, n in hits.items() if p not in retried | again_ok), (hits, held, again_ok)
    assert all(hits[p] <= 2 for p in again_ok - retried), (hits, again_ok)
    assert hits["/robots.txt"] == 1
    docs = open_docstore(cfg.store_url("documents"))
    try:
        urls = [d.url for d in docs.documents()]
        assert len(urls) == len(set(urls))
        assert set(urls) == site.expected_html_pages(2, retries=2, timeout_s=FAST["timeout_s"]) | {
            site.url("/doc.pdf")}
    finally:
        docs.close()
