"""ConvNeXt V2: parity with timm (eval, train, dilated), its files, counts, contract."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flaxbones as fb
from flaxbones.backbones.convnext import TIMM_RULES, V2_VARIANTS, ConvNeXt
from flaxbones.weights.convert import convert_state_dict
from torch_ref import (assert_close, parameter_count, random_variables, randomize,
                       save_state, torch_parameter_count)
from test_mobilenet import apply_with_features, torch_outputs

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
TAPS = {f"C{s + 2}": f"stages.{s}" for s in range(4)}
NAME = "convnextv2_atto"  # conv-MLP (1x1 conv fc1/fc2 keys) like femto..nano


def reference(**kwargs):
    """timm's convnextv2_atto with perturbed LayerNorm affines and GRN parameters (timm
    starts GRN at zero, the identity, which would hide a wrong formula)."""
    torch.manual_seed(0)
    model = randomize(timm.create_model(NAME, **kwargs), 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "GlobalResponseNorm":
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_state(reference(), tmp_path_factory.mktemp("convnextv2") / "a.safetensors")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_timm(weights, train):
    """Logits and C2..C5 of convnextv2_atto loaded from timm's state dict file (an odd input
    size); in train mode with drop path off the same (no batch statistics)."""
    variables = fb.load_pretrained(NAME, weights)
    logits, feats, _ = apply_with_features(fb.create_model(NAME), variables, IMAGES, train=train)
    want_logits, want = torch_outputs(reference(), TAPS, IMAGES, train=train)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    print("train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


def test_dilated_matches_timm_features_only():
    """output_stride 8: every level equals timm's `features_only=True, output_stride=8`."""
    ref = reference(features_only=True, output_stride=8)
    state = {re.sub(r"^(stem|stages)_(\d+)", r"\1.\2", k): v.numpy()
             for k, v in ref.state_dict().items()}
    model = fb.create_backbone(NAME, output_stride=8)
    x = IMAGES[:1]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    variables, _ = convert_state_dict(state, {"params": {"backbone": shapes["params"]}},
                                      TIMM_RULES)
    got = jax.jit(model.apply)({"params": variables["params"]["backbone"]}, x)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert [f.stride for f in model.feature_info] == ref.feature_info.reduction() == [4, 8, 8, 8]
    errors = {}
    for level, w in zip(TAPS, want):
        errors[level] = assert_close(got[level], w.numpy().transpose(0, 2, 3, 1), what=level)
    print("output stride 8", {k: f"{v:.1e}" for k, v in errors.items()})


def test_files_load_as_pth_and_scanned(weights, tmp_path):
    """The timm file loads the same from .pth, GRN and conv-MLP keys included, and onto the
    scanned form (the stacked unscanned variables)."""
    from flaxbones.scan import scan_variables
    plain, report = fb.load_pretrained(NAME, weights, return_report=True)
    assert "params/backbone/features_1_0/grn/scale" in report.loaded
    pth = fb.load_pretrained(NAME, save_state(reference(), tmp_path / "a.pth"))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(pth)):
        np.testing.assert_array_equal(a, b)
    scanned = fb.load_pretrained(NAME, weights, scan_blocks=True)
    stacked = scan_variables(plain, fb.create_model(NAME, scan_blocks=True))
    assert "features_5_scan" in scanned["params"]["backbone"]
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(a, b)


def test_every_timm_key_maps_for_linear_mlp():
    """convnextv2_tiny's timm keys (nn.Linear fc1/fc2, unlike atto..nano's 1x1 convs) fill
    create_model's variables exactly (shapes from a meta-device model, zero values)."""
    with torch.device("meta"):
        state = {k: np.zeros(v.shape, np.float32)
                 for k, v in timm.create_model("convnextv2_tiny").state_dict().items()}
    assert state["stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)
    target = jax.eval_shape(fb.create_model("convnextv2_tiny").init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3)))
    _, report = convert_state_dict(state, target, fb.get_spec("convnextv2_tiny").weights.rules)
    assert len(report.loaded) == len(jax.tree.leaves(target))


def test_scan_blocks_and_drop_path():
    """A narrow V2 scanned equals it unrolled (GRN non-zero); in training each scanned block
    draws its drop-path mask from the 'dropout' rng."""
    from flaxbones.scan import scan_variables
    narrow = dict(widths=(8, 16, 24, 32), depths=(1, 2, 1, 1), grn=True, layer_scale=None,
                  drop_path_rate=0.5, cpu_kernels=False)
    plain, scanned = ConvNeXt(**narrow), ConvNeXt(**narrow, scan_blocks=True)
    x = jnp.asarray(IMAGES[:2, :32, :32])
    v = random_variables(plain, x)
    vs = scan_variables(v, scanned)

    @jax.jit
    def run(v, vs):
        train = [scanned.apply(vs, x, train=True, rngs={"dropout": jax.random.key(i)})["C5"]
                 for i in range(2)]
        return plain.apply(v, x)["C5"], scanned.apply(vs, x)["C5"], *train
    a, b, t0, t1 = run(v, vs)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert not np.allclose(t0, t1)


@pytest.mark.parametrize("name", list(V2_VARIANTS))
def test_parameter_count_equals_timm(name):
    expected = torch_parameter_count(lambda: timm.create_model(name))
    assert parameter_count(fb.create_model(name, scan_blocks=True), 32) == expected  # fast


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_info_matches_apply_shapes(output_stride):
    bb = fb.create_backbone("convnextv2_nano", output_stride=output_stride)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C2", "C3", "C4", "C5"]
    assert [f.stride for f in bb.feature_info] == [4, 8, min(16, output_stride), output_stride]
    assert [f.channels for f in bb.feature_info] == [80, 160, 320, 640]
    sizes = {4: (16, 23), 8: (8, 11), 16: (4, 5), 32: (2, 2)}
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), (output_stride, f)


def test_classifier_and_segmenter_shapes():
    """create_model gives timm's head (pool, LayerNorm, fc); a V2 name drives DeepLabv3+."""
    clf = fb.create_model("convnextv2_tiny")
    params = jax.eval_shape(clf.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert sorted(params["head"]) == ["fc", "norm"] and params["head"]["fc"]["kernel"].shape == (
        768, 1000)
    assert fb.get_spec("convnextv2_tiny").weights.name == "timm"
    seg = fb.create_model("deeplabv3plus", backbone=NAME, num_classes=3, output_stride=16)
    x = jnp.zeros((1, 64, 64, 3))
    out = jax.eval_shape(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x), x)
    assert out["out"].shape == (1, 64, 64, 3)


def test_grn_gradient_is_finite_on_an_all_zero_input():
    """A zero image (a padded example) makes whole channels zero; sqrt's gradient at 0 would
    be NaN there, torch's norm gives 0."""
    from flaxbones.backbones.convnext import GlobalResponseNorm
    grn = GlobalResponseNorm()
    x = jnp.zeros((2, 3, 5, 4)).at[0, 1, 2].set(1.0)
    v = {"params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    grads = jax.grad(lambda x: jnp.sum(grn.apply(v, x) ** 2))(x)
    assert np.isfinite(np.asarray(grads)).all()
