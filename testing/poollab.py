"""A crawl handed to a pool of extractors across two lab hosts (testing/lab.py): what bench/scale.py and
tests/chaos/test_pool_failover.py share.

The mesh is the shipped one's shape, cut down to the crawl: the twin on MainPC, the crawl coordinator on PC2, the
extractor a pool placed as asked (`{"pc2": 1, "mainpc": 1}`: extractor-1 beside the coordinator, extractor-2 across
the link), CURVE off (plaintext on the lab's private link), SQLite stores in one data directory (the two hosts are
network namespaces of one machine, so both extractors write the same documents.db, which SQLite's locking allows).
Each host runs `meshctl up --host H` inside its namespace; the site (a directory, python3-doc by default) is served
by `python -m http.server` inside PC2, on its loopback, like a site the crawler reaches without the link.

Nothing outside the namespaces reaches their agents, so a small poller inside PC2 asks the coordinator for
`crawl.status` every `poll_s` and prints one JSON line per answer; `PoolLab.status` is the latest, `history` all.
CPU seconds per agent (its processes and their children: the extraction workers) come from /proc, by the pids
`meshctl up` logs as it starts each agent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from agents.crawler.rawstore import RawStore
from testing.harness import ROOT, wait_for
from testing.lab import Lab
from testing.procs import alive, cpu_seconds, descendants

PYDOC = Path("/usr/share/doc/python3/html")
SITE_PORT = 8000

POLLER = r"""
import json, sys, time
from agents.contracts import CrawlStatusRequest
from mesh.config import load_config
from mesh.control import client
cfg, every = load_config(sys.argv[1]), float(sys.argv[2])
while True:
    try:
        with client(cfg, "crawler", timeout=1.0) as c:
            while True:
                st = c.request(CrawlStatusRequest())
                print(json.dumps({"t": time.time(), "st": st.model_dump(mode="json")}), flush=True)
                time.sleep(every)
    except Exception as exc:
        print(json.dumps({"t": time.time(), "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        time.sleep(every)
"""


def pool_config(lab: Lab, placement: dict[str, int], *, data_dir: Path, seed: str, crawler: dict[str, Any],
                extractor: dict[str, Any] | None = None) -> dict:
    """The two-host crawl mesh for `lab` (see the module docstring); `crawler` and `extractor` are settings."""
    return {
        "mesh": {"name": "poollab", "base_port": 7100, "heartbeat_interval_s": 1.0, "dead_after_missed": 3,
                 "data_dir": str(data_dir)},
        "hosts": {h: {"address": lab.hosts[h].address, "bind": lab.hosts[h].address} for h in ("mainpc", "pc2")},
        "security": {"curve": "off"},
        "groups": {"core": {"host": "mainpc", "agents": ["twin"]},
                   "crawl": {"host": "pc2", "agents": ["crawler"]},
                   "extract": {"host": "pc2", "agents": ["extractor"]}},
        "agents": {
            "twin": {"kind": "digital_twin"},
            "extractor": {"kind": "extractor", "depends_on": ["twin"], "replicas": dict(placement),
                          "settings": {"workers": 1, **(extractor or {})}},
            "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                        "settings": {"seeds": [seed], **crawler}},
        },
    }


class PoolLab:
    """One crawl on `lab`: config written under `work`, `start()`, `wait_idle()`, `stop()` (also on `with`)."""

    def __init__(self, lab: Lab, work: Path, placement: dict[str, int], *, crawler: dict[str, Any],
                 extractor: dict[str, Any] | None = None, site: Path = PYDOC, poll_s: float = 0.2):
        self.lab, self.work, self.site, self.poll_s = lab, work, site, poll_s
        work.mkdir(parents=True, exist_ok=True)
        self.data_dir = work / "data"
        self.seed = f"http://127.0.0.1:{SITE_PORT}/index.html"
        self.config = work / "mesh.yaml"
        self.config.write_text(yaml.safe_dump(pool_config(lab, placement, data_dir=self.data_dir, seed=self.seed,
                                                          crawler=crawler, extractor=extractor), sort_keys=False))
        self.ups: dict[str, subprocess.Popen] = {}
        self.history: list[dict] = []
        self._server: subprocess.Popen | None = None
        self._poller: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> PoolLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, hosts: tuple[str, ...] = ("mainpc", "pc2")) -> None:
        self._server = self.lab.spawn("pc2", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                              "--directory", str(self.site), str(SITE_PORT)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.lab.run("pc2", [sys.executable, "-c", f"import socket; socket.create_connection("
                                              f"('127.0.0.1', {SITE_PORT}), timeout=0.5)"]).returncode == 0,
                 timeout=20, interval=0.2, what="the site inside pc2")
        for host in hosts:
            out = (self.work / f"up-{host}.out").open("w")
            self.ups[host] = self.lab.spawn(host, [sys.executable, "-m", "ops.meshctl", "up", "--config",
                                                   str(self.config), "--host", host, "--restart-backoff", "0.3"],
                                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._poller = self.lab.spawn("pc2", [sys.executable, "-c", POLLER, str(self.config), str(self.poll_s)],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._poller.stdout:
            try:
                self.history.append(json.loads(line))
            except ValueError:
                continue

    @property
    def status(self) -> dict | None:
        """The coordinator's latest crawl.status_reply (a dict), or None before its first."""
        for rec in reversed(self.history):
            if "st" in rec:
                return rec["st"]
        return None

    def wait(self, predicate, timeout: float, what: str) -> dict:
        """The first status (dict) `predicate` holds for."""
        return wait_for(lambda: (st := self.status) is not None and predicate(st) and st, timeout=timeout,
                        interval=0.05, what=what)

    def wait_idle(self, timeout: float = 600) -> dict:
        return self.wait(lambda st: st["idle"] and st["done"] > 0, timeout, "the crawl to finish")

    def pids(self) -> dict[str, int]:
        """Agent -> the pid of its latest process, from what each `meshctl up` logged ("started NAME (pid N)")."""
        found: dict[str, int] = {}
        for host in self.ups:
            text = (self.work / f"up-{host}.out").read_text(errors="replace")
            for name, pid in re.findall(r"started ([\w-]+) \(pid (\d+)\)", text):
                found[name] = int(pid)
        return found

    def cpu(self) -> dict[str, float]:
        """Agent -> CPU seconds of its process and every process under it (extraction workers), now; the site
        server as `site`."""
        out = {}
        for name, pid in self.pids().items():
            if alive(pid):
                out[name] = sum(cpu_seconds(p) or 0.0 for p in {pid, *descendants(pid)})
        if self._server is not None:
            out["site"] = sum(cpu_seconds(p) or 0.0 for p in {self._server.pid, *descendants(self._server.pid)})
        return out

    def stop(self) -> None:
        for proc in (self._poller, *self.ups.values()):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if proc is not self._poller else signal.SIGKILL)
        for proc in self.ups.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, signal.SIGKILL)
            self._server.wait(10)
        self.ups.clear()


def fetched_urls(raw_dir: Path) -> set[str]:
    """The URLs a crawl fetched whole (status 200, no error), as its raw store records them: what the document store
    must hold exactly once."""
    raw = RawStore(raw_dir)
    try:
        return {r.url for r in raw.fetches() if r.status == 200 and r.error is None}
    finally:
        raw.close()
