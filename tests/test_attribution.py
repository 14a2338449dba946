"""Grad-CAM points at the class evidence: a tiny model trained on images where a filled square or a ring (at
a random place) decides the class, beside a bright bar that both classes share, peaks on the shape and
not on the bar. The sample is seeded and fixed per domain; the layer is the deepest one with a map."""
import numpy as np
import pytest
import torch

from mdcore.eval.attribution import cam_layer, grad_cam, pick
from mdcore.models.model import ModelConfig, MultiDomainModel


def shapes(n: int, seed: int):
    """uint8 images (n,3,32,32), labels (0 filled square, 1 ring), the shape's box and the bar's box."""
    g = np.random.default_rng(seed)
    images = g.integers(0, 60, size=(n, 3, 32, 32)).astype(np.uint8)
    labels = g.integers(0, 2, size=n)
    boxes, bars = [], []
    for i in range(n):
        qy, qx = g.integers(0, 2, size=2)  # the shape's quadrant; the bar goes to the opposite one
        y, x = qy * 16 + g.integers(2, 6), qx * 16 + g.integers(2, 6)
        images[i, :, y : y + 9, x : x + 9] = 230
        if labels[i] == 1:
            images[i, :, y + 3 : y + 6, x + 3 : x + 6] = 20
        by, bx = (1 - qy) * 16 + g.integers(2, 5), (1 - qx) * 16 + g.integers(4, 10)
        images[i, :, by : by + 11, bx : bx + 3] = 230
        boxes.append((y, x, 9, 9))
        bars.append((by, bx, 11, 3))
    return torch.from_numpy(images), torch.from_numpy(labels), boxes, bars


@pytest.fixture(scope="module")
def trained():
    from mdcore.data.images import to_float

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MultiDomainModel(ModelConfig("test_resnet", ["a"], ["filled", "ring"], adapters=False))
    images, labels, _, _ = shapes(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    domains = torch.zeros(32, dtype=torch.long)
    model.train()
    for step in range(80):
        idx = torch.randint(0, len(images), (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(to_float(images[idx].clone()), domains), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_cam_peaks_on_the_shape_that_decides_the_class_not_on_the_shared_bar(trained):
    from mdcore.data.images import to_float

    images, labels, boxes, bars = shapes(40, 1)
    domains = torch.zeros(len(images), dtype=torch.long)
    with torch.no_grad():
        preds = trained(to_float(images.clone()), domains).argmax(1)
    assert (preds == labels).float().mean() >= 0.9  # the model learned the task
    layer = cam_layer(trained, 32)
    assert layer == "backbone.layer2"  # 4 x 4 at 32 px; layer3 and layer4 would be 2 x 2 and 1 x 1
    cams = grad_cam(trained, images, domains, preds, layer)
    assert cams.shape == (40, 32, 32) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    inside = shape_mass = bar_mass = 0
    for cam, (y, x, h, w), (by, bx, bh, bw) in zip(cams, boxes, bars):
        peak_y, peak_x = divmod(int(cam.argmax()), 32)
        inside += (y - 3 <= peak_y < y + h + 3) and (x - 3 <= peak_x < x + w + 3)
        shape_mass += float(cam[y : y + h, x : x + w].mean())
        bar_mass += float(cam[by : by + bh, bx : bx + bw].mean())
    assert inside >= 0.8 * len(images), f"CAM peak on the shape in only {inside}/40 images"
    assert shape_mass > 2 * bar_mass
    # an unknown domain (-1: the routed path) gives a map too, and explaining the other class moves it
    unknown = grad_cam(trained, images[:4], torch.full((4,), -1), preds[:4], layer)
    assert torch.allclose(unknown, cams[:4], atol=1e-5)  # one domain: routing is the identity here
    other = grad_cam(trained, images[:8], domains[:8], 1 - preds[:8], layer)
    assert not torch.allclose(other, cams[:8], atol=1e-3)


def test_the_sample_is_seeded_fixed_per_domain_and_bounded():
    correct = np.array([True] * 20 + [False] * 3)
    right, wrong = pick(correct, 6, 0, "clean")
    assert len(right) == 6 and len(wrong) == 3 and correct[right].all() and not correct[wrong].any()
    again = pick(correct, 6, 0, "clean")
    assert (again[0] == right).all() and (again[1] == wrong).all()
    assert not (pick(correct, 6, 1, "clean")[0] == right).all() or not (pick(correct, 6, 0, "ink")[0] == right).all()
    assert [len(a) for a in pick(correct, 0, 0, "clean")] == [0, 0]


def test_cam_layer_keeps_a_map_with_cells():
    model = MultiDomainModel(ModelConfig("test_resnet", ["a"], ["x", "y"], adapters=False))
    assert cam_layer(model, 64) == "backbone.layer3"  # 4 x 4 at 64 px
    assert cam_layer(model, 128) == "backbone.layer4"
    assert cam_layer(model, 8) == "backbone.act1"  # nothing that deep fits: the first stage
