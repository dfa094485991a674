"""Rolling replacement of a pool (ops.rolling.roll). Quick: a pool of two echo agents on threads replaced one at a
time, and a replacement that never gets ready stopping the roll with the rest left running. Slow, under a running
crawl: every replica of a pool of two extractors replaced one at
a time by ops.rolling.roll (what `podman_build.sh deploy HOST` does to a pool's containers), each a `meshctl up
--only REPLICA` process as in its container: SIGTERM (what `podman stop` sends) drains it, the coordinator hands
what it held to the other replica, and the new process must be ready before the next is stopped.

Real processes on loopback, python3-doc served by http.server, real SQLite; nothing mocked. The crawl must go on
throughout and finish with every fetched page stored exactly once (one row per URL, exactly the pages fetched).
Figures (the longest gap between two stored pages during the roll and before it, pages stored during the roll,
each replica's drain and start): printed, and test-output/rolling.json."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agents.contracts import CrawlStatusRequest
from mesh.control import client
from mesh.control import fetch_status
from ops.rolling import RollError, roll
from testing.harness import ROOT, AgentThread, MeshUp, mesh_dict, wait_for
from testing.poollab import fetched_urls

OUTPUT = Path(os.environ.get("MESH_TEST_OUTPUT", ROOT / "test-output"))
CRAWL = {"max_depth": 4, "max_pages": 500, "politeness_s": 0.0, "per_host_concurrency": 8, "concurrency": 16,
         "handoff_window": 8, "handoff_timeout_s": 300.0}


class Poller:
    """The coordinator's crawl.status every 0.1 s, on a thread: (unix time, status dict) readings."""

    def __init__(self, cfg):
        self.cfg, self.readings, self._stop = cfg, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with client(self.cfg, "crawler", timeout=1.0) as c:
                    while not self._stop.is_set():
                        self.readings.append((time.time(), c.request(CrawlStatusRequest()).model_dump(mode="json")))
                        time.sleep(0.1)
            except Exception:
                time.sleep(0.1)

    @property
    def latest(self) -> dict | None:
        return self.readings[-1][1] if self.readings else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time between two stored pages within [start, end] (its ends count as stored pages: a roll
    that stores nothing at all shows its whole length)."""
    points = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in zip(points, points[1:]))


def echo_pool(write_config):
    _, cfg = write_config(mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"], "replicas": 2}},
                                    heartbeat_interval_s=0.3))
    return cfg


def test_replicas_are_replaced_one_at_a_time_each_ready_before_the_next(write_config, run_agents):
    cfg = echo_pool(write_config)
    agents = dict(zip(["twin", "echo-1", "echo-2"], run_agents(cfg, "twin", "echo-1", "echo-2")))
    wait_for(lambda: fetch_status(cfg, timeout=1).mesh_state == "ready", timeout=30, what="the mesh ready")
    seen, lines = [], []

    def states() -> dict[str, str]:
        return {a.agent: a.state for a in fetch_status(cfg, timeout=1).agents}

    def stop(replica: str) -> None:
        seen.append(("stop", replica, states()))
        agents[replica].stop()

    def start(replica: str) -> None:
        seen.append(("start", replica, states()))
        agents[replica] = AgentThread(cfg, replica)

    try:
        steps = roll(cfg, ["echo-1", "echo-2"], stop=stop, start=start, timeout=30, report=lines.append)
    finally:
        for a in agents.values():
            if a.thread.is_alive():
                a.stop()
    assert [(what, r) for what, r, _ in seen] == [("stop", "echo-1"), ("start", "echo-1"), ("stop", "echo-2"),
                                                  ("start", "echo-2")]
    # the other replica was ready at every stop; a replica was gone, as the twin saw it, before its start
    assert seen[0][2]["echo-2"] == "ready" and seen[2][2]["echo-1"] == "ready"
    assert seen[1][2]["echo-1"] in ("stopped", "dead") and seen[3][2]["echo-2"] in ("stopped", "dead")
    assert [s.replica for s in steps] == ["echo-1", "echo-2"] and all(s.ready_s > 0 for s in steps)
    assert lines[0] == "  echo-1: draining (the pool keeps echo-2)" and lines[-1].startswith("  echo-2: ready after")


def test_a_replacement_that_does_not_get_ready_stops_the_roll_leaving_the_rest(write_config, run_agents):
    cfg = echo_pool(write_config)
    agents = dict(zip(["twin", "echo-1", "echo-2"], run_agents(cfg, "twin", "echo-1", "echo-2")))
    wait_for(lambda: fetch_status(cfg, timeout=1).mesh_state == "ready", timeout=30, what="the mesh ready")
    stopped = []

    def stop(replica: str) -> None:
        stopped.append(replica)
        agents[replica].stop()

    with pytest.raises(RollError, match=r"echo-1 not ready after 3s \(it is stopped\)"):
        roll(cfg, ["echo-1", "echo-2"], stop=stop, start=lambda r: None, timeout=3, report=lambda line: None)
    assert stopped == ["echo-1"] and agents["echo-2"].thread.is_alive()
    assert {a.agent: a.state for a in fetch_status(cfg, timeout=1).agents}["echo-2"] == "ready"


def test_a_replica_that_is_not_ready_is_replaced_at_once(write_config, run_agents):
    """A replica that holds no work (down, crash-looping: what the new image may fix) does not wait for another
    to be ready."""
    cfg = echo_pool(write_config)
    agents = dict(zip(["twin", "echo-1"], run_agents(cfg, "twin", "echo-1")))   # echo-2 never started
    wait_for(lambda: {a.agent: a.state for a in fetch_status(cfg, timeout=1).agents}["echo-1"] == "ready",
             timeout=30, what="echo-1 ready")
    lines = []
    try:
        roll(cfg, ["echo-2"], stop=lambda r: None, start=lambda r: agents.setdefault(r, AgentThread(cfg, r)),
             timeout=30, report=lines.append)
    finally:
        for a in agents.values():
            a.stop()
    assert lines[0] == "  echo-2: not ready, so it holds no work: replacing it at once", lines


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_replica_of_a_pool_replaced_one_at_a_time_mid_crawl(write_config, pydoc_site, tmp_path):
    data = mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "replicas": 2, "settings": {"workers": 1}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": [f"{pydoc_site}/index.html"], **CRAWL}},
    }, groups={"core": {"host": "local", "agents": ["twin"]}, "extract": {"host": "local", "agents": ["extractor"]},
               "crawl": {"host": "local", "agents": ["crawler"]}},
        heartbeat_interval_s=1.0, dead_after_missed=3, request_timeout_s=2.0, drain_timeout_s=10.0)
    path, cfg = write_config(data)
    replicas = cfg.replicas_of("extractor")
    assert replicas == ["extractor-1", "extractor-2"]
    ups = {"rest": MeshUp(path, "--only", "twin", "--only", "crawler", "--restart-backoff", "0.3",
                          out=tmp_path / "up-rest.out")}
    for r in replicas:
        ups[r] = MeshUp(path, "--only", r, out=tmp_path / f"up-{r}.out")
    generation = {r: 1 for r in replicas}
    poller = Poller(cfg)

    def stop(replica: str) -> None:
        """What `podman stop` does to the replica's container: SIGTERM to `meshctl up`, which drains it."""
        up = ups[replica]
        up.proc.send_signal(signal.SIGTERM)
        code = up.wait(cfg.mesh.drain_timeout_s + 5)
        assert code == 0 and not up.leftovers, (code, up.leftovers, up.output()[-2000:])

    def start(replica: str) -> None:
        generation[replica] += 1
        ups[replica] = MeshUp(path, "--only", replica, out=tmp_path / f"up-{replica}-{generation[replica]}.out")

    try:
        wait_for(lambda: (st := poller.latest) and st["documents"] >= 40
                 and all(e["acknowledged"] > 0 for e in st["extractors"]), timeout=240, interval=0.1,
                 what="both extractors storing pages")
        time.sleep(3.0)   # a span before the roll to compare with
        began = time.time()
        steps = roll(cfg, replicas, stop=stop, start=start, timeout=120)
        ended = time.time()
        during = poller.latest
        assert not during["idle"], "the crawl ended before the roll did: nothing was measured"
        st = wait_for(lambda: (s := poller.latest) and s["idle"] and s["done"] > 0 and s, timeout=400, interval=0.2,
                      what="the crawl to finish")
    finally:
        poller.stop()
        for up in ups.values():
            up.proc.send_signal(signal.SIGTERM) if up.running() else None
        for up in ups.values():
            up.wait(30)
    assert st["fetched"] == 0, st   # nothing left waiting for an extractor (URLs past the page budget stay queued)

    fetched = fetched_urls(cfg.raw_dir)
    with sqlite3.connect(cfg.store_url("documents")[len("sqlite:///"):]) as db:
        rows = db.execute("select url, extracted_at from documents").fetchall()
    urls = [u for u, _ in rows]
    stored_at = [t for _, t in rows if t is not None]
    lost, twice = len(fetched - set(urls)), len(urls) - len(set(urls))
    before = began - 3.0
    figures = {
        "pages": len(urls), "lost": lost, "stored_twice": twice, "roll_s": round(ended - began, 2),
        "longest_gap_during_roll_s": round(longest_gap(stored_at, began, ended), 2),
        "longest_gap_before_s": round(longest_gap(stored_at, before, began), 2),
        "stored_during_roll": sum(began <= t <= ended for t in stored_at),
        "rate_before": round(sum(before <= t < began for t in stored_at) / 3.0, 1),
        "rate_during_roll": round(sum(began <= t <= ended for t in stored_at) / (ended - began), 1),
        "replicas": {s.replica: {"gone_s": s.gone_s, "ready_s": s.ready_s} for s in steps},
        "per_extractor": {e["agent"]: e["acknowledged"] for e in st["extractors"]},
        "handed_on": {e["agent"]: e["lost"] for e in st["extractors"]},
    }
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "rolling.json").write_text(json.dumps({"process_roll": figures}, indent=2))
    print("\nrolling replacement: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    assert lost == 0 and twice == 0, figures
    assert set(urls) == fetched, (len(urls), len(fetched))
    assert [s.replica for s in steps] == replicas and all(generation[r] == 2 for r in replicas)
    assert figures["stored_during_roll"] > 0 and figures["longest_gap_during_roll_s"] < 10.0, figures
    assert all(n > 0 for n in figures["per_extractor"].values())
