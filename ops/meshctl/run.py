"""Running the mesh: `up`, `status`, `plan`, `check`."""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from typing import Optional

import typer
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from mesh.config import ConfigError, MeshConfig
from mesh.control import client, fetch_status, request_status
from mesh.runtime import check_kinds
from mesh.supervisor import Supervisor
from network.rpc import MeshError, RequestTimeout, RpcClient
from network.security import MissingKey
from ops.meshctl.common import ConfigOpt, HostOpt, JsonOpt, config_error, console, err, load

STATE_STYLE = {"ready": "green", "degraded": "yellow", "waiting": "cyan", "starting": "cyan", "dead": "bold red",
               "stopped": "dim", "declared": "dim", "draining": "yellow", "unreachable": "bold red",
               "reachable": "green", "local": "green", "unknown": "dim"}


class StatusTick:
    """`up`'s status line, called from the supervisor's loop: asks the twin at most once a second and logs a
    line when the summary for this host's agents changes. Never raises, so `up` keeps running whatever the twin
    answers: a twin that does not answer is reported once (if it runs here, after 10 s), an error or garbled
    reply once per error code, on one line; a missing key once, and then the tick stops asking."""

    def __init__(self, cfg: MeshConfig, children: Container[str], *, started: float | None = None):
        self.cfg = cfg
        self.children = children   # the agents this host runs (names)
        self.started = time.monotonic() if started is None else started
        self.reported: str | None = None
        self.next = 0.0
        self.twin: RpcClient | None = None
        self.log = logging.getLogger("meshctl.up")

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + 1.0
        cfg = self.cfg
        try:
            if self.twin is None:
                self.twin = client(cfg, cfg.twin, timeout=0.5, sender="meshctl-up")
            status = request_status(self.twin)
        except MissingKey as exc:
            self.log.error("%s", exc)
            self.next = float("inf")
            return
        except RequestTimeout:
            if cfg.twin in self.children and now - self.started > 10 and self.reported != "unreachable":
                self.log.warning("the twin is not answering at %s", cfg.endpoint(cfg.twin))
                self.reported = "unreachable"
            return
        except MeshError as exc:   # an error reply, or a garbled one (`undecodable`, `too_large`, ...)
            if self.reported != f"error {exc.code}":
                self.log.warning("the twin at %s sent a bad reply to its status request: %s: %s",
                                 cfg.endpoint(cfg.twin), exc.code, exc.message)
                self.reported = f"error {exc.code}"
            return
        mine = [a for a in status.agents if a.agent in self.children]
        summary = status.mesh_state if all(a.state in ("ready", "degraded") for a in mine) else "starting"
        if summary != self.reported:
            ready = sum(a.state == "ready" for a in status.agents)
            self.log.info("mesh %s: %s, %d/%d agents ready (%.1fs); `meshctl status` for the table",
                          cfg.mesh.name, summary, ready, len(status.agents), now - self.started)
            self.reported = summary

    def close(self) -> None:
        if self.twin is not None:
            self.twin.close()
            self.twin = None


def up(config: str = ConfigOpt, host: Optional[str] = HostOpt,
       only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these agents (repeatable)."),
       log_level: str = typer.Option("INFO", "--log-level", help="Agents' log level."),
       restart_backoff: float = typer.Option(0.5, "--restart-backoff", help="First restart delay in seconds; doubles "
                                             "on each crash up to 30 s, and resets after 30 s up."),
       seeds: Optional[list[str]] = typer.Option(None, "--seeds", help="Crawl these URLs instead of the config's "
                                                 "seeds (repeatable).")) -> None:
    """Start every agent of this host, restart crashed ones, stop all on Ctrl-C."""
    logging.basicConfig(level="INFO", format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    cfg = load(config, host)
    if seeds:
        crawlers = cfg.agents_of_kind("crawl_coordinator")
        if not crawlers:
            err.print(f"[bold red]error:[/] --seeds: {config} has no agent of kind crawl_coordinator")
            raise typer.Exit(2)
        for name in crawlers:
            cfg.agents[name].settings["seeds"] = list(seeds)
    try:
        sup = Supervisor(cfg, host=host, only=only, log_level=log_level, backoff_initial_s=restart_backoff)
        cfg.check_curve(sup.host)   # said before the banner; the supervisor asks again before it binds anything
    except (ValueError, ConfigError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    tick = StatusTick(cfg, sup.children)
    err.print(f"mesh [bold]{cfg.mesh.name}[/]: host [bold]{sup.host}[/], {len(sup.children)} agent(s), "
              f"logs in {sup.log_dir}/ (`meshctl logs -f`); Ctrl-C stops")
    try:
        sup.run(on_tick=tick)
    except ConfigError as exc:
        raise config_error(exc) from None
    finally:
        tick.close()


def status(config: str = ConfigOpt, as_json: bool = JsonOpt,
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every second.")) -> None:
    """The twin's table: agent, host, state, heartbeat age, restarts, what each waits on."""
    cfg = load(config)
    while True:
        try:
            reply = fetch_status(cfg, timeout=cfg.mesh.request_timeout_s)
        except MissingKey as exc:
            err.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except RequestTimeout as exc:
            err.print(f"[bold red]the twin does not answer[/] at {cfg.endpoint(cfg.twin)}: {exc.message}\n"
                      f"  is the mesh running? start it with `meshctl up --config {config}`")
            raise typer.Exit(1) from None
        except MeshError as exc:
            err.print(f"[bold red]bad answer from the twin[/] at {cfg.endpoint(cfg.twin)}: {exc.code}: {exc.message}")
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
            pool = cfg.pool_of(a.agent) if a.agent in cfg.agents else None   # the twin may run another file
            name = a.agent + (f" (pool {pool})" if pool else "") + ("" if a.required else " (optional)")
            table.add_row(name, f"{a.host}/{a.group}", f"[{style}]{a.state}[/]", age, up_, str(a.restarts),
                          f"{a.stats.messages_in}/{a.stats.messages_out}", str(a.stats.errors), note)
        hosts = "   ".join(f"{h.host} ({h.address}) [{STATE_STYLE.get(h.state, '')}]{h.state}[/] {h.ready}/{h.agents} ready"
                           for h in reply.hosts)
        if watch:
            console.clear()
        console.print(table)
        console.print(f"hosts: {hosts}")
        if not watch:
            return
        time.sleep(1)


def _dependency(cfg: MeshConfig, name: str) -> str:
    """A name in depends_on as plan shows it: a pool with how many of its replicas must be ready."""
    pool = cfg.pools.get(name)
    return f"{name} ({pool.min_ready} of {len(pool.replicas)} ready)" if pool is not None else name


def plan(config: str = ConfigOpt, host: Optional[str] = HostOpt) -> None:
    """Print the start-up order: levels of agents, each depending only on earlier levels, with every port each
    agent binds (rpc, pub, metrics, and those its kind declares, such as the twin's dashboard); then the pools,
    with their replicas per host and min_ready."""
    cfg = load(config, host)
    for i, level in enumerate(cfg.start_order(), 1):
        parts = []
        for a in level:
            spec = cfg.agents[a]
            deps = f" <- {', '.join(_dependency(cfg, d) for d in spec.depends_on)}" if spec.depends_on else ""
            opt = " (optional)" if not spec.required else ""
            pool = f" (pool {cfg.pool_of(a)})" if cfg.pool_of(a) else ""
            ports = ", ".join(f"{which} :{port}" for which, port in cfg.ports(a).items())
            parts.append(f"{a} [{spec.kind} @ {cfg.host_of(a)}/{cfg.group_of(a)}, {ports}]{pool}{opt}{deps}")
        console.print(f"[bold]{i}.[/] " + escape("\n   ".join(parts)))
    for name, pool in cfg.pools.items():
        per_host = ", ".join(f"{h}: {n}" for h, n in pool.placement.items())
        console.print(escape(f"pool {name} [{pool.kind}]: {per_host}; min_ready {pool.min_ready} -> "
                             f"{', '.join(f'{r} @ {cfg.host_of(r)}' for r in pool.replicas)}"))


def check(config: str = ConfigOpt, host: Optional[str] = HostOpt) -> None:
    """Validate a config file and say what is wrong with it; for the host it runs as (`host:`, --host, or its
    only host), also whether its agents may start as `up` would start them (CURVE keys)."""
    cfg = load(config, host)
    me = cfg.this_host if cfg.host or len(cfg.hosts) == 1 else None
    problems = []
    try:
        check_kinds(cfg)
    except ConfigError as exc:
        problems += exc.problems
    if me is not None:
        try:
            cfg.check_curve(me)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise config_error(ConfigError(cfg.source, problems))
    warning = cfg.plaintext_warning(me) if me is not None else None
    if warning:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}")
    pools = f", {len(cfg.pools)} pool(s)" if cfg.pools else ""
    console.print(f"{config}: ok ({len(cfg.hosts)} host(s), {len(cfg.groups)} group(s), {len(cfg.agents)} agent(s)"
                  f"{pools})")


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(status)
    app.command()(plan)
    app.command()(check)
