"""smp's pyramid decoders (FPN, PSPNet, PAN, UPerNet) alone: smp's decoder + segmentation
head and the flaxbones head on the same random weights (BN statistics, LayerNorm and
GroupNorm affines randomised) and the same random features of a ResNet-34's and a
MobileNetV2's widths; eval logits and parameter counts equal. The second encoder of each
pair runs other options, so every code path is covered once."""
import jax
import numpy as np
import pytest
import torch

from flaxbones.heads.smp import fpn, pan, pspnet, upernet
from smp_ref import Reference, assert_parity, load_head
from torch_ref import randomize

smp = pytest.importorskip("segmentation_models_pytorch")

CLASSES = 3
ENCODERS = {"resnet34": (3, 64, 64, 128, 256, 512), "mobilenet_v2": (3, 16, 24, 32, 96, 1280)}
HEADS = {"fpn": fpn.SmpFPNHead, "pspnet": pspnet.SmpPSPNetHead, "pan": pan.SmpPANHead,
         "upernet": upernet.SmpUPerNetHead}
RULES = {"fpn": fpn.RULES, "pspnet": pspnet.RULES, "pan": pan.RULES, "upernet": upernet.RULES}
CASES = [
    ("fpn", "resnet34", {}),
    ("fpn", "mobilenet_v2", dict(decoder_merge_policy="cat", decoder_interpolation="bilinear")),
    ("pspnet", "resnet34", {}),  # C3 8 x 12: uneven 3-bins, overlapping 6-bins
    ("pspnet", "mobilenet_v2", dict(encoder_depth=5, psp_use_batchnorm=False)),  # C5 2 x 3
    ("pan", "resnet34", {}),
    ("pan", "mobilenet_v2", dict(encoder_depth=4, decoder_interpolation="nearest")),
    ("upernet", "resnet34", {}),
    ("upernet", "mobilenet_v2", dict(encoder_depth=4, decoder_use_norm="identity")),
]


def smp_decoder(name: str, channels, kw: dict):
    """smp's decoder and segmentation head for smp model options `kw`, as smp's models
    build them."""
    d = smp.decoders
    depth = kw.get("encoder_depth", 3 if name == "pspnet" else 5)
    channels = channels[:depth + 1]
    if name == "fpn":
        dec = d.fpn.decoder.FPNDecoder(
            channels, depth, merge_policy=kw.get("decoder_merge_policy", "add"),
            interpolation_mode=kw.get("decoder_interpolation", "nearest"))
        return dec, smp.base.SegmentationHead(dec.out_channels, CLASSES, 1, upsampling=4)
    if name == "pspnet":
        norm = kw.get("psp_use_batchnorm", kw.get("decoder_use_norm", "batchnorm"))
        dec = d.pspnet.decoder.PSPDecoder(channels, use_norm=norm)
        return dec, smp.base.SegmentationHead(512, CLASSES, 3, upsampling=8)
    if name == "pan":
        dec = d.pan.decoder.PANDecoder(channels, depth, 32,
                                       kw.get("decoder_interpolation", "bilinear"))
        return dec, smp.base.SegmentationHead(32, CLASSES, 3, upsampling=4)
    dec = d.upernet.decoder.UPerNetDecoder(channels, depth, 256,
                                           kw.get("decoder_use_norm", "batchnorm"))
    return dec, smp.base.SegmentationHead(256, CLASSES, 1, upsampling=4)


def features(name: str, channels, depth: int, seed: int):
    """smp's encoder outputs (features[0] the image) as NHWC arrays: strides 2^i, capped at
    16 for PAN (smp's dilated encoder), whose FPA needs a 128 x 160 image."""
    rng = np.random.RandomState(seed)
    (h, w), cap = ((128, 160), 16) if name == "pan" else ((64, 96), 32)
    return [rng.randn(2, c, h // min(2 ** i, cap), w // min(2 ** i, cap)).astype(np.float32)
            .transpose(0, 2, 3, 1) for i, c in enumerate(channels[:depth + 1])]


def perturb_group_norms(model: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


@pytest.mark.parametrize("name, encoder, kw", CASES, ids=[f"{n}-{e}" for n, e, _ in CASES])
def test_parity_with_smp_decoder(name, encoder, kw):
    channels = ENCODERS[encoder]
    seed = list(HEADS).index(name) * 2 + list(ENCODERS).index(encoder)
    torch.manual_seed(seed)
    ref = Reference(*smp_decoder(name, channels, kw))
    randomize(ref, seed)
    perturb_group_norms(ref, seed)
    ref.eval()
    head = HEADS[name](CLASSES, **kw)
    feats = features(name, channels, head.encoder_depth, seed)
    variables, inputs = load_head(ref, head, feats, RULES[name])
    out = jax.jit(head.apply)(variables, inputs)
    rel = assert_parity(out, ref, feats, variables, f"{name} {encoder}")
    print(f"smp {name} x {encoder}: logits {tuple(out.shape)}, max rel diff {rel:.2e}")


@pytest.mark.parametrize("head, kw", [
    (fpn.SmpFPNHead, dict(decoder_merge_policy="max")),
    (fpn.SmpFPNHead, dict(decoder_interpolation="trilinear")),
    (fpn.SmpFPNHead, dict(encoder_depth=2)),
    (pspnet.SmpPSPNetHead, dict(decoder_use_norm="layernorm")),
    (pan.SmpPANHead, dict(encoder_output_stride=8)),
    (upernet.SmpUPerNetHead, dict(encoder_depth=6)),
])
def test_bad_options_raise(head, kw):
    with pytest.raises(ValueError, match=next(iter(kw)).split("_")[-1]):
        head(CLASSES, **kw)
