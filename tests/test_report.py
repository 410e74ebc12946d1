"""Report engine: records -> JSON merged by cell -> markdown. No model is run: records and report
documents are built by hand with the keys :func:`pytest_advprune.report.make_record` produces."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_advprune import presets, registry, report
from pytest_advprune.published import SURVEY

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "report_golden.md"
STAMP = "2025-01-02T03:04:05+00:00"


def record(method="hydra", *, dataset="cifar10", arch="resnet18", structure="weights", sparsity=90, clean=0.80,
           robust=0.40, status="PASS", preset="cifar10", evaluated=True, **changes) -> dict:
    """A record as ``report.make_record`` writes it; accuracies are fractions, ``sparsity`` in percent.
    ``evaluated=False`` leaves out the evaluation keys, as for a skipped or crashed cell."""
    rec = {
        "method": method, "preset": preset, "dataset": dataset, "arch": arch, "structure": structure,
        "target_sparsity": sparsity / 100, "status": status,
        "passed": {"PASS": True, "FAIL": False, "XFAIL": False, "ERROR": False}.get(status), "known_failure": None,
        "checks": {"sparsity": "passed", "clean": "passed", "robust": "passed"} if evaluated else {},
        "skip_reason": "not supported" if status == "SKIP" else None,
        "error": "RuntimeError: boom" if status == "ERROR" else None,
        "protocol": report.protocol_id(presets.PRESETS[preset]) if preset in presets.PRESETS else f"{preset}-e0-x",
        "seed": 0, "device": "cuda:0", "duration_s": 61.25,
        "versions": {"python": "3.11.7", "torch": "2.14.1", "pytest-advprune": "0.1.0"}, "date": STAMP,
    }
    if evaluated:
        rec.update({
            "achieved_sparsity": sparsity / 100,
            "clean_acc": clean,
            "robust_acc": {"worst_case": robust, "PGD-20": robust + 0.05, "AA:apgd-ce": robust + 0.01},
            "n_eval": 10000,
            "ci95": {"clean": [clean - 0.01, clean + 0.01], "robust": [robust - 0.01, robust + 0.01]},
            "attack_warnings": [],
            "floors": {"sparsity_tol": 0.01, "clean": 0.70, "robust": 0.35},
            "train_epochs": {"pretrain": 100.0, "method": 120.0, "total": 220.0, "preset_budget": 220.0},
        })
    rec.update(changes)
    return rec


def document(records, preset="cifar10", taxonomy=None) -> dict:
    header = {"preset": preset, "attacks": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)",
              "threat model": "Linf, eps = 0.03137", "eval points": "first 10000 of the test split", "seed": "0"}
    return {"schema": report.SCHEMA, "preset": preset, "header": header, "records": list(records),
            "taxonomy": taxonomy or {}}


def tables(md: str) -> dict[str, list[list[str]]]:
    """The markdown's tables by section title, each a list of rows (header row first) of stripped cells."""
    out, title = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and not set(line) <= set("|-: "):
            out.setdefault(title, []).append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def column(table: list[list[str]], header: str) -> dict[str, str]:
    """``{method: cell text}`` of one column of a leaderboard table."""
    i = table[0].index(header)
    return {row[0]: row[i] for row in table[1:]}


def lb_title(dataset: str, structure: str) -> str:
    kind = "unstructured" if structure == "weights" else "structured"
    return f"{dataset}, {kind} ({structure}): clean / robust accuracy (%)"


# ------------------------------------------------------------------------------ make_record


def _fake_cell_result(outcomes, skip_reason=None, error=None, evaluated=True):
    acc = lambda a: SimpleNamespace(acc=a, n=200, ci95=(a - 0.05, a + 0.05), flags="10")
    ev = SimpleNamespace(clean=acc(0.7), robust=acc(0.4), attacks={"PGD-5": acc(0.45), "AA:apgd-ce": acc(0.41)},
                         warnings=["w"], duration_s=1.234)
    sp = SimpleNamespace(sparsity=0.9, weight_sparsity=0.89, per_layer={"fc": (9, 10)})
    cell = SimpleNamespace(method="hydra", dataset="fashion_mnist", arch="cnn", structure="weights", sparsity=90)
    built = {"device": "cpu", "date": STAMP, "versions": {"python": "3.11"}}
    res = SimpleNamespace(outcomes=dict(outcomes), skip_reason=skip_reason, error=error, duration_s=3.14159,
                          sparsity=sp if evaluated else None, evaluation=ev if evaluated else None,
                          budget={"pretrain": 3.0, "method": 2.0, "total": 5.0} if evaluated else None,
                          known_failure=None, inference=None, indicators=None,
                          provenance={"model": built, "evaluation": built} if evaluated else {})
    session = SimpleNamespace(preset=presets.SMOKE, device="cpu", started=_dt.datetime(2025, 1, 2, 3, 4, 5),
                              floors=lambda cell: (0.01, 0.5, 0.25))
    return cell, res, session


# outcomes of every attack-failure indicator test of a cell, all passed
INDICATORS = {k: "passed" for k in report.cell_checks() if k.startswith("indicator:")}


def test_hand_built_records_have_the_keys_make_record_produces():
    cell, res, session = _fake_cell_result({"sparsity": "passed", "clean": "passed", "robust": "passed", **INDICATORS})
    real = report.make_record(cell, res, session, {"python": "3.11"})
    ours = record(preset="smoke")
    assert set(ours) <= set(real), set(ours) - set(real)
    assert {k for k in real["robust_acc"] if k != "PGD-5"} == {k for k in ours["robust_acc"] if k != "PGD-20"}
    assert real["target_sparsity"] == 0.9 and real["robust_acc"]["worst_case"] == 0.4
    assert real["status"] == "PASS" and real["passed"] is True
    assert real["train_epochs"] == {"pretrain": 3.0, "method": 2.0, "total": 5.0, "preset_budget": 5.0}


def test_make_record_keeps_every_indicator_and_a_failed_one_fails_the_cell():
    from pytest_advprune.indicators import Indicator

    outcomes = {"sparsity": "passed", "clean": "xfailed", "robust": "xfailed", "indicator:gradients": "failed",
                "indicator:black_box": "skipped"}
    cell, res, session = _fake_cell_result(outcomes)
    res.indicators = {"gradients": Indicator("gradients", False, 0.9, 0.01, "90.0% zero"),
                      "black_box": Indicator("black_box", None, None, 0.01, "not run")}
    rec = report.make_record(cell, res, session, {})
    assert rec["indicators"] == {"gradients": {"passed": False, "value": 0.9, "threshold": 0.01, "message": "90.0% zero"},
                                 "black_box": {"passed": None, "value": None, "threshold": 0.01, "message": "not run"}}
    assert rec["status"] == "FAIL"  # a known failure excuses accuracy checks, never an indicator
    assert "indicators" not in report.make_record(*_fake_cell_result({"sparsity": "passed"}), {})


@pytest.mark.parametrize("outcomes, skip, error, status, passed", [
    ({"sparsity": "passed", "clean": "passed", "robust": "passed", **INDICATORS}, None, None, "PASS", True),
    ({"sparsity": "skipped", "clean": "passed", "robust": "passed", **INDICATORS}, None, None, "PASS", True),
    ({"sparsity": "passed", "clean": "failed", "robust": "passed", **INDICATORS}, None, None, "FAIL", False),
    ({"sparsity": "passed", "clean": "failed"}, None, None, "FAIL", False),
    ({"sparsity": "passed", "clean": "xfailed", "robust": "xfailed", **INDICATORS}, None, None, "XFAIL", False),
    ({"sparsity": "passed", "clean": "passed", "robust": "passed"}, None, None, "partial", None),
    ({"sparsity": "passed", "clean": "xfailed", "robust": "xfailed"}, None, None, "partial", None),
    ({"sparsity": "passed", "clean": "passed", "robust": "passed",
      **dict(list(INDICATORS.items())[:-1])}, None, None, "partial", None),
    ({"sparsity": "skipped"}, None, None, "partial", None),
    ({}, None, None, "not run", None),
    ({"sparsity": "skipped"}, "no filters", None, "SKIP", None),
    ({"sparsity": "failed"}, None, "RuntimeError: x", "ERROR", False),
], ids=["pass", "pass-dense", "fail", "fail-before-indicators", "known-failure", "indicators-not-run",
        "known-failure-indicators-not-run", "one-indicator-not-run", "partial", "not-run", "skip", "error"])
def test_make_record_status(outcomes, skip, error, status, passed):
    rec = report.make_record(*_fake_cell_result(outcomes, skip, error, evaluated=False), {})
    assert (rec["status"], rec["passed"]) == (status, passed)
    assert "clean_acc" not in rec and "robust_acc" not in rec


# ------------------------------------------------------------------------------ merge


def test_merge_replaces_a_rerun_cell_and_keeps_the_others_sorted():
    old = [record("lwm", sparsity=95, robust=0.30), record("hydra", sparsity=90, robust=0.41),
           record("lwm", sparsity=90, robust=0.31)]
    rerun = record("hydra", sparsity=90, robust=0.45, status="FAIL")
    new_cell = record("random", sparsity=90, robust=0.20)
    merged = report.merge(old, [rerun, new_cell])
    keys = [report._key(r) for r in merged]
    assert len(merged) == 4 and len(set(keys)) == 4
    assert keys == sorted(keys, key=lambda k: tuple(str(v) for v in k))
    by = {(r["method"], round(100 * r["target_sparsity"])): r for r in merged}
    assert by[("hydra", 90)] is rerun  # replaced, not duplicated
    assert by[("lwm", 95)]["robust_acc"]["worst_case"] == 0.30 and by[("lwm", 90)]["robust_acc"]["worst_case"] == 0.31
    assert by[("random", 90)] is new_cell
    assert [r["method"] for r in merged] == ["hydra", "lwm", "lwm", "random"]


def test_merge_distinguishes_every_key_field_and_dedups_within_new():
    base = record()
    variants = [record(dataset="svhn"), record(arch="vgg16"), record(structure="filters"), record(sparsity=95),
                record(preset="quick"), record(method="lwm")]
    merged = report.merge([base], variants)
    assert len(merged) == 7  # every field of the key tells cells apart
    twice = report.merge([], [record(robust=0.1), record(robust=0.2)])
    assert len(twice) == 1 and twice[0]["robust_acc"]["worst_case"] == 0.2  # last one wins
    assert report.merge([base], []) == [base]
    assert report.merge([], []) == []


@pytest.mark.parametrize("partial", ["partial", "not run"])
def test_a_record_of_a_cell_checked_only_in_part_never_replaces_its_whole_verdict(partial):
    whole, part = record(status="PASS"), record(status=partial, evaluated=False)
    kept = []
    assert report.merge([whole], [part], kept.append) == [whole] and kept == [whole]
    assert report.merge([], [part]) == [part]  # an empty place takes it
    assert report.merge([record(status="partial")], [part]) == [part]  # a later partial beats an earlier one
    failed = record(status="FAIL", checks={"robust": "failed"})  # e.g. --lf re-ran one failing check
    assert report.merge([whole], [failed]) == [failed]
    docs = [document([whole]), document([part])]
    assert report.merge_documents(docs)["records"] == [whole]  # `report merge old.json partial.json`


# ------------------------------------------------------------------------------ render_markdown


def _mixed_doc():
    return document([
        record("dense", structure="dense", sparsity=0, clean=0.82, robust=0.48),
        record("dense", arch="vgg16", structure="dense", sparsity=0, clean=0.81, robust=0.47),
        record("hydra", clean=0.7674, robust=0.4334),
        record("hydra", sparsity=95, clean=0.761, robust=0.4249),
        record("lwm", clean=0.75, robust=0.41, status="FAIL"),
        record("lwm", sparsity=95, clean=0.79, robust=0.4451),
        record("lwm", arch="vgg16", clean=0.7, robust=0.3, status="FAIL"),
        record("random", evaluated=False, status="SKIP"),
        record("random", sparsity=95, evaluated=False, status="ERROR"),
        record("lwm", structure="filters", sparsity=50, clean=0.7, robust=0.35),
        record("random", structure="filters", sparsity=50, clean=0.6, robust=0.25, status="FAIL"),
        record("dense", dataset="svhn", structure="dense", sparsity=0, clean=0.93, robust=0.55),
    ], taxonomy={m: registry.Taxonomy("P", registry.Pipeline.AFTER, "AT (PGD)", "AT (PGD)", registry.Schedule.ONE_SHOT,
                                      registry.Locality.LOCAL, registry.Criterion.LWM).row(("weights",))
                 for m in ("hydra", "lwm")})


def test_render_is_a_pure_function_of_the_document():
    doc = _mixed_doc()
    before = copy.deepcopy(doc)
    first = report.render_markdown(doc)
    assert doc == before  # the document is not modified
    assert report.render_markdown(copy.deepcopy(doc)) == first
    assert report.render_markdown(json.loads(json.dumps(doc))) == first  # same text after a JSON round trip


def test_header_table_holds_the_header_keys_and_run_facts():
    doc = _mixed_doc()
    doc["records"][0] = {**doc["records"][0], "date": "2024-12-31T00:00:00+00:00", "device": "cpu"}
    md = report.render_markdown(doc)
    assert md.startswith("# pytest-advprune report: preset `cifar10`\n")
    head = {row[0]: row[1] for row in tables(md)[None]}
    for key in ("preset", "attacks", "threat model", "eval points", "seed"):
        assert head[key] == doc["header"][key]
    assert head["devices"] == "cpu, cuda:0"
    assert head["runs"] == f"2024-12-31T00:00:00+00:00 to {STAMP}"
    assert head["versions"] == "pytest-advprune 0.1.0, python 3.11.7, torch 2.14.1"


def test_one_leaderboard_per_dataset_and_structure_present():
    md = report.render_markdown(_mixed_doc())
    titles = [line[3:] for line in md.splitlines() if line.startswith("## ") and "clean / robust accuracy" in line]
    # svhn has only its dense reference: no pruned cell, no leaderboard of its own
    assert titles == [lb_title("cifar10", "weights"), lb_title("cifar10", "filters")]
    channels = _mixed_doc()
    channels["records"].append(record("lwm", dataset="svhn", structure="channels", sparsity=75, clean=0.9, robust=0.5))
    titles = [line[3:] for line in report.render_markdown(channels).splitlines() if "clean / robust accuracy" in line]
    assert titles[-1] == lb_title("svhn", "channels") and len(titles) == 3


def test_cells_read_clean_slash_robust_in_percent_with_one_decimal_and_verdict():
    t = tables(report.render_markdown(_mixed_doc()))[lb_title("cifar10", "weights")]
    assert t[0] == ["method", "resnet18 dense", "vgg16 dense", "resnet18 90%", "resnet18 95%", "vgg16 90%", "vgg16 95%"]
    c90 = column(t, "resnet18 90%")
    assert c90["hydra"] == "**76.7 / 43.3** PASS"
    assert c90["lwm"] == "75.0 / 41.0 FAIL"
    assert c90["random"] == "skip"
    c95 = column(t, "resnet18 95%")
    assert c95["hydra"] == "76.1 / 42.5 PASS"  # 0.761 / 0.4249 rounded to one decimal
    assert c95["random"] == "ERROR"
    assert column(t, "vgg16 95%") == {"dense": "–", "hydra": "–", "lwm": "–", "random": "–"}
    assert [row[0] for row in t[1:]] == ["dense", "hydra", "lwm", "random"]  # dense first, then by name


def test_best_robust_accuracy_per_column_is_bold_and_only_it():
    doc = _mixed_doc()
    md = report.render_markdown(doc)
    t = tables(md)[lb_title("cifar10", "weights")]
    for header in t[0][1:]:
        col = column(t, header)
        bold = {m for m, text in col.items() if "**" in text}
        if header.endswith("dense"):
            assert not bold  # the dense reference is not a competitor
            continue
        arch, sp = header.split()
        scored = {r["method"]: r["robust_acc"]["worst_case"] for r in doc["records"]
                  if r["dataset"] == "cifar10" and r["structure"] == "weights" and r["arch"] == arch
                  and f"{round(100 * r['target_sparsity'])}%" == sp and "robust_acc" in r}
        expected = {m for m, v in scored.items() if v == max(scored.values())} if scored else set()
        assert bold == expected, header
    # a FAIL cell with the best robust accuracy is still the column's best (bold is about the number)
    assert column(t, "vgg16 90%")["lwm"] == "**70.0 / 30.0** FAIL"
    assert column(t, "resnet18 95%")["lwm"] == "**79.0 / 44.5** PASS"
    assert "**" not in column(t, "resnet18 95%")["hydra"]
    assert md.count("**") == 2 * 4  # 3 weights columns + 1 filters column, one bold each


def test_ties_for_best_are_all_bold():
    doc = document([record("hydra", clean=0.70, robust=0.40), record("lwm", clean=0.75, robust=0.40),
                    record("random", clean=0.80, robust=0.39)])
    col = column(tables(report.render_markdown(doc))[lb_title("cifar10", "weights")], "resnet18 90%")
    assert col == {"hydra": "**70.0 / 40.0** PASS", "lwm": "**75.0 / 40.0** PASS", "random": "80.0 / 39.0 PASS"}


def test_a_cell_that_missed_its_sparsity_target_is_never_the_columns_best():
    """A less sparse model than claimed wins robustness for free: it is shown, not ranked (bold or paired test)."""
    missed = {"sparsity": "failed", "clean": "passed", "robust": "passed"}
    cheat, honest = "1" * 70 + "0" * 30, "1" * 40 + "0" * 60
    doc = document([_paired("dense_ish", cheat, 90) | {"status": "FAIL", "checks": missed, "achieved_sparsity": 0.5},
                    _paired("hydra", honest, 90), _paired("lwm", honest[:-1] + "0", 90)])
    col = column(tables(report.render_markdown(doc))[lb_title("cifar10", "weights")], "resnet18 90%")
    assert col["dense_ish"] == "80.0 / 70.0 FAIL" and col["hydra"].startswith("**")
    assert "resnet18 90%: best hydra" in report.mcnemar_notes(doc)[lb_title("cifar10", "weights")]


def test_a_cell_whose_attack_failure_indicator_failed_is_never_the_columns_best():
    """An untrustworthy robust accuracy (e.g. gradient masking caught by black_box) is shown, not ranked."""
    masked = {"black_box": {"passed": False, "value": 0.03, "threshold": 0.01, "message": "Square beats APGD-T"},
              "gradients": {"passed": True, "value": 0.0, "threshold": 0.01, "message": "ok"}}
    cheat, honest = "1" * 70 + "0" * 30, "1" * 40 + "0" * 60
    doc = document([_paired("masked", cheat, 90) | {"status": "FAIL", "indicators": masked},
                    _paired("hydra", honest, 90), _paired("lwm", honest[:-1] + "0", 90)])
    col = column(tables(report.render_markdown(doc))[lb_title("cifar10", "weights")], "resnet18 90%")
    assert col["masked"] == "80.0 / 70.0 FAIL" and col["hydra"].startswith("**")
    assert "resnet18 90%: best hydra" in report.mcnemar_notes(doc)[lb_title("cifar10", "weights")]


def test_dense_reference_is_in_its_own_column_of_every_table_and_never_under_a_sparsity():
    doc = _mixed_doc()
    tabs = tables(report.render_markdown(doc))
    for structure in ("weights", "filters"):
        t = tabs[lb_title("cifar10", structure)]
        dense_row = next(row for row in t[1:] if row[0] == "dense")
        for header, text in zip(t[0][1:], dense_row[1:]):
            if header.endswith(" dense"):
                assert text == {"resnet18 dense": "82.0 / 48.0 PASS", "vgg16 dense": "81.0 / 47.0 PASS"}[header]
            else:
                assert text == "–", (structure, header)
        for row in t[1:]:
            if row[0] != "dense":
                assert all(text == "–" for h, text in zip(t[0][1:], row[1:]) if h.endswith(" dense")), row
        assert not any(h.endswith(" 0%") for h in t[0])
    assert "93.0 / 55.0" not in "".join(map(str, tabs[lb_title("cifar10", "weights")]))  # svhn's dense stays out


def test_dense_column_for_an_arch_with_only_a_dense_record():
    doc = document([record("hydra"), record("dense", arch="vgg16", structure="dense", sparsity=0, clean=0.8, robust=0.5)])
    t = tables(report.render_markdown(doc))[lb_title("cifar10", "weights")]
    # every arch of the dataset gets its dense column and its sparsity columns (empty here)
    assert t[0] == ["method", "resnet18 dense", "vgg16 dense", "resnet18 90%", "vgg16 90%"]
    assert column(t, "vgg16 dense") == {"dense": "80.0 / 50.0 PASS", "hydra": "–"}
    assert column(t, "vgg16 90%") == {"dense": "–", "hydra": "–"}


def test_taxonomy_table_lists_the_methods_in_the_document():
    md = report.render_markdown(_mixed_doc())
    t = tables(md)["Taxonomy (Piras et al. 2024)"]
    assert t[0] == ["method", "pipeline", "pretrain / prune step", "finetune / train step", "1S/IT", "S/US", "L/G",
                    "criterion", "paper"]
    assert t[1] == ["hydra", "A", "AT (PGD)", "AT (PGD)", "1S", "US", "L", "LWM", "P"]
    assert [row[0] for row in t[1:]] == ["hydra", "lwm"]
    no_tax = _mixed_doc()
    no_tax["taxonomy"] = {}
    assert "## Taxonomy" not in report.render_markdown(no_tax)


def test_details_table_has_one_row_per_record_with_reasons():
    doc = _mixed_doc()
    t = tables(report.render_markdown(doc))["Cells in detail"]
    assert len(t) == 1 + len(doc["records"])
    rows = {row[0]: row for row in t[1:]}
    assert rows["random-resnet18-weights-90"][1:3] == ["SKIP", "–"] and rows["random-resnet18-weights-90"][-1] == "not supported"
    assert rows["random-resnet18-weights-95"][-1] == "RuntimeError: boom"
    assert rows["hydra-resnet18-weights-90"][1:5] == ["PASS", "90.0", "76.7 [75.7, 77.7]", "43.3 [42.3, 44.3]"]
    assert rows["hydra-resnet18-weights-90"][-1] == "PGD-20 48.3, AA:apgd-ce 44.3"


def test_details_table_shows_the_sparsity_of_a_cell_checked_for_sparsity_only():
    partial = record("hydra", status="partial", evaluated=False, achieved_sparsity=0.9012, checks={"sparsity": "passed"})
    row = tables(report.render_markdown(document([partial])))["Cells in detail"][1]
    assert row[:4] == ["hydra-resnet18-weights-90", "partial", "90.1", "–"]


def test_details_table_shows_the_floors_each_verdict_used():
    doc = document([record("hydra", floors={"sparsity_tol": 0.02, "clean": 0.5, "robust": 0.255}),
                    record("dense", structure="dense", sparsity=0), record("random", status="SKIP", evaluated=False)])
    floors = column(tables(report.render_markdown(doc))["Cells in detail"], "floors: sparsity / clean / robust %")
    assert floors == {"hydra-resnet18-weights-90": "88 / 50 / 25.5", "dense-resnet18-dense-0": "0 / 70 / 35",
                      "random-resnet18-weights-90": "–"}


def test_details_table_keeps_one_decimal_when_every_cell_was_evaluated():
    """Percentages read with one decimal everywhere, also when no skipped cell puts a ``–`` in a
    column (tabulate must not re-parse ``"80.0"`` as the number 80 and print ``80``)."""
    doc = document([record("hydra", clean=0.80, robust=0.40), record("hydra", sparsity=95, clean=0.7512, robust=0.38)])
    t = tables(report.render_markdown(doc))["Cells in detail"]
    assert t[1][:5] == ["hydra-resnet18-weights-90", "PASS", "90.0", "80.0 [79.0, 81.0]", "40.0 [39.0, 41.0]"]
    assert t[2][:5] == ["hydra-resnet18-weights-95", "PASS", "95.0", "75.1 [74.1, 76.1]", "38.0 [37.0, 39.0]"]


def test_survey_table_shows_published_numbers_beside_ours():
    md = report.render_markdown(_mixed_doc())
    t = tables(md)["Beside the survey's published numbers"]
    assert t[0] == ["method", "arch", "structure", "sparsity", "ours clean / robust", "survey clean / robust"]
    assert t[1] == ["hydra", "resnet18", "weights", "90%", "76.7 / 43.3", "76.7 / 43.3"]
    assert t[2] == ["hydra", "resnet18", "weights", "95%", "76.1 / 42.5", "76.2 / 42.5"]
    assert len(t) == 3  # lwm, random, dense have no published numbers; the skipped cell has none of ours


def test_survey_table_maps_filters_and_channels_to_structured():
    doc = document([record("twinrep", structure="channels", sparsity=75, clean=0.8, robust=0.45)])
    t = tables(report.render_markdown(doc))["Beside the survey's published numbers"]
    assert t[1][-1] == "%.1f / %.1f" % SURVEY[("twinrep", "cifar10", "resnet18", "structured", 75)]


@pytest.mark.parametrize("recs", [
    [record("lwm"), record("random", sparsity=95)],  # methods the survey does not list
    [record("hydra", dataset="fashion_mnist", arch="cnn", preset="quick")],  # the embedded preset
    [record("hydra", sparsity=50)],  # a sparsity the survey does not report for weights
    [record("hydra", evaluated=False, status="SKIP")],  # nothing of ours to compare
], ids=["unlisted-methods", "quick-preset", "unlisted-sparsity", "skipped-cell"])
def test_no_survey_table_without_a_matching_record(recs):
    assert "Beside the survey" not in report.render_markdown(document(recs))


def test_render_of_an_empty_document():
    md = report.render_markdown(document([]))
    assert "clean / robust accuracy" not in md and "Beside the survey" not in md
    assert {row[0]: row[1] for row in tables(md)[None]}["runs"] == "-"


def test_terminal_summary_is_plain_text_without_bold():
    text = report.terminal_summary(_mixed_doc())
    assert lb_title("cifar10", "weights") in text and "76.7 / 43.3 PASS" in text
    assert "**" not in text and "|" not in text


def test_render_does_not_depend_on_the_order_of_indicators_and_fmn_norms_in_a_record():
    """A fresh record lists them in the engine's order, one loaded from the cache (JSON with sorted keys)
    alphabetically; the report reads the same either way."""
    doc = golden_doc()
    flipped = json.loads(json.dumps(doc))
    for r in flipped["records"]:
        if r.get("indicators"):
            r["indicators"] = dict(reversed(list(r["indicators"].items())))
        if r.get("fmn"):
            r["fmn"]["norms"] = dict(reversed(list(r["fmn"]["norms"].items())))
    assert report.render_markdown(flipped) == report.render_markdown(doc)


def test_render_matches_the_golden_file():
    """tests/data/report_golden.md was generated from this document once, checked by eye and frozen.
    After an intended change of the layout, regenerate it with
    ``python -c "from tests.test_report import *; GOLDEN.write_text(report.render_markdown(golden_doc()))"``
    and review the diff."""
    assert report.render_markdown(golden_doc()) == GOLDEN.read_text()


def fmn_block(linf: list, l2: list, aa: float, fmn: float, worst: float, eps: float = 8 / 255) -> dict:
    """The ``fmn`` key of a record as ``report.make_record`` writes it (``None`` = +inf distance)."""
    def norm(name, dist, config):
        return {"norm": name, "distances": dist, "config": config, "unverified": 0, "attack_s": 30.0, "tune_s": 9.5,
                "tuning": [["logit/sgd/cosine lr 1", 0.5]],
                "config_label": f"{config['loss']}/{config['optimizer']}/{config['scheduler']} lr {config['step_size']:g}"}
    sgd = {"loss": "logit", "optimizer": "sgd", "scheduler": "cosine", "step_size": 1.0, "gamma": 0.05}
    adam = {"loss": "ce", "optimizer": "adam", "scheduler": "none", "step_size": 0.01, "gamma": 0.05}
    median = lambda d: sorted(d, key=lambda v: math.inf if v is None else v)[len(d) // 2]
    return {"norms": {"linf": norm("linf", linf, adam), "l2": norm("l2", l2, sgd)}, "eps": eps,
            "median": {"linf": median(linf), "l2": median(l2)}, "seconds": {"fmn": 79.0, "autoattack_pgd": 412.3},
            "robust": {"autoattack": [aa, aa - 0.01, aa + 0.01], "fmn_linf": [fmn, fmn - 0.01, fmn + 0.01],
                       "worst_case": [worst, worst - 0.01, worst + 0.01]},
            "fmn_missed": 3, "fmn_only": 1}


def _indicator(passed, value, threshold, message):
    return {"passed": passed, "value": value, "threshold": threshold, "message": message}


INDICATORS_OK = {
    "gradients": _indicator(True, 0.0, 0.01, "0.0% of 90 correctly classified points have a zero input gradient"),
    "black_box": _indicator(None, None, 0.01, "not run: the preset's attacks include no gradient-free attack (Square)"),
}
INDICATORS_FAILED = {
    "gradients": _indicator(False, 0.5, 0.01, "50.0% of 80 correctly classified points have a zero input gradient"),
    "black_box": _indicator(True, 0.0, 0.01, "Square breaks 0.0% of the points beyond the white-box attacks"),
}


def golden_doc() -> dict:
    doc = document(
        report.merge([], [
            record("dense", structure="dense", sparsity=0, clean=0.8231, robust=0.4877,
                   fmn=fmn_block([0.0, 0.05, None, 0.02], [0.0, 1.2, None, 0.4], 0.49, 0.5, 0.4877)),
            record("hydra", clean=0.7674, robust=0.4334, per_point={"clean": "1" * 40, "robust": "1" * 20 + "0" * 20},
                   fmn=fmn_block([0.0, 0.01, 0.04, 0.2], [0.0, 0.3, 0.9, 2.5], 0.44, 0.45, 0.4334),
                   params=1126942, flops=1110845440, latency_speedup=None,
                   dense_params=11173962, dense_flops=1110845440, inference={"note": "unstructured"},
                   indicators=INDICATORS_OK),
            record("hydra", sparsity=99, clean=0.7012, robust=0.3755, status="FAIL", indicators=INDICATORS_FAILED),
            record("lwm", clean=0.7505, robust=0.4334, attack_warnings=["gradient masking suspected"],
                   per_point={"clean": "1" * 40, "robust": "1" * 18 + "0" * 22}),
            record("lwm", sparsity=99, evaluated=False, status="ERROR"),
            record("rst", sparsity=90, clean=0.6092, robust=0.1431, status="XFAIL", known_failure="no weight training"),
            record("lwm", structure="filters", sparsity=50, clean=0.7, robust=0.35, train_epochs=None, params=2934101,
                   flops=283201536, latency_speedup=3.4166, dense_params=11173962, dense_flops=1110845440,
                   inference={"device": "cuda:0", "removed_fraction": 0.4}),
            record("hydra", structure="filters", sparsity=50, evaluated=False, status="SKIP"),
        ]),
        taxonomy={
            "hydra": {"pipeline": "A", "pretrain / prune step": "AT (TRADES)", "finetune / train step": "AT (TRADES)",
                      "1S/IT": "1S", "S/US": "US", "L/G": "L", "criterion": "LIS", "paper": "Sehwag et al., NeurIPS 2020"},
            "lwm": {"pipeline": "A", "pretrain / prune step": "AT (PGD)", "finetune / train step": "AT (PGD)",
                    "1S/IT": "IT", "S/US": "US, S (filters)", "L/G": "L", "criterion": "LWM", "paper": "Sehwag et al., 2019"},
        },
    )
    doc["curves_dir"] = "cifar10_curves"
    return doc


# ------------------------------------------------------------------------------ load


def test_load_absent_file_is_none(tmp_path):
    assert report.load(tmp_path / "none.json") is None
    assert list(tmp_path.iterdir()) == []


def test_load_returns_a_valid_document_and_leaves_it(tmp_path):
    path = tmp_path / "r.json"
    doc = document([record()])
    path.write_text(json.dumps(doc))
    assert report.load(path) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("payload", [
    b'{"schema": 1, "records": [',  # truncated JSON
    b"\xff\xfe not utf-8 \x00",  # not text
    b'{"schema": 2, "records": []}',  # another schema
    b'{"records": []}',  # no schema
    b'{"schema": 1, "records": {}}',  # records not a list
    b'[1, 2, 3]',  # not an object
    b'"schema"',
    b"",
], ids=["truncated", "not-utf8", "schema-2", "no-schema", "records-not-a-list", "a-list", "a-string", "empty"])
def test_load_moves_an_unreadable_report_aside_with_its_bytes(tmp_path, payload):
    path = tmp_path / "smoke.json"
    path.write_bytes(payload)
    logged = []
    assert report.load(path, logged.append) is None
    assert not path.exists()
    (aside,) = tmp_path.iterdir()
    assert re.fullmatch(r"smoke\.json\.corrupt-\d{8}T\d{6}", aside.name), aside.name
    assert aside.read_bytes() == payload  # nothing lost
    assert len(logged) == 1 and str(aside) in logged[0] and "\n" not in logged[0]


class _FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 1, 2, 3, 4, 5, tzinfo=tz)


def test_two_corrupt_reports_in_one_second_are_both_kept(tmp_path, monkeypatch):
    """The aside name has a one-second stamp: a second corrupt file moved aside within the same
    second must not replace the first (``nothing is lost``)."""
    monkeypatch.setattr(report._dt, "datetime", _FrozenDatetime)
    path = tmp_path / "smoke.json"
    path.write_bytes(b"first {")
    assert report.load(path) is None
    path.write_bytes(b"second {")
    assert report.load(path) is None
    kept = sorted(p.read_bytes() for p in tmp_path.iterdir())
    assert kept == [b"first {", b"second {"]


# ------------------------------------------------------------------------------ write


@pytest.fixture
def fake_session():
    registry.load_builtin()
    logged: list[str] = []
    return SimpleNamespace(preset=presets.SMOKE, log=logged.append, notice=logged.append, logged=logged)


def smoke(method="hydra", structure="weights", sparsity=90, **kw):
    return record(method, dataset="fashion_mnist", arch="cnn", structure=structure, sparsity=sparsity, preset="smoke", **kw)


def test_write_creates_json_and_markdown_rendered_from_it(tmp_path, fake_session):
    md_path, json_path = report.write(tmp_path / "out" / "smoke.md", [smoke()], fake_session)
    assert (md_path, json_path) == (tmp_path / "out" / "smoke.md", tmp_path / "out" / "smoke.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == report.SCHEMA and doc["preset"] == "smoke"
    assert doc["records"] == [smoke()]
    assert doc["header"] == {**presets.SMOKE.header(), "attack choice": presets.SMOKE.attack_choice,
                             "floors": presets.SMOKE.floors.derivation}
    hydra = registry.get("hydra")
    assert doc["taxonomy"] == {"hydra": hydra.taxonomy.row(hydra.structures)}
    assert report.load(json_path) == doc
    assert md_path.read_text() == report.render_markdown(doc)  # rendered from the JSON as stored
    assert sorted(p.name for p in md_path.parent.iterdir() if not p.name.endswith(".lock")) == ["smoke.json", "smoke.md"]


def test_write_merges_with_the_existing_report(tmp_path, fake_session):
    md = tmp_path / "smoke.md"
    report.write(md, [smoke("hydra", robust=0.30), smoke("hydra", sparsity=95)], fake_session)
    report.write(md, [smoke("lwm", structure="filters", sparsity=50), smoke("hydra", robust=0.33, status="FAIL")], fake_session)
    doc = report.load(tmp_path / "smoke.json")
    cells = {(r["method"], r["structure"], round(100 * r["target_sparsity"])): r for r in doc["records"]}
    assert sorted(cells) == [("hydra", "weights", 90), ("hydra", "weights", 95), ("lwm", "filters", 50)]
    assert len(doc["records"]) == 3
    assert cells[("hydra", "weights", 90)]["robust_acc"]["worst_case"] == 0.33  # the re-run replaced the cell
    assert cells[("hydra", "weights", 90)]["status"] == "FAIL"
    assert set(doc["taxonomy"]) == {"hydra", "lwm"}
    t = tables(md.read_text())
    assert column(t[lb_title("fashion_mnist", "weights")], "cnn 90%")["hydra"] == "**80.0 / 33.0** FAIL"
    assert column(t[lb_title("fashion_mnist", "filters")], "cnn 50%")["lwm"] == "**80.0 / 40.0** PASS"
    assert [row[0] for row in t["Taxonomy (Piras et al. 2024)"][1:]] == ["hydra", "lwm"]


def test_write_keeps_the_markdown_layout_across_runs(tmp_path, fake_session):
    """The JSON is the source of truth: the markdown written is the one its JSON renders to, and a
    later run that merges into the report does not reorder the header rows or taxonomy columns."""
    md = tmp_path / "smoke.md"
    report.write(md, [smoke("hydra")], fake_session)
    first = tables(md.read_text())
    report.write(md, [smoke("lwm", structure="filters", sparsity=50)], fake_session)
    second = tables(md.read_text())
    assert md.read_text() == report.render_markdown(report.load(tmp_path / "smoke.json"))
    assert [row[0] for row in second[None]] == [row[0] for row in first[None]]
    assert second["Taxonomy (Piras et al. 2024)"][0] == first["Taxonomy (Piras et al. 2024)"][0]
    assert second["Cells in detail"][1] == first["Cells in detail"][1]  # the untouched hydra cell reads the same


def test_write_moves_a_corrupt_report_aside_and_starts_anew(tmp_path, fake_session):
    (tmp_path / "smoke.json").write_bytes(b"{ half a report")
    report.write(tmp_path / "smoke.md", [smoke()], fake_session)
    asides = list(tmp_path.glob("smoke.json.corrupt-*"))
    assert len(asides) == 1 and asides[0].read_bytes() == b"{ half a report"
    assert report.load(tmp_path / "smoke.json")["records"] == [smoke()]
    assert any(str(asides[0]) in line for line in fake_session.logged)


def test_write_moves_records_of_an_older_protocol_aside_and_says_so(tmp_path, fake_session):
    json_path = tmp_path / "smoke.json"
    old_protocol = smoke("lwm", protocol="smoke-e0-0000000000000000")
    old_hydra = smoke("hydra", protocol="smoke-e0-0000000000000000")
    current = smoke("hydra", sparsity=95)
    json_path.write_text(json.dumps({**document([old_protocol, old_hydra, current], preset="smoke")}))
    report.write(tmp_path / "smoke.md", [smoke("hydra")], fake_session)
    doc = report.load(json_path)
    assert doc["records"] == [smoke("hydra"), current]
    assert doc["protocol"] == report.protocol_id(presets.SMOKE)
    # nothing is lost: the old lwm record is kept aside; the re-run hydra cell replaces its old record
    assert doc["superseded"] == [old_protocol]
    assert any("2 record(s)" in line and "moved to 'superseded'" in line for line in fake_session.logged)
    md = (tmp_path / "smoke.md").read_text()
    superseded = md.split("## Superseded records")[1].split("\n## ")[0]
    assert "smoke-e0-0000000000000000" in superseded and "lwm" in superseded and "hydra" not in superseded
    assert md == report.render_markdown(doc)
    # a partial re-run of the lwm cell leaves its old whole verdict aside; re-running it whole brings it back
    report.write(tmp_path / "smoke.md", [smoke("lwm", status="partial", evaluated=False)], fake_session)
    assert report.load(json_path)["superseded"] == [old_protocol]
    report.write(tmp_path / "smoke.md", [smoke("lwm")], fake_session)
    doc = report.load(json_path)
    assert doc["superseded"] == [] and "## Superseded records" not in (tmp_path / "smoke.md").read_text()


def test_write_refuses_a_report_of_another_preset(tmp_path, fake_session):
    json_path = tmp_path / "smoke.json"
    other = document([record()], preset="quick")
    json_path.write_text(json.dumps(other))
    before = json_path.read_bytes()
    with pytest.raises(Exception) as info:
        report.write(tmp_path / "smoke.md", [smoke()], fake_session)
    message = str(info.value)
    assert "\n" not in message
    assert "--advprune-report" in message and "'quick'" in message and "'smoke'" in message
    assert json_path.read_bytes() == before
    assert not (tmp_path / "smoke.md").exists()


def test_write_gives_up_on_a_lock_it_cannot_win_with_a_one_line_error(tmp_path, fake_session, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(report, "LOCK_TIMEOUT_S", 0.2)
    with FileLock(str(tmp_path / "smoke.json.lock")):
        with pytest.raises(report.ReportMismatch, match=r"could not lock .*smoke.json.lock within 0.2 s: another run"):
            report.write(tmp_path / "smoke.md", [smoke()], fake_session)
    assert not (tmp_path / "smoke.json").exists()


@pytest.mark.parametrize("failing", [".json", ".md"])
def test_write_is_atomic_when_the_final_rename_fails(tmp_path, fake_session, monkeypatch, failing):
    """A write that dies before its rename leaves the previous file whole (never half written)."""
    md = tmp_path / "smoke.md"
    report.write(md, [smoke()], fake_session)
    json_before, md_before = (tmp_path / "smoke.json").read_bytes(), md.read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(failing):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        report.write(md, [smoke("lwm")], fake_session)
    monkeypatch.undo()
    if failing == ".json":
        assert (tmp_path / "smoke.json").read_bytes() == json_before  # old report intact, not truncated
    assert md.read_bytes() == md_before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("smoke.json", "smoke.md", "smoke.json.lock")]
    assert leftovers == []  # no temporary files left behind


# ------------------------------------------------------------------------------ FMN and paired statistics


def test_fmn_section_shows_the_three_robust_accuracies_medians_config_time_and_curves():
    t = tables(report.render_markdown(golden_doc()))["Minimum-norm attack (FMN) and security curves"]
    row = dict(zip(t[0], next(r for r in t[1:] if r[0] == "hydra-resnet18-weights-90")))
    assert row["AutoAttack robust % [95% CI]"] == "44.0 [43.0, 45.0]"
    assert row["FMN-Linf robust % [95% CI]"] == "45.0 [44.0, 46.0]"
    assert row["worst case % [95% CI]"] == "43.3 [42.3, 44.3]"
    assert row["FMN median distance (Linf / L2)"] == "0.04 / 0.9"
    assert row["tuned FMN"] == "linf ce/adam/none lr 0.01; l2 logit/sgd/cosine lr 1"
    assert row["time s (FMN / AA+PGD)"] == "79 / 412"
    assert row["security curves"] == ("[linf](cifar10_curves/cifar10-resnet18-weights-90-linf.png) "
                                      "[l2](cifar10_curves/cifar10-resnet18-weights-90-l2.png)")
    dense = dict(zip(t[0], next(r for r in t[1:] if r[0] == "dense-resnet18-dense-0")))
    assert dense["FMN median distance (Linf / L2)"] == "0.05 / 1.2"
    assert len(t) == 3  # records without FMN results have no row


def test_fmn_median_of_mostly_failed_points_reads_infinite():
    rec = record(fmn=fmn_block([None, None, 0.1], [None, None, 1.0], 0.4, 0.9, 0.4))
    t = tables(report.render_markdown(document([rec])))["Minimum-norm attack (FMN) and security curves"]
    assert t[1][t[0].index("FMN median distance (Linf / L2)")] == "∞ / ∞"


def test_no_fmn_section_without_fmn_results():
    assert "Minimum-norm" not in report.render_markdown(document([record()]))


def _paired(method, flags, sparsity=90):
    return record(method, sparsity=sparsity, robust=flags.count("1") / len(flags),
                  per_point={"clean": "1" * len(flags), "robust": flags})


def test_mcnemar_note_under_each_table_names_the_ties_with_the_best():
    best, close, far = "1" * 60 + "0" * 40, "1" * 58 + "0" * 42, "1" * 20 + "0" * 80
    doc = document([_paired("hydra", best), _paired("lwm", close), _paired("random", far),
                    _paired("hydra", far, 95), _paired("lwm", best, 95)])
    notes = report.mcnemar_notes(doc)
    note = notes[lb_title("cifar10", "weights")]
    assert "resnet18 90%: best hydra; not distinguishable from it: lwm (p = 0.5)" in note
    assert "resnet18 95%: best lwm; not distinguishable from it: none" in note
    md = report.render_markdown(doc)
    assert md.index(note) > md.index("## " + lb_title("cifar10", "weights"))


def test_mcnemar_note_skips_columns_it_cannot_pair():
    doc = document([_paired("hydra", "1100"), _paired("lwm", "110"),  # different point counts
                    _paired("hydra", "1100", 95), record("lwm", sparsity=95),  # lwm 95 has no per-point flags
                    _paired("hydra", "1010", 99), record("lwm", sparsity=99, evaluated=False, status="ERROR")])
    assert report.mcnemar_notes(doc) == {}


def test_make_record_keeps_fmn_distances_json_safe_and_the_three_numbers():
    import torch

    from pytest_advprune.evaluate import Accuracy, Evaluation, with_fmn
    from pytest_advprune.fmn import FMNConfig, FMNResult, NormResult

    t = lambda s: torch.tensor([c == "1" for c in s])
    attacks = {"PGD-5": Accuracy.from_flags("PGD-5", t("1110")), "AA:apgd-ce": Accuracy.from_flags("AA:apgd-ce", t("1101"))}
    ev = Evaluation(Accuracy.from_flags("clean", t("1111")), attacks, Accuracy.from_flags("robust", t("1100")), [], 12.0)
    result = FMNResult({n: NormResult(n, [0.5, 0.05, math.inf, 0.3], FMNConfig(), [("x", 0.2)], 0, 3.0, 1.0)
                        for n in ("linf", "l2")})
    cell, res, session = _fake_cell_result({"sparsity": "passed", "clean": "passed", "robust": "passed"})
    res.evaluation = with_fmn(ev, result, presets.SMOKE.eps)
    rec = json.loads(json.dumps(report.make_record(cell, res, session, {}), allow_nan=False))
    f = rec["fmn"]
    assert f["norms"]["linf"]["distances"] == [0.5, 0.05, None, 0.3]
    assert f["robust"]["autoattack"][0] == 0.75 and f["robust"]["fmn_linf"][0] == 0.75
    assert f["robust"]["worst_case"][0] == 0.25 == rec["robust_acc"]["worst_case"]
    assert rec["robust_acc"]["FMN-Linf"] == 0.75 and rec["per_point"]["robust"] == "1000"
    assert (f["fmn_missed"], f["fmn_only"]) == (2, 1)  # points 2, 3 broken by PGD/AA only; point 1 by FMN only
    assert f["median"] == {"linf": 0.3, "l2": 0.3}  # the lower middle value of an even count, as torch.median and f["seconds"] == {"fmn": 8.0, "autoattack_pgd": 12.0}
    assert f["norms"]["linf"]["config_label"] == "logit/sgd/cosine lr 1"
    assert set(rec["ci95_attacks"]) == {"PGD-5", "AA:apgd-ce", "FMN-Linf"}


@pytest.mark.parametrize("provenance, device, torch_version", [
    ({}, "cpu", "run"),  # skipped, or failed before its model existed: this run decided it
    ({"model": {"device": "cuda:1", "versions": {"torch": "model"}}}, "cuda:1", "model"),  # sparsity-only record
    ({"model": {"device": "cuda:1", "versions": {"torch": "model"}},
      "evaluation": {"device": "cuda:0", "versions": {"torch": "eval"}}}, "cuda:0", "eval"),
    ({"model": {"device": "cuda:1", "versions": {"torch": "model"}}, "evaluation": None}, "unknown", "run"),
    ({"model": None}, "unknown", "run"),
])
def test_a_records_device_and_versions_are_those_its_numbers_were_computed_with(provenance, device, torch_version):
    assert report.computed_on(provenance, "cpu", {"torch": "run"}) == {"device": device, "versions": {"torch": torch_version}}
