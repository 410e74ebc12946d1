"""A tiny, fast PruneContext for testing a method's core step (not a conformance run)."""

import dataclasses

import torch

from pytest_advprune import models, presets
from pytest_advprune.session import PruneContext


def tiny_context(structure="weights", sparsity=0.9, n=256, epochs=1.0, seed=0):
    """A SmallCNN 'dense model' trained for a few steps on random data, with a 1-epoch budget on ``n`` points."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    spec = presets.SMOKE.prune_train.with_(epochs=epochs, batch_size=64)
    preset = dataclasses.replace(presets.SMOKE, prune_train=spec, finetune=spec.with_(lr=0.01))
    dense = models.build("cnn", "fashion_mnist", seed)
    return PruneContext(dense, structure, sparsity, preset, x, y, torch.device("cpu"), seed, lambda s: None)
