"""Pages per minute of fetch + extract with one extractor against a pool of two, one per host (two lab hosts).

The crawl is extraction-bound on purpose: each extractor runs one extraction worker process (`workers: 1`), the
crawler fetches with no politeness delay from a site on its own host, so pages wait for an extractor and a second
one (on the other host) is what can make the crawl faster. testing/poollab.py sets up the mesh on two lab hosts
(network namespaces joined by a veth link, testing/lab.py): the twin on MainPC, the crawl coordinator and
extractor-1 on PC2, extractor-2 (second run only) on MainPC, `meshctl up` on each host, SQLite stores, and
Debian's python3-doc (/usr/share/doc/python3/html, `--site DIR` for another) served inside PC2 by
`python -m http.server`. Crawl: from index.html, max depth 5, budget 600 pages, 8 requests at once to the site,
handoff_window 16 per extractor (the coordinator spreads pages by that credit).

Both runs happen here, one after the other on a fresh data directory each (the baseline is measured in the same
run, on the same machine state): 1 extractor (`replicas: {pc2: 1}`), then 2 (`replicas: {pc2: 1, mainpc: 1}`).
A poller inside PC2 asks the coordinator for crawl.status every 0.2 s. A run's rate counts from the first stored
page to the crawl going idle (the mesh's start-up is left out, the same for both): pages_per_min = (stored at the
end - stored at the first reading with any) / seconds between * 60. scale_2 = pages_per_min_2 / pages_per_min_1.

The two lab hosts share this machine's cores, so what two extractors can add is bounded by what the rest of the
pipeline leaves them: the CPU split of each run (CPU seconds of each agent, its extraction workers included, and of
the site server, over the measured span, as % of one core) is printed, and the last line carries the second run's:

    RESULT scale_2=<2/1> pages_per_min_1=<...> pages_per_min_2=<...> pages_1=<..> pages_2=<..> cores=<n>
           cpu_crawler_pct=<..> cpu_extractors_pct=<..> cpu_other_pct=<..>

(on one line). Exit 2 without root (the lab needs network namespaces) or without the site.

Usage: .venv/bin/python bench/scale.py [--pages 600] [--depth 5] [--site DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import install_sigterm_as_interrupt, run_main  # noqa: E402
from testing.lab import Lab, available  # noqa: E402
from testing.poollab import PYDOC, PoolLab  # noqa: E402

PLACEMENTS = {1: {"pc2": 1}, 2: {"pc2": 1, "mainpc": 1}}


def run(lab: Lab, work: Path, n: int, args: argparse.Namespace) -> dict:
    crawler = {"max_depth": args.depth, "max_pages": args.pages, "politeness_s": 0.0, "per_host_concurrency": 8,
               "concurrency": 16, "handoff_window": 16, "timeout_s": 15.0}
    with PoolLab(lab, work / f"run-{n}", PLACEMENTS[n], crawler=crawler,
                 extractor={"max_tasks_per_worker": 1_000_000}, site=args.site) as pool:
        t_start = time.monotonic()
        pool.start()
        first = pool.wait(lambda st: st["documents"] > 0, 180, "the first stored page")
        t0, cpu0, docs0 = time.monotonic(), pool.cpu(), first["documents"]
        last = pool.wait_idle(timeout=1200)
        t1, cpu1 = time.monotonic(), pool.cpu()
        span = t1 - t0
        cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
        out = {"n": n, "pages": last["documents"], "span_s": span, "startup_s": t0 - t_start,
               "ppm": (last["documents"] - docs0) / span * 60,
               "per_extractor": {e["agent"]: e["acknowledged"] for e in last["extractors"]},
               "cpu_pct": {k: v / span * 100 for k, v in sorted(cpu.items())}}
    return out


def main() -> int:
    install_sigterm_as_interrupt()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=600)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--site", type=Path, default=PYDOC)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, stores)")
    args = ap.parse_args()
    ok, why = available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    if not (args.site / "index.html").exists():
        print(f"cannot run: no site at {args.site} (apt-get install python3-doc)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        with Lab(("mainpc", "pc2")) as lab:
            runs = {n: run(lab, work, n, args) for n in (1, 2)}
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'extractors':>10} {'pages':>6} {'span s':>7} {'pages/min':>10}  per extractor; CPU % of one core "
          f"over the span")
    for n, r in runs.items():
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_pct"].items())
        print(f"{n:>10} {r['pages']:>6} {r['span_s']:>7.1f} {r['ppm']:>10.1f}  {r['per_extractor']}; {split}")
    one, two = runs[1], runs[2]
    pct = two["cpu_pct"]
    crawler = pct.get("crawler", 0.0)
    extractors = sum(v for k, v in pct.items() if k.startswith("extractor"))
    other = sum(pct.values()) - crawler - extractors
    print(f"RESULT scale_2={two['ppm'] / one['ppm']:.3f} pages_per_min_1={one['ppm']:.1f} "
          f"pages_per_min_2={two['ppm']:.1f} pages_1={one['pages']} pages_2={two['pages']} cores={os.cpu_count()} "
          f"cpu_crawler_pct={crawler:.0f} cpu_extractors_pct={extractors:.0f} cpu_other_pct={other:.0f}")
    return 0


if __name__ == "__main__":
    run_main(main)
