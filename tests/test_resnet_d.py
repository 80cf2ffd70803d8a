"""ResNet-D (timm's resnet50d / resnet101d: deep stem, average-pool shortcuts): parity with
timm (eval, train, dilated), counts, feature contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxbones as fb
from torch_ref import assert_close, randomize, run, save_state
from test_resnet import apply_with_features, torch_features

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
NAMES = ["resnet50d", "resnet101d"]
SHORT = dict(layers=(1, 1, 2, 1))  # resnet50d's code, fewer blocks


def reference(seed=1, **kwargs):
    torch.manual_seed(0)
    return randomize(timm.create_model("resnet50d", **kwargs), seed)


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_timm(train, tmp_path):
    """Logits and C1..C5 of resnet50d at an odd size (ceil-mode average pools on odd maps);
    in train mode the logits and updated running statistics (the scanned form, which
    compiles faster; timm's file loads onto both)."""
    ref = reference()
    variables = fb.load_pretrained("resnet50d", save_state(ref, tmp_path / "d.safetensors"),
                                   scan_blocks=train)
    model = fb.create_model("resnet50d", scan_blocks=train)
    logits, feats, stats = apply_with_features(model, variables, IMAGES, train=train)
    errors = {"logits": assert_close(logits, run(ref, IMAGES, train=train), what="logits")}
    if train:
        after = fb.load_pretrained("resnet50d", save_state(ref, tmp_path / "after.safetensors"),
                                   scan_blocks=True)
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(stats),
                                     jax.tree_util.tree_leaves(after["batch_stats"])):
            errors["stats"] = max(errors.get("stats", 0), assert_close(
                got, want, what=f"running stat {jax.tree_util.keystr(path)}"))
    else:
        for level, want in torch_features(ref.eval(), IMAGES).items():
            errors[level] = assert_close(feats[level], want, what=level)
    print("resnet50d", "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


def test_dilated_parity_with_timm(tmp_path):
    """output_stride 8 (timm's: stride-1 'same' 2x2 average pools in the dilated stages'
    shortcuts), on resnet50d's code with fewer blocks: logits and C5."""
    ref = reference(2, output_stride=8, **SHORT)
    variables = fb.load_pretrained("resnet50d", save_state(ref, tmp_path / "d8.safetensors"),
                                   output_stride=8, **SHORT)
    model = fb.create_model("resnet50d", output_stride=8, **SHORT)
    logits, feats, _ = apply_with_features(model, variables, IMAGES)
    errors = [assert_close(logits, run(ref, IMAGES), what="OS8 logits"),
              assert_close(feats["C5"], torch_features(ref.eval(), IMAGES)["C5"], what="OS8 C5")]
    print("resnet50d (fewer blocks) OS8 logits, C5", [f"{e:.1e}" for e in errors])


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_feature_info(name):
    """The classifier's parameter count equals timm's (built on 'meta'); feature_info
    matches apply's shapes at every output stride (scanned form: the same leaves)."""
    with torch.device("meta"):
        expected = sum(p.numel() for p in timm.create_model(name).parameters())
    x = jnp.zeros((2, 67, 93, 3))
    for output_stride in (8, 16, 32):
        clf = fb.create_model(name, output_stride=output_stride, scan_blocks=True)
        _, variables = jax.eval_shape(lambda: clf.init_with_output(
            jax.random.PRNGKey(0), x, capture_intermediates=lambda m, _: m.name == "backbone"))
        feats = variables["intermediates"]["backbone"]["__call__"][0]
        assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == expected
        assert [f.stride for f in clf.backbone.feature_info] == [
            2, 4, 8, min(16, output_stride), output_stride]
        assert [f.channels for f in clf.backbone.feature_info] == [64, 256, 512, 1024, 2048]
        for f in clf.backbone.feature_info:
            assert feats[f.name].shape == (2, -(-67 // f.stride), -(-93 // f.stride),
                                           f.channels), (name, output_stride, f)


def test_under_segmenters_and_a_detector():
    """resnet50d's code (fewer blocks) under DeepLabv3+ at output stride 16, a semantic FPN
    and a Faster R-CNN, traced end to end (the ResNet family's compiles are tested there)."""
    x = jnp.zeros((1, 64, 64, 3))
    seg = fb.create_model("deeplabv3plus", backbone=fb.create_backbone(
        "resnet50d", output_stride=16, **SHORT), num_classes=3)
    fpn = fb.create_model("fpn", backbone=fb.create_backbone("resnet50d", **SHORT),
                          num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=fb.create_backbone("resnet50d", **SHORT),
                          num_classes=3, fpn_channels=16, representation_size=16,
                          detections_per_img=5)
    for model, key, shape in ((seg, "out", (1, 64, 64, 3)), (fpn, "out", (1, 64, 64, 3)),
                              (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
