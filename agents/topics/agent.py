"""The topic model agent: extracted documents -> embeddings, duplicates, topics, novelty.

Its work queue is the document store itself: every extracted document without an embedding
(`DocStore.pending_topic`). The extractor's doc.stored events wake it early; a poll catches the
rest, so nothing depends on an event arriving. For each batch, on a worker thread:

  1. exact duplicates by content hash (no embedding needed: they share the original's);
  2. embeddings (sentence-transformers in torch, or its int8 OpenVINO model on a cpu or small host: the
     host's hardware profile; long texts chunked and pooled, see agents/embedding.py),
     appended to data/topics/vectors.f32 (row number = embedding_id) before anything else;
  3. near-duplicates: cosine similarity in a faiss index (agents/topics/dedup.py); a near-duplicate is
     stored with duplicate_of and takes its original's topic without feeding the topic model again;
  4. the online topic model (agents/topics/online.py): topic distribution, top topic, label, and
     novelty (Jensen-Shannon and smoothed Kullback-Leibler divergence from the topic's running
     distribution);
  5. one transaction writes the batch's scores; a doc.scored event per document follows.

How far behind the store it is (issue 19: on a CPU host it can score slower than the crawl stores): the backlog
(documents stored and not scored yet), the age of the oldest of them and the scoring speed go out as heartbeat
gauges (the dashboard's "scored N of M"), as Prometheus gauges, in `topics.listing` (meshctl topics) and on every
doc.scored event (with the page's fetch time, so the curiosity agent knows how stale its signal is). The worker
counts the backlog before and after each batch, on the queue's partial index (`DocStore.topic_backlog`, about a
millisecond); a heartbeat only reads what it counted. Crawl coordinators pace new fetches by the figure on doc.scored.

State survives restarts: the faiss index and the topic model are checkpointed under
data/topics/ (every `checkpoint_every` documents, every `checkpoint_s` and on drain). At start the
latest checkpoint is loaded and the documents scored after it are replayed from their stored
vectors, so a restart neither re-embeds stored documents nor forgets what was seen.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import Field, ValidationInfo, model_validator

from agents.contracts import (
    TOPIC_BATCH_DOCS,
    DocScored,
    DocStored,
    Generate,
    Generated,
    TopicsReply,
    TopicsRequest,
    TopicSummary,
)
from agents.embedding import Embedder, EmbedderError, Profile, resolve_profile
from agents.gpu import EstimateError, VramClient, estimate_sentence_transformer
from agents.int8model import default_cache_dir
from mesh.config import AgentRef, ConfigError, MeshConfig
from mesh.runtime import Agent, AgentSettings, handles
from network.codec import Envelope
from network.messages import AgentState
from network.rpc import MeshError
from store.docstore import DocStore, Document, Scores, StoreUnavailable, open_docstore


class TopicSettings(AgentSettings):
    single_agent: ClassVar[str] = (
        "it is the one writer of the topic state (data/topics: the vectors, the near-duplicate index, the online "
        "topics and novelty's memory), which every document's score depends on: replicas would each learn part of "
        "the crawl and write over each other's state; run it on the GPU host, or the cpu profile on a CPU host")
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model: name or directory")
    device: str = Field("auto", description="auto (the GPU when there is one), cpu, cuda, cuda:N")
    batch_size: int | None = Field(None, ge=1, le=4096, description="chunks per forward pass (default: the host's "
                                   "hardware profile's: 32 on gpu, 64 on cpu and small)")
    max_chunks: int | None = Field(None, ge=1, le=1024, description="chunks embedded per document, spread over it "
                                   "(default: the profile's: 16, 4 on small)")
    threads: int | None = Field(None, ge=1, le=1024, description="OpenVINO threads of the cpu and small profiles "
                                "(default: the CPUs this process may use)")
    batch_docs: int = Field(TOPIC_BATCH_DOCS, ge=1, le=10_000, description="documents taken from the store per pass")
    duplicate_threshold: float = Field(0.85, gt=0, le=1, description="cosine similarity of a near-duplicate")
    hnsw_above: int = Field(20_000, ge=1, description="the faiss index turns from flat to HNSW past this size")
    max_topics: int = Field(64, ge=1, le=10_000)
    new_topic_similarity: float = Field(0.5, ge=-1, le=1, description="a document less similar than this to every "
                                        "topic opens a new one (young topics have a lower bar; see topicmodel.py)")
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the topic distribution")
    keywords: int = Field(8, ge=1, le=100)
    poll_s: float = Field(2.0, gt=0, description="look for new documents this often (doc.stored events wake it sooner)")
    checkpoint_every: int = Field(500, ge=1, description="documents between checkpoints")
    checkpoint_s: float = Field(60.0, gt=0, description="seconds between checkpoints")
    source: AgentRef() | None = Field("extractor", description="agent whose doc.stored events wake the topic model")
    vram_optimizer: AgentRef("vram_optimizer", auto=True) | None = Field("auto", description="ask this VRAM optimizer before using a GPU (auto: the "
                                       "config's one, if any; null: use the GPU unasked)")
    vram_priority: int = Field(10, description="the embedding model's VRAM priority (a generative model's is 0)")
    label_model: str | None = Field(None, description="a GGUF model of the model manager that writes readable topic "
                                    "titles from the keywords (off by default)")
    label_agent: AgentRef("model_manager") | None = Field(None, description="the model manager with label_model (default: the config's "
                                    "only one)")
    label_every_s: float = Field(30.0, gt=0, description="look for topics whose keywords changed this often")

    @model_validator(mode="after")
    def _device_fits_profile(self, info: ValidationInfo) -> TopicSettings:
        """A CUDA device on a host whose profile is cpu or small cannot work: said by `meshctl check`."""
        ctx = info.context or {}
        config, agent = ctx.get("config"), ctx.get("agent")
        if config is None or agent is None or not self.device.strip().lower().startswith("cuda"):
            return self
        host = config.host_of(agent)
        profile = config.hosts[host].profile
        if profile in ("cpu", "small"):
            raise ValueError(f"device {self.device!r} on host {host!r}, whose hardware profile is {profile} (int8 "
                             f"OpenVINO on the CPU): set hosts.{host}.profile to gpu or auto, or device to auto or cpu")
        return self


def host_profile(config: MeshConfig, agent: str, settings: TopicSettings, *, cuda: bool | None = None,
                 cores: int | None = None) -> Profile:
    """The hardware profile `agent` runs: its host's `profile` (hosts.HOST.profile, default auto) with the agent's
    explicit device, batch_size, max_chunks and threads (agents/embedding.py `resolve_profile` says how). `cuda` and
    `cores` default to this machine's. ConfigError when the two cannot go together (a CUDA device on a cpu host)."""
    host = config.host_of(agent)
    try:
        return resolve_profile(config.hosts[host].profile, device=settings.device, batch_size=settings.batch_size,
                               max_chunks=settings.max_chunks, threads=settings.threads, cuda=cuda, cores=cores)
    except EmbedderError as exc:
        raise ConfigError(config.source, [(f"hosts.{host}.profile", str(exc), "")]) from None


RATE_WINDOW_S = 60.0   # the scoring speed is measured over this much of the latest work


def scoring_speed(batches: Iterable[tuple[float, float, int]]) -> float | None:
    """Documents a minute over the latest RATE_WINDOW_S seconds of work, from (started, ended, documents) of each
    batch, oldest first (monotonic seconds): the newest batches until they add up to the window (all of them when
    they do not). Time spent idle between batches is left out, so the figure is what the model can do, to compare
    with how fast documents arrive; a batch that takes longer than the window still gives a figure, where a count
    of the documents scored in the last minute would read 0 while it runs. None before the first batch."""
    docs, busy = 0, 0.0
    for started, ended, n in reversed(list(batches)):
        docs, busy = docs + n, busy + max(ended - started, 1e-6)
        if busy >= RATE_WINDOW_S:
            break
    return round(60.0 * docs / busy, 1) if busy else None


def _f16(v: np.ndarray) -> bytes:
    """A semantic vector for a doc.scored event (float16: 768 bytes for MiniLM)."""
    return np.asarray(v, dtype="<f2").tobytes()


@dataclass
class Original:
    url: str
    embedding_id: int
    topic: int | None
    label: str | None


class TopicModelAgent(Agent):
    kind = "topic_model"
    image = "model"   # needs the `model` extra (podman_build.sh: the model image)
    Settings = TopicSettings

    def __init__(self, name, config) -> None:
        super().__init__(name, config)
        s = self.settings
        self.dir = config.mesh.data_dir / "topics"
        self.embedder = None
        self.profile: Profile | None = None   # the host's hardware profile, resolved in on_ready
        self.index = None
        self.topics = None
        self.store: DocStore | None = None
        self.by_hash: dict[str, Original] = {}
        self.by_eid: dict[int, Original] = {}
        self.next_eid = 0
        self.checkpointed_rows = 0
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.counts = {"documents": 0, "duplicates": 0, "exact_duplicates": 0, "embedded": 0, "replayed": 0}
        self.recent_novelty: collections.deque[float] = collections.deque(maxlen=200)  # for the dashboard
        # how far behind: (documents waiting, fetched_at of the oldest or None), counted by the worker once a batch
        # (on_ready counts it first); heartbeats and scrapes only read it, one tuple so they never see half of it
        self.backlog: tuple[int, float | None] | None = None
        self.batches: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=512)  # worker only
        self.speed: float | None = None    # scoring_speed(self.batches), after each batch
        self._backlog_metrics()
        self.lock = threading.Lock()       # the model objects: worker thread vs. requests on the reactor
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.label_agent = None
        if s.label_model is not None:
            self.label_agent = s.label_agent or config.agent_of_kind("model_manager")
            if self.label_agent is None:
                raise ConfigError(config.source, [(f"agents.{name}.settings.label_agent", "no model manager to ask for "
                                                   "topic titles", "add a model_manager agent, or name it")])
        self.titles: dict[int, tuple[tuple, str]] = {}
        self.labeling: int | None = None
        self.vram = None                   # VramClient, when the GPU is used under a lease
        self.lease = None
        self.gpu_asked = False
        self.device_change = None          # (device, lease) for the worker to apply between batches
        self.worker: threading.Thread | None = None
        self.worker_error: str | None = None

    def _backlog_metrics(self) -> None:
        """Prometheus gauges of how far behind the store it is; the age and speed are read at scrape time."""
        r = self.metrics.registry
        self.m_backlog = Gauge("topic_backlog_documents", "Documents stored (extracted) and not scored yet, as "
                               "counted before and after each batch", registry=r)
        Gauge("topic_backlog_oldest_seconds", "Seconds since the oldest document waiting to be scored was fetched "
              "(0 when none waits)", registry=r).set_function(lambda: self.backlog_age_s() or 0.0)
        Gauge("topic_scored_per_minute", "Scoring speed: documents a minute over the latest minute of work "
              "(idle time left out)", registry=r).set_function(lambda: self.speed or 0.0)
        self.m_scored = Counter("topic_documents_scored", "Documents scored by this process, duplicates included",
                                registry=r)

    def _set_backlog(self, waiting: int, oldest: float | None) -> None:
        self.backlog = (waiting, oldest if waiting else None)
        self.m_backlog.set(waiting)

    def backlog_age_s(self) -> float | None:
        """Seconds since the oldest waiting document was fetched (the crawler's clock: hosts should agree on the
        time); None when none waits or nothing was counted yet."""
        backlog = self.backlog
        if backlog is None or backlog[1] is None:
            return None
        return max(0.0, time.time() - backlog[1])

    # --- start, stop --------------------------------------------------------------------------

    def setup(self) -> None:
        if self.settings.source is not None:
            self.subscribe(self.settings.source, DocStored.type_name, lambda *_: self.wake.set())
        if self.label_agent is not None:
            self.reactor.every(self.settings.label_every_s, self._label_topics, first=1.0)

    # --- readable titles from a GGUF model (label_model) ----------------------------------------------

    LABEL_PROMPT = ("Keywords of a group of web pages: {keywords}.\n"
                    "A short title for the group, at most six words:")

    def _label_topics(self) -> None:
        """Asks the model manager for a title for each topic whose keywords changed since its last title, one
        request at a time (the model serves one request at a time anyway)."""
        if self.topics is None or self.labeling is not None:
            return
        with self.lock:
            infos = self.topics.topics()
        for t in infos:
            keys = tuple(t.keywords[:8])
            if keys and self.titles.get(t.id, ((), ""))[0] != keys:
                self.labeling = t.id
                msg = Generate(model=self.settings.label_model, prompt=self.LABEL_PROMPT.format(keywords=", ".join(keys)),
                               max_tokens=16, temperature=0.0, stop=["\n"])
                self.peer(self.label_agent).request(msg, lambda r, i=t.id, k=keys: self._titled(i, k, r),
                                                    self._title_failed, timeout=120.0, retries=0)
                return

    def _titled(self, topic: int, keys: tuple, reply: Generated) -> None:
        self.labeling = None
        self.titles[topic] = (keys, " ".join(reply.text.split()).strip(" .\"'")[:120])
        self.reactor.call_later(0, self._label_topics)

    def _title_failed(self, exc: MeshError) -> None:
        self.labeling = None
        self.log.warning("no topic title from %s: %s", self.label_agent, exc.message)

    def on_ready(self) -> None:
        # faiss and scikit-learn are heavy, and `meshctl check` imports every kind to validate its settings
        from agents.topics.dedup import DuplicateIndex  # deferred
        from agents.topics.online import OnlineTopics  # deferred

        s = self.settings
        started = time.monotonic()
        self.profile = p = host_profile(self.config, self.name, s)
        if p.note:
            self.log.warning("hardware profile of host %s: %s", self.host, p.note)
        lease_gpu = p.backend == "torch" and self._gpu_needs_lease()
        self.embedder = Embedder(s.model, device="cpu" if lease_gpu else p.device, backend=p.backend,
                                 batch_size=p.batch_size, max_chunks=p.max_chunks, threads=p.threads,
                                 cache_dir=default_cache_dir())
        self.store = open_docstore(self.config.store_url("documents"))
        self.dir.mkdir(parents=True, exist_ok=True)
        ckpt = self._latest_checkpoint()
        if ckpt is not None:
            meta = json.loads((ckpt / "state.json").read_text())
            mismatch = (meta.get("dim"), meta.get("model_dim"), meta.get("model")) != (
                self.embedder.dim, self.embedder.model_dim, s.model)
            if mismatch:
                raise RuntimeError(f"checkpoint {ckpt} was made with model {meta.get('model')} "
                                   f"(dim {meta.get('dim')}), not {s.model} (dim {self.embedder.dim}): "
                                   f"move {self.dir} away to start afresh")
            self.index = DuplicateIndex.load(ckpt / "index.faiss", threshold=s.duplicate_threshold)
            self.topics = OnlineTopics.load(ckpt / "topics.npz")
            self.checkpointed_rows = meta["rows"]
            self.counts.update(meta.get("counts", {}))
        else:
            self.index = DuplicateIndex(self.embedder.dim, threshold=s.duplicate_threshold, hnsw_above=s.hnsw_above)
            self.topics = OnlineTopics(self.embedder.model_dim, max_topics=s.max_topics,
                                       new_topic_similarity=s.new_topic_similarity, temperature=s.temperature,
                                       keywords=s.keywords)
        self.vectors_path = self.dir / "vectors.f32"
        rows = self.vectors_path.stat().st_size // (4 * self.embedder.dim) if self.vectors_path.exists() else 0
        self.next_eid = max(rows, self.checkpointed_rows)
        for url, content_hash, eid, topic, label in self.store.embedded_originals():
            original = Original(url, eid, topic, label)
            self.by_hash.setdefault(content_hash, original)
            self.by_eid[eid] = original
        replayed = self._replay()
        self._set_backlog(*self.store.topic_backlog())   # shown from the first heartbeat, before the first pass
        # the checkpoint's counters miss what was scored after it (a crash): the stored scores have them all
        self.counts.update(self.store.score_counts())
        self.log.info("topic model ready in %.1fs: %s on %s (%s), %d vector(s), checkpoint at %d, %d replayed, "
                      "%d topic(s)", time.monotonic() - started, s.model, self.embedder.backend_label, p.describe(),
                      self.next_eid, self.checkpointed_rows, replayed, len(self.topics.topics()))
        self.worker = threading.Thread(target=self._work, name="topic-model", daemon=True)
        self.worker.start()   # it looks every poll_s by itself; doc.stored events wake it sooner
        if lease_gpu:
            self._acquire_gpu()

    def set_state(self, state: AgentState, detail: str = "") -> None:
        """Ready without another detail, the status line says how this host embeds (`meshctl status`, the dashboard)."""
        if state == AgentState.READY and not detail and self.profile is not None:
            detail = self.profile.describe()
        super().set_state(state, detail)

    # --- the GPU, under a VRAM lease ----------------------------------------------------------------

    def _gpu_needs_lease(self) -> bool:
        """A GPU is there for `device: auto` and a VRAM optimizer is in the mesh: start on the CPU and ask."""
        if self.settings.device != "auto" or self.settings.vram_optimizer is None:
            return False
        import torch  # deferred: a heavy import, and only a GPU host gets here

        if not torch.cuda.is_available():
            return False
        self.vram = VramClient(self, self.settings.vram_optimizer)
        return self.vram.optimizer is not None

    def _acquire_gpu(self) -> None:
        """Asks for the model's memory (agents/gpu.py's estimate for its batch size); the worker moves the model
        between batches: onto the granted GPU, and back to the CPU when the lease is revoked."""
        s = self.settings
        try:
            need = estimate_sentence_transformer(self.embedder.model_name, s.batch_size,
                                                 self.embedder.max_seq_length).total
        except EstimateError as exc:
            self.log.warning("cannot size %s for the GPU (%s): staying on the CPU", s.model, exc)
            return

        def granted(lease) -> None:
            if lease.device.startswith("cuda"):
                self.device_change = (lease.device, lease)
                self.wake.set()

        def revoked(lease, why: str) -> None:
            self.log.info("GPU lease revoked (%s): back to the CPU", why)
            self.device_change = ("cpu", lease)
            self.wake.set()

        self.lease = self.vram.acquire(s.model, need, s.vram_priority, on_granted=granted, on_revoke=revoked,
                                       on_denied=lambda lease: self.log.warning("no GPU for %s: %s; on the CPU",
                                                                                s.model, lease.reason))
        self.gpu_asked = False

    def _apply_device(self) -> None:
        """Worker thread, between batches: moves the model where the last grant or revoke said."""
        change, self.device_change = self.device_change, None
        if change is None:
            return
        device, lease = change
        with self.lock:
            self.embedder.set_device(device)
        if device == "cpu":
            import torch  # deferred: a heavy import, only after a GPU was used

            torch.cuda.empty_cache()
            lease.release()
            self.lease = None
        else:
            lease.loaded()
        self.log.info("embedding model now on %s", device)

    def _replay(self) -> int:
        """Feeds the documents scored after the checkpoint back into the index and the topic model from their
        stored vectors (no embedding)."""
        if self.next_eid <= self.checkpointed_rows:
            return 0
        dim = self.embedder.dim
        vectors = np.memmap(self.vectors_path, dtype=np.float32, mode="r").reshape(-1, dim)
        n = 0
        since = self.checkpointed_rows
        while True:
            docs = self.store.embedded_since(since, limit=1000)
            if not docs:
                break
            for doc in docs:
                since = doc.embedding_id + 1
                if doc.duplicate_of is not None or doc.embedding_id >= len(vectors):
                    continue
                vec = np.asarray(vectors[doc.embedding_id:doc.embedding_id + 1])
                self.index.add([doc.embedding_id], vec)
                self.topics.score(self._semantic(vec), [doc.text or ""])
                n += 1
        self.counts["replayed"] = self.counts.get("replayed", 0) + n
        del vectors
        return n

    def _semantic(self, vecs: np.ndarray) -> np.ndarray:
        """The sentence-embedding part of stored document vectors (the topic model works on meaning alone; the
        lexical part is for near-duplicates, see agents/embedding.py)."""
        sem = np.asarray(vecs[:, :self.embedder.model_dim], dtype=np.float32)
        norms = np.linalg.norm(sem, axis=1, keepdims=True)
        return sem / np.where(norms > 0, norms, 1.0)

    def on_drain(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.worker is not None:
            self.worker.join(self.config.mesh.drain_timeout_s)
            # after a failed batch the index and the topic model hold documents whose scores were never committed
            # (the store went away under save_scores): no checkpoint then, the next start replays what was committed
            if not self.worker.is_alive() and self.topics is not None and self.worker_error is None:
                with self.lock:
                    self._checkpoint()

    def close(self) -> None:
        super().close()
        if self.store is not None and (self.worker is None or not self.worker.is_alive()):
            self.store.close()
            self.store = None

    # --- the work -------------------------------------------------------------------------------

    def _work(self) -> None:
        store = open_docstore(self.config.store_url("documents"))   # this thread's own connection
        store_down = False
        try:
            while not self.stop.is_set():
                self.wake.wait(self.settings.poll_s)
                self.wake.clear()
                self._apply_device()
                while not self.stop.is_set():
                    try:
                        docs = store.pending_topic(self.settings.batch_docs)
                        # counted with this batch still in it: it is not scored until the commit
                        waiting, oldest = store.topic_backlog() if docs else (0, None)
                    except StoreUnavailable as exc:
                        self.log.warning("document store unavailable: %s", exc)
                        self.reactor.call_soon_threadsafe(lambda e=exc: self.degraded("document store", e))
                        store_down = True
                        break
                    if store_down:
                        store_down = False
                        self.reactor.call_soon_threadsafe(lambda: self.recovered("document store"))
                    self._set_backlog(waiting, oldest)
                    if not docs:
                        break
                    lease = self.lease
                    if lease is not None and lease.granted:
                        lease.touch()
                    elif lease is None and self.vram is not None and not self.gpu_asked:
                        self.gpu_asked = True     # work again after an idle revoke: ask for the GPU again
                        self.reactor.call_soon_threadsafe(self._acquire_gpu)
                    started = time.monotonic()
                    events = self._process(store, docs)
                    self.batches.append((started, time.monotonic(), len(docs)))
                    self.speed = scoring_speed(self.batches)
                    self.m_scored.inc(len(docs))
                    # what waits now, stored meanwhile included: the crawl paces itself by this figure
                    try:
                        left, oldest = store.topic_backlog()
                    except StoreUnavailable:    # the next pass says so
                        left = max(0, waiting - len(docs))
                    self._set_backlog(left, oldest)
                    for event in events:
                        event.backlog = left
                    self._apply_device()
                    s = self.settings
                    if (self.since_checkpoint >= s.checkpoint_every
                            or time.monotonic() - self.last_checkpoint >= s.checkpoint_s):
                        with self.lock:
                            self._checkpoint()
                    self.reactor.call_soon_threadsafe(lambda ev=events: [self.publish(e) for e in ev])
        except Exception as exc:  # the agent reports it and stops; the supervisor restarts it
            self.log.exception("topic model worker failed")
            self.worker_error = f"{type(exc).__name__}: {exc}"
            self.failure = f"topic model worker failed: {self.worker_error}"
            self.request_stop()
        finally:
            store.close()

    def _process(self, store: DocStore, docs: list[Document]) -> list[DocScored]:
        """Scores one batch; embedding runs outside the lock, so requests are answered meanwhile."""
        fresh: list[Document] = []      # first of their content hash: embedded
        copies: list[Document] = []     # same content hash as a stored document or an earlier one of this batch
        hashes = set(self.by_hash)
        for doc in docs:
            (copies if doc.content_hash in hashes else fresh).append(doc)
            hashes.add(doc.content_hash)
        embedded = self.embedder.embed([d.text or "" for d in fresh]) if fresh else None
        with self.lock:
            scores, events = self._score_fresh(fresh, embedded) if fresh else ([], [])
            for doc in copies:   # after the fresh ones, so a copy of one of them finds it
                original = self.by_hash[doc.content_hash]
                scores.append(Scores(document_id=doc.id, embedding_id=original.embedding_id, duplicate_of=original.url,
                                     topic=original.topic, novelty=0.0, novelty_kl=0.0, topic_label=original.label))
                events.append(DocScored(url=doc.url, document_id=doc.id, topic=original.topic,
                                        label=original.label or "", duplicate_of=original.url, similarity=1.0,
                                        fetched_at=doc.fetched_at))
            self.counts["exact_duplicates"] += len(copies)
            store.save_scores(scores)
            self.counts["documents"] += len(scores)
            self.since_checkpoint += len(scores)
        return events

    def _score_fresh(self, fresh: list[Document], embedded) -> tuple[list[Scores], list[DocScored]]:
        """Vectors to disk first, then near-duplicates, then the topic model, one document at a time."""
        scores: list[Scores] = []
        events: list[DocScored] = []
        vecs = np.ascontiguousarray(embedded.vectors, dtype=np.float32)
        sems = self._semantic(vecs)
        eids = list(range(self.next_eid, self.next_eid + len(fresh)))
        with open(self.vectors_path, "ab") as f:    # written before any score refers to it
            f.write(vecs.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.next_eid += len(fresh)
        self.counts["embedded"] += len(fresh)
        for i, (doc, eid, (dup, sim)) in enumerate(zip(fresh, eids, self.index.check_and_add(eids, vecs))):
            if dup is not None:
                original = self.by_eid[dup]   # stored earlier, or an earlier row of this batch
                self.by_hash[doc.content_hash] = original   # an exact copy of this one duplicates the same original
                topic, weights = self.topics.assign(sems[i:i + 1])[0]
                topic = None if topic < 0 else topic
                label = self.topics.label(topic) if topic is not None else None   # the topic it was given
                scores.append(Scores(document_id=doc.id, embedding_id=eid, duplicate_of=original.url, topic=topic,
                                     novelty=0.0, novelty_kl=0.0, topic_label=label, topic_weights=weights))
                events.append(DocScored(url=doc.url, document_id=doc.id, topic=topic, label=label or "",
                                        duplicate_of=original.url, similarity=round(sim, 4),
                                        embedding=_f16(sems[i]), fetched_at=doc.fetched_at))
                self.counts["duplicates"] += 1
                continue
            sc = self.topics.score(sems[i:i + 1], [doc.text or ""])[0]
            original = Original(doc.url, eid, sc.topic, sc.label)
            self.by_eid[eid] = original
            self.by_hash[doc.content_hash] = original
            self.recent_novelty.append(float(sc.novelty))
            scores.append(Scores(document_id=doc.id, embedding_id=eid, topic=sc.topic, novelty=sc.novelty,
                                 novelty_kl=sc.novelty_kl, topic_label=sc.label, topic_weights=sc.weights))
            events.append(DocScored(url=doc.url, document_id=doc.id, topic=sc.topic, label=sc.label,
                                    novelty=round(sc.novelty, 6), novelty_kl=round(sc.novelty_kl, 6),
                                    new_topic=sc.new_topic, embedding=_f16(sems[i]), fetched_at=doc.fetched_at))
        return scores, events

    # --- checkpoints ------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        done = sorted((p for p in self.dir.glob("ckpt-*") if (p / "state.json").exists()),
                      key=lambda p: int(p.name.split("-", 1)[1]))
        return done[-1] if done else None

    def _checkpoint(self) -> None:
        """index + topic model + counters into a new ckpt-<rows> folder, made complete before it is named."""
        rows = self.next_eid
        final = self.dir / f"ckpt-{rows}"
        if final.exists():
            self.since_checkpoint, self.last_checkpoint = 0, time.monotonic()
            return
        tmp = self.dir / f".ckpt-{rows}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.index.save(tmp / "index.faiss")
        self.topics.save(tmp / "topics.npz")
        (tmp / "state.json").write_text(json.dumps({"rows": rows, "model": self.settings.model,
                                                    "dim": self.embedder.dim, "model_dim": self.embedder.model_dim,
                                                    "counts": self.counts,
                                                    "time": time.time()}))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        for old in self.dir.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        self.checkpointed_rows = rows
        self.since_checkpoint, self.last_checkpoint = 0, time.monotonic()
        self.log.info("checkpoint at %d vector(s): %d topic(s), index %s", rows, len(self.topics.topics()),
                      self.index.kind)

    # --- requests ---------------------------------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        """Counts, topics, the novelty of the last 200 non-duplicate documents (p10, p50, p90), and how far behind
        the store it is: `backlog` (documents waiting), `backlog_oldest_s` (0 when none waits), `scored_per_min`
        (the dashboard shows them as "scored N of M (backlog B, oldest Xs)")."""
        out: dict[str, float] = dict(self.counts)
        backlog = self.backlog
        if backlog is not None:
            out.update(backlog=backlog[0], backlog_oldest_s=round(self.backlog_age_s() or 0.0, 1))
        if self.speed is not None:
            out["scored_per_min"] = self.speed
        if self.profile is not None:
            out[f"profile:{self.profile.name}"] = 1.0   # the dashboard shows the name (as the vram agent's lease_mb:)
        topics = self.topics
        if topics is not None:
            out["topics"] = topics.n_topics
        recent = list(self.recent_novelty)
        if recent:
            p10, p50, p90 = np.percentile(recent, [10, 50, 90])
            out.update(novelty_p10=round(float(p10), 4), novelty_p50=round(float(p50), 4),
                       novelty_p90=round(float(p90), 4))
        return out

    @handles(TopicsRequest)
    def on_topics(self, msg: TopicsRequest, env: Envelope) -> TopicsReply:
        if self.topics is None:
            raise MeshError("unavailable", f"topic model {self.name!r} is not ready yet")
        with self.lock:
            infos = self.topics.topics()
            counts = dict(self.counts)
            index = f"{self.index.kind}, {self.index.ntotal} vector(s)"
        return TopicsReply(topics=[TopicSummary(id=t.id, label=t.label, keywords=list(t.keywords), size=t.size,
                                                title=self.titles.get(t.id, ((), ""))[1],
                                                mean_novelty=round(t.mean_novelty, 6)) for t in infos[:msg.limit]],
                           total_topics=len(infos), documents=counts["documents"], duplicates=counts["duplicates"],
                           exact_duplicates=counts["exact_duplicates"], index=index, device=self.embedder.device,
                           profile=self.profile.describe() if self.profile is not None else "",
                           backlog=self.backlog[0] if self.backlog is not None else None,
                           oldest_unscored_s=None if (age := self.backlog_age_s()) is None else round(age, 1),
                           scored_per_min=self.speed)
