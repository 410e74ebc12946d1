"""Security curves drawn from the report JSON (pytest_advprune.curves) and linked from the markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_advprune import curves, presets, report
from tests.test_report import document, fmn_block, record, tables

PNG = b"\x89PNG\r\n\x1a\n"


def _doc():
    d = lambda *v: list(v)
    return document([
        record("dense", dataset="fashion_mnist", arch="cnn", structure="dense", sparsity=0, preset="quick",
               fmn=fmn_block(d(0.0, 0.3, None, 0.12), d(0.0, 2.0, None, 1.1), 0.7, 0.72, 0.7, eps=0.1)),
        record("hydra", dataset="fashion_mnist", arch="cnn", preset="quick",
               fmn=fmn_block(d(0.0, 0.05, 0.2, 0.12), d(0.0, 0.5, 1.5, 1.1), 0.6, 0.62, 0.6, eps=0.1)),
        record("lwm", dataset="fashion_mnist", arch="cnn", preset="quick",
               fmn=fmn_block(d(0.0, 0.08, 0.15, None), d(0.0, 0.7, 1.2, None), 0.6, 0.61, 0.6, eps=0.1)),
        record("random", dataset="fashion_mnist", arch="cnn", sparsity=95, preset="quick"),  # no FMN: no figure
    ], preset="quick")


def test_survival_is_the_fraction_strictly_above():
    assert curves.survival([0.0, 0.1, 0.2, math.inf], [0.0, 0.1, 0.15, 0.2, 5.0]) == [0.75, 0.5, 0.5, 0.25, 0.25]
    assert curves.distances(record(), "linf") is None
    assert curves.distances(_doc()["records"][0], "linf") == [0.0, 0.3, math.inf, 0.12]


def test_one_png_per_cell_and_norm_with_every_method(tmp_path, monkeypatch):
    drawn = {}
    real = curves._draw
    monkeypatch.setattr(curves, "_draw", lambda recs, norm, title: drawn.setdefault(
        (title, norm), [r["method"] for r in recs]) and real(recs, norm, title))
    paths = curves.write_curves(_doc(), tmp_path / "quick.md")
    names = sorted(p.name for p in paths)
    assert names == ["fashion_mnist-cnn-dense-0-l2.png", "fashion_mnist-cnn-dense-0-linf.png",
                     "fashion_mnist-cnn-weights-90-l2.png", "fashion_mnist-cnn-weights-90-linf.png"]
    assert all(p.parent == tmp_path / "quick_curves" and p.read_bytes().startswith(PNG) for p in paths)
    assert drawn[("quick: fashion_mnist cnn weights 90 linf", "linf")] == ["dense", "hydra", "lwm"]
    assert not [p for p in (tmp_path / "quick_curves").iterdir() if p.name.startswith(".")]  # no temp files left
    assert json.loads((tmp_path / "quick_curves" / curves.INDEX).read_text()).keys() == set(names)


def test_drawing_is_deterministic():
    recs = _doc()["records"][:2]
    assert curves._draw(recs, "linf", "t") == curves._draw(recs, "linf", "t")


def test_only_figures_whose_inputs_changed_are_redrawn(tmp_path, monkeypatch):
    curves.write_curves(_doc(), tmp_path / "a.md")
    drawn = []
    real = curves._draw
    monkeypatch.setattr(curves, "_draw", lambda recs, norm, title: drawn.append(title) or real(recs, norm, title))
    curves.write_curves(_doc(), tmp_path / "a.md")
    assert drawn == []
    doc = _doc()
    doc["records"][1]["fmn"]["norms"]["l2"]["distances"][1] = 0.6
    (tmp_path / "a_curves" / "fashion_mnist-cnn-dense-0-linf.png").unlink()
    curves.write_curves(doc, tmp_path / "a.md")
    assert sorted(drawn) == ["quick: fashion_mnist cnn dense 0 linf", "quick: fashion_mnist cnn weights 90 l2"]


def test_report_write_draws_the_curves_and_links_them(tmp_path):
    session = SimpleNamespace(preset=presets.QUICK, log=lambda s: None, notice=lambda s: None)
    recs = [dict(r, protocol=report.protocol_id(presets.QUICK)) for r in _doc()["records"]]
    md_path, json_path = report.write(tmp_path / "out" / "quick.md", recs, session)
    doc = json.loads(json_path.read_text())
    assert doc["curves_dir"] == "quick_curves"
    t = tables(md_path.read_text())["Minimum-norm attack (FMN) and security curves"]
    links = [cell for row in t[1:] for cell in row if "](" in cell]
    assert len(links) == 3
    for cell in links:
        for target in [part.split(")")[0] for part in cell.split("](")[1:]]:
            assert (md_path.parent / target).read_bytes().startswith(PNG), target


def test_merge_cli_draws_the_curves(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_doc()))
    assert report.main(["merge", str(src), "-o", str(tmp_path / "merged" / "quick.md")]) == 0
    assert (tmp_path / "merged" / "quick_curves" / "fashion_mnist-cnn-weights-90-linf.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_cell_where_fmn_failed_everywhere_still_draws(tmp_path, norm):
    doc = document([record("hydra", preset="quick", fmn=fmn_block([None] * 3, [None] * 3, 0.6, 1.0, 0.6, eps=0.1))],
                   preset="quick")
    paths = curves.write_curves(doc, Path(tmp_path) / "q.md")
    assert any(p.name.endswith(f"-{norm}.png") for p in paths)
