"""Exact bilinear and nearest resizing with PyTorch's / TF's index rules, no antialias.

`jax.image.resize` is half-pixel (align_corners=False) and antialiases when it
downsamples; reference segmenters need `F.interpolate(..., align_corners=False)` (torch)
or `tf.image.resize_bilinear(..., align_corners=True)` (TF DeepLab) exactly.
"""
import jax.numpy as jnp
import numpy as np


def _bilinear_taps(size_in: int, size_out: int, align_corners: bool):
    """Per output index: the two source indices and the weight of the second."""
    dst = np.arange(size_out, dtype=np.float64)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _resize_axis(x, axis: int, size_out: int, align_corners: bool):
    size_in = x.shape[axis]
    if size_in == size_out:
        return x
    i0, i1, w = _bilinear_taps(size_in, size_out, align_corners)
    shape = [1] * x.ndim
    shape[axis] = size_out
    w = jnp.asarray(w.reshape(shape), x.dtype)
    x0, x1 = jnp.take(x, i0, axis=axis), jnp.take(x, i1, axis=axis)
    return x0 + (x1 - x0) * w


def resize_bilinear(x, size, align_corners: bool = False):
    """Resize NHWC `x` to `size` (H, W) as `F.interpolate(mode='bilinear')` does.

    `align_corners=False` is torch's default half-pixel rule (negative source clamped
    to 0); `align_corners=True` maps corner to corner (TF DeepLab). No antialias.
    """
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {tuple(size)}")
    x = _resize_axis(x, 1, h, align_corners)
    return _resize_axis(x, 2, w, align_corners)


def resize_nearest(x, size):
    """Resize NHWC `x` to `size` (H, W) as `F.interpolate(mode='nearest')` does."""
    for axis, out in ((1, int(size[0])), (2, int(size[1]))):
        size_in = x.shape[axis]
        if size_in != out:
            idx = np.minimum(np.floor(np.arange(out) * (size_in / out)).astype(np.int32), size_in - 1)
            x = jnp.take(x, idx, axis=axis)
    return x
