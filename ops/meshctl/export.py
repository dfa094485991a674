"""The document store to files: `export` (processed documents to Parquet)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ops.meshctl.common import ConfigOpt, console, err, load
from store.docstore import StoreUnavailable, open_docstore
from store.export import export_parquet


def export(config: str = ConfigOpt,
           out: Optional[Path] = typer.Option(None, "--out", help="Folder for the Parquet file (default: DATA_DIR/processed)."),
           all_states: bool = typer.Option(False, "--all", help="Also the pages that could not be extracted.")) -> None:
    """Write the processed documents to Parquet (data/processed/documents-<time>.parquet)."""
    cfg = load(config)
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


def register(app: typer.Typer) -> None:
    app.command("export")(export)
