"""EfficientNet V1 (B0..B7) and V2 (S/M/L) in torchvision's layout: `features.0` stem,
`features.1..n` stages of MBConv / FusedMBConv blocks, `features.n+1` the final 1x1 conv.
Flax modules are named `features_N` (blocks `features_N_I`), so torchvision keys map by index."""
import math
from functools import partial
from typing import Sequence

from flax import linen as nn

from flaxbones.backbones.base import Backbone, UnitSequence, option
from flaxbones.features import check_images
from flaxbones.layers import ConvNormAct, InvertedResidual, SqueezeExcite, make_divisible
from flaxbones.layers.conv import ModuleDef
from flaxbones.layers.drop_path import drop_path
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (block, expand ratio, kernel, stride, in, out, layers): the papers' Table 1 / Table 4 as
# torchvision lists them ("mb": MBConv with SE, "fused": FusedMBConv).
V1 = (("mb", 1, 3, 1, 32, 16, 1), ("mb", 6, 3, 2, 16, 24, 2), ("mb", 6, 5, 2, 24, 40, 2),
      ("mb", 6, 3, 2, 40, 80, 3), ("mb", 6, 5, 1, 80, 112, 3), ("mb", 6, 5, 2, 112, 192, 4),
      ("mb", 6, 3, 1, 192, 320, 1))
V2_S = (("fused", 1, 3, 1, 24, 24, 2), ("fused", 4, 3, 2, 24, 48, 4),
        ("fused", 4, 3, 2, 48, 64, 4), ("mb", 4, 3, 2, 64, 128, 6),
        ("mb", 6, 3, 1, 128, 160, 9), ("mb", 6, 3, 2, 160, 256, 15))
V2_M = (("fused", 1, 3, 1, 24, 24, 3), ("fused", 4, 3, 2, 24, 48, 5),
        ("fused", 4, 3, 2, 48, 80, 5), ("mb", 4, 3, 2, 80, 160, 7),
        ("mb", 6, 3, 1, 160, 176, 14), ("mb", 6, 3, 2, 176, 304, 18),
        ("mb", 6, 3, 1, 304, 512, 5))
V2_L = (("fused", 1, 3, 1, 32, 32, 4), ("fused", 4, 3, 2, 32, 64, 7),
        ("fused", 4, 3, 2, 64, 96, 7), ("mb", 4, 3, 2, 96, 192, 10),
        ("mb", 6, 3, 1, 192, 224, 19), ("mb", 6, 3, 2, 224, 384, 25),
        ("mb", 6, 3, 1, 384, 640, 7))


def scale_stages(stages, width_mult: float = 1.0, depth_mult: float = 1.0):
    """The stage table with torchvision's width (`make_divisible`) and depth (ceil) scaling."""
    return tuple((kind, t, k, s, make_divisible(c_in * width_mult),
                  make_divisible(c_out * width_mult), int(math.ceil(n * depth_mult)))
                 for kind, t, k, s, c_in, c_out, n in stages)


# name: (width_mult, depth_mult, input size, torchvision's classifier dropout); B5..B7 use
# BatchNorm eps 1e-3 and torch momentum 0.01 (their weights come from TF), B0..B4 torch's
# defaults; V2 eps 1e-3 and momentum 0.1.
V1_VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2), "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 288, 0.3), "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4), "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5), "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}
V2_VARIANTS = {"efficientnet_v2_s": (V2_S, 384, 0.2), "efficientnet_v2_m": (V2_M, 480, 0.3),
               "efficientnet_v2_l": (V2_L, 480, 0.4)}
TORCHVISION_DROPOUT = {**{k: v[3] for k, v in V1_VARIANTS.items()},
                       **{k: v[2] for k, v in V2_VARIANTS.items()}}
TORCHVISION_DROP_PATH = {name: 0.2 for name in TORCHVISION_DROPOUT}


class FusedMBConv(nn.Module):
    """EfficientNetV2's block: k x k conv `expand` (strided, SiLU) -> 1x1 `project`, or one
    k x k conv `fused` when the ratio is 1; identity (with stochastic depth) at stride 1
    and equal widths."""

    out_channels: int
    expanded: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    conv: ModuleDef = None
    norm: ModuleDef = None
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x):
        unit = partial(ConvNormAct, conv=self.conv, norm=self.norm, act=nn.silu)
        spatial = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation)
        if self.expanded != x.shape[-1]:
            y = unit(self.expanded, name="expand", **spatial)(x)
            y = unit(self.out_channels, 1, act=None, name="project")(y)
        else:
            y = unit(self.out_channels, name="fused", **spatial)(x)
        if self.stride == 1 and x.shape[-1] == self.out_channels:
            y = drop_path(self, y, self.drop_path_rate, self.train) + x
        return y


class EfficientNet(UnitSequence, Backbone):
    """EfficientNet V1/V2 backbone (torchvision's), SiLU throughout, SE squeezing to a
    quarter of each block's input width.

    C1..C5 are the last block at strides 2..32 (C5 includes the final 1x1 conv); any unit
    may be requested by name ('features_4_2'). `output_stride` 8/16 turns the strided
    depthwise (or fused) convs into dilated stride-1 ones, timm's semantics (a block keeps
    the dilation in force before it). `drop_path_rate` is torchvision's
    `stochastic_depth_prob`: block i of n drops its branch with rate * i / n (0 by default;
    torchvision's recipes: `TORCHVISION_DROP_PATH`).
    """

    stages: Sequence[tuple] = scale_stages(V1)
    last_channels: int | None = None  # None: 4x the last stage's width (V1)
    drop_path_rate: float = option(0.0)

    @property
    def _units(self):
        """(name, stride, channels) of the stem, every block and the final conv."""
        units = [("features_0", 2, self.stages[0][4])]
        for s, (_, _, _, stride, _, c_out, n) in enumerate(self.stages, 1):
            units += [(f"features_{s}_{i}", stride if i == 0 else 1, c_out) for i in range(n)]
        last = self.last_channels or 4 * self.stages[-1][5]
        return units + [(f"features_{len(self.stages) + 1}", 1, last)]

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, taps = self._taps
        conv, norm = self.conv_def(), self.norm_def(train)
        unit = partial(self.block_def(ConvNormAct), conv=conv, norm=norm, act=nn.silu)
        blocks = {"mb": self.block_def(InvertedResidual), "fused": self.block_def(FusedMBConv)}
        x = unit(self.stages[0][4], 3, 2, name="features_0")(x)
        outputs, plans = [x], iter(plans[1:])
        total, done = sum(stage[-1] for stage in self.stages), 0
        for s, (kind, t, k, _, _, c_out, n) in enumerate(self.stages, 1):
            for i in range(n):
                plan, width = next(plans), x.shape[-1]
                extra = {} if kind == "fused" else dict(act=nn.silu, se=partial(
                    SqueezeExcite, max(1, width // 4), act=nn.silu, conv=conv))
                x = blocks[kind](c_out, make_divisible(width * t), k, plan.stride,
                                 plan.first_dilation, conv=conv, norm=norm, train=train,
                                 drop_path_rate=self.drop_path_rate * done / total,
                                 name=f"features_{s}_{i}", **extra)(x)
                outputs.append(x)
                done += 1
        last = self._units[-1]
        outputs.append(unit(last[2], 1, name=last[0])(x))
        return {name: outputs[i] for name, (i, _) in taps.items()}


def torch_rules(stages) -> tuple:
    """torchvision's `features.S.I.block.K.*` onto `backbone/features_S_I/<part>`: a block's
    K counts the parts it has, fixed per stage by its kind and whether it expands."""
    rules = [(r"features\.(\d+)\.0", r"backbone/features_\1/conv"),
             (r"features\.(\d+)\.1", r"backbone/features_\1/bn")]
    for s, (kind, t, *_) in enumerate(stages, 1):
        if kind == "fused":
            parts = ("expand", "project") if t != 1 else ("fused",)
        else:
            parts = ("expand",) * (t != 1) + ("dw", "se", "project")
        for k, part in enumerate(parts):
            at, to = rf"features\.{s}\.(\d+)\.block\.{k}", rf"backbone/features_{s}_\1/{part}"
            rules += ([(rf"{at}\.(fc[12])", rf"{to}/\2")] if part == "se" else
                      [(rf"{at}\.0", f"{to}/conv"), (rf"{at}\.1", f"{to}/bn")])
    return tuple(rules)


def _timm_rules():
    """timm's EfficientNet V1 keys (`efficientnet_b0`...: conv_stem/bn1, blocks.S.I,
    conv_head/bn2) onto the same modules: timm's files load, and timm's dilated models
    check `output_stride`."""
    rules = [(r"conv_stem", "backbone/features_0/conv"), (r"bn1", "backbone/features_0/bn"),
             (r"conv_head", "backbone/features_8/conv"), (r"bn2", "backbone/features_8/bn")]
    first = (("conv_dw", "dw/conv"), ("bn1", "dw/bn"), ("conv_pw", "project/conv"),
             ("bn2", "project/bn"))
    later = (("conv_pw", "expand/conv"), ("bn1", "expand/bn"), ("conv_dw", "dw/conv"),
             ("bn2", "dw/bn"), ("conv_pwl", "project/conv"), ("bn3", "project/bn"))
    for s in range(7):
        for a, b in (first if s == 0 else later) + (("se\\.conv_reduce", "se/fc1"),
                                                     ("se\\.conv_expand", "se/fc2")):
            rules.append((rf"blocks\.{s}\.(\d+)\.{a}", rf"backbone/features_{s + 1}_\1/{b}"))
    return (*rules, (r"classifier", "head/fc"))


TIMM_RULES = _timm_rules()
# The eval transform of torchvision's default weights: (resize_size, interpolation) before the
# input_size crop; efficientnet_b1's default (IMAGENET1K_V2) is bilinear.
EVAL = {"efficientnet_b0": (256, "bicubic"), "efficientnet_b1": (255, "bilinear"),
        "efficientnet_b2": (288, "bicubic"), "efficientnet_b3": (320, "bicubic"),
        "efficientnet_b4": (384, "bicubic"), "efficientnet_b5": (456, "bicubic"),
        "efficientnet_b6": (528, "bicubic"), "efficientnet_b7": (600, "bicubic"),
        "efficientnet_v2_s": (384, "bilinear"), "efficientnet_v2_m": (480, "bilinear"),
        "efficientnet_v2_l": (480, "bicubic")}

for _name, (_w, _d, _size, _) in V1_VARIANTS.items():
    _stages = scale_stages(V1, _w, _d)
    _bn = dict(bn_epsilon=1e-3, bn_momentum=0.99) if _name[-1] in "567" else {}
    register_variants("efficientnet",
                      variants={_name: partial(EfficientNet, stages=_stages, **_bn)},
                      weights=WeightSource("torchvision", torch_rules(_stages), input_size=_size,
                                           resize_size=EVAL[_name][0],
                                           interpolation=EVAL[_name][1], **TORCH_IMAGENET))
for _name, (_stages, _size, _) in V2_VARIANTS.items():
    _norm = dict(mean=(0.5,) * 3, std=(0.5,) * 3) if _name.endswith("_l") else TORCH_IMAGENET
    register_variants("efficientnet_v2", variants={_name: partial(
        EfficientNet, stages=_stages, last_channels=1280, bn_epsilon=1e-3)},
        weights=WeightSource("torchvision", torch_rules(_stages), input_size=_size,
                             resize_size=EVAL[_name][0], interpolation=EVAL[_name][1], **_norm))
