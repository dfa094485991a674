"""The crawl coordinator with a pool of extractors: pages spread by credit over the replicas (each replica's free
hand-off window), this host's replica first; every page stored exactly once. Real agents on real sockets, a real
web site on loopback (tests/site.py), real SQLite; nothing mocked. The failover under faults (a replica killed, the
link to its host cut) is in tests/chaos/test_pool_failover.py."""

from __future__ import annotations

from agents.contracts import CrawlStatusRequest
from mesh.control import client
from store.docstore import open_docstore
from testing.harness import mesh_dict, wait_for
from tests.site import Site

HOSTS = {"mainpc": {"address": "127.0.0.1"}, "pc2": {"address": "127.0.0.2"}}
SETTINGS = {"politeness_s": 0.0, "timeout_s": 1.5, "max_retries": 1, "retry_backoff_s": 0.1, "per_host_concurrency": 4,
            "max_bytes": 200_000, "handoff_timeout_s": 30.0}


def pool_crawl(site: Site, **settings) -> dict:
    """Twin on mainpc; the crawler and extractor-1 on pc2, extractor-2 on mainpc (the shipped placement)."""
    return mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "replicas": {"pc2": 1, "mainpc": 1},
                      "settings": {"workers": 1}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": [site.url("/")], **SETTINGS, **settings}},
    }, hosts=HOSTS, groups={"core": {"host": "mainpc", "agents": ["twin"]},
                            "extract": {"host": "pc2", "agents": ["extractor"]},
                            "crawl": {"host": "pc2", "agents": ["crawler"]}})


def test_pages_spread_over_two_extractors_and_each_is_stored_once(write_config, run_agents):
    with Site(pages=24, slow_s=0.1) as site:
        _, cfg = write_config(pool_crawl(site, max_depth=2, handoff_window=2))
        assert cfg.replicas_of("extractor") == ["extractor-1", "extractor-2"]
        assert [cfg.host_of(r) for r in ("extractor-1", "extractor-2", "crawler")] == ["pc2", "mainpc", "pc2"]
        *_, crawler = run_agents(cfg, "twin", "extractor-1", "extractor-2", "crawler")
        peak: dict[str, int] = {}
        with client(cfg, "crawler", timeout=1.0) as c:
            def finished():
                st = c.request(CrawlStatusRequest())
                for e in st.extractors:
                    peak[e.agent] = max(peak.get(e.agent, 0), e.in_flight)
                return st.idle and st.done and st
            st = wait_for(finished, timeout=90, interval=0.05, what="the crawl to finish")
        loads = {e.agent: e for e in st.extractors}
        assert [(e.agent, e.host) for e in st.extractors] == [("extractor-1", "pc2"), ("extractor-2", "mainpc")]
        # both replicas took pages, none held more than its credit (handoff_window), nothing was lost
        assert all(e.acknowledged > 0 for e in loads.values()), loads
        assert all(e.usable and e.in_flight == 0 and e.credit == 2 and e.lost == 0 for e in loads.values()), loads
        assert max(peak.values()) <= 2, peak
        assert sum(e.acknowledged for e in loads.values()) == st.documents
        assert crawler.agent.late_answers == 0
        docs = open_docstore(cfg.store_url("documents"))
        try:
            urls = [d.url for d in docs.documents()]
            assert len(urls) == len(set(urls)) == st.documents
            assert set(urls) == site.expected_html_pages(2, retries=1, timeout_s=SETTINGS["timeout_s"],
                                                         max_bytes=10**9) | {site.url("/doc.pdf")}
        finally:
            docs.close()
        print(f"\npages per extractor: {({a: e.acknowledged for a, e in loads.items()})}, peak in flight {peak}")


def test_this_hosts_replica_gets_the_pages_while_it_has_credit(write_config, run_agents):
    """A window larger than the crawl: the replica beside the coordinator (extractor-1, pc2) has credit for every
    page, so the other host's replica gets none."""
    with Site(pages=3, slow_s=0.1) as site:
        _, cfg = write_config(pool_crawl(site, max_depth=1, handoff_window=64))
        run_agents(cfg, "twin", "extractor-1", "extractor-2", "crawler")
        with client(cfg, "crawler", timeout=1.0) as c:
            st = wait_for(lambda: (s := c.request(CrawlStatusRequest())).idle and s.done and s, timeout=60,
                          interval=0.1, what="the crawl to finish")
        loads = {e.agent: e.acknowledged for e in st.extractors}
        assert loads == {"extractor-1": st.documents, "extractor-2": 0} and st.documents > 5, loads
