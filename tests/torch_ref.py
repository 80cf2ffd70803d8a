"""Helpers for parity tests against torch references: random BN stats, files, runs."""
import functools

import numpy as np
import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics, and every
    layer scale (ConvNeXt's `layer_scale` / timm's `gamma`, initialised near 0, which would
    make the blocks near-identities) values around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("layer_scale", "gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def save_state(model: torch.nn.Module, path) -> str:
    """Write the model's state dict as .safetensors or .pth (by the suffix of `path`)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def run(model: torch.nn.Module, images_nhwc: np.ndarray, train: bool = False):
    """Forward NHWC numpy images through a torch model; outputs as numpy (NCHW -> NHWC)."""
    model.train(train)
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    return to_numpy(out)


def to_numpy(out):
    if isinstance(out, dict):
        return {k: to_numpy(v) for k, v in out.items()}
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple (GoogLeNetOutputs)
        return type(out)(*(to_numpy(v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(to_numpy(v) for v in out)
    out = out.detach().numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def assert_close(actual, expected, rel: float = 1e-4, what: str = ""):
    """max |a - e| <= rel * max |e|: the fp32 tolerance the parity rules use."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rel * max(scale, 1e-12), f"{what}: max abs diff {err:.3g} > {rel} x {scale:.3g}"
    return err / max(scale, 1e-12)


def random_variables(model, *args, seed: int = 0, scale: float = 0.2, **kwargs):
    """Variables of `model`'s shapes filled from numpy: kernels N(0, scale^2) (scale None:
    variance 1 / fan-in, so deep models keep their activations' size), vectors (biases,
    norms' scales and statistics, layer scales) 1 + N(0, 0.2^2). Skips compiling `init`, which
    costs more than the test's own program for a narrow model on CPU."""
    import jax

    def fill(a):
        std = 0.2 if a.ndim == 1 else scale or np.prod(a.shape[:-1]) ** -0.5
        return (rng.randn(*a.shape) * std + (a.ndim == 1)).astype(np.float32)
    rng = np.random.RandomState(seed)
    init = functools.partial(model.init, **kwargs)  # static keywords (train=...)
    return jax.tree.map(fill, jax.eval_shape(init, jax.random.PRNGKey(0), *args))


def torch_parameter_count(build) -> int:
    """Parameters of the torch model `build()` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def parameter_count(model, size: int = 64) -> int:
    """Parameters of a flaxbones model, traced with `eval_shape` at (1, size, size, 3)."""
    import jax
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, size, size, 3),
                                                                         np.float32))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
