"""meshctl: run, inspect and secure the mesh."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agents.config import ConfigError, MeshConfig, load_config

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG", "config/local.yaml")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="CURVE key pairs, one per host.")
app.add_typer(keys_app, name="keys")
crawl_app = typer.Typer(no_args_is_help=True, help="The running crawl: status, add URLs.")
app.add_typer(crawl_app, name="crawl")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Mesh config file (env MESH_CONFIG).")
HostOpt = typer.Option(None, "--host", help="Host to act as (default: the file's `host:`, or its only host).")

STATE_STYLE = {"ready": "green", "degraded": "yellow", "waiting": "cyan", "starting": "cyan", "dead": "bold red",
               "stopped": "dim", "declared": "dim", "draining": "yellow", "unreachable": "bold red",
               "reachable": "green", "local": "green", "unknown": "dim"}


def _load(path: str, host: str | None = None) -> MeshConfig:
    try:
        return load_config(path, host=host)
    except ConfigError as exc:
        err.print(f"[bold red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command()
def up(config: str = ConfigOpt, host: Optional[str] = HostOpt,
       only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these agents (repeatable)."),
       log_level: str = typer.Option("INFO", "--log-level", help="Agents' log level."),
       restart_backoff: float = typer.Option(0.5, "--restart-backoff", help="First restart delay in seconds; doubles "
                                             "on each crash up to 30 s, and resets after 30 s up."),
       seeds: Optional[list[str]] = typer.Option(None, "--seeds", help="Crawl these URLs instead of the config's "
                                                 "seeds (repeatable).")) -> None:
    """Start every agent of this host, restart crashed ones, stop all on Ctrl-C."""
    from rich.logging import RichHandler

    from agents.control import client
    from agents.supervisor import Supervisor
    from network.messages import StatusRequest
    from network.rpc import MeshError
    from network.security import MissingKey

    logging.basicConfig(level="INFO", format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    cfg = _load(config, host)
    if seeds:
        crawlers = [name for name, spec in cfg.agents.items() if spec.kind == "crawl_coordinator"]
        if not crawlers:
            err.print(f"[bold red]error:[/] --seeds: {config} has no agent of kind crawl_coordinator")
            raise typer.Exit(2)
        for name in crawlers:
            cfg.agents[name].settings["seeds"] = list(seeds)
    try:
        sup = Supervisor(cfg, host=host, only=only, log_level=log_level, backoff_initial_s=restart_backoff)
    except (ValueError, ConfigError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    started = time.monotonic()
    state = {"reported": None, "next": 0.0, "twin": None}
    twin_here = cfg.twin in sup.children

    def tick() -> None:
        now = time.monotonic()
        if now < state["next"]:
            return
        state["next"] = now + 1.0
        try:
            if state["twin"] is None:
                state["twin"] = client(cfg, cfg.twin, timeout=0.5, sender="meshctl-up")
            status = state["twin"].request(StatusRequest())
        except MissingKey as exc:
            logging.getLogger("meshctl.up").error("%s", exc)
            state["next"] = float("inf")
            return
        except MeshError:
            if twin_here and now - started > 10 and state["reported"] != "unreachable":
                logging.getLogger("meshctl.up").warning("the twin is not answering at %s", cfg.endpoint(cfg.twin))
                state["reported"] = "unreachable"
            return
        mine = [a for a in status.agents if a.agent in sup.children]
        summary = status.mesh_state if all(a.state in ("ready", "degraded") for a in mine) else "starting"
        if summary != state["reported"]:
            ready = sum(a.state == "ready" for a in status.agents)
            logging.getLogger("meshctl.up").info("mesh %s: %s, %d/%d agents ready (%.1fs); `meshctl status` for the table",
                                                 cfg.mesh.name, summary, ready, len(status.agents), now - started)
            state["reported"] = summary

    err.print(f"mesh [bold]{cfg.mesh.name}[/]: host [bold]{sup.host}[/], {len(sup.children)} agent(s), "
              f"logs in {sup.log_dir}/ (`meshctl logs -f`); Ctrl-C stops")
    try:
        sup.run(on_tick=tick)
    except ConfigError as exc:
        err.print(f"[bold red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None
    finally:
        if state["twin"] is not None:
            state["twin"].close()


@app.command()
def status(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every second.")) -> None:
    """The twin's table: agent, host, state, heartbeat age, restarts, what each waits on."""
    from agents.control import fetch_status
    from network.rpc import MeshError
    from network.security import MissingKey

    cfg = _load(config)
    while True:
        try:
            reply = fetch_status(cfg, timeout=cfg.mesh.request_timeout_s)
        except MissingKey as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except MeshError as exc:
            err.print(f"[bold red]the twin does not answer[/] at {cfg.endpoint(cfg.twin)}: {exc.message}\n"
                      f"  is the mesh running? start it with `meshctl up --config {config}`")
            raise typer.Exit(1) from None
        if as_json:
            print(reply.model_dump_json(indent=2))
            return
        table = Table(title=f"mesh {reply.mesh}: {reply.mesh_state}", title_justify="left")
        for col in ("agent", "host/group", "state", "beat", "up", "restarts", "msgs in/out", "errors",
                    "waiting on / detail"):
            table.add_column(col)
        for a in reply.agents:
            style = STATE_STYLE.get(a.state, "")
            age = "-" if a.last_heartbeat_age_s is None else f"{a.last_heartbeat_age_s:.1f}s"
            up_ = "-" if a.uptime_s is None else f"{a.uptime_s:.0f}s"
            note = ", ".join(a.waiting_on) if a.waiting_on else a.detail
            table.add_row(a.agent + ("" if a.required else " (optional)"), f"{a.host}/{a.group}", f"[{style}]{a.state}[/]",
                          age, up_, str(a.restarts), f"{a.stats.messages_in}/{a.stats.messages_out}",
                          str(a.stats.errors), note)
        hosts = "   ".join(f"{h.host} ({h.address}) [{STATE_STYLE.get(h.state, '')}]{h.state}[/] {h.ready}/{h.agents} ready"
                           for h in reply.hosts)
        if watch:
            console.clear()
        console.print(table)
        console.print(f"hosts: {hosts}")
        if not watch:
            return
        time.sleep(1)


@app.command()
def plan(config: str = ConfigOpt, host: Optional[str] = HostOpt) -> None:
    """Print the start-up order: levels of agents, each depending only on earlier levels."""
    cfg = _load(config, host)
    for i, level in enumerate(cfg.start_order(), 1):
        parts = []
        for a in level:
            spec = cfg.agents[a]
            deps = f" <- {', '.join(spec.depends_on)}" if spec.depends_on else ""
            opt = " (optional)" if not spec.required else ""
            parts.append(f"{a} [{spec.kind} @ {cfg.host_of(a)}/{cfg.group_of(a)}, rpc :{cfg.port(a, 'rpc')}]{opt}{deps}")
        console.print(f"[bold]{i}.[/] " + escape("\n   ".join(parts)))


@app.command()
def check(config: str = ConfigOpt) -> None:
    """Validate a config file and say what is wrong with it."""
    from agents.kinds import check_kinds

    cfg = _load(config)
    try:
        check_kinds(cfg)
    except ConfigError as exc:
        err.print(f"[bold red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None
    console.print(f"{config}: ok ({len(cfg.hosts)} host(s), {len(cfg.groups)} group(s), {len(cfg.agents)} agent(s))")


@app.command("prometheus-config")
def prometheus_config(config: str = ConfigOpt,
                      out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (default: stdout)."),
                      no_env: bool = typer.Option(False, "--no-env", help="Ignore the environment: every ${VAR:-x} "
                                                  "takes its default (how the shipped file is made)."),
                      interval: str = typer.Option("15s", "--scrape-interval",
                                                   help="Prometheus scrape interval.")) -> None:
    """Prometheus scrape config: one target per agent (host address, metrics port), labelled agent/host/group/kind."""
    from agents.monitoring import render

    try:
        cfg = load_config(config, environ={} if no_env else None)
    except ConfigError as exc:
        err.print(f"[bold red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None
    text = render(cfg, no_env=no_env, scrape_interval=interval)
    if out is None:
        print(text, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    err.print(f"{len(cfg.agents)} target(s) -> {out}")


@app.command()
def logs(agents: Optional[list[str]] = typer.Argument(None, help="Agents to show (default: every agent in the config)."),
         config: str = ConfigOpt, follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
         level: str = typer.Option("DEBUG", "--level", "-l", help="Lowest level shown."),
         lines: int = typer.Option(20, "--lines", "-n", help="Lines of history per agent."),
         host: Optional[str] = HostOpt,
         via: str = typer.Option("auto", "--via", help="auto: files for this host's agents, the mesh (log.read) "
                                 "for the other host's; file; mesh.")) -> None:
    """Show agents' logs on both hosts, each line prefixed with its agent (agent@host across hosts)."""
    from agents.logs import LEVELS, FileLog, MeshLog, follow, log_path

    cfg = _load(config, host)
    if level.upper() not in LEVELS:
        err.print(f"[bold red]error:[/] --level must be one of {', '.join(LEVELS)}")
        raise typer.Exit(2)
    if via not in ("auto", "file", "mesh"):
        err.print("[bold red]error:[/] --via must be auto, file or mesh")
        raise typer.Exit(2)
    names = agents or list(cfg.agents)
    unknown = [a for a in names if a not in cfg.agents]
    if unknown:
        err.print(f"[bold red]error:[/] unknown agent(s) {', '.join(unknown)}; declared: {', '.join(cfg.agents)}")
        raise typer.Exit(2)
    log_dir = cfg.mesh.data_dir / "logs"
    here = cfg.host or (next(iter(cfg.hosts)) if len(cfg.hosts) == 1 else None)
    sources = {}
    for a in names:
        label = a if len(cfg.hosts) == 1 else f"{a}@{cfg.host_of(a)}"
        path = log_path(log_dir, a)
        local = cfg.host_of(a) == here or (here is None and path.exists())
        if via == "file" or (via == "auto" and local):
            sources[label] = FileLog(path)
        else:
            sources[label] = MeshLog(cfg, a)
    missing = [label for label, src in sources.items() if isinstance(src, FileLog) and not src.path.exists()]
    if missing and not follow_:
        err.print(f"no log yet for {', '.join(missing)} in {log_dir}/")
    if follow_:   # Ctrl-C or SIGTERM ends it, even started as a background job (which inherits SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    follow(sources, follow=follow_, level=level, lines=lines)


KeysDirOpt = typer.Option(None, "--keys-dir", help="Default: security.keys_dir of the config (MESH_CONFIG), else keys/.")


@app.command("export")
def export(config: str = ConfigOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="Folder for the Parquet file (default: DATA_DIR/processed)."),
           all_states: bool = typer.Option(False, "--all", help="Also the pages that could not be extracted.")) -> None:
    """Write the processed documents to Parquet (data/processed/documents-<time>.parquet)."""
    from pipeline.docstore import StoreUnavailable, open_docstore
    from pipeline.export import export_parquet

    cfg = _load(config)
    url = cfg.store_url("documents")
    try:
        store = open_docstore(url)
    except StoreUnavailable as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    try:
        started = time.monotonic()
        path, rows = export_parquet(store, out or cfg.mesh.data_dir / "processed", state=None if all_states else "extracted")
    finally:
        store.close()
    console.print(f"{rows} document(s) -> {path} ({path.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.1f}s)")


def _agent_of_kind(cfg: MeshConfig, kind: str, name: str | None) -> str:
    """`name`, or the config's only agent of `kind`; exits 2 with the choices otherwise."""
    from agents.kinds import UnknownKind, target_of

    def same(spec_kind: str) -> bool:   # the built-in name, or the dotted path it stands for
        try:
            return spec_kind == kind or target_of(spec_kind) == target_of(kind)
        except UnknownKind:
            return False

    names = [a for a, spec in cfg.agents.items() if same(spec.kind)]
    if name is None and len(names) == 1:
        return names[0]
    if name in names:
        return name
    err.print(f"[bold red]error:[/] name the {kind} agent with --agent: one of {names}" if names else
              f"[bold red]error:[/] this config has no agent of kind {kind}")
    raise typer.Exit(2)


def _ask(cfg: MeshConfig, name: str, message):
    """One request to agent `name`; exits 1 saying why when it does not answer or refuses."""
    from agents.control import client
    from network.rpc import MeshError

    try:
        with client(cfg, name, timeout=cfg.mesh.request_timeout_s) as c:
            return c.request(message)
    except MeshError as exc:
        err.print(f"[bold red]{name} at {cfg.endpoint(name)}:[/] {exc.message}")
        raise typer.Exit(1) from None


AgentOpt = typer.Option(None, "--agent", help="The crawl coordinator (default: the config's only one).")


@crawl_app.command("status")
def crawl_status(config: str = ConfigOpt, agent: Optional[str] = AgentOpt,
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Frontier and hand-off counts of the running crawl."""
    from pipeline.messages import CrawlStatusRequest

    cfg = _load(config)
    name = _agent_of_kind(cfg, "crawl_coordinator", agent)
    st = _ask(cfg, name, CrawlStatusRequest())
    if as_json:
        print(st.model_dump_json(indent=2))
        return
    state = "[green]idle[/]" if st.idle else "[cyan]crawling[/]"
    console.print(f"crawl {name}: {state}; {st.pages} page(s) fetched, {st.documents} stored this run, "
                  f"budget left {st.budget_left}\n  frontier: {st.queued} queued, {st.leased} leased, "
                  f"{st.fetched} waiting for the extractor, {st.done} done, {st.failed} failed ({st.seen} seen, "
                  f"{st.hosts} host(s)); {st.in_flight} fetch(es) and {st.handoff_in_flight} hand-off(s) under way")


@crawl_app.command("add")
def crawl_add(urls: list[str] = typer.Argument(..., help="URLs to crawl."), config: str = ConfigOpt,
              agent: Optional[str] = AgentOpt,
              priority: float = typer.Option(0.0, "--priority", help="Higher is fetched sooner.")) -> None:
    """Add URLs to the running crawl's frontier."""
    from pipeline.messages import Enqueue

    cfg = _load(config)
    name = _agent_of_kind(cfg, "crawl_coordinator", agent)
    reply = _ask(cfg, name, Enqueue(urls=urls, priority=priority))
    for url in reply.added:
        console.print(f"[green]added[/] {url}")
    for url, why in reply.rejected.items():
        console.print(f"[yellow]not added[/] {url}: {why}")


@app.command("topics")
def topics(config: str = ConfigOpt, agent: Optional[str] = typer.Option(None, "--agent", help="The topic model agent "
                                                                       "(default: the config's only one)."),
           limit: int = typer.Option(30, "--limit", "-n", help="Largest topics shown."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Topics of the topic model: size, keywords, mean novelty."""
    from pipeline.messages import TopicsRequest

    cfg = _load(config)
    name = _agent_of_kind(cfg, "topic_model", agent)
    reply = _ask(cfg, name, TopicsRequest(limit=limit))
    if as_json:
        print(reply.model_dump_json(indent=2))
        return
    table = Table(title=f"{name}: {reply.total_topics} topic(s), {reply.documents} document(s) scored, "
                        f"{reply.duplicates} near- and {reply.exact_duplicates} exact duplicate(s); index {reply.index}; "
                        f"{reply.device}", title_justify="left")
    for col in ("topic", "size", "mean novelty", "keywords"):
        table.add_column(col, justify="right" if col in ("topic", "size", "mean novelty") else "left")
    for t in reply.topics:
        words = escape(", ".join(t.keywords))
        table.add_row(str(t.id), str(t.size), f"{t.mean_novelty:.3f}",
                      f"[bold]{escape(t.title)}[/]: {words}" if t.title else words)
    console.print(table)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.0f} MiB"


@app.command("vram")
def vram(config: str = ConfigOpt, agent: Optional[str] = typer.Option(None, "--agent", help="The VRAM optimizer "
                                                                     "(default: the config's only one)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """GPUs, budgets and model leases of the VRAM optimizer."""
    from pipeline.vram_agent import VramStatusRequest

    cfg = _load(config)
    name = _agent_of_kind(cfg, "vram_optimizer", agent)
    st = _ask(cfg, name, VramStatusRequest())
    if as_json:
        print(st.model_dump_json(indent=2))
        return
    console.print(f"{name}: {st.backend}; {escape(st.detail)}; headroom {_mib(st.headroom)}")
    if st.gpus:
        table = Table(title="GPUs", title_justify="left")
        for col in ("gpu", "name", "used", "free", "budget", "leased", "other", "available", "temp", "util"):
            table.add_column(col, justify="left" if col == "name" else "right")
        for g in st.gpus:
            table.add_row(str(g.index), g.name, _mib(g.used), _mib(g.free), _mib(g.budget), _mib(g.leased),
                          _mib(g.external), _mib(g.available),
                          "-" if g.temperature_c is None else f"{g.temperature_c:.0f} C",
                          "-" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%")
        console.print(table)
    rows = [*st.leases, *st.queue]
    if rows:
        table = Table(title="leases", title_justify="left")
        for col in ("agent", "model", "state", "bytes", "priority", "device", "idle s", "note"):
            table.add_column(col, justify="right" if col in ("bytes", "priority", "idle s") else "left")
        for lease in rows:
            note = f"#{lease.position} in queue" if lease.position else lease.reason
            table.add_row(lease.agent, lease.model, lease.state, _mib(lease.bytes), str(lease.priority),
                          lease.device or "-", f"{lease.idle_s:.0f}", escape(note))
        console.print(table)
    else:
        console.print("no leases")
    if st.estimates:
        console.print("measured / estimated: " + ", ".join(f"{m} {r:.2f}" for m, r in st.estimates.items()))


@app.command("models")
def models(config: str = ConfigOpt, agent: Optional[str] = typer.Option(None, "--agent", help="The model manager "
                                                                       "(default: the config's only one)."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """GGUF models of the model manager: state, placement, lease."""
    from pipeline.messages import ModelsRequest

    cfg = _load(config)
    name = _agent_of_kind(cfg, "model_manager", agent)
    reply = _ask(cfg, name, ModelsRequest())
    if as_json:
        print(reply.model_dump_json(indent=2))
        return
    table = Table(title=f"{name}: VRAM by {reply.gpu}", title_justify="left")
    for col in ("model", "state", "placement", "estimate", "requests", "idle s", "path / error"):
        table.add_column(col, justify="right" if col in ("estimate", "requests", "idle s") else "left")
    for m in reply.models:
        table.add_row(m.name, m.state, m.placement or "-", _mib(m.estimate_bytes), str(m.requests),
                      "-" if m.idle_s is None else f"{m.idle_s:.0f}", escape(m.error or m.path))
    console.print(table)


@app.command("crawl-report")
def crawl_report(config: str = ConfigOpt,
                 spans: int = typer.Option(10, "--spans", min=1, max=1000, help="Rows of the timeline."),
                 novel_bar: float = typer.Option(0.3, "--novel-bar", min=0.0, max=1.0,
                                                 help="Novelty from which a non-duplicate page counts as novel."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Fetched pages, novel pages, duplicate rate and topics discovered over time (from the document store)."""
    from pipeline.docstore import StoreUnavailable, open_docstore
    from pipeline.report import crawl_report as make_report

    cfg = _load(config)
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


def _keys_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    if Path(DEFAULT_CONFIG).exists():
        try:
            return load_config(DEFAULT_CONFIG).security.keys_dir
        except ConfigError:
            pass
    return Path("keys")


@keys_app.command("generate")
def keys_generate(hosts: list[str] = typer.Argument(..., help="Host names, as in the config's hosts:."),
                  keys_dir: Optional[Path] = KeysDirOpt,
                  force: bool = typer.Option(False, "--force", help="Replace existing key pairs.")) -> None:
    """Make a CURVE key pair per host (public in keys/public, secret in keys/private)."""
    from network.security import generate

    keys_dir = _keys_dir(keys_dir)
    for host in hosts:
        try:
            pub, sec = generate(keys_dir, host, force=force)
        except FileExistsError as exc:
            err.print(f"[yellow]{exc}[/]")
            continue
        console.print(f"{host}: public {pub}, secret {sec}")
    console.print("copy each host's public key to the other hosts' keys/public/; secret keys never leave their host")


@keys_app.command("list")
def keys_list(keys_dir: Optional[Path] = KeysDirOpt,
              as_json: bool = typer.Option(False, "--json")) -> None:
    """List the known hosts' public keys and which secret keys are present here."""
    from network.security import list_keys

    keys_dir = _keys_dir(keys_dir)
    rows = list_keys(keys_dir)
    if as_json:
        print(json.dumps([{"host": h, "public": k, "secret_here": s} for h, k, s in rows], indent=2))
        return
    if not rows:
        err.print(f"no keys in {keys_dir}/public; make them with `meshctl keys generate HOST...`")
        raise typer.Exit(1)
    table = Table("host", "public key (Z85)", "secret here")
    for h, k, s in rows:
        table.add_row(h, k, "yes" if s else "no")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
