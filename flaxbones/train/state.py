"""The train state, created with every parameter initialised directly into its sharding."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from flaxbones.train.precision import LossScale, Policy
from flaxbones.train.sharding import Rules, tree_shardings


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes. `ema_params` is None unless `ema_decay` is set;
    `loss_scale` is None unless the precision policy scales the loss (fp16)."""

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
    def variables(self):
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


def state_shardings(model, tx, input_shape, mesh: Mesh, rules: Rules = (), *,
                    ema_decay: float | None = None, policy: Policy = Policy()):
    """The NamedShardings of the state `create_train_state` would build (no compute)."""
    abstract = jax.eval_shape(_init_fn(model, tx, input_shape, ema_decay, policy),
                              jax.random.key(0))
    return tree_shardings(abstract, mesh, rules)


def create_train_state(model, tx: optax.GradientTransformation, rng, input_shape, mesh: Mesh,
                       rules: Rules = (), *, ema_decay: float | None = None,
                       policy: Policy = Policy()) -> TrainState:
    """Initialise params, batch_stats, optimizer state (and EMA) under jit with
    `out_shardings`, so each device only ever holds its own shards.

    `input_shape` is a sample batch shape such as (1, 224, 224, 3); `rules` map leaf
    paths ("params/backbone/.../kernel", "opt_state/...") to PartitionSpecs.
    """
    init = _init_fn(model, tx, tuple(input_shape), ema_decay, policy)
    shardings = tree_shardings(jax.eval_shape(init, rng), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(rng)
