"""Structured logs: one JSON object a line, one file per agent, and a follower for `meshctl logs`."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, TextIO

from rich.console import Console
from rich.text import Text

from mesh.control import client
from mesh.messages import LogRead
from network.rpc import MeshError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta", "bright_green")


class JsonFormatter(logging.Formatter):
    def __init__(self, *, host: str, agent: str):
        super().__init__()
        self.host = host
        self.agent = agent

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "host": self.host,
            "agent": self.agent,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in ("msg_id", "cid", "peer"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def log_path(log_dir: Path, agent: str) -> Path:
    return Path(log_dir) / f"{agent}.log"


STDERR_ENV = "MESH_LOG_STDERR"
_original_stderr: TextIO | None = None   # fd 2 as it was before setup_agent_logging replaced it


def _wants_stderr() -> bool:
    return os.environ.get(STDERR_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def setup_agent_logging(agent: str, host: str, log_dir: Path, level: str = "INFO") -> Path:
    """Sends this process's logging, stdout and stderr to `log_dir/<agent>.log`.

    With MESH_LOG_STDERR=1 each JSON line also goes to the process's original stderr (kept
    before fd 2 is pointed at the file), so `podman logs` shows the structured lines."""
    global _original_stderr
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_path(log_dir, agent)
    formatter = JsonFormatter(host=host, agent=agent)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=20 << 20, backupCount=3, encoding="utf-8")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    sys.stdout.flush()
    sys.stderr.flush()
    if _wants_stderr():
        if _original_stderr is None:   # once per process: a second call must not keep a dup of the file
            _original_stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        echo = logging.StreamHandler(_original_stderr)
        echo.setFormatter(formatter)
        root.handlers.append(echo)
    # Anything written outside logging (a crash in C code, a stray print) still lands in the file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def _render(agent: str, raw: str, colour: str, min_level: int, width: int = 14):
    try:
        line = json.loads(raw)
        level = str(line.get("level", "INFO"))
        if LEVELS.index(level) < min_level if level in LEVELS else False:
            return None
        when = str(line.get("time", ""))[11:23]
        text = Text.assemble((f"{agent:<{width}}| ", colour), f"{when} ", (f"{level:<7}", _level_style(level)),
                             str(line.get("message", "")))
        if "exc" in line:
            text.append("\n" + str(line["exc"]))
        return text
    except (ValueError, AttributeError):
        return Text.assemble((f"{agent:<{width}}| ", colour), raw)


def _level_style(level: str) -> str:
    return {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red", "DEBUG": "dim"}.get(level, "")


class FileLog:
    """An agent's log file on this host, followed across rotation."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh: TextIO | None = None
        self.inode: int | None = None
        self.partial = ""

    def history(self, lines: int) -> list[str]:
        if not self.path.exists():
            return []
        out = list(_tail(self.path, lines))
        self.fh = self.path.open("r", encoding="utf-8", errors="replace")
        self.fh.seek(0, os.SEEK_END)
        self.inode = os.fstat(self.fh.fileno()).st_ino
        return out

    def poll(self) -> list[str]:
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != self.inode:      # rotated, or created since
            if self.fh is not None:
                rest = self.fh.read()                       # what the old file got before the rotation
                self.fh.close()
            else:
                rest = ""
            self.fh = self.path.open("r", encoding="utf-8", errors="replace")
            self.inode = inode
            return self._split(rest) + self._split(self.fh.read())
        return self._split(self.fh.read()) if self.fh is not None else []

    def _split(self, chunk: str) -> list[str]:
        if not chunk:
            return []
        *complete, self.partial = (self.partial + chunk).split("\n")
        return [line for line in complete if line]

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class MeshLog:
    """An agent's log read over the mesh (`log.read`): for agents of another host, containerised
    or not. An agent that does not answer is said once, and followed again when it is back."""

    def __init__(self, config, agent: str):
        self.config = config
        self.agent = agent
        self.client = None
        self.offset = -1
        self.file_id = ""
        self.down: str | None = None

    def _ask(self, tail: int) -> list[str]:
        try:
            if self.client is None:
                self.client = client(self.config, self.agent, timeout=2.0, sender="meshctl-logs")
            reply = self.client.request(LogRead(offset=self.offset, file_id=self.file_id, tail=tail))
        except (MeshError, OSError) as exc:
            if self.client is not None:
                self.client.close()
                self.client = None
            if self.down is None:
                self.down = str(getattr(exc, "message", exc))
                return [f"(no answer from {self.agent}: {self.down}; still trying)"]
            return []
        lines = []
        if self.down is not None:
            lines.append(f"(answering again after: {self.down})")
            self.down = None
        if reply.note and self.offset == -1:
            lines.append(f"({reply.note})")
        self.offset, self.file_id = reply.offset, reply.file_id
        return lines + reply.lines

    def history(self, lines: int) -> list[str]:
        return self._ask(lines)

    def poll(self) -> list[str]:
        return self._ask(0)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def follow(sources: dict[str, Path | FileLog | MeshLog], *, follow: bool, level: str = "DEBUG", lines: int = 20,
           out: TextIO | None = None, poll_s: float = 0.2, stop_after_s: float | None = None) -> None:
    """Prints the last `lines` of each agent's log, prefixed by its label (the agent's name); with
    `follow`, keeps printing new lines (across rotation) until interrupted. A source is a log file
    on this host (a Path or FileLog) or an agent asked over the mesh (MeshLog)."""
    console = Console(file=out or sys.stdout, highlight=False, soft_wrap=True)
    min_level = LEVELS.index(level.upper())
    logs = {label: FileLog(src) if isinstance(src, Path) else src for label, src in sources.items()}
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(logs)}
    width = max([14, *map(len, logs)])
    try:
        for label, log in logs.items():
            for raw in log.history(lines):
                _print(console, _render(label, raw, colour[label], min_level, width))
        if not follow:
            return
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        remote = any(isinstance(log, MeshLog) for log in logs.values())
        while deadline is None or time.monotonic() < deadline:
            for label, log in logs.items():
                for raw in log.poll():
                    _print(console, _render(label, raw, colour[label], min_level, width))
            time.sleep(max(poll_s, 0.5) if remote else poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        for log in logs.values():
            log.close()


def _print(console, text) -> None:
    if text is not None:
        console.print(text)
        console.file.flush()


def _tail(path: Path, lines: int) -> Iterable[str]:
    if lines <= 0:
        return []
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 256 * lines))
        data = fh.read().decode("utf-8", errors="replace").splitlines()
    if size > 256 * lines and data:
        data = data[1:]
    return data[-lines:]
