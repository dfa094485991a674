"""Shared helpers of the benchmarks: free ports, `meshctl up` as a process, /proc readings, log scan.

Nothing here changes the mesh; it only starts and watches it from outside, the way an operator would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- ports -----------------------------------------------------------------------------------------


def can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _block_free(addresses: list[str], base: int, n: int) -> bool:
    for address in addresses:
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind((address, port))
                except OSError:
                    return False
    return True


def free_port_block(n: int, addresses: list[str] = ("127.0.0.1",)) -> int:
    """First port of `n` consecutive ports that are free right now on every one of `addresses`."""
    # Stay below the ephemeral range (usually 32768-60999) so outgoing connections do not take our ports.
    for _ in range(200):
        base = random.randrange(10000, 32000 - n, 10)
        if _block_free(list(addresses), base, n):
            return base
    raise RuntimeError(f"no block of {n} free ports found on {addresses}")


# --- config ----------------------------------------------------------------------------------------


def write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- /proc -----------------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (threads included)."""
    f = proc_stat(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) / CLK_TCK


def alive(pid: int) -> bool:
    f = proc_stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (everything a `start_new_session` child started)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = proc_stat(int(entry))
        if f is not None and f[0] not in ("Z", "X") and int(f[3]) == sid:
            out.append(int(entry))
    return out


# --- meshctl up --------------------------------------------------------------------------------------


class MeshUp:
    """`python -m agents.cli up` as a process in a session of its own, stopped with SIGINT like Ctrl-C."""

    def __init__(self, config_path: Path, *args: str, out: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.output_path = out
        self._out = out.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "up", "--config", str(config_path), *args],
                                     cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
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

    def wait(self, timeout: float) -> list[int]:
        """Waits for `up` to exit; kills (by pid) whatever of its session is still alive after
        `timeout`. Returns the pids that had to be killed (empty when everything stopped by itself)."""
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # Agents are children of the fork server, not of `up`: give them the rest of the time too.
        while time.monotonic() < deadline and session_members(self.proc.pid):
            time.sleep(0.1)
        leftovers = session_members(self.proc.pid)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._out.close()
        return leftovers

    def stop(self, timeout: float = 30.0) -> list[int]:
        self.interrupt()
        return self.wait(timeout)


def scan_logs(log_dir: Path, *, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[str]:
    """Lines at `levels` (or not JSON at all: tracebacks written to stderr) from every agent log."""
    found = []
    for path in sorted(Path(log_dir).glob("*.log*")):
        for raw in path.read_text(errors="replace").splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                found.append(f"{path.name}: (not JSON) {raw[:300]}")
                continue
            if line.get("level") in levels:
                found.append(f"{path.name}: {line.get('level')} {line.get('message', '')[:300]}"
                             + (" [traceback]" if "exc" in line else ""))
    return found


def install_sigterm_as_interrupt() -> None:
    """SIGTERM to the benchmark unwinds like Ctrl-C, so `finally` blocks stop what was started."""

    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
