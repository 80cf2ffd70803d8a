"""The MobileNetV2/V3 inverted residual block and its channel rounding."""
from typing import Callable

from flax import linen as nn

from flaxbones.layers.conv import ConvNormAct, ModuleDef
from flaxbones.layers.cpu_conv import Conv
from flaxbones.layers.drop_path import drop_path
from flaxbones.layers.norm import BatchNorm


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% down.

    Exactly torchvision's `_make_divisible` (and timm's `make_divisible` at its defaults),
    so width multipliers give the reference's channel counts.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 `expand` -> depthwise k x k `dw` -> optional `se` -> linear 1x1 `project`.

    `expand` exists only when `expanded` differs from the input width (torchvision's
    expand_ratio 1); the identity is added when stride is 1 and widths match. Dilation
    applies to the depthwise conv, the only spatial one. `se` is a constructor such as
    `partial(SqueezeExcite, channels=...)`. `drop_path_rate` is the stochastic depth of
    the residual branch (EfficientNet), active with `train` and the 'dropout' rng.
    """

    out_channels: int
    expanded: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    act: Callable = nn.relu6
    se: ModuleDef | None = None
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x):
        block = dict(conv=self.conv, norm=self.norm)
        y = x
        if self.expanded != x.shape[-1]:
            y = ConvNormAct(self.expanded, 1, act=self.act, name="expand", **block)(y)
        y = ConvNormAct(self.expanded, self.kernel_size, self.stride, self.dilation,
                        groups=self.expanded, act=self.act, name="dw", **block)(y)
        if self.se is not None:
            y = self.se(name="se")(y)
        y = ConvNormAct(self.out_channels, 1, act=None, name="project", **block)(y)
        if self.stride == 1 and x.shape[-1] == self.out_channels:
            y = drop_path(self, y, self.drop_path_rate, self.train) + x
        return y
