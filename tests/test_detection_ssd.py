"""SSD300-VGG16 and SSDlite320-MobileNetV3 against torchvision: same random weights through
fb.load_pretrained, the same transformed batch (two odd-sized images resized to the fixed
300x300 / 320x320); every feature map, head outputs, default boxes and detections; parameter
counts; trainable_layers; another detector's weight file."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.models.detection as tvd
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.models.detection.ssdlite import _mobilenet_extractor
from torchvision.models.mobilenetv3 import mobilenet_v3_large
from torchvision.models.vgg import vgg16

import flaxbones as fb
import flaxbones.detection.ssd  # noqa: F401  (registers the presets)
import flaxbones.detection.ssdlite  # noqa: F401
import onestage_ref as ref_utils
import torch_ref
from flaxbones.detection.base import trainable_mask
from flaxbones.weights.convert import map_module_path

# published parameter count, score threshold, detections per image
PRESETS = {"ssd300_vgg16": (35641826, 0.01, 200),
           "ssdlite320_mobilenet_v3_large": (3440060, 0.001, 300)}


def _torchvision(name, seed):
    torch.manual_seed(seed)
    model = ref_utils.randomize(getattr(tvd, name)(weights=None, weights_backbone=None,
                                                   num_classes=5), seed)
    ref_utils.calibrate(model, ref_utils.images())  # SSDlite's BN: healthy random activations
    heads = model.head.classification_head.module_list, model.head.regression_head.module_list
    with torch.no_grad():  # softmax scores of some spread; deltas of a few units
        x = model.transform(ref_utils.images())[0].tensors
        for i, level in enumerate(list(model.backbone(x).values())):
            for head, target in zip(heads, (2.0, 1.0)):
                conv = head[i] if isinstance(head[i], torch.nn.Conv2d) else head[i][-1]
                scale = target / conv(level if conv is head[i] else head[i][0](level)).std()
                conv.weight.mul_(scale)
                conv.bias.mul_(scale)
    return model


@pytest.fixture(scope="module", params=list(PRESETS))
def case(request, tmp_path_factory):
    name = request.param
    tv = _torchvision(name, seed=len(name))
    variables, path = ref_utils.load(name, tv, tmp_path_factory.mktemp("w"), num_classes=5)
    model = fb.create_model(name, num_classes=5)
    ref = ref_utils.run_torchvision(tv, ref_utils.images(), dense=False)
    out, inter = ref_utils.run_flax(model, variables, ref)
    return dict(name=name, tv=tv, variables=variables, path=path, model=model, ref=ref, out=out,
                inter=inter)


def test_maps_and_head_outputs(case):
    ref, inter = case["ref"], case["inter"]
    fixed = (300, 300) if case["name"] == "ssd300_vgg16" else (320, 320)
    assert ref["images"].shape[1:3] == fixed and (ref["image_sizes"] == fixed).all()
    truth = _float64_maps(case["tv"], ref["images"])
    for i, (level, exact) in enumerate(zip(ref["features"], truth)):
        torch_error = np.abs(np.asarray(level, np.float64) - exact).max()
        ours = np.abs(np.asarray(inter[f"map_{i}"], np.float64) - exact).max()
        scale = np.abs(exact).max()
        assert ours <= max(1e-4 * scale, 2 * torch_error), (i, ours / scale, torch_error / scale)
    for key in ("cls_logits", "bbox_regression"):
        torch_ref.assert_close(inter[key], ref["head"][key], what=key)
    torch_ref.assert_close(inter["anchors"], ref["anchors"], rel=1e-6, what="default boxes")


def _float64_maps(tv, images):
    """The backbone's maps computed in float64 on the same batch: the deep SSDlite maps sit
    as far from torchvision's own float32 ones (6e-5 of their scale) as the 1e-4 tolerance,
    so each side is measured against the exact value, flaxbones allowed 2x torch's error."""
    double = copy.deepcopy(tv.backbone).double()
    with torch.no_grad():
        maps = double(torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2))
    return [m.permute(0, 2, 3, 1).numpy() for m in maps.values()]


def test_detections_one_to_one(case):
    _, thresh, k = PRESETS[case["name"]]
    pairs, worst, excused = ref_utils.match_detections(case["ref"]["detections"], case["out"],
                                                       thresh)
    assert pairs >= 100 and worst <= 1e-4, (pairs, worst, excused)
    assert case["out"]["boxes"].shape == (2, k, 4)


def test_parameter_counts(case):
    assert ref_utils.count(case["variables"]["params"]) == sum(
        p.numel() for p in case["tv"].parameters())
    model = fb.create_model(case["name"])  # 91 classes: torchvision's published count
    size = 300 if case["name"] == "ssd300_vgg16" else 320
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    assert ref_utils.count(shapes["params"]) == PRESETS[case["name"]][0]


def test_weight_file_of_another_detector(case):
    other = next(n for n in PRESETS if n != case["name"])
    with pytest.raises(ValueError, match="nothing was loaded"):
        fb.load_pretrained(other, case["path"], num_classes=5)


@pytest.mark.parametrize("name, layers", [("ssd300_vgg16", 0), ("ssd300_vgg16", 4),
                                          ("ssdlite320_mobilenet_v3_large", 0),
                                          ("ssdlite320_mobilenet_v3_large", 3)])
def test_trainable_layers_match_torchvision(name, layers):
    if name == "ssd300_vgg16":
        extractor, size = _vgg_extractor(vgg16(), False, layers), 300
    else:
        extractor = _mobilenet_extractor(mobilenet_v3_large(reduced_tail=True), layers,
                                         torch.nn.BatchNorm2d)
        size = 320
    rules = fb.get_spec(name).weights.rules
    want = {map_module_path("backbone." + n.rpartition(".")[0], rules)
            for n, p in extractor.named_parameters() if not p.requires_grad}
    model = fb.create_model(name, num_classes=5, trainable_layers=layers)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    mask = trainable_mask(shapes["params"], model.frozen_param_patterns())
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert {"/".join(k.key for k in path[:-1]) for path, ok in flat if not ok} == want
