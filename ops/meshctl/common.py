"""What every command module of meshctl shares: consoles, options, config loading, asking an agent."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape

from mesh.config import ConfigError, MeshConfig, load_config
from mesh.control import client
from network.rpc import MeshError

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG", "config/local.yaml")

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Mesh config file (env MESH_CONFIG).")
HostOpt = typer.Option(None, "--host", help="Host to act as (default: the file's `host:`, or its only host).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def AgentOpt(what: str):   # named like the options it stands beside
    """--agent for a command that talks to one agent of a kind: `what` it is, as the help text says."""
    return typer.Option(None, "--agent", help=f"The {what} (default: the config's only one).")


def config_error(exc: ConfigError) -> typer.Exit:
    """Prints `exc` the way every command reports a bad config; raise what it returns (exit code 2)."""
    err.print(f"[bold red]config error[/]\n{escape(str(exc))}")
    return typer.Exit(2)


def load(path: str, host: str | None = None) -> MeshConfig:
    """The config at `path`, acting as `host`; exits 2 saying what is wrong with it."""
    try:
        return load_config(path, host=host)
    except ConfigError as exc:
        raise config_error(exc) from None


def pick_agent(cfg: MeshConfig, kind: str, name: str | None) -> str:
    """`name`, or the config's only agent of `kind`; exits 2 with the choices otherwise."""
    names = cfg.agents_of_kind(kind)
    if name is None and len(names) == 1:
        return names[0]
    if name in names:
        return name
    err.print(f"[bold red]error:[/] name the {kind} agent with --agent: one of {names}" if names else
              f"[bold red]error:[/] this config has no agent of kind {kind}")
    raise typer.Exit(2)


def ask(cfg: MeshConfig, name: str, message):
    """One request to agent `name`; exits 1 saying why when it does not answer or refuses."""
    try:
        with client(cfg, name, timeout=cfg.mesh.request_timeout_s) as c:
            return c.request(message)
    except MeshError as exc:
        err.print(f"[bold red]{name} at {cfg.endpoint(name)}:[/] {exc.message}")
        raise typer.Exit(1) from None


def ask_kind(config: str, kind: str, agent: str | None, message, *, as_json: bool = False):
    """The usual command: load the config, pick the agent of `kind` (`--agent`), ask it `message`. With
    `as_json` the reply is printed as JSON and None returned; else (agent name, reply) for the command to show."""
    cfg = load(config)
    name = pick_agent(cfg, kind, agent)
    reply = ask(cfg, name, message)
    if as_json:
        print(reply.model_dump_json(indent=2))
        return None
    return name, reply
