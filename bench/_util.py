"""What only the benchmarks need: reading the agents' logs after a run, and a main() that stops cleanly.

Ports, configs, `meshctl up` as a process and /proc readings are testing/'s (shared with the tests).
"""

from __future__ import annotations

import json
import re
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


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
