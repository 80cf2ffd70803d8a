"""Swin V1/V2: parity with torchvision (eval, train) at an odd size, counts, contract, scan."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                 SwinTransformerBlockV2)

import flaxbones as fb
from flaxbones.backbones.swin import SwinTransformer as FlaxSwin
from flaxbones.backbones.swin import VARIANTS
from flaxbones.scan import scan_variables
from torch_ref import (assert_close, parameter_count, randomize, run,
                       save_state, torch_parameter_count)
from test_mobilenet import apply_with_features

# 67x93: stage maps 16x23, 8x12, 4x6, 2x3, none a multiple of the window; V1's first stage
# pads to 21x28 and shifts both ways, V2's second (8x16) only along the width.
IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
TAPS = dict(C2="features.1", C3="features.3", C4="features.5", C5="features.7")
NAMES = list(VARIANTS)
V2_DEPTHS = (2, 2, 2, 2)  # swin_v2_t's widths and heads, fewer blocks: one compile less big


@functools.cache
def reference(version):
    """swin_t, or swin_v2_t at V2_DEPTHS, with random LayerNorm affines; drop path off."""
    torch.manual_seed(0)
    if version == 1:
        model = torchvision.models.swin_t()
    else:
        model = SwinTransformer([4, 4], 96, list(V2_DEPTHS), [3, 6, 12, 24], [8, 8],
                                stochastic_depth_prob=0.0, block=SwinTransformerBlockV2,
                                downsample_layer=PatchMergingV2)
    for m in model.modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    return randomize(model, 1)


def torch_outputs(model, x, train):
    """(logits, {level: NHWC stage output}): torchvision's Swin stages are NHWC already."""
    feats = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda m, i, out, level=level: feats.__setitem__(level, out.detach().numpy().copy()))
        for level, path in TAPS.items()]
    try:
        return run(model, x, train=train), feats
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("swin")
    return {1: save_state(reference(1), path / "v1.safetensors"),
            2: save_state(reference(2), path / "v2.safetensors")}


@pytest.fixture(scope="module")
def loaded(weights):
    """{version: (name, create kwargs, variables loaded from the torchvision file)}."""
    out = {1: ("swin_t", {}), 2: ("swin_v2_t", {"depths": V2_DEPTHS})}
    return {v: (name, kw, fb.load_pretrained(name, weights[v], **kw))
            for v, (name, kw) in out.items()}


@pytest.mark.parametrize("version,train", [(1, False), (2, False), (2, True)])
def test_parity_with_torchvision(loaded, version, train):
    """Logits and C2..C5 of swin_t (eval) and swin_v2_t's code (eval, and train with drop
    path off: no batch statistics, the same maps) at 67x93."""
    name, kwargs, variables = loaded[version]
    logits, feats, _ = apply_with_features(fb.create_model(name, **kwargs), variables, IMAGES,
                                           train=train)
    want_logits, want = torch_outputs(reference(version), IMAGES, train)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    print(name, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_torchvision(name):
    """(Counted on the scanned form, which traces one block pair per stage.)"""
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name, scan_blocks=True), 32) == expected


def test_feature_info_matches_apply_shapes_and_bad_options():
    """Stride 32 only (windows cannot dilate); sizes round up after the stem (patch merging
    pads odd maps)."""
    bb = fb.create_backbone("swin_v2_t")
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C2", "C3", "C4", "C5"]
    assert [f.stride for f in bb.feature_info] == [4, 8, 16, 32]
    sizes = {4: (16, 23), 8: (8, 12), 16: (4, 6), 32: (2, 3)}
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), f
    clf = fb.create_model("swin_t", num_classes=0)
    out, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 32, 32, 3))))
    assert out["out"].shape == (1, 768)
    for stride in (8, 16):
        with pytest.raises(ValueError, match=f"output_stride={stride} is not supported"):
            fb.create_backbone("swin_t", output_stride=stride)
    with pytest.raises(ValueError, match="even"):
        fb.create_backbone("swin_t", depths=(2, 2, 5, 2), scan_blocks=True)


def narrow(**kwargs):
    return FlaxSwin(**{"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4),
                       **kwargs})


def random_variables(model, x, seed=0):
    """Seeded numpy values in `model`'s variable shapes (1-D leaves near 1): compiling a
    transformer's random init costs more than the test itself."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return jax.tree.map(lambda s: np.float32(
        1 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1
        else rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))), shapes)


def test_under_segmenters_and_a_detector():
    """A narrow Swin drives DeepLabv3+ (ASPP on C4, stride 16), applied under jit; a
    semantic FPN and a Faster R-CNN are traced end to end."""
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", backbone=narrow(), feature="C4", num_classes=3)
    out = jax.jit(seg.apply)(random_variables(seg, x), x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=narrow(), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=narrow(), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__


def test_scan_blocks_load_and_equal_unrolled_with_gradients(weights, loaded):
    """scan_blocks=True scans (unshifted, shifted) pairs: the torchvision file loads onto the
    scanned form (the stacked unscanned variables); a narrow one-stage Swin's outputs and
    input gradients equal the unrolled model's (two pairs, an 11x15 map that pads to 14x21
    and shifts both ways), with drop path set only on the scanned one (eval ignores it); in
    training the scanned blocks draw their masks."""
    plain_bb = loaded[1][2]["params"]["backbone"]
    scan_bb = fb.load_pretrained("swin_t", weights[1], scan_blocks=True)["params"]["backbone"]
    assert not any(k.startswith("features_5_") and k[-1].isdigit() for k in scan_bb)
    for i in range(6):  # stage 3: pair i // 2, slot i % 2
        slot = scan_bb["features_5_scan"]["block"][f"shift{i % 2}"]["block"]
        for a, b in zip(jax.tree.leaves(plain_bb[f"features_5_{i}"]),
                        jax.tree.leaves(jax.tree.map(lambda a, k=i // 2: a[k], slot))):
            np.testing.assert_array_equal(a, b)

    plain = narrow(depths=(4,), num_heads=(2,))
    scanned = plain.clone(drop_path_rate=0.5, scan_blocks=True)
    x = jnp.asarray(IMAGES[:2, :45, :61])
    v = random_variables(plain, x)
    vs = scan_variables(v, scanned)

    def grad(model, variables):
        loss = lambda x: jnp.sum(model.apply(variables, x)["C2"] ** 2)
        return jax.jit(jax.value_and_grad(loss))(x)
    (a, ga), (b, gb) = grad(plain, v), grad(scanned, vs)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, atol=1e-5 * np.abs(ga).max())
    train = jax.jit(lambda k: scanned.apply(vs, x, train=True, rngs={"dropout": k})["C2"])
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
