"""Pages per CPU second of the extractor's `extract()` against `trafilatura.extract` alone, on the same real
pages in the same run, and main-text quality on a labelled set.

Pages: Debian's python3-doc (/usr/share/doc/python3/html, 530 HTML pages for Python 3.11; `--site DIR` for
another copy), `--pages N` of them (default 80) spread evenly over the sorted list, read into memory before
anything is timed. Both sides get the bytes and the page's URL (http://127.0.0.1:8000/<path>):

* trafilatura -- `trafilatura.extract(body, url=url)`: the library's defaults (main text as plain text, no
                 metadata, no links), the floor for what extraction costs.
* ours        -- `agents.extractor.backends.extract(body, url=url, content_type="text/html")`, what every
                 extraction worker runs: main text (the same trafilatura extraction), the title and date the
                 document store keeps, language, canonical URL, meta robots, and the page's outlinks
                 normalised (agents/urls.py).

Each round times every page once on each side, back to back, the side that goes first alternating from page to
page and round to round, so that both see the same load (the machine may be shared). A call is measured in CPU
seconds of this process (time.process_time), not wall time, for the same reason; a page's figure is its fastest
round. ratio = trafilatura's total / ours over the same pages, i.e. our throughput against trafilatura's: 1.0
means as fast, 0.5 half as fast. One page weighs on that total: trafilatura spends about half of the default
set's time on contents.html (the whole table of contents), where our extra work is small beside it, so
median_page_ratio, the median over pages of the same ratio page by page, says what a typical page sees. The
first 5 pages run once on each side before any timing (lazy imports). Where ours spends its extra time on
python3-doc: htmldate's date search, which these pages (no date in their metadata) send down its slow path.

Quality: bench/extract_labels.json names 20 python3-doc pages, each with sentences of its body that main text
must contain and navigation/footer strings that it must not (written from the pages' HTML; every label is
checked against the page's own body first, so a stale label stops the run). quality = checks passed / checks,
for ours and for trafilatura.extract alone.

Last line:
    RESULT ratio=<ours/trafilatura.extract, pages per CPU second> median_page_ratio=<...> pages_per_s=<ours>
           trafilatura_pages_per_s=<...> quality=<ours> trafilatura_quality=<...> pages=<N> outlinks=<ours, total>

Exit 2 when the site is missing (apt-get install python3-doc).

Usage: .venv/bin/python bench/extract.py [--pages 80] [--rounds 3] [--site DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

import trafilatura  # noqa: E402
from lxml import html as lxml_html  # noqa: E402

from agents.extractor.backends import extract  # noqa: E402
from bench._util import run_main  # noqa: E402

DEFAULT_SITE = Path("/usr/share/doc/python3/html")
LABELS = Path(__file__).with_name("extract_labels.json")
BASE = "http://127.0.0.1:8000/"
WARM_UP = 5


def ours(body: bytes, url: str) -> tuple[str, int]:
    out = extract(body, url=url, content_type="text/html")
    return out.text or "", len(out.outlinks)


def theirs(body: bytes, url: str) -> tuple[str, int]:
    return trafilatura.extract(body, url=url) or "", 0


def load_pages(site: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in site.rglob("*.html"))
    step = max(1, len(files) // n)
    return [(BASE + str(p.relative_to(site)), p.read_bytes()) for p in files[::step][:n]]


def cpu_seconds(fn, body: bytes, url: str) -> tuple[float, int]:
    t0 = time.process_time()
    _text, links = fn(body, url)
    return time.process_time() - t0, links


def timed(pages: list[tuple[str, bytes]], rounds: int) -> tuple[list[float], list[float], int]:
    """Per page, the fastest of `rounds` CPU times: (trafilatura's, ours, our outlinks in total)."""
    for url, body in pages[:WARM_UP]:
        theirs(body, url)
        ours(body, url)
    best_t = [float("inf")] * len(pages)
    best_o = [float("inf")] * len(pages)
    outlinks = 0
    for r in range(rounds):
        sum_t = sum_o = 0.0
        outlinks = 0
        for i, (url, body) in enumerate(pages):
            if (i + r) % 2:
                t, _ = cpu_seconds(theirs, body, url)
                o, links = cpu_seconds(ours, body, url)
            else:
                o, links = cpu_seconds(ours, body, url)
                t, _ = cpu_seconds(theirs, body, url)
            best_t[i], best_o[i] = min(best_t[i], t), min(best_o[i], o)
            sum_t, sum_o, outlinks = sum_t + t, sum_o + o, outlinks + links
        print(f"round {r + 1}: trafilatura.extract {sum_t:.2f} s, ours {sum_o:.2f} s (CPU), ratio {sum_t / sum_o:.3f}",
              flush=True)
    return best_t, best_o, outlinks


def _flat(s: str) -> str:
    return " ".join(s.split())


def check_labels(site: Path, labels: dict) -> list[str]:
    """Labels that do not hold on the page itself: a 'keep' missing from its body, a 'drop' that is in the
    body or nowhere on the page."""
    bad = []
    for page in labels["pages"]:
        tree = lxml_html.parse(str(site / page["path"])).getroot()
        mains = tree.xpath('//div[@role="main"]')
        body = _flat(mains[0].text_content()) if mains else ""
        whole = _flat(tree.text_content())
        bad += [f"{page['path']}: keep {s!r} is not in the page's body" for s in page["keep"] if _flat(s) not in body]
        bad += [f"{page['path']}: drop {s!r} is in the page's body, or not on the page"
                for s in labels["drop_everywhere"] + page.get("drop", []) if s in body or s not in whole]
    return bad


def quality(site: Path, labels: dict, fn) -> tuple[float, list[str]]:
    passed = total = 0
    misses = []
    for page in labels["pages"]:
        text, _ = fn((site / page["path"]).read_bytes(), BASE + page["path"])
        text = _flat(text)
        for s in page["keep"]:
            total += 1
            if _flat(s) in text:
                passed += 1
            else:
                misses.append(f"{page['path']}: missing {s[:60]!r}")
        for s in labels["drop_everywhere"] + page.get("drop", []):
            total += 1
            if s not in text:
                passed += 1
            else:
                misses.append(f"{page['path']}: boilerplate {s!r}")
    return passed / total, misses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE)
    args = ap.parse_args()
    site = args.site.resolve()
    if not (site / "index.html").exists():
        print(f"no site at {site}: apt-get install -y python3-doc", file=sys.stderr)
        return 2
    labels = json.loads(LABELS.read_text())
    bad = check_labels(site, labels)
    if bad:
        print("stale labels in bench/extract_labels.json:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2
    pages = load_pages(site, args.pages)
    n = len(pages)
    print(f"{n} pages of {site}, {statistics.mean(len(b) for _, b in pages) / 1024:.0f} KiB on average; "
          f"{args.rounds} round(s)", flush=True)
    best_t, best_o, outlinks = timed(pages, args.rounds)
    t_total, o_total = sum(best_t), sum(best_o)
    slowest = sorted(range(n), key=lambda i: best_o[i] - best_t[i], reverse=True)[:3]
    print("most extra time: " + ", ".join(f"{pages[i][0][len(BASE):]} +{(best_o[i] - best_t[i]) * 1000:.0f} ms"
                                          for i in slowest))
    q_ours, miss_ours = quality(site, labels, ours)
    q_theirs, miss_theirs = quality(site, labels, theirs)
    for who, misses in (("ours", miss_ours), ("trafilatura.extract", miss_theirs)):
        print(f"quality {who}: {len(misses)} check(s) failed" + "".join(f"\n  {m}" for m in misses))
    print(f"fastest round per page: trafilatura.extract {t_total:.2f} s, ours {o_total:.2f} s (CPU)")
    median = statistics.median(t / o for t, o in zip(best_t, best_o))
    print(f"RESULT ratio={t_total / o_total:.3f} median_page_ratio={median:.3f} pages_per_s={n / o_total:.2f} "
          f"trafilatura_pages_per_s={n / t_total:.2f} quality={q_ours:.3f} trafilatura_quality={q_theirs:.3f} "
          f"pages={n} outlinks={outlinks}")
    return 0


if __name__ == "__main__":
    run_main(main)
