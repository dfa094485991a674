"""docs/PROTOCOL.md against the code: its tables of message types, error codes and published topics
name exactly what the code registers, sends and publishes, and each message type is exercised here on
real sockets against a running twin and echo agent, with the reply the document names."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from agents.probe import ProbeReport, ProbeWatch
from mesh.control import client
from mesh.messages import Alert, Heartbeat, HostChanged, Register, StateChanged, StatusRequest
from network.codec import encode
from network.messages import REGISTRY, Ack, Echo, Error, ErrorCode
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from network.rpc import MeshError
from testing.harness import mesh_dict, wait_for
from tests.samples import SAMPLES, shipped

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PROTOCOL.md"
RELIABILITY = ROOT / "docs" / "RELIABILITY.md"
EVERY_AGENT = "every agent"   # "Known to" of the types the runtime registers in every agent process
RUNTIME_MODULES = ("network.messages", "mesh.messages")


def section(title: str) -> str:
    return DOC.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table in `text` whose header row starts with `header`."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def message_types() -> dict[str, list[str]]:
    """type name -> its row of the `## Message types` table (Type, Version, Direction, Answered with, Known to)."""
    rows = table(section("Message types"), "| Type | Version |")
    return {row[0].strip("`"): row for row in rows}


def documented() -> dict[str, str]:
    """type name -> 'Answered with' column of the `## Message types` table."""
    return {name: row[3] for name, row in message_types().items()}


def test_the_document_lists_exactly_the_registered_types():
    rows = message_types()
    assert set(rows) == shipped()
    for name, row in rows.items():
        module = REGISTRY[name].__module__
        known = EVERY_AGENT if module in RUNTIME_MODULES else f"`{module.replace('.', '/')}.py`"
        assert row[4] == known, (name, row[4], module)


def test_every_agent_knows_exactly_the_types_the_document_says():
    """A twin's process registers what the document says every agent knows, no more: the types of the other rows
    it answers unknown_type. Its modules as `meshctl up` preloads them for a host with only a twin (the
    supervisor, the runtime, the rpc module, the kind's own module), in a fresh interpreter."""
    code = ("import json, mesh.supervisor, mesh.runtime, network.rpc, agents.twin.agent\n"
            "from network.messages import REGISTRY\n"
            "print(json.dumps(sorted(REGISTRY)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    every = {name for name, row in message_types().items() if row[4] == EVERY_AGENT}
    assert set(json.loads(r.stdout)) == every


def test_the_error_table_is_exactly_the_error_codes():
    codes = [row[0].strip("`") for row in table(section("Errors"), "| `code` | Sent when |")]
    assert set(codes) == {code.value for code in ErrorCode}


def test_reliability_names_the_real_error_codes():
    text = RELIABILITY.read_text().split("answered with a typed `mesh.error` (", 1)[1].split(")", 1)[0]
    codes = re.findall(r"`([a-z_]+)`", text)
    assert codes and set(codes) <= {code.value for code in ErrorCode}, codes


# publish calls whose message the scan below cannot name from the call or its function: (file, argument) -> type
UNRESOLVED = {("agents/topics/agent.py", "e"): "doc.scored"}   # DocScored events built by TopicModelAgent._process


def _topic(node: ast.expr | None, type_name: str) -> str:
    if node is None:
        return type_name
    if isinstance(node, ast.Constant):
        return node.value
    assert isinstance(node, ast.JoinedStr), ast.dump(node)
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(value.value)
        else:   # {lease.agent} -> <agent>
            expr = value.value
            parts.append(f"<{expr.attr if isinstance(expr, ast.Attribute) else expr.id}>")
    return "".join(parts)


def _calls(func: ast.FunctionDef | ast.AsyncFunctionDef):
    """The calls in `func`'s body, nested functions left out (they are visited on their own); lambdas included."""
    todo = list(func.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Call):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _message_type(arg: ast.expr, func: ast.FunctionDef | ast.AsyncFunctionDef, module, path: str) -> str:
    def cls(node: ast.expr | None):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            node = node.func
        if isinstance(node, ast.Name):
            found = getattr(module, node.id, None)
            if isinstance(found, type) and found.__dict__.get("type_name"):
                return found.type_name
        return None

    if (name := cls(arg)) is not None:
        return name
    if isinstance(arg, ast.Name):
        a = func.args
        for param in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            if param.arg == arg.id and (name := cls(param.annotation)) is not None:
                return name
        for node in ast.walk(func):
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == arg.id for t in node.targets)
                    and (name := cls(node.value)) is not None):
                return name
        if (path, arg.id) in UNRESOLVED:
            return UNRESOLVED[(path, arg.id)]
    raise AssertionError(f"{path}:{arg.lineno}: cannot tell what this publish call sends; add it to UNRESOLVED")


def published_in_code() -> set[tuple[str, str]]:
    """(topic, type) of every `publish(...)` call of the agents and the runtime; `<name>` stands for a topic's
    variable part. The runtime's own `publish`, which hands a message through, is not a publisher."""
    found = set()
    for path in sorted([*ROOT.glob("agents/**/*.py"), *ROOT.glob("mesh/**/*.py")]):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT).as_posix()
        module = None
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or func.name == "publish":
                continue
            for call in _calls(func):
                if not (isinstance(call.func, ast.Attribute) and call.func.attr == "publish"):
                    continue
                if module is None:
                    parts = path.relative_to(ROOT).with_suffix("").parts
                    module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
                type_name = _message_type(call.args[0], func, module, rel)
                topic = call.args[1] if len(call.args) > 1 else next(
                    (k.value for k in call.keywords if k.arg == "topic"), None)
                found.add((_topic(topic, type_name), type_name))
    return found


def test_the_published_list_is_what_the_code_publishes():
    rows = table(section("Publish/subscribe"), "| Topic | Type | Published by |")
    documented_topics = {(row[0].strip("`"), row[1].strip("`")) for row in rows}
    assert documented_topics == published_in_code()


def doc_bytes(block: str) -> bytes:
    """The bytes a dump in the document spells: two hex digits a byte, "text" its UTF-8; what follows them on a
    line is a comment."""
    token = re.compile(r'\s*(?:"([^"]*)"|([0-9a-f]{2})(?=\s|$))')
    out = bytearray()
    for line in block.splitlines():
        pos = 0
        while m := token.match(line, pos):
            out += m.group(1).encode() if m.group(1) is not None else bytes.fromhex(m.group(2))
            pos = m.end()
    return bytes(out)


def documented_error_body() -> bytes:
    example = section("The frame").split("answers a `twin.status`", 1)[1]
    return doc_bytes(example.split("```\n", 1)[1].split("\n```", 1)[0])


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
            # the worked example's error reply, byte for byte
            raw = echo.send_raw([encode(SAMPLES["twin.status"], sender="t")[1]])
            assert msgpack.packb(msgpack.unpackb(raw)[7], use_bin_type=True) == documented_error_body()
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


def test_the_twin_never_takes_a_state_it_does_not_show(write_config, run_agents):
    """A twin.register or twin.heartbeat naming `draining` (or a state only the twin sets) is refused with
    invalid_body, so the twin's table never shows an agent draining; the states agents do report are taken."""
    _, cfg = write_config(mesh_dict({"echo": {"kind": "echo", "depends_on": ["twin"]}}))
    run_agents(cfg, "twin")

    def register(state: str) -> Register:
        return Register(agent="echo", kind="echo", host="local", instance="i-1", pid=1, state=state)

    with client(cfg, "twin", timeout=2) as twin:
        wait_for(lambda: twin.request(SAMPLES["mesh.ping"]).state == "ready", what="twin ready")
        for state in ("draining", "stopped", "dead", "unreachable", "declared"):
            with pytest.raises(MeshError) as info:
                twin.request(register(state))
            assert info.value.code == "invalid_body" and repr(state) in info.value.message, (state, info.value)
        assert twin.request(register("ready")).type_name == "twin.registered"
        for state in ("draining", "starting", "waiting", "stopped", "dead"):
            with pytest.raises(MeshError) as info:
                twin.request(Heartbeat(agent="echo", instance="i-1", state=state))
            assert info.value.code == "invalid_body", (state, info.value)
        assert twin.request(Heartbeat(agent="echo", instance="i-1", state="degraded")).registered
        [echo] = [a for a in twin.request(StatusRequest()).agents if a.agent == "echo"]
        assert echo.state == "degraded"


def test_the_documented_example_client_works(write_config, run_agents, tmp_path):
    """The pyzmq + msgpack client in PROTOCOL.md, run as written, against a real agent."""
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
