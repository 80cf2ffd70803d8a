"""MNASNet: parity with torchvision (eval, train) and timm (dilated), counts, feature
contract, under segmenters and a detector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import flaxbones as fb
from flaxbones.backbones.mnasnet import TIMM_RULES
from flaxbones.weights.convert import convert_state_dict
from torch_ref import assert_close, randomize
from test_efficientnet import IMAGES, SIZES, _traced, check_parity, numpy_variables

timm = pytest.importorskip("timm")

NAMES = ["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"]
TAPS = dict(C1="layers.7", C2="layers.8", C3="layers.9", C4="layers.11", C5="layers.16")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_torchvision(train, tmp_path):
    """Logits and C1..C5 of mnasnet0_5 (random BN statistics, an odd input size); in train
    mode the outputs and every running statistic (torch momentum 0.0003)."""
    torch.manual_seed(0)
    ref = randomize(torchvision.models.mnasnet0_5(dropout=0.0), 1)
    variables, stats = check_parity("mnasnet0_5", ref, TAPS, tmp_path / "m.safetensors",
                                    IMAGES, train)
    if train:
        after = {k: v.numpy() for k, v in ref.state_dict().items()}
        expected, _ = convert_state_dict(after, variables, fb.get_spec("mnasnet0_5").weights.rules)
        got = jax.tree_util.tree_leaves_with_path(stats)
        want = jax.tree_util.tree_leaves(expected["batch_stats"])
        assert len(got) == len(want) > 0
        for (path, a), b in zip(got, want):
            assert_close(a, b, what=f"running stat {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_matches_timm(output_stride):
    """output_stride 8/16 against timm's mnasnet_100 (the same network as mnasnet1_0; its
    weights mapped by TIMM_RULES), with lax's convolutions: C5 at the requested stride and
    equal, so dilation is exact."""
    torch.manual_seed(0)
    ref = randomize(timm.create_model("mnasnet_100", output_stride=output_stride), 2).eval()
    model = fb.create_backbone("mnasnet1_0", output_stride=output_stride, cpu_kernels=False)
    assert model.feature_info[-1].stride == output_stride
    x = IMAGES[:1, :49, :57]
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(x))
    state = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("classifier")}
    converted, _ = convert_state_dict(state, {c: {"backbone": t} for c, t in shapes.items()},
                                      TIMM_RULES)
    got = jax.jit(model.apply)({c: v["backbone"] for c, v in converted.items()}, x)
    with torch.no_grad():
        want = ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert_close(got["C5"], want.numpy().transpose(0, 2, 3, 1),
                 what=f"C5 at output stride {output_stride}")


def _check_features(info, feats, output_stride):
    assert list(feats) == [f.name for f in info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.stride for f in info] == [2, 4, 8, min(16, output_stride), output_stride]
    for f in info:
        assert feats[f.name].shape == (2, *SIZES[f.stride], f.channels), (output_stride, f)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_feature_info(name):
    with torch.device("meta"):
        expected = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
    model = fb.create_model(name, cpu_kernels=False)
    count, feats = _traced(model, jnp.zeros((2, 67, 93, 3)))
    assert count == expected
    _check_features(model.backbone.feature_info, feats, 32)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_feature_info_matches_apply_shapes(output_stride):
    bb = fb.create_backbone("mnasnet0_75", output_stride=output_stride, cpu_kernels=False)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    _check_features(bb.feature_info, out, output_stride)


def test_bad_options_and_pre_logits():
    clf = fb.create_model("mnasnet1_0", num_classes=0, cpu_kernels=False)
    out = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 32, 32, 3)))[0])
    assert out["out"].shape == (1, 1280)
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone("mnasnet1_0", output_stride=4)
    taps = fb.create_backbone("mnasnet1_0", out_features=("layers_10_1",))
    assert [(f.name, f.stride, f.channels) for f in taps.feature_info] == [
        ("layers_10_1", 16, 80)]


def test_under_segmenters_and_a_detector():
    """mnasnet0_5 drives DeepLabv3+ at output stride 16, applied under jit; a semantic FPN
    and a Faster R-CNN are traced end to end."""
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", backbone="mnasnet0_5", num_classes=3,
                          cpu_kernels=False)
    out = jax.jit(seg.apply)(numpy_variables(seg, x), x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone="mnasnet0_5", num_classes=3)
    det = fb.create_model("fasterrcnn", backbone="mnasnet0_5", num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
