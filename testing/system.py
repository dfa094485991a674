"""The Debian packages the suites use (scripts/debian-packages), and what a test does when one is missing.

`scripts/test` run as root installs every missing package first; run as another user it prints the
`apt-get install` line and goes on. A test that needs a package calls `need("ethtool")` (or
`missing(reason)` for other gaps): it skips with the apt line as reason, or fails under ``CI=true``,
where every suite must really run.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES_FILE = Path(__file__).resolve().parent.parent / "scripts" / "debian-packages"


@dataclass(frozen=True)
class Requirement:
    probe: str      # a command on PATH, or an absolute path glob
    package: str
    why: str

    def present(self) -> bool:
        if self.probe.startswith("/"):
            return bool(glob.glob(self.probe))
        return shutil.which(self.probe) is not None


def _load() -> dict[str, Requirement]:
    reqs: dict[str, Requirement] = {}
    for line in PACKAGES_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        probe, package, why = line.split(None, 2)
        reqs[probe] = reqs[package] = Requirement(probe, package, why)
    return reqs


REQUIREMENTS = _load()


def apt_line(*packages: str) -> str:
    return f"apt-get install -y {' '.join(packages)}"


def reason(probe: str, command: str | None = None) -> str:
    """Why a test that needs `probe` (a command, path or package named in scripts/debian-packages) cannot run;
    `command`: another command of the same package that is missing."""
    r = REQUIREMENTS[probe]
    what = f"`{command or r.probe}`" if not r.probe.startswith("/") else r.probe
    return f"{what} is missing ({r.why}): {apt_line(r.package)} (scripts/test installs it when run as root)"


def missing(reason: str) -> None:
    """Skips the test, or fails it under CI=true (where every suite must really run)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def need_modules(*modules: str) -> None:
    """At a test module's top: skips the whole module (fails under CI=true) unless every Python module imports;
    they come with the `model` extra, which scripts/test installs."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            why = f"{exc} (the model extra: `pip install -e '.[model,test]'`, which scripts/test does)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(why, pytrace=False)
            pytest.skip(why, allow_module_level=True)


def need(*probes: str) -> None:
    """Skips (fails under CI=true) unless every named command, path or package is here."""
    for probe in probes:
        if not REQUIREMENTS[probe].present():
            missing(reason(probe))


def need_root(what: str) -> None:
    """Skips (fails under CI=true) unless this process runs as root."""
    if os.geteuid() != 0:
        missing(f"{what} needs root: run scripts/test as root (it also installs the Debian packages)")
