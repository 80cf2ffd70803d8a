"""MobileNet V1 in timm's layout (`mobilenetv1_100`): stem, then depthwise-separable blocks."""
from typing import Callable

from flax import linen as nn

from flaxbones.backbones.base import Backbone
from flaxbones.features import FeatureInfo, check_images, plan_output_stride, sequence_taps
from flaxbones.layers import BatchNorm, Conv, ConvNormAct, ModuleDef, make_divisible
from flaxbones.registry import register_variants
from flaxbones.weights.source import WeightSource, timm_eval

# (channels, blocks, stride of the first) after a 32-channel stride-2 stem: timm's arch_def.
STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))


class DepthwiseSeparable(nn.Module):
    """timm's 'dsa' block: depthwise 3x3 `dw` -> BN -> act -> 1x1 `pw` -> BN -> act, no skip."""

    features: int
    stride: int = 1
    dilation: int = 1
    act: Callable = nn.relu6
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x):
        block = dict(conv=self.conv, norm=self.norm, act=self.act)
        x = ConvNormAct(x.shape[-1], 3, self.stride, self.dilation, groups=x.shape[-1],
                        name="dw", **block)(x)
        return ConvNormAct(self.features, 1, name="pw", **block)(x)


class MobileNetV1(Backbone):
    """MobileNet V1 backbone; C1..C5 are the outputs of timm's stages `blocks.0` .. `blocks.4`
    (the last block at strides 2..32). `output_stride` 8/16 dilates the depthwise convs with
    torchvision/timm semantics (a stage's first block keeps the previous dilation).
    """

    width_mult: float = 1.0

    @property
    def _units(self):
        """(stride, channels, flax name) of the stem and every block."""
        units = [(2, make_divisible(32 * self.width_mult), "stem")]
        for i, (channels, blocks, stride) in enumerate(STAGES):
            units += [(stride if j == 0 else 1, make_divisible(channels * self.width_mult),
                       f"blocks_{i}_{j}") for j in range(blocks)]
        return units

    @property
    def _taps(self):
        strides, channels, _ = zip(*self._units)
        plans = plan_output_stride(strides, self.output_stride)
        return plans, sequence_taps(strides, channels, plans, self.out_features)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        return tuple(info for _, info in self._taps[1].values())

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_images(x)
        plans, taps = self._taps
        conv = self.conv_def()
        norm = self.norm_def(train)
        stem, block = self.block_def(ConvNormAct), self.block_def(DepthwiseSeparable)
        outputs = []
        for (_, channels, name), plan in zip(self._units, plans):
            if name == "stem":
                x = stem(channels, 3, plan.stride, conv=conv, norm=norm, act=nn.relu6,
                         name=name)(x)
            else:
                x = block(channels, plan.stride, plan.first_dilation, conv=conv, norm=norm,
                          name=name)(x)
            outputs.append(x)
        return {name: outputs[i] for name, (i, _) in taps.items()}


TIMM_MOBILENET_V1 = WeightSource(
    "timm",
    rules=(
        (r"conv_stem", r"backbone/stem/conv"),
        (r"bn1", r"backbone/stem/bn"),
        (r"blocks\.(\d+)\.(\d+)\.conv_dw", r"backbone/blocks_\1_\2/dw/conv"),
        (r"blocks\.(\d+)\.(\d+)\.bn1", r"backbone/blocks_\1_\2/dw/bn"),
        (r"blocks\.(\d+)\.(\d+)\.conv_pw", r"backbone/blocks_\1_\2/pw/conv"),
        (r"blocks\.(\d+)\.(\d+)\.bn2", r"backbone/blocks_\1_\2/pw/bn"),
    ),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # timm's ra4 weights: inception normalisation
    **timm_eval(224, 0.875),
)

register_variants("mobilenet_v1", weights=TIMM_MOBILENET_V1, variants={
    "mobilenet_v1": MobileNetV1,
})
