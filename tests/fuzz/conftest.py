"""Fixtures of the bad-input suites: meshes of real agent processes (`meshctl up`), their metrics, their memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from mesh.config import MeshConfig, load_config
from mesh.control import client
from network.messages import Ping
from testing.harness import ROOT, MeshUp, mesh_dict, wait_for

MAX_FRAME = 64 * 1024           # hard limit (ZMQ_MAXMSGSIZE) = max(4 x this, 1 MiB) = 1 MiB
HARD_LIMIT = 1 << 20


def scrape(cfg: MeshConfig, agent: str) -> dict[str, Counter]:
    """metric name -> Counter of label-string -> value, from the agent's /metrics over HTTP."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.port(agent, 'metrics')}/metrics", timeout=10).read().decode()
    out: dict[str, Counter] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("agent", "kind"))
            out.setdefault(s.name, Counter())[key] += s.value
    return out


def by_label(samples: dict[str, Counter], name: str, label: str) -> Counter:
    """{label value: count} of one metric (e.g. mesh_errors_total by code)."""
    out: Counter = Counter()
    for key, value in samples.get(name, Counter()).items():
        labels = dict(part.split("=", 1) for part in key.split(",") if part)
        out[labels.get(label, "")] += value
    return out


def delta(after: Counter, before: Counter) -> Counter:
    return Counter({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)})


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in kB, and the thread count, of a live process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def agent_pid(cfg: MeshConfig, agent: str) -> int:
    with client(cfg, agent, timeout=5.0) as c:
        return c.request(Ping()).pid


def meshctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.meshctl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


class Mesh:
    """A mesh run by `meshctl up --only ...`, with what the tests need to attack it."""

    def __init__(self, path: Path, cfg: MeshConfig, up: MeshUp, agents: list[str]):
        self.path, self.cfg, self.up, self.agents = path, cfg, up, agents
        self.pids = {a: agent_pid(cfg, a) for a in agents}

    def client(self, agent: str, timeout: float = 5.0):
        return client(self.cfg, agent, timeout=timeout)

    def assert_alive(self) -> None:
        """Every agent still runs as the same process (no crash, no restart) and answers a valid Ping."""
        for agent, pid in self.pids.items():
            with self.client(agent) as c:
                pong = c.request(Ping())
            assert pong.pid == pid, f"{agent} restarted (pid {pid} -> {pong.pid})"
            assert pong.state == "ready", (agent, pong.state)
        log = self.log_text()
        assert "Traceback" not in log, log[-3000:]

    def log_text(self) -> str:
        logs = self.cfg.mesh.data_dir / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


def start_mesh(tmp: Path, agents: dict, run: list[str], *, curve_keys: Path | None = None) -> Mesh:
    data = mesh_dict(agents, max_frame_bytes=MAX_FRAME, heartbeat_interval_s=0.5, dead_after_missed=20,
                     request_timeout_s=2.0)
    data["mesh"]["data_dir"] = str(tmp / "data")
    if curve_keys is not None:
        data["security"] = {"curve": "on", "keys_dir": str(curve_keys)}
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)
    only = [arg for name in ["twin", *run] for arg in ("--only", name)]
    up = MeshUp(path, *only)
    try:
        for agent in run:
            with client(cfg, agent, timeout=1.0) as c:
                wait_for(lambda: c.request(Ping()).state == "ready", timeout=60, interval=0.2,
                         what=f"{agent} ready")
        return Mesh(path, cfg, up, run)
    except BaseException:
        up.stop()
        print(up.output()[-3000:])
        raise


# target: an echo agent that publishes each echo it handles (so handling is observable from outside);
# watcher: a probe that can be told to subscribe to any agent; rogue: declared, never started, so a test can
# bind a fuzzing PUB on its pub port and the watcher subscribes to that.
AGENTS = {
    "target": {"kind": "echo", "depends_on": ["twin"], "settings": {"publish": True}},
    "watcher": {"kind": "probe", "depends_on": ["twin"]},
    "rogue": {"kind": "echo", "required": False},
}


@pytest.fixture(scope="module")
def plain_mesh(tmp_path_factory):
    mesh = start_mesh(tmp_path_factory.mktemp("plain-mesh"), AGENTS, ["target", "watcher"])
    yield mesh
    mesh.up.stop()


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory) -> tuple[Path, Path]:
    """keys/ with the mesh host's pair, and outsider/ with a pair the mesh does not know."""
    base = tmp_path_factory.mktemp("curve-keys")
    for host, where in (("local", "keys"), ("intruder", "outsider")):
        r = meshctl("keys", "generate", host, "--keys-dir", str(base / where))
        assert r.returncode == 0, r.stderr
    return base / "keys", base / "outsider"


@pytest.fixture(scope="module")
def curve_mesh(tmp_path_factory, curve_keys):
    mesh = start_mesh(tmp_path_factory.mktemp("curve-mesh"), AGENTS, ["target", "watcher"], curve_keys=curve_keys[0])
    yield mesh
    mesh.up.stop()


def dealer(ctx: zmq.Context, endpoint: str, **options) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    for k, v in options.items():
        setattr(sock, k, v)
    sock.connect(endpoint)
    return sock


def settle(check, timeout: float = 10.0, what: str = "counters to settle"):
    """Waits until `check()` is true, then a little longer, and checks again (nothing more arrived)."""
    wait_for(check, timeout=timeout, interval=0.1, what=what)
    time.sleep(0.3)
    assert check(), what
