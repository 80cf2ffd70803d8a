"""Heads and segmenters: resize exactness, head parity on random features, the
backbone x head matrix (eval_shape), one compiled all-heads run, DeepLabv3+ shapes and
parameter counts, composition and bad-input errors."""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flaxbones as fb
from flaxbones.heads import (FPN, DeepLabV3Head, DeepLabV3PlusHead, FCNHead, LRASPPHead,
                             SemanticFPNHead, UNetHead, deeplab_style)
from flaxbones.heads.fpn import TORCHVISION_FPN_RULES
from flaxbones.layers import resize_bilinear, resize_nearest
from flaxbones.weights import convert_state_dict
import torch_ref

RNG = jax.random.PRNGKey(0)
HEADS = {  # generic segmenter name -> keyword arguments
    "deeplabv3": {}, "deeplabv3_tf": {"style": "tf"}, "deeplabv3plus": {},
    "deeplabv3plus_tf": {"style": "tf"}, "fcn": {"aux_loss": True}, "lraspp": {}, "fpn": {},
    "unet": {},
}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _create(head, backbone, **kwargs):
    return fb.create_model(head.removesuffix("_tf"), backbone=backbone, num_classes=5,
                           **{**HEADS[head], **kwargs})


# --- resizing -------------------------------------------------------------------------

@pytest.mark.parametrize("src, dst", [((7, 9), (29, 33)), ((1, 1), (5, 6)), ((29, 33), (7, 9)),
                                      ((13, 17), (97, 131)), ((4, 5), (4, 5)), ((3, 8), (1, 1))])
def test_resize_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
    for align in (False, True):
        want = F.interpolate(_nchw(x), size=dst, mode="bilinear", align_corners=align)
        torch_ref.assert_close(resize_bilinear(jnp.asarray(x), dst, align),
                               want.numpy().transpose(0, 2, 3, 1), rel=2e-6, what=f"ac={align}")
    want = F.interpolate(_nchw(x), size=dst, mode="nearest").numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(resize_nearest(jnp.asarray(x), dst), want)


def test_resize_rejects_empty_target():
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(jnp.zeros((1, 4, 4, 1)), (0, 3))


# --- head parity against torchvision on random features --------------------------------

def _load(torch_module, prefix, rules, flax_module, inputs, wrap="head"):
    """Variables for `flax_module` from `torch_module`'s state under `prefix`."""
    state = {f"{prefix}.{k}": v.numpy() for k, v in torch_module.state_dict().items()}
    shapes = jax.eval_shape(flax_module.init, RNG, *inputs)
    target = {col: {wrap: tree} for col, tree in shapes.items()} if wrap else shapes
    variables, _ = convert_state_dict(state, target, rules)
    return {col: tree[wrap] for col, tree in variables.items()} if wrap else variables


def test_lraspp_head_matches_torchvision():
    from torchvision.models.segmentation.lraspp import LRASPPHead as TorchLRASPP
    torch.manual_seed(0)
    ref = torch_ref.randomize(TorchLRASPP(8, 24, 5, 16)).eval()
    rng = np.random.default_rng(1)
    low = rng.standard_normal((2, 13, 17, 8)).astype(np.float32)
    high = rng.standard_normal((2, 7, 9, 24)).astype(np.float32)
    head = LRASPPHead(5, inter_channels=16)
    feats = {"C3": jnp.asarray(low), "C5": jnp.asarray(high)}
    variables = _load(ref, "classifier", LRASPPHead.torch_rules(), head, (feats,))
    with torch.no_grad():
        want = ref({"low": _nchw(low), "high": _nchw(high)}).numpy().transpose(0, 2, 3, 1)
    rel = torch_ref.assert_close(head.apply(variables, feats), want, what="lraspp head")
    print(f"LRASPPHead: max rel diff {rel:.2e}")


@pytest.mark.parametrize("extra", [None, "pool", "p6p7"])
def test_fpn_matches_torchvision(extra):
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    blocks = {None: None, "pool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(16, 16)}[extra]
    torch.manual_seed(0)
    ref = FeaturePyramidNetwork([8, 16, 24, 32], 16, extra_blocks=blocks).eval()
    rng = np.random.default_rng(2)
    sizes = {"C2": (25, 33), "C3": (13, 17), "C4": (7, 9), "C5": (4, 5)}
    feats = {k: rng.standard_normal((2, *s, c)).astype(np.float32)
             for (k, s), c in zip(sizes.items(), (8, 16, 24, 32))}
    neck = FPN(features=16, extra=extra)
    jfeats = {k: jnp.asarray(v) for k, v in feats.items()}
    variables = _load(ref, "fpn", [(r"fpn\." + p, t) for p, t in TORCHVISION_FPN_RULES],
                      neck, (jfeats,), wrap=None)
    out = neck.apply(variables, jfeats)
    with torch.no_grad():
        want = ref(collections.OrderedDict((k, _nchw(v)) for k, v in feats.items()))
    assert list(out) == list(neck.out_levels())
    for (name, got), ref_out in zip(out.items(), want.values()):
        torch_ref.assert_close(got, ref_out.numpy().transpose(0, 2, 3, 1), what=f"FPN {name}")
    info = neck.feature_info(fb.create_backbone("resnet50").feature_info)
    assert [(i.name, i.stride) for i in info] == [
        (n, s) for n, s in zip(out, (4, 8, 16, 32, 64, 128))]
    assert [tuple(v.shape[1:3]) for v in out.values()][-1] == {
        None: (4, 5), "pool": (2, 3), "p6p7": (1, 2)}[extra]


# --- the backbone x head matrix -------------------------------------------------------

SIZE = (45, 61)
TRACE_SIZE = (79, 83)  # odd, and at least the 75 px Inception v3 needs (torchvision's minimum)


def _fake_features(infos):
    """Feature shapes from `feature_info` (known before init): sizes ceil(H / stride)."""
    return {f.name: jax.ShapeDtypeStruct((1, -(-SIZE[0] // f.stride), -(-SIZE[1] // f.stride),
                                          f.channels), jnp.float32) for f in infos}


@functools.lru_cache(maxsize=None)
def _head_logits_shape(head, infos):
    """eval_shape of `head` on features shaped by `infos`; shared by equal backbones."""
    feats = _fake_features(infos)
    return jax.eval_shape(head.apply, jax.eval_shape(head.init, RNG, feats), feats).shape


@pytest.mark.parametrize("backbone", fb.list_backbones())
def test_every_backbone_with_every_head(backbone):
    """Each head built on `backbone` by name (composition checked at construction); on
    resnet18 and the first name of every other family each head is also traced on feature
    shapes from its feature_info (a family's names differ only in widths and depths), and
    whole segmenters are traced end to end at an odd input size, every head on resnet18
    and one head per other family."""
    family = fb.get_spec(backbone).family
    first = min((n for n in fb.list_backbones() if fb.get_spec(n).family == family),
                key=lambda n: (len(n), n))
    built = {}
    for head in HEADS:
        try:
            model = _create(head, backbone)
        except ValueError as e:  # a clear refusal: a level or stride this family lacks
            assert "needs" in str(e) or "output_stride" in str(e), str(e)
            print(f"{backbone} x {head}: refused: {e}")
            continue
        infos = tuple(model.backbone.feature_info)
        for module in (model.head, model.aux_head):
            if module is not None and backbone in ("resnet18", first):
                shape = _head_logits_shape(module, infos)
                finest = min(f.stride for f in infos if f.name in module.levels)
                assert shape[0] == 1 and shape[-1] == 5, (head, shape)
                assert shape[1] >= -(-SIZE[0] // finest), (head, shape)
        built[head] = model
    if not built:  # only a single-level backbone (a plain ViT) or one without C5
        # (SqueezeNet) may be refused by every head at its defaults; their own tests build
        # heads on the levels they have
        levels = [f.name for f in fb.create_backbone(backbone).feature_info]
        assert len(levels) == 1 or "C5" not in levels, f"{backbone} composes with no head"
        return
    families = sorted({fb.get_spec(n).family for n in fb.list_backbones()})
    if backbone == "resnet18":
        whole = list(built.values())
    elif backbone == first:  # one whole segmenter per other family, heads in rotation
        whole = [list(built.values())[families.index(family) % len(built)]]
    else:
        return
    for model in whole:
        x = jnp.zeros((1, *TRACE_SIZE, 3))
        out = jax.eval_shape(lambda: model.apply(model.init(RNG, x), x))
        want = ["out", "aux"] if model.aux_head is not None else ["out"]
        assert {k: v.shape for k, v in out.items()} == {k: (1, *TRACE_SIZE, 5) for k in want}


def _numpy_variables(module, *args, seed=0):
    """Scaled random variables from numpy: no compiled RNG (init compiles slowly on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, RNG, *args)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape)
        return rng.standard_normal(s.shape) * 0.1
    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(leaf(p, s), s.dtype), shapes)


@pytest.fixture(scope="module")
def all_heads_run():
    """One compiled function runs every head on one shared resnet18 (output stride 16)."""
    backbone = fb.create_backbone("resnet18", output_stride=16)
    tf, tf_plus = deeplab_style("tf"), deeplab_style("tf", plus=True)
    heads = {"deeplabv3": DeepLabV3Head(5, atrous_rates=(6, 12, 18)),
             "deeplabv3_tf": DeepLabV3Head(5, atrous_rates=(6, 12, 18), **tf),
             "deeplabv3plus": DeepLabV3PlusHead(5),
             "deeplabv3plus_tf": DeepLabV3PlusHead(5, **tf_plus),
             "fcn": FCNHead(5), "aux": FCNHead(5, feature="C4"), "lraspp": LRASPPHead(5),
             "fpn": SemanticFPNHead(5, channels=32), "unet": UNetHead(5)}
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *SIZE, 3)), jnp.float32)
    feats = jax.jit(backbone.apply)(_numpy_variables(backbone, x), x)
    variables = {k: _numpy_variables(h, feats) for k, h in heads.items()}

    @jax.jit
    def run(variables, feats):
        out = {k: resize_bilinear(h.apply(variables[k], feats), SIZE, h.align_corners)
               for k, h in heads.items()}
        train = heads["deeplabv3plus"].apply(variables["deeplabv3plus"], feats, train=True,
                                             mutable=["batch_stats"], rngs={"dropout": RNG})
        low = heads["deeplabv3plus_tf"].apply(variables["deeplabv3plus_tf"], feats)
        return out, train, low
    return heads, variables, feats, run(variables, feats)


def test_all_heads_compiled_finite(all_heads_run):
    _, variables, _, (out, (train_out, stats), _) = all_heads_run
    for name, logits in out.items():
        assert logits.shape == (2, *SIZE, 5), name
        assert np.isfinite(np.asarray(logits)).all(), name
    assert np.isfinite(np.asarray(train_out)).all()
    before = variables["deeplabv3plus"]["batch_stats"]["aspp"]["convs_0"]["bn"]["mean"]
    assert not np.allclose(stats["batch_stats"]["aspp"]["convs_0"]["bn"]["mean"], before)


def test_tf_style_upsamples_with_align_corners(all_heads_run):
    heads, variables, feats, (out, _, low) = all_heads_run
    head = heads["deeplabv3plus_tf"]
    assert low.shape[1:3] == feats["C2"].shape[1:3]
    torch_ref.assert_close(out["deeplabv3plus_tf"], resize_bilinear(low, SIZE, True))
    assert not np.allclose(out["deeplabv3plus_tf"], resize_bilinear(low, SIZE, False))
    assert head.align_corners and not heads["deeplabv3plus"].align_corners


# --- DeepLabv3+ presets: shapes at odd sizes and parameter counts ----------------------

V3PLUS = [("deeplabv3plus_xception65", 16), ("deeplabv3plus_xception65", 8),
          ("deeplabv3plus_resnet101", 16), ("deeplabv3plus_mobilenet_v2", 16)]
V3PLUS_PARAMS = {  # backbone, head (21 classes); the same at every output stride
    "deeplabv3plus_xception65": (37867312, 3188101),
    "deeplabv3plus_resnet101": (42500160, 16844149),
    "deeplabv3plus_mobilenet_v2": (2223872, 4004341),  # ASPP on features_17 (320 ch)
}


@pytest.mark.parametrize("name, output_stride", V3PLUS)
def test_deeplabv3plus_shapes_and_counts(name, output_stride):
    model = fb.create_model(name, output_stride=output_stride)
    x = jnp.zeros((1, 97, 131, 3))
    variables = jax.eval_shape(model.init, RNG, x)
    assert jax.eval_shape(model.apply, variables, x)["out"].shape == (1, 97, 131, 21)
    counts = tuple(_count(variables["params"][k]) for k in ("backbone", "head"))
    print(f"{name} OS{output_stride}: params (backbone, head) {counts} total {sum(counts)}")
    assert counts == V3PLUS_PARAMS[name]
    strides = {f.name: f.stride for f in model.backbone.feature_info}
    assert (strides["C2"], strides[model.head.feature]) == (4, output_stride)
    rates = model.head.atrous_rates
    assert rates == ((6, 12, 18) if output_stride == 16 else (12, 24, 36))


# --- composition and bad input --------------------------------------------------------

def test_classifier_backbone_transfers_to_segmenter():
    x = jnp.zeros((1, 64, 64, 3))
    clf = jax.eval_shape(fb.create_model("resnet18").init, RNG, x)
    seg = jax.eval_shape(fb.create_model("deeplabv3plus", backbone="resnet18").init, RNG, x)
    for col in ("params", "batch_stats"):
        assert jax.tree.structure(clf[col]["backbone"]) == jax.tree.structure(seg[col]["backbone"])


def test_backbone_module_and_dtype():
    bb = fb.create_backbone("resnet18", output_stride=8)
    model = fb.create_model("deeplabv3", backbone=bb, num_classes=3)
    assert model.head.atrous_rates == (12, 24, 36)
    half = fb.create_model("unet", backbone="resnet18", dtype=jnp.bfloat16)
    x = jnp.zeros((1, 33, 47, 3))
    assert jax.eval_shape(lambda: half.apply(half.init(RNG, x), x))["out"].dtype == jnp.bfloat16


def test_missing_level_is_a_clear_error():
    bb = fb.create_backbone("resnet50", out_features=("C3", "C4", "C5"))
    with pytest.raises(ValueError, match=r"needs feature levels \['C2', 'C5'\].*missing \['C2'\]"):
        fb.create_model("deeplabv3plus", backbone=bb)
    with pytest.raises(ValueError, match="missing"):
        fb.Segmenter(bb, UNetHead(3))
    with pytest.raises(ValueError, match="aux_head.*missing \\['C4'\\]"):
        fb.Segmenter(fb.create_backbone("resnet18", out_features=("C5",)), FCNHead(3),
                     FCNHead(3, feature="C4"))


@pytest.mark.parametrize("num_classes", [0, -2])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        fb.create_model("fcn_resnet50", num_classes=num_classes)


def test_bad_output_stride():
    with pytest.raises(ValueError, match="output stride 8 or 16"):
        fb.create_model("deeplabv3", backbone="resnet18", output_stride=32)
    with pytest.raises(ValueError, match="at output stride 8 or 16"):
        fb.create_model("deeplabv3", backbone="resnet18", output_stride=32, atrous_rates=(1, 2, 3))
    with pytest.raises(ValueError, match="output_stride=4 is not supported"):
        fb.create_model("fcn", backbone="resnet18", output_stride=4)
    with pytest.raises(ValueError, match="disagrees"):
        fb.create_model("fcn", backbone=fb.create_backbone("resnet18"), output_stride=8)


def test_head_kwargs_override_a_style():
    model = fb.create_model("deeplabv3plus", backbone="resnet18", style="tf",
                            head_kwargs={"bn_momentum": 0.9, "dropout": 0.2})
    assert (model.head.bn_momentum, model.head.dropout, model.head.separable) == (0.9, 0.2, True)


def test_any_stride_heads_fall_back_to_a_native_stride_32():
    """FCN / LR-ASPP default to the reference's stride, or 32 where a family cannot dilate
    (FCN-32s); an explicitly requested stride is never replaced."""
    assert fb.create_model("fcn", backbone="alexnet").backbone.feature_info[-1].stride == 32
    assert fb.create_model("lraspp", backbone="googlenet").backbone.feature_info[-1].stride == 32
    with pytest.raises(ValueError, match="output_stride=8 is not supported"):
        fb.create_model("fcn", backbone="alexnet", output_stride=8)


def test_other_bad_configurations():
    with pytest.raises(ValueError, match="unknown DeepLab style"):
        fb.create_model("deeplabv3", backbone="resnet18", style="keras")
    with pytest.raises(TypeError, match="registered name or a flax Module"):
        fb.create_model("fcn", backbone=3)
    with pytest.raises(ValueError, match="unknown model name 'resnet5'"):
        fb.create_model("fcn", backbone="resnet5")
    x = jnp.zeros((1, 33, 47, 3))
    with pytest.raises(ValueError, match="one decoder width per level"):
        jax.eval_shape(fb.create_model("unet", backbone="resnet18", decoder_channels=(8, 8)).init,
                       RNG, x)
    with pytest.raises(ValueError, match="unknown FPN extra"):
        jax.eval_shape(FPN(extra="p8").init, RNG, {"C2": x, "C3": x, "C4": x, "C5": x})
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(fb.create_model("fcn_resnet50").init, RNG, jnp.zeros((1, 3, 33, 47)))
