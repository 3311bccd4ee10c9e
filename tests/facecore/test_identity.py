"""dlib's face-recognition ResNet in PyTorch: same numbers as dlib, with gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facecore.face import FaceDetector
from facecore.face.dlib_models import RESNET_RECOGNITION, model_path
from facecore.face.transform import dlib_chip_matrix, warp
from facecore.images import decode
from facecore.losses import identity_loss
from facecore.models.dlib_format import DlibFormatError, read_dlib_net
from facecore.models.identity import Affine, DlibResNet, IdentityScorer, ResidualBlock, add_zero_padded

PEOPLE = {"obama.jpg": "obama", "obama2.jpg": "obama", "obama3.jpg": "obama", "biden.jpg": "biden",
          "astronaut.png": "astronaut"}


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return DlibResNet.from_dat()


@pytest.fixture(scope="module")
def faces(photos):
    """name → (image, 68 landmarks, dlib's own 150x150 chip)."""
    import dlib

    detector = FaceDetector()
    found = {}
    for name in PEOPLE:
        image = decode(photos[name].read_bytes()).rgb
        face = detector(image)[0]
        points = np.round(face.landmarks)
        shape = dlib.full_object_detection(
            dlib.rectangle(*[int(v) for v in face.box.as_list()]), [dlib.point(int(x), int(y)) for x, y in points])
        found[name] = (image, points, dlib.get_face_chip(image, shape, 150, 0.25))
    return found


def _tensor(chips: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()


def test_descriptors_match_dlib(model, faces):
    import dlib

    reference = dlib.face_recognition_model_v1(str(model_path(RESNET_RECOGNITION)))
    chips = [chip for _, _, chip in faces.values()]
    expected = np.array([np.array(reference.compute_face_descriptor(chip)) for chip in chips])
    with torch.no_grad():
        ported = model(_tensor(chips)).numpy()
    difference = np.abs(ported - expected).max()
    print(f"max |port - dlib| = {difference:.2e}")
    assert difference <= 1e-5


def test_same_person_pairs_are_closer(model, faces):
    names = list(faces)
    with torch.no_grad():
        descriptors = model(_tensor([faces[n][2] for n in names])).numpy()
    same, different = [], []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            distance = np.linalg.norm(descriptors[i] - descriptors[j])
            (same if PEOPLE[names[i]] == PEOPLE[names[j]] else different).append(distance)
    assert max(same) < 0.6 < min(different), (same, different)


def test_file_layout(model):
    net = read_dlib_net(model_path(RESNET_RECOGNITION))
    assert net.loss == "loss_metric_2" and net.input_size == (150, 150)
    assert np.allclose(net.input_mean, (122.782, 117.001, 104.298), atol=1e-3)
    assert len(net.of_kind("con")) == 29 and len(net.of_kind("affine")) == 29
    assert net.of_kind("fc")[0].values["weight"].shape == (256, 128)
    assert sum(p.numel() for p in model.parameters()) > 5_000_000


def test_not_a_network_is_refused(tmp_path):
    (tmp_path / "bad.dat").write_bytes(b"\x01\x01\x01\x05hello")
    with pytest.raises(DlibFormatError, match="expected a loss_metric network"):
        read_dlib_net(tmp_path / "bad.dat")


def test_layers_pass_gradcheck():
    torch.manual_seed(0)
    affine = Affine(3).double()
    with torch.no_grad():
        affine.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(affine, (x,))
    y = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(add_zero_padded, (x, y))
    padded = add_zero_padded(x, y)
    assert padded.shape == (2, 3, 5, 5) and torch.equal(padded[:, 2], x[:, 2])
    block = ResidualBlock(3, 4, downsample=True).double()
    assert torch.autograd.gradcheck(block, (torch.randn(1, 3, 9, 9, dtype=torch.float64, requires_grad=True),))
    assert block(torch.randn(1, 3, 9, 9, dtype=torch.float64)).shape == (1, 4, 4, 4)


def test_gradients_reach_the_pixels(model, faces):
    image, points, _ = faces["obama.jpg"]
    scorer = IdentityScorer(model, device="cpu")
    target = scorer.embed(torch.from_numpy(faces["obama2.jpg"][0]).permute(2, 0, 1)[None].float(),
                          faces["obama2.jpg"][1][None]).detach()
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().requires_grad_(True)
    loss = identity_loss(scorer.embed(pixels, points[None]), target).sum()
    loss.backward()
    gradient = pixels.grad[0].abs().sum(dim=0)
    assert torch.isfinite(gradient).all() and gradient.sum() > 0
    # Only pixels inside the chip matter.
    chip_corners = np.array([[0, 0], [149, 0], [149, 149], [0, 149]], float)
    from facecore.face.transform import apply, invert
    corners = apply(invert(dlib_chip_matrix(points)), chip_corners)
    ys, xs = np.nonzero(gradient.numpy() > 0)
    assert xs.min() >= corners[:, 0].min() - 2 and xs.max() <= corners[:, 0].max() + 2
    # One step against the gradient lowers the loss.
    with torch.no_grad():
        stepped = pixels - 2000.0 * pixels.grad
    assert identity_loss(scorer.embed(stepped, points[None]), target).item() < loss.item()


def test_torch_chip_matches_dlib_chip(faces):
    from facecore.face.warp_torch import warp_affine

    image, points, dlib_chip = faces["obama.jpg"]
    matrix = dlib_chip_matrix(points)
    opencv_chip = warp(image, matrix, 150)
    torch_chip = warp_affine(torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                             torch.from_numpy(matrix), 150)[0].permute(1, 2, 0).numpy()
    assert np.abs(opencv_chip.astype(float) - dlib_chip).mean() < 1.0  # dlib's geometry
    assert np.abs(torch_chip - opencv_chip).mean() < 0.5  # the differentiable warp agrees


def test_id_similarity_column(model, faces):
    scorer = IdentityScorer(model, device="cpu")
    a = [faces["obama.jpg"], faces["obama.jpg"]]
    b = [faces["obama3.jpg"], faces["biden.jpg"]]
    similarity = scorer.id_similarity([f[0] for f in a], [f[1] for f in a], [f[0] for f in b], [f[1] for f in b])
    assert similarity.shape == (2,) and similarity.dtype == np.float32
    assert similarity[0] > similarity[1] + 0.1


def test_identity_loss_and_shapes(model):
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(identity_loss(a, torch.tensor([1.0, 0.0])), torch.tensor([0.0, 1.0]))
    assert torch.allclose(identity_loss(a, -a), torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="embeddings"):
        identity_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, 3, 150, 150\)"):
        model(torch.zeros(1, 3, 112, 112))
