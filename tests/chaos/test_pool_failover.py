"""Chaos for a pool of extractors: the crawl hands its pages to two extractors on two lab hosts, and loses one.

testing/poollab.py sets up the shipped placement on two lab hosts (network namespaces on a veth link,
testing/lab.py): the twin on MainPC, the crawl coordinator and extractor-1 on PC2, extractor-2 on MainPC, one
extraction worker each, python3-doc served inside PC2, no politeness delay, so pages queue for the extractors and
both hold a full hand-off window. The hand-off timeout is 300 s: nothing here may wait for it.

* SIGKILL of extractor-1 (beside the coordinator) with pages in its hands: the twin sees its new process register,
  the coordinator gives it up and hands what it held to extractor-2 at once; the crawl goes on, at least at half
  its rate before the kill, and extractor-1 gets pages again once it is ready.
* The link to MainPC cut with pages in extractor-2's hands: the coordinator hears neither the twin (on MainPC) nor
  extractor-2, so its own pings give extractor-2 up after the dead time (3 s) and its pages go to extractor-1; the
  crawl goes on across the cut; with the link back, extractor-2 gets pages again.

Both measure the time from the fault to every page the lost replica held being sent to the other (target: within
the twin's dead time, 3 s), and end with the crawl idle, every fetched page stored exactly once (one row per URL,
exactly the pages fetched), none left fetched or queued. Figures: printed, and test-output/pool_failover.json.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from mesh.config import load_config
from testing.harness import ROOT, wait_for
from testing.lab import Lab, available
from testing.poollab import PYDOC, PoolLab, fetched_urls
from testing.system import missing, reason

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEAD_AFTER_S = 3.0   # poollab: heartbeat_interval_s 1.0 x dead_after_missed 3
OUTPUT = Path(os.environ.get("MESH_TEST_OUTPUT", ROOT / "test-output"))
CRAWL = {"max_depth": 3, "max_pages": 600, "politeness_s": 0.0, "per_host_concurrency": 8, "concurrency": 16,
         "handoff_window": 8, "handoff_timeout_s": 300.0}


@pytest.fixture
def lab():
    ok, why = available()
    if not ok:
        missing(why)
    if not (PYDOC / "index.html").exists():
        missing(reason("python3-doc"))
    with Lab(("mainpc", "pc2")) as lab:
        yield lab
    assert not lab.leftovers(), "the lab left namespaces behind"


def loads(st: dict) -> dict[str, dict]:
    return {e["agent"]: e for e in st["extractors"]}


def rate(pool: PoolLab, start: float, end: float) -> float:
    """Pages stored per second between two unix times, from the poller's readings."""
    got = [(r["t"], r["st"]["documents"]) for r in pool.history if "st" in r and start <= r["t"] <= end]
    if len(got) < 2 or got[-1][0] - got[0][0] < 1.0:
        return 0.0
    return (got[-1][1] - got[0][1]) / (got[-1][0] - got[0][0])


def exactly_once(pool: PoolLab) -> dict:
    """Every fetched page stored once: one row per URL, exactly the pages fetched; nothing left fetched or queued."""
    st = pool.wait_idle(timeout=600)
    assert st["fetched"] == 0 and st["queued"] == 0, st
    cfg = load_config(pool.config)
    fetched = fetched_urls(cfg.raw_dir)
    with sqlite3.connect(cfg.store_url("documents")[len("sqlite:///"):]) as db:
        urls = [u for (u,) in db.execute("select url from documents")]
    assert len(urls) == len(set(urls)), "a page stored twice"
    assert set(urls) == fetched, (len(urls), len(fetched))
    return {"pages": len(urls), "status": st}


def record(name: str, figures: dict) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / "pool_failover.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


def test_a_killed_extractor_hands_its_pages_to_the_other_at_once(lab, tmp_path):
    with PoolLab(lab, tmp_path, {"pc2": 1, "mainpc": 1}, crawler=CRAWL) as pool:
        pool.start()
        pool.wait(lambda st: st["documents"] >= 40 and all(e["in_flight"] >= 4 for e in st["extractors"]), 240,
                  "both extractors busy with pages in their hands")
        time.sleep(4.0)   # a span to measure the rate before the kill on
        victim = pool.pids()["extractor-1"]
        held = loads(pool.status)["extractor-1"]["in_flight"]
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        lost = pool.wait(lambda st: (e := loads(st)["extractor-1"])["lost"] >= 1 and e["handon_s"] is not None,
                         DEAD_AFTER_S * 10, "extractor-1's pages handed on")["extractors"][0]
        handed = lost["lost_at"] + lost["handon_s"] - killed
        time.sleep(5.0)
        before, after = rate(pool, killed - 5.0, killed), rate(pool, killed, killed + 5.0)
        back = pool.wait(lambda st: loads(st)["extractor-1"]["usable"] and loads(st)["extractor-1"]["in_flight"] > 0,
                         60, "extractor-1 back and given pages")
        done = exactly_once(pool)
        ack = {a: e["acknowledged"] for a, e in loads(done["status"]).items()}
        record("kill", {"held": held, "kill_to_given_up_s": round(lost["lost_at"] - killed, 2),
                        "kill_to_handed_on_s": round(handed, 2), "rate_before": round(before, 2),
                        "rate_after": round(after, 2), "pages": done["pages"], "per_extractor": ack})
        assert held > 0 and handed <= DEAD_AFTER_S, handed
        assert after >= 0.5 * before, (before, after)
        assert back and all(n > 0 for n in ack.values())


def test_a_cut_link_hands_the_far_extractors_pages_to_the_near_one(lab, tmp_path):
    with PoolLab(lab, tmp_path, {"pc2": 1, "mainpc": 1}, crawler=CRAWL) as pool:
        pool.start()
        pool.wait(lambda st: st["documents"] >= 40 and loads(st)["extractor-2"]["in_flight"] >= 4, 240,
                  "pages in the hands of extractor-2, across the link")
        held = loads(pool.status)["extractor-2"]["in_flight"]
        cut = time.time()
        lab.cut()
        try:
            lost = pool.wait(lambda st: (e := loads(st)["extractor-2"])["lost"] >= 1 and e["handon_s"] is not None,
                             DEAD_AFTER_S * 10, "extractor-2's pages handed on")
            e2 = loads(lost)["extractor-2"]
            handed = e2["lost_at"] + e2["handon_s"] - cut
            docs = lost["documents"]
            pool.wait(lambda st: st["documents"] >= docs + 10, 60, "pages stored while the link is cut")
            during = rate(pool, e2["lost_at"] + e2["handon_s"], time.time())
            why = loads(pool.status)["extractor-2"]["why_not"]
            time.sleep(max(0.0, cut + 10.0 - time.time()))
        finally:
            lab.restore()
        restored = time.time()
        back = pool.wait(lambda st: loads(st)["extractor-2"]["usable"] and loads(st)["extractor-2"]["in_flight"] > 0,
                         60, "extractor-2 given pages again after the link came back")
        back_s = pool.history[-1]["t"] - restored
        done = exactly_once(pool)
        ack = {a: e["acknowledged"] for a, e in loads(done["status"]).items()}
        record("link_cut", {"held": held, "cut_to_given_up_s": round(e2["lost_at"] - cut, 2),
                            "cut_to_handed_on_s": round(handed, 2), "rate_during_cut": round(during, 2),
                            "why_not": why, "restore_to_pages_again_s": round(back_s, 2), "pages": done["pages"],
                            "per_extractor": ack})
        assert held > 0 and handed <= DEAD_AFTER_S + 1.0, handed
        assert back and why.startswith("no answer")
