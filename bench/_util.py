"""Shared helpers of the benchmarks: free ports, `meshctl up` as a process, /proc readings, log scan.

Nothing here changes the mesh; it only starts and watches it from outside, the way an operator would.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
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


@dataclass
class LogLine:
    file: str
    level: str
    message: str
    t: float | None  # seconds since the epoch, None for lines that are not JSON log records
    traceback: bool = False


def scan_logs(log_dir: Path, *, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[LogLine]:
    """Records at `levels`, and lines that are not JSON at all (tracebacks written to stderr), from
    every agent log under `log_dir`, oldest first."""
    found = []
    for path in sorted(Path(log_dir).glob("*.log*")):
        for raw in path.read_text(errors="replace").splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                found.append(LogLine(path.name, "STDERR", raw[:300], None))
                continue
            if line.get("level") in levels:
                try:
                    t = datetime.fromisoformat(str(line.get("time"))).timestamp()
                except ValueError:
                    t = None
                found.append(LogLine(path.name, str(line.get("level")), str(line.get("message", ""))[:300], t,
                                     "exc" in line))
    found.sort(key=lambda ln: (ln.t is None, ln.t or 0.0))
    return found


def summarize_logs(lines: list[LogLine], *, phases: list[tuple[str, float]] | None = None,
                   limit: int = 12) -> list[str]:
    """One line per (phase, level, message pattern) with a count and an example file: agent names,
    addresses and numbers are folded so that 50 agents logging the same thing read as one line.
    `phases` is [(name, start epoch seconds), ...] in time order."""
    groups: dict[tuple[str, str, str], list[LogLine]] = {}
    for ln in lines:
        phase = ""
        for name, since in phases or []:
            if ln.t is not None and ln.t >= since:
                phase = name
        pattern = re.sub(r"tcp://[^\s)]+", "tcp://ADDR", ln.message)
        pattern = re.sub(r"'[a-z][a-z0-9_-]*'", "'NAME'", pattern)
        pattern = re.sub(r"\d+(\.\d+)?", "N", pattern)
        groups.setdefault((phase, ln.level, pattern), []).append(ln)
    out = []
    for (phase, level, _), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = group[0]
        where = f"{len(group)}x, e.g. {first.file}" if len(group) > 1 else first.file
        out.append(f"{'[' + phase + '] ' if phase else ''}{level} ({where}): {first.message}"
                   + (" [with traceback]" if first.traceback else ""))
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more kinds"]
    return out


def install_sigterm_as_interrupt() -> None:
    """SIGTERM to the benchmark unwinds like Ctrl-C, so `finally` blocks stop what was started."""

    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_main(main) -> None:
    """Runs a benchmark's main(); Ctrl-C exits 130 after its own clean-up has run."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
