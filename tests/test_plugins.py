"""Agent kinds are plug-ins: a kind from outside the repository runs by dotted path and by entry point."""

from __future__ import annotations

import os
import textwrap

from mesh.control import client, fetch_status
from testing.harness import MeshUp, mesh_dict, wait_for

GREETER = '''
from typing import ClassVar

from mesh.runtime import Agent, AgentSettings, handles
from network.messages import Message


class Greet(Message):
    type_name: ClassVar[str] = "demo.greet"
    name: str


class Greeting(Message):
    type_name: ClassVar[str] = "demo.greeting"
    text: str


class GreeterSettings(AgentSettings):
    greeting: str = "hello"


class Greeter(Agent):
    kind = "greeter"
    Settings = GreeterSettings

    @handles(Greet)
    def greet(self, msg, env):
        return Greeting(text=f"{self.settings.greeting}, {msg.name} (from {self.name})")
'''


def test_kinds_by_dotted_path_and_entry_point(tmp_path, write_config, monkeypatch):
    plugins = tmp_path / "plugins"
    (plugins / "mykinds").mkdir(parents=True)
    (plugins / "mykinds" / "__init__.py").write_text("")
    (plugins / "mykinds" / "greeter.py").write_text(textwrap.dedent(GREETER))
    dist = plugins / "mykinds-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mykinds\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agent_mesh.kinds]\ngreeter = mykinds.greeter:Greeter\n")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))
    from mykinds.greeter import Greet

    path, cfg = write_config(mesh_dict({
        "by-path": {"kind": "mykinds.greeter:Greeter", "depends_on": ["twin"], "settings": {"greeting": "hi"}},
        "by-entry-point": {"kind": "greeter", "depends_on": ["by-path"]},
    }))
    up = MeshUp(path)
    try:
        wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=20, what="mesh ready")
        with client(cfg, "by-path") as c:
            assert c.request(Greet(name="owner")).text == "hi, owner (from by-path)"
        with client(cfg, "by-entry-point") as c:
            assert c.request(Greet(name="owner")).text == "hello, owner (from by-entry-point)"
        kinds = {a.agent: a.kind for a in fetch_status(cfg).agents}
        assert kinds["by-entry-point"] == "greeter"
    finally:
        assert up.stop() == 0
