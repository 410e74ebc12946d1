"""Command-line pieces shared by the benchmark scripts: the run options every script takes, loading
the methods, and a ``METHOD-STRUCTURE-SPARSITY`` cell spec. Imported by the scripts as a sibling
module (``python benchmarks/<script>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import argparse

from pytest_advprune import registry
from pytest_advprune.cache import default_dir
from pytest_advprune.errors import AdvPruneError
from pytest_advprune.presets import Preset
from pytest_advprune.session import Cell


def add_run_options(ap: argparse.ArgumentParser, methods_dir: bool = False) -> None:
    """``--cache-dir`` (default: the shared cache), ``--device`` (auto, cpu, cuda[:N]), ``--out`` (the
    folder of the JSON, default ``reports/benchmarks``) and, with ``methods_dir``, ``--methods-dir``."""
    if methods_dir:
        ap.add_argument("--methods-dir", default=None, help="a folder of method files, as --advprune-methods-dir")
    ap.add_argument("--cache-dir", default=str(default_dir()))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="reports/benchmarks")


def load_methods(methods_dir: str | None = None) -> None:
    """Register the built-in methods and those of ``methods_dir``; a bad folder is a one-line SystemExit."""
    try:
        registry.load_builtin()
        if methods_dir:
            registry.load_dir(methods_dir)
    except AdvPruneError as exc:
        raise SystemExit(str(exc)) from None


def parse_cell(spec: str, preset: Preset, option: str, dense: bool = False) -> Cell:
    """The cell of a ``METHOD-STRUCTURE-SPARSITY`` spec (e.g. ``hydra-weights-99``, sparsity in percent)
    on the preset's first architecture; with ``dense``, also the unpruned reference ``dense-dense-0``.
    One-line SystemExit naming ``option`` when the spec is malformed, the method unknown, or the
    structure one the method does not produce."""
    parts = spec.strip().rsplit("-", 2)
    if len(parts) != 3 or not parts[2].isdigit() or not 0 <= int(parts[2]) < 100:
        raise SystemExit(f"{option}: {spec!r} is not METHOD-STRUCTURE-SPARSITY with a sparsity in percent "
                         "(e.g. hydra-weights-99)")
    method, structure, sparsity = parts[0], parts[1], int(parts[2])
    try:
        cls = registry.get(method)
    except AdvPruneError as exc:
        raise SystemExit(f"{option}: {exc}") from None
    allowed = [s for s in cls.structures if dense or s != "dense"]
    if structure not in allowed:
        raise SystemExit(f"{option}: {spec!r}: {method} gives {', '.join(allowed) or 'no cell here'}, not {structure!r}")
    if (structure == "dense") != (sparsity == 0):
        raise SystemExit(f"{option}: {spec!r}: sparsity 0 is the dense cell's alone (dense-dense-0); "
                         "a pruned cell needs 1-99")
    return Cell(method, preset.dataset, preset.archs[0], structure, sparsity)
