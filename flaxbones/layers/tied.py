"""Recompute-in-backward that no backend can undo.

`jax.checkpoint` marks the recomputation with an optimisation barrier, which XLA:CPU
expands before common-subexpression elimination: the recomputed forward is merged back
into the original one and the memory is not saved (a 20-block chain: 324 MiB plain,
400 MiB with jax.checkpoint). `tied_checkpoint` instead recomputes inside a custom VJP
whose inputs depend on the incoming cotangent (`x + 0 * ct[0]`), which no backend can
hoist or merge: 96 MiB on that chain, the same gradients on every backend. Used per block
(`remat_module`, lifted over Flax variables and RNGs) by `ConvNormModule.block_def` when
a model's `remat` is set; the CPU depthwise convolution's backward ties its inputs alike.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import lift


def _first_inexact(tree):
    return next((leaf for leaf in jax.tree.leaves(tree)
                 if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and jnp.size(leaf)), None)


def tied_checkpoint(fun, tied_argnums=None):
    """`fun` (arrays -> arrays) that saves only its inputs and recomputes itself in the
    backward pass, after the output cotangent exists: the inputs in `tied_argnums` (all
    by default) get `0 * ct[0]` added. `fun` is traced once, so anything stateful in
    tracing (Flax's RNG counters) is replayed exactly. A non-finite first cotangent
    entry makes the recomputation, and so the gradients, non-finite too."""

    def call(*args):
        pure, consts = jax.closure_convert(fun, *args)
        tied = range(len(args)) if tied_argnums is None else tied_argnums
        return _tied(pure, frozenset(tied))(*args, *consts)

    return call


def _tied(pure, tied):
    @jax.custom_vjp
    def wrapped(*args):
        return pure(*args)

    def forward(*args):
        return pure(*args), args

    def backward(args, cotangent):
        anchor = _first_inexact(cotangent)
        if anchor is not None:
            zero = jnp.ravel(anchor)[0] * 0
            args = [jax.tree.map(lambda a: a + zero.astype(a.dtype)
                                 if jnp.issubdtype(a.dtype, jnp.inexact) else a, arg)
                    if i in tied else arg for i, arg in enumerate(args)]
        return jax.vjp(pure, *args)[1](cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


def _lifted_checkpoint(fn, policy=None, variables=True, rngs=True):
    """Flax's lifted `checkpoint` around `tied_checkpoint` (`policy` None) or
    `jax.checkpoint(policy=...)`: variables (BatchNorm statistics included) and RNGs flow
    through unchanged; arguments that are not arrays (a `train` flag) stay static."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

        def rematted(variable_groups, rng_groups, *arrays):
            it = iter(arrays)
            call_args, call_kwargs = treedef.unflatten(
                [next(it) if a else leaf for a, leaf in zip(is_array, leaves)])
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *call_args, **call_kwargs), repack_fn(scope)

        arrays = [leaf for a, leaf in zip(is_array, leaves) if a]
        if policy is None:
            rematted = tied_checkpoint(rematted, range(2, 2 + len(arrays)))
        else:
            rematted = jax.checkpoint(rematted, policy=policy, prevent_cse=True)
        return rematted(variable_groups, rng_groups, *arrays)

    return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat",
                     enable_kwargs=True)


@functools.cache
def _remat_class(target, policy):
    return nn.transforms.lift_transform(_lifted_checkpoint, target, policy=policy)


def remat_module(block, policy=None):
    """`block` (a Module class, or a `functools.partial` of one) whose `__call__` keeps
    only its inputs and recomputes itself backwards: with `tied_checkpoint`, or with
    `jax.checkpoint` under a `jax.checkpoint_policies` `policy` (undone on XLA:CPU).
    Variable paths, RNG streams and BatchNorm updates are those of `block`."""
    if isinstance(block, functools.partial):
        return functools.partial(remat_module(block.func, policy), *block.args, **block.keywords)
    return _remat_class(block, policy)
