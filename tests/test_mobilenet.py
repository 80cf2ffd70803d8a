"""MobileNet V1/V2/V3: parity with timm/torchvision (eval, train, dilation), counts, contract."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones.backbones.mobilenet_v3 import LARGE, torch_rules
from flaxbones.weights.convert import convert_state_dict
from torch_ref import assert_close, randomize, run, save_state

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 97, 131, 3).astype(np.float32)
TV = torchvision.models
REFERENCES = {  # dropout off, so train-mode outputs are deterministic
    "mobilenet_v1": lambda: timm.create_model("mobilenetv1_100"),
    "mobilenet_v2_050": lambda: TV.mobilenet_v2(width_mult=0.5, dropout=0.0),
    "mobilenet_v2_075": lambda: TV.mobilenet_v2(width_mult=0.75, dropout=0.0),
    "mobilenet_v2": lambda: TV.mobilenet_v2(dropout=0.0),
    "mobilenet_v2_140": lambda: TV.mobilenet_v2(width_mult=1.4, dropout=0.0),
    "mobilenet_v3_large": lambda: TV.mobilenet_v3_large(dropout=0.0),
    "mobilenet_v3_small": lambda: TV.mobilenet_v3_small(dropout=0.0),
}
NAMES = list(REFERENCES)
# The torch module whose output each C-level is: the last one at strides 2, 4, 8, 16, 32.
V2_TAPS = dict(C1="features.1", C2="features.3", C3="features.6", C4="features.13", C5="features.18")
TAPS = {
    "mobilenet_v1": {f"C{i + 1}": f"blocks.{i}" for i in range(5)},
    **{name: V2_TAPS for name in NAMES if name.startswith("mobilenet_v2")},
    "mobilenet_v3_large": dict(C1="features.1", C2="features.3", C3="features.6",
                               C4="features.12", C5="features.16"),
    "mobilenet_v3_small": dict(C1="features.0", C2="features.1", C3="features.3",
                               C4="features.8", C5="features.12"),
}


def torch_outputs(model, modules, x, train=False):
    """(model output, {name: NHWC output of the torch module at that path}) in one forward."""
    feats = {}

    def hook(name):
        return lambda m, i, out: feats.__setitem__(name, out.detach().numpy().transpose(0, 2, 3, 1).copy())

    hooks = [model.get_submodule(path).register_forward_hook(hook(name)) for name, path in modules.items()]
    try:
        return run(model, x, train=train), feats
    finally:
        for h in hooks:
            h.remove()


def apply_with_features(model, variables, x, train=False):
    """(logits, backbone features, updated batch_stats or None) from one compiled call."""
    mutable = ["intermediates"] + (["batch_stats"] if train else [])
    out, state = jax.jit(lambda v, x: model.apply(
        v, x, train=train, capture_intermediates=lambda m, _: m.name == "backbone",
        mutable=mutable))(variables, x)
    return out["out"], state["intermediates"]["backbone"]["__call__"][0], state.get("batch_stats")


def check_parity(name, ref, tmp_path, train=False, **kwargs):
    variables = fb.load_pretrained(name, save_state(ref, tmp_path / f"{name}.safetensors"), **kwargs)
    logits, feats, stats = apply_with_features(fb.create_model(name, **kwargs), variables, IMAGES, train)
    expected_logits, expected = torch_outputs(ref, TAPS[name], IMAGES, train)
    errors = {"logits": assert_close(logits, expected_logits, what=f"{name} logits")}
    for level, want in expected.items():
        errors[level] = assert_close(feats[level], want, what=f"{name} {level}")
    print(name, "train" if train else "eval", kwargs, {k: f"{v:.1e}" for k, v in errors.items()})
    return variables, stats


@pytest.mark.parametrize("name", NAMES)
def test_eval_parity(name, tmp_path):
    torch.manual_seed(0)
    check_parity(name, randomize(REFERENCES[name](), seed=1), tmp_path)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large"])
def test_train_parity_with_running_statistics(name, tmp_path):
    torch.manual_seed(0)
    ref = randomize(REFERENCES[name](), seed=2)
    variables, stats = check_parity(name, ref, tmp_path, train=True)
    after = {k: v.numpy() for k, v in ref.state_dict().items()}
    expected, _ = convert_state_dict(after, variables, fb.get_spec(name).weights.rules)
    got_leaves = jax.tree_util.tree_leaves_with_path(stats)
    want_leaves = jax.tree_util.tree_leaves(expected["batch_stats"])
    assert len(got_leaves) == len(want_leaves) > 0
    for (path, got), want in zip(got_leaves, want_leaves):
        assert_close(got, want, what=f"{name} running stat {jax.tree_util.keystr(path)}")


def test_v3_os16_matches_torchvision_segmentation_backbone():
    """torchvision's LR-ASPP/DeepLabv3 backbone is mobilenet_v3_large(dilated=True).features
    with keys 'backbone.N...'; `torch_rules(src='backbone')` maps them, and the 'low'/'aux'
    tap (features.4) and 'high'/'out' tap (features.16 = C5) come out equal."""
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    backbone = randomize(seg.backbone, seed=3)
    assert dict(backbone.return_layers) == {"4": "low", "16": "high"}
    state = {k: v.numpy() for k, v in seg.state_dict().items() if k.startswith("backbone.")}
    bb = fb.create_backbone("mobilenet_v3_large", output_stride=16,
                            out_features=("C1", "C2", "C3", "C4", "C5", "features_4"))
    target = jax.eval_shape(partial(bb.init, train=False), jax.random.PRNGKey(0), IMAGES)
    variables, _ = convert_state_dict(state, target, torch_rules(LARGE, src="backbone", dst=""))
    feats = jax.jit(partial(bb.apply, train=False))(variables, IMAGES)
    taps = {level: path.split(".")[1] for level, path in TAPS["mobilenet_v3_large"].items()}
    low_high, expected = torch_outputs(backbone, taps, IMAGES)
    errors = {level: assert_close(feats[level], want, what=f"OS16 {level}")
              for level, want in expected.items()}
    errors["low"] = assert_close(feats["features_4"], low_high["low"], what="OS16 low (features.4)")
    errors["high"] = assert_close(feats["C5"], low_high["high"], what="OS16 high (features.16)")
    assert [(f.name, f.stride, f.channels) for f in bb.feature_info][-2:] == [
        ("C5", 16, 960), ("features_4", 8, 40)]
    print("mobilenet_v3_large OS16", {k: f"{v:.1e}" for k, v in errors.items()})


def test_v1_os8_matches_timm(tmp_path):
    torch.manual_seed(0)
    ref = randomize(timm.create_model("mobilenetv1_100", output_stride=8), seed=4)
    check_parity("mobilenet_v1", ref, tmp_path, output_stride=8)


def test_v2_os16_matches_timm(tmp_path):
    """torchvision's V2 cannot dilate; timm's mobilenetv2_100 can and holds the same tensors
    in the same order, so its weights are copied into torchvision's keys."""
    torch.manual_seed(0)
    dilated = randomize(timm.create_model("mobilenetv2_100", output_stride=16), seed=5)
    ref = TV.mobilenet_v2(dropout=0.0)
    ref.load_state_dict(dict(zip(ref.state_dict(), dilated.state_dict().values())))
    variables = fb.load_pretrained("mobilenet_v2", save_state(ref, tmp_path / "v2.safetensors"),
                                   output_stride=16)
    model = fb.create_model("mobilenet_v2", output_stride=16)
    logits, feats, _ = apply_with_features(model, variables, IMAGES)
    timm_taps = dict(C1="blocks.0", C2="blocks.1", C3="blocks.2", C4="blocks.4", C5="bn2")
    expected_logits, expected = torch_outputs(dilated, timm_taps, IMAGES)
    assert_close(logits, expected_logits, what="v2 OS16 logits")
    for level, want in expected.items():
        assert_close(feats[level], want, what=f"v2 OS16 {level}")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_reference(name):
    with torch.device("meta"):
        expected = sum(p.numel() for p in REFERENCES[name]().parameters())
    shapes = jax.eval_shape(fb.create_model(name).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes["params"])) == expected


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_matches_apply_shapes(name):
    x = jnp.zeros((2, 97, 131, 3))
    for output_stride in (8, 16, 32):
        bb = fb.create_backbone(name, output_stride=output_stride)
        out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0), x))
        assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
        assert bb.feature_info[-1].stride == output_stride
        for f in bb.feature_info:
            h, w = -(-97 // f.stride), -(-131 // f.stride)
            assert out[f.name].shape == (2, h, w, f.channels), (name, output_stride, f)


def test_unit_taps_and_pooled_classifiers():
    bb = fb.create_backbone("mobilenet_v2", out_features=("features_4", "C5"))
    assert [(f.name, f.stride, f.channels) for f in bb.feature_info] == [
        ("C5", 32, 1280), ("features_4", 8, 32)]
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert {k: v.shape for k, v in out.items()} == {"C5": (1, 2, 2, 1280), "features_4": (1, 8, 8, 32)}
    for name, width in (("mobilenet_v1", 1024), ("mobilenet_v2_140", 1792), ("mobilenet_v3_small", 576)):
        clf = fb.create_model(name, num_classes=0)
        pooled, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        assert pooled["out"].shape == (1, width)


def test_dtype_policy_is_threaded():
    clf = fb.create_model("mobilenet_v3_small", num_classes=10, dtype=jnp.bfloat16)
    out, variables = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert out["out"].dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large"])
@pytest.mark.parametrize("kwargs,message", [
    (dict(output_stride=4), "output_stride=4 is not supported"),
    (dict(out_features=("C6",)), "C6"),
    (dict(out_features=("features_99",)), "features_99"),
])
def test_bad_construction_is_a_clear_error(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fb.create_backbone(name, **kwargs)


def test_bad_images_are_a_clear_error():
    bb = fb.create_backbone("mobilenet_v3_small")
    with pytest.raises(ValueError, match="NCHW"):
        jax.eval_shape(bb.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 64, 64)))


def test_weights_of_another_variant_are_refused(tmp_path):
    path = save_state(TV.mobilenet_v3_small(), tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="nothing was loaded"):
        fb.load_pretrained("mobilenet_v3_large", path)
