"""Monitoring: `prometheus-config` (the scrape config ops/monitoring.py makes from a mesh config)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mesh.config import ConfigError, load_config
from ops.meshctl.common import ConfigOpt, config_error, err
from ops.monitoring import render


def prometheus_config(config: str = ConfigOpt,
                      out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here (default: stdout)."),
                      no_env: bool = typer.Option(False, "--no-env", help="Ignore the environment: every ${VAR:-x} "
                                                  "takes its default (how the shipped file is made)."),
                      interval: str = typer.Option("15s", "--scrape-interval",
                                                   help="Prometheus scrape interval.")) -> None:
    """Prometheus scrape config: one target per agent (host address, metrics port), labelled agent/host/group/kind."""
    try:
        cfg = load_config(config, environ={} if no_env else None)
    except ConfigError as exc:
        raise config_error(exc) from None
    text = render(cfg, no_env=no_env, scrape_interval=interval)
    if out is None:
        print(text, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    err.print(f"{len(cfg.agents)} target(s) -> {out}")


def register(app: typer.Typer) -> None:
    app.command("prometheus-config")(prometheus_config)
