"""ShuffleNet V2: parity with torchvision (eval, train, dilated), counts, contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from test_mobilenet import apply_with_features, torch_outputs
from torch_ref import assert_close, parameter_count, randomize, save_state, torch_parameter_count

import flaxbones as fb
from flaxbones.backbones.shufflenet import VARIANTS, ShuffleNetV2, channel_shuffle
from flaxbones.features import plan_output_stride
from flaxbones.weights.convert import convert_state_dict

IMAGES = np.random.RandomState(0).randn(2, 67, 93, 3).astype(np.float32)
TAPS = dict(C1="conv1", C2="maxpool", C3="stage2", C4="stage3", C5="conv5")
NAME = "shufflenet_v2_x0_5"
NARROW = dict(channels=(8, 16, 32, 64, 64), repeats=(1, 2, 1))


def reference(seed=1):
    torch.manual_seed(0)
    return randomize(torchvision.models.shufflenet_v2_x0_5(), seed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_state(reference(), tmp_path_factory.mktemp("shufflenet") / "s.safetensors")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_torchvision(weights, train):
    """Logits and C1..C5 of shufflenet_v2_x0_5 at 67x93 (odd sizes through every stride-2
    unit); in train mode the running statistics too."""
    variables = fb.load_pretrained(NAME, weights)
    logits, feats, stats = apply_with_features(fb.create_model(NAME), variables, IMAGES,
                                               train=train)
    ref = reference()
    want_logits, want = torch_outputs(ref, TAPS, IMAGES, train=train)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    if train:
        after = {k: v.numpy() for k, v in ref.state_dict().items()}
        expected, _ = convert_state_dict(after, variables, fb.get_spec(NAME).weights.rules)
        got, wanted = jax.tree.leaves(stats), jax.tree.leaves(expected["batch_stats"])
        assert len(got) == len(wanted) > 0
        errors["running stats"] = max(assert_close(g, w) for g, w in zip(got, wanted))
    print(NAME, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


def test_channel_shuffle_order():
    """Channel j of group g moves to j * 2 + g, as torch's view-transpose-view."""
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(channel_shuffle(x)[0, 0, 0], [0, 3, 1, 4, 2, 5])


def _dilate(ref, output_stride):
    """torchvision's ShuffleNetV2 edited with the dilation semantics flaxbones documents:
    a stage past the stride runs stride 1, its first unit's depthwise convs at the previous
    dilation, the other units' at the new one."""
    plans = plan_output_stride((2, 2, 2, 2, 2), output_stride)
    for s, name in enumerate(("stage2", "stage3", "stage4")):
        plan = plans[s + 2]
        for i, unit in enumerate(getattr(ref, name)):
            d = plan.first_dilation if i == 0 else plan.dilation
            convs = [unit.branch2[3]] + ([unit.branch1[0]] if i == 0 else [])
            for conv in convs:
                conv.dilation, conv.padding = (d, d), (d, d)
                if i == 0:
                    conv.stride = (plan.stride, plan.stride)
    return ref


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_matches_edited_torchvision(weights, output_stride):
    variables = fb.load_pretrained(NAME, weights)
    model = fb.create_model(NAME, output_stride=output_stride)
    logits, feats, _ = apply_with_features(model, variables, IMAGES[:1])
    want_logits, want = torch_outputs(_dilate(reference(), output_stride), TAPS, IMAGES[:1])
    assert_close(logits, want_logits, what="logits")
    for level, expected in want.items():
        assert_close(feats[level], expected, what=level)
    assert model.backbone.feature_info[-1].stride == output_stride


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_torchvision(name):
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name)) == expected


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_info_matches_apply_shapes(output_stride):
    bb = fb.create_backbone("shufflenet_v2_x1_0", output_stride=output_stride)
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.channels for f in bb.feature_info] == [24, 24, 116, 232, 1024]
    assert [f.stride for f in bb.feature_info] == [2, 4, 8, min(16, output_stride), output_stride]
    sizes = {2: (34, 47), 4: (17, 24), 8: (9, 12), 16: (5, 6), 32: (3, 3)}
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), (output_stride, f)
    with pytest.raises(ValueError, match="output_stride=4"):
        fb.create_backbone(NAME, output_stride=4)


def test_under_segmenters_and_a_detector():
    """A narrow ShuffleNet V2 drives DeepLabv3+ at output stride 16 under jit; a semantic
    FPN and a Faster R-CNN are traced end to end."""
    x = jnp.asarray(IMAGES[:1, :64, :64])
    seg = fb.create_model("deeplabv3plus", backbone=ShuffleNetV2(**NARROW, output_stride=16),
                          num_classes=3)
    out = jax.jit(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x))(x)
    assert out["out"].shape == (1, 64, 64, 3) and np.isfinite(out["out"]).all()
    fpn = fb.create_model("fpn", backbone=ShuffleNetV2(**NARROW), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=ShuffleNetV2(**NARROW),
                          num_classes=3, fpn_channels=16, representation_size=16,
                          detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 64, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
