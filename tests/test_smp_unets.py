"""Parity with segmentation_models_pytorch's U-Net, U-Net++, Linknet and MAnet decoders:
smp's own decoder + segmentation head (taken from the smp model, so its defaults hold) on
random encoder features, weights converted by each head's RULES."""
import copy
import functools

import jax
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.linknet.decoder import LinknetDecoder
from segmentation_models_pytorch.decoders.manet.decoder import MAnetDecoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.decoders.unetplusplus.decoder import UnetPlusPlusDecoder

from flaxbones.heads.smp import linknet, manet, unet, unetplusplus
import torch_ref
from smp_ref import (Reference, assert_parity, assert_train_parity, convert, fill, load_head,
                     param_count)

CLASSES = 3
SIZE, ODD = (64, 96), (97, 131)
# smp's encoder out_channels (image first); "mit" is a transformer-style encoder's (MiT-B0),
# whose stride-2 feature is empty.
CHANNELS = {"resnet34": (3, 64, 64, 128, 256, 512), "mobilenet_v2": (3, 16, 24, 32, 96, 1280),
            "mit": (3, 0, 32, 64, 160, 256)}
HEADS = {"Unet": unet.SmpUnetHead, "UnetPlusPlus": unetplusplus.SmpUnetPlusPlusHead,
         "Linknet": linknet.SmpLinknetHead, "MAnet": manet.SmpMAnetHead}
RULES = {"Unet": unet.RULES, "UnetPlusPlus": unetplusplus.RULES, "Linknet": linknet.RULES,
         "MAnet": manet.RULES}
# name: (smp class, encoder, image size, options for both; `center`: smp's VGG choice)
CASES = {
    "unet_resnet34": ("Unet", "resnet34", SIZE, {}),
    "unet_mobilenet_v2": ("Unet", "mobilenet_v2", ODD, dict(
        encoder_depth=4, decoder_channels=(128, 64, 32, 16), decoder_attention_type="scse",
        decoder_interpolation="bilinear", center=True)),
    "unet_mit": ("Unet", "mit", SIZE, dict(decoder_use_norm=False)),
    "unetplusplus_resnet34": ("UnetPlusPlus", "resnet34", SIZE, dict(center=True)),
    "unetplusplus_mobilenet_v2": ("UnetPlusPlus", "mobilenet_v2", SIZE, dict(
        encoder_depth=4, decoder_channels=(128, 64, 32, 16), decoder_attention_type="scse")),
    "linknet_resnet34": ("Linknet", "resnet34", SIZE, {}),
    "linknet_mobilenet_v2": ("Linknet", "mobilenet_v2", SIZE, dict(
        decoder_use_norm=False, activation="sigmoid")),
    "manet_resnet34": ("MAnet", "resnet34", SIZE, {}),
    "manet_mobilenet_v2": ("MAnet", "mobilenet_v2", SIZE, dict(
        decoder_interpolation="bilinear", decoder_pab_channels=32)),
}


def _reference(arch, encoder, options):
    """smp's decoder (its constructor, as smp's model calls it) and SegmentationHead."""
    o = options
    channels = CHANNELS[encoder][:o.get("encoder_depth", 5) + 1]
    depth, norm = len(channels) - 1, o.get("decoder_use_norm", "batchnorm")
    widths = o.get("decoder_channels", (256, 128, 64, 32, 16))
    attention, mode = o.get("decoder_attention_type"), o.get("decoder_interpolation", "nearest")
    if arch == "Unet":
        decoder = UnetDecoder(channels, widths, depth, norm, attention, o.get("center", False),
                              mode)
    elif arch == "UnetPlusPlus":
        decoder = UnetPlusPlusDecoder(channels, widths, depth, norm, attention, mode,
                                      o.get("center", False))
    elif arch == "Linknet":
        decoder = LinknetDecoder(channels, 32, depth, norm)
    else:
        decoder = MAnetDecoder(channels, widths, depth, 16, norm, o.get("decoder_pab_channels", 64),
                               mode)
    head = SegmentationHead(32 if arch == "Linknet" else widths[-1], CLASSES,
                            kernel_size=1 if arch == "Linknet" else 3,
                            activation=o.get("activation"))
    return Reference(decoder, head)


def _features(channels, depth, size, seed, batch=2):
    """smp's feature list (NHWC): the image, then levels 1..depth, each ceil(half) the size
    of the one above (stride-2 convs with padding, as ResNet's and MobileNet's)."""
    rng = np.random.default_rng(seed)
    sizes = [tuple(size)]
    for _ in range(depth):
        sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
    return [rng.standard_normal((batch, *s, c)).astype(np.float32)
            for c, s in zip(channels[:depth + 1], sizes)]


@functools.cache
def _case(name):
    """(torch reference, flaxbones head, its converted variables, NHWC features, dict)."""
    arch, encoder, size, options = CASES[name]
    seed = sorted(CASES).index(name)
    ref = fill(_reference(arch, encoder, options), seed)
    head = HEADS[arch](CLASSES, **options, **({"encoder_has_c1": False} if encoder == "mit"
                                              else {}))
    features = _features(CHANNELS[encoder], options.get("encoder_depth", 5), size, seed)
    variables, levels = load_head(ref, head, features, RULES[arch], size=size)
    return ref, head, variables, features, levels


@pytest.mark.parametrize("name", list(CASES))
def test_eval_parity_and_parameter_count(name):
    ref, head, variables, features, levels = _case(name)
    size = CASES[name][2]
    assert head.levels == tuple(levels)
    out = jax.jit(functools.partial(head.apply, size=size))(variables, levels)
    assert out.shape == (2, *size, CLASSES)
    rel = assert_parity(out, ref, features, variables, name)
    print(f"{name} eval: max rel diff {rel:.2e}, {param_count(variables)} parameters")


def test_unet_train_parity():
    """Train mode: outputs and every updated BatchNorm statistic."""
    ref, head, variables, features, levels = _case("unet_resnet34")
    assert_train_parity(copy.deepcopy(ref).train(), head, variables, features, levels,
                        unet.RULES, "unet")


@pytest.mark.parametrize("arch", list(HEADS))
def test_smp_model_defaults(arch):
    """smp.`arch`("resnet34")'s own decoder and segmentation head (built on the meta device)
    load onto the head with default options: same keys and shapes, same parameter count."""
    with torch.device("meta"):
        model = getattr(smp, arch)("resnet34", encoder_weights=None, classes=CLASSES)
    state = {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()
             if k.startswith(("decoder.", "segmentation_head."))}
    head = HEADS[arch](CLASSES)
    levels = {f"C{k + 1}": f for k, f in enumerate(_features(CHANNELS["resnet34"], 5, SIZE, 0,
                                                             batch=1)[1:])}
    variables = convert(state, jax.eval_shape(head.init, jax.random.PRNGKey(0), levels),
                        RULES[arch])
    assert param_count(variables) == sum(p.numel() for n, p in model.named_parameters()
                                         if n.startswith(("decoder.", "segmentation_head.")))


@pytest.mark.parametrize("mode", unet.MODES)
def test_interpolate_matches_torch(mode):
    """smp's decoder interpolation modes, to odd sizes, an exact 2x and a downsampling."""
    x = np.random.default_rng(0).standard_normal((1, 5, 7, 2)).astype(np.float32)
    for size in ((9, 13), (10, 14), (3, 4)):
        got = unet.interpolate(x, size, mode)
        want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode=mode)
        torch_ref.assert_close(got, want.numpy().transpose(0, 2, 3, 1), rel=1e-6,
                               what=f"{mode} {size}")


def test_fixed_factor_decoders_reject_odd_sizes():
    """U-Net++, Linknet and MAnet upsample by 2: on an image smp rejects, a ValueError."""
    levels = {f"C{k}": f for k, f in enumerate(_features(CHANNELS["resnet34"], 5, ODD, 0, 1))
              if k}
    for head in (unetplusplus.SmpUnetPlusPlusHead(1), linknet.SmpLinknetHead(1),
                 manet.SmpMAnetHead(1)):
        with pytest.raises(ValueError, match="divisible by 32"):
            jax.eval_shape(head.init, jax.random.PRNGKey(0), levels)


def test_wrong_state_dict_lists_keys():
    """A U-Net state dict onto a U-Net++ head: a clear error, nothing loaded."""
    ref, *_ = _case("unet_resnet34")
    _, _, variables, *_ = _case("unetplusplus_resnet34")
    with pytest.raises(ValueError, match=r"(?s)nothing was loaded.*decoder"):
        convert(ref.state_dict(), variables, RULES["UnetPlusPlus"])


@pytest.mark.parametrize("head_cls, options, match", [
    (unet.SmpUnetHead, dict(encoder_depth=4), "provide `decoder_channels` for 5"),
    (unet.SmpUnetHead, dict(decoder_attention_type="cbam"), "not implemented"),
    (unet.SmpUnetHead, dict(decoder_interpolation="linear"), "not supported"),
    (manet.SmpMAnetHead, dict(decoder_use_norm="layernorm"), "not supported"),
    (unetplusplus.SmpUnetPlusPlusHead, dict(encoder_depth=1, decoder_channels=(16,)),
     r"encoder_depth in \[2, 5\]"),
    (linknet.SmpLinknetHead, dict(encoder_depth=6), r"encoder_depth in \[1, 5\]"),
])
def test_bad_options(head_cls, options, match):
    with pytest.raises(ValueError, match=match):
        head_cls(CLASSES, **options)
