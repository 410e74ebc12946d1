"""Repository contracts: the README's two commands, CI running the documented test command,
packaging metadata, the in-repo method collection and a torch-free plugin import."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pytest_advprune import registry

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted(p for p in (ROOT / "methods").glob("*.py") if p.name != "__init__.py")


def two_commands_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Two commands\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "README.md has no '## Two commands' section"
    return match.group(1)


def fenced_blocks(text: str) -> list[str]:
    """Contents of the ``` fenced blocks of ``text``, in order (without the fences)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unclosed fenced block"
    return blocks


def readme_commands() -> list[str]:
    return fenced_blocks(two_commands_section())


def test_readme_has_exactly_two_fenced_command_blocks_under_two_commands():
    blocks = readme_commands()
    assert len(blocks) == 2, blocks
    for block in blocks:
        assert block.strip() and "\n" not in block.strip(), f"not one command line: {block!r}"
    run, test = (b.strip() for b in blocks)
    assert run.endswith("--advprune-method=hydra")  # the main job: HYDRA on the default preset
    assert test.endswith(".venv/bin/pytest")  # the project's own tests
    assert run != test


def test_ci_runs_the_readme_test_command_verbatim():
    ci = ROOT / ".ci" / "run"
    test = readme_commands()[1].strip()
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert test in lines, "the README's test command is not a line of .ci/run"
    assert lines[0].startswith("#!") and "bash" in lines[0]
    assert "set -euo pipefail" in lines  # a failing step fails CI
    assert lines.index("set -euo pipefail") < lines.index(test)


def test_ci_script_is_executable():
    mode = (ROOT / ".ci" / "run").stat().st_mode
    assert mode & stat.S_IXUSR, oct(mode)
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_pytest11_entry_point(pyproject):
    assert pyproject["project"]["entry-points"]["pytest11"] == {"advprune": "pytest_advprune.plugin"}


def test_pyproject_maps_the_methods_package_to_the_methods_folder(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"]["pytest_advprune.methods"] == "methods"
    assert "pytest_advprune.methods" in setuptools["packages"]
    assert "pytest_advprune" in setuptools["packages"]
    assert (ROOT / setuptools["package-dir"]["pytest_advprune.methods"] / "__init__.py").is_file()


def test_installed_entry_point_and_methods_package_point_into_this_repository():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "advprune"]
    assert ep.value == "pytest_advprune.plugin"
    import pytest_advprune.methods as pkg

    assert Path(pkg.__file__).resolve() == (ROOT / "methods" / "__init__.py").resolve()


def test_the_test_extra_has_what_the_tests_use(pyproject):
    extra = " ".join(pyproject["project"]["optional-dependencies"]["test"])
    assert "hypothesis" in extra and "pytest-xdist" in extra
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_methods_folder_holds_method_files():
    assert {"hydra", "lwm", "random_mask", "dense"} <= {p.stem for p in METHOD_FILES}


@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_every_method_file_registers_exactly_one_method(path, monkeypatch):
    # Built-ins first: a method file importing another (flyingbird_plus -> flyingbird) must not register
    # that one into the empty registry below, nor leave it imported but unregistered afterwards.
    registry.load_builtin()
    monkeypatch.setattr(registry, "_REGISTRY", {})
    mod_name = f"_advprune_repository_check_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, mod_name, module)
    spec.loader.exec_module(module)
    assert len(registry._REGISTRY) == 1, f"{path.name} registered {sorted(registry._REGISTRY)}"
    (cls,) = registry._REGISTRY.values()
    assert cls.__module__ == mod_name  # defined in this file, not imported from another method file


@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_every_method_file_is_loaded_by_the_builtin_collection(path):
    registry.load_builtin()
    modules = {cls.__module__ for cls in registry._REGISTRY.values()}
    assert f"pytest_advprune.methods.{path.stem}" in modules


def test_plugin_import_does_not_import_torch():
    code = "import pytest_advprune.plugin, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
