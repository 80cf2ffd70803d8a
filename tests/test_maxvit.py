"""MaxViT: parity with torchvision (eval, train) on a narrow config, counts, contract, odd
sizes (padded partitions) under a segmenter and a detector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.maxvit import MaxVit as TorchMaxVit

import flaxbones as fb
from flaxbones.backbones.maxvit import VARIANTS, MaxVit
from flaxbones.heads.classification import MaxVitHead
from flaxbones.weights.convert import convert_state_dict
from torch_ref import assert_close, parameter_count, randomize, save_state, torch_parameter_count
from test_mobilenet import apply_with_features, torch_outputs
from test_swin import random_variables

# torchvision's MaxVit runs only square inputs whose every stage map is a multiple of the
# partition: 48 px gives stage maps 12 and 6 with partition 3 (several windows and grids
# of an odd size); the second stage has a stride-1 layer (identity shortcut).
NARROW = dict(stem_channels=16, block_channels=(16, 32), block_layers=(1, 2), head_dim=8,
              partition_size=3)
IMAGES = np.random.RandomState(0).randn(2, 48, 48, 3).astype(np.float32)
TAPS = dict(C1="stem", C2="blocks.0", C3="blocks.1")
RULES = fb.get_spec("maxvit_t").weights.rules + MaxVitHead.torch_rules()


def reference():
    torch.manual_seed(0)
    model = TorchMaxVit(input_size=(48, 48), stochastic_depth_prob=0.0, num_classes=10,
                        **{k: list(v) if isinstance(v, tuple) else v for k, v in NARROW.items()})
    return randomize(model, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_state(reference(), tmp_path_factory.mktemp("maxvit") / "narrow.safetensors")


@pytest.mark.parametrize("train", [False, True])
def test_parity_with_torchvision(weights, train):
    """Logits, C1..C3 of the narrow MaxVit (eval; train with drop path off: batch
    statistics, and the running statistics torch keeps after the step)."""
    variables = fb.load_pretrained("maxvit_t", weights, num_classes=10, **NARROW)
    model = fb.create_model("maxvit_t", num_classes=10, **NARROW)
    logits, feats, stats = apply_with_features(model, variables, IMAGES, train=train)
    ref = reference()
    want_logits, want = torch_outputs(ref, TAPS, IMAGES, train=train)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    print("maxvit narrow", "train" if train else "eval",
          {k: f"{v:.1e}" for k, v in errors.items()})
    if train:
        after = {k: v.numpy() for k, v in ref.state_dict().items()}
        expected, _ = convert_state_dict(after, variables, RULES)
        got = jax.tree_util.tree_leaves_with_path(stats)
        want = jax.tree_util.tree_leaves(expected["batch_stats"])
        assert len(got) == len(want) > 0
        for (path, a), b in zip(got, want):
            assert_close(a, b, what=f"running stat {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_torchvision(name):
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name), 32) == expected


def test_feature_info_matches_apply_shapes_and_bad_options():
    """C1 at stride 2 (the stem) to C5; any size (the stage maps 34x47 .. 3x3 are not
    multiples of the window: each attention pads and crops); output stride 32 only."""
    bb = fb.create_backbone("maxvit_t")
    out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 67, 93, 3))))
    assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4", "C5"]
    assert [f.stride for f in bb.feature_info] == [2, 4, 8, 16, 32]
    sizes = {2: (34, 47), 4: (17, 24), 8: (9, 12), 16: (5, 6), 32: (3, 3)}  # ceil
    for f in bb.feature_info:
        assert out[f.name].shape == (2, *sizes[f.stride], f.channels), f
    clf = fb.create_model("maxvit_t", num_classes=0)
    out, _ = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 32, 32, 3))))
    assert out["out"].shape == (1, 512)
    for stride in (8, 16):
        with pytest.raises(ValueError, match=f"output_stride={stride} is not supported"):
            fb.create_backbone("maxvit_t", output_stride=stride)
    with pytest.raises(ValueError, match="head_dim"):
        fb.create_backbone("maxvit_t", head_dim=48)


def narrow(**kwargs):
    return MaxVit(**{"stem_channels": 8, "block_channels": (8, 16, 16, 16),
                     "block_layers": (1, 1, 1, 1), "head_dim": 8, "partition_size": 3, **kwargs})


def test_drop_path_in_train_mode():
    """drop_path_rate draws per-example masks from the 'dropout' rng in training (the
    second layer's rate is 0.5): two equal images and two keys differ."""
    x = np.random.RandomState(1).randn(1, 20, 20, 3).astype(np.float32).repeat(2, 0)
    bb = narrow(block_channels=(8, 16), block_layers=(1, 1), drop_path_rate=0.5)
    v = random_variables(bb, x)
    train = jax.jit(lambda k: bb.apply(v, x, train=True, rngs={"dropout": k},
                                       mutable=["batch_stats"])[0]["C3"])
    a, b = train(jax.random.key(0)), train(jax.random.key(1))
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, b)


def test_under_segmenters_and_a_detector_at_odd_sizes():
    """A narrow MaxVit drives DeepLabv3+ (ASPP on C4, stride 16) at 61x75 under jit (every
    stage map padded to the partition); a semantic FPN and a Faster R-CNN are traced end to
    end."""
    x = jnp.asarray(np.random.RandomState(1).randn(1, 61, 75, 3).astype(np.float32))
    seg = fb.create_model("deeplabv3plus", backbone=narrow(), feature="C4", num_classes=3)
    out = jax.jit(seg.apply)(random_variables(seg, x), x)
    assert out["out"].shape == (1, 61, 75, 3) and np.isfinite(out["out"]).all()
    x = x[:, :64, :64]
    fpn = fb.create_model("fpn", backbone=narrow(), num_classes=3)
    det = fb.create_model("fasterrcnn", backbone=narrow(), num_classes=3,
                          fpn_channels=16, representation_size=16, detections_per_img=5)
    for model, key, shape in ((fpn, "out", (1, 61, 64, 3)), (det, "boxes", (1, 5, 4))):
        out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x), x)
        assert out[key].shape == shape, type(model).__name__
