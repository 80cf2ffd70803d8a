"""RegNet: parity with torchvision (eval, train) and timm (dilated), counts, contract, scan."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.regnet import BlockParams

import flaxbones as fb
from flaxbones.backbones.regnet import TIMM_RULES, X_VARIANTS, Y_VARIANTS, RegNet
from flaxbones.weights.convert import convert_state_dict
from torch_ref import assert_close, randomize, save_state
from test_heads import _numpy_variables as numpy_variables
from test_mobilenet import apply_with_features, torch_outputs

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
TAPS = dict(C1="stem", **{f"C{s + 2}": f"trunk_output.block{s + 1}" for s in range(4)})
NAMES = [*X_VARIANTS, *Y_VARIANTS]
NARROW = dict(depths=(1, 2, 3, 2), widths=(8, 16, 24, 32), group_widths=(8, 8, 8, 8),
              se_ratio=0.25, stem_width=8)


def reference(name, seed=1):
    torch.manual_seed(0)
    return randomize(getattr(torchvision.models, name)(), seed)


@pytest.fixture(scope="module")
def y_weights(tmp_path_factory):
    return save_state(reference("regnet_y_400mf"), tmp_path_factory.mktemp("regnet") / "y.pth")


@pytest.mark.parametrize("name,train,scan", [("regnet_x_400mf", False, True),
                                             ("regnet_y_400mf", False, False),
                                             ("regnet_y_400mf", True, True)])
def test_parity_with_torchvision(name, train, scan, y_weights, tmp_path):
    """Logits and C1..C5 at an odd input size (random BN statistics); in train mode the
    outputs and the updated running statistics too. torchvision's files load onto both
    forms, unrolled and `scan_blocks` (which compiles faster)."""
    ref = reference(name)
    path = y_weights if name == "regnet_y_400mf" else save_state(ref, tmp_path / "x.safetensors")
    variables = fb.load_pretrained(name, path, scan_blocks=scan)
    if scan:
        assert "block3_scan" in variables["params"]["backbone"]
    model = fb.create_model(name, scan_blocks=scan)
    logits, feats, stats = apply_with_features(model, variables, IMAGES, train)
    want_logits, want = torch_outputs(ref, TAPS, IMAGES, train=train)
    errors = {"logits": assert_close(logits, want_logits, what=f"{name} logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=f"{name} {level}")
    if train:
        after = fb.load_pretrained(name, save_state(ref, tmp_path / "after.safetensors"),
                                   scan_blocks=scan)
        for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(stats),
                                         jax.tree_util.tree_leaves(after["batch_stats"])):
            errors["stats"] = max(errors.get("stats", 0), assert_close(
                got, expected, what=f"running stat {jax.tree_util.keystr(path)}"))
    print(name, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("output_stride", [8])
def test_dilated_matches_timm(output_stride):
    """output_stride 8 against timm's regnetx_004_tv (torchvision's regnet_x_400mf, its keys
    mapped by TIMM_RULES): stride-1 first blocks, dilated 3x3 convs; C5 equal. Stride 8
    covers both transitions (stage 3: dilation 1 then 2, stage 4: 2 then 4); 16 is the
    same code on one stage, its shapes checked below."""
    torch.manual_seed(0)
    ref = randomize(timm.create_model("regnetx_004_tv", output_stride=output_stride), 2).eval()
    model = fb.create_backbone("regnet_x_400mf", output_stride=output_stride)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("head")}
    variables, _ = convert_state_dict(state, {"params": {"backbone": shapes["params"]},
                                              "batch_stats": {"backbone": shapes["batch_stats"]}},
                                      TIMM_RULES)
    from flaxbones.scan import scan_variables
    scanned = model.clone(scan_blocks=True)  # compiles faster; equal to the unrolled model
    variables = scan_variables({k: v["backbone"] for k, v in variables.items()}, scanned)
    x = IMAGES[:1]
    got = jax.jit(scanned.apply)(variables, x)
    with torch.no_grad():
        want = ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    err = assert_close(got["C5"], want.numpy().transpose(0, 2, 3, 1),
                       what=f"C5 at OS{output_stride}")
    print(f"regnet_x_400mf OS{output_stride} C5 {err:.1e}")
    assert model.feature_info[-1].stride == output_stride


@pytest.fixture
def regnet_on_meta(monkeypatch):
    """torchvision computes BlockParams with tensors, which cannot run on 'meta'."""
    compute = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return compute(cls, *args, **kwargs)
    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


def check_feature_info(name, output_stride):
    """feature_info against the shapes `apply` gives (one trace of the scanned form, which
    holds the same leaves stacked); returns the parameter count."""
    sizes = {2: (34, 47), 4: (17, 24), 8: (9, 12), 16: (5, 6), 32: (3, 3)}  # ceil per stride
    bb = fb.create_backbone(name, output_stride=output_stride, scan_blocks=True)
    out, variables = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                                jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.stride for f in bb.feature_info] == [2, 4, 8, min(16, output_stride),
                                                  output_stride]
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), (output_stride, f)
    return sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_dilated_feature_info(name, regnet_on_meta):
    """Every name: the backbone's parameter count equals torchvision's less its fc (the
    classifier's fc loads in the parity tests), and feature_info matches apply at output
    stride 8."""
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)()
    count = lambda m: sum(p.numel() for p in m.parameters())
    expected = count(ref) - count(ref.fc)
    assert check_feature_info(name, 8) == expected


@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf"])
@pytest.mark.parametrize("output_stride", [16, 32])
def test_feature_info_matches_apply_shapes(name, output_stride):
    check_feature_info(name, output_stride)


def test_pre_logits_and_bad_options():
    clf = fb.create_model("regnet_y_400mf", num_classes=0)
    out, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 32, 32, 3))))
    assert out["out"].shape == (1, 440)
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone("regnet_x_400mf", output_stride=4)
    with pytest.raises(ValueError, match="multi_grid"):
        fb.create_backbone("regnet_x_400mf", multi_grid=(1, 2, 4))


def test_under_segmenters_and_a_detector():
    """A narrow RegNet-Y drives DeepLabv3+ at output stride 16 under jit (random variables
    from numpy: init compiles slowly on CPU); a semantic FPN and a Faster R-CNN are traced
    end to end."""
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", backbone=RegNet(**NARROW, output_stride=16),
                          num_classes=3)
    out = jax.jit(seg.apply)(numpy_variables(seg, x), x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=RegNet(**NARROW), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=RegNet(**NARROW), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__


def test_scan_blocks_equal_unrolled_with_gradients():
    """scan_blocks=True (files load onto it, and its batch statistics match torchvision's:
    the parity tests): a narrow RegNet-Y's outputs and input gradients equal the unrolled
    model's, at output stride 8 (dilated scanned blocks), its blocks rematerialised by
    `remat_blocks` too."""
    from flaxbones.train import remat_blocks
    from flaxbones.scan import scan_variables
    plain = RegNet(**NARROW, output_stride=8)
    scanned = remat_blocks(plain.clone(scan_blocks=True))
    assert scanned.remat is True
    x = jnp.asarray(IMAGES[:2, :32, :32])
    v = numpy_variables(plain, x)
    vs = scan_variables(v, scanned)

    def grad(model, variables):
        loss = lambda x: jnp.sum(model.apply(variables, x)["C5"] ** 2)
        return jax.jit(jax.value_and_grad(loss))(x)
    (a, ga), (b, gb) = grad(plain, v), grad(scanned, vs)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, atol=1e-5 * np.abs(ga).max())
