"""What every backbone shares: the feature-contract fields and its conv/norm constructors."""
import dataclasses
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers import BatchNorm, Conv, kaiming_fan_out


def option(default):
    """A keyword-only field, so that families may add required fields of their own."""
    return dataclasses.field(default=default, kw_only=True)


class Backbone(nn.Module):
    """Base of every backbone: `output_stride`, `out_features`, the weight source's BN
    settings (`bn_momentum` in Flax's convention: 1 - torch's), the `pmap` `axis_name`
    and the dtypes. A family declares `feature_info` and `__call__(x, train)`, and builds
    its layers from `conv_def()` and `norm_def(train)`.
    """

    output_stride: int = option(32)
    out_features: Sequence[str] | None = option(None)
    bn_epsilon: float = option(1e-5)
    bn_momentum: float = option(0.9)
    axis_name: str | None = option(None)
    dtype: Any = option(jnp.float32)
    param_dtype: Any = option(jnp.float32)

    @nn.nowrap
    def conv_def(self, use_bias: bool = False, kernel_init=kaiming_fan_out):
        """Conv constructor: dtypes threaded, torchvision's kaiming fan-out init."""
        return partial(Conv, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=kernel_init)

    @nn.nowrap
    def norm_def(self, train: bool):
        """BatchNorm constructor: batch statistics in training, running ones otherwise."""
        return partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype,
                       param_dtype=self.param_dtype)
