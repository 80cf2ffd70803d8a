"""flaxbones models as Flax NNX modules: `to_nnx(model, variables=...)` wraps any model
(backbone, classifier, segmenter, detector) in `flax.nnx.bridge.ToNNX`, holding Linen
variables as NNX ones (`params` -> `nnx.Param`, `batch_stats` -> `nnx.BatchStat`), so it
trains with `nnx.Optimizer`, sits inside a user's own `nnx.Module`, and follows its
`.train()` / `.eval()`."""
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from flax.core import unfreeze
from flax.nnx.bridge import variables as bridge_variables

TRAIN_RNGS = ("dropout", "sampling")  # dropout / drop path; detectors' target sampling


class FlaxbonesNNX(nnx.bridge.ToNNX):
    """`nnx.bridge.ToNNX` with flaxbones' call convention built in (`to_nnx` makes one).

    `model(x)` runs in eval mode by default (running BatchNorm statistics, no dropout);
    after `.train()` (or with `train=True`) it uses batch statistics, writes the updated
    running statistics back into its `nnx.BatchStat`s, and draws the 'dropout' (and
    detectors' 'sampling') keys from the Rngs it was built with (their `default` stream
    where they have no such stream) or from `rngs=` passed to the call. flaxbones has one
    `train` flag: `use_running_average` and `deterministic` are both views of it.

    Args:
        module: The flaxbones Linen module to wrap.
        rngs: An `nnx.Rngs` or an int seed, for training's rngs.
        variables: A Linen variable dict to hold; None leaves the module uninitialised.

    Raises:
        ValueError: `variables` is not a Linen variable dict with 'params'.
    """

    def __init__(self, module: linen.Module, *, rngs: nnx.Rngs | int | None = None,
                 variables: Mapping[str, Any] | None = None):
        super().__init__(module, nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
        self.to_nnx__train = False
        if variables is not None:
            self.load_linen_variables(variables)

    @property
    def use_running_average(self) -> bool:
        """Eval mode as BatchNorm sees it: True unless in train mode (set it to switch)."""
        return not self.to_nnx__train

    @use_running_average.setter
    def use_running_average(self, value: bool):
        self.to_nnx__train = not value

    @property
    def deterministic(self) -> bool:
        """Eval mode as dropout sees it: True unless in train mode (set it to switch)."""
        return not self.to_nnx__train

    @deterministic.setter
    def deterministic(self, value: bool):
        self.to_nnx__train = not value

    def set_view(self, use_running_average: bool | None = None,
                 deterministic: bool | None = None) -> None:
        """What `nnx.view(model, use_running_average=..., deterministic=...)` sets.

        Args:
            use_running_average: True for eval mode, False for train mode; None keeps it.
            deterministic: The same flag seen as dropout's; None keeps it.
        """
        for value in (use_running_average, deterministic):
            if value is not None:
                self.to_nnx__train = not value

    def __call__(self, *args: Any, train: bool | None = None, rngs: Any = None,
                 mutable: Any = None, method: Any = None, **kwargs: Any) -> Any:
        """Run the wrapped model: `model.apply(variables, *args, train=..., **kwargs)`.

        Args:
            *args: The model's inputs (an image batch (N, H, W, 3) float; a detector's
                image_sizes (N, 2) int32 too).
            train: Train mode for this call; None: the module's mode (`.train()` /
                `.eval()`). In train mode the updated BatchNorm statistics are written
                back, and 'dropout' / 'sampling' keys drawn.
            rngs: Rngs (or keys) for this call instead of the module's.
            mutable: Linen collections to make mutable (default ['batch_stats'] in train
                mode).
            method: Call this method of the Linen module instead (plain `ToNNX` call,
                no train handling).
            **kwargs: The model's keyword arguments (e.g. a detector's `targets`).

        Returns:
            The model's outputs (a dict for a flaxbones model, logits under 'out').
        """
        if method is not None:
            return super().__call__(*args, rngs=rngs, mutable=mutable, method=method, **kwargs)
        train = self.to_nnx__train if train is None else train
        if train:
            mutable = ["batch_stats"] if mutable is None else mutable
            rngs = _train_rngs(self.to_nnx__rngs if rngs is None else rngs)
        return super().__call__(*args, train=train, rngs=rngs, mutable=mutable, **kwargs)

    def load_linen_variables(self, variables: Mapping[str, Any]) -> None:
        """Replace this module's variables with a Linen variable dict.

        Args:
            variables: {'params': ..., 'batch_stats': ...}, as `init` or
                `fb.load_pretrained` give; 'intermediates' are dropped.

        Raises:
            ValueError: `variables` has no 'params', or (when the module already holds
                variables) its paths or shapes differ from the current ones.
        """
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables must be a Linen variable dict with 'params', as "
                             "`init` or `fb.load_pretrained` return it")
        variables = {k: v for k, v in unfreeze(variables).items() if k != "intermediates"}
        current = self.linen_variables()
        if current:
            _check_same_tree(current, variables)
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(
                jax.tree.map(jnp.asarray, variables)).items():
            setattr(self, name, nnx.data(value))

    def linen_variables(self) -> dict:
        """The variables as a Linen dict.

        For `module.apply`, `fb.export` or `fb.save_weights` with `self.to_nnx__module`.

        Returns:
            The current values as a dict of collections ('params', 'batch_stats', ...).
        """
        attrs = {k: v for k, v in vars(self).items()
                 if not k.startswith(("to_nnx__", "_pytree__"))}
        return bridge_variables.nnx_attrs_to_linen_vars(attrs)


def _train_rngs(rngs):
    if isinstance(rngs, nnx.Rngs) and "default" in rngs:
        missing = [name for name in TRAIN_RNGS if name not in rngs]
        if missing:
            streams = {name: stream() for name, stream in rngs.items() if name != "default"}
            return nnx.Rngs(**streams, **{name: rngs.default() for name in missing})
    return rngs


def _check_same_tree(current, new):
    """A ValueError naming the first mismatched paths unless `new` has `current`'s
    collections, paths and shapes."""
    shapes = [{jax.tree_util.keystr(p): jnp.shape(v) for p, v in
               jax.tree_util.tree_flatten_with_path(tree)[0]} for tree in (current, new)]
    problems = [f"{k}: {shapes[0].get(k)} vs {shapes[1].get(k)}"
                for k in sorted(shapes[0].keys() | shapes[1].keys())
                if shapes[0].get(k) != shapes[1].get(k)]
    if problems:
        raise ValueError(f"variables do not fit this model ({len(problems)} mismatches, "
                         f"model vs given): " + "; ".join(problems[:5]))


def to_nnx(model: linen.Module, *example_args: Any, variables: Mapping[str, Any] | None = None,
           rngs: nnx.Rngs | int = 0, **example_kwargs: Any) -> FlaxbonesNNX:
    """`model` (any flaxbones Linen module) as an NNX module.

    With `variables` (e.g. from `fb.load_pretrained`) they are used as they are and
    nothing is traced. Otherwise the model is initialised from `example_args` with
    `rngs.params()`: the variables of `model.init` under that key, from one jitted init
    (`ToNNX.lazy_init` runs the same init op by op, which is slower).

    Args:
        model: A backbone, classifier, segmenter or detector (Linen module).
        *example_args: Example inputs to initialise from: an image batch
            (N, H, W, 3) float, and image_sizes (N, 2) int32 for a detector.
        variables: Linen variables to hold instead of initialising.
        rngs: An `nnx.Rngs` or a seed: the init key, and 'dropout' in training.
        **example_kwargs: Keyword arguments of the example call (`model.init`).

    Returns:
        A `FlaxbonesNNX` holding the variables (`params` -> `nnx.Param`,
            `batch_stats` -> `nnx.BatchStat`), in eval mode.

    Raises:
        ValueError: Neither `variables` nor example inputs are given, or both are.
    """
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    if variables is None:
        if not example_args:
            raise ValueError("to_nnx needs example inputs (e.g. an image batch) to "
                             "initialise the model, or variables=")
        init = jax.jit(lambda key, *args: model.init(key, *args, **example_kwargs))
        variables = init(rngs.params(), *example_args)
    elif example_args or example_kwargs:
        raise ValueError("give either variables= or example inputs to initialise from, "
                         "not both")
    return FlaxbonesNNX(model, rngs=rngs, variables=variables)
