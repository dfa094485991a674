"""What every agent shares, whatever its kind.

    runtime.py     the lifecycle: register, wait for dependencies, serve, heartbeat, drain; finding a kind's class
    config.py      the one config model for every YAML file; `agent_of_kind`, `AgentRef` settings
    kinds.py       kind names: built-ins, plug-ins (entry points), dotted paths
    messages.py    what agents say to the twin: register, heartbeat, status, state, alerts, log lines
    supervisor.py  `meshctl up`: agents as processes, in dependency order, restarted with backoff
    logs.py        JSON log files per agent, and reading them (files here, the mesh for other hosts)
    control.py     a client to a running mesh from outside it
"""
