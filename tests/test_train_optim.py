"""Optimizer factory, schedules and the mesh/batch helpers (no model compiles)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbones import train

PARAMS = {"backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))},
                       "bn": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))}},
          "head": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)


def updates(tx, grads=GRADS, steps=1):
    state = tx.init(PARAMS)
    for _ in range(steps):
        u, state = tx.update(grads, state, PARAMS)
    return u


def test_weight_decay_skips_norm_and_bias():
    mask = train.decay_mask(PARAMS)
    assert mask["backbone"]["conv"]["kernel"] and mask["head"]["fc"]["kernel"]
    assert not mask["backbone"]["bn"]["scale"] and not mask["head"]["fc"]["bias"]
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    for name in ("sgd", "adamw", "lamb"):
        u = updates(train.make_optimizer(name, 0.1, weight_decay=0.1), zero)
        assert float(jnp.abs(u["head"]["fc"]["kernel"]).max()) > 0, name
        assert float(jnp.abs(u["head"]["fc"]["bias"]).max()) == 0, name
        assert float(jnp.abs(u["backbone"]["bn"]["scale"]).max()) == 0, name


def test_backbone_lr_multiplier_and_freeze():
    for name in ("sgd", "adamw"):
        base = updates(train.make_optimizer(name, 0.1, weight_decay=1e-2), steps=2)
        mult = updates(train.make_optimizer(name, 0.1, weight_decay=1e-2, backbone_lr_mult=0.1), steps=2)
        frozen = updates(train.make_optimizer(name, 0.1, freeze_backbone=True), steps=2)
        for a, b in zip(jax.tree.leaves(base["backbone"]), jax.tree.leaves(mult["backbone"])):
            np.testing.assert_allclose(b, 0.1 * a, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(base["head"]), jax.tree.leaves(mult["head"])):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(frozen["backbone"]))
        assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(frozen["head"]))


def test_clipping_and_nesterov():
    big = jax.tree.map(lambda g: g * 1e4, GRADS)
    u = updates(train.make_optimizer("sgd", 1.0, momentum=0.0, clip_norm=1.0), big)
    assert float(optax.tree.norm(u)) == pytest.approx(1.0, rel=1e-5)
    plain = updates(train.make_optimizer("sgd", 1.0, momentum=0.9), steps=2)
    nest = updates(train.make_optimizer("sgd", 1.0, momentum=0.9, nesterov=True), steps=2)
    g = 0.5  # torch: momentum buffer b2 = 0.9*0.5 + 0.5; nesterov uses g + 0.9*b2
    assert float(plain["head"]["fc"]["bias"][0]) == pytest.approx(-(0.9 * g + g))
    assert float(nest["head"]["fc"]["bias"][0]) == pytest.approx(-(g + 0.9 * (0.9 * g + g)))


def test_schedules():
    cos = train.make_schedule(1.0, "cosine", warmup_steps=10, total_steps=110)
    assert float(cos(0)) == 0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(60)) == pytest.approx(0.5)
    assert float(cos(110)) == pytest.approx(0.0, abs=1e-7)
    step = train.make_schedule(1.0, "step", warmup_steps=5, boundaries=(30, 60))
    assert [float(step(s)) for s in (0, 5, 29, 30, 59, 60)] == pytest.approx(
        [0, 1, 1, 0.1, 0.1, 0.01])
    tx = train.make_optimizer("sgd", 1.0, momentum=0.0, schedule="step", boundaries=(1,))
    state = tx.init(PARAMS)
    u1, state = tx.update(GRADS, state, PARAMS)
    u2, _ = tx.update(GRADS, state, PARAMS)
    assert float(u2["head"]["fc"]["bias"][0]) == pytest.approx(0.1 * float(u1["head"]["fc"]["bias"][0]))
    with pytest.raises(ValueError, match="total_steps"):
        train.make_schedule(1.0, "cosine")
    with pytest.raises(ValueError, match="unknown optimizer"):
        train.make_optimizer("rmsprop")


def test_mesh_rules_and_batches():
    mesh = train.make_mesh()
    assert mesh.axis_names == ("data",)
    with pytest.raises(ValueError, match="does not divide"):
        train.make_mesh(fsdp=jax.device_count() + 1)
    with pytest.raises(ValueError, match="lacks"):
        train.tree_shardings(PARAMS, mesh, train.FSDP_RULES)
    fsdp = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    shardings = train.tree_shardings(PARAMS, fsdp, train.FSDP_RULES)
    assert shardings["backbone"]["conv"]["kernel"].spec == train.FSDP_RULES[0][1]
    assert shardings["head"]["fc"]["kernel"].spec == train.FSDP_RULES[1][1]
    assert shardings["head"]["fc"]["bias"].spec == jax.sharding.PartitionSpec()
    batch = {"image": np.zeros((3, 4, 4, 3), np.float32), "label": np.arange(3)}
    padded = train.pad_batch(batch, 4)
    assert padded["valid"].tolist() == [1, 1, 1, 0] and padded["label"].tolist() == [0, 1, 2, 0]
    arr = train.shard_batch(padded, mesh)
    assert arr["image"].shape == (4, 4, 4, 3) and arr["image"].sharding == train.batch_sharding(mesh)


def test_dynamic_loss_scale():
    ls = train.LossScale.create(8.0, period=2)
    ls = ls.update(jnp.asarray(False))
    assert float(ls.scale) == 4.0 and int(ls.good_steps) == 0
    ls = ls.update(jnp.asarray(True))
    assert float(ls.scale) == 4.0 and int(ls.good_steps) == 1
    ls = ls.update(jnp.asarray(True))
    assert float(ls.scale) == 8.0 and int(ls.good_steps) == 0
