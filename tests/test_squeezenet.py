"""SqueezeNet 1.0 / 1.1: parity with torchvision (eval, train), counts, contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from test_mobilenet import apply_with_features, torch_outputs
from torch_ref import assert_close, parameter_count, save_state, torch_parameter_count

import flaxbones as fb
from flaxbones.backbones.squeezenet import VARIANTS
from flaxbones.heads.fpn import SemanticFPNHead
from flaxbones.models import Segmenter

IMAGES = np.random.RandomState(0).randn(2, 47, 61, 3).astype(np.float32)
TAPS = {"squeezenet1_0": dict(C1="features.1", C2="features.5", C3="features.10", C4="features.12"),
        "squeezenet1_1": dict(C1="features.1", C2="features.4", C3="features.7", C4="features.12")}
# conv VALID then three ceil-mode pools: 47x61 -> 1.0: 21x28, 10x14, 5x7, 2x3 (1.1: 23x30, 11x15,
# 5x7, 2x3): a ceil-mode pool whose last window hangs over the edge at every level.
SIZES = {"squeezenet1_0": {2: (21, 28), 4: (10, 14), 8: (5, 7), 16: (2, 3)},
         "squeezenet1_1": {2: (23, 30), 4: (11, 15), 8: (5, 7), 16: (2, 3)}}


@pytest.mark.parametrize("name,train", [("squeezenet1_0", False), ("squeezenet1_1", False),
                                        ("squeezenet1_1", True)])
def test_parity_with_torchvision(name, train, tmp_path):
    """Logits (through the conv classifier) and C1..C4; train mode (no BatchNorm in the
    family, dropout off) is the same computation."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(dropout=0.0)
    with torch.no_grad():  # non-trivial biases (torchvision initialises them to 0)
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.normal_(0, 0.1)
    variables = fb.load_pretrained(name, save_state(ref, tmp_path / "s.safetensors"))
    logits, feats, _ = apply_with_features(fb.create_model(name), variables, IMAGES, train=train)
    want_logits, want = torch_outputs(ref, TAPS[name], IMAGES, train=train)
    errors = {"logits": assert_close(logits, want_logits, what="logits")}
    for level, expected in want.items():
        errors[level] = assert_close(feats[level], expected, what=level)
    print(name, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_and_feature_info(name):
    """Parameter counts equal torchvision's; feature_info (C1..C4, the network stops at
    stride 16) matches apply's shapes at output_stride 16 and 32 alike."""
    expected = torch_parameter_count(getattr(torchvision.models, name))
    assert parameter_count(fb.create_model(name)) == expected
    for output_stride in (16, 32):
        bb = fb.create_backbone(name, output_stride=output_stride)
        out, _ = jax.eval_shape(lambda: bb.init_with_output(jax.random.PRNGKey(0),
                                                            jnp.zeros((2, 47, 61, 3))))
        assert list(out) == [f.name for f in bb.feature_info] == ["C1", "C2", "C3", "C4"]
        assert [f.stride for f in bb.feature_info] == [2, 4, 8, 16]
        for f in bb.feature_info:
            assert out[f.name].shape == (2, *SIZES[name][f.stride], f.channels), f
    with pytest.raises(ValueError, match="output_stride=8"):
        fb.create_backbone(name, output_stride=8)


def test_pooled_features_and_segmenter():
    """num_classes=0 gives the pooled C4 (512 channels); squeezenet1_1 drives DeepLabv3+
    (ASPP on C4, its deepest level) under jit and a semantic FPN over C2..C4 under
    eval_shape; heads that need C5 say so at construction."""
    clf = fb.create_model("squeezenet1_1", num_classes=0)
    out = jax.eval_shape(lambda: clf.init_with_output(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 32, 32, 3)))[0])
    assert out["out"].shape == (1, 512)
    x = jnp.asarray(IMAGES[:1, :33, :33])
    seg = fb.create_model("deeplabv3plus", backbone="squeezenet1_1", num_classes=3,
                          feature="C4")
    out = jax.jit(lambda x: seg.apply(seg.init(jax.random.PRNGKey(0), x), x))(x)
    assert out["out"].shape == (1, 33, 33, 3) and np.isfinite(out["out"]).all()
    fpn = Segmenter(fb.create_backbone("squeezenet1_1"),
                    SemanticFPNHead(3, in_levels=("C2", "C3", "C4")))
    out = jax.eval_shape(lambda x: fpn.apply(fpn.init(jax.random.PRNGKey(0), x), x), x)
    assert out["out"].shape == (1, 33, 33, 3)
    with pytest.raises(ValueError, match="missing"):
        fb.create_model("deeplabv3plus", backbone="squeezenet1_1")
