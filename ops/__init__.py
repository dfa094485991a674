"""Operator tools: what a person runs to start, watch, deploy and check the mesh.

    meshctl/        the `meshctl` command, one module per group of commands
    deploy.py       Podman images, containers per group and per pool replica, Kubernetes YAML (./podman_build.sh)
    rolling.py      a pool's replicas replaced one at a time, each drained and its successor ready (deploy)
    connectivity/   can MainPC and PC2 work together? (behind ./test_pc2_connectivity.py)
    health.py       a container's health check: every agent of the group answers ready
    monitoring.py   Prometheus scrape config, alert rules and the Grafana dashboard from a mesh config
"""
