"""Depthwise-separable convolution: a depthwise kxk conv, then a pointwise 1x1 conv."""
from functools import partial
from typing import Callable

from flax import linen as nn

from flaxbones.layers.conv import ModuleDef
from flaxbones.layers.cpu_conv import Conv
from flaxbones.layers.norm import BatchNorm
from flaxbones.layers.padding import conv_padding


class SeparableConv(nn.Module):
    """Depthwise conv (`conv_dw`, optional `bn_dw`) -> pointwise conv (`conv_pw`, optional `bn_pw`).

    `act` follows each norm (MobileNet-v1 / DeepLab's `activation_fn_in_separable_conv`);
    `norm=None` gives the bare pair of convs Chollet's Xception uses. Stride and dilation
    apply to the depthwise conv; `padding` is 'torch' (symmetric) or 'same' (TF).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    padding: str = "torch"
    conv: ModuleDef = partial(Conv, use_bias=False)
    norm: ModuleDef | None = BatchNorm
    act: Callable | None = None

    @nn.compact
    def __call__(self, x):
        k, s, d, channels = self.kernel_size, self.stride, self.dilation, x.shape[-1]
        x = self.conv(channels, (k, k), (s, s), padding=conv_padding(k, s, d, self.padding),
                      kernel_dilation=(d, d), feature_group_count=channels, name="conv_dw")(x)
        x = self._norm_act(x, "bn_dw")
        x = self.conv(self.features, (1, 1), padding="VALID", name="conv_pw")(x)
        return self._norm_act(x, "bn_pw")

    def _norm_act(self, x, name):
        if self.norm is not None:
            x = self.norm(name=name)(x)
        return x if self.act is None else self.act(x)
