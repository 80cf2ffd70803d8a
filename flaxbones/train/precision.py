"""Mixed precision as a policy, and dynamic loss scaling for fp16."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
    """Compute in `compute_dtype`; params (and BN statistics, always) in `param_dtype`;
    model outputs, loss and metrics in `output_dtype`. `loss_scaling` for fp16."""

    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    loss_scaling: bool = False

    @classmethod
    def named(cls, name: str) -> "Policy":
        """'fp32', 'bf16' or 'fp16' (fp16 with dynamic loss scaling)."""
        table = {"fp32": cls(), "bf16": cls(jnp.bfloat16),
                 "fp16": cls(jnp.float16, loss_scaling=True)}
        if name not in table:
            raise ValueError(f"unknown precision policy {name!r}; choose from {sorted(table)}")
        return table[name]

    def model_kwargs(self) -> dict:
        """Pass to `fb.create_model(..., **policy.model_kwargs())`."""
        return {"dtype": self.compute_dtype, "param_dtype": self.param_dtype}

    def cast_inputs(self, x):
        return jax.tree.map(lambda a: a.astype(self.compute_dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, x)

    def cast_outputs(self, y):
        return jax.tree.map(lambda a: a.astype(self.output_dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, y)


class LossScale(struct.PyTreeNode):
    """Dynamic loss scale: halve on non-finite gradients (the step is skipped), double
    after `period` finite steps in a row."""

    scale: jax.Array
    good_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)

    @classmethod
    def create(cls, initial: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0):
        return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period, factor)

    def update(self, grads_finite):
        grow = grads_finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(grads_finite, jnp.where(grow, self.scale * self.factor, self.scale),
                          jnp.maximum(self.scale / self.factor, 1.0))
        good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good)
