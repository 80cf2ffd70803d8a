"""Stochastic depth (torchvision's StochasticDepth, mode "row"; timm's DropPath)."""
import jax
import jax.numpy as jnp
from flax import linen as nn


def drop_path(module: nn.Module, x, rate: float, train: bool):
    """`x` (a residual branch, batch first) zeroed per example with probability `rate` and
    the rest scaled by 1 / (1 - rate), in training only; draws from `module`'s 'dropout'
    rng."""
    if not train or rate == 0.0:
        return x
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop path rate must be in [0, 1], got {rate}")
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    scale = 1.0 / keep if keep > 0.0 else 0.0
    return jnp.where(mask, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))
