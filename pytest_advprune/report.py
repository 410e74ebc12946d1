"""Reports: records -> JSON (merged by cell) -> markdown leaderboard (tabulate).

``reports/<preset>.json`` is the source of truth; ``reports/<preset>.md`` is always rendered
from it, never edited by hand. Runs merge by cell: running methods one by one builds one
leaderboard, re-running a cell replaces its record. Writes hold a file lock and are atomic;
an unreadable JSON is moved aside (``.corrupt-<time>``) and reported, never overwritten blindly.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from tabulate import tabulate

from .cache import atomic_write_bytes
from .published import SURVEY

if TYPE_CHECKING:
    from .session import AdvPruneSession, Cell, CellResult

SCHEMA = 1
_KEY = ("method", "preset", "dataset", "arch", "structure", "target_sparsity")


def make_record(cell: "Cell", res: "CellResult", session: "AdvPruneSession", versions: dict[str, str]) -> dict[str, Any]:
    """One JSON record per cell. Accuracies and sparsities are fractions in [0, 1]."""
    p = session.preset
    outcomes = res.outcomes
    if res.skip_reason:
        status = "SKIP"
    elif res.error:
        status = "ERROR"
    elif not outcomes:
        status = "not run"
    elif any(v == "failed" for v in outcomes.values()):
        status = "FAIL"
    elif all(v in ("passed", "skipped", "xfailed") for v in outcomes.values()) and "passed" in outcomes.values():
        status = "PASS"
    else:
        status = "partial"
    rec: dict[str, Any] = {
        "method": cell.method, "preset": p.name, "dataset": cell.dataset, "arch": cell.arch,
        "structure": cell.structure, "target_sparsity": cell.sparsity / 100,
        "status": status, "passed": {"PASS": True, "FAIL": False, "ERROR": False}.get(status),
        "checks": dict(outcomes), "skip_reason": res.skip_reason, "error": res.error,
        "seed": p.seed, "device": str(session.device), "duration_s": round(res.duration_s, 2),
        "versions": versions, "date": session.started.isoformat(timespec="seconds"),
    }
    if res.sparsity is not None:
        rec["achieved_sparsity"] = res.sparsity.sparsity
        rec["weight_sparsity"] = res.sparsity.weight_sparsity
        rec["per_layer"] = {k: list(v) for k, v in res.sparsity.per_layer.items()}
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
        })
    return rec


def _key(rec: dict) -> tuple:
    return tuple(rec[k] for k in _KEY)


def load(json_path: Path, log=lambda s: None) -> dict[str, Any] | None:
    """The report document at ``json_path``, or None if absent. An unreadable file is moved
    aside to ``<name>.corrupt-<utc time>`` (reported through ``log``), so nothing is lost."""
    if not json_path.exists():
        return None
    try:
        doc = json.loads(json_path.read_text())
        if doc.get("schema") != SCHEMA or not isinstance(doc.get("records"), list):
            raise ValueError(f"not a schema-{SCHEMA} pytest-advprune report")
        return doc
    except (ValueError, AttributeError) as exc:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = json_path.with_name(f"{json_path.name}.corrupt-{stamp}")
        json_path.rename(aside)
        log(f"report: {json_path} was unreadable ({exc}); moved it to {aside} and started a new report")
        return None


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Records of ``old`` not in ``new`` (by cell key), then all of ``new``, sorted by cell key."""
    fresh = {_key(r): r for r in new}
    kept = [r for r in old if _key(r) not in fresh]
    return sorted(kept + list(fresh.values()), key=lambda r: tuple(str(v) for v in _key(r)))


def write(md_path: Path, records: list[dict], session: "AdvPruneSession") -> tuple[Path, Path]:
    """Merge ``records`` into the JSON beside ``md_path`` (same stem) and re-render the markdown."""
    from . import registry

    md_path = Path(md_path)
    json_path = md_path.with_suffix(".json")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(json_path) + ".lock"):
        doc = load(json_path, session.log) or {"schema": SCHEMA, "records": [], "taxonomy": {}}
        if doc.get("preset") not in (None, session.preset.name):
            raise ValueError(f"{json_path} holds preset {doc['preset']!r}, not {session.preset.name!r}; "
                             f"pass --advprune-report=reports/{session.preset.name}.md")
        doc["preset"] = session.preset.name
        doc["header"] = {**session.preset.header(), "attack choice": session.preset.attack_choice,
                         "floors": session.preset.floors.derivation}
        doc["records"] = merge(doc["records"], records)
        for name in {r["method"] for r in records}:
            cls = registry.get(name)
            doc["taxonomy"][name] = cls.taxonomy.row(cls.structures)
        doc["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_bytes(json_path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        atomic_write_bytes(md_path, render_markdown(doc).encode())
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


def leaderboard_tables(doc: dict, markdown: bool = True) -> list[tuple[str, str]]:
    """``(title, table)`` per (dataset, structure): one row per method, columns arch x sparsity,
    cells ``clean / robust`` with the best robust accuracy per column in bold. The dense
    reference appears in every table in its own ``dense`` column (no sparsity to claim)."""
    recs = doc["records"]
    fmt = "github" if markdown else "simple"
    dense = [r for r in recs if r["structure"] == "dense"]
    out = []
    for dataset in sorted({r["dataset"] for r in recs}):
        for structure in ("weights", "filters", "channels"):
            rows = [r for r in recs if r["dataset"] == dataset and r["structure"] == structure]
            if not rows:
                continue
            archs = sorted({r["arch"] for r in rows} | {r["arch"] for r in dense if r["dataset"] == dataset})
            sps = sorted({round(100 * r["target_sparsity"]) for r in rows})
            cols = [(a, 0) for a in archs] + [(a, s) for a in archs for s in sps]
            table_recs = rows + [r for r in dense if r["dataset"] == dataset]
            by = {(r["method"], r["arch"], round(100 * r["target_sparsity"])): r for r in table_recs}
            best = {}
            for col in cols:
                vals = [by[(m, *col)]["robust_acc"]["worst_case"] for m in {r["method"] for r in table_recs}
                        if (m, *col) in by and "robust_acc" in by[(m, *col)]]
                best[col] = max(vals) if vals else None
            methods = sorted({r["method"] for r in table_recs}, key=lambda m: (m != "dense", m))
            body = []
            for m in methods:
                row = [m]
                for col in cols:
                    rec = by.get((m, *col))
                    is_best = rec is not None and "robust_acc" in rec and rec["robust_acc"]["worst_case"] == best[col]
                    row.append(_cell_text(rec, is_best and col[1] != 0, markdown))
                body.append(row)
            headers = ["method"] + [f"{a} dense" if s == 0 else f"{a} {s}%" for a, s in cols]
            kind = "unstructured" if structure == "weights" else "structured"
            out.append((f"{dataset}, {kind} ({structure}): clean / robust accuracy (%)", tabulate(body, headers, tablefmt=fmt)))
    return out


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
                    tablefmt="github")


def _detail_table(doc: dict) -> str:
    rows = []
    for r in doc["records"]:
        if "clean_acc" not in r:
            reason = r.get("skip_reason") or r.get("error") or ""
            rows.append([f"{r['method']}-{r['arch']}-{r['structure']}-{round(100 * r['target_sparsity'])}", r["status"],
                         "–", "–", "–", "–", reason])
            continue
        attacks = ", ".join(f"{k} {_pct(v)}" for k, v in r["robust_acc"].items() if k != "worst_case")
        lo, hi = r["ci95"]["robust"]
        rows.append([
            f"{r['method']}-{r['arch']}-{r['structure']}-{round(100 * r['target_sparsity'])}", r["status"],
            _pct(r.get("achieved_sparsity")), f"{_pct(r['clean_acc'])}", f"{_pct(r['robust_acc']['worst_case'])} "
            f"[{_pct(lo)}, {_pct(hi)}]", f"{r['duration_s']:.0f}", attacks + ("; warnings: " + " | ".join(r["attack_warnings"])
                                                                            if r["attack_warnings"] else ""),
        ])
    return tabulate(rows, ["cell", "verdict", "sparsity %", "clean %", "robust % [95% CI]", "time s", "per attack (%)"],
                    tablefmt="github")


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
             tabulate([[k, v] for k, v in header.items()], ["", ""], tablefmt="github"), ""]
    for title, table in leaderboard_tables(doc):
        lines += [f"## {title}", "", table, ""]
    lines += ["Cells read `clean / robust` accuracy in percent on the evaluation points; robust is the point-wise "
              "worst case over the preset's attacks; the best robust accuracy per column is bold; PASS/FAIL is the "
              "cell's conformance verdict (sparsity, clean and robust floors).", ""]
    survey = _survey_table(doc)
    if survey:
        lines += ["## Beside the survey's published numbers", "", survey, ""]
    lines += ["## Cells in detail", "", _detail_table(doc), ""]
    tax = doc.get("taxonomy", {})
    if tax:
        cols = list(next(iter(tax.values())).keys())
        rows = [[m] + [tax[m][c] for c in cols] for m in sorted(tax)]
        lines += ["## Taxonomy (Piras et al. 2024)", "", tabulate(rows, ["method"] + cols, tablefmt="github"), ""]
    return "\n".join(lines)


def terminal_summary(doc: dict) -> str:
    """The leaderboard tables as plain text for pytest's terminal summary."""
    parts = []
    for title, table in leaderboard_tables(doc, markdown=False):
        parts += [title, table, ""]
    return "\n".join(parts)
