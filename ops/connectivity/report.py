"""The result rows (Check), their statuses, and the two ways of showing them: the table with each
problem's cause and fix under it, and the JSON report (--json)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
STYLE = {PASS: "bold green", FAIL: "bold red", WARN: "bold yellow", SKIP: "dim"}


@dataclass
class Check:
    link: str
    agent: str
    host: str
    check: str
    status: str
    value: str = ""
    cause: str = ""
    fix: str = ""
    data: dict = field(default_factory=dict)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def fmt_secs(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def all_passed(checks: list[Check]) -> bool:
    """No check failed (warnings and skips allowed)."""
    return not any(c.status == FAIL for c in checks)


def print_table(me: str, checks: list[Check], elapsed: float, cfg_path: str) -> None:
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120  # piped: do not squeeze into 80
    console = Console(highlight=False, width=wide)
    ok = all_passed(checks)
    table = Table(title=f"connectivity from {me} ({cfg_path})", title_justify="left")
    for col in ("link", "check", "result", "value"):
        table.add_column(col, overflow="fold")
    last = None
    for c in checks:
        table.add_row(escape(c.link) if c.link != last else "", escape(c.check),
                      f"[{STYLE[c.status]}]{c.status.upper()}[/]", escape(c.value))
        last = c.link
    console.print(table)
    problems = [c for c in checks if c.status in (FAIL, WARN) and (c.cause or c.fix)]
    for i, c in enumerate(problems):
        console.print(f"[{STYLE[c.status]}]{c.status.upper()}[/] {escape(c.link)} [bold]{escape(c.check)}[/]: "
                      f"{escape(c.cause)}", soft_wrap=True)
        if c.fix and (i + 1 == len(problems) or problems[i + 1].fix != c.fix):  # one fix under a run of equal ones
            console.print(f"    fix: {escape(c.fix)}", soft_wrap=True)
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, WARN, SKIP)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "[bold green]OK[/]: the hosts can work together" if ok else "[bold red]FAILED[/]"
    console.print(f"{verdict} ({summary}; {elapsed:.1f}s)", soft_wrap=True)


def print_json(me: str, checks: list[Check], elapsed: float, cfg_path: str) -> None:
    print(json.dumps({"from": me, "config": cfg_path, "ok": all_passed(checks), "elapsed_s": round(elapsed, 3),
                      "checks": [asdict(c) for c in checks]}, indent=2))


def print_json_config_error(from_: str | None, cfg_path: str, error: str) -> None:
    """The --json report of a run that could not read its config (exit status 2)."""
    print(json.dumps({"from": from_, "config": cfg_path, "ok": False, "error": error, "checks": []}))
