"""SSDlite (torchvision's ssdlite320_mobilenet_v3_large): MobileNetV3-Large with the reduced
tail, tapped inside its last strided block (after that block's expansion, stride 16) and at
its end (stride 32), four depthwise-separable extra stages, and a head of depthwise 3x3 +
pointwise 1x1 predictors; BatchNorm eps 1e-3, torch momentum 0.03; fixed 320x320 input."""
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.backbones.mobilenet_v3 import ACTS, LARGE, STEM
from flaxbones.detection.anchors import DefaultBoxGenerator
from flaxbones.detection.base import (
    check_num_classes,
    sequence_frozen_patterns,
    torchvision_detector_source,
    unit_stage_starts,
)
from flaxbones.detection.onestage import flatten_level
from flaxbones.detection.ssd import SSD
from flaxbones.layers import (
    ConvNormAct,
    ConvNormModule,
    InvertedResidual,
    SqueezeExcite,
    make_divisible,
)
from flaxbones.registry import register_model

# torchvision's `reduced_tail=True` (what the COCO weights use): the last stage at half width.
LARGE_REDUCED = LARGE[:12] + ((5, 672, 80, True, "HS", 2), (5, 480, 80, True, "HS", 1),
                              (5, 480, 80, True, "HS", 1))
normal_003 = nn.initializers.normal(0.03)


class SSDLiteMobileNetV3(ConvNormModule):
    """torchvision's SSDLiteFeatureExtractorMobileNet: MobileNetV3 units `features_0 ..
    features_16` (flaxbones' MobileNetV3 names), map 0 the expansion output of the last
    strided block (`c4`), map 1 the final 1x1 conv, then `extra_0 .. extra_3` (1x1 to half
    width, depthwise 3x3/2, 1x1; ReLU6) of 512, 256, 256, 128 channels."""

    blocks: tuple = LARGE_REDUCED
    extras: tuple = (512, 256, 256, 128)

    def _c4(self) -> int:
        return max(i for i, b in enumerate(self.blocks, 1) if b[-1] > 1)

    def frozen_param_patterns(self, trainable_layers: int | None) -> tuple:
        """`_mobilenet_extractor`: units before the last `trainable_layers` of the 6 stages."""
        strides = (2, *(b[-1] for b in self.blocks), 1)
        units = [f"features_{i}" for i in range(len(strides))]
        return sequence_frozen_patterns(trainable_layers, unit_stage_starts(strides), units)

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm = self.conv_def(), self.norm_def(train)
        unit = partial(ConvNormAct, conv=conv, norm=norm)
        x = unit(STEM, 3, 2, act=nn.hard_swish, name="features_0")(x)
        maps = []
        for n, (k, expanded, out, se, act, stride) in enumerate(self.blocks, 1):
            se = partial(SqueezeExcite, make_divisible(expanded // 4), gate=nn.hard_sigmoid,
                         conv=conv) if se else None
            block = InvertedResidual if n != self._c4() else _TappedInvertedResidual
            x = block(out, expanded, k, stride, act=ACTS[act], se=se, conv=conv, norm=norm,
                      name=f"features_{n}")(x)
            if isinstance(x, tuple):
                tap, x = x
                maps.append(tap)
        maps.append(x := unit(6 * self.blocks[-1][2], 1, act=nn.hard_swish,
                              name=f"features_{len(self.blocks) + 1}")(x))
        extra = partial(ConvNormAct, conv=self.conv_def(kernel_init=normal_003), norm=norm,
                        act=nn.relu6)
        for i, width in enumerate(self.extras):
            maps.append(x := _ExtraBlock(width, extra, name=f"extra_{i}")(x))
        return maps


class _ExtraBlock(nn.Module):
    """torchvision's SSDlite `_extra_block`: 1x1 to half `width` (`squeeze`), depthwise 3x3
    stride 2 (`dw`), 1x1 to `width` (`expand`), each conv-BN-ReLU6."""

    width: int
    unit: Any

    @nn.compact
    def __call__(self, x):
        mid = self.width // 2
        x = self.unit(mid, 1, name="squeeze")(x)
        x = self.unit(mid, 3, 2, groups=mid, name="dw")(x)
        return self.unit(self.width, 1, name="expand")(x)


class _TappedInvertedResidual(InvertedResidual):
    """An InvertedResidual (same parameters) that also returns its expansion output, where
    torchvision's SSDlite splits the block between its two feature maps."""

    @nn.compact
    def __call__(self, x):
        block = {"conv": self.conv, "norm": self.norm}
        tap = y = ConvNormAct(self.expanded, 1, act=self.act, name="expand", **block)(x)
        y = ConvNormAct(self.expanded, self.kernel_size, self.stride, self.dilation,
                        groups=self.expanded, act=self.act, name="dw", **block)(y)
        if self.se is not None:
            y = self.se(name="se")(y)
        return tap, ConvNormAct(self.out_channels, 1, act=None, name="project", **block)(y)


class SSDLiteHead(ConvNormModule):
    """torchvision's SSDLiteHead: per map i, `classification_head_i` and `regression_head_i`,
    each a depthwise 3x3 conv-BN-ReLU6 (`dw`) and a biased 1x1 conv (`pw`), N(0, 0.03) init;
    outputs concatenated over maps as SSDHead's."""

    num_anchors: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, maps, train: bool = False):
        conv = self.conv_def(kernel_init=normal_003)
        unit = partial(ConvNormAct, conv=conv, norm=self.norm_def(train), act=nn.relu6)
        out = {"cls_logits": [], "bbox_regression": []}
        for i, (x, a) in enumerate(zip(maps, self.num_anchors)):
            for key, branch, cols in (("cls_logits", "classification_head", self.num_classes),
                                      ("bbox_regression", "regression_head", 4)):
                y = _Predictor(a * cols, unit, conv, name=f"{branch}_{i}")(x)
                out[key].append(flatten_level(y, cols))
        return {k: jnp.concatenate(v, axis=1) for k, v in out.items()}


class _Predictor(nn.Module):
    """torchvision's `_prediction_block`: depthwise 3x3 conv-BN-ReLU6 then a 1x1 conv."""

    features: int
    unit: Any
    conv: Any

    @nn.compact
    def __call__(self, x):
        x = self.unit(x.shape[-1], 3, groups=x.shape[-1], name="dw")(x)
        return self.conv(self.features, (1, 1), use_bias=True, name="pw")(x)


def _ssdlite_rules(blocks=LARGE_REDUCED) -> tuple:
    """torchvision's keys: `backbone.features.0.{0..c4-1}` the units before the tapped block,
    `backbone.features.0.{c4}` its expansion, `backbone.features.1.0.{1,2,3}` its dw / se /
    project, `backbone.features.1.{1..}` the units after it; `backbone.extra.i.{0,1,2}`;
    `head.*_head.module_list.i.{0.0, 0.1, 1}`."""
    c4 = max(i for i, b in enumerate(blocks, 1) if b[-1] > 1)
    torch_index = {n: (0, n) if n <= c4 else (1, n - c4) for n in range(len(blocks) + 2)}
    rules, width = [(r"backbone\.features\.0\.0\.0", "backbone/features_0/conv"),
                    (r"backbone\.features\.0\.0\.1", "backbone/features_0/bn")], STEM
    for n, (_, expanded, out, se, _, _) in enumerate(blocks, 1):
        parts = ("expand",) * (expanded != width) + ("dw",) + ("se",) * se + ("project",)
        half, index = torch_index[n]
        for k, part in enumerate(parts):
            to = f"backbone/features_{n}/{part}"
            if n == c4:  # expansion in features.0.{c4}, the rest in features.1.0.{k}
                at = (rf"backbone\.features\.0\.{c4}" if k == 0
                      else rf"backbone\.features\.1\.0\.{k}")
            else:
                at = rf"backbone\.features\.{half}\.{index}\.block\.{k}"
            if part == "se":
                rules.append((rf"{at}\.(fc[12])", rf"{to}/\1"))
            else:
                rules += [(rf"{at}\.0", f"{to}/conv"), (rf"{at}\.1", f"{to}/bn")]
        width = out
    last = len(blocks) + 1
    rules += [(rf"backbone\.features\.1\.{last - c4}\.0", f"backbone/features_{last}/conv"),
              (rf"backbone\.features\.1\.{last - c4}\.1", f"backbone/features_{last}/bn")]
    for k, part in enumerate(("squeeze", "dw", "expand")):
        rules += [(rf"backbone\.extra\.(\d)\.{k}\.0", rf"backbone/extra_\1/{part}/conv"),
                  (rf"backbone\.extra\.(\d)\.{k}\.1", rf"backbone/extra_\1/{part}/bn")]
    for b in ("classification_head", "regression_head"):
        at, to = rf"head\.{b}\.module_list\.(\d)", rf"head/{b}_\1"
        rules += [(at + r"\.0\.0", to + "/dw/conv"), (at + r"\.0\.1", to + "/dw/bn"),
                  (at + r"\.1", to + "/pw")]
    return tuple(rules)


SSDLITE_SOURCE = torchvision_detector_source(
    _ssdlite_rules(), transform=(("fixed_size", (320, 320)), ("size_divisible", 1)),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@register_model("detector", SSDLITE_SOURCE)
def ssdlite320_mobilenet_v3_large(num_classes: int = 91, score_thresh: float = 0.001,
                                  nms_thresh: float = 0.55, detections_per_img: int = 300,
                                  topk_candidates: int = 300, trainable_layers: int | None = 6,
                                  **kwargs) -> SSD:
    """torchvision's ssdlite320_mobilenet_v3_large: SSDLiteMobileNetV3 maps (reduced tail,
    BN eps 1e-3 / torch momentum 0.03, not frozen), 6 default boxes per location
    (ratios 2, 3; scales 0.2 .. 0.95 from the map sizes), its postprocess defaults."""
    check_num_classes(num_classes)
    kwargs = {"bn_epsilon": 1e-3, "bn_momentum": 0.97, **kwargs}
    anchors = DefaultBoxGenerator(((2, 3),) * 6, min_ratio=0.2, max_ratio=0.95)
    head = SSDLiteHead(tuple(anchors.num_anchors_per_location()), num_classes, **kwargs)
    return SSD(SSDLiteMobileNetV3(**kwargs), head, anchors, score_thresh, nms_thresh,
               detections_per_img, topk_candidates, trainable_layers)


__all__ = ["LARGE_REDUCED", "SSDLiteHead", "SSDLiteMobileNetV3", "ssdlite320_mobilenet_v3_large"]
