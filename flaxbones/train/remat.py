"""Rematerialisation per block: keep only block inputs, recompute the rest backwards,
with `layers.tied.tied_checkpoint` (which, unlike `jax.checkpoint`, really drops the
activations on XLA:CPU) lifted over Flax variables and RNGs.
"""
import dataclasses
import functools
from collections.abc import Callable

from flax import linen as nn

from flaxbones.heads.classification import (ClassifierHead, FCHead, LayerNormHead,
                                            MobileNetV3Head)
from flaxbones.layers.module import ConvNormModule
from flaxbones.layers.tied import remat_module

tied_remat = functools.partial(remat_module, policy=None)

DENSE_HEADS = (ClassifierHead, FCHead, LayerNormHead, MobileNetV3Head)


def remat_blocks(module: nn.Module, policy: Callable[..., bool] | None = None) -> nn.Module:
    """A clone of `module` whose blocks keep only their inputs and recompute the rest.

    In the backward pass; outputs, gradients, BatchNorm statistics, dropout masks and
    variable paths (so checkpoints and weight files) are unchanged.

    Every `layers.ConvNormModule` in the tree (backbones, segmentation heads, GoogLeNet's
    aux head, FPN) is cloned with `remat` set, so it builds each block through
    `block_def`; composition modules (Classifier, Segmenter) are recursed into through
    their Module fields; another module's Module-class fields (an injected `block`) are
    wrapped. Left alone: the pool-then-dense classification heads (`DENSE_HEADS`:
    ClassifierHead, FCHead, LayerNormHead, MobileNetV3Head), whose activations are
    per-image vectors, nothing beside the feature maps.

    Args:
        module: A flaxbones model or backbone (unbound).
        policy: None: blocks use `tied_checkpoint` (effective on every backend, CPU
            included). A `jax.checkpoint_policies` policy uses `jax.checkpoint` instead,
            for what the policy saves; XLA:CPU undoes that remat (see `layers.tied`).

    Returns:
        The rematerialising clone.

    Raises:
        ValueError: A module in the tree is none of the above; its path is named rather
            than it being silently kept whole.
    """
    return _remat(module, True if policy is None else policy, type(module).__name__)


def _remat(module: nn.Module, mode, where: str) -> nn.Module:
    if isinstance(module, DENSE_HEADS):
        return module
    changes = {"remat": mode} if isinstance(module, ConvNormModule) else {}
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        if field.name in ("parent", "name") or value is None:
            continue
        if isinstance(value, nn.Module):
            changes[field.name] = _remat(value, mode, f"{where}.{field.name}")
        elif (isinstance(value, type) and issubclass(value, nn.Module)
              and not isinstance(module, ConvNormModule)):
            changes[field.name] = remat_module(value, None if mode is True else mode)
    if not changes:
        raise ValueError(
            f"train.remat_blocks cannot rematerialise {where} ({type(module).__name__}): it is "
            "not a layers.ConvNormModule (whose block_def wraps its blocks) and has no Module "
            "or Module-class field to wrap; build it on ConvNormModule or remat it yourself")
    return module.clone(**changes)
