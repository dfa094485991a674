"""Pools: an agent declared with `replicas:` runs as agents NAME-1..NAME-N, each with its own ports, heartbeat and
status line, placed over hosts; depends_on on the pool is met when `min_ready` of them are ready. The config's
expansion and its problems, the start order and the twin's gate, `meshctl plan`, and real meshes (`meshctl up`, a
crawl handed to a pool of extractors). Real sockets and processes, nothing mocked."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import urllib.request

import pytest
import yaml

from agents.contracts import CrawlStatusRequest
from agents.crawler.agent import CrawlSettings
from mesh.config import AgentRef, ConfigError, parse_config
from mesh.control import client, fetch_status
from mesh.runtime import Agent, AgentSettings
from network.messages import Echo
from store.docstore import open_docstore
from testing.harness import ROOT, mesh_dict, wait_for
from tests.site import Site

HOSTS = {"mainpc": {"address": "127.0.0.1"}, "pc2": {"address": "127.0.0.2"}}

BASE = {
    "mesh": {"base_port": 7100},
    "hosts": HOSTS,
    "security": {"curve": "off"},
    "groups": {"core": {"host": "mainpc", "agents": ["twin", "api"]},
               "extract": {"host": "pc2", "agents": ["extractor"]},
               "crawl": {"host": "pc2", "agents": ["crawler"]}},
    "agents": {"twin": {"kind": "digital_twin"},
               "api": {"kind": "echo", "depends_on": ["twin"]},
               "extractor": {"kind": "extractor", "depends_on": ["twin"], "settings": {"workers": 1},
                             "replicas": {"mainpc": 1, "pc2": 2}},
               "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"]}},
}


def data(**changes) -> dict:
    """BASE with `agents__extractor__min_ready=2`-style changes (None deletes the key)."""
    out = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = out
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def problems_of(d: dict) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(d, "f.yaml")
    return info.value.problems


def meshctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.meshctl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


# --- expansion, placement, groups, ports ---------------------------------------------------------------------------

def test_a_pool_expands_into_named_replicas_placed_in_the_mappings_order():
    cfg = parse_config(data())
    assert list(cfg.agents) == ["twin", "api", "extractor-1", "extractor-2", "extractor-3", "crawler"]
    pool = cfg.pools["extractor"]
    assert pool.replicas == ["extractor-1", "extractor-2", "extractor-3"] and pool.min_ready == 1 and pool.required
    assert pool.placement == {"mainpc": 1, "pc2": 2} and pool.kind == "extractor"
    assert [cfg.host_of(r) for r in pool.replicas] == ["mainpc", "pc2", "pc2"]
    assert {r: cfg.pool_of(r) for r in cfg.agents} == {"twin": None, "api": None, "crawler": None,
                                                       **{r: "extractor" for r in pool.replicas}}
    assert cfg.replicas_of("extractor") == pool.replicas and cfg.replicas_of("api") == ["api"]
    assert cfg.min_ready_of("extractor") == 1 and cfg.min_ready_of("api") == 1
    for r in pool.replicas:   # ordinary agents with the pool's kind, settings and depends_on, each its own settings
        spec = cfg.agents[r]
        assert (spec.kind, spec.depends_on, spec.settings) == ("extractor", ["twin"], {"workers": 1})
        assert spec.replicas is None and spec.min_ready is None
    assert cfg.agents["extractor-1"].settings is not cfg.agents["extractor-2"].settings
    assert cfg.agents_of_kind("extractor") == pool.replicas
    assert cfg.dependency_agents("crawler") == pool.replicas
    # the same names, hosts and ports at every load, and on every host
    again = parse_config(data(), host="pc2")
    assert {a: (again.host_of(a), again.ports(a)) for a in again.agents} == \
        {a: (cfg.host_of(a), cfg.ports(a)) for a in cfg.agents}


def test_the_group_listing_the_pool_takes_its_hosts_replicas_and_other_hosts_get_a_group_of_their_own():
    cfg = parse_config(data(groups__extract__gpu=True))
    assert cfg.groups["extract"].agents == ["extractor-2", "extractor-3"]
    auto = cfg.groups["extract-mainpc"]    # mainpc has replicas and no group listing the pool
    assert (auto.host, auto.agents, auto.gpu) == ("mainpc", ["extractor-1"], True)
    assert cfg.group_of("extractor-1") == "extract-mainpc" and cfg.group_of("extractor-3") == "extract"
    # a group on each host listing the pool: each takes its own host's, in place of the pool's name
    both = data(groups__core__agents=["twin", "extractor", "api"])
    cfg = parse_config(both)
    assert cfg.groups["core"].agents == ["twin", "extractor-1", "api"] and "extract-mainpc" not in cfg.groups
    # a count: every replica in the one group that lists the pool
    cfg = parse_config(data(agents__extractor__replicas=2))
    assert cfg.pools["extractor"].placement == {"pc2": 2}
    assert cfg.groups["extract"].agents == ["extractor-1", "extractor-2"] and len(cfg.groups) == 3
    # a host with 0 (or left out of the mapping) gets none: the group listing the pool there runs without it
    cfg = parse_config(data(agents__extractor__replicas={"mainpc": 2, "pc2": 0}))
    assert cfg.groups["extract"].agents == [] and cfg.groups["extract-mainpc"].agents == ["extractor-1", "extractor-2"]


def test_every_replica_has_ports_of_its_own_and_scaling_a_pool_moves_no_other_agents_ports():
    cfg = parse_config(data())
    used = [(cfg.host_of(a), port) for a in cfg.agents for port in cfg.ports(a).values()]
    assert len(used) == len(set(used))
    assert cfg.ports("extractor-2") != cfg.ports("extractor-3")
    others = {a: cfg.ports(a) for a in ("twin", "api", "crawler")}
    for placement in ({"mainpc": 3, "pc2": 1}, 1, {"pc2": 5}):
        scaled = parse_config(data(agents__extractor__replicas=placement))
        assert {a: scaled.ports(a) for a in others} == others, placement
    # the replicas come after the agents declared one by one: on pc2 the crawler keeps the first free ports
    assert cfg.ports("crawler")["rpc"] == 7100 and cfg.ports("extractor-2")["rpc"] == 7103
    assert cfg.ports("extractor-1")["rpc"] == 7106    # mainpc: after the twin's and api's


def test_an_expanded_config_keeps_its_pools_when_finished_again():
    cfg = parse_config(data())
    before = {a: cfg.ports(a) for a in cfg.agents}
    cfg.finish()
    assert list(cfg.pools) == ["extractor"] and {a: cfg.ports(a) for a in cfg.agents} == before


# --- problems: each bad input one clear problem, with its path and a fix ------------------------------------------

BAD = [
    ("unknown-host", dict(agents__extractor__replicas={"mainpc": 1, "pc3": 1}),
     "agents.extractor.replicas.pc3", "host 'pc3' is not declared"),
    ("negative-count", dict(agents__extractor__replicas={"mainpc": 1, "pc2": -1}),
     "agents.extractor.replicas.pc2", "-1 replicas"),
    ("negative-total", dict(agents__extractor__replicas=-2), "agents.extractor.replicas", "-2 replicas"),
    ("zero", dict(agents__extractor__replicas={"mainpc": 0, "pc2": 0}), "agents.extractor.replicas",
     "a pool of 0 replicas"),
    ("zero-count", dict(agents__extractor__replicas=0), "agents.extractor.replicas", "a pool of 0 replicas"),
    ("min-ready-0", dict(agents__extractor__min_ready=0), "agents.extractor.min_ready",
     "min_ready 0 of a pool of 3 replica(s)"),
    ("min-ready-over", dict(agents__extractor__min_ready=4), "agents.extractor.min_ready",
     "min_ready 4 of a pool of 3 replica(s)"),
    ("min-ready-no-pool", dict(agents__api__min_ready=1), "agents.api.min_ready", "min_ready is for a pool"),
    ("endpoints", dict(agents__extractor__endpoints={"rpc": 7300}), "agents.extractor.endpoints",
     "a pool's ports are assigned, each replica its own; rpc given"),
    ("collision", dict(agents__api=None, **{"agents__extractor-2": {"kind": "echo"},
                                            "groups__core__agents": ["twin", "extractor-2"]}),
     "agents.extractor", "replica name(s) extractor-2 of pool 'extractor' are already agent or replica names"),
    ("min-ready-over-one", {"agents__api__replicas": 1, "agents__api__min_ready": 2}, "agents.api.min_ready",
     "min_ready 2 of a pool of 1 replica(s)"),
    ("twin", dict(agents__twin__replicas=2), "agents.twin.replicas", "the digital twin cannot be a pool"),
    ("no-group", dict(groups__extract__agents=[]), "agents.extractor", "pool 'extractor' is in no group"),
    ("count-two-groups", dict(agents__extractor__replicas=2, groups__core__agents=["twin", "api", "extractor"]),
     "agents.extractor.replicas", "with a count, a pool runs in one group; 'extractor' is listed in core, extract"),
    ("two-groups-one-host", dict(groups__crawl__agents=["crawler", "extractor"]), "agents.extractor.replicas",
     "pool 'extractor' is listed in 2 groups on host 'pc2' (extract, crawl)"),
    ("twice-in-a-group", dict(groups__extract__agents=["extractor", "extractor"]), "groups.extract.agents",
     "pool 'extractor' is listed twice"),
    ("auto-group-taken", dict(**{"groups__extract-mainpc": {"host": "mainpc", "agents": []}}),
     "agents.extractor.replicas.mainpc", "group 'extract-mainpc', where its replicas there would run, is already "
     "declared"),
    ("boolean", dict(agents__extractor__replicas=True), "agents.extractor.replicas",
     "must be a count or a mapping host -> count, not a boolean"),
    ("self", dict(agents__extractor__depends_on=["twin", "extractor"]), "agents.extractor.depends_on[1]",
     "a pool's replicas cannot depend on their own pool"),
    ("unknown-dependency", dict(agents__extractor__depends_on=["twin", "extractr"]), "agents.extractor.depends_on[1]",
     "unknown agent 'extractr'"),
]


@pytest.mark.parametrize("changes,path,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_pool_is_one_problem_with_its_path_and_a_fix(changes, path, message):
    found = problems_of(data(**changes))
    assert len(found) == 1, found
    where, said, fix = found[0]
    assert where == path and message in said, found
    assert fix, "every problem says what to do"


@pytest.mark.parametrize("kind, why", [
    ("topic_model", "the one writer of the topic state"),
    ("curiosity", "its policy learns from every scored page"),
    ("vram_optimizer", "lease the same memory twice"),
])
def test_the_kinds_that_keep_one_state_cannot_be_pools(kind, why):
    d = data()
    d["agents"]["single"] = {"kind": kind, "depends_on": ["twin"], "replicas": 2}
    d["groups"]["core"]["agents"].append("single")
    [(path, message, fix)] = problems_of(d)
    assert path == "agents.single.replicas" and f"a {kind} cannot be a pool: " in message and why in message
    assert "remove replicas:" in fix
    del d["agents"]["single"]["replicas"]
    parse_config(d)                                               # one of them is fine


def test_a_replica_name_longer_than_a_name_may_be_is_refused():
    name = "x" * 62      # a name may have 63 characters; x...x-1 has 64
    d = mesh_dict({name: {"kind": "echo", "depends_on": ["twin"], "replicas": 1}})
    assert problems_of(d) == [(f"agents.{name}", f"replica name '{name}-1' is too long", "shorten the pool's name: "
                               "a replica's name, NAME-N, has at most 63 characters")]


def test_a_cycle_through_a_pool_is_named():
    found = problems_of(data(agents__extractor__depends_on=["twin", "crawler"]))
    assert len(found) == 1 and found[0][0].endswith(".depends_on") and "dependency cycle" in found[0][1]
    assert "crawler" in found[0][1] and "extractor-" in found[0][1]


def test_settings_may_name_a_pool_of_their_kind_and_no_other():
    cfg = parse_config(data(agents__crawler__settings={"extractor": "extractor", "seeds": ["http://a.invalid/"]}))
    assert cfg.settings_of("crawler", CrawlSettings).extractor == "extractor"   # the pool's name, kept
    bad = data(agents__api__replicas=2, groups__core__agents=["twin", "api"],
               agents__crawler__settings={"extractor": "api", "seeds": ["http://a.invalid/"]})
    cfg = parse_config(bad)
    with pytest.raises(ConfigError) as info:
        cfg.settings_of("crawler", CrawlSettings)
    assert info.value.problems == [("agents.crawler.settings.extractor", "'api' is a pool of echo agents, not of "
                                    "extractor", "name one of ['extractor-1', 'extractor-2', 'extractor-3']")]


# --- start order and the twin's gate -------------------------------------------------------------------------------

def test_start_order_puts_a_pools_dependents_after_all_its_replicas():
    cfg = parse_config(data(agents__api__depends_on=["extractor-2"]))
    assert cfg.start_order() == [["twin"], ["extractor-1", "extractor-2", "extractor-3"], ["api", "crawler"]]


def pool_mesh(min_ready: int = 1, **pool) -> dict:
    return mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"], "replicas": 2, "min_ready": min_ready, **pool},
                      "user": {"kind": "echo", "depends_on": ["echo"]}})


def status(cfg) -> dict:
    return {a.agent: a for a in fetch_status(cfg, timeout=1).agents}


def test_a_dependent_of_a_pool_starts_once_min_ready_replicas_are_ready(write_config, run_agents):
    _, cfg = write_config(pool_mesh(min_ready=1))
    run_agents(cfg, "twin", "user")
    wait_for(lambda: status(cfg)["user"].waiting_on == ["echo"], what="user waiting on the pool")
    run_agents(cfg, "echo-1")   # one of two is enough
    wait_for(lambda: status(cfg)["user"].state == "ready", what="user ready with one replica of two")
    st = status(cfg)
    assert st["echo-1"].state == "ready" and st["echo-2"].state == "declared"


def test_min_ready_two_waits_for_the_second_replica_and_degrades_when_one_goes(write_config, run_agents):
    _, cfg = write_config(pool_mesh(min_ready=2))
    twin, user, one = run_agents(cfg, "twin", "user", "echo-1")
    wait_for(lambda: status(cfg)["echo-1"].state == "ready", what="echo-1 ready")
    assert status(cfg)["user"].state == "waiting" and status(cfg)["user"].waiting_on == ["echo"]
    (two,) = run_agents(cfg, "echo-2")
    wait_for(lambda: status(cfg)["user"].state == "ready", what="user ready with both replicas")
    two.stop()
    wait_for(lambda: status(cfg)["user"].state == "degraded", what="user degraded with one replica of the two needed")
    assert "dependency not ready: echo" in status(cfg)["user"].detail


def test_an_optional_pool_never_holds_its_dependents_back(write_config, run_agents):
    _, cfg = write_config(pool_mesh(min_ready=2, required=False))
    run_agents(cfg, "twin", "user")
    wait_for(lambda: status(cfg)["user"].state in ("ready", "degraded"), what="user up without its optional pool")


class ListenerSettings(AgentSettings):
    source: AgentRef() = "echo"


class Listener(Agent):
    """Subscribes to the events of `source`: a pool's name subscribes to every replica of it."""

    kind = "listener"
    Settings = ListenerSettings

    def setup(self) -> None:
        self.heard: list[str] = []
        self.subscribe(self.settings.source, "echo.", lambda msg, env: self.heard.append(env.sender), Echo)


def test_subscribing_to_a_pool_hears_every_replica(write_config, run_agents):
    d = pool_mesh(settings={"publish": True})
    d["agents"]["listener"] = {"kind": "tests.test_pools:Listener", "depends_on": ["twin"]}
    d["groups"]["g-listener"] = {"host": "local", "agents": ["listener"]}
    _, cfg = write_config(d)
    twin, listener, *_ = run_agents(cfg, "twin", "listener", "echo-1", "echo-2")
    wait_for(lambda: all(a.state == "ready" for n, a in status(cfg).items() if n != "user"), what="agents ready")

    def send_both():
        for r in ("echo-1", "echo-2"):
            with client(cfg, r, timeout=1.0) as c:
                c.request(Echo(seq=1, payload=b"x"))
        return sorted(set(listener.agent.heard)) == ["echo-1", "echo-2"]

    wait_for(send_both, timeout=10, interval=0.3, what="events of both replicas heard")


# --- meshctl ---------------------------------------------------------------------------------------------------------

def test_plan_shows_each_pool_and_each_replicas_ports(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(data(agents__extractor__min_ready=2), sort_keys=False))
    r = meshctl("plan", "--config", str(path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert ("extractor-1 [extractor @ mainpc/extract-mainpc, rpc :7106, pub :7107, metrics :7108] (pool extractor) "
            "<- twin") in out
    assert "extractor-3 [extractor @ pc2/extract, rpc :7106, pub :7107, metrics :7108] (pool extractor)" in out
    assert "crawler [crawl_coordinator @ pc2/crawl, rpc :7100, pub :7101, metrics :7102] <- extractor (2 of 3 ready)" \
        in out
    assert ("pool extractor [extractor]: mainpc: 1, pc2: 2; min_ready 2 -> extractor-1 @ mainpc, extractor-2 @ pc2, "
            "extractor-3 @ pc2") in out
    r = meshctl("check", "--config", str(path), "--host", "pc2")
    assert r.returncode == 0 and "6 agent(s), 1 pool(s)" in r.stdout, r.stdout + r.stderr
    path.write_text(yaml.safe_dump(data(agents__extractor__min_ready=5), sort_keys=False))
    r = meshctl("check", "--config", str(path))
    assert r.returncode != 0 and "agents.extractor.min_ready: min_ready 5 of a pool of 3 replica(s)" in r.stderr


def test_up_runs_each_replica_with_its_own_heartbeat_ports_and_status_line(write_config, mesh_up):
    path, cfg = write_config(pool_mesh(min_ready=2))
    up = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="mesh ready")
    st = status(cfg)
    assert list(st) == ["twin", "echo-1", "echo-2", "user"]
    one, two = st["echo-1"], st["echo-2"]
    assert one.pid != two.pid and one.pid and two.pid
    # each its own heartbeat: both ages stay fresh, each replica's own counters
    wait_for(lambda: all(status(cfg)[r].last_heartbeat_age_s < 1.0 for r in ("echo-1", "echo-2")),
             what="both replicas heartbeating")
    with client(cfg, "echo-2", timeout=1.0) as c:
        for seq in range(30):   # well above what each replica hears besides (the twin's requests, timers)
            c.request(Echo(seq=seq, payload=b"only two"))
    wait_for(lambda: (s := status(cfg))["echo-2"].stats.messages_in >= s["echo-1"].stats.messages_in + 20,
             what="echo-2's own counters")
    # each its own /metrics, labelled with its name
    for r in ("echo-1", "echo-2"):
        text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.port(r, 'metrics')}/metrics", timeout=2).read().decode()
        assert f'agent="{r}"' in text
    assert cfg.ports("echo-1") != cfg.ports("echo-2")
    # meshctl status: a line each, with the pool beside it
    r = meshctl("status", "--config", str(path))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "(pool echo)" in line]
    assert len(lines) == 2 and "echo-1 (pool echo)" in lines[0] and "echo-2 (pool echo)" in lines[1], r.stdout
    assert all("ready" in line for line in lines)
    assert up.stop() == 0
    assert (cfg.mesh.data_dir / "logs" / "echo-2.log").exists()


def test_up_only_a_pool_runs_its_replicas(write_config, mesh_up):
    d = pool_mesh()
    path, cfg = write_config(d)
    up = mesh_up(path, "--only", "twin", "--only", "echo")
    wait_for(lambda: {a.agent: a.state for a in fetch_status(cfg, timeout=0.5).agents
                      if a.agent.startswith("echo")} == {"echo-1": "ready", "echo-2": "ready"}, timeout=30,
             what="both replicas ready")
    assert "3 agent(s)" in up.output()
    assert status(cfg)["user"].state == "declared"


# --- the crawl coordinator with a pool of extractors ---------------------------------------------------------------

def test_a_crawl_hands_its_pages_to_a_pool_of_extractors(write_config, run_agents):
    with Site(pages=3, slow_s=0.1) as site:
        d = mesh_dict({
            "extractor": {"kind": "extractor", "depends_on": ["twin"], "replicas": 2, "settings": {"workers": 1}},
            "crawler": {"kind": "crawl_coordinator", "depends_on": ["extractor"],
                        "settings": {"seeds": [site.url("/")], "max_depth": 1, "politeness_s": 0.0,
                                     "timeout_s": 1.5, "max_retries": 0, "handoff_timeout_s": 5.0}},
        })
        _, cfg = write_config(d)
        *_, crawler = run_agents(cfg, "twin", "extractor-1", "extractor-2", "crawler")
        with client(cfg, "crawler", timeout=1.0) as c:
            st = wait_for(lambda: (s := c.request(CrawlStatusRequest())).idle and s.done and s, timeout=60,
                          interval=0.1, what="the crawl to finish")
        # the pages spread by credit over both replicas (tests/test_pool_crawl.py: the spread and failover in full)
        assert list(crawler.agent.replicas) == ["extractor-1", "extractor-2"]
        loads = {e.agent: e for e in st.extractors}
        assert set(loads) == {"extractor-1", "extractor-2"}
        assert sum(e.acknowledged for e in loads.values()) == st.documents
        docs = open_docstore(cfg.store_url("documents"))
        try:
            assert st.documents > 0 and docs.count() == st.documents
        finally:
            docs.close()
