"""The same steps for code that still drives devices with jax.pmap.

The model must be built with the same `axis_name` (e.g. `fb.create_model(...,
axis_name="batch")`) so BatchNorm statistics are synchronised; gradients, counts and
metrics are summed over devices, so results equal the jit path's.
"""
import functools

import jax
import numpy as np
from flax import jax_utils

from flaxbones.train.precision import Policy
from flaxbones.train.sharding import check_batch
from flaxbones.train.steps import Step, _check_options, _numbered, eval_body, train_body

replicate = jax_utils.replicate


def unreplicate(tree):
    """The first device's copy of a replicated tree (pmap state -> plain state)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch, n_devices: int | None = None):
    """(B, ...) host arrays -> (devices, B / devices, ...) for pmap."""
    n = n_devices or jax.local_device_count()
    check_batch(batch, n, "batch")
    return jax.tree.map(lambda a: np.asarray(a).reshape((n, -1) + np.shape(a)[1:]), batch)


class PmapStep(Step):
    def check(self, batch):
        leaves = jax.tree.leaves(batch)
        if any(np.ndim(x) < 2 or np.shape(x)[0] != self.num_shards for x in leaves):
            raise ValueError(f"a pmap batch needs a leading device axis of {self.num_shards}; "
                             f"use split_batch (shapes {jax.tree.map(np.shape, batch)})")
        check_batch(jax.tree.map(lambda x: x[0], batch), self.accum_steps, "per-device batch")


def make_pmap_train_step(task, *, axis_name: str = "batch", policy: Policy = Policy(),
                         bn_mode: str = "global", accum_steps: int = 1,
                         nonfinite: str = "raise", check_every: int = 100) -> PmapStep:
    """pmapped train_step(replicated state, split batch) -> (state, metric sums).
    bn_mode "global" needs the model's BatchNorm `axis_name`; "frozen", `nonfinite` and
    `check_every` (call `train_step.check_finite()` at logging steps) as in jit."""
    _check_options(bn_mode, nonfinite, accum_steps, check_every)
    if bn_mode == "local":
        raise ValueError("under pmap, per-device BatchNorm is a model built without axis_name")
    body = functools.partial(train_body, task=task, policy=policy, bn_mode=bn_mode,
                             accum_steps=accum_steps, skip_nonfinite=nonfinite != "ignore",
                             axis_name=axis_name)
    fn = jax.pmap(_numbered(body) if nonfinite == "raise" else body, axis_name=axis_name,
                  donate_argnums=0)
    return PmapStep(lambda s, b: _first_metrics(fn(s, b)), jax.local_device_count(),
                    accum_steps, nonfinite, check_every)


def make_pmap_eval_step(task, *, axis_name: str = "batch", policy: Policy = Policy(),
                        use_ema: bool = False) -> PmapStep:
    fn = jax.pmap(functools.partial(eval_body, task=task, policy=policy, use_ema=use_ema,
                                    axis_name=axis_name), axis_name=axis_name)
    return PmapStep(lambda s, b: unreplicate(fn(s, b)), jax.local_device_count())


def _first_metrics(out):
    state, metrics = out
    return state, unreplicate(metrics)
