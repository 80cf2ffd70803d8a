"""ViT: parity with torchvision (eval, train) and timm (resampled position embedding at a
non-square size), counts, contract, the simple feature pyramid under segmenters and a
detector, scan_blocks, drop path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import flaxbones as fb
from flaxbones.backbones.vit import TIMM_VARIANTS, VARIANTS, VisionTransformer, bicubic_matrix
from torch_ref import assert_close, randomize, save_state
from test_mobilenet import apply_with_features

timm = pytest.importorskip("timm")

RNG = np.random.RandomState(0)
IMAGES = RNG.randn(2, 48, 48, 3).astype(np.float32)  # torchvision's ViT takes image_size only
WIDE = RNG.randn(2, 48, 64, 3).astype(np.float32)  # a 3x4 grid: the 14x14 embedding resampled
NARROW = {"num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}
TV_NARROW = dict(image_size=48, patch_size=16, num_classes=10, **NARROW)


def torchvision_reference():
    torch.manual_seed(0)
    ref = randomize(torchvision.models.VisionTransformer(**TV_NARROW), 1)
    torch.nn.init.normal_(ref.heads.head.weight, std=0.2)  # torchvision's is zeros
    return ref


def timm_reference():
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
        num_classes=10, dynamic_img_size=True)
    return randomize(ref, 2)


def torch_tokens(ref, norm_module, x, train=False):
    """(logits, final-normed tokens (N, 1 + L, D)) of a torch ViT in one forward."""
    seen = {}
    hook = ref.get_submodule(norm_module).register_forward_hook(
        lambda m, i, out: seen.__setitem__("tokens", out.detach().numpy().copy()))
    ref.train(train)
    try:
        with torch.no_grad():
            logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    finally:
        hook.remove()
    return logits, seen["tokens"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_state(torchvision_reference(), tmp_path_factory.mktemp("vit") / "t.safetensors")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_torchvision(weights, train):
    """A narrow torchvision VisionTransformer (2 layers, hidden 64, 4 heads, 48 px: its own
    48/16 grid, random LayerNorm affines): logits, C4 and the class token."""
    kwargs = dict(num_classes=10, image_size=48, **NARROW)
    variables = fb.load_pretrained("vit_b_16", weights, **kwargs)
    logits, feats, _ = apply_with_features(fb.create_model("vit_b_16", **kwargs), variables,
                                           IMAGES, train=train)
    want_logits, tokens = torch_tokens(torchvision_reference(), "encoder.ln", IMAGES, train)
    errors = [assert_close(logits, want_logits, what="logits"),
              assert_close(feats["class_token"], tokens[:, 0], what="class token"),
              assert_close(feats["C4"], tokens[:, 1:].reshape(2, 3, 3, 64), what="C4")]
    print("vit torchvision", "train" if train else "eval", [f"{e:.1e}" for e in errors])


def test_parity_with_timm_at_a_resampled_size(tmp_path):
    """timm's ViT (pretraining size 224, `dynamic_img_size`) on 48x64 inputs resamples its
    14x14 position embedding to 3x4 (bicubic, antialiased as timm's default); its file
    loads onto the same modules by TIMM_RULES and the outputs agree."""
    ref = timm_reference()
    path = save_state(ref, tmp_path / "timm.safetensors")
    kwargs = dict(num_classes=10, **NARROW)
    variables = fb.load_pretrained("vit_small_patch16_224", path, **kwargs)
    logits, feats, _ = apply_with_features(fb.create_model("vit_small_patch16_224", **kwargs),
                                           variables, WIDE)
    want_logits, tokens = torch_tokens(ref, "norm", WIDE)
    errors = [assert_close(logits, want_logits, what="logits"),
              assert_close(feats["C4"], tokens[:, 1:].reshape(2, 3, 4, 64), what="C4")]
    print("vit timm 48x64", [f"{e:.1e}" for e in errors])


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_resampling_matches_torch(antialias):
    """The resampling weights equal torch's bicubic F.interpolate (align_corners=False),
    up and down, plain (a=-0.75) and antialiased."""
    for old, new in (((14, 14), (3, 4)), ((3, 3), (7, 5)), ((14, 14), (20, 9))):
        grid = np.random.RandomState(1).randn(1, 5, *old).astype(np.float32)
        want = F.interpolate(torch.from_numpy(grid), size=new, mode="bicubic",
                             align_corners=False, antialias=antialias)[0].numpy()
        got = np.einsum("ih,chw,jw->cij", bicubic_matrix(old[0], new[0], antialias), grid[0],
                        bicubic_matrix(old[1], new[1], antialias))
        np.testing.assert_allclose(got, want, atol=1e-5)


def _count(params):
    return sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", [*VARIANTS, *TIMM_VARIANTS])
def test_parameter_count_and_feature_info(name):
    """Every name: parameters equal the reference's (torch on the meta device, shapes only
    here), and feature_info matches the features at an odd size (floor(size / patch))."""
    with torch.device("meta"):
        ref = (getattr(torchvision.models, name)() if name in VARIANTS else
               timm.create_model(name))
        expected = sum(p.numel() for p in ref.parameters())
    model = fb.create_model(name)
    out, v = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((2, 67, 93, 3)),
        capture_intermediates=lambda m, _: m.name == "backbone"))
    assert _count(v["params"]) == expected
    feats = v["intermediates"]["backbone"]["__call__"][0]
    assert list(feats) == [f.name for f in model.feature_info]
    for f in model.feature_info:
        want = (2, f.channels) if f.name == "class_token" else (
            2, 67 // f.stride, 93 // f.stride, f.channels)
        assert feats[f.name].shape == want, (name, f)
    level = model.feature_info[0]
    assert (level.name, level.stride) == {14: ("C4", 14), 16: ("C4", 16), 32: ("C5", 32)}[
        model.backbone.patch_size]
    assert out["out"].shape == (2, 1000)


@pytest.mark.parametrize("name, output_stride", [("vit_b_16", 16), ("vit_b_16", 32),
                                                 ("vit_b_32", 32)])
def test_simple_pyramid_feature_info(name, output_stride):
    """simple_pyramid: C2..C5 at 4/8/16/32 (C5 at 16 with output_stride 16)."""
    bb = fb.create_backbone(name, simple_pyramid=True, output_stride=output_stride,
                            num_layers=1)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert [(f.name, f.stride) for f in bb.feature_info] == [
        ("C2", 4), ("C3", 8), ("C4", 16), ("C5", output_stride)]
    grid = (67 // bb.patch_size, 93 // bb.patch_size)
    for f in bb.feature_info:
        scale = bb.patch_size / f.stride
        size = tuple(int(g * scale) if scale >= 1 else g // int(1 / scale) for g in grid)
        assert out[f.name].shape == (2, *size, 256), f


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="output_stride=8 .* patch size 16"):
        fb.create_backbone("vit_b_16", output_stride=8)
    with pytest.raises(ValueError, match="simple_pyramid=True adds stride 32"):
        fb.create_backbone("vit_b_16", output_stride=32)
    with pytest.raises(ValueError, match="output_stride=16 .* patch size 32"):
        fb.create_backbone("vit_b_32", output_stride=16)
    with pytest.raises(ValueError, match="power-of-two patch size"):
        fb.create_backbone("vit_h_14", simple_pyramid=True)
    with pytest.raises(ValueError, match="C3"):
        fb.create_backbone("vit_b_16", out_features=("C3",))
    bb = VisionTransformer(**NARROW)
    with pytest.raises(ValueError, match=r"missing \['C2', 'C5'\]"):
        fb.create_model("deeplabv3plus", backbone=bb, num_classes=3)
    with pytest.raises(ValueError, match=r"missing \['C2', 'C3', 'C5'\]"):
        fb.create_model("fpn", backbone=bb, num_classes=3)
    with pytest.raises(ValueError, match=r"detector needs .* \(missing \['C2', 'C3', 'C5'\]"):
        fb.create_model("fasterrcnn", backbone=bb, num_classes=3)
    clf = fb.create_model("vit_b_16", num_classes=0, **NARROW)
    out, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 32, 32, 3))))
    assert out["out"].shape == (1, 64)


def test_under_segmenters_and_a_detector():
    """A narrow ViT with the simple pyramid drives DeepLabv3+ at output stride 16 (C5 kept at
    16), initialised and applied under jit; a semantic FPN and a Faster R-CNN (stride 32)
    are traced end to end."""
    narrow = dict(NARROW, num_layers=1, simple_pyramid=True, pyramid_channels=16)
    x = jnp.asarray(WIDE[:1])
    seg = fb.create_model("deeplabv3plus", backbone=VisionTransformer(**narrow, output_stride=16),
                          num_classes=3)
    out = jax.jit(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x))(x)
    assert out["out"].shape == (1, 48, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=VisionTransformer(**narrow), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=VisionTransformer(**narrow), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 48, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x, m=model: m.apply(m.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__


def test_scan_blocks_load_and_equal_unrolled_with_gradients(weights):
    """scan_blocks=True: the torchvision file loads onto the scanned form (the stacked
    unscanned variables); outputs and input gradients equal the unrolled model's; in
    training each scanned block draws its own drop-path mask, and eval ignores drop path."""
    from flaxbones.scan import scan_variables
    kwargs = dict(num_classes=10, image_size=48, **NARROW)
    v_plain = fb.load_pretrained("vit_b_16", weights, **kwargs)
    v_scan = fb.load_pretrained("vit_b_16", weights, scan_blocks=True, **kwargs)
    assert "encoder_scan" in v_scan["params"]["backbone"]
    stacked = scan_variables(v_plain, fb.create_model("vit_b_16", scan_blocks=True, **kwargs))
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(v_scan)):
        np.testing.assert_array_equal(a, b)

    plain = fb.create_model("vit_b_16", drop_path_rate=0.5, **kwargs)
    scanned = fb.create_model("vit_b_16", drop_path_rate=0.5, scan_blocks=True, **kwargs)
    x = jnp.asarray(IMAGES)

    def grad(model, variables):
        loss = lambda x: jnp.sum(model.apply(variables, x)["out"] ** 2)
        return jax.jit(jax.value_and_grad(loss))(x)
    (a, ga), (b, gb) = grad(plain, v_plain), grad(scanned, v_scan)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, atol=1e-5 * np.abs(ga).max())
    want, _ = torch_tokens(torchvision_reference(), "encoder.ln", IMAGES)
    np.testing.assert_allclose(a, np.sum(want ** 2), rtol=1e-4)  # eval: no drop path
    train = jax.jit(lambda k: scanned.apply(v_scan, x, train=True, rngs={"dropout": k})["out"])
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
