"""EfficientNet V1/V2: parity with torchvision (eval, train) and timm (dilated), counts,
feature contract, stochastic depth, under segmenters and a detector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones.backbones.efficientnet import (TIMM_RULES, TORCHVISION_DROPOUT, EfficientNet,
                                             FusedMBConv)
from flaxbones.layers import InvertedResidual
from flaxbones.weights.convert import convert_state_dict
from torch_ref import assert_close, randomize, save_state
from test_mobilenet import apply_with_features, torch_outputs

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
NAMES = list(TORCHVISION_DROPOUT)
V1_TAPS = dict(C1="features.1", C2="features.2", C3="features.3", C4="features.5",
               C5="features.8")
V2_S_TAPS = {**V1_TAPS, "C5": "features.7"}
# A narrow net with every block kind: fused without / with expansion, MBConv with a residual.
NARROW = (("fused", 1, 3, 1, 8, 8, 1), ("fused", 4, 3, 2, 8, 16, 2), ("mb", 4, 3, 2, 16, 16, 2),
          ("mb", 4, 5, 2, 16, 24, 1), ("mb", 6, 3, 2, 24, 32, 2))


def reference(name="efficientnet_b0", seed=1):
    """torchvision's model, dropout and stochastic depth off (deterministic in training)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(dropout=0.0, stochastic_depth_prob=0.0)
    return randomize(model, seed)


def check_parity(name, ref, taps, path, images, train, **kwargs):
    variables = fb.load_pretrained(name, save_state(ref, path), **kwargs)
    logits, feats, stats = apply_with_features(fb.create_model(name, **kwargs), variables,
                                               images, train)
    want_logits, want = torch_outputs(ref, taps, images, train=train)
    errors = {"logits": assert_close(logits, want_logits, what=f"{name} logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=f"{name} {level}")
    print(name, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})
    return variables, stats


@pytest.mark.parametrize("train", [False, True])
def test_b0_parity_with_torchvision(train, tmp_path):
    """Logits and C1..C5 of efficientnet_b0 (random BN statistics, an odd input size); in
    train mode (drop path off) the outputs and every running statistic."""
    ref = reference()
    variables, stats = check_parity("efficientnet_b0", ref, V1_TAPS, tmp_path / "b0.safetensors",
                                    IMAGES, train)
    if train:
        after = {k: v.numpy() for k, v in ref.state_dict().items()}
        rules = fb.get_spec("efficientnet_b0").weights.rules
        expected, _ = convert_state_dict(after, variables, rules)
        got = jax.tree_util.tree_leaves_with_path(stats)
        want = jax.tree_util.tree_leaves(expected["batch_stats"])
        assert len(got) == len(want) > 0
        for (path, a), b in zip(got, want):
            assert_close(a, b, what=f"running stat {jax.tree_util.keystr(path)}")


def test_v2_s_parity_with_torchvision(tmp_path):
    """efficientnet_v2_s (FusedMBConv stages, BN eps 1e-3) in eval mode at a tiny size, with
    lax's convolutions (b0 proves the CPU kernels; they compile slower)."""
    check_parity("efficientnet_v2_s", reference("efficientnet_v2_s"), V2_S_TAPS,
                 tmp_path / "v2s.safetensors", IMAGES[:1, :35, :45], train=False,
                 cpu_kernels=False)


def test_dilated_matches_timm():
    """output_stride 8 against timm's efficientnet_b0 (the same network; its weights mapped
    by TIMM_RULES), with lax's convolutions (the CPU kernels' dilation is tested in layers):
    C5 at stride 8 and equal, two strided stages dilated, the second's first block at the
    first's dilation. (Stride 16 is the same rule on one stage: shapes below, and against
    timm in test_mnasnet.)"""
    torch.manual_seed(0)
    ref = randomize(timm.create_model("efficientnet_b0", output_stride=8), 2).eval()
    model = fb.create_backbone("efficientnet_b0", output_stride=8, cpu_kernels=False)
    assert model.feature_info[-1].stride == 8
    x = IMAGES[:1, :49, :57]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x))
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("classifier")}
    converted, _ = convert_state_dict(state, {c: {"backbone": t} for c, t in shapes.items()},
                                      TIMM_RULES)
    got = jax.jit(model.apply)({c: v["backbone"] for c, v in converted.items()}, x)
    with torch.no_grad():
        want = ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert_close(got["C5"], want.numpy().transpose(0, 2, 3, 1), what="C5 at output stride 8")


def numpy_variables(model, x, seed=0):
    """Scaled random variables from numpy for `model.init(key, x)`'s tree: no compiled RNG
    (init compiles slowly on CPU)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape)
        return rng.standard_normal(s.shape) * 0.1
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(leaf(p, s), s.dtype), shapes)


def _traced(model, x):
    """(parameter count, backbone features) of `model` (a classifier), traced only."""
    capture = lambda m, _: m.name == "backbone"  # noqa: E731
    _, variables = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), x, capture_intermediates=capture))
    count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables["params"]))
    return count, variables["intermediates"]["backbone"]["__call__"][0]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_feature_info(name):
    """Every name: the parameter count of torchvision's model, and `feature_info` equal to
    the traced features (names, strides, channels) at an odd size."""
    with torch.device("meta"):
        expected = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
    model = fb.create_model(name, cpu_kernels=False)
    count, feats = _traced(model, jnp.zeros((2, 67, 93, 3)))
    assert count == expected
    _check_features(model.backbone.feature_info, feats, 32)


SIZES = {2: (34, 47), 4: (17, 24), 8: (9, 12), 16: (5, 6), 32: (3, 3)}  # ceil at each stride


def _check_features(info, feats, output_stride):
    assert list(feats) == [f.name for f in info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.stride for f in info] == [2, 4, 8, min(16, output_stride), output_stride]
    for f in info:
        assert feats[f.name].shape == (2, *SIZES[f.stride], f.channels), (output_stride, f)


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_v2_s"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_feature_info_matches_apply_shapes(name, output_stride):
    bb = fb.create_backbone(name, output_stride=output_stride, cpu_kernels=False)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    _check_features(bb.feature_info, out, output_stride)


def test_drop_path_in_train_mode_only():
    """drop_path_rate > 0 draws from the 'dropout' rng in training (two keys differ); block
    i of n gets rate * i / n (torchvision's rule)."""
    model = EfficientNet(stages=NARROW, drop_path_rate=0.5, cpu_kernels=False)
    x = jnp.asarray(IMAGES[:2, :32, :32])
    variables = numpy_variables(model, x)
    run = jax.jit(lambda k: model.apply(variables, x, train=True, rngs={"dropout": k},
                                        mutable=["batch_stats"])[0]["C5"])
    assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))
    rates = {}

    def record(module, _):
        if isinstance(module, (InvertedResidual, FusedMBConv)):
            rates[module.name] = module.drop_path_rate
        return False
    jax.eval_shape(lambda: model.apply(variables, x, capture_intermediates=record))
    assert list(rates.values()) == [0.5 * i / 8 for i in range(8)]


def test_bad_options_and_pre_logits():
    clf = fb.create_model("efficientnet_b0", num_classes=0, cpu_kernels=False)
    out = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 32, 32, 3)))[0])
    assert out["out"].shape == (1, 1280)
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone("efficientnet_b0", output_stride=4)
    with pytest.raises(ValueError, match="C6"):
        fb.create_backbone("efficientnet_v2_s", out_features=("C6",))
    taps = fb.create_backbone("efficientnet_b0", out_features=("features_4_2", "C5"))
    assert [(f.name, f.stride, f.channels) for f in taps.feature_info] == [
        ("C5", 32, 1280), ("features_4_2", 16, 80)]


def test_under_segmenters_and_a_detector():
    """A narrow EfficientNet (the family's code, every block kind) drives DeepLabv3+ at
    output stride 16, applied under jit; a semantic FPN and a Faster R-CNN are traced end
    to end."""
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", num_classes=3,
                          backbone=EfficientNet(stages=NARROW, output_stride=16, cpu_kernels=False))
    out = jax.jit(seg.apply)(numpy_variables(seg, x), x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=EfficientNet(stages=NARROW), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=EfficientNet(stages=NARROW), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
