"""The topic model agent on a real document store: every extracted document scored once, duplicates
marked, topics listed, events published, how far behind the store it is (backlog, age of the oldest
waiting document, speed) counted down to nothing, and a SIGKILL mid-stream that loses nothing and
re-embeds nothing already stored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import zmq

from agents.contracts import DocScored, TopicsRequest
from agents.extractor.backends import extract
from mesh.control import client
from network.messages import Ping
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from store.docstore import Document, Scores, open_docstore
from testing.harness import ROOT, mesh_dict, wait_for
from testing.system import missing, reason

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    """Main texts of 100 real pages (python3-doc's library reference, every third page: no two of them are
    near-duplicates at the default threshold)."""
    root = Path("/usr/share/doc/python3/html")
    if not (root / "index.html").exists():
        missing(reason("python3-doc"))
    files = sorted(root.resolve().glob("library/*.html"))[::3][:100]
    return {f"http://docs.local/library/{f.name}": extract(f.read_bytes(), url=f"http://docs.local/library/{f.name}",
                                                           content_type="text/html").text for f in files}


def put(store, url: str, text: str, *, content_hash: str | None = None, fetched_at: float | None = None) -> Document:
    doc = Document(url=url, final_url=url, content_hash=content_hash or hashlib.sha256(text.encode()).hexdigest(),
                   fetched_at=time.time() if fetched_at is None else fetched_at, http_status=200,
                   content_type="text/html", state="extracted", text=text, title=url.rsplit("/", 1)[-1])
    store.upsert(doc)
    return doc


def topics_config(**settings) -> dict:
    return mesh_dict({"topics": {"kind": "topic_model", "depends_on": ["twin"],
                                 "settings": {"source": None, "poll_s": 0.2, "batch_docs": 16, "max_chunks": 2,
                                              **settings}}})


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/documents.db"
    return request.getfixturevalue("postgres_url")


def test_the_backlog_is_what_waits_and_its_oldest_fetch(store_url):
    """DocStore.topic_backlog on both backends: extracted documents without scores, failed ones never; the earliest
    fetch time among the head of the queue; a document stored again with new content waits again."""
    with open_docstore(store_url) as store:
        assert store.topic_backlog() == (0, None)
        t0 = time.time() - 100
        docs = [put(store, f"http://b.example/{i}", f"text {i}", fetched_at=t0 + i) for i in range(6)]
        store.upsert(Document(url="http://b.example/failed", final_url="http://b.example/failed", content_hash="f" * 64,
                              fetched_at=t0 - 500, http_status=200, content_type="text/html", state="failed",
                              error="no main text found"))
        assert store.topic_backlog() == (6, t0)
        assert store.topic_backlog(head=1) == (6, t0)
        store.save_scores([Scores(document_id=d.id, embedding_id=i) for i, d in enumerate(docs[:4])])
        assert store.topic_backlog() == (2, t0 + 4)
        put(store, docs[0].url, "text 0, changed", fetched_at=t0 + 50)     # new content: its scores are cleared
        assert store.topic_backlog() == (3, t0 + 4)
        assert store.topic_backlog(head=1) == (3, t0 + 50)                  # the head: the first stored of them
        store.save_scores([Scores(document_id=d.id, embedding_id=10 + i) for i, d in enumerate(store.pending_topic(9))])
        assert store.topic_backlog() == (0, None)


def metric(cfg, agent: str, name: str) -> float:
    """One unlabelled sample from the agent's /metrics page."""
    text = httpx.get(f"http://127.0.0.1:{cfg.port(agent, 'metrics')}/metrics", timeout=5).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_scores_every_document_marks_duplicates_and_lists_topics(texts, write_config, run_agents):
    # poll_s: its first pass waits that long after it is ready, so its backlog is seen whole first
    path, cfg = write_config(topics_config(poll_s=3.0))
    store = open_docstore(cfg.store_url("documents"))
    urls = list(texts)[:40]
    fetched = {url: time.time() - 300 + i for i, url in enumerate(urls)}    # the first waits for 300 s and more
    for url in urls:
        put(store, url, texts[url], fetched_at=fetched[url])
    original = urls[5]
    put(store, "http://copy.example/exact", texts[original])                       # same bytes: exact duplicate
    edited = texts[original].replace(". ", ". Indeed, ", 3) + "\nShare this page. Cookie settings. Imprint."
    put(store, "http://copy.example/edited", edited)                                # near-duplicate
    put(store, "http://copy.example/edited-again", edited)                          # exact copy of a near-duplicate
    store.upsert(Document(url="http://other.example/failed", final_url="http://other.example/failed",
                          content_hash="f" * 64, fetched_at=time.time(), http_status=200, content_type="text/html",
                          state="failed", error="no main text found"))
    ctx_events: list[DocScored] = []
    run_agents(cfg, "twin", "topics")
    ctx = zmq.Context()
    sub = Subscriber(ctx, lambda topic, env: ctx_events.append(env.message), metrics=MeshMetrics("t", "t"))
    sub.connect(cfg.endpoint("topics", "pub"))
    sub.subscribe("doc.scored")
    try:
        with client(cfg, "topics", timeout=5.0) as c:
            # how far behind the store it is, as it counts it: everything waits at first, then counts down to 0
            first = wait_for(lambda: (r := c.request(TopicsRequest(limit=1))).backlog is not None and r, timeout=120,
                             what="the backlog counted")
            assert first.backlog == 43 and first.documents == 0 and first.scored_per_min is None
            assert first.oldest_unscored_s >= 300
            seen = [first.backlog]
            wait_for(lambda: (seen.append(c.request(TopicsRequest(limit=1)).backlog), seen[-1] == 0)[1], timeout=120,
                     interval=0.05, what="the backlog counted down to 0")
            assert seen == sorted(seen, reverse=True) and len(set(seen)) >= 3, seen   # 43, ..., 0 by batches of 16
            done = c.request(TopicsRequest(limit=1))
        assert done.backlog == 0 and done.oldest_unscored_s is None and done.scored_per_min > 0
        assert not store.pending_topic(1)
        wait_for(lambda: (sub.on_readable(), len(ctx_events) >= 43)[1], timeout=10, what="doc.scored events")
    finally:
        sub.close()
        ctx.term()
    # every event says when its page was fetched, and what still waited after its batch
    assert all(e.fetched_at == fetched[e.url] for e in ctx_events if e.url in fetched)
    assert ctx_events[0].backlog == 43 - 16 and ctx_events[-1].backlog == 0
    exact, near = store.get("http://copy.example/exact"), store.get("http://copy.example/edited")
    orig = store.get(original)
    assert exact.duplicate_of == original and exact.embedding_id == orig.embedding_id and exact.novelty == 0.0
    assert near.duplicate_of == original and near.topic == orig.topic
    again = store.get("http://copy.example/edited-again")
    assert again.duplicate_of == original and again.embedding_id == orig.embedding_id
    scored = [store.get(u) for u in urls]
    assert all(d.embedding_id is not None and d.topic is not None and d.duplicate_of is None for d in scored)
    assert len({d.embedding_id for d in scored}) == len(scored)
    assert all(0.0 <= d.novelty <= 1.0 and d.novelty_kl >= 0 and d.topic_label for d in scored)
    assert all(abs(sum(d.topic_weights) - 1.0) < 1e-3 for d in scored)
    with client(cfg, "topics", timeout=5.0) as c:
        listing = c.request(TopicsRequest(limit=5))
    assert listing.documents == 43 and listing.exact_duplicates == 2 and listing.duplicates == 1
    assert store.get("http://other.example/failed").embedding_id is None     # failed pages are not scored
    assert listing.topics and sum(t.size for t in listing.topics) <= 40
    assert all(t.keywords and t.label for t in listing.topics)
    assert {e.url for e in ctx_events} >= set(urls[-10:])
    store.close()
    # the twin's dashboard: documents, duplicates, topics, the novelty spread; and the backlog in the gauges
    board = f"http://127.0.0.1:{cfg.mesh.base_port + 80}/api/state"
    pipe = wait_for(lambda: (p := httpx.get(board).json()["pipeline"]).get("scored") == 43 and p, timeout=10,
                    what="the topic figures on the dashboard")
    assert pipe["duplicates"] == 1 and pipe["exact_duplicates"] == 2 and pipe["topics"] == listing.total_topics
    assert 0.0 <= pipe["novelty_p10"] <= pipe["novelty_p50"] <= pipe["novelty_p90"] <= 1.0
    gauges = next(a["gauges"] for a in httpx.get(board).json()["agents"] if a["agent"] == "topics")
    assert gauges["backlog"] == 0 and gauges["backlog_oldest_s"] == 0 and gauges["scored_per_min"] > 0
    # and for Prometheus
    assert metric(cfg, "topics", "topic_backlog_documents") == 0
    assert metric(cfg, "topics", "topic_backlog_oldest_seconds") == 0
    assert metric(cfg, "topics", "topic_documents_scored_total") == 43
    assert metric(cfg, "topics", "topic_scored_per_minute") == gauges["scored_per_min"]
    r = subprocess.run([sys.executable, "-m", "ops.meshctl", "topics", "--config", str(path), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 43 and json.loads(r.stdout)["backlog"] == 0
    r = subprocess.run([sys.executable, "-m", "ops.meshctl", "topics", "--config", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "1000"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"43 document\(s\) scored, 1 near- and 2 exact duplicate\(s\), backlog 0, [\d.]+ scored/min;",
                     r.stdout), r.stdout


@pytest.mark.slow   # kills or stops agents mid-run: a chaos test, 10-20 s on 2 cores
def test_killed_mid_stream_loses_nothing_and_re_embeds_nothing(texts, write_config, mesh_up):
    path, cfg = write_config(topics_config(checkpoint_every=48, batch_docs=16))
    store = open_docstore(cfg.store_url("documents"))
    for url, text in texts.items():
        put(store, url, text)
    total = len(texts)
    up = mesh_up(path, "--restart-backoff", "0.3")

    def scored() -> int:
        return total - len(store.pending_topic(total))

    wait_for(lambda: scored() >= total // 2, timeout=180, interval=0.1, what="half the documents scored")
    with client(cfg, "topics", timeout=2.0) as c:
        pid = c.request(Ping()).pid
        os.kill(pid, signal.SIGKILL)
        before = {d.url: (d.embedding_id, d.topic, d.novelty, d.duplicate_of) for d in store.documents()
                  if d.embedding_id is not None}
        wait_for(lambda: c.request(Ping()).pid != pid, timeout=60, what="the topic model restarted")
    wait_for(lambda: scored() == total, timeout=180, interval=0.2, what="every document scored")
    up.stop()
    after = {d.url: (d.embedding_id, d.topic, d.novelty, d.duplicate_of) for d in store.documents()}
    store.close()
    assert all(after[u] == v for u, v in before.items())        # nothing scored before the kill was redone
    eids = [v[0] for v in after.values()]
    assert None not in eids and len(set(eids)) == total
    [ckpt] = (cfg.mesh.data_dir / "topics").glob("ckpt-*")
    dim = json.loads((ckpt / "state.json").read_text())["dim"]
    rows = (cfg.mesh.data_dir / "topics" / "vectors.f32").stat().st_size // (4 * dim)
    assert total <= rows <= total + 16                             # at most the batch in flight was embedded twice
    log = (cfg.mesh.data_dir / "logs" / "topics.log").read_text()
    ready = [json.loads(line)["message"] for line in log.splitlines() if "topic model ready" in line]
    assert len(ready) == 2, ready
    replayed = int(re.search(r"(\d+) replayed", ready[1]).group(1))
    checkpoint = int(re.search(r"checkpoint at (\d+)", ready[1]).group(1))
    originals_after_checkpoint = [u for u, v in before.items() if v[0] >= checkpoint and v[3] is None]
    assert checkpoint > 0 and replayed == len(originals_after_checkpoint), ready[1]
    vecs = np.fromfile(cfg.mesh.data_dir / "topics" / "vectors.f32", dtype=np.float32).reshape(-1, dim)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
