"""The topic model agent: `topics` (size, keywords and mean novelty of each topic)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from agents.contracts import TopicsReply, TopicsRequest
from ops.meshctl.common import AgentOpt, ConfigOpt, JsonOpt, ask_kind, console


def topics(config: str = ConfigOpt, agent: Optional[str] = AgentOpt("topic model agent"),
           limit: int = typer.Option(30, "--limit", "-n", help="Largest topics shown."),
           as_json: bool = JsonOpt) -> None:
    """Topics of the topic model: size, keywords, mean novelty; and the host's hardware profile."""
    asked = ask_kind(config, "topic_model", agent, TopicsRequest(limit=limit), as_json=as_json)
    if asked is None:
        return
    name, reply = asked
    table = Table(title=f"{name}: {reply.total_topics} topic(s), {reply.documents} document(s) scored, "
                        f"{reply.duplicates} near- and {reply.exact_duplicates} exact duplicate(s){behind(reply)}; "
                        f"index {reply.index}; {reply.device}" + (f"; {reply.profile}" if reply.profile else ""),
                  title_justify="left")
    for col in ("topic", "size", "mean novelty", "keywords"):
        table.add_column(col, justify="right" if col in ("topic", "size", "mean novelty") else "left")
    for t in reply.topics:
        words = escape(", ".join(t.keywords))
        table.add_row(str(t.id), str(t.size), f"{t.mean_novelty:.3f}",
                      f"[bold]{escape(t.title)}[/]: {words}" if t.title else words)
    console.print(table)


def behind(reply: TopicsReply) -> str:
    """How far behind the document store the model is, for the title line: ", backlog 120 (oldest 95s), 30/min"
    (nothing from a topic model older than these fields)."""
    if reply.backlog is None:
        return ""
    out = f", backlog {reply.backlog}"
    if reply.oldest_unscored_s is not None:
        out += f" (oldest {reply.oldest_unscored_s:.0f}s)"
    if reply.scored_per_min is not None:
        out += f", {reply.scored_per_min:g} scored/min"
    return out


def register(app: typer.Typer) -> None:
    app.command("topics")(topics)
