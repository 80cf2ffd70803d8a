"""layers.Conv's CPU rewrites (depthwise as shifted sums, pointwise as a matmul, tiny
outputs as im2col) give lax.conv_general_dilated's outputs and gradients, and run only
when a model chose them."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flaxbones.layers import cpu_conv
from flaxbones.layers.cpu_conv import conv_general_dilated as any_conv

conv_general_dilated = partial(any_conv, cpu=True)

NHWC = ("NHWC", "HWIO", "NHWC")
CASES = [  # (kernel, in, out, groups, stride, padding, dilation, input size)
    (1, 8, 12, 1, 1, "VALID", 1, (11, 13)),
    (1, 8, 12, 1, 2, "SAME", 1, (11, 13)),
    (1, 8, 12, 1, 2, ((0, 0), (0, 0)), 1, (11, 13)),
    (3, 8, 8, 8, 1, "SAME", 1, (11, 13)),
    (3, 8, 8, 8, 2, ((1, 1), (1, 1)), 1, (11, 13)),
    (5, 8, 8, 8, 2, "SAME", 2, (11, 13)),
    (3, 8, 12, 1, 1, "SAME", 1, (11, 13)),  # none: lax's own path
    (3, 8, 12, 1, 1, "SAME", 1, (2, 2)),  # tiny outputs: im2col
    (3, 8, 12, 1, 2, ((1, 1), (1, 1)), 1, (5, 7)),
    (3, 8, 12, 1, 1, "SAME", 3, (3, 4)),
    (7, 3, 8, 1, 2, ((3, 2), (3, 3)), 1, (6, 7)),
    (3, 8, 12, 1, 1, "VALID", 1, (4, 5)),
]


def _loss(conv, x, w, stride, padding, dilation, groups):
    y = conv(x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
             dimension_numbers=NHWC, feature_group_count=groups)
    return jnp.sum(jnp.sin(y)), y


@pytest.mark.parametrize("k,cin,cout,groups,stride,padding,dilation,size", CASES)
def test_cpu_conv_matches_lax_outputs_and_gradients(k, cin, cout, groups, stride, padding,
                                                    dilation, size):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    args = (stride, padding, dilation, groups)
    grad = jax.grad(_loss, argnums=(1, 2), has_aux=True)
    (gx, gw), y = jax.jit(grad, static_argnums=(0, 3, 4, 5, 6))(conv_general_dilated, x, w, *args)
    (rx, rw), ry = jax.jit(grad, static_argnums=(0, 3, 4, 5, 6))(lax.conv_general_dilated, x, w, *args)
    assert y.shape == ry.shape
    for got, want in ((y, ry), (gx, rx), (gw, rw)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("k,groups,size,rewrite", [(1, 1, 5, "_pointwise"),
                                                   (3, 8, 5, "_shifted_depthwise"),
                                                   (3, 1, 4, "_im2col"), (3, 1, 5, None)])
def test_cpu_conv_rewrites_are_taken_and_keep_bf16(k, groups, size, rewrite, monkeypatch):
    calls = []
    for name in ("_pointwise", "_shifted_depthwise", "_im2col"):
        original = getattr(cpu_conv, name)
        monkeypatch.setattr(cpu_conv, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x = jnp.ones((1, size, size, 8), jnp.bfloat16)
    w = jnp.ones((k, k, 8 // groups, 8), jnp.bfloat16)
    y = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                             feature_group_count=groups)
    assert calls == ([rewrite] if rewrite else [])
    assert y.dtype == jnp.bfloat16
    any_conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=groups)
    assert calls == ([rewrite] if rewrite else []), "a rewrite ran without cpu=True"


@pytest.mark.parametrize("window,stride,padding,ceil_mode", [(3, 2, 1, False), (3, 2, 0, True),
                                                             (2, 2, 0, False), (3, 1, 1, True)])
def test_max_pool_matches_torch_including_gradients_at_ties(window, stride, padding, ceil_mode):
    import torch

    from flaxbones.layers import max_pool
    rng = np.random.default_rng(1)
    x = np.round(rng.uniform(-1, 1, (2, 9, 12, 3)) * 2).astype(np.float32) / 2  # many ties
    g = rng.normal(size=(1,)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, window, stride, padding, ceil_mode=ceil_mode)
    cot = rng.normal(size=yt.shape).astype(np.float32).transpose(0, 2, 3, 1) + g
    yt.backward(torch.from_numpy(cot.transpose(0, 3, 1, 2).copy()))
    for cpu in (True, False):
        y, vjp = jax.vjp(lambda a: max_pool(a, window, stride, padding, ceil_mode, cpu=cpu),
                         jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(cot))
        np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
        np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-6)


def test_depthwise_backward_keeps_its_input_not_the_shifted_windows():
    """XLA's own buffer accounting of a chain of depthwise convolutions' gradients: plain
    autodiff of the shifted sum keeps all k*k windows per layer (9 inputs' worth), the
    rewrite one input per layer (8 layers: 26 vs 73 inputs' worth)."""
    x = jnp.ones((2, 32, 32, 16), jnp.float32)
    kernels = jnp.ones((8, 3, 3, 16), jnp.float32)
    pads = ((1, 1), (1, 1))

    def grad_temp(depthwise):
        def loss(kernels):
            y = x
            for kernel in kernels:
                y = jnp.tanh(depthwise(y, kernel, (1, 1), pads, (1, 1)))
            return y.sum()
        return jax.jit(jax.grad(loss)).lower(kernels).compile().memory_analysis().temp_size_in_bytes

    assert grad_temp(cpu_conv._shifted_depthwise) < 0.5 * grad_temp(cpu_conv._depthwise_sum)


@pytest.mark.parametrize("k,stride,padding", [(2, 2, 0), (4, 2, 1), (3, 2, 1), (5, 3, 2)])
@pytest.mark.parametrize("cpu", [False, True])
def test_conv_transpose_matches_torch_outputs_and_gradients(k, stride, padding, cpu):
    """Both forms of ConvTranspose2d (Mask R-CNN's 2x2/2, Keypoint R-CNN's 4x4/2 pad 1, odd
    kernels) against torch.nn.ConvTranspose2d with its weights: outputs and input, kernel
    and bias gradients of a weighted sum."""
    torch = pytest.importorskip("torch")
    from flaxbones.layers.conv_transpose import ConvTranspose2d
    rng = np.random.default_rng(k + stride)
    x = rng.normal(size=(2, 5, 7, 6)).astype(np.float32)
    ref = torch.nn.ConvTranspose2d(6, 4, k, stride, padding)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    out_t = ref(xt).permute(0, 2, 3, 1)
    weight = rng.normal(size=out_t.shape).astype(np.float32)
    (out_t * torch.from_numpy(weight)).sum().backward()
    params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0),
              "bias": ref.bias.detach().numpy()}
    layer = ConvTranspose2d(4, k, stride, padding, cpu=cpu)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.PRNGKey(0), x)["params"]) \
        == jax.tree.map(jnp.shape, params)
    out, vjp = jax.vjp(lambda p, x: layer.apply({"params": p}, x), params, x)
    np.testing.assert_allclose(out, out_t.detach().numpy(), atol=1e-5)
    grad_p, grad_x = vjp(weight)
    np.testing.assert_allclose(grad_x, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(grad_p["kernel"], ref.weight.grad.numpy().transpose(2, 3, 1, 0),
                               atol=1e-4)
    np.testing.assert_allclose(grad_p["bias"], ref.bias.grad.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="padding"):
        ConvTranspose2d(4, 2, 2, 2).init(jax.random.PRNGKey(0), x)
