"""RetinaNet v1/v2 against torchvision: same random weights through fb.load_pretrained, same
transformed batch (two odd-sized images, min_size 96, max_size 128); pyramid, head outputs and
detections; parameter counts; trainable_layers; a wrong weight file."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.models.detection as tvd
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.resnet import resnet50
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import flaxbones as fb
import flaxbones.detection.retinanet  # noqa: F401  (registers the presets)
import onestage_ref as ref_utils
import torch_ref
from flaxbones.detection.base import trainable_mask
from flaxbones.weights.convert import map_module_path

PRESETS = {"retinanet_resnet50_fpn": 34014999, "retinanet_resnet50_fpn_v2": 38198935}


def _torchvision(name, seed):
    torch.manual_seed(seed)
    model = getattr(tvd, name)(weights=None, weights_backbone=None, num_classes=5,
                               min_size=96, max_size=128)
    ref_utils.randomize(model, seed)
    if name == "retinanet_resnet50_fpn":  # the v1 COCO weights run FrozenBN at eps 0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 0.0
    with torch.no_grad():  # logits spread around the 0.05 threshold, boxes off the anchors
        cls = model.head.classification_head.cls_logits
        cls.weight.mul_(0.5)
        cls.bias.fill_(-3.0)
        model.head.regression_head.bbox_reg.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module", params=list(PRESETS))
def case(request, tmp_path_factory):
    name = request.param
    tv = _torchvision(name, seed=len(name))
    variables, path = ref_utils.load(name, tv, tmp_path_factory.mktemp("w"), num_classes=5)
    model = fb.create_model(name, num_classes=5)
    ref = ref_utils.run_torchvision(tv, ref_utils.images())
    out, inter = ref_utils.run_flax(model, variables, ref)
    return dict(name=name, tv=tv, variables=variables, path=path, model=model, ref=ref, out=out,
                inter=inter)


def test_pyramid_and_head_outputs(case):
    ref, inter = case["ref"], case["inter"]
    for i, level in enumerate(("P3", "P4", "P5", "P6", "P7")):
        torch_ref.assert_close(inter[level], ref["features"][i], what=level)
    for key in ("cls_logits", "bbox_regression"):
        torch_ref.assert_close(inter[key], ref["head"][key], what=key)
    np.testing.assert_array_equal(inter["anchors"], ref["anchors"])


def test_detections_one_to_one(case):
    pairs, worst, excused = ref_utils.match_detections(case["ref"]["detections"], case["out"], 0.05)
    assert pairs >= 100 and worst <= 1e-4, (pairs, worst, excused)
    assert case["out"]["boxes"].shape == (2, 300, 4) and case["out"]["labels"].dtype == np.int32


def test_parameter_counts(case):
    assert ref_utils.count(case["variables"]["params"]) == sum(
        p.numel() for p in case["tv"].parameters())
    model = fb.create_model(case["name"])  # 91 classes: torchvision's published count
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert ref_utils.published_count(model, shapes["params"]) == PRESETS[case["name"]]


def test_weight_file_of_another_detector(case):
    other = next(n for n in PRESETS if n != case["name"])
    with pytest.raises(ValueError, match="nothing was loaded"):
        fb.load_pretrained(other, case["path"], num_classes=5)


@pytest.mark.parametrize("name, layers", [("retinanet_resnet50_fpn", 0),
                                          ("retinanet_resnet50_fpn", 3),
                                          ("retinanet_resnet50_fpn", 5),
                                          ("retinanet_resnet50_fpn_v2", 3)])
def test_trainable_layers_match_torchvision(name, layers):
    """The frozen parameters are those torchvision's _resnet_fpn_extractor sets requires_grad
    False on, plus (v1) the FrozenBatchNorm2d scale/bias, buffers there; mapped through the
    preset's key rules."""
    v1 = name == "retinanet_resnet50_fpn"
    norm = FrozenBatchNorm2d if v1 else torch.nn.BatchNorm2d
    body = _resnet_fpn_extractor(resnet50(norm_layer=norm), layers, [2, 3, 4],
                                 LastLevelP6P7(256, 256) if v1 else LastLevelP6P7(2048, 256))
    rules = fb.get_spec(name).weights.rules
    want = {map_module_path("backbone." + n.rpartition(".")[0], rules)
            for n, p in body.named_parameters() if not p.requires_grad}
    want |= {map_module_path("backbone." + n, rules) for n, m in body.named_modules()
             if isinstance(m, FrozenBatchNorm2d)}
    model = fb.create_model(name, num_classes=5, trainable_layers=layers)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    mask = trainable_mask(shapes["params"], model.frozen_param_patterns())
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    frozen = {"/".join(k.key for k in path[:-1]) for path, ok in flat if not ok}
    assert frozen == want


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        fb.create_model("retinanet", backbone="resnet18", num_classes=0)
    with pytest.raises(ValueError, match="C6"):
        fb.create_model("retinanet", backbone="resnet18", fpn_levels=("C4", "C5", "C6"))
    model = fb.create_model("retinanet", backbone="resnet18", num_classes=3)
    images = jnp.zeros((2, 64, 64, 3))
    with pytest.raises(ValueError, match="image_sizes"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images, jnp.array([[64, 64]]))
    with pytest.raises(ValueError, match="do not fit"):
        model.init(jax.random.PRNGKey(0), images, np.array([[64, 64], [65, 64]]))
    with pytest.raises(ValueError, match="targets"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=True))


def test_v1_legacy_head_keys(case, tmp_path):
    """torchvision's RetinaNet v1 COCO file predates Conv2dNormActivation: its head towers are
    `conv.{0,2,4,6}`; they load onto the same parameters."""
    if case["name"] != "retinanet_resnet50_fpn":
        pytest.skip("v1 only")
    old = lambda m: f"{m[1]}.{2 * int(m[2])}."  # noqa: E731
    state = {re.sub(r"(head\.\w+_head\.conv)\.(\d)\.0\.", old, k): v
             for k, v in case["tv"].state_dict().items()}
    assert "head.classification_head.conv.6.weight" in state
    path = tmp_path / "legacy.pth"
    torch.save(state, path)
    legacy = fb.load_pretrained(case["name"], path, num_classes=5)
    jax.tree.map(np.testing.assert_array_equal, legacy, case["variables"])
