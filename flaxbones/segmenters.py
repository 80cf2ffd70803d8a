"""Segmenters: generic builders (any backbone x any head) and torchvision-named presets.

`fb.create_model("deeplabv3plus", backbone="xception65", num_classes=21, output_stride=16)`
composes by name or with a backbone Module; the presets carry torchvision's names and
WeightSources mapping torchvision segmentation state dicts onto these modules.
"""
from typing import Any, Sequence

from flax import linen as nn

from flaxbones.backbones import mobilenet_v3
from flaxbones.heads.aspp import atrous_rates_for
from flaxbones.heads.deeplab import DeepLabV3Head, DeepLabV3PlusHead, deeplab_style
from flaxbones.heads.fcn import FCNHead
from flaxbones.heads.fpn import SemanticFPNHead
from flaxbones.heads.lraspp import LRASPPHead
from flaxbones.heads.unet import UNetHead
from flaxbones.models import Segmenter, check_levels
from flaxbones.registry import create_backbone, get_spec, register_model
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource


# What backbone and heads share: dtypes, the BN `axis_name`, the kernel choice.
COMMON = ("dtype", "param_dtype", "axis_name", "cpu_kernels")


def build_backbone(backbone, output_stride: int | None, default_stride: int,
                   any_stride: bool = False, **kwargs) -> tuple[nn.Module, dict]:
    """(backbone, the settings its heads share). The backbone comes from a registered name
    (built at `output_stride`, else the head's default, with `kwargs`), or is a given
    Module (whose stride must then agree with `output_stride`). The heads share the
    backbone's dtypes, BN `axis_name` and `cpu_kernels` unless `kwargs` set them.

    With `any_stride` (a head that works at every stride) and no `output_stride` asked
    for, a family that cannot dilate to the default is built at its native stride 32.
    """
    common = {k: kwargs[k] for k in COMMON if k in kwargs}
    bb = _backbone(backbone, output_stride, default_stride, any_stride, kwargs)
    return bb, {**{k: getattr(bb, k) for k in COMMON if hasattr(bb, k)}, **common}


def _backbone(backbone, output_stride, default_stride, any_stride, kwargs):
    if isinstance(backbone, str):
        def build(stride):
            bb = create_backbone(backbone, output_stride=stride, **kwargs)
            bb.feature_info  # noqa: B018  (an unsupported stride fails here at the latest)
            return bb
        if output_stride is None and any_stride:
            try:
                return build(default_stride)
            except ValueError:
                return build(32)
        return build(output_stride or default_stride)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a registered name or a flax Module, got {backbone!r}")
    options = sorted(k for k in kwargs if k not in COMMON)
    if options:
        raise ValueError(f"backbone options {options} apply only to a backbone given by name")
    own = getattr(backbone, "output_stride", None)
    if output_stride is not None and own is not None and own != output_stride:
        raise ValueError(f"output_stride={output_stride} disagrees with the given backbone's "
                         f"output_stride={own}; configure the backbone Module instead")
    return backbone


def _rates(backbone, levels, atrous_rates, who):
    """ASPP rates: given, or DeepLab's for the stride of the deepest of `levels`."""
    info = check_levels(backbone, levels, who)
    return tuple(atrous_rates or atrous_rates_for(info[levels[-1]].stride))





def _aux(aux_loss, aux_level, num_classes, common):
    return FCNHead(num_classes, feature=aux_level, **common) if aux_loss else None


@register_model("segmenter")
def deeplabv3(backbone: Any = "resnet50", num_classes: int = 21, output_stride: int | None = None,
              style: str = "torchvision", atrous_rates: Sequence[int] | None = None,
              aux_loss: bool = False, aux_level: str = "C4", head_kwargs: dict | None = None, **backbone_kwargs):
    """DeepLabv3 on C5 (default output stride 16; rates from the stride, or `atrous_rates`);
    `style` 'torchvision' or 'tf'; `aux_loss` adds torchvision's FCN head on `aux_level`;
    `head_kwargs` override the style's head settings (e.g. bn_momentum, dropout)."""
    bb, common = build_backbone(backbone, output_stride, 16, **backbone_kwargs)
    rates = _rates(bb, ("C5",), atrous_rates, "DeepLabV3Head")
    settings = {**deeplab_style(style), **(head_kwargs or {})}
    head = DeepLabV3Head(num_classes, atrous_rates=rates, **settings, **common)
    return Segmenter(bb, head, _aux(aux_loss, aux_level, num_classes, common))


@register_model("segmenter")
def deeplabv3plus(backbone: Any = "resnet101", num_classes: int = 21,
                  output_stride: int | None = None, style: str = "torchvision",
                  atrous_rates: Sequence[int] | None = None, low_level: str = "C2",
                  feature: str = "C5", head_kwargs: dict | None = None,
                  **backbone_kwargs):
    """DeepLabv3+: ASPP on `feature` (C5; default output stride 16) and a decoder over
    `low_level` (C2); `head_kwargs` override the style's head settings (e.g. bn_momentum,
    dropout)."""
    bb, common = build_backbone(backbone, output_stride, 16, **backbone_kwargs)
    rates = _rates(bb, (low_level, feature), atrous_rates, "DeepLabV3PlusHead")
    settings = {**deeplab_style(style, plus=True), **(head_kwargs or {})}
    head = DeepLabV3PlusHead(num_classes, feature=feature, low_level=low_level,
                             atrous_rates=rates, **settings, **common)
    return Segmenter(bb, head)


@register_model("segmenter")
def fcn(backbone: Any = "resnet50", num_classes: int = 21, output_stride: int | None = None,
        aux_loss: bool = False, aux_level: str = "C4", **backbone_kwargs):
    """torchvision's FCN: FCNHead on C5 (default output stride 8, or 32 for a family that
    cannot dilate), optional aux head."""
    bb, common = build_backbone(backbone, output_stride, 8, any_stride=True, **backbone_kwargs)
    return Segmenter(bb, FCNHead(num_classes, **common),
                     _aux(aux_loss, aux_level, num_classes, common))


@register_model("segmenter")
def lraspp(backbone: Any = "mobilenet_v3_large", num_classes: int = 21,
           output_stride: int | None = None, low: str = "C3", high: str = "C5",
           inter_channels: int = 128, **backbone_kwargs):
    """Lite R-ASPP over `low` and `high` levels (default output stride 16, or 32 for a
    family that cannot dilate)."""
    bb, common = build_backbone(backbone, output_stride, 16, any_stride=True, **backbone_kwargs)
    return Segmenter(bb, LRASPPHead(num_classes, low=low, high=high,
                                    inter_channels=inter_channels, **common))


@register_model("segmenter")
def fpn(backbone: Any = "resnet50", num_classes: int = 21, output_stride: int | None = None,
        fpn_channels: int = 256, channels: int = 128, **backbone_kwargs):
    """Semantic FPN (Panoptic FPN's semantic branch) over C2..C5, output stride 32."""
    bb, common = build_backbone(backbone, output_stride, 32, **backbone_kwargs)
    return Segmenter(bb, SemanticFPNHead(num_classes, fpn_channels=fpn_channels,
                                         channels=channels, **common))


@register_model("segmenter")
def unet(backbone: Any = "resnet50", num_classes: int = 21, output_stride: int | None = None,
         decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), **backbone_kwargs):
    """U-Net decoder over C1..C5, output stride 32."""
    bb, common = build_backbone(backbone, output_stride, 32, **backbone_kwargs)
    return Segmenter(bb, UNetHead(num_classes, decoder_channels=tuple(decoder_channels), **common))


# --- torchvision presets: state dicts `backbone.*`, `classifier.*`, `aux_classifier.*` ---

def backbone_rules(name: str, prefix: str = r"backbone\.") -> tuple:
    """A backbone's own torch key rules, under a segmentation model's `backbone.` prefix."""
    return tuple((prefix + pattern, template) for pattern, template in get_spec(name).weights.rules
                 if template.startswith("backbone/"))


_AUX_FCN = FCNHead.torch_rules("aux_classifier", "aux_head")
_CLASSIFIERS = ("head/classifier", "aux_head/classifier")


def torchvision_source(backbone: tuple, head_rules, head_prefix=_CLASSIFIERS) -> WeightSource:
    """torchvision's segmentation weights (COCO with VOC labels: 21 classes), evaluated on
    images whose shorter side is resized to 520."""
    return WeightSource("torchvision", tuple(backbone) + tuple(head_rules), num_classes=21,
                        head_prefix=head_prefix, resize_size=520, labels="voc",
                        **TORCH_IMAGENET)


def _register_resnet_presets(depth: int):
    """torchvision's fcn_resnet{depth} and deeplabv3_resnet{depth}: output stride 8, rates
    12/24/36, optional aux FCN head on C4."""
    bb = f"resnet{depth}"

    def fcn_preset(num_classes: int = 21, aux_loss: bool = False, output_stride: int = 8,
                   **kwargs):
        return fcn(bb, num_classes, output_stride, aux_loss=aux_loss, **kwargs)

    def deeplab_preset(num_classes: int = 21, aux_loss: bool = False, output_stride: int = 8,
                       atrous_rates=(12, 24, 36), **kwargs):
        return deeplabv3(bb, num_classes, output_stride, atrous_rates=atrous_rates,
                         aux_loss=aux_loss, **kwargs)

    for preset, name, head_rules in ((fcn_preset, "fcn", FCNHead.torch_rules()),
                                     (deeplab_preset, "deeplabv3", DeepLabV3Head.torch_rules())):
        preset.__name__ = f"{name}_{bb}"
        preset.__doc__ = f"torchvision's {name}_{bb}: output stride 8, aux FCN head on C4."
        source = torchvision_source(backbone_rules(bb), head_rules + _AUX_FCN)
        register_model("segmenter", source)(preset)


for _depth in (50, 101):
    _register_resnet_presets(_depth)


@register_model("segmenter")
def deeplabv3plus_resnet101(num_classes: int = 21, output_stride: int = 16, **kwargs):
    """DeepLabv3+ on ResNet-101 (torchvision style, C2 low-level feature)."""
    return deeplabv3plus("resnet101", num_classes, output_stride, **kwargs)


# torchvision's MobileNetV3 segmenters tap `features.4` (the first 40-channel unit, stride 8)
# for the LR-ASPP 'low' input and the DeepLabv3 'aux' head, not the end of that stage (C3).
_MBV3_TAP = "features_4"
_MBV3_BACKBONE = mobilenet_v3.torch_rules(mobilenet_v3.LARGE, src="backbone")


@register_model("segmenter", torchvision_source(
    _MBV3_BACKBONE, DeepLabV3Head.torch_rules() + _AUX_FCN))
def deeplabv3_mobilenet_v3_large(num_classes: int = 21, aux_loss: bool = False,
                                 output_stride: int = 16, atrous_rates=(12, 24, 36), **kwargs):
    """torchvision's deeplabv3_mobilenet_v3_large: output stride 16 (dilated last stage),
    rates 12/24/36, aux FCN head on `features_4`."""
    out = ("C5", _MBV3_TAP) if aux_loss else ("C5",)
    return deeplabv3("mobilenet_v3_large", num_classes, output_stride, atrous_rates=atrous_rates,
                     aux_loss=aux_loss, aux_level=_MBV3_TAP, out_features=out, **kwargs)


@register_model("segmenter", torchvision_source(
    _MBV3_BACKBONE, LRASPPHead.torch_rules(), ("head/low_classifier", "head/high_classifier")))
def lraspp_mobilenet_v3_large(num_classes: int = 21, output_stride: int = 16, **kwargs):
    """torchvision's lraspp_mobilenet_v3_large: output stride 16, low = `features_4`."""
    return lraspp("mobilenet_v3_large", num_classes, output_stride, low=_MBV3_TAP, high="C5",
                  out_features=(_MBV3_TAP, "C5"), **kwargs)


@register_model("segmenter")
def deeplabv3plus_xception65(num_classes: int = 21, output_stride: int = 16, **kwargs):
    """TF DeepLab's xception65 DeepLabv3+: TF style (separable ASPP and decoder, pooling
    first, align_corners=True), low-level feature Xception's pre-ReLU C2 tap."""
    return deeplabv3plus("xception65", num_classes, output_stride, **{"style": "tf", **kwargs})


@register_model("segmenter")
def deeplabv3plus_mobilenet_v2(num_classes: int = 21, output_stride: int = 16, **kwargs):
    """DeepLabv3+ on MobileNetV2 (torchvision style). As TF DeepLab ('layer_18') and common
    PyTorch ports, ASPP reads the last inverted residual (`features_17`, 320 channels), not
    C5 after the 1280-channel conv; the low-level feature is C2 (24 channels, stride 4)."""
    return deeplabv3plus("mobilenet_v2", num_classes, output_stride, feature="features_17",
                         out_features=("C2", "features_17"), **kwargs)
