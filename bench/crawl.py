"""Pages per minute of the crawl pipeline (crawl_coordinator + extractor) against Scrapy + trafilatura.

The site is Debian's python3-doc (/usr/share/doc/python3/html, 530 HTML pages for Python 3.11; `--site DIR`
for another), served once for both crawlers by `python -m http.server --bind 127.0.0.1 PORT` (a
ThreadingHTTPServer, HTTP/1.0, no robots.txt: 404) in a process of its own. Both crawlers start at
http://127.0.0.1:PORT/index.html, stay on that host, obey robots.txt and share the same limits: max depth
(default 5, the start page is depth 0), page budget (default 600), 8 concurrent requests to the one host,
no politeness delay, 15 s request timeout, 5 MB body limit; only HTML pages are extracted.

* baseline -- bench/_scrapy_baseline.py in a subprocess: a Scrapy CrawlerProcess whose parse callback runs
              trafilatura.bare_extraction(html, url=..., with_metadata=True) on every HTML page and follows
              every link. wall_s = spawn to exit; pages = JSON lines it wrote (one per extracted HTML page).
* ours     -- `meshctl up` (bench/_util.MeshUp) on a generated config: twin, extractor, crawl_coordinator
              (SQLite stores under a temp data_dir), the coordinator polled every 0.2 s with
              CrawlStatusRequest. wall_s = spawn of `meshctl up` to the first status with idle true (so the
              mesh's start-up counts, as Scrapy's does); pages = CrawlStatus.documents. After the stop the
              rows of <data_dir>/documents.db with state 'extracted' are counted too, for the table.

With the defaults, python3-doc 3.11.2 gives both crawlers the same work: from index.html every page is
within depth 5, 529 requests (robots.txt 404, whatsnew/changelog.html 404 as Debian does not ship it, one
.py download, 526 HTML pages), so 526 pages extracted and the 600-page budget is never reached.

pages_per_min = pages / wall_s * 60. The two run alternately `--rounds` times; medians are reported. The table
also shows each side's CPU seconds (Scrapy: its own rusage; ours: every process of the mesh's session, read
from /proc just before the stop) and the requests the server logged while it ran. The last line is:

    RESULT pages_per_min=<ours> ratio=<ours/baseline> baseline_pages_per_min=<...> pages=<ours> baseline_pages=<...>

Exit 2 when the site is missing (apt-get install python3-doc), and, after the baseline has run, when the
pipeline (agents.contracts, the two kinds) cannot be imported yet.

Usage: .venv/bin/python bench/crawl.py [--pages 600] [--depth 5] [--concurrency 8] [--rounds 1] [--site DIR] [--keep]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import install_sigterm_as_interrupt, run_main, scan_logs, summarize_logs  # noqa: E402
from testing.harness import (
    MeshUp,  # noqa: E402
    free_port_block,
    write_config,
)
from testing.procs import cpu_seconds, session_members

DEFAULT_SITE = Path("/usr/share/doc/python3/html")
TIMEOUT_S = 15.0
MAX_BYTES = 5_000_000
POLL_S = 0.2
_LOG_LINE = re.compile(r'"(?:GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')


# --- the site ------------------------------------------------------------------------------------------


class StaticServer:
    """`python -m http.server` on 127.0.0.1 serving `directory`; its request log goes to `log`."""

    def __init__(self, directory: Path, log: Path):
        self.port = free_port_block(1)
        self.log = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
             "--directory", str(directory)],
            stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"http.server exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("HEAD", "/index.html")
                status = conn.getresponse().status
                conn.close()
                if status != 200:
                    raise RuntimeError(f"http.server answers {status} for /index.html")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("http.server did not answer within 15 s") from None
                time.sleep(0.05)

    def url(self, path: str = "/index.html") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def mark(self) -> int:
        """A position in the request log; `requests_since(mark)` counts what came after it."""
        self._log.flush()
        return self.log.stat().st_size

    def requests_since(self, mark: int) -> Counter:
        """Requests logged after `mark`, by status code ('200', '404', ...)."""
        with self.log.open("rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        return Counter(m.group(2) for m in _LOG_LINE.finditer(text))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def count_html(directory: Path) -> int:
    return sum(1 for _ in directory.resolve().rglob("*.html"))


# --- one run of either crawler ---------------------------------------------------------------------------


@dataclass
class Run:
    side: str  # "baseline" or "ours"
    round: int
    wall_s: float = float("nan")
    pages: int = 0
    cpu_s: float = float("nan")
    requests: Counter = field(default_factory=Counter)
    detail: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def pages_per_min(self) -> float:
        return self.pages / self.wall_s * 60 if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.wall_s == self.wall_s


def run_baseline(args: argparse.Namespace, server: StaticServer, work: Path, rnd: int) -> Run:
    run = Run("baseline", rnd)
    out, stats_path, log = work / f"scrapy-{rnd}.jsonl", work / f"scrapy-{rnd}-stats.json", work / f"scrapy-{rnd}.log"
    cmd = [sys.executable, str(ROOT / "bench" / "_scrapy_baseline.py"), "--start", server.url(), "--out", str(out),
           "--depth", str(args.depth), "--pages", str(args.pages), "--concurrency", str(args.concurrency),
           "--timeout", str(TIMEOUT_S), "--max-bytes", str(MAX_BYTES), "--stats", str(stats_path)]
    mark = server.mark()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("wb") as log_f:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            run.problems.append(f"scrapy did not finish within {args.timeout:.0f} s (killed)")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        run.wall_s = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run.requests = server.requests_since(mark)
    if proc.returncode != 0:
        run.problems.append(f"scrapy exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    run.pages = len(rows)
    run.detail["text_chars"] = sum(r["text_len"] for r in rows)
    run.detail["no_text"] = sum(r["text_len"] == 0 for r in rows)
    run.detail["max_depth_seen"] = max((r["depth"] for r in rows), default=0)
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        run.detail["finish_reason"] = stats.get("finish_reason")
        run.detail["errors_logged"] = stats.get("log_count/ERROR", 0)
        run.detail["depth_dropped"] = stats.get("depth/request_ignored_count", 0)
    return run


def pipeline_missing() -> str | None:
    """Why the pipeline cannot run yet, or None when agents.contracts and both kinds import."""
    try:
        import agents.contracts  # noqa: F401
        from mesh.runtime import resolve
        resolve("crawl_coordinator")
        resolve("extractor")
    except Exception as exc:  # ImportError, UnknownKind, or a half-written module
        return f"{type(exc).__name__}: {exc}"
    return None


def build_config(args: argparse.Namespace, start: str, data_dir: Path) -> dict:
    return {
        "mesh": {"name": "bench-crawl", "base_port": free_port_block(40), "heartbeat_interval_s": 1.0,
                 "data_dir": str(data_dir)},
        "security": {"curve": "off"},
        "hosts": {"local": {"address": "127.0.0.1"}},
        "groups": {"core": {"host": "local", "agents": ["twin"]},
                   "crawl": {"host": "local", "agents": ["crawler"]},
                   "extract": {"host": "local", "agents": ["extractor"]}},
        "agents": {
            "twin": {"kind": "digital_twin"},
            "extractor": {"kind": "extractor", "depends_on": ["twin"]},
            "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                        "settings": {"seeds": [start], "max_depth": args.depth, "max_pages": args.pages,
                                     "per_host_concurrency": args.concurrency, "politeness_s": 0.0,
                                     "timeout_s": TIMEOUT_S, "max_bytes": MAX_BYTES}},
        },
    }


def count_documents(db: Path) -> int | str:
    """Rows of documents.db's `documents` table in state 'extracted' (or why they could not be counted)."""
    if not db.exists():
        return f"{db.name} missing"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM documents WHERE state = 'extracted'").fetchone()[0]
    except sqlite3.Error as exc:
        return f"{db.name}: {exc}"


def run_ours(args: argparse.Namespace, server: StaticServer, work: Path, rnd: int) -> Run:
    from agents.contracts import CrawlStatusRequest
    from mesh.config import load_config
    from mesh.control import client
    from network.rpc import MeshError

    run = Run("ours", rnd)
    tmp = work / f"ours-{rnd}"
    tmp.mkdir()
    path = write_config(build_config(args, server.url(), tmp / "data"), tmp / "mesh.yaml")
    cfg = load_config(path)
    phases = [("crawling", time.time())]
    mark = server.mark()
    up = MeshUp(path, out=tmp / "meshctl-up.out")
    status = None
    try:
        with client(cfg, "crawler", timeout=1.0) as c:
            deadline = up.started + args.timeout
            while True:
                if not up.running():
                    run.problems.append(f"meshctl up exited early with {up.proc.returncode}:\n{up.output()[-3000:]}")
                    break
                if time.monotonic() > deadline:
                    run.problems.append(f"not idle within {args.timeout:.0f} s; last status: {status!r}")
                    break
                try:
                    status = c.request(CrawlStatusRequest())
                except MeshError:  # not up yet, or too busy to answer within 1 s
                    time.sleep(POLL_S)
                    continue
                # An idle coordinator that has not fetched anything yet has not seen its seeds: keep waiting.
                if status.idle and (status.pages or status.done or status.failed):
                    run.wall_s = time.monotonic() - up.started
                    break
                time.sleep(POLL_S)
        members = session_members(up.pid)
        run.cpu_s = sum(cpu_seconds(p) or 0.0 for p in members)
    finally:
        phases.append(("stopping", time.time()))
        up.stop(30.0)
        leftovers = up.leftovers
        if leftovers:
            run.problems.append(f"processes still alive 30 s after SIGINT, killed: {leftovers}")
        if up.proc.returncode not in (0, None):
            run.problems.append(f"meshctl up exited with {up.proc.returncode}")
    run.requests = server.requests_since(mark)
    if status is not None:
        run.pages = status.documents
        run.detail.update({k: getattr(status, k, None) for k in
                           ("queued", "leased", "fetched", "done", "failed", "pages", "in_flight", "documents")})
    run.detail["documents_db"] = count_documents(tmp / "data" / "documents.db")
    run.detail["log_problems"] = summarize_logs(scan_logs(tmp / "data" / "logs"), phases=phases)
    return run


# --- report --------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(runs: list[Run]) -> None:
    sides = [s for s in ("baseline", "ours") if any(r.side == s for r in runs)]
    names = {"baseline": "scrapy+trafilatura", "ours": "crawl pipeline"}
    by = {s: [r for r in runs if r.side == s] for s in sides}

    def row(label: str, fn, fmt: str) -> None:
        cells = []
        for s in sides:
            vals = [fn(r) for r in by[s]]
            vals = [v for v in vals if v is not None]
            cells.append(format(median(vals), fmt) if vals else "-")
        print(f"{label:<34}" + "".join(f"{c:>22}" for c in cells))

    print()
    print(f"{'median of ' + str(max(len(v) for v in by.values())) + ' round(s)':<34}"
          + "".join(f"{names[s]:>22}" for s in sides))
    row("wall s (spawn to done)", lambda r: r.wall_s, ".1f")
    row("pages extracted", lambda r: r.pages, ".0f")
    row("pages/min", lambda r: r.pages_per_min, ".1f")
    row("CPU s (all its processes)", lambda r: r.cpu_s, ".1f")
    row("HTTP requests served", lambda r: sum(r.requests.values()), ".0f")
    row("  of which not 200", lambda r: sum(v for k, v in r.requests.items() if k != "200"), ".0f")
    if "ours" in by:
        row("documents.db rows 'extracted'",
            lambda r: r.detail.get("documents_db") if isinstance(r.detail.get("documents_db"), int) else None, ".0f")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=600, help="page budget of both crawlers (default 600)")
    ap.add_argument("--depth", type=int, default=5, help="max depth, start page = 0 (default 5)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent requests to the host (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of both crawlers (default 1)")
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE, help=f"directory to serve (default {DEFAULT_SITE})")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on one crawl after this many s")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, outputs) and print it")
    args = ap.parse_args()
    install_sigterm_as_interrupt()

    if not (args.site / "index.html").exists():
        print(f"no site at {args.site} (index.html missing): apt-get install python3-doc", file=sys.stderr)
        return 2
    n_html = count_html(args.site)
    missing = pipeline_missing()

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-crawl-")
    work = Path(tmp_ctx.name)
    runs: list[Run] = []
    server = None
    try:
        server = StaticServer(args.site, work / "http-server.log")
        print(f"site {args.site} ({n_html} HTML files) at {server.url()}; depth {args.depth}, budget {args.pages} "
              f"pages, {args.concurrency} concurrent, timeout {TIMEOUT_S:.0f} s, max {MAX_BYTES} bytes", flush=True)
        for rnd in range(1, args.rounds + 1):
            sides = ("baseline",) if missing else ("baseline", "ours")
            for side in sides:
                run = (run_baseline if side == "baseline" else run_ours)(args, server, work, rnd)
                runs.append(run)
                extra = " ".join(f"{k}={v}" for k, v in run.detail.items() if k != "log_problems")
                print(f"round {rnd} {side:<8} {run.pages:>5} pages in {run.wall_s:6.1f} s = "
                      f"{run.pages_per_min:7.1f} pages/min, CPU {run.cpu_s:.1f} s, "
                      f"{sum(run.requests.values())} requests {dict(run.requests)}; {extra}", flush=True)
                for p in run.problems:
                    print(f"  problem: {p}", flush=True)
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="bench-crawl-kept-"))
            shutil.copytree(work, kept, dirs_exist_ok=True)
            print(f"kept configs, logs and outputs in {kept}")
        tmp_ctx.cleanup()

    print_table(runs)
    base = [r for r in runs if r.side == "baseline"]
    ours = [r for r in runs if r.side == "ours"]
    base_ppm = median([r.pages_per_min for r in base])
    base_pages = median([r.pages for r in base])
    logged = sorted({p for r in ours for p in r.detail.get("log_problems", [])})
    if logged:
        print("warnings/errors in the mesh's agent logs:")
        for line in logged[:15]:
            print("  " + line)
    if missing:
        print(f"baseline: {base_ppm:.1f} pages/min ({base_pages:.0f} pages)")
        print(f"the pipeline cannot run yet ({missing}); only the baseline was measured")
        return 2
    ppm = median([r.pages_per_min for r in ours])
    pages = median([r.pages for r in ours])
    ratio = ppm / base_ppm if base_ppm > 0 else float("nan")
    print(f"RESULT pages_per_min={ppm:.1f} ratio={ratio:.3f} baseline_pages_per_min={base_ppm:.1f} "
          f"pages={pages:.0f} baseline_pages={base_pages:.0f}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    run_main(main)
