"""Stochastic depth (torchvision's StochasticDepth, mode "row"; timm's DropPath)."""
import jax
import jax.numpy as jnp
from flax import linen as nn


def drop_path(module: nn.Module, x, rate: float, train: bool):
    """`x` (a residual branch, batch first) zeroed per example with probability `rate` and
    the rest scaled by 1 / (1 - rate), in training only; draws from `module`'s 'dropout'
    rng."""
    static = isinstance(rate, (int, float))
    if not train or (static and rate == 0.0):
        return x
    if static and not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop path rate must be in [0, 1], got {rate}")
    keep = 1.0 - jnp.asarray(rate, jnp.float32)  # a traced rate: a scanned block's own
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    scale = jnp.where(keep > 0.0, 1.0 / jnp.maximum(keep, 1e-12), 0.0).astype(x.dtype)
    return jnp.where(mask, x * scale, jnp.zeros((), x.dtype))
