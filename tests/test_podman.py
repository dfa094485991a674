"""podman_build.sh with real Podman: base image, offline build, deploy local, status, logs,
a redeploy that changes nothing, a killed container coming back, and down leaving nothing."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from mesh.config import load_config
from mesh.control import fetch_status
from testing.harness import ROOT, free_port_block, wait_for
from testing.system import missing, need, need_root

pytestmark = pytest.mark.slow

BASE = "localhost/mesh-base:bookworm"
IMAGE = "localhost/agent-mesh:test"


# The suite's Podman settings, whatever the machine's own containers.conf says: runc (crun fails on some
# hosts' cgroups, ../shared/ENVIRONMENT.md) and explicit ulimits. A user's own CONTAINERS_CONF wins.
CONTAINERS_CONF = ROOT / "tests" / "containers.conf"


@pytest.fixture(scope="module")
def env():
    need("podman", "runc", "debootstrap")
    need_root("the Podman tests run rootful podman, which")
    offset = free_port_block(10) - 7100
    while offset > 50000:   # mesh.port_offset's ceiling; the port blocks wrap around to lower ports
        offset = free_port_block(10) - 7100
    e = dict(os.environ, MESH_IMAGE=IMAGE, MESH_PORT_OFFSET=str(offset), COLUMNS="200")
    e.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    e.setdefault("MESH_PODMAN_OPTS", "")
    return e


def script(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "podman_build.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def podman(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *shlex.split(env["MESH_PODMAN_OPTS"]), *args], env=env, capture_output=True,
                          text=True)


def local_config(env):
    return load_config(ROOT / "config" / "local.yaml", environ=env)


def test_build_deploy_status_logs_redeploy_restart_down(env):
    if podman(env, "image", "exists", BASE).returncode != 0:
        r = script(env, "base", "--tag", BASE)
        assert r.returncode == 0, r.stdout + r.stderr
    r = script(env, "build", "--offline", "--base", BASE)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = local_config(env)
    try:
        r = script(env, "deploy", "local", "--timeout", "90")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "core: ready" in r.stdout and "tools: ready" in r.stdout
        assert r.stdout.index("mesh-local-core") < r.stdout.index("mesh-local-tools")  # dependency order
        assert fetch_status(cfg).mesh_state == "ready"

        st = script(env, "status", "local")
        assert st.returncode == 0, st.stdout + st.stderr
        assert "mesh-local-core" in st.stdout and "running" in st.stdout

        inspect = json.loads(podman(env, "inspect", "mesh-local-core").stdout)[0]
        assert inspect["Config"]["User"] == "mesh"
        ids = {n: podman(env, "inspect", n, "--format", "{{.Id}}").stdout for n in ("mesh-local-core", "mesh-local-tools")}

        logs = script(env, "logs", "core", "echo", timeout=60)
        assert logs.returncode == 0, logs.stderr
        lines = logs.stdout.splitlines()
        assert any(line.startswith("mesh-local-core | twin") for line in lines), logs.stdout
        assert any(line.startswith("mesh-local-tools | echo") for line in lines), logs.stdout

        again = script(env, "deploy", "local")
        assert again.returncode == 0 and again.stdout.count("unchanged") == len(cfg.groups), again.stdout
        assert ids == {n: podman(env, "inspect", n, "--format", "{{.Id}}").stdout for n in ids}

        assert podman(env, "healthcheck", "run", "mesh-local-core").returncode == 0

        pid = int(podman(env, "inspect", "mesh-local-tools", "--format", "{{.State.Pid}}").stdout)
        os.kill(pid, signal.SIGKILL)  # the group's process dies: Podman's restart policy brings it back
        wait_for(lambda: int(podman(env, "inspect", "mesh-local-tools", "--format", "{{.State.Pid}}").stdout or 0)
                 not in (0, pid), timeout=30, what="container restarted")
        wait_for(lambda: fetch_status(cfg, timeout=1).mesh_state == "ready", timeout=60, what="mesh ready again")
        assert podman(env, "inspect", "mesh-local-tools", "--format", "{{.RestartCount}}").stdout.strip() != "0"
    finally:
        down = script(env, "down", "local", "--volumes")
    assert down.returncode == 0, down.stdout + down.stderr
    left = podman(env, "ps", "--all", "--filter", "label=mesh.host=local", "--format", "{{.Names}}").stdout.split()
    assert left == []
    assert podman(env, "volume", "exists", "mesh-local-data").returncode != 0


def test_kube_yaml_is_played_by_podman(env, tmp_path):
    if podman(env, "image", "exists", IMAGE).returncode != 0:
        pytest.skip("runs after the build test (image missing)")
    r = script(env, "kube", "local")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "local.yaml"
    path.write_text(r.stdout)
    cfg = local_config(env)
    try:
        play = podman(env, "kube", "play", str(path))
        assert play.returncode == 0, play.stderr
        wait_for(lambda: fetch_status(cfg, timeout=1).mesh_state == "ready", timeout=60, what="agents ready under kube play")
        placed = {a.agent: a.pid for a in fetch_status(cfg).agents}
        assert set(placed) == set(cfg.agents) == {"twin", "echo", "crawler", "extractor", "topics", "curiosity", "vram"}
    finally:
        down = podman(env, "kube", "down", str(path))
        podman(env, "volume", "rm", "--force", "mesh-local-data")
    assert down.returncode == 0, down.stderr
    assert podman(env, "pod", "ps", "--filter", "label=app=agent-mesh", "--format", "{{.Name}}").stdout.split() == []


def test_mainpc_and_pc2_in_podman_on_two_lab_hosts(env, tmp_path):
    """Each host's groups deployed with podman_build.sh inside its lab namespace, CURVE on, then the
    connectivity check from MainPC."""
    from testing.lab import Lab, available

    ok, why = available()
    if not ok:
        missing(why)
    if podman(env, "image", "exists", IMAGE).returncode != 0:
        pytest.skip("runs after the build test (image missing)")
    keys = tmp_path / "keys"
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "meshctl") if (ROOT / ".venv").exists() else "meshctl",
                        "keys", "generate", "mainpc", "pc2", "--keys-dir", str(keys)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    keys.chmod(0o755)
    for f in (keys / "private").iterdir():
        f.chmod(0o644)  # read by the containers' non-root user through the read-only mount
    (keys / "private").chmod(0o755)
    with Lab(("mainpc", "pc2")) as lab:
        a, b = lab.hosts["mainpc"].address, lab.hosts["pc2"].address
        e = dict(env, MAINPC_ADDRESS=a, PC2_ADDRESS=b, MAINPC_BIND=a, PC2_BIND=b, MESH_KEYS_DIR=str(keys))
        e.pop("MESH_PORT_OFFSET", None)
        run = lambda host, *args, timeout=300: lab.run(host, [str(ROOT / "podman_build.sh"), *args],  # noqa: E731
                                                        cwd=ROOT, env=e, timeout=timeout)
        try:
            # MainPC first: PC2's groups wait, through deploy, until the twin on MainPC says they are ready
            d_main = run("mainpc", "deploy", "mainpc", "--no-gpu", "--timeout", "90")
            assert d_main.returncode == 0, d_main.stdout + d_main.stderr
            d_pc2 = run("pc2", "deploy", "pc2", "--timeout", "90")
            assert d_pc2.returncode == 0, d_pc2.stdout + d_pc2.stderr
            check = lab.run("mainpc", [sys.executable, "test_pc2_connectivity.py", "--json", "--probes", "20"],
                            cwd=ROOT, env=e, timeout=120)
            report = json.loads(check.stdout)
            assert check.returncode == 0 and report["ok"], [c for c in report["checks"] if c["status"] == "fail"]
            assert any(c["check"] == "curve" and c["status"] == "pass" for c in report["checks"])
            print(d_main.stdout, d_pc2.stdout, f"connectivity: {len(report['checks'])} checks passed", sep="\n")
        finally:
            for host in ("pc2", "mainpc"):
                run(host, "down", host, "--volumes")
    left = podman(env, "ps", "--all", "--filter", "label=mesh.group", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in left if n.startswith(("mesh-mainpc-", "mesh-pc2-"))]
