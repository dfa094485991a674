"""meshctl: run, inspect and secure the mesh.

The `meshctl` command (`python -m ops.meshctl` runs it too), one module per group of commands; each
module's `register(app)` adds its commands to the app below, in the order `meshctl --help` lists them:

    common.py      what the command modules share: the consoles, the options (--config, --host, --agent,
                   --json), loading the config, picking the agent of a kind, asking an agent one request
    run.py         up, status, plan, check: run the mesh, the twin's status table, start-up order, validation
    prometheus.py  prometheus-config: the Prometheus scrape config made from a mesh config (ops/monitoring.py)
    logs.py        logs: agents' logs from this host's files or over the mesh
    export.py      export: the processed documents of the document store to Parquet
    topics.py      topics: the topic model agent's topics
    gpu.py         vram, models: the VRAM optimizer's GPUs and leases, the model manager's GGUF models
    keys.py        keys generate, keys list: CURVE key pairs, one per host
    crawl.py       crawl status, crawl add (the running crawl coordinator); crawl-report (from the document store)
    __main__.py    `python -m ops.meshctl`
"""

from __future__ import annotations

import typer

from ops.meshctl import crawl, export, gpu, keys, logs, prometheus, run, topics

app = typer.Typer(add_completion=False, no_args_is_help=True, help="meshctl: run, inspect and secure the mesh.")
for _module in (run, prometheus, logs, export, topics, gpu, keys, crawl):   # the order --help lists them in
    _module.register(app)


def main() -> None:
    app()
