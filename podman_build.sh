#!/usr/bin/env bash
# Podman deployment of the mesh, one container group at a time.
# Status: only `plan` works today; build/deploy/down/status/logs/kube are tracked in issue 4
# ("Podman deployment") and say so instead of pretending.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<USAGE
usage: podman_build.sh COMMAND [ARGS]

  plan HOST        start-up order of HOST's agents (mainpc | pc2 | local)
  build [GROUP..]  build images                       (not yet: issue 4)
  deploy HOST      start HOST's groups in order       (not yet: issue 4)
  down HOST        stop HOST's groups                 (not yet: issue 4)
  status HOST      groups, containers, health, ports  (not yet: issue 4)
  logs [-f] NAME   logs of a group or agent           (not yet: issue 4)
  kube HOST        Kubernetes YAML for HOST           (not yet: issue 4)

Until deploy lands, run a host's agents directly: meshctl up --config config/HOST.yaml
USAGE
}

meshctl() { if [ -x .venv/bin/meshctl ]; then .venv/bin/meshctl "$@"; else command meshctl "$@"; fi; }

cmd="${1:-}"
case "$cmd" in
    -h|--help|help|"") usage ;;
    plan) [ $# -eq 2 ] || { usage >&2; exit 2; }; meshctl plan --config "config/$2.yaml" ;;
    build|deploy|down|status|logs|kube)
        echo "podman_build.sh $cmd: not implemented yet (issue 4). Use: meshctl up --config config/HOST.yaml" >&2
        exit 3 ;;
    *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
