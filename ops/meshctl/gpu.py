"""GPUs and models: `vram` (the VRAM optimizer's GPUs, budgets and leases) and `models` (the model
manager's GGUF models)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from agents.contracts import ModelsRequest, VramStatusRequest
from ops.meshctl.common import AgentOpt, ConfigOpt, JsonOpt, ask_kind, console


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.0f} MiB"


def vram(config: str = ConfigOpt, agent: Optional[str] = AgentOpt("VRAM optimizer"), as_json: bool = JsonOpt) -> None:
    """GPUs, budgets and model leases of the VRAM optimizer."""
    asked = ask_kind(config, "vram_optimizer", agent, VramStatusRequest(), as_json=as_json)
    if asked is None:
        return
    name, st = asked
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


def models(config: str = ConfigOpt, agent: Optional[str] = AgentOpt("model manager"), as_json: bool = JsonOpt) -> None:
    """GGUF models of the model manager: state, placement, lease."""
    asked = ask_kind(config, "model_manager", agent, ModelsRequest(), as_json=as_json)
    if asked is None:
        return
    name, reply = asked
    table = Table(title=f"{name}: VRAM by {reply.gpu}", title_justify="left")
    for col in ("model", "state", "placement", "estimate", "requests", "idle s", "path / error"):
        table.add_column(col, justify="right" if col in ("estimate", "requests", "idle s") else "left")
    for m in reply.models:
        table.add_row(m.name, m.state, m.placement or "-", _mib(m.estimate_bytes), str(m.requests),
                      "-" if m.idle_s is None else f"{m.idle_s:.0f}", escape(m.error or m.path))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("vram")(vram)
    app.command("models")(models)
