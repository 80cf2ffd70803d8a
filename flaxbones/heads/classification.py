"""Classification heads: the default (global pool, dropout, dense) and torchvision's FC head."""
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.features import LEVELS
from flaxbones.layers import adaptive_avg_pool, global_avg_pool

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


class FCHead(nn.Module):
    """torchvision's AlexNet/VGG classifier: adaptive average pool to `pool_size`, then
    fc6 and fc7 (`hidden` units, ReLU, dropout) and fc8.

    The pooled map is flattened in NCHW order so torch's Linear weights load unchanged.
    Dropout sits after fc6/fc7 (VGG) or before them (`drop_before_fc`, AlexNet).
    `num_classes=0` returns fc7's activations (timm's pre-logits).
    """

    num_classes: int
    drop_rate: float = 0.0
    pool_size: int = 7
    hidden: int = 4096
    drop_before_fc: bool = False
    feature: str = "C5"
    kernel_init: Callable = torch_linear_init
    zero_bias: bool = False  # torchvision's VGG init; else torch.nn.Linear's default
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features, fan_in, name):
        bias_init = nn.initializers.zeros if self.zero_bias else torch_bias_init(fan_in)
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=self.kernel_init, bias_init=bias_init, name=name)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        x = adaptive_avg_pool(features[self.feature], self.pool_size)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        drop = nn.Dropout(self.drop_rate, deterministic=not train)
        for name in ("fc6", "fc7"):
            x = drop(x) if self.drop_before_fc else x
            x = nn.relu(self._dense(self.hidden, x.shape[-1], name)(x))
            x = x if self.drop_before_fc else drop(x)
        if self.num_classes == 0:
            return x
        return self._dense(self.num_classes, x.shape[-1], "fc8")(x)
