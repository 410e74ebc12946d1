"""Reports: records -> JSON (merged by cell) -> markdown leaderboard (tabulate).

``reports/<preset>.json`` is the source of truth; ``reports/<preset>.md`` is always rendered
from it, never edited by hand. Runs merge by cell: running methods one by one builds one
leaderboard, re-running a cell replaces its record. Writes hold a file lock and are atomic;
an unreadable JSON is moved aside (``.corrupt-<time>``) and reported, never overwritten blindly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from filelock import FileLock, Timeout
from tabulate import tabulate

from .curves import curves_dir, figure_name, write_curves
from .errors import AdvPruneError
from .files import atomic_write_bytes
from .published import SURVEY

if TYPE_CHECKING:
    from .session import AdvPruneSession, Cell, CellResult

SCHEMA = 1
_KEY = ("method", "preset", "dataset", "arch", "structure", "target_sparsity")


def protocol_id(preset) -> str:
    """Identifies everything that makes two records comparable: the preset's protocol fields and
    the engine version. Records with different ids are never merged into one leaderboard."""
    from .cache import ENGINE_VERSION

    return f"{preset.name}-e{ENGINE_VERSION}-{preset.fingerprint()}"


def cell_checks() -> tuple[str, ...]:
    """Every check a cell's whole verdict needs: ``sparsity``, ``clean``, ``robust`` and one
    ``indicator:<name>`` per attack-failure indicator (the conformance suite's tests of a cell)."""
    from .indicators import NAMES  # here, not at the top: the report's command line needs no torch

    return ("sparsity", "clean", "robust", *(f"indicator:{n}" for n in NAMES))


def record_status(outcomes: dict[str, str], skip_reason: str | None, error: str | None) -> tuple[str, bool | None]:
    """``(status, passed)`` of a cell from its checks' outcomes (:func:`cell_checks` -> ``passed``/
    ``failed``/``skipped``/``xfailed``): SKIP, ERROR, not run, FAIL, XFAIL, PASS or partial; ``passed``
    is None for SKIP, partial and not run. A failed check fails the cell whatever else ran; XFAIL and
    PASS need every check of :func:`cell_checks` (an interrupted or ``-k`` run that left some out is
    partial, so it never replaces a whole verdict in the report)."""
    if skip_reason:
        status = "SKIP"
    elif error:
        status = "ERROR"
    elif not outcomes:
        status = "not run"
    elif any(v == "failed" for v in outcomes.values()):
        status = "FAIL"
    elif not set(cell_checks()) <= set(outcomes):
        status = "partial"
    elif any(v == "xfailed" for v in outcomes.values()):
        status = "XFAIL"  # failed a check, as the method's known_failures entry says it will
    elif "passed" in outcomes.values() and all(v in ("passed", "skipped") for v in outcomes.values()):
        status = "PASS"
    else:
        status = "partial"
    return status, {"PASS": True, "FAIL": False, "XFAIL": False, "ERROR": False}.get(status)


def make_record(cell: "Cell", res: "CellResult", session: "AdvPruneSession", versions: dict[str, str]) -> dict[str, Any]:
    """One JSON record per cell. Accuracies and sparsities are fractions in [0, 1]."""
    p = session.preset
    outcomes = res.outcomes
    status, passed = record_status(outcomes, res.skip_reason, res.error)
    rec: dict[str, Any] = {
        "method": cell.method, "preset": p.name, "dataset": cell.dataset, "arch": cell.arch,
        "structure": cell.structure, "target_sparsity": cell.sparsity / 100,
        "status": status, "passed": passed,
        "known_failure": res.known_failure,
        "checks": dict(outcomes), "skip_reason": res.skip_reason, "error": res.error,
        "protocol": protocol_id(p),
        "seed": p.seed, **computed_on(res.provenance, str(session.device), versions), "duration_s": round(res.duration_s, 2),
        "provenance": dict(sorted(res.provenance.items())), "date": session.started.isoformat(timespec="seconds"),
    }
    if res.budget is not None:
        rec["train_epochs"] = {**res.budget, "preset_budget": p.dense_train.epochs + p.prune_train.epochs + p.finetune.epochs}
    if res.sparsity is not None:
        rec["achieved_sparsity"] = res.sparsity.sparsity
        rec["weight_sparsity"] = res.sparsity.weight_sparsity
        rec["per_layer"] = {k: list(v) for k, v in res.sparsity.per_layer.items()}
    if res.inference is not None:  # params, flops, latency_speedup, dense_params, dense_flops, inference
        rec.update(res.inference)
    if res.evaluation is not None:
        ev = res.evaluation
        tol, min_clean, min_robust = session.floors(cell)
        rec.update({
            "clean_acc": ev.clean.acc,
            "robust_acc": {"worst_case": ev.robust.acc, **{k: v.acc for k, v in ev.attacks.items()}},
            "n_eval": ev.clean.n,
            "ci95": {"clean": list(ev.clean.ci95), "robust": list(ev.robust.ci95)},
            "floors": {"sparsity_tol": tol, "clean": min_clean, "robust": min_robust},
            "attack_warnings": ev.warnings,
            "eval_s": round(ev.duration_s, 2),
            "per_point": {"clean": ev.clean.flags, "robust": ev.robust.flags},
            "ci95_attacks": {k: list(v.ci95) for k, v in ev.attacks.items()},
        })
        if getattr(ev, "fmn", None) is not None:
            rec["fmn"] = _fmn_record(ev, p.eps)
    if res.indicators is not None:
        rec["indicators"] = {k: {f: v for f, v in ind.to_dict().items() if f != "name"} for k, ind in res.indicators.items()}
    return rec


def computed_on(provenance: dict[str, dict | None], run_device: str, run_versions: dict[str, str]) -> dict[str, Any]:
    """A record's ``device`` and ``versions``: those stored with the artefact its numbers come from (the
    evaluation, else the model for a sparsity-only record), which a shared cache may have brought from
    another machine; ``device`` ``"unknown"`` (and this run's versions) for an artefact cached before
    provenance was stored; this run's (``run_device``, ``run_versions``) for a cell that built nothing
    (skipped, or failed before its model existed)."""
    if not provenance:
        return {"device": run_device, "versions": run_versions}
    built = provenance.get("evaluation" if "evaluation" in provenance else "model") or {}
    return {"device": built.get("device", "unknown"), "versions": built.get("versions", run_versions)}


def _fmn_record(ev, eps: float) -> dict[str, Any]:
    """The FMN part of a record: ``norms`` as :meth:`FMNResult.to_dict` writes them (per-point
    distances rounded to 6 significant digits, ``null`` = +inf = no adversarial example found;
    the tuned ``config``, its ``config_label`` and every tuning score), each norm's median distance (``null`` = +inf),
    seconds of FMN beside AutoAttack + PGD, and AutoAttack / FMN-Linf / worst-case robust accuracy as
    ``[acc, ci95 low, ci95 high]``. ``fmn_missed``: points PGD or AutoAttack broke at eps that FMN-Linf
    did not; ``fmn_only``: points only FMN-Linf broke."""
    from .evaluate import FMN_LINF

    out = {**ev.fmn.to_dict(), "eps": eps,
           "median": {n: None if math.isinf(r.median()) else r.median() for n, r in ev.fmn.norms.items()},
           "seconds": {"fmn": round(ev.fmn.seconds, 2), "autoattack_pgd": round(ev.duration_s, 2)}}
    for norm, r in ev.fmn.norms.items():
        out["norms"][norm]["config_label"] = r.config.label()
    robust = {"worst_case": [ev.robust.acc, *ev.robust.ci95]}
    aa = [a for k, a in ev.attacks.items() if k.startswith("AA:")]
    if aa:
        robust["autoattack"] = [aa[-1].acc, *aa[-1].ci95]  # the cascade's cumulative flags after its last attack
    if FMN_LINF in ev.attacks:
        fmn = ev.attacks[FMN_LINF]
        robust["fmn_linf"] = [fmn.acc, *fmn.ci95]
        others = ev.clean.tensor()
        for k, a in ev.attacks.items():
            if k != FMN_LINF:
                others = others & a.tensor()
        out["fmn_missed"] = int((~others & fmn.tensor()).sum())
        out["fmn_only"] = int((others & ~fmn.tensor()).sum())
    out["robust"] = robust
    return out


class ReportMismatch(AdvPruneError):
    """The report file at the target path belongs to another preset."""


def check_target(md_path: Path, preset: str, option: str = "--advprune-report=") -> None:
    """Raise :class:`ReportMismatch` if the JSON beside ``md_path`` holds another preset's records, or
    if the report cannot be written there (a file where a folder should be, no write permission),
    so a run fails before any cell is computed rather than after all of them. ``option`` prefixes the
    path in the messages (the command line's ``-o `` for ``report merge``)."""
    md_path = Path(md_path)
    if md_path.suffix != ".md" or md_path.is_dir():
        example = md_path.with_suffix(".md").name if md_path.stem and md_path.stem != ".md" else "reports/smoke.md"
        raise ReportMismatch(f"{option}{md_path}: give the markdown file's path, ending in .md (the JSON "
                             f"goes beside it), e.g. {option}{example}")
    folder = next(p for p in (md_path.parent, *md_path.parent.parents) if p.exists())
    if not folder.is_dir():
        raise ReportMismatch(f"{option}{md_path}: {folder} is a file, not a folder; pass a report path "
                             "in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReportMismatch(f"{option}{md_path}: {folder} is not writable; pass a report path you can write")
    json_path = md_path.with_suffix(".json")
    if md_path.parent.is_dir():
        try:  # the lock file write() takes: a folder that looks writable may still refuse it (/proc, a read-only mount)
            with open(_lock_path(json_path), "a"):
                pass
        except OSError as exc:
            raise ReportMismatch(f"{option}{md_path}: cannot create {_lock_path(json_path)} ({exc.strerror}); "
                                 "pass a report path in a folder you can write") from None
    try:
        held = json.loads(json_path.read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        return  # absent or unreadable: write() creates it or moves it aside
    if held not in (None, preset):
        raise ReportMismatch(f"{json_path} holds preset {held!r}, not {preset!r}; pass {option}reports/{preset}.md")


LOCK_TIMEOUT_S = 600


def _lock_path(json_path: Path) -> str:
    return str(json_path) + ".lock"


@contextlib.contextmanager
def _locked(json_path: Path):
    """Hold the report's file lock (other runs write the same report); a lock not won within
    :data:`LOCK_TIMEOUT_S` raises :class:`ReportMismatch` instead of waiting forever."""
    lock = FileLock(_lock_path(json_path))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise ReportMismatch(f"could not lock {_lock_path(json_path)} within {LOCK_TIMEOUT_S} s: another run is writing "
                             "this report, or the lock file cannot be created there") from None
    try:
        yield
    finally:
        lock.release()


def _cell_id(r: dict, dataset: bool = False) -> str:
    """How the report names a record's cell, e.g. ``hydra-cnn-weights-90``; with ``dataset``, as the
    test ids do, ``hydra-fashion_mnist-cnn-weights-90``."""
    where = f"{r['dataset']}-{r['arch']}" if dataset else r["arch"]
    return f"{r['method']}-{where}-{r['structure']}-{round(100 * r['target_sparsity'])}"


def _key(rec: dict) -> tuple:
    return tuple(rec[k] for k in _KEY)


def check_document(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a report document of this schema whose records name their cells; else
    raises ValueError saying what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("records"), list):
        raise ValueError(f"not a schema-{SCHEMA} pytest-advprune report")
    if not all(isinstance(r, dict) and all(k in r for k in (*_KEY, "status")) for r in doc["records"]):
        raise ValueError(f"a record lacks one of {', '.join((*_KEY, 'status'))}")
    return doc


def load(json_path: Path, log=lambda s: None) -> dict[str, Any] | None:
    """The report document at ``json_path``, or None if absent. An unreadable file is moved
    aside to ``<name>.corrupt-<utc time>`` (reported through ``log``), so nothing is lost."""
    if not json_path.exists():
        return None
    try:
        doc = json.loads(json_path.read_text())
        check_document(doc)
        return doc
    except (ValueError, AttributeError) as exc:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = json_path.with_name(f"{json_path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():  # never replace an earlier aside file of the same second
            aside = json_path.with_name(f"{json_path.name}.corrupt-{stamp}-{n}")
            n += 1
        json_path.rename(aside)
        log(f"report: {json_path} was unreadable ({exc}); moved it to {aside} and started a new report")
        return None


INCOMPLETE = ("partial", "not run")


def whole_verdict(rec: dict) -> bool:
    """Whether a record holds its cell's whole verdict: not from a run that checked the cell only in
    part (status ``partial`` or ``not run``: a ``-k`` selection, an interrupted run)."""
    return rec.get("status") not in INCOMPLETE


def merge(old: list[dict], new: list[dict], on_kept: Callable[[dict], None] = lambda rec: None) -> list[dict]:
    """Records of ``old`` not in ``new`` (by cell key), then all of ``new``, sorted by cell key.

    A record of a run that checked a cell only in part (status ``partial`` or ``not run``: a ``-k``
    selection, an interrupted run) never replaces one that holds the cell's whole verdict; that one
    is kept and passed to ``on_kept``."""
    whole = {_key(r): r for r in old if whole_verdict(r)}
    fresh = {}
    for rec in new:
        if not whole_verdict(rec) and _key(rec) in whole:
            on_kept(whole[_key(rec)])
        else:
            fresh[_key(rec)] = rec
    kept = [r for r in old if _key(r) not in fresh]
    return sorted(kept + list(fresh.values()), key=lambda r: tuple(str(v) for v in _key(r)))


def combine(records: list[dict]) -> list[dict]:
    """One record per cell, in order of first appearance. Records of one cell from several processes
    (pytest-xdist workers that each ran some of its checks, e.g. under ``--dist load``) are joined:
    check outcomes united, measured fields from the record with the most fields, the first error
    kept (a cell that errored in one process never passes), and the verdict recomputed."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(_key(rec), []).append(rec)
    out = []
    for group in groups.values():
        rec = dict(max(group, key=len))
        if len(group) > 1:
            rec["checks"] = {k: v for r in group for k, v in r["checks"].items()}
            rec["error"] = next((r["error"] for r in group if r.get("error")), None)
            rec["status"], rec["passed"] = record_status(rec["checks"], rec.get("skip_reason"), rec["error"])
        out.append(rec)
    return out


def _describe(doc: dict, records: list[dict], session: "AdvPruneSession") -> None:
    """Set the document's preset, protocol, header, update time and the taxonomy of ``records``' methods."""
    from . import registry

    doc["preset"] = session.preset.name
    doc["protocol"] = protocol_id(session.preset)
    doc["header"] = {**session.preset.header(), "attack choice": session.preset.attack_choice,
                     "floors": session.preset.floors.derivation}
    for name in {r["method"] for r in records}:
        if name in registry.names():
            cls = registry.get(name)
            doc["taxonomy"][name] = cls.taxonomy.row(cls.structures)
    doc["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_aside(json_path: Path, records: list[dict], session: "AdvPruneSession") -> None:
    """Write ``records`` alone as a report document at ``json_path``, for ``report merge`` into the
    report once it can be written (raises OSError if this file cannot be written either)."""
    doc = {"schema": SCHEMA, "records": merge([], records), "taxonomy": {}}
    _describe(doc, records, session)
    atomic_write_bytes(Path(json_path), (json.dumps(doc, indent=1) + "\n").encode())


def write(md_path: Path, records: list[dict], session: "AdvPruneSession") -> tuple[Path, Path]:
    """Merge ``records`` into the JSON beside ``md_path`` (same stem) and re-render the markdown."""
    md_path = Path(md_path)
    json_path = md_path.with_suffix(".json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(json_path):
        doc = load(json_path, session.notice) or {"schema": SCHEMA, "records": [], "taxonomy": {}}
        if doc.get("preset") not in (None, session.preset.name):
            raise ReportMismatch(f"{json_path} holds preset {doc['preset']!r}, not {session.preset.name!r}; "
                             f"pass --advprune-report=reports/{session.preset.name}.md")
        stale = [r for r in doc["records"] if r.get("protocol") != protocol_id(session.preset)]
        if stale:
            # Never lost: a record of an older protocol leaves the leaderboard, kept until its cell is re-run.
            session.notice(f"report: {len(stale)} record(s) of an older protocol of preset {session.preset.name} moved to "
                        f"'superseded' (re-run those cells to bring them back under the current protocol)")
            doc["records"] = [r for r in doc["records"] if r not in stale]
        fresh = {_key(r) for r in records if whole_verdict(r)}  # a partial run re-checks nothing whole
        doc["superseded"] = [r for r in merge(doc.get("superseded", []), stale) if _key(r) not in fresh]
        _describe(doc, records, session)
        kept = []
        doc["records"] = merge(doc["records"], records, kept.append)
        if kept:
            session.notice(f"report: kept the earlier whole verdict of {len(kept)} cell(s) this run checked only in part "
                        f"({', '.join(_cell_id(r) for r in kept[:3])}{' ...' if len(kept) > 3 else ''}); run all "
                        "of a cell's tests to replace it")
        doc["curves_dir"] = curves_dir(md_path).name
        text = json.dumps(doc, indent=1) + "\n"
        atomic_write_bytes(json_path, text.encode())
        write_curves(json.loads(text), md_path)
        atomic_write_bytes(md_path, render_markdown(json.loads(text)).encode())  # exactly what the JSON renders to
    return md_path, json_path


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell_text(rec: dict | None, best: bool, markdown: bool) -> str:
    if rec is None:
        return "–"
    if rec["status"] == "SKIP":
        return "skip"
    if rec["status"] == "ERROR":
        return "ERROR"
    text = f"{_pct(rec.get('clean_acc'))} / {_pct(rec.get('robust_acc', {}).get('worst_case'))}"
    if best and markdown:
        text = f"**{text}**"
    return f"{text} {rec['status']}"


def ranked(rec: dict) -> bool:
    """Whether a record competes for a column's best: it has a robust accuracy, did not miss its
    sparsity target (a model less sparse than claimed must not win the column) and no attack-failure
    indicator failed (an untrustworthy robust accuracy, e.g. gradient masking, must not win it either)."""
    indicators = (rec.get("indicators") or {}).values()
    return ("robust_acc" in rec and (rec.get("checks") or {}).get("sparsity") != "failed"
            and not any(i.get("passed") is False for i in indicators))


def leaderboard_tables(doc: dict, markdown: bool = True) -> list[tuple[str, str]]:
    """``(title, table)`` per (dataset, structure): one row per method, columns arch x sparsity,
    cells ``clean / robust`` with the best robust accuracy per column in bold (among the records
    that met their sparsity target and passed every indicator, :func:`ranked`). The dense
    reference appears in every table in its own ``dense`` column (no sparsity to claim)."""
    recs = doc["records"]
    fmt = "github" if markdown else "simple"
    dense = [r for r in recs if r["structure"] == "dense"]
    out = []
    only_dense = all(r["structure"] == "dense" for r in recs)  # e.g. a run of --advprune-method=dense alone
    for dataset in sorted({r["dataset"] for r in recs}):
        for structure in ("weights", "filters", "channels"):
            rows = [r for r in recs if r["dataset"] == dataset and r["structure"] == structure]
            if not rows and not (only_dense and structure == "weights"):
                continue
            archs = sorted({r["arch"] for r in rows} | {r["arch"] for r in dense if r["dataset"] == dataset})
            sps = sorted({round(100 * r["target_sparsity"]) for r in rows})
            cols = [(a, 0) for a in archs] + [(a, s) for a in archs for s in sps]
            table_recs = rows + [r for r in dense if r["dataset"] == dataset]
            by = {(r["method"], r["arch"], round(100 * r["target_sparsity"])): r for r in table_recs}
            best = {}
            for col in cols:
                vals = [by[(m, *col)]["robust_acc"]["worst_case"] for m in {r["method"] for r in table_recs}
                        if (m, *col) in by and ranked(by[(m, *col)])]
                best[col] = max(vals) if vals else None
            methods = sorted({r["method"] for r in table_recs}, key=lambda m: (m != "dense", m))
            body = []
            for m in methods:
                row = [m]
                for col in cols:
                    rec = by.get((m, *col))
                    is_best = rec is not None and ranked(rec) and rec["robust_acc"]["worst_case"] == best[col]
                    row.append(_cell_text(rec, is_best and col[1] != 0, markdown))
                body.append(row)
            headers = ["method"] + [f"{a} dense" if s == 0 else f"{a} {s}%" for a, s in cols]
            out.append((_table_title(dataset, structure), tabulate(body, headers, tablefmt=fmt, disable_numparse=True)))
    return out


def _table_title(dataset: str, structure: str) -> str:
    kind = "unstructured" if structure == "weights" else "structured"
    return f"{dataset}, {kind} ({structure}): clean / robust accuracy (%)"


def mcnemar_notes(doc: dict, alpha: float = 0.05) -> dict[str, str]:
    """``{leaderboard table title: note}``: per column (arch, sparsity) of each table, the methods whose
    robust accuracy McNemar's test (:mod:`pytest_advprune.stats`, Holm-corrected within the column)
    does not tell apart from the column's best at ``alpha``. Uses the records' per-point robust flags
    of the :func:`ranked` records; columns with fewer than two such records are left out."""
    from .stats import ties_with_best

    by_table: dict[str, list[str]] = {}
    usable = [r for r in doc["records"] if r["status"] not in ("SKIP", "ERROR") and (r.get("per_point") or {}).get("robust")
              and r["structure"] != "dense" and ranked(r)]
    for dataset, structure, arch, sparsity in sorted({(r["dataset"], r["structure"], r["arch"], r["target_sparsity"])
                                                      for r in usable}):
        col = [r for r in usable if (r["dataset"], r["structure"], r["arch"], r["target_sparsity"]) ==
               (dataset, structure, arch, sparsity)]
        if len(col) < 2 or len({len(r["per_point"]["robust"]) for r in col}) > 1:
            continue
        best, ties = ties_with_best({r["method"]: r["per_point"]["robust"] for r in col},
                                    {r["method"]: r["robust_acc"]["worst_case"] for r in col}, alpha)
        tied = ", ".join(f"{m} (p = {p:.2g})" for m, p in ties.items()) or "none"
        by_table.setdefault(_table_title(dataset, structure), []).append(
            f"{arch} {round(100 * sparsity)}%: best {best}; not distinguishable from it: {tied}")
    return {title: (f"Paired test of robust accuracy per column (McNemar 1947, exact binomial under 25 discordant "
                    f"points; Holm-corrected within a column; alpha = {alpha}): " + "; ".join(parts) + ".")
            for title, parts in by_table.items()}


def _median(v) -> str:
    return "∞" if v is None else f"{v:.4g}"


def _acc_ci(triple: list[float] | None) -> str:
    if not triple:
        return "–"
    acc, lo, hi = triple
    return f"{_pct(acc)} [{_pct(lo)}, {_pct(hi)}]"


def _fmn_table(doc: dict) -> str | None:
    """The minimum-norm section: per evaluated cell, AutoAttack / FMN-Linf / worst-case robust accuracy,
    FMN's median distances, tuned configurations, seconds and links to the security curves."""
    rows = []
    folder = doc.get("curves_dir")
    for r in doc["records"]:
        f = r.get("fmn")
        if not f:
            continue
        norms = sorted(f["norms"], key=lambda n: (n != "linf", n))  # one order, fresh or loaded from sort_keys JSON
        links = " ".join(f"[{n}]({folder}/{figure_name(r, n)})" for n in norms) if folder else "–"
        rows.append([
            _cell_id(r),
            _acc_ci(f["robust"].get("autoattack")), _acc_ci(f["robust"].get("fmn_linf")), _acc_ci(f["robust"]["worst_case"]),
            f"{f.get('fmn_missed', '–')} / {f.get('fmn_only', '–')}",
            " / ".join(_median(f["median"].get(n)) for n in ("linf", "l2") if n in norms),
            "; ".join(f"{n} {f['norms'][n]['config_label']}" for n in norms),
            f"{f['seconds']['fmn']:.0f} / {f['seconds']['autoattack_pgd']:.0f}", links,
        ])
    if not rows:
        return None
    return tabulate(rows, ["cell", "AutoAttack robust % [95% CI]", "FMN-Linf robust % [95% CI]", "worst case % [95% CI]",
                           "FMN missed / only FMN (points)", "FMN median distance (Linf / L2)", "tuned FMN",
                           "time s (FMN / AA+PGD)", "security curves"], tablefmt="github", disable_numparse=True)


def _survey_table(doc: dict) -> str | None:
    rows = []
    for r in doc["records"]:
        kind = "weights" if r["structure"] == "weights" else "structured"
        pub = SURVEY.get((r["method"], r["dataset"], r["arch"], kind, round(100 * r["target_sparsity"])))
        if pub and "clean_acc" in r:
            rows.append([r["method"], r["arch"], r["structure"], f"{round(100 * r['target_sparsity'])}%",
                         f"{_pct(r['clean_acc'])} / {_pct(r['robust_acc']['worst_case'])}", f"{pub[0]:.1f} / {pub[1]:.1f}"])
    if not rows:
        return None
    return tabulate(rows, ["method", "arch", "structure", "sparsity", "ours clean / robust", "survey clean / robust"],
                    tablefmt="github", disable_numparse=True)


def _epochs(budget: dict | None) -> str:
    """Training-budget accounting of a cell, e.g. ``5 + 2 = 7 of 7``; ``–`` when not recorded."""
    if not budget:
        return "–"
    return f"{budget['pretrain']:g} + {budget['method']:g} = {budget['total']:g} of {budget['preset_budget']:g}"


COST_NOTE = ("Parameters and FLOPs (one input, torch's `FlopCounterMode`) read `ours / dense`. Structured cells are "
             "physically compacted (`pytest_advprune/compact.py`, outputs verified equal to the masked model's); their "
             "latency speedup is the dense over the compacted median latency, measured on the device shown. Unstructured "
             "cells count non-zero parameters and dense FLOPs and claim no speedup (the survey reports nominal sparsity only).")


def _count(n: int | None) -> str:
    """``1234567`` -> ``1.23M``; ``–`` when not measured."""
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _cost(r: dict) -> list[str]:
    """Detail-table cells ``parameters``, ``FLOPs`` (ours / dense) and ``latency speedup`` of a record."""
    if "dense_params" not in r:
        return ["–", "–", "–"]
    speedup = r.get("latency_speedup")
    lat = "–" if speedup is None else f"{speedup:.2f}x ({r['inference']['device']})"
    return [f"{_count(r.get('params'))} / {_count(r['dense_params'])}", f"{_count(r.get('flops'))} / {_count(r.get('dense_flops'))}", lat]


def _floors(r: dict) -> str:
    """The minimums the cell's verdict used (the preset's floors or the command line's overrides):
    achieved sparsity >= target - tolerance, clean and worst-case robust accuracy, in percent."""
    f = r.get("floors")
    if not f:
        return "–"
    least = max(0.0, r["target_sparsity"] - f["sparsity_tol"])
    return " / ".join(f"{100 * v:.4g}" for v in (least, f["clean"], f["robust"]))


def _detail_table(doc: dict) -> str:
    rows = []
    for r in doc["records"]:
        error = (r.get("inference") or {}).get("error")
        if "clean_acc" not in r:
            reason = r.get("skip_reason") or r.get("error") or ""
            rows.append([_cell_id(r), r["status"],  # a cell checked for sparsity only has that measured
                         _pct(r.get("achieved_sparsity")), "–", "–", "–", "–", "–", *_cost(r), reason])
            continue
        attacks = ", ".join(f"{k} {_pct(v)}" for k, v in r["robust_acc"].items() if k != "worst_case")
        lo, hi = r["ci95"]["robust"]
        rows.append([
            _cell_id(r), r["status"],
            _pct(r.get("achieved_sparsity")), _acc_ci([r["clean_acc"], *r["ci95"]["clean"]]),
            f"{_pct(r['robust_acc']['worst_case'])} "
            f"[{_pct(lo)}, {_pct(hi)}]", _floors(r), _epochs(r.get("train_epochs")), f"{r['duration_s']:.0f}", *_cost(r),
            attacks + ("; warnings: " + " | ".join(r["attack_warnings"]) if r["attack_warnings"] else "")
            + (f"; known failure: {r['known_failure']}" if r.get("known_failure") else "")
            + (f"; {error}" if error else ""),
        ])
    table = tabulate(rows, ["cell", "verdict", "sparsity %", "clean % [95% CI]", "robust % [95% CI]",
                            "floors: sparsity / clean / robust %", "epochs (pretrain + method)", "time s", "parameters", "FLOPs", "latency speedup",
                            "per attack (%)"],
                     tablefmt="github", disable_numparse=True)
    return table + "\n\n" + COST_NOTE


def _superseded_table(doc: dict) -> str | None:
    rows = [[r["method"], f"{r['arch']} {r['structure']} {round(100 * r['target_sparsity'])}",
             f"{_pct(r.get('clean_acc'))} / {_pct((r.get('robust_acc') or {}).get('worst_case'))}", r["status"],
             r.get("protocol", "-"), r.get("date", "-")] for r in doc.get("superseded", [])]
    if not rows:
        return None
    return tabulate(rows, ["method", "cell", "clean / robust", "status", "protocol", "measured"], tablefmt="github",
                    disable_numparse=True)


def _indicator_section(doc: dict) -> list[str]:
    """Markdown lines of the attack-failure indicators: one row per cell that has them, one column per
    indicator (``ok``, ``FAIL``, ``–`` not run or not applicable), then each failure's message."""
    recs = [r for r in doc["records"] if r.get("indicators")]
    if not recs:
        return []
    names = sorted({k for r in recs for k in r["indicators"]})  # one order, fresh or loaded from sort_keys JSON
    text = {True: "ok", False: "FAIL", None: "–"}
    rows, failures = [], []
    for r in recs:
        cell = _cell_id(r)
        inds = r["indicators"]
        rows.append([cell] + [text[inds[n]["passed"]] if n in inds else "–" for n in names])
        failures += [f"- `{cell}` {n}: {inds[n]['message']}" for n in names if n in inds and inds[n]["passed"] is False]
    lines = ["## Attack-failure indicators", "",
             tabulate(rows, ["cell"] + names, tablefmt="github", disable_numparse=True), "",
             "Each indicator re-checks that the robust accuracy is a measurement and not an attack failure (Pintor et "
             "al. 2022; Carlini et al. 2019); thresholds are in the README. A failed indicator fails the cell and is "
             "never excused by a known failure.", ""]
    return lines + (failures + [""] if failures else [])


def render_markdown(doc: dict) -> str:
    """The whole markdown report of a report document (pure function of the JSON)."""
    recs = doc["records"]
    devices = sorted({r["device"] for r in recs})
    vers = sorted({json.dumps(r["versions"], sort_keys=True) for r in recs})
    dates = sorted(r["date"] for r in recs)
    header = dict(doc["header"])
    header["devices"] = ", ".join(devices)
    header["versions"] = " ; ".join(", ".join(f"{k} {v}" for k, v in json.loads(x).items()) for x in vers)
    header["runs"] = f"{dates[0]} to {dates[-1]}" if dates else "-"
    lines = [f"# pytest-advprune report: preset `{doc['preset']}`", "",
             "Generated from the JSON beside this file by pytest-advprune; do not edit by hand.", "",
             tabulate([[k, v] for k, v in header.items()], ["", ""], tablefmt="github", disable_numparse=True), ""]
    notes = mcnemar_notes(doc)
    for title, table in leaderboard_tables(doc):
        lines += [f"## {title}", "", table, ""]
        if title in notes:
            lines += [notes[title], ""]
    lines += ["Cells read `clean / robust` accuracy in percent on the evaluation points; robust is the point-wise "
              "worst case over the preset's attacks; the best robust accuracy per column is bold (among cells that met their sparsity target and passed every attack-failure indicator); PASS/FAIL is the "
              "cell's conformance verdict (sparsity, clean and robust floors); XFAIL is a failure the method declares as "
              "known (reason in the detail table).", ""]
    survey = _survey_table(doc)
    if survey:
        lines += ["## Beside the survey's published numbers", "", survey, ""]
    fmn = _fmn_table(doc)
    if fmn:
        lines += ["## Minimum-norm attack (FMN) and security curves", "", fmn, "",
                  "FMN-Linf is robust at the preset's eps when its smallest Linf adversarial distance is > eps "
                  "(equal counts as broken); a point FMN found no adversarial example for has distance ∞ (`null` in "
                  "the JSON), a misclassified clean point 0. The worst case takes every attack point by point. "
                  "`FMN missed`: points PGD or AutoAttack broke at eps that FMN did not; `only FMN`: the reverse. "
                  "FMN is tuned per model on points disjoint from the evaluated ones (see the header).", ""]
    lines += ["## Cells in detail", "", _detail_table(doc), ""]
    lines += _indicator_section(doc)
    superseded = _superseded_table(doc)
    if superseded:
        lines += ["## Superseded records", "", "Measured under an older protocol of this preset (its attacks, budgets or "
                  "engine changed since); not comparable with the tables above. Re-run these cells to refresh them.", "",
                  superseded, ""]
    tax = doc.get("taxonomy", {})
    if tax:
        cols = list(next(iter(tax.values())).keys())
        rows = [[m] + [tax[m][c] for c in cols] for m in sorted(tax)]
        lines += ["## Taxonomy (Piras et al. 2024)", "", tabulate(rows, ["method"] + cols, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def terminal_summary(doc: dict) -> str:
    """The leaderboard tables as plain text for pytest's terminal summary."""
    parts = []
    for title, table in leaderboard_tables(doc, markdown=False):
        parts += [title, table, ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------- regression gate


@dataclass(frozen=True)
class Threshold:
    """A regression margin: ``metric`` may fall by ``margin`` percentage points (absolute) or, when
    ``relative``, by ``margin`` percent of the baseline value."""

    metric: str
    margin: float
    relative: bool


METRICS = {"clean_acc": lambda r: r.get("clean_acc"), "robust_acc": lambda r: (r.get("robust_acc") or {}).get("worst_case"),
           "sparsity": lambda r: r.get("achieved_sparsity")}


DEFAULT_COMPARE_FAIL = "robust_acc:1.0,clean_acc:2%"


def parse_compare_fail(spec: str | None) -> list[Threshold]:
    """``"robust_acc:1.0,clean_acc:2%"`` -> thresholds (None: :data:`DEFAULT_COMPARE_FAIL`). Raises
    ValueError with the accepted forms."""
    spec = DEFAULT_COMPARE_FAIL if spec is None else spec
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        metric, _, value = part.partition(":")
        if metric not in METRICS or not value:
            raise ValueError(f"bad compare-fail entry {part!r}; use METRIC:POINTS or METRIC:PERCENT% with METRIC in "
                             f"{', '.join(METRICS)}, e.g. robust_acc:1.0,clean_acc:2%")
        relative = value.endswith("%")
        try:
            margin = float(value.rstrip("%"))
        except ValueError:
            raise ValueError(f"bad compare-fail margin {value!r} in {part!r}; use a number like 1.0 or 2%") from None
        if not math.isfinite(margin) or margin < 0:
            raise ValueError(f"compare-fail margin must be a finite number >= 0, got {part!r}; "
                             f"e.g. robust_acc:1.0,clean_acc:2%")
        out.append(Threshold(metric, margin, relative))
    return out


def regressions(records: list[dict], baseline: list[dict], thresholds: list[Threshold]) -> list[list]:
    """Rows ``[cell, metric, baseline %, ours %, allowed drop]`` for every cell of ``records`` that falls
    below its ``baseline`` record by more than the threshold. Cells absent from the baseline are new, not regressions."""
    base = {_key(r): r for r in baseline}
    rows = []
    for rec in records:
        old = base.get(_key(rec))
        if old is None:
            continue
        for t in thresholds:
            ours, theirs = METRICS[t.metric](rec), METRICS[t.metric](old)
            if theirs is None:
                continue
            if ours is None:
                if not whole_verdict(rec):  # this run did not measure it (-k, an interrupted run)
                    continue
                ours = 0.0  # the cell measured before and now errors
            allowed = theirs * t.margin / 100 if t.relative else t.margin / 100
            if ours < theirs - allowed - 1e-12:
                rows.append([_cell_id(rec, dataset=True), t.metric, f"{100 * theirs:.1f}", f"{100 * ours:.1f}",
                             f"{100 * allowed:.2f}"])
    return rows


def regression_table(rows: list[list]) -> str:
    return tabulate(rows, ["cell", "metric", "baseline %", "now %", "allowed drop (points)"], tablefmt="github", disable_numparse=True)


def add_compare_options(add, prefix: str) -> None:
    """Declare the compare options on ``add`` (pytest's ``group.addoption`` or argparse's
    ``add_argument``) with ``prefix`` (``--advprune-`` or ``--``), so both front ends agree."""
    add(f"{prefix}compare", dest="advprune_compare", default=None, metavar="PATH.json",
        help="baseline report JSON (e.g. the committed reports/quick.json) to compare every cell against")
    add(f"{prefix}compare-fail", dest="advprune_compare_fail", default=None,
        metavar="SPEC", help="allowed drop per metric: METRIC:POINTS or METRIC:PERCENT%%, comma separated "
        "(metrics: clean_acc, robust_acc, sparsity; default robust_acc:1.0,clean_acc:2%%)")


# ------------------------------------------------------------------------- merge CLI


class MergeError(ValueError):
    """Records that cannot share a leaderboard (different preset or protocol)."""


def merge_documents(docs: list[dict]) -> dict:
    """One report document from several (later documents win per cell). Raises :class:`MergeError`
    if they hold different presets or protocol versions."""
    presets = {d.get("preset") for d in docs}
    protocols = {r.get("protocol") for d in docs for r in d["records"]}
    if len(presets) > 1:
        raise MergeError(f"refusing to merge reports of different presets: {', '.join(sorted(map(str, presets)))}")
    if len(protocols) > 1:
        raise MergeError(f"refusing to merge records of different protocol versions: {', '.join(sorted(map(str, protocols)))}")
    out = {"schema": SCHEMA, "preset": docs[0]["preset"], "header": docs[-1].get("header", {}), "records": [],
           "taxonomy": {}, "protocol": next(iter(protocols), None)}
    for d in docs:
        out["records"] = merge(out["records"], d["records"])
        out["taxonomy"].update(d.get("taxonomy", {}))
    whole = {_key(r) for r in out["records"] if whole_verdict(r)}
    superseded = merge([], [r for d in docs for r in d.get("superseded", [])])
    out["superseded"] = [r for r in superseded if _key(r) not in whole]
    out["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return out


def diff_markdown(old: dict | None, new: dict) -> str:
    """What changed between two report documents, as a markdown table (usable as a PR comment)."""
    before = {_key(r): r for r in (old or {"records": []})["records"]}
    rows = []
    for rec in new["records"]:
        prev = before.pop(_key(rec), None)
        now = f"{_pct(rec.get('clean_acc'))} / {_pct((rec.get('robust_acc') or {}).get('worst_case'))} {rec['status']}"
        was = None if prev is None else \
            f"{_pct(prev.get('clean_acc'))} / {_pct((prev.get('robust_acc') or {}).get('worst_case'))} {prev['status']}"
        if was != now:
            rows.append(["-".join(str(v) for v in _key(rec)), was or "new", now])
    rows += [["-".join(str(v) for v in k), "-", "removed"] for k in before]
    if not rows:
        return "No change against the committed leaderboard."
    return tabulate(rows, ["cell", "before", "after"], tablefmt="github", disable_numparse=True)


def _write_unlocked(doc: dict[str, Any], md_path: Path) -> None:
    """Write ``doc`` as ``md_path``'s JSON, its curves and the markdown; the caller holds the lock.
    Raises :class:`ReportMismatch` (one line) if a file cannot be written."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    doc["curves_dir"] = curves_dir(md_path).name
    json_path = md_path.with_suffix(".json")
    try:
        atomic_write_bytes(json_path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        write_curves(doc, md_path)
        atomic_write_bytes(md_path, render_markdown(doc).encode())
    except OSError as exc:  # each file is replaced whole or not at all; the JSON is the source of truth
        raise ReportMismatch(f"could not write {exc.filename or md_path} ({exc.strerror or exc}); {json_path} holds the "
                             f"records: re-render with python -m pytest_advprune.report merge {json_path} -o {md_path}") \
            from None


def _write_document(doc: dict[str, Any], md_path: Path) -> None:
    """:func:`_write_unlocked` under the report's lock (a pytest run may be writing the same report);
    raises :class:`ReportMismatch` if the lock is not won or a file cannot be written."""
    with _locked(md_path.with_suffix(".json")):
        _write_unlocked(doc, md_path)


DROP_FILTERS = ("method", "arch", "structure", "sparsity")


def drop(md_path: Path, **filters: str | None) -> list[dict]:
    """Remove from the report at ``md_path`` the records matching every given filter (``method``,
    ``arch``, ``structure``, ``sparsity`` in percent, e.g. ``"90"``) and rewrite it, reading and writing
    under the report's lock; the taxonomy keeps only methods that still have records. Returns the
    removed records. Raises :class:`ReportMismatch`, writing nothing, when no filter is given, the
    sparsity is not a percentage in [0, 100), the report is absent or unreadable, or no record matches."""
    given = {k: v for k, v in filters.items() if v is not None}
    if not given:
        raise ReportMismatch("give at least one of --method, --arch, --structure, --sparsity (to start a report "
                             "afresh, delete its .md and .json)")
    if "sparsity" in given:
        try:
            percent = float(given["sparsity"])
        except ValueError:
            percent = math.nan
        if not 0 <= percent < 100:
            raise ReportMismatch(f"--sparsity {given['sparsity']}: give the target sparsity in percent, 0 (the dense "
                                 "cell) to 99, e.g. 90")
    json_path = md_path.with_suffix(".json")

    def matches(rec: dict) -> bool:
        values = {"method": rec["method"], "arch": rec["arch"], "structure": rec["structure"]}
        if "sparsity" in given and not math.isclose(100 * rec["target_sparsity"], percent, abs_tol=1e-6):
            return False
        return all(values[k] == v for k, v in given.items() if k != "sparsity")

    if not json_path.is_file():
        raise ReportMismatch(f"{json_path}: no such report; give the .md path of an existing report")
    with _locked(json_path):  # read, filter and write as one step: a run writing meanwhile is not undone
        try:
            doc = check_document(json.loads(json_path.read_text()))
        except (OSError, ValueError) as exc:
            raise ReportMismatch(f"{json_path}: unreadable report ({exc}); nothing was dropped") from None
        check_target(md_path, doc.get("preset"), option="")  # writable, and a .md path
        removed = [r for r in doc["records"] if matches(r)]
        if not removed:
            present = sorted({f"{r['method']} ({r['arch']})" for r in doc["records"]})
            raise ReportMismatch(f"no record of {json_path} matches "
                                 f"{', '.join(f'{k}={v}' for k, v in given.items())}; it holds {', '.join(present) or 'no records'}")
        doc["records"] = [r for r in doc["records"] if not matches(r)]
        methods = {r["method"] for r in doc["records"]}
        doc["taxonomy"] = {m: row for m, row in doc.get("taxonomy", {}).items() if m in methods}
        _write_unlocked(doc, md_path)
    return removed


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_advprune.report merge A.json B.json ... -o reports/NAME.md [--compare BASE.json]``,
    or ``python -m pytest_advprune.report drop reports/NAME.md [--method M] [--arch A] [--structure S] [--sparsity N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pytest_advprune.report")
    sub = parser.add_subparsers(dest="command", required=True)
    mg = sub.add_parser("merge", help="merge report JSON files of one preset into one leaderboard")
    mg.add_argument("inputs", nargs="+", type=Path)
    mg.add_argument("-o", "--output", type=Path, required=True, help="markdown path; the JSON goes beside it")
    add_compare_options(mg.add_argument, "--")
    dr = sub.add_parser("drop", help="remove the records of some cells from a report (all given filters must match)")
    dr.add_argument("report", type=Path, help="the report's markdown path; its JSON is beside it")
    for name in DROP_FILTERS:
        dr.add_argument(f"--{name}", default=None, help="sparsity in percent, e.g. 90" if name == "sparsity" else None)
    args = parser.parse_args(argv)
    if args.command == "drop":
        try:
            removed = drop(args.report, **{k: getattr(args, k) for k in DROP_FILTERS})
        except ReportMismatch as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for rec in removed:
            print(f"dropped {_cell_id(rec, dataset=True)} ({rec['status']})")
        return 0
    docs = []
    for path in args.inputs:
        try:
            docs.append(check_document(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: unreadable report ({exc})", file=sys.stderr)
            return 2
    try:
        merged = merge_documents(docs)
        thresholds = parse_compare_fail(args.advprune_compare_fail)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    baseline = None
    if args.advprune_compare:
        try:
            baseline = json.loads(Path(args.advprune_compare).read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: --compare {args.advprune_compare}: unreadable baseline report ({exc})", file=sys.stderr)
            return 2
    try:  # before anything is written: a path that cannot take the report fails now, not at the lock
        check_target(args.output, merged["preset"], option="-o ")
    except ReportMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path = args.output.with_suffix(".json")
    previous = load(json_path, lambda line: print(line, file=sys.stderr))
    print(diff_markdown(previous, merged))
    status = 0
    if baseline is not None:
        rows = regressions(merged["records"], baseline, thresholds)
        if rows:
            print(regression_table(rows))
            status = 1
    try:
        _write_document(merged, args.output)
    except ReportMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
