"""ConvNeXt: parity with torchvision (eval, train) and timm (dilated), counts, contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones.backbones.convnext import TIMM_RULES, VARIANTS
from flaxbones.heads.classification import LayerNormHead
from flaxbones.weights.convert import convert_state_dict
from torch_ref import (assert_close, parameter_count, random_variables, randomize,
                       save_state, torch_parameter_count)
from test_mobilenet import apply_with_features, torch_outputs

timm = pytest.importorskip("timm")

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
TAPS = dict(C2="features.1", C3="features.3", C4="features.5", C5="features.7")
NAMES = list(VARIANTS)


def reference(**kwargs):
    torch.manual_seed(0)
    return randomize(torchvision.models.convnext_tiny(stochastic_depth_prob=0.0, **kwargs), 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_state(reference(), tmp_path_factory.mktemp("convnext") / "t.safetensors")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_torchvision(weights, train):
    """Logits and C2..C5 of convnext_tiny (random LayerNorm affines and layer scales, an
    odd input size); in train mode with drop path off the same (no batch statistics)."""
    variables = fb.load_pretrained("convnext_tiny", weights)
    logits, feats, _ = apply_with_features(fb.create_model("convnext_tiny"), variables, IMAGES,
                                           train=train)
    ref = reference()  # the same seeds: the weights in the file
    want_logits, want = torch_outputs(ref, TAPS, IMAGES, train=train)
    assert_close(logits, want_logits, what="logits")
    for level, expected in want.items():
        assert_close(feats[level], expected, what=level)


def test_drop_path_in_train_mode_only():
    """drop_path_rate > 0 draws from the 'dropout' rng in training (two keys differ) and is
    the identity at eval (a narrow ConvNeXt: the family's code, a fraction of the compile)."""
    from flaxbones.backbones.convnext import ConvNeXt
    narrow = dict(widths=(8, 16, 24, 32), depths=(1, 2, 1, 1), cpu_kernels=False)
    model, plain = ConvNeXt(**narrow, drop_path_rate=0.5), ConvNeXt(**narrow)
    x = IMAGES[:, :32, :32]
    variables = random_variables(plain, x)
    run = jax.jit(lambda k: model.apply(variables, x, train=True, rngs={"dropout": k})["C5"])
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert not np.allclose(a, b)
    evaluate = jax.jit(lambda m: m.apply(variables, x)["C5"], static_argnums=0)
    np.testing.assert_array_equal(evaluate(model), evaluate(plain))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_matches_timm(output_stride):
    """output_stride 8/16 against timm's ConvNeXt (its weights mapped by TIMM_RULES): C5
    at the requested stride and equal."""
    torch.manual_seed(0)
    ref = randomize(timm.create_model("convnext_tiny", output_stride=output_stride), 2)
    ref.eval()
    model = fb.create_backbone("convnext_tiny", output_stride=output_stride)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("head")}
    variables, _ = convert_state_dict(state, {"params": {"backbone": shapes["params"]}},
                                      TIMM_RULES)
    x = IMAGES[:1]
    got = jax.jit(model.apply)({"params": variables["params"]["backbone"]}, x)
    with torch.no_grad():
        want = ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    want = want.numpy().transpose(0, 2, 3, 1)
    assert_close(got["C5"], want, what=f"C5 at output stride {output_stride}")
    assert model.feature_info[-1].stride == output_stride


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_torchvision(name):
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name)) == expected


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_info_matches_apply_shapes(output_stride):
    bb = fb.create_backbone("convnext_small", output_stride=output_stride)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C2", "C3", "C4", "C5"]
    assert [f.stride for f in bb.feature_info] == [4, 8, min(16, output_stride), output_stride]
    sizes = {4: (16, 23), 8: (8, 11), 16: (4, 5), 32: (2, 2)}  # floor at every stride
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), (output_stride, f)


def test_pre_logits_and_bad_options():
    clf = fb.create_model("convnext_tiny", num_classes=0)
    out, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 32, 32, 3))))
    assert out["out"].shape == (1, 768)
    assert LayerNormHead.levels == ("C5",)
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone("convnext_tiny", output_stride=4)
    with pytest.raises(ValueError, match="C1"):
        fb.create_backbone("convnext_tiny", out_features=("C1",))


def test_under_segmenters_and_a_detector():
    """A ConvNeXt (the family's code, narrow, one block per stage) drives DeepLabv3+ at
    output stride 16, initialised and applied under jit; a semantic FPN and a Faster R-CNN
    are traced end to end (their compiles are the heads', tested on other backbones)."""
    from flaxbones.backbones.convnext import ConvNeXt
    narrow = dict(widths=(16, 32, 48, 64), depths=(1, 1, 1, 1))
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", backbone=ConvNeXt(**narrow, output_stride=16),
                          num_classes=3)
    out = jax.jit(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x))(x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=ConvNeXt(**narrow), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=ConvNeXt(**narrow), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__


def test_scan_blocks_load_and_equal_unrolled_with_gradients(weights):
    """scan_blocks=True: the torchvision file loads onto the scanned form (the stacked
    unscanned variables); a narrow ConvNeXt's outputs and input gradients equal the
    unrolled model's; in training each scanned block draws its own drop-path mask."""
    from flaxbones.backbones.convnext import ConvNeXt
    from flaxbones.scan import scan_variables
    v_plain = fb.load_pretrained("convnext_tiny", weights)
    v_scan = fb.load_pretrained("convnext_tiny", weights, scan_blocks=True)
    assert "features_5_scan" in v_scan["params"]["backbone"]
    stacked = scan_variables(v_plain, fb.create_model("convnext_tiny", scan_blocks=True))
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(v_scan)):
        np.testing.assert_array_equal(a, b)

    narrow = dict(widths=(8, 16, 24, 32), depths=(2, 2, 3, 2), drop_path_rate=0.5,
                  cpu_kernels=False)  # lax's convolutions: scanning is what is tested
    plain, scanned = ConvNeXt(**narrow), ConvNeXt(**narrow, scan_blocks=True)
    x = jnp.asarray(IMAGES[:2, :32, :32])
    v = random_variables(plain, x)
    vs = scan_variables(v, scanned)

    def grad(model, variables):
        loss = lambda x: jnp.sum(model.apply(variables, x)["C5"] ** 2)
        return jax.jit(jax.value_and_grad(loss))(x)
    (a, ga), (b, gb) = grad(plain, v), grad(scanned, vs)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, atol=1e-5 * np.abs(ga).max())
    train = jax.jit(lambda k: scanned.apply(vs, x, train=True, rngs={"dropout": k})["C5"])
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
