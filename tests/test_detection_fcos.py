"""FCOS against torchvision: same random weights through fb.load_pretrained, same transformed
batch (two odd-sized images, min_size 96, max_size 128); pyramid, head outputs (centerness
included) and detections; parameter counts; the generic builder on two other backbones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.models.detection as tvd

import flaxbones as fb
import flaxbones.detection.fcos  # noqa: F401  (registers the presets)
import flaxbones.detection.retinanet  # noqa: F401
import onestage_ref as ref_utils
import torch_ref

NAME = "fcos_resnet50_fpn"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(3)
    tv = tvd.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                               min_size=96, max_size=128)
    ref_utils.randomize(tv, 3)
    with torch.no_grad():  # scores spread around the 0.2 threshold, boxes of varied sizes
        tv.head.classification_head.cls_logits.weight.mul_(0.5)
        tv.head.classification_head.cls_logits.bias.fill_(-1.0)
        tv.head.regression_head.bbox_reg.weight.mul_(0.05)
        tv.head.regression_head.bbox_reg.bias.fill_(1.0)
        tv.head.regression_head.bbox_ctrness.weight.mul_(0.5)
    variables, path = ref_utils.load(NAME, tv, tmp_path_factory.mktemp("w"), num_classes=5)
    model = fb.create_model(NAME, num_classes=5)
    ref = ref_utils.run_torchvision(tv, ref_utils.images())
    out, inter = ref_utils.run_flax(model, variables, ref)
    return dict(tv=tv, variables=variables, path=path, model=model, ref=ref, out=out, inter=inter)


def test_pyramid_and_head_outputs(case):
    ref, inter = case["ref"], case["inter"]
    for i, level in enumerate(("P3", "P4", "P5", "P6", "P7")):
        torch_ref.assert_close(inter[level], ref["features"][i], what=level)
    for key in ("cls_logits", "bbox_regression", "bbox_ctrness"):
        torch_ref.assert_close(inter[key], ref["head"][key], what=key)
    np.testing.assert_array_equal(inter["anchors"], ref["anchors"])


def test_detections_one_to_one(case):
    pairs, worst, excused = ref_utils.match_detections(case["ref"]["detections"], case["out"], 0.2)
    assert pairs >= 50 and worst <= 1e-4, (pairs, worst, excused)
    assert case["out"]["scores"].shape == (2, 100)


def test_parameter_counts(case):
    assert ref_utils.count(case["variables"]["params"]) == sum(
        p.numel() for p in case["tv"].parameters())
    model = fb.create_model(NAME)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert ref_utils.published_count(model, shapes["params"]) == 32269600


def test_weight_file_of_another_detector(case):
    with pytest.raises(ValueError, match="nothing was loaded"):
        fb.load_pretrained("retinanet_resnet50_fpn", case["path"], num_classes=5)


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16"])
def test_generic_builder(backbone):
    model = fb.create_model("fcos", backbone=backbone, num_classes=3, fpn_channels=64,
                            trainable_layers=2)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 96, 3))
    sizes = jnp.array([[64, 96], [50, 70]], jnp.int32)
    assert model.frozen_param_patterns()  # ResNet and VGG stages as torchvision counts them
    if backbone != "resnet18":  # compiled and run on ResNet-18, traced (shapes) on VGG
        out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(1),
                                                         images, sizes), images, sizes)
        assert out["boxes"].shape == (2, 100, 4) and out["valid"].dtype == jnp.bool_
        return
    variables = jax.jit(model.init)(jax.random.key(1, impl="unsafe_rbg"), images, sizes)
    out = jax.jit(model.apply)(variables, images, sizes)
    assert out["boxes"].shape == (2, 100, 4) and out["valid"].dtype == jnp.bool_
    boxes = np.where(np.asarray(out["valid"])[..., None], np.asarray(out["boxes"]), 0)
    assert np.all(boxes[1, :, 2] <= 70) and np.all(boxes[1, :, 3] <= 50)
