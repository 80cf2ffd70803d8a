"""`save_weights`: variables out to `.safetensors`, in flaxbones' own layout (loads back with
no other input) or as the state dict of the torchvision / timm reference model."""
import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from flaxbones.registry import get_spec
from flaxbones.weights.io import DIGEST, LAYOUT, encode_kwargs, file_digest
from flaxbones.weights.load import abstract_variables, check_variables


def save_weights(variables: Mapping[str, Any], path: str | os.PathLike, model: str | None = None,
                 layout: str = "flax", *,
                 model_kwargs: dict | None = None, metadata: dict | None = None) -> pathlib.Path:
    """Write `variables` of `fb.create_model(model, **model_kwargs)` to a `.safetensors` file.

    Never pickle. `layout="flax"`: every leaf under its `/`-joined path
    ('params/backbone/conv1/kernel', 'batch_stats/...') in its own dtype (bf16 stays
    bf16), scanned trees as they are. With `model` given the variables are checked
    against the model first, and the metadata holds the model name and kwargs and its
    weights' normalisation (mean, std, input_size), so `fb.load_pretrained(None, path)`
    rebuilds both.

    `layout="torch"`: the exact state dict of the reference model
    (`flaxbones.weights.torch_reference(model, **model_kwargs)`: torchvision's or timm's
    keys, OIHW kernels, float32, `num_batches_tracked` as int64 zeros), for
    `torch_model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.
    Scanned variables are unscanned. The write is atomic: a temporary file beside
    `path`, fsynced, then renamed over it; on any error nothing changes at `path`.

    Args:
        variables: The model's variable dict ({'params', 'batch_stats', ...}), on any
            device.
        path: The file to write; its suffix must be `.safetensors`.
        model: The registered model name the variables belong to; required for
            `layout="torch"`.
        layout: 'flax' (flaxbones' own paths) or 'torch' (the reference state dict).
        model_kwargs: The `create_model` options the variables were made with.
        metadata: Extra str -> str entries for the file's metadata.

    Returns:
        The path written.

    Raises:
        ValueError: The suffix is not `.safetensors`, `layout` is unknown,
            `model_kwargs` holds `name` / `parent`, `layout="torch"` has no `model` or
            kwargs the reference cannot express, the variables do not match the model,
            or a `metadata` key is one of flaxbones' own.
        TypeError: `model` is not a str, or `metadata` is not str -> str.
    """
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_weights writes .safetensors files only, not {path.name!r}")
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a registered name (fb.list_models()), got "
                        f"{type(model).__name__}; pass its create_model kwargs as model_kwargs")
    model_kwargs = dict(model_kwargs or {})
    if {"name", "parent"} & model_kwargs.keys():
        raise ValueError("model_kwargs cannot hold Flax's name= or parent=")
    header = _metadata(model, model_kwargs, layout, metadata)
    if layout == "torch":
        if model is None:
            raise ValueError("layout='torch' needs the model name (model=...)")
        from flaxbones.weights.reference import torch_state_dict
        tensors = torch_state_dict(variables, model, **model_kwargs)
    else:
        flat = traverse_util.flatten_dict(dict(jax.device_get(variables)), sep="/")
        tensors = {k: np.ascontiguousarray(v) for k, v in flat.items()}
        if model is not None:
            check_variables(tensors, abstract_variables(model, model_kwargs),
                            f"the variables of {model!r}", "nothing was written")
    header[DIGEST] = file_digest(tensors, header)
    _write_atomic(tensors, path, header)
    return path


def _metadata(model, model_kwargs, layout, extra) -> dict[str, str]:
    from flaxbones import __version__
    header = {"format": "flax" if layout == "flax" else "pt", LAYOUT: layout,
              "flaxbones_version": __version__}
    if model is not None:
        source = get_spec(model).weights
        header.update(model=model, model_kwargs=encode_kwargs(model_kwargs))
        if source is not None:
            header.update(mean=json.dumps(list(source.mean)), std=json.dumps(list(source.std)),
                          input_size=str(source.input_size))
        if layout == "torch":
            from flaxbones.weights.reference import reference_name
            header["reference"] = ":".join(reference_name(model))
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key in header or key == DIGEST:
            raise ValueError(f"metadata key {key!r} is flaxbones' own")
        header[key] = value
    return header


def _write_atomic(tensors: dict, path: pathlib.Path, metadata: dict):
    """`tensors` to a temporary file beside `path`, flushed to disk, renamed onto `path`."""
    from safetensors.numpy import save_file
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask's permissions
    try:
        save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, where the platform allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
