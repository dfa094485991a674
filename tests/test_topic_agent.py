"""The topic model agent on a real document store: every extracted document scored once, duplicates
marked, topics listed, events published, and a SIGKILL mid-stream that loses nothing and re-embeds
nothing already stored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from agents.contracts import DocScored, TopicsRequest
from agents.extractor.backends import extract
from mesh.control import client
from network.messages import Ping
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from store.docstore import Document, open_docstore
from testing.harness import mesh_dict, wait_for
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


def put(store, url: str, text: str, *, content_hash: str | None = None) -> Document:
    doc = Document(url=url, final_url=url, content_hash=content_hash or hashlib.sha256(text.encode()).hexdigest(),
                   fetched_at=time.time(), http_status=200, content_type="text/html", state="extracted", text=text,
                   title=url.rsplit("/", 1)[-1])
    store.upsert(doc)
    return doc


def topics_config(**settings) -> dict:
    return mesh_dict({"topics": {"kind": "topic_model", "depends_on": ["twin"],
                                 "settings": {"source": None, "poll_s": 0.2, "batch_docs": 16, "max_chunks": 2,
                                              **settings}}})


def test_scores_every_document_marks_duplicates_and_lists_topics(texts, write_config, run_agents):
    path, cfg = write_config(topics_config())
    store = open_docstore(cfg.store_url("documents"))
    urls = list(texts)[:40]
    for url in urls:
        put(store, url, texts[url])
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
    import zmq

    ctx = zmq.Context()
    sub = Subscriber(ctx, lambda topic, env: ctx_events.append(env.message), metrics=MeshMetrics("t", "t"))
    sub.connect(cfg.endpoint("topics", "pub"))
    sub.subscribe("doc.scored")
    try:
        wait_for(lambda: not store.pending_topic(1), timeout=120, interval=0.2, what="every document scored")
        wait_for(lambda: (sub.on_readable(), len(ctx_events) >= 40)[1], timeout=10, what="doc.scored events")
    finally:
        sub.close()
        ctx.term()
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
    import httpx  # the twin's dashboard: documents, duplicates, topics, the novelty spread
    board = f"http://127.0.0.1:{cfg.mesh.base_port + 80}/api/state"
    pipe = wait_for(lambda: (p := httpx.get(board).json()["pipeline"]).get("scored") == 43 and p, timeout=10,
                    what="the topic figures on the dashboard")
    assert pipe["duplicates"] == 1 and pipe["exact_duplicates"] == 2 and pipe["topics"] == listing.total_topics
    assert 0.0 <= pipe["novelty_p10"] <= pipe["novelty_p50"] <= pipe["novelty_p90"] <= 1.0
    import subprocess
    import sys

    from testing.harness import ROOT

    r = subprocess.run([sys.executable, "-m", "ops.meshctl", "topics", "--config", str(path), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 43


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
