"""Device mesh, sharding rules as data, and global batches from per-host arrays."""
import re
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flaxbones.scan import is_stacked

# (regex on a leaf's path, PartitionSpec): the first rule whose spec fits the leaf wins,
# anything unmatched is replicated. Paths look like "params/backbone/layer1_0/conv1/kernel".
# Rules describe the unrolled leaf: a leaf stacked by scan (`flaxbones.scan.is_stacked`)
# gets the spec of one block behind its unsharded leading block axis.
Rules = Sequence[tuple[str, P]]

# Fully-sharded data parallel: kernels split on their output channels over "fsdp".
FSDP_RULES: Rules = (
    (r"kernel$", P(None, None, None, "fsdp")),  # conv HWIO
    (r"kernel$", P(None, "fsdp")),              # dense (in, out)
)
"""Fully-sharded data parallel rules: conv (HWIO) and dense (in, out) kernels split on
their output channels over the mesh axis "fsdp"; everything else replicated. Pass them to
`create_train_state`, `state_shardings` or `tree_shardings` as `rules`."""


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh with axes ("data",), or ("data", "fsdp") when `fsdp` > 1.

    Spans all hosts' devices: make the same call on every process.

    Args:
        data: Size of the data-parallel axis; -1 takes every device `fsdp` leaves.
        fsdp: Size of the fully-sharded axis (parameters split over it by `FSDP_RULES`).
        devices: The devices to lay out; None takes `jax.devices()`.

    Returns:
        The `jax.sharding.Mesh`, of `data` x `fsdp` devices.

    Raises:
        ValueError: `fsdp` does not divide the device count, or `data` x `fsdp` is not
            the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    shape, names = ((data, fsdp), ("data", "fsdp")) if fsdp > 1 else ((data,), ("data",))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def path_str(path) -> str:
    """A key path as "a/b/0/c" (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _fits(spec: P, shape, mesh: Mesh) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"sharding rule {spec} names mesh axes {unknown} that the mesh "
                             f"{tuple(mesh.axis_names)} lacks")
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            return False
    return True


def spec_for(path: str, shape, mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec the rules give one leaf (replicated when none fits); a stacked
    leaf's is P(None, *the spec of one block)."""
    if is_stacked(path):
        return P(None, *_rule_spec(path, shape[1:], mesh, rules))
    return _rule_spec(path, shape, mesh, rules)


def _rule_spec(path, shape, mesh, rules) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path) and _fits(spec, shape, mesh):
            return spec
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """NamedShardings for every leaf of `tree` by `rules`.

    A leaf takes the first rule whose regex matches its path ("params/backbone/.../kernel")
    and whose PartitionSpec divides its shape; anything unmatched is replicated. A leaf
    stacked by `flaxbones.scan` gets the spec of one block behind its leading block axis.

    Args:
        tree: A pytree of arrays or `jax.ShapeDtypeStruct`s (a train state, variables).
        mesh: The mesh the shardings live on.
        rules: (regex on a leaf's path, PartitionSpec) pairs, e.g. `FSDP_RULES`.

    Returns:
        A tree of the same structure with a `NamedSharding` per leaf.

    Raises:
        ValueError: A matching rule names a mesh axis the mesh lacks.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), np.shape(x), mesh, rules)), tree)


def batch_spec(mesh: Mesh) -> P:
    """The batch axis is split over every mesh axis (data, and fsdp when present)."""
    return P(tuple(mesh.axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a global batch: its leading axis split over every mesh axis.

    Args:
        mesh: The training mesh.

    Returns:
        `NamedSharding(mesh, P(mesh.axis_names))`.
    """
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch, num_shards: int, where: str = "global batch", scale: int = 1):
    """Every leaf shares one leading batch size; that size x `scale` (the process count,
    for a host's slice) is divisible by `num_shards`. Returns the leading size."""
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        shapes = jax.tree.map(np.shape, batch)
        raise ValueError(f"every entry of the batch needs the same leading batch size; got {shapes}")
    (size,) = sizes
    if size * scale % num_shards:
        raise ValueError(f"{where} of {size * scale} examples is not divisible by the "
                         f"{num_shards} data shards; pad it (flaxbones.train.pad_batch) or "
                         "change the size")
    return size


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Per-host numpy batch -> global jax.Arrays sharded on the batch axis.

    Each process passes its own slice (same size on every host); the global batch is
    their concatenation in process order (`jax.make_array_from_process_local_data`).

    Args:
        batch: A pytree (dict) of this host's arrays, sharing one leading batch size.
        mesh: The training mesh.

    Returns:
        The same tree of global `jax.Array`s with `batch_sharding(mesh)`.

    Raises:
        ValueError: The leaves differ in leading size, or the global batch does not
            divide by the mesh's device count (pad it with `pad_batch`).
    """
    sharding = batch_sharding(mesh)
    check_batch(batch, int(np.prod(list(mesh.shape.values()))), scale=jax.process_count())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        batch)


def pad_batch(batch: Mapping[str, Any], multiple: int) -> dict[str, np.ndarray]:
    """Pad the batch axis up to a multiple, adding or extending a 0/1 'valid' entry.

    The padding examples are zeros with valid 0, so a last partial batch runs through the
    same compiled step and drops out of every loss and metric.

    Args:
        batch: A dict of host arrays sharing one leading batch size; its 'valid' entry,
            if any, is kept for the real examples.
        multiple: The batch size to pad up to a multiple of (e.g. the device count).

    Returns:
        A new dict with the padded arrays and 'valid' float32 (N_padded,).

    Raises:
        ValueError: The entries differ in leading size.
    """
    size = check_batch(batch, 1)
    pad = -size % multiple
    valid = np.asarray(batch.get("valid", np.ones((size,), np.float32)), np.float32)
    out = {k: v for k, v in batch.items() if k != "valid"}
    out["valid"] = valid
    if pad == 0:
        return out
    return {k: np.concatenate([np.asarray(v), np.zeros((pad,) + np.shape(v)[1:], np.asarray(v).dtype)])
            for k, v in out.items()}
