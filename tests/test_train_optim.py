"""Optimizer factory, schedules and the mesh/batch helpers (no model compiles)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxbones as fb
from flaxbones import train
from flaxbones.scan import is_stacked

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


# A scanned ResNet (stacks of 2, 1 and 2 blocks behind each stage's first) and its
# unrolled twin; variables drawn at random and converted with scan_variables.
SCAN_RESNET = dict(layers=(3, 2, 1, 3), num_classes=5)


def random_like(tree, seed):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rs.uniform(0.5, 1.5, s.shape), s.dtype), tree)


@pytest.fixture(scope="module")
def scan_pair():
    plain = fb.create_model("resnet18", **SCAN_RESNET)
    scanned = fb.create_model("resnet18", scan_blocks=True, **SCAN_RESNET)
    variables = random_like(jax.eval_shape(plain.init, jax.random.PRNGKey(0),
                                           jnp.zeros((1, 32, 32, 3))), 0)
    return plain, scanned, variables


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb"])
def test_scanned_and_unrolled_trees_take_the_same_updates(scan_pair, name):
    """Weight decay (and LAMB's layer-wise trust ratio) by name, not by rank: the stacked
    BatchNorm scales and biases of a scanned tree are not decayed."""
    _, scanned, variables = scan_pair
    tx = train.make_optimizer(name, 0.1, weight_decay=0.5)
    grads = [random_like(variables["params"], seed) for seed in (1, 2)]

    def run(params, as_tree):
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(as_tree(g), state, params)
            params = optax.apply_updates(params, u)
        return params

    to_scan = lambda t: fb.scan_variables({"params": t}, scanned)["params"]  # noqa: E731
    plain = run(variables["params"], lambda t: t)
    stacked = fb.unscan_variables({"params": run(to_scan(variables["params"]), to_scan)},
                                  scanned)["params"]
    assert jax.tree.structure(plain) == jax.tree.structure(stacked)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_fsdp_rules_skip_the_stacking_axis(scan_pair):
    """Rules written for the unrolled leaf give a stacked leaf (None,) + that spec. The mesh
    is an AbstractMesh: spec_for reads only its axis sizes, no devices needed."""
    _, scanned, variables = scan_pair
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "fsdp"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2)
    def specs(variables):
        shardings = train.tree_shardings(variables, mesh, train.FSDP_RULES)
        return {train.sharding.path_str(p): s.spec
                for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    unrolled, stacked = specs(variables), specs(fb.scan_variables(variables, scanned))
    groups = scanned.backbone.scan_groups()
    seen = 0
    for path, spec in stacked.items():
        group = next((g for g in groups if f"/backbone/{g}/block/" in path), None)
        if group is None:
            assert spec == unrolled[path], path
            continue
        for block in groups[group]:
            ref = unrolled[path.replace(f"{group}/block", block)]
            assert tuple(spec) == (None,) + tuple(ref), (path, spec, ref)
        seen += "fsdp" in tuple(spec)
    assert seen > 0 and any(s == train.FSDP_RULES[0][1] for s in unrolled.values())


@pytest.mark.parametrize("name", ["resnet18", "xception65"])
def test_stacked_leaves_are_told_by_name(name):
    """`is_stacked` marks exactly the leaves under a scan group, in both model families."""
    for scan_blocks in (False, True):
        model = fb.create_model(name, num_classes=3, scan_blocks=scan_blocks)
        groups = model.backbone.scan_groups() if scan_blocks else {}
        tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree):
            path = train.sharding.path_str(p)
            group = next((g for g in groups if f"backbone/{g}/" in path), None)
            assert is_stacked(path) == (group is not None), path
            if group:
                assert leaf.shape[0] == len(groups[group]), path
        assert not scan_blocks or groups


def test_decay_mask_is_by_name():
    mask = train.decay_mask({"conv": {"kernel": jnp.ones((2, 3, 3, 2, 4))},
                             "bn": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))},
                             "fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}})
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "fc": {"kernel": True, "bias": False}}


def test_lamb_equals_optax_on_an_unrolled_tree():
    ours = updates(train.make_optimizer("lamb", 0.1, weight_decay=0.1), steps=2)
    ref = updates(optax.lamb(0.1, weight_decay=0.1, mask=train.decay_mask), steps=2)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,option", [
    ("adamw", dict(momentum=0.9), "momentum"),
    ("lamb", dict(nesterov=False), "nesterov"),
    ("sgd", dict(b1=0.9), "b1"),
    ("sgd", dict(b2=0.99), "b2"),
    ("sgd", dict(eps=1e-6), "eps"),
    ("sgd", dict(momentum=0.0, nesterov=True), "nesterov"),
    ("sgd", dict(freeze_backbone=True, backbone_lr_mult=0.1), "backbone_lr_mult"),
    ("sgd", dict(schedule="cosine", total_steps=10, boundaries=(5,)), "boundaries"),
    ("sgd", dict(schedule="cosine", total_steps=10, decay_factor=0.5), "decay_factor"),
    ("sgd", dict(schedule="constant", total_steps=10), "total_steps"),
    ("sgd", dict(schedule="step", boundaries=(5,), total_steps=10), "total_steps"),
    ("sgd", dict(schedule="step", boundaries=(5,), end_value=0.0), "end_value"),
    ("sgd", dict(schedule="step", warmup_steps=5), "boundaries"),
    ("sgd", dict(learning_rate=optax.constant_schedule(0.1), schedule="constant"),
     "already a schedule"),
])
def test_options_that_would_not_act_raise(name, kwargs, option):
    with pytest.raises(ValueError, match=option):
        train.make_optimizer(name, **{"learning_rate": 0.1, **kwargs})


def test_sgd_defaults_and_backbone_options_need_a_backbone():
    default = updates(train.make_optimizer("sgd", 1.0), steps=2)
    explicit = updates(train.make_optimizer("sgd", 1.0, momentum=0.9, nesterov=False), steps=2)
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(a, b)
    assert float(default["head"]["fc"]["bias"][0]) == pytest.approx(-(0.9 * 0.5 + 0.5))
    with pytest.raises(ValueError, match="backbone"):
        train.make_optimizer("sgd", 0.1, backbone_lr_mult=0.1).init(PARAMS["head"])
