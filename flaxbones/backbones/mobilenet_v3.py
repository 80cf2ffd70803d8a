"""MobileNet V3 large/small in torchvision's layout: `features.0` stem, `features.1..n`
inverted residuals, `features.n+1` the 1x1 conv to 6x the last width; flax modules are
named `features_N`, so torchvision keys (also those of its segmentation models) map by index."""
from functools import partial
from typing import Sequence

from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers import ConvNormAct, InvertedResidual, SqueezeExcite, make_divisible
from flaxbones.registry import register_variants
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (kernel, expanded, out, SE, activation, stride) per block: torchvision's (and the paper's)
# Tables 1 and 2; both start from a 16-channel stem.
LARGE = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
)
SMALL = (
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
)
STEM = 16
ACTS = {"RE": nn.relu, "HS": nn.hard_swish}  # hard-swish: x * relu6(x + 3) / 6, as torch


class MobileNetV3(Backbone):
    """MobileNet V3 backbone (torchvision; BatchNorm eps 1e-3, torch momentum 0.01).

    C1..C5 are the last unit at strides 2..32 (large: `features.1, .3, .6, .12, .16`; small:
    `features.0, .1, .3, .8, .12`); C5 includes the final 1x1 conv (960 / 576 channels).
    `out_features` may also name any unit, e.g. 'features_4', the tap of torchvision's LR-ASPP
    'low' and DeepLabv3 'aux'. `output_stride=16` is torchvision's `dilated=True` (the
    segmentation backbones): every block of a dilated stage, its first included, uses the new
    dilation, unlike ResNet; channels are not reduced (that is `reduced_tail`, unused there).
    """

    blocks: Sequence[tuple] = LARGE
    bn_epsilon: float = option(1e-3)
    bn_momentum: float = option(0.99)

    @property
    def _taps(self):
        strides = (2, *(b[-1] for b in self.blocks), 1)
        channels = (STEM, *(b[2] for b in self.blocks), 6 * self.blocks[-1][2])
        plans = plan_output_stride(strides, self.output_stride)
        names = [f"features_{i}" for i in range(len(strides))]
        return plans, channels, sequence_taps(strides, channels, plans, self.out_features, names)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps[2].values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, channels, taps = self._taps
        conv = self.conv_def()
        norm = self.norm_def(train)
        unit, block = self.block_def(ConvNormAct), self.block_def(InvertedResidual)
        x = unit(STEM, 3, 2, conv=conv, norm=norm, act=nn.hard_swish, name="features_0")(x)
        outputs = [x]
        for n, ((k, expanded, out, se, act, _), plan) in enumerate(zip(self.blocks, plans[1:]), 1):
            se = partial(SqueezeExcite, make_divisible(expanded // 4), gate=nn.hard_sigmoid,
                         conv=conv) if se else None
            x = block(out, expanded, k, plan.stride, plan.dilation, act=ACTS[act], se=se,
                      conv=conv, norm=norm, name=f"features_{n}")(x)
            outputs.append(x)
        outputs.append(unit(channels[-1], 1, conv=conv, norm=norm, act=nn.hard_swish,
                            name=f"features_{len(outputs)}")(x))
        return {name: outputs[i] for name, (i, _) in taps.items()}


def torch_rules(blocks=LARGE, src: str = r"features", dst: str = "backbone/"):
    """Key rules from torchvision's `{src}.N.block.K.*` onto flax `{dst}features_N/<part>`.

    A block's torch indices K count only the parts it has (expand?, dw, se?, project), so
    the rules are derived from the block table. `src=r"backbone"` maps the backbone of
    torchvision's segmentation models (keys 'backbone.N...').
    """
    rules = [(rf"{src}\.(\d+)\.0", rf"{dst}features_\1/conv"),
             (rf"{src}\.(\d+)\.1", rf"{dst}features_\1/bn")]
    width = STEM
    for n, (_, expanded, out, se, _, _) in enumerate(blocks, 1):
        parts = ("expand",) * (expanded != width) + ("dw",) + ("se",) * se + ("project",)
        for k, part in enumerate(parts):
            at, to = rf"{src}\.{n}\.block\.{k}", f"{dst}features_{n}/{part}"
            if part == "se":
                rules.append((rf"{at}\.(fc[12])", rf"{to}/\1"))
            else:
                rules += [(rf"{at}\.0", f"{to}/conv"), (rf"{at}\.1", f"{to}/bn")]
        width = out
    return tuple(rules)


# torchvision's default weights: the large one's (IMAGENET1K_V2) evaluate at 232 -> 224.
for _name, _blocks, _resize in (("mobilenet_v3_large", LARGE, 232),
                                ("mobilenet_v3_small", SMALL, None)):
    register_variants("mobilenet_v3", variants={_name: partial(MobileNetV3, blocks=_blocks)},
                      weights=WeightSource("torchvision", torch_rules(_blocks), resize_size=_resize,
                                           **TORCH_IMAGENET))
