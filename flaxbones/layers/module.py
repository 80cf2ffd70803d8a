"""The conv/BatchNorm settings every backbone and head carries, and their constructors."""
import dataclasses
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers.conv import kaiming_fan_out
from flaxbones.layers.cpu_conv import Conv
from flaxbones.layers.norm import BatchNorm


def option(default):
    """A keyword-only field, so that subclasses may add required fields of their own."""
    return dataclasses.field(default=default, kw_only=True)


class ConvNormModule(nn.Module):
    """Base of backbones and heads: the weight source's BN settings (`bn_momentum` in
    Flax's convention, 1 - torch's), the `pmap` `axis_name`, the dtypes, and the injected
    `conv_def()` / `norm_def(train)` built from them. `conv_init` is the family's default
    kernel init (a class attribute, not a field).
    """

    bn_epsilon: float = option(1e-5)
    bn_momentum: float = option(0.9)
    axis_name: str | None = option(None)
    dtype: Any = option(jnp.float32)
    param_dtype: Any = option(jnp.float32)

    conv_init = staticmethod(kaiming_fan_out)

    @nn.nowrap
    def conv_def(self, use_bias: bool = False, kernel_init=None, **kwargs):
        """Conv constructor with the dtypes threaded (bias-free by default: a BN follows)."""
        return partial(Conv, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=kernel_init or self.conv_init, **kwargs)

    @nn.nowrap
    def norm_def(self, train: bool):
        """BatchNorm constructor: batch statistics in training, running ones otherwise."""
        return partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype,
                       param_dtype=self.param_dtype)
