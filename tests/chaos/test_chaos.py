"""Chaos: the shipped two-host mesh crawls a real 530-page site while faults are injected, one after another.

Two lab hosts (network namespaces on a veth link, tests/test_lab.py) run `meshctl up` with config/pc2.yaml and
config/mainpc.yaml (CURVE on; on MainPC one setting differs, the topic model's max_chunks, so that embedding 525
pages fits the run on a shared 2-core machine). PC2 also serves the stores and the site, as in the two-host set-up
of docs/OPERATIONS.md: PostgreSQL (the documents, reached by the extractor on PC2 and by the topic model on MainPC
across the link), Redis with an append-only file (the frontier), and Debian's python3-doc over HTTP on PC2's
address. The crawler and the site are on the same host, so cutting the link cuts the mesh (the twin, the topic
model's store, the curiosity agent's steering), not the crawl.

While the crawl runs, each fault waits for the mesh to be ready again before the next (the ones aimed at the crawl
also wait for fetches under way): SIGKILL of the crawler, Redis killed and started again (same port and append-only
file), PostgreSQL stopped `immediate` (a crash) and started again (same data directory), then SIGKILL of the
extractor, the topic model, the curiosity agent and the twin (the supervisors restart them; after the twin every
agent registers again), the link between the hosts cut for longer than the twin's dead-after and restored, and
SIGKILL of the VRAM optimizer, the model manager and a probe: every agent kind.

For each fault the twin's own log gives the time to detect (the fault to the twin's first state change for it:
the agent restarted or dead, the host unreachable, an agent degraded because its store does not answer) and the
time to recover (to every agent ready again; for the link and the stores, from the restore). Pipeline progress
after each fault is measured too. At the end, once the crawl is idle and the topic model has caught up:

* every URL the frontier saw is done or failed for a legitimate reason (a 404 for a file the site does not have),
  none is left queued, leased or fetched;
* every page the site links within two hops of the seed was fetched, and every in-scope link of every stored page
  above the depth limit is in the frontier (the crawl followed everything it found);
* every fetched page is stored exactly once (one row per URL, and exactly the frontier's fetched pages);
* every extracted document is scored once: an embedding id on each, originals with their own rows, the topic
  model's document count equal to the scored documents, and its topics' sizes adding up to the originals;
* the twin saw every fault and every recovery.

The figures go to a table on the terminal and to test-output/chaos.json (MESH_TEST_OUTPUT elsewhere).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from testing.harness import ROOT
from testing.lab import Lab, available
from tests.conftest import PYDOC
from testing.system import missing, reason
from tests.services import _postgres_bindir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

HOSTS = ("mainpc", "pc2")
OUTPUT = Path(os.environ.get("MESH_TEST_OUTPUT", ROOT / "test-output"))
PG_PORT, REDIS_PORT, SITE_PORT = 5432, 6379, 8000
MAX_DEPTH = 3                 # config/mesh.yaml's crawler
DEAD_AFTER_S = 3.0            # config/mesh.yaml: heartbeat_interval_s 1.0 x dead_after_missed 3
POLITENESS_S = "0.1"          # MESH_POLITENESS_S: keeps the crawl going through the fault schedule
STORE_DOWN_S = 4.0            # how long Redis and PostgreSQL stay down
TOPIC_CHUNKS = 2              # the topic model's max_chunks here (the shipped default: 16)
DETECT_TIMEOUT_S = 30.0
RECOVER_TIMEOUT_S = 120.0
PROGRESS_TIMEOUT_S = 120.0    # covers a restart with models to load on a busy 2-core machine

# A status client living inside MainPC's namespace (the only place that reaches both hosts): one JSON line out
# per command line in (status: the twin's table; crawl: the coordinator's; topics: the topic model's listing).
HELPER = r"""
import json, sys
from mesh.config import load_config
from mesh.control import client
from mesh.messages import StatusRequest
from agents.contracts import CrawlStatusRequest, TopicsRequest
cfg = load_config("config/mainpc.yaml")
ASK = {"status": lambda: (cfg.twin, StatusRequest()), "crawl": lambda: ("crawler", CrawlStatusRequest()),
       "topics": lambda: ("topics", TopicsRequest(limit=10000))}
for line in sys.stdin:
    try:
        agent, msg = ASK[line.strip()]()
        with client(cfg, agent, timeout=2.0) as c:
            out = {"ok": True, "reply": c.request(msg).model_dump(mode="json")}
    except Exception as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
"""

TRANSITION = re.compile(r"^(?P<agent>[\w-]+): (?P<prev>\w+) -> (?P<state>\w+) \((?P<reason>.*)\)$", re.S)
HOST_CHANGE = re.compile(r"^host (?P<host>[\w-]+): (?P<prev>\w+) -> (?P<state>\w+) \((?P<reason>.*)\)$", re.S)


# --- the twin's log: what it saw, when ---------------------------------------------------------------------------


@dataclass
class TwinEvent:
    at: float            # unix time, from the log line
    kind: str            # agent | host | alert | twin_up
    name: str            # agent or host (alert: its kind)
    prev: str = ""
    state: str = ""
    reason: str = ""
    pid: int = 0

    def __str__(self) -> str:
        if self.kind in ("agent", "host"):
            return f"{self.name}: {self.prev} -> {self.state} ({self.reason[:120]})"
        return f"{self.kind} {self.name} {self.reason[:120]}"


class TwinLog:
    """Follows <data_dir>/logs/twin.log (JSON lines), across twin restarts (they append to it)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.events: list[TwinEvent] = []

    def poll(self) -> list[TwinEvent]:
        if not self.path.exists():
            return self.events
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue   # a stray unformatted line
            if line.get("agent") != "twin":
                continue
            at = datetime.fromisoformat(line["time"]).timestamp()
            msg, pid = line["message"], line.get("pid", 0)
            if m := TRANSITION.match(msg):
                self.events.append(TwinEvent(at, "agent", m["agent"], m["prev"], m["state"], m["reason"], pid))
            elif m := HOST_CHANGE.match(msg):
                self.events.append(TwinEvent(at, "host", m["host"], m["prev"], m["state"], m["reason"], pid))
            elif msg.startswith("alert "):
                kind, _, text = msg[len("alert "):].partition(": ")
                self.events.append(TwinEvent(at, "alert", kind, reason=text, pid=pid))
            elif msg.startswith("twin up:"):
                self.events.append(TwinEvent(at, "twin_up", "twin", reason=msg, pid=pid))
        return self.events

    def since(self, t: float) -> list[TwinEvent]:
        return [e for e in self.poll() if e.at >= t]


# --- the stores on PC2 -------------------------------------------------------------------------------------------


class Stores:
    """PostgreSQL and Redis inside PC2's namespace, bound to PC2's lab address. The test reaches them through
    their Unix sockets (paths on the shared file system), which the link cut does not touch."""

    def __init__(self, lab: Lab, base: Path):
        self.lab = lab
        self.address = lab.hosts["pc2"].address
        bindir = _postgres_bindir()
        if bindir is None:
            missing(reason("postgresql"))
        self.redis_bin = shutil.which("redis-server")
        if self.redis_bin is None:
            missing(reason("redis-server"))
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("PostgreSQL run as root needs a 'postgres' user: " + reason("postgresql"))
        self.bindir = bindir
        # PostgreSQL refuses to run as root: its directory belongs to `postgres` (pytest's tmp_path is root-only)
        self.pg_base = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        os.chown(self.pg_base, pw.pw_uid, pw.pw_gid)
        self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.redis_dir = base / "redis"
        self.redis_dir.mkdir()
        self.redis: subprocess.Popen | None = None
        self.redis_socket = self.redis_dir / "redis.sock"
        self.pg_up = False

    @property
    def documents_url(self) -> str:
        return f"postgresql://postgres@{self.address}:{PG_PORT}/crawl"

    @property
    def frontier_url(self) -> str:
        return f"redis://{self.address}:{REDIS_PORT}/0"

    def _pg_ctl(self, *args: str, inside: bool = False) -> subprocess.CompletedProcess:
        argv = [*self.as_postgres, str(self.bindir / "pg_ctl"), "-D", str(self.pg_base / "data"), *args]
        if inside:
            return self.lab.run("pc2", argv, timeout=60)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def init_postgres(self) -> None:
        r = subprocess.run([*self.as_postgres, str(self.bindir / "initdb"), "-D", str(self.pg_base / "data"), "-U",
                            "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        with (self.pg_base / "data" / "pg_hba.conf").open("a") as f:
            f.write("host all all 0.0.0.0/0 trust\n")   # the lab hosts' addresses
        self.start_postgres()
        import psycopg

        with psycopg.connect(**self.pg_params("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE crawl")

    def start_postgres(self) -> None:
        # synchronous_commit stays on: off, a crash loses commits already acknowledged (the extractor acknowledges
        # a page once its commit returns), and this test crashes the server. fsync=off only matters if the machine
        # goes down: the WAL is written to the kernel before a commit returns.
        opts = (f"-p {PG_PORT} -h {self.address} -k {self.pg_base} -c fsync=off -c synchronous_commit=on "
                "-c full_page_writes=off -c max_connections=100")
        r = self._pg_ctl("-l", str(self.pg_base / "server.log"), "-w", "-t", "60", "-o", opts, "start", inside=True)
        assert r.returncode == 0, f"PostgreSQL did not start: {r.stderr}\n{self.pg_log()}"
        self.pg_up = True

    def stop_postgres(self, mode: str = "immediate") -> None:
        self._pg_ctl("stop", "-m", mode, "-w")
        self.pg_up = False

    def pg_log(self) -> str:
        p = self.pg_base / "server.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def pg_params(self, dbname: str = "crawl") -> dict:
        return {"host": str(self.pg_base), "port": PG_PORT, "user": "postgres", "dbname": dbname, "connect_timeout": 3}

    def start_redis(self) -> None:
        """redis-server with an append-only file. Redis writes the file before it replies, so a killed server loses
        nothing it acknowledged (fsync once a second only matters when the machine itself goes down; fsync on every
        write made each frontier call wait for the disk and held the coordinator's loop for a minute)."""
        log = (self.redis_dir / "redis.log").open("ab")
        self.redis = self.lab.spawn("pc2", [
            self.redis_bin, "--port", str(REDIS_PORT), "--bind", self.address, "--protected-mode", "no",
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.redis_dir),
            "--unixsocket", str(self.redis_socket), "--unixsocketperm", "700"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(unix_socket_path=str(self.redis_socket), socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                assert self.redis.poll() is None, (self.redis_dir / "redis.log").read_text(errors="replace")[-2000:]
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        finally:
            client.close()

    def kill_redis(self) -> None:
        os.killpg(self.redis.pid, signal.SIGKILL)
        self.redis.wait(10)

    def frontier(self):
        from agents.crawler.frontier import RedisFrontier

        return RedisFrontier(f"unix://{self.redis_socket}?db=0", prefix="frontier")

    def close(self, keep: Path) -> None:
        if self.pg_up or (self.pg_base / "data" / "postmaster.pid").exists():
            self.stop_postgres("immediate")
        if self.redis is not None and self.redis.poll() is None:
            self.kill_redis()
        if (self.pg_base / "server.log").exists():
            shutil.copy(self.pg_base / "server.log", keep / "postgresql.log")
        shutil.rmtree(self.pg_base, ignore_errors=True)


# --- the site ----------------------------------------------------------------------------------------------------


def serve_site(address: str, port: int, directory: str) -> None:
    """python3-doc over HTTP (what `python -m http.server --directory` serves), without a request log."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    ThreadingHTTPServer((address, port), functools.partial(Quiet, directory=directory)).serve_forever()


def site_links(base: str) -> dict[str, list[str]]:
    """Every HTML page of python3-doc by its URL under `base`, with its in-scope outlinks as the extractor finds
    them (the same link code, on the same parse)."""
    from trafilatura.utils import load_html

    from agents.extractor.backends import _links

    graph: dict[str, list[str]] = {}
    for path in PYDOC.rglob("*.html"):
        url = f"{base}/{path.relative_to(PYDOC).as_posix()}"
        tree = load_html(path.read_bytes())
        links = _links(tree, url) if tree is not None else []
        graph[url] = [link["url"] for link in links if link["url"].startswith(base + "/")]
    return graph


def within(graph: dict[str, list[str]], seed: str, depth: int) -> set[str]:
    """URLs at most `depth` links from the seed (breadth-first; links to pages the site lacks included)."""
    seen = {seed}
    frontier = deque([(seed, 0)])
    while frontier:
        url, d = frontier.popleft()
        if d == depth:
            continue
        for link in graph.get(url, []):
            if link not in seen:
                seen.add(link)
                frontier.append((link, d + 1))
    return seen


# --- the faults --------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    fault: str                     # what was done
    target: str
    at: float                      # unix time of the fault
    detected_at: float | None = None
    detected_by: str = ""          # the twin's first state change for it
    restored_at: float | None = None   # the link back, the store started again (else: the fault itself)
    recovered_at: float | None = None
    recovered_by: str = ""         # the twin's last change to ready
    progress_at: float | None = None   # the pipeline moved on again (None: nothing was left to do)
    crawling: bool | None = None   # fetches were under way when it struck (for the faults meant to hit them)
    twin_saw: list[str] = field(default_factory=list)

    @property
    def detect_s(self) -> float | None:
        return None if self.detected_at is None else round(self.detected_at - self.at, 2)

    @property
    def recover_s(self) -> float | None:
        base = self.restored_at or self.at
        return None if self.recovered_at is None else round(self.recovered_at - base, 2)

    @property
    def progress_s(self) -> float | None:
        base = self.restored_at or self.at
        return None if self.progress_at is None else round(self.progress_at - base, 2)


class Chaos:
    def __init__(self, lab: Lab, tmp: Path, stores: Stores):
        self.lab = lab
        self.tmp = tmp
        self.stores = stores
        self.keys = tmp / "keys"
        r = subprocess.run([sys.executable, "-m", "ops.meshctl", "keys", "generate", *HOSTS, "--keys-dir", str(self.keys)],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        a, b = (lab.hosts[h].address for h in HOSTS)
        self.site = f"http://{b}:{SITE_PORT}"
        self.seed = f"{self.site}/index.html"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        self.env = dict(env, MAINPC_ADDRESS=a, PC2_ADDRESS=b, MAINPC_BIND=a, PC2_BIND=b, MESH_KEYS_DIR=str(self.keys),
                        MESH_DOCUMENTS_URL=stores.documents_url, MESH_FRONTIER_URL=stores.frontier_url,
                        MESH_SEED=self.seed, MESH_POLITENESS_S=POLITENESS_S, MESH_TOPICS_DEVICE="cpu",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="200")
        # MainPC runs config/mainpc.yaml but for one setting: the topic model embeds 2 chunks of each page, not 16.
        # All 16 of 525 python3-doc pages took ~15 min of this shared 2-core machine; how the mesh handles faults
        # does not depend on it.
        self.configs = {"pc2": "config/pc2.yaml", "mainpc": str(tmp / "mainpc.yaml")}
        (tmp / "mainpc.yaml").write_text(f"extends: {ROOT / 'config' / 'mainpc.yaml'}\n"
                                         f"agents:\n  topics:\n    settings:\n      max_chunks: {TOPIC_CHUNKS}\n")
        self.procs: dict[str, subprocess.Popen] = {}
        self.twin_log = TwinLog(tmp / "mainpc" / "logs" / "twin.log")
        self.helper: subprocess.Popen | None = None
        self.site_proc: subprocess.Popen | None = None
        self.faults: list[Fault] = []
        self.reported = False

    def env_for(self, host: str) -> dict:
        env = dict(self.env, MESH_DATA_DIR=str(self.tmp / host))
        if host == "mainpc":
            env["OMP_NUM_THREADS"] = "1"   # torch on a loaded 2-core machine: one thread embeds faster than two
        return env

    # --- processes ---

    def start(self, host: str) -> None:
        out = (self.tmp / f"up-{host}.out").open("ab")
        self.procs[host] = self.lab.spawn(host, [sys.executable, "-m", "ops.meshctl", "up", "--config",
                                                 self.configs[host]], cwd=ROOT, env=self.env_for(host),
                                          stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def start_helper(self) -> None:
        self.helper = self.lab.spawn("mainpc", [sys.executable, "-c", HELPER], cwd=ROOT, env=self.env_for("mainpc"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def stop(self, host: str) -> int:
        proc = self.procs.pop(host)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        try:
            # what outlived `meshctl up` in its process group: a SIGKILLed extractor's pool (its forkserver and
            # workers) keeps running after its agent is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait() if code is None else code

    def ask(self, what: str) -> dict | None:
        assert self.helper is not None and self.helper.poll() is None, "the status helper died"
        self.helper.stdin.write(what + "\n")
        self.helper.stdin.flush()
        out = json.loads(self.helper.stdout.readline())
        return out["reply"] if out["ok"] else None

    def all_ready(self) -> dict[str, dict] | None:
        st = self.ask("status")
        if st is None or not all(a["state"] == "ready" for a in st["agents"]):
            return None
        if any(h["state"] not in ("local", "reachable") for h in st["hosts"]):
            return None
        return {a["agent"]: a for a in st["agents"]}

    # --- the pipeline's figures, straight from the stores ---

    def counts(self) -> dict | None:
        """Frontier states, documents stored, extracted and scored; None while a store does not answer."""
        import psycopg

        try:
            with psycopg.connect(**self.stores.pg_params()) as conn:
                docs, extracted, scored = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'extracted'), "
                    "count(*) FILTER (WHERE embedding_id IS NOT NULL) FROM documents").fetchone()
            f = self.stores.frontier()
            try:
                st = f.stats()
            finally:
                f.close()
        except Exception:   # psycopg, redis (FrontierUnavailable): the store is down or restarting
            return None
        return {**st, "documents": docs, "extracted": extracted, "scored": scored}

    @staticmethod
    def work_done(c: dict) -> int:
        return c["done"] + c["documents"] + c["scored"]

    @staticmethod
    def finished(c: dict) -> bool:
        return c["queued"] == c["leased"] == c["fetched"] == 0 and c["scored"] == c["extracted"] and c["seen"] > 0

    # --- waiting ---

    def check_site(self) -> None:
        """The site must outlive the test: a crawl of a dead site fails every URL it has left."""
        if self.site_proc is not None and self.site_proc.poll() is not None:
            raise AssertionError(f"the site's server exited with {self.site_proc.returncode} (negative: a signal): "
                                 f"{(self.tmp / 'site.log').read_text(errors='replace')[-2000:]}")

    def wait(self, what: str, predicate, timeout: float, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_site()
            try:
                last = predicate()
            except AssertionError:
                raise
            except Exception as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}\n"
                             f"twin, last events: {[str(e) for e in self.twin_log.poll()[-15:]]}")

    def detect(self, f: Fault, match) -> None:
        ev = self.wait(f"the twin to see {f.fault}", lambda: next((e for e in self.twin_log.since(f.at) if match(e)),
                                                                  None), DETECT_TIMEOUT_S)
        f.detected_at, f.detected_by = ev.at, str(ev)

    def recover(self, f: Fault, *, changed_pid: tuple[str, int] | None = None) -> None:
        """Every agent ready again (the twin's table), then the time of the twin's last change to ready."""
        def ready():
            agents = self.all_ready()
            if agents is None:
                return None
            if changed_pid is not None and agents[changed_pid[0]]["pid"] == changed_pid[1]:
                return None
            return agents

        self.wait(f"every agent ready again after {f.fault}", ready, RECOVER_TIMEOUT_S, interval=0.5)
        since = f.restored_at or f.at
        events = self.twin_log.since(f.at)
        f.twin_saw = [str(e) for e in events]
        readies = [e for e in events if e.kind == "agent" and e.state == "ready" and e.at >= since]
        hosts = [e for e in events if e.kind == "host" and e.state == "reachable" and e.at >= since]
        last = max(readies + hosts, key=lambda e: e.at, default=None)
        assert last is not None, f"the twin saw no recovery from {f.fault}: {f.twin_saw}"
        f.recovered_at, f.recovered_by = last.at, str(last)

    def progress(self, f: Fault, before: dict | None) -> None:
        """The pipeline moves on after the fault: more URLs finished, documents stored or scored (unless there was
        nothing left to do)."""
        if before is None or self.finished(before):
            return

        def moved():
            c = self.counts()
            return c is not None and (self.work_done(c) > self.work_done(before) or self.finished(c))

        self.wait(f"the pipeline to move on after {f.fault}", moved, PROGRESS_TIMEOUT_S, interval=0.5)
        f.progress_at = time.time()

    def fetching(self, timeout: float = 60.0) -> bool:
        """Waits until the coordinator has fetches under way (a fault then hits pages in flight)."""
        try:
            self.wait("the crawler fetching", lambda: (s := self.ask("crawl")) and s["in_flight"] > 0, timeout)
            return True
        except AssertionError:
            return False

    def begin(self, fault: str, target: str, *, busy: bool = False) -> tuple[Fault, dict | None]:
        crawling = self.fetching() if busy else None
        before = self.counts()
        f = Fault(fault=fault, target=target, at=time.time(), crawling=crawling)
        self.faults.append(f)
        return f, before

    # --- the faults ---

    def kill_agent(self, name: str) -> Fault:
        self.wait("every agent ready", self.all_ready, RECOVER_TIMEOUT_S, interval=0.5)
        crawling = self.fetching() if name == "crawler" or name.startswith("extractor") else None
        agents = self.wait("every agent ready", self.all_ready, RECOVER_TIMEOUT_S, interval=0.5)
        pid = agents[name]["pid"]
        f, before = self.begin(f"SIGKILL {name} ({agents[name]['kind']})", name)
        f.crawling = crawling
        os.kill(pid, signal.SIGKILL)
        if name == "twin":
            # the twin cannot see its own death: the new twin starting is the detection, every agent
            # registering with it again the recovery
            self.detect(f, lambda e: e.kind == "twin_up" and e.pid != pid)
        else:
            self.detect(f, lambda e: e.kind == "agent" and e.name == name)
        self.recover(f, changed_pid=(name, pid))
        self.progress(f, before)
        return f

    def cut_link(self) -> Fault:
        self.wait("every agent ready", self.all_ready, RECOVER_TIMEOUT_S, interval=0.5)
        f, before = self.begin("link mainpc-pc2 cut", "link")
        self.lab.cut()
        try:
            self.detect(f, lambda e: e.kind == "host" and e.name == "pc2" and e.state == "unreachable")
            time.sleep(max(0.0, f.at + DEAD_AFTER_S + 3.0 - time.time()))   # well past the dead-after
        finally:
            self.lab.restore()
        f.restored_at = time.time()
        self.recover(f)
        assert any(e.kind == "host" and e.name == "pc2" and e.state == "reachable" for e in self.twin_log.since(f.at))
        self.progress(f, before)
        return f

    def restart_store(self, which: str) -> Fault:
        self.wait("every agent ready", self.all_ready, RECOVER_TIMEOUT_S, interval=0.5)
        if which == "redis":
            f, before = self.begin("Redis killed and restarted", "redis (frontier)", busy=True)
            self.stores.kill_redis()
            users = ("crawler",)
        else:
            f, before = self.begin("PostgreSQL stopped (immediate) and restarted", "postgresql (documents)", busy=True)
            self.stores.stop_postgres("immediate")
            users = ("extractor-1", "extractor-2", "topics")
        try:
            # down until the twin sees it (an agent degraded, or one that stopped over it), at least STORE_DOWN_S
            deadline = time.monotonic() + DETECT_TIMEOUT_S
            while time.monotonic() < deadline:
                ev = next((e for e in self.twin_log.since(f.at) if e.kind == "agent" and e.name in users
                           and e.state != "ready"), None)
                if ev is not None:
                    f.detected_at, f.detected_by = ev.at, str(ev)
                    break
                time.sleep(0.25)
            time.sleep(max(0.0, f.at + STORE_DOWN_S - time.time()))
        finally:
            f.restored_at = time.time()   # from the start: its clients may well reconnect before it says it is up
            if which == "redis":
                self.stores.start_redis()
            else:
                self.stores.start_postgres()
        assert f.detected_at is not None, f"the twin did not see {f.fault}: {[str(e) for e in self.twin_log.since(f.at)]}"
        self.recover(f)
        self.progress(f, before)
        return f

    # --- the report ---

    def write_report(self, **figures) -> None:
        faults = [{**asdict(f), "detect_s": f.detect_s, "recover_s": f.recover_s, "progress_s": f.progress_s}
                  for f in self.faults]
        OUTPUT.mkdir(parents=True, exist_ok=True)
        (OUTPUT / "chaos.json").write_text(json.dumps({**figures, "faults": faults}, indent=2))
        self.reported = True

    def table(self) -> str:
        rows = [f"{'fault':<46} {'detect s':>9} {'recover s':>10} {'progress s':>11} {'crawling':>8}  detected by"]
        for f in self.faults:
            def fmt(v):
                return "-" if v is None else f"{v:.2f}"
            busy = "-" if f.crawling is None else ("yes" if f.crawling else "no")
            rows.append(f"{f.fault:<46} {fmt(f.detect_s):>9} {fmt(f.recover_s):>10} {fmt(f.progress_s):>11} {busy:>8}  "
                        f"{f.detected_by[:90]}")
        return "\n".join(rows)


@pytest.fixture
def lab():
    ok, why = available()
    if not ok:
        missing(why)
    with Lab(HOSTS) as lab:
        yield lab
    assert not lab.leftovers(), "the lab left namespaces behind"


def test_crawl_survives_every_fault_with_no_document_lost_or_duplicated(lab, tmp_path):
    if not (PYDOC / "index.html").exists():
        missing(reason("python3-doc"))
    started = time.monotonic()
    stores = Stores(lab, tmp_path)
    chaos = None
    try:
        stores.init_postgres()
        stores.start_redis()
        chaos = Chaos(lab, tmp_path, stores)
        pc2 = lab.hosts["pc2"].address
        with (tmp_path / "site.log").open("ab") as log:
            chaos.site_proc = lab.spawn("pc2", [sys.executable, "-c", "from tests.chaos.test_chaos import serve_site; "
                                                f"serve_site({pc2!r}, {SITE_PORT}, {str(PYDOC)!r})"],
                                        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        r = lab.run("pc2", [sys.executable, "-c", "import socket,sys,time\nfor _ in range(200):\n try:\n"
                            f"  socket.create_connection(({pc2!r}, {SITE_PORT}), timeout=0.5).close(); sys.exit(0)\n"
                            " except OSError: time.sleep(0.05)\nsys.exit(1)"], timeout=30)
        assert r.returncode == 0, "the site did not start"
        chaos.start("pc2")
        chaos.start("mainpc")
        chaos.start_helper()
        graph = site_links(chaos.site)   # while the agents start (the topic model loads its model meanwhile)
        chaos.wait("every agent ready on both lab hosts", chaos.all_ready, 240, interval=1.0)
        ready_s = time.monotonic() - started
        chaos.wait("the crawl to store documents", lambda: (c := chaos.counts()) and c["documents"] >= 20, 120)

        # the schedule: store faults and hand-off faults while the crawl is busiest, then the rest
        chaos.kill_agent("crawler")
        chaos.restart_store("redis")
        chaos.restart_store("postgres")
        chaos.kill_agent("extractor-1")   # the pool's replica beside the crawler (config/mesh.yaml)
        chaos.kill_agent("topics")
        chaos.kill_agent("curiosity")
        chaos.kill_agent("twin")
        chaos.cut_link()
        chaos.kill_agent("vram")
        chaos.kill_agent("models")
        chaos.kill_agent("probe-pc2")
        faults_done_s = time.monotonic() - started

        # the end: the crawl idle, the topic model caught up
        def settled():
            c = chaos.counts()
            if c is None or c["queued"] or c["fetched"] or c["scored"] != c["extracted"]:
                return None
            crawl = chaos.ask("crawl")   # (URLs stuck 'leased' would leave it idle too: checked below)
            return crawl is not None and crawl["idle"] and (c, crawl)

        final, crawl = chaos.wait("the crawl to finish and every extracted document to be scored", settled, 420,
                                  interval=2.0)
        listing = chaos.wait("the topic model's listing", lambda: chaos.ask("topics"), 60)
        agents = chaos.wait("every agent ready at the end", chaos.all_ready, 60)
        for host in ("mainpc", "pc2"):
            assert chaos.stop(host) == 0, (tmp_path / f"up-{host}.out").read_text(errors="replace")[-3000:]

        # --- the frontier: everything seen ended done or failed, for a legitimate reason
        frontier = stores.frontier()
        try:
            seen = frontier._r.smembers("frontier:seen")
            rows = {u: frontier.get(u) for u in seen}
            stats = frontier.stats()
        finally:
            frontier.close()
        stuck = {u: r["state"] for u, r in rows.items() if r["state"] not in ("done", "failed")}
        assert not stuck, f"URLs left unfinished: {stuck}"
        assert stats["queued"] == stats["leased"] == stats["fetched"] == 0, stats
        failed = {u: r for u, r in rows.items() if r["state"] == "failed"}
        for url, r in failed.items():
            path = PYDOC / url[len(chaos.site) + 1:]
            assert r["error"] == "HTTP 404" and not path.exists(), f"{url} failed: {r}"
        pages = {u for u, r in rows.items() if r["state"] == "done" and r["status"] == 200
                 and not (r["error"] or "").startswith("skipped:")}

        # --- the documents: exactly the fetched pages, each stored once, each extracted one scored once
        import psycopg

        with psycopg.connect(**stores.pg_params()) as conn:
            n, distinct = conn.execute("SELECT count(*), count(DISTINCT url) FROM documents").fetchone()
            docs = {url: (state, eid, dup, weights, depth, outlinks) for url, state, eid, dup, weights, depth, outlinks
                    in conn.execute("SELECT url, state, embedding_id, duplicate_of, topic_weights, depth, outlinks "
                                    "FROM documents")}
        assert n == distinct == len(docs), f"{n} rows for {distinct} URLs: a page was stored twice"
        assert set(docs) == pages, (f"stored but not fetched: {sorted(set(docs) - pages)[:10]}; "
                                    f"fetched but not stored: {sorted(pages - set(docs))[:10]}")
        assert len(docs) >= 500, f"only {len(docs)} documents: the site has about 530 pages"
        extracted = {u: d for u, d in docs.items() if d[0] == "extracted"}
        unscored = [u for u, d in extracted.items() if d[1] is None]
        assert not unscored, f"extracted but never scored: {unscored[:10]}"
        originals = [d[1] for d in extracted.values() if d[2] is None]
        assert len(originals) == len(set(originals)), "two original documents share an embedding row"
        near_dups = [u for u, d in extracted.items() if d[2] is not None and d[3] is not None]   # own distribution
        exact_dups = [u for u, d in extracted.items() if d[2] is not None and d[3] is None]
        assert all(extracted[u][2] != u for u in near_dups), "a document is marked a duplicate of itself"
        assert (listing["duplicates"], listing["exact_duplicates"]) == (len(near_dups), len(exact_dups)), listing
        topic_sizes = sum(t["size"] for t in listing["topics"])
        assert listing["total_topics"] == len(listing["topics"])
        assert topic_sizes == len(originals), (f"the topics hold {topic_sizes} documents for {len(originals)} "
                                               "original documents: some were fed to the topic model twice or never")
        assert listing["documents"] == len(extracted), (f"the topic model counts {listing['documents']} documents "
                                                        f"scored, the store {len(extracted)}")

        # --- the crawl followed every link: the site within two hops, and every stored page's links above the limit
        near = {u for u in within(graph, chaos.seed, 2) if u in graph}
        missed = near - pages
        assert not missed, f"pages within two links of the seed never fetched: {sorted(missed)[:10]}"
        dropped = {link["url"] for u, d in docs.items() if d[4] < MAX_DEPTH for link in d[5]
                   if link["url"].startswith(chaos.site + "/")} - set(rows)
        assert not dropped, f"links of stored pages never added to the frontier: {sorted(dropped)[:10]}"

        # --- the twin saw every fault and every recovery
        for f in chaos.faults:
            assert f.detected_at is not None and f.recovered_at is not None, asdict(f)
        assert all(a["state"] == "ready" for a in agents.values())
        total_s = time.monotonic() - started

        report = {
            "pages": len(pages), "documents": len(docs), "extracted": len(extracted), "failed_urls": len(failed),
            "scored": listing["documents"], "originals": len(originals), "topics": listing["total_topics"],
            "duplicates": listing["duplicates"], "exact_duplicates": listing["exact_duplicates"],
            "lost": len(pages - set(docs)), "duplicated": n - distinct, "crawl": crawl, "final_counts": final,
            "ready_after_s": round(ready_s, 1), "faults_done_after_s": round(faults_done_s, 1),
            "total_s": round(total_s, 1),
        }
        chaos.write_report(passed=True, **report)
        print(f"\nchaos: {len(pages)} pages fetched, {len(docs)} stored once each ({len(extracted)} extracted, "
              f"all scored once), 0 lost, 0 duplicated; {len(failed)} URL(s) failed (404); "
              f"{len(chaos.faults)} faults in {total_s:.0f}s\n{chaos.table()}")
    finally:
        if chaos is not None:
            for host in list(chaos.procs):
                chaos.stop(host)
            if chaos.faults and not chaos.reported:   # a failed run: its figures so far
                chaos.write_report(passed=False, total_s=round(time.monotonic() - started, 1))
                print("\n" + chaos.table())
        stores.close(keep=tmp_path)
