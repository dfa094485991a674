"""The smallest useful agent kind: answers `mesh.echo` with the same payload.

It is the example in docs/OPERATIONS.md of how to write a kind, and the far end of the
benchmarks and protocol tests. With `publish: true` it also publishes every echo on topic
`echo.<seq>` so pub/sub can be tested end to end.
"""

from __future__ import annotations

from mesh.runtime import Agent, AgentSettings, handles
from network.codec import Envelope
from network.messages import Echo


class EchoSettings(AgentSettings):
    publish: bool = False


class EchoAgent(Agent):
    kind = "echo"
    Settings = EchoSettings
    echoed = 0

    def gauges(self) -> dict[str, float]:
        """Sent with every heartbeat; the dashboard shows them."""
        return {"echoed": self.echoed}

    @handles(Echo)
    def echo(self, msg: Echo, env: Envelope) -> Echo:
        self.echoed += 1
        if self.settings.publish:
            self.publish(msg, topic=f"echo.{msg.seq}")
        return msg
