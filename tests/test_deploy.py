"""The parts of podman_build.sh that need no Podman: group order, GPU checks, config variables, and the
command line (every command, argument, option and default of usage(), with its exit status)."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from mesh.config import ConfigError, parse_config
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
    (["build"], "build", (), {"offline": False, "base": os.environ.get("MESH_BASE_IMAGE", deploy.DEFAULT_BASE),
                              "roles": ("cpu", "model"), "index_url": None}),
    (["build", "--offline", "--base", "IMAGE"], "build", (),
     {"offline": True, "base": "IMAGE", "roles": ("cpu", "model"), "index_url": None}),
    (["build", "core", "--offline", "--base", "IMAGE"], "build", (),   # the twin's group: the CPU image only
     {"offline": True, "base": "IMAGE", "roles": ("cpu",), "index_url": None}),
    (["build", "gpu", "crawl"], "build", (),
     {"offline": False, "base": os.environ.get("MESH_BASE_IMAGE", deploy.DEFAULT_BASE), "roles": ("cpu", "model"),
      "index_url": None}),
    (["build", "--role", "model", "--index-url", "http://127.0.0.1:3141/simple/"], "build", (),
     {"offline": False, "base": os.environ.get("MESH_BASE_IMAGE", deploy.DEFAULT_BASE), "roles": ("model",),
      "index_url": "http://127.0.0.1:3141/simple/"}),
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
    monkeypatch.setattr(deploy, function, lambda *a, **kw: seen.append((a, kw)) or ({} if function == "build" else ""))
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
    assert deploy.main(["build", "--role", "gpu"]) == 2
    assert "--role must be one of cpu, model, not 'gpu'" in capsys.readouterr().err
    assert deploy.main(["deploy"]) == 2  # HOST missing: a usage error
    assert deploy.main(["logs"]) == 2  # at least one GROUP|AGENT


def test_kube_prints_the_yaml(monkeypatch, capsys):
    monkeypatch.setattr(deploy, "kube", lambda host, no_gpu: f"# {host} {no_gpu}\n")
    assert deploy.main(["kube", "pc2"]) == 0
    assert capsys.readouterr().out == "# pc2 False\n"


def test_kube_yaml_gpu_as_a_cdi_device_images_by_role_and_secrets_by_reference(monkeypatch, capsys):
    monkeypatch.setattr(deploy, "CDI_SPECS", ("/nonexistent/nvidia.yaml",))   # no CDI spec on this machine
    monkeypatch.setenv("MESH_DASHBOARD_TOKEN", "a-token-that-must-not-be-in-the-yaml")
    data = copy.deepcopy(MESH)
    data["agents"]["twin"]["settings"] = {"dashboard_token": "${MESH_DASHBOARD_TOKEN:-}"}
    data["agents"]["topics"]["kind"] = "topic_model"
    data["security"] = {"curve": "off"}
    cfg = parse_config(data, host="mainpc")
    text, secret = deploy.kube_yaml(cfg, "mainpc")
    assert "warning:" in capsys.readouterr().err   # said, and written all the same
    assert "a-token-that-must-not-be-in-the-yaml" not in text
    pods = {d["metadata"]["name"]: d["spec"]["containers"][0] for d in yaml.safe_load_all(text)}
    assert pods["mesh-mainpc-gpu"]["resources"] == {"limits": {"nvidia.com/gpu=all": 1}}
    assert "resources" not in pods["mesh-mainpc-core"]
    assert pods["mesh-mainpc-gpu"]["image"].endswith("-model:latest") and pods["mesh-mainpc-core"]["image"].endswith("-cpu:latest")
    ref = {"secretKeyRef": {"name": "mesh-mainpc-secrets", "key": "MESH_DASHBOARD_TOKEN"}}
    assert {"name": "MESH_DASHBOARD_TOKEN", "valueFrom": ref} in pods["mesh-mainpc-core"]["env"]
    kept = json.loads(secret.value)   # the Secret's data, as `podman kube play` reads it from a Podman secret
    assert base64.b64decode(kept["MESH_DASHBOARD_TOKEN"]) == b"a-token-that-must-not-be-in-the-yaml"
    no_gpu, _ = deploy.kube_yaml(cfg, "mainpc", no_gpu=True)
    assert "nvidia.com/gpu" not in no_gpu


def test_secret_variables_go_in_as_files_not_in_the_environment(monkeypatch):
    monkeypatch.setenv("MESH_DOCUMENTS_URL", "postgresql://mesh:hunter2@db/mesh")
    monkeypatch.setenv("PC2_ADDRESS", "10.9.9.9")
    cfg = parse_config({**copy.deepcopy(MESH), "security": {"curve": "off"}}, host="pc2")
    spec = deploy.group_specs(cfg, "pc2", no_gpu=True)[0]
    args = deploy.run_args(spec, cfg)
    assert not any("hunter2" in a for a in args)
    assert "--env=MESH_DOCUMENTS_URL_FILE=/run/secrets/mesh-documents-url" in args
    assert "mesh-pc2-mesh-documents-url,type=mount,target=mesh-documents-url,uid=10001,gid=10001,mode=0400" in args
    assert "--env=PC2_ADDRESS=10.9.9.9" in args


def test_a_variable_file_fills_the_variable(tmp_path):
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    data = copy.deepcopy(MESH)
    data["agents"]["twin"]["settings"] = {"dashboard_token": "${MESH_DASHBOARD_TOKEN:-}"}
    cfg = parse_config(data, environ={"MESH_DASHBOARD_TOKEN_FILE": str(token)})
    assert cfg.agents["twin"].settings["dashboard_token"] == "from-a-file"
    with pytest.raises(ConfigError, match="cannot read MESH_DASHBOARD_TOKEN_FILE"):
        parse_config(data, environ={"MESH_DASHBOARD_TOKEN_FILE": str(tmp_path / "missing")})


def test_deploy_without_the_hosts_secret_key_says_how_to_make_it(tmp_path):
    cfg = parse_config({**copy.deepcopy(MESH), "security": {"keys_dir": str(tmp_path / "keys")}}, host="pc2")
    assert cfg.curve_enabled("pc2")   # a non-loopback bind: CURVE on
    with pytest.raises(deploy.DeployError, match=r"run `meshctl keys generate pc2`"):
        deploy.group_specs(cfg, "pc2", no_gpu=True)


POOLED = {
    "hosts": {"mainpc": {"address": "10.0.0.1"}, "pc2": {"address": "10.0.0.2"}},
    "groups": {"core": {"host": "mainpc", "agents": ["twin"]},
               "extract": {"host": "pc2", "agents": ["extractor", "echo"]}},
    "agents": {"twin": {"kind": "digital_twin"}, "echo": {"kind": "echo", "depends_on": ["twin"]},
               "extractor": {"kind": "extractor", "depends_on": ["twin"], "replicas": {"mainpc": 1, "pc2": 2}}},
    "security": {"curve": "off"},
}


def test_kube_yaml_writes_a_pool_as_one_statefulset_per_host(monkeypatch):
    monkeypatch.setenv("MESH_DASHBOARD_TOKEN", "a-token")
    data = copy.deepcopy(POOLED)
    data["agents"]["twin"]["settings"] = {"dashboard_token": "${MESH_DASHBOARD_TOKEN:-}"}
    cfg = parse_config(data, host="pc2")
    text, _ = deploy.kube_yaml(cfg, "pc2")
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text)}
    assert set(docs) == {("Pod", "mesh-pc2-extract"), ("Service", "mesh-pc2-extractor"),
                         ("StatefulSet", "mesh-pc2-extractor")}
    pod = docs["Pod", "mesh-pc2-extract"]["spec"]["containers"][0]   # the group's agents declared one by one
    assert pod["args"][-2:] == ["--only", "echo"] and {"name": "MESH_AGENTS", "value": "echo"} in pod["env"]
    sts = docs["StatefulSet", "mesh-pc2-extractor"]["spec"]
    assert sts["replicas"] == 2 and sts["ordinals"] == {"start": 2}   # pods mesh-pc2-extractor-2 and -3
    assert sts["serviceName"] == "mesh-pc2-extractor" and docs["Service", "mesh-pc2-extractor"]["spec"]["clusterIP"] == "None"
    labels = sts["template"]["metadata"]["labels"]
    assert sts["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service", "mesh-pc2-extractor"]["spec"]["selector"] == sts["selector"]["matchLabels"]
    spec = sts["template"]["spec"]
    assert spec["hostNetwork"] and spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mesh-pc2-data"
    container = spec["containers"][0]
    assert container["image"].endswith("-cpu:latest")
    assert {"name": "MESH_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert {"name": "MESH_DASHBOARD_TOKEN", "valueFrom": {"secretKeyRef": {   # by reference, as in the Pods
        "name": "mesh-pc2-secrets", "key": "MESH_DASHBOARD_TOKEN"}}} in container["env"]
    assert "a-token" not in text
    # MainPC: its one replica, in the group made for it, as a StatefulSet of one starting at 1
    main = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(deploy.kube_yaml(cfg, "mainpc")[0])}
    assert set(main) == {("Pod", "mesh-mainpc-core"), ("Service", "mesh-mainpc-extractor"),
                         ("StatefulSet", "mesh-mainpc-extractor")}
    assert main["StatefulSet", "mesh-mainpc-extractor"]["spec"]["replicas"] == 1
    assert main["StatefulSet", "mesh-mainpc-extractor"]["spec"]["ordinals"] == {"start": 1}
    twin = main["Pod", "mesh-mainpc-core"]["spec"]["containers"][0]
    ref = {"secretKeyRef": {"name": "mesh-mainpc-secrets", "key": "MESH_DASHBOARD_TOKEN"}}
    assert {"name": "MESH_DASHBOARD_TOKEN", "valueFrom": ref} in twin["env"]
    extractor = main["StatefulSet", "mesh-mainpc-extractor"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MESH_DASHBOARD_TOKEN", "valueFrom": ref} in extractor["env"]   # secrets as in the Pods


def test_each_statefulset_pod_runs_the_replica_its_name_ends_with(tmp_path):
    """The pod's command, run by sh as the image would, with a `meshctl` that prints what it was asked."""
    cfg = parse_config(copy.deepcopy(POOLED), host="pc2")
    text, _ = deploy.kube_yaml(cfg, "pc2")
    sts = next(d for d in yaml.safe_load_all(text) if d["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "meshctl"
    fake.write_text('#!/bin/sh\necho "$MESH_AGENTS|$*"\n')
    fake.chmod(0o755)
    for ordinal in range(sts["spec"]["ordinals"]["start"], sts["spec"]["ordinals"]["start"] + sts["spec"]["replicas"]):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MESH_POD_NAME": f"{sts['metadata']['name']}-{ordinal}"}
        r = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"extractor-{ordinal}|up --config config/pc2.yaml --host pc2 --only extractor-{ordinal}"
        assert cfg.host_of(f"extractor-{ordinal}") == "pc2"   # a replica of this host: its own ports


def test_kube_warns_that_podman_kube_play_skips_statefulsets(monkeypatch, capsys):
    cfg = parse_config(copy.deepcopy(POOLED), host="pc2")
    monkeypatch.setattr(deploy, "_config", lambda host: cfg)
    text = deploy.kube("pc2")
    assert "kind: StatefulSet" in text
    assert "podman kube play` skips" in capsys.readouterr().err
    without = copy.deepcopy(MESH)
    monkeypatch.setattr(deploy, "_config", lambda host: parse_config({**without, "security": {"curve": "off"}}))
    deploy.kube("pc2")
    assert "StatefulSet" not in capsys.readouterr().err


def test_each_replica_of_a_pool_gets_a_container_of_its_own():
    """deploy runs a pool's replicas one to a container (so they can be replaced one at a time), the group's
    agents declared one by one in the group's container; kube is unchanged (a StatefulSet per pool)."""
    cfg = parse_config(copy.deepcopy(POOLED), host="pc2")
    specs = deploy.container_specs(cfg, "pc2", no_gpu=True)
    assert [(s.name, s.agents, s.replica) for s in specs] == [
        ("mesh-pc2-extract", ["echo"], None),
        ("mesh-pc2-extract-extractor-2", ["extractor-2"], "extractor-2"),
        ("mesh-pc2-extract-extractor-3", ["extractor-3"], "extractor-3")]
    assert specs[1].command[-2:] == ["--only", "extractor-2"] and specs[1].env["MESH_AGENTS"] == "extractor-2"
    assert specs[0].env["MESH_AGENTS"] == "echo" and specs[0].command[-2:] == ["--only", "echo"]
    args = deploy.run_args(specs[2], cfg)
    assert "mesh.pool=extractor" in args and "mesh.agents=extractor-3" in args and "mesh.group=extract" in args
    assert deploy.containers_of(cfg, "mainpc") == [("core", None, ["twin"]),
                                                   ("extract-mainpc", "extractor-1", ["extractor-1"])]
