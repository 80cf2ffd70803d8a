"""Serialised inference programs: `export` lowers a model's eval-mode `apply` with `jax.export`
to one StableHLO artifact for CPU, CUDA and TPU, which `jax.export.deserialize(data).call`
runs with only JAX installed; `load_exported` reads one back. (The module is not named
`export` so that the function `flaxbones.export` does not shadow it.)"""
import dataclasses
import inspect
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import export as jax_export
from jax.typing import DTypeLike

PLATFORMS = ("cpu", "cuda", "tpu")


def lax_kernels(module: nn.Module) -> nn.Module:
    """`module` with `cpu_kernels=False` wherever its tree sets True.

    Its fields, and module-valued fields recursively: the same variables, lax's
    convolutions and max-pooling instead of the XLA:CPU rewrites (`layers.cpu_conv`), so
    every backend compiles it natively.

    Args:
        module: Any flaxbones Linen module (unbound).

    Returns:
        A clone with the rewrites off, or `module` itself when it has none.
    """
    updates = {}
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name") or not field.init:
            continue
        value = getattr(module, field.name)
        swapped = _swap(value)
        if swapped is not value:
            updates[field.name] = swapped
    if getattr(module, "cpu_kernels", None) is True:
        updates["cpu_kernels"] = False
    return module.clone(**updates) if updates else module


def _swap(value):
    if isinstance(value, nn.Module):
        return lax_kernels(value)
    if isinstance(value, (tuple, list)):
        items = [_swap(v) for v in value]
        changed = any(a is not b for a, b in zip(items, value))
        return type(value)(items) if changed else value
    return value


def _is_detector(model) -> bool:
    return "image_sizes" in inspect.signature(type(model).__call__).parameters


def _batch_dim(batch):
    if batch == "dynamic":
        return jax_export.symbolic_shape("batch")[0]
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        return batch
    raise ValueError(f"batch must be 'dynamic' (one program for every batch size) or a "
                     f"positive int (a fixed batch size), got {batch!r}")


def _check_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is not None and len(shape) == 4:
        raise ValueError(f"input_shape is one image's (height, width, channels), got "
                         f"{input_shape!r}: give the batch size as batch=")
    if (shape is None or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, "
                         f"got {input_shape!r}")
    return shape


def export(model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int],
           batch: str | int = "dynamic", *, platforms: Sequence[str] = PLATFORMS,
           embed_weights: bool = True, dtype: DTypeLike = jnp.float32,
           path: str | os.PathLike | None = None) -> bytes:
    """`model.apply(variables, images, train=False)` as a serialised `jax.export` artifact.

    The program takes (batch, H, W, C) images of `dtype`, normalised as the model
    expects. Detectors (models whose call takes `image_sizes`) take
    `(images, image_sizes)`, image_sizes (batch, 2) int32, and return their fixed-size
    padded detections. The outputs are the model's dict.

    With `embed_weights` (default) the variables are constants of the program:
    `jax.export.deserialize(data).call(images)`; XLA then compiles them in, which costs
    the consumer's first call a few seconds per 100 MB of weights on a CPU. Otherwise
    they are its first argument, `call(variables, images)`, a tree of the same structure
    and shapes.

    A model built with the CPU kernel rewrites (`cpu_kernels=True`, the default on a CPU
    host) is exported as its `lax_kernels` clone: the same weights and sums, with lax's
    convolutions and pooling that every backend runs natively.

    Args:
        model: The flaxbones Linen module to export.
        variables: Its variable dict (with 'params'), as `init` or `fb.load_pretrained`
            return it; 'intermediates' are dropped.
        input_shape: One image's (height, width, channels), positive ints.
        batch: "dynamic" for a symbolic batch size (one program for every size), or a
            positive int to fix it.
        platforms: The platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu'), from any
            host.
        embed_weights: Bake the variables into the program (else they are its first
            argument).
        dtype: The dtype of the image input.
        path: If given, the bytes are also written there atomically (a temporary file
            renamed).

    Returns:
        The serialised artifact (`jax.export.Exported.serialize()`).

    Raises:
        ValueError: `input_shape` is not three positive ints (a 4-tuple: give the batch
            as `batch=`), `batch` is neither "dynamic" nor a positive int, or
            `variables` has no 'params'.
        TypeError: `model` is not a Flax Linen module.
    """
    shape = _check_shape(input_shape)
    dim = _batch_dim(batch)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be the model's variable dict (with 'params'), "
                         "as `init` or `fb.load_pretrained` return it")
    model = lax_kernels(model)
    variables = {k: jax.tree.map(jnp.asarray, v) for k, v in variables.items()
                 if k != "intermediates"}  # what a detector's init sows is no state
    args = [jax.ShapeDtypeStruct((dim, *shape), dtype)]
    if _is_detector(model):
        args.append(jax.ShapeDtypeStruct((dim, 2), jnp.int32))

    def run(v, *inputs):
        return model.apply(v, *inputs, train=False)

    if embed_weights:
        fn = jax.jit(lambda *inputs: run(variables, *inputs))
    else:
        fn = jax.jit(run)
        args.insert(0, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables))
    exported = jax_export.export(fn, platforms=tuple(platforms))(*args)
    data = bytes(exported.serialize())
    if path is not None:
        _write_atomic(os.fspath(path), data)
    return data


def load_exported(source: bytes | bytearray | str | os.PathLike) -> jax_export.Exported:
    """A `jax.export.Exported` from `export`'s bytes or a file holding them.

    Call it with `.call(images)` (or `.call(variables, images)` without embedded
    weights).

    Args:
        source: The serialised bytes, or a path to a file holding them.

    Returns:
        The deserialised program.

    Raises:
        TypeError: `source` is neither bytes nor a path.
        ValueError: The bytes are not a `jax.export` artifact.
    """
    data = source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
    try:
        return jax_export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers raises assorted errors on foreign bytes
        raise ValueError(f"not a jax.export artifact ({len(data)} bytes): {e}") from e


def _write_atomic(path: str, data: bytes):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
