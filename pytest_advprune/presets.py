"""Presets: frozen, typed descriptions of one benchmark protocol, printed in every report header.

A preset fixes the dataset, architectures, sparsity grid, training budgets, the attack suite
and the pass/fail floors. Nothing about a run's protocol depends on the device, so CPU and GPU
results of one preset are comparable. Sparsities are integer percents here; accuracies and
the sparsity tolerance are fractions in [0, 1]; eps is in [0, 1] pixel scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .attacks import AutoAttackSpec
from .errors import BadOption
from .fmn import FMNSpec
from .training import TrainSpec


@dataclass(frozen=True)
class Floors:
    """Pass/fail thresholds. ``rows``: ``(structure, sparsity %, min clean acc, min robust acc)``;
    ``structured`` covers both ``filters`` and ``channels``; ``dense`` is the reference model.
    ``sparsity_tol``: how far (fraction) below its target a measured sparsity may fall."""

    sparsity_tol: float
    rows: tuple[tuple[str, int, float, float], ...]
    derivation: str

    def for_cell(self, structure: str, sparsity: int) -> tuple[float, float]:
        """``(min clean, min robust)`` for a cell; an off-grid sparsity (an external checkpoint's)
        takes the row of the nearest grid sparsity of its kind. Raises KeyError for an unknown kind."""
        kind = "structured" if structure in ("filters", "channels") else structure
        rows = [r for r in self.rows if r[0] == kind]
        if not rows:
            raise KeyError(f"no floor for {structure}")
        _, _, clean, robust = min(rows, key=lambda r: (abs(r[1] - sparsity), r[1]))
        return clean, robust


@dataclass(frozen=True)
class Preset:
    """One benchmark protocol (see module docstring for units)."""

    name: str
    description: str
    dataset: str
    archs: tuple[str, ...]
    n_train: int | None
    n_eval: int
    eps: float
    seed: int
    weights_sparsities: tuple[int, ...]
    structured_sparsities: tuple[int, ...]
    dense_train: TrainSpec
    prune_train: TrainSpec
    finetune: TrainSpec
    autoattack: AutoAttackSpec
    pgd_steps: int
    eval_batch: int
    floors: Floors
    needs_gpu: bool = False
    attack_choice: str = ""
    fmn: FMNSpec | None = None

    def fingerprint(self, *fields: str) -> str:
        """sha256 of the named fields (all fields if none), for cache keys."""
        data = dataclasses.asdict(self)
        if fields:
            data = {f: data[f] for f in fields}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def header(self) -> dict[str, str]:
        """The protocol as printable key/value pairs (report header, pytest header)."""
        return {
            "preset": self.name,
            "dataset": self.dataset,
            "architectures": ", ".join(self.archs),
            "train points": "all" if self.n_train is None else str(self.n_train),
            "eval points": f"first {self.n_eval} of the test split",
            "threat model": f"Linf, eps = {self.eps:.4g}",
            "attacks": f"{self.autoattack.label()}; PGD-{self.pgd_steps} reported beside it",
            "dense pretraining": self.dense_train.label(),
            "prune phase budget": self.prune_train.label(),
            "fine-tune budget": self.finetune.label(),
            "sparsities": f"weights {self.weights_sparsities}, structured {self.structured_sparsities} (percent)",
            "seed": str(self.seed),
            **({"minimum-norm attack": self.fmn.label()} if self.fmn else {}),
        }


_FMNIST_EPS = 0.1
# FMN step sizes per (norm, optimiser). SGD moves step_size in L2 along the L2-normalised gradient,
# Adam about step_size per pixel; the pairs bracket what worked on the quick dense model (median
# distance on 64 held-out test points, 50 steps): Linf SGD 1-10, Adam 0.01-0.03; L2 SGD 1-4, Adam 0.02-0.05.
_FMNIST_STEPS = (("linf", "sgd", (1.0, 10.0)), ("linf", "adam", (0.01, 0.03)),
                 ("l2", "sgd", (1.0, 4.0)), ("l2", "adam", (0.02, 0.05)))

SMOKE = Preset(
    name="smoke",
    description="Seconds on CPU, for the project's own tests: 3000 Fashion-MNIST images, one short epoch, a "
    "handful of attack iterations. Real but tiny; floors tell a working method from a broken one.",
    dataset="fashion_mnist",
    archs=("cnn",),
    n_train=3000,
    n_eval=200,
    eps=_FMNIST_EPS,
    seed=0,
    weights_sparsities=(90,),
    structured_sparsities=(50,),
    dense_train=TrainSpec(epochs=3, lr=0.05, batch_size=64, eps=_FMNIST_EPS),
    prune_train=TrainSpec(epochs=1, lr=0.05, batch_size=64, eps=_FMNIST_EPS),
    finetune=TrainSpec(epochs=1, lr=0.01, batch_size=64, eps=_FMNIST_EPS),
    autoattack=AutoAttackSpec(version="custom", attacks=("apgd-ce", "apgd-t"), apgd_iters=10, n_target_classes=1),
    pgd_steps=5,
    eval_batch=200,
    floors=Floors(
        sparsity_tol=0.01,
        rows=(("dense", 0, 0.55, 0.30), ("weights", 90, 0.50, 0.25), ("structured", 50, 0.45, 0.20)),
        derivation="smoke dense model measured at about 70% clean / 45-50% robust on its 200 points; floors sit "
        "about 15-25 points below, far above what a collapsed model (about 10% / 0%) reaches.",
    ),
    attack_choice="smoke runs a tiny APGD-CE + APGD-T budget; its robust numbers are not comparable with quick.",
    # 20 steps, and tuning at the same 20: at 10 steps (tuning at 5) the tuner chose the configuration that
    # finds any adversarial example first (SGD, median Linf distance 0.80) and FMN-Linf broke no point of the
    # dense model at eps 0.1; at 20/20 it chooses Adam 0.03 and leaves 57.5% robust where AutoAttack leaves 56%.
    fmn=FMNSpec(steps=20, tune_steps=20, tune_points=8, tune_split="test", losses=("logit",), schedulers=("cosine",),
                step_sizes=(("linf", "sgd", (10.0,)), ("linf", "adam", (0.03,)), ("l2", "sgd", (1.0,)), ("l2", "adam", (0.05,)))),
)

QUICK = Preset(
    name="quick",
    description="The embedded default: Fashion-MNIST (all 60k training images), a small CNN adversarially "
    "pretrained with FGSM-RS and fine-tuned with a 5-step attack, Linf eps 0.1, AutoAttack subset on the first "
    "1000 test points; one method's whole grid in about 10 minutes on a 2-core CPU once the dense model is cached.",
    dataset="fashion_mnist",
    archs=("cnn",),
    n_train=None,
    n_eval=1000,
    eps=_FMNIST_EPS,
    seed=0,
    weights_sparsities=(90, 95, 99),
    structured_sparsities=(50, 75, 90),
    dense_train=TrainSpec(epochs=5, lr=0.05, batch_size=128, eps=_FMNIST_EPS),
    prune_train=TrainSpec(epochs=1, lr=0.05, batch_size=128, eps=_FMNIST_EPS),
    # Fine-tuning's inner attack takes 5 steps of eps/2 (Madry et al.'s 2.5 eps in all; the loss stays each
    # method's: PGD-AT, TRADES, MART), not FGSM-RS: the fine-tuned weights are the model delivered, and
    # FGSM-RS fine-tuning of very sparse models masked gradients (README, Presets).
    finetune=TrainSpec(epochs=1, lr=0.01, batch_size=128, eps=_FMNIST_EPS, attack_steps=5, step_size=0.5),
    autoattack=AutoAttackSpec(version="custom", attacks=("apgd-ce", "apgd-t", "square"), apgd_iters=100,
                              n_target_classes=3, square_queries=3000),
    pgd_steps=20,
    eval_batch=500,
    floors=Floors(
        sparsity_tol=0.01,
        rows=(
            ("dense", 0, 0.77, 0.65),
            ("weights", 90, 0.77, 0.65),
            ("weights", 95, 0.72, 0.61),
            ("weights", 99, 0.42, 0.29),
            ("structured", 50, 0.77, 0.65),
            ("structured", 75, 0.72, 0.61),
            ("structured", 90, 0.42, 0.29),
        ),
        derivation="from this preset's dense model measured at 85.5% clean / 72.3% robust on its 1000 points: "
        "floor = dense x retention, retention 0.90 (clean) / 0.90 (robust) for the dense model and the lowest "
        "sparsity (90% weights, 50% structured), 0.85 / 0.85 for the middle one (95%, 75%), 0.50 / 0.40 for the "
        "highest (99%, 90%), rounded down to whole points. The highest level is low on purpose: a local method at "
        "99% keeps 1 of the 144 weights of the 1-channel 3x3 stem. A collapsed model scores 11.1% / 11.1% "
        "(one class) and fails every floor. The same recipe retrained on another CPU (float results depend on the "
        "CPU and its thread count) measured 85.4% / 71.9%; the floors were kept, not re-derived from it.",
    ),
    attack_choice="APGD-CE (100 it), APGD-T (100 it, 3 target classes), Square (3000 queries), cascaded as "
    "AutoAttack does, on the first 1000 test points; FMN-Linf is a second attack beside it. Chosen by measurement "
    "against AutoAttack standard on the same points (benchmarks/attack_subset.py, "
    "reports/benchmarks/attack_subset_quick.json). With Square at 1000 queries the subset over-stated the lwm 90% "
    "weights model by 1.3 points (70.4% vs 69.1%) and, on a dense model retrained on another CPU, by 1.4 (71.1% vs "
    "69.7%): Square at 5000 queries breaks points every white-box attack misses, while FAB-T and the 6 further APGD-T "
    "targets of standard found at most 0.2 points. On that second lwm 90% model, Square after the same APGD-CE + "
    "APGD-T broke 71.1 / 70.6 / 70.5 / 70.2% robust at 1000 / 2500 / 3000 / 4000 queries (44 / 92 / 111 / 149 s on "
    "2 threads), against standard's 69.7%: 3000 queries is within 1 point (0.8) and keeps one method's grid under "
    "10 minutes on a 2-core CPU; 5000 (standard's) would double the evaluation. On the same CPU's dense model and "
    "HYDRA 90% weights the subset with 1000 queries was already within 0.4 points of standard (72.1% vs 71.7%, "
    "70.1% vs 69.7%), and more queries only lower it.",
    fmn=FMNSpec(steps=100, tune_steps=50, tune_points=32, tune_split="test", step_sizes=_FMNIST_STEPS),
)

_CIFAR_EPS = 8 / 255
_SURVEY_FLOORS = Floors(
    sparsity_tol=0.01,
    rows=(
        ("dense", 0, 0.75, 0.40),
        ("weights", 90, 0.70, 0.35),
        ("weights", 95, 0.65, 0.33),
        ("weights", 99, 0.55, 0.25),
        ("structured", 50, 0.70, 0.35),
        ("structured", 75, 0.65, 0.33),
        ("structured", 90, 0.55, 0.25),
    ),
    derivation="from the survey's CIFAR-10 leaderboard (Piras et al. 2024): robust AT ResNet18/VGG16 reach about 80% "
    "clean / 45-50% AutoAttack dense; floors sit about 10 points below the survey's median method per sparsity.",
)


# Not measured here (no GPU): FMN's defaults (Linf/L2 SGD step 1) and one size on either side; Adam near
# 1-3/255 per pixel. The survey's HO-FMN runs 200 final steps after 100-step tuning trials.
_CIFAR_FMN_STEPS = (("linf", "sgd", (1.0, 10.0)), ("linf", "adam", (0.003, 0.01)),
                    ("l2", "sgd", (0.3, 1.0)), ("l2", "adam", (0.005, 0.02)))


def _survey_preset(name: str, dataset: str, n_eval: int, tune_split: str) -> Preset:
    pgd10 = dict(eps=_CIFAR_EPS, attack_steps=10, step_size=0.25)  # step 2/255 = eps/4
    return Preset(
        name=name,
        description=f"The survey's protocol on {dataset}: ResNet18 and VGG16-BN, PGD-10 adversarial training, "
        f"AutoAttack standard at Linf eps 8/255 on {n_eval} test points. Needs a GPU and your own copy of the data.",
        dataset=dataset,
        archs=("resnet18", "vgg16"),
        n_train=None,
        n_eval=n_eval,
        eps=_CIFAR_EPS,
        seed=0,
        weights_sparsities=(90, 95, 99),
        structured_sparsities=(50, 75, 90),
        dense_train=TrainSpec(epochs=100, lr=0.1, batch_size=128, weight_decay=5e-4, **pgd10),
        prune_train=TrainSpec(epochs=20, lr=0.1, batch_size=128, weight_decay=1e-4, **pgd10),
        finetune=TrainSpec(epochs=100, lr=0.01, batch_size=128, weight_decay=1e-4, **pgd10),
        autoattack=AutoAttackSpec(version="standard"),
        pgd_steps=20,
        eval_batch=500,
        floors=_SURVEY_FLOORS,
        needs_gpu=True,
        attack_choice="AutoAttack standard, as the survey runs it (its eps 0.031 rounded 8/255; we use 8/255 exactly).",
        fmn=FMNSpec(steps=200, tune_steps=100, tune_points=64, tune_split=tune_split, step_sizes=_CIFAR_FMN_STEPS),
    )


PRESETS: dict[str, Preset] = {
    p.name: p for p in (SMOKE, QUICK, _survey_preset("cifar10", "cifar10", 10000, "train"),
                        _survey_preset("svhn", "svhn", 10000, "test"))
}


def get(name: str) -> Preset:
    """The preset called ``name``; raises :class:`BadOption` listing the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise BadOption(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
