"""CURVE keys: the `keys` group (`keys generate`, `keys list`), one key pair per host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mesh.config import ConfigError, load_config
from network.security import generate, list_keys
from ops.meshctl.common import DEFAULT_CONFIG, console, err

keys_app = typer.Typer(no_args_is_help=True, help="CURVE key pairs, one per host.")

KeysDirOpt = typer.Option(None, "--keys-dir", help="Default: security.keys_dir of the config (MESH_CONFIG), else keys/.")


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


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
