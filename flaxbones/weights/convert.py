"""Convert a torch state dict onto an `eval_shape`d flax variable tree, all or nothing."""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_MAX_LISTED = 10
# A rule template that drops the source keys its pattern matches (whole keys, leaf included):
# constant buffers the model recomputes (Swin's `attn.relative_position_index`).
DROP = "<drop>"


@dataclasses.dataclass
class LoadReport:
    """What a load did: leaves (`'params/backbone/...'`) taken from the file or checkpoint,
    leaves that kept their values (a skipped head, the parts a `transfer` leaves alone),
    and source keys dropped deliberately (a mismatched head's, with `skip_head`)."""

    loaded: list[str]
    skipped: list[str]
    ignored_keys: list[str]


def map_module_path(module: str, rules) -> str | None:
    """The flax module path for a torch module path: the first rule that matches it whole."""
    for pattern, template in rules:
        m = None if template == DROP else re.fullmatch(pattern, module)
        if m:
            return m.expand(template)
    return None


# Source leaf names read as others: torch's nn.MultiheadAttention packed projection, and
# timm's ViT names for torchvision's class token and position embedding.
_LEAF_ALIASES = {"in_proj_weight": "weight", "in_proj_bias": "bias",
                 "cls_token": "class_token", "pos_embed": "pos_embedding"}


def _leaf(torch_leaf: str, leaves: dict) -> tuple[str, str] | None:
    """(collection, name) of the flax leaf that a torch leaf fills in a module with `leaves`."""
    params = leaves.get("params", {})
    if torch_leaf not in params and torch_leaf in _LEAF_ALIASES:
        torch_leaf = _LEAF_ALIASES[torch_leaf]
    if torch_leaf == "weight":
        for name in ("kernel", "scale", "embedding"):
            if name in params:
                return "params", name
    if torch_leaf == "bias" and "bias" in params:
        return "params", "bias"
    if torch_leaf == "running_mean":
        return "batch_stats", "mean"
    if torch_leaf == "running_var":
        return "batch_stats", "var"
    if torch_leaf == "gamma" and "layer_scale" in params:  # timm's name for a layer scale
        return "params", "layer_scale"
    if torch_leaf in params:  # a bare nn.Parameter (SSD's `scale_weight`): the same name
        return "params", torch_leaf
    return None


def _to_flax_layout(value: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if name == "kernel" and value.ndim == 4 and ndim == 2 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0].T  # a 1x1 conv onto a dense (timm's conv-MLP ConvNeXts)
    if name == "kernel" and value.ndim == 4:  # conv OIHW -> HWIO (groups stay in I)
        return value.transpose(2, 3, 1, 0)
    if name == "kernel" and value.ndim == 2:  # dense (out, in) -> (in, out)
        return value.T
    if name == "layer_scale":  # torchvision's (C, 1, 1) per-channel scale -> (C,)
        return value.reshape(-1)
    return value


def _to_torch_layout(value: np.ndarray, name: str, shape: tuple) -> np.ndarray:
    """The inverse of `_to_flax_layout`: a flax leaf laid out as a torch tensor of `shape`."""
    if name == "kernel" and len(shape) == 4 and value.ndim == 2 and shape[2:] == (1, 1):
        return value.T[:, :, None, None]
    if name == "kernel" and len(shape) == 4 and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if name == "kernel" and len(shape) == 2 and value.ndim == 2:
        return value.T
    if name == "layer_scale" and value.size == np.prod(shape):
        return value.reshape(shape)
    return value


def _index_modules(flat_target):
    modules: dict[str, dict] = {}
    for key, leaf in flat_target.items():
        collection, *path, name = key.split("/")
        modules.setdefault("/".join(path), {}).setdefault(collection, {})[name] = leaf
    return modules


def convert_state_dict(state: dict, target: dict, rules, skip_prefixes=()) -> tuple[dict, LoadReport]:
    """Map `state` (torch key -> array) onto `target` (flax variables or their shapes).

    Returns (variables holding exactly the converted leaves, report). Raises a ValueError
    listing the first missing, unexpected and mis-shaped keys unless every target leaf
    outside `skip_prefixes` is filled exactly once and every source key is used; leaves
    under `skip_prefixes` that are absent or mis-shaped are reported as skipped instead.
    """
    flat_target = traverse_util.flatten_dict(target, sep="/")
    modules = _index_modules(flat_target)
    filled, unexpected, mismatched, ignored = {}, [], [], []

    def skipped(flax_key):
        return any(flax_key.split("/", 1)[1].startswith(p) for p in skip_prefixes)

    dropped = [pattern for pattern, template in rules if template == DROP]
    for key, value in state.items():
        module, _, torch_leaf = key.rpartition(".")
        if torch_leaf == "num_batches_tracked" or any(re.fullmatch(p, key) for p in dropped):
            continue
        path = map_module_path(module, rules)
        leaf = _leaf(torch_leaf, modules[path]) if path in modules else None
        if leaf is None:
            unexpected.append(key)
            continue
        flax_key = f"{leaf[0]}/{path}/{leaf[1]}"
        want = flat_target.get(flax_key)
        if want is None:
            unexpected.append(key)
            continue
        value = _to_flax_layout(np.asarray(value), leaf[1], len(want.shape))
        if flax_key in filled:
            raise ValueError(f"two source keys map onto {flax_key} (the last was {key!r})")
        if tuple(value.shape) != tuple(want.shape):
            (ignored if skipped(flax_key) else mismatched).append(
                f"{key} {tuple(value.shape)} -> {flax_key} {tuple(want.shape)}")
            continue
        filled[flax_key] = jnp.asarray(value, dtype=want.dtype)

    missing = [k for k in flat_target if k not in filled]
    skipped_keys = [k for k in missing if skipped(k)]
    missing = [k for k in missing if not skipped(k)]
    if missing or unexpected or mismatched:
        raise ValueError("weights do not match the model; nothing was loaded.\n" + "\n".join(
            _listing(title, items) for title, items in (
                ("missing in the file", missing), ("unexpected in the file", unexpected),
                ("shape mismatch", mismatched)) if items))
    report = LoadReport(loaded=sorted(filled), skipped=skipped_keys, ignored_keys=ignored)
    return traverse_util.unflatten_dict(filled, sep="/"), report


def _listing(title, items):
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}:\n" + "\n".join(f"    {i}" for i in items[:_MAX_LISTED]) + more
