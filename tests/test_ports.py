"""Every port the mesh binds is reserved per host before any is assigned: the endpoints (rpc, pub, metrics) and the
ports a kind's settings declare (`extra_ports`: the twin's dashboard, a plug-in's page). Assigned ports skip them,
an explicit port on one is refused naming both users (loader and `meshctl check`), and `meshctl plan` lists them."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agents.twin.agent import TwinSettings
from mesh.config import ConfigError, MeshSettings, parse_config
from mesh.kinds import BUILTIN, DECLARE_PORTS
from mesh.runtime import AgentSettings, resolve

MESHCTL = Path(sys.executable).with_name("meshctl")
BASE = 7100
DASHBOARD = BASE + 80           # the twin's default dashboard port
HOSTS = {"mainpc": {"address": "127.0.0.1"}, "pc2": {"address": "127.0.0.2"}}


def mesh_of(n_echoes: int, hosts: int = 1, twin: dict | None = None, echo: dict | None = None, **mesh) -> dict:
    """A twin (on the first host) and `n_echoes` echo agents echo00, echo01, ... dealt over `hosts` hosts in turn,
    every port assigned. `twin`: the twin's settings; `echo`: {name: endpoints} for explicit ones."""
    names = list(HOSTS)[:hosts]
    groups = {f"g-{h}": {"host": h, "agents": ["twin"] if h == names[0] else []} for h in names}
    agents: dict[str, dict] = {"twin": {"kind": "digital_twin", "settings": dict(twin or {})}}
    for i in range(n_echoes):
        name = f"echo{i:02d}"
        agents[name] = {"kind": "echo", "depends_on": ["twin"]}
        if echo and name in echo:
            agents[name]["endpoints"] = echo[name]
        groups[f"g-{names[i % hosts]}"]["agents"].append(name)
    return {"mesh": {"base_port": BASE, **mesh}, "hosts": {h: HOSTS[h] for h in names}, "groups": groups,
            "agents": agents, "security": {"curve": "off"}}


def users_by_port(cfg) -> dict[tuple[str, int], list[str]]:
    """(host, port) -> who binds it: every endpoint, and the twin's dashboard where the twin binds it."""
    used = collections.defaultdict(list)
    for agent in cfg.agents:
        for which in ("rpc", "pub", "metrics"):
            used[(cfg.host_of(agent), cfg.port(agent, which))].append(f"{agent}.{which}")
    settings = cfg.agents["twin"].settings
    if settings.get("dashboard", True):
        port = (settings.get("dashboard_port") or cfg.mesh.base_port + 80) + cfg.mesh.port_offset
        used[(cfg.host_of("twin"), port)].append("twin.dashboard")
    return used


def problems(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.yaml")
    return str(info.value)


def meshctl(tmp_path: Path, command: str, data: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return subprocess.run([str(MESHCTL), command, "--config", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, COLUMNS="300"))


@pytest.mark.parametrize("hosts", [1, 2])
def test_a_hundred_assigned_agents_never_share_a_port(hosts):
    cfg = parse_config(mesh_of(99, hosts))
    used = users_by_port(cfg)
    assert {k: v for k, v in used.items() if len(v) > 1} == {}
    assert used[("mainpc", DASHBOARD)] == ["twin.dashboard"]
    assert cfg.ports("twin") == {"rpc": BASE, "pub": BASE + 1, "metrics": BASE + 2, "dashboard": DASHBOARD}
    assert all(set(cfg.ports(a)) == {"rpc", "pub", "metrics"} for a in cfg.agents if a != "twin")
    if hosts == 2:   # reserved on the twin's host only: pc2's agents are handed the same port
        assert any(DASHBOARD in cfg.ports(a).values() for a in cfg.agents_on("pc2"))


def test_the_issues_mesh_seventy_agents_on_two_hosts_with_an_offset():
    cfg = parse_config(mesh_of(69, 2, port_offset=1000))
    assert {k: v for k, v in users_by_port(cfg).items() if len(v) > 1} == {}
    assert cfg.port("twin", "dashboard") == DASHBOARD + 1000


def test_the_dashboard_declares_its_port_as_the_twin_binds_it():
    mesh = MeshSettings(base_port=9000)
    assert TwinSettings().extra_ports(mesh) == {"dashboard": 9080}
    assert TwinSettings(dashboard_port=9500).extra_ports(mesh) == {"dashboard": 9500}
    assert TwinSettings(dashboard=False, dashboard_port=9500).extra_ports(mesh) == {}


def test_without_the_dashboard_its_port_is_assigned():
    cfg = parse_config(mesh_of(40, twin={"dashboard": False}))
    assert "dashboard" not in cfg.ports("twin")
    assert any(DASHBOARD in cfg.ports(a).values() for a in cfg.agents if a != "twin")


def test_an_explicit_dashboard_port_is_skipped_by_assigned_ones():
    cfg = parse_config(mesh_of(3, twin={"dashboard_port": BASE + 4}))
    assert cfg.port("twin", "dashboard") == BASE + 4
    assert cfg.ports("echo00") == {"rpc": BASE + 3, "pub": BASE + 5, "metrics": BASE + 6}
    assert {k: v for k, v in users_by_port(cfg).items() if len(v) > 1} == {}


@pytest.mark.parametrize("twin, echo, path, words", [
    ({}, {"echo27": {"metrics": DASHBOARD}}, "agents.echo27.endpoints.metrics",
     f"port {DASHBOARD} on host 'mainpc' is used by twin.dashboard and echo27.metrics"),
    ({"dashboard_port": 7300}, {"echo01": {"rpc": 7300}}, "agents.echo01.endpoints.rpc",
     "port 7300 on host 'mainpc' is used by twin.dashboard and echo01.rpc"),
])
def test_an_explicit_port_on_a_reserved_one_is_refused_naming_both(twin, echo, path, words):
    text = problems(mesh_of(30, twin=twin, echo=echo))
    assert f"f.yaml: {path}: {words}" in text, text
    assert "fix:" in text


def test_the_twins_own_endpoint_on_its_dashboard_port_is_refused():
    data = mesh_of(1, twin={"dashboard_port": 7300})
    data["agents"]["twin"]["endpoints"] = {"pub": 7300}
    assert "f.yaml: agents.twin.settings: port 7300 on host 'mainpc' is used by twin.pub and twin.dashboard" \
        in problems(data)


def test_meshctl_check_refuses_an_endpoint_on_the_dashboard_port(tmp_path):
    data = mesh_of(69, 2, echo={"echo26": {"metrics": DASHBOARD}})   # echo26 is on mainpc, with the twin
    out = meshctl(tmp_path, "check", data)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"agents.echo26.endpoints.metrics: port {DASHBOARD} on host 'mainpc' is used by twin.dashboard and "
            "echo26.metrics") in out.stdout + out.stderr
    del data["agents"]["echo26"]["endpoints"]
    out = meshctl(tmp_path, "check", data)
    assert out.returncode == 0 and ": ok (2 host(s)" in out.stdout, out.stdout + out.stderr


def test_meshctl_check_refuses_an_offset_that_pushes_the_dashboard_past_65535(tmp_path):
    data = mesh_of(1, base_port=60000, port_offset=5500)   # endpoints up to 65505; the dashboard at 65580
    out = meshctl(tmp_path, "check", data)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "mesh.port_offset: offset 5500 pushes port 60080 (twin.dashboard on host 'mainpc') past 65535" \
        in out.stdout + out.stderr


def test_meshctl_plan_lists_every_port(tmp_path):
    out = meshctl(tmp_path, "plan", mesh_of(2, port_offset=10))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (f"1. twin [digital_twin @ mainpc/g-mainpc, rpc :{BASE + 10}, pub :{BASE + 11}, metrics :{BASE + 12}, "
            f"dashboard :{DASHBOARD + 10}]") in out.stdout, out.stdout
    assert f"echo01 [echo @ mainpc/g-mainpc, rpc :{BASE + 16}, pub :{BASE + 17}, metrics :{BASE + 18}] <- twin" \
        in out.stdout, out.stdout


PLUGIN = '''
from mesh.runtime import Agent, AgentSettings


class WebSettings(AgentSettings):
    web_port: int = 7104
    web: bool = True

    def extra_ports(self, mesh):
        return {"web": self.web_port} if self.web else {}


class WebAgent(Agent):
    kind = "web"
    Settings = WebSettings
'''


def test_a_plugin_kind_declares_its_ports_too(tmp_path, monkeypatch):
    (tmp_path / "ports_plugin_web.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = mesh_of(2)
    data["agents"]["svc"] = {"kind": "ports_plugin_web:WebAgent", "depends_on": ["twin"]}
    data["groups"]["g-mainpc"]["agents"].append("svc")
    cfg = parse_config(data)
    assert cfg.port("svc", "web") == BASE + 4 and set(cfg.ports("svc")) == {"rpc", "pub", "metrics", "web"}
    assert cfg.ports("echo00") == {"rpc": BASE + 3, "pub": BASE + 5, "metrics": BASE + 6}
    data["agents"]["echo01"]["endpoints"] = {"pub": BASE + 4}
    assert f"f.yaml: agents.svc.settings: port {BASE + 4} on host 'mainpc' is used by echo01.pub and svc.web" \
        in problems(data)   # declared after echo01: the second user is the one to change
    data["agents"]["svc"]["settings"] = {"web": False}
    assert "web" not in parse_config(data).ports("svc")


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_builtin_kinds_that_declare_ports_are_listed(name):
    """The config imports only the built-in kinds in DECLARE_PORTS to ask for their ports: none may be missing."""
    declares = resolve(name).Settings.extra_ports is not AgentSettings.extra_ports
    assert declares == (name in DECLARE_PORTS)
