"""Documents per minute through the topic model agent (embed + dedup + topic + novelty + store),
beside a bare SentenceTransformer.encode of the same documents, in the same run.

Documents: the main text of python3-doc pages (/usr/share/doc/python3/html; `--docs N`, default 200),
extracted once before anything is timed. They are long (about 18,000 characters on average), so the
comparison is made two ways, both in this run, on the same model (all-MiniLM-L6-v2) and the same CPU:

* bare encode, same text -- `model.encode(chunks)` over exactly the chunks the agent embeds (every
  document split into 256-token windows, at most max_chunks per document): the same model work,
  without anything around it. `ratio` is ours against this: what the pipeline costs on top of encode.
* bare encode, truncated -- `model.encode(documents)`: sentence-transformers cuts each document at
  256 tokens and silently drops the rest. Faster, and not what the agent is asked to do ("long
  documents are chunked and pooled rather than cut silently"); reported as `truncated_ratio`.
* ours -- the real agent: `meshctl up` with a twin and a topic_model agent on an empty SQLite document
  store; once it is ready, the documents are inserted and the clock runs until every one is scored
  (embedding, faiss near-duplicate check, topic, novelty, written back, doc.scored published).

Last line: RESULT docs_per_min=<ours> ratio=<ours/bare encode of the same text> truncated_ratio=<...>
          encode_docs_per_min=<...> truncated_docs_per_min=<...> docs=<N>

Usage: .venv/bin/python bench/topics.py [--docs 200] [--rounds 1] [--max-chunks 16]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import run_main
from testing.harness import MeshUp, free_port_block, write_config  # noqa: E402

PYDOC = Path("/usr/share/doc/python3/html")


def _text(path: str) -> str:
    from agents.extractor.backends import extract

    out = extract(Path(path).read_bytes(), url="http://127.0.0.1/" + path, content_type="text/html")
    return out.text or ""


def load_docs(n: int) -> list[tuple[str, str]]:
    root = PYDOC.resolve()
    files = sorted(str(p) for p in root.rglob("*.html"))
    step = max(1, len(files) // n)
    chosen = files[::step][:n]
    with ProcessPoolExecutor(2) as pool:
        texts = list(pool.map(_text, chosen, chunksize=8))
    return [(f"http://127.0.0.1/{Path(f).relative_to(root)}", t) for f, t in zip(chosen, texts) if t]


def bare(texts: list[str], max_chunks: int) -> tuple[float, float, int]:
    """(seconds to encode the chunks, seconds to encode the truncated documents, chunks)."""
    from agents.embedding import Embedder, _spread

    emb = Embedder(device="cpu", max_chunks=max_chunks)
    model = emb.model
    chunks: list[str] = []
    for t in texts:   # exactly the chunks the agent embeds: every window, or max_chunks spread over the document
        mine = emb.chunk(t)
        chunks.extend(mine if len(mine) <= max_chunks else [mine[i] for i in _spread(len(mine), max_chunks)])
    model.encode(texts[:8], batch_size=32, show_progress_bar=False)   # warm-up
    t0 = time.perf_counter()
    model.encode(chunks, batch_size=32, show_progress_bar=False, normalize_embeddings=True)
    t1 = time.perf_counter()
    model.encode(texts, batch_size=32, show_progress_bar=False, normalize_embeddings=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(chunks)


def ours(docs: list[tuple[str, str]], max_chunks: int, tmp: Path) -> float:
    from mesh.config import load_config
    from mesh.control import client
    from network.messages import Ping
    from store.docstore import Document, open_docstore

    base = free_port_block(30)
    data = tmp / f"data-{base}"
    cfg_path = write_config({
        "mesh": {"name": "bench-topics", "base_port": base, "heartbeat_interval_s": 1.0, "data_dir": str(data)},
        "security": {"curve": "off"},
        "hosts": {"local": {"address": "127.0.0.1"}},
        "groups": {"core": {"host": "local", "agents": ["twin"]}, "learn": {"host": "local", "agents": ["topics"]}},
        "agents": {"twin": {"kind": "digital_twin"},
                   "topics": {"kind": "topic_model", "depends_on": ["twin"],
                              "settings": {"source": None, "poll_s": 0.05, "device": "cpu", "max_chunks": max_chunks}}},
    }, tmp / f"topics-{base}.yaml")
    cfg = load_config(cfg_path)
    up = MeshUp(cfg_path, out=tmp / f"up-{base}.out")
    try:
        with client(cfg, "topics", timeout=1.0) as c:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if c.request(Ping()).state == "ready":
                        break
                except Exception:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit(f"the topic model did not get ready:\n{up.output()[-3000:]}")
        store = open_docstore(cfg.store_url("documents"))
        t0 = time.perf_counter()
        for url, text in docs:
            store.upsert(Document(url=url, final_url=url, content_hash=hashlib.sha256(text.encode()).hexdigest(),
                                  fetched_at=time.time(), http_status=200, content_type="text/html",
                                  state="extracted", text=text))
        while store.pending_topic(1):
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        store.close()
        return elapsed
    finally:
        up.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-chunks", type=int, default=16)
    args = ap.parse_args()
    if not (PYDOC / "index.html").exists():
        print("python3-doc is not installed: apt-get install -y python3-doc", file=sys.stderr)
        return 2
    docs = load_docs(args.docs)
    texts = [t for _, t in docs]
    n = len(docs)
    print(f"{n} python3-doc pages, {sum(map(len, texts)) / n:.0f} characters on average; max_chunks {args.max_chunks}")
    same, trunc, mine = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-topics-") as tmp:
        for r in range(args.rounds):
            enc_s, trunc_s, chunks = bare(texts, args.max_chunks)
            same.append(n / enc_s * 60)
            trunc.append(n / trunc_s * 60)
            ours_s = ours(docs, args.max_chunks, Path(tmp))
            mine.append(n / ours_s * 60)
            print(f"round {r + 1}: bare encode of the {chunks} chunks {enc_s:.1f}s ({same[-1]:.0f} docs/min), "
                  f"bare encode truncated {trunc_s:.1f}s ({trunc[-1]:.0f} docs/min), ours {ours_s:.1f}s "
                  f"({mine[-1]:.0f} docs/min)")
    o, s, t = statistics.median(mine), statistics.median(same), statistics.median(trunc)
    print(f"RESULT docs_per_min={o:.1f} ratio={o / s:.3f} truncated_ratio={o / t:.3f} encode_docs_per_min={s:.1f} "
          f"truncated_docs_per_min={t:.1f} docs={n}")
    return 0


if __name__ == "__main__":
    run_main(main)
