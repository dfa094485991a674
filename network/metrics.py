"""Prometheus metrics of one agent's mesh traffic, in a registry of its own.

One registry per agent (not the process-wide default) so that several agents can share a
process in tests and tools without clashing. Label children are cached: the hot path pays
a dict lookup, not a label resolution.
"""

from __future__ import annotations

import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client import Enum as EnumMetric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from network.messages import AgentState

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MeshMetrics:
    def __init__(self, agent: str, kind: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.started = time.time()
        labels = {"agent": agent, "kind": kind}
        r = self.registry
        # Message and error counts are plain dict entries, read at scrape time: a prometheus
        # Counter takes a lock per increment, which is a large part of a small message's cost.
        self._message_counts: dict[tuple[str, str], int] = {}
        self._error_counts: dict[str, int] = {}
        r.register(_CountsCollector(self))
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
        self._lat_children: dict[tuple[str, str], object] = {}
        self.messages_in = 0
        self.messages_out = 0
        self.errors = 0

    def message(self, type_name: str, direction: str) -> None:
        key = (type_name, direction)
        counts = self._message_counts
        counts[key] = counts.get(key, 0) + 1
        if direction == "in":
            self.messages_in += 1
        else:
            self.messages_out += 1

    def error(self, code: str) -> None:
        code = str(code)
        self._error_counts[code] = self._error_counts.get(code, 0) + 1
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


class _CountsCollector:
    """Exposes MeshMetrics' plain counts as the counters mesh_messages_total and mesh_errors_total."""

    def __init__(self, metrics: MeshMetrics):
        self.metrics = metrics

    def describe(self):
        return [CounterMetricFamily("mesh_messages", "Messages sent and received, by type and direction",
                                    labels=["type", "direction"]),
                CounterMetricFamily("mesh_errors", "Frames or requests that failed, by error code", labels=["code"])]

    def collect(self):
        messages = CounterMetricFamily("mesh_messages", "Messages sent and received, by type and direction",
                                       labels=["type", "direction"])
        for (type_name, direction), n in list(self.metrics._message_counts.items()):
            messages.add_metric([type_name, direction], n)
        errors = CounterMetricFamily("mesh_errors", "Frames or requests that failed, by error code", labels=["code"])
        for code, n in list(self.metrics._error_counts.items()):
            errors.add_metric([code], n)
        yield messages
        yield errors


METRICS_REQUEST_TIMEOUT_S = 10.0


def serve_metrics(metrics: MeshMetrics, port: int, addr: str):
    """Serves `metrics` at http://addr:port/metrics on a daemon thread; returns (server, thread).

    prometheus_client's own server, with two changes for a port anyone on the network can reach: a
    connection that sends nothing is closed after METRICS_REQUEST_TIMEOUT_S (it would hold a thread
    for ever), and every malformed request (400, 414, 431 ...) is counted in
    `mesh_errors_total{code="http_<status>"}`."""
    class Handler(WSGIRequestHandler):
        timeout = METRICS_REQUEST_TIMEOUT_S

        def log_message(self, format: str, *args) -> None:   # noqa: A002 (the base class's name)
            pass

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            metrics.error(f"http_{int(code)}")
            super().send_error(code, message, explain)

    class Server(ThreadingWSGIServer):
        request_queue_size = 64
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, (TimeoutError, ConnectionError)):   # a client that went quiet or away
                metrics.error("http_timeout" if isinstance(exc, TimeoutError) else "http_disconnected")
                return
            super().handle_error(request, client_address)

    httpd = make_server(addr, port, make_wsgi_app(metrics.registry), Server, handler_class=Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return httpd, thread
