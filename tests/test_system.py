"""The README's test path on a machine that lacks the Debian packages: scripts/test names the apt-get
line, and the suites that need the packages skip with it as reason (never error), or fail under CI=true."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testing.harness import ROOT
from testing.lab import available, netem_available
from testing.system import REQUIREMENTS, reason

LAB_TOOLS = ("ip", "nsenter", "ethtool")


@pytest.fixture
def open_tmp():
    """A temporary folder every user can read (pytest's own is root's only), for runs as another user."""
    d = Path(tempfile.mkdtemp(prefix="mesh-test-system-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def path_without(tmp_path: Path, hidden: tuple[str, ...]) -> str:
    """A PATH of one folder that links every command on this PATH but `hidden` (readable by every user)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = os.path.join(d, name)
            if name not in hidden and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def run_lab_tests(tmp_path: Path, env: dict[str, str], *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsfE", "--no-header", "-q",
           "--basetemp", str(tmp_path / "inner"), str(ROOT / "tests" / "test_lab.py"), *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def base_env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = path
    return env


def lab_tests(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("SKIPPED", "ERROR", "FAILED", "PASSED"))]


def test_the_lab_tests_skip_with_the_apt_line_when_its_tools_are_missing(tmp_path):
    r = run_lab_tests(tmp_path, base_env(path_without(tmp_path, LAB_TOOLS)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " error" not in r.stdout.splitlines()[-1] and "failed" not in r.stdout.splitlines()[-1], r.stdout[-3000:]
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped, r.stdout[-3000:]
    if os.geteuid() == 0:
        want = "apt-get install -y iproute2"
        assert all(want in line for line in skipped), skipped
    else:
        assert all("needs root" in line for line in skipped), skipped


def test_the_lab_over_a_userspace_wire_skips_with_the_apt_line_without_ethtool(tmp_path):
    """Where the kernel has no netem, the 50 ms lab runs over the userspace wire, which needs ethtool."""
    ok, why = available()
    if not ok:
        pytest.skip(f"the lab cannot run here at all: {why}")
    if netem_available()[0]:
        pytest.skip("this kernel has netem: the 50 ms lab needs no userspace wire, so no ethtool")
    r = run_lab_tests(tmp_path, base_env(path_without(tmp_path, ("ethtool",))), "-k", "50ms")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("apt-get install -y ethtool" in line for line in skipped), r.stdout[-3000:]
    assert "error" not in r.stdout.splitlines()[-1], r.stdout[-3000:]


def test_the_lab_tests_fail_under_ci_when_its_tools_are_missing(tmp_path):
    env = base_env(path_without(tmp_path, LAB_TOOLS))
    env["CI"] = "true"
    r = run_lab_tests(tmp_path, env)
    assert r.returncode != 0
    assert "SKIPPED" not in r.stdout, r.stdout[-3000:]
    assert "apt-get install -y iproute2" in r.stdout or "needs root" in r.stdout, r.stdout[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the suite as another user, which needs root")
def test_the_lab_tests_skip_for_a_user_who_is_not_root(open_tmp):
    nobody = pwd.getpwnam("nobody")
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    readable = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                               "test", "-r", str(cfg)], capture_output=True)
    if readable.returncode != 0:
        # e.g. a checkout under /root (mode 0700): the venv's python, run as nobody, cannot read its pyvenv.cfg
        # and falls back to the system Python without pytest
        pytest.skip(f"the user nobody cannot read {cfg} (a checkout in a private home such as /root): "
                    f"clone into a directory others can read, as CI does, to run this test")
    env = base_env(os.environ["PATH"])
    env["HOME"] = str(open_tmp)
    r = run_lab_tests(open_tmp, env, user=str(nobody.pw_uid))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("run scripts/test as root" in line for line in skipped), r.stdout[-3000:]


def test_scripts_test_names_the_missing_packages_for_a_user_who_is_not_root(open_tmp):
    """The part of scripts/test that installs the packages, run with the lab's tools hidden: as root it would
    install them; as another user it prints the one apt-get line."""
    env = base_env(path_without(open_tmp, LAB_TOOLS))
    cmd = ["bash", "-c", "source scripts/_debs.sh"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to run the script as another user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "apt-get install -y" in x)
    packages = line.split("apt-get install -y ", 1)[1].split()
    assert {"iproute2", "util-linux", "ethtool"} <= set(packages)
    here = {req.package for req in REQUIREMENTS.values() if req.probe not in LAB_TOOLS and req.present()}
    assert not here & set(packages), "only what is missing is named"


def test_every_reason_names_its_apt_line():
    for probe, req in REQUIREMENTS.items():
        assert f"apt-get install -y {req.package}" in reason(probe)


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_test_that_writes_into_the_repository_fails_the_run_under_ci(tmp_path, ci):
    leak = ROOT / f"leak-{os.getpid()}-{ci or 'dev'}.out"
    test = tmp_path / "test_leak.py"
    test.write_text(f"from pathlib import Path\n\ndef test_leaks():\n    Path({str(leak)!r}).write_text('x')\n")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
                            "-c", os.devnull, str(test)], cwd=ROOT, env=dict(os.environ, CI=ci),
                           capture_output=True, text=True, timeout=120)
    finally:
        leak.unlink(missing_ok=True)
    assert "1 passed" in r.stdout, r.stdout + r.stderr
    assert f"changed the repository tree (git status): ?? {leak.name}" in r.stdout, r.stdout
    assert r.returncode == (1 if ci else 0), r.stdout
