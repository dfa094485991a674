"""Shared fixtures: real configs on free ports, agents in threads, `meshctl up` as a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from mesh.config import MeshConfig, load_config
from testing.harness import AgentThread, MeshUp, wait_for

pytest_plugins = ["tests.services"]  # real PostgreSQL and Redis servers (fixtures for tests/test_stores.py)

ROOT = Path(__file__).resolve().parent.parent
_TREE = pytest.StashKey[set[str] | None]()   # the checkout's `git status` when the run started


def _tree_status() -> set[str] | None:
    """`git status --porcelain` of the checkout (what git would show as changed or new), or None outside git."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                       text=True)
    return set(r.stdout.splitlines()) if r.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TREE] = _tree_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test writes into the repository: what `git status` shows after the run that it did not show before
    fails the run under CI=true (a clean clone), and is reported otherwise (someone may be editing meanwhile)."""
    before = session.config.stash.get(_TREE, None)
    after = _tree_status()
    if before is None or after is None or not (new := sorted(after - before)):
        return
    ci = os.environ.get("CI", "").lower() == "true"
    what = f"the test run changed the repository tree (git status): {', '.join(new[:20])}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", f"FAILED: {what}" if ci else f"warning: {what}", red=ci, yellow=not ci)
    if ci:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., tuple[Path, MeshConfig]]:
    """Writes a config dict to tmp_path/mesh.yaml (data_dir inside tmp_path) and loads it."""

    def write(data: dict, name: str = "mesh.yaml") -> tuple[Path, MeshConfig]:
        data.setdefault("mesh", {}).setdefault("data_dir", str(tmp_path / "data"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path, load_config(path)

    return write


@pytest.fixture
def run_agents():
    """start(config, *names) runs agents on threads; all are stopped at the end of the test."""
    started: list[AgentThread] = []

    def start(config: MeshConfig, *names: str) -> list[AgentThread]:
        out = [AgentThread(config, n) for n in names]
        started.extend(out)
        return out

    yield start
    for a in reversed(started):
        if a.thread.is_alive():
            a.stop()


@pytest.fixture
def mesh_up(tmp_path: Path):
    started: list[MeshUp] = []

    def start(config_path: Path, *args: str) -> MeshUp:
        m = MeshUp(config_path, *args, out=tmp_path / f"meshctl-up-{len(started)}.out")
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


PYDOC = Path("/usr/share/doc/python3/html")


@pytest.fixture(scope="module")
def pydoc_site():
    """Debian's python3-doc (about 530 HTML pages) served by `python -m http.server` on loopback: its base URL."""
    from testing.system import missing, reason

    if not (PYDOC / "index.html").exists():
        missing(reason("python3-doc"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(PYDOC),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.5).close() or True, what="http.server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
