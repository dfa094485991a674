"""Prometheus scrape config for a mesh, made from its MeshConfig (never written by hand).

One job (`mesh`) with one target per agent: the agent's host address and metrics port, labelled
with agent, host, group and kind, so every series of the mesh can be grouped by those. The shipped
containers/monitoring/prometheus.yml is what this makes from config/mesh.yaml with the default
addresses (a test keeps the two equal); regenerate it with

    meshctl prometheus-config --config config/mesh.yaml --no-env --out containers/monitoring/prometheus.yml

and make one for your own addresses by leaving out `--no-env` (MAINPC_ADDRESS, PC2_ADDRESS set).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mesh.config import MeshConfig

ROOT = Path(__file__).resolve().parent.parent
MONITORING_DIR = ROOT / "containers" / "monitoring"
SHIPPED_CONFIG = MONITORING_DIR / "prometheus.yml"
SHIPPED_RULES = MONITORING_DIR / "rules.yml"
SHIPPED_DASHBOARD = MONITORING_DIR / "grafana-dashboard.json"
JOB = "mesh"
# Labels every target carries; the dashboard and the alert rules group by them.
TARGET_LABELS = ("agent", "host", "group", "kind")


def targets(cfg: MeshConfig) -> list[dict]:
    """One static target per agent, in the config's order: address:metrics port and its labels."""
    out = []
    for agent, spec in cfg.agents.items():
        host = cfg.host_of(agent)
        out.append({"targets": [f"{cfg.hosts[host].address}:{cfg.port(agent, 'metrics')}"],
                    "labels": {"agent": agent, "host": host, "group": cfg.group_of(agent), "kind": spec.kind}})
    return out


def scrape_config(cfg: MeshConfig, *, scrape_interval: str = "15s", evaluation_interval: str | None = None,
                  rule_files: list[str] | None = None, job: str = JOB) -> dict:
    """The whole prometheus.yml as a dict. `rule_files` are relative to the file's folder (Prometheus'
    rule), so the shipped config and rules.yml are mounted side by side."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval or scrape_interval,
                   "external_labels": {"mesh": cfg.mesh.name}},
        "rule_files": list(["rules.yml"] if rule_files is None else rule_files),
        "scrape_configs": [{
            "job_name": job,
            # The agents' own labels win where they overlap the target's: only mesh_agent_info has
            # agent and kind, with the same values.
            "honor_labels": True,
            "metrics_path": "/metrics",
            "static_configs": targets(cfg),
        }],
    }


def header(source: str, *, no_env: bool) -> str:
    how = ("the defaults of its ${VAR:-default}s (the environment ignored)" if no_env
           else "the environment's values for its ${VAR}s (MAINPC_ADDRESS, PC2_ADDRESS, ...)")
    return (f"# Prometheus scrape config of the mesh, one target per agent, made from {source} with\n"
            f"# {how}. Do not edit by hand; regenerate:\n"
            f"#   meshctl prometheus-config --config {source}{' --no-env' if no_env else ''} --out FILE\n"
            "# containers/monitoring/prometheus.yml is made with --config config/mesh.yaml --no-env, and\n"
            "# tests/test_prometheus.py fails when it and config/mesh.yaml disagree. rules.yml (the alert\n"
            "# rules) is read from this file's folder. See docs/OPERATIONS.md, \"Monitoring\".\n")


def render(cfg: MeshConfig, *, source: str | None = None, no_env: bool = False, **kwargs) -> str:
    """scrape_config() as YAML, with a header saying where it came from and how to regenerate it."""
    return header(source or cfg.source, no_env=no_env) + yaml.safe_dump(scrape_config(cfg, **kwargs), sort_keys=False)
