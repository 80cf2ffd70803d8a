"""remat_blocks: the same outputs, gradients and BatchNorm statistics as the plain model,
and the activations really are dropped (XLA's own buffer accounting, not a timing)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxbones as fb
from flaxbones import train
from flaxbones.layers.tied import tied_checkpoint

X = np.random.default_rng(0).normal(size=(2, 48, 40, 3)).astype(np.float32)


def _loss_and_grads(model, variables, rng=None):
    def loss(params):
        out, state = model.apply({**variables, "params": params}, X, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": jax.random.key(1) if rng is None else rng})
        return jnp.sum(jnp.sin(out)), state
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.fixture(scope="module")
def resnet():
    """The plain model, its variables, and its loss, statistics and gradients (one compile)."""
    model = fb.create_model("resnet18", num_classes=7)
    variables = model.init(jax.random.key(0), X[:1])
    return model, variables, _loss_and_grads(model, variables)


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_remat_gives_the_same_gradients_and_statistics(resnet, policy):
    model, variables, ((loss, stats), grads) = resnet
    remat = train.remat_blocks(model, policy)
    assert issubclass(remat.backbone.block, model.backbone.block)
    (r_loss, r_stats), r_grads = _loss_and_grads(remat, variables)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves((r_grads, r_stats)), jax.tree.leaves((grads, stats))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_tied_checkpoint_drops_activations_that_jax_checkpoint_keeps_on_cpu():
    def block(w, x):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x

    def loss(wrap):
        def chain(ws, x):
            for w in ws:
                x = wrap(block)(w, x)
            return jnp.sum(x)
        return jax.grad(chain)

    ws, x = [jnp.full((64, 64), 0.01)] * 12, jnp.ones((1024, 64))
    plain = _temp_bytes(loss(lambda f: f), ws, x)
    tied = _temp_bytes(loss(tied_checkpoint), ws, x)
    assert tied < 0.6 * plain, (tied, plain)
    g_plain = jax.jit(loss(lambda f: f))(ws, x)
    g_tied = jax.jit(loss(tied_checkpoint))(ws, x)
    for a, b in zip(g_tied, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-6)


class DropoutBlock(nn.Module):
    features: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.features)(x)
        return nn.Dropout(0.5, deterministic=not train)(nn.relu(x))


class DropoutNet(nn.Module):
    block: type = DropoutBlock

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for i in range(3):
            x = self.block(name=f"block{i}")(x, train)
        return x


def test_remat_replays_the_same_dropout_masks():
    model = DropoutNet()
    variables = model.init(jax.random.key(0), X[:1])
    (loss, _), grads = _loss_and_grads(model, variables, jax.random.key(5))
    (r_loss, _), r_grads = _loss_and_grads(train.remat_blocks(model), variables, jax.random.key(5))
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(r_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_xception_blocks_are_remat_targets():
    from flaxbones.backbones.xception_aligned import XceptionModule
    model = fb.create_model("deeplabv3plus_xception65")
    wrapped = train.remat_blocks(model).backbone.block
    assert wrapped is not XceptionModule and issubclass(wrapped, XceptionModule)
