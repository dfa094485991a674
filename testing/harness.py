"""Running a mesh from outside, the way tests and benchmarks do: free ports, config files, agents on
threads of this process, and `meshctl up` as a process of its own, stopped with SIGINT like Ctrl-C."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
import zmq

from mesh.config import MeshConfig
from mesh.runtime import resolve
from testing.procs import session_members

ROOT = Path(__file__).resolve().parent.parent
# below the usual ephemeral range (32768-60999), so outgoing connections do not take the ports handed out; above
# 10080, the last port Chromium refuses to open (net::ERR_UNSAFE_PORT), so a dashboard test's page always loads
_PORTS = (10100, 32000)
_cursor = [random.randrange(*_PORTS, 10)]


def _block_free(addresses: Sequence[str], base: int, n: int) -> bool:
    for address in addresses:
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind((address, port))
                except OSError:
                    return False
    return True


def free_port_block(n: int = 300, addresses: Sequence[str] = ("127.0.0.1",)) -> int:
    """First port of `n` consecutive ports that are free right now on every one of `addresses`. Blocks
    handed out by one process do not overlap (nothing is bound until the mesh starts)."""
    low, high = _PORTS
    for _ in range(2 * (high - low) // max(n, 1) + 2):
        base = _cursor[0]
        _cursor[0] = base + n if base + 2 * n < high else low
        if _block_free(addresses, base, n):
            return base
    raise RuntimeError(f"no block of {n} free ports found on {list(addresses)}")


def can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """The first true value of `predicate()` within `timeout`; AssertionError with the last value otherwise."""
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


class AgentThread:
    """A real agent (real sockets) running on a thread of this process."""

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


class MeshUp:
    """`meshctl up` as a process in a session of its own; its output goes to `out` (by default a file in a
    fresh temporary directory: never beside the config, which may be in the repository)."""

    def __init__(self, config_path: Path, *args: str, out: Path | None = None, cwd: Path | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.output_path = out or Path(tempfile.mkdtemp(prefix="meshctl-up-")) / "output"
        self._out = self.output_path.open("wb")
        self.started = time.monotonic()
        self.leftovers: list[int] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "ops.meshctl", "up", "--config", str(config_path), *args],
                                     cwd=cwd or ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        """Waits for `up` to exit; kills (by pid) whatever of its session is still alive after `timeout`
        and lists those pids in `leftovers` (empty when everything stopped by itself). Its exit status."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # Agents are children of the fork server, not of `up`: give them the rest of the time too.
        while time.monotonic() < deadline and session_members(self.proc.pid):
            time.sleep(0.1)
        self.leftovers = session_members(self.proc.pid)
        for pid in self.leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._out.close()
        return self.proc.returncode

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, like Ctrl-C, then `wait`."""
        self.interrupt()
        return self.wait(timeout)


class GarbledServer:
    """A ROUTER bound at `endpoint`, on a thread, that answers every request with `reply` (by default a frame
    that is not msgpack): what clients do with a garbled reply. `requests` counts what it answered."""

    def __init__(self, endpoint: str, reply: Sequence[bytes] = (b"\xc1 not a mesh frame",)):
        self.reply = list(reply)
        self.requests = 0
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind(endpoint)
        self.endpoint = self.socket.last_endpoint.decode()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="garbled-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self.socket.poll(20):
                    frames = self.socket.recv_multipart()
                    head = frames[:2] if len(frames) > 2 and frames[1] == b"" else frames[:1]
                    self.socket.send_multipart(head + self.reply)
                    self.requests += 1
        finally:
            self.socket.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.ctx.term()

    def __enter__(self) -> GarbledServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
