"""Orbax checkpoints for a training run, on Orbax's V1 API (`v1.training.Checkpointer`).

V1 covers every need here in orbax-checkpoint 0.12: async saves, retention of the
latest K and the best by a metric (preservation policies), JSON metadata beside the
arrays, restore into the current mesh's shardings (abstract targets carry them), and
partial loads (`Context` with `pytree.loading.partial_load`). So nothing uses the
legacy `CheckpointManager`.

A step directory holds three checkpointables: `state` (the train state pytree),
`data` (the input pipeline's position, JSON) and `meta` (flaxbones version, model
name and kwargs, config, step, metrics; JSON).
"""
import dataclasses
import functools
import logging
import pathlib
import signal
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from orbax.checkpoint import v1 as ocp

from flaxbones.weights.convert import LoadReport

STATE, DATA, META = "state", "data", "meta"
_policies = ocp.training.preservation_policies


class CheckpointError(ValueError):
    """A checkpoint step that cannot be restored (missing, truncated or corrupted)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpoints.restore` returns."""

    step: int
    state: Any
    data: Any
    meta: dict


def _version():
    from flaxbones import __version__
    return __version__


class Checkpoints:
    """A run's checkpoint series in `directory`.

    `save` is asynchronous (training continues while arrays are written) and acts every
    `save_every` steps unless forced; the latest `keep` steps are retained, plus the
    `keep_best` best by `best_metric` (`best_mode` 'max' or 'min') when given. `meta`
    (model name, create kwargs, config) is saved with every step.
    """

    def __init__(self, directory, *, save_every: int = 1000, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max", keep_best: int = 1,
                 meta: dict | None = None):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = pathlib.Path(directory).absolute()  # Orbax needs absolute paths
        self.meta = dict(meta or {})
        self.best_metric = best_metric
        keep_policies = [_policies.LatestN(keep)]
        if best_metric is not None:
            keep_policies.append(_policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                n=keep_best, keep_checkpoints_without_metrics=False))
        self._checkpointer = ocp.training.Checkpointer(
            self.directory,
            save_decision_policy=ocp.training.save_decision_policies.FixedIntervalPolicy(save_every),
            preservation_policy=_policies.AnyPreservationPolicy(keep_policies),
            cleanup_tmp_directories=True)

    @property
    def steps(self) -> list[int]:
        """Steps whose checkpoints are complete, oldest first."""
        return sorted(c.step for c in self._checkpointer.checkpoints)

    @property
    def latest_step(self) -> int | None:
        steps = self.steps
        return steps[-1] if steps else None

    def save(self, step: int, state, *, data=None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Start an async save of `state` (and the pipeline position `data`, JSON) at `step`.

        Returns whether a save was started (the interval policy may skip the step).
        """
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best_metric is not None and metrics and self.best_metric not in metrics:
            raise ValueError(f"metrics {sorted(metrics)} lack the best_metric {self.best_metric!r}")
        meta = {"flaxbones_version": _version(), **self.meta, "step": int(step), "metrics": metrics}
        items = {STATE: state, META: meta, DATA: {"position": data}}
        response = self._checkpointer.save_checkpointables_async(
            int(step), items, force=force, metrics=metrics or None)
        return response is not None

    def wait(self):
        """Block until the pending async save is committed."""
        self._checkpointer.wait()

    def close(self):
        self._checkpointer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step` (default: the latest)."""
        step = self._resolve(step)
        return self._load(step, {META: None})[META]

    def restore(self, abstract_state=None, step: int | None = None, *,
                fallback: bool = False) -> Restored:
        """Restore `step` (default: the latest) into `abstract_state`'s structure and shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` set (see
        `abstract_state_like`): arrays land directly in those shardings, whatever the mesh
        that saved them (None: the saved structure, on the default device). A step that cannot be read raises CheckpointError naming it; with
        `fallback=True` older steps are tried, newest first.
        """
        step = self._resolve(step)
        candidates = [s for s in reversed(self.steps) if s <= step] if fallback else [step]
        errors = []
        for candidate in candidates:
            try:
                items = self._load(candidate, {STATE: abstract_state, DATA: None, META: None})
            except CheckpointError as e:
                errors.append(str(e))
                logging.warning("%s%s", e, "; trying an older step" if fallback else "")
                continue
            return Restored(candidate, items[STATE], items[DATA]["position"], items[META])
        raise CheckpointError("; ".join(errors) if errors else f"no checkpoint at or before step {step}")

    def _resolve(self, step):
        steps = self.steps
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; it has {steps}")
        return step

    def _load(self, step, abstract, partial: bool = False):
        try:
            if not partial:
                return self._checkpointer.load_checkpointables(step, abstract)
            context = ocp.Context()
            context.pytree.loading.partial_load = True
            with context:
                return ocp.load_checkpointables(self.directory / str(step), abstract)
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            detail = f"{type(e).__name__}: {e}"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored: it is missing "
                f"parts, truncated or corrupted ({detail[:300]}...)") from e

    def load_subtree(self, abstract_subtree: dict, step: int | None = None) -> dict:
        """Partially restore part of the state, e.g. {'params': {...}, 'batch_stats': {...}}.

        Shapes are checked against the saved metadata first: a leaf the checkpoint lacks or
        holds with another shape raises a ValueError listing the first offenders.
        """
        step = self._resolve(step)
        saved = self.saved_shapes(step)
        wanted = {k: tuple(x.shape) for k, x in _leaf_paths(abstract_subtree).items()}
        missing = [k for k in wanted if k not in saved]
        mismatched = [f"{k}: saved {saved[k]}, wanted {v}" for k, v in wanted.items()
                      if k in saved and saved[k] != v]
        if missing or mismatched:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not fit: "
                             f"{len(missing)} missing ({missing[:5]}), {len(mismatched)} "
                             f"shape mismatches ({mismatched[:5]})")
        return self._load(step, {STATE: abstract_subtree}, partial=True)[STATE]

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple]:
        """{'params/backbone/conv1/kernel': shape, ...} of the state saved at `step`."""
        step = self._resolve(step)
        tree = self._checkpointer.checkpointables_metadata(step).metadata[STATE]
        return {k: tuple(x.shape) for k, x in _leaf_paths(tree).items() if hasattr(x, "shape")}


def _leaf_paths(tree) -> dict:
    """{'params/backbone/conv1/kernel': leaf, ...}"""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_state_like(tree, shardings=None):
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings` (a matching
    tree of Shardings, or one for every leaf), as `Checkpoints.restore` expects. Leaves
    with no sharding of their own go to the first local device."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        default = shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def transfer(directory, variables: dict, subtrees=("backbone",), step: int | None = None):
    """Restore the `subtrees` (e.g. a classifier's 'backbone') of a checkpoint's params and
    batch_stats into `variables` of another model (a segmenter, say).

    Returns (new variables, LoadReport): `loaded` the restored leaves, `skipped` those left
    as they were. Every leaf under a transferred sub-tree must exist in the checkpoint
    with the same shape; everything else keeps its value.
    """
    picked = {c: {t: variables[c][t] for t in subtrees if t in variables.get(c, {})}
              for c in ("params", "batch_stats")}
    picked = {c: trees for c, trees in picked.items() if trees}
    if not picked:
        raise ValueError(f"the target variables have none of the sub-trees {tuple(subtrees)}")
    with Checkpoints(directory) as ckpt:
        loaded = ckpt.load_subtree(abstract_state_like(picked), step)
    merged = {c: dict(tree) for c, tree in variables.items()}
    for c, trees in loaded.items():
        merged[c].update(trees)
    loaded_names = set(_leaf_paths(loaded))
    return merged, LoadReport(sorted(loaded_names),
                              sorted(set(_leaf_paths(variables)) - loaded_names), [])


def load_variables(directory, name: str | None = None, *, skip_head: bool = False, rng=None,
                   step: int | None = None, **create_kwargs):
    """(variables, LoadReport): the params and batch_stats saved at `step` (default: the
    latest) of a `Checkpoints` run, for `create_model(name, **create_kwargs)`; the name
    and kwargs come from the saved metadata unless given. With `skip_head=True`, head
    leaves saved with another shape (another num_classes) keep their initial values (from
    `rng`) and are reported as skipped; any other difference is a ValueError.
    """
    from flaxbones.registry import create_model, get_spec

    with Checkpoints(directory) as ckpt:
        meta = ckpt.read_meta(step)
        saved_name = meta.get("model")
        if name is not None and saved_name is not None and name != saved_name:
            raise ValueError(f"{directory} holds a {saved_name!r} checkpoint, not {name!r}")
        name = name or saved_name
        if name is None:
            raise ValueError(f"{directory} has no model name in its metadata; pass one")
        kwargs = create_kwargs or meta.get("model_kwargs", {})
        model = create_model(name, **kwargs)
        images = jnp.zeros((1, 224, 224, 3), kwargs.get("dtype", jnp.float32))
        init = functools.partial(model.init, train=False)
        rngs = {"params": jax.random.PRNGKey(0) if rng is None else rng}
        shapes = jax.eval_shape(init, rngs, images)
        target = _leaf_paths({c: shapes[c] for c in ("params", "batch_stats") if c in shapes})
        source = get_spec(name).weights
        heads = source.head_prefixes() if source is not None else ("head/", "aux_head/")
        saved = ckpt.saved_shapes(step)
        skipped = sorted(k for k, x in target.items() if skip_head
                         and k.split("/", 1)[1].startswith(heads) and saved.get(k) != x.shape)
        wanted = {k: x for k, x in target.items() if k not in skipped}
        variables = _leaf_paths(ckpt.load_subtree(abstract_state_like(_nest(wanted)), step))
    if skipped:
        fresh = _leaf_paths(jax.jit(init)(rngs, images))
        variables.update({k: fresh[k] for k in skipped})
    return _nest(variables), LoadReport(sorted(wanted), skipped, [])


def _nest(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


class PreemptionGuard:
    """Turns SIGTERM into a request to checkpoint and stop at the next step boundary.

    Use as a context manager around the training loop and call `should_stop(step)` after
    each step. With several processes the decision comes from JAX's preemption sync
    point (`jax.distributed` listens for the signal), so all hosts stop at one step.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        logging.warning("signal %d received: checkpointing at the next step", signum)
        self.requested = True

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
