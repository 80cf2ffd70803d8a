"""Rematerialisation per block: trade compute for activation memory."""
import dataclasses

from flax import linen as nn


def remat_blocks(module: nn.Module, policy=None) -> nn.Module:
    """A clone of `module` whose block classes (fields holding a Module class, such as
    ResNet's `block`) are wrapped in `nn.remat`, recursing into sub-module fields.
    Variable paths are unchanged, so checkpoints and weights still load."""
    changes = {}
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name)
        if isinstance(value, type) and issubclass(value, nn.Module):
            changes[field.name] = nn.remat(value, policy=policy)
        elif isinstance(value, nn.Module):
            changes[field.name] = remat_blocks(value, policy)
    return module.clone(**changes)
