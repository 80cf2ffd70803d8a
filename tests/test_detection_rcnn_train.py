"""R-CNN train mode against torchvision 0.29's `model(images, targets)`: the same random weights,
the same two images and targets through torchvision's own train-mode transform (min_size 64),
sampling sizes that keep every candidate on both sides (so both draws are deterministic),
and every loss term and the gradient of the backbone's first conv compared. Plus the default
sampling under jit, images without ground truth, and bad targets."""
import copy
from functools import cache
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import rcnn_ref
import torch_ref

import flaxbones as fb
import flaxbones.detection.rcnn_presets  # registers the presets

PRESETS = ["fasterrcnn_resnet50_fpn"]
REL, GRAD_REL = 1e-4, 1e-3
# every anchor sampled (about 2.3k at 96x96), every proposal + ground truth (<= 103) sampled,
# up to 16 positives per image (the mask / keypoint slots; checked below)
RPN_POST, RPN_BATCH, BOX_BATCH, BOX_FRACTION = 100, 4096, 128, 0.125
FLAX_SETTINGS = {"rpn_batch_size_per_image": RPN_BATCH, "box_batch_size_per_image": BOX_BATCH,
                 "box_positive_fraction": BOX_FRACTION, "rpn_post_nms_top_n_train": RPN_POST}
BOXES = ([[10, 12, 50, 40], [30, 20, 80, 60], [5, 40, 35, 68]],  # original pixels
         [[8, 10, 40, 50], [25, 30, 60, 75]])
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, diffs in MEASURED.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), end="")


def torch_targets(imgs, classes: int, keypoints: bool, empty=()):
    """Boxes, labels, filled-ellipse masks and 17 keypoints per image, in original pixels
    (image indices in `empty` get none)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i, (img, boxes) in enumerate(zip(imgs, BOXES)):
        boxes = torch.tensor(boxes, dtype=torch.float32)[:0 if i in empty else None]
        h, w = img.shape[1:]
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        ctr, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        masks = ((((xx - ctr[:, None, None, 0]) / half[:, None, None, 0]) ** 2
                  + ((yy - ctr[:, None, None, 1]) / half[:, None, None, 1]) ** 2) <= 0.8)
        t = {"boxes": boxes, "labels": 1 + torch.arange(len(boxes)) % (classes - 1),
             "masks": masks.to(torch.uint8)}
        if keypoints:
            u = torch.rand(len(boxes), 17, 2, generator=g) * 1.2 - 0.1  # some outside
            xy = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
            vis = torch.randint(0, 3, (len(boxes), 17, 1), generator=g).float()
            t["keypoints"] = torch.cat([xy, vis], -1)
        out.append(t)
    return out


def flax_targets(transformed, shape, keypoints: bool):
    """torchvision's transformed per-image targets -> the padded batch dict of the contract."""
    n, g = len(transformed), 3
    out = {"boxes": np.zeros((n, g, 4), np.float32), "labels": np.zeros((n, g), np.int32),
           "instance_valid": np.zeros((n, g), bool),
           "masks": np.zeros((n, g, *shape), np.uint8)}
    if keypoints:
        out["keypoints"] = np.zeros((n, g, 17, 3), np.float32)
    for i, t in enumerate(transformed):
        k = len(t["boxes"])
        out["boxes"][i, :k] = t["boxes"].numpy()
        out["labels"][i, :k] = t["labels"].numpy()
        out["instance_valid"][i, :k] = True
        h, w = t["masks"].shape[1:]
        out["masks"][i, :k, :h, :w] = t["masks"].numpy()
        if keypoints:
            out["keypoints"][i, :k] = t["keypoints"].numpy()
    return {k: jnp.asarray(v) for k, v in out.items()}


def torch_losses(ref, imgs, targets):
    """torchvision's train-mode loss dict and the gradient of its backbone's first conv
    (flaxbones' HWIO layout), on fresh copies of the targets."""
    ref.train()
    ref.zero_grad()
    losses = ref(imgs, copy.deepcopy(targets))
    sum(losses.values()).backward()
    grad = ref.backbone.body.conv1.weight.grad.numpy().transpose(2, 3, 1, 0)
    ref.eval()
    return {k: float(v.detach()) for k, v in losses.items()}, grad


@cache
def _loss_and_grad(model):
    def total(params, rest, images, sizes, targets, key):
        losses, _ = model.apply({"params": params, **rest}, images, sizes, train=True,
                                targets=targets, rngs={"sampling": key},
                                mutable=["batch_stats"])
        return sum(losses.values()), losses
    return jax.jit(jax.value_and_grad(total, has_aux=True))


@pytest.fixture(scope="module", params=PRESETS)
def case(request, tmp_path_factory):
    name = request.param
    keypoints = name.startswith("keypoint")
    classes = 2 if keypoints else 5
    ref = rcnn_ref.build(name, classes)
    ref.rpn._post_nms_top_n["training"] = RPN_POST
    ref.rpn.fg_bg_sampler.batch_size_per_image = RPN_BATCH
    ref.roi_heads.fg_bg_sampler.batch_size_per_image = BOX_BATCH
    ref.roi_heads.fg_bg_sampler.positive_fraction = BOX_FRACTION
    path = torch_ref.save_state(ref, tmp_path_factory.mktemp("rcnn") / f"{name}.pth")
    kwargs = {"num_classes": classes, **FLAX_SETTINGS}
    variables = fb.load_pretrained(name, path, **kwargs)
    model = fb.create_model(name, **kwargs)
    imgs = rcnn_ref.images()

    def run(empty=()):
        targets = torch_targets(imgs, classes, keypoints, empty)
        ref.train()
        batch, transformed = ref.transform(imgs, copy.deepcopy(targets))
        ref.eval()
        want, want_grad = torch_losses(ref, imgs, targets)
        images = jnp.asarray(batch.tensors.numpy().transpose(0, 2, 3, 1))
        sizes = jnp.asarray(np.asarray(batch.image_sizes, np.int32))
        ft = flax_targets(transformed, images.shape[1:3], keypoints)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        (_, got), grads = _loss_and_grad(model)(params, rest, images, sizes, ft,
                                                jax.random.key(0))
        got_grad = np.asarray(grads["backbone"]["conv1"]["kernel"])
        return SimpleNamespace(want=want, got={k: float(v) for k, v in got.items()},
                               want_grad=want_grad, got_grad=got_grad)

    return SimpleNamespace(name=name, run=run, model=model, variables=variables,
                           images=imgs, classes=classes, keypoints=keypoints)


def _compare(case, result, tag=""):
    table = MEASURED.setdefault(case.name + tag, {})
    assert sorted(result.got) == sorted(result.want)
    for key, want in result.want.items():
        rel = abs(result.got[key] - want) / max(abs(want), 1e-12)
        table[key] = rel
        assert rel <= REL, f"{case.name}{tag} {key}: {result.got[key]} vs torchvision {want}"
    table["conv1 grad"] = torch_ref.assert_close(result.got_grad, result.want_grad, GRAD_REL,
                                                 f"{case.name}{tag} conv1 grad")


def test_losses_and_gradient_match_torchvision(case):
    _compare(case, case.run())


def test_image_without_ground_truth(case):
    _compare(case, case.run(empty=(1,)), " (image 1 empty)")
