"""DenseNet: parity with torchvision (eval, train), counts, dilation, contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from test_mobilenet import apply_with_features, torch_outputs
from torch_ref import assert_close, parameter_count, randomize, save_state, torch_parameter_count

import flaxbones as fb
from flaxbones.backbones.densenet import VARIANTS, DenseNet
from flaxbones.weights.convert import convert_state_dict

IMAGES = np.random.RandomState(0).randn(2, 45, 67, 3).astype(np.float32)
TAPS = dict(C1="features.relu0", C2="features.denseblock1", C3="features.denseblock2",
            C4="features.denseblock3", C5="features.norm5")  # C5: relu(norm5), applied below
NARROW = dict(growth_rate=8, block_config=(2, 1, 1, 2), num_init_features=16, bn_size=2)


def _check(name, ref, images, train, tmp_path, **kwargs):
    """Logits, C1..C5 (and in train mode the running statistics) of `name` built with
    `kwargs` against `ref`, one file loaded by the registered rules."""
    variables = fb.load_pretrained(name, save_state(ref, tmp_path / "d.safetensors"), **kwargs)
    logits, feats, stats = apply_with_features(fb.create_model(name, **kwargs), variables, images,
                                               train=train)
    want_logits, want = torch_outputs(ref, TAPS, images, train=train)
    want["C5"] = np.maximum(want["C5"], 0)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    if train:
        after = {k: v.numpy() for k, v in ref.state_dict().items()}
        expected, _ = convert_state_dict(after, variables, fb.get_spec(name).weights.rules)
        got, wanted = jax.tree.leaves(stats), jax.tree.leaves(expected["batch_stats"])
        assert len(got) == len(wanted) > 0
        errors["running stats"] = max(assert_close(g, w) for g, w in zip(got, wanted))
    print(name, kwargs, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


def test_eval_parity_with_torchvision(tmp_path):
    """Logits and C1..C5 of densenet121 on a 45x67 input (odd sizes: floor-mode pools)."""
    torch.manual_seed(0)
    _check("densenet121", randomize(torchvision.models.densenet121(), 1), IMAGES, False, tmp_path)


def test_train_parity_with_torchvision(tmp_path):
    """Train mode (batch statistics, running-statistics updates) on the family's code at a
    narrow configuration (torchvision's DenseNet class with the same arguments), where the
    67x93 input leaves C5 enough pixels for well-conditioned batch statistics."""
    torch.manual_seed(0)
    ref = randomize(torchvision.models.DenseNet(**NARROW), 2)
    images = np.random.RandomState(2).randn(2, 67, 93, 3).astype(np.float32)
    _check("densenet121", ref, images, True, tmp_path, **NARROW)


def test_old_style_keys_load():
    """torchvision's published files name dense-layer children `norm.1` / `conv.2`
    (torchvision renames them on load); the same rules take both spellings."""
    from flaxbones.weights.convert import map_module_path
    rules = fb.get_spec("densenet121").weights.rules
    for key in ("features.denseblock2.denselayer10.norm.1",
                "features.denseblock2.denselayer10.norm1"):
        assert map_module_path(key, rules) == "backbone/denseblock2_denselayer10/norm1"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_torchvision(name):
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name)) == expected


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_info_matches_apply_shapes(output_stride):
    bb = fb.create_backbone("densenet121", output_stride=output_stride)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 45, 67, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.channels for f in bb.feature_info] == [64, 256, 512, 1024, 1024]
    assert [f.stride for f in bb.feature_info] == [2, 4, 8, min(16, output_stride), output_stride]
    sizes = {2: (23, 34), 4: (12, 17), 8: (6, 8), 16: (3, 4), 32: (1, 2)}  # floor pools
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), (output_stride, f)


def test_dilated_is_the_dense_evaluation():
    """output_stride 16 / 8 is the undilated network evaluated densely: on a 64x64 input
    (no padding read where it matters) C5 (and at OS8, C4) sampled every 2 / 4 pixels
    equals the plain model's."""
    x = jnp.asarray(np.random.RandomState(1).randn(1, 64, 64, 3).astype(np.float32))
    plain = DenseNet(**NARROW)
    variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
    run = jax.jit(lambda model, v: model.apply(v, x), static_argnums=0)
    want = run(plain, variables)
    for os_, step in ((16, 2), (8, 4)):
        got = run(DenseNet(**NARROW, output_stride=os_), variables)
        assert_close(got["C5"][:, ::step, ::step], want["C5"], what=f"C5 at OS{os_}")
        if os_ == 8:
            assert_close(got["C4"][:, ::2, ::2], want["C4"], what="C4 at OS8")
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone("densenet121", output_stride=4)


def test_under_segmenters_and_a_detector():
    """A narrow DenseNet drives DeepLabv3+ at output stride 16 under jit; a semantic FPN and
    a Faster R-CNN are traced end to end."""
    x = jnp.asarray(np.random.RandomState(3).randn(1, 64, 64, 3).astype(np.float32))
    seg = fb.create_model("deeplabv3plus", backbone=DenseNet(**NARROW, output_stride=16),
                          num_classes=3)
    out = jax.jit(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x))(x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=DenseNet(**NARROW), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=DenseNet(**NARROW), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
