"""The online topic model: topics that grow as documents arrive, readable labels, and novelty scores.

Documents come as L2-normalised embedding vectors (one row each) with their text, and are taken one at a time, in
order, so a batch behaves exactly like the same documents streamed one by one.

Topics -- online spherical k-means that can grow. Each topic keeps the running sum of its members' vectors; its
centroid is that sum L2-normalised (the running mean, re-normalised). A document joins the most similar topic (cosine
similarity to the centroid) among those it is similar enough to, and that topic's centroid moves toward it. A
document similar enough to no topic opens a new one (its centroid is the document), up to `max_topics`; past that it
joins its most similar topic whatever the similarity.

"Similar enough" is `new_topic_similarity` (θ) for a grown topic; a young topic's bar is lower. A document's
similarity to the mean of n documents of its own subject rises with n (averaging cancels what each document has of
its own): against a single document it reaches only about the square of what it reaches against a large topic. With
``size_aware=True`` (the default) the bar for a topic of n documents is what a document reaches against n documents
of a subject exactly as coherent as θ stands for (pairwise similarity θ²): ``θ · sqrt(n θ² / (1 + (n - 1) θ²))``,
θ² for one document, θ in the limit. With a fixed bar (``size_aware=False``) the first documents of every subject are
held to the grown-topic bar against single documents, so each subject is split at its start into several topics that
never meet again. Short paragraphs, all-MiniLM-L6-v2, 100 shuffles of 4 subjects x 10 documents: a fixed bar of 0.45
kept on average 2 to 6 of a subject's 10 documents in its main topic, 0.35 kept 5 to 9; the size-aware bar at 0.4
kept 9.9, and 8.7 for the least coherent subject.

Why not scikit-learn's MiniBatchKMeans.partial_fit: it has a fixed number of clusters (it cannot open a topic when a
new subject appears late in a crawl) and needs at least n_clusters samples before its first fit, which a small crawl
or the first batch may not have. scikit-learn does the text side: its CountVectorizer analyzer (English stop words,
words of 3 to 30 characters starting with a letter, lower-cased) tokenises every document.

Topic distribution of a document: ``softmax(similarities to all current centroids / temperature)``, against the
centroids as they were before the document moved its topic; a document that opens a topic is at similarity 1 to it.
The vector has one weight per topic that exists after the document (topic ids are 0, 1, 2... in order of opening),
so later documents have longer vectors; shorter ones are read as zeros for the topics they predate.

Labels -- class-based TF-IDF computed on demand from per-topic term counts:
``weight(t, c) = tf(t, c) / |c| * log(1 + A / f(t))``, with |c| the number of words in topic c, A the average number
of words per topic and f(t) the frequency of t across all topics. The label is the top three keywords, joined by
``", "``.

Novelty -- each topic keeps the running mean of its members' distributions (its centroid distribution). A document's
novelty is the Jensen-Shannon divergence (base 2, so in [0, 1]) between its distribution and the reference of its
topic *before* the document is added, and `novelty_kl` is KL(p || reference) in bits with both sides smoothed by
``eps = 1e-6`` and renormalised. The reference is the topic's running distribution with `novelty_prior` (m)
pseudo-documents of the global running distribution g (the mean distribution of all documents so far) mixed in:
``(sum of the members' distributions + m · g) / (n + m)``. For a topic without documents (the document opens it) that
is g itself, and a document that opens a topic sits near novelty 1 (all its mass is on a topic g gives none). The
very first document has novelty 1.0 and novelty_kl ``log2((1 + eps) / eps)`` (what a one-hot distribution gets
against a reference that gives its topic nothing). Why the prior: distributions are sharp (temperature 0.05), so the
second and third documents of a new subject, which join the topic the first one opened, match that topic's running
distribution (its one document) almost exactly; with m = 0 their novelty was no higher than that of documents of
long-known subjects (about 0.001 to 0.05 for both). With the prior a topic's reference moves from the global
distribution to its own as it gathers documents, so documents in young topics read as novel and novelty fades as a
subject fills in. ``novelty_prior=0`` gives the bare running distribution.

State is saved to one .npz file (numpy arrays plus a JSON header, read back with ``allow_pickle=False``), written to
a temporary file and moved into place with os.replace, and loaded back exactly: the documents scored after a reload
get the same scores as if there had been no restart.

Not thread-safe: callers serialise access (the topic model agent holds a lock).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from sklearn.feature_extraction.text import CountVectorizer

from store.files import atomic_write_bytes

FORMAT = "agent-mesh/online-topics"
FORMAT_VERSION = 1
TOKEN_PATTERN = r"(?u)\b[^\W\d_]\w{2,29}\b"   # a letter, then 2..29 word characters; longer runs (hashes) are not words
EPS = 1e-6                                               # additive smoothing of the KL divergence
LABEL_KEYWORDS = 3
NO_TOPIC = -1                                            # assign() on a model that has no topic yet


class TopicModelError(ValueError):
    """A saved topic model cannot be read: not a checkpoint of this format, a newer version, or damaged."""


@dataclass
class Scored:
    """What `OnlineTopics.score` found for one document."""

    topic: int              # the topic it joined (or opened)
    weights: list[float]    # its topic distribution, one weight per topic that existed after it (sums to 1)
    novelty: float          # Jensen-Shannon divergence from its topic's running distribution, base 2 (0..1)
    novelty_kl: float       # KL(p || q) in bits, smoothed
    new_topic: bool         # it opened its topic
    label: str              # its topic's label right after the document was added


@dataclass
class TopicInfo:
    """One topic as `OnlineTopics.topics` describes it."""

    id: int
    size: int                # documents assigned to it
    keywords: list[str]      # c-TF-IDF keywords, best first
    label: str               # the first three keywords
    mean_novelty: float      # mean novelty (Jensen-Shannon) of its documents when they arrived


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions in bits (0 for identical ones, at most 1).

    Both are normalised to sum 1 first; the shorter one is padded with zeros."""
    p, q = _pad(p, q)
    value = float(jensenshannon(p, q, base=2) ** 2)
    return 0.0 if not math.isfinite(value) else min(max(value, 0.0), 1.0)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = EPS) -> float:
    """KL(p || q) in bits, with `eps` added to every entry of both and each renormalised to sum 1 (finite always).

    The shorter one is padded with zeros."""
    p, q = _pad(p, q)
    p = (p + eps) / (p.sum() + eps * len(p))
    q = (q + eps) / (q.sum() + eps * len(q))
    return max(float(np.sum(p * np.log2(p / q))), 0.0)


def _pad(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if len(p) != len(q):
        n = max(len(p), len(q))
        p, q = np.pad(p, (0, n - len(p))), np.pad(q, (0, n - len(q)))
    return p, q


def _unit(x: np.ndarray) -> np.ndarray:
    """`x` scaled to length 1 (the one way centroids are computed, so a reloaded model matches bit for bit)."""
    return x / np.sqrt(np.dot(x, x))


def _dot(matrix: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``matrix @ v`` in numpy's own loops, not BLAS, whose summation order may depend on memory alignment."""
    return np.einsum("ij,j->i", matrix, v)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


class OnlineTopics:
    """Online topic model over L2-normalised document embeddings (see the module docstring).

    * `dim`: the embedding size (384 for all-MiniLM-L6-v2);
    * `max_topics`: topics never exceed this;
    * `new_topic_similarity`: the cosine similarity to a grown topic's centroid below which a document is outside it
      (a young topic's bar is lower, see `size_aware`). 0.5 suits whole pages embedded with all-MiniLM-L6-v2 (chunked
      and pooled): 475 python3-doc pages made 16 to 20 topics (0.45: 13 or 14, one of them over half the pages;
      0.55: 25 to 27). Short texts are less similar to one another: 0.4 suits paragraphs;
    * `temperature`: of the softmax that turns similarities into the topic distribution (smaller is sharper);
    * `keywords`: how many keywords `topics` gives per topic;
    * `size_aware`: the bar rises with a topic's size (True) or is `new_topic_similarity` for every topic (False);
    * `novelty_prior`: pseudo-documents of the global distribution in each topic's novelty reference.
    """

    def __init__(self, dim: int, *, max_topics: int = 64, new_topic_similarity: float = 0.5,
                 temperature: float = 0.05, keywords: int = 8, size_aware: bool = True,
                 novelty_prior: float = 5.0) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, not {dim}")
        if int(max_topics) < 1:
            raise ValueError(f"max_topics must be >= 1, not {max_topics}")
        if not -1.0 <= float(new_topic_similarity) <= 1.0:
            raise ValueError(f"new_topic_similarity must be in [-1, 1], not {new_topic_similarity}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        if int(keywords) < 1:
            raise ValueError(f"keywords must be >= 1, not {keywords}")
        if not float(novelty_prior) >= 0:
            raise ValueError(f"novelty_prior must be >= 0, not {novelty_prior}")
        self.dim = int(dim)
        self.max_topics = int(max_topics)
        self.new_topic_similarity = float(new_topic_similarity)
        self.temperature = float(temperature)
        self.keywords = int(keywords)
        self.size_aware = bool(size_aware)
        self.novelty_prior = float(novelty_prior)
        self._analyzer = CountVectorizer(stop_words="english", token_pattern=TOKEN_PATTERN).build_analyzer()
        # topics (k of them): rows and entries indexed by topic id
        self._sums = np.zeros((0, self.dim))          # running sum of member vectors
        self._centroids = np.zeros((0, self.dim))     # the sums, L2-normalised
        self._sizes = np.zeros(0, dtype=np.int64)
        self._dist_sums = np.zeros((0, 0))            # row c: sum of the distributions of c's members (k x k)
        self._global_sum = np.zeros(0)                # sum of the distributions of all documents
        self._novelty_sums = np.zeros(0)
        self._n_docs = 0
        # text: vocabulary, per-topic term counts (term id -> count), totals
        self._vocab: dict[str, int] = {}
        self._terms: list[str] = []
        self._totals = np.zeros(1024, dtype=np.int64)   # f(t) over all topics in [:len(self._terms)]; spare room
        self._topic_terms: list[dict[int, int]] = []
        self._topic_words = np.zeros(0, dtype=np.int64)   # |c|

    # --- reading ------------------------------------------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        """Documents scored so far (assign() does not count)."""
        return self._n_docs

    @property
    def n_topics(self) -> int:
        return len(self._sizes)

    def assign(self, vectors: np.ndarray) -> list[tuple[int, list[float]]]:
        """Nearest topic and topic distribution of each row, changing nothing (for near-duplicates, which must not
        feed the model twice). Never opens a topic: a row that `score` would put in a new topic gets its nearest
        existing one. On a model without topics every row gets ``(NO_TOPIC, [])``."""
        rows = self._rows(vectors)
        if self.n_topics == 0:
            return [(NO_TOPIC, []) for _ in rows]
        out = []
        for v in rows:
            sims = _dot(self._centroids, v)
            out.append((int(np.argmax(sims)), _softmax(sims / self.temperature).tolist()))
        return out

    def topics(self) -> list[TopicInfo]:
        """Every topic, largest first (ties: lower id first)."""
        keywords = self._all_keywords(self.keywords)
        order = sorted(range(self.n_topics), key=lambda c: (-int(self._sizes[c]), c))
        return [TopicInfo(id=c, size=int(self._sizes[c]), keywords=keywords[c],
                          label=", ".join(keywords[c][:LABEL_KEYWORDS]),
                          mean_novelty=float(self._novelty_sums[c] / self._sizes[c]) if self._sizes[c] else 0.0)
                for c in order]

    def label(self, topic: int) -> str:
        """The current label of `topic`: its top three c-TF-IDF keywords, joined by ", "."""
        if not 0 <= topic < self.n_topics:
            raise IndexError(f"no topic {topic} ({self.n_topics} topics)")
        return ", ".join(self._keywords(topic, LABEL_KEYWORDS))

    # --- learning -----------------------------------------------------------------------------------------------

    def score(self, vectors: np.ndarray, texts: list[str]) -> list[Scored]:
        """Scores the rows in order, updating the model after each one, so a batch gives what the same rows
        streamed one at a time would. `vectors`: (n, dim), one L2-normalised embedding per row (renormalised here);
        `texts`: the n documents' texts (for keywords; an empty text is fine)."""
        rows = self._rows(vectors)
        texts = list(texts)
        if len(texts) != len(rows):
            raise ValueError(f"{len(rows)} vectors but {len(texts)} texts")
        return [self._score_one(v, t or "") for v, t in zip(rows, texts)]

    def _score_one(self, v: np.ndarray, text: str) -> Scored:
        sims = _dot(self._centroids, v)
        topic, new = self._choose(sims)
        if new:
            self._open_topic(v)
            sims = np.append(sims, 1.0)
        p = _softmax(sims / self.temperature)
        if self._n_docs == 0:
            novelty, novelty_kl = 1.0, math.log2((1 + EPS) / EPS)
        else:
            q = self._reference(topic)
            novelty, novelty_kl = js_divergence(p, q), kl_divergence(p, q)
        # the document joins its topic
        self._sums[topic] += v
        self._centroids[topic] = _unit(self._sums[topic])
        self._sizes[topic] += 1
        self._dist_sums[topic] += p
        self._global_sum += p
        self._novelty_sums[topic] += novelty
        self._n_docs += 1
        self._add_text(topic, text)
        return Scored(topic=topic, weights=p.tolist(), novelty=novelty, novelty_kl=novelty_kl, new_topic=new,
                      label=self.label(topic))

    def _reference(self, topic: int) -> np.ndarray:
        """The distribution a document joining `topic` is compared with (before it is added): the topic's running
        distribution with `novelty_prior` pseudo-documents of the global running distribution mixed in; the global
        one alone for a topic without documents yet."""
        overall = self._global_sum / self._n_docs
        n, m = float(self._sizes[topic]), self.novelty_prior
        if n == 0:
            return overall
        return (self._dist_sums[topic] + m * overall) / (n + m)

    def _choose(self, sims: np.ndarray) -> tuple[int, bool]:
        """(topic, opens a new one) for a document with these similarities to the current centroids."""
        k = len(sims)
        if k == 0:
            return 0, True
        ok = sims >= self._bars()
        if ok.any():
            return int(np.argmax(np.where(ok, sims, -np.inf))), False
        if k < self.max_topics:
            return k, True
        return int(np.argmax(sims)), False

    def _bars(self) -> np.ndarray:
        """Per topic, the least similarity to its centroid that lets a document join it."""
        theta = self.new_topic_similarity
        if not self.size_aware or theta <= 0:
            return np.full(self.n_topics, theta)
        n = self._sizes.astype(np.float64)
        return theta * np.sqrt(n * theta ** 2 / (1 + (n - 1) * theta ** 2))

    def _open_topic(self, v: np.ndarray) -> None:
        k = self.n_topics
        self._sums = np.vstack([self._sums, np.zeros(self.dim)])
        self._centroids = np.vstack([self._centroids, v])
        self._sizes = np.append(self._sizes, 0)
        dist_sums = np.zeros((k + 1, k + 1))
        dist_sums[:k, :k] = self._dist_sums
        self._dist_sums = dist_sums
        self._global_sum = np.append(self._global_sum, 0.0)
        self._novelty_sums = np.append(self._novelty_sums, 0.0)
        self._topic_terms.append({})
        self._topic_words = np.append(self._topic_words, 0)

    def _rows(self, vectors: np.ndarray) -> np.ndarray:
        rows = np.asarray(vectors, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {np.shape(vectors)}")
        norms = np.linalg.norm(rows, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("vectors must be finite and non-zero")
        return rows / norms[:, None]

    # --- text ---------------------------------------------------------------------------------------------------

    def _add_text(self, topic: int, text: str) -> None:
        counts = Counter(self._analyzer(text)) if text else Counter()
        if not counts:
            return
        grow = [t for t in counts if t not in self._vocab]
        for term in grow:
            self._vocab[term] = len(self._terms)
            self._terms.append(term)
        if len(self._terms) > len(self._totals):   # room doubles: amortised constant time per new term
            self._totals = np.concatenate([self._totals, np.zeros(max(len(self._totals), len(grow)), dtype=np.int64)])
        table = self._topic_terms[topic]
        ids = np.fromiter((self._vocab[t] for t in counts), dtype=np.int64, count=len(counts))
        values = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        for i, n in zip(ids.tolist(), values.tolist()):
            table[i] = table.get(i, 0) + n
        self._totals[ids] += values
        self._topic_words[topic] += int(values.sum())

    def _keywords(self, topic: int, n: int) -> list[str]:
        """The `n` best c-TF-IDF keywords of `topic` (ties: the term seen first)."""
        table = self._topic_terms[topic]
        words = int(self._topic_words[topic])
        if not table or words == 0:
            return []
        ids = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
        tf = np.fromiter(table.values(), dtype=np.float64, count=len(table))
        average = float(self._topic_words.sum()) / self.n_topics
        weight = tf / words * np.log1p(average / self._totals[ids])
        take = min(n, len(ids))
        if take < len(ids):   # the candidates first, then an exact ordering of those
            cut = np.partition(weight, len(ids) - take)[len(ids) - take]
            keep = weight >= cut
            ids, weight = ids[keep], weight[keep]
        order = np.lexsort((ids, -weight))[:take]
        return [self._terms[i] for i in ids[order].tolist()]

    def _all_keywords(self, n: int) -> list[list[str]]:
        return [self._keywords(c, n) for c in range(self.n_topics)]

    # --- persistence --------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Writes the whole state to `path` (one .npz file) atomically: a temporary file beside it, fsynced, then
        os.replace. A crash leaves the previous file or the new one, never a mix."""
        path = Path(path)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "max_topics": self.max_topics,
                  "new_topic_similarity": self.new_topic_similarity, "temperature": self.temperature,
                  "keywords": self.keywords, "size_aware": self.size_aware, "novelty_prior": self.novelty_prior,
                  "n_docs": self._n_docs,
                  "n_topics": self.n_topics, "n_terms": len(self._terms), "token_pattern": TOKEN_PATTERN}
        topic_col = np.fromiter((c for c, table in enumerate(self._topic_terms) for _ in table), dtype=np.int64)
        term_col = np.fromiter((i for table in self._topic_terms for i in table), dtype=np.int64)
        count_col = np.fromiter((n for table in self._topic_terms for n in table.values()), dtype=np.int64)
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "sums": self._sums, "sizes": self._sizes, "dist_sums": self._dist_sums, "global_sum": self._global_sum,
            "novelty_sums": self._novelty_sums, "topic_words": self._topic_words,
            "term_totals": self._totals[:len(self._terms)],
            "terms": np.frombuffer("\n".join(self._terms).encode(), dtype=np.uint8),
            "tt_topic": topic_col, "tt_term": term_col, "tt_count": count_col,
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getbuffer())

    @classmethod
    def load(cls, path: Path) -> OnlineTopics:
        """The model saved at `path`, exactly as it was (its own parameters included). FileNotFoundError when there
        is no file; TopicModelError when the file is not a topic model of this format, is from a newer version, or
        is damaged."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise
        except Exception as e:   # a truncated or foreign file: zipfile, numpy and OS errors alike
            raise TopicModelError(f"{path}: not a readable topic model checkpoint ({type(e).__name__}: {e})") from e
        try:
            header = json.loads(arrays["header"].tobytes().decode())
        except Exception as e:
            raise TopicModelError(f"{path}: no topic model header ({type(e).__name__}: {e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise TopicModelError(f"{path}: not a topic model checkpoint (format {header.get('format')!r})"
                                  if isinstance(header, dict) else f"{path}: not a topic model checkpoint")
        if header.get("version") != FORMAT_VERSION:
            raise TopicModelError(f"{path}: topic model format version {header.get('version')}, this code reads "
                                  f"version {FORMAT_VERSION}")
        try:
            model = cls(header["dim"], max_topics=header["max_topics"],
                        new_topic_similarity=header["new_topic_similarity"], temperature=header["temperature"],
                        keywords=header["keywords"], size_aware=header["size_aware"],
                        novelty_prior=header["novelty_prior"])
            model._restore(header, arrays)
        except Exception as e:   # a missing array or key, a wrong shape or count (TopicModelError from _restore)
            detail = str(e) if isinstance(e, TopicModelError) else f"{type(e).__name__}: {e}"
            raise TopicModelError(f"{path}: damaged topic model checkpoint ({detail})") from e
        return model

    def _restore(self, header: dict[str, Any], a: dict[str, np.ndarray]) -> None:
        k, d, v = int(header["n_topics"]), self.dim, int(header["n_terms"])
        terms = a["terms"].tobytes().decode().split("\n") if v else []
        expected = {"sums": (k, d), "sizes": (k,), "dist_sums": (k, k), "global_sum": (k,), "novelty_sums": (k,),
                    "topic_words": (k,), "term_totals": (v,)}
        for name, shape in expected.items():
            if a[name].shape != shape:
                raise TopicModelError(f"{name} has shape {a[name].shape}, expected {shape}")
        if len(terms) != v or not (len(a["tt_topic"]) == len(a["tt_term"]) == len(a["tt_count"])):
            raise TopicModelError("term tables do not match")
        self._sums = a["sums"].astype(np.float64)
        if not np.all(np.isfinite(self._sums)) or np.any(~self._sums.any(axis=1)):
            raise TopicModelError("a topic has no centroid")
        self._centroids = np.array([_unit(row) for row in self._sums]).reshape(k, d)   # exactly as when learnt
        self._sizes = a["sizes"].astype(np.int64)
        self._dist_sums = a["dist_sums"].astype(np.float64)
        self._global_sum = a["global_sum"].astype(np.float64)
        self._novelty_sums = a["novelty_sums"].astype(np.float64)
        self._topic_words = a["topic_words"].astype(np.int64)
        self._totals = np.concatenate([a["term_totals"].astype(np.int64), np.zeros(max(v, 1024), dtype=np.int64)])
        self._terms = terms
        self._vocab = {t: i for i, t in enumerate(terms)}
        if len(self._vocab) != v:
            raise TopicModelError("duplicate terms")
        self._topic_terms = [{} for _ in range(k)]
        for c, i, n in zip(a["tt_topic"].tolist(), a["tt_term"].tolist(), a["tt_count"].tolist()):
            self._topic_terms[c][i] = n
        self._n_docs = int(header["n_docs"])
        if int(self._sizes.sum()) != self._n_docs:
            raise TopicModelError(f"topic sizes add up to {int(self._sizes.sum())}, not {self._n_docs} documents")
