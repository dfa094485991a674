"""Agent logging in a real process: JSON lines in data/logs/<agent>.log, and with MESH_LOG_STDERR=1
the same lines on the process's original stderr too (what `podman logs` shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testing.harness import ROOT

SCRIPT = """
import logging, sys
from pathlib import Path
from mesh.logs import setup_agent_logging
for _ in range(int(sys.argv[2])):          # a second call must neither lose stderr nor double the lines
    path = setup_agent_logging("echo", "local", Path(sys.argv[1]))
logging.getLogger("agent.echo").info("hello %s", "podman", extra={"peer": "twin"})
logging.getLogger("network.rpc").debug("below the level")
print("a stray print")
print("a stray write to stderr", file=sys.stderr)
"""


def run(tmp_path: Path, value: str | None, calls: int = 1) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "MESH_LOG_STDERR"}
    if value is not None:
        env["MESH_LOG_STDERR"] = value
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logs"), str(calls)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r, (tmp_path / "logs" / "echo.log").read_text().splitlines()


def test_log_stderr_copies_every_json_line_to_the_original_stderr(tmp_path):
    r, file_lines = run(tmp_path, "1")
    stderr_lines = r.stderr.splitlines()
    assert len(stderr_lines) == 1, r.stderr
    line = json.loads(stderr_lines[0])
    assert line["message"] == "hello podman" and line["agent"] == "echo" and line["host"] == "local"
    assert line["level"] == "INFO" and line["logger"] == "agent.echo" and line["peer"] == "twin"
    assert stderr_lines[0] in file_lines                 # the very same line, in the file as well
    # what is written outside logging still goes to the file only; stdout stays empty
    assert "a stray print" in file_lines and "a stray write to stderr" in file_lines
    assert r.stdout == "" and "stray" not in r.stderr


def test_without_log_stderr_nothing_reaches_the_original_stderr(tmp_path):
    for value in (None, "0", ""):
        r, file_lines = run(tmp_path / str(value), value)
        assert r.stderr == "" and r.stdout == ""
        assert [json.loads(x)["message"] for x in file_lines if x.startswith("{")] == ["hello podman"]


def test_log_stderr_survives_setting_up_twice(tmp_path):
    r, file_lines = run(tmp_path, "true", calls=2)
    assert [json.loads(x)["message"] for x in r.stderr.splitlines()] == ["hello podman"]
    assert [json.loads(x)["message"] for x in file_lines if x.startswith("{")] == ["hello podman"]


def test_deployed_groups_log_to_stderr_too(tmp_path):
    """Every container group deploy (and kube) starts has MESH_LOG_STDERR=1, so `podman logs` shows its agents."""
    from mesh.config import load_config
    from ops import deploy

    keys = tmp_path / "keys"   # the shipped two-host config has CURVE on: deploy needs the host's key pair
    r = subprocess.run([sys.executable, "-m", "ops.meshctl", "keys", "generate", "mainpc", "--keys-dir", str(keys)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = load_config(ROOT / "config" / "mainpc.yaml", environ={"MESH_KEYS_DIR": str(keys)})
    specs = deploy.group_specs(cfg, "mainpc", no_gpu=True)
    assert specs and all(spec.env["MESH_LOG_STDERR"] == "1" for spec in specs)


def test_logs_follow_agents_of_both_hosts_over_the_mesh(tmp_path, mesh_up):
    """Two hosts (127.0.0.1 and 127.0.0.2), each with its own data directory, as on two machines:
    `meshctl logs -f` on `local` follows a local agent from its file and the other host's agent over
    the mesh (log.read), both prefixed agent@host, old lines and new ones."""
    import signal
    import time

    import yaml

    from mesh.config import load_config
    from mesh.control import fetch_status
    from testing.harness import mesh_dict, wait_for

    d = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]}, "b": {"kind": "echo", "depends_on": ["twin"]}},
                  hosts={"local": {"address": "127.0.0.1"}, "far": {"address": "127.0.0.2"}},
                  groups={"core": {"host": "local", "agents": ["twin", "a"]}, "edge": {"host": "far", "agents": ["b"]}})
    paths = {}
    for host in ("local", "far"):
        d["mesh"]["data_dir"] = str(tmp_path / host)
        paths[host] = tmp_path / host / "mesh.yaml"
        paths[host].parent.mkdir()
        paths[host].write_text(yaml.safe_dump({**d, "host": host}, sort_keys=False))
    cfg = load_config(paths["local"])
    mesh_up(paths["far"])
    mesh_up(paths["local"])
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="both hosts ready")
    assert not (tmp_path / "local" / "logs" / "b.log").exists()       # b's log is only on `far`
    follower = subprocess.Popen([sys.executable, "-m", "ops.meshctl", "logs", "-f", "a", "b", "--config",
                                 str(paths["local"]), "--lines", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"))
    try:
        time.sleep(2.0)
        for agent in ("a", "b"):     # both log something new while we follow: draining, then a restart
            os.kill(next(s.pid for s in fetch_status(cfg).agents if s.agent == agent), signal.SIGTERM)
        wait_for(lambda: all(s.state == "ready" and s.restarts == 1 for s in fetch_status(cfg).agents[1:]),
                 timeout=20, what="a and b back")
        time.sleep(1.5)
    finally:
        follower.send_signal(signal.SIGINT)
        out, _ = follower.communicate(timeout=10)
    lines = out.splitlines()
    assert any(line.startswith("a@local ") and "started: rpc" in line for line in lines), out   # history
    assert any(line.startswith("b@far ") and "started: rpc" in line for line in lines), out
    assert any(line.startswith("a@local ") and "draining" in line for line in lines), out       # followed
    assert any(line.startswith("b@far ") and "draining" in line for line in lines), out
    assert not any("no answer" in line for line in lines[:4]), out
