"""The crawl: the `crawl` group (`crawl status`, `crawl add`, asking the running crawl coordinator) and
`crawl-report` (what a crawl found over time, from the document store)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from agents.contracts import CrawlStatusRequest, Enqueue
from ops.meshctl.common import AgentOpt, ConfigOpt, JsonOpt, ask, ask_kind, console, err, load, pick_agent
from store.docstore import StoreUnavailable, open_docstore
from store.report import crawl_report as make_report

crawl_app = typer.Typer(no_args_is_help=True, help="The running crawl: status, add URLs.")

CoordinatorOpt = AgentOpt("crawl coordinator")


@crawl_app.command("status")
def crawl_status(config: str = ConfigOpt, agent: Optional[str] = CoordinatorOpt, as_json: bool = JsonOpt) -> None:
    """Frontier and hand-off counts of the running crawl."""
    asked = ask_kind(config, "crawl_coordinator", agent, CrawlStatusRequest(), as_json=as_json)
    if asked is None:
        return
    name, st = asked
    state = ("[green]idle[/]" if st.idle else
             "[yellow]waiting for the learner[/]" if st.waiting_for_learner else "[cyan]crawling[/]")
    console.print(f"crawl {name}: {state}; {st.pages} page(s) fetched, {st.documents} stored this run, "
                  f"budget left {st.budget_left}\n  frontier: {st.queued} queued, {st.leased} leased, "
                  f"{st.fetched} waiting for the extractor, {st.done} done, {st.failed} failed ({st.seen} seen, "
                  f"{st.hosts} host(s)); {st.in_flight} fetch(es) and {st.handoff_in_flight} hand-off(s) under way")
    if len(st.extractors) > 1 or any(not e.usable for e in st.extractors):
        console.print("  extractors: " + "; ".join(
            f"{e.agent} @ {e.host} {e.in_flight} in hand, {e.acknowledged} stored"
            + (f", [yellow]no pages: {e.why_not}[/]" if not e.usable else "")
            + (f", given up {e.lost}x (pages handed on in {e.handon_s:.2f} s)" if e.lost and e.handon_s is not None
               else f", given up {e.lost}x" if e.lost else "")
            for e in st.extractors))
    if st.learner:
        unscored = "not heard from yet" if st.learner_unscored is None else f"{st.learner_unscored} unscored"
        console.print(f"  paced by the learner {st.learner} ({unscored}); new fetches waited {st.learner_wait_s:.0f} s "
                      f"for it")


@crawl_app.command("add")
def crawl_add(urls: list[str] = typer.Argument(..., help="URLs to crawl."), config: str = ConfigOpt,
              agent: Optional[str] = CoordinatorOpt,
              priority: float = typer.Option(0.0, "--priority", help="Higher is fetched sooner.")) -> None:
    """Add URLs to the running crawl's frontier."""
    cfg = load(config)
    name = pick_agent(cfg, "crawl_coordinator", agent)
    reply = ask(cfg, name, Enqueue(urls=urls, priority=priority))
    for url in reply.added:
        console.print(f"[green]added[/] {url}")
    for url, why in reply.rejected.items():
        console.print(f"[yellow]not added[/] {url}: {why}")


def crawl_report(config: str = ConfigOpt,
                 spans: int = typer.Option(10, "--spans", min=1, max=1000, help="Rows of the timeline."),
                 novel_bar: float = typer.Option(0.3, "--novel-bar", min=0.0, max=1.0,
                                                 help="Novelty from which a non-duplicate page counts as novel."),
                 as_json: bool = JsonOpt) -> None:
    """Fetched pages, novel pages, duplicate rate and topics discovered over time (from the document store)."""
    cfg = load(config)
    try:
        store = open_docstore(cfg.store_url("documents"))
        try:
            rows = store.timeline()
        finally:
            store.close()
    except StoreUnavailable as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    report = make_report(rows, spans=spans, novel_bar=novel_bar)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    console.print(f"crawl report: {report.fetched} page(s) fetched in {report.duration_s:.0f} s ({report.extracted} "
                  f"extracted, {report.failed} failed); {report.scored} scored: {report.novel} novel (novelty >= "
                  f"{report.novel_bar:g}), {report.duplicates} duplicate(s) ({report.duplicate_rate:.1%}), "
                  f"{report.topics} topic(s)")
    if not report.fetched:
        return
    table = Table(title="over time (running totals)", title_justify="left")
    for col in ("after s", "fetched", "scored", "novel", "duplicates", "topics"):
        table.add_column(col, justify="right")
    for sp in report.timeline:
        table.add_row(f"{sp.until_s:.0f}", str(sp.fetched), str(sp.scored), str(sp.novel), str(sp.duplicates),
                      str(sp.topics))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("crawl-report")(crawl_report)
    app.add_typer(crawl_app, name="crawl")
