"""The crawl coordinator and the extractor, end to end, against a real web site on loopback.

Real agents on real sockets, real HTTP (tests/site.py), real SQLite files; the variant at the
end runs the same crawl on real PostgreSQL and Redis. Nothing here is mocked.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time

import httpx
import pytest

from agents.contracts import CrawlStatusRequest, Enqueue, Prioritize
from agents.crawler.frontier import open_frontier
from agents.crawler.rawstore import RawStore
from mesh.control import client
from network.messages import Ping
from store.docstore import open_docstore
from testing.harness import mesh_dict, wait_for
from testing.procs import alive, descendants
from tests.site import Site

FAST = {"politeness_s": 0.05, "timeout_s": 1.5, "retry_backoff_s": 0.1, "max_retries": 2, "per_host_concurrency": 2,
        "max_bytes": 200_000, "handoff_timeout_s": 5.0}


def crawl_config(site: Site, *, stores: dict | None = None, extractor: dict | None = None, **settings) -> dict:
    data = mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1, **(extractor or {})}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": [site.url("/")], **FAST, **settings}},
    })
    if stores:
        data["stores"] = stores
    return data


def wait_idle(cfg, timeout: float = 60.0):
    with client(cfg, "crawler", timeout=1.0) as c:
        return wait_for(lambda: (st := c.request(CrawlStatusRequest())).idle and st.done and st, timeout=timeout,
                        interval=0.1, what="the crawl to finish")


def frontier_rows(cfg) -> dict[str, dict]:
    f = open_frontier(cfg.store_url("frontier"), prefix=cfg.stores.frontier_prefix)
    try:
        with sqlite3.connect(cfg.store_url("frontier")[len("sqlite:///"):]) as db:
            urls = [u for (u,) in db.execute("select url from frontier")]
        return {u: f.get(u) for u in urls}
    finally:
        f.close()


@pytest.fixture
def site():
    with Site(pages=6, slow_s=3.0, big_bytes=600_000) as s:
        yield s


def test_crawl_of_a_local_site(site, write_config, run_agents):
    _, cfg = write_config(crawl_config(site, max_depth=2))
    run_agents(cfg, "twin", "extractor", "crawler")
    status = wait_idle(cfg)
    rows = frontier_rows(cfg)
    by_path = {u.split(site.host, 1)[1]: r for u, r in rows.items()}
    docs = open_docstore(cfg.store_url("documents"))
    try:
        # robots.txt: asked once, the disallowed page never requested and recorded as refused
        assert len(site.hits("/robots.txt")) == 1
        assert "/private/secret.html" not in site.paths()
        assert by_path["/private/secret.html"]["error"] == "disallowed by robots.txt"
        # depth limit 2: /b pages fetched, /c pages never
        assert any(p.startswith("/b/") for p in site.paths())
        assert not any(p.startswith(("/c/", "/d/")) for p in site.paths())
        # redirects: followed as new URLs, the endless chain cut at max_redirects (5)
        assert by_path["/redirect/to-a1"]["status"] == 301
        assert len(site.hits("/redirect/to-a1")) == 1 and len(site.hits("/a/1.html")) == 1
        chain = sorted(p for p in site.paths() if p.startswith("/redirect/chain/"))
        assert len(chain) == 6, chain
        assert "too many redirects" in by_path["/redirect/chain/5"]["error"]
        # errors are recorded: 404 as is, 500 and timeouts after their retries, the flaky page recovered
        assert (by_path["/missing.html"]["state"], by_path["/missing.html"]["status"]) == ("failed", 404)
        assert by_path["/error.html"]["status"] == 500 and len(site.hits("/error.html")) == 3
        assert by_path["/slow.html"]["state"] == "failed" and "timed out" in by_path["/slow.html"]["error"]
        assert by_path["/flaky.html"]["state"] == "done" and docs.get(site.url("/flaky.html")).state == "extracted"
        # the oversized page is cut at the cap, recorded as truncated, and still extracted
        raw = RawStore(cfg.raw_dir)
        big = raw.fetches(site.url("/big.html"))
        assert len(big) == 1 and big[0].truncated and big[0].size == FAST["max_bytes"]
        assert len(raw.get(big[0].content_hash)) == FAST["max_bytes"]
        raw.close()
        # non-HTML: the image is skipped, the PDF goes to its backend
        assert by_path["/image.png"]["error"].startswith("skipped: content type image/png")
        assert docs.get(site.url("/image.png")) is None
        pdf = docs.get(site.url("/doc.pdf"))
        assert pdf.state == "extracted" and "Portable fixture document" in pdf.text
        # pages without main text are stored with the reason; broken HTML still yields its text
        assert docs.get(site.url("/empty.html")).state == "failed"
        assert docs.get(site.url("/empty.html")).error == "no main text found"
        assert docs.get(site.url("/broken.html")).state == "extracted"
        # outlinks with their anchor text; fragments, mailto: and other hosts' links handled
        index = docs.get(site.url("/"))
        assert index.title and index.language == "en" and index.published
        links = {link["url"]: link["anchor"] for link in index.outlinks}
        assert site.url("/a/1.html") in links and links[site.url("/a/1.html")]
        assert not any("#" in u or u.startswith("mailto:") for u in links)
        assert not any("other.invalid" in u for u in rows)
        # every fetched HTML page is a document, exactly once
        expected = site.expected_html_pages(2, retries=2, timeout_s=FAST["timeout_s"], max_bytes=10**9) | {site.url("/doc.pdf")}
        stored = {d.url for d in docs.documents()}
        assert stored == expected
        assert docs.count() == len(stored) == status.documents
        # the twin's dashboard shows the same figures (heartbeat gauges)
        board = f"http://127.0.0.1:{cfg.mesh.base_port + 80}/api/state"
        extracted = sum(d.state == "extracted" for d in docs.documents())
        want = {"stored": status.documents, "extracted": extracted, "fetched": status.pages, "frontier": 0,
                "failed": status.failed}
        wait_for(lambda: {k: httpx.get(board).json()["pipeline"].get(k) for k in want} == want, timeout=10,
                 what=f"the crawl's figures on the dashboard: {want}")
    finally:
        docs.close()


@pytest.mark.parametrize("politeness,robots", [(0.3, None), (0.0, "User-agent: *\nCrawl-delay: 0.3\n")],
                         ids=["politeness_s", "crawl-delay"])
def test_politeness_delay_between_requests_to_one_host(politeness, robots, write_config, run_agents):
    with Site(pages=2, robots=robots, slow_s=0.1) as site:
        _, cfg = write_config(crawl_config(site, max_depth=1, politeness_s=politeness, per_host_concurrency=1,
                                           max_pages=12))
        run_agents(cfg, "twin", "extractor", "crawler")
        wait_idle(cfg)
        starts = sorted(h.t for h in site.requests)
    assert len(starts) >= 10
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # measured on the server's clock, so scheduling jitter may shave a little off a gap
    assert min(gaps) >= 0.3 - 0.06, [round(g, 3) for g in gaps]


def test_page_budget_and_requests(site, write_config, run_agents):
    path, cfg = write_config(crawl_config(site, max_depth=4, max_pages=8, politeness_s=0.0))
    run_agents(cfg, "twin", "extractor", "crawler")
    status = wait_idle(cfg)
    assert status.budget_left == 0 and status.queued > 0
    fetched = [p for p in site.paths() if p != "/robots.txt"]
    assert len(fetched) <= 8, fetched
    with client(cfg, "crawler", timeout=2.0) as c:
        # another agent can reorder the frontier and add URLs (the page budget still holds)
        queued = [u for u, r in frontier_rows(cfg).items() if r["state"] == "queued"]
        reply = c.request(Prioritize(priorities={queued[-1]: 50.0, "http://nowhere.invalid/x": 1.0}))
        assert reply.updated == 1 and reply.not_queued == ["http://nowhere.invalid/x"]
        added = c.request(Enqueue(urls=[site.url("/a/3.html#x"), site.url("/"), "ftp://x/y"], priority=3.0))
        assert added.added == [site.url("/a/3.html")] or site.url("/a/3.html") in added.rejected
        assert added.rejected["ftp://x/y"].startswith("not an http(s) URL")
        assert added.rejected[site.url("/")] == "already seen"
    # the same through meshctl
    import json
    import subprocess
    import sys

    from testing.harness import ROOT

    def meshctl(*args):
        return subprocess.run([sys.executable, "-m", "ops.meshctl", *args, "--config", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    r = meshctl("crawl", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["budget_left"] == 0
    r = meshctl("crawl", "add", site.url("/b/5.html"), "mailto:x@y")
    assert r.returncode == 0, r.stderr
    assert "not added mailto:x@y: not an http(s) URL" in " ".join(r.stdout.split())


@pytest.mark.slow   # kills or stops agents mid-run: a chaos test, 10-20 s on 2 cores
@pytest.mark.parametrize("victim", ["extractor", "crawler"])
def test_agent_killed_mid_crawl_every_page_stored_once(victim, tmp_path, write_config, mesh_up):
    """SIGKILL the extractor (or the coordinator) while pages are in flight; the supervisor restarts
    it and unacknowledged pages are delivered again: each fetched page ends in the store exactly once."""
    with Site(pages=20, slow_s=0.1) as site:
        # no politeness delay: fetching outpaces the one extraction worker, so pages queue for hand-off
        path, cfg = write_config(crawl_config(site, max_depth=3, politeness_s=0.0, per_host_concurrency=4,
                                              handoff_timeout_s=2.0))
        up = mesh_up(path, "--restart-backoff", "0.3")
        with client(cfg, victim, timeout=1.0) as v, client(cfg, "crawler", timeout=1.0) as cr:
            wait_for(lambda: (st := cr.request(CrawlStatusRequest())).documents >= 8 and st.handoff_in_flight > 4,
                     timeout=60, interval=0.02, what="documents stored and pages in the extractor's hands")
            pid = v.request(Ping()).pid
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: v.request(Ping()).pid != pid, timeout=30, what=f"the {victim} restarted")
        status = wait_idle(cfg, timeout=120)
        assert status.fetched == 0 and status.queued == 0
        up.stop()
        docs = open_docstore(cfg.store_url("documents"))
        raw = RawStore(cfg.raw_dir)
        try:
            fetched_ok = {r.url for r in raw.fetches() if r.status == 200 and r.error is None}
            urls = [d.url for d in docs.documents()]
            assert len(urls) == len(set(urls))
            assert set(urls) == fetched_ok == site.expected_html_pages(3, timeout_s=FAST["timeout_s"]) | {
                site.url("/doc.pdf")}
        finally:
            docs.close()
            raw.close()
        # the kill really caught pages in flight: the coordinator had to deliver some again
        log = (cfg.mesh.data_dir / "logs" / "crawler.log").read_text()
        if victim == "extractor":
            assert "delivering again" in log
        else:
            # its restart found leased URLs to requeue or fetched pages to deliver again
            assert re.search(r"\b[1-9]\d* requeued after a stop|\b[1-9]\d* page\(s\) to hand off again", log), log[-2000:]


@pytest.mark.slow   # kills or stops agents mid-run: a chaos test, 10-20 s on 2 cores
def test_a_killed_extractor_is_sent_its_pages_again_at_once_and_leaves_no_workers(tmp_path, write_config, mesh_up):
    """SIGKILL the extractor with pages in its hands and a 300 s hand-off timeout: the twin reports it dead or
    restarted and the coordinator delivers those pages again at once, so the crawl ends long before the timeout
    would have; and its extraction workers (under the forkserver, not under the agent) end with it."""
    with Site(pages=20, slow_s=0.1) as site:
        path, cfg = write_config(crawl_config(site, max_depth=3, politeness_s=0.0, per_host_concurrency=4,
                                              handoff_timeout_s=300.0, extractor={"workers": 2}))
        up = mesh_up(path, "--restart-backoff", "0.3")
        with client(cfg, "extractor", timeout=1.0) as ex, client(cfg, "crawler", timeout=1.0) as cr:
            wait_for(lambda: (st := cr.request(CrawlStatusRequest())).documents >= 8 and st.handoff_in_flight > 4,
                     timeout=60, interval=0.02, what="documents stored and pages in the extractor's hands")
            pid = ex.request(Ping()).pid
            workers = descendants(pid)
            assert len(workers) >= 3, workers          # the forkserver and its 2 workers at least
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not any(map(alive, workers)), timeout=10, what=f"the dead extractor's processes {workers} to end")
            wait_for(lambda: ex.request(Ping()).pid != pid, timeout=30, what="the extractor restarted")
        status = wait_idle(cfg, timeout=90)             # the timeout would have held the pages for 300 s
        assert status.fetched == 0 and status.queued == 0
        up.stop()
        docs = open_docstore(cfg.store_url("documents"))
        try:
            urls = [d.url for d in docs.documents()]
            assert len(urls) == len(set(urls))
            assert set(urls) == site.expected_html_pages(3, timeout_s=FAST["timeout_s"]) | {site.url("/doc.pdf")}
        finally:
            docs.close()
        log = (cfg.mesh.data_dir / "logs" / "crawler.log").read_text()
        assert re.search(r"extractor extractor is (dead|starting) .* with [1-9]\d* page\(s\) in its hands", log), log[-3000:]


@pytest.mark.parametrize("backends", ["postgres-redis"])
def test_the_same_crawl_on_postgresql_and_redis(site, write_config, run_agents, postgres_url, redis_url, backends):
    _, cfg = write_config(crawl_config(site, max_depth=1, stores={"documents": postgres_url, "frontier": redis_url,
                                                                  "frontier_prefix": "crawl-test"}))
    run_agents(cfg, "twin", "extractor", "crawler")
    status = wait_idle(cfg)
    docs = open_docstore(postgres_url)
    try:
        stored = {d.url for d in docs.documents()}
        assert stored == site.expected_html_pages(1, retries=2, timeout_s=FAST["timeout_s"], max_bytes=10**9) | {
            site.url("/doc.pdf")}
        assert status.documents == len(stored) and status.fetched == 0
    finally:
        docs.close()


def test_fetches_the_frontier_could_not_record_are_fetched_again(site, write_config, run_agents, monkeypatch):
    """The frontier fails to take a few fetch outcomes (its Redis went away): those URLs are fetched again once
    it answers, not left leased (idle crawl, pages never stored) until the coordinator restarts."""
    from agents.crawler.frontier import FrontierUnavailable, SQLiteFrontier

    refused: list[str] = []
    mark_fetched = SQLiteFrontier.mark_fetched

    def flaky(self, url: str, fetch_id: str) -> None:
        if len(refused) < 3:
            refused.append(url)
            raise FrontierUnavailable("the frontier went away (test)")
        mark_fetched(self, url, fetch_id)

    monkeypatch.setattr(SQLiteFrontier, "mark_fetched", flaky)
    _, cfg = write_config(crawl_config(site, max_depth=1))
    run_agents(cfg, "twin", "extractor", "crawler")
    status = wait_idle(cfg)
    rows = frontier_rows(cfg)
    assert len(refused) == 3 and all(rows[u]["state"] == "done" for u in refused)
    for url in set(refused):   # fetched again after each refusal, then recorded
        assert len(site.hits(url.split(site.host, 1)[1])) == refused.count(url) + 1
    assert status.leased == 0 and all(r["state"] in ("done", "failed") for r in rows.values())
    docs = open_docstore(cfg.store_url("documents"))
    try:
        assert {d.url for d in docs.documents()} == site.expected_html_pages(
            1, retries=2, timeout_s=FAST["timeout_s"], max_bytes=10**9) | {site.url("/doc.pdf")}
    finally:
        docs.close()


def test_extractor_refuses_bad_pages_and_keeps_serving(write_config, run_agents):
    import zstandard

    from network.rpc import MeshError
    from tests.samples import SAMPLES

    _, cfg = write_config(mesh_dict({"extractor": {"kind": "extractor", "depends_on": ["twin"],
                                                   "settings": {"workers": 0, "max_body_bytes": 4096}}}))
    run_agents(cfg, "twin", "extractor")
    page = SAMPLES["extract.page"]
    with client(cfg, "extractor", timeout=5.0) as c:
        wait_for(lambda: c.request(Ping()).state == "ready", what="extractor ready")
        for body, code in [(b"not zstd at all", "invalid_body"),
                           (zstandard.ZstdCompressor().compress(b"x" * 10_000), "too_large")]:
            with pytest.raises(MeshError) as exc:
                c.request(page.model_copy(update={"body_zstd": body}))
            assert exc.value.code == code
        html = b"<html><body><p>" + b"A real paragraph of text that is long enough to count. " * 5 + b"</p></body></html>"
        ok = page.model_copy(update={"body_zstd": zstandard.ZstdCompressor().compress(html)})
        first = c.request(ok)
        assert (first.state, first.outcome) == ("extracted", "inserted")
        again = c.request(ok.model_copy())   # delivered twice (a lost acknowledgement): stored once
        assert (again.outcome, again.document_id) == ("unchanged", first.document_id)
    docs = open_docstore(cfg.store_url("documents"))
    try:
        assert docs.count() == 1
    finally:
        docs.close()


def test_unreachable_host_fails_its_urls_and_the_crawl_goes_on(site, write_config, run_agents):
    """A host that refuses connections: its robots.txt is asked again a bounded number of times, then its URLs
    fail with the reason (RFC 9309: no robots.txt answer, no crawling), and the reachable site is crawled."""
    from tests.services import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    _, cfg = write_config(crawl_config(site, max_depth=1, robots_retry_s=0.2, max_retries=1))
    run_agents(cfg, "twin", "extractor", "crawler")
    with client(cfg, "crawler", timeout=2.0) as c:
        wait_for(lambda: c.request(Ping()).state == "ready", what="crawler ready")
        added = c.request(Enqueue(urls=[f"{dead}/a.html", f"{dead}/b.html"]))
        assert len(added.added) == 2
    status = wait_idle(cfg)
    rows = frontier_rows(cfg)
    for path in ("/a.html", "/b.html"):
        row = rows[f"{dead}{path}"]
        assert row["state"] == "failed" and row["error"].startswith("robots.txt unreachable: ConnectError"), row
    assert rows[site.url("/a/1.html")]["state"] == "done" and status.documents > 5


@pytest.mark.slow   # about 15 s: a polite crawl, so the reordering has time to show
def test_new_priorities_reorder_a_polite_crawl(write_config, run_agents):
    """crawl.prioritize reaches URLs still in the frontier and URLs already taken into the host's buffer: on a
    polite single-host crawl, the links given the highest priorities are fetched next, ahead of earlier links."""
    from agents.contracts import Prioritize

    with Site(pages=12) as site:
        _, cfg = write_config(crawl_config(site, max_depth=1, politeness_s=0.3, per_host_concurrency=1))
        run_agents(cfg, "twin", "extractor", "crawler")
        with client(cfg, "crawler", timeout=2.0) as c:
            wait_for(lambda: c.request(CrawlStatusRequest()).seen >= 12, timeout=20, interval=0.02,
                     what="the index's links in the frontier")
            late = [site.url(f"/a/{i}.html") for i in (12, 11, 10)]
            reply = c.request(Prioritize(priorities={u: 100.0 - i for i, u in enumerate(late)}))
            assert reply.updated == 3 and not reply.not_queued
            asked = len(site.requests)
        wait_idle(cfg)
    order = [h.path for h in site.requests[asked:] if h.path.startswith("/a/")]
    # at most one fetch was already under way when the priorities came
    assert order.index("/a/12.html") <= 1 and order.index("/a/11.html") <= 2 and order.index("/a/10.html") <= 3, order
    rest = order[1:]                       # after the fetch that may have been under way
    assert all(rest.index("/a/10.html") < rest.index(f"/a/{i}.html") for i in range(2, 10) if f"/a/{i}.html" in rest)


@pytest.mark.slow   # kills or stops agents mid-run: a chaos test, 10-20 s on 2 cores
def test_the_crawl_waits_for_a_learner_that_falls_behind_and_not_for_one_that_is_gone(write_config, mesh_up):
    """Pacing by the learner: with the topic model stopped (SIGSTOP) the crawl starts no new fetch once more than
    max_unscored (by default the topic model's batch_docs) stored documents wait for it; when the twin declares it
    dead the crawl goes on without it; back (SIGCONT), it catches up, and every page ends stored once and scored."""
    with Site(pages=30, slow_s=0.1) as site:
        path, cfg = write_config(mesh_dict({
            "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1}},
            "topics": {"kind": "topic_model", "depends_on": ["twin"],
                       "settings": {"poll_s": 0.1, "batch_docs": 4, "max_chunks": 2}},
            "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor", "topics"],   # learning from page 1
                        "settings": {"seeds": [site.url("/")], **FAST, "max_depth": 3, "politeness_s": 0.02,
                                     "concurrency": 2, "handoff_window": 2}},   # max_unscored: batch_docs
        }, heartbeat_interval_s=0.5, dead_after_missed=12))   # the twin: dead after 6 s of silence
        mesh_up(path)
        with client(cfg, "crawler", timeout=1.0) as cr, client(cfg, "topics", timeout=1.0) as tm:
            wait_for(lambda: cr.request(CrawlStatusRequest()).learner_unscored is not None, timeout=90, interval=0.05,
                     what="the crawler to hear from the learner")
            assert cr.request(CrawlStatusRequest()).learner == "topics"
            pid = tm.request(Ping()).pid
            os.kill(pid, signal.SIGSTOP)
            try:
                held = wait_for(lambda: (st := cr.request(CrawlStatusRequest())).waiting_for_learner and st,
                                timeout=20, interval=0.05, what="new fetches to wait for the stopped learner")
                assert held.learner_unscored > 4 and not held.idle
                time.sleep(1.5)            # what was under way when it began to wait is stored; nothing new starts
                still = cr.request(CrawlStatusRequest())
                assert still.waiting_for_learner and still.in_flight == 0
                assert still.done + still.failed <= held.done + held.failed + 4, (held, still)
                # the twin declares the silent learner dead: the crawl no longer waits for it
                gone = wait_for(lambda: not (st := cr.request(CrawlStatusRequest())).waiting_for_learner and st,
                                timeout=20, interval=0.1, what="the crawl to go on without the dead learner")
                wait_for(lambda: cr.request(CrawlStatusRequest()).done > gone.done, timeout=10,
                         what="pages stored while the learner is down")
            finally:
                os.kill(pid, signal.SIGCONT)
            status = wait_idle(cfg, timeout=120)
            assert status.learner_wait_s > 1.0 and status.fetched == 0
        store = open_docstore(cfg.store_url("documents"))
        try:
            wait_for(lambda: not store.pending_topic(1), timeout=120, interval=0.2, what="every document scored")
            urls = [d.url for d in store.documents()]
            assert len(urls) == len(set(urls)) and len(urls) >= 20
        finally:
            store.close()
        log = (cfg.mesh.data_dir / "logs" / "crawler.log").read_text()
        assert re.search(r"new fetches wait for the learner topics: \d+ stored document\(s\) not yet scored "
                         r"\(max_unscored 4\)", log), log[-2000:]
        assert re.search(r"fetches go on after [\d.]+ s waiting for the learner topics: it is down", log), log[-2000:]
