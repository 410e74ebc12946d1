"""Physical compaction of structured-pruned models (pytest_advprune/compact.py) and its measurements.

Models get random structured masks and random BatchNorm statistics and biases, so the zeroed
filters leave non-zero constants behind that the compaction has to fold. The real ResNet18 and
VGG16 are compacted once each per structure; the properties over many masks run on narrow
models built from the same blocks (fast).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
import torch.nn.functional as F

from pytest_advprune import compact, models, report
from pytest_advprune.compact import CompactionError, CompactionMismatch
from pytest_advprune.sparsity import (apply_masks, attach_score_masks, make_masks, measure, scaled_score_init,
                                      structured_layers)

ROOT = Path(__file__).resolve().parents[1]
MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def randomize_constants(model: nn.Module, seed: int, shift: float = 0.0) -> nn.Module:
    """Random BatchNorm statistics/affine and biases (``shift`` added to BN betas and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) + shift)
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g) + shift)
    return model.eval()


def mask_randomly(model: nn.Module, structure: str, sparsity: float, seed: int, scope: str = "local") -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    dim = 0 if structure == "filters" else 1
    scores = {n: torch.rand(m.weight.shape[dim], generator=g) for n, m in structured_layers(model, structure).items()}
    apply_masks(model, make_masks(model, structure, sparsity, scores=scores, scope=scope))
    return model


class TinyResNet(nn.Module):
    """ResNet18's stem and blocks at widths 4 and 8: identity and projection shortcuts, 3 classes."""

    def __init__(self):
        super().__init__()
        self.normalize = models.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(models._BasicBlock(4, 4, 1), models._BasicBlock(4, 4, 1))
        self.layer2 = nn.Sequential(models._BasicBlock(4, 8, 2), models._BasicBlock(8, 8, 1))
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer2(self.layer1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TinyVGG(nn.Module):
    """VGG16's layout (conv-BN-ReLU, max-pool, adaptive 2x2 pool, three linears) at widths 4 and 6."""

    def __init__(self):
        super().__init__()
        self.normalize = models.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(3, 4), *block(4, 4), nn.MaxPool2d(2), *block(4, 6), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(6 * 4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.pool(self.features(self.normalize(x))).flatten(1))


TINY = {"cnn": lambda: models.SmallCNN(1, 28, 10, (0.3,), (0.35,), widths=(4, 6), hidden=8),
        "resnet": TinyResNet, "vgg": TinyVGG}
TINY_SHAPE = {"cnn": MNIST, "resnet": (3, 16, 16), "vgg": (3, 16, 16)}


# ------------------------------------------------------------------ real architectures


@pytest.mark.parametrize("structure", ["filters", "channels"])
@pytest.mark.parametrize("arch, dataset, shape", [("cnn", "fashion_mnist", MNIST), ("resnet18", "cifar10", CIFAR),
                                                  ("vgg16", "cifar10", CIFAR)])
def test_compacted_model_gives_the_masked_outputs(arch, dataset, shape, structure):
    torch.manual_seed(0)
    masked = mask_randomly(randomize_constants(models.build(arch, dataset, 0), seed=1), structure, 0.75, seed=2)
    c = compact.compact(masked, shape)  # verified inside (float64, random inputs): raises on a mismatch
    assert c.max_abs_diff < 1e-4
    assert compact.count_params(c.model) < compact.count_params(masked)
    assert compact.count_flops(c.model, shape) < compact.count_flops(masked, shape)
    removed = c.removed_fraction(structure)
    assert 0 < removed <= 1
    if arch != "resnet18" and structure == "filters":  # no residual coupling: every zero filter goes but carriers
        units = sum(c.units_before[n][0] for n in c.counted["filters"])
        assert removed >= measure(masked, structure).sparsity - c.carriers / units
    assert all(not p.requires_grad for p in c.model.parameters()) and not c.model.training


def test_flops_counter_matches_a_hand_count_of_the_small_cnn():
    model = models.build("cnn", "fashion_mnist", 0)
    conv1, conv2 = 2 * 28 * 28 * 16 * 1 * 9, 2 * 14 * 14 * 32 * 16 * 9
    assert compact.count_flops(model, MNIST) == conv1 + conv2 + 2 * 1568 * 128 + 2 * 128 * 10


# ------------------------------------------------------------------ properties over masks


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(TINY)), structure=st.sampled_from(["filters", "channels"]),
       sparsity=st.floats(0.1, 0.9), scope=st.sampled_from(["local", "global"]), shift=st.sampled_from([-1.0, 0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_compaction_keeps_the_outputs_for_any_mask(arch, structure, sparsity, scope, shift, seed):
    torch.manual_seed(seed)
    masked = mask_randomly(randomize_constants(TINY[arch](), seed, shift), structure, sparsity, seed + 1, scope)
    c = compact.compact(masked, TINY_SHAPE[arch], seed=seed)
    compact.verify_same_outputs(masked, c.model, TINY_SHAPE[arch], n=3, seed=seed + 5)
    assert compact.count_params(c.model) <= compact.count_params(masked)


@settings(max_examples=25, deadline=None)
@given(zero=st.lists(st.lists(st.booleans(), min_size=8, max_size=8), min_size=4, max_size=4),
       structure=st.sampled_from(["filters", "channels"]), seed=st.integers(0, 2**16))
def test_small_cnn_loses_exactly_the_parameters_of_its_removable_units(zero, structure, seed):
    """Without constants (zero biases) the removable units are known: filters go when zero; in
    ``channels``, a unit goes when every weight reading it is zero. The parameter count follows."""
    torch.manual_seed(seed)
    m = TINY["cnn"]()  # conv1 1->4, conv2 4->6, fc1 6*49->8, fc2 8->10
    with torch.no_grad():
        for layer in (m.conv1, m.conv2, m.fc1, m.fc2):
            layer.bias.zero_()
        if structure == "filters":
            for layer, flags in ((m.conv1, zero[0][:4]), (m.conv2, zero[1][:6]), (m.fc1, zero[2])):
                layer.weight[torch.tensor(flags[:-1] + [False])] = 0  # never all of a layer
            k1 = 4 - sum(zero[0][:3])
            k2 = 6 - sum(zero[1][:5])
            k3 = 8 - sum(zero[2][:7])
        else:
            m.conv2.weight[:, torch.tensor(zero[0][:3] + [False])] = 0
            fc1 = m.fc1.weight.view(8, 6, 49)
            fc1[:, torch.tensor(zero[1][:5] + [False])] = 0
            fc1[:, :, torch.tensor(zero[3][:7] + [False] * 42)] = 0  # scattered zero columns do not free a channel
            m.fc2.weight[:, torch.tensor(zero[2][:7] + [False])] = 0
            k1, k2, k3 = 4 - sum(zero[0][:3]), 6 - sum(zero[1][:5]), 8 - sum(zero[2][:7])
    c = compact.compact(m.eval(), MNIST)
    expected = (k1 * 9 + k1) + (k2 * k1 * 9 + k2) + (k3 * k2 * 49 + k3) + (10 * k3 + 10)
    assert c.carriers == 0
    assert compact.count_params(c.model) == expected


# ------------------------------------------------------------------ failures are detected


def test_skipping_the_constant_folding_is_caught(monkeypatch):
    """Removing zero filters whose BatchNorm shift or bias still feeds the next layer changes the outputs."""
    masked = mask_randomly(randomize_constants(TINY["resnet"](), seed=3, shift=1.0), "filters", 0.5, seed=4)
    compact.compact(masked, TINY_SHAPE["resnet"])
    monkeypatch.setattr(compact, "_fold_constants", lambda folds: None)
    with pytest.raises(CompactionMismatch, match="differs from the masked model"):
        compact.compact(masked, TINY_SHAPE["resnet"])


def test_carrier_channels_are_needed_for_zero_padded_consumers(monkeypatch):
    """Folding a constant channel into the bias of a zero-padded convolution is wrong at the border."""
    masked = mask_randomly(randomize_constants(TINY["vgg"](), seed=5, shift=1.0), "filters", 0.5, seed=6)
    assert compact.compact(masked, TINY_SHAPE["vgg"]).carriers > 0
    monkeypatch.setattr(compact, "_zero_padded", lambda m: False)
    with pytest.raises(CompactionMismatch):
        compact.compact(masked, TINY_SHAPE["vgg"])


def test_verification_rejects_a_different_model():
    a = randomize_constants(TINY["cnn"](), seed=1)
    b = copy.deepcopy(a)
    assert compact.verify_same_outputs(a, b, MNIST) == 0
    with torch.no_grad():
        b.fc2.bias[0] += 1e-2
    with pytest.raises(CompactionMismatch, match="max \\|logit difference\\|"):
        compact.verify_same_outputs(a, b, MNIST)


def test_score_masked_model_is_refused_and_recorded_not_raised():
    m = TINY["cnn"]()
    attach_score_masks(m, 0.5, scaled_score_init)
    with pytest.raises(CompactionError, match="bake them"):
        compact.compact(m, MNIST)
    cost = compact.inference_cost(m, "filters", MNIST, "cpu")
    assert cost["latency_speedup"] is None and cost["params"] is None
    assert cost["inference"]["error"].startswith("not compacted: CompactionError")


# ------------------------------------------------------------------ measurements and wiring


def test_inference_cost_of_structured_and_unstructured_models():
    structured = mask_randomly(models.build("cnn", "fashion_mnist", 0), "filters", 0.5, seed=1)
    cost = compact.inference_cost(structured, "filters", MNIST, "cpu", batch=2, warmup=1, repeats=2)
    assert cost["params"] < cost["dense_params"] == compact.count_params(structured)
    assert cost["flops"] < cost["dense_flops"]
    assert cost["latency_speedup"] > 0 and cost["inference"]["device"] == "cpu"
    assert cost["inference"]["threads"] == torch.get_num_threads()
    assert 0.4 < cost["inference"]["removed_fraction"] <= 0.5

    unstructured = models.build("cnn", "fashion_mnist", 0)
    apply_masks(unstructured, make_masks(unstructured, "weights", 0.9))
    cost = compact.inference_cost(unstructured, "weights", MNIST, "cpu")
    zeros = measure(unstructured, "weights").n_zero_weights
    assert cost["params"] == compact.count_params(unstructured) - zeros
    assert cost["flops"] == cost["dense_flops"] and cost["latency_speedup"] is None
    assert "no physical speedup" in cost["inference"]["note"]


@pytest.mark.parametrize("structure", ["filters", "weights"])
def test_session_records_parameters_flops_and_speedup(tmp_path, structure):
    """A checkpoint cell goes through the session's build step; its record carries the measurements."""
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, CheckpointSpec, Cell, RunConfig, versions

    model = models.build("cnn", "fashion_mnist", 0)
    if structure == "filters":
        mask_randomly(model, "filters", 0.5, seed=1)
    else:
        apply_masks(model, make_masks(model, "weights", 0.5))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    spec = CheckpointSpec(str(tmp_path / "m.pt"), "cnn", "fashion_mnist", structure, 50)
    session = AdvPruneSession(RunConfig(presets.SMOKE, ["checkpoint"], device="cpu", cache_dir=str(tmp_path / "c"),
                                        checkpoint=spec))
    cell = Cell("checkpoint", "fashion_mnist", "cnn", structure, 50)
    res = session.result(cell, evaluated=False)
    assert res.error is None
    rec = report.make_record(cell, res, session, versions())
    assert {"params", "flops", "latency_speedup", "dense_params", "dense_flops", "inference"} <= set(rec)
    assert "torch-pruning" in rec["versions"]
    if structure == "filters":
        assert rec["params"] < rec["dense_params"] and rec["latency_speedup"] > 0
    else:
        assert rec["latency_speedup"] is None and rec["flops"] == rec["dense_flops"]


def test_detail_table_shows_the_measurements_and_a_compaction_failure():
    from tests.test_report import document, record, tables

    recs = [record("lwm", structure="filters", sparsity=50, params=2_934_101, flops=283_201_536, latency_speedup=3.4166,
                   dense_params=11_173_962, dense_flops=1_110_845_440, inference={"device": "cuda:0"}),
            record("pwoa", structure="filters", sparsity=50, params=None, flops=None, latency_speedup=None,
                   dense_params=11_173_962, dense_flops=1_110_845_440,
                   inference={"error": "not compacted: CompactionError: grouped convolution"})]
    detail = tables(report.render_markdown(document(recs)))["Cells in detail"]
    header, rows = detail[0], {r[0]: dict(zip(detail[0], r)) for r in detail[1:]}
    assert {"parameters", "FLOPs", "latency speedup"} <= set(header)
    ok, failed = rows["lwm-resnet18-filters-50"], rows["pwoa-resnet18-filters-50"]
    assert (ok["parameters"], ok["FLOPs"], ok["latency speedup"]) == ("2.93M / 11.2M", "283M / 1.11G", "3.42x (cuda:0)")
    assert failed["latency speedup"] == "–" and "not compacted: CompactionError" in failed["per attack (%)"]


def test_benchmark_smoke_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pruned_inference.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("headline: cnn at 90% filters") and last.endswith("(cpu, batch 4)")
    doc = (tmp_path / "pruned_inference_cpu.json").read_text()
    assert '"speedup"' in doc and '"versions"' in doc and '"peak_rss_mib"' in doc
