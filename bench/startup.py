"""Start-up time and twin load of a 100-agent, two-host mesh.

The generated config (temp dir, free ports, heartbeat_interval_s 1.0, CURVE off) has:

* two hosts, h1 = 127.0.0.1 and h2 = 127.0.0.2 (all of 127/8 is loopback on Linux; when
  127.0.0.2 cannot be bound both hosts use 127.0.0.1 and h2's agents get explicit ports);
* the digital twin (on h1) and 99 `echo` agents in 6 dependency levels (17+17+17+16+16+16):
  every agent of level L depends on one agent of level L-1, so each chain is 6 deep, and
  consecutive agents of a chain sit on alternate hosts;
* one container group per (host, level) plus the twin's own group: 13 groups on both hosts.

Measured:

* all_ready_s   -- seconds from launching the two `python -m ops.meshctl up --config FILE --host hN`
                   processes until mesh.control.fetch_status() shows every agent `ready`
                   (polled every 0.1 s);
* twin_cpu_pct  -- after a 2 s settle, the twin process's utime+stime from /proc/PID/stat over
                   10 s of steady state at 1 s heartbeats (pid from the status reply), in percent
                   of one core. Nothing polls the twin from here during that window; the two `up`
                   processes do (once a second each), as in production.

For context it also prints the CPU of all agents together and of the two `up` processes over the
same window, and the time the stop took. Both `up` processes are stopped with SIGINT; anything of
their sessions still alive after 30 s is killed by pid and reported. Agent logs (temp data_dir)
are scanned for warnings and errors. The last line is:

    RESULT all_ready_s=<seconds> twin_cpu_pct=<percent of one core>

Usage: .venv/bin/python bench/startup.py [--quick] [--agents 100] [--levels 6] [--window 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import install_sigterm_as_interrupt, run_main, scan_logs, summarize_logs  # noqa: E402
from testing.harness import (
    MeshUp,  # noqa: E402
    can_bind,
    free_port_block,
    write_config,
)
from testing.procs import alive, cpu_seconds

H1, H2 = "127.0.0.1", "127.0.0.2"


def build_config(tmp: Path, n_agents: int, n_levels: int) -> tuple[dict, list[str]]:
    notes = []
    two_addresses = can_bind(H2)
    if not two_addresses:
        notes.append(f"cannot bind {H2}: both hosts use {H1} (h2's agents get explicit ports)")
    addr2 = H2 if two_addresses else H1
    echoes = n_agents - 1
    sizes = [echoes // n_levels + (1 if i < echoes % n_levels else 0) for i in range(n_levels)]
    per_host_ports = 3 * (n_agents // 2 + 2)
    base = free_port_block(per_host_ports + (0 if two_addresses else per_host_ports + 10), [H1, addr2])
    agents: dict[str, dict] = {"twin": {"kind": "digital_twin"}}
    groups: dict[str, dict] = {"core": {"host": "h1", "agents": ["twin"]}}
    levels: list[list[str]] = []
    explicit = base + per_host_ports + 10  # only used without a second address
    for lvl, size in enumerate(sizes, 1):
        names = []
        for i in range(size):
            name = f"l{lvl}-echo{i:02d}"
            spec: dict = {"kind": "echo"}
            if lvl > 1:
                spec["depends_on"] = [levels[-1][i % len(levels[-1])]]
            host = "h1" if (i + lvl) % 2 == 0 else "h2"
            if host == "h2" and not two_addresses:
                spec["endpoints"] = {"rpc": explicit, "pub": explicit + 1, "metrics": explicit + 2}
                explicit += 3
            agents[name] = spec
            groups.setdefault(f"{host}-l{lvl}", {"host": host, "agents": []})["agents"].append(name)
            names.append(name)
        levels.append(names)
    data = {
        "mesh": {"name": "bench-startup", "base_port": base, "heartbeat_interval_s": 1.0, "dead_after_missed": 3,
                 "data_dir": str(tmp / "data")},
        "hosts": {"h1": {"address": H1}, "h2": {"address": addr2}},
        "groups": groups,
        "agents": agents,
        "security": {"curve": "off"},
    }
    return data, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=100, help="agents including the twin (default 100)")
    ap.add_argument("--levels", type=int, default=6, help="dependency levels of echo agents (default 6)")
    ap.add_argument("--window", type=float, default=None, help="CPU measurement window in s (default 10, quick 5)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between all-ready and the CPU window")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up waiting for all-ready after this many s")
    ap.add_argument("--quick", action="store_true", help="a 5 s CPU window")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs) and print its path")
    args = ap.parse_args()
    window = args.window or (5.0 if args.quick else 10.0)
    install_sigterm_as_interrupt()

    from mesh.config import load_config
    from mesh.control import fetch_status
    from network.rpc import MeshError

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-startup-")
    tmp = Path(tmp_ctx.name)
    data, notes = build_config(tmp, args.agents, args.levels)
    path = write_config(data, tmp / "mesh.yaml")
    config = load_config(path)
    n = len(config.agents)
    depth = len(config.start_order())
    print(f"{n} agents ({len(config.agents_on('h1'))} on h1 {config.hosts['h1'].address}, "
          f"{len(config.agents_on('h2'))} on h2 {config.hosts['h2'].address}), {len(config.groups)} groups, "
          f"{depth} start levels incl. the twin; config {path}", flush=True)
    for note in notes:
        print("note: " + note)

    ups: list[MeshUp] = []
    problems: list[str] = []
    all_ready_s = float("inf")
    twin_pct = float("nan")
    extra: dict[str, float] = {}
    timeline: list[tuple[float, int]] = []
    all_pids: list[int] = []
    phases = [("starting", time.time())]
    try:
        launched = time.monotonic()
        for host in ("h1", "h2"):
            ups.append(MeshUp(path, "--host", host, out=tmp / f"meshctl-up-{host}.out"))
        status = None
        last_ready = -1
        deadline = launched + args.timeout
        while time.monotonic() < deadline:
            for up in ups:
                if not up.running():
                    raise RuntimeError(f"meshctl up (pid {up.pid}) exited early:\n{up.output()[-3000:]}")
            try:
                status = fetch_status(config, timeout=0.5)
            except MeshError:
                time.sleep(0.1)
                continue
            ready = sum(a.state == "ready" for a in status.agents)
            if ready != last_ready:
                timeline.append((time.monotonic() - launched, ready))
                last_ready = ready
            if ready == n:
                all_ready_s = time.monotonic() - launched
                phases.append(("steady", time.time()))
                break
            time.sleep(0.1)
        if all_ready_s == float("inf"):
            states: dict[str, int] = {}
            for a in status.agents if status else []:
                states[a.state] = states.get(a.state, 0) + 1
            problems.append(f"not all ready within {args.timeout:.0f}s: {states}")
        else:
            marks = [f"{t:.1f}s:{r}" for t, r in timeline]
            print(f"all {n} agents ready after {all_ready_s:.2f}s (ready count over time: {' '.join(marks[-12:])})",
                  flush=True)

            time.sleep(args.settle)
            status = fetch_status(config, timeout=2.0)
            pids = {a.agent: a.pid for a in status.agents}
            all_pids = [p for p in pids.values() if p]
            twin_pid = pids[config.twin]
            if not twin_pid:
                raise RuntimeError("the twin's status reply carries no pid for the twin")
            others = [p for a, p in pids.items() if a != config.twin and p]
            watched = [twin_pid, *others, *(u.pid for u in ups)]
            t0 = time.monotonic()
            before = {p: cpu_seconds(p) for p in watched}
            time.sleep(window)
            after = {p: cpu_seconds(p) for p in watched}
            wall = time.monotonic() - t0

            def pct(pid: int) -> float | None:
                if before[pid] is None or after[pid] is None:
                    problems.append(f"pid {pid} exited during the CPU window")
                    return None
                return 100.0 * (after[pid] - before[pid]) / wall

            twin_pct = pct(twin_pid)
            if twin_pct is None:
                twin_pct = float("nan")
            per_agent = [v for v in map(pct, others) if v is not None]
            extra["agents_total_pct"] = sum(per_agent)
            extra["agent_median_pct"] = statistics.median(per_agent) if per_agent else float("nan")
            extra["ups_pct"] = sum(v for v in (pct(u.pid) for u in ups) if v is not None)
            status = fetch_status(config, timeout=2.0)
            not_ready = [a.agent for a in status.agents if a.state != "ready"]
            if not_ready:
                problems.append(f"not ready after the CPU window: {not_ready[:10]}")
            hb = [a.last_heartbeat_age_s for a in status.agents if a.agent != config.twin and a.last_heartbeat_age_s]
            extra["max_hb_age_s"] = max(hb) if hb else float("nan")
            restarts = sum(a.restarts for a in status.agents)
            if restarts:
                problems.append(f"{restarts} agent restart(s) reported by the twin")
            print(f"twin pid {twin_pid}: {twin_pct:.2f}% of one core over {wall:.1f}s; other {len(per_agent)} agents "
                  f"together {extra['agents_total_pct']:.1f}% (median {extra['agent_median_pct']:.2f}% each); "
                  f"the two `up` processes {extra['ups_pct']:.1f}%; oldest heartbeat {extra['max_hb_age_s']:.2f}s",
                  flush=True)
    finally:
        phases.append(("stopping", time.time()))
        stop_started = time.monotonic()
        for up in ups:
            up.interrupt()
        leftovers = []
        for up in ups:
            up.wait(30.0)
            leftovers += up.leftovers
        stop_s = time.monotonic() - stop_started
        if ups:
            print(f"stopped both `up` processes in {stop_s:.1f}s (SIGINT)")
        if leftovers:
            problems.append(f"processes still alive 30 s after SIGINT, killed: {leftovers}")
        still = [p for p in all_pids if alive(p)]
        if still:
            problems.append(f"agent pids still alive after stop: {still}")
        for up in ups:
            rc = up.proc.returncode
            if rc not in (0, None):
                problems.append(f"meshctl up --host ... exited with {rc}")
            for line in up.output().splitlines():
                if any(w in line for w in ("Traceback", "ERROR", "WARNING", "Error")):
                    problems.append(f"{up.output_path.name}: {line.strip()[:240]}")
        problems += summarize_logs(scan_logs(tmp / "data" / "logs"), phases=phases)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="bench-startup-kept-"))
            import shutil
            shutil.copytree(tmp, kept, dirs_exist_ok=True)
            print(f"kept config and logs in {kept}")
        tmp_ctx.cleanup()

    print()
    print(f"{'all agents ready':<34}{all_ready_s:>9.2f} s   (target <= 15)")
    print(f"{'twin CPU, steady state':<34}{twin_pct:>9.2f} %   (target < 5, percent of one core)")
    if extra:
        print(f"{'other agents, all together':<34}{extra['agents_total_pct']:>9.1f} %")
        print(f"{'the two meshctl up processes':<34}{extra['ups_pct']:>9.1f} %")
    print()
    if problems:
        print("problems, and warnings/errors in agent logs by phase (same message from many agents counted once):")
        for p in problems[:25]:
            print("  " + p)
        if len(problems) > 25:
            print(f"  ... and {len(problems) - 25} more")
    else:
        print("agent logs and meshctl output: no warnings or errors")
    print(f"RESULT all_ready_s={all_ready_s:.2f} twin_cpu_pct={twin_pct:.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
