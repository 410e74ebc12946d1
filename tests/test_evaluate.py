"""Accuracies, Wilson intervals and the point-wise worst case (pytest_advprune.evaluate)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from pytest_advprune import data, evaluate as ev_mod, models, presets
from pytest_advprune.attacks import AutoAttackOutcome, AutoAttackSpec
from pytest_advprune.errors import NonFiniteModel
from pytest_advprune.evaluate import Accuracy, Evaluation, check_finite, evaluate, wilson
from pytest_advprune.training import TrainSpec, adversarial_train

torch.set_num_threads(1)
CPU = torch.device("cpu")
Z = 1.959964


# ----------------------------------------------------------------------------- Wilson interval


def wilson_by_definition(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson bounds as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    roots = sorted(np.roots([a, b, c]).real)
    return roots[0], roots[1]


def test_wilson_known_values():
    low, high = wilson(45, 100)
    assert low == pytest.approx(0.35615, abs=5e-5) and high == pytest.approx(0.54755, abs=5e-5)
    assert (low, high) == pytest.approx(wilson_by_definition(45, 100), abs=1e-12)
    # k = 0 and k = n: one bound is the point estimate, the other z^2 / (n + z^2) away from it
    assert wilson(0, 10)[0] == 0.0
    assert wilson(0, 10)[1] == pytest.approx(Z * Z / (10 + Z * Z), abs=1e-12)
    assert wilson(10, 10)[0] == pytest.approx(10 / (10 + Z * Z), abs=1e-12)
    assert wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(1, 1) == pytest.approx((1 / (1 + Z * Z), 1.0), abs=1e-12)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    # a wider z gives a wider interval
    lo99, hi99 = wilson(45, 100, z=2.575829)
    assert lo99 < low and hi99 > high


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**7), data=st.data())
def test_wilson_interval_contains_estimate_and_stays_in_unit_interval(n, data):
    k = data.draw(st.integers(0, n) | st.sampled_from([0, n]))
    low, high = wilson(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0, (k, n, low, high)
    # symmetric: k successes is n - k failures
    low2, high2 = wilson(n - k, n)
    assert low == pytest.approx(1 - high2, abs=1e-9) and high == pytest.approx(1 - low2, abs=1e-9)
    if 0 < k < n:
        assert (low, high) == pytest.approx(wilson_by_definition(k, n), abs=1e-9)


@pytest.mark.parametrize("n", [1, 3, 7, 10, 49, 100, 200, 1000, 10000])
def test_wilson_at_full_and_zero_accuracy_contains_estimate(n):
    assert wilson(n, n)[1] == 1.0 and wilson(n, n)[0] < 1.0
    assert wilson(0, n)[0] == 0.0 and wilson(0, n)[1] > 0.0


# ----------------------------------------------------------------------------- Accuracy / Evaluation


@settings(max_examples=50, deadline=None)
@given(flags=st.lists(st.booleans(), max_size=300), as_int=st.booleans())
def test_accuracy_from_flags_round_trip(flags, as_int):
    t = torch.tensor(flags, dtype=torch.int64 if as_int else torch.bool)
    acc = Accuracy.from_flags("clean", t)
    assert acc.n == len(flags) and acc.correct == sum(flags)
    assert acc.acc == (sum(flags) / len(flags) if flags else 0.0)
    assert acc.ci95 == wilson(sum(flags), len(flags))
    assert acc.flags == "".join("1" if f else "0" for f in flags)
    assert acc.tensor().dtype == torch.bool and acc.tensor().tolist() == flags
    assert Accuracy.from_flags("again", acc.tensor()).flags == acc.flags


def test_evaluation_dict_round_trip():
    c = Accuracy.from_flags("clean", torch.tensor([1, 1, 0, 1]))
    a = Accuracy.from_flags("PGD-2", torch.tensor([1, 0, 0, 1]))
    r = Accuracy.from_flags("robust", torch.tensor([0, 0, 0, 1]))
    e = Evaluation(clean=c, attacks={"PGD-2": a}, robust=r, warnings=["w"], duration_s=1.5)
    import json

    back = Evaluation.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back == e
    assert isinstance(back.clean.ci95, tuple)


# ----------------------------------------------------------------------------- finiteness


def tiny_cnn() -> models.SmallCNN:
    torch.manual_seed(0)
    return models.SmallCNN(1, 28, 10, (0.2860,), (0.3530,), widths=(4, 8), hidden=16)


@pytest.mark.parametrize(
    "name, bad",
    [("conv1.weight", float("nan")), ("fc2.bias", float("inf")), ("fc1.weight", float("-inf")), ("normalize.std", float("nan"))],
)
def test_check_finite_names_the_tensor(name, bad):
    model = tiny_cnn()
    check_finite(model)  # a healthy model passes
    tensor = dict(list(model.named_parameters()) + list(model.named_buffers()))[name]
    with torch.no_grad():
        tensor.view(-1)[-1] = bad
    with pytest.raises(NonFiniteModel) as info:
        check_finite(model)
    msg = str(info.value)
    assert repr(name) in msg and "\n" not in msg


def test_check_finite_ignores_integer_buffers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    check_finite(model)  # num_batches_tracked is int64


class NaNLogits(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.lin = nn.Linear(28 * 28, 10)
        self.value = value

    def forward(self, x):
        out = self.lin(x.flatten(1))
        return out + self.value * (out.detach() != out.detach() + 1).float()  # finite weights, bad logits


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_evaluate_rejects_non_finite_logits(value, tiny_preset):
    x = torch.rand(6, 1, 28, 28)
    y = torch.arange(6) % 10
    with pytest.raises(NonFiniteModel, match="logits"):
        evaluate(NaNLogits(value), x, y, tiny_preset, CPU)


def test_evaluate_rejects_non_finite_weights(tiny_preset):
    model = tiny_cnn()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteModel, match="fc1.weight"):
        evaluate(model, torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), tiny_preset, CPU)


# ----------------------------------------------------------------------------- evaluate()


@pytest.fixture(scope="module")
def tiny_preset():
    return dataclasses.replace(
        presets.SMOKE,
        n_eval=32,
        pgd_steps=2,
        eval_batch=32,
        autoattack=AutoAttackSpec(version="custom", attacks=("apgd-ce",), apgd_iters=3),
    )


@pytest.fixture(scope="module")
def fmnist():
    try:
        return data.load("fashion_mnist", train=False, limit=288)
    except Exception as exc:  # noqa: BLE001 - the Debian package is a test prerequisite
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="module")
def trained(fmnist):
    x, y = fmnist
    model = models.build("cnn", "fashion_mnist", 0)
    adversarial_train(model, x[:256], y[:256], TrainSpec(epochs=2, lr=0.05, batch_size=32, eps=0.05), seed=0, device=CPU)
    return model


def test_evaluate_worst_case_over_attacks(trained, fmnist, tiny_preset):
    x, y = fmnist[0][256:], fmnist[1][256:]
    result = evaluate(trained, x, y, tiny_preset, CPU)
    assert set(result.attacks) == {"PGD-2", "AA:apgd-ce"}
    clean = result.clean.tensor()
    robust = result.robust.tensor()
    assert result.clean.n == result.robust.n == len(x) == 32
    assert torch.equal(clean, trained(x).argmax(1) == y)
    expected = clean.clone()
    for name, acc in result.attacks.items():
        flags = acc.tensor()
        assert acc.n == len(x)
        assert not bool((flags & ~clean).any()), f"{name}: robust on a point misclassified clean"
        expected &= flags
    assert torch.equal(robust, expected)
    assert not bool((robust & ~clean).any())
    assert result.robust.correct <= min(a.correct for a in result.attacks.values()) <= result.clean.correct
    assert 0 < result.clean.correct, "test setup: the tiny model should classify some points"
    assert result.robust.correct < result.clean.correct, "test setup: eps 0.1 attacks should break some points"
    assert result.duration_s > 0 and isinstance(result.warnings, list)
    # the same preset, model and points give the same flags
    again = evaluate(trained, x, y, tiny_preset, CPU)
    assert again.robust.flags == result.robust.flags and again.attacks["PGD-2"].flags == result.attacks["PGD-2"].flags


def test_evaluate_combines_attack_flags_point_wise(trained, fmnist, tiny_preset, monkeypatch):
    """With the attacks stubbed, every point's robustness is clean AND PGD AND the AA cascade's end."""
    x, y = fmnist[0][256:], fmnist[1][256:]
    n = len(x)
    clean = trained(x).argmax(1) == y
    g = torch.Generator().manual_seed(0)
    pgd_raw = torch.rand(n, generator=g) < 0.7
    aa_first = torch.rand(n, generator=g) < 0.8
    aa_second = aa_first & (torch.rand(n, generator=g) < 0.8)  # AutoAttack's flags are cumulative
    calls = {}

    def fake_pgd(model, xs, ys, eps, steps, batch, device, step_size=None):
        calls["pgd"] = (eps, steps)
        return pgd_raw.clone()

    def fake_aa(model, xs, ys, eps, spec, seed, batch, device, log, done=None):
        calls["aa"] = (eps, spec, seed)
        return AutoAttackOutcome({"apgd-ce": aa_first.clone(), "apgd-t": aa_second.clone()}, ["a warning"])

    monkeypatch.setattr(ev_mod, "pgd_robust_flags", fake_pgd)
    monkeypatch.setattr(ev_mod, "run_autoattack", fake_aa)
    result = evaluate(trained, x, y, tiny_preset, CPU)
    assert calls == {"pgd": (tiny_preset.eps, 2), "aa": (tiny_preset.eps, tiny_preset.autoattack, tiny_preset.seed)}
    assert torch.equal(result.clean.tensor(), clean)
    assert torch.equal(result.attacks["PGD-2"].tensor(), pgd_raw & clean)
    assert torch.equal(result.attacks["AA:apgd-ce"].tensor(), aa_first & clean)
    assert torch.equal(result.attacks["AA:apgd-t"].tensor(), aa_second & clean)
    assert torch.equal(result.robust.tensor(), clean & pgd_raw & aa_second)
    assert result.warnings == ["a warning"]
    # the stubs make the three sources disagree, so each one matters to the result
    assert bool((clean & pgd_raw & ~aa_second).any()) and bool((clean & aa_second & ~pgd_raw).any())


# ----------------------------------------------------------------------------- resuming a cascade


def test_autoattack_spec_budgets_of_attacks_not_run_take_defaults():
    no_square = AutoAttackSpec(version="custom", attacks=("apgd-ce", "apgd-t"), apgd_iters=100, n_target_classes=3)
    with_square = AutoAttackSpec(version="custom", attacks=("apgd-ce", "apgd-t", "square"), apgd_iters=100,
                                 n_target_classes=3, square_queries=1000)
    assert with_square.prefixes() == [no_square, AutoAttackSpec(version="custom", attacks=("apgd-ce",), apgd_iters=100)]
    assert with_square.prefixes()[0].square_queries == 5000 and with_square.square_queries == 1000
    assert AutoAttackSpec(version="custom", attacks=("apgd-ce",), n_target_classes=1).n_target_classes == 9
    assert AutoAttackSpec(version="standard").prefixes() == []
    # the cached quick evaluations (before the preset gained Square) are found under the first prefix
    assert presets.QUICK.autoattack.prefixes()[0] == no_square


def test_evaluate_resumed_from_a_prefix_equals_a_fresh_evaluation(trained, fmnist, tiny_preset):
    x, y = fmnist[0][256:], fmnist[1][256:]
    full = dataclasses.replace(tiny_preset, autoattack=AutoAttackSpec(
        version="custom", attacks=("apgd-ce", "square"), apgd_iters=3, square_queries=20))
    head = dataclasses.replace(tiny_preset, autoattack=full.autoattack.prefixes()[0])
    first = evaluate(trained, x, y, head, CPU)
    resumed = evaluate(trained, x, y, full, CPU, resume=first)
    fresh = evaluate(trained, x, y, full, CPU)
    assert list(resumed.attacks) == list(fresh.attacks) == ["PGD-2", "AA:apgd-ce", "AA:square"]
    for name in fresh.attacks:
        assert resumed.attacks[name].flags == fresh.attacks[name].flags, name
    assert resumed.robust.flags == fresh.robust.flags
    assert resumed.duration_s > first.duration_s


def test_autoattack_rejects_cached_attacks_that_are_not_a_prefix(trained, fmnist):
    from pytest_advprune.attacks import run_autoattack

    x, y = fmnist[0][256:260], fmnist[1][256:260]
    spec = AutoAttackSpec(version="custom", attacks=("apgd-ce", "square"), apgd_iters=2, square_queries=5)
    with pytest.raises(ValueError, match="not a prefix"):
        run_autoattack(trained, x, y, 0.1, spec, 0, 4, CPU, done={"square": torch.ones(4, dtype=torch.bool)})


def test_session_resumes_a_cached_evaluation_when_the_preset_extends_its_cascade(dense_cache):
    """The smoke dense model's evaluation is cached under smoke's APGD-CE + APGD-T; a preset that
    appends Square reuses it and runs Square only."""
    from pytest_advprune import registry
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    registry.load_builtin()
    cell = Cell("dense", "fashion_mnist", "cnn", "dense", 0)
    cached = AdvPruneSession(RunConfig(presets.SMOKE, ["dense"], device="cpu", cache_dir=str(dense_cache))).result(cell)
    longer = dataclasses.replace(presets.SMOKE, autoattack=dataclasses.replace(
        presets.SMOKE.autoattack, attacks=(*presets.SMOKE.autoattack.attacks, "square"), square_queries=10))
    lines: list[str] = []
    res = AdvPruneSession(RunConfig(longer, ["dense"], device="cpu", cache_dir=str(dense_cache)), log=lines.append).result(cell)
    assert res.error is None, res.error
    assert any("resuming from a cached evaluation with apgd-ce, apgd-t" in line for line in lines), lines
    assert not any("apgd-ce on" in line or "PGD-" in line for line in lines), lines
    assert "AA:square" in res.evaluation.attacks
    for name, acc in cached.evaluation.attacks.items():
        assert res.evaluation.attacks[name].flags == acc.flags, name
    assert res.evaluation.robust.correct <= cached.evaluation.robust.correct
