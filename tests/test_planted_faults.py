"""Planted faults that fake robustness must be caught by the attack-failure indicators.

Three classic ways an evaluation goes wrong (Athalye et al. 2018; Pintor et al. 2022), each
planted in an otherwise healthy smoke model: PGD reports a high robust accuracy, yet the
suite marks the cell FAIL through the indicator that names the cause.

* saturated logits (a method that multiplies the classifier by 1e4): cross-entropy gradients
  vanish. A method's weights survive the cache's state_dict round trip, so it is a
  ``--advprune-methods-dir`` method.
* input quantisation with a plain round, and a randomised forward pass (noise then rounding, as
  randomised discretisation does) live in ``forward``, which a method cannot change (the
  session rebuilds the registered architecture from the state_dict), so they are user
  architectures evaluated with ``--advprune-checkpoint`` on a 90%-pruned copy of the smoke
  dense model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pytest_advprune.report  # noqa: F401  (imported before any pytester run, see test_plugin.py)
from pytest_advprune import presets
from pytest_advprune.session import AdvPruneSession, RunConfig
from pytest_advprune.sparsity import apply_masks, make_masks

CELL = "fashion_mnist-cnn-weights-90"

SATURATED = '''
import torch

from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register
from pytest_advprune.sparsity import apply_masks, make_masks, prunable_layers


@register
class Saturated(Method):
    """Planted fault: magnitude pruning, then the classifier scaled by 1e4 so softmax saturates."""

    name = "saturated"
    taxonomy = Taxonomy(paper="pytest-advprune planted fault", pipeline=Pipeline.AFTER, step1="AT (PGD)", step2="None",
                        schedule=Schedule.ONE_SHOT, locality=Locality.LOCAL, criterion=Criterion.LWM)
    structures = ("weights",)

    def prune(self, ctx):
        model = ctx.dense
        apply_masks(model, make_masks(model, ctx.structure, ctx.sparsity))
        classifier = list(prunable_layers(model).values())[-1]
        with torch.no_grad():
            classifier.weight.mul_(1e4)
            classifier.bias.mul_(1e4)
        return model
'''

ARCHITECTURES = '''
import torch

from pytest_advprune.data import DATASETS
from pytest_advprune.models import SmallCNN

INFO = DATASETS["fashion_mnist"]


class _Smoke(SmallCNN):
    def __init__(self):
        super().__init__(INFO.channels, INFO.size, INFO.n_classes, INFO.mean, INFO.std)


class Quantised(_Smoke):
    """Planted fault: inputs rounded to 8 grey levels with a plain round (zero input gradient)."""

    def forward(self, x):
        return super().forward(torch.round(x * 7) / 7)


class Randomised(_Smoke):
    """Planted fault: Gaussian noise, then 8-level rounding, in eval mode too (randomised discretisation)."""

    def forward(self, x):
        return super().forward(torch.round((x + 0.05 * torch.randn_like(x)).clamp(0, 1) * 7) / 7)
'''


@pytest.fixture(scope="module")
def pruned_state(dense_cache: Path) -> dict[str, torch.Tensor]:
    """The smoke dense model with 90% of its weights magnitude-pruned, as a plain state_dict."""
    session = AdvPruneSession(RunConfig(preset=presets.SMOKE, methods=[], cache_dir=str(dense_cache), device="cpu"))
    model = session.dense_model("cnn")
    apply_masks(model, make_masks(model, "weights", 0.9))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint(state: dict[str, torch.Tensor], folder: Path) -> Path:
    """``state`` saved as a plain checkpoint. Both forward faults share these weights: the cache
    tells them apart by their architecture's code (``AdvPruneSession.model_identity``)."""
    path = folder / "pruned90.pt"
    torch.save(state, path)
    return path


def assert_caught(advprune, cell: str, indicators: set[str]) -> dict:
    """The cell's accuracy checks pass (the fault fakes robustness), each of ``indicators`` fails
    with its message, and the report marks the cell FAIL with those indicators."""
    cases = advprune.cases()
    for test in ("test_sparsity", "test_clean_accuracy", "test_robust_accuracy"):
        assert cases[f"{test}[{cell}]"][0] == "passed", (test, cases[f"{test}[{cell}]"][1])
    failed = {name.rsplit("-", 1)[1].rstrip("]") for name, (outcome, _) in cases.items()
              if name.startswith(f"test_attack_indicator[{cell}-") and outcome == "failed"}
    assert indicators <= failed, failed
    rec = advprune.records()[cell]
    assert rec["status"] == "FAIL" and rec["passed"] is False
    for name in indicators:
        assert rec["indicators"][name]["passed"] is False
        assert rec["checks"][f"indicator:{name}"] == "failed"
    assert rec["indicators"]["robust_le_clean"]["passed"] is not None
    md = advprune.report_md.read_text().split("## Attack-failure indicators", 1)[1]
    assert f"`{cell.replace('fashion_mnist-', '')}` {sorted(indicators)[0]}:" in md
    return rec


def test_saturated_logits_are_caught_by_the_gradient_indicators(advprune, dense_cache):
    folder = advprune.write_methods(saturated=SATURATED)
    result = advprune.subprocess("--advprune-method=saturated", f"--advprune-methods-dir={folder}", "-k", "weights")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    rec = assert_caught(advprune, f"saturated-{CELL}", {"gradients", "loss_progress"})
    message = advprune.cases()[f"test_attack_indicator[saturated-{CELL}-gradients]"][1]
    assert "zero or non-finite input gradient" in message and "overstated" in message
    # PGD on the cross-entropy barely moves: its robust accuracy is close to the clean one
    assert rec["robust_acc"]["PGD-5"] >= rec["clean_acc"] - 0.05


def checkpoint_args(path: Path, arch: str, name: str) -> list[str]:
    return [f"--advprune-checkpoint={path}", f"--advprune-arch={arch}", "--advprune-dataset=fashion_mnist",
            "--advprune-structure=weights", "--advprune-sparsity=90", f"--advprune-name={name}", "--advprune-device=cpu"]


@pytest.mark.parametrize("fault, indicators", [
    ("Quantised", {"gradients", "loss_progress", "unbounded", "transfer"}),
    ("Randomised", {"deterministic"}),
], ids=["quantised", "randomised"])
def test_forward_faults_are_caught(advprune, pruned_state, fault, indicators):
    archs = advprune.pytester.path / "faults.py"
    archs.write_text(ARCHITECTURES)
    name, arch = fault.lower(), f"{archs}:{fault}"
    path = checkpoint(pruned_state, advprune.pytester.path)
    result = advprune.subprocess(*checkpoint_args(path, arch, name))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    cell = f"{name}-fashion_mnist-{arch}-weights-90"
    rec = assert_caught(advprune, cell, indicators)
    assert rec["robust_acc"]["PGD-5"] >= rec["clean_acc"] - 0.05
    if fault == "Randomised":
        message = advprune.cases()[f"test_attack_indicator[{cell}-deterministic]"][1]
        assert "random in eval mode" in message and "version='rand'" in message
