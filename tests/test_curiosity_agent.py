"""The eviction and curiosity agent in a real mesh: it scores the links the crawl discovers, the coordinator takes
its priorities, the policy learns from the topic model's scores and checkpoints, the hot cache stays within its
budget and everything it evicted is still in the document store, and it knows how stale its signal is (the delay from
fetch to learning, the topic model's backlog, one warning over lag_warn_s); a SIGKILL loses at most the updates since
the last checkpoint, and the crawl goes on while the agent is down."""

from __future__ import annotations

import logging
import os
import re
import signal
import time

import httpx
import pytest

from agents.contracts import CacheGet, CrawlStatusRequest, CuriosityStatusRequest
from mesh.control import client
from network.messages import Ping
from store.docstore import open_docstore
from testing.harness import mesh_dict, wait_for
from tests.site import Site
from tests.test_crawl import FAST, frontier_rows


def pipeline_config(seed: str, *, crawler: dict | None = None, curiosity: dict | None = None) -> dict:
    return mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1}},
        "topics": {"kind": "topic_model", "depends_on": ["twin"],
                   "settings": {"poll_s": 0.2, "batch_docs": 8, "max_chunks": 2}},
        "curiosity": {"kind": "curiosity", "depends_on": ["twin"],
                      "settings": {"coordinator": "crawler", "topic_model": "topics", "checkpoint_every": 5,
                                   **(curiosity or {})}},
        # the crawl starts once the curiosity agent is ready, so that it steers it from the first links
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor", "curiosity"],
                    "settings": {"seeds": [seed], **FAST, "politeness_s": 0.0, **(crawler or {})}},
    }, max_frame_bytes=8 << 20)


def ask(cfg, agent, msg, timeout=5.0):
    with client(cfg, agent, timeout=timeout) as c:
        return c.request(msg)


def test_steers_the_crawl_learns_and_keeps_the_cache_in_budget(write_config, run_agents, caplog):
    with Site(pages=12) as site:
        # a polite crawl (0.1 s between requests), so that links wait in the frontier when their scores come; every
        # page takes longer than lag_warn_s from its fetch to the policy (extraction, a topic model batch)
        _, cfg = write_config(pipeline_config(site.url("/"), crawler={"max_depth": 3, "politeness_s": 0.1},
                                              curiosity={"cache_max_items": 5, "lag_warn_s": 0.05}))
        run_agents(cfg, "twin", "extractor", "topics", "curiosity", "crawler")
        wait_for(lambda: ask(cfg, "crawler", CrawlStatusRequest(), 1.0).idle, timeout=120, interval=0.2,
                 what="the crawl to finish")
        store = open_docstore(cfg.store_url("documents"))
        try:
            wait_for(lambda: not store.pending_topic(1), timeout=120, interval=0.2, what="every document scored")
            extracted = {d.url: d for d in store.documents(state="extracted")}
        finally:
            store.close()
        originals = [u for u, d in extracted.items() if d.duplicate_of is None]   # what the cache takes

        def learned_and_cached():
            s = ask(cfg, "curiosity", CuriosityStatusRequest())
            return s.observed >= 20 and s.cache.items + s.cache.evictions.get("items", 0) >= len(originals) and s

        st = wait_for(learned_and_cached, timeout=60, what="the policy to learn from, and the cache to take, every page")
        assert st.prioritized > 20 and st.updates > 0 and 0 < st.checkpointed_updates <= st.updates
        assert (cfg.mesh.data_dir / "curiosity" / "curiosity.pt").exists()

        # the coordinator took the agent's priorities (its own are minus the depth)
        rows = frontier_rows(cfg)
        steered = [r for r in rows.values() if r["depth"] > 0 and r["priority"] != -float(r["depth"])]
        assert len(steered) >= 20, rows

        # the hot cache: within budget, evictions counted, every evicted document still in the store
        cache = st.cache
        assert cache.backend == "memory" and cache.items <= 5 and cache.max_items == 5
        assert cache.items + cache.evictions["items"] == len(originals)      # every original cached once
        cached_now = [u for u in extracted if ask(cfg, "curiosity", CacheGet(url=u)).source == "cache"]
        assert 0 < len(cached_now) <= 5
        for url, doc in extracted.items():
            got = ask(cfg, "curiosity", CacheGet(url=url, embedding=True))
            assert got.found and got.text == doc.text and got.document_id == doc.id
        assert not ask(cfg, "curiosity", CacheGet(url="http://nowhere.invalid/")).found
        after = ask(cfg, "curiosity", CuriosityStatusRequest()).cache
        assert after.items <= 5 and after.misses >= len(extracted) - 5 - 1

        # how stale its signal is: fetch to learning, a fraction of a second up to the whole crawl here; the topic
        # model's backlog, which its last doc.scored said was 0
        st = wait_for(lambda: (s := ask(cfg, "curiosity", CuriosityStatusRequest())).topic_backlog == 0 and s,
                      timeout=10, what="the topic model's last backlog, 0")
        assert 0 < st.signal_lag_s < 120
        board = f"http://127.0.0.1:{cfg.mesh.base_port + 80}/api/state"
        gauges = wait_for(lambda: next(a["gauges"] for a in httpx.get(board).json()["agents"]
                                       if a["agent"] == "curiosity" and a["gauges"].get("topic_backlog") == 0),
                          timeout=5, what="the signal lag and the backlog in the curiosity agent's next heartbeat")
        assert gauges["signal_lag_s"] > 0
        text = httpx.get(f"http://127.0.0.1:{cfg.port('curiosity', 'metrics')}/metrics", timeout=5).text
        assert float(re.search(r"^curiosity_signal_lag_seconds (\S+)$", text, re.M).group(1)) > 0
        assert re.search(r"^curiosity_topic_backlog_documents 0(\.0)?$", text, re.M)
        # over lag_warn_s all along: one warning, not one a page
        warned = [r for r in caplog.records if r.name == "agent.curiosity" and r.levelno == logging.WARNING
                  and "signal lag" in r.getMessage()]
        assert len(warned) == 1 and "lag_warn_s (0.05s)" in warned[0].getMessage(), [r.getMessage() for r in warned]


@pytest.mark.slow
def test_killed_agent_loses_only_updates_since_its_checkpoint_and_the_crawl_goes_on(pydoc_site, write_config,
                                                                                    mesh_up):
    path, cfg = write_config(pipeline_config(f"{pydoc_site}/index.html",
                                             crawler={"max_depth": 4, "max_pages": 400, "politeness_s": 0.05,
                                                      "per_host_concurrency": 2},
                                             curiosity={"checkpoint_every": 40, "checkpoint_s": 600}))
    # restart the killed agent only after a pause, so the crawl visibly runs without it
    up = mesh_up(path, "--restart-backoff", "8")
    with client(cfg, "curiosity", timeout=1.0) as cur, client(cfg, "crawler", timeout=1.0) as cr:
        before = wait_for(lambda: (s := cur.request(CuriosityStatusRequest())).checkpointed_updates > 0
                          and s.updates > s.checkpointed_updates and s, timeout=180, interval=0.1,
                          what="a checkpoint, and updates after it")
        pid = cur.request(Ping()).pid
        docs_at_kill = cr.request(CrawlStatusRequest()).documents
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # while it is down the coordinator goes on, in the order it was last given
        wait_for(lambda: cr.request(CrawlStatusRequest()).documents >= docs_at_kill + 5, timeout=30, interval=0.1,
                 what="pages stored while the curiosity agent is down")
        assert time.monotonic() - killed_at < 8.0    # the supervisor waits 8 s before it starts the agent again
        wait_for(lambda: cur.request(Ping()).pid != pid, timeout=60, what="the curiosity agent restarted")
        after = wait_for(lambda: (s := cur.request(CuriosityStatusRequest())) and s, timeout=60, what="status")
    log = (cfg.mesh.data_dir / "logs" / "curiosity.log").read_text()
    loaded = [int(n) for n in re.findall(r"curiosity policy ready in [\d.]+s on \w+: (\d+) update\(s\)", log)]
    assert len(loaded) == 2, log[-3000:]
    # the restart resumed from the last checkpoint: nothing before it was lost
    assert before.checkpointed_updates <= loaded[1] <= before.updates + 200
    assert after.updates >= loaded[1]
    up.stop()
