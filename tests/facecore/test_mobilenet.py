"""ImageNet MobileNetV2 features from the offline weights package, for perceptual losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecore.models.mobilenet import LEVELS, MobileNetV2Features, perceptual_distance


@pytest.fixture(scope="module")
def network():
    return MobileNetV2Features.pretrained()


def test_every_weight_loads_and_the_levels_have_their_shapes(network):
    outputs = network(torch.rand(2, 3, 128, 128))
    assert [tuple(x.shape) for x in outputs] == [(2, 16, 64, 64), (2, 24, 32, 32), (2, 32, 16, 16), (2, 96, 8, 8)]
    assert len(network.features) == max(LEVELS) + 1
    assert not any(p.requires_grad for p in network.parameters())
    network.train()
    assert not network.training  # batch norm keeps ImageNet's statistics
    with pytest.raises(ValueError, match="levels"):
        MobileNetV2Features(levels=(19,))


def test_the_rebuilt_network_with_the_file_s_classifier_knows_a_cat_and_a_coffee_cup():
    """The architecture and the weights are torchvision's: with the classifier of the same file,
    scikit-image's photo of a cat is a cat and its espresso an espresso (ImageNet classes)."""
    import cv2
    from skimage import data

    from facecore.models.mobilenet import weights_path

    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    trunk = MobileNetV2Features.pretrained(levels=(18,))
    images = [cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA) for image in (data.chelsea(), data.coffee())]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        pooled = trunk(batch)[0].mean(dim=(2, 3))
        logits = pooled @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    cat, cup = logits.argmax(dim=1).tolist()
    assert cat in (281, 282, 283, 284, 285), cat  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert cup in (967, 968, 504), cup  # espresso, cup, coffee mug


def test_perceptual_distance_is_per_image_and_differentiable(network, photos):
    import cv2

    images = [cv2.resize(cv2.imread(str(path))[..., ::-1], (128, 128), interpolation=cv2.INTER_AREA)
              for path in sorted(photos.values())[:4]]
    faces = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        own = perceptual_distance(network, faces, torch.roll(faces, shifts=(1, 1), dims=(2, 3)))
        other = perceptual_distance(network, faces, torch.roll(faces, shifts=1, dims=0))
        same = perceptual_distance(network, faces, faces)
    assert own.shape == (4,) and float(same.abs().max()) == 0.0
    assert bool((own < other).all()), (own, other)
    image = faces.clone().requires_grad_(True)
    perceptual_distance(network, image, torch.roll(faces, shifts=1, dims=0)).sum().backward()
    assert float(image.grad.abs().sum()) > 0 and np.isfinite(image.grad.numpy()).all()
