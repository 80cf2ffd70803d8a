"""flaxbones models from Flax NNX (`fb.nnx.to_nnx`): Linen's outputs in eval mode, one
`nnx.Optimizer` step equal to the Linen step (loss, params, BatchNorm statistics, dropout
key), loaded Linen variables, and a backbone inside a user's own `nnx.Module`."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxbones as fb
from torch_ref import random_variables

X = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
LABELS = jnp.array([0, 1, 2, 4])
TX = optax.sgd(0.1, momentum=0.9)


def _model():
    return fb.create_model("resnet18", layers=(1, 1, 1, 1), num_classes=5, drop_rate=0.5)


@pytest.fixture(scope="module")
def linen():
    model = _model()
    return model, random_variables(model, X[:1], scale=None)


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def test_eval_outputs_equal_linen_apply(linen):
    model, variables = linen
    module = fb.nnx.to_nnx(model, variables=variables)
    assert isinstance(module, nnx.Module)
    got = nnx.jit(lambda m, x: m(x))(module, X)
    want = jax.jit(partial(model.apply, train=False))(variables, X)
    np.testing.assert_array_equal(got["out"], want["out"])


def test_one_optimizer_step_equals_the_linen_step(linen):
    """Train mode: batch statistics, running statistics written back, dropout drawn from the
    'dropout' stream of the Rngs given to the call; SGD with momentum on the Params only."""
    model, variables = linen
    module = fb.nnx.to_nnx(model, variables=variables)
    module.train()
    optimizer = nnx.Optimizer(module, TX, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(module, optimizer, images):
        def loss_fn(module):
            return _loss(module(images, rngs=nnx.Rngs(dropout=7))["out"])
        loss, grads = nnx.value_and_grad(loss_fn)(module)
        optimizer.update(module, grads)
        return loss

    @jax.jit
    def linen_step(variables, images):
        def loss_fn(params):
            out, updates = model.apply({**variables, "params": params}, images, train=True,
                                       mutable=["batch_stats"],
                                       rngs={"dropout": nnx.Rngs(dropout=7).dropout()})
            return _loss(out["out"]), updates
        params = variables["params"]
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        steps, _ = TX.update(grads, TX.init(params), params)
        return loss, {"params": optax.apply_updates(params, steps), **updates}

    loss = nnx_step(module, optimizer, X)
    want_loss, want = linen_step(variables, X)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    got = module.linen_variables()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), got, want)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), want["batch_stats"],
                         variables["batch_stats"])
    assert all(jax.tree.leaves(moved))  # every running statistic was updated
    module.eval()
    assert not module.to_nnx__train and module.use_running_average


class Net(nnx.Module):
    """A user's NNX model: a flaxbones backbone, pooled C5, its own dropout and nnx.Linear."""

    def __init__(self, images, *, rngs: nnx.Rngs):
        self.backbone = fb.nnx.to_nnx(fb.create_backbone("resnet18", layers=(1, 1, 1, 1)),
                                      images, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(512, 5, rngs=rngs)

    def __call__(self, images):
        features = self.backbone(images)["C5"].mean(axis=(1, 2))
        return self.head(self.dropout(features))


def test_backbone_inside_a_users_nnx_module():
    """Initialised from example images with the user's Rngs; .train()/.eval() reach it; a
    step moves the backbone's Params and BatchStats and the user's Linear."""
    net = Net(X[:1], rngs=nnx.Rngs(0))
    backbone = net.backbone.to_nnx__module
    before = net.backbone.linen_variables()
    assert set(before) == {"params", "batch_stats"}
    net.eval()
    features = jax.jit(lambda v, x: backbone.apply(v, x)["C5"].mean(axis=(1, 2)))(before, X)
    np.testing.assert_allclose(nnx.jit(lambda n, x: n(x))(net, X), net.head(features),
                               rtol=1e-5, atol=1e-6)
    net.train()
    assert net.backbone.to_nnx__train and not net.dropout.deterministic
    optimizer = nnx.Optimizer(net, TX, wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, images):
        loss, grads = nnx.value_and_grad(lambda n: _loss(n(images)))(net)
        optimizer.update(net, grads)
        return loss

    kernel = np.asarray(net.head.kernel[...])
    assert np.isfinite(step(net, optimizer, X))
    after = net.backbone.linen_variables()
    for collection in ("params", "batch_stats"):
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), after[collection],
                               before[collection])
        assert all(jax.tree.leaves(changed)), collection
    assert np.any(np.asarray(net.head.kernel[...]) != kernel)


def test_loading_variables_of_another_model_names_the_mismatch(linen):
    model, variables = linen
    module = fb.nnx.to_nnx(model, variables=variables)
    other = jax.eval_shape(partial(model.clone(head=model.head.clone(num_classes=3)).init,
                                   train=False), jax.random.PRNGKey(0), X[:1])
    other = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other)
    with pytest.raises(ValueError, match=r"head.*\(5,\) vs \(3,\)"):
        module.load_linen_variables(other)
    with pytest.raises(ValueError, match="example inputs"):
        fb.nnx.to_nnx(model)
