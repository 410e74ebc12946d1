"""Attack-failure indicators (pytest_advprune.indicators) and AutoAttack on models with few classes.

Every indicator is seen failing on a broken input here or in tests/test_planted_faults.py
(saturated logits, input quantisation, randomised forward), and passing on a healthy one.
"""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st
from torch import nn
import torch.nn.functional as F

from pytest_advprune import attacks, indicators
from pytest_advprune.attacks import AutoAttackSpec, attacks_for_classes, run_autoattack
from pytest_advprune.evaluate import Accuracy, Evaluation
from pytest_advprune.indicators import DEFAULT, NAMES, monotone_violation

torch.set_num_threads(1)
CPU = torch.device("cpu")


def linear(n_classes: int, seed: int = 0) -> nn.Module:
    """A linear classifier on 1x8x8 inputs: differentiable everywhere, broken by a large enough eps."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes)).eval()


def points(model: nn.Module, n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs in [0, 1] labelled with the model's own predictions (all correct clean)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        return x, model(x).argmax(1)


def evaluation(clean: list[int], robust: list[int], attacks_: dict[str, list[int]] | None = None,
               warnings: list[str] | None = None) -> Evaluation:
    acc = lambda name, flags: Accuracy.from_flags(name, torch.tensor(flags, dtype=torch.bool))
    return Evaluation(acc("clean", clean), {k: acc(k, v) for k, v in (attacks_ or {}).items()}, acc("robust", robust),
                      warnings or [], 0.0)


# ----------------------------------------------------------------------------- healthy model


def test_a_healthy_model_passes_every_indicator():
    model = linear(10)
    x, y = points(model)
    flags = [1] * len(x)
    out = indicators.compute(model, x, y, evaluation(flags, [0] * len(x)), eps=0.1, seed=0, device=CPU, source=linear(10, 5))
    assert list(out) == list(NAMES)
    assert {k: v.passed for k, v in out.items()} == {**{k: True for k in NAMES}, "black_box": None}
    assert all(v.message and v.name == k for k, v in out.items())


def test_compute_leaves_the_global_random_state_alone():
    model = linear(10)
    x, y = points(model)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    indicators.compute(model, x, y, evaluation([1] * len(x), [0] * len(x)), eps=0.1, seed=0, device=CPU)
    assert torch.equal(torch.rand(3), expected)


def test_indicator_round_trips_through_json():
    ind = indicators.Indicator("gradients", False, 0.5, 0.01, "broken")
    assert indicators.Indicator.from_dict(ind.to_dict()) == ind
    assert DEFAULT.fingerprint() == indicators.IndicatorSettings().fingerprint() != \
        indicators.IndicatorSettings(n_points=100).fingerprint()


# ----------------------------------------------------------------------------- broken inputs


class Detached(nn.Module):
    """Broken: detaches its input inside forward, so no gradient reaches the input."""

    def __init__(self):
        super().__init__()
        self.inner = linear(10)

    def forward(self, x):
        return self.inner(x.detach())


class DropoutInEval(nn.Module):
    """Broken: dropout stays active in eval mode (a random forward pass)."""

    def __init__(self):
        super().__init__()
        self.inner = linear(10)

    def forward(self, x):
        return self.inner(F.dropout(x, 0.5, training=True))


def test_gradients_fails_on_an_interrupted_graph():
    model = Detached()
    x, y = points(model)
    ind = indicators.gradients(model, x, y, DEFAULT)
    assert ind.passed is False and "no input gradient" in ind.message


def test_deterministic_fails_on_dropout_in_eval_mode():
    model = DropoutInEval().eval()
    x, y = points(linear(10))
    ind = indicators.deterministic(model, x, y, DEFAULT)
    assert ind.passed is False and ind.value > DEFAULT.random_alpha
    assert "random in eval mode" in ind.message and "version='rand'" in ind.message
    assert indicators.deterministic(linear(10), x, y, DEFAULT).passed is True


@given(st.lists(st.floats(0, 1), min_size=1, max_size=6))
def test_monotone_violation_is_zero_exactly_for_non_increasing_curves(accs):
    grid = [0.1 * (i + 1) for i in range(len(accs))]
    rise = monotone_violation(grid, accs)
    assert rise >= 0
    assert (rise == 0) == all(a >= b for a, b in zip(accs, accs[1:]))


def test_eps_monotone_fails_when_the_attack_breaks_down_at_large_eps(monkeypatch):
    model = linear(10)
    x, y = points(model)
    assert indicators.eps_monotone(model, x, y, 0.1, DEFAULT).passed is True
    real = attacks.pgd

    def broken(model, x, y, eps, *args, **kwargs):  # an attack that silently returns the clean input at large eps
        return x.clone() if eps > 0.15 else real(model, x, y, eps, *args, **kwargs)

    monkeypatch.setattr(attacks, "pgd", broken)
    ind = indicators.eps_monotone(model, x, y, 0.1, DEFAULT)
    assert ind.passed is False and ind.value > DEFAULT.monotone_tol and "rises" in ind.message


def test_black_box_reads_square_from_the_cascade():
    n = 100
    clean = [1] * n
    white = [1] * 60 + [0] * 40
    assert indicators.black_box(evaluation(clean, white, {"PGD-5": white}), DEFAULT).passed is None
    square_ok = [1] * 59 + [0] * 41  # one point (1%) beyond the white-box attacks: within the margin
    ev = evaluation(clean, square_ok, {"PGD-5": white, "AA:apgd-ce": white, "AA:square": square_ok})
    assert indicators.black_box(ev, DEFAULT).passed is True
    square_bad = [1] * 55 + [0] * 45
    ind = indicators.black_box(evaluation(clean, square_bad, {"PGD-5": white, "AA:apgd-ce": white, "AA:square": square_bad}),
                               DEFAULT)
    assert ind.passed is False and ind.value == 0.05 and "gradient masking" in ind.message


def test_square_only_points_are_robust_to_every_other_attack_and_broken_by_square():
    acc = lambda name, bits: Accuracy.from_flags(name, torch.tensor([b == "1" for b in bits]))
    ev = Evaluation(
        clean=acc("clean", "111110"),
        attacks={"PGD-20": acc("PGD-20", "111010"), "AA:apgd-ce": acc("AA:apgd-ce", "110010"),
                 "AA:square": acc("AA:square", "010000"), "FMN-Linf": acc("FMN-Linf", "111001")},
        robust=acc("robust", "010000"), warnings=[], duration_s=0.0)
    # point 0: every white-box attack fails, Square breaks it; point 4: FMN breaks it; point 5: misclassified clean
    assert indicators.square_only(ev).nonzero().flatten().tolist() == [0]


def test_autoattack_warnings_fail_except_notes_and_a_few_zero_gradients():
    flags = [1] * 200
    ok = evaluation(flags, flags, warnings=["note: the model has 2 classes; ...",
                                            "there are 1 points with zero gradient! This might lead to ..."])
    assert indicators.autoattack_warnings(ok, DEFAULT).passed is True
    for bad in ("it seems to be a randomized defense! Please use version=\"rand\".",
                "there are 30 points with zero gradient! This might lead to ..."):
        ind = indicators.autoattack_warnings(evaluation(flags, flags, warnings=[bad]), DEFAULT)
        assert ind.passed is False and bad in ind.message


def test_robust_le_clean_fails_on_points_robust_but_misclassified():
    model = linear(10)
    x, y = points(model, n=10)
    good = evaluation([1] * 10, [1] * 5 + [0] * 5)
    assert indicators.robust_le_clean(model, x, y, good, DEFAULT).passed is True
    y_wrong = y.clone()
    y_wrong[0] = (y[0] + 1) % 10  # the model gets point 0 wrong, yet the evaluation counts it robust
    ind = indicators.robust_le_clean(model, x, y_wrong, good, DEFAULT)
    assert ind.passed is False and ind.value == 0.1
    over = evaluation([1] * 5 + [0] * 5, [1] * 6 + [0] * 4)
    assert indicators.robust_le_clean(model, x, y, over, DEFAULT).passed is False


def test_transfer_fails_when_the_surrogate_breaks_what_white_box_missed():
    model = linear(10)
    x, y = points(model)
    claimed_robust = evaluation([1] * len(x), [1] * len(x))  # a white-box evaluation that broke nothing
    ind = indicators.transfer(model, model, x, y, claimed_robust, 0.5, DEFAULT)
    assert ind.passed is False and "broken only by transfer" in ind.message
    assert indicators.transfer(model, None, x, y, claimed_robust, 0.5, DEFAULT).passed is None


def test_unbounded_and_loss_progress_fail_on_a_saturated_model():
    model = linear(10)
    x, y = points(model)
    with torch.no_grad():
        model[1].weight.mul_(1e4)
        model[1].bias.mul_(1e4)
    assert indicators.loss_progress(model, x, y, 0.05, DEFAULT).passed is False
    assert indicators.gradients(model, x, y, DEFAULT).passed is False


def test_pgd_trace_records_start_and_every_step():
    model = linear(10)
    x, y = points(model, n=8)
    trace: list[torch.Tensor] = []
    torch.manual_seed(0)
    with_trace = attacks.pgd(model, x, y, 0.1, 0.025, 4, trace=trace)
    torch.manual_seed(0)
    assert torch.equal(with_trace, attacks.pgd(model, x, y, 0.1, 0.025, 4))  # tracing changes nothing
    assert len(trace) == 5 and all(t.shape == (8,) for t in trace)
    assert (trace[-1] >= trace[0]).all()  # a linear model: every signed step raises the loss


# ----------------------------------------------------------------------------- few classes


def test_attacks_for_classes():
    quick = ("apgd-ce", "apgd-t")
    assert attacks_for_classes(quick, 10) == (quick, None)
    assert attacks_for_classes(quick, 4) == (quick, None)
    three, note = attacks_for_classes(quick, 3)
    assert three == ("apgd-ce", "apgd-dlr") and note.startswith("note: the model has 3 classes")
    assert attacks_for_classes(quick, 2)[0] == ("apgd-ce",)
    assert attacks_for_classes(("apgd-ce", "apgd-t", "apgd-dlr", "fab-t", "square"), 2)[0] == ("apgd-ce", "fab-t", "square")


def test_autoattack_runs_on_models_with_two_and_three_classes():
    spec = AutoAttackSpec(version="custom", attacks=("apgd-ce", "apgd-t", "fab-t", "square"), apgd_iters=5,
                          n_target_classes=9, square_queries=20)
    for n_classes in (2, 3):
        model = linear(n_classes)
        x, y = points(model, n=16)
        out = run_autoattack(model, x, y, 0.3, spec, seed=0, batch_size=16, device=CPU)
        expected = ("apgd-ce", "fab-t", "square") if n_classes == 2 else ("apgd-ce", "apgd-dlr", "fab-t", "square")
        assert tuple(out.flags_after) == expected
        assert out.warnings[0].startswith(f"note: the model has {n_classes} classes")
        assert not any("not possible" in w for w in out.warnings)  # AutoAttack's class-count flag is avoided
        ev = evaluation(out.flags_after["apgd-ce"].int().tolist(), out.flags_after[expected[-1]].int().tolist())
        assert indicators.compute(model, x, y, ev, eps=0.3, seed=0, device=CPU)["unbounded"].passed is True


# ----------------------------------------------------------------------------- AutoAttack's flags are captured


class Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = linear(10)

    def forward(self, x):
        return self.inner(x).softmax(1)


def test_autoattack_flags_are_captured_from_its_logger():
    spec = AutoAttackSpec(version="custom", attacks=("apgd-ce",), apgd_iters=2)
    x, y = points(linear(10), n=8)
    out = run_autoattack(Softmax().eval(), x, y, 0.1, spec, seed=0, batch_size=8, device=CPU)
    assert any("probability distribution" in w for w in out.warnings), out.warnings
    out = run_autoattack(DropoutInEval().eval(), x, y, 0.1, spec, seed=0, batch_size=8, device=CPU)
    assert any("randomized defense" in w for w in out.warnings), out.warnings
    out = run_autoattack(linear(10), x, y, 0.1, spec, seed=0, batch_size=8, device=CPU)
    assert out.warnings == []
