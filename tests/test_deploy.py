"""The parts of podman_build.sh that need no Podman: group order, GPU checks, config variables, and the
command line (every command, argument, option and default of usage(), with its exit status)."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest

from mesh.config import parse_config
from ops import deploy
from testing.harness import ROOT

MESH_BASE_TAG = "localhost/mesh-base:bookworm"

MESH = {
    "hosts": {"mainpc": {"address": "10.0.0.1"}, "pc2": {"address": "10.0.0.2"}},
    "groups": {"gpu": {"host": "mainpc", "gpu": True, "agents": ["topics"]},
               "core": {"host": "mainpc", "agents": ["twin"]},
               "crawl": {"host": "pc2", "agents": ["crawler"]},
               "empty": {"host": "mainpc", "agents": []}},
    "agents": {"twin": {"kind": "digital_twin"}, "crawler": {"kind": "echo", "depends_on": ["twin"]},
               "topics": {"kind": "echo", "depends_on": ["crawler"]}},
}


def test_groups_start_in_dependency_order_and_empty_ones_are_skipped():
    cfg = parse_config(copy.deepcopy(MESH))
    assert deploy.group_order(cfg, "mainpc") == ["core", "gpu"]
    assert deploy.group_order(cfg, "pc2") == ["crawl"]


def test_gpu_group_without_a_cdi_spec_says_how_to_make_one(monkeypatch):
    cfg = parse_config(copy.deepcopy(MESH))
    monkeypatch.setattr(deploy, "CDI_SPECS", ("/nonexistent/nvidia.yaml",))
    with pytest.raises(deploy.DeployError, match="nvidia-ctk cdi generate"):
        deploy._gpu_args(cfg, "gpu", no_gpu=False)
    assert deploy._gpu_args(cfg, "gpu", no_gpu=True) == []
    assert deploy._gpu_args(cfg, "core", no_gpu=False) == []


def test_gpu_group_with_a_cdi_spec_gets_the_device(monkeypatch, tmp_path: Path):
    spec = tmp_path / "nvidia.yaml"
    spec.write_text("cdiVersion: 0.5.0\n")
    monkeypatch.setattr(deploy, "CDI_SPECS", (str(spec),))
    cfg = parse_config(copy.deepcopy(MESH))
    assert deploy._gpu_args(cfg, "gpu", no_gpu=False) == ["--device", "nvidia.com/gpu=all"]


def test_config_variables_are_passed_into_containers(monkeypatch):
    monkeypatch.setenv("PC2_ADDRESS", "10.9.9.9")
    monkeypatch.setenv("MESH_DATA_DIR", "/elsewhere")
    env = deploy._config_env()
    assert env["PC2_ADDRESS"] == "10.9.9.9"
    assert "MESH_DATA_DIR" not in env  # fixed inside the image


def test_script_help_and_bad_commands():
    r = subprocess.run([str(ROOT / "podman_build.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "deploy HOST" in r.stdout
    for cmd in ("base", "build", "deploy", "down", "status", "logs", "kube", "monitoring"):
        h = subprocess.run([str(ROOT / "podman_build.sh"), cmd, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and f"Usage: podman_build.sh {cmd}" in h.stdout, (cmd, h.stdout, h.stderr)
    bad = subprocess.run([str(ROOT / "podman_build.sh"), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    nohost = subprocess.run([str(ROOT / "podman_build.sh"), "deploy", "nowhere"], capture_output=True, text=True)
    assert nohost.returncode == 2 and "no config/nowhere.yaml" in nohost.stderr


CALLS = [  # podman_build.sh usage() -> the function it calls, with every option and default
    (["base"], "base_image", (MESH_BASE_TAG,), {}),
    (["base", "--tag", "localhost/b:1"], "base_image", ("localhost/b:1",), {}),
    (["build"], "build", (), {"offline": False, "base": os.environ.get("MESH_BASE_IMAGE", deploy.DEFAULT_BASE)}),
    (["build", "--offline", "--base", "IMAGE"], "build", (), {"offline": True, "base": "IMAGE"}),
    (["build", "core", "--offline", "--base", "IMAGE"], "build", (), {"offline": True, "base": "IMAGE"}),
    (["deploy", "pc2"], "deploy", ("pc2",), {"no_gpu": False, "timeout": 120.0}),
    (["deploy", "mainpc", "--no-gpu", "--timeout", "90"], "deploy", ("mainpc",), {"no_gpu": True, "timeout": 90.0}),
    (["down", "pc2"], "down", ("pc2",), {"volumes": False}),
    (["down", "pc2", "--volumes"], "down", ("pc2",), {"volumes": True}),
    (["kube", "mainpc", "--no-gpu"], "kube", ("mainpc",), {"no_gpu": True}),
    (["logs", "core"], "logs", (["core"],), {"follow": False}),
    (["logs", "-f", "core", "echo"], "logs", (["core", "echo"],), {"follow": True}),
    (["logs", "core", "--follow"], "logs", (["core"],), {"follow": True}),
    (["monitoring", "mainpc"], "monitoring", ("mainpc",),
     {"port": 9090, "retention": "15d", "base": MESH_BASE_TAG, "rebuild": False, "grafana": False,
      "grafana_port": 3000}),
    (["monitoring", "mainpc", "--port", "9191", "--grafana", "--grafana-port", "3001", "--retention", "2d",
      "--rebuild", "--base", "B"], "monitoring", ("mainpc",),
     {"port": 9191, "retention": "2d", "base": "B", "rebuild": True, "grafana": True, "grafana_port": 3001}),
    (["monitoring", "mainpc", "--down"], "monitoring_down", ("mainpc",), {"volumes": False}),
    (["monitoring", "mainpc", "--down", "--volumes"], "monitoring_down", ("mainpc",), {"volumes": True}),
]


@pytest.mark.parametrize("argv,function,args,kwargs", CALLS, ids=[" ".join(c[0]) for c in CALLS])
def test_every_command_and_option_reaches_its_function(monkeypatch, capsys, argv, function, args, kwargs):
    seen = []
    monkeypatch.setattr(deploy, function, lambda *a, **kw: seen.append((a, kw)) or "")
    assert deploy.main(argv) == 0, capsys.readouterr()
    assert seen == [(args, kwargs)]


def test_exit_status_of_status_and_of_errors(monkeypatch, capsys):
    monkeypatch.setattr(deploy, "status", lambda host: 1)
    assert deploy.main(["status", "mainpc"]) == 1  # a group not running
    monkeypatch.setattr(deploy, "status", lambda host: 0)
    assert deploy.main(["status", "mainpc"]) == 0
    capsys.readouterr()
    assert deploy.main(["kube", "nowhere"]) == 2  # a real DeployError: no such config
    assert capsys.readouterr().err.startswith("error: no config/nowhere.yaml (hosts with a config: ")
    assert deploy.main(["build", "no-such-group"]) == 2
    assert "unknown group(s) no-such-group" in capsys.readouterr().err
    assert deploy.main(["deploy"]) == 2  # HOST missing: a usage error
    assert deploy.main(["logs"]) == 2  # at least one GROUP|AGENT


def test_kube_prints_the_yaml(monkeypatch, capsys):
    monkeypatch.setattr(deploy, "kube", lambda host, no_gpu: f"# {host} {no_gpu}\n")
    assert deploy.main(["kube", "pc2"]) == 0
    assert capsys.readouterr().out == "# pc2 False\n"
