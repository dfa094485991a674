"""Broken YAML and broken configs: every one is a ConfigError naming the file, the place and the problem,
and `meshctl check` says so with exit code 2 and no traceback.

tests/test_config.py covers mistakes in a well-formed config (unknown agents, cycles, port clashes ...) through
parse_config; here the same kinds of mistakes arrive as real files, next to files that are not YAML at all.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mesh.config import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES, ConfigError, load_config
from testing.harness import ROOT

VALID = """\
hosts:
  local: {address: 127.0.0.1}
groups:
  core: {host: local, agents: [twin, a]}
agents:
  twin: {kind: digital_twin}
  a: {kind: echo, depends_on: [twin]}
"""


def alias_bomb(levels: int = 9) -> str:
    """Each level repeats the one before ten times: 10**levels values from a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + VALID


# (id, file content, where the problem is, words of the message). `where` is the field path or "line L, column C".
BROKEN: list[tuple[str, bytes | str, str, str]] = [
    # not YAML
    ("tabs", "hosts:\n\tlocal: {address: 127.0.0.1}\n", "line 2, column 1", "found character '\\t'"),
    ("unclosed-bracket", "hosts: {local: {address: 127.0.0.1}\ngroups: {}\nagents: {}\n", "line 2, column 1",
     "expected ',' or '}'"),
    ("unclosed-quote", 'hosts:\n  local: {address: "127.0.0.1}\n', "line 3, column 1",
     "found unexpected end of stream"),
    ("bad-indent", "hosts:\n  local:\n    address: x\n   groups: {}\n", "line 4, column 4",
     "expected <block end>, but found '<block mapping start>'"),
    ("duplicate-section", VALID + "agents:\n  b: {kind: echo}\n", "line 8, column 1",
     "duplicate key 'agents' (first on line 5)"),
    ("duplicate-agent", VALID + "  twin: {kind: echo}\n", "line 8, column 3", "duplicate key 'twin' (first on line 6)"),
    ("binary", random.Random("config-binary").randbytes(4096), "line 1, column 1", "not UTF-8 text"),
    ("latin-1", "hosts:\n  local: {address: caf\u00e9.local}\n".encode("latin-1"), "line 2, column 23",
     "not UTF-8 text: byte 0xe9"),
    ("utf-16", VALID.encode("utf-16"), "line 1, column 1", "not UTF-8 text: byte 0xff"),
    ("nul-byte", "hosts:\n  local: {address: 127.0.0.1\x00}\n", "line 2, column 29", "character 0x0000 is not allowed"),
    ("python-tag", "hosts: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "line 1, column 8",
     "could not determine a constructor for the tag"),
    ("deep-nesting", "hosts: " + "[" * 5000 + "]" * 5000 + "\n", "<top>", "nested too deeply"),
    ("alias-bomb", alias_bomb(), "<top>", f"expands to more than {MAX_CONFIG_VALUES} values"),
    ("huge-file", VALID + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1), "<top>",
     f"larger than {MAX_CONFIG_BYTES} bytes"),
    # YAML, but not a config
    ("empty", "", "hosts", "Field required"),
    ("only-comments", "# nothing here\n# at all\n", "hosts", "Field required"),
    ("a-list", "- hosts\n- agents\n", "<top>", "expected a mapping at the top, found list"),
    ("a-scalar", "just some words\n", "<top>", "expected a mapping at the top, found str"),
    ("agents-as-list", VALID.replace("agents:\n  twin: {kind: digital_twin}\n  a: {kind: echo, depends_on: [twin]}\n",
                                     "agents: [twin, a]\n"), "agents", "valid dictionary"),
    ("port-as-word", "mesh: {base_port: seven}\n" + VALID, "mesh.base_port", "valid integer"),
    ("frame-too-small", "mesh: {max_frame_bytes: 10}\n" + VALID, "mesh.max_frame_bytes",
     "greater than or equal to 1024"),
    ("depends-on-a-string", VALID.replace("depends_on: [twin]", "depends_on: twin"), "agents.a.depends_on",
     "valid list"),
    ("host-key-int", "hosts:\n  7: {address: x}\ngroups: {}\nagents: {}\n", "hosts[7].[key]", "valid string"),
    ("unknown-section", VALID + "agent:\n  b: {kind: echo}\n", "agent", "Extra inputs are not permitted"),
    ("unknown-agent-field", VALID.replace("a: {kind: echo,", "a: {kind: echo, dependson: [twin],"),
     "agents.a.dependson", "Extra inputs are not permitted"),
    ("curve-maybe", VALID + "security: {curve: maybe}\n", "security.curve", "Input should be 'auto', 'on' or 'off'"),
    # a config, with mistakes only the whole mesh shows
    ("unknown-dependency", VALID.replace("depends_on: [twin]", "depends_on: [twin, ghost]"), "agents.a.depends_on[1]",
     "unknown agent 'ghost'"),
    ("cycle", VALID.replace("groups:\n  core: {host: local, agents: [twin, a]}",
                            "groups:\n  core: {host: local, agents: [twin, a, b]}")
     .replace("a: {kind: echo, depends_on: [twin]}",
              "a: {kind: echo, depends_on: [b]}\n  b: {kind: echo, depends_on: [a]}"),
     "agents.a.depends_on", "dependency cycle: a -> b -> a"),
    ("port-clash", VALID.replace("twin: {kind: digital_twin}", "twin: {kind: digital_twin, endpoints: {rpc: 7300}}")
     .replace("a: {kind: echo,", "a: {kind: echo, endpoints: {pub: 7300},"), "agents.a.endpoints.pub",
     "port 7300 on host 'local' is used by twin.rpc and a.pub"),
    ("port-out-of-range", VALID.replace("a: {kind: echo,", "a: {kind: echo, endpoints: {rpc: 70000},"),
     "agents.a.endpoints.rpc", "less than or equal to 65535"),
    ("unset-variable", VALID.replace("127.0.0.1", "'${FUZZ_NO_SUCH_VARIABLE}'"), "hosts.local.address",
     "environment variable FUZZ_NO_SUCH_VARIABLE is not set"),
    ("unclosed-variable", VALID.replace("127.0.0.1", "'${FUZZ_ADDR:-127.0.0.1'"), "hosts.local.address",
     "not a complete ${VAR} or ${VAR:-default}"),
    ("two-twins", VALID.replace("a: {kind: echo,", "a: {kind: digital_twin,"), "agents",
     "expected exactly one agent of kind 'digital_twin', found 2"),
]

# Load, but `meshctl check` (which also loads each kind's settings model) must refuse them.
BROKEN_KINDS: list[tuple[str, str, str, str]] = [
    ("unknown-kind", VALID.replace("a: {kind: echo,", "a: {kind: no_such_kind,"), "agents.a.kind",
     "unknown agent kind 'no_such_kind'"),
    ("unknown-setting", VALID.replace("a: {kind: echo,", "a: {kind: echo, settings: {colour: red},"),
     "agents.a.settings.colour", "Extra inputs are not permitted"),
    ("setting-wrong-type", VALID.replace("a: {kind: echo,", "a: {kind: echo, settings: {publish: perhaps},"),
     "agents.a.settings.publish", "valid boolean"),
]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("FUZZ_NO_SUCH_VARIABLE", "FUZZ_ADDR"):
        monkeypatch.delenv(var, raising=False)


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def meshctl_check(path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUZZ_")}
    return subprocess.run([sys.executable, "-m", "ops.meshctl", "check", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(env, COLUMNS="300"))


@pytest.mark.parametrize("name, content, where, words", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_config_is_a_clear_config_error(tmp_path, clean_env, name, content, where, words):
    path = write(tmp_path, name, content)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path.name}: {where}" in text, text     # the file, then the line or field path
    assert words in text, text
    assert "fix:" in text, text
    assert time.monotonic() - started < 10, "a broken file took long to refuse"


def test_extends_names_the_file_with_the_problem(tmp_path):
    (tmp_path / "parent.yaml").write_bytes(b"hosts:\n  local: {address: \xff}\n")
    child = write(tmp_path, "child", "extends: parent.yaml\nhost: local\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml: line 2, column 20: not UTF-8 text"):
        load_config(child)
    missing = write(tmp_path, "orphan", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: <top>: file not found"):
        load_config(missing)
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)


def test_merge_keys_that_override_are_not_duplicates(tmp_path):
    """YAML `<<` merges may repeat a key on purpose (an override); only a key written twice is refused."""
    path = write(tmp_path, "merge", "x-base: &base {kind: echo, depends_on: [twin]}\n"
                 + VALID.replace("a: {kind: echo, depends_on: [twin]}", "a: {<<: *base, kind: echo, required: false}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "x-base: Extra inputs are not permitted" in str(info.value)   # the anchor's own key, not a duplicate
    assert "duplicate" not in str(info.value)


@pytest.mark.slow   # 36 `meshctl check` processes: 12-60 s on 2 busy cores
def test_meshctl_check_refuses_every_broken_file_with_exit_2(tmp_path):
    """The operator's view: one line per problem on stderr, exit code 2, never a traceback."""
    cases = BROKEN + BROKEN_KINDS
    started = time.monotonic()
    paths = [write(tmp_path, name, content) for name, content, _, _ in cases]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(meshctl_check, paths))
    for (name, _, where, words), path, r in zip(cases, paths, results):
        out = r.stdout + r.stderr
        assert r.returncode == 2, (name, r.returncode, out)
        assert "Traceback" not in out, (name, out)
        assert "config error" in r.stderr and f"{path.name}: {where}" in r.stderr and words in r.stderr, (name, out)
    good = write(tmp_path, "good", VALID)
    r = meshctl_check(good)
    assert r.returncode == 0 and "good.yaml: ok" in r.stdout, r.stderr
    print(f"meshctl check: {len(cases)} broken files refused with exit 2 in {time.monotonic() - started:.1f} s")
