"""Monitoring with the real tools: the shipped scrape config is what the generator makes from
config/mesh.yaml; promtool accepts the config, the alert rules (and they fire on made-up series)
and every agent's /metrics; a real Prometheus server scrapes a real mesh (`meshctl up`) with a
config made by the generator; and every query of the Grafana dashboard names only metrics and
labels the agents expose, and returns data from that Prometheus.

Needs Debian's `prometheus` package (prometheus and promtool); without it these tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agents.contracts import VramAcquire, VramStatusRequest
from agents.gpu import MIB
from mesh.config import MeshConfig, load_config
from mesh.control import client, fetch_status
from network.metrics import MeshMetrics
from network.rpc import MeshError
from ops.monitoring import SHIPPED_CONFIG, SHIPPED_DASHBOARD, SHIPPED_RULES, TARGET_LABELS, render, scrape_config
from testing.harness import ROOT, MeshUp, mesh_dict, wait_for
from testing.system import missing, reason
from tests.services import free_port


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(reason("prometheus", command=name))
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60)


# --- the shipped files -------------------------------------------------------------------------


def test_shipped_scrape_config_is_what_the_generator_makes_from_mesh_yaml():
    cfg = load_config(ROOT / "config" / "mesh.yaml", environ={})
    expected = render(cfg, source="config/mesh.yaml", no_env=True)
    assert SHIPPED_CONFIG.read_text() == expected, (
        "containers/monitoring/prometheus.yml is stale: regenerate it with `meshctl prometheus-config "
        "--config config/mesh.yaml --no-env --out containers/monitoring/prometheus.yml`")
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    [job] = shipped["scrape_configs"]
    assert job["job_name"] == "mesh" and shipped["rule_files"] == ["rules.yml"]
    by_agent = {t["labels"]["agent"]: t for t in job["static_configs"]}
    assert set(by_agent) == set(cfg.agents)
    for agent, t in by_agent.items():   # each agent: its host's address and its own metrics port, labelled
        host = cfg.host_of(agent)
        assert t["targets"] == [f"{cfg.hosts[host].address}:{cfg.port(agent, 'metrics')}"]
        assert t["labels"] == {"agent": agent, "host": host, "group": cfg.group_of(agent),
                               "kind": cfg.agents[agent].kind}
    assert by_agent["twin"]["targets"] == ["192.168.1.10:7102"]          # MainPC's default address
    assert by_agent["crawler"]["labels"]["host"] == "pc2"
    assert len({t["targets"][0] for t in by_agent.values()}) == len(by_agent)


def test_meshctl_prometheus_config_prints_writes_and_takes_addresses_from_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ADDRESS")}
    cmd = [sys.executable, "-m", "ops.meshctl", "prometheus-config", "--config", "config/mesh.yaml"]
    shipped = subprocess.run([*cmd, "--no-env"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=dict(env, MAINPC_ADDRESS="10.9.9.9"))
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout == SHIPPED_CONFIG.read_text()   # --no-env: the environment is ignored
    out = tmp_path / "prom" / "prometheus.yml"
    mine = subprocess.run([*cmd, "--out", str(out), "--scrape-interval", "5s"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(env, MAINPC_ADDRESS="10.1.2.3", PC2_ADDRESS="10.1.2.4"))
    assert mine.returncode == 0, mine.stderr
    assert "target(s) ->" in mine.stderr and mine.stdout == ""
    made = yaml.safe_load(out.read_text())
    targets = {t["labels"]["agent"]: t["targets"][0] for t in made["scrape_configs"][0]["static_configs"]}
    assert targets["twin"] == "10.1.2.3:7102" and targets["crawler"].startswith("10.1.2.4:")
    assert made["global"]["scrape_interval"] == "5s"
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "missing.yaml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "file not found" in bad.stderr


def test_promtool_accepts_the_shipped_config_and_rules():
    r = promtool("check", "config", str(SHIPPED_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr and "rules.yml" in r.stdout + r.stderr   # the rules it refers to load
    r = promtool("check", "rules", str(SHIPPED_RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 3 rules found" in r.stdout + r.stderr


def test_alert_rules_fire_when_they_should(tmp_path):
    """promtool's rule unit tests on made-up series: down after 1 minute, not ready after 5, errors
    above 1/s for 5 minutes; nothing for healthy agents. (Annotations are left out of this copy of
    the rules: promtool compares them word for word; `check rules` above validates their templates.)"""
    rules = yaml.safe_load(SHIPPED_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    echo = {"job": "mesh", "instance": "127.0.0.1:7105", "agent": "echo", "host": "local", "group": "tools",
            "kind": "echo"}
    twin = {"job": "mesh", "instance": "127.0.0.1:7102", "agent": "twin", "host": "local", "group": "core",
            "kind": "digital_twin"}

    def series(name: str, labels: dict, values: str) -> dict:
        return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}

    def alert(name: str, eval_time: str, *expected: dict) -> dict:
        return {"alertname": name, "eval_time": eval_time, "exp_alerts": [{"exp_labels": e} for e in expected]}

    ready = {"mesh_agent_state": "ready"}
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            series("up", echo, "1 0 0 0 0"), series("up", twin, "1 1 1 1 1"),
            series("mesh_agent_state", {**echo, **ready}, "0x10"),
            series("mesh_agent_state", {**twin, **ready}, "1x10"),
            series("mesh_errors_total", {**echo, "code": "timeout"}, "0+120x20"),     # 2/s
            series("mesh_errors_total", {**twin, "code": "no_handler"}, "0+30x20"),   # 0.5/s
        ],
        "alert_rule_test": [
            alert("MeshAgentDown", "1m"),                                            # pending, not firing yet
            alert("MeshAgentDown", "3m", {**echo, "severity": "critical"}),
            alert("MeshAgentNotReady", "4m"),
            alert("MeshAgentNotReady", "6m", {**echo, "mesh_agent_state": "ready", "severity": "warning"}),
            alert("MeshAgentErrors", "4m"),
            alert("MeshAgentErrors", "12m", {**{k: echo[k] for k in ("job", "agent", "host", "group")},
                                             "code": "timeout", "severity": "warning"}),
        ],
    }]}
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


# --- a real Prometheus scraping a real mesh ----------------------------------------------------


@dataclass
class Live:
    cfg: MeshConfig
    prometheus: str       # base URL
    log: Path

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.prometheus}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:   # a query Prometheus refuses: say why
            raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def metrics_text(self, agent: str) -> str:
        url = f"http://{self.cfg.hosts[self.cfg.host_of(agent)].address}:{self.cfg.port(agent, 'metrics')}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()


SCRAPE_S = 1


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`meshctl up` running a twin, an echo agent and the VRAM optimizer on a simulated GPU, a lease
    held and an error provoked (so those series exist), and Prometheus scraping it every second with
    the scrape config the generator makes for this mesh and the shipped rules."""
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    data = mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"]},
                      "vram": {"kind": "vram_optimizer", "depends_on": ["twin"],
                               "settings": {"simulated": {"total_mb": 8192, "name": "SimulatedGPU test card"},
                                            "headroom_mb": 512, "poll_s": 0.5}}},
                     groups={"core": {"host": "local", "agents": ["twin"]},
                             "tools": {"host": "local", "agents": ["echo"]},
                             "gpu": {"host": "local", "agents": ["vram"]}})
    data["mesh"]["data_dir"] = str(tmp / "data")
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)
    up = MeshUp(path)
    proc = None
    try:
        wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="mesh ready")
        with client(cfg, "vram") as c:   # a lease, so the per-model VRAM series exist
            decision = c.request(VramAcquire(agent="echo", model="test-model", bytes=512 * MIB, wait=False))
            assert decision.status == "granted", decision
        with client(cfg, "echo") as c:   # an error reply, so mesh_errors_total has a sample
            with pytest.raises(MeshError):
                c.request(VramStatusRequest())
        metrics_url = f"http://127.0.0.1:{cfg.port('vram', 'metrics')}/metrics"
        wait_for(lambda: 'vram_lease_bytes{model="test-model"}' in urllib.request.urlopen(metrics_url, timeout=2).read()
                 .decode(), timeout=10, what="the lease in the optimizer's gauges (updated every poll_s)")
        shutil.copy2(SHIPPED_RULES, tmp / "rules.yml")
        (tmp / "prometheus.yml").write_text(render(cfg, scrape_interval=f"{SCRAPE_S}s"))
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}: {log.read_text()[-3000:]}")
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                return r.status == 200

        wait_for(ready, timeout=30, interval=0.2, what="prometheus ready")
        yield Live(cfg, base, log)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        up.stop()


def test_prometheus_scrapes_every_agent_of_a_running_mesh(live):
    cfg = live.cfg
    state: dict = {}

    def all_up() -> bool:
        targets = live.api("targets", state="active")["activeTargets"]
        state["targets"] = [(t["labels"].get("agent"), t["scrapeUrl"], t["health"], t.get("lastError", ""))
                            for t in targets]
        return sorted(t["labels"].get("agent", "") for t in targets) == sorted(cfg.agents) and \
            all(t["health"] == "up" for t in targets)

    started = time.monotonic()
    try:
        wait_for(all_up, timeout=30, interval=0.25, what="every agent's target up")
    except AssertionError:
        pytest.fail(f"not every agent's target is up after 30 s: {state.get('targets')}\n"
                    f"prometheus log: {live.log.read_text()[-2000:]}")
    print(f"all {len(cfg.agents)} targets up {time.monotonic() - started:.1f}s after Prometheus was ready")
    targets = live.api("targets", state="active")["activeTargets"]
    for t in targets:
        agent = t["labels"]["agent"]
        assert t["labels"]["job"] == "mesh"
        assert {k: t["labels"][k] for k in TARGET_LABELS} == {
            "agent": agent, "host": cfg.host_of(agent), "group": cfg.group_of(agent), "kind": cfg.agents[agent].kind}
        assert t["scrapeUrl"] == f"http://127.0.0.1:{cfg.port(agent, 'metrics')}/metrics"
    # the series carry the target's labels; the agents' own mesh_agent_info agrees with them (honor_labels)
    info = wait_for(lambda: len(live.query("mesh_agent_info")) == len(cfg.agents) and live.query("mesh_agent_info"),
                    timeout=10, what="mesh_agent_info of every agent")
    for series in info:
        m = series["metric"]
        assert m["kind"] == cfg.agents[m["agent"]].kind and m["group"] == cfg.group_of(m["agent"])
        assert not any(k.startswith("exported_") for k in m), m
    ready = live.query('mesh_agent_state{job="mesh", mesh_agent_state="ready"} == 1')
    assert sorted(s["metric"]["agent"] for s in ready) == sorted(cfg.agents)
    # the shipped alert rules load in the server and nothing fires on a healthy mesh
    rules = [r for g in live.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == ["MeshAgentDown", "MeshAgentErrors", "MeshAgentNotReady"]
    assert all(r["health"] in ("ok", "unknown") for r in rules), rules
    assert [a for a in live.api("alerts")["alerts"] if a["state"] == "firing"] == []


def test_promtool_check_metrics_accepts_every_agents_metrics(live):
    for agent in live.cfg.agents:
        text = live.metrics_text(agent)
        assert "mesh_agent_info" in text
        r = promtool("check", "metrics", stdin=text)
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
            f"{agent}: promtool check metrics:\n{r.stdout}{r.stderr}"


# --- the Grafana dashboard ---------------------------------------------------------------------

# PromQL words that are neither metric nor label names
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names (in matchers and groupings) of one PromQL expression."""
    labels = {m for _, body in SELECTOR.findall(expr) for m in MATCHER.findall(body)}
    labels |= {x.strip() for _, inner in GROUPING.findall(expr) for x in inner.split(",") if x.strip()}
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = GROUPING.sub(" ", rest)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", rest):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names, labels


def test_promql_names_reads_metrics_and_labels():
    names, labels = promql_names('histogram_quantile(0.99, sum by (le, agent) (rate(mesh_request_latency_seconds_bucket'
                                 '{job="mesh", side=~"server"}[$__rate_interval]))) / on (agent) up')
    assert names == {"mesh_request_latency_seconds_bucket", "up"}
    assert labels == {"le", "agent", "job", "side"}


def exposed(live: Live) -> dict[str, set[str]]:
    """Every series name the running agents expose on /metrics, with its label names: those seen on
    its samples, or, for a labelled metric with no sample yet (mesh_pubsub_dropped_total on a healthy
    mesh), those its collector in an agent's registry declares."""
    declared: dict[str, set[str]] = {}
    registry = MeshMetrics("probe", "probe").registry
    for collector, names in registry._collector_to_names.items():
        for name in names:
            declared[name] = set(getattr(collector, "_labelnames", ()))
    out: dict[str, set[str]] = {}
    for agent in live.cfg.agents:
        for family in text_string_to_metric_families(live.metrics_text(agent)):
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "summary": ["_sum", "_count", "_created"]}.get(family.type, [""])
            for suffix in suffixes:
                out.setdefault(family.name + suffix, set()).update(declared.get(family.name + suffix, ()))
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return out


def dashboard_panels() -> list[dict]:
    dash = json.loads(SHIPPED_DASHBOARD.read_text())
    return [p for p in dash["panels"] if p["type"] != "row"]


def concrete(expr: str) -> str:
    """The query as Grafana sends it with every host and agent selected."""
    return (expr.replace("$__rate_interval", "1m").replace('"$host"', '".*"').replace('"$agent"', '".*"'))


def test_dashboard_imports_cleanly_and_covers_health_throughput_latency_errors_vram():
    dash = json.loads(SHIPPED_DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"host", "agent"} <= set(variables)
    panels = dashboard_panels()
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"] for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    used = {n for p in panels for t in p["targets"] for n in promql_names(t["expr"])[0]}
    assert {"up", "mesh_agent_state", "mesh_agent_uptime_seconds", "mesh_messages_total",
            "mesh_request_latency_seconds_bucket", "mesh_errors_total", "vram_used_bytes", "vram_free_bytes",
            "vram_total_bytes", "vram_lease_bytes"} <= used
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_dashboard_queries_name_only_what_agents_expose_and_return_data(live):
    names = exposed(live)
    allowed_labels = set(TARGET_LABELS) | {"job", "instance"}
    for p in dashboard_panels():
        for t in p["targets"]:
            metrics, labels = promql_names(t["expr"])
            assert metrics, (p["title"], t["expr"])
            unknown = metrics - set(names) - {"up"}
            assert not unknown, f"panel {p['title']!r} queries {sorted(unknown)}, which no agent exposes"
            seen = allowed_labels | {"le"} | {lab for m in metrics for lab in names.get(m, ())}
            assert labels <= seen, \
                f"panel {p['title']!r}: labels {sorted(labels - seen)} are on none of {sorted(metrics)}"
    # Every query runs on the real server, and every panel shows data from the running mesh once
    # each target has been scraped twice (rates).
    for p in dashboard_panels():
        for t in p["targets"]:
            live.query(concrete(t["expr"]))   # raises, with Prometheus' reason, on a query it refuses
    empty: dict[str, list[str]] = {}

    def every_panel_has_data() -> bool:
        empty.clear()
        for p in dashboard_panels():
            if not any([live.query(concrete(t["expr"])) for t in p["targets"]]):
                empty[p["title"]] = [concrete(t["expr"]) for t in p["targets"]]
        return not empty

    try:
        wait_for(every_panel_has_data, timeout=30, interval=0.5, what="data in every panel")
    except AssertionError:
        pytest.fail(f"panels without data from a running mesh after 30 s: {empty}")


def test_scrape_config_follows_port_offset_and_addresses():
    cfg = load_config(ROOT / "config" / "local.yaml",
                      environ={"MESH_PORT_OFFSET": "1000", "MESH_LOCAL_ADDRESS": "10.0.0.7"})
    made = scrape_config(cfg, scrape_interval="3s", rule_files=[])
    targets = {t["labels"]["agent"]: t["targets"][0] for t in made["scrape_configs"][0]["static_configs"]}
    assert targets["twin"] == "10.0.0.7:8102" and len(targets) == len(cfg.agents)
    assert made["rule_files"] == [] and made["global"]["scrape_interval"] == "3s"
    assert copy.deepcopy(made) == scrape_config(cfg, scrape_interval="3s", rule_files=[])   # same input, same output


# --- podman_build.sh monitoring, with real Podman ----------------------------------------------


@pytest.mark.slow
def test_podman_build_monitoring_runs_prometheus_in_a_container(monkeypatch, tmp_path):
    """The Prometheus image built from the local Debian base image (Debian's package), run on the host
    network with the config generated for host `local` and the shipped rules; it scrapes the agents of
    a `meshctl up` running here. Running it again changes nothing; --down --volumes leaves nothing."""
    from testing.harness import free_port_block
    from testing.system import need, need_root
    from tests.test_podman import BASE, CONTAINERS_CONF

    need("podman", "runc", "debootstrap")
    need_root("the Podman tests run rootful podman, which")
    if "CONTAINERS_CONF" not in os.environ:
        monkeypatch.setenv("CONTAINERS_CONF", str(CONTAINERS_CONF))
    offset = free_port_block(30) - 7100
    while offset > 50000:   # mesh.port_offset's ceiling
        offset = free_port_block(30) - 7100
    monkeypatch.setenv("MESH_PORT_OFFSET", str(offset))
    monkeypatch.setenv("MESH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MESH_MONITORING_DIR", str(tmp_path / "monitoring"))
    env = dict(os.environ, MESH_MONITORING_IMAGE="localhost/mesh-prometheus:test", COLUMNS="200")

    def script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "podman_build.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def podman(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["podman", *env.get("MESH_PODMAN_OPTS", "").split(), *args], capture_output=True,
                              text=True)

    if podman("image", "exists", BASE).returncode != 0:
        r = script("base", "--tag", BASE)
        assert r.returncode == 0, r.stdout + r.stderr
    cfg = load_config(ROOT / "config" / "local.yaml")
    up = MeshUp(ROOT / "config" / "local.yaml", "--only", "twin", "--only", "echo")
    port = free_port()
    try:
        wait_for(lambda: {a.agent: a.state for a in fetch_status(cfg, timeout=0.5).agents}.get("echo") == "ready",
                 timeout=30, what="twin and echo ready")
        r = script("monitoring", "local", "--port", str(port), "--rebuild", "--base", BASE)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"Prometheus at http://127.0.0.1:{port}, 2/{len(cfg.agents)} target(s) up" in r.stdout, r.stdout
        live = Live(cfg, f"http://127.0.0.1:{port}", tmp_path / "none")
        health = {t["labels"]["agent"]: t["health"] for t in live.api("targets", state="active")["activeTargets"]}
        assert health["twin"] == health["echo"] == "up" and set(health) == set(cfg.agents)
        rules = [r["name"] for g in live.api("rules")["groups"] for r in g["rules"]]
        assert sorted(rules) == ["MeshAgentDown", "MeshAgentErrors", "MeshAgentNotReady"]
        inspect = json.loads(podman("inspect", "mesh-local-prometheus").stdout)[0]
        assert inspect["Config"]["Labels"]["mesh.role"] == "monitoring" and inspect["Config"]["User"] == "prometheus"
        assert (tmp_path / "monitoring" / "local" / "prometheus.yml").read_text() == render(
            cfg, source="config/local.yaml")                       # this environment's ports, mounted
        again = script("monitoring", "local", "--port", str(port))
        assert again.returncode == 0 and "unchanged, mesh-local-prometheus keeps running" in again.stdout, again.stdout
        print(r.stdout)
    finally:
        down = script("monitoring", "local", "--down", "--volumes", timeout=120)
        up.stop()
    assert down.returncode == 0, down.stdout + down.stderr
    assert podman("container", "exists", "mesh-local-prometheus").returncode != 0
    assert podman("volume", "exists", "mesh-local-prometheus").returncode != 0
