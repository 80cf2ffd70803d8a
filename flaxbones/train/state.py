"""The train state, created with every parameter initialised directly into its sharding."""
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from flaxbones.train.precision import LossScale, Policy
from flaxbones.train.sharding import Rules, tree_shardings


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes: a pytree, with the model and optimizer static.

    Attributes:
        step: int32 scalar, the number of optimizer steps taken.
        params: The model's 'params' collection.
        batch_stats: The model's 'batch_stats' collection ({} when it has none).
        opt_state: The optimizer state of `tx`.
        rng: The PRNG key the steps fold the step number into (dropout, sampling).
        ema_params: An exponential moving average of `params`, or None unless
            `ema_decay` is set.
        loss_scale: The dynamic `LossScale`, or None unless the precision policy scales
            the loss (fp16).
        apply_fn: The model's `apply` (static).
        tx: The optax transformation (static).
        ema_decay: The EMA decay per step, or None (static).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    loss_scale: LossScale | None = None
    apply_fn: Callable = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
    ema_decay: float | None = struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables, {'params': ..., 'batch_stats': ...}, for `apply`."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def _init_fn(model, tx, input_shape, ema_decay, policy):
    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        x = jnp.zeros(input_shape, policy.compute_dtype)
        variables = model.init({"params": init_rng, "dropout": init_rng}, x, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
            rng=state_rng, ema_params=params if ema_decay is not None else None,
            loss_scale=LossScale.create() if policy.loss_scaling else None,
            apply_fn=model.apply, tx=tx, ema_decay=ema_decay)
    return init


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    input_shape: Sequence[int], mesh: Mesh, rules: Rules = (), *,
                    ema_decay: float | None = None, policy: Policy = Policy()) -> TrainState:
    """The NamedShardings of the state `create_train_state` would build (no compute).

    For the steps' `state_sharding` before a state exists (e.g. to restore a checkpoint
    into). The arguments are those of `create_train_state`, less `rng`.

    Args:
        model: The Linen model.
        tx: The optimizer.
        input_shape: A sample batch shape such as (1, 224, 224, 3).
        mesh: The training mesh.
        rules: (regex on leaf path, PartitionSpec) pairs, e.g. `FSDP_RULES`.
        ema_decay: Whether (and how) the state keeps an EMA of the params.
        policy: The precision policy (its compute dtype, and loss scaling).

    Returns:
        A `TrainState` whose leaves are `NamedSharding`s.
    """
    abstract = jax.eval_shape(_init_fn(model, tx, input_shape, ema_decay, policy),
                              jax.random.key(0))
    return tree_shardings(abstract, mesh, rules)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: Sequence[int], mesh: Mesh, rules: Rules = (), *,
                       ema_decay: float | None = None,
                       policy: Policy = Policy()) -> TrainState:
    """Initialise params, batch_stats, optimizer state (and EMA) directly into their shardings.

    The init runs under jit with `out_shardings`, so each device only ever holds its own
    shards.

    Args:
        model: The Linen model (built with the policy's `model_kwargs()`).
        tx: The optimizer (`make_optimizer`).
        rng: A PRNG key: the init key, and the state's `rng`.
        input_shape: A sample batch shape such as (1, 224, 224, 3).
        mesh: The training mesh.
        rules: Map leaf paths ("params/backbone/.../kernel", "opt_state/...") to
            PartitionSpecs; unmatched leaves are replicated.
        ema_decay: Keep an EMA of the params with this decay; None for none.
        policy: The precision policy: the dtype of the sample input, and a `LossScale`
            when it scales the loss.

    Returns:
        The sharded `TrainState` at step 0.

    Raises:
        ValueError: A rule names a mesh axis the mesh lacks.
    """
    init = _init_fn(model, tx, tuple(input_shape), ema_decay, policy)
    shardings = tree_shardings(jax.eval_shape(init, rng), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(rng)
