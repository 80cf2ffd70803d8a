"""Scan over identical blocks (`scan_blocks=True`): one compiled block body per group
instead of one per block, and the conversion of variable trees between the two forms.

A backbone that supports scanning declares `scan_groups()`: {scanned module name:
[unscanned block names]}. The scanned module holds the block as its child `block`, each
leaf stacked along a new leading axis in block order, so `layer3_scan/block/conv1/kernel[k]`
is `layer3_{k + 1}/conv1/kernel`. `scan_variables` / `unscan_variables` convert full
variable dicts ({'params', 'batch_stats', ...}) of a backbone or of a model holding one as
`backbone` (Classifier, Segmenter), whichever form the given model has.

A training checkpoint keeps the form it was saved in: load it in that form
(`load_pretrained(None, directory)`), convert, and save or `transfer` in the other.
Scanned blocks build their convs with `layers.cpu_conv.loop_conv` (XLA:CPU's backward
convolutions inside a loop body; see there).
"""
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util


BODY = "block"
# A scanned module's body: its leaves carry the leading block axis ("layer3_scan/block/",
# "blocks_middle/block/"); no unscanned module is named `block`.
STACKED = re.compile(rf"(?:^|/)[^/]+/{BODY}/")


def is_stacked(path: str) -> bool:
    """Whether the leaf at `path` ("params/backbone/layer3_scan/block/conv1/kernel", any
    prefix) is stacked along a leading block axis by `scan_repeat`."""
    return STACKED.search(path) is not None


class _Step(nn.Module):
    """One scan step: the block (a constructor taking `name`) applied to the carry, and to
    this step's entry of `per_step` when given. `tapped` blocks return (out, tap); the tap
    is dropped."""

    block: Callable[..., nn.Module]
    tapped: bool = False
    stepped: bool = False

    @nn.compact
    def __call__(self, x, per_step):
        block = self.block(name=BODY)
        y = block(x, per_step) if self.stepped else block(x)
        return (y[0] if self.tapped else y), None


def scan_repeat(block: Callable[..., nn.Module], length: int, name: str,
                tapped: bool = False, per_step=None) -> nn.Module:
    """A module applying `block` `length` times in an `nn.scan` (parameters, batch
    statistics and rngs per block); call it as `module(x)`. `per_step` (length, ...), when
    given, is the block's second argument, one entry per step (e.g. drop-path rates)."""
    scanned = nn.scan(_Step, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True, "dropout": True}, length=length)
    step = scanned(block, tapped, per_step is not None, name=name)
    return lambda x: step(x, per_step)[0]


def _groups(model) -> tuple[str, dict[str, list[str]]]:
    backbone = getattr(model, "backbone", None)
    prefix = "backbone/" if isinstance(backbone, nn.Module) else ""
    backbone = backbone if prefix else model
    if not hasattr(backbone, "scan_groups"):
        raise ValueError(f"{type(backbone).__name__} does not support scan_blocks")
    return prefix, backbone.scan_groups()


def _flat(variables) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(variables), sep="/")


def _under(flat, module):
    """{suffix: leaf} of the leaves of `module` ('collection/module/...' keys)."""
    out = {}
    for key, leaf in flat.items():
        collection, _, rest = key.partition("/")
        if rest.startswith(module + "/"):
            out[f"{collection}/{rest[len(module) + 1:]}"] = leaf
    return out


def _key(suffix, module):
    collection, _, rest = suffix.partition("/")
    return f"{collection}/{module}/{rest}"


def scan_variables(variables: Mapping[str, Any], model: nn.Module) -> dict:
    """`variables` of the unscanned form of `model` stacked into the scanned form.

    Each group's per-block leaves (`layer3_1/...`, `layer3_2/...`) become one leaf with a
    leading block axis under `<group>/block/`, in block order.

    Args:
        variables: A full variable dict ({'params', 'batch_stats', ...}) of the unscanned form.
        model: The model the variables belong to, in either form: a backbone, or a model
            holding one as `backbone` (Classifier, Segmenter); its `scan_groups()` names
            the blocks.

    Returns:
        A new variable dict in the scanned form (the input is not modified).

    Raises:
        ValueError: The backbone does not support `scan_blocks`, or the variables are not
            an unscanned tree of this model (blocks missing, already scanned, or blocks that differ
            in variables or shapes).
    """
    prefix, groups = _groups(model)
    flat = _flat(variables)
    for scanned, names in groups.items():
        parts = [_under(flat, prefix + n) for n in names]
        if _under(flat, prefix + scanned):
            raise ValueError(f"variables already hold {prefix + scanned!r}: already scanned?")
        for name, part in zip(names, parts):
            if not part:
                raise ValueError(f"variables have no {prefix + name!r} to scan into "
                                 f"{prefix + scanned!r}: not an unscanned tree of this model")
            if part.keys() != parts[0].keys():
                raise ValueError(f"{prefix + name!r} and {prefix + names[0]!r} hold different "
                                 "variables; they cannot be stacked")
        for suffix in parts[0]:
            shapes = {p[suffix].shape for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"{suffix} differs in shape across {names}: {shapes}")
            flat[_key(suffix, f"{prefix}{scanned}/{BODY}")] = jnp.stack([p[suffix] for p in parts])
        for name, part in zip(names, parts):
            for suffix in part:
                del flat[_key(suffix, prefix + name)]
    return traverse_util.unflatten_dict(flat, sep="/")


def unscan_variables(variables: Mapping[str, Any], model: nn.Module) -> dict:
    """`variables` of the scanned form of `model` split into the unscanned form.

    The inverse of `scan_variables`: entry k of each stacked leaf becomes block k + 1's.

    Args:
        variables: A full variable dict ({'params', 'batch_stats', ...}) of the scanned form.
        model: The model the variables belong to, in either form: a backbone, or a model
            holding one as `backbone` (Classifier, Segmenter); its `scan_groups()` names
            the blocks.

    Returns:
        A new variable dict in the unscanned form (the input is not modified).

    Raises:
        ValueError: The backbone does not support `scan_blocks`, or the variables are not
            a scanned tree of this model (blocks missing, already unscanned, or blocks that differ
            in variables or shapes).
    """
    prefix, groups = _groups(model)
    flat = _flat(variables)
    for scanned, names in groups.items():
        body = f"{prefix}{scanned}/{BODY}"
        part = _under(flat, body)
        if not part:
            raise ValueError(f"variables have no {body!r} to unscan: not a scanned tree of "
                             "this model")
        for suffix, leaf in part.items():
            if leaf.ndim == 0 or leaf.shape[0] != len(names):
                raise ValueError(f"{_key(suffix, body)} has shape {leaf.shape}; expected a "
                                 f"leading axis of {len(names)} blocks")
            for k, name in enumerate(names):
                key = _key(suffix, prefix + name)
                if key in flat:
                    raise ValueError(f"variables already hold {key!r}: mixed forms?")
                flat[key] = leaf[k]
            del flat[_key(suffix, body)]
    return traverse_util.unflatten_dict(flat, sep="/")
