"""ResNet family: parity with torchvision (eval, train, dilation), counts, feature contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from torch_ref import assert_close, randomize, run, save_state

RESNETS = [n for n in fb.list_backbones("*res*") if hasattr(torchvision.models, n)]
IMAGES = np.random.RandomState(0).randn(2, 97, 131, 3).astype(np.float32)


def torch_features(model, x_nhwc):
    """C1..C5 of a torchvision ResNet, taken where flaxbones takes them."""
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        act = model.relu if hasattr(model, "relu") else model.act1  # timm names it act1
        c1 = act(model.bn1(model.conv1(x)))
        feats, x = {"C1": c1}, model.maxpool(c1)
        for i in range(1, 5):
            x = feats[f"C{i + 1}"] = getattr(model, f"layer{i}")(x)
    return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in feats.items()}


def apply_with_features(model, variables, x, train=False):
    """(logits, backbone features[, updated batch_stats]) from one compiled call."""
    mutable = ["intermediates"] + (["batch_stats"] if train else [])
    out, state = jax.jit(lambda v, x: model.apply(
        v, x, train=train, capture_intermediates=lambda m, _: m.name == "backbone",
        mutable=mutable))(variables, x)
    return out["out"], state["intermediates"]["backbone"]["__call__"][0], state.get("batch_stats")


def load_from_torch(name, torch_model, tmp_path, suffix=".safetensors", **kwargs):
    return fb.load_pretrained(name, save_state(torch_model, tmp_path / f"{name}{suffix}"), **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_eval_parity_with_torchvision(name, tmp_path):
    torch.manual_seed(0)
    ref = randomize(getattr(torchvision.models, name)(), seed=1)
    variables = load_from_torch(name, ref, tmp_path)
    logits, feats, _ = apply_with_features(fb.create_model(name), variables, IMAGES)
    assert_close(logits, run(ref, IMAGES), what=f"{name} logits")
    for level, expected in torch_features(ref.eval(), IMAGES).items():
        assert_close(feats[level], expected, what=f"{name} {level}")


def test_small_image_parity_with_torchvision(tmp_path):
    """64 px (the cifar10_resnet18 config): layer3 at 4x4 and layer4 at 2x2 take the CPU
    tiny-output path (im2col + matmul), which must still give torchvision's numbers."""
    torch.manual_seed(0)
    images = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    ref = randomize(torchvision.models.resnet18(num_classes=10), seed=3)
    variables = load_from_torch("resnet18", ref, tmp_path, num_classes=10)
    logits, feats, _ = apply_with_features(fb.create_model("resnet18", num_classes=10),
                                           variables, images)
    errors = {"logits": assert_close(logits, run(ref, images), what="resnet18 @64 logits")}
    for level, expected in torch_features(ref.eval(), images).items():
        errors[level] = assert_close(feats[level], expected, what=f"resnet18 @64 {level}")
    print("resnet18 @64 eval", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_train_parity_with_torchvision(name, tmp_path):
    torch.manual_seed(0)
    ref = randomize(getattr(torchvision.models, name)(), seed=2)
    variables = load_from_torch(name, ref, tmp_path, suffix=".pth")
    logits, _, stats = apply_with_features(fb.create_model(name), variables, IMAGES, train=True)
    assert_close(logits, run(ref, IMAGES, train=True), what=f"{name} train logits")
    expected = fb.load_pretrained(name, save_state(ref, tmp_path / "after.safetensors"))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(stats),
                                 jax.tree_util.tree_leaves(expected["batch_stats"])):
        assert_close(got, want, what=f"{name} running stat {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("output_stride,dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_dilation_parity_with_torchvision(output_stride, dilate, tmp_path):
    torch.manual_seed(0)
    ref = randomize(torchvision.models.resnet50(replace_stride_with_dilation=dilate), seed=3)
    variables = load_from_torch("resnet50", ref, tmp_path)
    model = fb.create_model("resnet50", output_stride=output_stride)
    logits, feats, _ = apply_with_features(model, variables, IMAGES)
    assert_close(logits, run(ref, IMAGES), what=f"OS{output_stride} logits")
    for level, expected in torch_features(ref.eval(), IMAGES).items():
        assert_close(feats[level], expected, what=f"OS{output_stride} {level}")


def test_basic_block_dilation_matches_timm(tmp_path):
    """torchvision cannot dilate ResNet-18; timm can, with the same key layout."""
    timm = pytest.importorskip("timm")
    ref = randomize(timm.create_model("resnet18", output_stride=8), seed=4)
    variables = load_from_torch("resnet18", ref, tmp_path)
    logits, feats, _ = apply_with_features(fb.create_model("resnet18", output_stride=8), variables, IMAGES)
    assert_close(logits, run(ref, IMAGES), what="resnet18 OS8 logits")
    assert_close(feats["C5"], torch_features(ref.eval(), IMAGES)["C5"], what="resnet18 OS8 C5")


def test_multi_grid_matches_manually_dilated_torch_model(tmp_path):
    """DeepLab multi-grid (1, 2, 4) at OS16: layer4 units use rates 2, 4, 8."""
    ref = randomize(torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]), 5)
    for block, rate in zip(ref.layer4, (2, 4, 8)):
        block.conv2.dilation, block.conv2.padding = (rate, rate), (rate, rate)
    variables = load_from_torch("resnet50", ref, tmp_path)
    model = fb.create_model("resnet50", output_stride=16, multi_grid=(1, 2, 4))
    logits, _, _ = apply_with_features(model, variables, IMAGES)
    assert_close(logits, run(ref, IMAGES), what="multi-grid logits")


@pytest.mark.parametrize("name", RESNETS)
def test_parameter_count_equals_torchvision(name):
    with torch.device("meta"):
        expected = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
    shapes = jax.eval_shape(fb.create_model(name).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes["params"])) == expected


@pytest.mark.parametrize("name", RESNETS)
def test_feature_info_matches_apply_shapes(name):
    x = jnp.zeros((2, 97, 131, 3))
    for output_stride in (8, 16, 32):
        bb = fb.create_backbone(name, output_stride=output_stride)
        out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0), x))
        assert list(out) == [f.name for f in bb.feature_info]
        for f in bb.feature_info:
            h, w = -(-97 // f.stride), -(-131 // f.stride)
            assert out[f.name].shape == (2, h, w, f.channels), (name, output_stride, f)


def test_out_features_and_pooled_classifier():
    bb = fb.create_backbone("resnet18", out_features=("C2", "C5"))
    assert [f.name for f in bb.feature_info] == ["C2", "C5"]
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert set(out) == {"C2", "C5"}
    clf = fb.create_model("resnet50", num_classes=0)
    pooled, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert pooled["out"].shape == (1, 2048)


def test_dtype_policy_is_threaded():
    clf = fb.create_model("resnet18", num_classes=10, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    out, variables = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert out["out"].dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name,kwargs,message", [
    ("resnet50", dict(output_stride=4), "output_stride=4 is not supported by ResNet"),
    ("resnet50", dict(output_stride=64), "output_stride=64"),
    ("resnet50", dict(out_features=("C6",)), "C6"),
    ("resnet50", dict(out_features=()), "out_features is empty"),
    ("resnet50", dict(multi_grid=(1, 2)), r"multi_grid \(1, 2\) needs one rate per unit .*\(3\)"),
    ("xception65", dict(multi_grid=(1, 2)), r"needs one rate per unit .*\(3\)"),
    ("mobilenet_v2", dict(multi_grid=(1, 2, 4)), "MobileNetV2 does not support multi_grid"),
    ("alexnet", dict(output_stride=16), "output_stride=16 is not supported by AlexNet"),
])
def test_bad_construction_fails_at_construction(name, kwargs, message):
    """Every family validates its options in one place, when the module is created."""
    with pytest.raises(ValueError, match=message):
        fb.create_backbone(name, **kwargs)


@pytest.mark.parametrize("shape,dtype,message", [
    ((64, 64, 3), jnp.float32, "NHWC"),
    ((1, 3, 64, 64), jnp.float32, "NCHW"),
    ((1, 64, 64, 1), jnp.float32, "3 channels"),
    ((1, 64, 64, 3), jnp.uint8, "float images"),
])
def test_bad_images_are_a_clear_error(shape, dtype, message):
    bb = fb.create_backbone("resnet18")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(bb.init, jax.random.PRNGKey(0), jnp.zeros(shape, dtype))
