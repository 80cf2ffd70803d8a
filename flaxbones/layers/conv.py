"""Conv -> norm -> act, the block every family is built from."""
from collections.abc import Callable
from functools import partial
from typing import Any

from flax import linen as nn

from flaxbones.layers.cpu_conv import Conv
from flaxbones.layers.norm import BatchNorm
from flaxbones.layers.padding import conv_padding

ModuleDef = Any


class ConvNormAct(nn.Module):
    """A conv (`conv`), an optional norm (`bn`) and an optional activation.

    `conv` and `norm` are injected constructors (e.g. a `partial(Conv, dtype=...)`
    and a `partial(BatchNorm, use_running_average=not train)`), so the same block
    serves every family and weight source; padding follows `padding` ('torch' or 'same').
    `mask` (given only with a norm that takes one, as `BatchNorm`) limits the norm's batch
    statistics to its True entries.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: str = "torch"
    conv: ModuleDef = partial(Conv, use_bias=False)
    norm: ModuleDef | None = BatchNorm
    act: Callable | None = nn.relu

    @nn.compact
    def __call__(self, x, mask=None):
        k = self.kernel_size
        x = self.conv(
            self.features, (k, k), strides=(self.stride, self.stride),
            padding=conv_padding(k, self.stride, self.dilation, self.padding),
            kernel_dilation=(self.dilation, self.dilation),
            feature_group_count=self.groups, name="conv")(x)
        if self.norm is not None:
            norm = self.norm(name="bn")
            x = norm(x) if mask is None else norm(x, mask=mask)
        if self.act is not None:
            x = self.act(x)
        return x


class Activated(nn.Module):
    """`layer()` (a constructor, e.g. a conv) then `act`, the layer's variables held in
    this module's own scope: the paths of the bare layer, as one unit remat can wrap."""

    layer: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        layer = self.layer()
        nn.share_scope(self, layer)
        return self.act(layer(x))
