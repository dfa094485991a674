"""podman_build.sh with real Podman: base image, both images built offline (the CPU one without torch) and
the CPU image online from a package index, deploy local with its secrets, status, logs, the boot units, a
redeploy that changes nothing, a killed container coming back, down leaving nothing, kube play, and MainPC
and PC2 on two lab hosts with keys from `meshctl keys generate` used as they are."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version

import pytest
import yaml

from mesh.config import load_config
from mesh.control import fetch_status
from ops.deploy import kube_yaml, requirements
from testing.harness import ROOT, free_port_block, wait_for
from testing.system import missing, need, need_root

pytestmark = pytest.mark.slow

BASE = "localhost/mesh-base:bookworm"
IMAGE = "localhost/agent-mesh:test"           # MESH_IMAGE: the images are agent-mesh-cpu:test and agent-mesh-model:test
CPU_IMAGE, MODEL_IMAGE = "localhost/agent-mesh-cpu:test", "localhost/agent-mesh-model:test"
TOKEN = "a-dashboard-token-for-the-podman-test"


# The suite's Podman settings, whatever the machine's own containers.conf says: runc (crun fails on some
# hosts' cgroups, ../shared/ENVIRONMENT.md) and explicit ulimits. A user's own CONTAINERS_CONF wins.
CONTAINERS_CONF = ROOT / "tests" / "containers.conf"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    need("podman", "runc", "debootstrap")
    need_root("the Podman tests run rootful podman, which")
    offset = free_port_block(10) - 7100
    while offset > 50000:   # mesh.port_offset's ceiling; the port blocks wrap around to lower ports
        offset = free_port_block(10) - 7100
    e = dict(os.environ, MESH_IMAGE=IMAGE, MESH_PORT_OFFSET=str(offset), COLUMNS="200", MESH_DASHBOARD_TOKEN=TOKEN)
    e.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    e.setdefault("MESH_PODMAN_OPTS", "")
    e["MESH_SYSTEMD_DIR"] = str(tmp_path_factory.mktemp("units"))   # deploy's boot units: not into /etc here
    return e


def script(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "podman_build.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def podman(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *shlex.split(env["MESH_PODMAN_OPTS"]), *args], env=env, capture_output=True,
                          text=True)


def local_config(env):
    return load_config(ROOT / "config" / "local.yaml", environ=env)


def in_image(env, image: str, code: str) -> subprocess.CompletedProcess:
    return podman(env, "run", "--rm", "--entrypoint", "python", image, "-c", code)


@pytest.mark.timeout(2700)   # both images from scratch: about 12 min on 2 cores, more while other work runs
def need_images(env: dict, *images: str) -> None:
    """The tests below use the images the build test makes: without them they skip (fail under CI=true)."""
    absent = [i for i in images if podman(env, "image", "exists", i).returncode != 0]
    if absent:
        missing(f"runs after test_build_deploy_status_logs_redeploy_restart_down (images missing: {', '.join(absent)})")


def test_build_deploy_status_logs_redeploy_restart_down(env, tmp_path):
    if podman(env, "image", "exists", BASE).returncode != 0:
        r = script(env, "base", "--tag", BASE)
        assert r.returncode == 0, r.stdout + r.stderr
    r = script(env, "build", "--offline", "--base", BASE, timeout=2400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    print(*[line for line in r.stdout.splitlines() if line.startswith(("built ", "images: "))], sep="\n")
    # the CPU image runs the crawl and the extraction without torch; the model image has it
    cpu = in_image(env, CPU_IMAGE, "import importlib.util, agents.crawler.agent, agents.extractor.agent, agents.twin.agent;"
                                   "print([m for m in ('torch', 'llama_cpp', 'sentence_transformers', 'faiss')"
                                   " if importlib.util.find_spec(m)])")
    assert cpu.returncode == 0 and cpu.stdout.strip() == "[]", cpu.stdout + cpu.stderr
    model = in_image(env, MODEL_IMAGE, "import torch, llama_cpp, agents.topics.agent; print('ok')")
    assert model.returncode == 0 and model.stdout.strip() == "ok", model.stderr
    cfg = local_config(env)
    units = tmp_path / "units"
    e = dict(env, MESH_SYSTEMD_DIR=str(units))
    try:
        r = script(e, "deploy", "local", "--timeout", "120")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "core: ready" in r.stdout and "tools: ready" in r.stdout
        assert r.stdout.index("mesh-local-core") < r.stdout.index("mesh-local-tools")  # dependency order
        assert fetch_status(cfg).mesh_state == "ready"
        assert {c: podman(env, "inspect", f"mesh-local-{c}", "--format", "{{.ImageName}}").stdout.strip()
                for c in ("core", "crawl", "learn")} == {"core": CPU_IMAGE, "crawl": CPU_IMAGE, "learn": MODEL_IMAGE}

        # the dashboard token is a Podman secret file, readable by the agents' user only, not in the environment
        core = podman(env, "inspect", "mesh-local-core")
        assert core.returncode == 0 and TOKEN not in core.stdout
        seen = podman(env, "exec", "mesh-local-core", "sh", "-c",
                      "stat -c '%u %a' /run/secrets/mesh-dashboard-token; env | grep -c DASHBOARD_TOKEN=; "
                      "python -c \"from mesh.config import load_config; import os; "
                      "print(load_config(os.environ['MESH_CONFIG']).agents['twin'].settings['dashboard_token'])\"")
        assert seen.stdout.split() == ["10001", "400", "0", TOKEN], seen.stdout + seen.stderr

        # boot: one unit per group, each after the one before, as systemd reads them
        names = [f"container-mesh-local-{g}.service" for g in ("core", "tools", "crawl", "learn")]
        assert sorted(p.name for p in units.iterdir()) == sorted(names)
        learn = (units / names[-1]).read_text()
        assert "After=container-mesh-local-crawl.service" in learn and "podman start mesh-local-learn" in learn
        if shutil.which("systemd-analyze"):
            verify = subprocess.run(["systemd-analyze", "verify", *[str(units / n) for n in names]],
                                    capture_output=True, text=True)
            assert verify.returncode == 0, verify.stdout + verify.stderr

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
        down = script(e, "down", "local", "--volumes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert list(units.iterdir()) == []
    left = podman(env, "ps", "--all", "--filter", "label=mesh.host=local", "--format", "{{.Names}}").stdout.split()
    assert left == []
    assert podman(env, "volume", "exists", "mesh-local-data").returncode != 0


@pytest.mark.timeout(1800)
def test_cpu_image_builds_online_from_a_package_index(env, tmp_path):
    """The online build (no --offline): the dependencies come from a package index, here one served from a
    wheelhouse made on this machine (the build reaches no public index); the project from its own wheel."""
    need_images(env, BASE)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels),
                        *[q.split(";")[0] for q in requirements("cpu")]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    index = tmp_path / "index"   # PEP 503: one folder per project; http.server's listing is the page of links
    for wheel in wheels.glob("*.whl"):
        project = index / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()   # PEP 503's normalised name
        project.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, project / wheel.name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(index)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = "localhost/agent-mesh-cpu:online"
    try:
        b = script(dict(env, MESH_IMAGE="localhost/agent-mesh:online"), "build", "--role", "cpu", "--base", BASE,
                   "--index-url", f"http://127.0.0.1:{server.server_address[1]}/", timeout=1800)
        assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-2000:]
        assert QuietHandler.served, "the build took nothing from the index"
        got = in_image(env, image, "import importlib.metadata as m, agents.crawler.agent; print(m.version('agent-mesh'))")
        assert got.returncode == 0 and got.stdout.strip() == version("agent-mesh"), got.stdout + got.stderr
    finally:
        server.shutdown()
        podman(env, "rmi", "--force", image)


class QuietHandler(SimpleHTTPRequestHandler):
    served: list[str] = []

    def log_message(self, format: str, *args) -> None:   # noqa: A002 (the base class's name)
        QuietHandler.served.append(self.path)


def test_kube_yaml_is_played_by_podman(env, tmp_path):
    need_images(env, CPU_IMAGE, MODEL_IMAGE)
    r = script(env, "kube", "local")
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout   # referred to, not carried
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(r.stdout)}
    twin = docs["mesh-local-core"]["spec"]["containers"][0]
    assert {"name": "MESH_DASHBOARD_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mesh-local-secrets",
                                                                            "key": "MESH_DASHBOARD_TOKEN"}}} in twin["env"]
    assert twin["image"] == CPU_IMAGE and docs["mesh-local-learn"]["spec"]["containers"][0]["image"] == MODEL_IMAGE
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
        podman(env, "secret", "rm", "mesh-local-secrets")
    assert down.returncode == 0, down.stderr
    assert podman(env, "pod", "ps", "--filter", "label=app=agent-mesh", "--format", "{{.Name}}").stdout.split() == []


STATEFULSET_PROBE = """\
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: mesh-statefulset-probe}
spec:
  serviceName: mesh-statefulset-probe
  replicas: 1
  selector: {matchLabels: {app: mesh-statefulset-probe}}
  template:
    metadata: {labels: {app: mesh-statefulset-probe}}
    spec: {containers: [{name: probe, image: localhost/mesh-no-such-image:probe}]}
"""


def test_kube_pool_as_a_statefulset_is_played_by_podman(env, tmp_path):
    """`kube` writes a pool as a StatefulSet; played where this Podman takes one (the YAML itself is checked in
    test_deploy.py). Podman 4.3 to 5.x play no StatefulSet: alone in a file it is refused (`does not contain any
    supported kube kind`), beside Pods it is skipped without a word, so the test says so and skips."""
    need("podman")
    need_root("the Podman tests run rootful podman, which")
    probe = tmp_path / "probe.yaml"
    probe.write_text(STATEFULSET_PROBE)
    r = podman(env, "kube", "play", "--start=false", str(probe))
    podman(env, "kube", "down", str(probe))
    if "supported kube kind" in r.stderr:
        pytest.skip(f"this Podman ({podman(env, 'version', '--format', '{{.Client.Version}}').stdout.strip()}) "
                    "plays no StatefulSet (Podman 4.3 to 5.x take Pod, Deployment, DaemonSet, Job, ...): a pool's "
                    "StatefulSet runs on a cluster; the YAML is checked in tests/test_deploy.py")
    need_images(env, CPU_IMAGE, MODEL_IMAGE)
    data = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    data["agents"]["echo"]["replicas"] = 2     # the pool echo-1, echo-2 in the tools group
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "local.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "config" / "local.yaml", environ=env)
    text, _ = kube_yaml(cfg, "local", no_gpu=True)
    docs = list(yaml.safe_load_all(text))
    for d in docs:   # the pool's config, mounted over the image's
        spec = d["spec"]["template"]["spec"] if d["kind"] == "StatefulSet" else d["spec"] if d["kind"] == "Pod" else None
        if spec is not None:
            spec["volumes"].append({"name": "config", "hostPath": {"path": str(tmp_path / "config"), "type": "Directory"}})
            spec["containers"][0]["volumeMounts"].append({"name": "config", "mountPath": "/app/config", "readOnly": True})
    path = tmp_path / "kube.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    try:
        play = podman(env, "kube", "play", str(path))
        assert play.returncode == 0, play.stderr
        wait_for(lambda: fetch_status(cfg, timeout=1).mesh_state == "ready", timeout=90, what="the pool ready")
        assert {"echo-1", "echo-2"} <= {a.agent for a in fetch_status(cfg).agents if a.state == "ready"}
    finally:
        podman(env, "kube", "down", str(path))
        podman(env, "volume", "rm", "--force", "mesh-local-data")
        podman(env, "secret", "rm", "mesh-local-secrets")


def test_mainpc_and_pc2_in_podman_on_two_lab_hosts(env, tmp_path):
    """Each host's groups deployed with podman_build.sh inside its lab namespace, CURVE on, then the
    connectivity check from MainPC."""
    from testing.lab import Lab, available

    ok, why = available()
    if not ok:
        missing(why)
    need_images(env, CPU_IMAGE, MODEL_IMAGE)
    keys = tmp_path / "keys"
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "meshctl") if (ROOT / ".venv").exists() else "meshctl",
                        "keys", "generate", "mainpc", "pc2", "--keys-dir", str(keys)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    modes = {p: p.stat().st_mode & 0o777 for p in [keys / "private", *(keys / "private").iterdir()]}
    assert set(modes.values()) <= {0o700, 0o600}
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
    # the secret keys were used as they are: nothing made them readable by others
    assert {p: p.stat().st_mode & 0o777 for p in modes} == modes
    left = podman(env, "ps", "--all", "--filter", "label=mesh.group", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in left if n.startswith(("mesh-mainpc-", "mesh-pc2-"))]


PACKAGES = ("agents", "mesh", "network", "store", "ops")
ROLLING = """\
# a pool of two echo agents beside the twin: what the rolling-upgrade test deploys
mesh:
  name: local
  base_port: 7100
  heartbeat_interval_s: 1.0
  dead_after_missed: 3
  drain_timeout_s: 10
  data_dir: ${MESH_DATA_DIR:-data}
  port_offset: ${MESH_PORT_OFFSET:-0}
security:
  curve: off
  keys_dir: ${MESH_KEYS_DIR:-keys}
hosts:
  local: {address: 127.0.0.1}
groups:
  core: {host: local, agents: [twin]}
  tools: {host: local, agents: [echo]}
agents:
  twin: {kind: digital_twin}
  echo: {kind: echo, depends_on: [twin], replicas: 2}
"""


@pytest.mark.timeout(900)
def test_deploy_with_a_changed_image_replaces_a_pools_replicas_one_at_a_time(env, tmp_path):
    """A pool's replicas run one to a container (mesh-local-tools-echo-1, -2); deploy with a changed image replaces
    them one at a time (ops.rolling: `podman stop` drains one, its successor must be ready before the next), so
    one replica is ready throughout. The images are the CPU image with this checkout's packages copied over the
    installed project's and a label of their own (no rebuild; the CPU image may predate pools)."""
    need_images(env, CPU_IMAGE)
    conf = tmp_path / "config"
    conf.mkdir()
    (conf / "local.yaml").write_text(ROLLING)
    conf.chmod(0o755)   # read inside the containers by their user, mesh (uid 10001)
    (conf / "local.yaml").chmod(0o644)
    image = "localhost/agent-mesh-rolling-cpu:test"
    e = dict(env, MESH_IMAGE="localhost/agent-mesh-rolling:test", MESH_CONFIG_DIR=str(conf),
             MESH_SYSTEMD_DIR=str(tmp_path / "units"),
             MESH_PODMAN_RUN_OPTS=f"{env.get('MESH_PODMAN_RUN_OPTS', '')} --volume {conf}:/app/config:ro".strip())
    cfg = load_config(conf / "local.yaml", environ=e)
    names = ["mesh-local-core", "mesh-local-tools-echo-1", "mesh-local-tools-echo-2"]

    context = tmp_path / "context"
    site = "/opt/mesh/lib/python3.11/site-packages"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))

    def new_image(generation: int) -> str:
        (context / "Containerfile").write_text(f"FROM {CPU_IMAGE}\n" + "".join(
            f"COPY {p} {site}/{p}\n" for p in PACKAGES) + f"LABEL mesh.test.generation={generation}\n")
        r = podman(e, "build", "--format", "docker", "--file", str(context / "Containerfile"), "--tag", image,
                   str(context))
        assert r.returncode == 0, r.stderr
        return podman(e, "image", "inspect", image, "--format", "{{.Id}}").stdout.strip()

    def image_of(name: str) -> str:
        return podman(e, "inspect", name, "--format", "{{.Image}}").stdout.strip()

    readings: list[tuple[float, set[str] | None]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                ready = {a.agent for a in fetch_status(cfg, timeout=1).agents if a.state in ("ready", "degraded")}
            except Exception:
                ready = None
            readings.append((time.time(), ready))
            time.sleep(0.2)

    try:
        first = new_image(1)
        r = script(e, "deploy", "local", "--timeout", "120")
        assert r.returncode == 0, r.stdout + r.stderr + podman(e, "logs", "mesh-local-core").stderr[-2000:]
        assert {n: image_of(n) for n in names} == dict.fromkeys(names, first)
        labels = json.loads(podman(e, "inspect", "mesh-local-tools-echo-2").stdout)[0]["Config"]["Labels"]
        assert labels["mesh.agents"] == "echo-2" and labels["mesh.pool"] == "echo" and labels["mesh.group"] == "tools"
        st = script(e, "status", "local")
        assert st.returncode == 0 and all(n in st.stdout for n in names), st.stdout

        second = new_image(2)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        proc = subprocess.Popen([str(ROOT / "podman_build.sh"), "deploy", "local", "--timeout", "120"], cwd=ROOT,
                                env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.time(), line.rstrip()) for line in proc.stdout]
        assert proc.wait(60) == 0, "\n".join(line for _, line in lines)
        stop.set()
        watcher.join(5)
        out = [line for _, line in lines]
        print(*out, sep="\n")
        at = {line.strip(): t for t, line in lines}
        order = ["echo-1: draining (the pool keeps echo-2)", "echo-2: draining (the pool keeps echo-1)"]
        assert all(o in at for o in order), out
        e1_ready = next(t for t, line in lines if line.strip().startswith("echo-1: ready after"))
        assert at[order[0]] < e1_ready < at[order[1]], out   # the second waited for the first's successor
        assert "  tools: changed, replacing mesh-local-tools-echo-1, mesh-local-tools-echo-2 one at a time" in out, out
        # from the first drain to the end of the deploy an echo replica was ready whenever the twin answered
        during = [ready for t, ready in readings if t >= at[order[0]] and ready is not None]
        assert during and all(ready & {"echo-1", "echo-2"} for ready in during), during
        assert {n: image_of(n) for n in names} == dict.fromkeys(names, second)
        assert fetch_status(cfg).mesh_state == "ready"

        again = script(e, "deploy", "local")
        assert again.returncode == 0 and again.stdout.count("unchanged") == 3, again.stdout
    finally:
        stop.set()
        down = script(e, "down", "local", "--volumes")
        podman(e, "rmi", "--force", image)
    assert down.returncode == 0, down.stdout + down.stderr
    assert podman(e, "ps", "--all", "--filter", "label=mesh.host=local", "--format", "{{.Names}}").stdout.split() == []
