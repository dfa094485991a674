"""The extractor agent: fetched pages in, documents in the document store out.

Each `extract.page` from the crawl coordinator is extracted in a pool of worker processes (so
extraction uses every core and a pathological page cannot stall the agent's loop), stored with
an idempotent upsert, and only then answered with `extract.stored`, which carries the outlinks
back to the coordinator. A page that cannot be extracted is stored too, as state 'failed' with
the reason. When the store is unreachable the request is answered with an error instead, so the
coordinator keeps the page and delivers it again later: nothing is acknowledged that is not stored.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import zstandard
from pydantic import Field

from agents.contracts import DocStored, ExtractPage, Link, PageStored
from agents.extractor.backends import BACKENDS, DEFAULT_BACKENDS, TIME_BUDGET_S, Extracted, extract_job, warm_up
from mesh.config import ConfigError
from mesh.runtime import Agent, AgentSettings, handles
from network.codec import Envelope
from network.messages import AgentState
from network.rpc import Deferred, MeshError
from store.docstore import DocStore, Document, StoreUnavailable, open_docstore


def start_worker(agent_pid: int) -> None:
    """A worker process's initializer: warms it up, and ends it when the agent process is gone. The workers hang
    off the forkserver, not the agent, and each holds both ends of the pool's queue, so an agent killed by SIGKILL
    would leave them waiting on it forever; a pidfd of the agent becomes readable when it exits (pid reuse cannot
    fool it)."""
    try:
        pidfd = os.pidfd_open(agent_pid)
    except ProcessLookupError:   # the agent is already gone
        os._exit(0)
    except OSError:              # a kernel without pidfds (before Linux 5.3): no watch
        pidfd = None
    if pidfd is not None:
        def watch() -> None:
            select.select([pidfd], [], [])
            os._exit(0)

        threading.Thread(target=watch, name="agent-watch", daemon=True).start()
    warm_up()


class ExtractorSettings(AgentSettings):
    workers: int = Field(2, ge=0, le=64, description="extraction processes; 0: one thread inside the agent")
    backends: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_BACKENDS),
                                     description="media type -> backend (trafilatura, pypdf, plain)")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="largest decompressed body accepted")
    max_tasks_per_worker: int = Field(500, ge=1, description="a worker process is replaced after this many pages")
    time_budget_s: float = Field(TIME_BUDGET_S, gt=0, le=3600,
                                 description="a page whose extraction takes longer is stored as failed (worker "
                                             "processes only; checked between Python steps, not inside one parse)")


class Extractor(Agent):
    kind = "extractor"
    Settings = ExtractorSettings

    def __init__(self, name: str, config) -> None:
        super().__init__(name, config)
        unknown = sorted(set(self.settings.backends.values()) - set(BACKENDS))
        if unknown:
            raise ConfigError(config.source, [(f"agents.{name}.settings.backends", f"unknown backend(s) {unknown}",
                                               f"use one of {sorted(BACKENDS)}")])
        self.store: DocStore | None = None
        self.pool: ProcessPoolExecutor | ThreadPoolExecutor | None = None
        self._workers: list[mp.process.BaseProcess] = []   # the processes of pools shut down, ended in close()
        self._decompress = zstandard.ZstdDecompressor()
        self.stats = {"pages": 0, "extracted": 0, "failed": 0, "store_errors": 0}

    def on_ready(self) -> None:
        self.store = open_docstore(self.config.store_url("documents"))
        self.pool = self._new_pool()
        self._start_workers()
        self.log.info("document store %s (schema v%d), %s", self.config.store_url("documents").split("@")[-1],
                      self.store.schema_version(),
                      f"{self.settings.workers} worker process(es)" if self.settings.workers else "in-process extraction")

    def _new_pool(self) -> ProcessPoolExecutor | ThreadPoolExecutor:
        if self.settings.workers == 0:
            return ThreadPoolExecutor(1, thread_name_prefix="extract")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["agents.extractor.backends"])
        return ProcessPoolExecutor(self.settings.workers, mp_context=ctx, initializer=start_worker,
                                   initargs=(os.getpid(),),
                                   max_tasks_per_child=self.settings.max_tasks_per_worker)

    @handles(ExtractPage)
    def on_page(self, msg: ExtractPage, env: Envelope) -> Deferred:
        if self.store is None or self.pool is None:
            raise MeshError("unavailable", f"extractor {self.name!r} is not ready yet")
        try:
            declared = zstandard.frame_content_size(msg.body_zstd)   # -1: the frame does not say
            if declared > self.settings.max_body_bytes:
                raise MeshError("too_large", f"body of {declared} bytes exceeds max_body_bytes "
                                             f"{self.settings.max_body_bytes}")
            body = self._decompress.decompress(msg.body_zstd, max_output_size=self.settings.max_body_bytes)
        except zstandard.ZstdError as exc:
            raise MeshError("invalid_body", f"body_zstd is not valid zstd data: {exc}") from None
        reply = Deferred()
        job = (extract_job, body, msg.final_url, msg.content_type, self.settings.backends, msg.truncated,
               self.settings.time_budget_s)
        try:
            future = self.pool.submit(*job)
        except (BrokenProcessPool, RuntimeError):   # a worker died since the last page: a fresh pool
            self._replace_pool()
            future = self.pool.submit(*job)
        future.add_done_callback(lambda f: self.reactor.call_soon_threadsafe(lambda: self._finish(msg, f, reply)))
        return reply

    def _start_workers(self) -> None:
        """Starts every worker process now, in on_ready, not in the first pages' submit on the loop: the first start
        launches multiprocessing's fork server, which imports the extraction stack before it forks (2-4 s on two busy
        cores), and that kept heartbeats back long enough for the twin to declare the extractor dead at the start of
        a crawl. on_ready may take that long (the twin's loading grace). A submit spawns a process while none is idle,
        so one trivial job per worker starts them all; waiting for them also waits for each worker's warm-up. Later
        replacements fork from the running fork server, which is quick."""
        if not self.settings.workers:
            return
        try:
            for started in [self.pool.submit(os.getpid) for _ in range(self.settings.workers)]:
                started.result()
        except BrokenProcessPool:   # a worker died in its warm-up: the first page gets a fresh pool
            self._replace_pool()

    def _replace_pool(self) -> None:
        self.log.warning("an extraction worker died; starting a new pool")
        old, self.pool = self.pool, self._new_pool()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def _finish(self, msg: ExtractPage, future: Future, reply: Deferred) -> None:
        if self.state in (AgentState.DRAINING, AgentState.STOPPED) and (
                future.cancelled() or isinstance(future.exception(), BrokenProcessPool)):
            # dropped or cut short by the drain (on_drain): not the page's fault, so nothing is stored; the page is
            # delivered again, to another replica or to this one's successor
            reply.fail("draining", f"extractor {self.name!r} is draining; try again after its restart")
            return
        try:
            out = Extracted(**future.result())
        except BrokenProcessPool:
            # the page killed its worker (a crash in a C extension): record it, never retry it forever
            self._replace_pool()
            out = Extracted(state="failed", error="the extraction worker crashed on this page")
        except Exception as exc:
            out = Extracted(state="failed", error=f"extraction failed: {type(exc).__name__}: {exc}"[:500])
        doc = Document(url=msg.url, final_url=msg.final_url, content_hash=msg.content_hash, fetched_at=msg.fetched_at,
                       http_status=msg.status, content_type=msg.content_type, state=out.state, error=out.error,
                       canonical_url=out.canonical_url, title=out.title, language=out.language,
                       published=out.published, text=out.text, outlinks=out.outlinks, depth=msg.depth,
                       fetch_id=msg.fetch_id, extracted_at=time.time())
        try:
            outcome = self.store.upsert(doc)   # sets doc.id
        except StoreUnavailable as exc:
            self.stats["store_errors"] += 1
            self.log.warning("document store unavailable, %s not acknowledged: %s", msg.url, exc)
            self.degraded("document store", exc)   # the twin sees why pages are not acknowledged
            reply.fail("store_unavailable", str(exc))
            return
        except Exception as exc:
            self.stats["store_errors"] += 1
            self.log.exception("storing %s failed", msg.url)
            reply.fail("store_error", f"{type(exc).__name__}: {exc}")
            return
        self.recovered("document store")
        self.stats["pages"] += 1
        self.stats[out.state] = self.stats.get(out.state, 0) + 1
        doc_id = doc.id
        reply.resolve(PageStored(url=msg.url, state=out.state, outcome=outcome, document_id=doc_id, error=out.error,
                                 outlinks=[Link(**link) for link in out.outlinks]))
        self.publish(DocStored(url=msg.url, document_id=doc_id, state=out.state, outcome=outcome))

    def gauges(self) -> dict[str, float]:
        return dict(self.stats)

    def on_drain(self) -> None:
        """Drops the queued pages (unacknowledged, they are delivered again: a pool's coordinator hands them to the
        other replicas as soon as the twin reports this one draining, which the twin hears in the loop's next turn,
        so nothing here may hold the loop) and leaves the workers to close()."""
        if self.pool is not None:
            self._shut_down_pool()

    def _shut_down_pool(self) -> None:
        # the executor forgets its processes at shutdown: keep them for close()
        self._workers.extend((getattr(self.pool, "_processes", None) or {}).values())   # none for threads
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def close(self) -> None:
        """Ends the worker processes: with the loop stopped nothing takes their results any more, and left to the
        executor an idle worker could wait forever (its manager thread sent the workers their stop only after the
        interpreter's exit had closed the queue's feeder), keeping the agent until the supervisor killed it at
        drain_timeout_s: every drain with pages in hand took the whole timeout."""
        super().close()
        if self.pool is not None:
            self._shut_down_pool()
        for worker in self._workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(2.0)
        self._workers.clear()
        if self.store is not None:
            self.store.close()
            self.store = None
