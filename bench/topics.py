"""Documents per minute through the topic model agent (embed + dedup + topic + novelty + store) on the cpu hardware
profile (int8 OpenVINO), beside the same agent on torch fp32, on the same documents, in the same run; and what the int8
model changes: document vectors against fp32, near-duplicate precision and recall.

Documents: the main text of python3-doc pages (/usr/share/doc/python3/html; `--docs N`, default 200), extracted once
before anything is timed. They are long (about 18,000 characters on average) and are read whole: cut into 254-token
windows, at most 16 per document (both profiles), pooled.

* torch -- the agent as it ran before hardware profiles: `hosts.local.profile: gpu` with `device: cpu` (torch fp32 on
  the CPU, batch 32).
* ours -- the agent on `hosts.local.profile: cpu`: int8 OpenVINO (agents/int8model.py), threads = this process's
  CPUs, batch 64. The int8 model is made once, before the rounds (its time is printed), into a model cache the
  agents are pointed at (MESH_MODEL_CACHE), so no timed run includes it.

Each is `meshctl up` with a twin and a topic_model agent on an empty SQLite document store; once it is ready the
documents are inserted and the clock runs until every one is scored (embedding, faiss near-duplicate check, topic,
novelty, written back, doc.scored published). Rounds alternate torch and ours; medians are reported.

Quality: `cosine_vs_torch` is the mean cosine between the two agents' stored semantic vectors (the pooled MiniLM part
of data/topics/vectors.f32, lexical part left out: it is the same text either way) of every document; `dedup_p` and
`dedup_r` are the near-duplicate precision and recall of the int8 embedder's vectors on tests/test_dedup.py's real set
(40 originals, 80 edited copies, sibling pages; threshold 0.85), beside torch's. `--small` also runs the small profile
(at most 4 chunks per document) and says what share of the documents' chunks and tokens it reads.

Last line: RESULT docs_per_min=<ours> vs_torch=<ours / torch> cosine_vs_torch=<mean> dedup_p=<...> dedup_r=<...>
          torch_docs_per_min=<...> cosine_min=<...> docs=<N>

Usage: .venv/bin/python bench/topics.py [--docs 200] [--rounds 1] [--small]
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
MODEL_DIM, LEXICAL_DIM = 384, 1024   # all-MiniLM-L6-v2, the default lexical signature


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


def export_once(cache: Path) -> tuple[float, object]:
    """The int8 export into `cache` (seconds), and the cpu profile's embedder."""
    from agents.embedding import Embedder, resolve_profile

    p = resolve_profile("cpu")
    t0 = time.perf_counter()
    emb = Embedder(device="cpu", backend=p.backend, batch_size=p.batch_size, max_chunks=p.max_chunks,
                   threads=p.threads, cache_dir=cache)
    return time.perf_counter() - t0, emb


def dedup_quality(embedders: dict) -> dict[str, tuple[float, float]]:
    """Near-duplicate (precision, recall) of each embedder on tests/test_dedup.py's set."""
    from agents.topics.dedup import DuplicateIndex
    from tests.test_dedup import THRESHOLD, Pages, build_test_set

    pages = Pages(PYDOC.resolve())
    ts = build_test_set(pages)
    originals, positives, negatives = ts["originals"], ts["positives"], ts["negatives"]
    texts = [pages.text(r) for r in originals] + [t for _, _, t in positives] + [pages.text(r) for r in negatives]
    n_o, n_p = len(originals), len(positives)
    out = {}
    for name, emb in embedders.items():
        vectors = emb.embed(texts).vectors
        index = DuplicateIndex(vectors.shape[1], threshold=THRESHOLD)
        among = index.check_and_add(range(n_o), vectors[:n_o])
        pos_found = index.search(vectors[n_o:n_o + n_p])
        neg_found = index.search(vectors[n_o + n_p:])
        tp = sum(found == i for (found, _), (i, _, _) in zip(pos_found, positives))
        fp = sum(found is not None and found != i for (found, _), (i, _, _) in zip(pos_found, positives))
        fp += sum(found is not None for found, _ in neg_found) + sum(found is not None for found, _ in among)
        out[name] = (tp / (tp + fp) if tp + fp else 1.0, tp / n_p)
    return out


def share_read(emb, texts: list[str], max_chunks: int) -> tuple[float, float, float]:
    """(share of chunks, share of tokens, share of documents read whole) with at most `max_chunks` chunks per
    document."""
    from agents.embedding import _spread

    chunks = kept = tokens = kept_tokens = whole = 0
    encodings = emb._tokenize([t for t in texts if t.strip()])
    for enc in encodings:
        _, counts = emb._token_windows(enc)
        keep = _spread(len(counts), max_chunks)
        chunks, kept, whole = chunks + len(counts), kept + len(keep), whole + (len(keep) == len(counts))
        tokens, kept_tokens = tokens + sum(counts), kept_tokens + sum(counts[k] for k in keep)
    return kept / chunks, kept_tokens / tokens, whole / len(encodings)


def ours(docs: list[tuple[str, str]], profile: str, tmp: Path, models: Path) -> tuple[float, dict[str, object]]:
    """(seconds to score every document, url -> stored semantic vector) for the agent on `profile`."""
    import numpy as np

    from mesh.config import load_config
    from mesh.control import client
    from network.messages import Ping
    from store.docstore import Document, open_docstore

    base = free_port_block(30)
    data = tmp / f"data-{base}"
    torch = profile == "torch"
    settings = {"source": None, "poll_s": 0.05, **({"device": "cpu"} if torch else {})}
    cfg_path = write_config({
        "mesh": {"name": "bench-topics", "base_port": base, "heartbeat_interval_s": 1.0, "data_dir": str(data)},
        "security": {"curve": "off"},
        "hosts": {"local": {"address": "127.0.0.1", "profile": "gpu" if torch else profile}},
        "groups": {"core": {"host": "local", "agents": ["twin"]}, "learn": {"host": "local", "agents": ["topics"]}},
        "agents": {"twin": {"kind": "digital_twin"},
                   "topics": {"kind": "topic_model", "depends_on": ["twin"], "settings": settings}},
    }, tmp / f"topics-{base}.yaml")
    cfg = load_config(cfg_path)
    up = MeshUp(cfg_path, out=tmp / f"up-{base}.out")
    try:
        with client(cfg, "topics", timeout=1.0) as c:
            deadline = time.monotonic() + 300
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
        rows = np.fromfile(data / "topics" / "vectors.f32", dtype=np.float32).reshape(-1, MODEL_DIM + LEXICAL_DIM)
        semantic = {}
        for url, _ in docs:
            v = rows[store.get(url).embedding_id, :MODEL_DIM]
            semantic[url] = v / np.linalg.norm(v)
        store.close()
        return elapsed, semantic
    finally:
        up.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="also time the small profile and say what share it reads")
    args = ap.parse_args()
    if not (PYDOC / "index.html").exists():
        print("python3-doc is not installed: apt-get install -y python3-doc", file=sys.stderr)
        return 2
    from agents.embedding import SMALL_MAX_CHUNKS, Embedder

    docs = load_docs(args.docs)
    texts = [t for _, t in docs]
    n = len(docs)
    print(f"{n} python3-doc pages, {sum(map(len, texts)) / n:.0f} characters on average", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-topics-") as tmp:
        models = Path(tmp) / "models"
        os.environ["MESH_MODEL_CACHE"] = str(models)   # the agents (`meshctl up`, its children) reuse it
        export_s, fast = export_once(models)
        print(f"int8 model made in {export_s:.1f}s (once, untimed below); {fast.int8.threads} OpenVINO thread(s)",
              flush=True)
        if args.small:
            for cap in (16, SMALL_MAX_CHUNKS):
                chunks, tokens, whole = share_read(fast, texts, cap)
                print(f"at most {cap} chunks per document: {chunks:.1%} of the chunks, {tokens:.1%} of the tokens "
                      f"of these pages embedded, {whole:.1%} of them whole (the lexical signature reads all the text)")
        per_min: dict[str, list[float]] = {"torch": [], "cpu": [], "small": []}
        vectors: dict[str, dict] = {}
        for r in range(args.rounds):
            for profile in ("torch", "cpu") + (("small",) if args.small else ()):
                seconds, vectors[profile] = ours(docs, profile, Path(tmp), models)
                per_min[profile].append(n / seconds * 60)
                print(f"round {r + 1}: {profile:5s} agent {seconds:.1f}s ({per_min[profile][-1]:.1f} docs/min)",
                      flush=True)
        cos = [float(vectors["cpu"][u] @ vectors["torch"][u]) for u, _ in docs]
        quality = dedup_quality({"cpu": fast, "torch": Embedder(device="cpu")})
    for name, (p, rec) in quality.items():
        print(f"near-duplicates, {name}: precision {p:.3f} recall {rec:.3f}")
    o, t = statistics.median(per_min["cpu"]), statistics.median(per_min["torch"])
    if args.small:
        print(f"small profile agent: {statistics.median(per_min['small']):.1f} docs/min")
    print(f"RESULT docs_per_min={o:.1f} vs_torch={o / t:.2f} cosine_vs_torch={statistics.mean(cos):.4f} "
          f"dedup_p={quality['cpu'][0]:.3f} dedup_r={quality['cpu'][1]:.3f} torch_docs_per_min={t:.1f} "
          f"cosine_min={min(cos):.4f} docs={n}")
    return 0


if __name__ == "__main__":
    run_main(main)
