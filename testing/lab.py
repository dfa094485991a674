"""A network lab: two (or more) hosts on one machine, for tests across a real network boundary.

Each host is a network namespace with its own loopback and one end of a veth pair on a private
/30, so host A reaches host B at B's address over a real (virtual) link that the lab can cut,
restore, and shape with latency or loss. Processes run inside a host with `nsenter --net`
(not `ip netns exec`, which remounts /sys and breaks runc's cgroups).

With `wire=True` the two hosts are not joined directly: each veth leads into a middle
namespace where `testing.wire` forwards frames between them in userspace, so latency and loss
can be added on kernels without the netem qdisc (needs ethtool, to turn offloads off).

Needs root and iproute2. Everything the lab made is removed by `close()` (also from `with`,
and at interpreter exit), including processes it started; `sweep()` removes leftovers of a
lab that was killed before it could clean up.
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from testing.system import reason

PREFIX = "meshlab"


class LabUnavailable(Exception):
    """The lab cannot run here; the message says why (not root, no iproute2, ...)."""


def available(*, wire: bool = False) -> tuple[bool, str]:
    """Whether a lab can run here (`wire`: one with the userspace wire, which needs ethtool), and if not why."""
    if os.geteuid() != 0:
        return False, "the network lab needs root (network namespaces): run scripts/test as root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return False, reason(tool)
    if wire and shutil.which("ethtool") is None:
        return False, reason("ethtool")
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


@functools.lru_cache(maxsize=1)
def netem_available() -> tuple[bool, str]:
    """Whether this kernel has the netem qdisc (latency and loss)."""
    ok, why = available()
    if not ok:
        return ok, why
    with Lab(("a", "b")) as lab:
        r = lab._tc("a", ["qdisc", "add", "dev", lab.hosts["a"].dev, "root", "netem", "delay", "1ms"], check=False)
    if r.returncode != 0:
        return False, f"this kernel has no netem qdisc (tc said: {r.stderr.strip()})"
    return True, ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def sweep() -> list[str]:
    """Deletes namespaces left by labs whose process is gone. Returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit():
            pid = int(parts[1])
            try:
                os.kill(pid, 0)
                continue  # its lab is still running
            except ProcessLookupError:
                pass
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class LabHost:
    name: str
    netns: str
    dev: str
    address: str

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"


@dataclass
class Lab:
    """Two hosts joined by one veth link. `names` become the hosts' names (e.g. mainpc, pc2)."""

    names: tuple[str, str] = ("mainpc", "pc2")
    wire: bool = False
    hosts: dict[str, LabHost] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _closed: bool = True
    _wire_ns: str = ""
    _wire_devs: tuple[str, str] = ("", "")
    _wire_proc: subprocess.Popen | None = None

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> Lab:
        ok, why = available()
        if not ok:
            raise LabUnavailable(why)
        sweep()
        tag = f"{os.getpid()}-{random.randrange(1 << 16):04x}"
        subnet = random.randrange(0, 1 << 14)  # 10.200.0.0/16 cut into /30s
        base = (10 << 24) | (200 << 16) | (subnet << 2)
        a, b = self.names
        devs = (f"veth{tag[-4:]}a", f"veth{tag[-4:]}b")
        for i, name in enumerate(self.names):
            addr = base + 1 + i
            self.hosts[name] = LabHost(name=name, netns=f"{PREFIX}-{tag}-{name}", dev=devs[i],
                                       address=".".join(str((addr >> s) & 255) for s in (24, 16, 8, 0)))
        self._closed = False
        atexit.register(self.close)
        try:
            for h in self.hosts.values():
                _ip("netns", "add", h.netns)
                _ip("-n", h.netns, "link", "set", "lo", "up")
            if self.wire:
                self._build_wire(tag)
            else:
                _ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
            for h in self.hosts.values():
                _ip("link", "set", h.dev, "netns", h.netns)
                _ip("-n", h.netns, "addr", "add", f"{h.address}/30", "dev", h.dev)
                _ip("-n", h.netns, "link", "set", h.dev, "up")
            if self.wire:
                for h in self.hosts.values():
                    self._offloads_off(h.netns, h.dev)
                self._start_wire(0, 0)
        except Exception:
            self.close()
            raise
        return self

    def _build_wire(self, tag: str) -> None:
        if shutil.which("ethtool") is None:
            raise LabUnavailable(reason("ethtool"))
        self._wire_ns = f"{PREFIX}-{tag}-wire"
        self._wire_devs = (f"wire{tag[-4:]}a", f"wire{tag[-4:]}b")
        _ip("netns", "add", self._wire_ns)
        for h, wdev in zip(self.hosts.values(), self._wire_devs, strict=True):
            _ip("link", "add", h.dev, "type", "veth", "peer", "name", wdev)
            _ip("link", "set", wdev, "netns", self._wire_ns)
            _ip("-n", self._wire_ns, "link", "set", wdev, "up")
            self._offloads_off(self._wire_ns, wdev)

    @staticmethod
    def _offloads_off(netns: str, dev: str) -> None:
        subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "--", "ethtool", "-K", dev, "tx", "off", "rx", "off",
                        "tso", "off", "gso", "off", "gro", "off"], capture_output=True, check=True)

    def _start_wire(self, delay_ms: float, loss_pct: float) -> None:
        if self._wire_proc is not None:
            self._wire_proc.terminate()
            self._wire_proc.wait(5)
        self._wire_proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self._wire_ns}", "--", sys.executable, "-m", "testing.wire",
             *self._wire_devs, "--delay-ms", str(delay_ms), "--loss-pct", str(loss_pct)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._procs.append(self._wire_proc)
        line = self._wire_proc.stdout.readline()
        if not line.startswith("wire "):
            raise RuntimeError(f"the lab's wire did not start (exit {self._wire_proc.poll()})")

    # --- running things inside a host --------------------------------------------------------

    def command(self, host: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.hosts[host].netns_path}", "--", *argv]

    def spawn(self, host: str, argv: list[str], **popen) -> subprocess.Popen:
        """Starts a process inside `host`; it is killed by close() if still running."""
        popen.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(host, argv), **popen)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(host, argv), **kwargs)

    # --- the link --------------------------------------------------------------------------------

    def cut(self) -> None:
        """Takes the link down on both ends: nothing crosses, nothing is refused (like a pulled cable)."""
        for h in self.hosts.values():
            _ip("-n", h.netns, "link", "set", h.dev, "down")

    def restore(self) -> None:
        for h in self.hosts.values():
            _ip("-n", h.netns, "link", "set", h.dev, "up")
            _ip("-n", h.netns, "addr", "replace", f"{h.address}/30", "dev", h.dev)
        deadline = time.monotonic() + 5
        a, b = self.hosts.values()
        while time.monotonic() < deadline:  # wait for carrier on both ends
            states = [_ip("-n", h.netns, "-o", "link", "show", h.dev).stdout for h in (a, b)]
            if all("LOWER_UP" in s for s in states):
                return
            time.sleep(0.05)

    def shape(self, *, delay_ms: float = 0, loss_pct: float = 0) -> None:
        """Adds latency and/or loss in each direction (tc netem, or the userspace wire of a lab made
        with wire=True); shape() with no arguments clears it."""
        if self.wire:
            self._start_wire(delay_ms, loss_pct)
            return
        for h in self.hosts.values():
            self._tc(h.name, ["qdisc", "del", "dev", h.dev, "root"], check=False)
            if delay_ms or loss_pct:
                args = ["qdisc", "add", "dev", h.dev, "root", "netem"]
                if delay_ms:
                    args += ["delay", f"{delay_ms}ms"]
                if loss_pct:
                    args += ["loss", f"{loss_pct}%"]
                r = self._tc(h.name, args, check=False)
                if r.returncode != 0:
                    raise LabUnavailable(f"cannot shape the link: tc {' '.join(args)}: {r.stderr.strip()}")

    def _tc(self, host: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.command(host, ["tc", *args]), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)}: {r.stderr.strip()}")
        return r

    # --- clean-up --------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for h in self.hosts.values():
            _ip("netns", "del", h.netns, check=False)  # takes its end of the veth pair with it
        if self._wire_ns:
            _ip("netns", "del", self._wire_ns, check=False)
        atexit.unregister(self.close)

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (empty after close())."""
        names = {h.netns for h in self.hosts.values()} | ({self._wire_ns} if self._wire_ns else set())
        return [n for n in (Path("/run/netns").iterdir() if Path("/run/netns").exists() else []) if n.name in names]
