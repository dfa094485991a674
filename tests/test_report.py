"""`meshctl crawl-report`: running totals over fetch time, from a real document store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from store.docstore import Document, Scores, open_docstore
from store.report import crawl_report
from testing.harness import ROOT, mesh_dict


def fill(store) -> None:
    """12 pages fetched one second apart: 10 extracted and scored, 1 failed, 1 extracted but not scored yet."""
    scores = []
    plan = [  # (topic, novelty, duplicate)
        (0, 1.0, False), (0, 0.1, False), (1, 1.0, False), (0, 0.0, True), (1, 0.35, False),
        (2, 1.0, False), (2, 0.2, False), (1, 0.0, True), (3, 0.9, False), (0, 0.31, False)]
    for i in range(12):
        state = "failed" if i == 10 else "extracted"
        doc = Document(url=f"http://site.test/{i}", final_url=f"http://site.test/{i}", content_hash=f"{i:064x}",
                       fetched_at=1000.0 + i, http_status=200, content_type="text/html", state=state,
                       text=None if state == "failed" else f"text {i}", error="no main text" if state == "failed" else None)
        store.upsert(doc)
        if i < len(plan):
            topic, novelty, dup = plan[i]
            scores.append(Scores(document_id=doc.id, embedding_id=i, topic=topic, novelty=novelty,
                                 duplicate_of="http://site.test/0" if dup else None))
    store.save_scores(scores)


def test_report_from_the_store(tmp_path):
    store = open_docstore(f"sqlite:///{tmp_path / 'documents.db'}")
    fill(store)
    report = crawl_report(store.timeline(), spans=4, novel_bar=0.3)
    store.close()
    assert (report.fetched, report.extracted, report.failed, report.scored) == (12, 11, 1, 10)
    assert report.duplicates == 2 and report.duplicate_rate == pytest.approx(0.2)
    assert report.novel == 6            # novelty >= 0.3 among the 8 non-duplicates: 1.0, 1.0, .35, 1.0, .9, .31
    assert report.topics == 4
    assert report.duration_s == 11.0
    assert [s.fetched for s in report.timeline] == [3, 6, 9, 12]      # spans end at 2.75, 5.5, 8.25 and 11 s
    assert [s.topics for s in report.timeline] == [2, 3, 4, 4]
    assert [s.novel for s in report.timeline][-1] == 6
    assert crawl_report([], spans=3).fetched == 0
    with pytest.raises(ValueError):
        crawl_report([], spans=0)


def test_meshctl_crawl_report(tmp_path, write_config):
    path, cfg = write_config(mesh_dict({}))
    store = open_docstore(cfg.store_url("documents"))
    fill(store)
    store.close()

    def meshctl(*args):
        return subprocess.run([sys.executable, "-m", "ops.meshctl", "crawl-report", *args, "--config", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    r = meshctl("--json", "--spans", "2", "--novel-bar", "0.9")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["fetched"], data["novel"], data["topics"], data["duplicate_rate"]) == (12, 4, 4, 0.2)
    assert [s["fetched"] for s in data["timeline"]] == [6, 12]
    r = meshctl()
    assert r.returncode == 0, r.stderr
    assert "12 page(s) fetched" in r.stdout and "2 duplicate(s) (20.0%)" in r.stdout and "4 topic(s)" in r.stdout
    r = meshctl("--spans", "0")
    assert r.returncode != 0
