"""The shape of the code, checked: small classes and functions, no reaching into other modules'
private names, and a package that installs nothing but ``psframework``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "psframework").rglob("*.py"), *(REPO / "launch").rglob("*.py")])
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_no_class_or_function_is_too_long():
    too_long = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                too_long.append(f"{_name(path)}:{node.lineno} {node.name} has {lines} lines (limit {limit})")
    assert not too_long, "\n".join(too_long)


def _own_module_aliases(tree: ast.Module) -> set[str]:
    """Names under which a module imports other psframework modules."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("psframework")):
            aliases.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            aliases.update(alias.asname or alias.name for alias in node.names if alias.name.startswith("psframework"))
    return aliases


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in SOURCES:
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("psframework")):
                found += [f"{_name(path)}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
        aliases = _own_module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{_name(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_only_config_reads_the_environment():
    readers = []
    for path in SOURCES:
        if path == REPO / "psframework" / "config.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{_name(path)}:{node.lineno}")
    assert not readers, "only psframework/config.py may read os.environ: " + ", ".join(readers)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package as ``pip install .`` lays it out: the wheel, unpacked into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=120)
    if build.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{build.stdout}\n{build.stderr}")
    wheel = next(out.glob("psframework-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = archive.namelist()
    return site, names


def _run_installed(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=site.parent, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_wheel_installs_only_psframework_at_the_top_level(installed):
    site, names = installed
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"psframework"}
    assert "psframework/launch/cli.py" in names and "psframework/launch/remote_child.py" in names


def test_after_install_the_launcher_is_psframework_launch(installed):
    site, _ = installed
    bare = _run_installed(site, "-c", "import launch")
    assert bare.returncode != 0 and "No module named 'launch'" in bare.stderr
    helped = _run_installed(site, "-m", "psframework.launch", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: ps-launch" in helped.stdout and "--num-workers" in helped.stdout
    imported = _run_installed(site, "-c", "import psframework.launch.cli, psframework; print(psframework.__file__)")
    assert imported.returncode == 0 and str(site) in imported.stdout, imported.stderr
