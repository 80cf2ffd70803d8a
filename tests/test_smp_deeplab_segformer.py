"""Parity with segmentation_models_pytorch's DeepLabV3, DeepLabV3+ and Segformer decoders:
smp's own decoder + segmentation head (taken from the smp model, so its defaults and scale
rules hold) on random encoder features, weights converted by each head's RULES."""
import copy
import functools

import jax
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder

from flaxbones.heads.smp.deeplab import (RULES as DEEPLAB_RULES, SmpDeepLabV3Head,
                                         SmpDeepLabV3PlusHead)
from flaxbones.heads.smp.segformer import RULES as SEGFORMER_RULES, SmpSegformerHead
from smp_ref import Reference, assert_parity, assert_train_parity, convert, fill, load_head

H, W, CLASSES = 64, 96, 3
# smp's encoder out_channels (image first); "mit" is a transformer-style encoder's (MiT-B0),
# whose stride-2 feature is empty.
CHANNELS = {"resnet34": (3, 64, 64, 128, 256, 512), "mobilenet_v2": (3, 16, 24, 32, 96, 1280),
            "mit": (3, 0, 32, 64, 160, 256)}
# name: (smp class, flaxbones head, encoder, encoder_output_stride, options for both)
CASES = {
    "v3_resnet34": ("DeepLabV3", SmpDeepLabV3Head, "resnet34", 8, {}),
    "v3_mobilenet_v2": ("DeepLabV3", SmpDeepLabV3Head, "mobilenet_v2", 16,
                        dict(decoder_aspp_separable=True, activation="sigmoid")),
    "v3plus_resnet34": ("DeepLabV3Plus", SmpDeepLabV3PlusHead, "resnet34", 16, {}),
    "v3plus_mobilenet_v2": ("DeepLabV3Plus", SmpDeepLabV3PlusHead, "mobilenet_v2", 8,
                            dict(decoder_aspp_separable=False, decoder_atrous_rates=(6, 12, 18))),
    "segformer_resnet34": ("Segformer", SmpSegformerHead, "resnet34", 32, {}),
    "segformer_mobilenet_v2": ("Segformer", SmpSegformerHead, "mobilenet_v2", 32,
                               dict(decoder_segmentation_channels=64)),
    "segformer_mit": ("Segformer", SmpSegformerHead, "mit", 32, dict(encoder_depth=4)),
}
RULES = {**DEEPLAB_RULES, "Segformer": SEGFORMER_RULES}


def _smp_parts(arch, encoder, output_stride, options):
    """The decoder and segmentation head of smp.`arch` on `encoder`, built on the meta device
    (no encoder weights are made): smp's model code picks their widths and scales."""
    if encoder == "mit":  # smp's MiT encoder cannot be built on the meta device
        decoder = SegformerDecoder(list(CHANNELS[encoder][:options.get("encoder_depth", 5) + 1]),
                                   options.get("encoder_depth", 5), 256)
        return decoder, smp.base.SegmentationHead(256, CLASSES, kernel_size=1, upsampling=4)
    kwargs = {} if arch == "Segformer" else dict(encoder_output_stride=output_stride)
    with torch.device("meta"):
        model = getattr(smp, arch)(encoder, encoder_weights=None, classes=CLASSES, **kwargs,
                                   **options)
    return model.decoder, model.segmentation_head


def _features(channels, depth, output_stride, seed, batch=2):
    """smp's feature list (NHWC): the image, then levels 1..depth at stride 2**k, held at
    `output_stride` once reached."""
    rng = np.random.default_rng(seed)
    strides = [min(2 ** k, output_stride) for k in range(depth + 1)]
    return [rng.standard_normal((batch, H // s, W // s, c)).astype(np.float32)
            for c, s in zip(channels[:depth + 1], strides)]


@functools.cache
def _case(name):
    """(torch reference, flaxbones head, its converted variables, NHWC features, dict)."""
    arch, head_cls, encoder, output_stride, options = CASES[name]
    seed = sorted(CASES).index(name)
    ref = fill(Reference(*_smp_parts(arch, encoder, output_stride, options)).to_empty(
        device="cpu"), seed)
    head_options = dict(options, encoder_output_stride=output_stride) if arch != "Segformer" \
        else dict(options, encoder_has_c1=CHANNELS[encoder][1] > 0)
    head = head_cls(CLASSES, **head_options)
    features = _features(CHANNELS[encoder], options.get("encoder_depth", 5), output_stride, seed)
    variables, levels = load_head(ref, head, features, RULES[arch])
    return ref, head, variables, features, levels


@pytest.mark.parametrize("name", list(CASES))
def test_eval_parity_and_parameter_count(name):
    ref, head, variables, features, levels = _case(name)
    assert set(head.levels) <= set(levels)
    out = jax.jit(head.apply)(variables, levels)
    assert out.shape == (2, H, W, CLASSES)
    rel = assert_parity(out, ref, features, variables, name)
    print(f"{name} eval: max rel diff {rel:.2e}")


@pytest.mark.parametrize("name", ["v3plus_resnet34", "v3plus_mobilenet_v2"])
def test_deeplabv3plus_train_parity(name):
    """Train mode: outputs and every updated BatchNorm statistic (ASPP dropout off)."""
    ref, head, variables, features, levels = _case(name)
    ref = copy.deepcopy(ref).train()
    ref.decoder.aspp[0].project[3].p = 0.0
    head = head.clone(decoder_aspp_dropout=0.0)
    assert_train_parity(ref, head, variables, features, levels, RULES[CASES[name][0]], name)


def test_wrong_state_dict_lists_keys():
    """A DeepLabV3 state dict onto a DeepLabV3+ head: a clear error, nothing loaded."""
    ref, *_ = _case("v3_resnet34")
    _, _, variables, *_ = _case("v3plus_resnet34")
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*decoder"):
        convert(ref.state_dict(), variables, RULES["DeepLabV3Plus"])


def test_legacy_deeplabv3_keys():
    """Files saved before smp 0.4 (`decoder.0/1/2`), which smp still loads, load too."""
    ref, _, variables, *_ = _case("v3_resnet34")
    legacy = {k.replace("decoder.aspp.", "decoder.0.").replace("decoder.conv.", "decoder.1.")
              .replace("decoder.bn.", "decoder.2."): v for k, v in ref.state_dict().items()}
    assert any(k.startswith("decoder.0.") for k in legacy)
    loaded = convert(legacy, variables, RULES["DeepLabV3"])
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


@pytest.mark.parametrize("head_cls, options, match", [
    (SmpDeepLabV3Head, dict(encoder_output_stride=32), "output_stride 8 or 16"),
    (SmpDeepLabV3Head, dict(decoder_atrous_rates=(6, 12)), "3 decoder_atrous_rates"),
    (SmpDeepLabV3PlusHead, dict(encoder_depth=2), r"encoder_depth in \[3, 5\]"),
    (SmpSegformerHead, dict(encoder_depth=2), r"encoder_depth in \[3, 5\]"),
])
def test_bad_options(head_cls, options, match):
    with pytest.raises(ValueError, match=match):
        head_cls(CLASSES, **options)


def test_levels_and_strides():
    """The levels smp's models read and the deepest stride their encoder gives."""
    assert SmpDeepLabV3Head(1).levels == ("C5",) and SmpDeepLabV3Head(1).supported_strides == (8,)
    assert SmpDeepLabV3Head(1, encoder_depth=3).supported_strides == (8,)
    v3plus = SmpDeepLabV3PlusHead(1, encoder_depth=4)
    assert v3plus.levels == ("C2", "C4") and v3plus.supported_strides == (16,)
    assert SmpSegformerHead(1, encoder_depth=3).levels == ("C1", "C2", "C3")
    assert SmpSegformerHead(1, encoder_has_c1=False).levels == ("C2", "C3", "C4", "C5")
