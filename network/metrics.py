"""Prometheus metrics of one agent's mesh traffic, in a registry of its own.

One registry per agent (not the process-wide default) so that several agents can share a
process in tests and tools without clashing. Label children are cached: the hot path pays
a dict lookup, not a label resolution.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import Enum as EnumMetric

from network.messages import AgentState

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MeshMetrics:
    def __init__(self, agent: str, kind: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.started = time.time()
        labels = {"agent": agent, "kind": kind}
        r = self.registry
        self._messages = Counter("mesh_messages", "Messages sent and received, by type and direction",
                                 ["type", "direction"], registry=r)
        self._errors = Counter("mesh_errors", "Frames or requests that failed, by error code", ["code"], registry=r)
        self._latency = Histogram("mesh_request_latency_seconds", "Request handling time (server) and round trip (client)",
                                  ["type", "side"], buckets=LATENCY_BUCKETS, registry=r)
        self._auth_refused = Counter("mesh_auth_refused", "Connections refused by CURVE authentication, by reason",
                                     ["reason"], registry=r)
        self.dropped = Counter("mesh_pubsub_dropped", "Published frames dropped by a subscriber, by error code",
                               ["code"], registry=r)
        self.retries = Counter("mesh_request_retries", "Requests re-sent after a timeout (Lazy Pirate)", registry=r)
        self.duplicates = Counter("mesh_duplicate_requests", "Retried requests answered from the reply cache", registry=r)
        info = Gauge("mesh_agent_info", "Constant 1, labelled with the agent's name and kind", ["agent", "kind"], registry=r)
        info.labels(**labels).set(1)
        uptime = Gauge("mesh_agent_uptime_seconds", "Seconds since the agent started", registry=r)
        uptime.set_function(lambda: time.time() - self.started)
        self.state = EnumMetric("mesh_agent_state", "Lifecycle state of the agent", states=[s.value for s in AgentState],
                                registry=r)
        self._msg_children: dict[tuple[str, str], object] = {}
        self._err_children: dict[str, object] = {}
        self._lat_children: dict[tuple[str, str], object] = {}
        self.messages_in = 0
        self.messages_out = 0
        self.errors = 0

    def message(self, type_name: str, direction: str) -> None:
        key = (type_name, direction)
        child = self._msg_children.get(key)
        if child is None:
            child = self._msg_children[key] = self._messages.labels(type_name, direction)
        child.inc()
        if direction == "in":
            self.messages_in += 1
        else:
            self.messages_out += 1

    def error(self, code: str) -> None:
        child = self._err_children.get(code)
        if child is None:
            child = self._err_children[code] = self._errors.labels(str(code))
        child.inc()
        self.errors += 1

    def latency(self, type_name: str, side: str, seconds: float) -> None:
        key = (type_name, side)
        child = self._lat_children.get(key)
        if child is None:
            child = self._lat_children[key] = self._latency.labels(type_name, side)
        child.observe(seconds)

    def auth_refused(self, reason: str) -> None:
        self._auth_refused.labels(reason).inc()
        self.error("auth_refused")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one series (for tests and status lines)."""
        value = self.registry.get_sample_value(name, labels or {})
        return value or 0.0
