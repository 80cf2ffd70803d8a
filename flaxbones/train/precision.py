"""Mixed precision as a policy, and dynamic loss scaling for fp16."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
    """Mixed precision: the dtypes of compute, parameters and outputs, and loss scaling.

    Attributes:
        compute_dtype: The dtype of activations (and the model's `dtype`).
        param_dtype: The dtype of params, and always of the BatchNorm statistics.
        output_dtype: The dtype of model outputs, losses and metrics.
        loss_scaling: Dynamic loss scaling (`LossScale`), for fp16.
    """

    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    loss_scaling: bool = False

    @classmethod
    def named(cls, name: str) -> "Policy":
        """A named policy: 'fp32', 'bf16' (bfloat16 compute) or 'fp16' (float16 compute with
        dynamic loss scaling); params float32 in all three.

        Args:
            name: 'fp32', 'bf16' or 'fp16'.

        Returns:
            The `Policy`.

        Raises:
            ValueError: An unknown name.
        """
        table = {"fp32": cls(), "bf16": cls(jnp.bfloat16),
                 "fp16": cls(jnp.float16, loss_scaling=True)}
        if name not in table:
            raise ValueError(f"unknown precision policy {name!r}; choose from {sorted(table)}")
        return table[name]

    def model_kwargs(self) -> dict:
        """The model options of this policy, for `fb.create_model(..., **policy.model_kwargs())`.

        Returns:
            {'dtype': compute_dtype, 'param_dtype': param_dtype}.
        """
        return {"dtype": self.compute_dtype, "param_dtype": self.param_dtype}

    def cast_inputs(self, x: Any) -> Any:
        """Cast the floating leaves of `x` to `compute_dtype` (others unchanged).

        Args:
            x: A pytree of arrays (the images).

        Returns:
            The cast tree.
        """
        return jax.tree.map(lambda a: a.astype(self.compute_dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, x)

    def cast_outputs(self, y: Any) -> Any:
        """Cast the floating leaves of `y` to `output_dtype` (others unchanged).

        Args:
            y: A pytree of arrays (the model's outputs).

        Returns:
            The cast tree.
        """
        return jax.tree.map(lambda a: a.astype(self.output_dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, y)


class LossScale(struct.PyTreeNode):
    """Dynamic loss scale: halve on non-finite gradients (the step is skipped), double after
    `period` finite steps in a row. A pytree kept in the `TrainState`.

    Attributes:
        scale: float32 scalar, the current scale.
        good_steps: int32 scalar, finite steps since the last change.
        period: Finite steps before the scale grows (static).
        factor: The growth and shrink factor (static).
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)

    @classmethod
    def create(cls, initial: float = 2.0 ** 15, period: int = 2000,
               factor: float = 2.0) -> "LossScale":
        """A loss scale at its initial value.

        Args:
            initial: The starting scale.
            period: Finite steps before the scale grows.
            factor: The growth and shrink factor.

        Returns:
            The `LossScale`.
        """
        return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period, factor)

    def update(self, grads_finite: jax.Array) -> "LossScale":
        """The scale after one step: divided by `factor` (not below 1) when the gradients were
        non-finite, multiplied by it after `period` finite steps in a row.

        Args:
            grads_finite: bool scalar, whether this step's gradients were finite.

        Returns:
            The updated `LossScale`.
        """
        grow = grads_finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(grads_finite, jnp.where(grow, self.scale * self.factor, self.scale),
                          jnp.maximum(self.scale / self.factor, 1.0))
        good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good)
