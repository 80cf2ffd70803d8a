"""RegNet X and Y in torchvision's layout: `stem` (3x3 stride-2 conv-BN-ReLU) and four stages
`trunk_output.blockS` of residual bottleneck blocks `blockS-I` (1x1 `f.a`, 3x3 grouped `f.b`,
Y: squeeze-excite `f.se`, 1x1 `f.c`; a 1x1 projection `proj` on each stage's first block).
Flax modules are `stem`, `blockS_I` (scanned: `blockS_scan`) with children `a`, `b`, `se`,
`c`, `proj`."""
from functools import partial
from typing import Sequence

from flax import linen as nn

from flaxbones.backbones.base import Backbone, option
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, select_features
from flaxbones.layers import BatchNorm, Conv, ConvNormAct, ModuleDef, SqueezeExcite, loop_conv
from flaxbones.registry import register_variants
from flaxbones.scan import scan_repeat
from flaxbones.weights.source import TORCH_IMAGENET, WeightSource

# (depths, widths, group widths) per stage: what torchvision's BlockParams.from_init_params
# computes from each variant's (depth, w_0, w_a, w_m, group_width); bottleneck multiplier 1.
X_VARIANTS = {
    "regnet_x_400mf": ((1, 2, 7, 12), (32, 64, 160, 400), (16, 16, 16, 16)),
    "regnet_x_800mf": ((1, 3, 7, 5), (64, 128, 288, 672), (16, 16, 16, 16)),
    "regnet_x_1_6gf": ((2, 4, 10, 2), (72, 168, 408, 912), (24, 24, 24, 24)),
    "regnet_x_3_2gf": ((2, 6, 15, 2), (96, 192, 432, 1008), (48, 48, 48, 48)),
    "regnet_x_8gf": ((2, 5, 15, 1), (80, 240, 720, 1920), (80, 120, 120, 120)),
    "regnet_x_16gf": ((2, 6, 13, 1), (256, 512, 896, 2048), (128, 128, 128, 128)),
    "regnet_x_32gf": ((2, 7, 13, 1), (336, 672, 1344, 2520), (168, 168, 168, 168)),
}
Y_VARIANTS = {  # squeeze-excite with 0.25 x each block's input width
    "regnet_y_400mf": ((1, 3, 6, 6), (48, 104, 208, 440), (8, 8, 8, 8)),
    "regnet_y_800mf": ((1, 3, 8, 2), (64, 144, 320, 784), (16, 16, 16, 16)),
    "regnet_y_1_6gf": ((2, 6, 17, 2), (48, 120, 336, 888), (24, 24, 24, 24)),
    "regnet_y_3_2gf": ((2, 5, 13, 1), (72, 216, 576, 1512), (24, 24, 24, 24)),
    "regnet_y_8gf": ((2, 4, 10, 1), (224, 448, 896, 2016), (56, 56, 56, 56)),
    "regnet_y_16gf": ((2, 4, 11, 1), (224, 448, 1232, 3024), (112, 112, 112, 112)),
    "regnet_y_32gf": ((2, 5, 12, 1), (232, 696, 1392, 3712), (232, 232, 232, 232)),
    "regnet_y_128gf": ((2, 7, 17, 1), (528, 1056, 2904, 7392), (264, 264, 264, 264)),
}


class ResBottleneckBlock(nn.Module):
    """relu(proj(x) + c(se(b(a(x))))): `b` is the 3x3 grouped conv (`group_width` channels
    per group) carrying the stride or, dilated, `dilation`; `proj` (1x1, the same stride)
    only where torchvision has one, on a stage's first block."""

    width: int
    stride: int = 1
    dilation: int = 1
    group_width: int = 1
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None
    project: bool = False
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x):
        w_b = round(self.width * self.bottleneck_multiplier)
        unit = partial(ConvNormAct, conv=self.conv, norm=self.norm)
        y = unit(w_b, 1, name="a")(x)
        y = unit(w_b, 3, self.stride, self.dilation, groups=w_b // self.group_width, name="b")(y)
        if self.se_ratio:
            y = SqueezeExcite(round(self.se_ratio * x.shape[-1]), conv=self.conv, name="se")(y)
        y = unit(self.width, 1, act=None, name="c")(y)
        if self.project:
            x = unit(self.width, 1, self.stride, act=None, name="proj")(x)
        return nn.relu(x + y)


class RegNet(Backbone):
    """RegNet backbone (torchvision's): C1 is the stem, C2..C5 the stages, at strides 2..32.
    `output_stride` 8/16 makes the later stages' first blocks stride 1 (their 3x3 conv and
    projection) and dilates the 3x3 convs from there on (the first block of a newly dilated
    stage keeps the previous dilation), as timm's RegNet. `scan_blocks` runs each stage's
    identical blocks 1.. in one `nn.scan` named `blockS_scan`."""

    depths: Sequence[int] = X_VARIANTS["regnet_x_400mf"][0]
    widths: Sequence[int] = X_VARIANTS["regnet_x_400mf"][1]
    group_widths: Sequence[int] = X_VARIANTS["regnet_x_400mf"][2]
    se_ratio: float | None = None
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32
    scan_blocks: bool = option(False)

    @nn.nowrap
    def scan_groups(self) -> dict[str, list[str]]:
        """{scanned module: unscanned blocks}: every stage's blocks after the first."""
        return {f"block{s + 1}_scan": [f"block{s + 1}_{i}" for i in range(1, d)]
                for s, d in enumerate(self.depths) if d > 1}

    def _plans(self):
        return plan_output_stride((2, 2, 2, 2, 2), self.output_stride)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        stride, infos = 1, []
        for level, (plan, width) in enumerate(zip(self._plans(), (self.stem_width, *self.widths))):
            stride *= plan.stride
            infos.append(FeatureInfo(f"C{level + 1}", stride, width))
        return select_features(infos, self.out_features)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        conv, norm = self.conv_def(), self.norm_def(train)
        x = ConvNormAct(self.stem_width, 3, 2, conv=conv, norm=norm, name="stem")(x)
        feats = {"C1": x}
        scanned = self.scan_groups() if self.scan_blocks else {}
        stages = zip(self.depths, self.widths, self.group_widths, self._plans()[1:])
        for s, (depth, width, group_width, plan) in enumerate(stages):
            block = partial(self.block_def(ResBottleneckBlock), width, group_width=group_width,
                            bottleneck_multiplier=self.bottleneck_multiplier,
                            se_ratio=self.se_ratio, norm=norm)
            x = block(stride=plan.stride, dilation=plan.first_dilation, project=True, conv=conv,
                      name=f"block{s + 1}_0")(x)
            if f"block{s + 1}_scan" in scanned:
                x = scan_repeat(partial(block, dilation=plan.dilation, conv=loop_conv(conv)),
                                depth - 1, f"block{s + 1}_scan")(x)
            else:
                for i in range(1, depth):
                    x = block(dilation=plan.dilation, conv=conv, name=f"block{s + 1}_{i}")(x)
            feats[f"C{s + 2}"] = x
        return {f.name: feats[f.name] for f in self.feature_info}


TORCH_RULES = (
    (r"stem\.0", "backbone/stem/conv"),
    (r"stem\.1", "backbone/stem/bn"),
    (r"trunk_output\.block(\d)\.block\d-(\d+)\.f\.([abc])\.0", r"backbone/block\1_\2/\3/conv"),
    (r"trunk_output\.block(\d)\.block\d-(\d+)\.f\.([abc])\.1", r"backbone/block\1_\2/\3/bn"),
    (r"trunk_output\.block(\d)\.block\d-(\d+)\.f\.se\.(fc[12])", r"backbone/block\1_\2/se/\3"),
    (r"trunk_output\.block(\d)\.block\d-(\d+)\.proj\.0", r"backbone/block\1_\2/proj/conv"),
    (r"trunk_output\.block(\d)\.block\d-(\d+)\.proj\.1", r"backbone/block\1_\2/proj/bn"),
)

# timm's RegNet keys (stem.conv, sS.bI with 1-based I: conv1..3, se, downsample, head.fc)
# onto the same modules: timm's files load, and timm's dilated models check output_stride.
_TIMM_UNITS = (("conv1", "a"), ("conv2", "b"), ("conv3", "c"), ("downsample", "proj"))
TIMM_RULES = (
    (r"stem\.(conv|bn)", r"backbone/stem/\1"),
    *(rule for i in range(32) for rule in (
        *((rf"s(\d)\.b{i + 1}\.{timm_name}\.(conv|bn)", rf"backbone/block\1_{i}/{name}/\2")
          for timm_name, name in _TIMM_UNITS),
        (rf"s(\d)\.b{i + 1}\.se\.(fc[12])", rf"backbone/block\1_{i}/se/\2"),
    )),
    (r"head\.fc", "head/fc"),
)

# torchvision's default weights evaluate at 232 -> 224 (IMAGENET1K_V2), regnet_y_128gf's
# (IMAGENET1K_SWAG_E2E_V1) at 384, bicubic.
_TORCH = WeightSource("torchvision", TORCH_RULES, resize_size=232, **TORCH_IMAGENET)
_SWAG = _TORCH.replace(input_size=384, resize_size=384, interpolation="bicubic")
_VARIANTS = {
    **{name: partial(RegNet, depths=d, widths=w, group_widths=g)
       for name, (d, w, g) in X_VARIANTS.items()},
    **{name: partial(RegNet, depths=d, widths=w, group_widths=g, se_ratio=0.25)
       for name, (d, w, g) in Y_VARIANTS.items()},
}
register_variants("regnet", weights=_TORCH, variants={
    name: builder for name, builder in _VARIANTS.items() if name != "regnet_y_128gf"})
register_variants("regnet", weights=_SWAG, variants={"regnet_y_128gf": _VARIANTS["regnet_y_128gf"]})
