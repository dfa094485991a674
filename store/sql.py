"""What every store shares: SQLite connections set up one way, and URLs safe to print."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """`url` with its password (if any) replaced by ``***``, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect_sqlite(path: str, *, timeout: float = 30.0, check_same_thread: bool = True) -> sqlite3.Connection:
    """A SQLite connection as the stores use it: autocommit (transactions are explicit), WAL journal,
    synchronous=NORMAL, and a busy timeout of `timeout` seconds. Parent directories are created.

    Switching a new database to WAL takes an exclusive lock without waiting on the busy handler, so when several
    processes or threads open a new file at once it is retried until `timeout`.
    """
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=check_same_thread)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        db.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        db.close()
        raise
    return db
