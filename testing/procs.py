"""Processes as /proc shows them: alive or not, CPU time, a session's members, a process's descendants."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    f = proc_stat(pid)
    return f is not None and f[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (threads included)."""
    f = proc_stat(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) / CLK_TCK


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
