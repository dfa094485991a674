"""Soak: the mesh under a steady load for MESH_SOAK_S seconds (default 600), memory sampled.

A real mesh (`meshctl up`: twin, extractor, crawler, echo publishing every echo, a probe
watching echo's events) while, at the same time:

* a client sends `mesh.echo` requests to the echo agent at a steady SOAK_RPS (default 100 a second),
  timing each round trip;
* every echo is published as an event; the probe counts what it receives (a high-water-mark drop
  would show as received < sent);
* the crawler crawls a generated local site far larger than the run (politeness 0.2 s: a steady
  ~5 pages a second), handing every page to the extractor.

Every agent's resident memory (with its child processes: the extractor's pool) is sampled every
SAMPLE_S. At the end: no request failed, no event was dropped (`mesh_pubsub_dropped_total` 0
everywhere, probe count equal to the echoes sent), every fetched page is stored exactly once, no
agent restarted, and no agent's memory grew between the second and the last third of the run by more
than max(8 MiB, 5 %). The figures (p50/p99/max latency, pages, memory per agent) go to
test-output/soak.json and one `SOAK` line on the terminal.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from agents.contracts import CrawlStatusRequest
from agents.probe import ProbeReport, ProbeWatch
from mesh.control import client, fetch_status
from network.messages import Echo
from network.rpc import MeshError
from store.docstore import open_docstore
from testing.harness import ROOT, mesh_dict, wait_for
from testing.procs import descendants
from tests.site import Site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(float(os.environ.get("MESH_SOAK_S", "600"))) + 300)]

SOAK_S = float(os.environ.get("MESH_SOAK_S", "600"))
SOAK_RPS = float(os.environ.get("MESH_SOAK_RPS", "100"))
SAMPLE_S = 10.0
OUTPUT = Path(os.environ.get("MESH_TEST_OUTPUT", ROOT / "test-output"))


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its descendants, KiB."""
    total = 0
    for p in {pid} | descendants(pid):
        try:
            total += int(re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text(), re.M).group(1))
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def soak_config(site: Site) -> dict:
    return mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": [site.url("/")], "politeness_s": 0.2, "per_host_concurrency": 1,
                                 "max_depth": 6, "max_pages": 1_000_000, "timeout_s": 5.0}},
        "echo": {"kind": "echo", "depends_on": ["twin"], "settings": {"publish": True}},
        "probe": {"kind": "probe", "depends_on": ["twin"]},
    }, heartbeat_interval_s=1.0, request_timeout_s=2.0)


def test_soak_steady_load_bounded_memory_no_drops(write_config, mesh_up):
    pages = max(50, int(SOAK_S * 5 / 4) + 50)     # /a, /b, /c, /d pages: more than the run can fetch
    with Site(pages=pages, slow_s=0.5) as site:
        path, cfg = write_config(soak_config(site))
        up = mesh_up(path, "--restart-backoff", "1")
        wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=60, what="mesh ready")
        with client(cfg, "probe", timeout=2.0) as probe:
            probe.request(ProbeWatch(agent="echo", topic="echo."))
        time.sleep(0.5)
        pids = {a.agent: a.pid for a in fetch_status(cfg).agents}
        samples: dict[str, list[tuple[float, int]]] = {a: [] for a in pids}
        latencies: list[float] = []
        failures: list[str] = []
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            interval = 1.0 / SOAK_RPS
            with client(cfg, "echo", timeout=2.0, sender="soak") as c:
                next_at = time.perf_counter()
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        reply = c.request(Echo(payload=b"x" * 100, seq=sent[0]))
                        assert reply.seq == sent[0]
                        latencies.append(time.perf_counter() - t0)
                    except (MeshError, AssertionError) as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    sent[0] += 1
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -1.0:       # fell far behind (a stall): do not burst to catch up
                        next_at = time.perf_counter()

        t_start = time.monotonic()
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            while time.monotonic() - t_start < SOAK_S:
                now = time.monotonic() - t_start
                for agent, pid in pids.items():
                    samples[agent].append((now, rss_kib(pid)))
                assert up.proc.poll() is None, up.output()[-3000:]
                time.sleep(SAMPLE_S)
        finally:
            stop.set()
            worker.join(10)
        elapsed = time.monotonic() - t_start

        # the probe received every echo event
        with client(cfg, "probe", timeout=2.0) as probe:
            counts = wait_for(lambda: (c := probe.request(ProbeReport(agent="echo"))).last_seq == sent[0] - 1 and c,
                              timeout=10, what=f"the probe to see all {sent[0]} echo events")
        assert counts.received == sent[0] - len(failures)
        dropped = {}
        for agent in pids:
            body = httpx.get(f"http://127.0.0.1:{cfg.port(agent, 'metrics')}/metrics", timeout=5).text
            dropped[agent] = sum(float(v) for v in re.findall(r"^mesh_pubsub_dropped_total\{[^}]*\} (\S+)$", body, re.M))
        status = fetch_status(cfg)
        with client(cfg, "crawler", timeout=2.0) as c:
            crawl = c.request(CrawlStatusRequest())
        up.stop()
        docs = open_docstore(cfg.store_url("documents"))
        try:
            urls = [d.url for d in docs.documents()]
        finally:
            docs.close()

    growth = {}
    for agent, points in samples.items():
        n = len(points)
        middle = statistics.median(k for _, k in points[n // 3: 2 * n // 3])
        end = statistics.median(k for _, k in points[2 * n // 3:])
        growth[agent] = {"mid_mib": round(middle / 1024, 1), "end_mib": round(end / 1024, 1),
                         "growth_mib": round((end - middle) / 1024, 2), "max_mib": round(max(k for _, k in points) / 1024, 1)}
    figures = {
        "seconds": round(elapsed), "requests": sent[0], "failed": len(failures), "rps": round(sent[0] / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 3), "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "max_ms": round(max(latencies) * 1000, 3), "events_received": counts.received, "dropped": dropped,
        "pages_fetched": crawl.pages, "documents": len(urls), "restarts": {a.agent: a.restarts for a in status.agents},
        "memory": growth,
    }
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nSOAK {json.dumps(figures)}")
    assert not failures, failures[:5]
    assert sum(dropped.values()) == 0, dropped
    assert len(urls) == len(set(urls)) and crawl.pages >= 0.5 * 5 * SOAK_S * 0.5, figures
    # every page handed off was stored (the last ones may land while the mesh drains at stop)
    assert crawl.documents <= len(urls) <= crawl.documents + 8, (len(urls), crawl.documents)
    assert all(a.restarts == 0 for a in status.agents), figures["restarts"]
    for agent, g in growth.items():
        allowed = max(8.0, 0.05 * g["mid_mib"])
        assert g["growth_mib"] <= allowed, f"{agent} grew {g['growth_mib']} MiB (allowed {allowed:.1f}): {figures}"
