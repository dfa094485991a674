"""Shared fixtures: real configs on free ports, agents in threads, `meshctl up` as a process."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from agents.config import MeshConfig, load_config
from agents.kinds import resolve

pytest_plugins = ["tests.services"]  # real PostgreSQL and Redis servers (fixtures for tests/test_stores.py)

ROOT = Path(__file__).resolve().parent.parent
_next_base = [random.randrange(20000, 50000, 500)]


def _block_free(base: int, n: int) -> bool:
    for port in range(base, base + n):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_block(n: int = 300) -> int:
    """First port of `n` consecutive ports that are free on 127.0.0.1 right now."""
    while True:
        base = _next_base[0]
        _next_base[0] = base + n if base + 2 * n < 65000 else 20000
        if _block_free(base, n):
            return base


def mesh_dict(agents: dict[str, dict[str, Any]], *, groups: dict[str, dict] | None = None,
              hosts: dict[str, dict] | None = None, **mesh: Any) -> dict:
    """A whole-mesh config dict: a twin plus `agents`, one group per agent unless `groups` is given."""
    all_agents = {"twin": {"kind": "digital_twin"}, **agents}
    hosts = hosts or {"local": {"address": "127.0.0.1"}}
    host = next(iter(hosts))
    if groups is None:
        groups = {f"g-{name}": {"host": host, "agents": [name]} for name in all_agents}
    settings = {"name": "test", "base_port": free_port_block(), "heartbeat_interval_s": 0.2, "dead_after_missed": 3,
                "request_timeout_s": 1.0, "drain_timeout_s": 5.0}
    settings.update(mesh)
    return {"mesh": settings, "hosts": hosts, "groups": groups, "agents": all_agents,
            "security": {"curve": "off"}}


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., tuple[Path, MeshConfig]]:
    """Writes a config dict to tmp_path/mesh.yaml (data_dir inside tmp_path) and loads it."""

    def write(data: dict, name: str = "mesh.yaml") -> tuple[Path, MeshConfig]:
        data.setdefault("mesh", {}).setdefault("data_dir", str(tmp_path / "data"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path, load_config(path)

    return write


class AgentThread:
    """A real agent (real sockets) running on a thread of the test process."""

    def __init__(self, config: MeshConfig, name: str):
        self.agent = resolve(config.agents[name].kind)(name, config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.agent.run(install_signals=False)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        self.agent.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"agent {self.agent.name} did not stop within {timeout}s"
        if self.error is not None and not isinstance(self.error, SystemExit):
            raise self.error


@pytest.fixture
def run_agents():
    """start(config, *names) runs agents on threads; all are stopped at the end of the test."""
    started: list[AgentThread] = []

    def start(config: MeshConfig, *names: str) -> list[AgentThread]:
        out = [AgentThread(config, n) for n in names]
        started.extend(out)
        return out

    yield start
    for a in reversed(started):
        if a.thread.is_alive():
            a.stop()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """Every live process under `pid`: its children, theirs, and so on (from /proc/PID/task/*/children)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for task in Path(f"/proc/{p}/task").iterdir() for k in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for k in kids:
            if k not in found:
                found.add(k)
                todo.append(k)
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the thing we wait for may not answer yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class MeshUp:
    """`meshctl up` as a real process, stopped with SIGINT like Ctrl-C."""

    def __init__(self, config_path: Path, *args: str, cwd: Path | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        self.output_path = config_path.parent / "meshctl-up.out"
        self._out = self.output_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "up", "--config", str(config_path), *args],
                                     cwd=cwd or ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def mesh_up():
    started: list[MeshUp] = []

    def start(config_path: Path, *args: str) -> MeshUp:
        m = MeshUp(config_path, *args)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


PYDOC = Path("/usr/share/doc/python3/html")


@pytest.fixture(scope="module")
def pydoc_site():
    """Debian's python3-doc (about 530 HTML pages) served by `python -m http.server` on loopback: its base URL."""
    from tests.services import missing

    if not (PYDOC / "index.html").exists():
        missing("the python3-doc package is not installed (apt-get install python3-doc)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(PYDOC),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.5).close() or True, what="http.server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
