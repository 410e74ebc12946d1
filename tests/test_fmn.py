"""FMN minimum-norm distances, tuning, robust accuracy at eps and the worst case with FMN
(pytest_advprune.fmn, evaluate.with_fmn), on tiny linear models: each test runs in well under a second."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from pytest_advprune import fmn, presets
from pytest_advprune.attacks import pgd_robust_flags
from pytest_advprune.evaluate import FMN_LINF, Accuracy, Evaluation, with_fmn
from pytest_advprune.fmn import FMNConfig, FMNResult, FMNSpec, NormResult

torch.set_num_threads(1)
CPU = torch.device("cpu")
ADAM = FMNConfig("logit", "adam", "cosine", 0.03)


@pytest.fixture(scope="module")
def linear():
    """A 3-class linear model on 4x4 one-channel inputs, 64 points of which the first 5 are
    labelled wrongly (misclassified clean)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3
    return model, x, y


class Constant(nn.Module):
    """Predicts class 0 whatever the input: points of class 0 have no adversarial example at all."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(len(x), 3) + self.w * x.flatten(1).sum(1, keepdim=True)
        logits[:, 0] = 1.0
        return logits


def test_failed_points_are_inf_and_misclassified_are_zero():
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 0, 0, 1, 2, 1])
    d, unverified = fmn.fmn_distances(Constant(), x, y, "linf", ADAM, 10, 4, CPU)
    # secml-torch hands back the clean input for the class-0 points; they must not read as distance 0
    assert d[:3].tolist() == [math.inf] * 3
    assert d[3:].tolist() == [0.0] * 3
    assert unverified == 0
    assert fmn.robust_flags(d, 0.1).tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_distances_are_real_adversarial_distances(linear, norm):
    model, x, y = linear
    d, _ = fmn.fmn_distances(model, x, y, norm, ADAM, 30, 32, CPU)
    assert (d[:5] == 0).all() and (d[5:] > 0).all()
    assert torch.isfinite(d[5:]).float().mean() > 0.9  # a linear model is easy to fool


def test_distances_within_eps_where_pgd_breaks(linear):
    model, x, y = linear
    eps = 0.1
    torch.manual_seed(0)
    broken = ~pgd_robust_flags(model, x, y, eps, 50, 64, CPU)
    assert 10 <= int(broken.sum()) < 60  # the check has points on both sides
    d, _ = fmn.fmn_distances(model, x, y, "linf", ADAM, 30, 64, CPU)
    assert (d[broken] <= eps).all()


def test_batches_of_different_sizes(linear):
    """secml-torch keeps one batch's eps-ball radii in the attack; a fresh attack per batch must
    let a last, smaller batch run (and give the same distances as one batch)."""
    model, x, y = linear
    whole, _ = fmn.fmn_distances(model, x[:40], y[:40], "linf", ADAM, 15, 64, CPU)
    split, _ = fmn.fmn_distances(model, x[:40], y[:40], "linf", ADAM, 15, 16, CPU)
    assert torch.allclose(whole, split, atol=1e-6)


def test_attack_leaves_no_parameter_gradients(linear):
    model, x, y = linear
    fmn.fmn_distances(model, x[:8], y[:8], "l2", ADAM, 3, 8, CPU)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


finite_or_not = st.one_of(st.floats(0, 2, allow_nan=False), st.just(math.inf), st.just(0.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_or_not, min_size=1, max_size=40), st.lists(st.floats(0, 3, allow_nan=False), min_size=2, max_size=20))
def test_security_curve_is_non_increasing_and_matches_robust_flags(distances, grid):
    grid = sorted(grid)
    curve = fmn.security_curve(distances, grid)
    assert all(a >= b for a, b in zip(curve.tolist(), curve.tolist()[1:]))
    for e, value in zip(grid, curve.tolist()):
        assert value == pytest.approx(fmn.robust_flags(distances, e).double().mean().item())


def test_tie_rule_distance_equal_to_eps_is_broken():
    assert fmn.robust_flags([0.1, 0.1 + 1e-9, math.inf, 0.0], 0.1).tolist() == [False, True, True, False]


def test_robust_at_eps_from_a_real_run_is_monotone(linear):
    model, x, y = linear
    d, _ = fmn.fmn_distances(model, x, y, "linf", ADAM, 20, 64, CPU)
    accs = [fmn.robust_flags(d, e).float().mean().item() for e in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] == pytest.approx((y == model(x).argmax(1)).float().mean().item())  # eps 0: clean accuracy


SPEC = FMNSpec(steps=5, tune_steps=5, tune_points=8, tune_split="test",
               step_sizes=(("linf", "sgd", (1.0, 10.0)), ("linf", "adam", (0.01,))))


def test_grid_is_the_product_of_the_axes():
    grid = SPEC.grid("linf")
    assert len(grid) == 2 * 2 * 3  # losses x schedulers x (2 SGD + 1 Adam step sizes)
    assert len(set(grid)) == len(grid)
    assert SPEC.grid("l2") == []
    assert SPEC.tuning_cost() == 12 * 5 * 8


def test_tuning_picks_the_lowest_median(linear, monkeypatch):
    """A constructed case: each configuration's distances are fixed in advance; the winner has the
    lowest median, a configuration with a low mean but mostly failed points (+inf) loses."""
    model, x, y = linear
    grid = SPEC.grid("linf")
    n = int((model(x).argmax(1) == y).sum())
    medians = {c: 0.5 + i / 10 for i, c in enumerate(grid)}
    winner, many_inf = grid[7], grid[2]
    medians[winner] = 0.05

    def fake(model_, x_, y_, norm, config, steps, batch_size, device):
        assert len(x_) == n and steps == SPEC.tune_steps  # only the correctly classified tuning points
        d = torch.full((len(x_),), medians[config], dtype=torch.float64)
        if config == many_inf:
            d[: len(d) // 2 + 1] = math.inf
            d[len(d) // 2 + 1:] = 0.001
        return d, 0

    monkeypatch.setattr(fmn, "fmn_distances", fake)
    best, scores = fmn.tune(model, x, y, "linf", SPEC, 64, CPU)
    assert best == winner
    assert [label for label, _ in scores] == [c.label() for c in grid]
    assert dict(scores)[many_inf.label()] == math.inf


def test_tuning_ties_go_to_the_earlier_configuration(linear, monkeypatch):
    model, x, y = linear
    monkeypatch.setattr(fmn, "fmn_distances", lambda m, x_, *a: (torch.full((len(x_),), 0.2, dtype=torch.float64), 0))
    best, _ = fmn.tune(model, x, y, "linf", SPEC, 64, CPU)
    assert best == SPEC.grid("linf")[0]


def test_spec_rejects_unknown_choices():
    with pytest.raises(ValueError, match="unknown"):
        dataclasses.replace(SPEC, optimizers=("rmsprop",))
    with pytest.raises(ValueError, match="tune_split"):
        dataclasses.replace(SPEC, tune_split="val")


def test_run_fmn_and_json_round_trip(linear):
    model, x, y = linear
    spec = FMNSpec(steps=15, tune_steps=10, tune_points=8, tune_split="test", losses=("logit",), schedulers=("cosine",),
                   step_sizes=(("linf", "adam", (0.01, 0.03)), ("l2", "sgd", (1.0,))))
    result = fmn.run_fmn(model, x[:48], y[:48], x[48:], y[48:], spec, 32, CPU, seed=0)
    assert set(result.norms) == {"linf", "l2"}
    assert len(result.norms["linf"].tuning) == 2 and result.norms["l2"].tuning == []  # one l2 config: not tuned
    result.norms["linf"].distances[7] = math.inf
    text = json.dumps(result.to_dict(), allow_nan=False)  # JSON has no inf: written as null
    back = FMNResult.from_dict(json.loads(text))
    assert back.norms["linf"].distances == result.norms["linf"].distances
    assert back.norms["linf"].config == result.norms["linf"].config


def _evaluation(clean: str, pgd: str, aa: str) -> Evaluation:
    attacks = {"PGD-5": Accuracy.from_flags("PGD-5", _t(pgd)), "AA:apgd-ce": Accuracy.from_flags("AA:apgd-ce", _t(aa))}
    robust = _t(clean) & _t(pgd) & _t(aa)
    return Evaluation(Accuracy.from_flags("clean", _t(clean)), attacks, Accuracy.from_flags("robust", robust), [], 1.0)


def _t(flags: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in flags])


def test_worst_case_takes_fmn_point_by_point():
    ev = _evaluation("111110", "111100", "110110")
    d = [0.5, 0.05, 0.5, math.inf, 0.1, 0.0]  # FMN breaks point 1 and point 4 (= eps: broken)
    result = FMNResult({"linf": NormResult("linf", d, ADAM, [], 0, 1.0, 0.5)})
    out = with_fmn(ev, result, 0.1)
    assert out.attacks[FMN_LINF].flags == "101100"
    assert out.robust.flags == "100100"
    assert out.fmn is result
    assert Evaluation.from_dict(json.loads(json.dumps(out.to_dict(), allow_nan=False))).robust.flags == "100100"
    with pytest.raises(ValueError, match="points"):
        with_fmn(ev, FMNResult({"linf": NormResult("linf", d[:3], ADAM, [], 0, 1.0, 0.5)}), 0.1)


def test_presets_carry_an_fmn_spec():
    for p in presets.PRESETS.values():
        assert p.fmn is not None and "linf" in p.fmn.norms and p.fmn.grid("linf")
        assert "minimum-norm attack" in p.header()
    assert presets.PRESETS["cifar10"].fmn.tune_split == "train"  # its evaluation takes the whole test split
    # smoke's FMN costs at most twice its PGD + AutoAttack subset (forward+backward passes of one point):
    # the least that still breaks points there (see the preset's comment; at 10 steps it broke none)
    p, smoke = presets.SMOKE, presets.SMOKE.fmn
    attack_passes = p.n_eval * (p.pgd_steps + p.autoattack.apgd_iters * (1 + p.autoattack.n_target_classes))
    assert smoke.tuning_cost() + len(smoke.norms) * smoke.steps * p.n_eval <= 2 * attack_passes


def test_smoke_dense_cell_has_fmn_in_its_verdict_record_and_cache(dense_cache, tmp_path):
    """The session runs FMN as the third fixed attack of a cell (smoke preset, cached dense model),
    caches it in its own kind and keeps the AutoAttack evaluation entry as it was."""
    from pytest_advprune import registry, report
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig, versions

    registry.load_builtin()
    evals_before = sorted(p.name for p in (dense_cache / "eval").glob("*.json"))
    session = AdvPruneSession(RunConfig(presets.SMOKE, ["dense"], device="cpu", cache_dir=str(dense_cache),
                                        report_path=str(tmp_path / "smoke.md")))
    cell = Cell("dense", "fashion_mnist", "cnn", "dense", 0)
    res = session.result(cell)
    assert res.error is None, res.error
    ev = res.evaluation
    linf = ev.fmn.norms["linf"]
    assert len(linf.distances) == presets.SMOKE.n_eval and set(ev.fmn.norms) == {"linf", "l2"}
    assert ev.attacks[FMN_LINF].tensor().equal(fmn.robust_flags(linf.distances, presets.SMOKE.eps))
    everything = ev.clean.tensor()
    for acc in ev.attacks.values():
        everything &= acc.tensor()
    assert ev.robust.tensor().equal(everything)
    assert "FMN-Linf" in session.check(cell, "robust").message
    assert sorted(p.name for p in (dense_cache / "eval").glob("*.json")) == evals_before
    assert len(list((dense_cache / "fmn").glob("*.json"))) >= 1
    for kind in ("clean", "robust"):
        session.record(cell, kind, "passed")
    rec = report.make_record(cell, res, session, versions())
    assert rec["versions"]["secml-torch"] != "absent"
    assert json.loads(json.dumps(rec, allow_nan=False))["fmn"]["robust"]["worst_case"][0] == ev.robust.acc
