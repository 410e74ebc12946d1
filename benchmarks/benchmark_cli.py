"""Command-line pieces shared by the benchmark scripts: the run options every script takes, loading
the methods and a preset, a ``METHOD-STRUCTURE-SPARSITY`` cell spec, and the JSON file that
accumulates a script's records over runs. Imported by the scripts as a sibling
module (``python benchmarks/<script>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pytest_advprune import presets, registry
from pytest_advprune.cache import default_dir
from pytest_advprune.errors import AdvPruneError
from pytest_advprune.presets import Preset
from pytest_advprune.session import AdvPruneSession, Cell, CellResult, versions


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


def load_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line SystemExit listing the presets."""
    try:
        return presets.get(name)
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


def write_records(path: Path, header: dict, records: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """Write ``{**header, "records": [...]}`` to ``path`` (atomically: a temporary file, then a rename)
    with the records of an earlier run in ``path`` that ``records`` do not replace (those with equal
    values of ``fields``, e.g. cell and recipe) first, then ``records``: runs of other settings add up
    in one file. Creates ``path``'s folder if needed. Returns the records written."""
    def key(r):
        return tuple(r.get(f) for f in fields)
    old = json.loads(path.read_text())["records"] if path.exists() else []
    new = {key(r) for r in records}
    kept = [r for r in old if key(r) not in new] + records
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**header, "records": kept}, indent=2))
    tmp.replace(path)
    return kept


def judged(session: AdvPruneSession, cell: Cell, where: str = "") -> tuple[CellResult, dict]:
    """Build (or load) and evaluate ``cell`` as the suite does, and judge it against the preset's floors:
    ``(result, fields)``, the fields every such script records (budget, seconds, points, clean and
    worst-case robust accuracy, per-attack accuracy, floors, verdicts of sparsity (not for the dense
    cell), clean and robust, ``meets_floors``, the pruned model's key, device, versions). A cell that
    cannot be built is a one-line SystemExit naming it and ``where`` (e.g. `` at scale 2x2``)."""
    res = session.result(cell)
    if res.error or res.evaluation is None:
        raise SystemExit(f"could not build {cell.id}{where}: {res.error or res.skip_reason or 'not evaluated'}")
    kinds = ("clean", "robust") if cell.structure == "dense" else ("sparsity", "clean", "robust")
    verdicts = {kind: session.check(cell, kind).passed for kind in kinds}
    _, min_clean, min_robust = session.floors(cell)
    return res, {
        "budget": res.budget, "cell_s": res.duration_s, "n_points": res.evaluation.clean.n,
        "clean": res.evaluation.clean.acc, "robust": res.evaluation.robust.acc,
        "attacks": {k: a.acc for k, a in res.evaluation.attacks.items()},
        "floors": {"clean": min_clean, "robust": min_robust}, "verdicts": verdicts,
        "meets_floors": all(verdicts.values()), "pruned_key": session.pruned_key(cell),
        "device": str(session.device), "versions": versions()}


#: Headers of :func:`judged_columns`, the last columns of a script's table of judged cells.
JUDGED_HEADERS = ["cell (s)", "clean (%)", "robust (%)", "floors (%)", "meets floors"]


def judged_columns(r: dict) -> list[str]:
    """The table cells of a record carrying :func:`judged`'s fields, under :data:`JUDGED_HEADERS`."""
    def pct(v):
        return f"{100 * v:.1f}"
    return [f"{r['cell_s']:.0f}", pct(r["clean"]), pct(r["robust"]), f"{pct(r['floors']['clean'])} / {pct(r['floors']['robust'])}",
            "yes" if r["meets_floors"] else "no"]
