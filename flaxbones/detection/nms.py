"""Greedy NMS with a fixed output size, keeping exactly what torchvision.ops.nms / batched_nms keep.

Boxes are sorted once (valid first, score descending, index ascending: torchvision's stable CPU
sort), then visited in tiles under a lax.while_loop that stops as soon as `max_output` boxes are
kept or the remaining entries are invalid. A tile is first suppressed by the boxes already kept,
then resolved exactly within itself by a fixed-point iteration of the greedy rule (box j survives
iff no earlier surviving box overlaps it), which settles in at most tile-size steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxbones.detection.boxes import box_iou

_TILE = 256
# torchvision.ops.batched_nms on CPU offsets boxes per class (one nms call) while boxes.numel()
# <= 4000 and loops over classes above that; the two differ in float rounding, so mirror the switch.
_TRICK_MAX_NUMEL = 4000


def _threshold(iou_threshold):
    """float32 t with (iou > t) == (float64(iou) > iou_threshold): torchvision's kernel compares the
    float32 IoU with the threshold as a double, so round the threshold down, not to nearest."""
    if isinstance(iou_threshold, (jax.Array, jax.core.Tracer)):
        return jnp.asarray(iou_threshold, jnp.float32)  # traced: nearest float32 (documented)
    t = np.float32(iou_threshold)
    if float(t) > float(iou_threshold):
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def _greedy(boxes, labels, alive, thr, max_output, tile):
    """Greedy NMS over `boxes` already in visiting order; `labels` None or (n,) class ids (boxes
    only suppress same-class boxes). Returns (positions (max_output,) int32, count)."""
    n = boxes.shape[0]
    pad = -n % tile
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    alive = jnp.pad(alive, (0, pad))
    labels = None if labels is None else jnp.pad(labels, (0, pad))
    n_tiles = (n + pad) // tile
    upper = jnp.triu(jnp.ones((tile, tile), bool), 1)  # upper[i, j]: i is visited before j
    slots = jnp.arange(max_output)

    def cond(state):
        t, count, _, _, _ = state
        return (t < n_tiles) & (count < max_output) & alive[jnp.minimum(t, n_tiles - 1) * tile]

    def body(state):
        t, count, pos, kept, kept_lab = state
        start = t * tile
        tb = lax.dynamic_slice_in_dim(boxes, start, tile)
        ok = lax.dynamic_slice_in_dim(alive, start, tile)
        by_kept = (box_iou(tb, kept) > thr) & (slots < count)[None, :]
        over = (box_iou(tb, tb) > thr) & upper
        if labels is not None:
            tl = lax.dynamic_slice_in_dim(labels, start, tile)
            by_kept &= tl[:, None] == kept_lab[None, :]
            over &= tl[:, None] == tl[None, :]
        ok &= ~jnp.any(by_kept, axis=1)

        def step(c):
            keep, _ = c
            new = ok & ~jnp.any(over & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(lambda c: c[1], step, (ok, jnp.any(ok)))
        dest = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_output)
        pos = pos.at[dest].set(start + jnp.arange(tile, dtype=jnp.int32), mode="drop")
        kept = kept.at[dest].set(tb, mode="drop")
        if labels is not None:
            kept_lab = kept_lab.at[dest].set(tl, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_output)
        return t + 1, count, pos, kept, kept_lab

    kept_lab = jnp.zeros((max_output,), jnp.int32 if labels is None else labels.dtype)
    state = (jnp.int32(0), jnp.int32(0), jnp.zeros((max_output,), jnp.int32),
             jnp.zeros((max_output, 4), boxes.dtype), kept_lab)
    _, count, pos, _, _ = lax.while_loop(cond, body, state)
    return pos, count


def _nms(boxes, scores, labels, iou_threshold, max_output, valid, offsets_fn):
    n = boxes.shape[0]
    if n == 0 or max_output == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    scores = jnp.asarray(scores)
    neg = jnp.where(scores == 0, jnp.zeros_like(scores), -scores)  # -0.0 ties with 0.0, as in torch
    _, _, order = lax.sort((~valid, neg, jnp.arange(n, dtype=jnp.int32)), num_keys=2, is_stable=True)
    boxes, labels = offsets_fn(boxes, valid, labels)
    lab = None if labels is None else labels[order]
    tile = min(_TILE, -(-n // 8) * 8)
    pos, count = _greedy(boxes[order], lab, valid[order], _threshold(iou_threshold), max_output, tile)
    keep_valid = jnp.arange(max_output) < count
    return jnp.where(keep_valid, order[pos], 0), keep_valid


def nms(boxes, scores, iou_threshold, max_output, valid=None):
    """torchvision.ops.nms with a fixed output: (keep (max_output,) int32 indices into the input,
    descending score, ties by lower index; keep_valid (max_output,) bool). Invalid entries are
    never kept nor suppress; padding slots hold index 0. Single image: jax.vmap for a batch."""
    return _nms(boxes, scores, None, iou_threshold, max_output, valid, lambda b, v, l: (b, l))


def batched_nms(boxes, scores, idxs, iou_threshold, max_output, valid=None):
    """torchvision.ops.batched_nms (NMS within each class id `idxs`) with nms()'s fixed output.
    `valid` must mark exactly the boxes torchvision would be given: like torchvision on CPU, while
    their count * 4 <= 4000 the boxes are offset by class * (max valid coordinate + 1) (its
    coordinate trick, rounding included), above that classes are separated exactly."""

    def offsets(b, v, labels):
        trick = jnp.sum(v) * 4 <= _TRICK_MAX_NUMEL
        max_coord = jnp.max(jnp.where(v[:, None], b, -jnp.inf))
        off = labels.astype(b.dtype) * (max_coord + jnp.asarray(1, b.dtype))
        b = jnp.where(trick, b + off[:, None], b)
        # under the trick every box shares one "class"; otherwise compare the real ids
        return b, jnp.where(trick, jnp.zeros_like(labels), labels)

    return _nms(boxes, scores, jnp.asarray(idxs), iou_threshold, max_output, valid, offsets)
