"""The curiosity policy: which outlinks the crawl fetches next, learnt online from what the fetched pages turn out to be.

After the Intrinsic Curiosity Module (ICM) of Pathak, Agrawal, Efros and Darrell, "Curiosity-driven Exploration by
Self-supervised Prediction", ICML 2017 (arXiv:1705.05363), mapped onto a crawl:

* state s: a fetched page -- its semantic embedding (MiniLM, 384), its topic from the online topic model (one-hot in
  `topic_slots` slots, topic id modulo the slots), its novelty and its duplicate flag (`PageState`);
* action a: following one outlink of s -- the embedding of the link's text (`link_text`: the URL path and the anchor),
  the URL's path words, directory, first segment and extension folded into `url_buckets` by signed feature hashing,
  the host in `host_buckets`, the link's depth, whether it has anchor words, stays on the parent's host and directory
  or has a query, and its episodic novelty (below) when it was scored (`Candidate`);
* next state s': the page the link leads to, once it has been fetched and scored.

The ICM is the paper's: a feature encoder phi over states, an inverse model g(phi(s), phi(s')) -> a and a forward
model f(phi(s), a) -> phi(s'), trained on ``(1 - beta) L_I + beta L_F``. Here an action is a feature vector, not one of
a few discrete moves, so g regresses the action features (mean squared error instead of the paper's cross-entropy).
phi is trained by the inverse loss only (the forward loss sees phi(s) and phi(s') detached), so the features keep what
tells apart where a link leads, and the forward model cannot lower its error by collapsing phi. phi is L2-normalised,
so the intrinsic reward ``eta / 2 * ||f(phi(s), a) - phi(s')||^2`` lies in [0, 2 eta]: high on transitions unlike
those learnt, falling as the forward model learns them.

Reward of a fetch (`observe`): ``intrinsic_weight * eta / 2 * ||f - phi(s')||^2`` (intrinsic) plus
``novelty_weight * novelty - duplicate_penalty * duplicate`` (extrinsic; novelty is the topic model's Jensen-Shannon
novelty of s', 0 for a duplicate), or ``-failure_penalty`` when the fetch gave no document (``observe(candidate,
None)``: not extractable, a type the extractor does not take, an error).

A link must be ranked *before* it is fetched, when s' is unknown, so the paper's reward cannot be computed for it.
Its priority is ``value + diversity_weight * diversity`` plus exploration noise:

* value: a value head over (phi(s), a) predicts the reward of following the link. It is trained on the stored
  transitions against the reward as it is *now*: the intrinsic part is recomputed with the current forward model at
  every step, so kinds of link whose destinations have become predictable sink, as do kinds that lead to duplicates
  or to nothing extractable. Its last layer starts at zero: no preference before anything is learnt;
* diversity: an episodic novelty term, after the episodic memory of Never Give Up (Badia et al., ICLR 2020), taken
  where the link is predicted to lead: ``1 - (highest cosine similarity between the link's predicted destination and
  the pages fetched so far)`` (the episodic memory holds the semantic vectors of the last `memory_size` fetched
  pages). Why episodic: the value head learns what *kind* of link tends to pay, over the whole replay buffer, and
  cannot know that the subject a link points to was covered ten pages ago (the novelty it learnt from was measured
  back then); the episodic term knows at once. Why a predicted destination: a link's text and its page's text are far
  apart in the embedding space (cosine 0.5 on average on the python3-doc site) and an uninformative anchor ("[4]",
  "Paste") looks far from every page, so raw link-to-page similarity favours the least informative links; and
  link-to-link similarity (the text of a link against those of the links followed, this term's earlier form) says how
  links *read*, not where they lead. The destination model is a ridge regression from a link's text vector l to the
  vector p of the page it led to, pulled towards the identity and fitted in closed form on the replay buffer's
  transitions that gave a document (L, P: their link and page vectors as rows):
  ``W = I + (L^T L + destination_ridge * I)^-1 L^T (P - L)``, destination ``normalise(l W)``. Before any document it
  is l itself; a few dozen fetches teach it the shift from anchor space to page space (on bench/curiosity.py, over the
  links still queued, the mean cosine to the true page goes from 0.55 for the link text to 0.67 for the prediction
  after 25 fetched pages and 0.72 after 100). Its statistics are updated as transitions enter and leave the buffer,
  and W is solved again (384 x 384) when they changed and links are scored;
* exploration: Boltzmann exploration at `temperature` by the Gumbel-max trick (adding ``temperature * Gumbel(0, 1)``
  to the priorities makes the highest one a draw from a softmax over them at that temperature, which survives the
  crawl coordinator's plain "highest priority first"; the best links differ by about 0.01, so the default only breaks
  near-ties), and, with probability `epsilon` per link, a priority drawn uniformly between the lowest and the highest
  of the batch. The noise comes from the policy's own seeded generator, which the checkpoint keeps.

What each part does on bench/curiosity.py (python3-doc, 100 pages from index.html, seeds 0-4; breadth-first reaches 37
of the 50 reference topics): the episodic term is what finds new subjects (without it, diversity_weight=0, 37.0
topics, no better than breadth-first); taken at the predicted destination it reaches 44.2 topics and 57 pages the
topic model calls novel, against 42.6 and 40 for the link-to-link form (1.195 times breadth-first; over seeds 0-29,
44.7 and 1.207 times). That is close to what this kind of ordering can reach at all: choosing the 100 pages greedily
for diversity *knowing every page's true vector in advance* (farthest-first, or facility location) covers 45-46
topics; only an ordering that knows the reference topics themselves (greedy over the link graph) gets all 50, by 60
pages. The value head barely moves the topic count now (all reward weights 0: 45.0; `novelty_weight` 0: 45.0 topics,
61 novel; 0.1: 44.2 and 57; 0.25: 44.6 and 57; over seeds 15-29, 0 against 0.1 differ by 0.2 +- 0.24 topics): it is
what learns from duplicates and fetches without a document, which this site hardly has (0 to 1 per crawl). The topic
model's novelty says "new to the coarse online topics" (about a dozen here) and hardly tells apart pages of a new
subject in a finer sense (ROC AUC 0.46 to 0.56 against a 50-cluster reference), hence its low default weight. Fresh
priorities every 4 pages instead of every page (`rescore_every`) made no difference here (44.2 both);
`destination_ridge` 0.5 and 2 gave 44.7 and 43.8 against 45.1 for 1 (seeds 5-14).

Priorities go stale as the memory grows: the agent sends fresh ones for the queued frontier every `rescore_every`
fetched pages (scoring takes about 0.1 s per 2,000 links on this project's 2-core test machine once their texts are
embedded, the destination model's solve included; `observe` about 8 ms and `learn(4)` about 30 ms).

Learning is online: `observe` stores a transition in a replay buffer (`replay_size`; the oldest is overwritten) and
`learn` takes Adam steps on batches drawn uniformly from it, each with the newest transition in it so a fetch counts
at once. `save` writes the weights, the optimiser state, the buffer, the destination model's statistics, the episodic
memory, the counters and the generator state to one file atomically (temporary file, fsync, os.replace); `load`
refuses a file made with other network shapes and names the settings that differ. A version 2 file (whose episodic
memory held link texts) is read with the memory and the destination model rebuilt from its replay buffer. The policy
runs on the CPU unless given a GPU (`set_device`); it is small (0.42 million weights), so the CPU keeps up with a
crawl.

Not thread-safe: callers serialise access.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn import functional as F

from agents.gpu import resolve_device
from store.files import atomic_write_bytes

FORMAT = "agent-mesh/curiosity"
FORMAT_VERSION = 3   # 2: the replay buffer keeps novelty and duplicate flags, not a weighted reward;
                     # 3: the episodic memory holds fetched pages, not followed links (2 is still read)
SHAPE_FIELDS = ("embedding_dim", "hidden", "feature_dim", "url_buckets", "host_buckets", "topic_slots")
_EXTRA_STATE = 3    # novelty, duplicate, "there is a parent page"
_EXTRA_ACTION = 7   # 1/(1+depth), depth/10 (capped), no anchor words, same host, same directory, a query, diversity
_WORDS = re.compile(r"[^\W_]+")


class CuriosityError(Exception):
    """A checkpoint cannot be used (not one, damaged, made with other shapes) or a device is not there."""


@dataclass
class PageState:
    """A fetched, scored page (what a doc.scored event says about it, with its semantic vector)."""

    url: str
    embedding: np.ndarray      # semantic MiniLM vector, L2-normalised float32 (embedding_dim,)
    topic: int | None
    novelty: float             # 0..1, Jensen-Shannon novelty from the topic model (0 for duplicates)
    duplicate: bool


@dataclass
class Candidate:
    """An outlink waiting in the frontier."""

    url: str
    anchor: str
    depth: int
    parent: PageState | None   # the page it was found on; None for a seed or a parent that gave no document


@dataclass
class Reward:
    """The reward of one fetch, its two parts weighted as the settings say."""

    intrinsic: float   # intrinsic_weight * eta / 2 * forward-model error (0 when the fetch gave no document)
    extrinsic: float   # novelty_weight * novelty - duplicate_penalty * duplicate, or -failure_penalty
    total: float       # intrinsic + extrinsic


class CuriosityParams(BaseModel):
    """Settings of the curiosity policy (the curiosity agent's `settings`)."""

    model_config = ConfigDict(extra="forbid")

    eta: float = Field(1.0, ge=0, description="scale of the intrinsic reward: eta / 2 * forward-model error")
    beta: float = Field(0.2, ge=0, le=1, description="forward loss weight against the inverse loss: "
                        "(1 - beta) L_I + beta L_F")
    lr: float = Field(3e-3, gt=0, le=1, description="Adam learning rate")
    temperature: float = Field(0.002, ge=0, description="Boltzmann exploration: Gumbel noise of this scale on the "
                               "priorities (0: none)")
    epsilon: float = Field(0.0, ge=0, le=1, description="chance that a link gets a uniformly random priority")
    intrinsic_weight: float = Field(0.5, ge=0, description="weight of the intrinsic reward (forward-model error)")
    novelty_weight: float = Field(0.1, ge=0, description="weight of the topic model's novelty in the extrinsic reward")
    duplicate_penalty: float = Field(0.5, ge=0, description="extrinsic reward lost by a fetch that gives a duplicate")
    failure_penalty: float = Field(0.2, ge=0, description="extrinsic reward lost by a fetch that gives no document")
    diversity_weight: float = Field(1.0, ge=0, description="weight of a link's episodic novelty: how far the page it "
                                    "is predicted to lead to lies from the pages fetched so far")
    destination_ridge: float = Field(1.0, gt=0, description="ridge penalty of the destination model (link text -> "
                                     "page vector), which pulls it towards the identity")
    embedding_dim: int = Field(384, ge=1, description="size of the semantic vectors (all-MiniLM-L6-v2: 384)")
    hidden: int = Field(128, ge=4, le=8192, description="hidden units of every network")
    feature_dim: int = Field(64, ge=2, le=4096, description="size of the ICM state features phi(s)")
    url_buckets: int = Field(256, ge=8, le=1 << 16, description="hashed URL path tokens")
    host_buckets: int = Field(16, ge=1, le=4096, description="hashed hosts")
    topic_slots: int = Field(32, ge=1, le=4096, description="topic one-hot size (topic id modulo slots)")
    batch_size: int = Field(32, ge=1, le=4096, description="transitions per optimisation step")
    replay_size: int = Field(4096, ge=1, le=1 << 20, description="transitions kept for learning")
    memory_size: int = Field(8192, ge=1, le=1 << 20, description="fetched pages kept for the episodic novelty")
    learn_steps: int = Field(4, ge=0, le=1000, description="optimisation steps per observed page (for the agent)")
    rescore_every: int = Field(1, ge=1, description="fetched pages between fresh priorities for the queued frontier "
                               "(for the agent; raise it for frontiers of many thousands)")
    device: str = Field("auto", description="auto (the GPU when there is one), cpu, cuda, cuda:N")
    seed: int = Field(0, ge=0, description="seeds the weights, the replay sampling and the exploration noise")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = (v or "").strip().lower()
        if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")

    @property
    def state_dim(self) -> int:
        return self.embedding_dim + self.topic_slots + _EXTRA_STATE

    @property
    def action_dim(self) -> int:
        return self.embedding_dim + self.url_buckets + self.host_buckets + _EXTRA_ACTION


def _bucket(token: str, n: int) -> tuple[int, float]:
    """(bucket, sign) of `token` among `n` buckets: blake2b, stable across processes."""
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h % n, (1.0 if h >> 63 else -1.0)


def url_tokens(url: str) -> list[str]:
    """What the URL says about its page: path words, the directory, the extension, the first segment, the number of
    segments, and the query's keys."""
    parts = urlsplit(url)
    path = parts.path.lower()
    segments = [s for s in path.split("/") if s]
    tokens = [f"w:{w}" for w in _WORDS.findall(path)]
    directory = "/".join(segments[:-1]) if segments else ""
    tokens.append(f"dir:{directory}")
    if segments:
        tokens.append(f"seg0:{segments[0] if len(segments) > 1 else ''}")
        last = segments[-1]
        tokens.append(f"ext:{last.rsplit('.', 1)[1] if '.' in last else ''}")
    tokens.append(f"nseg:{min(len(segments), 8)}")
    tokens.extend(f"q:{kv.split('=', 1)[0]}" for kv in parts.query.split("&") if kv)
    return tokens


def link_text(candidate: Candidate) -> str:
    """The text whose embedding stands for where the link leads: the URL's path without its extension, then the
    anchor ("library/logging: logging — Logging facility for Python"); the path alone when the anchor has no words.
    Anchors are often a bare "module", "[1]" or "next", and the path says which module; with both, a link's text
    embedding lands in the reference cluster of its destination page for 73% of the python3-doc site's links (the
    anchor alone: 64%, the path alone: 59%)."""
    anchor = " ".join((candidate.anchor or "").split())[:300]
    parts = urlsplit(candidate.url)
    path = re.sub(r"\.(s?html?|php\d?|aspx?|jsp)$", "", parts.path.strip("/"), flags=re.IGNORECASE)
    path = re.sub(r"(^|/)(index|default)$", "", path, flags=re.IGNORECASE) or parts.netloc
    return f"{path}: {anchor}" if _WORDS.search(anchor) else path


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class _Networks(nn.Module):
    """phi, the inverse and forward models of the ICM, and the value head."""

    def __init__(self, p: CuriosityParams):
        super().__init__()
        s, a, h, k = p.state_dim, p.action_dim, p.hidden, p.feature_dim
        self.encoder = _mlp(s, h, k)
        self.inverse = _mlp(2 * k, h, a)
        self.forward_model = _mlp(k + a, h, k)
        self.value = _mlp(k + a, h, 1)
        nn.init.zeros_(self.value[-1].weight)   # no preference between links before anything is learnt
        nn.init.zeros_(self.value[-1].bias)

    def predicted_reward(self, phi_s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.value(torch.cat([phi_s, actions], dim=1)).squeeze(1)

    def phi(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(states), dim=-1)


class CuriosityPolicy:
    """Scores candidate outlinks (higher: fetch sooner) and learns from fetched pages; see the module docstring.

    `encode_anchors` maps short texts to an (n, embedding_dim) array of L2-normalised float32 vectors: in the mesh,
    the topic model's sentence-transformers model (``Embedder(...).model.encode(texts, normalize_embeddings=True)``).
    """

    def __init__(self, params: CuriosityParams, encode_anchors: Callable[[list[str]], np.ndarray]):
        self.params = params
        self.encode_anchors = encode_anchors
        self.device = resolve_device(params.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            self.nets = _Networks(params)
        self.nets.to(self.device)
        self.optimizer = torch.optim.Adam(self.nets.parameters(), lr=params.lr)
        self.rng = np.random.default_rng(params.seed)
        self.updates = 0          # optimisation steps taken, over the policy's whole life (checkpoints included)
        self.observed = 0         # transitions observed, likewise
        n, s, a, e = params.replay_size, params.state_dim, params.action_dim, params.embedding_dim
        self._replay = {"state": np.zeros((n, s), np.float32), "action": np.zeros((n, a), np.float32),
                        "next_state": np.zeros((n, s), np.float32), "has_next": np.zeros(n, np.float32),
                        "novelty": np.zeros(n, np.float32), "duplicate": np.zeros(n, np.float32)}
        self._replay_count = 0    # filled rows
        self._replay_next = 0     # the row the next transition goes to
        self._memory = np.zeros((params.memory_size, e), np.float32)   # fetched pages' vectors (a ring)
        self._memory_count = 0
        self._memory_next = 0
        # the destination model's sufficient statistics over the replay buffer's transitions with a document
        self._gram = np.zeros((e, e), np.float64)      # sum of l l^T (l: link text vector)
        self._cross = np.zeros((e, e), np.float64)     # sum of l (p - l)^T (p: the page's vector)
        self._destination_w: np.ndarray | None = None  # I + (gram + ridge I)^-1 cross, when fresh
        self._text_vectors: dict[str, np.ndarray] = {}   # link text -> vector, bounded (oldest dropped first)
        self._url_rows: dict[str, np.ndarray] = {}       # url -> hashed token row, likewise

    # --- features -------------------------------------------------------------------------------------------------

    def _embedding(self, v: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.params.embedding_dim:
            raise ValueError(f"{what}: embedding of size {v.shape[0]}, expected {self.params.embedding_dim}")
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError(f"{what}: embedding must be finite and non-zero")
        return v / norm

    def state_features(self, page: PageState | None) -> np.ndarray:
        p = self.params
        x = np.zeros(p.state_dim, np.float32)
        if page is None:
            return x
        x[:p.embedding_dim] = self._embedding(page.embedding, page.url)
        if page.topic is not None and page.topic >= 0:
            x[p.embedding_dim + page.topic % p.topic_slots] = 1.0
        novelty = float(page.novelty)
        x[-3] = min(max(novelty, 0.0), 1.0) if np.isfinite(novelty) else 0.0
        x[-2] = 1.0 if page.duplicate else 0.0
        x[-1] = 1.0
        return x

    def _texts(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_vectors))
        if missing:
            vecs = np.asarray(self.encode_anchors(missing), dtype=np.float32)
            if vecs.shape != (len(missing), self.params.embedding_dim) or not np.all(np.isfinite(vecs)):
                raise ValueError(f"encode_anchors gave shape {vecs.shape} for {len(missing)} texts, expected "
                                 f"({len(missing)}, {self.params.embedding_dim}) finite values")
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            limit = max(4 * self.params.replay_size, 50_000)
            for t, v in zip(missing, vecs):
                self._text_vectors[t] = v
            while len(self._text_vectors) > limit:
                del self._text_vectors[next(iter(self._text_vectors))]
        return np.stack([self._text_vectors[t] for t in texts])

    def action_features(self, candidates: Sequence[Candidate]) -> np.ndarray:
        p = self.params
        e, u = p.embedding_dim, p.url_buckets
        x = np.zeros((len(candidates), p.action_dim), np.float32)
        if not candidates:
            return x
        x[:, :e] = self._texts([link_text(c) for c in candidates])
        for i, c in enumerate(candidates):
            x[i, e:e + u] = self._url_row(c.url)
            parts = urlsplit(c.url)
            x[i, e + u + _bucket(parts.netloc.lower(), p.host_buckets)[0]] = 1.0
            depth = max(int(c.depth), 0)
            extra = x[i, e + u + p.host_buckets:]
            extra[0] = 1.0 / (1.0 + depth)
            extra[1] = min(depth, 10) / 10.0
            extra[2] = 0.0 if _WORDS.search(c.anchor or "") else 1.0
            if c.parent is not None:
                parent = urlsplit(c.parent.url)
                extra[3] = 1.0 if parent.netloc.lower() == parts.netloc.lower() else 0.0
                extra[4] = 1.0 if extra[3] and parent.path.rsplit("/", 1)[0] == parts.path.rsplit("/", 1)[0] else 0.0
            extra[5] = 1.0 if parts.query else 0.0
        x[:, -1] = self._diversity(x[:, :e])
        return x

    def _url_row(self, url: str) -> np.ndarray:
        row = self._url_rows.get(url)
        if row is None:
            u = self.params.url_buckets
            row = np.zeros(u, np.float32)
            for t in url_tokens(url):
                b, sign = _bucket(t, u)
                row[b] += sign
            norm = np.linalg.norm(row)
            row = row / norm if norm else row
            self._url_rows[url] = row
            while len(self._url_rows) > max(4 * self.params.replay_size, 50_000):
                del self._url_rows[next(iter(self._url_rows))]
        return row

    def destination(self, links: np.ndarray) -> np.ndarray:
        """Where links lead, predicted from their text vectors (n, embedding_dim): the destination model's page
        vectors, L2-normalised (the text vectors themselves before any fetch gave a document)."""
        links = np.asarray(links, dtype=np.float32)
        if self._destination_w is None:
            e = self.params.embedding_dim
            if not self._gram.any():
                return links
            a = self._gram + self.params.destination_ridge * np.eye(e)
            self._destination_w = (np.eye(e) + np.linalg.solve(a, self._cross)).astype(np.float32)
        out = links @ self._destination_w
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _fit_transition(self, link: np.ndarray, page: np.ndarray, sign: float) -> None:
        """Adds (sign 1) or removes (sign -1) one (link text, page) pair from the destination model."""
        link64 = link.astype(np.float64)
        self._gram += sign * np.outer(link64, link64)
        self._cross += sign * np.outer(link64, page.astype(np.float64) - link64)
        self._destination_w = None

    def _refit_destination(self) -> None:
        """The destination model from the replay buffer's transitions with a document (after a load)."""
        e = self.params.embedding_dim
        rows = np.flatnonzero(self._replay["has_next"][:self._replay_count] > 0)
        links = self._replay["action"][rows, :e].astype(np.float64)
        pages = self._replay["next_state"][rows, :e].astype(np.float64)
        self._gram = links.T @ links
        self._cross = links.T @ (pages - links)
        self._destination_w = None

    def _diversity(self, links: np.ndarray) -> np.ndarray:
        """1 - the highest cosine similarity of each link's predicted destination to the pages fetched so far."""
        memory = self._memory[:self._memory_count]
        if not len(memory):
            return np.ones(len(links), np.float32)
        return np.clip(1.0 - (self.destination(links) @ memory.T).max(axis=1), 0.0, 1.0)

    # --- scoring --------------------------------------------------------------------------------------------------

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def predict(self, candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """(predicted reward, diversity) per candidate, before exploration."""
        n = len(candidates)
        value = np.zeros(n, np.float64)
        diversity = np.ones(n, np.float64)
        for lo in range(0, n, 1024):
            chunk = list(candidates[lo:lo + 1024])
            xs = np.stack([self.state_features(c.parent) for c in chunk])
            xa = self.action_features(chunk)
            with torch.no_grad():
                predicted = self.nets.predicted_reward(self.nets.phi(self._tensor(xs)), self._tensor(xa))
                value[lo:lo + len(chunk)] = predicted.double().cpu().numpy()
            diversity[lo:lo + len(chunk)] = xa[:, -1]
        return value, diversity

    def score(self, candidates: list[Candidate]) -> np.ndarray:
        """Frontier priorities (float64, finite, higher: fetch sooner), exploration included."""
        p = self.params
        if not candidates:
            return np.zeros(0, np.float64)
        value, diversity = self.predict(candidates)
        base = value + p.diversity_weight * diversity
        base = np.where(np.isfinite(base), base, 0.0)
        out = base.copy()
        if p.temperature > 0:
            u = self.rng.random(len(out))
            out += p.temperature * -np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-12)))
        if p.epsilon > 0:
            pick = self.rng.random(len(out)) < p.epsilon
            if pick.any():
                out[pick] = self.rng.uniform(base.min(), base.max() if base.max() > base.min() else base.min() + 1,
                                             int(pick.sum()))
        return out

    # --- learning -------------------------------------------------------------------------------------------------

    def _forward_error(self, phi_s: torch.Tensor, actions: torch.Tensor, phi_next: torch.Tensor) -> torch.Tensor:
        """1/2 ||f(phi(s), a) - phi(s')||^2 per row: the forward loss, and the intrinsic reward before eta."""
        predicted = self.nets.forward_model(torch.cat([phi_s, actions], dim=1))
        return 0.5 * (predicted - phi_next).pow(2).sum(dim=1)

    def _remember(self, v: np.ndarray) -> None:
        p = self.params
        self._memory[self._memory_next] = v
        self._memory_next = (self._memory_next + 1) % p.memory_size
        self._memory_count = min(self._memory_count + 1, p.memory_size)

    def _surprise(self, xs: np.ndarray, xa: np.ndarray, xn: np.ndarray) -> float:
        with torch.no_grad():
            phi = self.nets.phi(self._tensor(np.stack([xs, xn])))
            return self.params.eta * float(self._forward_error(phi[:1], self._tensor(xa[None]), phi[1:])[0])

    def surprise(self, candidate: Candidate, page: PageState) -> float:
        """``eta / 2 * ||f(phi(s), a) - phi(s')||^2`` for following `candidate` to `page` under the current forward
        model (the intrinsic reward before `intrinsic_weight`), recording nothing."""
        return self._surprise(self.state_features(candidate.parent), self.action_features([candidate])[0],
                              self.state_features(page))

    def observe(self, candidate: Candidate, page: PageState | None) -> Reward:
        """Records that following `candidate` gave `page` (None: the fetch gave no document) and returns its reward.
        The transition goes into the replay buffer (`learn` trains on it) and the destination model, and the page
        into the episodic memory."""
        p = self.params
        xs = self.state_features(candidate.parent)
        xa = self.action_features([candidate])[0]
        row = self._replay_next
        r = self._replay
        e = p.embedding_dim
        if row < self._replay_count and r["has_next"][row]:   # the transition overwritten leaves the destination model
            self._fit_transition(r["action"][row, :e], r["next_state"][row, :e], -1.0)
        r["state"][row], r["action"][row] = xs, xa
        if page is None:
            r["next_state"][row], r["has_next"][row], r["novelty"][row], r["duplicate"][row] = 0.0, 0.0, 0.0, 0.0
            reward = Reward(intrinsic=0.0, extrinsic=-p.failure_penalty, total=-p.failure_penalty)
        else:
            xn = self.state_features(page)
            intrinsic = p.intrinsic_weight * self._surprise(xs, xa, xn)
            novelty = 0.0 if page.duplicate else float(xn[-3])
            extrinsic = p.novelty_weight * novelty - (p.duplicate_penalty if page.duplicate else 0.0)
            r["next_state"][row], r["has_next"][row] = xn, 1.0
            r["novelty"][row], r["duplicate"][row] = novelty, float(page.duplicate)
            reward = Reward(intrinsic=intrinsic, extrinsic=extrinsic, total=intrinsic + extrinsic)
            self._fit_transition(xa[:e], xn[:e], 1.0)
            self._remember(xn[:e])
        self._replay_next = (row + 1) % p.replay_size
        self._replay_count = min(self._replay_count + 1, p.replay_size)
        self.observed += 1
        return reward

    def learn(self, steps: int = 1) -> float | None:
        """`steps` Adam steps on batches from the replay buffer (the newest transition in every batch); the last
        step's loss, or None when nothing has been observed yet."""
        p = self.params
        if self._replay_count == 0 or steps <= 0:
            return None
        newest = (self._replay_next - 1) % p.replay_size
        loss_value = None
        self.nets.train()
        for _ in range(steps):
            rows = self.rng.integers(0, self._replay_count, size=max(p.batch_size - 1, 0))
            rows = np.concatenate([[newest], rows])
            b = {k: self._tensor(v[rows]) for k, v in self._replay.items()}
            has_next = b["has_next"]
            n_next = has_next.sum().clamp(min=1.0)
            phi_s = self.nets.phi(b["state"])
            phi_next = self.nets.phi(b["next_state"])
            action = b["action"]
            inverse = self.nets.inverse(torch.cat([phi_s, phi_next], dim=1))
            inverse_loss = ((inverse - action).pow(2).mean(dim=1) * has_next).sum() / n_next
            error = self._forward_error(phi_s.detach(), action, phi_next.detach())
            forward_loss = (error * has_next).sum() / n_next
            # the reward as the current settings and forward model make it
            target = has_next * (p.intrinsic_weight * p.eta * error.detach() + p.novelty_weight * b["novelty"]
                                 - p.duplicate_penalty * b["duplicate"]) - (1 - has_next) * p.failure_penalty
            value = self.nets.predicted_reward(phi_s.detach(), action)
            value_loss = F.mse_loss(value, target)
            loss = (1 - p.beta) * inverse_loss + p.beta * forward_loss + value_loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            loss_value = float(loss.detach())
        self.nets.eval()
        return loss_value

    # --- device ---------------------------------------------------------------------------------------------------

    def set_device(self, device: str) -> None:
        """Moves the networks and the optimiser state to `device` (auto, cpu, cuda, cuda:N); agents.gpu.DeviceError when it
        is not there."""
        resolved = resolve_device(device)
        if resolved == self.device:
            return
        self.nets.to(resolved)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(resolved)
        self.device = resolved

    # --- persistence ----------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Weights, optimiser state, replay buffer, destination model, episodic memory, counters and generator state
        in one file, written to a temporary file beside `path`, fsynced, then moved over it (os.replace)."""
        path = Path(path)
        p = self.params
        n = self._replay_count
        state = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "shape": {f: getattr(p, f) for f in SHAPE_FIELDS},
            "params": json.dumps(p.model_dump()),
            "networks": {k: v.detach().cpu() for k, v in self.nets.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "updates": self.updates, "observed": self.observed,
            "replay": {k: torch.from_numpy(v[:n].copy()) for k, v in self._replay.items()},
            "replay_next": self._replay_next,
            "memory": torch.from_numpy(self._memory[:self._memory_count].copy()),
            "memory_next": self._memory_next,
            "destination": {"gram": torch.from_numpy(self._gram.copy()), "cross": torch.from_numpy(self._cross.copy())},
            "rng": json.dumps(self.rng.bit_generator.state),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getbuffer())

    @classmethod
    def load(cls, path: Path, params: CuriosityParams,
             encode_anchors: Callable[[list[str]], np.ndarray]) -> CuriosityPolicy:
        """The policy saved at `path`, continuing where it stopped (weights, optimiser, buffer, counters, noise),
        under `params` (learning rate, reward mix, exploration and device may differ from the saved ones; the network
        shapes may not). FileNotFoundError when there is no file; CuriosityError when it is not a curiosity
        checkpoint, is damaged, or was made with other shapes."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:   # truncated, foreign, or not a torch file at all
            raise CuriosityError(f"{path}: not a readable curiosity checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CuriosityError(f"{path}: not a curiosity policy checkpoint")
        version = state.get("version")
        if version not in (2, FORMAT_VERSION):
            raise CuriosityError(f"{path}: curiosity checkpoint version {version}, this code reads versions 2 and "
                                 f"{FORMAT_VERSION}")
        saved = state.get("shape") or {}
        differ = [f"{f}={saved.get(f)} (settings: {getattr(params, f)})" for f in SHAPE_FIELDS
                  if saved.get(f) != getattr(params, f)]
        if differ:
            raise CuriosityError(f"{path} was made with other network shapes: {', '.join(differ)}; restore those "
                                 f"settings, or move the file away to start a new policy")
        policy = cls(params, encode_anchors)
        try:
            policy.nets.load_state_dict(state["networks"])
            policy.optimizer.load_state_dict(state["optimizer"])
            for group in policy.optimizer.param_groups:
                group["lr"] = params.lr
            policy.updates, policy.observed = int(state["updates"]), int(state["observed"])
            replay = {k: v.numpy() for k, v in state["replay"].items()}
            if set(replay) != set(policy._replay):
                raise CuriosityError("replay buffer arrays do not match")
            for k, v in replay.items():
                if v.shape[1:] != policy._replay[k].shape[1:] or len(v) != len(replay["has_next"]):
                    raise CuriosityError(f"replay {k} has shape {tuple(v.shape)}")
            policy._replay_count, policy._replay_next = _restore_ring(
                replay, int(state["replay_next"]), policy._replay, params.replay_size)
            memory = state["memory"].numpy()
            if memory.ndim != 2 or memory.shape[1] != params.embedding_dim:
                raise CuriosityError(f"memory has shape {tuple(memory.shape)}")
            e = params.embedding_dim
            if version == 2:   # its memory held followed links' texts: the pages in the replay buffer stand in
                order = (np.arange(policy._replay_count) + (policy._replay_next if policy._replay_count
                                                            == params.replay_size else 0)) % params.replay_size
                order = order[policy._replay["has_next"][order] > 0]
                memory, memory_next = policy._replay["next_state"][order, :e], len(order)
            else:
                memory_next = int(state["memory_next"])
            policy._memory_count, policy._memory_next = _restore_ring(
                {"m": memory}, memory_next, {"m": policy._memory}, params.memory_size)
            destination = state.get("destination")
            if destination is not None and policy._replay_count == len(replay["has_next"]):
                policy._gram = destination["gram"].numpy().astype(np.float64)
                policy._cross = destination["cross"].numpy().astype(np.float64)
                if policy._gram.shape != (e, e) or policy._cross.shape != (e, e):
                    raise CuriosityError(f"destination model has shape {tuple(policy._gram.shape)}")
            else:              # version 2, or a smaller buffer: fitted anew on the transitions kept
                policy._refit_destination()
            policy.rng.bit_generator.state = json.loads(state["rng"])
        except CuriosityError as e:
            raise CuriosityError(f"{path}: damaged curiosity checkpoint ({e})") from e
        except Exception as e:   # a missing key, a wrong shape
            raise CuriosityError(f"{path}: damaged curiosity checkpoint ({type(e).__name__}: {e})") from e
        return policy


def _restore_ring(saved: dict[str, np.ndarray], saved_next: int, into: dict[str, np.ndarray],
                  size: int) -> tuple[int, int]:
    """Copies saved ring buffers (n rows, the next write at `saved_next`: n while not full, else the oldest row) into
    buffers of `size` rows: exactly as they were when `size` is n or more, else the newest `size` rows, oldest first.
    Returns (count, next)."""
    n = len(next(iter(saved.values())))
    if n == size or (n < size and saved_next == n):
        for k, v in saved.items():
            into[k][:n] = v
        return n, saved_next % size
    keep = min(n, size)
    for k, v in saved.items():
        into[k][:keep] = np.roll(v, -saved_next, axis=0)[n - keep:]
    return keep, keep % size


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
