"""The connectivity check: can MainPC and PC2 work together? One run checks every link from this
host to the other. The owner runs it as `python3 ./test_pc2_connectivity.py` (a thin script at the
top of the repository, over cli.py) or `python -m ops.connectivity` (__main__.py):

    --from pc2      on PC2 (config/pc2.yaml; default mainpc)
    --json          machine-readable report

For every agent placed on the other host (the probe, and the twin when it lives there) it
checks, each with a timeout, and prints one table with the measured values:

  tcp rpc/pub/metrics   plain TCP connect: "refused" (nothing listens) vs "no answer" (address, link, firewall)
  curve                 a mesh.ping with this host's CURVE keys is answered (plaintext: a failure; a warning
                        only when the config says `security.curve: off`)
  curve: unknown key    a throwaway key pair gets no answer (the remote admits only known keys)
  rpc                   N mesh.ping round trips: p50 / p99
  clock                 the remote's clock against ours, from the replies' envelope timestamps
  pub/sub A->B, B->A    events flow both ways between the probe agents (kind `probe`)
  twin, twin view       the twin answers and sees every agent across the link ready

Each check is pass, fail or warn; "skip" marks one not run because an earlier check of the same
link failed (the failed one names the cause). Below the table: for each failure and warning the
likely cause and the command that fixes it. A dead link costs about one --timeout, not one per
check: TCP and CURVE are checked for all agents at once, and a link that fails them is not
probed further. Exit status: 0 every check passed (warnings allowed), 1 a check failed, 2 bad
config.

By concern:

  session.py    what every check shares: config, this host, CURVE identity, ZeroMQ context, wording of fixes
  report.py     the Check row, pass/fail/warn/skip, the table and the JSON report
  handshake.py  one mesh.ping on a fresh socket whose handshake is watched (for the CURVE and local checks)
  tcp.py        1. plain TCP connects
  curve.py      2. the keyed ping, and a throwaway key that must be refused
  roundtrip.py  3 + 4. mesh.ping round trips, and the clock skew measured from them
  pubsub.py     5. events both ways between the probe agents
  local.py      this host's own agents: why one of them does not answer
  twin.py       6. the twin, and its view of the agents across the link
  runner.py     which checks run for which agent, and which are skipped after an earlier failure
  cli.py        the command line (typer)
  __main__.py   python -m ops.connectivity

tests/test_connectivity_local.py runs it against two real meshes on loopback.
"""

from ops.connectivity.cli import app, main
from ops.connectivity.report import FAIL, PASS, SKIP, WARN, Check
from ops.connectivity.runner import run_checks
from ops.connectivity.session import Options, Session

__all__ = ["FAIL", "PASS", "SKIP", "WARN", "Check", "Options", "Session", "app", "main", "run_checks"]
