"""The whole local pipeline on one CPU host: does learning keep pace with crawling, and does live curiosity pay?

The site is Debian's python3-doc (/usr/share/doc/python3/html), served by `python -m http.server` on loopback
(bench/crawl.py's StaticServer). Every run is `meshctl up` on a generated config shaped like config/local.yaml: the
twin, the crawl coordinator, the extractor (2 worker processes), the topic model on the `cpu` hardware profile (int8
OpenVINO; the int8 model is made before the runs, untimed, into this machine's model cache, which the agents then
use) and the curiosity agent, all on
this machine's cores, as `scripts/run` runs them. SQLite stores in a fresh data_dir per run.

1. Lag (`--pages`, default 500, depth 2, politeness 0: README's offline recipe). The document store is polled every
   0.2 s. fetch_s = the first page's fetch to the last page stored (extracted); score_lag_s = the last page scored
   (its scored_at) minus the last page stored; lag_ratio = score_lag_s / fetch_s. Target <= 0.2. The crawl is paced
   by the learner (the coordinator's `max_unscored`, by default the topic model's batch_docs, 64: no new fetch while
   more stored documents wait to be scored); the baseline, in the same run, is the same crawl unpaced (`max_unscored: 0`, the crawl before
   pacing): unpaced_fetch_s, unpaced_lag_ratio. `waited_s`: how long new fetches waited for the learner.
2. Live curiosity (`--budget`, default a fifth of the site's pages; the crawl's default politeness, 1 s, a polite
   crawl as the owner runs it). The same mesh crawls from index.html with that budget twice: once with the curiosity
   agent steering the frontier (crawl.prioritize) and once without it (the coordinator's own breadth-first order).
   Each counts the distinct reference topics its stored, non-duplicate documents reach: bench/curiosity.py's reference
   clustering (k-means, --clusters 50, on the semantic vectors of every reachable page). e2e_topics_vs_bfs =
   curious / bfs, over `--repeats` pairs (means). Target >= 1.15. Unlike bench/curiosity.py, which replays the link
   graph with every page scored at once, this measures the policy as it runs: on signals as late as the topic model
   makes them.

Last line: RESULT fetch_s=<...> score_lag_s=<...> lag_ratio=<...> e2e_topics_vs_bfs=<...> pages=<stored> scored=<...>
           bfs_topics=<mean> curious_topics=<mean> budget=<N> waited_s=<...> unpaced_fetch_s=<...>
           unpaced_lag_ratio=<...>
Exit 2 when python3-doc is missing (apt-get install -y python3-doc).

Usage: .venv/bin/python bench/pipeline.py [--pages 500] [--budget N] [--politeness 1.0] [--repeats 1] [--clusters 50]
                                          [--skip-lag] [--skip-unpaced] [--skip-e2e] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import install_sigterm_as_interrupt, run_main, scan_logs, summarize_logs  # noqa: E402
from bench.crawl import StaticServer  # noqa: E402
from testing.harness import MeshUp, free_port_block, write_config  # noqa: E402

PYDOC = Path("/usr/share/doc/python3/html")
POLL_S = 0.2


@dataclass
class Run:
    label: str
    stored: int = 0
    scored: int = 0
    fetch_s: float = float("nan")
    score_lag_s: float = float("nan")
    topics: int = 0
    waited_s: float = float("nan")   # the coordinator's learner_wait_s at the end
    urls: list[str] = field(default_factory=list)     # stored non-duplicate documents, by fetch time
    alerts: list[str] = field(default_factory=list)   # warnings and errors from the agents' logs
    problems: list[str] = field(default_factory=list)


def build_config(start: str, data: Path, *, pages: int, depth: int, politeness: float,
                 curiosity: bool, paced: bool = True) -> dict:
    agents = {
        "twin": {"kind": "digital_twin"},
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 2}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": [start], "max_depth": depth, "max_pages": pages,
                                 "politeness_s": politeness, "per_host_concurrency": 2,
                                 **({} if paced else {"max_unscored": 0})}},
        "topics": {"kind": "topic_model", "depends_on": ["twin"]},
    }
    learn = ["topics"]
    if curiosity:
        agents["curiosity"] = {"kind": "curiosity", "depends_on": ["twin"],
                               "settings": {"coordinator": "crawler", "topic_model": "topics"}}
        learn.append("curiosity")
    return {
        "mesh": {"name": "bench-pipeline", "base_port": free_port_block(60), "heartbeat_interval_s": 1.0,
                 "data_dir": str(data)},
        "security": {"curve": "off"},
        "hosts": {"local": {"address": "127.0.0.1", "profile": "cpu"}},
        "groups": {"core": {"host": "local", "agents": ["twin"]},
                   "crawl": {"host": "local", "agents": ["crawler", "extractor"]},
                   "learn": {"host": "local", "agents": learn}},
        "agents": agents,
    }


def _counts(db: Path) -> tuple[int, int, float | None, float | None]:
    """(stored, scored, first fetched_at, last scored_at) read-only from documents.db; zeros before it exists."""
    if not db.exists():
        return 0, 0, None, None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(
                "SELECT count(*), count(embedding_id), min(fetched_at), max(scored_at) "
                "FROM documents WHERE state = 'extracted'").fetchone()
    except sqlite3.Error:
        return 0, 0, None, None


def run_mesh(label: str, server: StaticServer, work: Path, *, pages: int, depth: int,
             politeness: float, curiosity: bool, timeout: float, paced: bool = True) -> Run:
    """One crawl to its end (the coordinator idle) and until every stored document is scored."""
    from agents.contracts import CrawlStatusRequest
    from mesh.config import load_config
    from mesh.control import client
    from network.rpc import MeshError

    run = Run(label)
    tmp = work / label
    tmp.mkdir(parents=True)
    path = write_config(build_config(server.url(), tmp / "data", pages=pages, depth=depth,
                                     politeness=politeness, curiosity=curiosity, paced=paced), tmp / "mesh.yaml")
    cfg = load_config(path)
    db = tmp / "data" / "documents.db"
    up = MeshUp(path, out=tmp / "meshctl-up.out")
    phases = [("running", time.time())]
    last_stored_at = None      # wall time the stored count last grew
    stored = 0
    idle = False
    try:
        with client(cfg, "crawler", timeout=1.0) as c:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not up.running():
                    run.problems.append(f"meshctl up exited early:\n{up.output()[-3000:]}")
                    break
                now = time.time()
                n, scored, first_fetch, last_scored = _counts(db)
                if n > stored:
                    stored, last_stored_at = n, now
                if not idle:
                    try:
                        status = c.request(CrawlStatusRequest())
                        idle = status.idle and bool(status.pages or status.done or status.failed)
                    except MeshError:
                        pass
                if idle and n == stored and scored >= n > 0:
                    run.stored, run.scored = n, scored
                    try:
                        run.waited_s = c.request(CrawlStatusRequest()).learner_wait_s
                    except MeshError:
                        pass
                    run.fetch_s = last_stored_at - first_fetch
                    run.score_lag_s = max(0.0, (last_scored or last_stored_at) - last_stored_at)
                    break
                time.sleep(POLL_S)
            else:
                n, scored, *_ = _counts(db)
                run.stored, run.scored = n, scored
                run.problems.append(f"not crawled and scored within {timeout:.0f} s: {n} stored, {scored} scored")
    finally:
        phases.append(("stopping", time.time()))
        up.stop(30.0)
    if db.exists():
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            run.urls = [u for (u,) in conn.execute(
                "SELECT url FROM documents WHERE state = 'extracted' AND duplicate_of IS NULL ORDER BY fetched_at")]
    run.alerts = summarize_logs(scan_logs(tmp / "data" / "logs"), phases=phases)
    return run


def reference_topics(clusters: int):
    """url path -> reference cluster, from bench/curiosity.py's site (cached in data/bench/)."""
    from bench.curiosity import BASE, load_site, reference_clusters

    site = load_site()
    print(f"reference site: {site.note}", flush=True)
    labels = reference_clusters(site, clusters)
    return {p.url[len(BASE) - 1:]: int(labels[p.row]) for p in site.pages.values() if p.row >= 0}, len(site.pages)


def topics_reached(run: Run, by_path: dict[str, int]) -> int:
    return len({by_path[urlsplit(u).path] for u in run.urls if urlsplit(u).path in by_path})


def export_model() -> float:
    """The cpu profile's int8 export in this machine's model cache, made now if it is not there (seconds)."""
    from agents.embedding import Embedder, resolve_profile
    from agents.int8model import default_cache_dir

    p = resolve_profile("cpu")
    t0 = time.perf_counter()
    Embedder(device="cpu", backend=p.backend, batch_size=p.batch_size, max_chunks=p.max_chunks, threads=p.threads,
             cache_dir=default_cache_dir())
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=500)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--budget", type=int, default=0, help="pages of each live-curiosity crawl (0: a fifth of the site)")
    ap.add_argument("--politeness", type=float, default=1.0, help="politeness of the live-curiosity crawls (s)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--skip-lag", action="store_true")
    ap.add_argument("--skip-unpaced", action="store_true", help="no baseline crawl without pacing by the learner")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the runs' data dirs here")
    args = ap.parse_args()
    if not (PYDOC / "index.html").exists():
        print("python3-doc is not installed: apt-get install -y python3-doc", file=sys.stderr)
        return 2
    install_sigterm_as_interrupt()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    server = StaticServer(PYDOC, work / "http.log")
    lag, unpaced = Run("lag"), Run("unpaced")
    e2e = float("nan")
    bfs_mean = curious_mean = float("nan")
    budget = args.budget
    try:
        print(f"int8 model ready in {export_model():.1f}s (untimed)", flush=True)
        if not args.skip_lag:
            runs = [("lag", True)] + ([] if args.skip_unpaced else [("unpaced", False)])
            for label, paced in runs:
                run = run_mesh(label, server, work, pages=args.pages, depth=args.depth, politeness=0.0,
                               curiosity=True, timeout=args.timeout, paced=paced)
                print(f"{label} run: {run.stored} stored in {run.fetch_s:.1f}s, last scored {run.score_lag_s:.1f}s "
                      f"after the last stored ({run.scored} scored; new fetches waited {run.waited_s:.1f}s for the "
                      f"learner){'; ' + '; '.join(run.problems) if run.problems else ''}", flush=True)
                for line in run.alerts:
                    print(f"  agents' log: {line}", flush=True)
                if paced:
                    lag = run
                else:
                    unpaced = run
        if not args.skip_e2e:
            by_path, site_pages = reference_topics(args.clusters)
            budget = budget or round(site_pages / 5)
            bfs, curious = [], []
            for r in range(args.repeats):
                for label, steer, out in (("bfs", False, bfs), ("curious", True, curious)):
                    run = run_mesh(f"{label}-{r}", server, work, pages=budget, depth=100,
                                   politeness=args.politeness, curiosity=steer, timeout=args.timeout)
                    run.topics = topics_reached(run, by_path)
                    out.append(run.topics)
                    print(f"round {r + 1}: {label:8s} {run.stored} stored, {run.topics} reference topics, "
                          f"{run.fetch_s:.0f}s, last scored {run.score_lag_s:.1f}s after the last stored"
                          f"{'; ' + '; '.join(run.problems) if run.problems else ''}", flush=True)
            bfs_mean, curious_mean = statistics.mean(bfs), statistics.mean(curious)
            e2e = curious_mean / bfs_mean if bfs_mean else float("nan")
    finally:
        server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = lag.score_lag_s / lag.fetch_s if lag.fetch_s > 0 else float("nan")
    unpaced_ratio = unpaced.score_lag_s / unpaced.fetch_s if unpaced.fetch_s > 0 else float("nan")
    print(f"RESULT fetch_s={lag.fetch_s:.1f} score_lag_s={lag.score_lag_s:.1f} lag_ratio={ratio:.2f} "
          f"e2e_topics_vs_bfs={e2e:.2f} pages={lag.stored} scored={lag.scored} bfs_topics={bfs_mean:.1f} "
          f"curious_topics={curious_mean:.1f} budget={budget} waited_s={lag.waited_s:.1f} "
          f"unpaced_fetch_s={unpaced.fetch_s:.1f} unpaced_lag_ratio={unpaced_ratio:.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
