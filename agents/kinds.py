"""Agent kinds are plug-ins, found by name.

A kind in YAML is one of:
  * a built-in name (`digital_twin`, `echo`, ...), listed in BUILTIN below;
  * a name registered by an installed package under the entry-point group `agent_mesh.kinds`
    (`[project.entry-points."agent_mesh.kinds"] my_kind = "my_pkg.agent:MyAgent"`);
  * a dotted path `package.module:ClassName` to an Agent subclass.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "agent_mesh.kinds"

BUILTIN: dict[str, str] = {
    "digital_twin": "agents.twin:DigitalTwin",
    "echo": "agents.echo:EchoAgent",
    "probe": "agents.probe:ProbeAgent",
    "crawl_coordinator": "pipeline.coordinator:CrawlCoordinator",
    "extractor": "pipeline.extractor:Extractor",
    "topic_model": "pipeline.topic_agent:TopicModelAgent",
    "curiosity": "pipeline.curiosity_agent:CuriosityAgent",
    "vram_optimizer": "pipeline.vram_agent:VramOptimizer",
    "model_manager": "pipeline.model_manager:ModelManager",
}


class UnknownKind(Exception):
    pass


def target_of(kind: str) -> str:
    if kind in BUILTIN:
        return BUILTIN[kind]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            return ep.value
    if ":" in kind:
        return kind
    known = sorted(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise UnknownKind(f"unknown agent kind {kind!r}: use one of {known}, or a dotted path 'package.module:Class'")


def resolve(kind: str) -> type:
    """The Agent subclass for `kind`; raises UnknownKind with the reason."""
    from agents.runtime import Agent

    target = target_of(kind)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownKind(f"agent kind {kind!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise UnknownKind(f"agent kind {kind!r}: {target} is not an Agent subclass")
    return cls


def check_kinds(config, agents: list[str] | None = None) -> None:
    """Resolves every agent's kind and validates its settings, so that a typo is reported by
    `meshctl check` and before `meshctl up` starts anything, not by a restart loop."""
    from pydantic import ValidationError

    from agents.config import ConfigError, _pydantic_problems

    problems = []
    for name in agents or list(config.agents):
        spec = config.agents[name]
        try:
            cls = resolve(spec.kind)
        except UnknownKind as exc:
            problems.append((f"agents.{name}.kind", str(exc), "fix the kind, or install the package that provides it"))
            continue
        try:
            cls.Settings.model_validate(spec.settings)
        except ValidationError as exc:
            problems += [(f"agents.{name}.settings.{path}", msg, fix) for path, msg, fix in _pydantic_problems(exc)]
    if problems:
        raise ConfigError(config.source, problems)


def module_of(kind: str) -> str:
    return target_of(kind).partition(":")[0]
