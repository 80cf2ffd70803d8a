"""ViTDet's simple feature pyramid (Li et al. 2022, detectron2's SimpleFeaturePyramid): the
ViT's single-stride map resampled to other strides by 2x2 stride-2 deconvolutions (LayerNorm
and GELU between two) or 2x2 max-pooling, each followed by a 1x1 and a 3x3 conv, both with a
channel LayerNorm (eps 1e-6) and no bias. No pretrained weights: ViTDet's are detectron2's."""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbones.layers.conv_transpose import ConvTranspose2d


def channel_norm(module, name: str):
    """detectron2's channels-first LayerNorm(eps=1e-6), on NHWC's last axis."""
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=module.dtype,
                        param_dtype=module.param_dtype, name=name)


class PyramidLevel(nn.Module):
    """One level: `scale` > 1 upsamples by that power of two (deconvs halving the width),
    `scale` < 1 max-pools down, 1 is the identity; then conv1x1-LN, conv3x3-LN to
    `channels`."""

    scale: float
    channels: int
    conv: Callable
    pool: Callable
    cpu: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ups = 0
        while 2 ** (ups + 1) <= self.scale:
            if ups:
                x = jax.nn.gelu(channel_norm(self, f"deconv_norm_{ups - 1}")(x), approximate=False)
            x = ConvTranspose2d(x.shape[-1] // 2, 2, 2, cpu=self.cpu, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"deconv_{ups}")(x)
            ups += 1
        scale = self.scale
        while scale < 1:
            x, scale = self.pool(x, 2, 2), scale * 2
        x = channel_norm(self, "norm1")(self.conv(self.channels, (1, 1), name="conv1")(x))
        x = self.conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x)
        return channel_norm(self, "norm2")(x)
