"""`meshctl up` as the owner runs it: real processes, SIGKILL, restarts, Ctrl-C; and the CLI around it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import zmq

from mesh.control import fetch_status
from mesh.messages import StateChanged
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from testing.harness import ROOT, mesh_dict, wait_for
from testing.procs import alive


def meshctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.meshctl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


def chain_config():
    return mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                      "b": {"kind": "echo", "depends_on": ["a"]}})


def test_killed_agent_is_marked_dead_restarted_and_ready_again(write_config, mesh_up):
    path, cfg = write_config(chain_config())
    up = mesh_up(path, "--restart-backoff", "1.5")
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    ctx = zmq.Context()
    events: list[tuple[float, StateChanged]] = []
    sub = Subscriber(ctx, lambda t, env: events.append((time.monotonic(), env.message)), metrics=MeshMetrics("t", "t"))
    sub.connect(cfg.endpoint("twin", "pub"))
    sub.subscribe("twin.state")
    time.sleep(0.3)
    try:
        old_pid = next(a.pid for a in fetch_status(cfg).agents if a.agent == "a")
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()

        def saw(agent, state):
            sub.on_readable()
            return next((t for t, e in events if e.agent == agent and e.state == state), None)

        dead_at = wait_for(lambda: saw("a", "dead"), timeout=5, what="a marked dead")
        detect = dead_at - killed
        limit = (cfg.mesh.dead_after_missed + 1) * cfg.mesh.heartbeat_interval_s + 0.2
        assert detect <= limit, f"dead after {detect:.2f}s, limit {limit:.2f}s"
        assert saw("b", "degraded"), "b must be degraded while a is dead"
        wait_for(lambda: [s.state for s in fetch_status(cfg).agents] == ["ready"] * 3, timeout=15, what="ready again")
        a = next(s for s in fetch_status(cfg).agents if s.agent == "a")
        assert a.restarts == 1 and a.pid != old_pid
        print(f"time to detect: {detect:.2f}s; ready again after {time.monotonic() - killed:.2f}s")
    finally:
        sub.close()
        ctx.term()
    assert "a exited with signal 9" in up.output()


def test_ctrl_c_stops_every_agent_cleanly(write_config, mesh_up):
    path, cfg = write_config(chain_config())
    up = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    pids = [a.pid for a in fetch_status(cfg).agents]
    assert all(alive(p) for p in pids)
    assert up.stop() == 0
    wait_for(lambda: not any(alive(p) for p in pids), timeout=5, what="agents gone")
    out = up.output()
    assert "stopping 3 agent(s)" in out
    log = (cfg.mesh.data_dir / "logs" / "b.log").read_text()
    assert '"message": "draining"' in log and '"message": "stopped"' in log


def test_ctrl_c_at_a_terminal_stops_the_agents_in_order_not_all_at_once(write_config, mesh_up):
    # a terminal's Ctrl-C sends SIGINT to every process of the foreground group, the agents included: they leave it
    # to the supervisor, which stops them with SIGTERM, dependents first
    path, cfg = write_config(chain_config())
    up = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(30) == 0
    logs = {name: (cfg.mesh.data_dir / "logs" / f"{name}.log").read_text() for name in ("twin", "a", "b")}
    for name, text in logs.items():
        assert "stop requested (SIGTERM)" in text and "SIGINT" not in text, (name, text[-2000:])
    assert "b: ready -> stopped (stopped)" in logs["twin"]


def test_up_refuses_unknown_kinds_before_starting_anything(write_config):
    path, _ = write_config(mesh_dict({"x": {"kind": "no_such_kind"}}))
    r = meshctl("up", "--config", str(path), timeout=30)
    assert r.returncode == 2
    assert "unknown agent kind 'no_such_kind'" in r.stderr


def test_up_reports_a_bad_config_and_exits(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("hosts: {a: {address: x}}\ngroups: {g: {host: b, agents: [t]}}\nagents: {t: {kind: digital_twin}}\n")
    r = meshctl("up", "--config", str(p))
    assert r.returncode == 2
    assert "groups.g.host: host 'b' is not declared" in r.stderr and "fix:" in r.stderr


def test_status_plan_and_logs_commands(write_config, mesh_up):
    path, cfg = write_config(chain_config())
    mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    table = meshctl("status", "--config", str(path))
    assert table.returncode == 0, table.stderr
    for word in ("mesh test: ready", "twin", "a", "b", "ready", "hosts: local (127.0.0.1) local 3/3 ready"):
        assert word in table.stdout, word
    js = json.loads(meshctl("status", "--config", str(path), "--json").stdout)
    assert [a["agent"] for a in js["agents"]] == ["twin", "a", "b"]
    plan = meshctl("plan", "--config", str(path)).stdout
    assert plan.index("1. twin") < plan.index("2. a") < plan.index("3. b")
    logs = subprocess.Popen([sys.executable, "-m", "ops.meshctl", "logs", "-f", "a", "b", "--config", str(path),
                             "--lines", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, COLUMNS="200"))
    try:
        time.sleep(1.5)
        # make both agents log something new while we follow
        for agent in ("a", "b"):
            os.kill(next(s.pid for s in fetch_status(cfg).agents if s.agent == agent), signal.SIGTERM)
        wait_for(lambda: all(s.state == "ready" and s.restarts == 1 for s in fetch_status(cfg).agents[1:]),
                 timeout=15, what="a and b back")
        time.sleep(0.5)
    finally:
        logs.send_signal(signal.SIGINT)
        out, _ = logs.communicate(timeout=10)
    lines = out.splitlines()
    assert any(line.startswith("a ") and "draining" in line for line in lines), out
    assert any(line.startswith("b ") and "draining" in line for line in lines), out


def test_status_without_a_running_mesh_says_what_to_do(write_config):
    path, _ = write_config(chain_config())
    r = meshctl("status", "--config", str(path))
    assert r.returncode == 1
    assert "the twin does not answer" in r.stderr and "meshctl up" in r.stderr


def test_check_and_up_reject_bad_settings_without_a_restart_loop(write_config):
    path, _ = write_config(mesh_dict({"x": {"kind": "echo", "settings": {"publsh": True}}}))
    for cmd in ("check", "up"):
        r = meshctl(cmd, "--config", str(path))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "agents.x.settings.publsh" in r.stderr and "Extra inputs are not permitted" in r.stderr


def test_stop_drains_dependents_before_the_twin(write_config, mesh_up):
    path, cfg = write_config(chain_config())
    up = mesh_up(path)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
    assert up.stop() == 0
    twin_log = (cfg.mesh.data_dir / "logs" / "twin.log").read_text()
    # every agent deregistered while the twin was still up to hear it
    assert "b: ready -> stopped (stopped)" in twin_log
    assert "a: degraded -> stopped (stopped)" in twin_log or "a: ready -> stopped (stopped)" in twin_log
