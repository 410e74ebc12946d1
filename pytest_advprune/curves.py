"""Security curves: robust accuracy against the perturbation budget, from FMN's per-point distances.

One figure per (dataset, arch, structure, sparsity) and norm, with every method of the report that
has FMN distances for that cell; the ``dense`` reference is drawn (dashed) on every figure of its
dataset and architecture. The curve of a method is the empirical survival function of its
distances (fraction of evaluated points with distance > eps, ties broken as in
:mod:`pytest_advprune.fmn`), the same plot as the survey's ``plot_sec_curve``. The Linf figure marks
the preset's eps. Figures are drawn from the report JSON alone (so runs of different methods
combine on one figure) and written atomically as PNG beside the markdown report, in
``<report stem>_curves/``, named by :func:`figure_name`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

from .files import atomic_write_bytes

GRID_POINTS = 400
LINF_RANGE = 4.0  # Linf x axis: [0, LINF_RANGE * eps]
INDEX = "_index.json"


def curves_dir(md_path: Path) -> Path:
    """The folder of the figures of the report at ``md_path``."""
    return md_path.with_name(f"{md_path.stem}_curves")


def figure_name(rec: dict, norm: str) -> str:
    """File name of the ``norm`` figure of the cell of ``rec`` (a report record)."""
    return f"{rec['dataset']}-{rec['arch']}-{rec['structure']}-{round(100 * rec['target_sparsity'])}-{norm}.png"


def distances(rec: dict, norm: str) -> list[float] | None:
    """Per-point distances of ``rec`` in ``norm`` (``None`` in the JSON = +inf), or None if absent."""
    found = ((rec.get("fmn") or {}).get("norms") or {}).get(norm)
    if not found:
        return None
    return [math.inf if d is None else float(d) for d in found["distances"]]


def survival(dist: list[float], grid: list[float]) -> list[float]:
    """Fraction of ``dist`` strictly above each value of ``grid``."""
    import numpy as np

    d = np.sort(np.asarray(dist, dtype=float))
    above = len(d) - np.searchsorted(d, np.asarray(grid, dtype=float), side="right")
    return (above / max(len(d), 1)).tolist()


def _figures(doc: dict) -> dict[tuple[str, str], list[dict]]:
    """``{(figure name, norm): [records to draw]}`` for every cell with FMN distances."""
    recs = [r for r in doc["records"] if r.get("fmn")]
    out: dict[tuple[str, str], list[dict]] = {}
    for rec in recs:
        for norm in rec["fmn"]["norms"]:
            dense = [r for r in recs if r["structure"] == "dense" and r["dataset"] == rec["dataset"]
                     and r["arch"] == rec["arch"] and norm in r["fmn"]["norms"]]
            same = [r for r in recs if r["structure"] != "dense" and figure_name(r, norm) == figure_name(rec, norm)]
            out[(figure_name(rec, norm), norm)] = dense + sorted(same, key=lambda r: r["method"])
    return out


def _draw(records: list[dict], norm: str, title: str) -> bytes:
    from matplotlib.figure import Figure

    eps = records[0]["fmn"]["eps"]
    finite = [d for r in records for d in distances(r, norm) if math.isfinite(d)]
    if norm == "linf":
        top = LINF_RANGE * eps
    else:
        finite.sort()
        top = 1.1 * finite[int(0.98 * (len(finite) - 1))] if finite and finite[-1] > 0 else 1.0
    grid = [top * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for rec in records:
        dist = distances(rec, norm)
        if norm == "linf":
            label = f"{rec['method']} ({100 * sum(d > eps for d in dist) / len(dist):.1f}% at eps {eps:.4g})"
        else:
            median = sorted(dist)[len(dist) // 2]
            label = f"{rec['method']} (median {median:.3g})"
        style = "--" if rec["structure"] == "dense" else "-"
        ax.step(grid, survival(dist, grid), where="post", linestyle=style, label=label)
    if norm == "linf":
        ax.axvline(eps, color="red", linestyle=":", linewidth=1)
    ax.set_xlim(0, top)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"{'Linf' if norm == 'linf' else 'L2'} perturbation budget eps (pixel scale)")
    ax.set_ylabel("robust accuracy (FMN)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write_curves(doc: dict, md_path: Path) -> list[Path]:
    """Draw every figure of ``doc`` into :func:`curves_dir` of ``md_path``; returns the figures' paths.

    A figure whose inputs (methods, distances, eps, title) did not change since it was drawn is kept:
    ``_index.json`` in the folder holds a digest of each figure's inputs."""
    out = []
    folder = curves_dir(Path(md_path))
    index_path = folder / INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    fresh = {}
    for (name, norm), records in sorted(_figures(doc).items()):
        title = f"{doc.get('preset', '')}: {name.removesuffix('.png').replace('-', ' ')}"
        inputs = [title, norm] + [[r["method"], r["fmn"]["eps"], r["fmn"]["norms"][norm]["distances"]] for r in records]
        fresh[name] = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
        path = folder / name
        if index.get(name) != fresh[name] or not path.exists():
            atomic_write_bytes(path, _draw(records, norm, title))
        out.append(path)
    if fresh and fresh != index:
        atomic_write_bytes(index_path, json.dumps({**index, **fresh}, indent=0, sort_keys=True).encode())
    return out
