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
On XLA:CPU the transposed convolutions that jax's backward pass emits miss the fast
convolution path inside a loop body (not outside), so `loop_conv` writes them in NHWC/HWIO
there: gradients equal to rounding, and the train step runs as fast as unscanned.
"""
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from jax import lax

from flaxbones.layers.cpu_conv import _explicit_padding, _is_plain_nhwc, conv_general_dilated

BODY = "block"


class _Step(nn.Module):
    """One scan step: the block (a constructor taking `name`) applied to the carry.
    `tapped` blocks return (out, tap); the tap is dropped."""

    block: Callable[..., nn.Module]
    tapped: bool = False

    @nn.compact
    def __call__(self, x, _):
        y = self.block(name=BODY)(x)
        return (y[0] if self.tapped else y), None


def scan_repeat(block: Callable[..., nn.Module], length: int, name: str,
                tapped: bool = False) -> nn.Module:
    """A module applying `block` `length` times in an `nn.scan` (parameters, batch
    statistics and rngs per block); call it as `module(x)`."""
    scanned = nn.scan(_Step, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True, "dropout": True}, length=length)
    step = scanned(block, tapped, name=name)
    return lambda x: step(x, None)[0]


_NHWC = ("NHWC", "HWIO", "NHWC")


def loop_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                              precision=None, **kwargs):
    """The library's convolution (`layers.cpu_conv`); on CPU a stride-1 ungrouped NHWC one
    with a spatial kernel gets a backward pass in NHWC/HWIO convolutions (see above)."""
    dilation = tuple(rhs_dilation or (1, 1))
    if (jax.default_backend() == "cpu" and feature_group_count == 1 and not kwargs
            and lhs.ndim == 4 and rhs.shape[:2] != (1, 1) and tuple(window_strides) == (1, 1)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and _is_plain_nhwc(lhs, rhs, dimension_numbers)):
        pads = _explicit_padding(padding, lhs, rhs, (1, 1), dilation)
        return _nhwc_conv(lhs, rhs, pads, dilation, precision)
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision, **kwargs)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nhwc_conv(x, w, padding, dilation, precision):
    return lax.conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)


def _nhwc_conv_fwd(x, w, padding, dilation, precision):
    return _nhwc_conv(x, w, padding, dilation, precision), (x, w)


def _nhwc_conv_bwd(padding, dilation, precision, res, g):
    """dx: g correlated with the flipped, in/out-swapped kernel; dw: x correlated with g,
    batch and channels swapped (strided by the dilation)."""
    x, w = res
    full = [(d * (k - 1) - lo, d * (k - 1) - hi) for d, k, (lo, hi) in zip(dilation, w.shape, padding)]
    dx = lax.conv_general_dilated(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), (1, 1), full,
                                  rhs_dilation=dilation, dimension_numbers=_NHWC,
                                  precision=precision)
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), dilation,
                                  padding, dimension_numbers=_NHWC, precision=precision)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_nhwc_conv.defvjp(_nhwc_conv_fwd, _nhwc_conv_bwd)


def loop_conv(conv: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`conv` (an `nn.Conv` constructor) for use inside a scanned block."""
    return partial(conv, conv_general_dilated=loop_conv_general_dilated)


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


def scan_variables(variables, model) -> dict:
    """`variables` of the unscanned form of `model` stacked into the scanned form."""
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


def unscan_variables(variables, model) -> dict:
    """`variables` of the scanned form of `model` split into the unscanned form."""
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
