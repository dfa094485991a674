"""Agent logging in a real process: JSON lines in data/logs/<agent>.log, and with MESH_LOG_STDERR=1
the same lines on the process's original stderr too (what `podman logs` shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = """
import logging, sys
from pathlib import Path
from agents.logs import setup_agent_logging
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


def test_deployed_groups_log_to_stderr_too():
    """Every container group deploy (and kube) starts has MESH_LOG_STDERR=1, so `podman logs` shows its agents."""
    from agents import deploy
    from agents.config import load_config

    cfg = load_config(ROOT / "config" / "mainpc.yaml", environ={})
    specs = deploy.group_specs(cfg, "mainpc", no_gpu=True)
    assert specs and all(spec.env["MESH_LOG_STDERR"] == "1" for spec in specs)
