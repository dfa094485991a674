"""Health probe: `python -m ops.health NAME... [--config FILE]`.

Asks the agent itself (not the twin) for its state; exits 0 only when it is ready, 1 when it
answers in any other state, 2 when it does not answer or its answer is not a pong (an error, a
garbled frame): one line per agent, never a traceback. Usable as a container HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import os
import sys

from mesh.config import ConfigError, load_config
from mesh.control import client
from network.messages import AgentState, Ping, Pong
from network.rpc import MeshError, RequestTimeout
from network.security import MissingKey


def probe_all(config_path: str, agents: list[str], *, timeout: float = 2.0,
              allow_degraded: bool = False) -> tuple[int, str]:
    """The worst exit code over several agents (a container group's health), and every line."""
    results = [probe(config_path, a, timeout=timeout, allow_degraded=allow_degraded) for a in agents]
    return max(code for code, _ in results), "\n".join(text for _, text in results)


def probe(config_path: str, agent: str, *, timeout: float = 2.0, allow_degraded: bool = False) -> tuple[int, str]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return 2, str(exc)
    if agent not in config.agents:
        return 2, f"{agent!r} is not declared in {config_path} (declared: {', '.join(config.agents)})"
    try:
        with client(config, agent, timeout=timeout, sender="health") as c:
            pong = c.request(Ping())
    except MissingKey as exc:
        return 2, f"{agent}: {exc}"
    except RequestTimeout as exc:
        return 2, f"{agent}: no answer from {config.endpoint(agent)}: {exc.message}"
    except MeshError as exc:   # an error reply, or a garbled one (`undecodable`, `too_large`, ...)
        return 2, f"{agent}: bad answer from {config.endpoint(agent)}: {exc.code}: {exc.message}"
    if not isinstance(pong, Pong):
        return 2, f"{agent}: bad answer from {config.endpoint(agent)}: {pong.type_name} instead of {Pong.type_name}"
    ok = {AgentState.READY} | ({AgentState.DEGRADED} if allow_degraded else set())
    code = 0 if pong.state in ok else 1
    return code, f"{agent}: {pong.state} (pid {pong.pid}, up {pong.uptime_s:.0f}s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.health", description=__doc__.split("\n\n")[0])
    parser.add_argument("agents", nargs="+", metavar="AGENT", help="one or more agents; 0 only when all are ready")
    parser.add_argument("--config", default=os.environ.get("MESH_CONFIG", "config/local.yaml"))
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--allow-degraded", action="store_true", help="exit 0 for a degraded agent too")
    args = parser.parse_args(argv)
    code, text = probe_all(args.config, args.agents, timeout=args.timeout, allow_degraded=args.allow_degraded)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
