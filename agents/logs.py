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


def _render(agent: str, raw: str, colour: str, min_level: int):
    from rich.text import Text

    try:
        line = json.loads(raw)
        level = str(line.get("level", "INFO"))
        if LEVELS.index(level) < min_level if level in LEVELS else False:
            return None
        when = str(line.get("time", ""))[11:23]
        text = Text.assemble((f"{agent:<14}| ", colour), f"{when} ", (f"{level:<7}", _level_style(level)),
                             str(line.get("message", "")))
        if "exc" in line:
            text.append("\n" + str(line["exc"]))
        return text
    except (ValueError, AttributeError):
        return Text.assemble((f"{agent:<14}| ", colour), raw)


def _level_style(level: str) -> str:
    return {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red", "DEBUG": "dim"}.get(level, "")


def follow(files: dict[str, Path], *, follow: bool, level: str = "DEBUG", lines: int = 20,
           out: TextIO | None = None, poll_s: float = 0.2, stop_after_s: float | None = None) -> None:
    """Prints the last `lines` of each agent's log, prefixed by the agent's name; with
    `follow`, keeps printing new lines (across rotation) until interrupted."""
    from rich.console import Console

    console = Console(file=out or sys.stdout, highlight=False, soft_wrap=True)
    min_level = LEVELS.index(level.upper())
    colour = {agent: COLOURS[i % len(COLOURS)] for i, agent in enumerate(files)}
    handles: dict[str, tuple[TextIO, int]] = {}
    for agent, path in files.items():
        if path.exists():
            for raw in _tail(path, lines):
                _print(console, _render(agent, raw, colour[agent], min_level))
            fh = path.open("r", encoding="utf-8", errors="replace")
            fh.seek(0, os.SEEK_END)
            handles[agent] = (fh, os.fstat(fh.fileno()).st_ino)
    if not follow:
        return
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
    partial: dict[str, str] = {}
    try:
        while deadline is None or time.monotonic() < deadline:
            for agent, path in files.items():
                _reopen_if_rotated(agent, path, handles)
                if agent not in handles:
                    continue
                fh = handles[agent][0]
                chunk = fh.read()
                if not chunk:
                    continue
                buf = partial.get(agent, "") + chunk
                *complete, partial[agent] = buf.split("\n")
                for raw in complete:
                    if raw:
                        _print(console, _render(agent, raw, colour[agent], min_level))
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        for fh, _ in handles.values():
            fh.close()


def _print(console, text) -> None:
    if text is not None:
        console.print(text)
        console.file.flush()


def _reopen_if_rotated(agent: str, path: Path, handles: dict) -> None:
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return
    current = handles.get(agent)
    if current is None or current[1] != inode:
        if current is not None:
            current[0].close()
        handles[agent] = (path.open("r", encoding="utf-8", errors="replace"), inode)


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
