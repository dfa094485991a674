"""The crawl report (`meshctl crawl-report`): what the crawl found, and how fast, from the document store.

Fetched pages are the documents stored (extracted or failed); a page is *novel* when the topic model scored it, it
duplicates no earlier document, and its novelty is at least `novel_bar` (the topic model's Jensen-Shannon novelty,
0..1: a page opening a topic scores 1.0, an ordinary page of a known topic 0.1-0.2 on the python3-doc pages);
the duplicate rate is near and exact duplicates over scored pages; topics discovered are the distinct topics of
scored pages. The timeline cuts the crawl into equal spans of fetch time and gives the running totals at the end of
each, so it shows whether discovery keeps pace or flattens out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Span:
    until_s: float          # seconds since the first fetch
    fetched: int            # running totals up to `until_s`
    scored: int
    novel: int
    duplicates: int
    topics: int


@dataclass
class CrawlReport:
    fetched: int = 0
    extracted: int = 0
    failed: int = 0
    scored: int = 0
    novel: int = 0
    duplicates: int = 0
    topics: int = 0
    duration_s: float = 0.0
    novel_bar: float = 0.3
    timeline: list[Span] = field(default_factory=list)

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.scored if self.scored else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "duplicate_rate": round(self.duplicate_rate, 4)}


def crawl_report(rows: list[tuple[float, str, bool, int | None, float | None, bool]], *, spans: int = 10,
                 novel_bar: float = 0.3) -> CrawlReport:
    """`rows` as `DocStore.timeline()` gives them: (fetched_at, state, scored, topic, novelty, duplicate), by time."""
    if spans < 1:
        raise ValueError(f"spans must be at least 1, got {spans}")
    report = CrawlReport(novel_bar=novel_bar)
    if not rows:
        return report
    start, end = rows[0][0], rows[-1][0]
    report.duration_s = end - start
    width = (end - start) / spans
    bounds = [start + width * (i + 1) for i in range(spans)] if width > 0 else [end]
    topics: set[int] = set()
    b = 0
    for at, state, scored, topic, novelty, duplicate in rows:
        while b < len(bounds) - 1 and at > bounds[b]:
            report.timeline.append(_span(report, bounds[b] - start, topics))
            b += 1
        report.fetched += 1
        report.extracted += state == "extracted"
        report.failed += state == "failed"
        if scored:
            report.scored += 1
            if duplicate:
                report.duplicates += 1
            elif (novelty or 0.0) >= novel_bar:
                report.novel += 1
            if topic is not None and not duplicate:
                topics.add(topic)
    while b < len(bounds):
        report.timeline.append(_span(report, bounds[b] - start, topics))
        b += 1
    report.topics = len(topics)
    return report


def _span(r: CrawlReport, until: float, topics: set[int]) -> Span:
    return Span(until_s=round(until, 1), fetched=r.fetched, scored=r.scored, novel=r.novel, duplicates=r.duplicates,
                topics=len(topics))
