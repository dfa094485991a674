"""The shared agent lifecycle against a real twin: registration, the start-up gate, heartbeats,
twin restarts, draining. Agents run on threads of the test process with real sockets."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request

import yaml
import zmq

from agents.echo import EchoAgent
from mesh.config import parse_config
from mesh.control import client, fetch_status
from mesh.messages import Register, StateChanged
from network.messages import Echo, Ping
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from network.rpc import MeshError
from ops.health import probe
from ops.meshctl.run import StatusTick
from testing.harness import ROOT, GarbledServer, mesh_dict, wait_for


def states(config) -> dict[str, str]:
    return {a.agent: a.state for a in fetch_status(config, timeout=1).agents}


def status_of(config, agent):
    return next(a for a in fetch_status(config, timeout=1).agents if a.agent == agent)


class Events:
    """Records the twin's state events."""

    def __init__(self, config):
        self.ctx = zmq.Context()
        self.seen: list[StateChanged] = []
        self.sub = Subscriber(self.ctx, lambda t, env: self.seen.append(env.message), metrics=MeshMetrics("t", "t"))
        self.sub.connect(config.endpoint(config.twin, "pub"))
        self.sub.subscribe("twin.state")

    def pump(self):
        self.sub.on_readable()
        return self.seen

    def of(self, agent):
        self.pump()
        return [e.state for e in self.seen if e.agent == agent]

    def close(self):
        self.sub.close()
        self.ctx.term()


def test_start_up_waits_for_dependencies_and_says_on_what(write_config, run_agents):
    _, cfg = write_config(mesh_dict({
        "store": {"kind": "echo", "depends_on": ["twin"]},
        "worker": {"kind": "echo", "depends_on": ["store"]},
    }))
    run_agents(cfg, "twin", "worker")
    wait_for(lambda: status_of(cfg, "worker").state == "waiting", what="worker waiting")
    worker = status_of(cfg, "worker")
    assert worker.waiting_on == ["store"]
    assert states(cfg)["store"] == "declared"
    assert fetch_status(cfg).mesh_state == "starting"
    code, text = probe(cfg.source, "worker")
    assert code == 1 and "waiting" in text
    run_agents(cfg, "store")
    wait_for(lambda: states(cfg) == {"twin": "ready", "store": "ready", "worker": "ready"}, what="all ready")
    assert fetch_status(cfg).mesh_state == "ready"
    assert probe(cfg.source, "worker")[0] == 0


def test_an_agent_beats_at_the_twins_interval(write_config, run_agents):
    """Registered.heartbeat_interval_s: an agent whose own config says 1 s beats at the twin's 0.2 s once it has
    registered, so the twin (dead after 3 missed beats of its own interval) never takes it for dead."""
    path, cfg = write_config(mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"]}}, heartbeat_interval_s=0.2))
    data = yaml.safe_load(path.read_text())
    data["mesh"]["heartbeat_interval_s"] = 1.0
    slow_cfg = parse_config(data, str(path))
    twin, = run_agents(cfg, "twin")
    echo, = run_agents(slow_cfg, "echo")
    wait_for(lambda: states(cfg).get("echo") == "ready", what="echo ready")
    assert echo.agent.heartbeat_interval_s == 0.2
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert states(cfg)["echo"] == "ready"
        time.sleep(0.1)


def test_optional_agent_never_blocks_and_degrades_the_mesh(write_config, run_agents):
    _, cfg = write_config(mesh_dict({
        "extra": {"kind": "echo", "depends_on": ["twin"], "required": False},
        "main": {"kind": "echo", "depends_on": ["extra"]},
    }))
    run_agents(cfg, "twin", "main")
    wait_for(lambda: states(cfg)["main"] in ("ready", "degraded"), what="main up without its optional dependency")
    st = fetch_status(cfg)
    assert st.mesh_state == "degraded"
    assert status_of(cfg, "main").state == "degraded" and "extra" in status_of(cfg, "main").detail
    run_agents(cfg, "extra")
    wait_for(lambda: fetch_status(cfg).mesh_state == "ready", what="mesh ready once extra is up")


def test_state_changes_are_published_and_drain_deregisters(write_config, run_agents):
    _, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                                     "b": {"kind": "echo", "depends_on": ["a"]}}))
    (twin,) = run_agents(cfg, "twin")
    events = Events(cfg)
    try:
        wait_for(lambda: states(cfg)["twin"] == "ready", what="twin")
        a, b = run_agents(cfg, "a", "b")
        wait_for(lambda: states(cfg) == {"twin": "ready", "a": "ready", "b": "ready"}, what="ready")
        wait_for(lambda: "ready" in events.of("b"), what="b's ready event")
        assert events.of("a")[0] in ("starting", "waiting") and events.of("a")[-1] == "ready"
        a.stop()
        wait_for(lambda: states(cfg)["a"] == "stopped", what="a stopped")
        wait_for(lambda: states(cfg)["b"] == "degraded", what="b degraded without a")
        assert "stopped" in events.of("a") and events.of("b")[-1] == "degraded"
        run_agents(cfg, "a")
        wait_for(lambda: states(cfg)["b"] == "ready", what="b ready again")
        assert status_of(cfg, "a").restarts == 1
    finally:
        events.close()


def test_restarted_twin_gets_every_agent_back(write_config, run_agents):
    _, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                                     "b": {"kind": "echo", "depends_on": ["a"]}}))
    twin, a, b = run_agents(cfg, "twin", "a", "b")
    wait_for(lambda: set(states(cfg).values()) == {"ready"}, what="ready")
    pids = {s.agent: s.pid for s in fetch_status(cfg).agents}
    twin.stop()
    # the agents keep serving while the twin is away
    with client(cfg, "b", timeout=1) as c:
        assert c.request(Echo(seq=1)).seq == 1
    run_agents(cfg, "twin")
    wait_for(lambda: set(states(cfg).values()) == {"ready"}, timeout=10, what="agents re-registered with the new twin")
    st = fetch_status(cfg)
    assert all(s.restarts == 0 for s in st.agents)
    assert {s.agent: s.pid for s in st.agents} == pids


def test_twin_rejects_undeclared_agents(write_config, run_agents):
    _, cfg = write_config(mesh_dict({}))
    run_agents(cfg, "twin")
    wait_for(lambda: states(cfg)["twin"] == "ready", what="twin")
    with client(cfg, "twin") as c:
        try:
            c.request(Register(agent="stranger", kind="echo", host="local", instance="x", pid=1))
        except MeshError as exc:
            assert exc.code == "unknown_agent" and exc.detail["declared"] == ["twin"]
        else:
            raise AssertionError("an undeclared agent was accepted")


def test_every_agent_answers_ping_and_serves_metrics(write_config, run_agents):
    _, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}}))
    run_agents(cfg, "twin", "a")
    wait_for(lambda: states(cfg)["a"] == "ready", what="a ready")
    with client(cfg, "a") as c:
        pong = c.request(Ping())
        c.request(Echo(seq=3))
    assert (pong.agent, pong.kind, pong.state) == ("a", "echo", "ready")
    for agent in ("twin", "a"):
        body = urllib.request.urlopen(f"http://127.0.0.1:{cfg.port(agent, 'metrics')}/metrics", timeout=5).read().decode()
        for name in ("mesh_messages_total", "mesh_errors_total", "mesh_request_latency_seconds_bucket",
                     "mesh_agent_uptime_seconds", 'mesh_agent_state{mesh_agent_state="ready"} 1.0'):
            assert name in body, (agent, name)
    assert 'mesh_messages_total{direction="in",type="mesh.echo"} 1.0' in body


def test_health_probe_for_an_agent_that_is_not_running(write_config):
    path, cfg = write_config(mesh_dict({"a": {"kind": "echo"}}))
    code, text = probe(str(path), "a", timeout=0.3)
    assert code == 2 and "no answer" in text
    assert probe(str(path), "nobody")[0] == 2


def test_health_probe_reports_a_garbled_reply_in_one_line(write_config):
    """`python -m ops.health` against an agent port that answers garbage: one line naming the problem, exit 2,
    no traceback (a ProtocolError used to escape RpcClient.request)."""
    path, cfg = write_config(mesh_dict({"a": {"kind": "echo"}}))
    with GarbledServer(cfg.bind_endpoint("a")) as srv:
        run = subprocess.run([sys.executable, "-m", "ops.health", "a", "--config", str(path), "--timeout", "5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert srv.requests == 1
    assert run.returncode == 2, run
    assert run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("a: bad answer from ") and "undecodable" in lines[0], lines


def test_meshctl_status_reports_a_garbled_twin_reply_as_a_bad_answer(write_config):
    """`meshctl status` against a twin port that answers garbage: not "the twin does not answer" (it did), but
    the codec's code in one line, exit 1, no traceback."""
    path, cfg = write_config(mesh_dict({"a": {"kind": "echo"}}))
    with GarbledServer(cfg.bind_endpoint("twin")) as srv:
        run = subprocess.run([sys.executable, "-m", "ops.meshctl", "status", "--config", str(path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="300"))
        assert srv.requests >= 1
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad answer from the twin" in lines[0] and "undecodable" in lines[0], lines


def test_up_status_tick_survives_a_garbled_twin_reply(write_config, run_agents, caplog):
    """`meshctl up`'s status tick, as the supervisor's loop calls it: a garbled reply from the twin's port is one
    warning line (once, not every second), never an exception; a real twin then gives the usual summary line."""
    _, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}}))
    tick = StatusTick(cfg, {"twin", "a"})
    try:
        with caplog.at_level(logging.INFO, logger="meshctl.up"):
            with GarbledServer(cfg.bind_endpoint("twin")) as srv:
                for _ in range(2):
                    tick.next = 0.0   # not a second later: ask now
                    tick()
                assert srv.requests == 2
            bad = [r.getMessage() for r in caplog.records if r.name == "meshctl.up"]
            assert len(bad) == 1 and "bad reply" in bad[0] and "undecodable" in bad[0], bad
            assert "\n" not in bad[0]
            caplog.clear()
            run_agents(cfg, "twin", "a")
            wait_for(lambda: setattr(tick, "next", 0.0) or tick() or any(
                "mesh test: ready, 2/2 agents ready" in r.getMessage() for r in caplog.records),
                what="the summary line")
    finally:
        tick.close()


def test_waiting_agent_registers_again_with_a_restarted_twin(write_config, run_agents):
    _, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                                     "b": {"kind": "echo", "depends_on": ["a"]}}))
    twin, b = run_agents(cfg, "twin", "b")
    wait_for(lambda: status_of(cfg, "b").state == "waiting", what="b waiting on a")
    twin.stop()
    run_agents(cfg, "twin")
    wait_for(lambda: status_of(cfg, "b").state == "waiting" and status_of(cfg, "b").waiting_on == ["a"],
             what="b known as waiting by the new twin")
    run_agents(cfg, "a")
    wait_for(lambda: set(states(cfg).values()) == {"ready"}, what="all ready")


class Listener(EchoAgent):
    """Subscribes to the twin's state events and to a second publisher on the same host."""

    def setup(self) -> None:
        self.states: list[StateChanged] = []
        self.echoes: list[tuple[str, object]] = []
        self.subscribe(self.config.twin, StateChanged.type_name, lambda m, e: self.states.append(m))
        self.subscribe("ghost", "echo.", lambda m, e: self.echoes.append((e.sender, m)))


def test_events_are_believed_only_from_their_publisher_and_of_their_type(write_config, run_agents):
    """A publisher squatting on a declared agent's port (ghost) sends a forged twin.state (sender
    "twin") and wrong types: none reaches a callback; each is dropped and counted."""
    from network.codec import encode

    _, cfg = write_config(mesh_dict({"listener": {"kind": "tests.test_lifecycle:Listener", "depends_on": ["twin"]},
                                     "ghost": {"kind": "echo", "required": False}}))
    [_, listener] = run_agents(cfg, "twin", "listener")
    wait_for(lambda: fetch_status(cfg).agents[1].state == "ready", what="listener ready")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(cfg.bind_endpoint("ghost", "pub"))
    forged = StateChanged(agent="listener", host="local", previous="ready", state="dead", reason="forged")
    frames = [("twin.state", forged, "twin"),           # another port's topic: its SUB socket never asked for it
              ("echo.1", forged, "twin"),               # the right topic, a forged sender
              ("echo.2", forged, "ghost"),              # the right sender, the wrong type... for a typed prefix
              ("echo.3", Echo(seq=3), "ghost")]         # genuine
    try:
        def send_all() -> bool:
            for topic, msg, sender in frames:
                pub.send_multipart([topic.encode(), encode(msg, sender=sender)[1]])
            return any(getattr(m, "seq", None) == 3 for _, m in listener.agent.echoes)
        wait_for(send_all, interval=0.2, what="the genuine echo through")
        time.sleep(0.3)
    finally:
        pub.close(0)
        ctx.term()
    assert listener.agent.states and all(s.reason != "forged" for s in listener.agent.states)
    assert {sender for sender, _ in listener.agent.echoes} == {"ghost"}     # never the forged "twin"
    dropped = listener.agent.metrics.sample("mesh_pubsub_dropped_total", {"code": "unexpected_event"})
    assert dropped >= 1          # the forged sender on echo.1
