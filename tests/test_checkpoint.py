"""External pruned checkpoints: safe reading, folding of pruned formats, strict loading, and
``--advprune-checkpoint`` end to end.

Unit tests build small state_dicts in ``tmp_path``; the end-to-end tests save one model pruned by
this project (the smoke ``lwm`` cell, built in-process on the shared cache) in three formats and
check that the plugin judges and measures each exactly as it judged the in-process model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

# Imported before any pytester snapshot of sys.modules (see tests/test_plugin.py): modules first
# imported inside an in-process run would vanish from sys.modules afterwards.
import pytest_advprune.report  # noqa: F401
import pytest_advprune.session  # noqa: F401
from pytest_advprune import checkpoint as ckpt
from pytest_advprune import models, presets, registry
from pytest_advprune.attacks import AutoAttackSpec
from pytest_advprune.cache import weights_digest
from pytest_advprune.checkpoint import CheckpointError
from pytest_advprune.data import DATASETS
from pytest_advprune.errors import NonFiniteModel
from pytest_advprune.evaluate import evaluate
from pytest_advprune.indicators import NAMES as INDICATORS
from pytest_advprune.session import AdvPruneSession, Cell, CheckpointSpec, RunConfig, load_checkpoint_model
from pytest_advprune.sparsity import measure, prunable_layers

registry.load_builtin()

USAGE = pytest.ExitCode.USAGE_ERROR
MINE = Cell("mine", "fashion_mnist", "cnn", "weights", 90)
CHECKS = {"sparsity": "test_sparsity", "clean": "test_clean_accuracy", "robust": "test_robust_accuracy"}


def case_name(kind: str) -> str:
    """The JUnit test name of a session check kind (``sparsity``, ..., ``indicator:<name>``) of the MINE cell."""
    if kind.startswith("indicator:"):
        return f"test_attack_indicator[{MINE.id}-{kind.split(':', 1)[1]}]"
    return f"{CHECKS[kind]}[{MINE.id}]"


def cnn(seed: int = 0) -> nn.Module:
    return models.build("cnn", "fashion_mnist", seed)


def plain(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def assert_one_line_about(exc: BaseException, path: Path) -> str:
    """The error is one line, names the file, and never tells the user to turn the safety off."""
    msg = str(exc)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert "weights_only" not in msg and "can still be loaded" not in msg, f"suggests unsafe loading: {msg}"
    return msg


def spec(path: Path, arch: str = "cnn", sparsity: int = 90, normalization: str = "model") -> CheckpointSpec:
    return CheckpointSpec(str(path), arch, "fashion_mnist", "weights", sparsity, "mine", normalization)


# ================================================================== read_state_dict


def test_plain_state_dict_is_read_as_is(tmp_path):
    state = cnn().state_dict()
    torch.save(state, tmp_path / "plain.pt")
    got = ckpt.read_state_dict(tmp_path / "plain.pt")
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 12, "arch": "cnn"},
    lambda sd: {"net": sd, "acc": 81.5},
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    lambda sd: {"model": {"state_dict": sd}},
], ids=["state_dict", "net", "model", "model-state_dict"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
    state = cnn().state_dict()
    torch.save(wrap(state), tmp_path / "wrapped.pt")
    got = ckpt.read_state_dict(tmp_path / "wrapped.pt")
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_wrapper_with_tensor_metadata_still_yields_the_state_dict(tmp_path):
    # Training scripts (HYDRA's among them) save {'epoch', 'state_dict', 'best_prec1', 'optimizer'}
    # where best_prec1 is a 0-d tensor: the wrapper must not be taken for the state_dict itself.
    state = cnn().state_dict()
    torch.save({"epoch": 20, "state_dict": state, "best_prec1": torch.tensor(51.3)}, tmp_path / "hydra.pth.tar")
    got = ckpt.read_state_dict(tmp_path / "hydra.pth.tar")
    assert set(got) == set(state)


def test_module_prefixes_are_stripped(tmp_path):
    state = cnn(seed=3).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pt")
    folded = ckpt.fold(ckpt.read_state_dict(tmp_path / "dp.pt"))
    assert list(folded) == list(state)
    model = load_checkpoint_model(spec(tmp_path / "dp.pt"))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_safetensors_is_read(tmp_path):
    from safetensors.torch import save_file

    state = cnn(seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    got = ckpt.read_state_dict(tmp_path / "m.safetensors")
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def _real_bytes(tmp_path: Path, legacy: bool = False) -> bytes:
    path = tmp_path / "real.pt"
    torch.save(cnn().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


BROKEN = {
    "empty": lambda tp: b"",
    "truncated-half": lambda tp: _real_bytes(tp)[: len(_real_bytes(tp)) // 2],
    "truncated-tail": lambda tp: _real_bytes(tp)[:-100],
    "truncated-head": lambda tp: _real_bytes(tp)[:64],
    "truncated-legacy": lambda tp: _real_bytes(tp, legacy=True)[: len(_real_bytes(tp, legacy=True)) // 2],
    "html": lambda tp: b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Google Drive</body></html>\n",
    "html-after-blank-lines": lambda tp: b"\n\n  <html><body>404 Not Found</body></html>",
    "plain-text": lambda tp: b"hello world, this is not a checkpoint\n",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_unreadable_files_raise_one_line_checkpoint_error(tmp_path, kind):
    path = tmp_path / "ckpt" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(BROKEN[kind](tmp_path))
    with pytest.raises(CheckpointError) as info:
        ckpt.read_state_dict(path)
    msg = assert_one_line_about(info.value, path)
    if kind == "empty":
        assert "empty" in msg
    if kind.startswith("html"):
        assert "HTML" in msg
    if kind.startswith("truncated"):
        assert "truncated or corrupt" in msg
    if kind == "plain-text":
        assert "neither a torch checkpoint nor safetensors (it starts with b'hello world, thi')" in msg


def test_truncated_safetensors_raises_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in cnn().state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as info:
        ckpt.read_state_dict(path)
    assert_one_line_about(info.value, path)


def test_a_safetensors_file_without_its_suffix_is_named_as_such(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.pt"
    save_file({k: v.contiguous() for k, v in cnn().state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="this is a safetensors file; rename it to end in .safetensors"):
        ckpt.read_state_dict(path)
    path.rename(tmp_path / "m.safetensors")
    assert set(ckpt.read_state_dict(tmp_path / "m.safetensors")) == set(cnn().state_dict())


def test_missing_path_raises_checkpoint_error(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(CheckpointError) as info:
        ckpt.read_state_dict(path)
    assert "no such file" in assert_one_line_about(info.value, path)


class _System:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    """Unpickling this runs Python code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def malicious(path: Path, marker: Path, payload=_System, legacy: bool = False) -> Path:
    obj = {"conv1.weight": torch.zeros(16, 1, 3, 3), "hook": payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("payload", [_System, _Exec], ids=["os.system", "exec"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload, legacy):
    # The payload is live: loaded unsafely, it creates its marker.
    probe = tmp_path / "probe-marker"
    torch.load(malicious(tmp_path / "probe.pt", probe, payload, legacy), weights_only=False)
    assert probe.exists(), "the test's payload does not execute; the test would prove nothing"

    marker = tmp_path / "pwned"
    path = malicious(tmp_path / "evil.pt", marker, payload, legacy)
    with pytest.raises(CheckpointError) as info:
        ckpt.read_state_dict(path)
    assert not marker.exists(), "the checkpoint's code ran"
    msg = assert_one_line_about(info.value, path)
    assert "refused" in msg


# ================================================================== fold


def _no_zeros(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p[p == 0] = 1e-3
    return model


def test_fold_torch_prune_reparametrisation(tmp_path):
    model = _no_zeros(cnn())
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)
    prune.l1_unstructured(model.fc1, "weight", amount=0.9)
    prune.random_unstructured(model.fc2, "bias", amount=0.3)
    state = model.state_dict()
    assert {"conv1.weight_orig", "conv1.weight_mask", "fc1.weight_mask", "fc2.bias_orig"} <= set(state)
    torch.save(state, tmp_path / "tp.pt")

    folded = ckpt.fold(ckpt.read_state_dict(tmp_path / "tp.pt"))
    assert set(folded) == set(cnn().state_dict())
    for layer, param in (("conv1", "weight"), ("fc1", "weight"), ("fc2", "bias")):
        orig, mask = state[f"{layer}.{param}_orig"], state[f"{layer}.{param}_mask"]
        got = folded[f"{layer}.{param}"]
        assert torch.equal(got, orig * mask)
        assert int((got == 0).sum()) == int((mask == 0).sum()) > 0
    assert int((folded["fc1.weight"] == 0).sum()) == round(0.9 * folded["fc1.weight"].numel())
    assert torch.equal(folded["conv2.weight"], state["conv2.weight"])  # unpruned layer untouched
    loaded = load_checkpoint_model(spec(tmp_path / "tp.pt"))
    assert measure(loaded, "weights").per_layer["fc1"] == (round(0.9 * 200704), 200704)


def test_fold_loose_mask_buffers():
    state = plain(_no_zeros(cnn()).state_dict())
    gen = torch.Generator().manual_seed(0)
    conv_mask = (torch.rand(state["conv2.weight"].shape, generator=gen) > 0.7).float()
    fc_mask = (torch.rand(state["fc1.weight"].shape, generator=gen) > 0.2).float()
    folded = ckpt.fold({**state, "conv2.mask": conv_mask, "fc1.weight_mask": fc_mask})
    assert set(folded) == set(state)
    assert torch.equal(folded["conv2.weight"], state["conv2.weight"] * conv_mask)
    assert torch.equal(folded["fc1.weight"], state["fc1.weight"] * fc_mask)
    assert int((folded["conv2.weight"] == 0).sum()) == int((conv_mask == 0).sum())
    assert torch.equal(folded["conv1.weight"], state["conv1.weight"])


def score_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """HYDRA's SubnetConv/SubnetLinear layout: dense ``weight`` plus ``popup_scores`` of its shape."""
    gen = torch.Generator().manual_seed(seed)
    state = plain(model.state_dict())
    for name, layer in prunable_layers(model).items():
        state[f"{name}.popup_scores"] = torch.randn(layer.weight.shape, generator=gen)
    return state


def top_k_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = scores.numel() - round(sparsity * scores.numel())
    keep = torch.zeros(scores.numel())
    keep[scores.abs().flatten().argsort(descending=True)[:k]] = 1
    return keep.view_as(scores)


@pytest.mark.parametrize("sparsity", [0.9, 0.5])
def test_fold_hydra_scores_keeps_top_k_per_layer(tmp_path, sparsity):
    model = _no_zeros(cnn())
    state = score_state(model)
    assert measure(model, "weights").sparsity == 0.0  # the dense weights alone claim nothing
    torch.save(state, tmp_path / "hydra.pt")
    folded = ckpt.fold(ckpt.read_state_dict(tmp_path / "hydra.pt"), sparsity)
    assert not any(k.endswith("popup_scores") for k in folded)
    for name in prunable_layers(model):
        w, s = state[f"{name}.weight"], state[f"{name}.popup_scores"]
        assert torch.equal(folded[f"{name}.weight"], w * top_k_mask(s, sparsity)), name  # top |score|, sign ignored
        assert int((folded[f"{name}.weight"] == 0).sum()) == round(sparsity * w.numel()), name
    loaded = load_checkpoint_model(spec(tmp_path / "hydra.pt", sparsity=round(100 * sparsity)))
    report = measure(loaded, "weights")
    assert report.sparsity == pytest.approx(sparsity, abs=1e-4)
    assert all(z == round(sparsity * t) for z, t in report.per_layer.values())


def test_fold_scores_without_sparsity_is_an_error():
    with pytest.raises(CheckpointError, match="sparsity"):
        ckpt.fold(score_state(cnn()), None)


@pytest.mark.parametrize("dtype, tiny", [(torch.float16, 6e-8), (torch.bfloat16, 1e-30)], ids=["fp16", "bf16"])
def test_half_precision_is_widened_exactly(tmp_path, dtype, tiny):
    state = plain(_no_zeros(cnn()).state_dict())
    for v in state.values():
        v[v.abs() < 1e-4] = 1e-3  # nothing that fp16 would flush to zero by itself
    w = state["fc1.weight"]
    w.view(-1)[::3] = 0.0
    w.view(-1)[1::3] = tiny  # subnormal in fp16: a weight, not a zero
    half = {k: v.to(dtype) for k, v in state.items()}
    assert half["fc1.weight"].view(-1)[1].item() != 0
    n_zero = int((half["fc1.weight"] == 0).sum())
    assert n_zero == len(range(0, w.numel(), 3))

    folded = ckpt.fold(half)
    assert all(v.dtype == torch.float32 for v in folded.values())
    assert int((folded["fc1.weight"] == 0).sum()) == n_zero
    assert torch.equal(folded["fc1.weight"], half["fc1.weight"].float())

    torch.save(half, tmp_path / "half.pt")
    model = load_checkpoint_model(spec(tmp_path / "half.pt"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert measure(model, "weights").per_layer["fc1"][0] == n_zero
    assert model.fc1.weight.view(-1)[1].item() == pytest.approx(half["fc1.weight"].view(-1)[1].item(), rel=1e-6)


def test_half_precision_torch_prune_checkpoint_keeps_its_zeros():
    model = _no_zeros(cnn())
    prune.l1_unstructured(model.fc1, "weight", amount=0.9)
    state = {k: v.half() for k, v in model.state_dict().items()}
    folded = ckpt.fold(state)
    assert folded["fc1.weight"].dtype == torch.float32
    assert int((folded["fc1.weight"] == 0).sum()) == round(0.9 * 200704)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected_naming_the_tensor(tmp_path, bad):
    state = plain(cnn().state_dict())
    ckpt.check_finite_state(state, "ok.pt")  # finite: no error
    state["conv2.weight"].view(-1)[7] = bad
    with pytest.raises(NonFiniteModel, match=r"'conv2\.weight'.*NaN or inf") as info:
        ckpt.check_finite_state(state, tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in str(info.value)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(NonFiniteModel, match=r"conv2\.weight"):
        load_checkpoint_model(spec(tmp_path / "bad.pt"))


# ================================================================== load_into


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_into_lists_every_mismatch_and_loads_nothing():
    model = cnn(seed=0)
    before = _params(model)
    state = plain(cnn(seed=1).state_dict())
    del state["fc2.bias"]
    state["head.weight"] = torch.zeros(3)
    state["fc1.weight"] = torch.zeros(64, 1568)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_into(model, state, "theirs.pt")
    msg = str(info.value)
    assert "theirs.pt" in msg and "\n" not in msg
    assert "missing fc2.bias" in msg
    assert "unexpected head.weight" in msg
    assert "shape mismatch fc1.weight (64, 1568) vs (128, 1568)" in msg
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "the model was partly loaded"


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_load_into_any_single_mismatch_is_an_error(change):
    model = cnn(seed=0)
    before = _params(model)
    state = plain(cnn(seed=1).state_dict())
    if change == "missing":
        del state["conv1.bias"]
    elif change == "unexpected":
        state["conv1.weight_extra"] = torch.ones(1)
    else:
        state["fc2.weight"] = torch.zeros(5, 128)
    with pytest.raises(CheckpointError, match=change.replace("shape", "shape mismatch")):
        ckpt.load_into(model, state, "x.pt")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_load_into_a_fitting_state_loads_every_tensor():
    model = cnn(seed=0)
    state = {k: v.double() if v.is_floating_point() else v for k, v in cnn(seed=1).state_dict().items()}
    ckpt.load_into(model, state, "x.pt")
    assert all(torch.equal(model.state_dict()[k], state[k].float()) for k in state)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ================================================================== load_checkpoint_model


def test_registered_arch_keeps_the_checkpoint_normalisation(tmp_path):
    model = _no_zeros(cnn(seed=2))
    with torch.no_grad():
        model.normalize.mean.fill_(0.5)
        model.normalize.std.fill_(0.25)
    torch.save(model.state_dict(), tmp_path / "own.pt")
    for normalization in ("model", "dataset"):
        loaded = load_checkpoint_model(spec(tmp_path / "own.pt", normalization=normalization))
        assert loaded.normalize.mean.flatten().tolist() == [0.5]
        assert loaded.normalize.std.flatten().tolist() == [0.25]
        assert not loaded.training
        x = torch.rand(4, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("normalization", ["model", "dataset"])
def test_registered_arch_without_normalize_keys(tmp_path, normalization):
    model = _no_zeros(cnn(seed=2))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    torch.save(state, tmp_path / "foreign.pt")
    loaded = load_checkpoint_model(spec(tmp_path / "foreign.pt", normalization=normalization))
    info = DATASETS["fashion_mnist"]
    mean, std = ((0.0,), (1.0,)) if normalization == "model" else (info.mean, info.std)
    assert loaded.normalize.mean.flatten().tolist() == pytest.approx(list(mean))
    assert loaded.normalize.std.flatten().tolist() == pytest.approx(list(std))
    reference = cnn(seed=9)
    reference.load_state_dict({**state, "normalize.mean": torch.tensor(mean).view(1, -1, 1, 1),
                               "normalize.std": torch.tensor(std).view(1, -1, 1, 1)})
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.eval()(x))


USER_ARCH = '''
import torch
from torch import nn
import torch.nn.functional as F


class TupleNet(nn.Module):
    """Returns (logits, features), as many research models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        f = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4).flatten(1)
        return self.fc(f), f
'''


@pytest.fixture
def user_arch(tmp_path):
    """``(arch spec, the saved model, checkpoint path)``: a TupleNet with BatchNorm, saved in train mode
    after a few training-mode forwards (so its running statistics are not the initial 0/1)."""
    import importlib.util

    file = tmp_path / "archs" / "tuple_net.py"
    file.parent.mkdir()
    file.write_text(USER_ARCH)
    mod_spec = importlib.util.spec_from_file_location("advprune_test_tuple_net", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.TupleNet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 28, 28))
    torch.save(model.state_dict(), tmp_path / "user.pt")
    return f"{file}:TupleNet", model, tmp_path / "user.pt"


@pytest.mark.parametrize("normalization", ["model", "dataset"])
def test_user_architecture_returning_a_tuple_is_wrapped_to_logits(user_arch, normalization):
    arch, saved, path = user_arch
    loaded = load_checkpoint_model(spec(path, arch=arch, normalization=normalization))
    x = torch.rand(8, 1, 28, 28)
    info = DATASETS["fashion_mnist"]
    inputs = x if normalization == "model" else (x - info.mean[0]) / info.std[0]
    with torch.no_grad():
        out = loaded(x)
        expected, _ = saved.eval()(inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 10)
    assert torch.allclose(out, expected, atol=1e-5)


def test_user_architecture_in_train_mode_comes_back_in_eval_mode_and_evaluation_keeps_bn_stats(user_arch):
    arch, saved, path = user_arch
    loaded = load_checkpoint_model(spec(path, arch=arch))
    assert not any(m.training for m in loaded.modules()), "a module is still in train mode"
    bn = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert torch.equal(bn.running_mean, saved.bn.running_mean)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    tiny = dataclasses.replace(presets.SMOKE, n_eval=16, pgd_steps=2,
                               autoattack=AutoAttackSpec(version="custom", attacks=("apgd-ce",), apgd_iters=3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    ev = evaluate(loaded, x, y, tiny, torch.device("cpu"))
    assert ev.clean.n == 16
    after = bn.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]), f"evaluation changed BatchNorm {k}"


def test_user_architecture_spec_errors(tmp_path, user_arch):
    arch, _, path = user_arch
    file = arch.rpartition(":")[0]
    with pytest.raises(CheckpointError, match="defines no Missing"):
        load_checkpoint_model(spec(path, arch=f"{file}:Missing"))
    with pytest.raises(CheckpointError, match="no such file .*absent.py; give the path of the Python file"):
        load_checkpoint_model(spec(path, arch=f"{tmp_path / 'absent.py'}:TupleNet"))
    with pytest.raises(CheckpointError, match="expected a registered name or path/to/file.py:ClassName"):
        load_checkpoint_model(spec(path, arch=":TupleNet"))


def test_model_identity_tells_user_architectures_apart_by_their_code(tmp_path, user_arch):
    arch, _, path = user_arch
    file = Path(arch.rpartition(":")[0])
    session = AdvPruneSession(RunConfig(presets.SMOKE, [], cache_dir=str(tmp_path / "cache"), device="cpu"))
    model = load_checkpoint_model(spec(path, arch=arch))
    identity = session.model_identity(model, arch)
    renamed = file.with_name("renamed.py")
    renamed.write_text(file.read_text())
    assert session.model_identity(model, f"{renamed}:TupleNet") == identity, "moving the file keeps the key"
    assert session.model_identity(model, f"{file}:Other") != identity, "same weights, another class"
    file.write_text(file.read_text() + "\n# edited forward\n")
    assert session.model_identity(model, arch) != identity, "same weights, edited code"
    assert session.eval_key(identity) != session.eval_key(session.model_identity(model, arch))
    built_in = cnn()
    assert session.model_identity(built_in, "cnn") == weights_digest(built_in)


# ================================================================== end to end: --advprune-checkpoint


@pytest.fixture(scope="module")
def own_pruned(dense_cache, tmp_path_factory):
    """The smoke ``lwm`` cell built in-process on the shared cache: its model, its dense parent,
    its measured sparsity, evaluation and verdicts, and a folder to save checkpoints in."""
    session = AdvPruneSession(RunConfig(presets.SMOKE, ["lwm"], device="cpu", cache_dir=str(dense_cache)))
    cell = Cell("lwm", "fashion_mnist", "cnn", "weights", 90)
    res = session.result(cell)
    assert res.error is None, res.error
    verdicts = {kind: session.check(cell, kind).passed for kind in [*CHECKS, *(f"indicator:{n}" for n in INDICATORS)]}
    model = res.model.cpu().eval()
    for name, (zeros, total) in measure(model, "weights").per_layer.items():
        assert zeros == round(0.9 * total), f"lwm's {name} is not at 90%: HYDRA scores could not reproduce it"
    return SimpleNamespace(model=model, dense=session.dense_model("cnn").cpu(), sparsity=res.sparsity,
                           evaluation=res.evaluation, verdicts=verdicts, folder=tmp_path_factory.mktemp("ckpt"))


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (m.weight != 0).float() for n, m in prunable_layers(model).items()}


def _as_torch_prune(own) -> dict[str, torch.Tensor]:
    """The pruned model as torch.nn.utils.prune leaves it: dense ``weight_orig`` (the dense parent's
    values where pruned) and ``weight_mask``."""
    model = cnn()
    model.load_state_dict(own.model.state_dict())
    dense = prunable_layers(own.dense)
    for name, layer in prunable_layers(model).items():
        mask = (layer.weight != 0).float()
        with torch.no_grad():
            layer.weight.copy_(torch.where(mask.bool(), layer.weight, dense[name].weight))
        prune.custom_from_mask(layer, "weight", mask)
    state = model.state_dict()
    assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("weight_mask") for k in state)
    return state


def _as_hydra_scores(own) -> dict[str, torch.Tensor]:
    """Dense weights (the parent's where pruned) and ``popup_scores`` whose per-layer top-k |score| is the mask."""
    gen = torch.Generator().manual_seed(1)
    state = plain(own.model.state_dict())
    dense = prunable_layers(own.dense)
    for name, mask in _masks(own.model).items():
        state[f"{name}.weight"] = torch.where(mask.bool(), state[f"{name}.weight"], dense[name].weight.detach())
        magnitude = torch.where(mask.bool(), 1 + torch.rand(mask.shape, generator=gen),
                                0.5 * torch.rand(mask.shape, generator=gen))
        sign = torch.where(torch.rand(mask.shape, generator=gen) < 0.5, -1.0, 1.0)
        state[f"{name}.popup_scores"] = magnitude * sign
    assert measure_state_zeros(state) < 0.01  # the weights alone are dense
    return state


def measure_state_zeros(state: dict[str, torch.Tensor]) -> float:
    ws = [v for k, v in state.items() if k.endswith(".weight")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


FORMATS = {
    "own-state_dict": lambda own: plain(own.model.state_dict()),
    "torch-prune": _as_torch_prune,
    "hydra-scores": _as_hydra_scores,
}


def checkpoint_args(path: Path, sparsity: str = "90", *extra: str) -> list[str]:
    return [f"--advprune-checkpoint={path}", "--advprune-arch=cnn", "--advprune-dataset=fashion_mnist",
            "--advprune-structure=weights", f"--advprune-sparsity={sparsity}", "--advprune-name=mine",
            "--advprune-device=cpu", *extra]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoint_formats_match_the_in_process_model(advprune, own_pruned, fmt):
    path = own_pruned.folder / f"{fmt}.pt"
    torch.save(FORMATS[fmt](own_pruned), path)
    result = advprune.subprocess(*checkpoint_args(path))
    cases = advprune.cases()
    expected = {case_name(k): {True: "passed", False: "failed", None: "skipped"}[v] for k, v in own_pruned.verdicts.items()}
    assert {k: v[0] for k, v in cases.items()} == expected, result.stdout.str()
    assert result.ret == (1 if False in own_pruned.verdicts.values() else 0)

    rec = advprune.records()[MINE.id]
    assert rec["method"] == "mine" and rec["target_sparsity"] == 0.9
    ev = own_pruned.evaluation
    assert rec["achieved_sparsity"] == own_pruned.sparsity.sparsity
    assert rec["per_layer"] == {k: list(v) for k, v in own_pruned.sparsity.per_layer.items()}
    assert rec["clean_acc"] == ev.clean.acc
    assert rec["robust_acc"] == {"worst_case": ev.robust.acc, **{k: a.acc for k, a in ev.attacks.items()}}
    assert rec["per_point"] == {"clean": ev.clean.flags, "robust": ev.robust.flags}


def test_checkpoint_whose_sparsity_regrew_fails_the_sparsity_check(advprune, own_pruned):
    state = plain(own_pruned.model.state_dict())
    gen = torch.Generator().manual_seed(0)
    for name in prunable_layers(own_pruned.model):
        w = state[f"{name}.weight"]
        regrow = (w == 0) & (torch.rand(w.shape, generator=gen) < 4 / 9)  # 90% zeros -> about 50%
        w[regrow] = 1e-3 * torch.randn(int(regrow.sum()), generator=gen)
    path = own_pruned.folder / "regrown.pt"
    torch.save(state, path)
    result = advprune.inprocess(*checkpoint_args(path), "-k", "test_sparsity")
    outcome, message = advprune.cases()[f"test_sparsity[{MINE.id}]"]
    assert outcome == "failed", message
    assert "vs target 90%" in message
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    rec = advprune.records()[MINE.id]
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rec["status"] == "FAIL"


def test_malicious_checkpoint_fails_the_run_and_nothing_runs(advprune, tmp_path):
    marker = tmp_path / "pwned"
    path = malicious(tmp_path / "evil.pt", marker)
    result = advprune.inprocess(*checkpoint_args(path))
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    cases = advprune.cases()
    assert set(cases) == {case_name(k) for k in [*CHECKS, *(f"indicator:{n}" for n in INDICATORS)]}
    for name, (outcome, message) in cases.items():
        assert outcome == "failed", name
        assert "refused" in message and str(path) in message, message
    rec = advprune.records()[MINE.id]
    assert rec["status"] == "ERROR"
    assert "refused" in rec["error"] and str(path) in rec["error"] and "\n" not in rec["error"]


USAGE_CASES = {
    "no-arch": (["--advprune-checkpoint=m.pt", "--advprune-dataset=fashion_mnist", "--advprune-sparsity=90"],
                "--advprune-arch"),
    "unknown-arch": (checkpoint_args(Path("m.pt")) + ["--advprune-arch=mlp"],
                     "--advprune-arch=mlp: not an architecture; use one of cnn, resnet18, vgg16 or path/to/file.py:ClassName"),
    "arch-file-missing": (checkpoint_args(Path("m.pt")) + ["--advprune-arch=absent.py:Net"],
                          "--advprune-arch=absent.py:Net: no such file absent.py; give the path of the Python file"),
    "arch-without-file": (checkpoint_args(Path("m.pt")) + ["--advprune-arch=:Net"],
                          "--advprune-arch=:Net: no such file (empty)"),
    "no-sparsity": (["--advprune-checkpoint=m.pt", "--advprune-arch=cnn", "--advprune-dataset=fashion_mnist"],
                    "--advprune-sparsity"),
    "sparsity-word": (checkpoint_args(Path("m.pt"), "ninety"), "--advprune-sparsity=ninety"),
    "sparsity-150": (checkpoint_args(Path("m.pt"), "150"), "--advprune-sparsity=150"),
    "sparsity-0": (checkpoint_args(Path("m.pt"), "0"), "--advprune-sparsity=0"),
    "sparsity-fraction": (checkpoint_args(Path("m.pt"), "0.9"), "--advprune-sparsity=0.9: give the claimed sparsity as a "
                                                                "whole percentage from 1 to 99"),
    "no-dataset": (["--advprune-checkpoint=m.pt", "--advprune-arch=cnn", "--advprune-sparsity=90"],
                   "--advprune-dataset"),
    "dataset-vs-preset": (checkpoint_args(Path("m.pt")) + ["--advprune-dataset=cifar10"], "does not match preset smoke"),
    "missing-file": (checkpoint_args(Path("absent.pt")), "--advprune-checkpoint=absent.pt: no such file"),
    "with-a-method": (["--advprune-checkpoint=m.pt", "--advprune-method=hydra"],
                      "--advprune-checkpoint evaluates one model: drop --advprune-method"),
    "name-of-a-method": (checkpoint_args(Path("m.pt"), "90", "--advprune-name=hydra"),
                         "--advprune-name=hydra is a registered method; the checkpoint's row would replace that method's"),
    "name-breaking-tables": (checkpoint_args(Path("m.pt"), "90", "--advprune-name=my|name"),
                             "--advprune-name=my|name: use letters, digits and _ . + -"),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_checkpoint_usage_errors(advprune, case):
    args, needle = USAGE_CASES[case]
    (advprune.pytester.path / "m.pt").write_bytes(b"")  # exists: each case is refused for its own reason
    result = advprune.inprocess(*args)
    assert result.ret == USAGE, result.stdout.str() + result.stderr.str()
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ") and needle in errors[0], errors
    assert not (advprune.pytester.path / "reports").exists()


def test_checkpoint_dataset_against_an_explicit_preset_of_another_dataset(advprune):
    (advprune.pytester.path / "m.pt").write_bytes(b"")
    result = advprune.inprocess(*checkpoint_args(Path("m.pt")), "--advprune-preset=cifar10", preset=False)
    assert result.ret == USAGE
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and "--advprune-dataset=fashion_mnist does not match preset cifar10" in errors[0], errors
