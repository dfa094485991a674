#!/usr/bin/env bash
# Podman deployment of the mesh: one container per container group of a host, and one per pool replica.
# The work is done by ops/deploy.py (python -m ops.deploy); this script finds the
# project's Python and passes the command on. `podman_build.sh COMMAND --help` for each command.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<USAGE
usage: podman_build.sh COMMAND [ARGS]

  base [--tag IMAGE]                 make a Debian base image with debootstrap (hosts with no registry)
  build [--offline] [--base IMAGE]   build the image (offline: packages from a wheelhouse made here)
  deploy HOST [--no-gpu]             start HOST's groups (mainpc | pc2 | local) in dependency order,
                                     each once the twin reports the previous ones ready; safe to repeat:
                                     changed containers are replaced, a pool's replicas one at a time
  down HOST [--volumes]              stop and remove HOST's containers (data volume kept unless --volumes)
  status HOST                        groups, containers, health, ports
  logs [-f] GROUP|AGENT...           agents' logs, prefixed by container and agent
  kube HOST [--no-gpu]               Kubernetes YAML for HOST's groups, for podman kube play
  monitoring HOST [--port 9090] [--grafana] [--down]
                                     Prometheus (image built from the base image with Debian's package)
                                     scraping every agent, with the alert rules; Grafana if its image is here
  plan HOST                          start-up order of HOST's agents

Environment: MESH_PODMAN_OPTS (global podman options, e.g. "--runtime runc"),
MESH_PODMAN_RUN_OPTS (added to every podman run, e.g. "--ulimit nofile=1024:1024"),
MESH_IMAGE (default localhost/agent-mesh:latest), MESH_BASE_IMAGE (build base),
and the config's own variables (MAINPC_ADDRESS, PC2_ADDRESS, ...), passed into the containers.
USAGE
}

if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi

cmd="${1:-}"
case "$cmd" in
    -h|--help|help|"") usage ;;
    plan)
        [ $# -eq 2 ] && [ "$2" != "--help" ] || { echo "usage: podman_build.sh plan HOST" >&2; exit 2; }
        exec "$py" -m ops.meshctl plan --config "config/$2.yaml" ;;
    base|build|deploy|down|status|logs|kube|monitoring) exec "$py" -m ops.deploy "$@" ;;
    *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
