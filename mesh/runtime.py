"""The lifecycle every agent shares.

    start -> register with the twin -> wait until required dependencies are ready -> on_ready()
          -> ready, heartbeat every interval -> SIGTERM: drain (on_drain) -> deregister -> exit

Heartbeats go out from the agent's own loop, never from a thread of their own: a heartbeat is the
twin's proof that the loop turns, so a hung loop (an endless callback, a deadlock, a stopped
process) goes silent and is declared dead after `dead_after_missed` intervals. The price is that
an agent's own work must not keep its loop for long: work that may take a heartbeat interval or
more belongs on a worker thread or process, or is cut into slices, one per turn. A watchdog
thread says which step broke that rule, with the loop's stack, while it does (it never beats).

A kind subclasses `Agent`, declares its settings model, and marks request handlers with
`@handles(MessageType)`; everything else (sockets, CURVE, metrics, the twin link, signals)
lives here once. The twin going away does not stop an agent: it keeps serving, keeps
trying, and registers again as soon as the twin answers.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Callable, ClassVar

import zmq
from pydantic import BaseModel, ConfigDict

from mesh.config import ConfigError, MeshConfig, MeshSettings
from mesh.kinds import MODEL_EXTRA_MODULES, OLD_MODULES, UnknownKind, target_of
from mesh.messages import (
    AgentStats,
    Deregister,
    Heartbeat,
    HeartbeatAck,
    LogLines,
    LogRead,
    ReadyStatus,
    Register,
    Registered,
    StateChanged,
    VersionConflict,
    WaitReady,
)
from network.codec import Envelope
from network.messages import REGISTRY, AgentState, ErrorCode, Message, Ping, Pong, versions
from network.metrics import MeshMetrics, serve_metrics
from network.pubsub import Publisher, Subscriber
from network.reactor import Reactor, Timer
from network.rpc import MeshError, Peer, RpcServer
from network.security import Guard, MissingKey, load_identity

READY_STATES = (AgentState.READY, AgentState.DEGRADED)
WAIT_POLL_S = 0.5  # fallback poll while waiting; twin state events usually wake the agent sooner
WATCH_EVERY_S = 0.25   # how often the loop watchdog looks whether the loop turned
WATCH_MIN_S = 0.5      # a step is reported once it kept the loop this long, or a heartbeat interval if longer


class AgentSettings(BaseModel):
    """Base of every kind's settings (`agents.NAME.settings` in YAML)."""

    model_config = ConfigDict(extra="forbid")
    # why this kind runs as one agent and never as a pool: the config refuses `replicas:` on it with this reason
    single_agent: ClassVar[str] = ""

    def extra_ports(self, mesh: MeshSettings) -> dict[str, int]:
        """The ports the agent binds besides its endpoints (rpc, pub, metrics), by name, before mesh.port_offset
        (`mesh` is the config's `mesh:` section, for defaults such as base_port + 80); a port left out or None is
        not bound. The config reserves them on the agent's host when it is loaded: assigned endpoints skip them, an
        explicit endpoint on one is a config error naming both users, and `meshctl plan` lists them
        (`config.port(agent, name)`, port_offset included). A kind that serves more (an HTTP page, say)
        overrides this, and binds what it returns plus mesh.port_offset."""
        return {}


def handles(message_type: type[Message]) -> Callable:
    """Marks a method as the request handler for `message_type`: (self, message, envelope) -> reply."""

    def mark(fn: Callable) -> Callable:
        fn.__handles__ = message_type
        return fn

    return mark


class StartupError(Exception):
    """The agent cannot start (port in use, bad settings, missing key); the message says why."""


class Agent:
    kind: ClassVar[str] = ""
    Settings: ClassVar[type[AgentSettings]] = AgentSettings
    uses_twin: ClassVar[bool] = True
    # The container image its group runs in (podman_build.sh): "cpu" (the mesh, crawl and extraction
    # packages) or "model" (with the `model` extra: torch, sentence-transformers, faiss, llama.cpp)
    image: ClassVar[str] = "cpu"
    _handlers: ClassVar[dict[type[Message], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found = dict(getattr(cls, "_handlers", {}))
        for attr, value in cls.__dict__.items():
            message_type = getattr(value, "__handles__", None)
            if message_type is not None:
                found[message_type] = attr
        cls._handlers = found

    def __init__(self, name: str, config: MeshConfig):
        self.name = name
        self.config = config
        self.spec = config.agents[name]
        self.host = config.host_of(name)
        self.log = logging.getLogger(f"agent.{name}")
        self.settings = config.settings_of(name, self.Settings)
        self.instance = uuid.uuid4().hex[:12]
        self.heartbeat_interval_s = config.mesh.heartbeat_interval_s     # the twin's, once registered
        self.state = AgentState.STARTING
        self.detail = ""
        self.started = time.time()
        self.metrics = MeshMetrics(name, self.kind or type(self).__name__)
        self.metrics.state.state(self.state)
        self.reactor = Reactor()
        self.ctx: zmq.Context | None = None
        self.guard: Guard | None = None
        self.server: RpcServer | None = None
        self.publisher: Publisher | None = None
        self.twin: Peer | None = None
        self._peers: dict[str, Peer] = {}
        self._subscribers: dict[str, Subscriber] = {}
        self._subscriptions: list[tuple[str, str, Callable[[Message, Envelope], None], Any]] = []
        self._metrics_http = None
        self._stop_requested = threading.Event()
        self._stop_reason = ""
        self._registered = False
        # as the twin last answered twin.register: the types the rest of the mesh speaks at other versions
        self.version_conflicts: list[VersionConflict] = []
        self._twin_inflight = False
        self._twin_next = 0.0
        self._twin_timer: Timer | None = None
        self._twin_reachable = True
        self.waiting_on: list[str] = []
        self.failure: str | None = None

    # --- hooks for kinds ---------------------------------------------------------------------

    def setup(self) -> None:
        """Sockets are bound; add timers or subscriptions here. Runs before registering."""

    def on_ready(self) -> None:
        """Every required dependency is ready: load models, open stores. Raising here stops the agent."""

    def on_drain(self) -> None:
        """SIGTERM: finish or hand back in-flight work before the agent deregisters."""

    def gauges(self) -> dict[str, float]:
        """The kind's own figures, sent with every heartbeat for the twin's dashboard (frontier size,
        pages extracted, GPU MiB ...): at most 64, cheap to compute (it runs once a heartbeat)."""
        return {}

    # --- services for kinds ------------------------------------------------------------------

    def publish(self, message: Message, topic: str | None = None) -> None:
        assert self.publisher is not None, "publish() before start()"
        self.publisher.publish(message, topic)

    def peer(self, agent: str) -> Peer:
        """A non-blocking request/reply client to another agent of the mesh. A pool's name gives its first
        replica: one agent answers a request (spreading work over a pool is the asking kind's business, with
        `config.replicas_of`)."""
        agent = self.config.replicas_of(agent)[0]
        if agent not in self._peers:
            self._peers[agent] = Peer(self.ctx, self.reactor, self.config.endpoint(agent, "rpc"), sender=self.name,
                                      metrics=self.metrics, guard=self.guard, server_host=self.config.host_of(agent),
                                      timeout=self.config.mesh.request_timeout_s, retries=self.config.mesh.request_retries,
                                      max_frame_bytes=self.config.mesh.max_frame_bytes)
        return self._peers[agent]

    def subscribe(self, agent: str, prefix: str, callback: Callable[[Message, Envelope], None],
                  message_type: type[Message] | tuple[type[Message], ...] | None = None) -> None:
        """Receives events published by `agent` whose topic starts with `prefix`. Each publisher gets a SUB
        socket of its own, so only what `agent`'s port sent (CURVE-authenticated when keys are on) reaches
        `callback`, and only of `message_type` (by default the type whose name `prefix` is, if it is one):
        anything else is dropped and counted (`mesh_pubsub_dropped_total{code="unexpected_event"}`). A pool's
        name subscribes to every replica of it."""
        if agent in self.config.pools:
            for replica in self.config.replicas_of(agent):
                self.subscribe(replica, prefix, callback, message_type)
            return
        host = self.config.host_of(agent)
        sub = self._subscribers.get(agent)
        if sub is None:   # one SUB socket per publisher: what arrives on it came from that agent's port
            sub = self._subscribers[agent] = Subscriber(
                self.ctx, lambda topic, env, agent=agent: self._on_event(agent, topic, env), metrics=self.metrics,
                guard=self.guard, max_frame_bytes=self.config.mesh.max_frame_bytes)
            sub.attach(self.reactor)
            sub.connect(self.config.endpoint(agent, "pub"), host)
        sub.subscribe(prefix)
        if message_type is None and prefix in REGISTRY:
            message_type = REGISTRY[prefix]
        self._subscriptions.append((agent, prefix, callback, message_type))

    def set_state(self, state: AgentState, detail: str = "") -> None:
        if state == self.state and detail == self.detail:
            return
        self.log.info("state %s -> %s%s", self.state, state, f" ({detail})" if detail else "")
        self.state, self.detail = AgentState(state), detail
        self.metrics.state.state(self.state)
        self._twin_soon()  # tell the twin now, not at the next heartbeat

    def degraded(self, what: str, exc: Exception | str) -> None:
        """`what` (a store, say) does not answer: the twin sees this agent degraded, with why, until
        `recovered(what)`. Only a ready agent degrades; the reactor's thread."""
        if self.state == AgentState.READY:
            self.set_state(AgentState.DEGRADED, f"{what} unavailable: {exc}"[:300])

    def recovered(self, what: str) -> None:
        """`what` answers again: back to ready, if it was the reason for being degraded."""
        if self.state == AgentState.DEGRADED and self.detail.startswith(f"{what} unavailable"):
            self.log.info("the %s answers again", what)
            self.set_state(AgentState.READY)

    def request_stop(self, reason: str = "") -> None:
        """Asks the agent to drain and stop; safe from signal handlers and other threads. `reason` (the signal, say)
        is logged when the drain starts."""
        self._stop_reason = self._stop_reason or reason
        self._stop_requested.set()

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop("SIGTERM"))
            # under `meshctl up` SIGINT is ignored: a terminal's Ctrl-C reaches every process of the group, and the
            # supervisor stops the agents itself, dependents first; run alone, Ctrl-C stops the agent
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, lambda *_: self.request_stop("SIGINT"))
        self.start()
        watched = threading.Event()
        threading.Thread(target=self._watch_loop, args=(threading.get_ident(), watched), name=f"{self.name}-loop-watch",
                         daemon=True).start()
        try:
            while not self._stop_requested.is_set():
                self.reactor.run_once()
            self._drain()
        finally:
            watched.set()
            self.close()
        if self.failure:
            raise SystemExit(self.failure)

    def start(self) -> None:
        mesh = self.config.mesh
        try:
            self.config.check_curve(self.host)   # never bind in plaintext where CURVE is required
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        identity = None
        if self.config.curve_enabled(self.host):
            try:
                identity = load_identity(self.config.security.keys_dir, self.host)
            except Exception as exc:
                raise StartupError(str(exc)) from None
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, identity)
        try:
            self.server = RpcServer(self.ctx, self.config.bind_endpoint(self.name, "rpc"), sender=self.name,
                                    metrics=self.metrics, guard=self.guard, max_frame_bytes=mesh.max_frame_bytes)
            self.publisher = Publisher(self.ctx, self.config.bind_endpoint(self.name, "pub"), sender=self.name,
                                       metrics=self.metrics, guard=self.guard)
        except zmq.ZMQError as exc:
            raise StartupError(f"agent {self.name}: cannot bind {self.config.bind_endpoint(self.name, 'rpc')} or its pub "
                               f"port: {exc} (another mesh on this host? set mesh.port_offset)") from None
        host = self.config.hosts[self.host].bind_address
        try:
            self._metrics_http = serve_metrics(self.metrics, self.config.port(self.name, "metrics"), host)
        except OSError as exc:
            raise StartupError(f"agent {self.name}: cannot serve /metrics on {host}:{self.config.port(self.name, 'metrics')}: "
                               f"{exc.strerror}") from None
        self.server.attach(self.reactor)
        self.publisher.attach(self.reactor)
        self.server.route(Ping, self._on_ping)
        self.server.route(LogRead, self._on_log_read)
        for message_type, attr in self._handlers.items():
            self.server.route(message_type, getattr(self, attr))
        if self.uses_twin:
            twin = self.config.twin
            try:
                self.twin = Peer(self.ctx, self.reactor, self.config.endpoint(twin, "rpc"), sender=self.name,
                                 metrics=self.metrics, guard=self.guard, server_host=self.config.host_of(twin),
                                 max_frame_bytes=mesh.max_frame_bytes)
                if self.spec.depends_on:
                    self.subscribe(twin, StateChanged.type_name, self._on_twin_state)
            except MissingKey as exc:
                raise StartupError(str(exc)) from None
            self._twin_soon()
        self.setup()
        self.log.info("started: rpc %s, pub %s, metrics :%d, curve %s", self.server.endpoint, self.publisher.endpoint,
                      self.config.port(self.name, "metrics"), "on" if self.guard.enabled else "off")

    def _drain(self) -> None:
        if self._stop_reason:
            self.log.info("stop requested (%s)", self._stop_reason)
        self.log.info("draining")
        self.set_state(AgentState.DRAINING)
        if self.server is not None:
            self.server.draining = True
        try:
            self.on_drain()
        except Exception:
            self.log.exception("on_drain failed")
        if self.twin is not None and self._registered:
            done = threading.Event()
            self.twin.request(Deregister(agent=self.name, instance=self.instance, reason="stopped"),
                              lambda _: done.set(), lambda _: done.set(), timeout=1.0, retries=0)
            deadline = time.monotonic() + min(self.config.mesh.drain_timeout_s, 2.0)
            while not done.is_set() and time.monotonic() < deadline:
                self.reactor.run_once(0.05)
        self.state = AgentState.STOPPED
        self.log.info("stopped")

    def _watch_loop(self, loop_ident: int, done: threading.Event) -> None:
        """Watchdog thread: when one step keeps the loop from turning for a heartbeat interval or longer (every
        heartbeat, reply and timer waits behind it; at `dead_after_missed` intervals the twin declares the agent
        dead), logs where the loop is stuck, from its stack, and how long the step lasted once it turns again. Only
        while the agent is ready: on_ready (model loads, which the twin's loading grace allows for) and the drain keep
        the loop by design. It only reports: heartbeats still come from the loop alone."""
        reactor = self.reactor
        idle = Reactor.run_once.__code__   # the innermost Python frame while the loop waits in its poll
        seen, since, reported = reactor.turns, time.monotonic(), False
        while not done.wait(WATCH_EVERY_S):
            turns, now = reactor.turns, time.monotonic()
            if turns != seen:
                if reported:
                    self.log.warning("the loop turns again, after %.1fs or more in that one step", now - since)
                seen, since, reported = turns, now, False
            elif (not reported and self.state in READY_STATES
                  and now - since >= max(WATCH_MIN_S, self.heartbeat_interval_s)):
                frame = sys._current_frames().get(loop_ident)
                if frame is None or frame.f_code is idle:
                    since = now    # waiting in its poll: the whole process stood still (SIGSTOP, a stalled host)
                    continue
                reported = True
                where = " < ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                                   for f in reversed(traceback.extract_stack(frame)[-8:]))
                self.log.warning("one step has kept the loop for %.1fs or more, so heartbeats wait (the twin declares "
                                 "an agent dead after %d missed); the loop is in %s", now - since,
                                 self.config.mesh.dead_after_missed, where)

    def close(self) -> None:
        for closable in [*self._peers.values(), *self._subscribers.values(), self.twin, self.server, self.publisher]:
            if closable is not None:
                closable.close()
        if self._metrics_http is not None:
            server, _thread = self._metrics_http
            server.shutdown()
            server.server_close()
            self._metrics_http = None
        if self.guard is not None:
            self.guard.close()
        self.reactor.close()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # --- twin link ---------------------------------------------------------------------------

    def _twin_soon(self) -> None:
        self._twin_next = 0.0
        self._schedule_twin()

    def _schedule_twin(self) -> None:
        """Arms one timer for the next twin request (none while one is in flight: its reply or
        failure arms the next), instead of polling."""
        if self.twin is None or self._twin_inflight:
            return
        if self._twin_timer is not None:
            self._twin_timer.cancel()
        self._twin_timer = self.reactor.call_later(max(0.0, self._twin_next - time.monotonic()), self._twin_tick)

    def _twin_tick(self) -> None:
        self._twin_timer = None
        now = time.monotonic()
        if self._twin_inflight or self.state in (AgentState.DRAINING, AgentState.STOPPED):
            return
        if now < self._twin_next:
            self._schedule_twin()
            return
        interval = self.heartbeat_interval_s
        if not self._registered:
            msg: Message = Register(agent=self.name, kind=self.kind or type(self).__name__, host=self.host,
                                    instance=self.instance, pid=os.getpid(), state=self.state, speaks=versions())
            on_reply, period = self._on_registered, interval
        elif self.state == AgentState.WAITING:
            msg, on_reply, period = WaitReady(agent=self.name, instance=self.instance), self._on_ready_status, WAIT_POLL_S
        else:
            msg = Heartbeat(agent=self.name, instance=self.instance, state=self.state, detail=self.detail,
                            stats=AgentStats(messages_in=self.metrics.messages_in, messages_out=self.metrics.messages_out,
                                             errors=self.metrics.errors, gauges=self._gauges()))
            on_reply, period = self._on_heartbeat_ack, interval
        self._twin_inflight = True
        self._twin_next = now + period

        def replied(reply: Message) -> None:
            self._twin_inflight = False
            if not self._twin_reachable:
                self.log.info("twin is reachable again")
                self._twin_reachable = True
            on_reply(reply)
            self._schedule_twin()

        def failed(exc: MeshError) -> None:
            self._twin_inflight = False
            if exc.code == "unknown_agent":
                self.log.error("the twin does not know agent %r: %s", self.name, exc.message)
            elif exc.code == ErrorCode.BAD_VERSION:
                self.log.error("cannot talk to the twin: %s (upgrade one of the two: docs/PROTOCOL.md, \"Schema "
                               "versions\")", exc.message)
            elif self._twin_reachable:
                self.log.warning("twin unreachable at %s (%s); still serving, retrying", self.twin.endpoint, exc.message)
                self._twin_reachable = False
            self._schedule_twin()

        self.twin.request(msg, replied, failed, timeout=min(interval, self.config.mesh.request_timeout_s), retries=0)

    def _gauges(self) -> dict[str, float]:
        try:
            found = self.gauges() if self.state in READY_STATES else {}
            return {str(k)[:64]: float(v) for k, v in list(found.items())[:64] if v is not None}
        except Exception as exc:  # a broken figure must not stop the heartbeat
            if not getattr(self, "_gauges_failed", False):
                self.log.exception("gauges() failed (%s); heartbeats go on without them", exc)
                self._gauges_failed = True
            return {}

    def _on_registered(self, reply: Registered) -> None:
        self._registered = True
        self.version_conflicts = list(reply.conflicts)
        if reply.conflicts:
            self.log.error("cannot talk to the rest of the mesh in %d message type(s), versions differ (this agent's "
                           "first, then the others'): %s. Requests of these types between them are answered "
                           "bad_version: upgrade the older side (docs/PROTOCOL.md, \"Schema versions\")",
                           len(reply.conflicts), "; ".join(c.describe() for c in reply.conflicts))
        # the twin declares an agent dead by its own interval: beat at its pace, even if this host's config differs
        self.heartbeat_interval_s = min(60.0, max(0.05, reply.heartbeat_interval_s))
        if self.state == AgentState.STARTING:
            self.waiting_on = list(reply.waiting_on)
            self.set_state(AgentState.WAITING, "waiting on " + ", ".join(self.waiting_on) if self.waiting_on else "")
        self._twin_soon()

    def _on_ready_status(self, reply: ReadyStatus) -> None:
        if not reply.registered:
            self._registered = False
            self._twin_soon()
            return
        if not reply.ready:
            if reply.waiting_on != self.waiting_on:
                self.waiting_on = list(reply.waiting_on)
                self.log.info("waiting on %s", ", ".join(self.waiting_on))
                self.set_state(AgentState.WAITING, "waiting on " + ", ".join(self.waiting_on))
            return
        self.waiting_on = []
        try:
            self.on_ready()
        except Exception as exc:
            self.log.exception("on_ready failed; stopping")
            self.failure = f"on_ready failed: {type(exc).__name__}: {exc}"
            self.request_stop()
            return
        self.set_state(AgentState.READY)

    def _on_heartbeat_ack(self, reply: HeartbeatAck) -> None:
        if not reply.registered:
            self.log.info("the twin does not know this instance (it restarted?): registering again")
            self._registered = False
            self._twin_soon()

    def _on_twin_state(self, event: StateChanged, env: Envelope) -> None:
        if (self.state == AgentState.WAITING and event.agent in self.config.dependency_agents(self.name)
                and event.state in READY_STATES):
            self._twin_soon()

    def _on_event(self, publisher: str, topic: str, env: Envelope) -> None:
        handled = False
        for agent, prefix, callback, message_type in self._subscriptions:
            if (agent == publisher and topic.startswith(prefix) and env.sender == agent
                    and (message_type is None or isinstance(env.message, message_type))):
                handled = True
                callback(env.message, env)
        if not handled:   # another publisher on that host, or the wrong type on a topic: never believed
            self.metrics.dropped.labels("unexpected_event").inc()
            self.log.debug("dropped event %s (%s) from %r: not subscribed to that", topic, env.type_name, env.sender)

    def _on_log_read(self, msg: LogRead, env: Envelope) -> LogLines:
        """Lines of this process's log file (the JSON lines of mesh/logs.py), for `meshctl logs` on
        another host. The file is the one logging writes to: found from the root logger's file handler."""
        path = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), None)
        if path is None:
            return LogLines(agent=self.name, host=self.host, note="this agent writes no log file of its own "
                            "(it runs inside another process)")
        limit = min(msg.max_bytes, self.config.mesh.max_frame_bytes // 2)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            file_id = f"{st.st_dev}:{st.st_ino}"
            size = st.st_size
            if msg.offset >= 0 and msg.file_id == file_id and msg.offset <= size:
                start = msg.offset
            elif msg.offset >= 0 and msg.file_id:           # rotated (or truncated): the new file from its start
                start = 0
            else:                                           # the last `tail` lines
                back = min(size, limit)
                f.seek(size - back)
                window = f.read(back)
                end = window.rfind(b"\n") + 1              # complete lines only
                parts = window[:end].split(b"\n")[:-1]
                if back < size and parts:
                    parts = parts[1:]                       # the first may be cut in the middle
                keep = parts[-msg.tail:] if msg.tail else []
                start = size - back + end - sum(len(x) + 1 for x in keep)
            f.seek(start)
            data = f.read(limit)
        end = data.rfind(b"\n")
        if end < 0 and len(data) < limit:
            data = b""                                      # a line still being written: next time
        elif end >= 0:
            data = data[:end + 1]
        lines = data.decode("utf-8", errors="replace").splitlines()
        return LogLines(agent=self.name, host=self.host, file_id=file_id, offset=start + len(data), lines=lines)

    def _on_ping(self, message: Ping, env: Envelope) -> Pong:
        return Pong(agent=self.name, kind=self.kind or type(self).__name__, state=self.state,
                    uptime_s=time.time() - self.started, pid=os.getpid())


def resolve(kind: str) -> type[Agent]:
    """The Agent subclass for `kind`; raises UnknownKind with the reason."""
    target = target_of(kind)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = next((f" ({old} is {new} since the layout by domain)" for old, new in OLD_MODULES.items()
                     if exc.name and exc.name == old), "")
        if exc.name and exc.name.split(".")[0] in MODEL_EXTRA_MODULES:
            hint = (" (a model agent: install the model extra, `pip install 'agent-mesh[model]'`, or run it in the "
                    "model image, `podman_build.sh build` makes both)")
        raise UnknownKind(f"agent kind {kind!r}: cannot import {module_name!r}: {exc}{hint}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise UnknownKind(f"agent kind {kind!r}: {target} is not an Agent subclass")
    return cls


def check_kinds(config: MeshConfig, agents: list[str] | None = None) -> None:
    """Resolves every agent's kind and validates its settings, so that a typo is reported by
    `meshctl check` and before `meshctl up` starts anything, not by a restart loop."""
    problems = []
    for name in agents or list(config.agents):
        try:
            config.settings_of(name, resolve(config.agents[name].kind).Settings)
        except UnknownKind as exc:
            problems.append((f"agents.{name}.kind", str(exc), "fix the kind, or install the package that provides it"))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(config.source, problems)


def run_agent(config: MeshConfig, name: str) -> None:
    """Entry point of an agent process."""

    cls = resolve(config.agents[name].kind)
    cls(name, config).run()
