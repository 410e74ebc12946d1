"""Architectures: shapes, in-model normalisation, seeded initialisation, prunable-layer inventory."""

import pytest
import torch

from pytest_advprune import models, sparsity


@pytest.mark.parametrize("arch,dataset,shape", [
    ("cnn", "fashion_mnist", (2, 1, 28, 28)),
    ("resnet18", "cifar10", (2, 3, 32, 32)),
    ("vgg16", "svhn", (2, 3, 32, 32)),
])
def test_logits_shape(arch, dataset, shape):
    model = models.build(arch, dataset, seed=0).eval()
    with torch.no_grad():
        assert model(torch.rand(shape)).shape == (2, 10)


def test_same_seed_same_weights_and_different_seed_differs():
    a, b, c = (models.build("cnn", "fashion_mnist", s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_normalisation_lives_inside_the_model():
    model = models.build("cnn", "fashion_mnist", 0)
    state = model.state_dict()
    assert torch.allclose(state["normalize.mean"].flatten(), torch.tensor([0.2860]))
    x = torch.full((1, 1, 28, 28), 0.2860)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x), atol=1e-6)


def test_prunable_inventory_matches_the_survey_models():
    # ResNet18 (CIFAR): stem conv + 16 block convs + 3 shortcut 1x1 convs + classifier = 21 layers.
    assert len(sparsity.prunable_layers(models.build("resnet18", "cifar10", 0))) == 21
    # VGG16-BN (survey variant): 13 convs + 3 linear layers of the 512*4 -> 256 -> 256 -> 10 head.
    vgg = models.build("vgg16", "cifar10", 0)
    layers = sparsity.prunable_layers(vgg)
    assert len(layers) == 16 and list(layers.values())[-3].in_features == 512 * 4


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(KeyError, match="cnn, resnet18, vgg16"):
        models.build("alexnet", "cifar10", 0)
