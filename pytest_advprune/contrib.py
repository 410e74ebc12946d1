"""Contribution gating: which methods a change touches, and whether a method file is complete.

Used by ``.github/workflows/conformance.yml`` on pull requests::

    python -m pytest_advprune.contrib changed --base origin/main   # prints "hydra,mine" (or nothing)
    python -m pytest_advprune.contrib check hydra mine             # exit 1 listing what is missing

A method is complete when its taxonomy has every column filled, it declares its structures,
its module docstring names the paper, and ``tests/test_method_<name>.py`` (or a test file that
imports the method's module) tests its core step.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from . import registry


def changed_files(base: str, head: str = "HEAD", repo: str | Path = ".") -> list[str]:
    """Paths changed between the merge base of ``base`` and ``head`` (added, modified, renamed; not deleted)."""
    out = subprocess.run(
        ["git", "diff", "--name-only", "--diff-filter=AMR", f"{base}...{head}"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if line]


def methods_in_files(files: list[str], repo: str | Path = ".") -> list[str]:
    """Names of the registered methods defined in ``files`` (paths relative to ``repo``).

    Files under ``methods/`` are the in-repo collection; other ``.py`` files are not method files.
    """
    registry.load_builtin()
    wanted = {(Path(repo) / f).resolve() for f in files if f.startswith("methods/") and f.endswith(".py")}
    found = []
    for name in registry.names():
        source = inspect.getsourcefile(registry.get(name))
        if source and Path(source).resolve() in wanted:
            found.append(name)
    return found


def problems(name: str, repo: str | Path = ".") -> list[str]:
    """What a contributor still has to add for method ``name``; empty when complete."""
    cls = registry.get(name)
    out = []
    for f in fields(cls.taxonomy):
        value = getattr(cls.taxonomy, f.name)
        if f.name != "repository" and (value is None or str(getattr(value, "value", value)).strip() == ""):
            out.append(f"{name}: taxonomy field {f.name!r} is empty")
    if not cls.structures:
        out.append(f"{name}: declares no structures")
    module = sys.modules[cls.__module__]
    if not (module.__doc__ or "").strip():
        out.append(f"{name}: the module has no docstring naming the paper it implements")
    stem = Path(inspect.getsourcefile(cls)).stem
    tests = Path(repo) / "tests"
    own = tests / f"test_method_{name}.py"
    importing = [p for p in tests.glob("test_*.py") if f"methods.{stem} import" in p.read_text() or
                 f"methods import {stem}" in p.read_text()] if tests.is_dir() else []
    if not own.is_file() and not importing:
        out.append(f"{name}: no test of its core step; add tests/test_method_{name}.py")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_advprune.contrib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ch = sub.add_parser("changed", help="print the comma list of methods changed since BASE")
    ch.add_argument("--base", required=True)
    ch.add_argument("--head", default="HEAD")
    ck = sub.add_parser("check", help="check that methods have a complete taxonomy and a core-step test")
    ck.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "changed":
        print(",".join(methods_in_files(changed_files(args.base, args.head))))
        return 0
    registry.load_builtin()
    found = [p for n in args.names for p in problems(n)]
    for p in found:
        print(p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
