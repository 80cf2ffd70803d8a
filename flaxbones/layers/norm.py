"""BatchNorm with PyTorch's running-statistics semantics."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class BatchNorm(nn.Module):
    """BatchNorm over all but the last axis, statistic-for-statistic equal to torch.

    Differs from `flax.linen.BatchNorm` in one way that matters for weight parity:
    the running variance is updated with the *unbiased* batch variance, as
    `torch.nn.BatchNorm2d` does (normalisation uses the biased one in both).
    Statistics are computed in float32 whatever the compute dtype. `momentum` is
    Flax's (the weight of the old value): PyTorch's 0.1 is 0.9 here.
    Variables: params `scale`, `bias`; batch_stats `mean`, `var` (as Flax names them).
    `mask` (as Flax's: broadcastable to `x`) restricts the batch statistics, and so the
    running-statistics update, to its True entries (R-CNN heads: the sampled RoIs only, as
    torch's tensors hold only those); summed, not averaged, over `axis_name`. A channel with
    no True entry keeps its running statistics, as torch's BatchNorm on an empty batch does.
    `frozen=True` is torchvision's FrozenBatchNorm2d (detection backbones): running statistics
    always, and no gradient reaches `scale` or `bias`.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    frozen: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average = self.frozen or nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = (self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
                 if self.use_scale else None)
        bias = (self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
                if self.use_bias else None)

        if self.frozen:
            scale, bias = jax.lax.stop_gradient((scale, bias))
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var, count = _batch_moments(x, self.axis_name, mask)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                new_mean = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                new_var = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
                ra_mean.value = jnp.where(count > 0, new_mean, ra_mean.value)
                ra_var.value = jnp.where(count > 0, new_var, ra_var.value)

        mul = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            mul = mul * scale.astype(jnp.float32)
        shift = -mean * mul
        if bias is not None:
            shift = shift + bias.astype(jnp.float32)
        dtype = self.dtype or jnp.result_type(x, self.param_dtype)
        return x.astype(dtype) * mul.astype(dtype) + shift.astype(dtype)


def _batch_moments(x, axis_name, mask=None):
    """Mean and biased variance over all but the last axis (two-pass), and the count; with
    `mask`, over its True entries (zero mean and variance where there are none)."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    if mask is not None:
        return _masked_moments(x32, jnp.broadcast_to(mask, x.shape), axes, axis_name)
    count = jnp.asarray(x[..., 0].size, jnp.float32)
    mean = jnp.mean(x32, axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        count = jax.lax.psum(count, axis_name)
    var = jnp.mean(jnp.square(x32 - mean), axes)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var, count


def _masked_moments(x32, mask, axes, axis_name):
    """`_batch_moments` over the True entries of `mask` (x's shape), per channel."""
    psum = (lambda v: jax.lax.psum(v, axis_name)) if axis_name is not None else (lambda v: v)
    count = psum(jnp.sum(mask, axes, dtype=jnp.float32))
    denom = jnp.maximum(count, 1)
    mean = psum(jnp.sum(jnp.where(mask, x32, 0), axes)) / denom
    var = psum(jnp.sum(jnp.where(mask, jnp.square(x32 - mean), 0), axes)) / denom
    return mean, var, count
