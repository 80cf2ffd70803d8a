"""Convolution with CPU rewrites that XLA:CPU runs much faster than its generic conv.

- Depthwise (one channel per group): XLA:CPU lowers it to a slow generic loop, ~13x
  slower forward and ~4.5x forward+backward than k*k shifted multiply-adds (measured on
  16x32x32x144, 3x3).
- Pointwise (1x1, one group): as a convolution, its kernel gradient is a convolution with
  batch and channels swapped, which XLA:CPU feeds through full-tensor transposes; as a
  matmul (`dot_general` over channels, stride by slicing) the kernel gradient is one GEMM.
  ResNet-50's train step at batch 16 went from 7.8 s to 4.6 s on 2 cores.
- Tiny outputs (at most 16 pixels per image: ResNet's last stage on small images, ASPP
  on a small map): XLA:CPU swaps such a convolution's operands into a generic Eigen loop,
  up to 40x slower; as im2col (k*k shifted slices concatenated over channels) and one
  matmul it is cheap. A 3x3 512->512 conv on 2x2x2 inputs: 18.3 -> 0.5 ms forward,
  41 -> 4 ms forward+backward; resnet18 at 64x64: 60 -> 8 ms forward.

Inside a loop body (scanned blocks) XLA:CPU also misses its fast path for the transposed
convolutions of a stride-1 convolution's backward pass (a scanned ResNet-50 step: 1.52 s
against 0.26 s unrolled); `loop_conv` gives those a VJP written as NHWC/HWIO convolutions.

`Conv` is `nn.Conv` with `conv_general_dilated` injected: same parameters, same layout, the
same sums (only their order changes). The rewrites run only with `cpu=True`, a choice fixed
when a model is created (`ConvNormModule.cpu_kernels`), never read from the backend while
tracing, so a program exported on a CPU host holds lax's convolutions unless asked otherwise.
"""
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


def _is_plain_nhwc(lhs, rhs, dimension_numbers):
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
            and tuple(dn.out_spec) == (0, 3, 1, 2))


def _explicit_padding(padding, lhs, rhs, window_strides, dilation):
    if not isinstance(padding, str):
        return tuple(map(tuple, padding))
    window = [d * (k - 1) + 1 for d, k in zip(dilation, rhs.shape[:2])]
    return tuple(lax.padtype_to_pads(lhs.shape[1:3], window, window_strides, padding))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         cpu=False, in_loop=False, **kwargs):
    """`lax.conv_general_dilated`; with `cpu`, NHWC depthwise, pointwise and tiny-output
    convolutions and (`in_loop`) stride-1 spatial convolutions inside a loop body are
    rewritten for XLA:CPU."""
    dilation = tuple(rhs_dilation or (1, 1))
    eligible = (cpu and lhs.ndim == 4 and not kwargs
                and all(d == 1 for d in (lhs_dilation or (1, 1)))
                and _is_plain_nhwc(lhs, rhs, dimension_numbers))
    if eligible:
        pads = _explicit_padding(padding, lhs, rhs, window_strides, dilation)
        groups = feature_group_count
        if groups > 1 and rhs.shape[2] == 1 and groups == lhs.shape[-1] == rhs.shape[-1]:
            return _shifted_depthwise(lhs, rhs[:, :, 0, :], tuple(window_strides), pads, dilation)
        if groups == 1 and rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
            return _pointwise(lhs, rhs[0, 0], tuple(window_strides), precision)
        out_size = _out_size(lhs.shape[1:3], rhs.shape[:2], window_strides, pads, dilation)
        if groups == 1 and min(out_size) >= 1 and out_size[0] * out_size[1] <= _IM2COL_MAX_PIXELS:
            return _im2col(lhs, rhs, tuple(window_strides), pads, dilation, precision)
        if (in_loop and groups == 1 and rhs.shape[:2] != (1, 1)
                and tuple(window_strides) == (1, 1)):
            return _nhwc_conv(lhs, rhs, pads, dilation, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)


_IM2COL_MAX_PIXELS = 16


def _out_size(in_size, kernel_size, strides, padding, dilation):
    """Output height and width of a convolution with explicit padding."""
    return [(size + lo + hi - d * (k - 1) - 1) // s + 1 for size, (lo, hi), d, k, s
            in zip(in_size, padding, dilation, kernel_size, strides)]


def _windows(x, kernel_size, strides, padding, dilation):
    """The k*k shifted, strided views of the padded input that a convolution sums over."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    oh, ow = _out_size(x.shape[1:3], kernel_size, strides, padding, dilation)
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    n, c = x.shape[0], x.shape[3]
    return [lax.slice(x, (0, i * dh, j * dw, 0),
                      (n, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _im2col(x, kernel, strides, padding, dilation, precision):
    """The windows concatenated over channels (in kernel order), times the flattened kernel."""
    patches = jnp.concatenate(_windows(x, kernel.shape[:2], strides, padding, dilation), axis=-1)
    flat = kernel.reshape(-1, kernel.shape[-1])
    return lax.dot_general(patches, flat, (((3,), (0,)), ((), ())), precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_depthwise(x, kernel, strides, padding, dilation):
    """The depthwise sum, saving only `x` for the backward pass: as plain autodiff of the
    sum, every one of the k*k shifted windows was kept (MobileNetV2's train step: 1869 MiB
    of XLA temp buffers, 640 MiB this way, and 1.7 -> 1.2-1.4 s per step). The backward is
    written out (`_depthwise_backward`), so no window is ever materialised, also when the
    depthwise runs inside a rematerialised block."""
    return _depthwise_sum(x, kernel, strides, padding, dilation)


def _depthwise_forward(x, kernel, strides, padding, dilation):
    return _depthwise_sum(x, kernel, strides, padding, dilation), (x, kernel)


def _depthwise_backward(strides, padding, dilation, residuals, g):
    """dx: the cotangent, dilated by the stride and padded, correlated with the flipped
    kernel (one more shifted sum); dkernel: per tap, its window of `x` times the cotangent.
    The windows are taken from `x` tied to the cotangent (see `layers.tied`), so XLA cannot
    hoist them into the forward pass and keep them alive until here."""
    x, kernel = residuals
    x = x + (jnp.ravel(g)[0] * 0).astype(x.dtype)
    (kh, kw), acc = kernel.shape[:2], jnp.promote_types(x.dtype, jnp.float32)
    pads = [(0, 0, 0)]
    for size, k, s, d, (lo, _), out in zip(x.shape[1:3], (kh, kw), strides, dilation, padding,
                                           g.shape[1:3]):
        pads.append(((k - 1) * d - lo, size + lo - (out - 1) * s - 1, s - 1))
    g_spread = lax.pad(g.astype(acc), jnp.zeros((), acc), pads + [(0, 0, 0)])
    dx = _depthwise_sum(g_spread, jnp.flip(kernel, (0, 1)), (1, 1), ((0, 0), (0, 0)), dilation)
    windows = _windows(x, (kh, kw), strides, padding, dilation)
    dk = jnp.stack([jnp.sum(w.astype(acc) * g.astype(acc), axis=(0, 1, 2)) for w in windows])
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_depthwise_forward, _depthwise_backward)


def _depthwise_sum(x, kernel, strides, padding, dilation):
    """sum_ij x[shifted by (i, j) * dilation, strided] * kernel[i, j], in >= float32."""
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    windows = _windows(x, kernel.shape[:2], strides, padding, dilation)
    taps = kernel.reshape(-1, kernel.shape[-1]).astype(acc_dtype)
    out = jnp.zeros(windows[0].shape, acc_dtype)
    for window, tap in zip(windows, taps):
        out = out + window.astype(acc_dtype) * tap
    return out.astype(jnp.result_type(x.dtype, kernel.dtype))


def _pointwise(x, kernel, strides, precision):
    """A 1x1 convolution as a matmul over channels; the stride picks every s-th pixel."""
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    return lax.dot_general(x, kernel, (((3,), (0,)), ((), ())), precision=precision)


_NHWC = ("NHWC", "HWIO", "NHWC")


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nhwc_conv(x, w, padding, dilation, precision):
    return lax.conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)


def _nhwc_conv_fwd(x, w, padding, dilation, precision):
    return _nhwc_conv(x, w, padding, dilation, precision), (x, w)


def _nhwc_conv_bwd(padding, dilation, precision, res, g):
    """dx: g correlated with the flipped, in/out-swapped kernel; dw: x correlated with g,
    batch and channels swapped (strided by the dilation)."""
    x, w = res
    full = [(d * (k - 1) - lo, d * (k - 1) - hi)
            for d, k, (lo, hi) in zip(dilation, w.shape, padding)]
    dx = lax.conv_general_dilated(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), (1, 1), full,
                                  rhs_dilation=dilation, dimension_numbers=_NHWC,
                                  precision=precision)
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), dilation,
                                  padding, dimension_numbers=_NHWC, precision=precision)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_nhwc_conv.defvjp(_nhwc_conv_fwd, _nhwc_conv_bwd)


Conv = partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def make_conv(cpu: bool):
    """`Conv` with the XLA:CPU rewrites on (`cpu=True`) or off (lax's convolution)."""
    return partial(nn.Conv, conv_general_dilated=partial(conv_general_dilated, cpu=cpu))


def loop_conv(conv):
    """`conv` (a `Conv` constructor) for use inside a loop body (a scanned block)."""
    inner = conv.keywords.get("conv_general_dilated", conv_general_dilated)
    return partial(conv, conv_general_dilated=partial(inner, in_loop=True))
