"""Curiosity-ordered crawl against breadth-first and random ordering, on a real site, with a fixed page budget.

The site is Debian's python3-doc HTML (/usr/share/doc/python3/html), served in thought under
http://127.0.0.1:8000/ as `python3 -m http.server` would serve it: the crawl starts at index.html and stays in the
site; a link to a file that is not there is a 404, a file of a type the crawler does not accept (a .py download) is
skipped, and both spend budget as they do in the crawl coordinator ("URLs fetched (or refused)").

What is real: the pages (every file the crawl can reach, about 530), their main text and outlinks with anchors from
agents.extractor.backends (trafilatura) normalised by agents.urls, their document vectors from agents.embedding.Embedder
(all-MiniLM-L6-v2, chunked and pooled, plus the lexical signature, as the topic model agent makes them), the
near-duplicate index (agents.topics.dedup.DuplicateIndex at the agent's 0.85) and a fresh online topic model
(agents.topics.online.OnlineTopics with the agent's settings) fed in fetch order, as the topic model agent does; the
link texts are embedded by the same MiniLM model (cached in data/bench/ too); and the curiosity policy is
agents.curiosity.policy.CuriosityPolicy with its default settings (or those given with --set), on one torch thread as in
the agent (`torch_threads`), called as the curiosity agent calls it: `score` on the links of every fetched page when
they are discovered (crawl.discovered), `score` again on the whole queued frontier every `rescore_every` pages
(crawl.prioritize), `observe` on every fetched page with its semantic vector, topic, novelty and duplicate flag
(doc.scored), or with None when the fetch gave no document, then `learn(learn_steps)`. Each curious crawl starts with
a new, untrained policy: all it knows it learns in the crawl.

What is replayed: the fetching. The link graph is built once from the files and every page embedded once (cached in
data/bench/, keyed by the file list, sizes and times, and the embedding settings; the run says whether the cache was
used), and each crawl then replays "fetch the next URL of the frontier" over that graph, one page at a time, with no
HTTP. Why: the comparison is about the *order* in which a crawl fetches pages, and a crawl through the real
coordinator, extractor and topic model agents on this 2-core machine costs minutes per 100 pages, nearly all of it
re-embedding the same pages for every policy and seed; replaying the graph gives every ordering exactly the same
pages, texts, links and vectors, so differences come from the ordering alone.

The three orderings, same start (index.html), same budget (--budget, default 100 pages, about a fifth of the site):
* bfs: the coordinator's own order without a policy: priority -depth, first discovered first (FIFO by depth);
* random: uniformly random among the queued URLs (seeded);
* curiosity: highest priority first, the priorities being the policy's scores (seeded).

Measures, per crawl:
* topics: distinct subjects reached, against a fixed reference clustering of the whole site: k-means (--clusters,
  default 50, scikit-learn, random_state 0, n_init 10) on the semantic vectors of every reachable page with text;
  a crawl reaches a cluster when it fetches a non-duplicate page of it;
* opened: topics the crawl's own online topic model opened;
* docs: fetched pages that gave a non-duplicate document; dups: near-duplicates and exact copies; nodoc: fetches with
  no document (404, skipped type, no main text);
* novel: non-duplicate documents whose novelty (Jensen-Shannon, from the crawl's online topic model, when fetched)
  is at least --novel-bar (default 0.1; the topic model's documents of well-known subjects score about 0.001-0.05,
  those that open or join a young topic far more).

Random and curiosity run over --seeds seeds (default 30: 0..29), bfs once (it has no randomness). 30 because the
curious crawls' topic counts spread by about 0.8 topics over seeds: with 5 the mean moves by +-0.4 topics (+-1 % of
the ratio) from one draw of seeds to another; with 30 its standard error is about 0.15 (printed with the means).
The table has every crawl (with the topics reached after 25, 50 and 75 pages: @25 @50 @75) and the means; the last
line is
  RESULT topics_vs_bfs=<curiosity topics / bfs topics> novel_vs_bfs=<curiosity novel / bfs novel>
         topics_vs_random=<curiosity topics / random topics>
(ratios of means). Target: topics_vs_bfs >= 1.2.

Usage: .venv/bin/python bench/curiosity.py [--budget 100] [--seeds 30] [--clusters 50] [--novel-bar 0.1]
                                          [--set KEY=VALUE ...]   (CuriosityParams, e.g. --set novelty_weight=0)
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import mimetypes
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import run_main

PYDOC = Path("/usr/share/doc/python3/html")
BASE = "http://127.0.0.1:8000/"
START = BASE + "index.html"
CACHE_DIR = ROOT / "data" / "bench"
ACCEPTED = {"text/html", "application/xhtml+xml", "application/pdf", "text/plain"}   # CrawlSettings.content_types
SITE_FORMAT = 1
EMBED_SETTINGS = {"model": "all-MiniLM-L6-v2", "max_chunks": 16, "lexical_dim": 1024, "semantic_weight": 0.3}


# --- the site: files, their extraction and embeddings, the link graph ------------------------------------------------


@dataclass
class Page:
    """One URL of the site as the crawler meets it."""

    url: str
    status: int                  # 200, or 404 for a link to a file that is not there
    content_type: str
    text: str = ""               # extracted main text ('' when there is none or the type is not accepted)
    outlinks: list[dict] = field(default_factory=list)   # [{"url", "anchor"}] inside the site, in page order
    row: int = -1                # its row in Site.vectors / Site.semantic (pages with text only)
    content_hash: str = ""


@dataclass
class Site:
    pages: dict[str, Page]
    vectors: np.ndarray          # (rows, 1408): the dedup vectors (semantic + lexical)
    semantic: np.ndarray         # (rows, 384): the topic model's vectors
    note: str                    # how it was obtained (cache use, times)


def _path_of(url: str, root: Path) -> Path | None:
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}/" != BASE:
        return None
    rel = unquote(parts.path).lstrip("/")
    path = root / rel if rel else root
    return path / "index.html" if path.is_dir() else path


def _extract_file(args: tuple[str, str, str]) -> dict:
    from agents.extractor.backends import extract

    path, url, ctype = args
    body = Path(path).read_bytes()
    out = extract(body, url=url, content_type=ctype)
    links = [link for link in out.outlinks if link["url"].startswith(BASE)]
    return {"text": (out.text or "") if out.state == "extracted" else "", "outlinks": links,
            "content_hash": hashlib.sha256(body).hexdigest()}


def _site_key(root: Path) -> str:
    """The cache key: the files (names, sizes, times), the embedding settings and the code that reads the pages."""
    h = hashlib.sha256(json.dumps({"format": SITE_FORMAT, "embed": EMBED_SETTINGS, "base": BASE}).encode())
    for module in ("agents/extractor/backends.py", "agents/urls.py", "agents/embedding.py"):
        h.update((ROOT / module).read_bytes())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_site() -> Site:
    """The reachable site from START: pages, link graph, vectors; from the cache when it matches the files."""
    root = PYDOC.resolve()
    key = _site_key(root)
    meta_path, vec_path = CACHE_DIR / f"curiosity-site-{key}.json", CACHE_DIR / f"curiosity-site-{key}.npz"
    if meta_path.exists() and vec_path.exists():
        t0 = time.perf_counter()
        pages = {d["url"]: Page(**d) for d in json.loads(meta_path.read_text())}
        with np.load(vec_path) as z:
            vectors, semantic = z["vectors"], z["semantic"]
        return Site(pages, vectors, semantic, f"site cache used ({meta_path.name}, {time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    pages: dict[str, Page] = {}
    todo = [START]
    extracted_s = 0.0
    with ProcessPoolExecutor(2) as pool:
        while todo:   # layer by layer: extract the layer's files in parallel, then queue their new links
            jobs, layer = [], []
            for url in todo:
                path = _path_of(url, root)
                if path is None or not path.is_file():
                    pages[url] = Page(url, 404, "text/html")
                    continue
                ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                pages[url] = Page(url, 200, ctype)
                if ctype in ACCEPTED:
                    jobs.append((str(path), url, ctype))
                    layer.append(url)
            t1 = time.perf_counter()
            for url, out in zip(layer, pool.map(_extract_file, jobs, chunksize=4)):
                page = pages[url]
                page.text, page.outlinks, page.content_hash = out["text"], out["outlinks"], out["content_hash"]
            extracted_s += time.perf_counter() - t1
            todo = list(dict.fromkeys(link["url"] for url in layer for link in pages[url].outlinks
                                      if link["url"] not in pages))
    from agents.embedding import Embedder

    with_text = [p for p in pages.values() if p.text]
    for row, page in enumerate(with_text):
        page.row = row
    t1 = time.perf_counter()
    embedder = Embedder(EMBED_SETTINGS["model"], device="cpu", max_chunks=EMBED_SETTINGS["max_chunks"],
                        lexical_dim=EMBED_SETTINGS["lexical_dim"], semantic_weight=EMBED_SETTINGS["semantic_weight"])
    vectors, semantic = [], []
    for lo in range(0, len(with_text), 32):
        out = embedder.embed([p.text for p in with_text[lo:lo + 32]])
        vectors.append(out.vectors)
        semantic.append(out.semantic)
        print(f"  embedded {min(lo + 32, len(with_text))}/{len(with_text)} pages", file=sys.stderr, flush=True)
    vectors, semantic = np.vstack(vectors), np.vstack(semantic)
    embedded_s = time.perf_counter() - t1
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(vec_path, vectors=vectors, semantic=semantic)
    meta_path.write_text(json.dumps([p.__dict__ for p in pages.values()]))
    return Site(pages, vectors, semantic,
                f"site built and cached in {time.perf_counter() - t0:.0f}s (extract {extracted_s:.0f}s, "
                f"embed {embedded_s:.0f}s) -> {meta_path.name}")


class AnchorEncoder:
    """encode_anchors for the policy: the MiniLM model, with a persistent cache of the texts it has embedded."""

    def __init__(self):
        from agents.embedding import Embedder

        self.model = Embedder(EMBED_SETTINGS["model"], device="cpu", lexical_dim=0).model
        self.path = CACHE_DIR / f"curiosity-anchors-{hashlib.sha256(EMBED_SETTINGS['model'].encode()).hexdigest()[:12]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as z:
                texts = json.loads(z["texts"].tobytes().decode())
                self.vectors = dict(zip(texts, z["vectors"]))
        self.loaded = len(self.vectors)
        self.hits = self.misses = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            vecs = self.model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
            self.vectors.update(zip(missing, np.asarray(vecs, dtype=np.float32)))
        return np.stack([self.vectors[t] for t in texts])

    def save(self) -> None:
        if len(self.vectors) == self.loaded:
            return
        texts = list(self.vectors)
        blob = np.frombuffer(json.dumps(texts).encode(), dtype=np.uint8)
        np.savez(self.path, texts=blob, vectors=np.stack([self.vectors[t] for t in texts]))


def reference_clusters(site: Site, k: int) -> np.ndarray:
    """Cluster id per vector row: k-means on the semantic vectors of every reachable page with text."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, random_state=0, n_init=10).fit_predict(site.semantic)


# --- one crawl ---------------------------------------------------------------------------------------------------------


@dataclass
class Crawl:
    order: str
    seed: int | None
    fetched: list[str] = field(default_factory=list)
    clusters: set[int] = field(default_factory=set)
    curve: list[int] = field(default_factory=list)     # distinct clusters after each fetch
    docs: int = 0
    dups: int = 0
    nodoc: int = 0
    novel: int = 0
    opened: int = 0
    seconds: float = 0.0
    updates: int = 0


class _Queued:
    __slots__ = ("anchor", "depth", "parent", "priority", "seq", "url")

    def __init__(self, url, anchor, depth, parent, seq):
        self.url, self.anchor, self.depth, self.parent, self.seq = url, anchor, depth, parent, seq
        self.priority = 0.0


def crawl(site: Site, clusters: np.ndarray, order: str, budget: int, seed: int | None, novel_bar: float,
          encoder: AnchorEncoder | None = None, settings: dict | None = None, trace: list | None = None) -> Crawl:
    from agents.curiosity.policy import Candidate, CuriosityParams, CuriosityPolicy, PageState
    from agents.topics.dedup import DuplicateIndex
    from agents.topics.online import OnlineTopics

    t0 = time.perf_counter()
    out = Crawl(order, seed)
    topics = OnlineTopics(site.semantic.shape[1])             # the topic model agent's defaults
    index = DuplicateIndex(site.vectors.shape[1], threshold=0.85)
    by_hash: dict[str, int | None] = {}                      # content hash -> topic of the first document
    rng = np.random.default_rng(seed)
    policy = None
    if order == "curiosity":
        params = CuriosityParams(**{"seed": seed or 0, "device": "cpu", **(settings or {})})
        policy = CuriosityPolicy(params, encoder)
    queued: dict[str, _Queued] = {}
    heap: list[tuple[float, int, str]] = []                  # bfs: (depth, seq, url)
    seen = {START}
    seq = 0

    def enqueue(items: list[_Queued]) -> None:
        for q in items:
            queued[q.url] = q
            if order == "bfs":
                heapq.heappush(heap, (q.depth, q.seq, q.url))
        if policy is not None and items:
            scores = policy.score([Candidate(q.url, q.anchor, q.depth, q.parent) for q in items])
            for q, s in zip(items, scores):
                q.priority = float(s)

    def pop() -> _Queued:
        if order == "bfs":
            return queued.pop(heapq.heappop(heap)[2])
        urls = list(queued)
        if order == "random":
            return queued.pop(urls[int(rng.integers(len(urls)))])
        best = max(queued.values(), key=lambda q: (q.priority, -q.seq))
        return queued.pop(best.url)

    enqueue([_Queued(START, "", 0, None, seq)])
    while queued and len(out.fetched) < budget:
        q = pop()
        page = site.pages[q.url]
        out.fetched.append(q.url)
        if trace is not None:
            trace.append((q.url, q.anchor, q.depth, q.priority, int(clusters[page.row]) if page.text else None))
        state = None
        if page.text:
            row = page.row
            if page.content_hash in by_hash:                                  # exact copy
                state = PageState(q.url, site.semantic[row], by_hash[page.content_hash], 0.0, True)
            else:
                dup, _ = index.check_and_add([row], site.vectors[row:row + 1])[0]
                if dup is not None:
                    topic = topics.assign(site.semantic[row:row + 1])[0][0]
                    state = PageState(q.url, site.semantic[row], topic if topic >= 0 else None, 0.0, True)
                else:
                    sc = topics.score(site.semantic[row:row + 1], [page.text])[0]
                    state = PageState(q.url, site.semantic[row], sc.topic, sc.novelty, False)
                by_hash[page.content_hash] = state.topic
            if state.duplicate:
                out.dups += 1
            else:
                out.docs += 1
                out.clusters.add(int(clusters[row]))
                out.novel += state.novelty >= novel_bar
        else:
            out.nodoc += 1
        out.curve.append(len(out.clusters))
        if policy is not None:
            policy.observe(Candidate(q.url, q.anchor, q.depth, q.parent), state)
            policy.learn(policy.params.learn_steps)
        new = []
        for link in page.outlinks:
            if link["url"] not in seen:
                seen.add(link["url"])
                seq += 1
                new.append(_Queued(link["url"], link["anchor"], q.depth + 1, state, seq))
        enqueue(new)
        if policy is not None and len(out.fetched) % policy.params.rescore_every == 0 and queued:
            items = list(queued.values())
            scores = policy.score([Candidate(i.url, i.anchor, i.depth, i.parent) for i in items])
            for i, s in zip(items, scores):
                i.priority = float(s)
    out.opened = topics.n_topics
    out.updates = policy.updates if policy is not None else 0
    out.seconds = time.perf_counter() - t0
    return out


# --- the run -----------------------------------------------------------------------------------------------------------


CHECKPOINTS = (25, 50, 75)


def _row(c: Crawl) -> str:
    seed = "-" if c.seed is None else str(c.seed)
    at = " ".join(f"{c.curve[n - 1] if len(c.curve) >= n else len(c.clusters):>4}" for n in CHECKPOINTS)
    return (f"{c.order:<10} {seed:>4} {len(c.clusters):>6} {at} {c.opened:>6} {c.docs:>5} {c.novel:>5} {c.dups:>4} "
            f"{c.nodoc:>5} {c.seconds:>6.1f}")


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=100, help="pages fetched per crawl")
    ap.add_argument("--seeds", type=int, default=30, help="seeds for random and curiosity (0..N-1)")
    ap.add_argument("--clusters", type=int, default=50, help="k of the reference clustering")
    ap.add_argument("--novel-bar", type=float, default=0.1, help="novelty from which a document counts as novel")
    ap.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                    help="a CuriosityParams setting for the curious crawls (default: the policy's defaults)")
    args = ap.parse_args()
    if not (PYDOC / "index.html").exists():
        print("python3-doc is not installed: apt-get install -y python3-doc", file=sys.stderr)
        return 2
    import torch

    from agents.curiosity.policy import CuriosityParams

    torch.set_num_threads(1)   # as the curiosity agent runs it (torch_threads: 1): its networks are small, and on a
    #                            busy 2-core machine two threads made a crawl slower, not faster (97 s against 22 s)

    settings = dict(args.set)
    params = CuriosityParams(**{"device": "cpu", **settings})   # refuses unknown settings before anything runs
    started = time.perf_counter()
    site = load_site()
    n_docs = len(site.semantic)
    print(f"site: {len(site.pages)} reachable URLs from {START} ({n_docs} with text, "
          f"{sum(p.status == 404 for p in site.pages.values())} missing, "
          f"{sum(p.status == 200 and not p.text for p in site.pages.values())} without a document); {site.note}")
    clusters = reference_clusters(site, args.clusters)
    sizes = np.bincount(clusters, minlength=args.clusters)
    print(f"reference: k-means k={args.clusters} on the {n_docs} semantic vectors (cluster sizes {sizes.min()} to "
          f"{sizes.max()}, median {int(np.median(sizes))}); budget {args.budget} pages per crawl, start index.html; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    shown = ("eta", "beta", "lr", "temperature", "epsilon", "novelty_weight", "intrinsic_weight", "diversity_weight",
             "learn_steps", "rescore_every")
    print("policy: " + ", ".join(f"{k}={getattr(params, k)}" for k in shown)
          + (f" (set here: {', '.join(sorted(settings))})" if settings else " (defaults)"))
    encoder = AnchorEncoder()
    print(f"anchor embeddings: {encoder.loaded} cached texts loaded ({encoder.path.name})")
    results: dict[str, list[Crawl]] = {"bfs": [], "random": [], "curiosity": []}
    at = " ".join(f"{'@' + str(n):>4}" for n in CHECKPOINTS)
    print(f"\n{'order':<10} {'seed':>4} {'topics':>6} {at} {'opened':>6} {'docs':>5} {'novel':>5} {'dups':>4} "
          f"{'nodoc':>5} {'sec':>6}")
    results["bfs"].append(crawl(site, clusters, "bfs", args.budget, None, args.novel_bar))
    print(_row(results["bfs"][0]), flush=True)
    for seed in range(args.seeds):
        for order in ("random", "curiosity"):
            c = crawl(site, clusters, order, args.budget, seed, args.novel_bar, encoder, settings)
            results[order].append(c)
            print(_row(c), flush=True)
    encoder.save()

    def mean(order: str, what) -> float:
        return statistics.fmean(what(c) for c in results[order])

    print()
    for order, crawls in results.items():
        t = [len(c.clusters) for c in crawls]
        se = statistics.stdev(t) / len(t) ** 0.5 if len(t) > 1 else 0.0
        print(f"{order:<10} mean topics {statistics.fmean(t):5.1f} +- {se:.2f} (standard error; min {min(t)}, max "
              f"{max(t)}), opened "
              f"{mean(order, lambda c: c.opened):5.1f}, docs {mean(order, lambda c: c.docs):5.1f}, novel "
              f"{mean(order, lambda c: c.novel):5.1f}, dups {mean(order, lambda c: c.dups):4.1f}, nodoc "
              f"{mean(order, lambda c: c.nodoc):4.1f}, {mean(order, lambda c: c.seconds):.1f}s per crawl")
    curve = []
    for n in CHECKPOINTS:
        got = {o: mean(o, lambda c, n=n: c.curve[min(n, len(c.curve)) - 1]) for o in results}
        curve.append(f"{n} pages: bfs {got['bfs']:.1f}, random {got['random']:.1f}, curiosity {got['curiosity']:.1f} "
                     f"({got['curiosity'] / max(got['bfs'], 1e-9):.2f}x bfs)")
    print("topics found within the first " + "; ".join(curve))
    topics = {o: mean(o, lambda c: len(c.clusters)) for o in results}
    novel = {o: mean(o, lambda c: c.novel) for o in results}
    docs = {o: mean(o, lambda c: c.docs) for o in results}
    print(f"anchor texts embedded: {encoder.hits} cache hits, {encoder.misses} newly embedded; "
          f"{mean('curiosity', lambda c: c.updates):.0f} policy updates per curious crawl; "
          f"total {time.perf_counter() - started:.0f}s")
    print(f"docs_vs_bfs={docs['curiosity'] / docs['bfs']:.3f} docs_vs_random={docs['curiosity'] / docs['random']:.3f} "
          f"novel_vs_random={novel['curiosity'] / max(novel['random'], 1e-9):.3f} "
          f"random_topics_vs_bfs={topics['random'] / topics['bfs']:.3f}")
    print(f"RESULT topics_vs_bfs={topics['curiosity'] / topics['bfs']:.3f} "
          f"novel_vs_bfs={novel['curiosity'] / max(novel['bfs'], 1e-9):.3f} "
          f"topics_vs_random={topics['curiosity'] / topics['random']:.3f}")
    return 0


if __name__ == "__main__":
    run_main(main)
