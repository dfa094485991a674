"""Hostile web pages through the real crawl pipeline: the fetcher, the coordinator and the extractor.

tests/fuzz/hostile_site.py serves the pages (deep nesting, a 10 MB attribute, 100 000 attributes, broken
encodings, binary garbage, empty and endless bodies, a trickle, compression bombs). Expected of each: no agent
dies, the page is stored (extracted, or failed with the reason) or its fetch is recorded as failed with the
reason, memory stays bounded, and the documents stored before are unchanged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import yaml
import zmq
import zstandard

from agents.contracts import CrawlStatusRequest, Enqueue
from agents.crawler.fetch import Fetcher
from agents.crawler.rawstore import RawStore
from mesh.config import load_config
from mesh.control import client
from network.codec import decode, encode
from network.messages import Error, Ping
from network.reactor import Reactor
from testing.harness import ROOT, MeshUp, mesh_dict, wait_for
from tests.fuzz.conftest import by_label, delta, scrape
from tests.fuzz.hostile_site import PAGES, HostileSite, build_all, honest_page
from tests.samples import SAMPLES
from tests.site import Site

MIB = 1 << 20
HONEST = ["/gzip-honest.html", "/deflate-raw-honest.html", "/zstd-honest.html", "/gzip-zstd-honest.html"]
BOMBS = ["/gzip-bomb.html", "/deflate-bomb.html", "/zstd-bomb.html", "/gzip-gzip-bomb.html"]


def fetch(site: HostileSite, path: str, max_bytes: int, timeout_s: float = 5.0):
    reactor = Reactor()
    fetcher = Fetcher(reactor, user_agent="fuzz", timeout_s=timeout_s, max_bytes=max_bytes)
    fetcher.start()
    out: list = []
    try:
        fetcher.submit(site.url(path), out.append, store=False)
        deadline = time.monotonic() + timeout_s + 10
        while not out and time.monotonic() < deadline:
            reactor.run_once(0.05)
    finally:
        fetcher.close()
        reactor.close()
    assert out, f"no result for {path}"
    return out[0]


@pytest.fixture(scope="module")
def hostile():
    build_all()
    with HostileSite() as site:
        yield site


def test_fetcher_decodes_honest_compression_exactly(hostile):
    page = honest_page()
    for path in HONEST:
        r = fetch(hostile, path, MIB)
        assert (r.status, r.error, r.truncated, r.body) == (200, None, False, page), path
    exact = fetch(hostile, "/gzip-honest.html", len(page))              # the cap is the decoded size
    assert (exact.body, exact.truncated) == (page, False)
    cut = fetch(hostile, "/gzip-honest.html", len(page) - 1)
    assert (cut.body, cut.truncated) == (page[:-1], True)
    corrupt = fetch(hostile, "/corrupt-gzip.html", MIB)
    assert corrupt.error.startswith("DecodingError: cannot decode the gzip body"), corrupt.error


BOMB_SCRIPT = """
import json, re, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))   # httpx's own decoding needs > 2 GiB here
from tests.fuzz.test_hostile_html import BOMBS, fetch

class Site:   # the hostile site is served by the test process: this one only fetches, so its peak is the fetcher's
    def url(self, path):
        return sys.argv[1] + path

out = {}
for path in BOMBS + ["/endless.html", "/unknown-encoding.html"]:
    t = time.perf_counter()
    r = fetch(Site(), path, 2 << 20)
    out[path] = {"status": r.status, "size": len(r.body or b""), "truncated": r.truncated, "error": r.error,
                 "s": round(time.perf_counter() - t, 2)}
# VmHWM is this process's own peak: ru_maxrss would carry over the parent's peak through fork/exec
out["peak_rss_mb"] = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024
print(json.dumps(out))
"""


def test_fetcher_stops_compression_bombs_at_the_cap(hostile):
    """4 GiB of gzip, 1 GiB of deflate, 16 GiB of zstd, two gzip layers: each body is cut at the 2 MiB cap,
    decoded in bounded steps, in a process limited to 1.5 GiB of address space. (Before agents/crawler/fetch.py
    decoded by itself, httpx inflated one 64 kB read of the zstd bomb to 2 GiB in one call.)"""
    r = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, hostile.url("")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for path in BOMBS + ["/endless.html"]:
        assert out[path] | {"s": 0} == {"status": 200, "size": 2 << 20, "truncated": True, "error": None, "s": 0}, path
    # a coding this fetcher does not decode (br) is kept as sent, like httpx does: 300 000 random bytes
    assert out["/unknown-encoding.html"] | {"s": 0} == {"status": 200, "size": 300_000, "truncated": False,
                                                        "error": None, "s": 0}
    assert out["peak_rss_mb"] < 400, out
    print(f"\nFIGURES fetcher bombs: {json.dumps(out)}")


# --- the whole pipeline ------------------------------------------------------------------------------


def documents(cfg) -> dict[str, tuple]:
    """Every stored document row, all columns, by URL."""
    path = cfg.store_url("documents")[len("sqlite:///"):]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        cur = db.execute("select * from documents order by url")
        cols = [c[0] for c in cur.description]
        return {row[cols.index("url")]: row for row in cur}


def frontier(cfg) -> dict[str, dict]:
    path = cfg.store_url("frontier")[len("sqlite:///"):]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return {r["url"]: dict(r) for r in db.execute("select * from frontier")}


class MemoryWatch:
    """Samples the resident memory of every process of a session (agents, extraction workers) every 0.2 s."""

    def __init__(self, session: int):
        self.session = session
        self.peak: dict[int, int] = {}      # pid -> max VmRSS kB
        self.parent: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = stat.rsplit(")", 1)[1].split()
                    if int(fields[3]) != self.session:
                        continue
                    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024
                except (OSError, ValueError, IndexError):
                    continue
                pid = int(entry.name)
                self.parent[pid] = int(fields[1])
                self.peak[pid] = max(self.peak.get(pid, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def descendants_peak_mb(self, root: int) -> dict[int, float]:
        out = {}
        for pid, kb in self.peak.items():
            p = pid
            while p in self.parent and p != root:
                p = self.parent[p]
            if p == root:
                out[pid] = kb / 1024
        return out


@pytest.mark.slow
def test_hostile_site_through_the_pipeline(tmp_path, hostile):
    """A normal site is crawled and stored; then the hostile site is added to the same running crawl. Every
    hostile URL ends done or failed with a reason, the agents survive as the same processes, memory stays
    bounded, the normal site's documents are byte for byte unchanged, and a replayed or malformed extract.page
    changes nothing."""
    data = mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"],
                      "settings": {"workers": 2, "time_budget_s": 5.0}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"politeness_s": 0.0, "timeout_s": 3.0, "retry_backoff_s": 0.1, "max_retries": 1,
                                 "per_host_concurrency": 4, "concurrency": 8, "max_bytes": 12 * MIB,
                                 "handoff_timeout_s": 60.0, "max_depth": 1, "max_pages": 200}},
    }, max_frame_bytes=8 * MIB, heartbeat_interval_s=0.5, dead_after_missed=20, request_timeout_s=2.0)
    data["mesh"]["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "mesh.yaml"
    with Site(pages=3, slow_s=0.2, big_bytes=300_000) as normal:
        data["agents"]["crawler"]["settings"]["seeds"] = [normal.url("/")]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = load_config(path)
        up = MeshUp(path)
        watch = MemoryWatch(up.proc.pid)
        try:
            with client(cfg, "crawler", timeout=2.0) as crawler, client(cfg, "extractor", timeout=2.0) as extractor:
                wait_for(lambda: crawler.request(Ping()).state == "ready", timeout=60, what="crawler ready")
                pids = {"crawler": crawler.request(Ping()).pid, "extractor": extractor.request(Ping()).pid}
                wait_for(lambda: (st := crawler.request(CrawlStatusRequest())).idle and st.done, timeout=120,
                         interval=0.2, what="the normal crawl to finish")
                before = documents(cfg)
                assert len(before) >= 5

                started = time.monotonic()
                st0 = crawler.request(CrawlStatusRequest())
                added = crawler.request(Enqueue(urls=[hostile.url("/")], depth=0))
                assert added.added == [hostile.url("/")]
                ended = st0.done + st0.failed + 1 + len(PAGES)
                wait_for(lambda: (st := crawler.request(CrawlStatusRequest())).idle and st.done + st.failed >= ended,
                         timeout=400, interval=0.5, what="the hostile crawl to finish")
                took = time.monotonic() - started

                # no agent died or restarted
                assert crawler.request(Ping()).pid == pids["crawler"]
                assert extractor.request(Ping()).pid == pids["extractor"]

                rows, docs = frontier(cfg), documents(cfg)
                raw = RawStore(cfg.raw_dir)
                outcomes = {}
                try:
                    for page_path, page in PAGES.items():
                        url = hostile.url(page_path)
                        row = rows[url]
                        assert row["state"] in ("done", "failed"), (page_path, row)
                        doc = docs.get(url)
                        if row["state"] == "failed":
                            assert row["error"], (page_path, row)          # failed, with the reason
                            outcomes[page_path] = f"fetch failed: {row['error'][:90]}"
                            assert not page.crawled_ok or doc is None, (page_path, row)
                            continue
                        assert page.crawled_ok, (page_path, row)
                        assert doc is not None, (page_path, row)
                        cols = dict(zip(doc_columns(cfg), doc))
                        assert cols["state"] in ("extracted", "failed"), cols
                        if cols["state"] == "failed":
                            assert cols["error"], cols
                            outcomes[page_path] = f"stored failed: {cols['error'][:90]}"
                        else:
                            assert cols["text"], cols
                            outcomes[page_path] = f"extracted: {len(cols['text'])} chars"
                    for page_path in HONEST:                              # the controls come out whole
                        cols = dict(zip(doc_columns(cfg), docs[hostile.url(page_path)]))
                        assert cols["state"] == "extracted" and "lighthouse keepers" in cols["text"], cols
                    for page_path in BOMBS + ["/endless.html"]:           # cut at the cap, never inflated whole
                        (rec,) = raw.fetches(hostile.url(page_path))
                        assert rec.truncated and rec.size == 12 * MIB, (page_path, rec)
                    assert "timed out" in rows[hostile.url("/trickle.html")]["error"]
                    assert "timed out" in rows[hostile.url("/silent.html")]["error"]
                    assert "DecodingError" in rows[hostile.url("/corrupt-gzip.html")]["error"]
                    for page_path in ("/many-attributes.html",):            # far past the time budget on any machine: stopped
                        cols = dict(zip(doc_columns(cfg), docs[hostile.url(page_path)]))
                        assert cols["state"] == "failed" and "time budget" in cols["error"], cols
                finally:
                    raw.close()

                # the documents stored before are unchanged, every column
                after = documents(cfg)
                assert {u: after[u] for u in before} == before

                replay_figures = replay_and_garbage(cfg, before_docs=after)
        finally:
            watch.stop()
            up.stop()
        log = (cfg.mesh.data_dir / "logs" / "crawler.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        crawler_mb = watch.peak.get(pids["crawler"], 0) / 1024
        extractor_tree = watch.descendants_peak_mb(pids["extractor"])
        assert crawler_mb < 600, crawler_mb
        assert max(extractor_tree.values()) < 1500, extractor_tree
        print(f"\nFIGURES hostile crawl: {len(PAGES)} hostile pages in {took:.0f} s; "
              f"crawler peak RSS {crawler_mb:.0f} MiB, "
              f"extractor + workers peak {sorted(round(v) for v in extractor_tree.values())} MiB; "
              f"{len(before)} earlier documents unchanged; {replay_figures}")
        for page_path, what in outcomes.items():
            print(f"  {page_path:26s} {what}")


def doc_columns(cfg) -> list[str]:
    path = cfg.store_url("documents")[len("sqlite:///"):]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return [c[0] for c in db.execute("select * from documents limit 0").description]


def replay_and_garbage(cfg, *, before_docs: dict) -> str:
    """At the extractor's ROUTER: the same extract.page id four times (three while the first is in flight, one
    after): one document written, one doc.stored published, four identical answers. Then extract.page frames
    with wrong fields and bodies that are not zstd or are zstd bombs: all refused and counted, nothing stored."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cfg.endpoint("extractor"))
    events = ctx.socket(zmq.SUB)
    events.linger = 0
    events.subscribe(b"doc.stored")
    events.connect(cfg.endpoint("extractor", "pub"))
    try:
        time.sleep(0.5)   # the subscription to take effect (the extractor publishes nothing meanwhile)
        page = SAMPLES["extract.page"].model_copy(update={
            "url": "http://replay.invalid/page.html", "final_url": "http://replay.invalid/page.html",
            "body_zstd": zstandard.ZstdCompressor().compress(honest_page())})
        msg_id, frame = encode(page, sender="fuzz")
        for _ in range(3):
            sock.send_multipart([b"", frame])
        answers = []
        for _ in range(3):
            assert sock.poll(30_000)
            answers.append(sock.recv_multipart()[-1])
        sock.send_multipart([b"", frame])
        assert sock.poll(30_000)
        answers.append(sock.recv_multipart()[-1])
        # the copies that came while the page was in the works share its one result (each encoded for its
        # sender); the copy after it is answered from the reply cache, byte for byte
        replies = [decode(a) for a in answers]
        assert all(r.cid == msg_id and r.message == replies[0].message for r in replies), replies
        assert replies[0].message.outcome == "inserted" and answers[3] in answers[:3]
        published = 0
        while events.poll(1000):
            topic, ev = events.recv_multipart()
            published += decode(ev).message.url == page.url
        assert published == 1, "the replayed page was handled more than once"
        docs = documents(cfg)
        assert set(docs) - set(before_docs) == {page.url}
        stored = docs

        # malformed extract.page frames: none may store anything
        errors_before = by_label(scrape(cfg, "extractor"), "mesh_errors_total", "code")
        body = page.__pydantic_serializer__.to_python(page)
        # over max_body_bytes (64 MiB) once decompressed: without and with the size in the frame header
        bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(80 * MIB)) * 8
        declared = zstandard.ZstdCompressor(level=19).compress(bytes(80 * MIB))
        variants = []
        for field in body:
            variants.append({k: v for k, v in body.items() if k != field})        # a field missing
            variants.append({**body, field: {"not": "this"}})                     # a field of the wrong type
        variants.append({**body, "surprise": 1})                                   # an unknown field
        variants += [{**body, "url": "http://garbage.invalid/" + str(i), "body_zstd": b}
                     for i, b in enumerate([b"", b"not zstd", os.urandom(5000), bomb, declared])]
        counted = Counter()
        for v in variants:
            raw = msgpack.packb([1, page.type_name, page.version, os.urandom(16), b"", "fuzz", time.time(), v],
                                use_bin_type=True)
            sock.send_multipart([b"", raw])
            assert sock.poll(30_000)
            reply = decode(sock.recv_multipart()[-1], max_frame_bytes=cfg.mesh.max_frame_bytes)
            if isinstance(reply.message, Error):
                counted[reply.message.code] += 1
        # a field that has a default may go missing without harm: those pages are valid and get stored; the
        # rest must all be refused
        refused = sum(counted.values())
        new = set(documents(cfg)) - set(stored)
        assert not (new - {"http://replay.invalid/page.html"}), new
        wait_for(lambda: delta(by_label(scrape(cfg, "extractor"), "mesh_errors_total", "code"), errors_before)
                 == counted, timeout=10, what="every refusal counted")
        assert counted["invalid_body"] + counted["too_large"] >= len(variants) - len(body), counted
        return (f"replay: 4 copies of one extract.page, 1 handled; {len(variants)} malformed extract.page frames, "
                f"{refused} refused and counted {dict(counted)}, nothing stored")
    finally:
        sock.close()
        events.close()
        ctx.term()
