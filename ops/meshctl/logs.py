"""Agents' logs: `logs` (from this host's files, or over the mesh from the other host's agents)."""

from __future__ import annotations

import signal
from typing import Optional

import typer

from mesh.logs import LEVELS, FileLog, MeshLog, follow, log_path
from ops.meshctl.common import ConfigOpt, HostOpt, err, load


def logs(agents: Optional[list[str]] = typer.Argument(None, help="Agents to show (default: every agent in the config)."),
         config: str = ConfigOpt, follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
         level: str = typer.Option("DEBUG", "--level", "-l", help="Lowest level shown."),
         lines: int = typer.Option(20, "--lines", "-n", help="Lines of history per agent."),
         host: Optional[str] = HostOpt,
         via: str = typer.Option("auto", "--via", help="auto: files for this host's agents, the mesh (log.read) "
                                 "for the other host's; file; mesh.")) -> None:
    """Show agents' logs on both hosts, each line prefixed with its agent (agent@host across hosts)."""
    cfg = load(config, host)
    if level.upper() not in LEVELS:
        err.print(f"[bold red]error:[/] --level must be one of {', '.join(LEVELS)}")
        raise typer.Exit(2)
    if via not in ("auto", "file", "mesh"):
        err.print("[bold red]error:[/] --via must be auto, file or mesh")
        raise typer.Exit(2)
    names = [r for a in agents for r in cfg.replicas_of(a)] if agents else list(cfg.agents)   # a pool: its replicas
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


def register(app: typer.Typer) -> None:
    app.command()(logs)
