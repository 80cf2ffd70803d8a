"""Single-device train engine checks on a tiny conv-BN net (cheap compiles): gradient
accumulation and remat, mixed precision, non-finite handling, EMA, padded evaluation,
bad input."""
import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax._src.array import ArrayImpl

from flaxbones import train
from flaxbones.layers import BatchNorm


class TinyBlock(nn.Module):
    features: int
    use_running_average: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda name: nn.Conv(self.features, (3, 3), dtype=self.dtype,  # noqa: E731
                                    param_dtype=self.param_dtype, name=name)
        x = BatchNorm(use_running_average=self.use_running_average, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="bn")(conv("conv1")(x))
        return conv("conv2")(nn.relu(x))


class TinyNet(nn.Module):
    """{'backbone': conv-BN-conv, 'head': dense} returning {'out': logits}, like the
    library's classifiers."""

    num_classes: int = 4
    block: Any = TinyBlock
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.block(8, not train, self.dtype, self.param_dtype, name="backbone")(x)
        return {"out": nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="head")(x.mean((1, 2)))}


SHAPE = (8, 8, 3)


def problem(n=8, seed=0):
    """A learnable problem: the class sets the mean of the image's channel (class % 3)."""
    rs = np.random.RandomState(seed)
    label = rs.randint(0, 4, n).astype(np.int32)
    image = rs.randn(n, *SHAPE).astype(np.float32)
    image[np.arange(n), :, :, label % 3] += np.where(label < 3, 2.0, -2.0)[:, None, None]
    return {"image": image, "label": label}


MESH = train.make_mesh()


def make_state(model, tx, **kw):
    return train.create_train_state(model, tx, jax.random.PRNGKey(0), (1, *SHAPE), MESH, **kw)


def step_for(state, task=train.Classification(), **kw):
    return train.make_train_step(task, MESH, jax.tree.map(lambda a: a.sharding, state), **kw)


def test_grad_accumulation_and_remat_equal_one_step_on_the_whole_batch():
    tx = train.make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-3)
    task = train.Classification(label_smoothing=0.1)
    batch = {**problem(), "valid": np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)}
    model = TinyNet()
    remat = train.remat_blocks(model)
    assert remat.block is not TinyBlock and issubclass(remat.block, TinyBlock)
    full, acc = make_state(model, tx), make_state(remat, tx)
    full_step = step_for(full, task, bn_mode="frozen")
    acc_step = step_for(acc, task, bn_mode="frozen", accum_steps=2)
    for _ in range(2):
        full, m_full = full_step(full, batch)
        acc, m_acc = acc_step(acc, batch)
    assert float(m_acc["count"]) == float(m_full["count"]) == 7
    np.testing.assert_allclose(m_acc["loss_sum"], m_full["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # frozen BatchNorm: running statistics untouched
    for v in jax.tree.leaves(full.batch_stats):
        assert np.all((np.asarray(v) == 0) | (np.asarray(v) == 1))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_trains_with_fp32_params(name):
    policy = train.Policy.named(name)
    model = TinyNet(**policy.model_kwargs())
    state = make_state(model, train.make_optimizer("adamw", 1e-2), policy=policy)
    step = step_for(state, policy=policy)
    batch = problem(16)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(train.summarize(jax.device_get(metrics))["loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    out = model.apply(state.variables, policy.cast_inputs(jnp.asarray(batch["image"])))["out"]
    assert out.dtype == policy.compute_dtype and policy.cast_outputs(out).dtype == jnp.float32
    assert (state.loss_scale is not None) == (name == "fp16")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Fails on any device->host read of a jax.Array: np.asarray, bool(), .item() and
    jax.device_get all go through ArrayImpl._value. (jax.transfer_guard does not see
    device->host reads on CPU, where the buffer is host memory already.)"""
    def refuse(self):
        raise AssertionError(f"host read of a {self.shape} {self.dtype} array")
    with monkeypatch.context() as m:
        m.setattr(ArrayImpl, "_value", property(refuse))
        yield


def test_nonfinite_loss_raises_or_skips_and_ema():
    tx = train.make_optimizer("sgd", 0.1, momentum=0.9)
    good, bad = problem(), problem()
    bad["image"][0, 0, 0, 0] = np.nan

    state = make_state(TinyNet(), tx, ema_decay=0.5)
    step = step_for(state, nonfinite="skip")
    p0 = jax.device_get(state.params)
    state, m = step(state, good)
    assert not bool(m["skipped"]) and bool(m["finite"])
    for e, a, b in zip(*map(jax.tree.leaves, (state.ema_params, p0, state.params))):
        np.testing.assert_allclose(e, 0.5 * a + 0.5 * np.asarray(b), rtol=1e-6, atol=1e-7)
    before = jax.device_get((state.params, state.batch_stats, state.opt_state, state.ema_params))
    state, m = step(state, bad)
    assert bool(m["skipped"]) and not bool(m["finite"]) and int(state.step) == 2
    after = jax.device_get((state.params, state.batch_stats, state.opt_state, state.ema_params))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def assert_raise_mode(step, state, good, bad, monkeypatch, host=lambda s: s):
    """nonfinite='raise' without a host sync per step: a non-finite step's update is
    dropped on device; check_finite() (and the call after `check_every` = 3 unchecked
    steps) raises naming the first bad step and its loss."""
    state, _ = step(state, good)  # step 1
    before = jax.device_get(host((state.params, state.batch_stats, state.opt_state)))
    with no_host_reads(monkeypatch):
        state, _ = step(state, bad)  # step 2, not applied
        state, _ = step(state, bad)  # step 3, not applied
    after = jax.device_get(host((state.params, state.batch_stats, state.opt_state)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(host(state.step)) == 3
    with pytest.raises(FloatingPointError, match=r"train step 2 \(loss_sum nan\).*2 of the 3"):
        step.check_finite()
    step.check_finite()  # checked flags are forgotten
    with no_host_reads(monkeypatch):
        state, _ = step(state, good)
        state, _ = step(state, good)
        state, _ = step(state, bad)  # step 6
    with pytest.raises(FloatingPointError, match="train step 6"):
        step(state, good)  # the 4th call reads the 3 pending flags before it runs
    state, _ = step(state, good)  # the caller's state is intact: training can go on
    step.check_finite()
    assert int(host(state.step)) == 7


def test_nonfinite_raise_drops_the_update_and_checks_without_a_sync_per_step(monkeypatch):
    good, bad = problem(), problem()
    bad["image"][0, 0, 0, 0] = np.nan
    state = make_state(TinyNet(), train.make_optimizer("sgd", 0.1, momentum=0.9))
    assert_raise_mode(step_for(state, check_every=3), state, good, bad, monkeypatch)


def test_pmap_nonfinite_raise_drops_the_update_and_checks_without_a_sync_per_step(monkeypatch):
    good, bad = (train.split_batch(b) for b in (problem(), problem()))
    bad["image"][0, 0, 0, 0, 0] = np.nan
    state = train.replicate(make_state(TinyNet(), train.make_optimizer("sgd", 0.1, momentum=0.9)))
    step = train.make_pmap_train_step(train.Classification(), check_every=3)
    assert_raise_mode(step, state, good, bad, monkeypatch, host=train.unreplicate)


def test_fp16_gradient_overflow_skips_the_step_and_halves_the_scale():
    """A finite loss whose scaled fp16 backward overflows: the gradient-norm guard must
    catch the inf gradients alone."""
    policy = train.Policy.named("fp16")
    state = make_state(TinyNet(**policy.model_kwargs()), train.make_optimizer("sgd", 0.1),
                       policy=policy)
    state = state.replace(loss_scale=train.LossScale.create(2.0 ** 40))
    before = jax.device_get(state.params)
    state, m = step_for(state, policy=policy)(state, problem())
    assert bool(m["finite"]) and bool(m["skipped"]) and not np.isfinite(m["grad_norm"])
    assert float(state.loss_scale.scale) == 2.0 ** 39
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_eval_masks_padded_examples():
    state = make_state(TinyNet(num_classes=6), train.make_optimizer("sgd", 0.1))
    batch = problem(5, seed=3)
    padded = train.pad_batch(batch, 8)
    assert padded["image"].shape[0] == 8 and padded["valid"].tolist() == [1] * 5 + [0] * 3
    evaluate = train.make_eval_step(train.Classification(topk=(1, 5)), MESH,
                                    jax.tree.map(lambda a: a.sharding, state))
    got = train.summarize(jax.device_get(evaluate(state, padded)))
    logits = np.asarray(state.apply_fn(state.variables, batch["image"])["out"], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logits, -1)
    np.testing.assert_allclose(got["loss"], -logp[np.arange(5), batch["label"]].mean(), rtol=1e-5)
    for k in (1, 5):
        ref = np.mean([batch["label"][i] in order[i, :k] for i in range(5)])
        assert got[f"top{k}"] == pytest.approx(ref)
    with pytest.raises(ValueError, match="no EMA"):
        train.make_eval_step(train.Classification(), MESH, jax.tree.map(lambda a: a.sharding, state),
                             use_ema=True)(state, padded)


def test_bad_batches_give_clear_errors():
    state = make_state(TinyNet(), train.make_optimizer("sgd", 0.1))
    step = step_for(state)
    batch = problem()
    with pytest.raises(ValueError, match="labels must be"):
        step(state, {**batch, "label": batch["label"][:, None]})
    with pytest.raises(ValueError, match="same leading batch size"):
        step(state, {**batch, "label": batch["label"][:4]})
    with pytest.raises(KeyError, match="'label'"):
        step(state, {"image": batch["image"]})
    with pytest.raises(ValueError, match="micro-batches"):
        step_for(state, accum_steps=3)(state, batch)
    seg = train.Segmentation(num_classes=4)
    with pytest.raises(ValueError, match="segmentation labels"):
        seg.check({"image": jnp.zeros((2, 8, 8, 3)), "segmentation": jnp.zeros((2, 8, 7), jnp.int32)})
    with pytest.raises(ValueError, match="bn_mode"):
        step_for(state, bn_mode="sync")
    with pytest.raises(ValueError, match="unknown precision"):
        train.Policy.named("fp8")
