"""Xception family: parity with timm (xception65/71, legacy_xception), strides, counts, contract."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxbones as fb
from flaxbones.backbones.xception_aligned import XceptionModule
from flaxbones.layers import BatchNorm
from torch_ref import assert_close, randomize, save_state, to_numpy

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 97, 131, 3).astype(np.float32)
TIMM_NAMES = {"xception65": "xception65", "xception71": "xception71", "xception": "legacy_xception"}
STRIDES = {"xception65": (8, 16, 32), "xception71": (8, 16, 32), "xception": (32,)}
# timm modules whose outputs are flaxbones' C1..C5 (pre-ReLU where timm hooks a ReLU).
TAPS = {
    "xception65": ("blocks.0.stack.conv2", "blocks.1.stack.conv2", "blocks.2.stack.conv2",
                   "blocks.19.stack.conv2", "blocks.20"),
    "xception71": ("blocks.0.stack.conv2", "blocks.2.stack.conv2", "blocks.4.stack.conv2",
                   "blocks.21.stack.conv2", "blocks.22"),
    "xception": ("act2", "block1", "block2", "block11", "act4"),
}


def timm_model(name, output_stride=32, seed=0):
    torch.manual_seed(seed)
    kwargs = {} if name == "xception" else {"output_stride": output_stride}
    return randomize(timm.create_model(TIMM_NAMES[name], **kwargs), seed=seed + 1)


def timm_run(model, name, train=False):
    """(logits, {C1..C5}) of a timm model, features hooked where flaxbones taps them."""
    feats = {}
    hooks = [model.get_submodule(path).register_forward_hook(
        lambda m, i, o, level=f"C{k + 1}": feats.__setitem__(level, o.detach().clone()))
        for k, path in enumerate(TAPS[name])]
    model.train(train)
    with torch.no_grad():
        logits = model(torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy()))
    for h in hooks:
        h.remove()
    return to_numpy(logits), to_numpy(feats)


@functools.cache
def flax_fn(name, output_stride=32, train=False):
    """One compiled call per model and mode: (logits, features, updated batch_stats)."""
    model = fb.create_model(name, output_stride=output_stride)
    mutable = ["intermediates"] + (["batch_stats"] if train else [])

    def fn(variables, x):
        out, state = model.apply(variables, x, train=train, mutable=mutable,
                                 capture_intermediates=lambda m, _: m.name == "backbone")
        return out["out"], state["intermediates"]["backbone"]["__call__"][0], state.get("batch_stats")
    return jax.jit(fn)


def check_parity(name, ref, variables, train=False, output_stride=32):
    logits, feats, stats = flax_fn(name, output_stride, train)(variables, IMAGES)
    want_logits, want_feats = timm_run(ref, name, train)
    what = f"{name} OS{output_stride}{' train' if train else ''}"
    errors = {"logits": assert_close(logits, want_logits, what=f"{what} logits")}
    assert list(feats) == ["C1", "C2", "C3", "C4", "C5"]
    for level, want in want_feats.items():
        errors[level] = assert_close(feats[level], want, what=f"{what} {level}")
    print(what, {k: f"{v:.1e}" for k, v in errors.items()})
    return feats, stats


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_eval_parity_with_timm(name, tmp_path):
    ref = timm_model(name)
    variables = fb.load_pretrained(name, save_state(ref, tmp_path / f"{name}.safetensors"))
    feats, _ = check_parity(name, ref, variables)
    # timm's own features_only taps are the ReLU of flaxbones' pre-ReLU taps.
    with torch.no_grad():
        timm_feats = ref.eval().forward_intermediates(
            torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy()), intermediates_only=True)
    for level, want in zip(feats, to_numpy(timm_feats)):
        assert_close(jax.nn.relu(feats[level]), want, what=f"{name} relu({level}) vs timm")


def test_train_parity_with_timm_at_output_stride_8(tmp_path):
    """Train mode (outputs and updated running statistics) and dilation in one compiled call."""
    ref = timm_model("xception65", output_stride=8, seed=2)
    variables = fb.load_pretrained("xception65", save_state(ref, tmp_path / "x65.pth"),
                                   output_stride=8)
    feats, stats = check_parity("xception65", ref, variables, train=True, output_stride=8)
    assert feats["C5"].shape[1:3] == feats["C3"].shape[1:3] == (13, 17)
    after = fb.load_pretrained("xception65", save_state(ref, tmp_path / "after.safetensors"))
    got, want = (jax.tree_util.tree_leaves_with_path(s) for s in (stats, after["batch_stats"]))
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
    assert len(got) == len(want) == 2 * num_bn
    for (path, g), (_, w) in zip(got, want):
        assert_close(g, w, what=f"running stat {jax.tree_util.keystr(path)}")


def test_output_stride_16_parity_with_timm(tmp_path):
    ref = timm_model("xception65", 16, seed=3)
    variables = fb.load_pretrained("xception65", save_state(ref, tmp_path / "x65.safetensors"),
                                   output_stride=16)
    feats, _ = check_parity("xception65", ref, variables, output_stride=16)
    assert feats["C5"].shape[1:3] == feats["C4"].shape[1:3] == (7, 9)


@functools.cache
def abstract(name, output_stride=32):
    """(feature shapes, parameter count) of a classifier on IMAGES, without compiling."""
    model = fb.create_model(name, output_stride=output_stride)
    init = functools.partial(model.init_with_output, train=False,
                             capture_intermediates=lambda m, _: m.name == "backbone")
    _, variables = jax.eval_shape(init, jax.random.PRNGKey(0), IMAGES)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
    return variables["intermediates"]["backbone"]["__call__"][0], count


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_parameter_counts_match_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[name])
    assert abstract(name)[1] == sum(p.numel() for p in ref.parameters())
    assert abstract(name)[1] == {"xception65": 39_916_312, "xception71": 42_338_736,
                                      "xception": 22_855_952}[name]


def test_dilated_xception71_keeps_its_shortcut():
    """timm drops blocks.4.shortcut of xception71 at output_stride 8; DeepLab (and we) keep it,
    so the same weights load at every output stride."""
    with torch.device("meta"):
        ref = timm.create_model("xception71", output_stride=8)
    assert ref.blocks[4].shortcut is None
    assert abstract("xception71", 8)[1] == abstract("xception71")[1]
    shortcut = 728 * 728 + 2 * 728  # 1x1 conv and BN affine
    assert abstract("xception71", 8)[1] == sum(p.numel() for p in ref.parameters()) + shortcut


@pytest.mark.parametrize("name,output_stride",
                         [(n, s) for n, strides in STRIDES.items() for s in strides])
def test_feature_info_matches_shapes(name, output_stride):
    bb = fb.create_backbone(name, output_stride=output_stride)
    feats = abstract(name, output_stride)[0]
    assert list(feats) == [i.name for i in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
    assert bb.feature_info[-1].stride == output_stride
    for info in bb.feature_info:
        _, h, w, c = feats[info.name].shape
        assert c == info.channels
        if name == "xception":  # unpadded stem convs lose 4 pixels
            assert abs(h - 97 / info.stride) < 3 and abs(w - 131 / info.stride) < 3
        else:
            assert (h, w) == (-(-97 // info.stride), -(-131 // info.stride)), info


def test_feature_info_values():
    assert fb.create_backbone("xception65", output_stride=16).feature_info == (
        fb.FeatureInfo("C1", 2, 128), fb.FeatureInfo("C2", 4, 256), fb.FeatureInfo("C3", 8, 728),
        fb.FeatureInfo("C4", 16, 1024), fb.FeatureInfo("C5", 16, 2048))
    assert [i.channels for i in fb.create_backbone("xception").feature_info] == [
        64, 128, 256, 728, 2048]
    assert fb.get_spec("xception65").weights.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("output_stride", [8, 16, 64])
def test_legacy_xception_rejects_other_output_strides(output_stride):
    with pytest.raises(ValueError, match=f"output_stride={output_stride} is not supported"):
        fb.create_backbone("xception", output_stride=output_stride)
    with pytest.raises(ValueError, match="not supported"):
        fb.create_model("xception", output_stride=output_stride)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="output_stride=4 is not supported"):
        fb.create_backbone("xception65", output_stride=4)
    with pytest.raises(ValueError, match="multi_grid .* needs one rate"):
        fb.create_backbone("xception71", multi_grid=(1, 2))
    bb = fb.create_backbone("xception")
    init = functools.partial(bb.init, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="is the input NCHW"):
        jax.eval_shape(init, jnp.zeros((2, 3, 97, 131)))
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        jax.eval_shape(init, jnp.zeros((2, 5, 97, 3)))


def test_out_features_multi_grid_and_dtype():
    bb = fb.create_backbone("xception65", output_stride=16, out_features=("C2", "C5"),
                            multi_grid=(1, 2, 4), dtype=jnp.bfloat16)
    feats = jax.eval_shape(bb.init_with_output, jax.random.PRNGKey(0), jnp.zeros((1, 65, 65, 3)))[0]
    assert {k: v.shape for k, v in feats.items()} == {"C2": (1, 17, 17, 256), "C5": (1, 5, 5, 2048)}
    assert all(v.dtype == jnp.bfloat16 for v in feats.values())


def test_same_padding_mode():
    """'same' only changes where strided convs pad: equal on odd sizes, shifted on even."""
    norm = functools.partial(BatchNorm, use_running_average=True)
    block = {p: XceptionModule((8, 8, 16), True, stride=2, padding=p, norm=norm)
             for p in ("torch", "same")}

    @jax.jit
    def outputs(x_odd, x_even):
        variables = block["torch"].init(jax.random.PRNGKey(0), x_odd)
        return {(p, n): m.apply(variables, x)[0] for p, m in block.items()
                for n, x in (("odd", x_odd), ("even", x_even))}

    out = outputs(*(np.random.RandomState(n).randn(2, n, n, 4).astype(np.float32) for n in (9, 10)))
    np.testing.assert_allclose(out["same", "odd"], out["torch", "odd"], rtol=1e-6, atol=1e-6)
    assert out["same", "even"].shape == out["torch", "even"].shape == (2, 5, 5, 16)
    assert not np.allclose(out["same", "even"], out["torch", "even"], atol=1e-3)
