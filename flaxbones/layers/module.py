"""The conv/BatchNorm settings every backbone and head carries, and their constructors."""
import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers.cpu_conv import make_conv
from flaxbones.layers.init import kaiming_fan_out
from flaxbones.layers.norm import BatchNorm
from flaxbones.layers.pooling import max_pool
from flaxbones.layers.tied import remat_module


def option(default):
    """A keyword-only field, so that subclasses may add required fields of their own."""
    return dataclasses.field(default=default, kw_only=True)


class ConvNormModule(nn.Module):
    """Base of backbones and heads: the weight source's BN settings (`bn_momentum` in
    Flax's convention, 1 - torch's), the `pmap` `axis_name`, the dtypes, the kernel choice,
    the `remat` choice, and the injected `conv_def()` / `norm_def(train)` / `pool_def()` /
    `block_def(cls)` built from them. `conv_init` is the family's default kernel init (a
    class attribute, not a field).

    `cpu_kernels` selects the XLA:CPU rewrites of convolutions and max-pooling
    (`layers.cpu_conv`); None resolves when the module is created, to whether JAX's
    default backend is the CPU (which starts the backend: with several processes, call
    `jax.distributed.initialize` first, or pass a value). `False` gives lax's ops, what
    every backend compiles natively: use it for a `jax.export` meant to run anywhere.

    `frozen_bn` makes every BatchNorm torchvision's FrozenBatchNorm2d (running statistics in
    training too, no gradient to scale and bias), as detection backbones run.

    `remat` (set by `train.remat_blocks`) makes every block built through `block_def`
    keep only its inputs and recompute itself in the backward pass: True with
    `layers.tied.tied_checkpoint` (effective on every backend), a `jax.checkpoint_policies`
    policy with `jax.checkpoint` (which XLA:CPU undoes). Variables, RNG streams and
    BatchNorm updates are unchanged.
    """

    bn_epsilon: float = option(1e-5)
    bn_momentum: float = option(0.9)
    axis_name: str | None = option(None)
    dtype: Any = option(jnp.float32)
    param_dtype: Any = option(jnp.float32)
    cpu_kernels: bool | None = option(None)
    remat: Any = option(None)
    frozen_bn: bool = option(False)

    conv_init = staticmethod(kaiming_fan_out)

    def __post_init__(self):
        if self.cpu_kernels is None:
            object.__setattr__(self, "cpu_kernels", jax.default_backend() == "cpu")
        super().__post_init__()

    @nn.nowrap
    def conv_def(self, use_bias: bool = False, kernel_init=None, **kwargs):
        """Conv constructor with the dtypes threaded (bias-free by default: a BN follows)."""
        return partial(make_conv(self.cpu_kernels), use_bias=use_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=kernel_init or self.conv_init,
                       **kwargs)

    @nn.nowrap
    def block_def(self, block):
        """`block` (a Module class or a partial of one), rematerialised per call when `remat`
        is set: how a family builds each of its blocks, a head each of its large convs."""
        if not self.remat:
            return block
        return remat_module(block, None if self.remat is True else self.remat)

    @nn.nowrap
    def pool_def(self):
        """`layers.max_pool` with this module's kernel choice."""
        return partial(max_pool, cpu=self.cpu_kernels)

    @nn.nowrap
    def norm_def(self, train: bool):
        """BatchNorm constructor: batch statistics in training, running ones otherwise."""
        return partial(BatchNorm, use_running_average=not train, frozen=self.frozen_bn,
                       momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype,
                       param_dtype=self.param_dtype)
