"""One-stage detectors in train mode against torchvision's `model(images, targets)`: same random
weights, the same transformed batch (two images, one of them possibly without ground truth,
targets padded with invalid rows); every loss term and the gradient of the backbone's first
conv; bad targets raise."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import onestage_ref as ref_utils
import pytest
import torch
import torch_ref
import torchvision.models.detection as tvd
from flax import traverse_util
from torchvision.ops import box_iou as torchvision_box_iou
from torchvision.ops.misc import FrozenBatchNorm2d

import flaxbones as fb
import flaxbones.detection.fcos  # registers the presets
import flaxbones.detection.retinanet
import flaxbones.detection.ssd
import flaxbones.detection.ssdlite

# preset -> (whether image 1 has no ground truth, torch's first conv, flaxbones' first kernel)
CASES = {
    "retinanet_resnet50_fpn": (True, "backbone.body.conv1", "backbone/conv1/kernel"),
    "retinanet_resnet50_fpn_v2": (False, "backbone.body.conv1", "backbone/conv1/kernel"),
    "fcos_resnet50_fpn": (False, "backbone.body.conv1", "backbone/conv1/kernel"),
    "ssdlite320_mobilenet_v3_large": (True, "backbone.features.0.0.0",
                                      "backbone/features_0/conv/kernel"),
}
# float32 itself is ~5% off on this gradient (torchvision's float32 vs float64): BatchNorm on
# the batch statistics of tiny maps
FLOAT32_NOISY = ("retinanet_resnet50_fpn_v2",)
PADDED = 5  # ground-truth slots per image: the rest are invalid padding


def _targets(empty_second: bool):
    """Ground truth in the original frame of `ref_utils.images()` (97x131 and 115x89): a few
    boxes of several classes, two of them overlapping (FCOS picks the smaller)."""
    first = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 125.0, 92.0],
                                    [5.0, 50.0, 45.0, 95.0], [20.0, 20.0, 50.0, 64.0]]),
             "labels": torch.tensor([1, 3, 2, 4])}
    second = ({"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
              if empty_second else
              {"boxes": torch.tensor([[8.0, 10.0, 80.0, 100.0], [30.0, 5.0, 60.0, 40.0]]),
               "labels": torch.tensor([2, 1])})
    return [first, second]


def _torchvision(name, seed):
    torch.manual_seed(seed)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 5}
    if not name.startswith("ssd"):  # without weights every layer trains: conv1 has a grad
        kwargs.update(min_size=64, max_size=96)
    model = ref_utils.randomize(getattr(tvd, name)(**kwargs), seed)
    if name.startswith("ssdlite"):  # a smaller fixed size: the loss math is size-agnostic
        model.transform.fixed_size = (160, 160)
    if name in ("retinanet_resnet50_fpn", "fcos_resnet50_fpn"):  # COCO weights' FrozenBN
        _freeze_bn(model.backbone.body, 0.0 if name.startswith("retina") else 1e-5)
    return model


def _freeze_bn(module, eps):
    """Every BatchNorm2d under `module` -> FrozenBatchNorm2d(eps) with its statistics and affine
    parameters (what torchvision builds when weights are given)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_bn(child, eps)


def _pad(targets):
    """torchvision's list of targets -> the padded flaxbones dict."""
    boxes = np.zeros((len(targets), PADDED, 4), np.float32)
    boxes[..., 2:] = 1.0  # padding rows are valid-looking boxes: only the mask hides them
    labels = np.full((len(targets), PADDED), 1, np.int32)
    valid = np.zeros((len(targets), PADDED), bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = t["boxes"].numpy(), t["labels"].numpy(), True
    return {"boxes": boxes, "labels": labels, "instance_valid": valid}


def _torch_losses(tv, imgs, targets, conv, dtype=torch.float32):
    """torchvision's train-mode loss dict and the HWIO gradient of its summed losses w.r.t.
    the weight of module `conv`, run in `dtype` (a float64 copy of the model where asked)."""
    if dtype != torch.float32:
        tv = copy.deepcopy(tv).to(dtype)
        imgs = [x.to(dtype) for x in imgs]
        targets = [{"boxes": t["boxes"].to(dtype), "labels": t["labels"]} for t in targets]
    tv.train()
    losses = tv(imgs, targets)
    sum(losses.values()).backward()
    grad = dict(tv.named_modules())[conv].weight.grad.permute(2, 3, 1, 0)
    return {k: v.item() for k, v in losses.items()}, grad.double().numpy()


def _flax_losses(model, variables, images, sizes, targets, kernel: str):
    """(losses, gradient of the summed losses w.r.t. the param at path `kernel`) under jit, in
    train mode; only that gradient is asked for, so XLA drops the other weight gradients."""
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    rest = {k: v for k, v in variables.items() if k != "params"}

    def total(weight, flat, targets):
        params = traverse_util.unflatten_dict({**flat, kernel: weight}, sep="/")
        losses, _ = model.apply({"params": params, **rest}, images, sizes, train=True,
                                targets=targets, mutable=["batch_stats"])
        return sum(losses.values()), losses

    grad, losses = jax.jit(jax.grad(total, has_aux=True))(flat[kernel], flat, targets)
    return jax.device_get(losses), grad


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    empty, torch_conv, flax_kernel = CASES[name]
    tv = _torchvision(name, seed=len(name))
    variables, _ = ref_utils.load(name, tv, tmp_path_factory.mktemp("w"), num_classes=5)
    imgs, targets = ref_utils.images(), _targets(empty)
    tv.train()
    batch, moved = tv.transform(imgs, [dict(t) for t in targets])
    truth = (_torch_losses(tv, imgs, targets, torch_conv, torch.float64)[1]
             if name in FLOAT32_NOISY else None)
    expected, torch_grad = _torch_losses(tv, imgs, targets, torch_conv)
    images = batch.tensors.permute(0, 2, 3, 1).numpy()
    sizes = np.asarray(batch.image_sizes, np.int32)
    # lax's convolutions: the CPU rewrites (parity-tested on their own) compile ~2x slower
    model = fb.create_model(name, num_classes=5, cpu_kernels=False)
    losses, grad = _flax_losses(model, variables, images, sizes, _pad(moved), flax_kernel)
    return {"name": name, "expected": expected, "losses": losses, "torch_grad": torch_grad,
                "truth": truth, "grad": np.asarray(grad),
                "model": model, "variables": variables, "images": images, "sizes": sizes,
                "targets": _pad(moved)}


def test_loss_terms_equal_torchvision(case):
    assert sorted(case["losses"]) == sorted(case["expected"])
    for key, value in case["expected"].items():
        assert case["losses"][key].dtype == np.float32
        rel = torch_ref.assert_close(case["losses"][key], value, rel=1e-4, what=key)
        print(f"{case['name']} {key}: {value:.6g} rel {rel:.2g}")


def test_first_conv_gradient_equals_torchvision(case):
    """Within 1e-3 of torchvision's; where BatchNorm runs on batch statistics (v2), float32
    itself is that far off (torchvision's float32 gradient is several % from its float64 one),
    so flaxbones' float32 gradient must be as close to the float64 one as torchvision's."""
    if case["truth"] is None:
        rel = torch_ref.assert_close(case["grad"], case["torch_grad"], rel=1e-3, what="grad")
        print(f"{case['name']} first conv grad rel {rel:.2g}")
        return
    def err(x):
        return np.abs(x - case["truth"]).max() / np.abs(case["truth"]).max()
    ours, theirs = err(case["grad"]), err(case["torch_grad"])
    vs_torch = err(case["grad"] - case["torch_grad"] + case["truth"])
    print(f"{case['name']} first conv grad rel to float64: flaxbones {ours:.2g}, torchvision "
          f"{theirs:.2g}; flaxbones vs torchvision float32 {vs_torch:.2g}")
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


@pytest.fixture(scope="module")
def small():
    """A small RetinaNet and the shapes of its variables: targets are checked before any math."""
    model = fb.create_model("retinanet", backbone="resnet18", num_classes=3, fpn_channels=32)
    images = jnp.zeros((2, 64, 64, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)

    def losses(targets, train=True):
        return jax.eval_shape(lambda v: model.apply(v, images, train=train, targets=targets,
                                                    mutable=["batch_stats"])[0], shapes)
    return losses


def _good(g=2):
    boxes = np.tile(np.array([[4.0, 4.0, 30.0, 40.0]], np.float32), (2, g, 1))
    return {"boxes": boxes, "labels": np.ones((2, g), np.int32),
            "instance_valid": np.ones((2, g), bool)}


def test_targets_checked(small):
    """The detectors check their targets with `check_targets` before any math."""
    from flaxbones.detection.onestage_losses import check_targets

    assert sorted(small(_good())) == ["bbox_regression", "classification"]
    assert small(_good(0))["classification"].shape == ()  # no ground truth slot at all
    with pytest.raises(ValueError, match="pass targets"):
        small(None)
    flat = _good()
    flat["boxes"][1, 1, 2] = 4.0
    with pytest.raises(ValueError, match="image 1 box 1"):
        small(flat)
    small({**flat, "instance_valid": np.array([[True, True], [True, False]])})  # padding: fine
    check = lambda t: check_targets(t, 2, 3)
    with pytest.raises(ValueError, match="instance_valid"):
        check({k: v for k, v in _good().items() if k != "instance_valid"})
    with pytest.raises(ValueError, match=r"\(N=2, G, 4\)"):
        check({**_good(), "boxes": np.zeros((2, 2, 5), np.float32)})
    with pytest.raises(ValueError, match="labels"):
        check({**_good(), "labels": np.ones((2, 3), np.int32)})
    with pytest.raises(ValueError, match="integers"):
        check({**_good(), "labels": np.ones((2, 2), np.float32)})
    with pytest.raises(TypeError, match="dict"):
        check([_good()])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        check({**_good(), "labels": np.full((2, 2), 3, np.int32)})


# --- the loss math alone against torchvision's compute_loss: ties, crowded and empty images ---

def _synthetic(seed, anchors_xyxy, classes, step=0.5):
    """Head outputs quantised to `step` (exact ties between anchors) and the ground truth:
    image 0 with five boxes (two of equal area), image 1 with none; padded to PADDED rows."""
    g = torch.Generator().manual_seed(seed)
    n = anchors_xyxy.shape[0]
    logits = torch.round(torch.randn(2, n, classes, generator=g) * 2 / step) * step
    codes = torch.randn(2, n, 4, generator=g) * 0.3
    boxes = torch.tensor([[4.0, 4.0, 36.0, 28.0], [20.0, 10.0, 60.0, 62.0],
                          [30.0, 30.0, 46.0, 54.0], [6.0, 34.0, 30.0, 50.0],
                          [8.0, 36.0, 32.0, 52.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1, 2]) % classes},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
    return logits, codes, targets


def _grid_anchors(strides=(8, 16, 32), size=64, scale=1.0):
    """One square anchor of `scale` x stride per location of each level, as FCOS's."""
    levels = []
    for s in strides:
        c = torch.arange(0, size, s, dtype=torch.float32)
        y, x = torch.meshgrid(c, c, indexing="ij")
        half = scale * s / 2
        levels.append(torch.stack([x - half, y - half, x + half, y + half], -1).reshape(-1, 4))
    return levels


def test_retinanet_and_ssd_loss_math_with_ties():
    from types import SimpleNamespace as NS

    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.retinanet import (
        RetinaNetClassificationHead,
        RetinaNetRegressionHead,
    )
    from torchvision.models.detection.ssd import SSD

    from flaxbones.detection.onestage_losses import retinanet_loss, ssd_loss

    anchors = torch.cat(_grid_anchors(scale=3.0) + _grid_anchors(scale=1.5))
    logits, codes, targets = _synthetic(0, anchors, 4)
    padded = _pad(targets)
    args = (jnp.asarray(logits.numpy()), jnp.asarray(codes.numpy()), anchors.numpy(),
            padded["boxes"], padded["labels"], padded["instance_valid"])
    for loss_type in ("l1", "giou"):
        reg = NS(box_coder=det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)), _loss_type=loss_type)
        cls = NS(BETWEEN_THRESHOLDS=-2)
        head = NS(compute_loss=lambda t, h, a, m, reg=reg, cls=cls: {
            "classification": RetinaNetClassificationHead.compute_loss(cls, t, h, m),
            "bbox_regression": RetinaNetRegressionHead.compute_loss(reg, t, h, a, m)})
        model = NS(proposal_matcher=det_utils.Matcher(0.5, 0.4, True), head=head)
        expected = tvd.RetinaNet.compute_loss(
            model, targets, {"cls_logits": logits, "bbox_regression": codes}, [anchors] * 2)
        got = jax.jit(retinanet_loss, static_argnums=6)(*args, loss_type)
        for k, v in expected.items():
            torch_ref.assert_close(got[k], v.item(), what=f"retinanet {loss_type} {k}")
    matcher = det_utils.SSDMatcher(0.5)
    matched = [matcher(torchvision_box_iou(t["boxes"], anchors)) if len(t["boxes"])
               else torch.full((anchors.shape[0],), -1) for t in targets]
    model = NS(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3.0)
    expected = SSD.compute_loss(model, targets, {"cls_logits": logits, "bbox_regression": codes},
                                [anchors] * 2, matched)
    got = jax.jit(ssd_loss)(*args)
    for k, v in expected.items():  # tied negatives at the cut-off: equal losses whichever
        torch_ref.assert_close(got[k], v.item(), what=f"ssd {k}")


def test_fcos_loss_math_with_ties():
    from types import SimpleNamespace as NS

    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.fcos import FCOSHead

    from flaxbones.detection.fcos import linear_decode
    from flaxbones.detection.onestage_losses import fcos_loss

    levels = _grid_anchors()
    anchors = torch.cat(levels)
    logits, codes, targets = _synthetic(1, anchors, 4)
    codes = codes.abs() + 0.5  # FCOS regresses ReLU'd distances
    ctrness = torch.round(torch.randn(2, anchors.shape[0], 1) * 4) / 4
    head = NS(box_coder=det_utils.BoxLinearCoder(normalize_by_size=True))
    model = NS(center_sampling_radius=1.5,
               head=NS(compute_loss=lambda *a: FCOSHead.compute_loss(head, *a)))
    outputs = {"cls_logits": logits, "bbox_regression": codes, "bbox_ctrness": ctrness}
    counts = [len(a) for a in levels]
    expected = tvd.FCOS.compute_loss(model, targets, outputs, [anchors] * 2, counts)
    padded = _pad(targets)
    loss = jax.jit(lambda *a: fcos_loss(*a, counts, decode=linear_decode))
    got = loss(logits.numpy(), codes.numpy(), ctrness.numpy(), anchors.numpy(),
               padded["boxes"], padded["labels"], padded["instance_valid"])
    for k, v in expected.items():
        torch_ref.assert_close(got[k], v.item(), what=f"fcos {k}")
        assert v.item() > 0, k  # foreground anchors, some between the equal-area boxes
