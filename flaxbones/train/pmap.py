"""The same steps for code that still drives devices with jax.pmap.

The model must be built with the same `axis_name` (e.g. `fb.create_model(...,
axis_name="batch")`) so BatchNorm statistics are synchronised; gradients, counts and
metrics are summed over devices, so results equal the jit path's.
"""
import functools
from typing import Any

import jax
import numpy as np
from flax import jax_utils

from flaxbones.train.precision import Policy
from flaxbones.train.sharding import check_batch
from flaxbones.train.tasks import Task
from flaxbones.train.steps import Step, _check_options, _numbered, eval_body, train_body

replicate = jax_utils.replicate
"""`flax.jax_utils.replicate(tree, devices=None)`: a copy of `tree` on every local device (a
leading device axis), e.g. the train state for the pmap steps; `unreplicate` undoes it."""


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree (pmap state -> plain state).

    Args:
        tree: A pytree whose leaves have a leading device axis.

    Returns:
        The tree of each leaf's entry 0.
    """
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n_devices: int | None = None) -> Any:
    """(B, ...) host arrays -> (devices, B / devices, ...) for pmap.

    Args:
        batch: A pytree of host arrays sharing one leading batch size B.
        n_devices: The number of devices; None takes `jax.local_device_count()`.

    Returns:
        The tree of numpy arrays reshaped to a leading device axis.

    Raises:
        ValueError: The leaves differ in leading size, or B does not divide by the device
            count.
    """
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


def make_pmap_train_step(task: Task, *, axis_name: str = "batch", policy: Policy = Policy(),
                         bn_mode: str = "global", accum_steps: int = 1,
                         nonfinite: str = "raise", check_every: int = 100) -> PmapStep:
    """pmapped train_step(replicated state, split batch) -> (state, metric sums).

    Gradients, counts and metrics are summed over devices, so results equal the jit
    path's; the metrics come back unreplicated.

    Args:
        task: The `Task`.
        axis_name: The pmap axis; the model's BatchNorm must be built with the same one
            for bn_mode "global".
        policy: The precision policy.
        bn_mode: "global" (synchronised over `axis_name`) or "frozen"; per-device
            statistics are a model built without `axis_name`.
        accum_steps: Gradient accumulation over this many micro-batches per device.
        nonfinite: "raise", "skip" or "ignore", as in `make_train_step`; call
            `train_step.check_finite()` at logging steps.
        check_every: Steps between the automatic `check_finite()` calls.

    Returns:
        The step, a callable `(state, batch) -> (state, metrics)` with `check_finite()`.

    Raises:
        ValueError: `bn_mode="local"` or another invalid option; when called, a batch
            without the leading device axis (use `split_batch`).
        FloatingPointError: From `check_finite()` after a non-finite step ("raise").
    """
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


def make_pmap_eval_step(task: Task, *, axis_name: str = "batch", policy: Policy = Policy(),
                        use_ema: bool = False) -> PmapStep:
    """pmapped eval_step(replicated state, split batch) -> metric sums (unreplicated).

    Args:
        task: The `Task`.
        axis_name: The pmap axis the sums are taken over.
        policy: The precision policy.
        use_ema: Evaluate the state's `ema_params`.

    Returns:
        The step, a callable `(state, batch) -> metric sums`.

    Raises:
        ValueError: When called, a batch without the leading device axis.
    """
    fn = jax.pmap(functools.partial(eval_body, task=task, policy=policy, use_ema=use_ema,
                                    axis_name=axis_name), axis_name=axis_name)
    return PmapStep(lambda s, b: unreplicate(fn(s, b)), jax.local_device_count())


def _first_metrics(out):
    state, metrics = out
    return state, unreplicate(metrics)
