"""Rematerialisation per block: keep only block inputs, recompute the rest backwards,
with `layers.tied.tied_checkpoint` (which, unlike `jax.checkpoint`, really drops the
activations on XLA:CPU) lifted over Flax variables and RNGs.
"""
import dataclasses
import functools

import jax
import numpy as np
from flax import linen as nn
from flax.core import lift

from flaxbones.layers.tied import tied_checkpoint


def _lifted_tied_checkpoint(fn, variables=True, rngs=True):
    """Flax's lifted `checkpoint` with `tied_checkpoint` in place of `jax.checkpoint`:
    variables (BatchNorm statistics included) and RNGs flow through unchanged; arguments
    that are not arrays (a `train` flag) are static."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
        leaves, treedef = jax.tree.flatten(args)
        is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

        def rematted(variable_groups, rng_groups, *arrays):
            it = iter(arrays)
            call_args = treedef.unflatten([next(it) if a else leaf
                                           for a, leaf in zip(is_array, leaves)])
            scope = scope_fn(variable_groups, rng_groups)
            y = fn(scope, *call_args, **kwargs)
            return y, repack_fn(scope)

        arrays = [leaf for a, leaf in zip(is_array, leaves) if a]
        activations = range(2, 2 + len(arrays))
        return tied_checkpoint(rematted, activations)(variable_groups, rng_groups, *arrays)

    return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat",
                     enable_kwargs=True)


def tied_remat(target: type[nn.Module]) -> type[nn.Module]:
    """A Module class whose `__call__` is rematerialised with `tied_checkpoint`."""
    return nn.transforms.lift_transform(_lifted_tied_checkpoint, target)


def remat_blocks(module: nn.Module, policy=None) -> nn.Module:
    """A clone of `module` whose block classes (fields holding a Module class, such as
    ResNet's `block`) are rematerialised, recursing into sub-module fields. Variable
    paths are unchanged, so checkpoints and weights still load.

    With `policy=None` every block keeps only its inputs (`tied_remat`: effective on
    every backend, CPU included). A `jax.checkpoint_policies` policy uses `nn.remat`
    instead, for what the policy saves; XLA:CPU undoes that remat (see the module).
    """
    wrap = tied_remat if policy is None else functools.partial(nn.remat, policy=policy)
    changes = {}
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name)
        if isinstance(value, type) and issubclass(value, nn.Module):
            changes[field.name] = wrap(value)
        elif isinstance(value, nn.Module):
            changes[field.name] = remat_blocks(value, policy)
    return module.clone(**changes)
