"""scan_blocks: scanned and unscanned models give the same outputs, batch statistics and
gradients (remat included); variables convert both ways; weights load scanned."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones import train
from flaxbones.backbones.xception_aligned import XceptionAligned
from flaxbones.layers import conv_general_dilated
from flaxbones.scan import scan_variables, unscan_variables
from torch_ref import assert_close, randomize, save_state

IMAGES = jnp.asarray(np.random.RandomState(0).randn(2, 45, 51, 3), jnp.float32)
RESNET = dict(layers=(3, 2, 1, 3), num_classes=5, output_stride=16)  # layer4_scan dilated
XCEPTION = partial(XceptionAligned, entry=((16, 2), (32, 2), (728, 2)), middle=3)


def shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), dict(tree))


def init(model, x=IMAGES, seed=0):
    """Random variables of `model`'s shapes without compiling its init: unit-gain kernels,
    non-trivial BatchNorm affine parameters and running statistics."""
    rs = np.random.RandomState(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name or "scale" in name:
            return jnp.asarray(rs.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if "kernel" in name else 0.2
        return jnp.asarray(rs.normal(0, std, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, dict(abstract(model, x)))


def abstract(model, x=IMAGES):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def convert_shapes(fn, variables, model):
    return shapes(jax.eval_shape(partial(fn, model=model), variables))


def exact(a, b):
    assert jax.tree.structure(dict(a)) == jax.tree.structure(dict(b))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(dict(a)), jax.tree.leaves(dict(b))))


def grads_and_stats(model, variables):
    """(logits, grads, updated batch_stats) of a train-mode step, one compile."""
    def loss(params):
        out, state = model.apply({**variables, "params": params}, IMAGES, train=True,
                                 mutable=["batch_stats"])
        out = out["out"]
        return jnp.sum(out * jnp.arange(out.shape[-1])), (out, state["batch_stats"])

    grads, (out, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    return out, grads, stats


def close_trees(actual, expected, what, rel=1e-4):
    """Leaf by leaf, max |a - e| <= rel (fp32 parity) x max(|e| of the leaf, 1e-3 x |e| of
    the tree): a gradient that cancels to ~0 (a BN bias before another BN) is rounding."""
    flat_a = jax.tree_util.tree_leaves_with_path(dict(actual))
    flat_e = jax.tree.leaves(dict(expected))
    assert len(flat_a) == len(flat_e)
    floor = 1e-3 * max(float(np.max(np.abs(e))) for e in flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        err, scale = float(np.max(np.abs(a - e))), max(float(np.max(np.abs(e))), floor)
        assert err <= rel * scale, f"{what} {jax.tree_util.keystr(path)}: {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("kernel,dilation,padding", [
    (3, 1, "SAME"), (3, 2, ((2, 2), (2, 2))), (1, 1, "VALID"), (3, 1, ((0, 2), (1, 0))),
    (1, 1, ((1, 0), (0, 1)))])
def test_loop_conv_gradients_equal_lax(kernel, dilation, padding):
    rs = np.random.RandomState(1)
    x, w = rs.randn(2, 9, 11, 4).astype(np.float32), rs.randn(kernel, kernel, 4, 6).astype(np.float32)
    args = ((1, 1), padding, None, (dilation, dilation), ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args))), argnums=(0, 1))(x, w)
    in_loop = partial(conv_general_dilated, in_loop=True)
    for got, want in zip(loss(in_loop), loss(jax.lax.conv_general_dilated)):
        assert_close(got, want, rel=1e-5)


@pytest.fixture(scope="module")
def resnet():
    plain, scanned = fb.create_model("resnet18", **RESNET), fb.create_model(
        "resnet18", scan_blocks=True, **RESNET)
    v = init(plain)
    return plain, scanned, v, scan_variables(v, scanned)


def test_scanned_groups_and_tree_shapes(resnet):
    plain, scanned, v, sv = resnet
    assert scanned.backbone.scan_groups() == {"layer1_scan": ["layer1_1", "layer1_2"],
                                              "layer2_scan": ["layer2_1"],
                                              "layer4_scan": ["layer4_1", "layer4_2"]}
    assert shapes(sv) == shapes(abstract(scanned))
    assert sv["params"]["backbone"]["layer1_scan"]["block"]["conv1"]["kernel"].shape == (2, 3, 3, 64, 64)
    assert "layer1_1" not in sv["params"]["backbone"] and "layer3_0" in sv["params"]["backbone"]


def test_round_trip_is_exact(resnet):
    plain, scanned, v, sv = resnet
    exact(unscan_variables(sv, scanned), v)
    exact(scan_variables(unscan_variables(sv, plain), plain), sv)


def test_eval_outputs_equal(resnet):
    plain, scanned, v, sv = resnet
    assert_close(jax.jit(scanned.apply)(sv, IMAGES)["out"], jax.jit(plain.apply)(v, IMAGES)["out"],
                 rel=1e-6, what="eval logits")


def test_train_outputs_stats_and_gradients_equal_with_and_without_remat(resnet):
    plain, scanned, v, sv = resnet
    out, grads, stats = grads_and_stats(plain, v)
    for model, what in ((scanned, "scanned"), (train.remat_blocks(scanned), "scanned+remat")):
        s_out, s_grads, s_stats = grads_and_stats(model, sv)
        assert_close(s_out, out, rel=1e-5, what=f"{what} train logits")
        close_trees(unscan_variables({"params": s_grads, "batch_stats": s_stats}, plain),
                    {"params": grads, "batch_stats": stats}, what)


def test_output_stride_and_out_features_scanned():
    kw = dict(layers=(1, 1, 3, 2), output_stride=8, out_features=("C2", "C5"))
    plain = fb.create_backbone("resnet18", **kw)
    scanned = fb.create_backbone("resnet18", scan_blocks=True, **kw)
    v = init(plain)
    got = jax.jit(scanned.apply)(scan_variables(v, scanned), IMAGES)
    want = jax.jit(plain.apply)(v, IMAGES)
    assert got.keys() == want.keys() == {"C2", "C5"}
    for level in got:
        assert_close(got[level], want[level], rel=1e-6, what=level)
    for stride in (8, 16, 32):
        bb = fb.create_backbone("resnet50", output_stride=stride, scan_blocks=True)
        out = jax.eval_shape(bb.apply, abstract(bb), IMAGES)
        assert [(f.name, f.channels) for f in bb.feature_info] == [
            (k, a.shape[-1]) for k, a in out.items()]
        assert [-(-45 // f.stride) for f in bb.feature_info] == [a.shape[1] for a in out.values()]


@pytest.mark.parametrize("name,kwargs,groups", [
    ("resnet152", {}, {"layer1_scan": 2, "layer2_scan": 7, "layer3_scan": 35, "layer4_scan": 2}),
    ("resnet50", {"multi_grid": (1, 2, 4)}, {"layer1_scan": 2, "layer2_scan": 3, "layer3_scan": 5}),
    ("xception65", {"output_stride": 8}, {"blocks_middle": 16}),
    ("deeplabv3plus_xception65", {}, {"blocks_middle": 16}),
    ("deeplabv3_resnet50", {}, {"layer1_scan": 2, "layer2_scan": 3, "layer3_scan": 5,
                                "layer4_scan": 2}),
])
def test_named_models_scan_and_convert_by_shape(name, kwargs, groups):
    plain = fb.create_model(name, **kwargs)
    scanned = fb.create_model(name, scan_blocks=True, **kwargs)
    x = jnp.zeros((1, 64, 64, 3))
    v, sv = abstract(plain, x), abstract(scanned, x)
    assert {k: len(n) for k, n in scanned.backbone.scan_groups().items()} == groups
    assert convert_shapes(scan_variables, v, scanned) == shapes(sv)
    assert convert_shapes(unscan_variables, sv, plain) == shapes(v)


@pytest.fixture(scope="module")
def xception():
    plain = fb.Classifier(XCEPTION(), fb.create_model("xception65", num_classes=5).head)
    scanned = fb.Classifier(XCEPTION(scan_blocks=True), plain.head)
    v = init(plain)
    return plain, scanned, v, scan_variables(v, scanned)


def test_xception_eval_train_and_gradients_equal(xception):
    plain, scanned, v, sv = xception
    assert scanned.backbone.scan_groups() == {"blocks_middle": ["blocks_3", "blocks_4", "blocks_5"]}
    exact(unscan_variables(sv, plain), v)
    assert_close(jax.jit(scanned.apply)(sv, IMAGES)["out"], jax.jit(plain.apply)(v, IMAGES)["out"],
                 rel=1e-6, what="xception eval logits")
    out, grads, stats = grads_and_stats(plain, v)
    s_out, s_grads, s_stats = grads_and_stats(scanned, sv)
    assert_close(s_out, out, rel=1e-5, what="xception train logits")
    close_trees(unscan_variables({"params": s_grads, "batch_stats": s_stats}, plain),
                {"params": grads, "batch_stats": stats}, "xception")


def test_xception_middle_flow_after_a_projecting_block():
    bb = XceptionAligned(entry=((16, 2), (32, 2), (64, 2)), middle=3, scan_blocks=True)
    assert bb.scan_groups() == {"blocks_middle": ["blocks_4", "blocks_5"]}
    plain = bb.clone(scan_blocks=False)
    assert convert_shapes(scan_variables, abstract(plain), bb) == shapes(abstract(bb))


def test_load_pretrained_scanned_equals_load_then_scan(tmp_path):
    torch.manual_seed(0)
    path = save_state(randomize(torchvision.models.resnet50(), seed=1), tmp_path / "r50.safetensors")
    scanned = fb.load_pretrained("resnet50", path, scan_blocks=True)
    exact(scanned, scan_variables(fb.load_pretrained("resnet50", path),
                                  fb.create_model("resnet50", scan_blocks=True)))


def test_bad_conversions_are_clear_errors(resnet, xception):
    plain, scanned, v, sv = resnet
    with pytest.raises(ValueError, match="already scanned"):
        scan_variables(sv, scanned)
    with pytest.raises(ValueError, match="not a scanned tree"):
        unscan_variables(v, plain)
    with pytest.raises(ValueError, match="not an unscanned tree"):
        scan_variables(xception[2], scanned)  # an xception tree for a resnet
    broken = jax.tree.map(lambda a: a, sv)
    kernel = broken["params"]["backbone"]["layer1_scan"]["block"]["conv1"]["kernel"]
    broken["params"]["backbone"]["layer1_scan"]["block"]["conv1"]["kernel"] = kernel[:1]
    with pytest.raises(ValueError, match="leading axis of 2 blocks"):
        unscan_variables(broken, plain)
    with pytest.raises(ValueError, match="does not support scan_blocks"):
        scan_variables({}, fb.create_model("vgg11"))
    with pytest.raises(TypeError, match="scan_blocks"):
        fb.create_model("vgg11", scan_blocks=True)
