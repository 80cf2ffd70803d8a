"""Pooling with PyTorch's padding, ceil_mode and adaptive-bin semantics."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def _ceil_extra(size: int, window: int, stride: int, pad: int) -> int:
    """Extra right padding that turns floor-mode output size into PyTorch's ceil mode."""
    out = -(-(size + 2 * pad - window) // stride) + 1
    if (out - 1) * stride >= size + pad:  # the last window must start inside input or left pad
        out -= 1
    return max(0, (out - 1) * stride + window - (size + 2 * pad))


def max_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             cpu: bool = False):
    """`torch.nn.MaxPool2d(window, stride, padding, ceil_mode=...)` on NHWC input.

    The gradient goes to the first maximum of each window, as in torch. With `cpu` (a
    model's `cpu_kernels`) it is computed from k*k shifted slices (`_max_pool_shifted`):
    XLA:CPU's own max-pool gradient tracks argmax indices through int32 tensors and runs
    ~2.4x slower."""
    pads = []
    for size in x.shape[1:3]:
        extra = _ceil_extra(size, window, stride, padding) if ceil_mode else 0
        pads.append((padding, padding + extra))
    if cpu:
        return _max_pool_shifted(x, window, stride, tuple(pads))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


def _reduce_max(x, window, stride, pads):
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                                 (1, window, window, 1), (1, stride, stride, 1),
                                 ((0, 0), *pads, (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_shifted(x, window, stride, pads):
    return _reduce_max(x, window, stride, pads)


def _max_pool_forward(x, window, stride, pads):
    y = _reduce_max(x, window, stride, pads)
    return y, (x, y)


def _max_pool_backward(window, stride, pads, residuals, g):
    """Each output's gradient to the first input (row-major in its window) equal to it."""
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    n, hp, wp, c = xp.shape
    oh, ow = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for i in range(window):
        for j in range(window):
            hi, wi = i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1
            hit = (jax.lax.slice(xp, (0, i, j, 0), (n, hi, wi, c), (1, stride, stride, 1)) == y) & ~taken
            taken = taken | hit
            dx = dx + jax.lax.pad(jnp.where(hit, g, zero), zero,
                                  ((0, 0, 0), (i, hp - hi, stride - 1), (j, wp - wi, stride - 1), (0, 0, 0)))
    (top, _), (left, _) = pads
    return (dx[:, top:top + x.shape[1], left:left + x.shape[2], :],)


_max_pool_shifted.defvjp(_max_pool_forward, _max_pool_backward)


def global_avg_pool(x):
    """Mean over H and W in float32, cast back: NHWC -> NC."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def _adaptive_weights(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's adaptive pool: bin i covers
    [floor(i * size / out), ceil((i + 1) * size / out)), bins may overlap or repeat."""
    weights = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x, output_size):
    """`torch.nn.AdaptiveAvgPool2d(output_size)` on NHWC input, in float32, cast back.

    `output_size` is an int or (height, width); bin edges follow torch's formula exactly,
    so inputs smaller than the output (VGG's 7x7 on a 3x4 map) repeat values as torch does.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    wh, ww = _adaptive_weights(x.shape[1], oh), _adaptive_weights(x.shape[2], ow)
    y = jnp.einsum("nhwc,ih,jw->nijc", x.astype(jnp.float32), wh, ww,
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
