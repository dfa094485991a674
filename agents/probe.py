"""Probe agents: cheap end points on every host for checking the links between hosts.

A probe answers `mesh.echo` (and publishes each echo on topic `probe.echo`), and can be asked
to watch another agent's events (`probe.watch`) and say how many it received (`probe.report`).
`test_pc2_connectivity.py` uses them to prove request/reply and pub/sub in both directions.
"""

from __future__ import annotations

from typing import ClassVar

from mesh.runtime import Agent, handles
from network.codec import Envelope
from network.messages import Ack, Echo, ErrorCode, Message
from network.rpc import MeshError


class ProbeWatch(Message):
    """Subscribe to `agent`'s events whose topic starts with `topic`."""

    type_name: ClassVar[str] = "probe.watch"
    agent: str
    topic: str = "probe."


class ProbeReport(Message):
    """How many events from `agent` the probe has received since it started watching."""

    type_name: ClassVar[str] = "probe.report"
    agent: str


class ProbeCounts(Message):
    type_name: ClassVar[str] = "probe.counts"
    agent: str
    received: int
    last_seq: int = -1


class ProbeAgent(Agent):
    kind = "probe"

    def setup(self) -> None:
        self.watching: dict[str, list[int]] = {}  # agent -> [received, last seq]

    @handles(Echo)
    def echo(self, msg: Echo, env: Envelope) -> Echo:
        self.publish(msg, topic="probe.echo")
        return msg

    @handles(ProbeWatch)
    def watch(self, msg: ProbeWatch, env: Envelope) -> Ack:
        if msg.agent not in self.config.agents:
            raise MeshError(ErrorCode.UNKNOWN_AGENT, f"agent {msg.agent!r} is not declared in {self.config.source}")
        if msg.agent not in self.watching:
            self.watching[msg.agent] = [0, -1]
            self.subscribe(msg.agent, msg.topic, self._counter(msg.agent))
        return Ack()

    @handles(ProbeReport)
    def report(self, msg: ProbeReport, env: Envelope) -> ProbeCounts:
        received, last = self.watching.get(msg.agent, [0, -1])
        return ProbeCounts(agent=msg.agent, received=received, last_seq=last)

    def _counter(self, agent: str):
        def count(message: Message, env: Envelope) -> None:
            if env.sender == agent:
                entry = self.watching[agent]
                entry[0] += 1
                entry[1] = getattr(message, "seq", -1)
        return count
