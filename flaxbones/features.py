"""The feature contract: FeatureInfo, output-stride planning, input checks."""
from typing import NamedTuple, Sequence

import jax.numpy as jnp

LEVELS = ("C1", "C2", "C3", "C4", "C5")


class FeatureInfo(NamedTuple):
    """One feature level a backbone returns (`backbone.feature_info` lists them, shallow first).

    Attributes:
        name: The level's name: 'C1'..'C5' (level Ck has nominal stride 2^k), or a
            backbone unit's name requested through `out_features`.
        stride: The actual stride of the map relative to the input (smaller than
            nominal under a dilated `output_stride`).
        channels: The map's channel count (its last axis, NHWC).
    """

    name: str
    stride: int
    channels: int


class StridePlan(NamedTuple):
    """How one strided unit runs under an output stride (torchvision semantics).

    `stride` is what the unit applies; `first_dilation` is the dilation of its first
    block (the previous dilation); `dilation` that of the blocks after it.
    """

    stride: int
    first_dilation: int
    dilation: int


def plan_output_stride(strides: Sequence[int], output_stride: int,
                       supported: Sequence[int] = (8, 16, 32)) -> list[StridePlan]:
    """Turn strided units into dilated ones once the running stride reaches `output_stride`.

    A unit that would push the stride past `output_stride` keeps stride 1 and multiplies
    the dilation by its stride instead, as torchvision's `replace_stride_with_dilation`
    and timm's `output_stride` do. Raises ValueError for an unsupported stride.
    """
    if output_stride not in supported:
        raise ValueError(
            f"output_stride={output_stride} is not supported; choose one of {tuple(supported)}")
    plans, current, dilation = [], 1, 1
    for stride in strides:
        previous = dilation
        if current * stride > output_stride:
            dilation *= stride
            stride = 1
        current *= stride
        plans.append(StridePlan(stride, previous, dilation))
    return plans


def halving_levels(plans: Sequence[StridePlan], channels: Sequence[int]):
    """C1, C2, ... of a network that halves its resolution once per level, the actual
    strides from `plans` (one per level)."""
    infos, stride = [], 1
    for k, (plan, width) in enumerate(zip(plans, channels)):
        stride *= plan.stride
        infos.append(FeatureInfo(f"C{k + 1}", stride, width))
    return infos


def select_features(infos: Sequence[FeatureInfo], out_features: Sequence[str] | None):
    """The FeatureInfos named by `out_features` (all when None), checked against `infos`."""
    if out_features is None:
        return tuple(infos)
    names = [i.name for i in infos]
    unknown = [n for n in out_features if n not in names]
    if unknown:
        raise ValueError(f"out_features {unknown} not produced by this backbone; it has {names}")
    return tuple(i for i in infos if i.name in out_features)


def check_images(x, channels: int = 3, min_size: int = 1):
    """Raise a ValueError naming the problem unless `x` is a float NHWC image batch."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"expected images of shape (N, H, W, {channels}) (NHWC), got shape {shape}")
    if shape[-1] != channels:
        raise ValueError(
            f"expected {channels} channels in the last axis (NHWC), got shape {tuple(shape)}; "
            "is the input NCHW?")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected float images (already normalised), got dtype {x.dtype}")
    if min(shape[1:3]) < min_size:
        raise ValueError(f"images of {shape[1]}x{shape[2]} are smaller than the "
                         f"{min_size}x{min_size} this model needs")


def sequence_taps(strides: Sequence[int], channels: Sequence[int], plans: Sequence[StridePlan],
                  out_features: Sequence[str] | None = None,
                  unit_names: Sequence[str] = ()) -> dict[str, tuple[int, FeatureInfo]]:
    """Where a backbone built as one flat sequence of units (torchvision's `features`) taps.

    Returns {name: (unit index, FeatureInfo)}. Level Ck is the output of the last unit whose
    nominal stride is 2^k; `plans` give the actual strides. A unit may also be requested by
    its name in `unit_names` (e.g. 'features_4') through `out_features`, for heads that tap
    a reference mid-stage; by default only the C-levels are returned.
    """
    nominal = actual = 1
    levels, units = {}, {}
    for i, (stride, width, plan) in enumerate(zip(strides, channels, plans)):
        nominal, actual = nominal * stride, actual * plan.stride
        level = f"C{nominal.bit_length() - 1}"
        if level in LEVELS:
            levels[level] = (i, FeatureInfo(level, actual, width))
        if i < len(unit_names):
            units[unit_names[i]] = (i, FeatureInfo(unit_names[i], actual, width))
    if out_features is None:
        return levels
    every = {**levels, **units}
    return {info.name: every[info.name]
            for info in select_features([info for _, info in every.values()], out_features)}
