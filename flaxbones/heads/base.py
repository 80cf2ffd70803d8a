"""What every segmentation head shares: its fields, its conv/norm factories, its needs."""
from functools import partial
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers import Conv, BatchNorm

# torch.nn.Conv2d's default init (kaiming uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class SegmentationHead(nn.Module):
    """Base of the segmentation heads: `head(features, train)` -> logits (NHWC) at the
    resolution of its finest input level; the Segmenter resizes them to the image.

    `levels` names the feature levels a head reads, so a Segmenter checks a backbone
    before init; `align_corners` is the reference's final-upsampling rule. BatchNorm
    epsilon and (Flax) momentum come from the reference the head mirrors.
    """

    num_classes: int
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    align_corners = False
    supported_strides = None  # a tuple of strides of its deepest input, or None: any

    @property
    def levels(self) -> tuple[str, ...]:
        raise NotImplementedError

    def conv_def(self, **kwargs):
        """Bias-free conv, as the references use before a BatchNorm."""
        return partial(Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=torch_conv_init, **kwargs)

    def norm_def(self, train: bool):
        return partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, axis_name=self.axis_name,
                       dtype=self.dtype, param_dtype=self.param_dtype)

    def classifier_def(self, **kwargs):
        """The final 1x1 conv (with bias) to `num_classes`."""
        return partial(Conv, self.num_classes, **{
            "kernel_size": (1, 1), "dtype": self.dtype, "param_dtype": self.param_dtype,
            "kernel_init": torch_conv_init, **kwargs})
