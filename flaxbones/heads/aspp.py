"""Atrous Spatial Pyramid Pooling (DeepLabv3), in torchvision's and TF DeepLab's layouts."""
from functools import partial
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers import (BatchNorm, Conv, ConvNormAct, ModuleDef, SeparableConv,
                              resize_bilinear)


def atrous_rates_for(output_stride: int) -> tuple[int, int, int]:
    """DeepLab's rates: (6, 12, 18) at output stride 16, doubled at 8."""
    rates = {16: (6, 12, 18), 8: (12, 24, 36)}
    if output_stride not in rates:
        raise ValueError(f"ASPP needs its input at output stride 8 or 16 (atrous rates "
                         f"6/12/18 at 16, doubled at 8), got {output_stride}")
    return rates[output_stride]


class ASPP(nn.Module):
    """1x1 branch, one 3x3 atrous branch per rate, image pooling; concat; 1x1 projection;
    dropout. Branches are `convs_0..convs_N` (1x1 first) and `pool`, as torchvision.

    `pool_first` puts the image-pooling branch first in the concatenation (TF DeepLab);
    `separable` makes the atrous branches depthwise-separable with BN and ReLU after both
    convs (TF DeepLab's `split_separable_conv2d`, as with Xception). `block` and
    `separable_block` build the branches and projection (a head's `block_def` passes
    rematerialised ones).
    """

    atrous_rates: Sequence[int] = (6, 12, 18)
    features: int = 256
    dropout: float = 0.5
    pool_first: bool = False
    separable: bool = False
    align_corners: bool = False
    conv: ModuleDef = partial(Conv, use_bias=False)
    norm: ModuleDef = BatchNorm
    block: ModuleDef = ConvNormAct
    separable_block: ModuleDef = SeparableConv

    @nn.compact
    def __call__(self, x, train: bool = False):
        block = dict(conv=self.conv, norm=self.norm)
        branches = [self.block(self.features, 1, **block, name="convs_0")(x)]
        for i, rate in enumerate(self.atrous_rates, start=1):
            if self.separable:
                y = self.separable_block(self.features, 3, dilation=rate, act=nn.relu, **block,
                                         name=f"convs_{i}")(x)
            else:
                y = self.block(self.features, 3, dilation=rate, **block, name=f"convs_{i}")(x)
            branches.append(y)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = self.block(self.features, 1, **block, name="pool")(pooled)
        pooled = resize_bilinear(pooled, x.shape[1:3], self.align_corners)
        branches = [pooled, *branches] if self.pool_first else [*branches, pooled]
        y = self.block(self.features, 1, **block, name="project")(jnp.concatenate(branches, -1))
        return nn.Dropout(self.dropout, deterministic=not train)(y)
