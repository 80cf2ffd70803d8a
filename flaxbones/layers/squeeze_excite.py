"""Squeeze-and-excitation: a channel gate computed from globally pooled features."""
from typing import Callable

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers.conv import ModuleDef
from flaxbones.layers.cpu_conv import Conv


class SqueezeExcite(nn.Module):
    """Pool -> 1x1 conv `fc1` -> `act` -> 1x1 conv `fc2` -> `gate`, times the input.

    torchvision's `SqueezeExcitation` (MobileNetV3 gates with a hard sigmoid). `channels`
    is the squeeze width, rounded by the caller as its reference does; both convs have biases.
    """

    channels: int
    act: Callable = nn.relu
    gate: Callable = nn.sigmoid
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = self.act(self.conv(self.channels, (1, 1), padding="VALID", use_bias=True, name="fc1")(s))
        s = self.gate(self.conv(x.shape[-1], (1, 1), padding="VALID", use_bias=True, name="fc2")(s))
        return x * s
