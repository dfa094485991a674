"""Prometheus metrics of one agent's mesh traffic, in a registry of its own.

One registry per agent (not the process-wide default) so that several agents can share a
process in tests and tools without clashing. Label children are cached: the hot path pays
a dict lookup, not a label resolution.
"""

from __future__ import annotations

import bisect
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client import Enum as EnumMetric
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from network.messages import AgentState

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MeshMetrics:
    def __init__(self, agent: str, kind: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.started = time.time()
        labels = {"agent": agent, "kind": kind}
        r = self.registry
        # Message and error counts, and the latency histogram's buckets, are plain dict entries read
        # at scrape time: a prometheus Counter takes a lock per increment, and Histogram.observe a
        # lock and a walk over its buckets, a large part of a small message's cost.
        self._message_counts: dict[tuple[str, str], int] = {}
        self._error_counts: dict[str, int] = {}
        # (type, side) -> [count per bucket (the last one +Inf, not cumulative), sum, created]
        self._latencies: dict[tuple[str, str], list] = {}
        r.register(_CountsCollector(self))
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
        entry = self._latencies.get((type_name, side))
        if entry is None:
            entry = self._latencies[(type_name, side)] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, time.time()]
        entry[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1   # bucket `le`: the first bound >= seconds
        entry[1] += seconds

    def auth_refused(self, reason: str) -> None:
        self._auth_refused.labels(reason).inc()
        self.error("auth_refused")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one series (for tests and status lines)."""
        value = self.registry.get_sample_value(name, labels or {})
        return value or 0.0


_LATENCY_NAME = "mesh_request_latency_seconds"
_LATENCY_HELP = "Request handling time (server) and round trip (client)"
_LATENCY_LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]


class _CountsCollector:
    """Exposes MeshMetrics' plain counts as the counters mesh_messages_total and mesh_errors_total, and
    its latency buckets as the histogram mesh_request_latency_seconds (the samples, `_created` included,
    that a prometheus_client Histogram with the labels type and side would give)."""

    def __init__(self, metrics: MeshMetrics):
        self.metrics = metrics

    def describe(self):
        return [CounterMetricFamily("mesh_messages", "Messages sent and received, by type and direction",
                                    labels=["type", "direction"]),
                CounterMetricFamily("mesh_errors", "Frames or requests that failed, by error code", labels=["code"]),
                HistogramMetricFamily(_LATENCY_NAME, _LATENCY_HELP, labels=["type", "side"])]

    def collect(self):
        messages = CounterMetricFamily("mesh_messages", "Messages sent and received, by type and direction",
                                       labels=["type", "direction"])
        for (type_name, direction), n in list(self.metrics._message_counts.items()):
            messages.add_metric([type_name, direction], n)
        errors = CounterMetricFamily("mesh_errors", "Frames or requests that failed, by error code", labels=["code"])
        for code, n in list(self.metrics._error_counts.items()):
            errors.add_metric([code], n)
        latency = HistogramMetricFamily(_LATENCY_NAME, _LATENCY_HELP, labels=["type", "side"])
        for (type_name, side), (counts, total, created) in list(self.metrics._latencies.items()):
            cumulative, n = [], 0
            for le, c in zip(_LATENCY_LE, list(counts)):
                n += c
                cumulative.append((le, n))
            latency.add_metric([type_name, side], cumulative, total)
            latency.samples.append(Sample(f"{_LATENCY_NAME}_created", {"type": type_name, "side": side}, created))
        yield messages
        yield errors
        yield latency


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
