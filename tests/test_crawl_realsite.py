"""Slow: the main job on a real site. Debian's python3-doc (about 530 HTML pages) served on loopback,
crawled by `meshctl up --seeds`, then `meshctl export` to Parquet: the README's offline recipe, run as written."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from agents.contracts import CrawlStatusRequest
from mesh.control import client
from store.docstore import open_docstore
from testing.harness import ROOT, mesh_dict, wait_for

pytestmark = pytest.mark.slow


def test_meshctl_up_seeds_then_export_on_python_docs(pydoc_site, write_config, mesh_up, tmp_path):
    path, cfg = write_config(mesh_dict({
        "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 2}},
        "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                    "settings": {"seeds": ["http://127.0.0.1:9/never-crawled.html"], "max_depth": 3, "max_pages": 150,
                                 "politeness_s": 0.0, "per_host_concurrency": 4}},
    }, max_frame_bytes=8 << 20))
    up = mesh_up(path, "--seeds", f"{pydoc_site}/index.html")
    with client(cfg, "crawler", timeout=1.0) as c:
        status = wait_for(lambda: (st := c.request(CrawlStatusRequest())).idle and st.done and st, timeout=240,
                          interval=0.5, what="the crawl of the Python docs")
    assert up.stop() == 0
    assert status.budget_left == 0 and status.failed == 0, status
    docs = open_docstore(cfg.store_url("documents"))
    try:
        assert docs.get("http://127.0.0.1:9/never-crawled.html") is None   # --seeds replaced the config's seeds
        stored = list(docs.documents())
        assert len(stored) == status.done >= 140
        extracted = [d for d in stored if d.state == "extracted"]
        assert len(extracted) >= 0.95 * len(stored)
        assert all(d.title and d.text and d.language == "en" for d in extracted)
    finally:
        docs.close()
    out = tmp_path / "processed"
    r = subprocess.run([sys.executable, "-m", "ops.meshctl", "export", "--config", str(path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    [parquet] = out.glob("documents-*.parquet")
    table = pq.read_table(parquet)
    assert table.num_rows == len(extracted)
    assert {"url", "title", "text", "language", "outlinks", "content_hash", "embedding_id", "novelty"} <= set(
        table.column_names)
    assert f"{table.num_rows} document(s) -> {parquet}" in r.stdout.replace("\n", "")
