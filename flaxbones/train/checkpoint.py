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
import os
import pathlib
import signal
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from orbax.checkpoint import v1 as ocp

from flaxbones.weights.convert import LoadReport

STATE, DATA, META = "state", "data", "meta"
_policies = ocp.training.preservation_policies


class CheckpointError(ValueError):
    """A checkpoint step that cannot be restored (missing parts, truncated or corrupted)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpoints.restore` returns.

    Attributes:
        step: The step restored (an older one than asked with `fallback=True`).
        state: The train state, in the abstract state's structure and shardings.
        data: The input pipeline's position saved with it (JSON), or None.
        meta: The run's metadata: flaxbones version, model name and kwargs, config,
            step, metrics.
    """

    step: int
    state: Any
    data: Any
    meta: dict


def _version():
    from flaxbones import __version__
    return __version__


class Checkpoints:
    """A run's checkpoint series in `directory`, on Orbax's V1 `training.Checkpointer`.

    `save` is asynchronous (training continues while arrays are written) and acts every
    `save_every` steps unless forced; the latest `keep` steps are retained, plus the
    `keep_best` best by `best_metric` when given. `meta` is saved with every step. Use it
    as a context manager (or call `close`) so pending saves are committed.

    Args:
        directory: The run's checkpoint directory (created when needed).
        save_every: Save every this many steps (others are skipped unless forced).
        keep: The number of latest steps retained.
        best_metric: A metric name to also retain the best steps by; every save then
            needs it in `metrics`.
        best_mode: 'max' or 'min': which end of `best_metric` is best.
        keep_best: The number of best steps retained.
        meta: JSON metadata saved with every step (model name, 'model_kwargs', config),
            what `load_variables` rebuilds the model from.

    Raises:
        ValueError: `best_mode` is not 'max' or 'min', or `save_every` / `keep` < 1.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max", keep_best: int = 1,
                 meta: dict | None = None) -> None:
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
        """The newest complete step, or None when there is none."""
        steps = self.steps
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, data: Any = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Start an async save of `state` (and the pipeline position `data`) at `step`.

        Args:
            step: The training step the state is at.
            state: The train state pytree (sharded arrays are written by their owners).
            data: The input pipeline's position, JSON-serialisable (e.g. batches consumed).
            metrics: Scalar metrics saved with the step; `best_metric` reads them.
            force: Save even if `step` is not on the `save_every` interval.

        Returns:
            Whether a save was started (the interval policy may skip the step).

        Raises:
            ValueError: `metrics` is given but lacks `best_metric`.
        """
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best_metric is not None and metrics and self.best_metric not in metrics:
            raise ValueError(f"metrics {sorted(metrics)} lack the best_metric {self.best_metric!r}")
        meta = {"flaxbones_version": _version(), **self.meta, "step": int(step), "metrics": metrics}
        items = {STATE: state, META: meta, DATA: {"position": data}}
        response = self._checkpointer.save_checkpointables_async(
            int(step), items, force=force, metrics=metrics or None)
        return response is not None

    def wait(self) -> None:
        """Block until the pending async save is committed."""
        self._checkpointer.wait()

    def close(self) -> None:
        """Wait for pending saves and release the checkpointer."""
        self._checkpointer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with `step`.

        Args:
            step: The step; None: the latest.

        Returns:
            The metadata dict (flaxbones version, the `meta` given, step, metrics).

        Raises:
            FileNotFoundError: The directory has no checkpoint, or none for `step`.
            CheckpointError: The step cannot be read.
        """
        step = self._resolve(step)
        return self._load(step, {META: None})[META]

    def restore(self, abstract_state: Any = None, step: int | None = None, *,
                fallback: bool = False) -> Restored:
        """Restore `step` into `abstract_state`'s structure and shardings.

        Arrays land directly in those shardings, whatever the mesh that saved them.

        Args:
            abstract_state: A pytree of `jax.ShapeDtypeStruct`s with `.sharding` set (see
                `abstract_state_like`); None: the saved structure, on the default device.
            step: The step; None: the latest.
            fallback: Try older steps, newest first, when a step cannot be read.

        Returns:
            A `Restored` (step, state, data position, meta).

        Raises:
            FileNotFoundError: The directory has no checkpoint, or none for `step`.
            CheckpointError: The step (with `fallback`, every candidate step) cannot be
                read; the message names it.
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

        Shapes are checked against the saved metadata first.

        Args:
            abstract_subtree: A pytree of `jax.ShapeDtypeStruct`s (with shardings) of the
                part of the state to load, keyed as the state is.
            step: The step; None: the latest.

        Returns:
            The loaded arrays in the subtree's structure.

        Raises:
            ValueError: A leaf the checkpoint lacks or holds with another shape (the first
                offenders listed).
            FileNotFoundError: The directory has no checkpoint, or none for `step`.
            CheckpointError: The step cannot be read.
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
        """The shapes of the state saved at `step`, by leaf path.

        Args:
            step: The step; None: the latest.

        Returns:
            {'params/backbone/conv1/kernel': shape, ...}.

        Raises:
            FileNotFoundError: The directory has no checkpoint, or none for `step`.
        """
        step = self._resolve(step)
        tree = self._checkpointer.checkpointables_metadata(step).metadata[STATE]
        return {k: tuple(x.shape) for k, x in _leaf_paths(tree).items() if hasattr(x, "shape")}


def _leaf_paths(tree) -> dict:
    """{'params/backbone/conv1/kernel': leaf, ...}"""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_state_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings`, as `Checkpoints.restore` expects.

    Leaves with no sharding of their own go to the first local device.

    Args:
        tree: A pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. a train state, or
            `jax.eval_shape` of its init).
        shardings: A matching tree of Shardings (e.g. `state_shardings(...)`), one
            Sharding for every leaf, or None to keep each leaf's own.

    Returns:
        The tree of `jax.ShapeDtypeStruct`s with shardings.
    """
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        default = shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def transfer(directory: str | os.PathLike, variables: dict, subtrees: Sequence[str] = ("backbone",),
             step: int | None = None) -> tuple[dict, LoadReport]:
    """Restore sub-trees of a checkpoint's params and batch_stats into another model's variables.

    E.g. a classifier run's 'backbone' into a segmenter. Every leaf under a transferred
    sub-tree must exist in the checkpoint with the same shape; everything else keeps its
    value.

    Args:
        directory: The `Checkpoints` directory.
        variables: The target model's variables ({'params', 'batch_stats'}).
        subtrees: The top-level sub-trees to transfer.
        step: The step; None: the latest.

    Returns:
        The new variables and a LoadReport (`loaded` the restored leaves, `skipped`
            those left as they were), as a tuple.

    Raises:
        ValueError: `variables` has none of `subtrees`, or the checkpoint lacks a leaf
            or holds it with another shape.
        FileNotFoundError: The directory has no checkpoint, or none for `step`.
        CheckpointError: The step cannot be read.
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


def load_variables(directory: str | os.PathLike, name: str | None = None, *,
                   skip_head: bool = False, rng: jax.Array | None = None,
                   step: int | None = None, **create_kwargs: Any) -> tuple[dict, LoadReport]:
    """The params and batch_stats saved at `step` of a `Checkpoints` run, for a model.

    For `create_model(name, **create_kwargs)`; the name and kwargs come from the saved
    metadata unless given. `fb.load_pretrained(None, directory)` calls this.

    Args:
        directory: The `Checkpoints` directory.
        name: The model name; None: the saved one.
        skip_head: Let head leaves saved with another shape (another num_classes) keep
            their initial values; they are reported as skipped.
        rng: The PRNG key that initialises skipped leaves (default `PRNGKey(0)`).
        step: The step; None: the latest.
        **create_kwargs: `create_model` options; none given: the saved 'model_kwargs'.

    Returns:
        (variables, LoadReport).

    Raises:
        ValueError: `name` differs from the saved one, there is no name at all, or a
            leaf differs other than a skippable head's.
        FileNotFoundError: The directory has no checkpoint, or none for `step`.
        CheckpointError: The step cannot be read.
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

    Use it as a context manager around the training loop and call `should_stop(step)`
    after each step. With several processes the decision comes from JAX's preemption
    sync point (`jax.distributed` listens for the signal), so all hosts stop at one step;
    the signal handlers are only installed for a single process.

    Args:
        signals: The signals that request a stop.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
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
        """Whether to checkpoint and stop after `step`.

        Args:
            step: The step just taken (the same on every host).

        Returns:
            True once a signal was received (single process), or at the preemption sync
                point (several processes).
        """
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
