"""Config loading: the shipped files are valid, and every kind of mistake is named with its path and a fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mesh.config import ConfigError, is_loopback, load_config, parse_config
from network.security import generate
from testing.harness import mesh_dict

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "hosts": {"a": {"address": "127.0.0.1"}, "b": {"address": "127.0.0.2"}},
    "groups": {"core": {"host": "a", "agents": ["twin", "x"]}, "far": {"host": "b", "agents": ["y"]}},
    "agents": {"twin": {"kind": "digital_twin"}, "x": {"kind": "echo", "depends_on": ["twin"]},
               "y": {"kind": "echo", "depends_on": ["x"]}},
}


def cfg(**changes):
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


@pytest.mark.parametrize("name", ["local", "mainpc", "pc2", "mesh"])
def test_shipped_configs_load(name):
    c = load_config(ROOT / "config" / f"{name}.yaml")
    assert c.twin == "twin"
    assert [a for level in c.start_order() for a in level][0] == "twin"


def test_host_files_share_the_mesh_and_differ_only_in_host():
    main, pc2 = load_config(ROOT / "config/mainpc.yaml"), load_config(ROOT / "config/pc2.yaml")
    assert (main.this_host, pc2.this_host) == ("mainpc", "pc2")
    assert main.model_dump(exclude={"host"}) == pc2.model_dump(exclude={"host"})


def test_addresses_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAINPC_ADDRESS", "10.9.8.7")
    c = load_config(ROOT / "config/mainpc.yaml")
    assert c.endpoint("twin") == "tcp://10.9.8.7:7100"


def test_ports_are_assigned_in_order_and_offset():
    c = parse_config(cfg(mesh={"base_port": 9000, "port_offset": 100}))
    assert (c.port("twin", "rpc"), c.port("twin", "pub"), c.port("twin", "metrics")) == (9100, 9101, 9102)
    assert c.port("x", "rpc") == 9103
    assert c.port("y", "rpc") == 9100  # other host, its own range
    assert c.endpoint("y", "pub") == "tcp://127.0.0.2:9101"


def test_start_order_follows_dependencies():
    assert parse_config(cfg()).start_order() == [["twin"], ["x"], ["y"]]


def problems(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.yaml")
    return str(info.value)


@pytest.mark.parametrize("data, path, words", [
    (cfg(agents__y__depends_on=["nope"]), "agents.y.depends_on[0]", "unknown agent 'nope'"),
    (cfg(agents__y__depends_on=["y"]), "agents.y.depends_on[0]", "cannot depend on itself"),
    (cfg(agents__x__depends_on=["y"]), "agents.", "dependency cycle"),
    (cfg(groups__far__host="c"), "groups.far.host", "host 'c' is not declared"),
    (cfg(groups__far__agents=["y", "x"]), "groups.far.agents[1]", "already in group 'core'"),
    (cfg(groups__far__agents=[]), "agents.y", "in no group"),
    (cfg(groups__far__agents=["y", "ghost"]), "groups.far.agents[1]", "'ghost' is not declared"),
    (cfg(agents__x__endpoints={"rpc": 7000}, agents__twin__endpoints={"pub": 7000}),
     "agents.x.endpoints.rpc", "port 7000 on host 'a' is used by twin.pub and x.rpc"),
    (cfg(agents__x__kind="digital_twin"), "agents", "exactly one agent of kind 'digital_twin'"),
    (cfg(agents__twin__depends_on=["x"]), "agents.twin.depends_on", "cannot depend on other agents"),
    (cfg(agents__x__colour="red"), "agents.x.colour", "Extra inputs are not permitted"),
    (cfg(agents__x__required="perhaps"), "agents.x.required", "valid boolean"),
    (cfg(mesh={"heartbeat_interval_s": -1}), "mesh.heartbeat_interval_s", "greater than 0"),
    (cfg(stores={"documents": "mysql://x"}), "stores.documents", "sqlite:///"),
    (cfg(host="c"), "host", "not declared"),
    (cfg(hosts={"A b": {"address": "x"}}), "hosts.A b", "not allowed"),
])
def test_mistakes_name_file_path_and_fix(data, path, words):
    text = problems(data)
    assert f"f.yaml: {path}" in text
    assert words in text
    assert "fix:" in text


def test_cycle_is_spelled_out():
    data = cfg(agents__x__depends_on=["y"])
    assert "x -> y -> x" in problems(data) or "y -> x -> y" in problems(data)


def test_every_problem_is_reported_at_once():
    text = problems(cfg(agents__y__depends_on=["nope"], groups__far__host="c"))
    assert "2 problem(s)" in text and "nope" in text and "'c'" in text


def test_bad_yaml_names_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("hosts:\n  a: {address: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "bad.yaml: line 3" in str(info.value) and "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("- a\n- b\n", "expected a mapping"),
    ("", "hosts"),
    ("hosts: 5\ngroups: {}\nagents: {}\n", "hosts"),
])
def test_wrong_shapes(tmp_path, text, words):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert words in str(info.value)


def test_missing_file_and_missing_variable(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.yaml")
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    data = cfg(hosts={"a": {"address": "${NO_SUCH_VAR}"}, "b": {"address": "x"}})
    text = problems(data)
    assert "hosts.a.address" in text and "NO_SUCH_VAR is not set" in text


def test_extends_merges_and_detects_loops(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nhost: b\nmesh: {port_offset: 5}\n")
    c = load_config(tmp_path / "child.yaml")
    assert c.this_host == "b" and c.mesh.port_offset == 5 and set(c.agents) == {"twin", "x", "y"}
    (tmp_path / "l1.yaml").write_text("extends: l2.yaml\n")
    (tmp_path / "l2.yaml").write_text("extends: l1.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "l1.yaml")


def test_which_host_must_be_said_when_there_are_several():
    c = parse_config(cfg())
    with pytest.raises(ConfigError, match="add `host: NAME`"):
        _ = c.this_host
    assert parse_config(cfg(), host="b").agents_on("b") == ["y"]


def test_optional_dependencies_do_not_change_the_order():
    c = parse_config(cfg(agents__x__required=False))
    assert c.start_order() == [["twin"], ["x"], ["y"]]
    assert c.agents["x"].required is False


def test_yaml_booleans_for_curve_and_empty_variables_take_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EMPTY_ADDR", "")
    data = cfg(hosts={"a": {"address": "${EMPTY_ADDR:-10.0.0.1}"}, "b": {"address": "x"}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) + "security:\n  curve: off\n")
    c = load_config(p)
    assert c.security.curve == "off" and c.hosts["a"].address == "10.0.0.1"


def test_kinds_and_settings_are_checked_before_anything_runs():
    from mesh.runtime import check_kinds

    c = parse_config(cfg(agents__x__settings={"publish": "maybe", "colour": 1}, agents__y__kind="nope"), "f.yaml")
    with pytest.raises(ConfigError) as info:
        check_kinds(c)
    text = str(info.value)
    assert "f.yaml: agents.x.settings.publish" in text and "f.yaml: agents.x.settings.colour" in text
    assert "f.yaml: agents.y.kind: unknown agent kind 'nope'" in text
    check_kinds(parse_config(cfg(agents__x__settings={"publish": True})))


def test_an_explicit_environment_fills_the_variables(monkeypatch):
    monkeypatch.delenv("MAINPC_ADDRESS", raising=False)
    c = load_config(ROOT / "config/mainpc.yaml", environ={"MAINPC_ADDRESS": "10.1.2.3"})
    assert c.endpoint("twin") == "tcp://10.1.2.3:7100"


def test_settings_that_name_another_agent_are_checked_against_the_config():
    """AgentRef settings: a name that is not an agent, or an agent of another kind, is a config error with
    the names it could be; a kind written as an (old) dotted path is still that kind."""
    from mesh.runtime import check_kinds

    data = mesh_dict({
        "extractor": {"kind": "pipeline.extractor:Extractor"},          # the path before the layout by domain
        "crawler": {"kind": "crawl_coordinator", "settings": {"extractor": "extractr"}},
        "topics": {"kind": "topic_model", "settings": {"source": "extractor"}},
        "curiosity": {"kind": "curiosity", "settings": {"coordinator": "topics"}},
    })
    c = parse_config(data, "f.yaml")
    assert c.agent_of_kind("extractor") == "extractor" and c.agents_of_kind("echo") == []
    with pytest.raises(ConfigError) as info:
        check_kinds(c)
    problems = {path: (message, fix) for path, message, fix in info.value.problems}
    assert set(problems) == {"agents.crawler.settings.extractor", "agents.curiosity.settings.coordinator"}
    assert problems["agents.crawler.settings.extractor"] == ("no agent named 'extractr'", "name one of ['extractor']")
    assert problems["agents.curiosity.settings.coordinator"][0] == "'topics' is a topic_model agent, not a crawl_coordinator"
    assert problems["agents.curiosity.settings.coordinator"][1] == "name one of ['crawler']"
    data["agents"]["crawler"]["settings"]["extractor"] = "extractor"
    data["agents"]["curiosity"]["settings"]["coordinator"] = "crawler"
    check_kinds(parse_config(data, "f.yaml"))


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("*", False), ("::", False), ("192.168.1.10", False), ("10.0.0.1", False),
    ("eth0", False), ("mainpc.lan", False), ("", False)])
def test_loopback_is_only_what_this_machine_alone_reaches(address, loopback):
    assert is_loopback(address) is loopback


def test_auto_is_curve_wherever_a_host_binds_beyond_loopback(tmp_path):
    """`auto`: loopback without keys is plaintext; a non-loopback bind needs this host's key (the problem names
    `meshctl keys generate HOST` and the keys dir), and uses CURVE once the key is there."""
    keys = tmp_path / "keys"
    security = {"keys_dir": str(keys)}
    loopback = parse_config(cfg(security=security), "f.yaml")
    assert loopback.security.curve == "auto" and not loopback.curve_enabled("a")
    loopback.check_curve("a")
    assert loopback.plaintext_warning("a") is None

    exposed = parse_config(cfg(security=security, hosts__a={"address": "10.0.0.1", "bind": "0.0.0.0"}), "f.yaml")
    assert exposed.curve_enabled("a") and not exposed.curve_enabled("b")   # b binds 127.0.0.2
    with pytest.raises(ConfigError) as info:
        exposed.check_curve("a")
    ((path, message, fix),) = info.value.problems
    assert path == "security.curve" and "binds 0.0.0.0" in message and f"{keys}/private/a.key_secret" in message
    assert fix.startswith(f"run `meshctl keys generate a --keys-dir {keys}` on a, then copy {keys}/public/a.key")
    assert "keys/public/ of b" in fix and "security.curve: off" in fix
    exposed.check_curve("b")
    generate(keys, "a")
    exposed.check_curve("a")
    assert exposed.curve_enabled("a")


def test_on_needs_the_key_even_on_loopback_and_off_warns_only_beyond_it(tmp_path, monkeypatch):
    on = parse_config(cfg(security={"curve": "on", "keys_dir": str(tmp_path / "keys")}), "f.yaml")
    with pytest.raises(ConfigError, match="CURVE is on but this host's secret key .* is missing"):
        on.check_curve("a")
    monkeypatch.chdir(tmp_path)     # the default keys dir, `keys`, is where meshctl runs: the fix says where that is
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(security={"curve": "on"})).check_curve("a")
    assert f"run `meshctl keys generate a` on a (keys dir {tmp_path.resolve() / 'keys'}), then copy" in str(info.value)
    off = parse_config(cfg(security={"curve": "off"}, hosts__a={"address": "10.0.0.1", "bind": "0.0.0.0"}))
    assert not off.curve_enabled("a")
    off.check_curve("a")
    assert off.plaintext_warning("a") == ("CURVE is off (security.curve: off): host a's agents listen on 0.0.0.0 "
                                          "in plaintext, so anyone on the network can talk to the agents")
    assert off.plaintext_warning("b") is None   # 127.0.0.2: nobody else can reach it


def test_the_shipped_two_host_mesh_says_curve_on():
    for name in ("mesh", "mainpc", "pc2"):
        assert load_config(ROOT / "config" / f"{name}.yaml").security.curve == "on"
    assert load_config(ROOT / "config" / "local.yaml").security.curve == "auto"
