"""Presets: frozen protocol descriptions, their floors, fingerprints and printed header."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_advprune import presets
from pytest_advprune.attacks import AutoAttackSpec
from pytest_advprune.errors import AdvPruneError, BadOption
from pytest_advprune.fmn import FMNSpec
from pytest_advprune.presets import PRESETS, Floors, Preset
from pytest_advprune.training import TrainSpec

ALL = sorted(PRESETS)
ROOT = Path(__file__).resolve().parents[1]


def test_the_four_presets_exist_under_their_names():
    assert {"smoke", "quick", "cifar10", "svhn"} <= set(PRESETS)
    for name, p in PRESETS.items():
        assert p.name == name and presets.get(name) is p


@pytest.mark.parametrize("name", ALL)
def test_floors_cover_every_cell_of_the_grid_plus_dense(name):
    """Every grid cell has its own floor row (for_cell would fall back to a neighbour's row)."""
    p = PRESETS[name]
    rows = {(s, sp): (clean, robust) for s, sp, clean, robust in p.floors.rows}
    assert len(rows) == len(p.floors.rows), "two floor rows for one cell"
    grid = {("dense", 0)} | {("weights", s) for s in p.weights_sparsities} | {("structured", s) for s in p.structured_sparsities}
    assert grid <= set(rows), f"no floor row for {sorted(grid - set(rows))}"
    assert p.floors.for_cell("dense", 0) == rows[("dense", 0)]
    for s in p.weights_sparsities:
        assert p.floors.for_cell("weights", s) == rows[("weights", s)]
    for s in p.structured_sparsities:
        assert p.floors.for_cell("filters", s) == p.floors.for_cell("channels", s) == rows[("structured", s)]


def test_for_cell_off_the_grid_takes_the_nearest_row_of_its_kind():
    f = presets.QUICK.floors
    rows = {(s, p): (c, r) for s, p, c, r in f.rows}
    assert f.for_cell("weights", 92) == rows[("weights", 90)]
    assert f.for_cell("weights", 97) == rows[("weights", 95)]  # 95 and 99 tie: the lower sparsity
    assert f.for_cell("channels", 70) == rows[("structured", 75)]
    assert presets.SMOKE.floors.for_cell("filters", 90) == (0.45, 0.20)  # smoke's only structured row
    with pytest.raises(KeyError, match="no floor for pixels"):
        f.for_cell("pixels", 90)


@pytest.mark.parametrize("name", ALL)
def test_floors_are_fractions_and_robust_below_clean(name):
    f = PRESETS[name].floors
    assert 0 <= f.sparsity_tol <= 1
    assert f.derivation.strip()
    for structure, sparsity, clean, robust in f.rows:
        assert structure in ("dense", "weights", "structured")
        assert (sparsity == 0) == (structure == "dense")
        assert 0 <= clean <= 1 and 0 <= robust <= 1, (structure, sparsity)
        assert robust <= clean, (structure, sparsity)  # a robust point is a correct point


@pytest.mark.parametrize("name", ALL)
def test_sparsities_are_integer_percents_and_eps_is_pixel_scale(name):
    p = PRESETS[name]
    for s in p.weights_sparsities + p.structured_sparsities:
        assert type(s) is int and 0 < s < 100, s
    assert p.weights_sparsities and list(p.weights_sparsities) == sorted(set(p.weights_sparsities))
    assert p.structured_sparsities and list(p.structured_sparsities) == sorted(set(p.structured_sparsities))
    assert 0 < p.eps <= 1
    for spec in (p.dense_train, p.prune_train, p.finetune):
        assert spec.eps == p.eps  # trained at the threat model's eps
    assert p.n_eval > 0 and (p.n_train is None or p.n_train > 0)
    assert p.archs and p.description.strip()


@pytest.mark.parametrize("name", ALL)
def test_preset_is_frozen(name):
    p = PRESETS[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.n_eval = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.floors.sparsity_tol = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.autoattack.version = "custom"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.finetune.epochs = 0
    assert isinstance(p.archs, tuple) and isinstance(p.floors.rows, tuple)


def _changed(value):
    """Another value of the same kind as ``value``."""
    if isinstance(value, bool):
        return not value
    if value is None:
        return 1
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value + (value[-1],) if value else ("x",)
    if isinstance(value, TrainSpec):
        return dataclasses.replace(value, epochs=value.epochs + 1)
    if isinstance(value, AutoAttackSpec):
        return dataclasses.replace(value, apgd_iters=value.apgd_iters + 1)
    if isinstance(value, Floors):
        return dataclasses.replace(value, sparsity_tol=value.sparsity_tol + 0.01)
    if isinstance(value, FMNSpec):
        return dataclasses.replace(value, steps=value.steps + 1)
    raise AssertionError(f"no change for {value!r}")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Preset)])
def test_fingerprint_changes_with_every_field(field):
    p = presets.QUICK
    other = dataclasses.replace(p, **{field: _changed(getattr(p, field))})
    assert other.fingerprint() != p.fingerprint()
    assert other.fingerprint(field) != p.fingerprint(field)
    rest = [f.name for f in dataclasses.fields(Preset) if f.name != field]
    assert other.fingerprint(*rest) == p.fingerprint(*rest)  # only the named fields count


@pytest.mark.parametrize("change", [
    {"finetune": TrainSpec(epochs=1, lr=0.01, batch_size=128, eps=0.1, loss="trades")},
    {"autoattack": AutoAttackSpec(version="custom", attacks=("apgd-t", "apgd-ce"), apgd_iters=100, n_target_classes=3)},
    {"floors": Floors(0.01, presets.QUICK.floors.rows[:-1], presets.QUICK.floors.derivation)},
    {"eps": 0.1 + 1e-9},
])
def test_fingerprint_sees_nested_and_small_changes(change):
    assert dataclasses.replace(presets.QUICK, **change).fingerprint() != presets.QUICK.fingerprint()


def test_fingerprint_is_stable():
    p = presets.QUICK
    assert p.fingerprint() == p.fingerprint() == dataclasses.replace(p).fingerprint() == copy.deepcopy(p).fingerprint()
    assert p.fingerprint("dataset", "seed") == p.fingerprint("seed", "dataset")
    assert len({PRESETS[n].fingerprint() for n in ALL}) == len(ALL)
    assert all(len(PRESETS[n].fingerprint()) == 16 and int(PRESETS[n].fingerprint(), 16) >= 0 for n in ALL)


def test_fingerprint_is_the_same_in_another_process():
    """Cache keys must survive the process: no id(), hash() or set order in the fingerprint."""
    code = "from pytest_advprune import presets; print(presets.QUICK.fingerprint(), presets.SMOKE.fingerprint('archs'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.split() == [presets.QUICK.fingerprint(), presets.SMOKE.fingerprint("archs")]


def test_get_unknown_preset_raises_bad_option_listing_the_presets():
    with pytest.raises(BadOption) as info:
        presets.get("huge")
    message = str(info.value)
    assert message == f"unknown preset 'huge'; known: {', '.join(PRESETS)}"
    assert isinstance(info.value, AdvPruneError)
    with pytest.raises(BadOption):
        presets.get("Quick")


@pytest.mark.parametrize("name", ALL)
def test_header_has_the_protocol_keys(name):
    p = PRESETS[name]
    h = p.header()
    for key in ("preset", "attacks", "threat model", "eval points", "seed"):
        assert key in h and h[key], key
    assert h["preset"] == name
    assert h["seed"] == str(p.seed)
    assert str(p.n_eval) in h["eval points"]
    assert h["threat model"] == f"Linf, eps = {p.eps:.4g}"
    assert h["attacks"].startswith(p.autoattack.label()) and f"PGD-{p.pgd_steps}" in h["attacks"]
    assert all(isinstance(v, str) and "\n" not in v for v in h.values())


def test_quick_evaluates_on_at_least_1000_points_and_runs_on_cpu():
    q = presets.QUICK
    assert q.n_eval >= 1000
    assert q.needs_gpu is False
    assert q.dataset == "fashion_mnist"


def test_smoke_is_small():
    s = presets.SMOKE
    assert s.needs_gpu is False and s.n_eval <= 500 and s.n_train is not None and s.n_train <= 5000


@pytest.mark.parametrize("name, dataset", [("cifar10", "cifar10"), ("svhn", "svhn")])
def test_survey_presets_follow_the_survey_protocol(name, dataset):
    p = PRESETS[name]
    assert p.dataset == dataset
    assert p.autoattack.version == "standard"
    assert "AutoAttack standard" in p.header()["attacks"]
    assert p.eps == 8 / 255
    assert p.n_eval == 10000
    assert p.archs == ("resnet18", "vgg16")
    assert p.needs_gpu is True
    assert p.weights_sparsities == (90, 95, 99) and p.structured_sparsities == (50, 75, 90)
