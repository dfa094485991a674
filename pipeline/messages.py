"""Message types of the crawl-and-extract pipeline (docs/PROTOCOL.md lists them with the rest).

Coordinator requests: crawl.status, crawl.enqueue, crawl.prioritize (the curiosity agent's lever).
Hand-off: the coordinator sends each fetched page to the extractor as extract.page; the reply,
extract.stored, comes only once the document is in the document store, and carries the page's
outlinks back to the frontier. Events: crawl.fetched (coordinator) and doc.stored (extractor).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from network.messages import Message


class Link(BaseModel):
    url: str
    anchor: str = ""


class CrawlStatusRequest(Message):
    """Where the crawl stands (meshctl crawl status, the benchmarks, the dashboard)."""

    type_name: ClassVar[str] = "crawl.status"


class CrawlStatus(Message):
    type_name: ClassVar[str] = "crawl.status_reply"
    queued: int = 0
    leased: int = 0
    fetched: int = 0           # fetched, waiting for the extractor's acknowledgement
    done: int = 0
    failed: int = 0
    seen: int = 0
    pages: int = 0             # fetches that got an HTTP response since the coordinator started
    in_flight: int = 0         # fetches under way now
    handoff_in_flight: int = 0
    documents: int = 0         # pages acknowledged as stored by the extractor
    budget_left: int = 0
    idle: bool = False         # nothing left to fetch or hand off (or the page budget is spent)
    hosts: int = 0


class Enqueue(Message):
    """Adds URLs to the frontier (subject to scope, normalisation and the seen-set)."""

    type_name: ClassVar[str] = "crawl.enqueue"
    urls: list[str]
    priority: float = 0.0
    depth: int = Field(0, ge=0)


class EnqueueResult(Message):
    type_name: ClassVar[str] = "crawl.enqueued"
    added: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)   # url -> why (seen, out of scope, not http)


class Prioritize(Message):
    """New priorities for queued URLs (higher is fetched sooner)."""

    type_name: ClassVar[str] = "crawl.prioritize"
    priorities: dict[str, float]


class PrioritizeResult(Message):
    type_name: ClassVar[str] = "crawl.prioritized"
    updated: int = 0
    not_queued: list[str] = Field(default_factory=list)   # unknown, or no longer waiting


class ExtractPage(Message):
    """One fetched page, handed from the coordinator to the extractor (body zstd-compressed)."""

    type_name: ClassVar[str] = "extract.page"
    url: str
    final_url: str
    fetch_id: str
    status: int
    content_type: str
    content_hash: str
    fetched_at: float
    depth: int = 0
    truncated: bool = False
    body_zstd: bytes


class PageStored(Message):
    """The document is in the store: the coordinator may mark the page done."""

    type_name: ClassVar[str] = "extract.stored"
    url: str
    state: str                  # extracted | failed
    outcome: str                # inserted | updated | unchanged
    document_id: int | None = None
    error: str | None = None
    outlinks: list[Link] = Field(default_factory=list)


class PageFetched(Message):
    """Event (topic crawl.fetched): one fetch finished, whatever its outcome."""

    type_name: ClassVar[str] = "crawl.fetched"
    url: str
    status: int | None = None
    outcome: str                # fetched | redirect | skipped | retry | failed | disallowed
    detail: str = ""
    elapsed_ms: float = 0.0
    size: int = 0


class DocStored(Message):
    """Event (topic doc.stored): a document was written to the document store."""

    type_name: ClassVar[str] = "doc.stored"
    url: str
    document_id: int | None = None
    state: str
    outcome: str


class TopicsRequest(Message):
    """The topic model's topics (meshctl topics)."""

    type_name: ClassVar[str] = "topics.list"
    limit: int = Field(50, ge=1, le=10_000)


class TopicSummary(BaseModel):
    id: int
    label: str
    keywords: list[str]
    size: int
    mean_novelty: float


class TopicsReply(Message):
    type_name: ClassVar[str] = "topics.listing"
    topics: list[TopicSummary] = Field(default_factory=list)
    total_topics: int = 0
    documents: int = 0          # documents scored (this state, restarts included)
    duplicates: int = 0         # near-duplicates found
    exact_duplicates: int = 0   # same content hash as an earlier document
    index: str = ""             # faiss index kind and size
    device: str = ""


class DocScored(Message):
    """Event (topic doc.scored): the topic model scored a document."""

    type_name: ClassVar[str] = "doc.scored"
    url: str
    document_id: int
    topic: int | None = None
    label: str = ""
    novelty: float = 0.0
    novelty_kl: float = 0.0
    duplicate_of: str | None = None
    similarity: float | None = None   # to the document it duplicates
    new_topic: bool = False
