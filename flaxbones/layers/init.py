"""The reference frameworks' parameter initialisers, so a model trained from scratch here
starts as its reference does."""
import jax.numpy as jnp
from flax import linen as nn

# torchvision's ResNet/VGG conv init: kaiming normal, fan_out, gain sqrt(2).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's and Conv2d's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's GoogLeNet (conv, linear) and MobileNetV3 (linear) weights: N(0, 0.01).
normal_001 = nn.initializers.normal(0.01)


def torch_bias_init(fan_in: int):
    """torch.nn.Linear's / Conv2d's default bias init for a layer with `fan_in` inputs."""
    bound = 1.0 / fan_in ** 0.5
    return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(
        key, shape, dtype) - bound
