"""Podman deployment, driven by podman_build.sh: one container per container group, and one per replica of a pool.

    python -m ops.deploy base [--tag IMAGE]
    python -m ops.deploy build [--offline] [--base IMAGE] [--role cpu|model] [--index-url URL] [GROUP...]
    python -m ops.deploy deploy HOST [--no-gpu] [--timeout S]
    python -m ops.deploy down HOST [--volumes]
    python -m ops.deploy status HOST
    python -m ops.deploy logs [-f] NAME...
    python -m ops.deploy kube HOST [--no-gpu]
    python -m ops.deploy monitoring HOST [--port 9090] [--grafana] [--down]

Exit status: 0 done, 1 `status` found a group not running, 2 something the operator has to fix
(`error: ...` on stderr says what) or bad arguments.

Every group runs the one image with `meshctl up --host HOST --only <its agents>` on the host's
network, with its data on the named volume `mesh-HOST-data` and the keys directory mounted
read-only. Groups start in dependency order, each only after the twin reports its agents ready
(or waiting only on groups not started yet). A container is replaced only when its image, the
config or its options changed, so running deploy again is safe.

The replicas of a pool that a group lists run one to a container, `mesh-HOST-GROUP-REPLICA` (`meshctl up --only
REPLICA`), so that they can be replaced one at a time: changed, they are replaced by ops.rolling.roll, each
drained (`podman stop`: SIGTERM, the agent finishes or hands back what it holds) and its successor ready before
the next is stopped, so the pool keeps working through an upgrade.

Podman options a host needs come from the environment: MESH_PODMAN_OPTS (global options, e.g.
`--runtime runc`) and MESH_PODMAN_RUN_OPTS (added to every `podman run`, e.g.
`--ulimit nofile=1024:1024 --ulimit nproc=1024:1024`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from mesh.config import ConfigError, MeshConfig, load_config
from mesh.control import fetch_status
from mesh.runtime import check_kinds, resolve
from network.rpc import MeshError
from ops.monitoring import SHIPPED_DASHBOARD, SHIPPED_RULES, render
from ops.rolling import RollError, roll

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("MESH_IMAGE", "localhost/agent-mesh:latest")
DEFAULT_BASE = "docker.io/library/python:3.11-slim"
CDI_SPECS = ("/etc/cdi/nvidia.yaml", "/etc/cdi/nvidia.json", "/var/run/cdi/nvidia.yaml", "/var/run/cdi/nvidia.json")
READY = ("ready", "degraded")


class DeployError(Exception):
    """Something the operator has to fix; the message says what."""


def say(text: str) -> None:
    print(text, flush=True)


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess:
    if shutil.which("podman") is None:
        raise DeployError("podman is not installed: apt-get install -y podman")
    cmd = ["podman", *shlex.split(os.environ.get("MESH_PODMAN_OPTS", "")), *args]
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise DeployError(f"{' '.join(cmd[:4])}... failed: {(r.stderr or '').strip()[-800:]}")
    return r


# --- build ---------------------------------------------------------------------------------------

# Markers are evaluated where pip runs: an offline wheelhouse is made on this machine, whose Python may be a
# later patch release than the image's (Debian 12: 3.11.2) that needs more (redis: async-timeout before 3.11.3).
OLDER_PYTHON_EXTRAS = ['async-timeout>=4.0.3; python_full_version < "3.11.3"']
ROLES = ("cpu", "model")   # the CPU image (core, crawl, extract) and the model image (the gpu group)


def image_of(role: str) -> str:
    """The image of a role: MESH_IMAGE's repository with -cpu or -model, and its tag
    (localhost/agent-mesh:latest -> localhost/agent-mesh-cpu:latest)."""
    repo, _, tag = IMAGE.rpartition(":") if ":" in IMAGE.rsplit("/", 1)[-1] else (IMAGE, "", "latest")
    return f"{repo}-{role}:{tag}"


def requirements(role: str) -> list[str]:
    """The image's dependencies, from pyproject.toml: the project's, and the `model` extra's for the model image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(project["optional-dependencies"]["model"] if role == "model" else []),
            *OLDER_PYTHON_EXTRAS]


def _image_size(image: str) -> int | None:
    r = podman("image", "inspect", image, "--format", "{{.Size}}", check=False)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip().isdigit() else None


def build(*, offline: bool, base: str, roles: tuple[str, ...] = ROLES, index_url: str | None = None) -> dict[str, int]:
    """Builds the images of `roles` from containers/Containerfile; returns their sizes in bytes.

    Offline: every wheel is made here (pip wheel) and the build installs with --no-index. Online: the build
    installs the dependencies from the package index (`index_url`, else PyPI), compiling what has no wheel
    in its builder stage. Either way the project itself comes as the wheel made here, by file name."""
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="mesh-build-") as tmp:
        project = Path(tmp) / "project"
        pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
        r = subprocess.run([*pip, "--no-deps", "--wheel-dir", str(project), str(ROOT)], capture_output=True, text=True)
        if r.returncode != 0:
            raise DeployError(f"pip wheel of the project failed: {r.stderr.strip()[-800:]}")
        for role in roles:
            ctx = Path(tmp) / role
            ctx.mkdir()
            shutil.copytree(project, ctx / "project")
            shutil.copytree(ROOT / "config", ctx / "config")
            shutil.copy2(ROOT / "test_pc2_connectivity.py", ctx / "test_pc2_connectivity.py")
            reqs = requirements(role)
            (ctx / "requirements.txt").write_text("\n".join(reqs) + "\n")
            (ctx / "deps").mkdir()
            if offline:
                say(f"{role} image: wheelhouse of {len(reqs)} requirement(s) and their dependencies")
                unmarked = [q.split(";")[0].strip() for q in reqs]   # the image's Python decides, at install
                r = subprocess.run([*pip, "--wheel-dir", str(ctx / "deps"), *unmarked], capture_output=True, text=True,
                                   env=dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=OFF")))
                if r.returncode != 0:
                    raise DeployError(f"pip wheel failed: {r.stderr.strip()[-800:]}")
            image = image_of(role)
            say(f"building {image} from {base}" + ("" if offline else f" (packages from {index_url or 'PyPI'})"))
            started = time.monotonic()
            args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"EXTRAS={'model' if role == 'model' else ''}",
                    "--build-arg", f"PIP_OPTS={'--no-index' if offline else ''}"]
            if index_url:
                args += ["--build-arg", f"PIP_INDEX_URL={index_url}", "--network", "host"]
            if os.environ.get("CMAKE_ARGS"):   # MainPC: CMAKE_ARGS="-DGGML_CUDA=on" builds llama.cpp for CUDA
                args += ["--build-arg", f"CMAKE_ARGS={os.environ['CMAKE_ARGS']}"]
            r = podman("build", "--format", "docker", "--file", str(ROOT / "containers" / "Containerfile"), *args,
                       "--tag", image, str(ctx), capture=False, check=False, timeout=3600)
            if r.returncode != 0:
                hint = "" if offline else " (no package index reachable from the build? try --offline)"
                raise DeployError(f"podman build of {image} failed{hint}")
            sizes[role] = _image_size(image) or 0
            say(f"built {image}: {sizes[role] / 1e6:.0f} MB in {time.monotonic() - started:.0f} s")
    return sizes


def base_image(tag: str) -> None:
    """Makes a Debian base image with Python 3.11 by debootstrap, for hosts that reach no image
    registry (the Debian mirror is taken from this machine's apt sources)."""
    if shutil.which("debootstrap") is None:
        raise DeployError("debootstrap is not installed: apt-get install -y debootstrap")
    mirror = "http://deb.debian.org/debian"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        found = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.M)
        mirror = found.group(1) if found else mirror
    with tempfile.TemporaryDirectory(prefix="mesh-rootfs-") as rootfs:
        say(f"debootstrap bookworm from {mirror} (about a minute)")
        r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                            "bookworm", rootfs, mirror], capture_output=True, text=True)
        if r.returncode != 0:
            raise DeployError(f"debootstrap failed: {r.stderr.strip()[-800:]}")
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", *shlex.split(os.environ.get("MESH_PODMAN_OPTS", "")), "import", "-", tag],
                             stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        if imp.returncode != 0:
            raise DeployError(f"podman import failed: {imp.stderr.strip()[-800:]}")
    say(f"base image {tag} ready: build with `podman_build.sh build --offline --base {tag}`")


# --- deploy --------------------------------------------------------------------------------------

def config_dir() -> Path:
    """Where deploy, status, down and kube read HOST.yaml: MESH_CONFIG_DIR, else config/ (the image has a copy of
    config/; a folder of one's own needs the same folder mounted over it, `MESH_PODMAN_RUN_OPTS="--volume
    DIR:/app/config:ro"`, as tests/test_podman.py does)."""
    return Path(os.environ.get("MESH_CONFIG_DIR") or ROOT / "config")


def _config(host: str) -> MeshConfig:
    path = config_dir() / f"{host}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(config_dir().glob("*.yaml")))
        raise DeployError(f"no config/{host}.yaml (hosts with a config: {known})")
    cfg = load_config(path, host=None)
    if cfg.host is None and len(cfg.hosts) == 1:
        cfg = load_config(path, host=next(iter(cfg.hosts)))
    check_kinds(cfg)
    return cfg


def group_order(cfg: MeshConfig, host: str) -> list[str]:
    """This host's non-empty groups, by the earliest start level of their agents."""
    level = {a: i for i, names in enumerate(cfg.start_order()) for a in names}
    groups = [g for g, grp in cfg.groups.items() if grp.host == host and grp.agents]
    return sorted(groups, key=lambda g: (min(level[a] for a in cfg.groups[g].agents), g))


def _groups_in(path: Path) -> set[str]:
    try:
        return set(load_config(path, host=None).groups)
    except ConfigError:
        return set()


def container_name(host: str, group: str, replica: str | None = None) -> str:
    """A group's container (its agents declared one by one), or the container of one replica of a pool it lists."""
    return f"mesh-{host}-{group}" + (f"-{replica}" if replica else "")


def _config_env() -> dict[str, str]:
    """Environment variables the config files refer to (${VAR}) that are set here."""
    names: set[str] = set()
    for path in config_dir().glob("*.yaml"):
        names |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    names -= {"MESH_DATA_DIR", "MESH_KEYS_DIR"}  # fixed inside the image
    return {n: os.environ[n] for n in sorted(names) if n in os.environ}


# Variables that go into a container as a Podman secret file (VAR_FILE, see mesh.config), never as --env: tokens,
# passwords, and URLs (a database URL carries its password).
SECRET_VAR = re.compile(r"(TOKEN|PASSWORD|SECRET|_URL)$")
SECRETS_DIR = "/run/secrets"
AGENT_UID = 10001   # the images' `mesh` user


def _existing(name: str) -> dict | None:
    r = podman("container", "inspect", name, check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)[0]


def _gpu_args(cfg: MeshConfig, group: str, no_gpu: bool) -> list[str]:
    if not cfg.groups[group].gpu or no_gpu:
        return []
    if not any(Path(p).exists() for p in CDI_SPECS):
        raise DeployError(f"group {group} wants the GPU but there is no NVIDIA CDI spec ({CDI_SPECS[0]}): "
                          "generate it with `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`, "
                          "or deploy on the CPU with --no-gpu")
    return ["--device", "nvidia.com/gpu=all"]


KUBE_GPU = "nvidia.com/gpu=all"   # the CDI device of every NVIDIA GPU (nvidia-ctk cdi generate)


def _wants_gpu(cfg: MeshConfig, group: str, no_gpu: bool, for_kube: bool) -> bool:
    try:
        return bool(_gpu_args(cfg, group, no_gpu))
    except DeployError as exc:
        if not for_kube:
            raise
        print(f"warning: {exc}; the YAML asks for {KUBE_GPU} all the same", file=sys.stderr)
        return True


@dataclass
class Secret:
    """One Podman secret of a host: its name, where it appears in the container, and a digest of its value
    (kept as the secret's label, so a changed value replaces the secret and the containers that use it)."""

    name: str
    target: str      # file name under /run/secrets
    env: str         # the variable that names the file inside the container
    value: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.value).hexdigest()[:16]

    @property
    def path(self) -> str:
        return f"{SECRETS_DIR}/{self.target}"


def host_secrets(cfg: MeshConfig, host: str, env: dict[str, str]) -> list[Secret]:
    """The host's CURVE secret key (when CURVE is on for it) and the secret-like config variables set here."""
    out = []
    if cfg.curve_enabled(host):
        sec = Path(cfg.security.keys_dir).resolve() / "private" / f"{host}.key_secret"
        try:
            value = sec.read_bytes()
        except FileNotFoundError:
            raise DeployError(f"CURVE is on for {host} but its secret key {sec} is missing: run "
                              f"`meshctl keys generate {host}` (or say `curve: off` in the config)") from None
        except OSError as exc:
            raise DeployError(f"cannot read {host}'s CURVE secret key {sec}: {exc.strerror} (deploy as the user "
                              f"who ran `meshctl keys generate {host}`; its mode stays as it is)") from None
        out.append(Secret(f"mesh-{host}-curve-secret", "curve-secret", "MESH_CURVE_SECRET_FILE", value))
    for var, value in env.items():
        if SECRET_VAR.search(var) and value:
            slug = var.lower().replace("_", "-")
            out.append(Secret(f"mesh-{host}-{slug}", slug, f"{var}_FILE", value.encode()))
    return out


def ensure_secrets(secrets: list[Secret], host: str, *, report=say) -> None:
    """Creates each Podman secret, or replaces it when its value changed (its label keeps the digest)."""
    for secret in secrets:
        r = podman("secret", "inspect", secret.name, "--format", "{{index .Spec.Labels \"mesh.digest\"}}",
                   check=False)
        if r.returncode == 0 and r.stdout.strip() == secret.digest:
            continue
        if r.returncode == 0:
            podman("secret", "rm", secret.name)
        cmd = ["podman", *shlex.split(os.environ.get("MESH_PODMAN_OPTS", "")), "secret", "create",
               "--label", f"mesh.host={host}", "--label", f"mesh.digest={secret.digest}", secret.name, "-"]
        created = subprocess.run(cmd, input=secret.value, capture_output=True, timeout=60)
        if created.returncode != 0:
            raise DeployError(f"podman secret create {secret.name} failed: {created.stderr.decode(errors='replace')}")
        report(f"  secret {secret.name}: {'replaced' if r.returncode == 0 else 'created'}")


@dataclass
class GroupSpec:
    """What one group's container is: the same for `podman run` (deploy) and a Pod (kube)."""

    host: str
    group: str
    agents: list[str]
    env: dict[str, str]          # plain settings only; secrets are in `secrets`
    secrets: list[Secret]
    command: list[str]
    public_keys: Path | None     # keys/public, mounted read-only (public keys only)
    gpu: bool
    role: str                    # "cpu" or "model": which image
    replica: str | None = None   # a replica of a pool, alone in its container (container_specs)

    @property
    def name(self) -> str:
        return container_name(self.host, self.group, self.replica)

    @property
    def volume(self) -> str:
        return f"mesh-{self.host}-data"

    @property
    def image(self) -> str:
        return image_of(self.role)


def group_role(cfg: MeshConfig, group: str) -> str:
    """The model image when one of the group's agents needs the `model` extra (its kind says so), else the CPU image."""
    return agents_role(cfg, cfg.groups[group].agents)


def agents_role(cfg: MeshConfig, agents: list[str]) -> str:
    return "model" if any(resolve(cfg.agents[a].kind).image == "model" for a in agents) else "cpu"


def group_specs(cfg: MeshConfig, host: str, *, no_gpu: bool, for_kube: bool = False) -> list[GroupSpec]:
    """The host's groups in start order. A GPU group without the host's CDI spec is an error for deploy; for
    kube (YAML that may run elsewhere) a warning, and the device is written all the same."""
    public = Path(cfg.security.keys_dir).resolve() / "public"
    config_env = _config_env()
    secrets = host_secrets(cfg, host, config_env)
    plain = {k: v for k, v in config_env.items() if not (SECRET_VAR.search(k) and v)}
    specs = []
    for group in group_order(cfg, host):
        agents = cfg.groups[group].agents
        env = {"MESH_CONFIG": f"config/{host}.yaml", "MESH_AGENTS": " ".join(agents),
               "MESH_LOG_STDERR": "1",   # agents' JSON lines in `podman logs` too, not only in /data/logs
               **plain}
        command = _up_command(host, agents)
        specs.append(GroupSpec(host=host, group=group, agents=agents, env=env, secrets=secrets, command=command,
                               public_keys=public if public.is_dir() else None,
                               gpu=_wants_gpu(cfg, group, no_gpu, for_kube), role=group_role(cfg, group)))
    return specs


def container_specs(cfg: MeshConfig, host: str, *, no_gpu: bool) -> list[GroupSpec]:
    """The host's containers in start order: each group's agents declared one by one in the group's container,
    and each replica of a pool the group lists in a container of its own (`meshctl up --only REPLICA`), so that
    deploy can replace the replicas one at a time (ops.rolling) while the others keep the pool working."""
    by_group = {s.group: s for s in group_specs(cfg, host, no_gpu=no_gpu)}
    return [replace(by_group[group], agents=agents, replica=replica, role=agents_role(cfg, agents),
                    env={**by_group[group].env, "MESH_AGENTS": " ".join(agents)}, command=_up_command(host, agents))
            for group, replica, agents in containers_of(cfg, host)]


def containers_of(cfg: MeshConfig, host: str) -> list[tuple[str, str | None, list[str]]]:
    """(group, replica or None, agents) of each of the host's containers, in start order (container_specs)."""
    out = []
    for group in group_order(cfg, host):
        agents = cfg.groups[group].agents
        single = [a for a in agents if cfg.pool_of(a) is None]
        if single:
            out.append((group, None, single))
        out += [(group, a, [a]) for a in agents if cfg.pool_of(a) is not None]
    return out


def _up_command(host: str, agents: list[str]) -> list[str]:
    return ["--config", f"config/{host}.yaml", "--host", host, *[x for a in agents for x in ("--only", a)]]


def run_args(spec: GroupSpec, cfg: MeshConfig) -> list[str]:
    """`podman run` options of a group's container (without --name and the image)."""
    return ["--network", "host", "--restart", "always", "--stop-timeout", str(int(cfg.mesh.drain_timeout_s) + 5),
            "--label", f"mesh.host={spec.host}", "--label", f"mesh.group={spec.group}",
            "--label", f"mesh.agents={' '.join(spec.agents)}", "--label", f"mesh.role={spec.role}",
            *(["--label", f"mesh.pool={cfg.pool_of(spec.replica)}"] if spec.replica else []),
            "--volume", f"{spec.volume}:/data:U",
            *[f"--env={k}={v}" for k, v in spec.env.items()],
            *[x for sec in spec.secrets for x in (
                "--secret", f"{sec.name},type=mount,target={sec.target},uid={AGENT_UID},gid={AGENT_UID},mode=0400",
                f"--env={sec.env}={sec.path}")],
            *(["--volume", f"{spec.public_keys}:/keys/public:ro"] if spec.public_keys else []),
            *(["--device", "nvidia.com/gpu=all"] if spec.gpu else []),
            *shlex.split(os.environ.get("MESH_PODMAN_RUN_OPTS", ""))]


def deploy(host: str, *, no_gpu: bool = False, timeout: float = 120.0) -> None:
    """Starts, or replaces where changed, the host's containers group by group in dependency order, each group
    once the twin reports its agents ready. A pool's replicas whose containers run and changed are replaced one
    at a time (ops.rolling.roll: drained, the successor ready, then the next); a replica that does not get ready
    stops the deploy with an error, leaving the rest running."""
    cfg = _config(host)
    specs = container_specs(cfg, host, no_gpu=no_gpu)
    image_ids = {}
    for role in sorted({s.role for s in specs}):
        image = podman("image", "inspect", image_of(role), "--format", "{{.Id}}", check=False)
        if image.returncode != 0:
            raise DeployError(f"image {image_of(role)} not found: run `podman_build.sh build` first")
        image_ids[role] = image.stdout.strip()
    groups = list(dict.fromkeys(s.group for s in specs))
    say(f"deploying host {host}: groups {', '.join(f'{g} ({_roles(specs, g)})' for g in groups)}")
    ensure_secrets(specs[0].secrets if specs else [], host)
    wanted = {s.name for s in specs}
    present = {c["Names"][0]: c.get("Labels") or {} for c in _containers(host)}
    started: set[str] = set()
    for group in groups:
        mine = [s for s in specs if s.group == group]
        for name in sorted(n for n, labels in present.items() if labels.get("mesh.group") == group and n not in wanted):
            # the group's containers as an earlier deploy made them (a pool's replicas in the group's container)
            say(f"  {group}: {name} is not deployed as such any more: removing it")
            podman("rm", "--force", "--time", str(int(cfg.mesh.drain_timeout_s)), name)
        rolling: list[tuple[GroupSpec, str]] = []
        for spec in mine:
            args = run_args(spec, cfg)
            digest = hashlib.sha256(json.dumps([image_ids[spec.role], cfg.model_dump(mode="json"), args,
                                                spec.command, [s.digest for s in spec.secrets]]).encode()).hexdigest()[:16]
            current = _existing(spec.name)
            if current and current["Config"]["Labels"].get("mesh.hash") == digest and current["State"]["Running"]:
                say(f"  {group}: unchanged, {spec.name} keeps running")
            elif current and current["State"]["Running"] and spec.replica:
                rolling.append((spec, digest))   # replaced one at a time, below
            else:
                if current:
                    say(f"  {group}: changed, replacing {spec.name}")
                    podman("rm", "--force", "--time", str(int(cfg.mesh.drain_timeout_s)), spec.name)
                _run(spec, cfg, digest)
                say(f"  {group}: started {spec.name} ({', '.join(spec.agents)})")
        if rolling:
            _roll(cfg, group, rolling, timeout)
        started |= {a for s in mine for a in s.agents}
        _wait_group(cfg, group, started, timeout)
    say(f"host {host} deployed: {len(groups)} group(s) up in {len(specs)} container(s)")
    install_units(host, specs, cfg)


def _roles(specs: list[GroupSpec], group: str) -> str:
    return ", ".join(sorted({s.role for s in specs if s.group == group}))


def _run(spec: GroupSpec, cfg: MeshConfig, digest: str) -> None:
    podman("run", "--detach", "--name", spec.name, "--label", f"mesh.hash={digest}", *run_args(spec, cfg),
           spec.image, *spec.command)


def _roll(cfg: MeshConfig, group: str, changed: list[tuple[GroupSpec, str]], timeout: float) -> None:
    """Replaces running replica containers one at a time (ops.rolling.roll): `podman stop` sends SIGTERM, so the
    replica drains (the coordinator sends it no more pages and hands what it held to the others) and exits, its
    container is removed, the new one started, and the next is stopped only once the twin reports it ready."""
    by_replica = {spec.replica: (spec, digest) for spec, digest in changed}
    say(f"  {group}: changed, replacing {', '.join(s.name for s, _ in changed)} one at a time")

    def stop(replica: str) -> None:
        spec = by_replica[replica][0]
        podman("stop", "--time", str(int(cfg.mesh.drain_timeout_s) + 5), spec.name,
               timeout=cfg.mesh.drain_timeout_s + 60)
        podman("rm", "--force", spec.name)

    def start(replica: str) -> None:
        spec, digest = by_replica[replica]
        _run(spec, cfg, digest)
        say(f"  {group}: started {spec.name}")

    try:
        roll(cfg, list(by_replica), stop=stop, start=start, timeout=timeout, report=say)
    except RollError as exc:
        raise DeployError(f"rolling replacement in group {group} stopped: {exc}. The containers not replaced yet "
                          f"keep running; see `podman_build.sh logs {group}`, fix it and deploy again") from None


def unit_dir() -> Path:
    """Where the boot units go: MESH_SYSTEMD_DIR, else the system's units (root) or the user's (rootless)."""
    if os.environ.get("MESH_SYSTEMD_DIR"):
        return Path(os.environ["MESH_SYSTEMD_DIR"])
    return Path("/etc/systemd/system") if os.geteuid() == 0 else Path.home() / ".config" / "systemd" / "user"


def unit_name(spec: GroupSpec) -> str:
    return f"container-{spec.name}.service"


def install_units(host: str, specs: list[GroupSpec], cfg: MeshConfig) -> list[Path]:
    """Systemd units that start the host's groups at boot, each after the one before it (`podman generate
    systemd`: they start the containers deploy made; Podman 4.3 to 5.x), enabled where systemd runs. The agents
    then wait on the twin's gate for what they depend on, as after a deploy."""
    target = unit_dir()
    target.mkdir(parents=True, exist_ok=True)
    written, previous = [], None
    for spec in specs:
        order = ["--after", previous, "--wants", previous] if previous else []
        r = podman("generate", "systemd", "--name", "--restart-policy", "always", "--no-header",
                   "--stop-timeout", str(int(cfg.mesh.drain_timeout_s) + 5), *order, spec.name)
        path = target / unit_name(spec)
        text = r.stdout.replace("Description=Podman ", f"Description=agent mesh {host}/{spec.group}: Podman ", 1)
        path.write_text(text)
        written.append(path)
        previous = unit_name(spec)
    stale = {p for p in target.glob(f"container-mesh-{host}-*.service")} - set(written)
    for path in stale:   # a group that is gone
        path.unlink()
    user = [] if target == Path("/etc/systemd/system") or os.geteuid() == 0 else ["--user"]
    if Path("/run/systemd/system").is_dir() and not os.environ.get("MESH_SYSTEMD_DIR"):
        subprocess.run(["systemctl", *user, "daemon-reload"], check=False)
        r = subprocess.run(["systemctl", *user, "enable", *[p.name for p in written]], capture_output=True, text=True)
        if r.returncode != 0:
            raise DeployError(f"systemctl enable failed: {r.stderr.strip()[-500:]}")
        say(f"boot: {len(written)} unit(s) in {target}, enabled: the groups start in this order at boot"
            + ("" if not user else " (rootless: `loginctl enable-linger` so they start before you log in)"))
    else:
        say(f"boot: {len(written)} unit(s) written to {target}; systemd is not running here, so nothing is enabled "
            f"(`systemctl{' --user' if user else ''} enable {' '.join(p.name for p in written)}` where it runs)")
    return written


def kube(host: str, *, no_gpu: bool = False) -> str:
    """Kubernetes YAML (one Pod per group, a StatefulSet per pool; host network, the data volume as a claim)
    that a cluster takes, and `podman kube play` too where it has no pool. Secrets are referred to, never carried:
    the Pods take them from the Secret `mesh-HOST-secrets` (env valueFrom.secretKeyRef), which this
    creates as a Podman secret for `podman kube play` (on a cluster: `kubectl create secret`)."""
    cfg = _config(host)
    text, secret = kube_yaml(cfg, host, no_gpu=no_gpu)
    if secret is not None:   # stdout is the YAML
        ensure_secrets([secret], host, report=lambda line: print(line.strip(), file=sys.stderr))
    pools = sorted({p for a in cfg.agents_on(host) if (p := cfg.pool_of(a))})
    if pools:
        print(f"warning: pool(s) {', '.join(pools)} are StatefulSets, which `podman kube play` skips (Podman 4.3 to "
              f"5.x plays no StatefulSet): play this on a cluster, or run the host with `podman_build.sh deploy "
              f"{host}`", file=sys.stderr)
    return text


KUBE_NAME = re.compile(r"[^a-z0-9-]")

# How a StatefulSet's pod learns which replica it runs: its name (the downward API, MESH_POD_NAME) ends in its
# ordinal, and the ordinals start at the host's first replica's number, so pod mesh-pc2-extractor-3 runs extractor-3.
REPLICA_SCRIPT = ('replica="{pool}-${{MESH_POD_NAME##*-}}"; export MESH_AGENTS="$replica"; '
                  'exec meshctl up "$@" --only "$replica"')


def kube_name(*parts: str) -> str:
    """A Kubernetes object name (DNS-1123: lower-case letters, digits and '-'), from agent or group names that
    may hold '_'."""
    return KUBE_NAME.sub("-", "-".join(parts))


def _kube_container(spec: GroupSpec, secret_name: str, agents: list[str], role: str) -> dict:
    """The container running `agents` of a group (a Pod's, or a StatefulSet's template's): the image of `role`,
    the group's plain settings and its secrets by reference."""
    env = {**spec.env, "MESH_AGENTS": " ".join(agents)}
    container = {
        "name": kube_name(spec.group), "image": image_of(role),
        "args": ["--config", f"config/{spec.host}.yaml", "--host", spec.host, *[x for a in agents for x in ("--only", a)]],
        "env": [{"name": k, "value": v} for k, v in env.items()]
               + [{"name": s.env.removesuffix("_FILE"),
                   "valueFrom": {"secretKeyRef": {"name": secret_name, "key": s.env.removesuffix("_FILE")}}}
                  for s in spec.secrets],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {"runAsUser": AGENT_UID, "runAsGroup": AGENT_UID},
    }
    if spec.public_keys:
        container["volumeMounts"].append({"name": "keys", "mountPath": "/keys/public", "readOnly": True})
    if spec.gpu:
        # A CDI device by its qualified name, as `podman kube play` takes it (Podman 5.4 and later; older ones
        # ignore it: deploy with `podman_build.sh deploy` there). A cluster's NVIDIA device plugin wants
        # `nvidia.com/gpu: 1` instead.
        container["resources"] = {"limits": {KUBE_GPU: 1}}
    return container


def _kube_pod_spec(spec: GroupSpec, container: dict) -> dict:
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": spec.volume}}]
    if spec.public_keys:
        volumes.append({"name": "keys", "hostPath": {"path": str(spec.public_keys), "type": "Directory"}})
    return {"hostNetwork": True, "restartPolicy": "Always", "containers": [container], "volumes": volumes}


def _kube_pool(spec: GroupSpec, cfg: MeshConfig, secret_name: str, pool: str, replicas: list[str]) -> list[dict]:
    """A pool's replicas on this host as one StatefulSet (and the headless Service it names): `replicas` pods,
    their ordinals starting at the host's first replica's number (spec.ordinals.start: Kubernetes 1.27 and later),
    so that the pods' names end like the replicas' (replicas are numbered per host without gaps), and each pod runs
    the replica its ordinal names (REPLICA_SCRIPT), with that replica's own ports."""
    numbers = [int(r.rsplit("-", 1)[1]) for r in replicas]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise DeployError(f"pool {pool}'s replicas on {spec.host} are not numbered without gaps ({', '.join(replicas)})"
                          ": a StatefulSet's ordinals could not name them")
    name = kube_name("mesh", spec.host, pool)
    role = "model" if resolve(cfg.pools[pool].kind).image == "model" else "cpu"
    container = _kube_container(spec, secret_name, [], role)
    container["env"] = [e for e in container["env"] if e["name"] != "MESH_AGENTS"]   # the script sets it
    container["env"].insert(0, {"name": "MESH_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    command = ["/bin/sh", "-c", REPLICA_SCRIPT.format(pool=pool), "meshctl"]   # "$@": the args, after meshctl up
    container = {"name": container.pop("name"), "image": container.pop("image"), "command": command, **container}
    selector = {"app": "agent-mesh", "mesh-host": spec.host, "mesh-pool": kube_name(pool)}
    labels = {**selector, "mesh-group": kube_name(spec.group)}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"clusterIP": "None", "selector": selector}}
    stateful = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": labels},
        "spec": {"serviceName": name, "replicas": len(replicas), "ordinals": {"start": numbers[0]},
                 "podManagementPolicy": "Parallel",    # the replicas start together; the twin's gate orders the mesh
                 "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": _kube_pod_spec(spec, container)}},
    }
    return [service, stateful]


def kube_yaml(cfg: MeshConfig, host: str, *, no_gpu: bool = False) -> tuple[str, Secret | None]:
    """The YAML of `kube`, and the Podman secret (a Kubernetes Secret document) its Pods refer to, if any. A group's
    agents declared one by one run in its Pod; each pool's replicas in it run as a StatefulSet of their own."""
    specs = group_specs(cfg, host, no_gpu=no_gpu, for_kube=True)
    secret_name = f"mesh-{host}-secrets"
    secrets = specs[0].secrets if specs else []
    secret = None
    if secrets:
        # what `podman kube play` reads from a Podman secret for secretKeyRef: the Secret's `data`, a JSON map of
        # key to base64 value (what playing a kind: Secret stores)
        data = {s.env.removesuffix("_FILE"): base64.b64encode(s.value).decode() for s in secrets}
        secret = Secret(secret_name, "", "", json.dumps(data, sort_keys=True).encode())
    docs = []
    for spec in specs:
        single = [a for a in spec.agents if cfg.pool_of(a) is None]
        pools: dict[str, list[str]] = {}
        for agent in spec.agents:
            if cfg.pool_of(agent) is not None:
                pools.setdefault(cfg.pool_of(agent), []).append(agent)
        if single:
            metadata = {"name": spec.name, "labels": {"app": "agent-mesh", "mesh-host": host, "mesh-group": spec.group}}
            role = "model" if any(resolve(cfg.agents[a].kind).image == "model" for a in single) else "cpu"
            container = _kube_container(spec, secret_name, single, role)
            docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                         "spec": _kube_pod_spec(spec, container)})
        for pool, replicas in pools.items():
            docs += _kube_pool(spec, cfg, secret_name, pool, replicas)
    header = (f"# Kubernetes YAML for host {host}, made by `podman_build.sh kube {host}`.\n"
              f"# Deploy: podman kube play FILE; remove: podman kube down FILE.\n"
              + (f"# Secrets come from the Secret {secret_name} (made here as a Podman secret; on a cluster create it "
                 f"with kubectl).\n" if secrets else "")
              + ("# Pools are StatefulSets (Kubernetes 1.27 or later: spec.ordinals.start), which podman kube play "
                 "skips: on Podman, deploy with `podman_build.sh deploy`.\n"
                 if any(d["kind"] == "StatefulSet" for d in docs) else ""))
    return header + yaml.safe_dump_all(docs, sort_keys=False), secret


def _wait_group(cfg: MeshConfig, group: str, started: set[str], timeout: float) -> None:
    """Until the twin reports the group's agents ready, or waiting only on agents not started yet."""
    agents = cfg.groups[group].agents
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            status = {a.agent: a for a in fetch_status(cfg, timeout=1.0).agents}
            pending = [a for a in agents if status[a].state not in READY
                       and not (status[a].state == "waiting" and set(status[a].waiting_on) - started)]
            waiting_for = "; ".join(f"{a} {status[a].state}" + (f" on {', '.join(status[a].waiting_on)}"
                                                                   if status[a].waiting_on else "") for a in pending)
        except MeshError as exc:
            pending, waiting_for = agents, f"the twin ({cfg.twin} at {cfg.endpoint(cfg.twin)}) does not answer: {exc.message}"
        if not pending:
            say(f"  {group}: ready")
            return
        if waiting_for != last:
            say(f"  {group}: waiting: {waiting_for}")
            last = waiting_for
        if time.monotonic() > deadline:
            raise DeployError(f"group {group} not ready after {timeout:.0f}s: {waiting_for}. "
                              f"See `podman_build.sh logs {group}`")
        time.sleep(0.5)


# --- down, status, logs --------------------------------------------------------------------------

def _containers(host: str | None = None) -> list[dict]:
    filters = ["--filter", f"label=mesh.host={host}"] if host else ["--filter", "label=mesh.group"]
    r = podman("ps", "--all", "--format", "json", *filters)
    return json.loads(r.stdout or "[]")


def down(host: str, *, volumes: bool = False) -> None:
    cfg = _config(host)
    names = [container_name(host, g, r) for g, r, _ in reversed(containers_of(cfg, host))]
    present = {n for c in _containers(host) for n in c["Names"]}
    for name in [n for n in names if n in present] + sorted(present - set(names)):
        say(f"stopping {name}")
        podman("rm", "--force", "--time", str(int(cfg.mesh.drain_timeout_s)), name)
    for path in unit_dir().glob(f"container-mesh-{host}-*.service"):
        if Path("/run/systemd/system").is_dir() and not os.environ.get("MESH_SYSTEMD_DIR"):
            subprocess.run(["systemctl", *([] if os.geteuid() == 0 else ["--user"]), "disable", path.name],
                           capture_output=True, check=False)
        path.unlink()
        say(f"removed boot unit {path.name}")
    secrets = [n for n in podman("secret", "ls", "--format", "{{.Name}}", check=False).stdout.split()
               if n.startswith(f"mesh-{host}-")]
    for name in secrets:   # made again from the keys and the environment by the next deploy
        podman("secret", "rm", name, check=False)
    if secrets:
        say(f"removed {len(secrets)} Podman secret(s) of {host}")
    if volumes:
        podman("volume", "rm", "--force", f"mesh-{host}-data", check=False)
        say(f"removed volume mesh-{host}-data")
    say(f"host {host} is down" + ("" if volumes else f" (data kept in volume mesh-{host}-data)"))


def status(host: str) -> int:
    cfg = _config(host)
    by_name = {c["Names"][0]: c for c in _containers(host)}
    table = Table(title=f"host {host}", title_justify="left")
    for col in ("group", "container", "state", "health", "agents", "ports (rpc)"):
        table.add_column(col)
    ok = True
    for group, replica, agents in containers_of(cfg, host):
        name = container_name(host, group, replica)
        c = by_name.get(name)
        state = c["State"] if c else "absent"
        health = "-"
        if c:
            h = podman("inspect", name, "--format", "{{.State.Health.Status}}", check=False).stdout.strip()
            health = h or "-"
        ok &= state == "running"
        table.add_row(group, name, state, health, ", ".join(agents), ", ".join(str(cfg.port(a, "rpc")) for a in agents))
    Console().print(table)
    for role in sorted({group_role(cfg, g) for g in group_order(cfg, host)}):
        size = _image_size(image_of(role))
        say(f"image {image_of(role)}: " + (f"{size / 1e6:.0f} MB" if size else "not built (podman_build.sh build)"))
    return 0 if ok else 1


def logs(names: list[str], *, follow: bool, host: str | None = None) -> None:
    """Agents' logs from inside their containers (meshctl logs), several containers at once."""
    targets: dict[str, list[str]] = {}
    containers = _containers(host)
    for wanted in names:
        found = False
        for c in containers:
            labels = c.get("Labels") or {}
            agents = labels.get("mesh.agents", "").split()
            if wanted in (labels.get("mesh.group"), c["Names"][0]) or wanted in agents:
                chosen = agents if wanted not in agents else [wanted]
                targets.setdefault(c["Names"][0], [])
                targets[c["Names"][0]] += [a for a in chosen if a not in targets[c["Names"][0]]]
                found = True
        if not found:
            raise DeployError(f"no deployed group, container or agent named {wanted!r}")
    procs = []
    for name, agents in targets.items():
        cmd = ["podman", *shlex.split(os.environ.get("MESH_PODMAN_OPTS", "")), "exec", name, "meshctl", "logs",
               *agents, "--config", _env_of(name, "MESH_CONFIG"), *(["--follow"] if follow else [])]
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))

    def pump(name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"{name} | {line}", end="", flush=True)

    threads = [threading.Thread(target=pump, args=p, daemon=True) for p in procs]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        for _, proc in procs:
            proc.terminate()


def _env_of(container: str, var: str) -> str:
    env = json.loads(podman("inspect", container, "--format", "json").stdout)[0]["Config"]["Env"]
    return next((e.split("=", 1)[1] for e in env if e.startswith(f"{var}=")), "config/local.yaml")


# --- monitoring ----------------------------------------------------------------------------------

MONITORING_IMAGE = os.environ.get("MESH_MONITORING_IMAGE", "localhost/mesh-prometheus:latest")
GRAFANA_IMAGE = os.environ.get("MESH_GRAFANA_IMAGE", "docker.io/grafana/grafana:latest")
MESH_BASE = "localhost/mesh-base:bookworm"


def monitoring_name(host: str, what: str = "prometheus") -> str:
    return f"mesh-{host}-{what}"


def build_monitoring(base: str = MESH_BASE) -> None:
    """Builds MONITORING_IMAGE: Debian's prometheus package on `base` (containers/monitoring/Containerfile)."""
    if podman("image", "exists", base, check=False).returncode != 0:
        raise DeployError(f"base image {base} not found: make it with `podman_build.sh base` (or pass --base IMAGE, "
                          "a Debian image whose apt reaches a mirror)")
    say(f"building {MONITORING_IMAGE} from {base} (apt-get install prometheus)")
    r = podman("build", "--format", "docker", "--file", str(ROOT / "containers" / "monitoring" / "Containerfile"),
               "--build-arg", f"BASE_IMAGE={base}", "--tag", MONITORING_IMAGE, str(ROOT / "containers" / "monitoring"),
               capture=False, check=False, timeout=1800)
    if r.returncode != 0:
        raise DeployError("podman build of the Prometheus image failed (can the build reach the Debian mirror in "
                          "the base image's /etc/apt/sources.list?)")
    say(f"built {MONITORING_IMAGE}")


def monitoring_files(host: str, out: Path) -> Path:
    """Writes the scrape config of HOST's config (this environment's addresses) and the shipped rules.yml
    into `out`, the folder mounted into the Prometheus container; returns the config's path."""
    cfg = _config(host)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.yml").write_text(SHIPPED_RULES.read_text())
    path = out / "prometheus.yml"
    path.write_text(render(cfg, source=f"config/{host}.yaml"))
    return path


def _http_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def monitoring(host: str, *, port: int = 9090, retention: str = "15d", base: str = MESH_BASE, rebuild: bool = False,
               grafana: bool = False, grafana_port: int = 3000, timeout: float = 60.0) -> None:
    """Runs Prometheus (container mesh-HOST-prometheus, host network, port `port`) scraping every agent of
    the mesh, with the alert rules; with `grafana`, Grafana too when its image is present here."""
    files = Path(os.environ.get("MESH_MONITORING_DIR") or ROOT / "data" / "monitoring").resolve() / host
    config = monitoring_files(host, files)
    if rebuild or podman("image", "exists", MONITORING_IMAGE, check=False).returncode != 0:
        build_monitoring(base)
    image_id = podman("image", "inspect", MONITORING_IMAGE, "--format", "{{.Id}}").stdout.strip()
    name = monitoring_name(host)
    args = ["--network", "host", "--restart", "always", "--label", f"mesh.host={host}",
            "--label", "mesh.role=monitoring",
            "--volume", f"{files}:/etc/mesh-prometheus:ro", "--volume", f"mesh-{host}-prometheus:/prometheus:U",
            *shlex.split(os.environ.get("MESH_PODMAN_RUN_OPTS", ""))]
    command = ["--config.file=/etc/mesh-prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
               f"--storage.tsdb.retention.time={retention}", f"--web.listen-address=:{port}", "--web.enable-lifecycle"]
    digest = hashlib.sha256(json.dumps([image_id, config.read_text(), (files / "rules.yml").read_text(), args,
                                        command]).encode()).hexdigest()[:16]
    current = _existing(name)
    if current and current["Config"]["Labels"].get("mesh.hash") == digest and current["State"]["Running"]:
        say(f"monitoring: unchanged, {name} keeps running")
    else:
        if current:
            say(f"monitoring: changed, replacing {name}")
            podman("rm", "--force", "--time", "10", name)
        podman("run", "--detach", "--name", name, "--label", f"mesh.hash={digest}", *args, MONITORING_IMAGE, *command)
        say(f"monitoring: started {name} (config {config}, rules rules.yml beside it)")
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            targets = _http_json(f"{base_url}/api/v1/targets?state=active")["data"]["activeTargets"]
            if targets and all(t["health"] != "unknown" for t in targets):
                break
        except OSError:
            targets = []
        if time.monotonic() > deadline:
            raise DeployError(f"Prometheus in {name} is not answering at {base_url} after {timeout:.0f}s: "
                              f"see `podman logs {name}`")
        time.sleep(1.0)
    up = [t for t in targets if t["health"] == "up"]
    say(f"monitoring: Prometheus at {base_url}, {len(up)}/{len(targets)} target(s) up")
    for t in targets:
        if t["health"] != "up":
            say(f"  down: {t['labels'].get('agent')} at {t['scrapeUrl']}: {t.get('lastError', '')}")
    if grafana:
        _grafana(host, files, prometheus_url=base_url, port=grafana_port)


def _grafana(host: str, files: Path, *, prometheus_url: str, port: int) -> None:
    """Grafana with the dashboard and a Prometheus data source provisioned, if its image is here."""
    if podman("image", "exists", GRAFANA_IMAGE, check=False).returncode != 0:
        say(f"grafana: skipped: image {GRAFANA_IMAGE} is not present on this machine (no registry pull here). "
            f"Import {SHIPPED_DASHBOARD.relative_to(ROOT)} into your Grafana (docs/OPERATIONS.md, \"Monitoring\"), "
            "or `podman load` the image and run this again (MESH_GRAFANA_IMAGE names another one)")
        return
    prov = files / "grafana"
    (prov / "datasources").mkdir(parents=True, exist_ok=True)
    (prov / "dashboards").mkdir(parents=True, exist_ok=True)
    (prov / "datasources" / "mesh.yaml").write_text(json.dumps({"apiVersion": 1, "datasources": [{
        "name": "Prometheus", "type": "prometheus", "uid": "mesh-prometheus", "access": "proxy",
        "url": prometheus_url, "isDefault": True}]}, indent=2))
    (prov / "dashboards" / "mesh.yaml").write_text(json.dumps({"apiVersion": 1, "providers": [{
        "name": "agent-mesh", "type": "file", "options": {"path": "/etc/grafana/provisioning/dashboards"}}]}, indent=2))
    shutil.copy2(SHIPPED_DASHBOARD, prov / "dashboards" / SHIPPED_DASHBOARD.name)
    name = monitoring_name(host, "grafana")
    if _existing(name):
        podman("rm", "--force", "--time", "10", name)
    podman("run", "--detach", "--name", name, "--network", "host", "--restart", "always",
           "--label", f"mesh.host={host}", "--label", "mesh.role=monitoring", "--env", f"GF_SERVER_HTTP_PORT={port}",
           "--volume", f"{prov}:/etc/grafana/provisioning:ro", "--volume", f"mesh-{host}-grafana:/var/lib/grafana:U",
           *shlex.split(os.environ.get("MESH_PODMAN_RUN_OPTS", "")), GRAFANA_IMAGE)
    say(f"grafana: started {name} at http://127.0.0.1:{port} (dashboard \"Agent mesh\", admin/admin at first login)")


def monitoring_down(host: str, *, volumes: bool = False) -> None:
    for what in ("grafana", "prometheus"):
        name = monitoring_name(host, what)
        if _existing(name):
            say(f"stopping {name}")
            podman("rm", "--force", "--time", "10", name)
        if volumes:
            podman("volume", "rm", "--force", f"mesh-{host}-{what}", check=False)
    say(f"monitoring of host {host} is down" + ("" if volumes else " (its data volumes kept)"))


# --- command line --------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Podman deployment of the mesh: one container per container group of a host, and one per pool replica.")
HostArg = typer.Argument(..., metavar="HOST", help="the host to act on: its config is config/HOST.yaml "
                                                   "(mainpc, pc2, local)")


@contextmanager
def operator_errors() -> Iterator[None]:
    """Something the operator has to fix (DeployError, ConfigError): `error: ...` on stderr, exit status 2."""
    try:
        yield
    except (DeployError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


@app.command("base")
def base_cmd(tag: str = typer.Option(MESH_BASE, "--tag", help="name of the image to make")) -> None:
    """make a local Debian base image with debootstrap (no registry needed)"""
    with operator_errors():
        base_image(tag)


@app.command("build")
def build_cmd(groups: Optional[list[str]] = typer.Argument(
                  None, metavar="GROUP",
                  help="build only the images these groups run (default: both images)"),
              offline: bool = typer.Option(False, "--offline",
                                           help="install every package from a wheelhouse made here"),
              base: str = typer.Option(os.environ.get("MESH_BASE_IMAGE", DEFAULT_BASE), "--base",
                                       help="base image"),
              role: Optional[str] = typer.Option(None, "--role", help="cpu or model: build only that image"),
              index_url: Optional[str] = typer.Option(None, "--index-url",
                                                      help="package index for an online build (default PyPI)")) -> None:
    """build the CPU image (core, crawl, extract) and the model image (the gpu group)"""
    with operator_errors():
        roles = set(ROLES)
        if groups:
            known = {g: (path.stem, g) for path in sorted((ROOT / "config").glob("*.yaml")) for g in _groups_in(path)}
            unknown = sorted(set(groups) - set(known))
            if unknown:
                raise DeployError(f"unknown group(s) {', '.join(unknown)}; groups in config/: {', '.join(sorted(known))}")
            roles = {group_role(load_config(ROOT / "config" / f"{known[g][0]}.yaml", host=None), g) for g in groups}
        if role is not None:
            if role not in ROLES:
                raise DeployError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
            roles &= {role}
        sizes = build(offline=offline, base=base, roles=tuple(r for r in ROLES if r in roles), index_url=index_url)
        say("images: " + ", ".join(f"{image_of(r)} {n / 1e6:.0f} MB" for r, n in sizes.items()))


@app.command("deploy")
def deploy_cmd(host: str = HostArg,
               no_gpu: bool = typer.Option(False, "--no-gpu", help="run GPU groups on the CPU"),
               timeout: float = typer.Option(120.0, "--timeout", help="seconds to wait for each group")) -> None:
    """start HOST's groups in dependency order (changed pool replicas one at a time)"""
    with operator_errors():
        deploy(host, no_gpu=no_gpu, timeout=timeout)


@app.command("down")
def down_cmd(host: str = HostArg,
             volumes: bool = typer.Option(False, "--volumes", help="remove the data volume too")) -> None:
    """stop and remove HOST's containers"""
    with operator_errors():
        down(host, volumes=volumes)


@app.command("kube")
def kube_cmd(host: str = HostArg,
             no_gpu: bool = typer.Option(False, "--no-gpu", help="leave out GPU requests")) -> None:
    """Kubernetes YAML for HOST's groups (podman kube play FILE)"""
    with operator_errors():
        print(kube(host, no_gpu=no_gpu), end="")


@app.command("status")
def status_cmd(host: str = HostArg) -> None:
    """groups, containers, health, ports"""
    with operator_errors():
        code = status(host)
    raise typer.Exit(code)


@app.command("logs")
def logs_cmd(names: list[str] = typer.Argument(..., metavar="GROUP|AGENT",
                                               help="deployed groups, containers or agents"),
             follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines")) -> None:
    """agents' logs, prefixed by container"""
    with operator_errors():
        logs(names, follow=follow)


@app.command("monitoring")
def monitoring_cmd(host: str = HostArg,
                   port: int = typer.Option(9090, "--port", help="Prometheus port on the host network"),
                   retention: str = typer.Option("15d", "--retention", help="how long Prometheus keeps samples"),
                   base: str = typer.Option(MESH_BASE, "--base",
                                            help="Debian base image for the Prometheus image"),
                   rebuild: bool = typer.Option(False, "--rebuild",
                                                help="build the Prometheus image even if it exists"),
                   grafana: bool = typer.Option(False, "--grafana",
                                                help="also run Grafana with the dashboard, if its image is here"),
                   grafana_port: int = typer.Option(3000, "--grafana-port", help="Grafana port on the host network"),
                   down_: bool = typer.Option(False, "--down",
                                              help="stop and remove the monitoring containers instead"),
                   volumes: bool = typer.Option(False, "--volumes",
                                                help="with --down: remove their data volumes too")) -> None:
    """Prometheus (and Grafana when its image is here) scraping every agent"""
    with operator_errors():
        if down_:
            monitoring_down(host, volumes=volumes)
        else:
            monitoring(host, port=port, retention=retention, base=base, rebuild=rebuild, grafana=grafana,
                       grafana_port=grafana_port)


def main(argv: list[str] | None = None) -> int:
    """Runs one command (argv, default sys.argv[1:]); returns the exit status: 0 done, 1 `status` found a
    group not running, 2 something the operator has to fix (the message says what) or bad arguments."""
    try:
        app(args=argv, prog_name="podman_build.sh")
    except SystemExit as exc:  # typer (click) always ends by raising it, with the status
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
