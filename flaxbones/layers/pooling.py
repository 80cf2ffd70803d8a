"""Pooling with PyTorch's padding and ceil_mode semantics."""
import jax.numpy as jnp
from flax import linen as nn


def _ceil_extra(size: int, window: int, stride: int, pad: int) -> int:
    """Extra right padding that turns floor-mode output size into PyTorch's ceil mode."""
    out = -(-(size + 2 * pad - window) // stride) + 1
    if (out - 1) * stride >= size + pad:  # the last window must start inside input or left pad
        out -= 1
    return max(0, (out - 1) * stride + window - (size + 2 * pad))


def max_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False):
    """`torch.nn.MaxPool2d(window, stride, padding, ceil_mode=...)` on NHWC input."""
    pads = []
    for size in x.shape[1:3]:
        extra = _ceil_extra(size, window, stride, padding) if ceil_mode else 0
        pads.append((padding, padding + extra))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


def global_avg_pool(x):
    """Mean over H and W in float32, cast back: NHWC -> NC."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
