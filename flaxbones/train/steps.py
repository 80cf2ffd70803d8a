"""jit-compiled train and eval steps with explicit shardings and donated state.

One step body serves three drivers: SPMD jit (BatchNorm statistics global over the
sharded batch), shard_map with per-device BatchNorm ("local"), and pmap (steps/pmap.py).
"""
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from flaxbones.train.precision import Policy
from flaxbones.train.sharding import batch_spec, check_batch, replicated
from flaxbones.train.state import TrainState
from flaxbones.train.tasks import Task

BN_MODES = ("global", "frozen", "local")
NONFINITE = ("raise", "skip", "ignore")


def _psum(x, axis):
    return x if axis is None else jax.lax.psum(x, axis)


def _forward(state, params, batch_stats, batch, rng, policy, train_bn, task):
    """Model outputs (in the policy's output dtype) and the updated batch statistics.
    rngs: 'dropout', and 'sampling' for a detector's balanced sampling."""
    variables = {"params": params, "batch_stats": batch_stats}
    args, kwargs = task.model_inputs(batch, train=True)
    rngs = {"dropout": rng, "sampling": jax.random.fold_in(rng, 1)}
    outputs, mutated = state.apply_fn(variables, policy.cast_inputs(batch["image"]), *args,
                                      train=train_bn, mutable=["batch_stats"], rngs=rngs, **kwargs)
    return policy.cast_outputs(outputs), mutated.get("batch_stats", batch_stats)


def _micro_batches(batch, k):
    """(B, ...) -> (k, B/k, ...), micro-batch j = examples j, j+k, ... so that each
    device's slice of a micro-batch comes from its own slice of the batch."""
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // k, k) + a.shape[1:]).swapaxes(0, 1),
                        batch)


def train_body(state, batch, *, task, policy=Policy(), bn_mode="global", accum_steps=1,
               skip_nonfinite=False, axis_name=None, mean_batch_stats=False):
    """One optimizer step: (state, batch) -> (state, metric sums). `axis_name` names the
    device axis under pmap/shard_map (counts, gradients and metrics are summed over it)."""
    task.check(batch)
    step_rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    denom = jnp.maximum(_psum(task.count(batch), axis_name), 1.0)
    scale = state.loss_scale.scale if state.loss_scale is not None else 1.0
    train_bn = bn_mode != "frozen"
    if not train_bn and task.losses_need_train_mode:
        raise ValueError(f"bn_mode='frozen' runs the model with train=False, which gives no "
                         f"losses for {type(task).__name__}; detectors freeze their backbone's "
                         "BatchNorm when built (frozen_bn=True, the default): use bn_mode="
                         "'global' or 'local'")

    def objective(params, batch_stats, micro, rng):
        outputs, new_stats = _forward(state, params, batch_stats, micro, rng, policy, train_bn,
                                      task)
        loss_sum, count = task.loss(outputs, micro)
        return loss_sum / denom * scale, (loss_sum, count, new_stats, task.metrics(outputs, micro))

    grad_fn = jax.grad(objective, has_aux=True)
    if accum_steps == 1:
        grads, (loss_sum, count, new_stats, sums) = grad_fn(state.params, state.batch_stats,
                                                            batch, step_rng)
    else:
        def accumulate(carry, xs):
            grads, loss_sum, count, stats, sums = carry
            micro, i = xs
            g, (part, c, stats, s) = grad_fn(state.params, stats, micro,
                                             jax.random.fold_in(step_rng, i))
            add = functools.partial(jax.tree.map, jnp.add)
            return (add(grads, g), loss_sum + part, count + c, stats, add(sums, s)), None

        micro = _micro_batches(batch, accum_steps)
        first = jax.tree.map(lambda a: a[0], micro)
        shapes = jax.eval_shape(grad_fn, state.params, state.batch_stats, first, step_rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1][3]))
        init = (zeros[0], jnp.zeros(()), jnp.zeros(()), state.batch_stats, zeros[1])
        (grads, loss_sum, count, new_stats, sums), _ = jax.lax.scan(
            accumulate, init, (micro, jnp.arange(accum_steps)))

    grads = jax.tree.map(lambda g: g / scale, _psum(grads, axis_name))
    loss_sum, count, sums = (_psum(t, axis_name) for t in (loss_sum, count, sums))
    if mean_batch_stats:
        new_stats = jax.lax.pmean(new_stats, axis_name)
    # The norm doubles as the finiteness check (NaN or inf anywhere, or an entry whose
    # square overflows, makes it non-finite): a separate is-finite reduction per leaf
    # cost 4 s of XLA:CPU compile on a scanned resnet152.
    grad_norm = optax.tree.norm(grads)
    grads_finite, loss_finite = jnp.isfinite(grad_norm), jnp.isfinite(loss_sum)
    scaling = state.loss_scale is not None
    # `finite` flags trouble; an fp16 gradient overflow is routine under loss scaling.
    finite = loss_finite & (grads_finite | scaling)

    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        d = state.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    new = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                        opt_state=opt_state, ema_params=ema)
    if scaling or skip_nonfinite:
        keep = grads_finite & loss_finite if skip_nonfinite else grads_finite
        new = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new,
                           state.replace(step=state.step + 1))
    else:
        keep = jnp.asarray(True)
    if scaling:
        new = new.replace(loss_scale=state.loss_scale.update(grads_finite))
        sums = {**sums, "loss_scale": state.loss_scale.scale}
    metrics = {"loss_sum": loss_sum, "count": count, **sums,
               "grad_norm": grad_norm, "finite": finite, "skipped": ~keep}
    return new, metrics


def eval_body(state, batch, *, task, policy=Policy(), use_ema=False, axis_name=None):
    """Metric sums of one batch in inference mode (running BatchNorm statistics)."""
    task.check(batch)
    params = state.ema_params if use_ema else state.params
    if params is None:
        raise ValueError("use_ema=True but the state has no EMA (create it with ema_decay=...)")
    args, kwargs = task.model_inputs(batch, train=False)
    outputs = policy.cast_outputs(state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        policy.cast_inputs(batch["image"]), *args, train=False, **kwargs))
    loss_sum, count = task.loss(outputs, batch)
    sums = {"loss_sum": loss_sum, "count": count, **task.metrics(outputs, batch)}
    return _psum(sums, axis_name)


class Step:
    """A compiled step plus the host-side checks jit cannot give a clear message for:
    batch divisibility, and (nonfinite='raise') non-finite losses or gradients.

    A train step in 'raise' mode never syncs the host per step: the compiled step drops a
    non-finite update on device, and this object keeps each step's (device) flag unread
    until `check_finite()`, which runs on the call after `check_every` unchecked steps
    (before it dispatches, so the caller's state stays usable) and whenever the user
    calls it, e.g. at logging steps and after the last step."""

    def __init__(self, fn, num_shards, accum_steps=1, nonfinite="ignore", check_every=100):
        self.fn, self.num_shards, self.accum_steps = fn, num_shards, accum_steps
        self.nonfinite, self.check_every, self._pending = nonfinite, check_every, []

    def check(self, batch):
        size = check_batch(batch, self.num_shards)
        if size % (self.num_shards * self.accum_steps):
            raise ValueError(f"global batch of {size} examples does not split into "
                             f"{self.accum_steps} micro-batches over {self.num_shards} shards")

    def __call__(self, state, batch):
        if len(self._pending) >= self.check_every:
            self.check_finite()
        self.check(batch)
        if self.nonfinite != "raise":
            return self.fn(state, batch)
        state, (metrics, number) = self.fn(state, batch)
        self._pending.append((number, metrics["finite"], metrics["loss_sum"]))
        return state, metrics

    def check_finite(self):
        """Raise FloatingPointError if a step since the last check had a non-finite loss or
        gradients (its update was not applied), naming the first; one host transfer."""
        pending = jax.device_get(self._pending)
        self._pending = []
        bad = [(int(n), float(loss)) for n, finite, loss in pending if not finite]
        if bad:
            raise FloatingPointError(
                f"non-finite loss or gradients at train step {bad[0][0]} (loss_sum "
                f"{bad[0][1]}); {len(bad)} of the {len(pending)} steps since the last check "
                "were, and their updates were not applied (the state is intact). Make the step "
                "with nonfinite='skip' to train past such steps")


def _numbered(body):
    """`body` also returning the number of the step it takes, for Step.check_finite."""
    def fn(state, batch):
        new, metrics = body(state, batch)
        return new, (metrics, new.step)
    return fn


def _check_options(bn_mode, nonfinite, accum_steps, check_every=1):
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")


def make_train_step(task: Task, mesh: Mesh, state_sharding: TrainState, *,
                    policy: Policy = Policy(),
                    bn_mode: str = "global", accum_steps: int = 1,
                    nonfinite: str = "raise", check_every: int = 100) -> Step:
    """train_step(state, batch) -> (state, metric sums), jit-compiled over `mesh`.

    The state is donated (its buffers are reused: keep the returned one). The metric sums
    (replicated) hold 'loss_sum', 'count', the task's sums, 'grad_norm', 'finite' and
    'skipped' (and 'loss_scale' under fp16 loss scaling); add them over steps and finish
    with `summarize`.

    Args:
        task: The `Task` (Classification, Segmentation, Detection): loss, metrics and
            batch checks.
        mesh: The training mesh; the batch is split over all its axes.
        state_sharding: The state's shardings, from `state_shardings(...)` or
            `jax.tree.map(lambda a: a.sharding, state)`.
        policy: The precision policy (input, output casts).
        bn_mode: "global" (statistics over the whole global batch, as SPMD jit gives),
            "frozen" (running statistics, no updates, and so no dropout either: the
            model runs with train=False), or "local" (statistics per device, via
            shard_map, running statistics averaged over devices).
        accum_steps: Gradient accumulation over this many micro-batches per step.
        nonfinite: What a non-finite loss or gradient does. "raise": the update is
            dropped on device and `train_step.check_finite()` raises FloatingPointError
            naming the step; it runs by itself every `check_every` steps (the only host
            syncs it adds): call it at logging steps and after the last step too.
            "skip": the update is dropped (`skipped` metric set), nothing raised.
            "ignore": the update is applied.
        check_every: Steps between the automatic `check_finite()` calls ("raise").

    Returns:
        The step, a callable `(state, batch) -> (state, metrics)` with a
            `check_finite()` method.

    Raises:
        ValueError: An unknown `bn_mode` or `nonfinite`, `accum_steps` or `check_every`
            below 1; when called, a batch that does not split over the devices and
            micro-batches, fails the task's checks, or `bn_mode="frozen"` for a task
            whose losses need train mode (detection).
        FloatingPointError: From `check_finite()` (nonfinite="raise"), after a step
            with a non-finite loss or gradients.
        KeyError: When called, a batch without the entries the task reads.
    """
    _check_options(bn_mode, nonfinite, accum_steps, check_every)
    axes = tuple(mesh.axis_names)
    body = functools.partial(train_body, task=task, policy=policy, bn_mode=bn_mode,
                             accum_steps=accum_steps, skip_nonfinite=nonfinite != "ignore")
    if bn_mode == "local":
        body = jax.shard_map(functools.partial(body, axis_name=axes, mean_batch_stats=True),
                             mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), batch_spec(mesh)),
                             out_specs=jax.sharding.PartitionSpec(), check_vma=False)
    if nonfinite == "raise":
        body = _numbered(body)
    fn = jax.jit(body, in_shardings=(state_sharding, NamedSharding(mesh, batch_spec(mesh))),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)
    return Step(fn, int(np.prod(list(mesh.shape.values()))), accum_steps, nonfinite, check_every)


def make_eval_step(task: Task, mesh: Mesh, state_sharding: TrainState, *,
                   policy: Policy = Policy(),
                   use_ema: bool = False) -> Step:
    """eval_step(state, batch) -> metric sums over the global batch, jit-compiled.

    The model runs in inference mode (running BatchNorm statistics); padded examples
    (valid=False) are left out. Add the sums over batches, then `summarize`.

    Args:
        task: The `Task` whose loss and metrics to sum.
        mesh: The mesh the batch is split over.
        state_sharding: The state's shardings (as for `make_train_step`).
        policy: The precision policy.
        use_ema: Evaluate the state's `ema_params` instead of its `params`.

    Returns:
        The step, a callable `(state, batch) -> metric sums` (replicated arrays).

    Raises:
        ValueError: When called: a batch that does not split over the devices or fails
            the task's checks, or `use_ema` with a state that has no EMA.
        KeyError: When called, a batch without the entries the task reads.
    """
    fn = jax.jit(functools.partial(eval_body, task=task, policy=policy, use_ema=use_ema),
                 in_shardings=(state_sharding, NamedSharding(mesh, batch_spec(mesh))),
                 out_shardings=replicated(mesh))
    return Step(fn, int(np.prod(list(mesh.shape.values()))))


def make_predict_step(task: Task, mesh: Mesh, state_sharding: TrainState, *,
                      policy: Policy = Policy(), use_ema: bool = False) -> Callable[..., Any]:
    """predict_step(state, batch) -> the model's inference outputs, jit-compiled.

    The outputs are split over the batch like the batch; for metrics over a whole split
    (such as COCO AP), bring each host's rows home with `host_rows`.

    Args:
        task: The `Task` that says what the model takes besides the images.
        mesh: The mesh the batch is split over.
        state_sharding: The state's shardings (as for `make_train_step`).
        policy: The precision policy.
        use_ema: Run the state's `ema_params` instead of its `params`.

    Returns:
        The jitted function `(state, batch) -> outputs`.

    Raises:
        ValueError: `use_ema` while the state has no EMA.
    """
    def predict(state, batch):
        params = state.ema_params if use_ema else state.params
        args, kwargs = task.model_inputs(batch, train=False)
        return policy.cast_outputs(state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            policy.cast_inputs(batch["image"]), *args, train=False, **kwargs))

    if use_ema and state_sharding.ema_params is None:
        raise ValueError("use_ema=True but the state has no EMA (create it with ema_decay=...)")
    sharding = NamedSharding(mesh, batch_spec(mesh))
    return jax.jit(predict, in_shardings=(state_sharding, sharding), out_shardings=sharding)


def host_rows(tree: Any, mesh: Mesh) -> Any:
    """This host's rows of batch-split global arrays, as numpy (what it fed in).

    Args:
        tree: A pytree of global arrays split over the batch axis (e.g. a predict step's
            outputs).
        mesh: The mesh they are sharded over.

    Returns:
        The same tree of numpy arrays holding this process's rows.
    """
    from jax.experimental import multihost_utils
    local = multihost_utils.global_array_to_host_local_array(tree, mesh, batch_spec(mesh))
    return jax.device_get(local)
