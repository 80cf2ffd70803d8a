"""RoIAlign (torchvision.ops.roi_align's CPU kernel arithmetic op for op, FMAs and reciprocal
divisions blocked, so float32 results agree bit for bit on CPU) and torchvision's multi-scale
RoIAlign with the FPN level mapping, on NHWC features, static shapes.

Two ways to compute it (`method`): "gather" reads each sample's four taps (memory and work
grow with the number of rois only; its gradient is a scatter-add), "matmul" writes the
bilinear sampling of each roi as one (bins x rows) and one (bins x columns) weight matrix and
contracts the map with both (the same samples and weights, summed in another order; work
grows with rois x map area, gradients are matmuls). On small maps "matmul" is far faster on
CPU: Mask R-CNN's train step at 96 px, 8 images, went from 1.6 s to 0.8 s."""
import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
from jax import lax

from flaxbones.detection.boxes import box_area, div_scalar, no_fma


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _axis_taps(start, bin_size, grid, bins, slots, length):
    """Per roi, bin and sample slot along one axis: (low, high) indices and (low, high) weights,
    each (..., bins, slots), torchvision's bilinear rule (samples beyond [-1, length] weigh 0,
    clamped at the last row; slots >= grid weigh 0)."""
    p = jnp.arange(bins, dtype=jnp.float32)[:, None]
    i = jnp.arange(slots, dtype=jnp.float32)[None, :]
    start, bin_size, ln = start[..., None, None], bin_size[..., None, None], length[..., None, None]
    if isinstance(grid, int):
        keep, step = True, div_scalar((i + 0.5) * bin_size, float(grid))
    else:
        g = grid[..., None, None]
        keep = i < g  # grids <= 0 (aligned, empty roi) sample nothing
        step = div_scalar((i + 0.5) * bin_size, jnp.maximum(g, 1).astype(jnp.float32))
    coord = start + no_fma(p * bin_size) + step
    keep = keep & (coord >= -1.0) & (coord <= ln.astype(jnp.float32))
    c = jnp.clip(coord, 0.0, ln.astype(jnp.float32))
    low = c.astype(jnp.int32)
    last = low >= ln - 1
    low = jnp.where(last, ln - 1, low)
    high = jnp.where(last, ln - 1, low + 1)
    frac = jnp.where(last, 0.0, c - low.astype(jnp.float32))
    return low, high, jnp.where(keep, 1.0 - frac, 0.0), jnp.where(keep, frac, 0.0)


def _geometry(boxes, scale, output_size, aligned):
    """Per roi: its start (x0, y0) on the map and its bin sizes (bw, bh)."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (no_fma(boxes[..., k] * scale) - offset for k in range(4))
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
        rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
    bw, bh = div_scalar(rw, ow), div_scalar(rh, oh)
    return x0, y0, bw, bh


def _sample_grid(bin_w, bin_h, sampling_ratio, max_grid):
    """Samples per bin (gy, gx) and their static slot counts (sy, sx): `sampling_ratio` when
    positive, else torchvision's adaptive ceil(bin size), capped at the static `max_grid`."""
    if sampling_ratio > 0:
        return (sampling_ratio,) * 4
    sy, sx = max_grid
    gy = jnp.minimum(jnp.ceil(bin_h).astype(jnp.int32), sy)
    gx = jnp.minimum(jnp.ceil(bin_w).astype(jnp.int32), sx)
    return gy, gx, sy, sx


def _sample_count(grid):
    """A grid's sample count as a divisor: a float when static, else >= 1 per roi."""
    return float(grid) if isinstance(grid, int) else jnp.maximum(grid, 1).astype(jnp.float32)


def _axis_matrix(start, bin_size, grid, bins, slots, length: int):
    """(..., bins, length): each bin's mean of its samples' bilinear weights on the cells of
    one axis (the factor of the roi's sample mean along this axis; 0 where nothing samples)."""
    size = jnp.full(start.shape, length, jnp.int32)
    low, high, w_low, w_high = _axis_taps(start, bin_size, grid, bins, slots, size)
    cells = jnp.arange(length, dtype=jnp.int32)
    onto = lambda i, w: jnp.where(i[..., None] == cells, w[..., None], 0.0)
    m = jnp.sum(onto(low, w_low) + onto(high, w_high), axis=-2)
    count = _sample_count(grid)
    return m / (count if isinstance(count, float) else count[..., None, None])


def _roi_align_matmul(features, boxes, scale: float, output_size, sampling_ratio, aligned,
                      max_grid, keep=None):
    """RoIAlign of `boxes` (N, R, 4) on `features` (N, H, W, C) as two contractions with
    per-roi row and column weight matrices; rois where `keep` (N, R) is False pool zeros."""
    oh, ow = output_size
    n, h, w, c = features.shape
    x0, y0, bw, bh = _geometry(boxes, scale, output_size, aligned)
    gy, gx, sy, sx = _sample_grid(bw, bh, sampling_ratio, max_grid)
    rows = _axis_matrix(y0, bh, gy, oh, sy, h)
    cols = _axis_matrix(x0, bw, gx, ow, sx, w)
    if keep is not None:
        rows = jnp.where(keep[..., None, None], rows, 0.0)
    feats = features.astype(jnp.float32)
    by_col = jnp.einsum("nrqw,nhwc->nrhqc", cols, feats)
    return jnp.einsum("nrph,nrhqc->nrpqc", rows, by_col)


def _roi_align_flat(flat, base, heights, widths, scale, boxes, output_size, sampling_ratio,
                    aligned, max_grid):
    """RoIAlign from one flattened (M, C) feature buffer; per roi: `base` offset of its map,
    its `heights`/`widths` and `scale` (all (..., R)), `boxes` (..., R, 4). Samples are
    accumulated one grid point at a time (the kernel's order), so only (..., oh, ow, C)
    gathers live at once."""
    oh, ow = output_size
    x0, y0, bw, bh = _geometry(boxes, scale, output_size, aligned)
    gy, gx, sy, sx = _sample_grid(bw, bh, sampling_ratio, max_grid)
    count = _sample_count(gy) * _sample_count(gx)
    if not isinstance(count, float):
        count = count[..., None, None, None]
    ylo, yhi, wyl, wyh = _axis_taps(y0, bh, gy, oh, sy, heights)
    xlo, xhi, wxl, wxh = _axis_taps(x0, bw, gx, ow, sx, widths)
    row = lambda y: (base[..., None] + y * widths[..., None])[..., :, None]
    col = lambda x: x[..., None, :]

    def body(k, acc):
        iy, ix = k // sx, k % sx
        ry, rx = (lambda a: a[..., iy]), (lambda a: a[..., ix])
        r0, r1, c0, c1 = row(ry(ylo)), row(ry(yhi)), col(rx(xlo)), col(rx(xhi))
        hy, ly = ry(wyl)[..., :, None], ry(wyh)[..., :, None]
        hx, lx = rx(wxl)[..., None, :], rx(wxh)[..., None, :]
        term = lambda w, i: no_fma(w[..., None] * flat[i])  # w1 * v1 + ... rounded per op
        return acc + (term(hy * hx, r0 + c0) + term(hy * lx, r0 + c1)
                      + term(ly * hx, r1 + c0) + term(ly * lx, r1 + c1))

    acc = jnp.zeros((*boxes.shape[:-1], oh, ow, flat.shape[-1]), flat.dtype)
    acc = lax.fori_loop(0, sy * sx, body, acc, unroll=sy * sx <= 16)
    return div_scalar(acc, count)


METHODS = ("gather", "matmul")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"RoIAlign method must be one of {METHODS}, got {method!r}")


def roi_align(features, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, max_grid=None, method: str = "gather"):
    """torchvision.ops.roi_align on NHWC `features` (N, H, W, C) with per-image `boxes`
    (N, R, 4) xyxy -> (N, R, oh, ow, C).

    `sampling_ratio <= 0` (adaptive, ceil(roi size / output size) samples per bin) is made
    static by `max_grid` (int or (gy, gx), default ceil(H / oh), ceil(W / ow): every roi
    inside the map): exact while a roi's grid fits the cap, clamped to the cap beyond it.
    `method`: "gather" or "matmul" (see the module's docstring).
    """
    _check_method(method)
    oh, ow = _pair(output_size)
    n, h, w, c = features.shape
    r = boxes.shape[1]
    if max_grid is None:
        max_grid = (max(1, math.ceil(h / oh)), max(1, math.ceil(w / ow)))
    if method == "matmul":
        return _roi_align_matmul(jnp.asarray(features), boxes.astype(jnp.float32),
                                 spatial_scale, (oh, ow), sampling_ratio, aligned,
                                 _pair(max_grid))
    per = lambda v, dt: jnp.full((n, r), v, dt)
    base = (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None] * jnp.ones((1, r), jnp.int32)
    return _roi_align_flat(jnp.asarray(features).reshape(n * h * w, c), base, per(h, jnp.int32),
                           per(w, jnp.int32), per(spatial_scale, jnp.float32),
                           boxes.astype(jnp.float32), (oh, ow), sampling_ratio, aligned,
                           _pair(max_grid))


def roi_levels(boxes, k_min: int, k_max: int, canonical_scale=224, canonical_level=4, eps=1e-6):
    """torchvision's LevelMapper: the pyramid level index (0 = k_min) of each box (..., 4),
    floor(k0 + log2(sqrt(area) / s0) + eps) clamped; -1 where the area is negative (NaN in
    torchvision, whose rois then pool nothing)."""
    s = jnp.sqrt(box_area(boxes))
    lvl = canonical_level + jnp.log2(div_scalar(s, float(canonical_scale)))
    lvl = jnp.floor(lvl + jnp.float32(eps))
    lvl = jnp.clip(lvl, k_min, k_max)
    return jnp.where(jnp.isnan(lvl), -1, lvl.astype(jnp.int32) - k_min)


@dataclasses.dataclass(frozen=True)
class MultiScaleRoIAlign:
    """torchvision.ops.MultiScaleRoIAlign (aligned=False) over pyramid levels given finest
    first with their static `strides` (powers of 2); every roi is pooled from its mapped level,
    all levels in one pass over one concatenated buffer.

    torchvision infers each level's scale as 2**round(log2(feature height / largest valid
    image height)); that equals our 1 / stride whenever the padded batch height is below
    sqrt(2) x the largest valid height (always so for its own padding to 32 above ~75 px).
    """
    output_size: int | tuple[int, int]
    sampling_ratio: int
    canonical_scale: int = 224
    canonical_level: int = 4
    method: str = "gather"

    def __call__(self, features: Sequence, strides: Sequence[int], boxes):
        if len(features) != len(strides):
            raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
        if any(s < 1 or s & (s - 1) for s in strides):
            raise ValueError(f"strides must be powers of 2 as torchvision's scales, got {strides}")
        _check_method(self.method)
        n, _, _, c = features[0].shape
        r = boxes.shape[1]
        boxes = boxes.astype(jnp.float32)
        shapes = [f.shape[1:3] for f in features]
        if len(features) == 1:
            lvl = jnp.zeros((n, r), jnp.int32)
        else:
            k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
            lvl = roi_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level)
        ok = lvl >= 0
        sr, size = self.sampling_ratio, _pair(self.output_size)
        grid = None
        if sr <= 0:
            grid = (max(1, math.ceil(max(s[0] for s in shapes) / size[0])),
                    max(1, math.ceil(max(s[1] for s in shapes) / size[1])))
        if self.method == "matmul":
            return sum(_roi_align_matmul(f, boxes, 1.0 / s, size, sr, False, grid, lvl == i)
                       for i, (f, s) in enumerate(zip(features, strides)))
        flat = jnp.concatenate([f.reshape(-1, c) for f in features], 0)
        starts = [0]
        for hh, ww in shapes:
            starts.append(starts[-1] + n * hh * ww)
        lvl = jnp.maximum(lvl, 0)
        pick = lambda vals, dt: jnp.asarray(vals, dt)[lvl]
        hs, ws = pick([s[0] for s in shapes], jnp.int32), pick([s[1] for s in shapes], jnp.int32)
        base = pick(starts[:-1], jnp.int32) + jnp.arange(n, dtype=jnp.int32)[:, None] * hs * ws
        scale = pick([1.0 / s for s in strides], jnp.float32)
        out = _roi_align_flat(flat, base, hs, ws, scale, boxes, size, sr, False, grid)
        return jnp.where(ok[..., None, None, None], out, 0.0)
