"""remat_blocks: every family's blocks and the heads' large convs are rematerialised, with
the same outputs, gradients and BatchNorm statistics as the plain model, and the
activations really are dropped (XLA's own buffer accounting, not a timing); a module it
cannot wrap raises."""
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxbones as fb
from flaxbones import train
from flaxbones.heads import (DeepLabV3Head, DeepLabV3PlusHead, FCNHead, LRASPPHead,
                             SemanticFPNHead, UNetHead)
from flaxbones.layers.tied import tied_checkpoint
from flaxbones.models import Segmenter

X = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
DEMO = {"backbone": "mobilenet_v2", "output_stride": 16, "style": "tf",
        "head_kwargs": {"bn_momentum": 0.9}}  # experiments/configs/demo.py


def _small_resnet(stride):
    return fb.create_backbone("resnet18", layers=(1, 1, 1, 1), output_stride=stride)


RATES = (1, 2, 3)  # atrous rates that fit 16x15 maps (DeepLab's would read padding)


def _segmenter(stride, head, aux):
    return Segmenter(_small_resnet(stride), head(num_classes=3), aux(num_classes=3))


def _lax(name, **kwargs):
    return fb.create_model(name, num_classes=7, cpu_kernels=False, **kwargs)


# name: (model builder, input size). Classifiers train with dropout where their reference
# has it (GoogLeNet's aux heads then drop at 0.7, inside their remat units).
MODELS = {
    "resnet18": (lambda: fb.create_model("resnet18", num_classes=7), 48),
    "xception": (lambda: fb.create_model("xception", num_classes=7), 48),
    "xception65_scan": (lambda: fb.create_model("xception65", num_classes=7, middle=3,
                                                scan_blocks=True), 48),
    "mobilenet_v1": (lambda: fb.create_model("mobilenet_v1", num_classes=7), 48),
    "mobilenet_v2_050": (lambda: fb.create_model("mobilenet_v2_050", num_classes=7), 48),
    "mobilenet_v3_small": (lambda: fb.create_model("mobilenet_v3_small", num_classes=7,
                                                   drop_rate=0.2), 48),
    "vgg11_bn": (lambda: fb.create_model("vgg11_bn", num_classes=7, drop_rate=0.5), 48),
    "googlenet": (lambda: fb.create_model("googlenet", num_classes=7, drop_rate=0.2), 96),
    "alexnet": (lambda: fb.create_model("alexnet", num_classes=7, drop_rate=0.5), 96),
    # the later families with lax's convolutions: remat is what they test, and their CPU
    # rewrites (7x7 depthwise, patch embeddings) triple the compile time
    "convnext": (lambda: _lax("convnext_tiny", depths=(2, 2, 2, 2), widths=(16, 32, 48, 64),
                              drop_path_rate=0.2), 64),
    "vit": (lambda: _lax("vit_b_16", num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                         drop_path_rate=0.2), 64),
    "swin": (lambda: _lax("swin_t", depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 2, 2, 4),
                          drop_path_rate=0.2), 64),
    "efficientnet": (lambda: _lax("efficientnet_v2_s", drop_rate=0.2, drop_path_rate=0.2, stages=(
        ("fused", 1, 3, 1, 8, 8, 1), ("fused", 4, 3, 2, 8, 16, 2), ("mb", 4, 3, 2, 16, 16, 2),
        ("mb", 4, 5, 2, 16, 24, 1), ("mb", 6, 3, 2, 24, 32, 2))), 64),
    "shufflenet_v2_x0_5": (lambda: _lax("shufflenet_v2_x0_5"), 64),
    "densenet": (lambda: _lax("densenet121", growth_rate=16, block_config=(3, 3, 3, 3),
                              num_init_features=8, drop_rate=0.2), 64),
    "maxvit": (lambda: _lax("maxvit_t", stem_channels=8, block_channels=(8, 16),
                            block_layers=(1, 2), head_dim=4, partition_size=2,
                            drop_path_rate=0.2), 64),
    "regnet": (lambda: _lax("regnet_y_400mf", depths=(1, 2, 1, 1), widths=(16, 16, 24, 32),
                            group_widths=(8, 8, 8, 8), stem_width=8), 64),
    "demo": (lambda: fb.create_model("deeplabv3plus", num_classes=4, **DEMO), 48),
    # every other head type, main and auxiliary
    "deeplabv3+fcn": (lambda: _segmenter(8, partial(DeepLabV3Head, atrous_rates=RATES),
                                         FCNHead), 128),
    "lraspp+deeplabv3plus": (lambda: _segmenter(
        16, LRASPPHead, partial(DeepLabV3PlusHead, atrous_rates=RATES)), 128),
    "unet+fpn": (lambda: _segmenter(32, UNetHead, SemanticFPNHead), 128),
}
HEADS_ONLY = ("deeplabv3+fcn", "lraspp+deeplabv3plus", "unet+fpn")
# The demo's train-mode gradients at random init are ill-conditioned: the same plain model
# with lax's convolutions instead of the CPU kernels moves them by 1.9% of the largest one
# (remat: 1.3%), so they are compared at that scale; its loss and statistics to 1e-5.
GRAD_TOL = {"demo": 3e-2}


@functools.cache
def _model(name):
    build, size = MODELS[name]
    model, x = build(), X[:, :size, :size - 8]
    return model, x, _random_variables(model, x[:1])


def _random_variables(model, x):
    """torch_ref.random_variables' fill (kernels of variance 1 / fan-in, vectors 1 +
    N(0, 0.2^2)) in float32 from numpy's fast generator: compiling `init` costs more, and
    VGG's and AlexNet's 100M-entry classifiers take seconds in float64."""
    rng = np.random.default_rng(0)

    def fill(a):
        std = 0.2 if a.ndim == 1 else np.float32(np.prod(a.shape[:-1]) ** -0.5)
        out = rng.standard_normal(a.shape, np.float32)
        out *= std
        return out + 1 if a.ndim == 1 else out
    return jax.tree.map(fill, jax.eval_shape(model.init, jax.random.key(0), x))


def _remat(name, policy=None):
    return train.remat_blocks(_model(name)[0], policy)


@functools.cache
def _step(name, remat=False, policy=None):
    """(loss, batch statistics, gradients) of one train-mode step, and XLA's temp bytes.
    For HEADS_ONLY models the reference ('plain') has its backbone rematerialised too."""
    plain, x, variables = _model(name)
    model = _remat(name, policy) if remat else plain
    if name in HEADS_ONLY and not remat:
        model = plain.clone(backbone=_remat(name).backbone)

    def loss(params, variables):
        out, state = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out)), state

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
        variables["params"], variables).compile()
    return compiled(variables["params"], variables), compiled.memory_analysis().temp_size_in_bytes


def _assert_same(got, want, grad_tol=1e-5):
    """Equal up to float rounding, relative to each tree's largest entry (so gradients that
    are zero up to rounding, a conv bias before BatchNorm, compare as such)."""
    (loss, stats), grads = want
    (r_loss, r_stats), r_grads = got
    np.testing.assert_allclose(r_loss, loss, rtol=1e-4)
    for tree, r_tree, tol in ((grads, r_grads, grad_tol), (stats, r_stats, 1e-5)):
        assert jax.tree.structure(r_tree) == jax.tree.structure(tree)
        leaves = jax.tree.leaves(tree)
        scale = max((float(jnp.abs(leaf).max()) for leaf in leaves), default=0.0)
        for a, b in zip(jax.tree.leaves(r_tree), leaves):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=tol * scale)


@pytest.mark.parametrize("name", MODELS)
def test_remat_gives_the_same_outputs_gradients_and_statistics(name):
    _assert_same(_step(name, remat=True)[0], _step(name)[0], GRAD_TOL.get(name, 1e-5))


def _count(primitive, jaxpr):
    return sum(e.primitive.name == primitive for e in jaxpr.eqns)


def _torch_count(build, kind):
    import torch
    with torch.device("meta"):
        return sum(isinstance(m, kind) for m in build().modules())


# Families whose compiled steps cost more than remat's mechanics need (checked numerically
# on the narrow models above): remat is shown by the backward pass recomputing the forward
# of every block. Reference counts come from torchvision's models: Inception v3's and
# MNASNet's BatchNorms, all inside blocks; SqueezeNet's Fire modules' convolutions (the
# stem conv and the classifier's are not blocks).
RECOMPUTED = {
    "inception_v3": (dict(aux_logits=False), 75, "rsqrt", lambda tv, nn: _torch_count(
        partial(tv.inception_v3, aux_logits=False, init_weights=False), nn.BatchNorm2d)),
    "mnasnet0_5": ({}, 32, "rsqrt", lambda tv, nn: _torch_count(tv.mnasnet0_5, nn.BatchNorm2d)),
    "squeezenet1_1": ({}, 32, "conv_general_dilated", lambda tv, nn: _torch_count(
        tv.squeezenet1_1, nn.Conv2d) - 2),  # less the stem's and the classifier's
}


@pytest.mark.parametrize("name", RECOMPUTED)
def test_remat_recomputes_every_block_of(name):
    import torch
    import torchvision
    kwargs, size, primitive, reference = RECOMPUTED[name]
    model = _lax(name, **kwargs)
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def count(module):
        def loss(variables):
            out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(1)})
            return jnp.sum(out["out"])
        return _count(primitive, jax.make_jaxpr(jax.grad(loss))(variables).jaxpr)

    extra = count(train.remat_blocks(model)) - count(model)
    assert extra == reference(torchvision.models, torch.nn)


def test_a_checkpoint_policy_gives_the_same_gradients_and_statistics():
    policy = jax.checkpoint_policies.nothing_saveable
    assert _remat("resnet18", policy).backbone.remat is policy
    _assert_same(_step("resnet18", True, policy)[0], _step("resnet18")[0])


# The largest ratio of remat's XLA temp bytes to the plain model's, a few points above what
# XLA:CPU gives (jax 0.10.2): resnet18 0.73, xception 0.95, xception65_scan 0.26,
# mobilenet_v1 0.90, mobilenet_v2_050 0.75, mobilenet_v3_small 0.62, vgg11_bn 0.81,
# googlenet 0.90, alexnet 0.59, demo 0.52; with lax's convolutions: convnext (narrow) 0.53,
# vit (narrow) 0.80, efficientnet (narrow) 0.63, swin (narrow) 0.37, shufflenet_v2_x0_5
# 0.77, densenet (narrow) 0.78, maxvit (narrow) 0.61, regnet (narrow) 0.90; heads alone
# (the reference's backbone rematted too): lraspp+deeplabv3plus 0.91, unet+fpn 0.81,
# deeplabv3+fcn 1.00 (its heads work at stride 8, where the step's peak, in the backbone's
# first blocks, is not). What remat cannot drop caps these: the backward of the largest
# block or max-pool (GoogLeNet's first pools, Xception's first block) runs as
# in the plain step.
MAX_RATIO = {"resnet18": 0.78, "xception": 0.98, "xception65_scan": 0.35, "mobilenet_v1": 0.94,
             "mobilenet_v2_050": 0.8, "mobilenet_v3_small": 0.68, "vgg11_bn": 0.86,
             "googlenet": 0.94, "alexnet": 0.65, "convnext": 0.6, "vit": 0.85, "swin": 0.42,
             "efficientnet": 0.68, "shufflenet_v2_x0_5": 0.82, "densenet": 0.83, "maxvit": 0.67,
             "regnet": 0.95, "demo": 0.58,
             "lraspp+deeplabv3plus": 0.95, "unet+fpn": 0.86, "deeplabv3+fcn": 1.001}


@pytest.mark.parametrize("name", MODELS)
def test_remat_drops_activations(name):
    """XLA's temporary buffers of the compiled train step shrink: activations are dropped."""
    plain, remat = _step(name)[1], _step(name, remat=True)[1]
    assert remat < MAX_RATIO[name] * plain, (remat / plain, remat, plain)


def test_remat_sets_every_conv_module_and_leaves_dense_heads_alone():
    model = fb.create_model("googlenet", num_classes=7)
    remat = train.remat_blocks(model)
    assert remat.backbone.remat is True and remat.aux_head.remat is True
    assert remat.head == model.head and model.backbone.remat is None


class UserHead(nn.Module):
    num_classes: int = 3
    levels = ("C5",)

    @nn.compact
    def __call__(self, features, train=False):
        return nn.Conv(self.num_classes, (1, 1))(features["C5"])


def test_a_module_remat_cannot_wrap_raises_naming_it():
    model = Segmenter(fb.create_backbone("resnet18"), UserHead())
    with pytest.raises(ValueError, match=r"Segmenter\.head \(UserHead\)"):
        train.remat_blocks(model)


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
    """A user's model injecting its block as a Module-class field, which remat wraps."""

    block: type = DropoutBlock

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for i in range(3):
            x = self.block(name=f"block{i}")(x, train)
        return x


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_remat_replays_the_same_dropout_masks(policy):
    def loss_and_grads(model, variables):
        def loss(params):
            out = model.apply({"params": params}, X[:, :8, :8], train=True,
                              rngs={"dropout": jax.random.key(5)})
            return jnp.sum(jnp.sin(out))
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    model = DropoutNet()
    remat = train.remat_blocks(model, policy)
    assert remat.block is not DropoutBlock and issubclass(remat.block, DropoutBlock)
    variables = model.init(jax.random.key(0), X[:1, :8, :8])
    loss, grads = loss_and_grads(model, variables)
    r_loss, r_grads = loss_and_grads(remat, variables)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(r_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
