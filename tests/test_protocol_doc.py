"""docs/PROTOCOL.md lists exactly the registered message types, and each one is exercised here on
real sockets against a running twin and echo agent, with the reply the document names."""

from __future__ import annotations

import re
import time
from pathlib import Path

import zmq

from agents.probe import ProbeReport, ProbeWatch
from mesh.control import client
from mesh.messages import Alert, HostChanged, StateChanged
from network.codec import encode
from network.messages import REGISTRY, Ack, Echo, Error
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from network.rpc import MeshError
from testing.harness import mesh_dict, wait_for
from tests.samples import SAMPLES, shipped

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def documented() -> dict[str, str]:
    """type name -> 'Answered with' column of the `## Message types` table."""
    text = DOC.read_text()
    section = text.split("\n## Message types", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \|[^|]*\|[^|]*\| ([^|]*) \|$", section, re.M)
    return {name: answer.strip() for name, answer in rows}


def test_the_document_lists_exactly_the_registered_types():
    assert set(documented()) == shipped()


def test_every_documented_type_on_the_wire(write_config, run_agents):
    _, cfg = write_config(mesh_dict(
        {"echo": {"kind": "echo", "depends_on": ["twin"], "settings": {"publish": True}},
         "probe": {"kind": "probe", "depends_on": ["twin"]}},
        hosts={"local": {"address": "127.0.0.1"}, "far": {"address": "127.0.0.2"}},
        groups={"core": {"host": "local", "agents": ["twin", "echo"]}, "edge": {"host": "far", "agents": ["probe"]}}))
    run_agents(cfg, "twin", "echo")
    seen: dict[str, str] = {}
    ctx = zmq.Context()
    events: list = []
    sub = Subscriber(ctx, lambda topic, env: events.append(env.message), metrics=MeshMetrics("t", "t"))
    sub.connect(cfg.endpoint("twin", "pub"))
    sub.connect(cfg.endpoint("echo", "pub"))
    sub.subscribe("")
    try:
        with client(cfg, "twin", timeout=2) as twin, client(cfg, "echo", timeout=2) as echo:
            wait_for(lambda: echo.request(SAMPLES["mesh.ping"]).state == "ready", what="echo ready")
            time.sleep(0.3)  # let the subscriber join before the far host's first agent registers
            [probe_agent] = run_agents(cfg, "probe")
            with client(cfg, "probe", timeout=2) as probe:
                wait_for(lambda: probe.request(SAMPLES["mesh.ping"]).state == "ready", what="probe ready")
                seen["probe.watch"] = probe.request(ProbeWatch(agent="echo", topic="echo.")).type_name
                time.sleep(0.3)
                echo.request(Echo(seq=77))
                counts = wait_for(lambda: (c := probe.request(ProbeReport(agent="echo"))).received and c,
                                  what="probe saw the echo event")
                seen["probe.report"] = counts.type_name
                assert counts.last_seq == 77
            status = twin.request(SAMPLES["twin.status"])
            instance = "fresh-instance"
            requests = {
                "mesh.ping": (echo, SAMPLES["mesh.ping"]),
                "mesh.echo": (echo, SAMPLES["mesh.echo"]),
                "log.read": (echo, SAMPLES["log.read"]),
                "twin.status": (twin, SAMPLES["twin.status"]),
                "twin.register": (twin, SAMPLES["twin.register"].model_copy(
                    update={"agent": "echo", "host": "local", "instance": instance})),
                "twin.heartbeat": (twin, SAMPLES["twin.heartbeat"].model_copy(update={"agent": "echo", "instance": instance})),
                "twin.wait_ready": (twin, SAMPLES["twin.wait_ready"].model_copy(update={"agent": "echo", "instance": instance})),
                "twin.deregister": (twin, SAMPLES["twin.deregister"].model_copy(update={"agent": "echo", "instance": instance})),
            }
            for name, (c, msg) in requests.items():
                seen[name] = c.request(msg).type_name
            assert status.agents[1].agent == "echo"
            # replies and events are not requests: an agent answers them with a typed error
            for name in sorted(shipped() - set(requests)):
                try:
                    echo.request(SAMPLES[name])
                except MeshError as exc:
                    assert exc.code == "no_handler", (name, exc)
                    seen.setdefault("mesh.error", "received")
                else:
                    raise AssertionError(f"{name} sent as a request was handled")
            raw = echo.send_raw([encode(SAMPLES["mesh.ping"], sender="t")[1][:-2]])
            assert raw is not None and b"mesh.error" in raw
        wait_for(lambda: (sub.on_readable(), any(isinstance(e, StateChanged) for e in events))[1], what="twin.state")
        # the far host's only agent falls silent (no deregistration): the twin alerts
        probe_agent.agent.reactor.call_soon_threadsafe(
            lambda: (setattr(probe_agent.agent, "_registered", False), probe_agent.agent._stop_requested.set()))
        alert = wait_for(lambda: (sub.on_readable(), next((e for e in events if isinstance(e, Alert)), None))[1],
                         what="twin.alert")
        assert alert.kind == "host_unreachable" and alert.host == "far"
        host_events = [e for e in events if isinstance(e, HostChanged)]
        assert [(e.host, e.state) for e in host_events] == [("far", "reachable"), ("far", "unreachable")]
        wait_for(lambda: (sub.on_readable(), any(e.type_name == "mesh.echo" for e in events))[1], what="echo event")
    finally:
        sub.close()
        ctx.term()
    answers = documented()
    for name, reply in seen.items():
        if name in ("mesh.error",):
            continue
        assert answers[name].startswith(reply), (name, reply, answers[name])
    exercised = set(seen) | {REGISTRY[r].type_name for r in seen.values() if r in REGISTRY} | {"twin.state", "twin.host", "twin.alert"}
    runtime = {name for name in shipped() if REGISTRY[name].__module__ != "agents.contracts"}
    assert exercised >= runtime - {Ack.type_name, Error.type_name} | {"mesh.error"}   # pipeline types: test_crawl.py
    assert Ack.type_name in seen.values()


def test_the_documented_example_client_works(write_config, run_agents, tmp_path):
    """The pyzmq + msgpack client in PROTOCOL.md, run as written, against a real agent."""
    import subprocess
    import sys

    code = DOC.read_text().split("\n## Example client", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    script = tmp_path / "ping.py"
    script.write_text(code)
    _, cfg = write_config(mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"]}}))
    run_agents(cfg, "twin", "echo")
    with client(cfg, "echo") as c:
        wait_for(lambda: c.request(SAMPLES["mesh.ping"]).state == "ready", what="echo ready")
    r = subprocess.run([sys.executable, str(script), cfg.endpoint("echo")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("('mesh.pong', 'echo', {'agent': 'echo', 'kind': 'echo', 'state': 'ready'")
