"""test_pc2_connectivity.py end to end on loopback: two real `meshctl up` processes, "mainpc" on
127.0.0.1 and "pc2" on 127.0.0.2, both running the shipped config/mesh.yaml (via `extends`, on
free ports) with CURVE keys, checked healthy, with pc2 holding the wrong key, and with pc2 down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mesh.config import load_config
from mesh.control import fetch_status
from network.security import generate
from testing.harness import ROOT, free_port_block, wait_for

SCRIPT = ROOT / "test_pc2_connectivity.py"


def _loopback_2_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _loopback_2_works(), reason="127.0.0.2 is not a loopback address here (not Linux?)")


def host_config(tmp: Path, host: str, offset: int) -> Path:
    """tmp/<host>/<host>.yaml: the shipped two-host mesh, as `host`, on ports moved by `offset`."""
    d = tmp / host
    d.mkdir()
    path = d / f"{host}.yaml"
    path.write_text(f"extends: {ROOT / 'config' / 'mesh.yaml'}\n"
                    f"host: {host}\n"
                    f"mesh: {{port_offset: {offset}, data_dir: '{d / 'data'}'}}\n")
    return path


def connectivity(config: Path, *args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", "--config", str(config), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.stdout.strip(), f"no report (exit {r.returncode}); stderr:\n{r.stderr}"
    return r.returncode, json.loads(r.stdout)


def rows(report: dict, agent: str, check: str) -> dict:
    found = [c for c in report["checks"] if c["agent"] == agent and c["check"] == check]
    assert len(found) == 1, f"expected one {check!r} row for {agent}: {found}\n{json.dumps(report, indent=1)}"
    return found[0]


@pytest.mark.timeout(120)
def test_connectivity_script_on_two_loopback_hosts(tmp_path, monkeypatch, mesh_up):
    keys = tmp_path / "keys"
    for host in ("mainpc", "pc2"):
        generate(keys, host)
    for var, value in {"MAINPC_ADDRESS": "127.0.0.1", "MAINPC_BIND": "127.0.0.1", "PC2_ADDRESS": "127.0.0.2",
                       "PC2_BIND": "127.0.0.2", "MESH_KEYS_DIR": str(keys)}.items():
        monkeypatch.setenv(var, value)
    shipped = load_config(ROOT / "config" / "mainpc.yaml")
    raw = lambda agent, which: shipped.port(agent, which) - shipped.mesh.port_offset  # noqa: E731
    lowest = min(raw(a, w) for a in shipped.agents for w in ("rpc", "pub", "metrics"))
    offset = free_port_block() - lowest  # port_offset moves the whole shipped mesh onto a free block
    main_cfg, pc2_cfg = host_config(tmp_path, "mainpc", offset), host_config(tmp_path, "pc2", offset)
    cfg = load_config(main_cfg)
    assert cfg.curve_enabled("mainpc") and cfg.curve_enabled("pc2")
    port = cfg.port("probe-pc2", "rpc")
    assert cfg.endpoint("probe-pc2") == f"tcp://127.0.0.2:{port}" and port == raw("probe-pc2", "rpc") + offset

    mesh_up(main_cfg)
    pc2 = mesh_up(pc2_cfg)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="both hosts ready")

    # (a) healthy, from either side: every check passes, with measured round trips
    for config, me in ((main_cfg, "mainpc"), (pc2_cfg, "pc2")):
        code, report = connectivity(config)
        bad = [c for c in report["checks"] if c["status"] != "pass"]
        assert code == 0 and report["ok"] is True and not bad, json.dumps(bad or report, indent=1)
        assert report["from"] == me
        names = {(c["agent"], c["check"]) for c in report["checks"]}
        remote_probe = "probe-pc2" if me == "mainpc" else "probe-mainpc"
        for check in ("tcp rpc", "tcp pub", "tcp metrics", "curve", "curve: unknown key", "rpc", "clock",
                      "pub/sub pc2->mainpc", "pub/sub mainpc->pc2"):
            assert (remote_probe, check) in names, f"no {check!r} row for {remote_probe}"
        assert ("twin", "twin") in names and ("twin", "twin view") in names
        rpc = rows(report, remote_probe, "rpc")
        assert "p50" in rpc["value"] and "p99" in rpc["value"]
        assert 0 < rpc["data"]["p50_ms"] <= rpc["data"]["p99_ms"] and rpc["data"]["answered"] == 50
        assert abs(rows(report, remote_probe, "clock")["data"]["skew_s"]) < 0.5

    # (c) pc2 runs with a key pair that mainpc no longer has: its public key was regenerated after pc2 started
    generate(keys, "pc2", force=True)
    code, report = connectivity(main_cfg)
    assert code == 1 and report["ok"] is False
    curve = rows(report, "probe-pc2", "curve")
    assert curve["status"] == "fail" and "key mismatch" in curve["cause"], curve
    assert "meshctl keys list" in curve["fix"] and "keys/public/" in curve["fix"]
    assert rows(report, "probe-pc2", "rpc")["status"] == "skip"
    assert rows(report, "probe-pc2", "tcp rpc")["status"] == "pass"  # the port is open: only the keys are wrong

    # (b) pc2's mesh stopped: its ports are closed, and the report says the mesh is not running there
    assert pc2.stop() == 0
    code, report = connectivity(main_cfg, "--timeout", "1")
    assert code == 1 and report["ok"] is False
    tcp = rows(report, "probe-pc2", "tcp rpc")
    assert tcp["status"] == "fail" and tcp["data"]["reason"] == "refused", tcp
    assert f"nothing listens on 127.0.0.2:{port}" in tcp["cause"] and "mesh is not running on pc2" in tcp["cause"]
    assert tcp["fix"].startswith("start the mesh on pc2: meshctl up --config")
    for which in ("pub", "metrics"):
        assert rows(report, "probe-pc2", f"tcp {which}")["data"]["reason"] == "refused"
    assert rows(report, "twin", "twin")["status"] == "pass"  # mainpc itself is fine
    view = rows(report, "twin", "twin view")
    assert view["status"] == "fail" and "probe-pc2" in view["value"]


def probes_mesh(tmp: Path) -> tuple[Path, Path, Path]:
    """A small two-host mesh on loopback (mainpc 127.0.0.1: the twin and a probe; pc2 127.0.0.2: a probe), without
    keys: mainpc.yaml and pc2.yaml leave security.curve out (auto), mainpc-off.yaml says `curve: off`."""
    base = {"mesh": {"name": "plain", "base_port": free_port_block(addresses=("127.0.0.1", "127.0.0.2")),
                     "heartbeat_interval_s": 0.5},
            "hosts": {"mainpc": {"address": "127.0.0.1"}, "pc2": {"address": "127.0.0.2"}},
            "groups": {"core": {"host": "mainpc", "agents": ["twin", "probe-mainpc"]},
                       "crawl": {"host": "pc2", "agents": ["probe-pc2"]}},
            "agents": {"twin": {"kind": "digital_twin", "settings": {"dashboard": False}},
                       "probe-mainpc": {"kind": "probe", "depends_on": ["twin"], "required": False},
                       "probe-pc2": {"kind": "probe", "depends_on": ["twin"], "required": False}},
            "security": {"keys_dir": str(tmp / "nokeys")}}
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    paths = []
    for name, host, extra in (("mainpc", "mainpc", ""), ("pc2", "pc2", ""),
                              ("mainpc-off", "mainpc", "security: {curve: 'off'}\n")):
        path = tmp / f"{name}.yaml"
        path.write_text(f"extends: mesh.yaml\nhost: {host}\nmesh: {{data_dir: '{tmp / host}'}}\n{extra}")
        paths.append(path)
    return paths[0], paths[1], paths[2]


@pytest.mark.timeout(120)
def test_a_plaintext_link_fails_the_check_unless_curve_off_was_chosen(tmp_path, mesh_up):
    """Loopback without keys runs in plaintext (`auto`); the check fails that link, warns when the config says
    `curve: off`, and fails it again under --require-curve."""
    main_cfg, pc2_cfg, main_off = probes_mesh(tmp_path)
    cfg = load_config(main_cfg)
    assert not cfg.curve_enabled("mainpc") and not cfg.curve_enabled("pc2")
    mesh_up(main_cfg)
    mesh_up(pc2_cfg)
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="both hosts ready")

    code, report = connectivity(main_cfg)
    curve = rows(report, "probe-pc2", "curve")
    assert code == 1 and curve["status"] == "fail" and curve["data"]["curve_setting"] == "auto", curve
    assert "plaintext between hosts needs `security.curve: off`" in curve["cause"]
    assert "`meshctl keys generate mainpc --keys-dir" in curve["fix"]
    assert [c for c in report["checks"] if c["status"] not in ("pass", "fail")] == []
    assert {c["check"] for c in report["checks"] if c["status"] == "fail"} == {"curve"}   # only the plaintext

    code, report = connectivity(main_off)
    curve = rows(report, "probe-pc2", "curve")
    assert code == 0 and report["ok"] and curve["status"] == "warn", json.dumps(report, indent=1)
    assert "security.curve: off" in curve["cause"]

    code, report = connectivity(main_off, "--require-curve")
    assert code == 1 and rows(report, "probe-pc2", "curve")["status"] == "fail"
