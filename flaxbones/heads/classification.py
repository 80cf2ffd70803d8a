"""The default classification head: global average pool, dropout, dense."""
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.features import LEVELS
from flaxbones.layers import global_avg_pool

# torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init for a layer with `fan_in` inputs."""
    bound = 1.0 / fan_in ** 0.5
    return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(
        key, shape, dtype) - bound


class ClassifierHead(nn.Module):
    """Pool the deepest C-level (or `feature`), dropout, dense `fc`.

    `num_classes=0` returns the pooled features (timm's `reset_classifier(0)`).
    """

    num_classes: int
    drop_rate: float = 0.0
    feature: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        levels = [name for name in features if name in LEVELS] or list(features)
        x = features[self.feature or max(levels)]
        x = global_avg_pool(x)
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=torch_linear_init, bias_init=torch_bias_init(x.shape[-1]),
                        name="fc")(x)
