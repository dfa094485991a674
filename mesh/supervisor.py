"""`meshctl up`: runs every agent of one host as a supervised process.

Agents start in dependency order (the twin gates their readiness; the order only makes the
logs read naturally), a crashed agent is restarted with exponential backoff (reset once it
has stayed up for `stable_after_s`), and a stop (Ctrl-C or SIGTERM) sends SIGTERM to every
agent in reverse order, waits for them to drain, then kills what is left.

Processes come from a multiprocessing fork server that has already imported the runtime
and every kind's module, so starting an agent costs a fork, not a Python start-up.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.config import ConfigError, MeshConfig
from mesh.kinds import module_of
from mesh.logs import setup_agent_logging
from mesh.runtime import StartupError, check_kinds, run_agent

log = logging.getLogger("meshctl.up")


def _agent_main(config: MeshConfig, name: str, log_dir: str, level: str) -> None:
    setup_agent_logging(name, config.host_of(name), Path(log_dir), level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains us in order
    try:
        run_agent(config, name)
    except (StartupError, ConfigError) as exc:
        logging.getLogger(f"agent.{name}").error("cannot start: %s", exc)
        raise SystemExit(2) from None
    except Exception:
        logging.getLogger(f"agent.{name}").exception("agent crashed")
        raise SystemExit(1) from None


@dataclass
class Child:
    name: str
    process: mp.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    next_start: float = 0.0


class Supervisor:
    def __init__(self, config: MeshConfig, *, host: str | None = None, only: list[str] | None = None,
                 log_dir: Path | None = None, log_level: str = "INFO", backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, stable_after_s: float = 30.0):
        self.config = config
        self.host = host or config.this_host
        names = config.agents_on(self.host)
        if only:   # a pool's name stands for its replicas on this host
            only = [a for name in only for a in (
                [r for r in config.replicas_of(name) if r in names] if name in config.pools else [name])]
            unknown = sorted(set(only) - set(names))
            if unknown:
                raise ValueError(f"not agents of host {self.host}: {', '.join(unknown)} (its agents: {', '.join(names)})")
            names = [n for n in names if n in only]
        order = [a for level in config.start_order() for a in level]
        self.children = {n: Child(n) for n in order if n in names}
        self.log_dir = Path(log_dir or config.mesh.data_dir / "logs")
        self.log_level = log_level
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self._ctx = mp.get_context("forkserver")
        self._stopping = False

    def start(self) -> None:
        # fail before starting anything: a bad kind or setting, or CURVE required here without this host's key
        self.config.check_curve(self.host)
        check_kinds(self.config, list(self.children))
        warning = self.config.plaintext_warning(self.host)
        if warning:
            log.warning("%s", warning)
        # what every child imports, imported once in the fork server: this module itself (the children's entry
        # point, with rich for the logs: ~60 ms of CPU each), the runtime, and the kinds of this host
        modules = {__name__, "mesh.runtime", "network.rpc"} | {module_of(self.config.agents[n].kind)
                                                              for n in self.children}
        # Every child re-runs the parent's main module (multiprocessing's __mp_main__ fix-up) unless the fork
        # server has it already: the `meshctl` console script imports the whole CLI, ~20 ms of CPU and tens of
        # MiB per agent. `python -m ops.meshctl` runs ops.meshctl.__main__, which children never re-run.
        main = sys.modules.get("__main__")
        main_name = getattr(getattr(main, "__spec__", None), "name", None)
        if main_name and not main_name.endswith("__main__"):
            modules.add(main_name)              # `python -m pkg.module`: children import it by name
        elif main_name is None and getattr(main, "__file__", None):
            modules.add("__main__")             # a script: the fork server runs it once, as __mp_main__
        modules = sorted(modules)
        self._ctx.set_forkserver_preload(modules)
        for child in self.children.values():
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        proc = self._ctx.Process(target=_agent_main, name=f"agent-{child.name}",
                                 args=(self.config, child.name, str(self.log_dir), self.log_level), daemon=False)
        proc.start()
        child.process, child.started_at = proc, time.monotonic()
        log.info("started %s (pid %d)%s", child.name, proc.pid, f", restart {child.restarts}" if child.restarts else "")

    def poll(self) -> None:
        """Notices exits and restarts agents whose backoff has passed."""
        now = time.monotonic()
        for child in self.children.values():
            proc = child.process
            if proc is not None and proc.exitcode is not None:
                code = proc.exitcode
                proc.close()
                child.process = None
                if self._stopping:
                    continue
                if now - child.started_at >= self.stable_after_s:
                    child.backoff = 0.0
                child.backoff = self.backoff_initial_s if child.backoff == 0 else min(child.backoff * 2, self.backoff_max_s)
                child.next_start = now + child.backoff
                how = f"signal {-code}" if code < 0 else f"code {code}"
                log.warning("%s exited with %s; restarting in %.1fs (see %s)", child.name, how, child.backoff,
                            self.log_dir / f"{child.name}.log")
            elif proc is None and not self._stopping and now >= child.next_start:
                child.restarts += 1
                self._spawn(child)

    def pids(self) -> dict[str, int | None]:
        return {n: (c.process.pid if c.process is not None else None) for n, c in self.children.items()}

    def run(self, *, on_tick=None) -> None:
        """Runs until SIGINT or SIGTERM, then stops every agent."""
        stop = {"now": False}

        def request_stop(*_: object) -> None:
            stop["now"] = True

        old_int = signal.signal(signal.SIGINT, request_stop)
        old_term = signal.signal(signal.SIGTERM, request_stop)
        try:
            self.start()
            while not stop["now"]:
                self.poll()
                if on_tick is not None:
                    on_tick()
                time.sleep(0.1)
        finally:
            self.stop()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    def stop(self) -> None:
        """Drains agents level by level, dependents first and the twin last, so each one can
        still hand back work and deregister while what it depends on is up."""
        self._stopping = True
        running = {n for n, c in self.children.items() if c.process is not None and c.process.is_alive()}
        if running:
            log.info("stopping %d agent(s)", len(running))
        timeout = self.config.mesh.drain_timeout_s
        # Every agent depends on the twin whether or not its depends_on says so: the twin gets a
        # batch of its own, after everything else on this host has drained and deregistered.
        twin = self.config.twin
        order = [[twin]] + [[n for n in level if n != twin] for level in self.config.start_order()]
        for level in reversed(order):
            batch = [self.children[n] for n in level if n in running]
            for child in batch:
                try:
                    os.kill(child.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            for child in batch:
                child.process.join(max(0.0, deadline - time.monotonic()))
                if child.process.is_alive():
                    log.warning("%s did not drain within %.0fs; killing it", child.name, timeout)
                    child.process.kill()
                    child.process.join(2)
        self.poll()
