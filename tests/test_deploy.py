"""The parts of podman_build.sh that need no Podman: group order, GPU checks, config variables."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest

from agents import deploy
from agents.config import parse_config
from tests.conftest import ROOT

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
    for cmd in ("build", "deploy", "down", "status", "logs"):
        h = subprocess.run([str(ROOT / "podman_build.sh"), cmd, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and "usage: podman_build.sh" in h.stdout, cmd
    bad = subprocess.run([str(ROOT / "podman_build.sh"), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    nohost = subprocess.run([str(ROOT / "podman_build.sh"), "deploy", "nowhere"], capture_output=True, text=True)
    assert nohost.returncode == 2 and "no config/nowhere.yaml" in nohost.stderr
