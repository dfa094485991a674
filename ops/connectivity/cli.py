"""The command line of the connectivity check (test_pc2_connectivity.py, python -m ops.connectivity)."""

from __future__ import annotations

import faulthandler
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from mesh.config import ConfigError, load_config
from ops.connectivity.report import all_passed, print_json, print_json_config_error, print_table
from ops.connectivity.runner import run_checks
from ops.connectivity.session import Options, Session

# where config/<host>.yaml is looked for when the current directory has none: the repository
ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")

app = typer.Typer(add_completion=False)  # no no_args_is_help: no arguments runs the check from mainpc


def _must(ok: Callable[[T], bool], message: str) -> Callable[[T], T]:
    """An option callback refusing values for which `ok` is false (usage error, exit status 2)."""
    def check(value: T) -> T:
        if not ok(value):
            raise typer.BadParameter(message)
        return value
    return check


@app.command(help="Checks every link between this host and the other host(s) of the mesh.")
def connectivity(
    ctx: typer.Context,
    from_: Optional[str] = typer.Option(None, "--from", metavar="{mainpc,pc2}",
                                        help="the host this runs on (default mainpc, or the --config file's host:)"),
    config: Optional[str] = typer.Option(None, "--config", help="mesh config (default config/<from>.yaml)"),
    probes: int = typer.Option(50, "--probes", show_default=False,
                               callback=_must(lambda v: v >= 1, "must be at least 1"),
                               help="mesh.ping round trips per link (default 50)"),
    json_out: bool = typer.Option(False, "--json", help="print a machine-readable report instead of the table"),
    timeout: float = typer.Option(2.0, "--timeout", show_default=False,
                                  callback=_must(lambda v: 0 < v <= 60, "must be in (0, 60]"),
                                  help="per-check timeout in seconds (default 2.0)"),
    max_skew: float = typer.Option(0.5, "--max-skew", show_default=False,
                                   callback=_must(lambda v: v >= 0, "must be >= 0"),
                                   help="largest clock skew allowed, seconds (default 0.5)"),
    require_curve: bool = typer.Option(False, "--require-curve",
                                       help="a plaintext link fails even when the config says security.curve: off "
                                            "(without this, explicit off is a warning)"),
    deadline: float = typer.Option(120.0, "--deadline", show_default=False,
                                   help="hard limit for the whole run in seconds: past it, every thread's stack is "
                                        "printed and the run exits 1 (default 120)"),
) -> None:
    # main(root=...): test_pc2_connectivity.py passes its own folder (in the image /app, beside config/)
    root: Path = ctx.obj or ROOT
    if config:
        path, shown = Path(config), config
    else:
        shown = f"config/{from_ or 'mainpc'}.yaml"
        path = Path(shown) if Path(shown).exists() else root / shown
    try:
        cfg = load_config(path, host=from_)
        me = cfg.this_host
    except ConfigError as exc:
        print(f"config error\n{exc}", file=sys.stderr)
        if json_out:
            print_json_config_error(from_, shown, str(exc))
        raise typer.Exit(2) from None
    # Every check has its own timeout; this is the backstop that keeps a run from ever hanging,
    # and says where it was stuck if it does.
    faulthandler.dump_traceback_later(deadline, exit=True)
    started = time.perf_counter()
    session = Session(cfg, Options(timeout=timeout, probes=probes, max_skew=max_skew, require_curve=require_curve,
                                   config=config), shown)
    try:
        checks = run_checks(session)
    finally:
        session.close()
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - started
    (print_json if json_out else print_table)(me, checks, elapsed, shown)
    raise typer.Exit(0 if all_passed(checks) else 1)


def main(argv: list[str] | None = None, *, root: Path = ROOT) -> int:
    """Runs the check with these arguments (default sys.argv[1:]); returns the exit status: 0 every check
    passed (warnings allowed), 1 a check failed, 2 bad config or bad arguments. `root` is where
    config/<host>.yaml is looked for when it is not in the current directory."""
    try:
        app(args=argv, obj=root)
    except SystemExit as exc:  # typer (click) always ends by raising it, with the status
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0
